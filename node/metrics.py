"""Prometheus metrics (names prefixed ``preannot_``), one registry per node.

Counters and histograms are updated by the parts as things happen; gauges that describe state (jobs
by state, queue depth, outbox, spool size, free disk, GPU memory) are read from the database and the
file system at each scrape, so they are always true to the store.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["NodeMetrics"]

_STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        s = self.read()
        c = CounterMetricFamily("preannot_instances_received", "Instances stored and acknowledged", value=s["instances"])
        yield c
        yield CounterMetricFamily("preannot_instances_duplicate", "Re-sent instances acknowledged without rewrite",
                                  value=s["duplicates"])
        yield CounterMetricFamily("preannot_instance_conflicts", "Known SOP Instance UIDs received with other content",
                                  value=s.get("conflicts", 0))
        yield CounterMetricFamily("preannot_received_bytes", "Bytes of instances stored", value=s["bytes"])
        yield CounterMetricFamily("preannot_associations", "Associations accepted", value=s["associations"])
        yield CounterMetricFamily("preannot_associations_refused", "Associations refused or aborted: unknown calling AE, a host not bound to its AE title, or a limit of open associations",
                                  value=s["refused"])
        f = CounterMetricFamily("preannot_instances_failed", "C-STORE answered with a failure status", labels=["reason"])
        for reason, n in s["failures"].items():
            f.add_metric([reason], n)
        yield f
        g = GaugeMetricFamily("preannot_jobs", "Jobs by state", labels=["state"])
        for state, n in s["jobs"].items():
            g.add_metric([state], n)
        yield g
        yield GaugeMetricFamily("preannot_queue_depth", "Jobs waiting to run (queued or failed awaiting retry)",
                                value=s["jobs"].get("queued", 0) + s["jobs"].get("failed", 0))
        o = GaugeMetricFamily("preannot_outbox", "Result objects by delivery state", labels=["state"])
        for state, n in s["outbox"].items():
            o.add_metric([state], n)
        yield o
        se = GaugeMetricFamily("preannot_series", "Series by state", labels=["state"])
        for state, n in s["series"].items():
            se.add_metric([state], n)
        yield se
        yield GaugeMetricFamily("preannot_spool_bytes", "Bytes of spooled instances", value=s["spool_bytes"])
        yield GaugeMetricFamily("preannot_disk_free_bytes", "Free bytes on the data disk", value=s["disk_free"])
        if s.get("gpu") is not None:
            gm = GaugeMetricFamily("preannot_gpu_memory_bytes", "GPU memory", labels=["kind"])
            for kind, n in s["gpu"].items():
                gm.add_metric([kind], n)
            yield gm


class _VerdictCollector(Collector):
    """Agreement and drift, computed from the verdict store at scrape time."""

    def __init__(self, read: Callable[[], tuple[list[dict[str, Any]], list[dict[str, Any]]]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        rows, alerts = self.read()
        acc = GaugeMetricFamily("preannot_verdict_acceptance",
                                "Share of AI findings the radiologists accepted, over the last alert_window judged "
                                "studies (verdicts merged per result)",
                                labels=["model", "version"])
        studies = GaugeMetricFamily("preannot_verdict_studies",
                                    "Judged results by study verdict, over the last alert_window judged studies",
                                    labels=["model", "version", "verdict"])
        added = GaugeMetricFamily("preannot_verdict_added_per_study",
                                  "Findings the radiologists added per study, over the last alert_window judged studies",
                                  labels=["model", "version"])
        for r in rows:
            if r["acceptance"] is not None:
                acc.add_metric([r["model"], r["model_version"]], r["acceptance"])
            if r["added_per_study"] is not None:
                added.add_metric([r["model"], r["model_version"]], r["added_per_study"])
            for verdict, n in r["study_verdicts"].items():
                studies.add_metric([r["model"], r["model_version"], verdict], n)
        yield acc
        yield studies
        yield added
        g = GaugeMetricFamily("preannot_drift_alerts", "Drift alerts holding now", labels=["model", "kind"])
        counts: dict[tuple[str, str], int] = {}
        for a in alerts:
            counts[(a["model"], a["kind"])] = counts.get((a["model"], a["kind"]), 0) + 1
        for (model, kind), n in counts.items():
            g.add_metric([model, kind], n)
        yield g


class NodeMetrics:
    """The node's metrics registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)  # state is read at scrape time, not at registration
        r = self.registry
        self.series_stable = Counter("preannot_series_stable", "Series that became stable", ["outcome"], registry=r)
        self.jobs_finished = Counter("preannot_jobs_finished", "Job attempts finished", ["model", "state"], registry=r)
        self.job_duration = Histogram("preannot_job_duration_seconds", "Whole job duration", ["model"],
                                      buckets=_STAGE_BUCKETS, registry=r)
        self.stage_duration = Histogram("preannot_job_stage_seconds", "Job duration per stage", ["model", "stage"],
                                        buckets=_STAGE_BUCKETS, registry=r)
        self.delivery_attempts = Counter("preannot_delivery_attempts", "Objects sent (attempts)", ["destination"],
                                         registry=r)
        self.delivery_failures = Counter("preannot_delivery_failures", "Failed delivery attempts",
                                         ["destination", "final"], registry=r)
        self.time_to_result = Histogram("preannot_time_to_result_seconds",
                                        "From the series' last instance to its results ready to send", ["priority"],
                                        buckets=(10, 30, 60, 120, 300, 600, 1800, 3600, 14400, 86400), registry=r)
        self.target_breaches = Counter("preannot_target_breaches", "Results later than their priority's target",
                                       ["priority"], registry=r)

    def attach_state(self, read: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_StateCollector(read))

    def attach_verdicts(self, read: Callable[[], tuple[list[dict[str, Any]], list[dict[str, Any]]]]) -> None:
        self.registry.register(_VerdictCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_time_to_result(self, priority: str, seconds: float, *, breached: bool) -> None:
        self.time_to_result.labels(priority).observe(seconds)
        if breached:
            self.target_breaches.labels(priority).inc()

    def observe_job(self, model: str, state: str, timings: dict[str, float] | None = None) -> None:
        self.jobs_finished.labels(model, state).inc()
        if timings:
            if "total" in timings:
                self.job_duration.labels(model).observe(timings["total"])
            for stage, seconds in timings.items():
                if stage != "total":
                    self.stage_duration.labels(model, stage).observe(seconds)


def directory_bytes(root: Path) -> int:
    """Total size of the files under ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def disk_free(root: Path) -> int:
    return shutil.disk_usage(root).free
