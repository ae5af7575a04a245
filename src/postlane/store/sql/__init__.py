"""SQL of the stores, as .sql files: the named queries both databases run as written
(``queries.sql``), and per database its schema migrations (``NNNN_name.sql``) and the named
queries only it can run (``<database>/queries.sql``)."""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def _parse(file: Traversable) -> dict[str, str]:
    parts = _NAME.split(file.read_text("utf-8"))
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise RuntimeError(f"{file.name}: the query {name} is defined twice")
        lines = [line for line in body.strip().splitlines() if not line.lstrip().startswith("--")]
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries


def load_common_queries() -> dict[str, str]:
    """The named queries of ``sql/queries.sql``, as written (``:named``, ``@any(...)``)."""
    return _parse(resources.files(__package__).joinpath("queries.sql"))


def load_queries(dialect: str) -> dict[str, str]:
    """The named queries of ``sql/<dialect>/queries.sql`` (each under a ``-- name: X`` header)."""
    return _parse(resources.files(__package__).joinpath(dialect, "queries.sql"))


def load_migrations(dialect: str) -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` for every ``NNNN_name.sql`` of a dialect, in order."""
    folder = resources.files(__package__).joinpath(dialect)
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    return sorted(found)
