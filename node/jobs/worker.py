"""Workers: lease a job, run the pipeline, record the outcome. One thread per configured worker.

Each worker keeps its loaded models (MONAI bundles) for reuse. Any failure of a job is recorded with
its reason (failed -> retried after a backoff, or dead) and the worker goes on with the next job.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback

from node.config import NodeConfig
from node.dicom.spool import Spool
from node.errors import PreannotError
from node.inference.registry import Registry
from node.inference.runner import BundleRunner, Runner
from node.jobs.store import Job, JobStore
from node.metrics import NodeMetrics
from node.outputs.equipment import Provenance
from node.pipeline import process_series

__all__ = ["Worker"]

logger = logging.getLogger(__name__)


class Worker(threading.Thread):
    """A job worker thread.

    Args:
        name: thread name (for logs).
        config, store, spool, registry: the node's parts.
        device_uid: the node's device UID (recorded in outputs).
        stop: set to stop after the current job.
    """

    def __init__(self, name: str, *, config: NodeConfig, store: JobStore, spool: Spool, registry: Registry,
                 device_uid: str, stop: threading.Event, poll_seconds: float = 0.5,
                 metrics: NodeMetrics | None = None) -> None:
        super().__init__(name=name, daemon=True)
        self.config = config
        self.store = store
        self.spool = spool
        self.registry = registry
        self.device_uid = device_uid
        self.stop_event = stop
        self.poll_seconds = poll_seconds
        self.metrics = metrics
        self.runners: dict[str, Runner] = {}
        self.current: Job | None = None
        self.stage: str = ""

    def runner_for(self, model_name: str) -> Runner:
        """The loaded runner of a model (loaded on first use, then reused)."""
        if model_name not in self.runners:
            info = self.registry.get(model_name)
            self.runners[model_name] = BundleRunner(info, device=self.config.models.device, amp=self.config.models.amp)
        return self.runners[model_name]

    def preload(self) -> None:
        """Load every model a route names, so the first job does not wait for it (``models.preload``).

        A model that cannot be loaded is only logged here: its jobs fail with the reason when they run.
        """
        for name in dict.fromkeys(m for r in self.config.routes for m in r.models):
            if self.stop_event.is_set():
                return
            try:
                self.runner_for(name)
            except PreannotError as exc:
                logger.warning("model %s not preloaded: %s", name, exc)

    def run(self) -> None:
        if self.config.models.preload:
            self.preload()
        while not self.stop_event.is_set():
            self.store.jobs_waiting.clear()  # cleared before leasing: a job queued meanwhile sets it again
            job = self.store.lease(lease_seconds=self.config.jobs.lease_seconds)
            if job is None:
                self.store.jobs_waiting.wait(self.poll_seconds)
                continue
            self.execute(job)

    def execute(self, job: Job) -> None:
        """Run one leased job to done / failed / dead."""
        self.current = job
        t0 = time.time()
        logger.info("job %d started: model %s on series %s (attempt %d/%d)", job.id, job.model, job.series_uid,
                    job.attempts, job.max_attempts)
        try:
            model = self.registry.get(job.model)
            runner = self.runner_for(job.model)
            files = self.spool.series_files(job.series_uid)
            out_dir = self.config.data_dir / "outputs" / f"job-{job.id:06d}" / f"attempt-{job.attempts}"
            provenance = Provenance(model=model, manufacturer=self.config.outputs.manufacturer,
                                    device_uid=self.device_uid,
                                    device_serial_number=self.config.outputs.device_serial_number,
                                    institution_name=self.config.outputs.institution_name,
                                    uid_root=self.config.outputs.uid_root)
            route = next((r for r in self.config.routes if r.name == job.route), None)
            output = process_series(files, runner=runner, model=model, provenance=provenance,
                                    extra_outputs=route.extra_outputs if route else (),
                                    outputs=self.config.outputs, out_dir=out_dir,
                                    timeout_seconds=self.config.jobs.timeout_seconds, fsync=self.config.node.fsync,
                                    on_stage=self._set_stage, defer_preview=True)
            result = output.to_dict()
            result["model"] = model.identification()
            result["output_dir"] = str(out_dir)
            self.store.complete(job.id, result=result, objects=output.objects, destinations=job.send_to)
            if self.metrics is not None:
                self.metrics.observe_job(job.model, "done", output.timings)
            logger.info("job %d done in %.1f s: %d ROI(s), %d object(s) queued for %s", job.id, time.time() - t0,
                        len(output.rois), len(output.objects), job.send_to or "no destination")
            output.finish()  # the preview, once the results are on their way
        except PreannotError as exc:
            self._fail(job, f"{type(exc).__name__}: {exc}")
        except MemoryError as exc:
            self._fail(job, f"out of memory: {exc}")
        except Exception as exc:
            logger.error("job %d: unexpected error\n%s", job.id, traceback.format_exc())
            self._fail(job, f"unexpected {type(exc).__name__}: {exc}")
        finally:
            self.current = None
            self.stage = ""

    def _set_stage(self, stage: str) -> None:
        self.stage = stage

    def _fail(self, job: Job, reason: str) -> None:
        state = self.store.fail(job.id, reason, backoff_seconds=self.config.jobs.backoff_seconds,
                                backoff_max_seconds=self.config.jobs.backoff_max_seconds)
        if self.metrics is not None:
            self.metrics.observe_job(job.model, state.value)
        logger.warning("job %d %s (attempt %d/%d): %s", job.id, state.value, job.attempts, job.max_attempts, reason)

