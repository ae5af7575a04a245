"""Shared bits of the benchmark scripts: timing, tables, progress."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def progress(text: str) -> None:
    """One status line on stderr, overwritten in place (results go to stdout)."""
    sys.stderr.write(f"\r\033[K{text}")
    sys.stderr.flush()


def done_progress() -> None:
    sys.stderr.write("\r\033[K")
    sys.stderr.flush()


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
