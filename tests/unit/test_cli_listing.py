"""A long listing is written without Rich's per-cell rendering, and reads exactly as Rich would
have laid it out (100,000 suppressions took Rich 38 s and 800 MB)."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.table import Table
from rich.text import Text

from postlane.cli import output
from postlane.cli.output import PLAIN_ROWS, Listing, listing

# text a reply, an address or a reason may hold: wide and combining characters, markup-like
# brackets, control characters Rich strips, and line breaks
_CHARS = st.sampled_from(
    [*"abcXYZ019 .-@[]/:", "é", "ß", "日", "本", "😀", "\u0301", "\r", "\x07", "\n"]
)
_TEXT = st.text(_CHARS, max_size=14)
_CELL = st.one_of(_TEXT, _TEXT.map(Text), st.none())


def _rich_piped(table: Table) -> str:
    """What Rich prints for ``table`` on a pipe, each line without its padding (as
    :func:`postlane.cli.output.show` printed every listing before)."""
    console = Console(file=io.StringIO(), width=output.PIPED_WIDTH, highlight=False)
    with console.capture() as captured:
        console.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines()) + "\n"


def _tables(
    headers: list[str],
    right: set[str],
    wrap: set[str] | None,
    rows: list[list[object]],
    pad_edge: bool,
) -> tuple[Listing, Listing]:
    tables = []
    for _ in range(2):
        table = listing(*headers, right=right, wrap=wrap, pad_edge=pad_edge)
        assert isinstance(table, Listing)
        for row in rows:
            table.add_row(*row)  # type: ignore[arg-type]
        tables.append(table)
    return tables[0], tables[1]


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(st.text("abcdefgh /", min_size=1, max_size=8), min_size=1, max_size=5),
    data=st.data(),
    pad_edge=st.booleans(),
)
def test_plain_is_what_rich_prints(headers: list[str], data: st.DataObject, pad_edge: bool) -> None:
    right = set(data.draw(st.lists(st.sampled_from(headers), max_size=len(headers))))
    some = st.lists(st.sampled_from(headers), max_size=len(headers)).map(set)
    wrap = data.draw(st.one_of(st.none(), some))
    rows = data.draw(
        st.lists(
            st.lists(_CELL, min_size=1, max_size=len(headers)),
            max_size=6,
        )
    )
    ours, theirs = _tables(headers, right, wrap, rows, pad_edge)
    assert ours.plain(output.PIPED_WIDTH) == _rich_piped(theirs)


def test_a_cell_only_rich_can_render_is_left_to_rich() -> None:
    table = listing("a", "b")
    table.add_row("x", Table())
    assert isinstance(table, Listing)
    assert table.plain() is None
    table = listing("a")
    table.add_row("tab\there")
    assert isinstance(table, Listing)
    assert table.plain() is None


def test_wider_than_the_pipe_is_left_to_rich() -> None:
    table = listing("a", "b")
    table.add_row("x" * 60, "y" * 60)
    assert isinstance(table, Listing)
    assert table.plain(100) is None
    assert table.plain(200) is not None


def _long_listing(rows: int) -> Listing:
    table = listing("Address", "Reason", "Count", right={"Count"})
    assert isinstance(table, Listing)
    for n in range(rows):
        table.add_row(f"user{n}@example.com", "hard_bounce", str(n))
    return table


def _written_by_rich(monkeypatch: object, table: Listing, *, terminal: bool) -> bool:
    """Whether :func:`show` has Rich render ``table`` (each of its cells) to print it."""
    file = io.StringIO()
    console = Console(file=file, width=120, force_terminal=terminal, highlight=False)
    rendered = []
    real = Table.__rich_console__

    def spy(self: Table, *args: object) -> object:
        rendered.append(self)
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Table, "__rich_console__", spy)  # type: ignore[attr-defined]
    output.show(table, console=console)
    assert "user0@example.com" in file.getvalue()
    return bool(rendered)


def test_piped_listings_are_written_plain(monkeypatch: object) -> None:
    assert not _written_by_rich(monkeypatch, _long_listing(3), terminal=False)


def test_a_long_listing_on_a_terminal_is_written_plain(monkeypatch: object) -> None:
    assert not _written_by_rich(monkeypatch, _long_listing(PLAIN_ROWS + 1), terminal=True)
    # a short one keeps Rich's layout (bold headings, wrapping at the terminal's width)
    assert _written_by_rich(monkeypatch, _long_listing(3), terminal=True)


def test_row_count_counts_rows_not_yet_rendered() -> None:
    table = _long_listing(5)
    assert table.row_count == 5
    table.add_row("styled@example.com", "manual", "1", style="bold")
    assert table.row_count == 6
    assert table.plain() is None  # a row with a style of its own is Rich's to print
