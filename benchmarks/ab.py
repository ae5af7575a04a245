"""Run one benchmark script against two checkouts of postlane, alternating, and compare.

    python benchmarks/ab.py --before ../old/src [--after src] [--rounds 6] -- \
        benchmarks/claims.py --small 10000 --large 20000 --measure 3000

A single run of a benchmark on this machine moves by a third from one run to the next (other
tenants, the CPU's boost), so "before" and "after" measured once each, one after the other,
say little. This runs the same script ``--rounds`` times against each code in turn (before,
after, before, after, ...), reads every figure of its tables (named by row and column), and
prints per figure the median of each code, the ratio after / before, and the spread of each
(the smallest and the largest run), so that a difference can be weighed against the noise
measured in the same hour.

The script is the same file for both codes (the one given, from this checkout); only the
``postlane`` package it imports differs (``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import done_progress, progress, table

#: a figure: a number, perhaps a ratio (``1.2x``) or a time with its unit (``923 µs``)
NUMBER = re.compile(r"^(-?[\d,]+(?:\.\d+)?)(?:x| µs| ms| s)?$")


def figures(output: str) -> dict[str, float]:
    """Every number in the tables of ``output`` (``_common.table``'s: a header, a line of
    dashes, rows), named "row / column". A row is named by its first cell, or by as many of
    its first cells as it takes to tell the table's rows apart."""
    found: dict[str, float] = {}
    lines = output.splitlines()
    for n, line in enumerate(lines):
        if n == 0 or not line.strip() or set(line) - {"-", " "}:
            continue
        headers = re.split(r"\s{2,}", lines[n - 1].strip())
        first = re.split(r"\s{2,}", lines[n + 1].strip()) if n + 1 < len(lines) else []
        if len(first) == len(headers) + 1:  # the row names' column has no header
            headers = ["", *headers]
        rows = []
        for row in lines[n + 1 :]:
            cells = re.split(r"\s{2,}", row.strip())
            if len(cells) != len(headers):
                break
            rows.append(cells)
        named = 1
        while named < len(headers) and len({tuple(r[:named]) for r in rows}) < len(rows):
            named += 1
        for cells in rows:
            for header, cell in zip(headers[named:], cells[named:], strict=True):
                if number := NUMBER.match(cell):
                    value = float(number[1].replace(",", ""))
                    found[f"{' '.join(cells[:named])} / {header}"] = value
    return found


def run(code: Path, script: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(code.resolve())}
    done = subprocess.run(
        [sys.executable, *script], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"{' '.join(script)} failed against {code}:\n{done.stderr[-2000:]}")
    return figures(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the old code's src folder")
    parser.add_argument("--after", type=Path, default=Path(__file__).parent.parent / "src")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- script.py [its options]")
    args = parser.parse_args()
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        parser.error("give the benchmark script to run after --")
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for n in range(args.rounds):
        for name in ("before", "after"):
            progress(f"round {n + 1} / {args.rounds}: {name}")
            runs[name].append(run(getattr(args, name), script))
    done_progress()
    labels = [label for label in runs["after"][0] if label in runs["before"][0]]
    rows = []
    for label in labels:
        before = [r[label] for r in runs["before"] if label in r]
        after = [r[label] for r in runs["after"] if label in r]
        b, a = statistics.median(before), statistics.median(after)
        rows.append(
            (
                label,
                f"{b:,.2f}",
                f"{a:,.2f}",
                f"{a / b:.2f}" if b else "-",
                f"{min(before):,.0f}-{max(before):,.0f}",
                f"{min(after):,.0f}-{max(after):,.0f}",
            )
        )
    headers = ["figure", "before (median)", "after (median)", "after/before"]
    print(f"{' '.join(script)}: {args.rounds} rounds, alternating")
    print(f"before: {args.before}   after: {args.after}")
    print(table([*headers, "before runs", "after runs"], rows))


if __name__ == "__main__":
    main()
