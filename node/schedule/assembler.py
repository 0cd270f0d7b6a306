"""Series assembly: decide when a series is complete ("stable") and queue its jobs.

A series is stable once no instance arrived for ``stable_seconds`` (the node default, or the largest
``stable_seconds`` of the routes it matches), whatever the number of associations it came in. It is
then matched against the routes: one job per (series, series version, model) is queued, or, when no
route matches, the series is marked ``unmatched`` (kept for the retention period, never processed).
The series' transition and its jobs commit in one transaction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from node.config import NodeConfig, Route
from node.schedule.routing import matching_routes
from node.store.jobs import JobStore
from node.store.series import SeriesInfo, SeriesStore

__all__ = ["Assembler", "Dispatch"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Dispatch:
    """What the assembler decided for one stable series."""

    series_uid: str
    version: int
    routes: list[str]
    jobs: list[int]


class Assembler:
    """Turns stable series into jobs. Call :meth:`tick` periodically (the node does, every ~0.5 s)."""

    def __init__(self, config: NodeConfig, series: SeriesStore, jobs: JobStore) -> None:
        self.config = config
        self.series = series
        self.jobs = jobs
        route_waits = [r.stable_seconds for r in config.routes if r.stable_seconds is not None]
        self._min_wait = min([config.node.stable_seconds, *route_waits])
        self._config_version = config.version()

    def tick(self, now: float | None = None) -> list[Dispatch]:
        """Dispatch every series that became stable. Returns what was dispatched."""
        now = time.time() if now is None else now
        out = []
        for info in self.series.waiting(last_received_before=now - self._min_wait):
            routes = matching_routes(self.config.routes, info.attrs, called_ae=info.called_ae,
                                     calling_ae=info.calling_ae)
            waits = [r.stable_seconds if r.stable_seconds is not None else self.config.node.stable_seconds
                     for r in routes] or [self.config.node.stable_seconds]
            if now - info.last_received < max(waits):
                continue
            d = self._dispatch(info, routes, now)
            if d is not None:
                out.append(d)
        return out

    def _dispatch(self, seen: SeriesInfo, routes: list[Route], now: float) -> Dispatch | None:
        job_ids: list[int] = []
        names = [r.name for r in routes]
        with self.series.db.tx() as c:
            info = self.series.claim_stable(c, seen.series_uid, version=seen.version,
                                            last_received=seen.last_received)
            if info is None:
                return None  # changed since we looked: a new instance arrived
            if not routes:
                self.series.mark_unmatched(c, info, now=now)
            else:
                for route in routes:
                    for model in route.models:
                        jid = self.jobs.create(c, series_uid=info.series_uid, series_version=info.version,
                                               model=model, route=route.name, send_to=list(route.send_to),
                                               max_attempts=self.config.jobs.max_attempts,
                                               config_version=self._config_version, now=now)
                        if jid is not None:
                            job_ids.append(jid)
                self.series.mark_dispatched(c, info, routes=names, jobs=job_ids, now=now)
        if routes:
            logger.info("series %s stable (%d instances, version %d): routes %s -> jobs %s", info.series_uid,
                        info.instances, info.version, names, job_ids)
        else:
            logger.info("series %s stable (%d instances, modality %s): no route matched; kept, not processed",
                        info.series_uid, info.instances, info.modality)
        return Dispatch(info.series_uid, info.version, names, job_ids)
