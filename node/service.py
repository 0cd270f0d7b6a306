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
from node.errors import ConfigError, PreannotError
from node.inference.registry import Registry
from node.jobs.delivery import Deliverer
from node.jobs.store import JobStore
from node.jobs.worker import Worker
from node.outputs.equipment import new_uid
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
        self.assembler = Assembler(config, self.store)
        self.listener = Listener(
            self.spool, ae_title=config.node.ae_title, bind=config.node.bind, port=config.node.port,
            allowed_callers=config.node.allowed_callers, max_associations=config.node.max_associations,
            max_pdu=config.node.max_pdu, acse_timeout=config.node.acse_timeout,
            dimse_timeout=config.node.dimse_timeout, network_timeout=config.node.network_timeout)
        self.workers = [Worker(f"worker-{n}", config=config, store=self.store, spool=self.spool,
                               registry=self.registry, device_uid=self.device_uid, stop=self.stop_event)
                        for n in range(config.jobs.workers)]
        self.deliverer = Deliverer(config=config, store=self.store, stop=self.stop_event)
        self._assembler_thread = threading.Thread(target=self._assemble_loop, name="assembler", daemon=True)
        self.started_at = 0.0
        self.web: Any = None

    def _assemble_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.assembler.tick()
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
        logger.info("node started: %d worker(s), %d route(s), %d destination(s), models %s",
                    len(self.workers), len(self.config.routes), len(self.config.destinations),
                    sorted(self.registry.models))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let the current jobs finish (up to ``timeout``), and stop."""
        self.listener.stop()
        self.stop_event.set()
        self.deliverer.wake.set()
        deadline = time.time() + timeout
        for t in [self._assembler_thread, *self.workers, self.deliverer]:
            if t.is_alive():
                t.join(max(deadline - time.time(), 0.1))
        self.store.record("node.stopped", {})
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        logger.info("node stopped")
