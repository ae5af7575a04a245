"""SQL of the stores, as .sql files: the named queries both databases run as written
(``queries.sql``), and per database its schema migrations (``NNNN_name.sql``) and the named
queries only it can run (``<database>/queries.sql``)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

from postlane.errors import StoreUnavailable

log = logging.getLogger("postlane.store")

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


@dataclass(frozen=True)
class Migration:
    """What opening a store did to its schema: from one version to another, in so long."""

    description: str
    from_version: int
    to_version: int
    seconds: float = 0.0

    def describe(self) -> str:
        return (
            f"{self.description}: schema version {self.from_version} -> {self.to_version} "
            f"in {self.seconds:.1f} s"
        )


def migration_starts(description: str, version: int, target: int, *, allowed: bool) -> None:
    """Say that ``description`` is about to be migrated from ``version`` to ``target``, or
    refuse when this opening may not migrate (an operator's command: only ``serve``,
    ``worker`` and ``migrate`` change a schema, so a ``postlane stats`` never upgrades a store
    under a running older postlane)."""
    if not allowed and version == 0:
        raise StoreUnavailable(f"there is no postlane queue in {description} (serve creates it)")
    if not allowed:
        raise StoreUnavailable(
            f"the queue in {description} is at schema version {version} and this postlane "
            f"needs {target}: stop every older postlane using it, then run `postlane migrate` "
            "(docs/upgrading.md)"
        )
    if version > 0:  # a new, empty store is made, not migrated: nothing to say
        log.warning(
            "migrating %s from schema version %d to %d (keep older postlane processes "
            "stopped until it is done: docs/upgrading.md)",
            description,
            version,
            target,
        )


def live_owners_sql(version: int, shares_from: int, param: str) -> str:
    """The processes using a queue at schema ``version``: the lease owners of deliveries being
    sent, and (from ``shares_from``, the version that added the fleet's shares) every live
    process's presence, renewed about once a second while it runs. ``param`` is how the
    dialect writes the parameter ``now``."""
    owners = (
        "SELECT lease_owner AS owner FROM deliveries "
        f"WHERE state = 'sending' AND lease_expires_at > {param}"
    )
    if version >= shares_from:
        owners += f" UNION SELECT owner FROM destination_shares WHERE expires_at > {param}"
    return owners


def refuse_while_in_use(description: str, owners: list[str]) -> None:
    """Refuse to migrate a queue other processes use: an older postlane left running against
    the new schema fails its statements (a result it cannot record: the mail sent again after
    it stops), and an idle one holds no lock a migration would wait for (an upgrade audit:
    a migration went through beside a live older serve, whose next five messages were sent
    twice)."""
    if not owners:
        return
    shown = ", ".join(sorted(owners)[:5]) + (
        f" and {len(owners) - 5} more" if len(owners) > 5 else ""
    )
    raise StoreUnavailable(
        f"the queue in {description} is in use by {len(owners)} postlane process(es) ({shown}): "
        "stop every older postlane using it, then migrate (docs/upgrading.md); nothing was "
        "changed (a process that stopped without handing back holds its leases for at most "
        "[delivery] lease)"
    )


def migration_done(migration: Migration) -> None:
    if migration.from_version > 0:
        log.warning("migrated %s", migration.describe())
