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

from node.config import NodeConfig
from node.outputs.result import job_dir
from node.store.jobs import JobStore
from node.store.series import SeriesStore

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


def plan_purge(series: SeriesStore, jobs: JobStore, config: NodeConfig, *, now: float | None = None) -> PurgePlan:
    """What may be removed now, without removing anything."""
    now = time.time() if now is None else now
    plan = PurgePlan()
    settled = series.settled(received_before=now - config.retention.spool_days * 86400,
                             unmatched_before=now - config.node.unmatched_retention_days * 86400,
                             unsettled_jobs=_ACTIVE_JOBS, unsettled_outbox=_ACTIVE_OUTBOX)
    for uid, files in settled:
        plan.series.append(uid)
        for p, size in files:
            if p.exists():
                plan.instance_files.append(p)
                plan.bytes += size
    for job_id in jobs.finished_before(now - config.retention.outputs_days * 86400):
        d = job_dir(config.data_dir, job_id)
        if d.is_dir():
            plan.job_dirs[job_id] = d
            plan.bytes += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    return plan


def execute_purge(series: SeriesStore, jobs: JobStore, config: NodeConfig, *, now: float | None = None,
                  actor: str | None = None) -> PurgePlan:
    """Remove what :func:`plan_purge` allows (re-checked inside one transaction per series)."""
    now = time.time() if now is None else now
    plan = plan_purge(series, jobs, config, now=now)
    for uid in plan.series:
        files = series.mark_purged(uid, actor=actor, now=now,
                                   busy_sql=f"SELECT 1 FROM jobs WHERE series_uid = ? AND state IN {_ACTIVE_JOBS}",
                                   busy_params=(uid,))
        if files is None:
            continue  # something arrived or was queued since the plan
        for f in files:
            f.unlink(missing_ok=True)
        for d in {f.parent for f in files}:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    for job_id, d in plan.job_dirs.items():
        shutil.rmtree(d, ignore_errors=True)
        jobs.record("purge.outputs", {"folder": d.name}, job_id=job_id, actor=actor)
    if plan.series or plan.job_dirs:
        logger.info("retention purge: %s", plan.summary())
    return plan
