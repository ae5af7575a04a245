"""``postlane classify``: which class a server reply falls in, and the rule that decided."""

from __future__ import annotations

import sys

import click

from postlane.classify import classify
from postlane.cli.context import config_option, json_option
from postlane.cli.output import out, print_json, reply_code


@click.command("classify")
@config_option
@click.argument("reply")
@json_option
def classify_command(reply: str, as_json: bool) -> None:
    """Classify one server reply ('-' reads it from stdin) and say which rule decided."""
    if reply == "-":
        reply = sys.stdin.read()
    reply = reply.replace("\\r\\n", "\n").replace("\\n", "\n")
    if not reply.strip():
        raise click.UsageError('give a server reply to classify, e.g. "550 5.1.1 User unknown"')
    verdict = classify(reply)
    if as_json:
        data = {
            "class": verdict.cls.value,
            "code": verdict.code,
            "enhanced": verdict.enhanced,
            "rule": verdict.rule,
        }
        if verdict.explanation:
            data["explanation"] = verdict.explanation
        print_json(data)
        return
    code = reply_code(verdict.code, verdict.enhanced) or "no code"
    out.print(f"[bold]{verdict.cls.value}[/]  ({code})", markup=True)
    explanation = f": {verdict.explanation}" if verdict.explanation else ""
    out.print(f"rule: {verdict.rule}{explanation}", markup=False)
    if verdict.code is None:  # "hello": text a server never answers, read as an error message
        out.print(
            "no reply code in it: read as an error before any reply (a refused connection, a "
            'TLS failure); a server\'s reply starts with its code, e.g. "550 5.1.1 ..."',
            markup=False,
        )
