"""SQLite binds a short array parameter as a list of parameters instead of JSON for json_each
(cheaper per statement); both forms must find the same rows, for every length."""

from __future__ import annotations

import sqlite3

from postlane.store.sqlite import DIALECT, SHORT_ARRAY, _arrays_of, _bound, _with_short_arrays

QUERY = f"SELECT n FROM t WHERE {DIALECT.any_of('n', 'ns', 'integer')} ORDER BY n"


def test_a_short_array_is_bound_as_parameters_and_a_long_one_as_json() -> None:
    sql, params = _with_short_arrays(QUERY, {"ns": [3, 5], "other": 1})
    assert "json_each" not in sql and "n IN (:ns__0, :ns__1)" in sql
    assert params == {"ns__0": 3, "ns__1": 5, "other": 1}
    long = list(range(SHORT_ARRAY + 1))
    sql, params = _with_short_arrays(QUERY, {"ns": long})
    assert sql == QUERY and params == {"ns": long}  # json_each, as written


def test_both_forms_find_the_same_rows_for_every_length() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (n INTEGER)")
    conn.executemany("INSERT INTO t VALUES (?)", [(n,) for n in range(30)])
    for length in range(SHORT_ARRAY + 3):
        wanted = list(range(0, 2 * length, 2))
        as_json = conn.execute(QUERY, _bound({"ns": wanted}, _arrays_of(QUERY))).fetchall()
        sql, params = _with_short_arrays(QUERY, {"ns": wanted})
        assert conn.execute(sql, _bound(params, _arrays_of(sql))).fetchall() == as_json
        assert [n for (n,) in as_json] == [n for n in wanted if n < 30]


def test_only_the_parameters_a_statement_reads_as_arrays_are_turned_into_json() -> None:
    assert _arrays_of(QUERY) == {"ns"}
    assert _arrays_of("SELECT 1 WHERE a = :a") == frozenset()
    bound = _bound({"ns": [1, 2], "a": 1}, _arrays_of(QUERY))
    assert bound == {"ns": "[1, 2]", "a": 1}
