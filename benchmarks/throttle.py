"""Against a server that answers 421 4.7.28 above R messages/s (the provider simulator): the
delivered rate and the refusals with throttling on, beside the same run with it off.

    python benchmarks/throttle.py [--rate 40] [-n 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import done_progress, progress, table

from postlane.app import AsyncPostlane
from postlane.classify import ReplyClass
from postlane.config import config_from_dict
from postlane.message import Message
from postlane.simulate import Scenario, Simulator
from postlane.transports import transport_for
from postlane.worker import Worker

REPLY = (
    "421-4.7.28 [127.0.0.1] Our system has detected an unusual rate of\n"
    "421 4.7.28 unsolicited mail originating from your IP address. {id} - gsmtp\n"
)


async def run(rate: int, count: int, enabled: bool) -> dict[str, float]:
    scenario = Scenario.from_dict(
        {"throttle": {"rate": rate, "burst": rate, "stage": "data", "reply": REPLY}}
    )
    with tempfile.TemporaryDirectory() as tmp:
        async with Simulator(scenario, host="127.0.0.1", port=0) as simulator:
            host, port = simulator.address
            config = config_from_dict(
                {
                    "store": {"url": f"sqlite:///{tmp}/q.db"},
                    "delivery": {"relay": f"smtp://{host}:{port}", "concurrency": 20},
                    "retry": {"delays": ["2s"], "jitter": 0},
                    "throttle": {"enabled": enabled, "increase": 4.0, "cool_down": "2s"},
                }
            )
            async with AsyncPostlane(config) as app:
                results = await app.send_many(
                    [
                        Message(sender="a@example.com", to=[f"u{i}@gmail.com"], text="x")
                        for i in range(count)
                    ]
                )
                worker = Worker.from_config(config, app.store, transport_for(config), wake=app.wake)
                stop = asyncio.Event()
                task = asyncio.create_task(worker.run(stop))
                started = time.monotonic()
                while (await app.stats()).sent < count:  # noqa: ASYNC110 (a benchmark polls)
                    await asyncio.sleep(0.1)
                elapsed = time.monotonic() - started
                stop.set()
                await task
                attempts = []
                for r in results:
                    for recipient in (await app.get(r.id)).recipients:
                        attempts.extend(recipient.history or ())
                await worker.transport.close()
    attempts.sort(key=lambda a: a.at)
    throttled = [a for a in attempts if a.cls is ReplyClass.THROTTLED]
    start = (throttled[0].at + 3.0) if throttled else attempts[0].at
    later = [a for a in attempts if a.at >= start]
    end = max(a.at for a in attempts)
    sent_later = sum(a.cls is ReplyClass.DELIVERED for a in later)
    return {
        "seconds": elapsed,
        "attempts": len(attempts),
        "refused": len(throttled),
        "refused_after": sum(a.cls is ReplyClass.THROTTLED for a in later) / max(len(later), 1),
        "rate_after": sent_later / max(end - start, 1e-6),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=int, default=40)
    parser.add_argument("-n", type=int, default=1000)
    args = parser.parse_args()
    progress("throttling on")
    on = await run(args.rate, args.n, True)
    progress("throttling off")
    off = await run(args.rate, args.n, False)
    done_progress()
    print(f"{args.n} messages to a server accepting {args.rate}/s per client, 421 4.7.28 above")
    rows = [
        (
            name,
            f"{r['seconds']:.1f}",
            f"{r['attempts']:.0f}",
            f"{r['refused']:.0f}",
            f"{100 * r['refused_after']:.1f}%",
            f"{r['rate_after']:.1f}",
        )
        for name, r in (("throttling on", on), ("throttling off", off))
    ]
    print(
        table(
            [
                "",
                "seconds",
                "attempts",
                "refused (421)",
                "refused after convergence",
                "delivered/s after",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
