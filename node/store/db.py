"""The node's SQLite database (WAL): one file, one connection per process, serialised by a lock.

The spine's tables are created here: ``instances``, ``series`` and ``refusals`` (the index of what was
received, and of what was refused; owned by ``store/series.py``), ``jobs`` (one per series, model and series
version) and ``outbox`` (one row per result object and destination; ``store/jobs.py``) and ``events`` (the
audit trail; ``store/audit.py``). Subsystems own their tables and create them with :meth:`Database.ensure`
(the verdict tables: ``verdicts/store.py``). Every write is a short transaction; ``synchronous=FULL`` so that a committed row survives a
power loss, not just a crash of the process.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["Database", "Filter"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 7

#: columns added after a release: (table, column, declaration), applied to older databases at open
_ADDED_COLUMNS = (
    ("instances", "content_hash", "TEXT NOT NULL DEFAULT ''"),
    ("instances", "instance_number", "INTEGER"),
    ("instances", "position", "REAL"),
    ("instances", "frames", "INTEGER NOT NULL DEFAULT 1"),
    ("instances", "orientation", "TEXT"),
    ("jobs", "superseded_by", "INTEGER"),
    ("outbox", "series_uid", "TEXT NOT NULL DEFAULT ''"),
    ("outbox", "role", "TEXT NOT NULL DEFAULT 'result'"),
    ("jobs", "priority", "INTEGER NOT NULL DEFAULT 2"),
    ("jobs", "intensity", "TEXT"),
    ("jobs", "regions", "BLOB"),
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT,
    attrs TEXT NOT NULL,
    calling_ae TEXT,
    called_ae TEXT,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    n_instances INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'receiving',
    version INTEGER NOT NULL DEFAULT 1,
    routes TEXT,
    note TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_state ON series(state, last_received);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL REFERENCES series(series_uid),
    study_uid TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT,
    called_ae TEXT,
    received_at REAL NOT NULL,
    series_version INTEGER NOT NULL DEFAULT 1,
    content_hash TEXT NOT NULL DEFAULT '',
    instance_number INTEGER,
    position REAL,
    orientation TEXT,
    frames INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT,
    sop_uid TEXT,
    calling_ae TEXT,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS refusals_series ON refusals(series_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    series_version INTEGER NOT NULL,
    model TEXT NOT NULL,
    route TEXT NOT NULL,
    send_to TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    lease_until REAL,
    next_run_at REAL NOT NULL,
    error TEXT,
    result TEXT,
    config_version TEXT,
    superseded_by INTEGER,
    priority INTEGER NOT NULL DEFAULT 2,
    intensity TEXT,
    UNIQUE (series_uid, series_version, model)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, next_run_at);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    series_uid TEXT NOT NULL DEFAULT '',
    role TEXT NOT NULL DEFAULT 'result',
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_status TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    sent_at REAL,
    UNIQUE (destination, sop_uid)
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT,
    series_uid TEXT,
    job_id INTEGER,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
"""


class Filter:
    """A WHERE clause built from optional conditions: a condition whose value is None is left out.

    >>> f = Filter().eq("state", "done").ge("created_at", None)
    >>> f.sql(), f.params
    (' WHERE state = ?', ['done'])
    """

    def __init__(self) -> None:
        self._clauses: list[str] = []
        self.params: list[Any] = []

    def _add(self, column: str, op: str, value: Any) -> Filter:
        if value is not None:
            self._clauses.append(f"{column} {op} ?")
            self.params.append(value)
        return self

    def eq(self, column: str, value: Any) -> Filter:
        return self._add(column, "=", value)

    def ge(self, column: str, value: Any) -> Filter:
        return self._add(column, ">=", value)

    def le(self, column: str, value: Any) -> Filter:
        return self._add(column, "<=", value)

    def sql(self) -> str:
        """`` WHERE a = ? AND ...`` or an empty string."""
        return " WHERE " + " AND ".join(self._clauses) if self._clauses else ""


class Database:
    """A SQLite database shared by the node's threads.

    Use :meth:`tx` for a write transaction and :meth:`query` / :meth:`one` for reads. ``readonly``
    opens an existing database of another process for reading only (benchmarks, tests).
    """

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self._lock = threading.RLock()
        if readonly:  # another process's node database, read while it runs (WAL allows it); never written
            self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                                         isolation_level=None, timeout=30.0)
            self._conn.row_factory = sqlite3.Row
            return
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SCHEMA)
        with self.tx() as c:
            for table, column, decl in _ADDED_COLUMNS:
                if column not in {r["name"] for r in c.execute(f"PRAGMA table_info({table})")}:
                    c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        try:
            path.chmod(0o600)
        except OSError:  # pragma: no cover - e.g. a read-only mount; the data_dir mode still protects it
            logger.warning("could not restrict permissions of %s", path)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Run a read query and return all rows."""
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    def one(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Row | None:
        """Run a read query and return its first row, or None."""
        with self._lock:
            row: sqlite3.Row | None = self._conn.execute(sql, params).fetchone()
            return row

    def ensure(self, schema: str) -> None:
        """Create a subsystem's own tables and indexes (``CREATE ... IF NOT EXISTS``) in this database: each
        store that is not part of the node's spine owns its DDL and applies it when it opens."""
        with self._lock:
            self._conn.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
