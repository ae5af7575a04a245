"""The fleet's parts of a destination's limits: what each process that shares a rate or a
concurrency cap with others takes of it, and the values the throttle answers with when the
fleet is involved.

Every process sending to a limited destination records its demand in the store about once a
second (:meth:`~postlane.throttle.Throttle.demands`); :func:`parts_of` turns all live demands
into this process's part of the rate and of the cap. Every process computes the same split from
the same demands; the throttle decides how fast to move to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from postlane.records import FleetShares

#: the fleet's schedule of a shared rate gives this much more slots than the rate: what comes
#: back due goes to whichever process claims first, not in proportion to the shares, and one
#: whose share is spent for the moment sends it back to the schedule's end while another's
#: tokens go unused; a few more slots than the rate keep every share busy (the token buckets,
#: not the schedule, hold the fleet to the rate)
FLEET_SURPLUS = 0.25
#: a process that joined the fleet this recently is still starting (see :func:`parts_of`)
JOINING = 3.0
#: the name under which every process says it is alive in the fleet's shares (so that one
#: starting beside others takes an even share of a destination before its first demand)
PRESENCE = "*"


@dataclass(frozen=True)
class FleetSchedule:
    """A rate other processes share: a delivery sent back to wait for it takes the next slot
    of the fleet's schedule of that rate (in the store), not one of this process's own."""

    destination: str
    #: the slots' spacing: one over the fleet's rate
    interval: float


@dataclass(frozen=True)
class FleetProbe:
    """The delivery admitted would probe ``destination`` after its pause (which ended at
    ``pause_end``). One probe for the fleet: the gate asks the store whether this process
    probes (:meth:`~postlane.throttle.Throttle.probe_granted`), waits for another's
    (:meth:`~postlane.throttle.Throttle.probe_elsewhere`) or finds the destination open
    already (:meth:`~postlane.throttle.Throttle.opened_elsewhere`)."""

    destination: str
    pause_end: float


@dataclass(frozen=True)
class Part:
    """One process's part of a destination's limits."""

    #: of the rate (1.0: all of it)
    share: float
    #: of the concurrency cap (None: no cap)
    slots: int | None
    #: how many processes asked for the destination, this one included
    askers: int


def parts_of(
    shares: FleetShares, owner: str, now: float, caps: Mapping[str, int]
) -> dict[str, Part]:
    """``owner``'s part of each destination ``shares`` lists: its demand's part of all live
    demands, of the rate and (largest remainders first, the same on every process) of the
    concurrency cap in ``caps`` (0: none). A process that joined the fleet within
    :data:`JOINING` and has not asked for a destination yet counts as wanting as much as
    ``owner`` (it is starting, and will)."""
    joining = {
        other
        for (name, other), since in shares.since.items()
        if name == PRESENCE and other != owner and now - since < JOINING
    }
    out = {}
    for name, by_owner in shares.demands.items():
        if name == PRESENCE:
            continue
        mine = by_owner.get(owner, 0.0)
        demands = {**{other: mine for other in joining}, **by_owner}
        total = sum(demands.values())
        cap = caps.get(name, 0)
        out[name] = Part(
            share=mine / total if total > 0 else 1.0,
            slots=split(cap, demands).get(owner, 0) if cap else None,
            askers=max(1, len(by_owner)),
        )
    return out


def split(cap: int, demands: Mapping[str, float]) -> dict[str, int]:
    """``cap`` slots split by demand: whole parts first, then one more each by largest
    remainder (ties by owner), so every process computes the same split."""
    total = sum(demands.values())
    if total <= 0:
        return {owner: 0 for owner in demands}
    exact = {owner: cap * demand / total for owner, demand in demands.items()}
    slots = {owner: int(value) for owner, value in exact.items()}
    left = cap - sum(slots.values())
    for owner in sorted(exact, key=lambda o: (-(exact[o] - slots[o]), o))[:left]:
        slots[owner] += 1
    return slots
