"""What a SQLite statement costs a thread that shares the GIL with a busy one (the SQLite
writer beside `postlane serve`'s event loop), beside the same statements alone, same run.

    python benchmarks/gil_steps.py [-n 2000] [--rows 50]

Python's ``sqlite3`` releases the GIL for every ``sqlite3_step`` (one per row an
``executemany`` binds or a ``RETURNING`` gives back); the thread then has to take the GIL back,
and while another thread runs Python it waits for it (up to the switch interval, 5 ms). Three
shapes of the same work (``--rows`` rows per transaction, WAL, ``synchronous=NORMAL`` so that
fsync does not hide the effect): one ``executemany`` (a step per row), and one statement taking
all rows as a JSON parameter (``json_each``: one step), each alone and beside a thread spinning
in Python. The ratio busy / alone is the point.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import done_progress, progress, table


def connect(folder: str) -> sqlite3.Connection:
    conn = sqlite3.connect(Path(folder) / "steps.db", isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b INTEGER)")
    conn.execute("CREATE INDEX t_a ON t (a, b)")
    return conn


def per_row(conn: sqlite3.Connection, rows: list[dict[str, object]]) -> None:
    conn.executemany("INSERT INTO t (a, b) VALUES (:a, :b)", rows)


def one_step(conn: sqlite3.Connection, rows: list[dict[str, object]]) -> None:
    conn.execute(
        "INSERT INTO t (a, b) SELECT value ->> '$.a', value ->> '$.b' FROM json_each(:rows)",
        {"rows": json.dumps(rows)},
    )


def timed(
    conn: sqlite3.Connection,
    shape: Callable[[sqlite3.Connection, list[dict[str, object]]], None],
    transactions: int,
    rows: int,
) -> float:
    """Seconds per row, ``transactions`` transactions of ``rows`` rows, in a thread of its own
    (as the SQLite writer is)."""
    batch = [{"a": f"address{n}@example.net", "b": n} for n in range(rows)]
    took: list[float] = []

    def run() -> None:
        start = time.perf_counter()
        for _ in range(transactions):
            conn.execute("BEGIN IMMEDIATE")
            shape(conn, batch)
            conn.execute("COMMIT")
        took.append(time.perf_counter() - start)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return took[0] / (transactions * rows)


def beside_busy(run: Callable[[], float]) -> float:
    """``run`` while another thread runs Python without pause (an event loop with work)."""
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        return run()
    finally:
        stop.set()
        spinner.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="rows per measurement")
    parser.add_argument("--rows", type=int, default=50, help="rows per transaction")
    args = parser.parse_args()
    transactions = max(1, args.n // args.rows)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        conn = connect(folder)
        for name, shape in (
            ("executemany (a step a row)", per_row),
            ("json_each (one step)", one_step),
        ):
            progress(f"{name}: alone")
            alone = timed(conn, shape, transactions, args.rows)
            progress(f"{name}: beside a busy thread")
            busy = beside_busy(lambda shape=shape: timed(conn, shape, transactions, args.rows))
            results.append(
                (name, f"{alone * 1e6:.1f}", f"{busy * 1e6:.1f}", f"{busy / alone:.1f}x")
            )
        conn.close()
    done_progress()
    print(
        f"{transactions} transactions of {args.rows} rows, from a thread of their own; "
        f"switch interval {sys.getswitchinterval() * 1000:g} ms"
    )
    print(table(["", "µs a row alone", "beside a busy thread", "busy / alone"], results))


if __name__ == "__main__":
    main()
