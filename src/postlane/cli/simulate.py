"""``postlane simulate``: the provider simulator as a command (an smtp-sink that answers like
Gmail, Microsoft or Yahoo). The simulator itself, and aiosmtpd under it, load only when this
command runs: no other command pays for them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from postlane.config import parse_duration, parse_listen


@click.command("simulate")
@click.option(
    "--listen",
    default="127.0.0.1:2525",
    show_default=True,
    metavar="HOST:PORT",
    help="Where to listen (port 0: any free port, printed at start).",
)
@click.option(
    "--scenario",
    default="accept",
    show_default=True,
    metavar="NAME|FILE",
    help="A built-in scenario (see --list) or a scenario TOML file.",
)
@click.option("--report", "report_path", metavar="FILE", help="Also write the report to FILE.")
@click.option("--duration", metavar="DURATION", help='Stop after this long, e.g. "30s".')
@click.option(
    "--max-messages",
    type=click.IntRange(min=1),
    metavar="N",
    help="Stop once N messages were accepted.",
)
@click.option("--store-dir", metavar="DIR", help="Save each accepted message as DIR/NNNNNNNN.eml.")
@click.option(
    "--reports-to",
    metavar="HOST:PORT",
    help='Where the DSNs and complaints of stage "later" rules are delivered (default: the '
    "scenario's reports_to, else 127.0.0.1:2526, postlane's bounce listener).",
)
@click.option("--seed", type=int, help="Seed for the scenario's randomness (overrides its own).")
@click.option("--list", "list_only", is_flag=True, help="List the built-in scenarios and exit.")
def simulate_command(
    listen: str,
    scenario: str,
    report_path: str | None,
    duration: str | None,
    max_messages: int | None,
    store_dir: str | None,
    reports_to: str | None,
    seed: int | None,
    list_only: bool,
) -> None:
    """A provider simulator: an SMTP server that answers like Gmail, Microsoft, Yahoo or Postfix.

    Runs until Ctrl-C or SIGTERM (or --duration, or --max-messages), then prints a JSON report
    on stdout: messages accepted, per domain, duplicates by Message-ID, replies by class,
    accepted messages per second, and the DSNs and complaints sent afterwards.
    """
    # imported here, not at the top: only this command loads the simulator (and aiosmtpd)
    from postlane.simulate import Scenario, Simulator, builtin_scenarios, run_until_stopped
    from postlane.simulate.scenario import reports_address, show_address

    if list_only:
        for name in builtin_scenarios():
            click.echo(f"{name:16} {Scenario.load(name).description}")
        return
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    seconds: float | None = None
    if duration is not None:
        try:
            seconds = parse_duration(duration)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--duration") from None
    destination: tuple[str, int] | None = None
    if reports_to is not None:
        try:
            destination = reports_address(reports_to)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--reports-to") from None
    if report_path is not None and not Path(report_path).resolve().parent.is_dir():
        raise click.BadParameter(f"no directory for {report_path}", param_hint="--report")
    loaded = Scenario.load(scenario)
    simulator = Simulator(
        loaded,
        host=host,
        port=port,
        seed=seed,
        store_dir=store_dir,
        max_messages=max_messages,
        reports_to=destination,
    )

    def announce(bound_host: str, bound_port: int) -> None:
        reports = ""
        if simulator.scenario.reports_later:
            reports = f", reports to {show_address(simulator.scenario.reports_to)}"
        click.echo(
            f"postlane simulate: scenario {loaded.name} (seed {simulator.scenario.seed}) "
            f"listening on {bound_host}:{bound_port}{reports}; Ctrl-C to stop",
            err=True,
        )

    report = asyncio.run(run_until_stopped(simulator, seconds, announce))
    document = json.dumps(report, indent=2, ensure_ascii=False)
    click.echo(document)
    if report_path is not None:
        try:
            Path(report_path).write_text(document + "\n", encoding="utf-8")
        except OSError as exc:
            raise click.ClickException(
                f"cannot write the report to {report_path}: {exc.strerror}"
            ) from None
