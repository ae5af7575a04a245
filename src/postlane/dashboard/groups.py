"""Dead-letter groups on the dashboard: the recipients whose failure reads the same (class,
domain, code, enhanced code and normalized reply, as ``dlq list`` groups them), named by a
stable key in forms and URLs so one click requeues or purges exactly that group."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from postlane.app import AsyncPostlane
from postlane.dashboard.forms import selector_from_filters
from postlane.records import DeadGroup, DeadLetter
from postlane.triage import normalize_reply

__all__ = ["GROUP_LIMIT", "group_key", "group_rows", "key_of_group"]

#: what a requeue or purge of one dead-letter group may touch at most (one click, one slice)
GROUP_LIMIT = 10_000


def group_key(cls: str, domain: str, code: int | None, enhanced: str | None, reply: str) -> str:
    """A dead-letter group's stable name in forms and URLs (what ``dlq list`` groups by)."""
    raw = "\x1f".join([cls, domain, str(code), str(enhanced), reply])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def key_of_group(g: DeadGroup) -> str:
    return group_key(g.cls.value, g.domain, g.code, g.enhanced, g.reply)


def _key_of_letter(d: DeadLetter) -> str:
    r = d.last_response
    return group_key(
        d.cls.value,
        d.domain,
        r.code if r else None,
        r.enhanced if r else None,
        normalize_reply(r.text if r else None),
    )


async def group_rows(app: AsyncPostlane, key: str, filters: Mapping[str, str]) -> list[int]:
    """The dead recipients (store rows) in group ``key``: the most recent ``GROUP_LIMIT`` of
    its class and domain (given with the form) whose reply reads the same. Exactly those:
    a message's other dead recipients, in other groups, are left alone. The class and
    domain's dead letters are read a page at a time until the group has its fill: a group
    older than the newest 10,000 of them was listed but said to be "empty now" (an audit)."""
    selector = selector_from_filters(app.clock, filters)
    rows: list[int] = []
    cursor = None
    while len(rows) < GROUP_LIMIT:
        page = await app.dead_letter_page(selector, cursor=cursor, limit=GROUP_LIMIT)
        rows += [d.delivery_id for d in page.items if _key_of_letter(d) == key]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    return sorted(rows[:GROUP_LIMIT])
