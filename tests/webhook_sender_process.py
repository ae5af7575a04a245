"""A webhook sender in a process of its own, for the tests that kill it (and the benchmark)::

    python tests/webhook_sender_process.py --store sqlite:////tmp/q.db \\
        --endpoint '{"url": "http://127.0.0.1:8080/hooks", "secret": "whsec_...",
                     "allow_private": true}' [--endpoint ...] [--lease 30] [--save-every 1]

Runs a :class:`~postlane.webhooks.sender.WebhookSender` for the endpoints (``[[webhooks.out]]``
tables as JSON) against the store until SIGTERM (a graceful stop: cursors saved, endpoints
handed back) or SIGKILL. Logs "webhook sender is running" once it has started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from postlane.store import open_store_url
from postlane.webhooks.endpoints import endpoints_from_config
from postlane.webhooks.sender import SenderSettings, WebhookSender

RUNNING = "webhook sender is running"


async def main() -> None:
    parser = argparse.ArgumentParser(description="run a webhook sender")
    parser.add_argument("--store", required=True, help="a store URL (sqlite:///... )")
    parser.add_argument("--endpoint", action="append", required=True, help="a table as JSON")
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--save-every", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    endpoints = endpoints_from_config([json.loads(table) for table in args.endpoint])
    store = open_store_url(args.store)
    await store.open()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sender = WebhookSender(
        store,  # type: ignore[arg-type]  # every store is a WebhookSenderStore
        endpoints,
        settings=SenderSettings(lease=args.lease, save_every=args.save_every),
    )
    logging.info("%s (owner %s)", RUNNING, sender.owner)
    try:
        await sender.run(stop)
    finally:
        await store.close()
    logging.info("webhook sender stopped")


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
