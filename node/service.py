"""The running node: listener, assembler, workers, delivery (and the HTTP API), wired together.

``Node(config).start()`` starts everything in background threads; ``stop()`` stops it. One node per
data folder: a lock file (``<data_dir>/node.lock``) refuses a second one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import IO, Any

from node.config import NodeConfig
from node.db import Database
from node.dicom.assembler import Assembler
from node.dicom.scp import Listener
from node.dicom.spool import Spool
from node.dicom.tls import server_context
from node.errors import ConfigError, PreannotError
from node.inference.registry import Registry
from node.jobs.delivery import Deliverer
from node.jobs.store import JobStore
from node.jobs.worker import Worker
from node.metrics import NodeMetrics
from node.outputs.equipment import new_uid
from node.retention import execute_purge
from node.routing import validate_route

__all__ = ["Node", "open_store"]

logger = logging.getLogger(__name__)


def open_store(config: NodeConfig) -> JobStore:
    """Open the node database of a data folder (for the CLI's read/act commands)."""
    return JobStore(Database(config.data_dir / "node.db"))


def _device_uid(data_dir: Path, root: str | None) -> str:
    """The node's persistent device UID (made once, kept in the data folder)."""
    p = data_dir / "device_uid"
    if p.exists():
        return p.read_text().strip()
    uid = new_uid(root)
    p.write_text(uid + "\n")
    return uid


class Node:
    """All parts of a running node."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        for r in config.routes:
            validate_route(r)
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        self.store = JobStore(self.db)
        self.spool = Spool(data / "spool", self.db, reserve_bytes=config.node.free_space_reserve_mb * 2**20,
                           fsync=config.node.fsync, late_instances=config.node.late_instances)
        self.registry = Registry(config.models.dir)
        missing = {m for r in config.routes for m in r.models} - set(self.registry.models)
        for m in sorted(missing):
            logger.error("routes name model %r, which is not available (%s); its jobs will fail",
                         m, self.registry.broken.get(m, f"not in {config.models.dir}"))
        self.device_uid = _device_uid(data, config.outputs.uid_root)
        self.stop_event = threading.Event()
        self.metrics = NodeMetrics()
        self.assembler = Assembler(config, self.store)
        self.listener = Listener(
            self.spool, ae_title=config.node.ae_title, bind=config.node.bind, port=config.node.port,
            allowed_callers=config.node.allowed_callers, max_associations=config.node.max_associations,
            max_pdu=config.node.max_pdu, acse_timeout=config.node.acse_timeout,
            dimse_timeout=config.node.dimse_timeout, network_timeout=config.node.network_timeout,
            ssl_context=server_context(config.node.tls_cert, config.node.tls_key, ca=config.node.tls_ca,
                                       require_client_cert=config.node.tls_require_client_cert)
            if config.node.tls_cert and config.node.tls_key else None,
            caller_hosts=config.node.caller_hosts, max_per_caller=config.node.max_associations_per_caller)
        self.workers = [Worker(f"worker-{n}", config=config, store=self.store, spool=self.spool,
                               registry=self.registry, device_uid=self.device_uid, stop=self.stop_event,
                               metrics=self.metrics)
                        for n in range(config.jobs.workers)]
        self.deliverer = Deliverer(config=config, store=self.store, stop=self.stop_event, metrics=self.metrics)
        self.metrics.attach_state(self._metric_state)
        self._assembler_thread = threading.Thread(target=self._assemble_loop, name="assembler", daemon=True)
        self.started_at = 0.0
        self._next_purge = 0.0
        self.web: Any = None
        self._web_thread: threading.Thread | None = None

    # --- state for the API, metrics and readiness ---------------------------------------------

    def status(self) -> dict[str, Any]:
        """Counts of series, jobs and outbox, spool size and disk."""
        series = {r["state"]: int(r["n"]) for r in self.db.query("SELECT state, COUNT(*) AS n FROM series GROUP BY state")}
        spool = self.db.one("SELECT COALESCE(SUM(i.size), 0) AS b FROM instances i JOIN series s "
                            "ON i.series_uid = s.series_uid WHERE s.state != 'purged'")
        free = self.spool.free_bytes()
        st = self.listener.stats
        return {"series": series, "jobs": self.store.counts(), "outbox": self.store.outbox_counts(),
                "spool_bytes": int(spool["b"]) if spool else 0, "disk_free_bytes": free,
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
        return {"instances": st.instances, "duplicates": st.duplicates, "bytes": st.bytes,
                "associations": st.associations, "refused": st.associations_refused, "failures": dict(st.failures),
                "jobs": s["jobs"], "outbox": s["outbox"], "series": s["series"], "spool_bytes": s["spool_bytes"],
                "disk_free": s["disk_free_bytes"], "gpu": gpu}

    def readiness(self) -> dict[str, bool]:
        """Checks behind GET /ready."""
        try:
            with self.db.tx() as c:
                c.execute("SELECT 1")
            writable = True
        except Exception:
            writable = False
        needed = {m for r in self.config.routes for m in r.models}
        return {"dicom_listener": self.listener._server is not None, "store_writable": writable,
                "models_loaded": needed <= set(self.registry.models),
                "disk_reserve_ok": self.spool.free_bytes() >= self.spool.reserve_bytes}

    def reprocess(self, series_uid: str, *, actor: str | None = None) -> int | None:
        """Queue a series through its routes again as a new version. None if it has no spooled instances."""
        from node.audit import append_event

        now = time.time()
        with self.db.tx() as c:
            row = c.execute("SELECT version, state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if row is None or row["state"] == "purged":
                return None
            version = int(row["version"]) + 1
            # back to 'receiving' with its old last_received: the assembler dispatches it at its next tick
            c.execute("UPDATE series SET state = 'receiving', version = ?, updated_at = ? WHERE series_uid = ?",
                      (version, now, series_uid))
            append_event(c, "series.reprocess", {"version": version}, series_uid=series_uid, actor=actor, now=now)
        return version

    def _assemble_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                dispatched = self.assembler.tick()
                if any(d.routes for d in dispatched):
                    self.store.jobs_waiting.set()  # the jobs are committed: wake the workers now
                for d in dispatched:
                    self.metrics.series_stable.labels("routed" if d.routes else "unmatched").inc()
                if time.time() >= self._next_purge:
                    self._next_purge = time.time() + self.config.retention.interval_minutes * 60
                    execute_purge(self.db, self.config, actor="retention")
            except PreannotError as exc:
                logger.error("assembler: %s", exc)
            except Exception:
                logger.exception("assembler error")
            self.stop_event.wait(0.5)

    def start(self) -> None:
        """Recover from an unclean stop, then start every part."""
        self.started_at = time.time()
        self.store.recover()
        self.store.record("node.started", {"ae_title": self.config.node.ae_title, "port": self.config.node.port,
                                           "config_version": self.config.version(),
                                           "models": {n: m.identification() for n, m in self.registry.models.items()}})
        self.listener.start()
        self._assembler_thread.start()
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

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let the current jobs finish (up to ``timeout``), and stop."""
        self.listener.stop()
        if self.web is not None:
            self.web.should_exit = True
        self.stop_event.set()
        self.deliverer.wake.set()
        self.store.jobs_waiting.set()
        deadline = time.time() + timeout
        for t in [self._assembler_thread, *self.workers, self.deliverer]:
            if t.is_alive():
                t.join(max(deadline - time.time(), 0.1))
        self.store.record("node.stopped", {})
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        logger.info("node stopped")
