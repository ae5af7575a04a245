"""Dead-letter triage: a thousand identical failures should read as one line with a count.

Replies differ in details that do not matter for triage (the recipient's address, queue ids,
IP addresses, session tokens); :func:`normalize_reply` masks them, and
:func:`group_dead_letters` merges dead letters whose class, domain, code and masked reply agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from postlane.classify import ReplyClass
from postlane.records import DeadGroup

_MASKS = (
    (re.compile(r"<?[\w.+-]+@[\w-]+(?:\.[\w-]+)+>?"), "<address>"),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b"), "<ip>"),
    (re.compile(r"\b[0-9a-f]{2,4}(?::[0-9a-f]{0,4}){2,7}\b", re.IGNORECASE), "<ip>"),
    (re.compile(r"https?://\S+"), "<url>"),
    # tokens mixing letters and digits (queue ids, session ids, gsmtp suffixes), but not the
    # SMTP extensions a reply names
    (
        re.compile(
            r"\b(?!(?:SMTPUTF8|8BITMIME|BINARYMIME)\b)"
            r"(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{8,}\b"
        ),
        "<id>",
    ),
    (re.compile(r"\S+(?= - gsmtp\b)"), "<id>"),  # Gmail's reply id, however short
    (re.compile(r"\b\d{4,}\b"), "<n>"),
    (re.compile(r"\s+"), " "),
)


def normalize_reply(text: str | None) -> str:
    """A reply with its per-message details masked, for grouping."""
    if not text:
        return ""
    for pattern, mask in _MASKS:
        text = pattern.sub(mask, text)
    return text.strip()[:300]


def group_dead_letters(rows: Iterable[Sequence[Any]], limit: int) -> list[DeadGroup]:
    """Merge ``(class, domain, code, enhanced, text, count, first, last, sample_id)`` rows
    whose class, domain, code, enhanced code and normalised text agree; largest first."""
    groups: dict[tuple[str, str, int | None, str | None, str], list[Any]] = {}
    for cls, domain, code, enhanced, text, count, first, last, sample in rows:
        key = (cls or ReplyClass.TEMPORARY.value, domain, code, enhanced, normalize_reply(text))
        group = groups.get(key)
        if group is None:
            groups[key] = [count, first, last, sample]
        else:
            group[0] += count
            group[1] = min(group[1], first)
            group[2] = max(group[2], last)
            group[3] = min(group[3], sample)
    out = [
        DeadGroup(ReplyClass(cls), domain, code, enhanced, reply, count, first, last, sample)
        for (cls, domain, code, enhanced, reply), (count, first, last, sample) in groups.items()
    ]
    out.sort(key=lambda g: (-g.count, -g.last_dead_at))
    return out[:limit]
