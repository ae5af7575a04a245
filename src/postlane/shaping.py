"""``[[shaping]]`` rules: which replies of a destination make it pause or hold a rate.

A rule matches a reply by its destination (globs), its enhanced status code (a prefix) and its
text (a case-insensitive regular expression); it fires when ``after`` matching replies from one
destination arrive within ``within`` seconds, and then counts afresh. What a firing rule does
(pause, or hold a rate) is the :class:`~postlane.throttle.Throttle`'s business.
"""

from __future__ import annotations

import fnmatch
import re
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from postlane.classify import Verdict
from postlane.config import ShapingRule


@dataclass(frozen=True)
class Fired:
    rule: ShapingRule
    #: how the rule is named in reasons: its number in the file and what it matches on
    name: str


class ShapingRules:
    def __init__(self, rules: Sequence[ShapingRule]) -> None:
        self._rules = [(rule, _compile(rule)) for rule in rules]
        #: when each rule matched each destination, within the rule's window
        self._hits: dict[tuple[int, str], deque[float]] = {}

    def fired(self, destination: str, verdict: Verdict, now: float) -> Iterator[Fired]:
        """The rules that fire on this reply from ``destination``, in the file's order."""
        for number, (rule, pattern) in enumerate(self._rules):
            if rule.destinations and not any(
                fnmatch.fnmatchcase(destination, glob) for glob in rule.destinations
            ):
                continue
            if rule.enhanced is not None and not (verdict.enhanced or "").startswith(rule.enhanced):
                continue
            if pattern is not None and not pattern.search(verdict.text):
                continue
            hits = self._hits.setdefault((number, destination), deque())
            hits.append(now)
            while hits and hits[0] < now - rule.within:
                hits.popleft()
            if len(hits) < rule.after:
                continue
            hits.clear()
            yield Fired(rule, f"{number + 1} ({rule.match or rule.enhanced})")


def _compile(rule: ShapingRule) -> re.Pattern[str] | None:
    return re.compile(rule.match, re.IGNORECASE) if rule.match else None
