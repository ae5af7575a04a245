"""The provider simulator (placeholder: being written)."""

from __future__ import annotations

import click


@click.command("simulate")
@click.option("--listen", default="127.0.0.1:2525", show_default=True, metavar="HOST:PORT")
@click.option("--scenario", default="accept", show_default=True, metavar="NAME|FILE")
@click.option("--report", metavar="FILE")
def simulate_command(listen: str, scenario: str, report: str | None) -> None:
    """A provider simulator: an SMTP server that behaves like real providers."""
    raise click.ClickException("the simulator is not built yet")
