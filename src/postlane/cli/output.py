"""How the commands print: the consoles, JSON, listing tables, ages and replies.

As Postfix's commands do: what a command produces (listings, records, ids, JSON) goes to stdout
(``out``); what it says about what it is doing (what an action will touch, its question, its
outcome, like postsuper's "Deleted: 3 messages", and errors) goes to stderr (``err``), so a pipe
gets only the result. Piped, nothing wraps and no line is padded: one line per row.
"""

from __future__ import annotations

import json
import select
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import IO, Any, Protocol, TypeVar

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.control import strip_control_codes
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from postlane.config import format_duration

out = Console(highlight=False, soft_wrap=True)
T = TypeVar("T")

err = Console(stderr=True, highlight=False, soft_wrap=True)


#: the width of piped output: as wide as a row is (a terminal's own width is used on one)
PIPED_WIDTH = 10_000


def unwrap_when_piped() -> None:
    """Piped output gets one line per row, never wrapped at 80 columns (see :func:`show`)."""
    for console in (out, err):
        if not console.is_terminal:
            console.width = PIPED_WIDTH


def show(renderable: RenderableType, *, console: Console = out) -> None:
    """Print a table (or any renderable): as it is on a terminal; piped, each line without the
    spaces that pad it to the table's width."""
    if isinstance(renderable, Listing):
        plain = None
        if not console.is_terminal:
            plain = renderable.plain(console.width)
        elif renderable.row_count > PLAIN_ROWS:
            plain = renderable.plain()  # the terminal wraps what is wider than itself
        if plain is not None:
            emit(plain, console.file)
            return
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    text = "\n".join(line.rstrip() for line in captured.get().splitlines())
    emit(text + "\n", console.file)


def progress_bar() -> Progress:
    """A long operation's progress on stderr: on a terminal only, gone once it is done."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


def print_json(data: Any) -> None:
    emit(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def emit(text: str, stream: IO[str] | None = None) -> None:
    """Write all of ``text`` to ``stream`` (stdout), whatever the stream does with a write too
    big for the pipe at once: with PYTHONUNBUFFERED=1 (usual in containers) a text stream
    writes straight to the file and drops what a short write did not take, so `queue list
    --json | jq` got the first 64 KiB of the JSON and no error."""
    stream = sys.stdout if stream is None else stream
    buffer = getattr(stream, "buffer", None)
    if buffer is None:  # a test's capture, a StringIO
        stream.write(text)
        stream.flush()
        return
    stream.flush()
    encoding = getattr(stream, "encoding", None) or "utf-8"
    data = memoryview(text.encode(encoding, getattr(stream, "errors", None) or "strict"))
    while data:
        written = buffer.write(data)
        if written is None:  # a non-blocking pipe that is full: wait until it takes more
            select.select([], [buffer], [])
            continue
        data = data[written:]
    buffer.flush()


class Row(Protocol):
    """A listing's row: a record the API also returns as JSON."""

    def as_json(self) -> Any: ...


def first(rows: Sequence[T], limit: int, what: str) -> Sequence[T]:
    """The first ``limit`` of ``rows``, read with one more than that to know whether more
    match: then a note on stderr says so (a listing's footer must never pass for the queue's
    total, as ``mailq``'s does)."""
    if len(rows) <= limit:
        return rows
    err.print(
        f"postlane: the first {limit:,} {what} are shown; more match (narrow the selection, "
        "raise --limit, or page through them all with the HTTP API)"
    )
    return rows[:limit]


def json_or_empty(
    rows: Sequence[Row] | Sequence[Mapping[str, Any]], *, as_json: bool, empty: str
) -> bool:
    """With ``--json``, print the rows (records, or mappings already in their JSON form) as
    one JSON list; without rows, print ``empty``. True when that is the whole output, False
    when the caller prints the rows its own way."""
    if as_json:
        print_json([row if isinstance(row, Mapping) else row.as_json() for row in rows])
        return True
    if not rows:
        out.print(empty, markup=False)
        return True
    return False


