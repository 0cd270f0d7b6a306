"""The series store: the one owner of the ``series`` and ``instances`` tables.

Every read and write of a series goes through :class:`SeriesStore`; every change of a series' state is
a named transition, checked against the lifecycle below and appended to the audit trail in the same
transaction::

    receiving --stable, routes matched--> dispatched --late instance / reprocess--> receiving
        |                                     |
        +--stable, no route--> unmatched ------+--retention--> purged
        |                        |
        |                        +--new instance--> receiving
        +--stable, not eligible--> skipped (reason kept; never processed, never answered)
        +--stable, evidence of missing instances--> incomplete --instances arrive--> receiving
                                                       |
                                                       +--hold time passed--> failed (reason kept)

Methods that take ``c`` run inside the caller's transaction (``Database.tx()``), so a transition and
the jobs it creates commit together.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from node.errors import ConflictError, NotFoundError
from node.store.audit import append_event
from node.store.db import Database, Filter

__all__ = ["InstanceRecord", "SeriesInfo", "SeriesState", "SeriesStore"]


class SeriesState(StrEnum):
    RECEIVING = "receiving"
    DISPATCHED = "dispatched"
    UNMATCHED = "unmatched"
    SKIPPED = "skipped"
    INCOMPLETE = "incomplete"
    FAILED = "failed"
    PURGED = "purged"
    #: SEG / SR / KO objects for a study the node sent results for: examined as the radiologist's verdict
    VERDICT = "verdict"


#: allowed transitions (from -> to)
_TRANSITIONS: dict[SeriesState, frozenset[SeriesState]] = {
    SeriesState.RECEIVING: frozenset({SeriesState.DISPATCHED, SeriesState.UNMATCHED, SeriesState.SKIPPED,
                                      SeriesState.INCOMPLETE, SeriesState.VERDICT}),
    SeriesState.VERDICT: frozenset({SeriesState.RECEIVING, SeriesState.PURGED}),
    SeriesState.DISPATCHED: frozenset({SeriesState.RECEIVING, SeriesState.PURGED}),
    SeriesState.UNMATCHED: frozenset({SeriesState.RECEIVING, SeriesState.PURGED}),
    SeriesState.SKIPPED: frozenset({SeriesState.RECEIVING, SeriesState.PURGED}),
    SeriesState.INCOMPLETE: frozenset({SeriesState.RECEIVING, SeriesState.FAILED, SeriesState.DISPATCHED,
                                       SeriesState.SKIPPED, SeriesState.UNMATCHED}),
    SeriesState.FAILED: frozenset({SeriesState.RECEIVING, SeriesState.PURGED}),
    SeriesState.PURGED: frozenset(),
}

#: states from which a new instance reopens the series
_REOPENED_BY_INSTANCE = frozenset({SeriesState.UNMATCHED, SeriesState.SKIPPED, SeriesState.INCOMPLETE,
                                   SeriesState.FAILED, SeriesState.VERDICT})


@dataclass(frozen=True, slots=True)
class SeriesInfo:
    """One series as the index knows it."""

    series_uid: str
    study_uid: str
    modality: str
    attrs: dict[str, Any]
    calling_ae: str
    called_ae: str
    first_received: float
    last_received: float
    instances: int
    state: SeriesState
    version: int
    routes: list[str]
    note: str | None
    updated_at: float

    @classmethod
    def from_row(cls, r: sqlite3.Row) -> SeriesInfo:
        return cls(series_uid=r["series_uid"], study_uid=r["study_uid"], modality=r["modality"] or "",
                   attrs=json.loads(r["attrs"] or "{}"), calling_ae=r["calling_ae"] or "",
                   called_ae=r["called_ae"] or "", first_received=float(r["first_received"]),
                   last_received=float(r["last_received"]), instances=int(r["n_instances"]),
                   state=SeriesState(r["state"]), version=int(r["version"]),
                   routes=json.loads(r["routes"] or "[]"), note=r["note"], updated_at=float(r["updated_at"]))

    def to_dict(self) -> dict[str, Any]:
        return {"series_uid": self.series_uid, "study_uid": self.study_uid, "modality": self.modality,
                "state": self.state.value, "version": self.version, "instances": self.instances,
                "calling_ae": self.calling_ae, "first_received": self.first_received,
                "last_received": self.last_received, "routes": self.routes, "note": self.note}


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """What the index keeps of one stored instance."""

    sop_uid: str
    series_uid: str
    study_uid: str
    sop_class: str
    transfer_syntax: str
    path: Path
    size: int
    calling_ae: str
    called_ae: str
    modality: str
    #: the series' routing attributes, computed only when this instance opens a new series
    routing_attrs: Callable[[], dict[str, Any]]
    content_hash: str = ""
    instance_number: int | None = None
    #: ImagePositionPatient along the instance's own slice normal (mm), for single-frame images
    position: float | None = None
    #: ImageOrientationPatient, rounded, as text: positions compare only within one orientation
    orientation: str | None = None
    frames: int = 1


@dataclass(frozen=True, slots=True)
class Indexed:
    """What indexing one instance did to its series."""

    late: bool
    version: int


class SeriesStore:
    """Series and their instances in the node database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # --- transitions ----------------------------------------------------------------------------

    @staticmethod
    def _move(c: sqlite3.Connection, series_uid: str, to: SeriesState, *, event: str, detail: dict[str, Any],
              now: float, note: str | None = None, version: int | None = None, routes: list[str] | None = None,
              actor: str | None = None) -> None:
        row = c.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        if row is None:
            raise NotFoundError(f"no series {series_uid}")
        current = SeriesState(row["state"])
        if to not in _TRANSITIONS[current]:
            raise ConflictError(f"series {series_uid} is {current.value}; it cannot become {to.value}")
        sets, params = ["state = ?", "updated_at = ?", "note = ?"], [to.value, now, note]
        if version is not None:
            sets.append("version = ?")
            params.append(version)
        if routes is not None:
            sets.append("routes = ?")
            params.append(json.dumps(routes))
        c.execute(f"UPDATE series SET {', '.join(sets)} WHERE series_uid = ?", (*params, series_uid))
        append_event(c, event, {**detail, "from": current.value, "to": to.value}, series_uid=series_uid,
                     actor=actor, now=now)

    def index_instance(self, rec: InstanceRecord, *, late_policy: str, now: float | None = None) -> Indexed:
        """Index one instance whose file is already durable; creates or reopens its series.

        ``late_policy`` is ``reprocess`` (a new instance of a dispatched series opens a new version) or
        ``ignore`` (it is indexed, the series stays as it is).
        """
        now = time.time() if now is None else now
        late = False
        with self.db.tx() as c:
            row = c.execute("SELECT state, version FROM series WHERE series_uid = ?", (rec.series_uid,)).fetchone()
            if row is None:
                c.execute(
                    "INSERT INTO series (series_uid, study_uid, modality, attrs, calling_ae, called_ae, "
                    "first_received, last_received, n_instances, state, version, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 'receiving', 1, ?)",
                    (rec.series_uid, rec.study_uid, rec.modality, json.dumps(rec.routing_attrs()), rec.calling_ae,
                     rec.called_ae, now, now, now))
                version = 1
                append_event(c, "series.received", {"study_uid": rec.study_uid, "calling_ae": rec.calling_ae,
                                                    "called_ae": rec.called_ae, "modality": rec.modality,
                                                    "sop_class": rec.sop_class}, series_uid=rec.series_uid, now=now)
            else:
                state, version = SeriesState(row["state"]), int(row["version"])
                if state == SeriesState.DISPATCHED:
                    late = True
                    if late_policy == "reprocess":
                        version += 1
                        self._move(c, rec.series_uid, SeriesState.RECEIVING, event="series.reopened",
                                   detail={"reason": "late instance", "sop_uid": rec.sop_uid, "version": version},
                                   now=now, version=version)
                elif state in _REOPENED_BY_INSTANCE:
                    late = state == SeriesState.UNMATCHED
                    self._move(c, rec.series_uid, SeriesState.RECEIVING, event="series.reopened",
                               detail={"reason": "new instance", "sop_uid": rec.sop_uid, "version": version},
                               now=now)
                elif state == SeriesState.PURGED:
                    late = True
            c.execute(
                "INSERT OR REPLACE INTO instances (sop_uid, series_uid, study_uid, sop_class, transfer_syntax, "
                "path, size, calling_ae, called_ae, received_at, series_version, content_hash, instance_number, "
                "position, orientation, frames) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.sop_uid, rec.series_uid, rec.study_uid, rec.sop_class, rec.transfer_syntax, str(rec.path),
                 rec.size, rec.calling_ae, rec.called_ae, now, version, rec.content_hash, rec.instance_number,
                 rec.position, rec.orientation, rec.frames))
            c.execute("UPDATE series SET last_received = ?, n_instances = n_instances + 1, updated_at = ? "
                      "WHERE series_uid = ?", (now, now, rec.series_uid))
        return Indexed(late=late, version=version)

    def record_conflict(self, sop_uid: str, *, series_uid: str, kept: str, calling_ae: str,
                        now: float | None = None) -> None:
        """Audit a known SOP Instance UID received again with other content (``kept``: first or new)."""
        with self.db.tx() as c:
            append_event(c, "instance.conflict", {"sop_uid": sop_uid, "kept": kept, "calling_ae": calling_ae},
                         series_uid=series_uid, now=now)

    def record_refusal(self, *, reason: str, series_uid: str | None = None, sop_uid: str | None = None,
                       calling_ae: str = "", now: float | None = None) -> None:
        """Remember an instance (or, without ``series_uid``, a whole association of ``calling_ae``) that was
        refused: evidence that a series may be incomplete until what was refused arrives."""
        now = time.time() if now is None else now
        with self.db.tx() as c:
            c.execute("INSERT INTO refusals (series_uid, sop_uid, calling_ae, reason, at) VALUES (?, ?, ?, ?, ?)",
                      (series_uid, sop_uid, calling_ae, reason, now))

    def unresolved_refusals(self, series_uid: str) -> dict[str, int]:
        """Refused instances of the series that have not arrived since, counted by reason."""
        rows = self.db.query("SELECT reason, COUNT(*) AS n FROM refusals r WHERE series_uid = ? AND NOT EXISTS "
                             "(SELECT 1 FROM instances i WHERE i.sop_uid = r.sop_uid) GROUP BY reason", (series_uid,))
        return {r["reason"]: int(r["n"]) for r in rows}

    def association_refusal_during(self, info: SeriesInfo, *, window: float) -> str | None:
        """The reason an association of the series' sender was refused while the series was arriving (from
        its first instance to ``window`` seconds after its last, with none of it received since), or None."""
        row = self.db.one("SELECT reason FROM refusals WHERE series_uid IS NULL AND calling_ae = ? "
                          "AND at >= ? AND at >= ? AND at <= ? ORDER BY at DESC LIMIT 1",
                          (info.calling_ae, info.first_received, info.last_received, info.last_received + window))
        return None if row is None else str(row["reason"])

    def instance_numbers(self, series_uid: str) -> list[int]:
        """The distinct InstanceNumbers of the series, in order."""
        return [int(r[0]) for r in self.db.query(
            "SELECT DISTINCT instance_number FROM instances WHERE series_uid = ? AND instance_number IS NOT NULL "
            "ORDER BY 1", (series_uid,))]

    def slice_positions(self, series_uid: str) -> list[float]:
        """The slice positions (along the images' normal, mm) of the series' instances, in order (a position
        twice when two instances share it); empty when its images do not share one orientation (positions
        along different normals do not compare)."""
        rows = self.db.query("SELECT position, orientation FROM instances WHERE series_uid = ? "
                             "AND position IS NOT NULL", (series_uid,))
        if len({r["orientation"] for r in rows}) > 1:
            return []
        return sorted(round(float(r["position"]), 3) for r in rows)

    def frame_count(self, series_uid: str) -> int:
        """Images in the series (frames of multi-frame instances counted one by one)."""
        row = self.db.one("SELECT COALESCE(SUM(frames), 0) AS n FROM instances WHERE series_uid = ?", (series_uid,))
        return int(row["n"]) if row else 0

    def claim_stable(self, c: sqlite3.Connection, series_uid: str, *, version: int,
                     last_received: float) -> SeriesInfo | None:
        """The series inside transaction ``c`` if it is still what the caller decided on (no instance
        arrived, same version, still receiving or incomplete); None when it changed meanwhile."""
        row = c.execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        if row is None:
            return None
        info = SeriesInfo.from_row(row)
        if info.state not in (SeriesState.RECEIVING, SeriesState.INCOMPLETE) or info.version != version \
                or info.last_received != last_received:
            return None
        return info

    def mark_dispatched(self, c: sqlite3.Connection, info: SeriesInfo, *, routes: list[str], jobs: list[int],
                        now: float, skipped_routes: dict[str, str] | None = None) -> None:
        """Stable and routed: its jobs were created in the same transaction (``skipped_routes``: routes
        that matched but cannot use it, with why)."""
        detail: dict[str, Any] = {"instances": info.instances, "version": info.version, "routes": routes,
                                  "jobs": jobs, "calling_ae": info.calling_ae, "study_uid": info.study_uid}
        if skipped_routes:
            detail["skipped_routes"] = skipped_routes
        self._move(c, info.series_uid, SeriesState.DISPATCHED, event="series.stable", detail=detail, now=now,
                   routes=routes, note="; ".join(f"{k}: {v}" for k, v in (skipped_routes or {}).items()) or None)

    def mark_unmatched(self, c: sqlite3.Connection, info: SeriesInfo, *, now: float) -> None:
        """Stable, and no route matched: kept for the retention period, never processed."""
        self._move(c, info.series_uid, SeriesState.UNMATCHED, event="series.unmatched",
                   detail={"instances": info.instances, "modality": info.modality}, now=now, note="no route matched")

    def mark_verdict(self, c: sqlite3.Connection, info: SeriesInfo, *, now: float) -> None:
        """Stable, and made of SEG/SR/KO objects for a study the node sent results for: examined as a
        verdict on those results (never routed to a model)."""
        self._move(c, info.series_uid, SeriesState.VERDICT, event="series.verdict",
                   detail={"instances": info.instances, "modality": info.modality}, now=now,
                   note="examined as a verdict on the node's results")

    def mark_skipped(self, c: sqlite3.Connection, info: SeriesInfo, *, reason: str, routes: list[str],
                     now: float) -> None:
        """Stable, routed, but not eligible for processing (scout, secondary capture, ...): no result is sent."""
        self._move(c, info.series_uid, SeriesState.SKIPPED, event="series.skipped",
                   detail={"instances": info.instances, "reason": reason, "routes": routes}, now=now, note=reason,
                   routes=routes)

    def mark_incomplete(self, c: sqlite3.Connection, info: SeriesInfo, *, reason: str, now: float) -> None:
        """Evidence that instances are missing: held (re-evaluated when instances arrive)."""
        if info.state == SeriesState.INCOMPLETE:
            if info.note != reason:
                c.execute("UPDATE series SET note = ?, updated_at = ? WHERE series_uid = ?",
                          (reason, now, info.series_uid))
                append_event(c, "series.incomplete", {"instances": info.instances, "reason": reason},
                             series_uid=info.series_uid, now=now)
            return
        self._move(c, info.series_uid, SeriesState.INCOMPLETE, event="series.incomplete",
                   detail={"instances": info.instances, "reason": reason}, now=now, note=reason)

    def mark_failed(self, c: sqlite3.Connection, info: SeriesInfo, *, reason: str, now: float) -> None:
        """Held incomplete past the configured time: given up, without a result."""
        self._move(c, info.series_uid, SeriesState.FAILED, event="series.failed",
                   detail={"instances": info.instances, "reason": reason}, now=now, note=reason)

    def reopen_for_reprocess(self, series_uid: str, *, actor: str | None = None, now: float | None = None) -> int:
        """Send a series through its routes again as a new version (the assembler dispatches it at its
        next tick). Returns the new version.

        Raises:
            NotFoundError: no such series, or its instances were purged.
        """
        now = time.time() if now is None else now
        with self.db.tx() as c:
            row = c.execute("SELECT version, state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if row is None or row["state"] == SeriesState.PURGED:
                raise NotFoundError(f"no series {series_uid} with spooled instances")
            version = int(row["version"]) + 1
            if row["state"] == SeriesState.RECEIVING:
                c.execute("UPDATE series SET version = ?, updated_at = ? WHERE series_uid = ?",
                          (version, now, series_uid))
                append_event(c, "series.reprocess", {"version": version}, series_uid=series_uid, actor=actor, now=now)
            else:
                self._move(c, series_uid, SeriesState.RECEIVING, event="series.reprocess",
                           detail={"version": version}, now=now, version=version, actor=actor)
        return version

    def mark_purged(self, series_uid: str, *, actor: str | None = None, now: float | None = None,
                    busy_sql: str = "", busy_params: Sequence[Any] = ()) -> list[Path] | None:
        """Mark a settled series purged and return its instance files (for the caller to remove); None
        when it changed since it was planned (``busy_sql``, run in the same transaction, finds work)."""
        now = time.time() if now is None else now
        with self.db.tx() as c:
            if busy_sql and c.execute(busy_sql, tuple(busy_params)).fetchone():
                return None
            row = c.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if row is None or SeriesState.PURGED not in _TRANSITIONS[SeriesState(row["state"])]:
                return None
            files = [Path(r[0]) for r in c.execute("SELECT path FROM instances WHERE series_uid = ?", (series_uid,))]
            self._move(c, series_uid, SeriesState.PURGED, event="purge.series", detail={"instances": len(files)},
                       now=now, note="spool purged", actor=actor)
        return files

    # --- reads ----------------------------------------------------------------------------------

    def get(self, series_uid: str) -> SeriesInfo:
        row = self.db.one("SELECT * FROM series WHERE series_uid = ?", (series_uid,))
        if row is None:
            raise NotFoundError(f"no series {series_uid}")
        return SeriesInfo.from_row(row)

    def waiting(self, *, last_received_before: float) -> list[SeriesInfo]:
        """Series still receiving (or held incomplete) with no instance since the given time, oldest first."""
        return [SeriesInfo.from_row(r) for r in self.db.query(
            "SELECT * FROM series WHERE state IN ('receiving', 'incomplete') AND last_received <= ? "
            "ORDER BY last_received", (last_received_before,))]

    def list_series(self, *, state: SeriesState | str | None = None, limit: int = 100) -> list[SeriesInfo]:
        """Series, most recently received first."""
        f = Filter().eq("state", None if state is None else SeriesState(state).value)
        return [SeriesInfo.from_row(r) for r in self.db.query(
            f"SELECT * FROM series{f.sql()} ORDER BY last_received DESC LIMIT ?", (*f.params, limit))]

    def counts(self) -> dict[str, int]:
        """Number of series per state (states with none included)."""
        out = {s.value: 0 for s in SeriesState}
        for r in self.db.query("SELECT state, COUNT(*) AS n FROM series GROUP BY state"):
            out[r["state"]] = int(r["n"])
        return out

    def spool_bytes(self) -> int:
        """Bytes of spooled instances of series not yet purged."""
        row = self.db.one("SELECT COALESCE(SUM(i.size), 0) AS b FROM instances i JOIN series s "
                          "ON i.series_uid = s.series_uid WHERE s.state != 'purged'")
        return int(row["b"]) if row else 0

    def instance(self, sop_uid: str) -> sqlite3.Row | None:
        """The index row of one instance, or None."""
        return self.db.one("SELECT * FROM instances WHERE sop_uid = ?", (sop_uid,))

    def instance_count(self, series_uid: str) -> int:
        row = self.db.one("SELECT COUNT(*) AS n FROM instances WHERE series_uid = ?", (series_uid,))
        return int(row["n"]) if row else 0

    def known(self, series_uid: str) -> bool:
        """Whether any instance of this series was received."""
        return self.db.one("SELECT 1 FROM series WHERE series_uid = ?", (series_uid,)) is not None

    def find(self, series_uid: str) -> SeriesInfo | None:
        """The series, or None when it was never received."""
        row = self.db.one("SELECT * FROM series WHERE series_uid = ?", (series_uid,))
        return None if row is None else SeriesInfo.from_row(row)

    def study_series(self, study_uid: str) -> list[SeriesInfo]:
        """Every series of a study the node received, most recently received first."""
        return [SeriesInfo.from_row(r) for r in self.db.query(
            "SELECT * FROM series WHERE study_uid = ? ORDER BY last_received DESC", (study_uid,))]

    def files(self, series_uid: str) -> list[Path]:
        """The spooled files of a series, in arrival order."""
        rows = self.db.query("SELECT path FROM instances WHERE series_uid = ? ORDER BY received_at, sop_uid",
                             (series_uid,))
        return [Path(r["path"]) for r in rows]

    def settled(self, *, received_before: float, unmatched_before: float,
                unsettled_jobs: str, unsettled_outbox: str) -> list[tuple[str, list[tuple[Path, int]]]]:
        """Series whose retention has passed and that no job or delivery needs any more, with their
        instance files and sizes (for the retention plan)."""
        rows = self.db.query(
            "SELECT s.series_uid FROM series s WHERE "
            "((s.state IN ('dispatched', 'skipped', 'failed') AND s.last_received < ?) "
            "OR (s.state = 'unmatched' AND s.last_received < ?)) "
            f"AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid AND j.state IN {unsettled_jobs}) "
            "AND NOT EXISTS (SELECT 1 FROM outbox o JOIN jobs j ON o.job_id = j.id "
            f"WHERE j.series_uid = s.series_uid AND o.state IN {unsettled_outbox})", (received_before, unmatched_before))
        out = []
        for r in rows:
            files = [(Path(i["path"]), int(i["size"])) for i in self.db.query(
                "SELECT path, size FROM instances WHERE series_uid = ?", (r["series_uid"],))]
            out.append((r["series_uid"], files))
        return out
