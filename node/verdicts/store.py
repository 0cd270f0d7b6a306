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
from node.verdicts.judge import Judgement, study_verdict

__all__ = ["GEOMETRIC", "VerdictRecord", "VerdictStore", "hash_observer", "merge_evidence"]

#: verdict sources that say where a finding is (a final segmentation), not only whether it was kept
GEOMETRIC = frozenset({"seg"})

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
CREATE TABLE IF NOT EXISTS verdicts_not_judged (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    object_uid TEXT NOT NULL UNIQUE,
    sop_class TEXT NOT NULL DEFAULT '',
    series_uid TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL,
    received_at REAL NOT NULL
);
"""

EXPORT_COLUMNS = ("id", "job_id", "source", "object_uid", "study_uid", "series_uid", "model", "model_version",
                  "observer", "study_verdict", "n_ai", "accepted", "edited", "rejected", "added", "case_dice",
                  "received_at", "time_to_verdict_s", "scanner")


def merge_evidence(verdicts: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Every verdict on one AI result (oldest first: source, its finding rows) merged into one outcome per
    finding, the evidence rules of docs/closing-the-loop.md:

    - a verdict with geometric evidence (a final SEG) sets a finding's outcome; a later one replaces it;
    - a verdict without it (a signed SR, a rejection note, an HTTP statement) sets the outcome of findings no
      SEG judged, and overrides a SEG's outcome only to reject (an SR signed without the finding, a clinical
      rejection note): it never turns a SEG's edit or rejection into an acceptance;
    - added findings: the most any one verdict added (the same misses seen in a SEG and in an SR count once).

    Returns ``{"findings": {key: row}, "added": n}``, ``key`` the finding's number (``"class"`` for a
    classification's class verdict)."""
    findings: dict[Any, dict[str, Any]] = {}
    geometric: set[Any] = set()
    added = 0
    for source, rows in verdicts:
        added = max(added, sum(1 for r in rows if r["outcome"] == "added"))
        for r in rows:
            if r["outcome"] == "added":
                continue
            key = r["finding"] if r["finding"] is not None else "class"
            if source in GEOMETRIC:
                findings[key] = r
                geometric.add(key)
            elif key not in geometric or r["outcome"] == "rejected":
                findings[key] = r
    return {"findings": findings, "added": added}


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

    def record_not_judged(self, *, object_uid: str, reason: str, sop_class: str = "", series_uid: str = "",
                          study_uid: str = "", now: float | None = None) -> bool:
        """An object that came back for a result and could not be judged (why, in words), kept for the API, the
        dashboard and the audit trail (``verdict.not_judged``); once per object. Returns whether it was new."""
        now = time.time() if now is None else now
        with self.db.tx() as c:
            cur = c.execute("INSERT OR IGNORE INTO verdicts_not_judged (object_uid, sop_class, series_uid, study_uid, "
                            "reason, received_at) VALUES (?,?,?,?,?,?)",
                            (object_uid, sop_class, series_uid, study_uid, reason[:1000], now))
            if not cur.rowcount:
                return False
            append_event(c, "verdict.not_judged", {"object_uid": object_uid, "sop_class": sop_class,
                                                   "reason": reason[:1000]}, series_uid=series_uid or None, now=now)
        return True

    def not_judged(self, limit: int = 100) -> list[dict[str, Any]]:
        """Objects not judged, newest first."""
        return [dict(r) for r in self.db.query("SELECT * FROM verdicts_not_judged ORDER BY id DESC LIMIT ?", (limit,))]

    def rows(self, *, model: str | None = None, job_id: int | None = None, since: float | None = None,
             limit: int = 10000) -> list[dict[str, Any]]:
        f = Filter().eq("model", model).eq("job_id", job_id).ge("received_at", since)
        rows = self.db.query(f"SELECT * FROM verdicts{f.sql()} ORDER BY received_at, id LIMIT ?", (*f.params, limit))
        return [dict(r) for r in rows]

    def recent(self, n: int = 20) -> list[dict[str, Any]]:
        """The last ``n`` verdicts, newest first."""
        return [dict(r) for r in self.db.query("SELECT * FROM verdicts ORDER BY id DESC LIMIT ?", (n,))]

    def merged_per_job(self, *, model: str | None = None) -> list[dict[str, Any]]:
        """One row per judged job: every verdict on its result merged finding by finding (:func:`merge_evidence`),
        with the counts, the study verdict, the edited findings' Dice (``edit_dice``) and the latest verdict's
        model version, scanner and time; ordered by that time."""
        f = Filter().eq("v.model", model)
        rows = [dict(r) for r in self.db.query(f"SELECT v.* FROM verdicts v{f.sql()} ORDER BY v.id", tuple(f.params))]
        if not rows:
            return []
        per_verdict: dict[int, list[dict[str, Any]]] = {}
        for fv in self.db.query(f"SELECT fv.* FROM finding_verdicts fv JOIN verdicts v ON v.id = fv.verdict_id"
                                f"{f.sql()} ORDER BY fv.rowid", tuple(f.params)):
            per_verdict.setdefault(int(fv["verdict_id"]), []).append(dict(fv))
        by_job: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            by_job.setdefault(int(r["job_id"]), []).append(r)
        out = []
        for verdicts in by_job.values():
            latest = verdicts[-1]
            merged = merge_evidence([(v["source"], per_verdict.get(int(v["id"]), [])) for v in verdicts])
            counts = {"accepted": 0, "edited": 0, "rejected": 0, "added": merged["added"]}
            for fv in merged["findings"].values():
                counts[fv["outcome"]] += 1
            first_time = next((v["time_to_verdict_s"] for v in verdicts if v["time_to_verdict_s"] is not None), None)
            out.append({**latest, **counts, "n_ai": counts["accepted"] + counts["edited"] + counts["rejected"],
                        "study_verdict": study_verdict(counts), "time_to_verdict_s": first_time,
                        "verdicts": [int(v["id"]) for v in verdicts], "sources": [v["source"] for v in verdicts],
                        "edit_dice": [float(fv["dice"]) for fv in merged["findings"].values()
                                      if fv["outcome"] == "edited" and fv.get("dice") is not None],
                        "case_dice": next((v["case_dice"] for v in reversed(verdicts) if v["source"] == "seg"),
                                          latest["case_dice"])})
        return sorted(out, key=lambda r: (r["received_at"], r["id"]))

    def findings(self, verdict_id: int) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.query("SELECT * FROM finding_verdicts WHERE verdict_id = ? ORDER BY rowid",
                                               (verdict_id,))]

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
