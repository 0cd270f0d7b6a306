"""The running node: listener, assembler, workers, delivery (and the HTTP API), wired together.

``Node(config).start()`` starts everything in background threads; ``stop()`` stops it. One node per
data folder: a lock file (``<data_dir>/node.lock``) refuses a second one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from node.config import NodeConfig
from node.delivery.deliverer import Deliverer
from node.delivery.notify import Notifier
from node.errors import ConfigError, PreannotError
from node.followup import PriorFinder
from node.inference.bundle import configure_torch
from node.inference.registry import Registry
from node.ingest.scp import Listener
from node.ingest.spool import Spool
from node.metrics import NodeMetrics
from node.net.tls import server_context
from node.outputs.equipment import device_uid
from node.processing.worker import Worker, WorkerContext
from node.retention import execute_purge
from node.schedule.assembler import Assembler
from node.schedule.counts import InstanceCounter
from node.schedule.routing import validate_route
from node.store.db import Database
from node.store.jobs import JobStore
from node.store.series import SeriesStore
from node.verdicts.intake import VerdictIntake
from node.verdicts.store import VerdictStore

if TYPE_CHECKING:
    from node.compute.ray_backend import ActorPool

__all__ = ["Node", "Stores", "open_stores"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Stores:
    """The owners of the node's state, over one database."""

    db: Database
    series: SeriesStore
    jobs: JobStore

    @classmethod
    def over(cls, db: Database) -> Stores:
        return cls(db=db, series=SeriesStore(db), jobs=JobStore(db))


def open_stores(config: NodeConfig) -> Stores:
    """Open an existing node's database (for the CLI's read and act commands); never creates one.

    Raises:
        ConfigError: the data folder holds no node database (the config is not the node's).
    """
    path = config.data_dir / "node.db"
    if not path.is_file():
        raise ConfigError(f"no node database at {path} (configuration: {config.source}); point --config or "
                          "PREANNOT_CONFIG at the running node's configuration file")
    return Stores.over(Database(path))


