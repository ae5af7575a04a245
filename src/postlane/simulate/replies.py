"""Reply templates: what a scenario answers, checked when the scenario is read, and filled in
(``{address}``, ``{ip}``... see :data:`PLACEHOLDERS`) each time one is sent."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: the placeholders a reply may use, filled in when it is sent
PLACEHOLDERS = {
    "id": "the session's id (Gmail shows one like it in every reply)",
    "queue_id": "the number the next accepted message gets, in hex",
    "ip": "the client's IP address",
    "hostname": "the scenario's hostname",
    "sender": "the envelope sender (MAIL FROM)",
    "sender_domain": "the envelope sender's domain",
    "address": "the recipient (at DATA: the first recipient)",
    "local": "the recipient's local part",
    "domain": "the recipient's domain",
    "time": "the time, in seconds since the epoch",
}
#: the placeholders the banner may use (it is sent before anything else is known)
BANNER_PLACEHOLDERS = frozenset({"id", "hostname", "time"})
_REPLY_LINE = re.compile(r"([2-5][0-9][0-9])(?:[ -](.*))?\Z", re.DOTALL)


def check_placeholders(template: str, allowed: Iterable[str]) -> bool:
    """Whether ``template`` has placeholders; ValueError on an unknown or malformed one."""
    allowed = frozenset(allowed)
    found = False
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        raise ValueError(
            f"unbalanced braces in {template!r} (write {{{{ and }}}} for literal braces)"
        ) from None
    for _literal, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            known = ", ".join("{" + p + "}" for p in sorted(allowed))
            raise ValueError(f"unknown placeholder {{{name}}} (known: {known})")
        found = True
    return found


@dataclass(frozen=True)
class Reply:
    """One reply as the server sends it: lines joined by CRLF, each starting with the code
    (``550-5.1.1 ...`` on all lines but the last, ``550 5.1.1 ...`` on the last)."""

    template: str
    code: int
    templated: bool

    @classmethod
    def parse(cls, text: str) -> Reply:
        """A reply from a scenario; ValueError saying what is wrong with it."""
        lines = [line.strip() for line in text.strip().splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise ValueError("a reply cannot be empty")
        code = ""
        out = []
        for number, line in enumerate(lines):
            match = _REPLY_LINE.match(line)
            if match is None:
                raise ValueError(f"{line!r} does not start with a reply code (200-599)")
            if not code:
                code = match.group(1)
            elif match.group(1) != code:
                raise ValueError(f"every line of a reply repeats its code {code}: {line!r}")
            separator = " " if number == len(lines) - 1 else "-"
            out.append(f"{code}{separator}{match.group(2) or ''}".rstrip())
        template = "\r\n".join(out)
        return cls(template, int(code), check_placeholders(template, PLACEHOLDERS))

    def render(self, values: Mapping[str, str]) -> str:
        return self.template.format_map(values) if self.templated else self.template
