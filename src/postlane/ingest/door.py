"""What every front door is given.

The front doors (the HTTP API with the providers' webhooks, SMTP submission) share their core:
the configuration, the application they enqueue into and read from, and, under ``postlane
serve``, the metrics they count into and the worker their probes report on. ``serve`` makes one
:class:`FrontDoor` and hands it to each (:func:`postlane.ingest.http.build_app`,
:func:`postlane.ingest.smtp.start_smtp`); a test makes its own."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from postlane.app import AsyncPostlane
    from postlane.config import Config
    from postlane.metrics import Metrics
    from postlane.worker import Worker

__all__ = ["FrontDoor"]


@dataclasses.dataclass(frozen=True)
class FrontDoor:
    """What a front door is given (see the module docstring)."""

    config: Config
    app: AsyncPostlane
    #: what it counts into (None: nothing is counted)
    metrics: Metrics | None = None
    #: in ``serve``, the worker /readyz reports on
    worker: Worker | None = None
