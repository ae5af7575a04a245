"""Stores: where postlane keeps messages, deliveries, attempts and suppressions."""

from __future__ import annotations

from pathlib import Path

from postlane.clock import Clock
from postlane.errors import ConfigError
from postlane.store.base import Store

__all__ = ["Store", "open_store_url"]


def open_store_url(
    url: str, *, base_dir: Path | None = None, clock: Clock | None = None, create: bool = True
) -> Store:
    """The store for a ``store.url`` (not yet opened: call ``await store.open()``).
    ``create=False``: a SQLite file that does not exist, or a PostgreSQL database (or schema)
    without postlane's tables, is an error when opened, not a new empty queue (operator
    commands run from the wrong directory, or pointed at the wrong database)."""
    if url.startswith("sqlite://"):
        from postlane.store.sqlite import SQLiteStore

        return SQLiteStore(sqlite_path(url, base_dir), create=create)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from postlane.store.postgres import PostgresStore
        except ImportError as exc:
            raise ConfigError(
                f"store.url is PostgreSQL but psycopg is missing ({exc}): install it with "
                "pip install 'psycopg[binary,pool]>=3.2' (what postlane's [postgres] extra holds)"
            ) from None
        store: Store = PostgresStore(url, create=create)
        return store
    raise ConfigError(
        f"store.url {url.split(':', 1)[0]!r} is not supported "
        '(use "sqlite:///path.db" or "postgresql://user@host/db")'
    )


def schema_version(url: str) -> int:
    """The schema version this postlane brings a store at ``url`` to (what ``open`` does)."""
    if url.startswith("sqlite://"):
        from postlane.store.sqlite import SCHEMA_VERSION as sqlite_version

        return sqlite_version
    from postlane.store.postgres import SCHEMA_VERSION as postgres_version

    return postgres_version


def sqlite_path(url: str, base_dir: Path | None = None) -> Path:
    """``sqlite:///postlane.db`` is relative to ``base_dir``; ``sqlite:////var/x.db`` absolute."""
    rest = url[len("sqlite://") :]
    if rest.startswith("/"):
        rest = rest[1:]
    if not rest:
        raise ConfigError("store.url: no database path (e.g. sqlite:///postlane.db)")
    path = Path(rest)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path
