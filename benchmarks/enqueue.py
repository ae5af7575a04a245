"""Durable enqueues per second with 1, 10 and 100 concurrent producers, beside the same store
with group commit turned off (one commit, one fsync, per message), measured in one run.

    python benchmarks/enqueue.py [--seconds 5] [--dir /tmp]

Two paths are measured:
- "store": already-validated messages handed to the store (what group commit changes);
- "API": AsyncPostlane.send(), including address validation and MIME rendering.

Every enqueue is acknowledged only after its commit (SQLite WAL, synchronous=FULL) in every
column; the only difference is how many acknowledged enqueues share one commit.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import done_progress, progress, table

from postlane.app import AsyncPostlane
from postlane.config import config_from_dict
from postlane.message import Message, new_message_id, prepare
from postlane.store.sqlite import SQLiteStore

BODY = "Hello, this is a transactional message. " * 25  # ~1 KB


async def measure(
    folder: Path, producers: int, seconds: float, group_commit: bool, api: bool
) -> tuple[float, int]:
    path = folder / f"enqueue-{producers}-{int(group_commit)}-{int(api)}.db"
    config = config_from_dict({"store": {"url": f"sqlite:///{path}"}})
    store = SQLiteStore(path, max_jobs_per_commit=256 if group_commit else 1)
    template = prepare(
        Message(sender="app@example.com", to=["ada@example.net"], subject="Welcome", text=BODY),
        max_size=10**7,
    )
    count = 0
    async with AsyncPostlane(config, store=store) as app:
        deadline = time.perf_counter() + seconds

        async def produce(n: int) -> None:
            nonlocal count
            i = 0
            while time.perf_counter() < deadline:
                if api:
                    await app.send(
                        sender="app@example.com",
                        to=[f"user{n}-{i}@example.net"],
                        subject="Welcome",
                        text=BODY,
                    )
                else:
                    message = dataclasses.replace(template, id=new_message_id())
                    await store.enqueue([message], time.time())
                count += 1
                i += 1

        start = time.perf_counter()
        await asyncio.gather(*(produce(n) for n in range(producers)))
        elapsed = time.perf_counter() - start
        commits = store.commits
    return count / elapsed, max(1, count // max(commits, 1))


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--dir", default=None, help="where the databases go (default: a temp dir)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for api in (False, True):
            for producers in (1, 10, 100):
                for group in (True, False):
                    what = "API" if api else "store"
                    mode = "group commit" if group else "one commit per message"
                    progress(f"{what}, {producers} producer(s), {mode}")
                    results[api, producers, group] = await measure(
                        Path(tmp), producers, args.seconds, group, api
                    )
        done_progress()
    print("durable enqueues per second (SQLite, WAL, synchronous=FULL), measured side by side")
    rows = []
    for api in (False, True):
        for producers in (1, 10, 100):
            grouped, per_commit = results[api, producers, True]
            naive, _ = results[api, producers, False]
            rows.append(
                (
                    "API" if api else "store",
                    producers,
                    f"{grouped:,.0f}",
                    f"{naive:,.0f}",
                    f"{grouped / naive:.1f}x",
                    per_commit,
                )
            )
    print(
        table(["path", "producers", "group commit", "one commit/msg", "ratio", "msgs/commit"], rows)
    )


if __name__ == "__main__":
    asyncio.run(main())
