"""What the simulator's report counts: messages and recipients accepted and refused, by domain;
replies by stage, class and code; duplicates by Message-ID; accepted messages per second.

It is built not to slow the server: each reply template is classified once, messages are not
parsed (the Message-ID is found by a bytes search of the header block), and duplicates are
remembered as hashes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from postlane.classify import ReplyClass, classify
from postlane.clock import Clock, iso
from postlane.simulate.replies import Reply
from postlane.simulate.scenario import Stage

#: how many duplicated (Message-ID, recipient) pairs the report lists
_DUPLICATE_EXAMPLES = 10
#: the Message-ID is looked for in this much of a message, at most
_HEADER_LIMIT = 256 * 1024


def find_message_id(content: bytes) -> bytes | None:
    """The Message-ID header's value (unfolded, trimmed), found without parsing the message."""
    end = len(content) if len(content) < _HEADER_LIMIT else _HEADER_LIMIT
    for separator in (b"\r\n\r\n", b"\n\n"):
        found = content.find(separator, 0, end)
        if found >= 0:
            end = found
    head = content[:end]
    lowered = head.lower()
    if lowered.startswith(b"message-id:"):
        start = len(b"message-id:")
    else:
        found = lowered.find(b"\nmessage-id:")
        if found < 0:
            return None
        start = found + len(b"\nmessage-id:")
    stop = head.find(b"\n", start)
    # a folded header continues on lines that start with white space
    while stop >= 0 and head[stop + 1 : stop + 2] in (b" ", b"\t"):
        stop = head.find(b"\n", stop + 1)
    value = b" ".join(head[start : len(head) if stop < 0 else stop].split())
    return value or None


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


class ReportCounts:
    """Counters behind the report, kept cheap: a handful of increments per reply."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.started_at = clock.now()
        self.stopped_at: float | None = None
        self.connections = 0
        self.messages = 0
        self.recipients = 0
        self.dropped = 0
        self.without_message_id = 0
        self.accepted_by_domain: Counter[str] = Counter()
        self.refused_by_domain: Counter[str] = Counter()
        self.by_stage: Counter[tuple[str, str]] = Counter()
        self.by_code: Counter[str] = Counter()
        self.per_second: list[int] = []
        # (Message-ID, recipient) pairs, as hashes: seen once, and seen again
        self._seen: set[int] = set()
        self._duplicates: Counter[int] = Counter()
        self._examples: list[tuple[int, str, str]] = []
        # reply template -> (class, "code enhanced"), classified the first time it is sent
        self._keys: dict[str, tuple[str, str]] = {}

    def count_reply(self, stage: Stage, reply: Reply, text: str) -> None:
        key = self._keys.get(reply.template)
        if key is None:
            verdict = classify(text)
            code = f"{verdict.code} {verdict.enhanced}" if verdict.enhanced else str(verdict.code)
            key = self._keys[reply.template] = (verdict.cls.value, code)
        self.by_stage[(stage.value, key[0])] += 1
        self.by_code[key[1]] += 1

    def count_no_reply(self, stage: Stage) -> None:
        """A connection closed by the scenario instead of a reply."""
        self.by_stage[(stage.value, ReplyClass.CONNECTION.value)] += 1
        self.by_code["none (closed)"] += 1
        if stage is not Stage.CONNECT:
            self.dropped += 1

    def refuse(self, recipients: Iterable[str]) -> None:
        for address in recipients:
            self.refused_by_domain[_domain_of(address)] += 1

    def accept(self, recipients: Sequence[str], content: bytes) -> None:
        self.messages += 1
        self.recipients += len(recipients)
        for address in recipients:
            self.accepted_by_domain[_domain_of(address)] += 1
        message_id = find_message_id(content)
        if message_id is None:
            self.without_message_id += 1
        else:
            for address in recipients:
                key = hash((message_id, address.lower()))
                if key not in self._seen:
                    self._seen.add(key)
                    continue
                self._duplicates[key] += 1
                if self._duplicates[key] == 1 and len(self._examples) < _DUPLICATE_EXAMPLES:
                    shown = message_id.decode("utf-8", "replace")
                    self._examples.append((key, shown, address))
        second = max(0, int(self.clock.now() - self.started_at))
        per_second = self.per_second
        if second >= len(per_second):
            per_second.extend([0] * (second + 1 - len(per_second)))
        per_second[second] += 1

    def report(self) -> dict[str, Any]:
        end = self.stopped_at if self.stopped_at is not None else self.clock.now()
        elapsed = max(0.0, end - self.started_at)
        # replies given in the session: what stage "later" rules report is the reports' part
        by_stage: dict[str, dict[str, int]] = {
            stage.value: {} for stage in Stage if stage is not Stage.LATER
        }
        total: Counter[str] = Counter()
        for (stage, cls), count in sorted(self.by_stage.items()):
            by_stage[stage][cls] = count
            total[cls] += count
        domains = sorted(set(self.accepted_by_domain) | set(self.refused_by_domain))
        return {
            "started_at": iso(self.started_at),
            "stopped_at": iso(self.stopped_at),
            "elapsed_seconds": round(elapsed, 3),
            "connections": self.connections,
            "messages": self.messages,
            "recipients": self.recipients,
            "dropped": self.dropped,
            "without_message_id": self.without_message_id,
            "domains": {
                domain: {
                    "accepted": self.accepted_by_domain[domain],
                    "refused": self.refused_by_domain[domain],
                }
                for domain in domains
            },
            "duplicates": {
                "message_ids": len(self._duplicates),
                "deliveries": sum(self._duplicates.values()),
                "first": [
                    {"message_id": shown, "recipient": address, "count": 1 + self._duplicates[key]}
                    for key, shown, address in self._examples
                ],
            },
            "replies": {
                "total": dict(sorted(total.items())),
                "by_stage": by_stage,
                "by_code": dict(sorted(self.by_code.items())),
            },
            "rate": {
                "bucket_seconds": 1,
                "accepted": list(self.per_second),
                "peak": max(self.per_second, default=0),
                "mean": round(self.messages / elapsed, 3) if elapsed > 0 else 0.0,
            },
        }
