"""Durable jobs and the outbox, in the node database.

A job is one (series, series version, model). Its life::

    queued --lease--> running --ack--> done
       ^                 |
       |             fail (attempts < max) --> failed --(backoff elapsed)--> leased again
       |                 |
       +--retry------ dead (attempts exhausted, reason kept)     cancelled (by an operator)

A leased job carries ``lease_until``; a job whose lease ran out (its worker died) is leased again.
At start the node also requeues every job left ``running`` by a killed process (:meth:`JobStore.recover`).

Completing a job and queuing its result objects in the outbox is one transaction, so a result is
either fully queued for delivery or the job runs again; outbox rows are unique per (destination,
SOP Instance UID) so a result object can only be queued once per destination.

A new version of a series (reprocessing, late instances) supersedes the earlier results of the same
model: when its job completes, the earlier done job is marked ``superseded_by`` it, its objects not
yet delivered are never sent (outbox ``superseded``), and where they were delivered an IOCM rejection
note (a KOS, outbox role ``rejection``) is queued, sent only once the new objects for that destination
are settled, so the radiologist is never left without the current result.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from node.config import Priority
from node.errors import JobError, JobNotFoundError
from node.store.audit import append_event
from node.store.db import Database, Filter
from node.store.results import JobResult

__all__ = ["Deliverable", "EarlierObject", "Job", "JobState", "JobStore", "OutboxItem", "OutboxState", "Supersession"]

logger = logging.getLogger(__name__)

#: the columns a :class:`Job` is read from: every one but ``regions`` (read only by verdict intake, :meth:`JobStore.regions`)
_FIELDS = ("id", "series_uid", "series_version", "model", "route", "send_to", "state", "attempts", "max_attempts",
           "created_at", "updated_at", "started_at", "finished_at", "lease_until", "next_run_at", "error", "result",
           "config_version", "superseded_by", "priority", "intensity")
_COLUMNS = ", ".join(_FIELDS)
_J_COLUMNS = ", ".join(f"j.{c}" for c in _FIELDS)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"


class OutboxState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DEAD = "dead"
    #: a newer result of the same series and model replaced it before it was delivered
    SUPERSEDED = "superseded"


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    series_uid: str
    series_version: int
    model: str
    route: str
    send_to: list[str]
    state: JobState
    attempts: int
    max_attempts: int
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    result: JobResult | None
    #: the job whose results replaced this job's (a later version of the series, same model)
    superseded_by: int | None = None
    priority: Priority = Priority.ROUTINE

    @classmethod
    def from_row(cls, row: Any) -> Job:
        result = None
        if row["result"]:
            try:
                result = JobResult.from_json(row["result"])
            except ValueError as exc:  # a row written by a broken release: the job is still listed
                logger.warning("job %s: its stored result cannot be read (%s)", row["id"], exc)
        return cls(
            id=int(row["id"]), series_uid=row["series_uid"], series_version=int(row["series_version"]),
            model=row["model"], route=row["route"], send_to=json.loads(row["send_to"]),
            state=JobState(row["state"]), attempts=int(row["attempts"]), max_attempts=int(row["max_attempts"]),
            created_at=row["created_at"], updated_at=row["updated_at"], started_at=row["started_at"],
            finished_at=row["finished_at"], error=row["error"],
            result=result,
            superseded_by=row["superseded_by"],
            priority=Priority.of_rank(int(row["priority"])),
        )


class Deliverable(Protocol):
    """A result file to deliver (``node.outputs.ResultObject`` is the one the pipeline makes)."""

    @property
    def path(self) -> str: ...
    @property
    def sop_uid(self) -> str: ...
    @property
    def sop_class(self) -> str: ...
    @property
    def series_uid(self) -> str: ...


@dataclass(frozen=True, slots=True)
class EarlierObject:
    """A result object of an earlier, not yet superseded job of the same series and model, at one destination."""

    job_id: int
    destination: str
    path: str
    sop_uid: str
    sop_class: str
    series_uid: str
    state: OutboxState


@dataclass(frozen=True, slots=True)
class Supersession:
    """What a completing job replaces.

    Attributes:
        job_ids: the earlier done jobs whose results it replaces.
        rejection: the IOCM rejection note citing their objects (None: nothing to withdraw).
        withdraw_at: destinations that accept rejection notes; where the earlier objects were delivered
            and the destination is not listed, the note is not sent (recorded in the audit trail).
    """

    job_ids: tuple[int, ...]
    rejection: Deliverable | None
    withdraw_at: frozenset[str]


@dataclass(frozen=True, slots=True)
class OutboxItem:
    id: int
    job_id: int
    destination: str
    path: str
    sop_uid: str
    sop_class: str
    state: OutboxState
    attempts: int
    error: str | None
    #: "result" (a SEG, SR... of the job), "rejection" (the IOCM note withdrawing earlier results) or
    #: "notification" (a FHIR/HL7 message announcing the result; destination ``notify:<channel>``)
    role: str = "result"


def _backoff(attempts: int, base: float, cap: float) -> float:
    return float(min(cap, base * (2 ** max(attempts - 1, 0))))


class JobStore:
    """Jobs, outbox and audit events over the node database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        #: set when jobs may be waiting (after a dispatch commits, after a retry): workers wake at once
        #: instead of at their next poll
        self.jobs_waiting = threading.Event()
        #: set when result objects were queued: the deliverer wakes at once
        self.outbox_waiting = threading.Event()

    # --- events (audit trail) -------------------------------------------------------------------

    def record(self, kind: str, detail: dict[str, Any], *, series_uid: str | None = None,
               job_id: int | None = None, actor: str | None = None) -> None:
        """Append an audit event."""
        with self.db.tx() as c:
            append_event(c, kind, detail, series_uid=series_uid, job_id=job_id, actor=actor)

    # --- jobs -----------------------------------------------------------------------------------

    def create(self, c: Any, *, series_uid: str, series_version: int, model: str, route: str,
               send_to: list[str], max_attempts: int, config_version: str, now: float,
               priority: Priority = Priority.ROUTINE) -> int | None:
        """Insert a queued job inside the caller's transaction ``c``; None if it already exists."""
        cur = c.execute(
            "INSERT OR IGNORE INTO jobs (series_uid, series_version, model, route, send_to, state, attempts, "
            "max_attempts, created_at, updated_at, next_run_at, config_version, priority) "
            "VALUES (?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?, ?, ?, ?)",
            (series_uid, series_version, model, route, json.dumps(send_to), max_attempts, now, now, now,
             config_version, Priority(priority).rank))
        if cur.rowcount == 0:
            return None
        job_id = int(cur.lastrowid)
        append_event(c, "job.queued", {"model": model, "route": route, "series_version": series_version,
                                      "config_version": config_version, "priority": str(priority)},
                    series_uid=series_uid, job_id=job_id, now=now)
        return job_id

    def get(self, job_id: int) -> Job:
        """The job; raises JobError when there is none."""
        row = self.db.one(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        return Job.from_row(row)

    def list_jobs(self, *, state: JobState | str | None = None, model: str | None = None,
                  series_uid: str | None = None, since: float | None = None, until: float | None = None,
                  limit: int = 100) -> list[Job]:
        """Jobs, newest first, optionally filtered (``since``/``until``: creation time, epoch seconds).

        Raises:
            ValueError: ``state`` is not a job state.
        """
        f = (Filter().eq("state", None if state is None else JobState(state).value).eq("model", model)
             .eq("series_uid", series_uid).ge("created_at", since).le("created_at", until))
        return [Job.from_row(r) for r in self.db.query(f"SELECT {_COLUMNS} FROM jobs{f.sql()} ORDER BY id DESC LIMIT ?",
                                                       (*f.params, limit))]

    def finished_before(self, cutoff: float) -> list[int]:
        """Ids of jobs finished (done, dead, cancelled) before ``cutoff`` whose deliveries are all settled."""
        rows = self.db.query("SELECT id FROM jobs j WHERE state IN ('done', 'dead', 'cancelled') "
                             "AND COALESCE(finished_at, updated_at) < ? AND NOT EXISTS (SELECT 1 FROM outbox o "
                             "WHERE o.job_id = j.id AND o.state IN ('pending', 'sending'))", (cutoff,))
        return [int(r["id"]) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs per state."""
        out = {s.value: 0 for s in JobState}
        for r in self.db.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            out[r["state"]] = int(r["n"])
        return out

    def lease(self, *, lease_seconds: float, now: float | None = None, aging_seconds: float = 1800.0) -> Job | None:
        """Take the next runnable job (queued, failed past its backoff, or running with an expired lease):
        the highest priority first (stat, urgent, routine), the oldest first within a priority. A job
        rises one level per ``aging_seconds`` of waiting, so a long-waiting routine job is not starved."""
        now = time.time() if now is None else now
        with self.db.tx() as c:
            row = c.execute(
                "SELECT id FROM jobs WHERE (state IN ('queued', 'failed') AND next_run_at <= ?) "
                "OR (state = 'running' AND lease_until < ?) "
                "ORDER BY MAX(0, priority - CAST((? - created_at) / ? AS INTEGER)), next_run_at, id LIMIT 1",
                (now, now, now, aging_seconds)).fetchone()
            if row is None:
                return None
            c.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_until = ?, started_at = ?, "
                      "updated_at = ? WHERE id = ?", (now + lease_seconds, now, now, row["id"]))
            job = Job.from_row(c.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (row["id"],)).fetchone())
            append_event(c, "job.started", {"attempt": job.attempts, "model": job.model},
                        series_uid=job.series_uid, job_id=job.id, now=now)
        return job

    # --- what the verdict intake asks of the jobs (the series table joined, read only) ---------------

    def study_has_result(self, study_uid: str) -> bool:
        """Whether a job on a series of this study is done."""
        return self.db.one("SELECT 1 FROM jobs j JOIN series s ON s.series_uid = j.series_uid "
                           "WHERE s.study_uid = ? AND j.state = 'done' LIMIT 1", (study_uid,)) is not None

    def studies_with_results(self, *, finished_since: float) -> list[str]:
        rows = self.db.query("SELECT DISTINCT s.study_uid FROM jobs j JOIN series s ON s.series_uid = j.series_uid "
                             "WHERE j.state = 'done' AND j.finished_at >= ?", (finished_since,))
        return [str(r[0]) for r in rows]

    def regions(self, job_id: int) -> bytes | None:
        """The done job's findings' regions (:class:`node.verdicts.regions.AIRegions` bytes), None for jobs of
        releases that did not keep them."""
        row = self.db.one("SELECT regions FROM jobs WHERE id = ?", (job_id,))
        return None if row is None or row[0] is None else bytes(row[0])

    def made_object(self, sop_uid: str) -> bool:
        """Whether the node made this instance (a result or rejection note in the outbox)."""
        return self.db.one("SELECT 1 FROM outbox WHERE sop_uid = ? LIMIT 1", (sop_uid,)) is not None

    def made_series(self, series_uid: str) -> bool:
        """Whether the node made this series (its SEG, SR or rejection note series)."""
        return self.db.one("SELECT 1 FROM outbox WHERE series_uid = ? LIMIT 1", (series_uid,)) is not None

    def done_jobs_that_sent(self, sop_uids: set[str]) -> list[Job]:
        """Done jobs one of whose result objects is among ``sop_uids``."""
        if not sop_uids:
            return []
        marks = ",".join("?" * len(sop_uids))
        rows = self.db.query(f"SELECT DISTINCT {_J_COLUMNS} FROM jobs j JOIN outbox o ON o.job_id = j.id WHERE j.state = 'done' "
                             f"AND o.role = 'result' AND o.sop_uid IN ({marks}) ORDER BY j.id", tuple(sop_uids))
        return [Job.from_row(r) for r in rows]

    def latest_done_jobs(self, series_uids: set[str]) -> list[Job]:
        """The latest done, not superseded job of each model on these series."""
        if not series_uids:
            return []
        marks = ",".join("?" * len(series_uids))
        rows = self.db.query(
            f"SELECT {_J_COLUMNS} FROM jobs j WHERE j.state = 'done' AND j.superseded_by IS NULL AND j.series_uid IN ({marks}) "
            "AND j.id = (SELECT MAX(k.id) FROM jobs k WHERE k.series_uid = j.series_uid AND k.model = j.model "
            "AND k.state = 'done') ORDER BY j.id", tuple(series_uids))
        return [Job.from_row(r) for r in rows]

    def processed_inputs(self) -> list[dict[str, Any]]:
        """Per done job, oldest first: model, creation time, its series' routing attributes and the
        intensity profile of its input (for input drift)."""
        # the intensity profile has a column of its own (written with the result): this runs at every metrics
        # scrape and dashboard view, and must not parse whole results
        rows = self.db.query("SELECT j.model, j.created_at, j.intensity, s.attrs FROM jobs j "
                             "JOIN series s ON s.series_uid = j.series_uid WHERE j.state = 'done' ORDER BY j.created_at")
        out = []
        for r in rows:
            try:
                intensity = json.loads(r["intensity"]) if r["intensity"] else {}
                attrs = json.loads(r["attrs"])
            except ValueError:  # one unreadable row never blinds the monitoring
                continue
            out.append({"model": r["model"], "created_at": r["created_at"], "attrs": attrs, "intensity": intensity})
        return out

    def earlier_jobs(self, job: Job) -> list[int]:
        """Done jobs of earlier versions of ``job``'s series by the same model not superseded yet."""
        return [int(r["id"]) for r in self.db.query(
            "SELECT id FROM jobs WHERE series_uid = ? AND model = ? AND series_version < ? AND state = 'done' "
            "AND superseded_by IS NULL ORDER BY id", (job.series_uid, job.model, job.series_version))]

    def earlier_results(self, job: Job) -> list[EarlierObject]:
        """The delivered or queued result objects of earlier versions of ``job``'s series by the same model
        that no job has superseded yet (what ``job`` replaces when it completes)."""
        rows = self.db.query(
            "SELECT o.*, o.job_id AS earlier FROM jobs j JOIN outbox o ON o.job_id = j.id "
            "WHERE j.series_uid = ? AND j.model = ? AND j.series_version < ? AND j.state = 'done' "
            "AND j.superseded_by IS NULL AND o.role = 'result' ORDER BY o.id",
            (job.series_uid, job.model, job.series_version))
        return [EarlierObject(job_id=int(r["earlier"]), destination=r["destination"], path=r["path"],
                              sop_uid=r["sop_uid"], sop_class=r["sop_class"], series_uid=r["series_uid"],
                              state=OutboxState(r["state"])) for r in rows]

    def complete(self, job_id: int, *, result: JobResult, objects: Sequence[Deliverable],
                 destinations: list[str], supersedes: Supersession | None = None,
                 notifications: Mapping[str, Deliverable] | None = None, priority: Priority | None = None,
                 now: float | None = None, lease: float | None = None, regions: bytes | None = None) -> None:
        """Mark a running job done and queue each result object for each destination (one transaction).

        ``notifications``: messages announcing the result (channel destination name, e.g. ``notify:fhir``
        -> the message file), queued in the outbox like the objects, so they are retried until delivered
        and sent once. ``priority``: the priority the result is delivered with, when a route flag raised it.
        ``supersedes``: the earlier results this job replaces (see the module doc). A job that completes
        after a newer version of its series already completed is itself superseded at once: its objects
        are kept on disk but never queued. ``lease``: the ``started_at`` of the caller's lease; a caller whose
        lease passed on (expired, or requeued and leased again by a restarted node) is refused. ``regions``: the
        findings' regions on the source images, compact, kept with the job to judge verdicts (retention of the
        output folder does not remove them).
        """
        now = time.time() if now is None else now
        with self.db.tx() as c:
            row = c.execute("SELECT state, series_uid, series_version, model, started_at FROM jobs WHERE id = ?",
                            (job_id,)).fetchone()
            if row is None or row["state"] != JobState.RUNNING:
                raise JobError(f"job {job_id} is {row['state'] if row else 'missing'}; expected running")
            if lease is not None and row["started_at"] != lease:
                raise JobError(f"job {job_id} was leased again since this attempt started: its lease passed on")
            newer = c.execute("SELECT id FROM jobs WHERE series_uid = ? AND model = ? AND series_version > ? "
                              "AND state = 'done' ORDER BY series_version DESC LIMIT 1",
                              (row["series_uid"], row["model"], row["series_version"])).fetchone()
            c.execute("UPDATE jobs SET state = 'done', finished_at = ?, updated_at = ?, lease_until = NULL, "
                      "error = NULL, result = ?, intensity = ?, superseded_by = ?, priority = COALESCE(?, priority), "
                      "regions = ? WHERE id = ?",
                      (now, now, result.to_json(), json.dumps(result.intensity, allow_nan=False),
                       newer["id"] if newer else None, None if priority is None else Priority(priority).rank,
                       regions, job_id))
            queued_to = [] if newer else destinations
            for dest in queued_to:
                for obj in objects:
                    self._enqueue(c, job_id, dest, obj, role="result", now=now)
            announced = {} if newer else dict(notifications or {})
            for channel, message in announced.items():
                self._enqueue(c, job_id, channel, message, role="notification", now=now)
            append_event(c, "job.done", {"objects": [o.sop_uid for o in objects], "destinations": queued_to,
                                        "findings": result.roi_count, "classes": [x.value for x in result.classes],
                                        "not_reported": result.not_reported, "flags": list(result.flags),
                                        "notifications": sorted(announced), "model": result.model},
                        series_uid=row["series_uid"], job_id=job_id, now=now)
            if newer:
                append_event(c, "job.superseded", {"by": int(newer["id"]), "reason": "a newer version of the "
                                                  "series completed first; results not sent"},
                            series_uid=row["series_uid"], job_id=job_id, now=now)
            elif supersedes is not None:
                self._supersede(c, job_id, row["series_uid"], supersedes, now=now)
                # earlier versions still waiting to run would only produce results already replaced
                for r in c.execute("SELECT id FROM jobs WHERE series_uid = ? AND model = ? AND series_version < ? "
                                   "AND state IN ('queued', 'failed')",
                                   (row["series_uid"], row["model"], row["series_version"])).fetchall():
                    c.execute("UPDATE jobs SET state = 'cancelled', superseded_by = ?, updated_at = ?, "
                              "finished_at = ? WHERE id = ?", (job_id, now, now, r["id"]))
                    append_event(c, "job.cancelled", {"reason": f"superseded by job {job_id}"},
                                series_uid=row["series_uid"], job_id=int(r["id"]), now=now)
        if (queued_to and objects) or announced:
            self.outbox_waiting.set()

    @staticmethod
    def _enqueue(c: Any, job_id: int, dest: str, obj: Deliverable, *, role: str, now: float) -> None:
        c.execute("INSERT OR IGNORE INTO outbox (job_id, destination, path, sop_uid, sop_class, series_uid, role, "
                  "state, attempts, next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)",
                  (job_id, dest, obj.path, obj.sop_uid, obj.sop_class, getattr(obj, "series_uid", "") or "", role,
                   now, now))

    def _supersede(self, c: Any, job_id: int, series_uid: str, sup: Supersession, *, now: float) -> None:
        """Inside complete(): mark the earlier jobs superseded, stop their undelivered objects, queue the
        rejection note where they were delivered."""
        for earlier in sup.job_ids:
            marked = c.execute("UPDATE jobs SET superseded_by = ?, updated_at = ? WHERE id = ? AND state = 'done' "
                               "AND superseded_by IS NULL", (job_id, now, earlier)).rowcount
            if not marked:
                continue
            stopped = c.execute("UPDATE outbox SET state = 'superseded' WHERE job_id = ? AND role = 'result' "
                                "AND state IN ('pending', 'dead')", (earlier,)).rowcount
            delivered = sorted({r["destination"] for r in c.execute(
                "SELECT destination FROM outbox WHERE job_id = ? AND role = 'result' AND state IN ('sent', 'sending')",
                (earlier,))})
            withdraw = [d for d in delivered if d in sup.withdraw_at and sup.rejection is not None]
            for dest in withdraw:
                self._enqueue(c, job_id, dest, sup.rejection, role="rejection", now=now)  # type: ignore[arg-type]
            append_event(c, "job.superseded", {
                "by": job_id, "not_sent": stopped, "delivered_to": delivered, "withdrawn_at": withdraw,
                "rejection_note": sup.rejection.sop_uid if withdraw and sup.rejection else None,
                "not_withdrawn": [d for d in delivered if d not in withdraw]},
                series_uid=series_uid, job_id=earlier, now=now)

    def fail(self, job_id: int, reason: str, *, backoff_seconds: float, backoff_max_seconds: float,
             permanent: bool = False, now: float | None = None, lease: float | None = None) -> JobState:
        """Record a failed attempt: failed (retried after a backoff) or dead when attempts are exhausted,
        or at once when the error is ``permanent`` (the same input would fail the same way). With
        ``lease`` (the ``started_at`` of the caller's lease), a caller whose lease passed on changes
        nothing (the job's state is returned as it is)."""
        now = time.time() if now is None else now
        with self.db.tx() as c:
            row = c.execute("SELECT attempts, max_attempts, series_uid, state, started_at FROM jobs WHERE id = ?",
                            (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job with id {job_id}")
            if lease is not None and (row["started_at"] != lease or row["state"] != JobState.RUNNING):
                return JobState(row["state"])
            dead = permanent or int(row["attempts"]) >= int(row["max_attempts"])
            state = JobState.DEAD if dead else JobState.FAILED
            delay = _backoff(int(row["attempts"]), backoff_seconds, backoff_max_seconds)
            c.execute("UPDATE jobs SET state = ?, error = ?, updated_at = ?, lease_until = NULL, next_run_at = ?, "
                      "finished_at = ? WHERE id = ?",
                      (state.value, reason[:4000], now, now + delay, now if dead else None, job_id))
            append_event(c, f"job.{state.value}", {"reason": reason[:4000], "attempt": int(row["attempts"]),
                                                 "retry_in_s": None if dead else delay, "permanent": permanent},
                        series_uid=row["series_uid"], job_id=job_id, now=now)
        return state

    def retry(self, job_id: int, *, actor: str | None = None, now: float | None = None) -> None:
        """Queue a failed, dead or cancelled job again (attempts reset).

        A done job is refused: its results were sent, and running it again would put a second AI result
        beside the first (reprocessing the series is the explicit way to replace them).
        """
        now = time.time() if now is None else now
        with self.db.tx() as c:
            row = c.execute("SELECT state, series_uid FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job with id {job_id}")
            if row["state"] not in (JobState.FAILED, JobState.DEAD, JobState.CANCELLED):
                hint = "; reprocess the series to replace its results" if row["state"] == JobState.DONE else ""
                raise JobError(f"job {job_id} is {row['state']}; only failed, dead or cancelled jobs retry{hint}")
            c.execute("UPDATE jobs SET state = 'queued', attempts = 0, next_run_at = ?, updated_at = ?, error = NULL "
                      "WHERE id = ?", (now, now, job_id))
            append_event(c, "job.retry", {"previous_state": row["state"]}, series_uid=row["series_uid"],
                        job_id=job_id, actor=actor, now=now)
        self.jobs_waiting.set()

    def requeue(self, job_id: int, *, reason: str, now: float | None = None, lease: float | None = None) -> bool:
        """Put a running job back in the queue without counting its attempt (the node is stopping before it
        finished, or the compute running it went away). Returns False when it is no longer running (it
        finished meanwhile) or, with ``lease`` (the ``started_at`` of the caller's lease), when it was
        leased again since."""
        now = time.time() if now is None else now
        with self.db.tx() as c:
            row = self._unlease(c, job_id, lease=lease, run_at=now, now=now)
            if row is None:
                return False
            append_event(c, "job.requeued", {"reason": reason}, series_uid=row["series_uid"], job_id=job_id, now=now)
        return True

    @staticmethod
    def _unlease(c: Any, job_id: int, *, lease: float | None, run_at: float, now: float,
                 note: str | None = None) -> Any:
        """Inside ``c``: a running job (still the caller's lease, when given) back to queued without counting its
        attempt, to run from ``run_at`` (``note``: its error text meanwhile). Returns its row as it was, or None
        when it is no longer the caller's to give back."""
        row = c.execute("SELECT series_uid, error FROM jobs WHERE id = ? AND state = 'running' AND started_at IS "
                        "COALESCE(?, started_at)", (job_id, lease)).fetchone()
        if row is not None:
            c.execute("UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0), lease_until = NULL, "
                      "next_run_at = ?, updated_at = ?, error = COALESCE(?, error) WHERE id = ?",
                      (run_at, now, note, job_id))
        return row

    def defer(self, job_id: int, *, reason: str, until: float, now: float | None = None,
              lease: float | None = None) -> bool:
        """Put a running job back in the queue until ``until`` without counting its attempt: it waits for
        something that is not there yet (a study-level model's other input series). The reason is kept as the
        job's note. Returns False when the caller's lease passed on (see :meth:`requeue`)."""
        now = time.time() if now is None else now
        with self.db.tx() as c:
            row = self._unlease(c, job_id, lease=lease, run_at=until, now=now, note=reason[:4000])
            if row is None:
                return False
            if row["error"] != reason[:4000]:  # one event per new reason, not one per look
                append_event(c, "job.waiting", {"reason": reason[:4000], "until": until},
                             series_uid=row["series_uid"], job_id=job_id, now=now)
        return True

    def study_jobs(self, study_uid: str, model: str) -> list[Job]:
        """Jobs of ``model`` on any series of a study (the series table joined), newest first."""
        return [Job.from_row(r) for r in self.db.query(
            f"SELECT {_J_COLUMNS} FROM jobs j JOIN series s ON s.series_uid = j.series_uid WHERE s.study_uid = ? "
            "AND j.model = ? ORDER BY j.id DESC", (study_uid, model))]

    def cancel(self, job_id: int, *, actor: str | None = None, now: float | None = None) -> None:
        """Cancel a queued or failed job."""
        now = time.time() if now is None else now
        with self.db.tx() as c:
            row = c.execute("SELECT state, series_uid FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job with id {job_id}")
            if row["state"] not in (JobState.QUEUED, JobState.FAILED):
                raise JobError(f"job {job_id} is {row['state']}; only queued or failed jobs can be cancelled")
            c.execute("UPDATE jobs SET state = 'cancelled', updated_at = ?, finished_at = ? WHERE id = ?",
                      (now, now, job_id))
            append_event(c, "job.cancelled", {}, series_uid=row["series_uid"], job_id=job_id, actor=actor, now=now)

    def recover(self, now: float | None = None) -> tuple[int, int]:
        """At start: requeue jobs left running and outbox items left sending by a killed process.

        Returns:
            (jobs requeued, outbox items requeued)
        """
        now = time.time() if now is None else now
        with self.db.tx() as c:
            jobs = c.execute("UPDATE jobs SET state = 'queued', lease_until = NULL, next_run_at = ?, updated_at = ? "
                             "WHERE state = 'running'", (now, now)).rowcount
            items = c.execute("UPDATE outbox SET state = 'pending', next_attempt_at = ? WHERE state = 'sending'",
                              (now,)).rowcount
            if jobs or items:
                append_event(c, "node.recovered", {"jobs_requeued": jobs, "outbox_requeued": items}, now=now)
        if jobs or items:
            logger.warning("recovered after an unclean stop: %d job(s) and %d delivery item(s) requeued", jobs, items)
        return jobs, items

    # --- outbox ---------------------------------------------------------------------------------

    def due_deliveries(self, *, now: float | None = None, limit: int = 500) -> dict[str, list[OutboxItem]]:
        """Pending outbox items whose next attempt is due, grouped by destination; marks them sending."""
        now = time.time() if now is None else now
        out: dict[str, list[OutboxItem]] = {}
        with self.db.tx() as c:
            # a rejection note waits until the objects that replace the withdrawn ones are settled there
            rows = c.execute("SELECT * FROM outbox o WHERE state = 'pending' AND next_attempt_at <= ? "
                             "AND NOT (role = 'rejection' AND EXISTS (SELECT 1 FROM outbox s WHERE s.job_id = o.job_id "
                             "AND s.destination = o.destination AND s.role = 'result' "
                             "AND s.state IN ('pending', 'sending'))) "
                             "ORDER BY (SELECT j.priority FROM jobs j WHERE j.id = o.job_id), id LIMIT ?",
                             (now, limit)).fetchall()
            for r in rows:
                c.execute("UPDATE outbox SET state = 'sending', attempts = attempts + 1 WHERE id = ?", (r["id"],))
                out.setdefault(r["destination"], []).append(OutboxItem(
                    id=r["id"], job_id=r["job_id"], destination=r["destination"], path=r["path"],
                    sop_uid=r["sop_uid"], sop_class=r["sop_class"], state=OutboxState.SENDING,
                    attempts=int(r["attempts"]) + 1, error=r["error"], role=r["role"]))
        return out

    def delivered(self, item: OutboxItem, status: str, *, now: float | None = None) -> None:
        """Record a successful delivery of one object."""
        now = time.time() if now is None else now
        with self.db.tx() as c:
            c.execute("UPDATE outbox SET state = 'sent', sent_at = ?, last_status = ?, error = NULL WHERE id = ?",
                      (now, status, item.id))
            append_event(c, "delivery.sent", {"destination": item.destination, "sop_uid": item.sop_uid,
                                             "status": status, "attempt": item.attempts},
                        job_id=item.job_id, now=now)

    def delivery_failed(self, item: OutboxItem, reason: str, *, max_attempts: int, backoff_seconds: float,
                        backoff_max_seconds: float, status: str | None = None, now: float | None = None) -> OutboxState:
        """Record a failed delivery attempt: pending again after a backoff, or dead when attempts are exhausted."""
        now = time.time() if now is None else now
        dead = item.attempts >= max_attempts
        state = OutboxState.DEAD if dead else OutboxState.PENDING
        delay = _backoff(item.attempts, backoff_seconds, backoff_max_seconds)
        with self.db.tx() as c:
            c.execute("UPDATE outbox SET state = ?, error = ?, last_status = ?, next_attempt_at = ? WHERE id = ?",
                      (state.value, reason[:2000], status, now + delay, item.id))
            append_event(c, "delivery.dead" if dead else "delivery.failed",
                        {"destination": item.destination, "sop_uid": item.sop_uid, "reason": reason[:2000],
                         "attempt": item.attempts, "retry_in_s": None if dead else delay},
                        job_id=item.job_id, now=now)
        return state

    def resend(self, job_id: int, *, actor: str | None = None, now: float | None = None) -> int:
        """Queue a job's result objects for delivery again (e.g. after the PACS lost them).

        Raises:
            JobNotFoundError: no such job.
            JobError: its results were superseded by a newer job (resending would bring back withdrawn objects).
        """
        now = time.time() if now is None else now
        with self.db.tx() as c:
            row = c.execute("SELECT superseded_by FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job with id {job_id}")
            if row["superseded_by"] is not None:
                raise JobError(f"job {job_id} was superseded by job {row['superseded_by']}; its results were "
                               "withdrawn and are not sent again")
            n = c.execute("UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, error = NULL "
                          "WHERE job_id = ? AND state != 'superseded'", (now, job_id)).rowcount
            append_event(c, "delivery.resend", {"objects": n}, job_id=job_id, actor=actor, now=now)
        if n:
            self.outbox_waiting.set()
        return int(n)

    def outbox(self, *, job_id: int | None = None, state: OutboxState | str | None = None,
               limit: int = 500) -> list[OutboxItem]:
        """Outbox items, newest first."""
        f = Filter().eq("job_id", job_id).eq("state", None if state is None else OutboxState(state).value)
        sql, params = f"SELECT * FROM outbox{f.sql()} ORDER BY id DESC LIMIT ?", [*f.params, limit]
        return [OutboxItem(id=r["id"], job_id=r["job_id"], destination=r["destination"], path=r["path"],
                           sop_uid=r["sop_uid"], sop_class=r["sop_class"], state=OutboxState(r["state"]),
                           attempts=int(r["attempts"]), error=r["error"], role=r["role"])
                for r in self.db.query(sql, tuple(params))]

    def outbox_counts(self) -> dict[str, int]:
        """Number of outbox items per state."""
        out = {s.value: 0 for s in OutboxState}
        for r in self.db.query("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state"):
            out[r["state"]] = int(r["n"])
        return out