class Listing(Table):
    """A table whose text cells are shown as they are: a reply, a detail or a reason may hold
    ``[bounces]`` or ``[ticket 42]``, which Rich would take for markup and drop.

    Its rows are kept as given until Rich renders them: a long listing (``suppress list
    --limit 100000``, ``queue list --limit 10000``) is written by :meth:`plain` instead, in
    columns exactly as Rich would lay them out unwrapped, at a small part of Rich's cost (Rich
    measures and renders every cell: 38 s and 800 MB for 100,000 suppressions)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._pending: list[tuple[RenderableType | None, ...]] = []

    def add_row(self, *renderables: RenderableType | None, **options: Any) -> None:
        if options:  # a row with a style of its own: Rich's from here on
            self._to_rich()
            super().add_row(*map(_cell, renderables), **options)
        else:
            self._pending.append(renderables)

    @property
    def row_count(self) -> int:
        return len(self.rows) + len(self._pending)

    def _to_rich(self) -> None:
        for row in self._pending:
            super().add_row(*map(_cell, row))
        self._pending = []

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        self._to_rich()
        yield from super().__rich_console__(console, options)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        self._to_rich()
        return super().__rich_measure__(console, options)

    def plain(self, width: int | None = None) -> str | None:
        """The table as Rich lays it out when nothing wraps, without styles and without the
        spaces that pad lines to its width; None when it cannot be (a cell Rich must render,
        a tab, a row with its own style, or wider than ``width``)."""
        if self.rows:
            return None
        columns = len(self.columns)
        widths = [0] * columns
        table: list[list[list[tuple[str, int]]]] = []
        for row in (tuple(column.header for column in self.columns), *self._pending):
            if len(row) > columns:
                return None
            sized_cells = []
            for i, given in enumerate(row):
                lines = _lines(given)
                if lines is None:
                    return None
                sized = [(line, _width(line)) for line in lines] or [("", 0)]
                widths[i] = max(widths[i], *(w for _, w in sized))
                sized_cells.append(sized)
            sized_cells.extend([[("", 0)]] * (columns - len(row)))
            table.append(sized_cells)
        edge = " " if self.pad_edge else ""
        if width is not None and sum(widths) + 2 * (columns - 1) + 2 * len(edge) > width:
            return None
        right = [c.justify == "right" for c in self.columns]
        text: list[str] = []
        for cells in table:
            for n in range(max(map(len, cells))):
                parts = []
                for cell, w, r in zip(cells, widths, right, strict=True):
                    line, used = cell[n] if n < len(cell) else ("", 0)
                    if r:  # Rich strips a right-justified line's end, then pads its start
                        line = line.rstrip()
                        parts.append(" " * (w - _width(line)) + line)
                    else:
                        parts.append(line + " " * (w - used))
                text.append((edge + "  ".join(parts)).rstrip())
        return "\n".join(text) + "\n"


def _cell(cell: RenderableType | None) -> RenderableType | None:
    return Text(cell) if isinstance(cell, str) else cell


def _lines(cell: RenderableType | None) -> list[str] | None:
    """A cell's lines as Rich shows them, when it is plain text (None: one it must render)."""
    if cell is None:
        return []
    if isinstance(cell, str):
        text = strip_control_codes(cell)
    elif isinstance(cell, Text):
        text = cell.plain
    else:
        return None
    return None if "\t" in text else text.split("\n") if text else []


def _width(line: str) -> int:
    """How many columns ``line`` takes on a terminal (as Rich counts them)."""
    return len(line) if line.isascii() and line.isprintable() else cell_len(line)


#: a listing longer than this is written plain on a terminal too (piped, always)
PLAIN_ROWS = 1000


def listing(
    *columns: str,
    right: Collection[str] = (),
    wrap: Collection[str] | None = None,
    pad_edge: bool = False,
) -> Table:
    """A borderless table with bold headings: ``right`` columns are right-aligned, and only the
    ``wrap`` ones wrap (all do when it is None). No padding at the edges: the first column
    starts at the line's start."""
    table = Listing(box=None, show_edge=False, header_style="bold", pad_edge=pad_edge)
    for column in columns:
        table.add_column(
            column,
            justify="right" if column in right else "left",
            no_wrap=wrap is not None and column not in wrap,
        )
    return table


def age(seconds: float) -> str:
    return format_duration(seconds) if seconds > 0 else "0s"


def reply_code(code: int | None, enhanced: str | None) -> str:
    """``"550 5.1.1"``, ``"421"``, or ``""``: the codes of a reply that has them."""
    return " ".join(str(x) for x in (code, enhanced) if x)


def reply_line(code: int | None, enhanced: str | None, text: str | None) -> str:
    """A reply on one line: its codes, then its text's first line (no codes, no leading
    space: a connection failure has none)."""
    return " ".join(part for part in (reply_code(code, enhanced), first_line(text)) if part)


def first_line(text: str | None) -> str:
    """A reply's or reason's first line: a listing shows one line per row."""
    return text.splitlines()[0] if text else ""