class Node:
    """All parts of a running node."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        for r in config.routes:
            validate_route(r)
        data = config.data_dir
        # everything the node writes is its own: files 0600, folders 0700, whatever the umask it was
        # started with (set once, here, before any thread; restored by stop())
        self._umask = os.umask(0o077)
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        data.chmod(0o700)
        self._lock_file: IO[str] | None = open(data / "node.lock", "a+")  # noqa: SIM115 - held for the node's life
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ConfigError(f"another node is already running on data folder {data}") from exc
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()
        self.db = Database(data / "node.db")
        self.stores = Stores.over(self.db)
        self.store = self.stores.jobs
        self.series = self.stores.series
        self.spool = Spool(data / "spool", self.series, reserve_bytes=config.node.free_space_reserve_mb * 2**20,
                           fsync=config.node.fsync, late_instances=config.node.late_instances,
                           on_conflict=config.node.on_conflict)
        configure_torch(config.models)
        self.registry = Registry(config.models.dir)
        missing = {m for r in config.routes for m in r.models} - set(self.registry.models)
        for m in sorted(missing):
            logger.error("routes name model %r, which is not available (%s); its jobs will fail",
                         m, self.registry.broken.get(m, f"not in {config.models.dir}"))
        self.device_uid = device_uid(config.outputs, data)
        self.stop_event = threading.Event()
        self.metrics = NodeMetrics()
        self.verdicts = VerdictStore(self.stores.db)
        self.verdict_intake = VerdictIntake(config.verdicts, self.series, self.store, self.verdicts)
        self.counter = InstanceCounter(config)
        self.assembler = Assembler(config, self.series, self.store, verdicts=self.verdict_intake,
                                   counter=self.counter, cards=self._card, started=time.time())
        tls = config.node
        self.listener = Listener(self.spool, config.node, ssl_context=server_context(
            tls.tls_cert, tls.tls_key, ca=tls.tls_ca, require_client_cert=tls.tls_require_client_cert)
            if tls.tls_cert and tls.tls_key else None)
        self.priors = PriorFinder(config, self.db, series_files=self.series.files, job_result=self._job_result,
                                  verdicts=self._finding_outcomes) if config.followup.enabled else None
        worker_ctx = WorkerContext(config=config, jobs=self.store, series=self.series, registry=self.registry,
                                   device_uid=self.device_uid, metrics=self.metrics,
                                   notifier=Notifier(config.notify), priors=self.priors)
        self.worker_ctx = worker_ctx
        #: ``[compute] backend = "ray"``: the model actors (made at start)
        self.pool: ActorPool | None = None
        self._ray_started = False
        self._preload_thread: threading.Thread | None = None
        c = config.compute
        n_workers = c.actors * c.jobs_per_actor if c.backend == "ray" else config.jobs.workers
        self.workers = [Worker(f"worker-{n}", worker_ctx, stop=self.stop_event) for n in range(n_workers)]
        self.deliverer = Deliverer(config=config, store=self.store, stop=self.stop_event, metrics=self.metrics)
        self.metrics.attach_state(self._metric_state)
        self.metrics.attach_verdicts(lambda: self.verdict_summary(window=config.verdicts.alert_window))
        self._assembler_thread = threading.Thread(target=self._assemble_loop, name="assembler", daemon=True)
        self._retention_thread = threading.Thread(target=self._retention_loop, name="retention", daemon=True)
        #: verdict series handed over by the assembler, examined by their own thread
        self._verdict_series: queue.Queue[str] = queue.Queue()
        self._verdict_thread = threading.Thread(target=self._verdict_loop, name="verdicts", daemon=True)
        self._fetch_thread = (threading.Thread(target=self._verdict_fetch_loop, name="verdict-fetch", daemon=True)
                              if config.verdicts.enabled and config.verdicts.fetch_from else None)
        self.started_at = 0.0
        self.web: Any = None
        self._web_thread: threading.Thread | None = None


    def _job_result(self, job_id: int) -> Any:
        """A done job's result (for a follow-up's prior), None when gone."""
        try:
            return self.store.get(job_id).result
        except PreannotError:
            return None

    def _finding_outcomes(self, job_id: int) -> dict[int, tuple[str, float | None]]:
        """The radiologist's latest outcome of each finding of a job (and the final volume of an edited one)."""
        out: dict[int, tuple[str, float | None]] = {}
        for v in self.verdicts.rows(job_id=job_id):
            for fv in self.verdicts.findings(int(v["id"])):
                if fv.get("finding") is not None:
                    out[int(fv["finding"])] = (str(fv["outcome"]), fv.get("final_volume_mm3"))
        return out
    def _card(self, name: str) -> Any:
        model = self.registry.models.get(name)
        return model.card if model is not None else None

    # --- state for the API, metrics and readiness ---------------------------------------------

    @property
    def dicom_port(self) -> int:
        """The DICOM listener's port (the bound one once started)."""
        return self.listener.port

    def status(self) -> dict[str, Any]:
        """Counts of series, jobs and outbox, spool size and disk."""
        free = self.spool.free_bytes()
        st = self.listener.stats
        return {"series": self.series.counts(), "jobs": self.store.counts(), "outbox": self.store.outbox_counts(),
                "spool_bytes": self.series.spool_bytes(), "disk_free_bytes": free,
                "disk_ok": free >= self.spool.reserve_bytes, "instances_received": st.instances,
                "associations": st.associations, "associations_refused": st.associations_refused,
                "failures": dict(st.failures), "uptime_s": round(time.time() - self.started_at, 1)}

    def _metric_state(self) -> dict[str, Any]:
        s = self.status()
        st = self.listener.stats
        gpu = None
        try:
            import torch

            if torch.cuda.is_available():
                gpu = {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
                       "max_allocated": torch.cuda.max_memory_allocated()}
        except ImportError:  # pragma: no cover - torch is a dependency
            gpu = None
        return {"instances": st.instances, "duplicates": st.duplicates, "conflicts": st.conflicts, "bytes": st.bytes,
                "associations": st.associations, "refused": st.associations_refused, "failures": dict(st.failures),
                "jobs": s["jobs"], "outbox": s["outbox"], "series": s["series"], "spool_bytes": s["spool_bytes"],
                "disk_free": s["disk_free_bytes"], "gpu": gpu}

    def readiness(self) -> dict[str, bool]:
        """Checks behind GET /ready."""
        try:  # a real write: a database on a full disk, or locked for good, is not ready
            with self.db.tx() as c:
                c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('ready_probe', ?)", (str(time.time()),))
            writable = True
        except Exception:
            writable = False
        needed = {m for r in self.config.routes for m in r.models}
        return {"dicom_listener": self.listener.listening, "store_writable": writable,
                "models_loaded": needed <= set(self.registry.models),
                "disk_reserve_ok": self.spool.free_bytes() >= self.spool.reserve_bytes,
                "workers_alive": self.stop_event.is_set() or all(w.is_alive() for w in self.workers)}

    def reprocess(self, series_uid: str, *, actor: str | None = None) -> int:
        """Queue a series through its routes again as a new version (NotFoundError when it has no
        spooled instances)."""
        version = self.series.reopen_for_reprocess(series_uid, actor=actor)
        return version

    def record_http_verdict(self, job_id: int, body: dict[str, Any], *, actor: str) -> tuple[int, bool]:
        """A verdict stated over HTTP (see ``POST /api/jobs/{id}/verdict``); returns (id, new)."""
        from node.verdicts.intake import http_verdict

        return http_verdict(self.verdict_intake, self.store.get(job_id), body, actor=actor)

    def verdict_summary(self, *, window: int | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Agreement per model and version (over each one's last ``window`` judged studies, or all), and the drift
        alerts holding now."""
        from node.verdicts.stats import agreement, alerts

        return agreement(self.verdicts, window=window), alerts(self.verdicts, self.store, self.config.verdicts)

    def _verdict_fetch_loop(self) -> None:
        """``[verdicts].fetch_from``: look for verdict objects in the PACS every ``fetch_minutes``."""
        from node.verdicts.fetch import VerdictFetcher

        fetcher = VerdictFetcher(self.config, self.series, self.store)
        while not self.stop_event.wait(self.config.verdicts.fetch_minutes * 60):
            try:
                n = fetcher.run_once()
                if n:
                    logger.info("verdicts: %d series asked for from %s", n, self.config.verdicts.fetch_from)
            except PreannotError as exc:
                logger.warning("verdicts: looking in %s failed: %s", self.config.verdicts.fetch_from, exc)
            except Exception:
                logger.exception("verdict fetch error")

    def _assemble_loop(self) -> None:
        last_error, pause = "", 0.5
        while not self.stop_event.is_set():
            try:
                decided = self.assembler.tick()
                if any(d.jobs for d in decided):
                    self.store.jobs_waiting.set()  # the jobs are committed: wake the workers now
                for d in decided:
                    self.metrics.series_stable.labels("routed" if d.outcome == "dispatched" else d.outcome).inc()
                    if d.outcome == "verdict":
                        self._verdict_series.put(d.series_uid)
                if last_error:
                    logger.warning("assembler: working again after: %s", last_error)
                last_error, pause = "", 0.5
            except Exception as exc:  # a full disk, a locked database: said once, not every half second
                what = f"{type(exc).__name__}: {exc}"
                if what != last_error:
                    if isinstance(exc, PreannotError):
                        logger.error("assembler: %s", exc)
                    else:
                        logger.exception("assembler error")
                last_error, pause = what, min(pause * 2, 10.0)
            self.stop_event.wait(pause)

    def _retention_loop(self) -> None:
        """Remove what is past its retention every ``[retention].interval_minutes`` (its own thread: a purge of
        many files never holds back the assembler's loop)."""
        while not self.stop_event.is_set():
            try:
                execute_purge(self.series, self.store, self.config, actor="retention")
            except PreannotError as exc:
                logger.error("retention: %s", exc)
            except Exception:
                logger.exception("retention error")
            self.stop_event.wait(self.config.retention.interval_minutes * 60)

    def _unexamined_verdict_series(self) -> list[str]:
        """Series in state ``verdict`` with no ``verdict.examined`` event since they were handed over."""
        rows = self.db.query(
            "SELECT s.series_uid FROM series s WHERE s.state = 'verdict' AND NOT EXISTS (SELECT 1 FROM events e "
            "WHERE e.kind = 'verdict.examined' AND e.series_uid = s.series_uid AND e.ts >= s.updated_at)")
        uids = [str(r[0]) for r in rows]
        if uids:
            logger.warning("%d verdict series handed over but not examined before the last stop: examined now",
                           len(uids))
        return uids

    def _verdict_loop(self) -> None:
        """Examine the verdict series the assembler hands over, off its loop: reading and matching the SEGs
        of a large study takes seconds, which would hold back every other series' routing. At a stop, the
        series already handed over are examined before the thread ends."""
        while True:
            try:
                series_uid = self._verdict_series.get(timeout=0.5)
            except queue.Empty:
                if self.stop_event.is_set() and not self._assembler_thread.is_alive():  # nothing more can come
                    return
                continue
            try:
                lines = self.verdict_intake.examine(series_uid)
                for line in lines:
                    logger.info("verdict series %s: %s", series_uid, line)
                # what was examined and how, in the audit trail (objects not judged included, with why); a series
                # handed over without this event (a kill -9 between the two) is examined again at the next start
                self.store.record("verdict.examined", {"objects": lines[:200]}, series_uid=series_uid)
            except PreannotError as exc:
                logger.error("verdict series %s: %s", series_uid, exc)
            except Exception:
                logger.exception("verdict series %s: error", series_uid)

    def start(self) -> None:
        """Recover from an unclean stop, then start every part."""
        self.started_at = time.time()
        self.store.recover()
        self.store.record("node.started", {"ae_title": self.config.node.ae_title, "port": self.config.node.port,
                                           "config_version": self.config.version(),
                                           "models": {n: m.identification() for n, m in self.registry.models.items()}})
        if self.config.compute.backend == "ray":
            self._start_ray()
        self.listener.start()
        self.counter.start(self.stop_event)
        self._assembler_thread.start()
        self._retention_thread.start()
        for uid in self._unexamined_verdict_series():  # handed over before a kill -9, never examined
            self._verdict_series.put(uid)
        self._verdict_thread.start()
        if self._fetch_thread is not None:
            self._fetch_thread.start()
        for w in self.workers:
            w.start()
        self.deliverer.start()
        if self.config.web.enabled:
            self._start_web()
        logger.info("node started: %d worker(s), %d route(s), %d destination(s), models %s",
                    len(self.workers), len(self.config.routes), len(self.config.destinations),
                    sorted(self.registry.models))

    def _start_web(self) -> None:
        import uvicorn

        from node.web.app import create_app

        cfg = self.config.web
        self.web = uvicorn.Server(uvicorn.Config(create_app(self), host=cfg.bind, port=cfg.port, log_level="warning",
                                                 access_log=False, lifespan="off"))
        self._web_thread = threading.Thread(target=self.web.run, name="web", daemon=True)
        self._web_thread.start()
        deadline = time.time() + 10
        while not self.web.started and time.time() < deadline and self._web_thread.is_alive():
            time.sleep(0.05)
        if not self.web.started:
            raise ConfigError(f"the HTTP service could not listen on {cfg.bind}:{cfg.port}")
        logger.info("HTTP service on http://%s:%d (dashboard /, API /docs, metrics /metrics)", cfg.bind, cfg.port)

    def _start_ray(self) -> None:
        """Connect to (or start) Ray and make the model actors; preload the routes' models on them."""
        from node.compute.ray_backend import ActorPool, start_ray

        self._ray_started = start_ray(self.config)
        self.pool = ActorPool(self.config)
        self.worker_ctx.pool = self.pool
        c = self.config.compute
        logger.info("compute: %d Ray actor(s), %.2g GPU and %.2g CPU each, %d model(s) kept per actor, "
                    "%d job thread(s) per actor", c.actors, c.gpus_per_actor, c.cpus_per_actor,
                    c.max_models_per_actor, c.jobs_per_actor)
        if self.config.models.preload:
            models = [self.registry.models[m] for m in dict.fromkeys(x for r in self.config.routes for x in r.models)
                      if m in self.registry.models]
            self._preload_thread = threading.Thread(target=self.pool.preload, args=(models,), name="ray-preload",
                                                    daemon=True)
            self._preload_thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop accepting, let running jobs finish for up to ``timeout`` seconds (default
        ``[jobs].stop_timeout_seconds``), put back in the queue those that did not, and stop.

        Returns:
            True when every thread ended; False when a job was still running (it is requeued, no attempt
            counted; the caller should end the process without waiting for it).
        """
        timeout = self.config.jobs.stop_timeout_seconds if timeout is None else timeout
        self.listener.stop()
        if self.web is not None:
            self.web.should_exit = True
        self.stop_event.set()
        self.deliverer.wake.set()
        self.store.jobs_waiting.set()
        deadline = time.time() + timeout
        for t in [self._assembler_thread, self._verdict_thread, self._retention_thread, self.deliverer, *self.workers]:
            if t.is_alive():
                t.join(max(deadline - time.time(), 0.1))
        self.counter.join(max(deadline - time.time(), 0.1))
        requeued = []
        for w in self.workers:
            job = w.current
            if w.is_alive() and job is not None and self.store.requeue(job.id, reason="node stopping",
                                                                      lease=job.started_at):
                requeued.append(job.id)
                logger.warning("job %d did not finish within %.0f s of the stop: requeued, it runs again at the "
                               "next start (no attempt counted)", job.id, timeout)
        self.store.record("node.stopped", {"requeued_jobs": requeued})
        if self.pool is not None:
            import ray

            if self._preload_thread is not None:
                self._preload_thread.join(60)
            if any(t.is_alive() for t in [*self.workers, *([self._preload_thread] if self._preload_thread else [])]):
                # a job still waits on an actor: its thread holds Ray (shutting it down under it crashes)
                logger.warning("Ray left connected: a job was still running on an actor (requeued)")
            else:
                ray.shutdown()  # a local Ray started by the node ends with it; on a cluster the actors stay warm
            self.pool = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        os.umask(self._umask)
        clean = not any(t.is_alive() for t in [self._assembler_thread, self._verdict_thread, self.deliverer,
                                               *self.workers])
        logger.info("node stopped%s", "" if clean else " (a job was still running: requeued)")
        return clean
