"""Series assembly: decide when a series is complete ("stable") and queue its jobs.

A series is stable once no instance arrived for ``stable_seconds`` (the node default, or the largest
``stable_seconds`` of the routes it matches), whatever the number of associations it came in. It is
then matched against the routes: one job per (series, series version, model) is queued, or, when no
route matches, the series is marked ``unmatched`` (kept for the retention period, never processed).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from node.config import NodeConfig
from node.jobs.store import JobStore
from node.routing import matching_routes

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

    def __init__(self, config: NodeConfig, jobs: JobStore) -> None:
        self.config = config
        self.jobs = jobs
        self.db = jobs.db
        route_waits = [r.stable_seconds for r in config.routes if r.stable_seconds is not None]
        self._min_wait = min([config.node.stable_seconds, *route_waits])
        self._config_version = config.version()

    def tick(self, now: float | None = None) -> list[Dispatch]:
        """Dispatch every series that became stable. Returns what was dispatched."""
        now = time.time() if now is None else now
        rows = self.db.query("SELECT * FROM series WHERE state = 'receiving' AND last_received <= ? "
                             "ORDER BY last_received", (now - self._min_wait,))
        out = []
        for row in rows:
            attrs = json.loads(row["attrs"])
            routes = matching_routes(self.config.routes, attrs, called_ae=row["called_ae"] or "",
                                     calling_ae=row["calling_ae"] or "")
            waits = [r.stable_seconds if r.stable_seconds is not None else self.config.node.stable_seconds
                     for r in routes] or [self.config.node.stable_seconds]
            if now - float(row["last_received"]) < max(waits):
                continue
            d = self._dispatch(row["series_uid"], int(row["version"]), routes, float(row["last_received"]), now)
            if d is not None:
                out.append(d)
        return out

    def _dispatch(self, series_uid: str, version: int, routes: list, last_received: float,
                  now: float) -> Dispatch | None:
        job_ids: list[int] = []
        with self.db.tx() as c:
            row = c.execute("SELECT state, version, last_received, n_instances, modality, study_uid, calling_ae "
                            "FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if row is None or row["state"] != "receiving" or int(row["version"]) != version \
                    or float(row["last_received"]) != last_received:
                return None  # changed since we looked: a new instance arrived
            n = c.execute("SELECT COUNT(*) FROM instances WHERE series_uid = ?", (series_uid,)).fetchone()[0]
            if not routes:
                c.execute("UPDATE series SET state = 'unmatched', updated_at = ?, note = ? WHERE series_uid = ?",
                          (now, "no route matched", series_uid))
                self.jobs._event(c, "series.unmatched", {"instances": n, "modality": row["modality"]},
                                 series_uid=series_uid, now=now)
            else:
                for route in routes:
                    for model in route.models:
                        jid = self.jobs.create(c, series_uid=series_uid, series_version=version, model=model,
                                               route=route.name, send_to=list(route.send_to),
                                               max_attempts=self.config.jobs.max_attempts,
                                               config_version=self._config_version, now=now)
                        if jid is not None:
                            job_ids.append(jid)
                c.execute("UPDATE series SET state = 'dispatched', routes = ?, updated_at = ? WHERE series_uid = ?",
                          (json.dumps([r.name for r in routes]), now, series_uid))
                self.jobs._event(c, "series.stable", {"instances": n, "version": version,
                                                      "routes": [r.name for r in routes],
                                                      "calling_ae": row["calling_ae"], "study_uid": row["study_uid"]},
                                 series_uid=series_uid, now=now)
        if routes:
            logger.info("series %s stable (%d instances, version %d): routes %s -> jobs %s", series_uid, n, version,
                        [r.name for r in routes], job_ids)
        else:
            logger.info("series %s stable (%d instances, modality %s): no route matched; kept, not processed",
                        series_uid, n, row["modality"])
        return Dispatch(series_uid, version, [r.name for r in routes], job_ids)
