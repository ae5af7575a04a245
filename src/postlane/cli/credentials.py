"""``postlane hash-password`` and ``postlane dkim keygen``: the secrets the configuration refers
to, made where they will be kept (a password hash for ``[smtp] users``, a DKIM private key)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from postlane.cli.context import json_option
from postlane.cli.output import print_json
from postlane.errors import PostlaneError


@click.command("hash-password")
@click.option(
    "--stdin", "from_stdin", is_flag=True, help="Read the password from stdin (for scripts)."
)
def hash_password_command(from_stdin: bool) -> None:
    """Print a hash for [smtp] users (scrypt, salted): users = { app = "scrypt$..." }."""
    from postlane.ingest.smtp import hash_password

    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)
    if not password:
        raise click.UsageError("the password is empty")
    click.echo(hash_password(password))


@click.group()
def dkim() -> None:
    """DKIM keys for signing what SMTP and MX delivery send."""


@dkim.command("keygen")
@click.argument("domain")
@click.option(
    "--algorithm",
    type=click.Choice(["rsa", "ed25519"]),
    default="rsa",
    show_default=True,
    help="Key type: an Ed25519 key (RFC 8463) signs beside the domain's RSA key.",
)
@click.option(
    "--selector",
    help="DKIM selector.  [default: postlane, or postlane-ed25519 for an Ed25519 key]",
)
@click.option(
    "--out",
    "out_path",
    metavar="FILE",
    help="Where to write the private key (PEM).  [default: dkim/DOMAIN.pem, "
    "dkim/DOMAIN.ed25519.pem]",
)
@click.option("--bits", default=2048, show_default=True, type=click.IntRange(1024, 4096))
@click.option("--force", is_flag=True, help="Overwrite an existing key file.")
@json_option
def dkim_keygen(
    domain: str,
    algorithm: str,
    selector: str | None,
    out_path: str | None,
    bits: int,
    force: bool,
    as_json: bool,
) -> None:
    """Make a key pair for DOMAIN: write the private key, print the DNS record to publish."""
    from postlane.dkim import KeyType, dns_record_name, generate_key, valid_domain, zone_file_entry

    kind = KeyType(algorithm)
    domain = domain.strip().rstrip(".").lower()
    if not valid_domain(domain):
        raise click.UsageError(f"{domain!r} is not a domain name")
    ed25519 = kind is KeyType.ED25519
    selector = selector or ("postlane-ed25519" if ed25519 else "postlane")
    default_path = Path("dkim") / (f"{domain}.ed25519.pem" if ed25519 else f"{domain}.pem")
    path = Path(out_path) if out_path else default_path
    if path.exists() and not force:
        raise PostlaneError(f"{path} exists: keep it, or pass --force to replace it")
    key = generate_key(domain, selector, kind=kind, bits=bits)
    path.parent.mkdir(parents=True, exist_ok=True)
    # created 0600 from the start: the key is never readable by others, not even for a moment
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_pem)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_TRUNC
    if as_json:
        print_json(
            {
                "domain": domain,
                "algorithm": kind.value,
                "selector": selector,
                "private_key": str(path),
                "record_name": dns_record_name(domain, selector),
                "record": key.dns_record,
            }
        )
        return
    click.echo(f"wrote {path} (keep it private: mode 0600)")
    click.echo("publish this TXT record:")
    click.echo(zone_file_entry(domain, selector, key.dns_record))
    if ed25519:
        click.echo("then add it to the domain's table, beside its RSA key:")
        click.echo(
            f'[dkim."{domain}"]\ned25519_selector = "{selector}"\ned25519_private_key = "{path}"'
        )
        return
    click.echo("then configure it:")
    click.echo(f'[dkim."{domain}"]\nselector = "{selector}"\nprivate_key = "{path}"')
