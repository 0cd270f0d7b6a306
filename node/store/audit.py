"""The audit trail: an append-only, hash-chained log of every event, in the node database.

Each record holds its time, kind, actor (the token name or "cli" for operator actions), series UID,
job id and a JSON detail, plus ``prev_hash`` and ``hash`` = SHA-256 of the previous hash and the
record's canonical JSON. Changing, removing or reordering any record breaks the chain from that point,
which :func:`verify` reports. Records are appended inside the same transaction as the change they
describe, so the trail and the state never disagree.

What is recorded: which AE sent which study/series (``series.received``, ``series.stable``), which
model (name, version, weights SHA-256) ran with which configuration version (``job.queued``,
``job.started``, ``job.done`` / ``failed`` / ``dead``), which objects went to which destination and
the outcome (``delivery.sent`` / ``failed`` / ``dead``), operator actions (``job.retry``,
``job.cancelled``, ``delivery.resend``, ``series.reprocess``, ``purge``) and node starts/stops.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from node.store.db import Database, Filter

__all__ = ["VerifyResult", "append_event", "events", "export", "verify"]

GENESIS = "0" * 64


def _digest(prev_hash: str, ts: float, kind: str, actor: str | None, series_uid: str | None,
            job_id: int | None, detail: str) -> str:
    canonical = json.dumps([prev_hash, repr(float(ts)), kind, actor, series_uid, job_id, detail],
                           separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def append_event(c: Any, kind: str, detail: dict[str, Any], *, series_uid: str | None = None,
                 job_id: int | None = None, actor: str | None = None, now: float | None = None) -> None:
    """Append one record inside the caller's write transaction ``c``."""
    ts = float(now if now is not None else time.time())
    row = c.execute("SELECT hash FROM events ORDER BY id DESC LIMIT 1").fetchone()
    prev = row[0] if row is not None and row[0] else GENESIS
    text = json.dumps(detail, sort_keys=True, default=str)
    h = _digest(prev, ts, kind, actor, series_uid, job_id, text)
    c.execute("INSERT INTO events (ts, kind, actor, series_uid, job_id, detail, prev_hash, hash) "
              "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (ts, kind, actor, series_uid, job_id, text, prev, h))


def export(db: Database, *, since: float | None = None, until: float | None = None) -> Iterator[dict[str, Any]]:
    """Records between two times (epoch seconds), oldest first, as dicts (JSON-lines ready)."""
    f = Filter().ge("ts", since).le("ts", until)
    for r in db.query(f"SELECT * FROM events{f.sql()} ORDER BY id", tuple(f.params)):
        yield {"id": r["id"], "ts": r["ts"], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(r["ts"])),
               "kind": r["kind"], "actor": r["actor"], "series_uid": r["series_uid"], "job_id": r["job_id"],
               "detail": json.loads(r["detail"]), "prev_hash": r["prev_hash"], "hash": r["hash"]}


def events(db: Database, *, job_id: int | None = None, series_uid: str | None = None,
           kind: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Records of one job and/or series (or of one kind), oldest first, detail decoded."""
    f = Filter().eq("job_id", job_id).eq("series_uid", series_uid).eq("kind", kind)
    rows = db.query(f"SELECT * FROM events{f.sql()} ORDER BY id LIMIT ?", (*f.params, limit))
    return [{"ts": r["ts"], "kind": r["kind"], "actor": r["actor"], "series_uid": r["series_uid"],
             "job_id": r["job_id"], "detail": json.loads(r["detail"])} for r in rows]


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    records: int
    first_bad_id: int | None = None
    reason: str = ""


def verify(db: Database) -> VerifyResult:
    """Recompute the chain. Returns ok, or the first record that does not match and why."""
    prev = GENESIS
    n = 0
    last_id = 0
    for r in db.query("SELECT * FROM events ORDER BY id"):
        n += 1
        if r["id"] != last_id + 1 and last_id != 0:
            return VerifyResult(False, n, r["id"], f"records {last_id + 1}..{r['id'] - 1} are missing")
        last_id = r["id"]
        if r["prev_hash"] != prev:
            return VerifyResult(False, n, r["id"], "prev_hash does not match the previous record's hash")
        expected = _digest(prev, r["ts"], r["kind"], r["actor"], r["series_uid"], r["job_id"], r["detail"])
        if expected != r["hash"]:
            return VerifyResult(False, n, r["id"], "the record's content does not match its hash (modified)")
        prev = r["hash"]
    return VerifyResult(True, n)
