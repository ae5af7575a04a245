"""The state the :class:`~postlane.throttle.Throttle` keeps for each destination: its limits, its
token bucket, its pause and probe, a held or slowed rate, the slots promised to deliveries sent
back to wait, and this process's share of the fleet's limits. Plain data; the throttle decides."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from postlane.config import DestinationLimits


@dataclass
class DestinationState:
    """What one process knows of one destination's limits and how it is being sent to."""

    name: str
    limits: DestinationLimits
    rate: float | None  # allowed now; None: no limit
    tokens: float = 1.0
    refilled_at: float = 0.0
    in_flight: int = 0
    failures: int = 0  # consecutive connection failures
    pause_level: int = 0
    paused_until: float | None = None
    probing: bool = False
    #: the end of the pause after which this process is the fleet's prober (its probe's
    #: outcome is recorded for the others)
    fleet_probe: float | None = None
    #: another process probes: wait until then before asking again
    probe_wait_until: float = float("-inf")
    reason: str | None = None
    last_decrease: float = float("-inf")
    #: a shaping rule's rate: the ceiling until ``held_until``, whatever successes say
    held_rate: float | None = None
    held_until: float = float("-inf")
    held_reason: str | None = None
    sent: deque[float] = field(default_factory=deque)
    #: slots promised to deliveries sent back to wait: the next one goes after this
    reserved_until: float = 0.0
    #: the last slot of the fleet's schedule this process gave a delivery (see
    #: :class:`FleetSchedule`)
    fleet_slotted_until: float = 0.0
    #: slots promised to waiting high-lane deliveries: they go ahead of the others' slots
    urgent_until: float = 0.0
    #: the rate those slots were spaced at (they are pulled in when it grows well past it)
    slotted_rate: float | None = None
    #: a lift cleared the slots of deliveries still waiting for them: call them back
    recall: bool = False
    changed: bool = False
    #: the pause is this process's own (it saw the replies): recorded for the fleet. A pause
    #: adopted from the store is not recorded again, so an operator's lift is never undone
    #: by a process that had not heard of it yet.
    own_pause: bool = False
    #: the newest recorded state this process has seen (its own or another's)
    synced_at: float = float("-inf")
    #: how many operator lifts of it this process has adopted (the store counts them): a
    #: record showing fewer was read before the last of them, and its pause is over; one
    #: showing more says a lift to adopt. Deferrals carry it (:class:`Deferral`).
    lifts: int = 0
    #: this process's part of the fleet's rate (1.0: alone, or not yet shared)
    share: float = 1.0
    #: this process's part of the concurrency cap (None: the whole cap)
    slots: int | None = None
    #: the rate last recorded (:meth:`Throttle.changes`), and the last throttling reply
    recorded_rate: float | None = None
    throttled_at: float = float("-inf")
    #: the share and slots the last :meth:`Throttle.set_shares` computed (a rise takes
    #: effect only once two syncs in a row say so; see there)
    offered: tuple[float, int | None] | None = None
    #: when sends to it were asked for, admitted or not (its demand)
    asked: deque[float] = field(default_factory=deque)
    #: how many processes asked for it, this one included, at the last sync
    askers: int = 1

    @property
    def configured_rate(self) -> float | None:
        return self.limits.rate or None

    @property
    def local_rate(self) -> float | None:
        """The rate this process may send at: its share of the fleet's."""
        return None if self.rate is None else self.rate * self.share

    @property
    def limited(self) -> bool:
        """Whether the fleet shares a limit of this destination: a configured rate or
        concurrency, or a rate in force on one that has none configured (a slow-down, a
        shaping rule's). Each process runs its bucket at its share of that rate, so the fleet
        sends the rate ``stats`` shows, not that rate once per process."""
        return bool(self.limits.rate or self.limits.concurrency or self.rate is not None)
