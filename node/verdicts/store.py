"""The verdict store: one row per verdict object (or HTTP action) and AI result judged, one row per finding.

Idempotent: the same verdict object (SOP Instance UID) arriving twice for the same job is recorded
once; the second arrival is reported as a duplicate. Each verdict is appended to the audit chain
(``verdict.recorded``) in the same transaction. Observers are stored as a salted hash (or a role),
never by name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass
from typing import Any

from node.store.audit import append_event
from node.store.db import Database, Filter
from node.verdicts.judge import Judgement

__all__ = ["VerdictRecord", "VerdictStore", "hash_observer"]

#: the verdict tables, owned here (created when the store opens a database)
SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    source TEXT NOT NULL,
    object_uid TEXT NOT NULL,
    object_path TEXT,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    observer TEXT,
    study_verdict TEXT NOT NULL,
    n_ai INTEGER NOT NULL,
    accepted INTEGER NOT NULL,
    edited INTEGER NOT NULL,
    rejected INTEGER NOT NULL,
    added INTEGER NOT NULL,
    case_dice REAL,
    received_at REAL NOT NULL,
    time_to_verdict_s REAL,
    scanner TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '{}',
    UNIQUE (object_uid, job_id)
);
CREATE INDEX IF NOT EXISTS verdicts_model ON verdicts(model, model_version, received_at);
CREATE TABLE IF NOT EXISTS finding_verdicts (
    verdict_id INTEGER NOT NULL REFERENCES verdicts(id),
    finding INTEGER,
    label INTEGER,
    outcome TEXT NOT NULL,
    dice REAL,
    ai_volume_mm3 REAL,
    final_volume_mm3 REAL,
    volume_change_pct REAL,
    diameter_change_mm REAL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS finding_verdicts_verdict ON finding_verdicts(verdict_id);
"""

EXPORT_COLUMNS = ("id", "job_id", "source", "object_uid", "study_uid", "series_uid", "model", "model_version",
                  "observer", "study_verdict", "n_ai", "accepted", "edited", "rejected", "added", "case_dice",
                  "received_at", "time_to_verdict_s", "scanner")


def hash_observer(name: str, salt: str) -> str:
    """A stable pseudonym for an observer's name: ``obs-`` and 12 hex digits of a salted SHA-256."""
    return "obs-" + hashlib.sha256((salt + "\0" + name.strip().upper()).encode()).hexdigest()[:12]


@dataclass
class VerdictRecord:
    job_id: int
    source: str  # seg | sr | ko | http
    object_uid: str
    study_uid: str
    series_uid: str
    model: str
    model_version: str
    judgement: Judgement
    observer: str | None = None
    object_path: str | None = None
    received_at: float = 0.0
    time_to_verdict_s: float | None = None
    scanner: str = ""
    detail: dict[str, Any] | None = None


class VerdictStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        db.ensure(SCHEMA)

    def observer_salt(self) -> str:
        """This node's salt for observer pseudonyms (made once, kept in the database)."""
        import secrets

        with self.db.tx() as c:
            c.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('observer_salt', ?)", (secrets.token_hex(16),))
        row = self.db.one("SELECT value FROM meta WHERE key = 'observer_salt'")
        assert row is not None
        return str(row[0])

    def record(self, v: VerdictRecord) -> tuple[int, bool]:
        """Store one verdict; returns (its id, whether it was new)."""
        counts = v.judgement.counts()
        n_ai = counts["accepted"] + counts["edited"] + counts["rejected"]
        now = v.received_at or time.time()
        with self.db.tx() as c:
            row = c.execute("SELECT id FROM verdicts WHERE object_uid = ? AND job_id = ?",
                            (v.object_uid, v.job_id)).fetchone()
            if row is not None:
                return int(row[0]), False
            cur = c.execute(
                "INSERT INTO verdicts (job_id, source, object_uid, object_path, study_uid, series_uid, model, "
                "model_version, observer, study_verdict, n_ai, accepted, edited, rejected, added, case_dice, "
                "received_at, time_to_verdict_s, scanner, detail) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (v.job_id, v.source, v.object_uid, v.object_path, v.study_uid, v.series_uid, v.model,
                 v.model_version, v.observer, v.judgement.study_verdict, n_ai, counts["accepted"], counts["edited"],
                 counts["rejected"], counts["added"], v.judgement.case_dice, now, v.time_to_verdict_s, v.scanner,
                 json.dumps(v.detail or {}, default=str)))
            vid = int(cur.lastrowid or 0)
            c.executemany(
                "INSERT INTO finding_verdicts (verdict_id, finding, label, outcome, dice, ai_volume_mm3, "
                "final_volume_mm3, volume_change_pct, diameter_change_mm, note) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(vid, f.finding, f.label, f.outcome, f.dice, f.ai_volume_mm3, f.final_volume_mm3,
                  f.volume_change_pct, f.diameter_change_mm, f.note) for f in v.judgement.findings])
            append_event(c, "verdict.recorded", {"verdict": vid, "source": v.source, "object_uid": v.object_uid,
                                                 "study_verdict": v.judgement.study_verdict, **counts},
                         series_uid=v.series_uid, job_id=v.job_id, actor=v.observer, now=now)
        return vid, True

    def rows(self, *, model: str | None = None, job_id: int | None = None, since: float | None = None,
             limit: int = 10000) -> list[dict[str, Any]]:
        f = Filter().eq("model", model).eq("job_id", job_id).ge("received_at", since)
        rows = self.db.query(f"SELECT * FROM verdicts{f.sql()} ORDER BY received_at, id LIMIT ?", (*f.params, limit))
        return [dict(r) for r in rows]

    def recent(self, n: int = 20) -> list[dict[str, Any]]:
        """The last ``n`` verdicts, newest first."""
        return [dict(r) for r in self.db.query("SELECT * FROM verdicts ORDER BY id DESC LIMIT ?", (n,))]

    def latest_per_job(self, *, model: str | None = None) -> list[dict[str, Any]]:
        """The latest verdict of each judged job (a later verdict on the same result replaces an earlier one)."""
        f = Filter().eq("model", model)
        rows = self.db.query(
            f"SELECT * FROM verdicts{f.sql()} {'AND' if f.params else 'WHERE'} id IN "
            "(SELECT MAX(id) FROM verdicts GROUP BY job_id) ORDER BY received_at, id", tuple(f.params))
        return [dict(r) for r in rows]

    def findings(self, verdict_id: int) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.query("SELECT * FROM finding_verdicts WHERE verdict_id = ? ORDER BY rowid",
                                               (verdict_id,))]

    def edit_dice(self, verdict_ids: list[int]) -> list[float]:
        if not verdict_ids:
            return []
        marks = ",".join("?" * len(verdict_ids))
        rows = self.db.query(f"SELECT dice FROM finding_verdicts WHERE outcome = 'edited' AND verdict_id IN ({marks})",
                             tuple(verdict_ids))
        return [float(r[0]) for r in rows if r[0] is not None]

    def export(self, fmt: str = "json", **filters: Any) -> str:
        """Every verdict with its findings (JSON) or one row per verdict (CSV)."""
        rows = self.rows(**filters)
        if fmt == "csv":
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=list(EXPORT_COLUMNS), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
            return buf.getvalue()
        for r in rows:
            r["detail"] = json.loads(r["detail"])
            r["findings"] = self.findings(r["id"])
        return json.dumps(rows, indent=2, default=str)
