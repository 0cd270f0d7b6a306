"""Retention: purge spooled instances and result files once their jobs no longer need them.

A series' spooled instances go once the series is older than ``retention.spool_days`` (unmatched
series: ``node.unmatched_retention_days``) **and** none of its jobs is queued, running or waiting for a
retry **and** none of their results waits for delivery. A job's output folder goes once the job is
finished (done, dead, cancelled) for ``retention.outputs_days`` and its deliveries are settled. The
database rows and the audit trail are kept. ``preannot purge --dry-run`` shows the plan.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.audit import append_event
from node.config import NodeConfig
from node.db import Database

__all__ = ["PurgePlan", "execute_purge", "plan_purge"]

logger = logging.getLogger(__name__)

_ACTIVE_JOBS = "('queued', 'running', 'failed')"
_ACTIVE_OUTBOX = "('pending', 'sending')"


@dataclass
class PurgePlan:
    series: list[str] = field(default_factory=list)
    instance_files: list[Path] = field(default_factory=list)
    job_dirs: dict[int, Path] = field(default_factory=dict)
    bytes: int = 0

    def summary(self) -> str:
        return (f"{len(self.series)} series ({len(self.instance_files)} instance files), "
                f"{len(self.job_dirs)} job output folder(s), {self.bytes / 2**20:.1f} MiB")


def plan_purge(db: Database, config: NodeConfig, *, now: float | None = None) -> PurgePlan:
    """What may be removed now, without removing anything."""
    now = time.time() if now is None else now
    plan = PurgePlan()
    spool_cut = now - config.retention.spool_days * 86400
    unmatched_cut = now - config.node.unmatched_retention_days * 86400
    rows = db.query(
        "SELECT s.series_uid FROM series s WHERE "
        "((s.state = 'dispatched' AND s.last_received < ?) OR (s.state = 'unmatched' AND s.last_received < ?)) "
        f"AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid AND j.state IN {_ACTIVE_JOBS}) "
        "AND NOT EXISTS (SELECT 1 FROM outbox o JOIN jobs j ON o.job_id = j.id "
        f"WHERE j.series_uid = s.series_uid AND o.state IN {_ACTIVE_OUTBOX})", (spool_cut, unmatched_cut))
    for r in rows:
        plan.series.append(r["series_uid"])
        for i in db.query("SELECT path, size FROM instances WHERE series_uid = ?", (r["series_uid"],)):
            p = Path(i["path"])
            if p.exists():
                plan.instance_files.append(p)
                plan.bytes += int(i["size"])
    out_cut = now - config.retention.outputs_days * 86400
    for j in db.query("SELECT id, result FROM jobs j WHERE state IN ('done', 'dead', 'cancelled') "
                      "AND COALESCE(finished_at, updated_at) < ? AND NOT EXISTS (SELECT 1 FROM outbox o "
                      f"WHERE o.job_id = j.id AND o.state IN {_ACTIVE_OUTBOX})", (out_cut,)):
        d = config.data_dir / "outputs" / f"job-{int(j['id']):06d}"
        if d.is_dir():
            plan.job_dirs[int(j["id"])] = d
            plan.bytes += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    return plan


def execute_purge(db: Database, config: NodeConfig, *, now: float | None = None, actor: str | None = None) -> PurgePlan:
    """Remove what :func:`plan_purge` allows (re-checked inside one transaction per series)."""
    now = time.time() if now is None else now
    plan = plan_purge(db, config, now=now)
    for uid in plan.series:
        with db.tx() as c:
            busy = c.execute(f"SELECT 1 FROM jobs WHERE series_uid = ? AND state IN {_ACTIVE_JOBS}", (uid,)).fetchone()
            state = c.execute("SELECT state FROM series WHERE series_uid = ?", (uid,)).fetchone()
            if busy or state is None or state[0] not in ("dispatched", "unmatched"):
                continue  # something arrived or was queued since the plan
            files = [Path(r[0]) for r in c.execute("SELECT path FROM instances WHERE series_uid = ?", (uid,))]
            c.execute("UPDATE series SET state = 'purged', updated_at = ?, note = 'spool purged' "
                      "WHERE series_uid = ?", (now, uid))
            append_event(c, "purge.series", {"instances": len(files)}, series_uid=uid, actor=actor, now=now)
        for f in files:
            f.unlink(missing_ok=True)
        for d in {f.parent for f in files}:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    for job_id, d in plan.job_dirs.items():
        shutil.rmtree(d, ignore_errors=True)
        with db.tx() as c:
            append_event(c, "purge.outputs", {"folder": d.name}, job_id=job_id, actor=actor, now=now)
    if plan.series or plan.job_dirs:
        logger.info("retention purge: %s", plan.summary())
    return plan
