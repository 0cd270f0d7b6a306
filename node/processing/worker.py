"""Workers: lease a job, run the pipeline, record the outcome. One thread per configured worker.

Each worker keeps its loaded models (MONAI bundles) for reuse. Any failure of a job is recorded with
its reason (failed -> retried after a backoff, or dead) and the worker goes on with the next job.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread

from node.config import NodeConfig, Route
from node.delivery.notify import Notifier, study_of
from node.errors import ComputeLostError, InputsPendingError, ModelRefusedError, PreannotError
from node.followup import PriorFinder, follow
from node.inference.kinds import load_runner
from node.inference.prediction import Runner
from node.inference.registry import ModelInfo, Registry
from node.metrics import NodeMetrics
from node.outputs.equipment import Provenance
from node.outputs.rejection import Withdrawn, build_rejection_note
from node.outputs.result import ResultObject, attempt_dir, save_dataset
from node.processing.pipeline import ModelContext, PipelineOptions, process_series
from node.schedule.routing import raised_flags
from node.store.jobs import Job, JobStore, OutboxState, Supersession
from node.store.series import SeriesInfo, SeriesState, SeriesStore

if TYPE_CHECKING:
    from node.compute.ray_backend import ActorPool

__all__ = ["Worker", "WorkerContext"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerContext:
    """The node's parts a worker uses (shared by all workers)."""

    config: NodeConfig
    jobs: JobStore
    series: SeriesStore
    registry: Registry
    #: the node's Device UID, recorded in every output
    device_uid: str
    metrics: NodeMetrics | None = None
    #: makes the messages announcing urgent or flagged results ([notify]); None: nobody is told
    notifier: Notifier | None = None
    #: ``[compute] backend = "ray"``: the model actors that run inference instead of this process
    pool: ActorPool | None = None
    #: finds each study's prior result ([followup]); None: no follow-ups
    priors: PriorFinder | None = None


class Worker(threading.Thread):
    """A job worker thread.

    Args:
        name: thread name (for logs).
        ctx: the node's parts.
        stop: set to stop after the current job.
        poll_seconds: how long to wait for work when the queue is empty (workers are also woken).
    """

    def __init__(self, name: str, ctx: WorkerContext, *, stop: threading.Event, poll_seconds: float = 0.5) -> None:
        super().__init__(name=name, daemon=True)
        self.ctx = ctx
        self.config = ctx.config
        self.store = ctx.jobs
        self.registry = ctx.registry
        self.metrics = ctx.metrics
        self.stop_event = stop
        self.poll_seconds = poll_seconds
        self.runners: dict[str, Runner] = {}
        self.current: Job | None = None
        self.stage: str = ""

    def runner_for(self, model_name: str, job_id: int = 0) -> Runner:
        """The loaded runner of a model (loaded on first use, then reused); with the Ray backend, a handle
        that runs the model on the pool's actors."""
        if self.ctx.pool is not None:
            from node.compute.ray_backend import RayRunner

            return RayRunner(self.registry.get(model_name), self.ctx.pool, job_id)
        if model_name not in self.runners:
            info = self.registry.get(model_name)
            self.runners[model_name] = load_runner(info, device=self.config.models.device, amp=self.config.models.amp)
        return self.runners[model_name]

    def preload(self) -> None:
        """Load every model a route names, so the first job does not wait for it (``models.preload``).

        A model that cannot be loaded is only logged here: its jobs fail with the reason when they run.
        With the Ray backend the node loads them on the actors instead (``ActorPool.preload``).
        """
        if self.ctx.pool is not None:
            return
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
        pool = self.ctx.pool
        trouble = 0.0  # seconds to wait after the queue itself failed (a full disk, a locked database)
        while not self.stop_event.is_set():
            if pool is not None and not pool.claim_slot(timeout=self.poll_seconds):
                continue  # every actor has its job: lease none yet (a STAT job queued meanwhile goes next)
            self.store.jobs_waiting.clear()  # cleared before leasing: a job queued meanwhile sets it again
            job = None
            try:
                job = self.store.lease(lease_seconds=self.config.jobs.lease_seconds,
                                       aging_seconds=self.config.jobs.priority_aging_minutes * 60)
                if job is not None:
                    self.execute(job)
                trouble = 0.0
            except Exception as exc:  # the worker outlives anything: the job's lease expires and it runs again
                trouble = min(max(trouble * 2, 1.0), 30.0)
                logger.error("worker %s: %s: %s; going on in %.0f s", self.name, type(exc).__name__, exc, trouble)
                self.stop_event.wait(trouble)
            finally:
                if pool is not None:
                    pool.drop_slot()  # no job, or one that ended before reaching an actor
            if job is None:
                self.store.jobs_waiting.wait(self.poll_seconds)

    def _follow(self, volume: Any, rois: list[Any], model: Any, scratch: Path) -> Any:
        """The job's follow-up (the pipeline's hook): its prior found, aligned and matched."""
        assert self.ctx.priors is not None
        types = {spec.type.code: spec.value for spec in model.card.labels}
        return follow(self.ctx.priors, volume, rois, model.name, self.config.followup, scratch, types)

    def _index_for_followups(self, job: Job, files: list[Path], result: Any) -> None:
        """Index the done job by patient, model and study date, for the patient's later studies (a failure is
        logged: the result is out already)."""
        if self.ctx.priors is None or not files:
            return
        try:
            ds = dcmread(files[0], stop_before_pixels=True)
            order = int((result.followup or {}).get("time_point_order") or 1)
            self.ctx.priors.record(job.id, ds, job.model, job.series_uid, order)
        except Exception as exc:
            logger.warning("job %d: not indexed for follow-ups: %s: %s", job.id, type(exc).__name__, exc)

    def execute(self, job: Job) -> None:
        """Run one leased job to done / failed / dead."""
        self.current = job
        t0 = time.time()
        logger.info("job %d started: model %s on series %s (attempt %d/%d)", job.id, job.model, job.series_uid,
                    job.attempts, job.max_attempts)
        try:
            model = self.registry.get(job.model)
            runner = self.runner_for(job.model, job.id)
            files = self.ctx.series.files(job.series_uid)
            out_dir = attempt_dir(self.config.data_dir, job.id, job.attempts)
            provenance = Provenance.for_node(model, self.config.outputs, device_uid=self.ctx.device_uid)
            route = self._route(job.route)
            options = PipelineOptions.for_route(route, self.config, defer_preview=True)
            if self.ctx.priors is not None and self.config.followup.enabled:
                options = replace(options, followup=self._follow)
            inputs, versions = self._study_inputs(job, model)
            output = process_series(files, ModelContext(model, runner, provenance), out_dir, options=options,
                                    on_stage=self._set_stage, inputs=inputs)
            flags = raised_flags(route, output.result)
            priority = flags.priority(job.priority)
            delivery: dict[str, object] = {"priority": priority, "flags": flags.names}
            received = self.ctx.series.find(job.series_uid)
            if received is not None:  # from the series' last instance to its results ready to go
                took = round(time.time() - received.last_received, 2)
                target = self.config.jobs.targets.get(priority)
                delivery.update(time_to_result_s=took, target_s=target,
                                target_breached=target is not None and took > target)
            result = output.result.with_delivery(**delivery)
            if result.inputs:  # which version of each input series it was made on (a new one supersedes it)
                result = replace(result, inputs=tuple({**i, "version": versions.get(i.get("series_uid", ""),
                                                                                     job.series_version)}
                                                      for i in result.inputs))
            notifications = {}
            if self.ctx.notifier is not None and self.ctx.notifier.wanted(priority, flagged=flags.notify):
                notifications = self.ctx.notifier.messages(job, result, out_dir, study_of(files))
            supersedes = self._supersession(job, files, provenance, out_dir)
            self.store.complete(job.id, result=result, objects=output.objects, destinations=job.send_to,
                                supersedes=supersedes, notifications=notifications, priority=priority,
                                lease=job.started_at, regions=output.regions)
            self._index_for_followups(job, files, result)
            if self.metrics is not None:
                self.metrics.observe_job(job.model, "done", result.timings)
                if result.time_to_result_s is not None:
                    self.metrics.observe_time_to_result(priority, result.time_to_result_s,
                                                        breached=result.target_breached)
            logger.info("job %d done in %.1f s: %d ROI(s)%s, %d object(s) queued for %s%s", job.id, time.time() - t0,
                        result.roi_count, "".join(f", {c.value}" for c in result.classes), len(output.objects),
                        job.send_to or "no destination",
                        f"; flagged {', '.join(flags.names)}" if flags.names else "")
            output.finish()  # the preview, once the results are on their way
        except InputsPendingError as exc:  # the study's other series are not all there yet: later, not counted
            self.store.defer(job.id, reason=str(exc), until=time.time() + exc.retry_in, lease=job.started_at)
            logger.info("job %d waits: %s", job.id, exc)
        except ComputeLostError as exc:  # not the job's fault: again, on another actor, attempt not counted
            logger.warning("job %d: %s; requeued", job.id, exc)
            self.store.requeue(job.id, reason=str(exc), lease=job.started_at)
            self.store.jobs_waiting.set()
        except PreannotError as exc:
            self._fail(job, f"{type(exc).__name__}: {exc}", permanent=exc.permanent)
        except MemoryError as exc:
            self._fail(job, f"out of memory: {exc}")
        except OSError as exc:  # a full disk, a lost mount: retried after the backoff, when space may be back
            self._fail(job, f"cannot write its results: {type(exc).__name__}: {exc}")
        except Exception as exc:
            logger.error("job %d: unexpected error\n%s", job.id, traceback.format_exc())
            self._fail(job, f"unexpected {type(exc).__name__}: {exc}")
        finally:
            self.current = None
            self.stage = ""

    def _study_inputs(self, job: Job, model: ModelInfo) -> tuple[dict[str, Sequence[Path]], dict[str, int]]:
        """A study-level model's other inputs: for each, the files of the study's series its match rule takes
        (the most recently received, when several do), and each series' version.

        Raises:
            InputsPendingError: an input's series is still arriving, or a required one is not there, and the
                wait (``[jobs] inputs_wait_seconds`` from the reference series' last instance) is not over.
            ModelRefusedError: the wait is over: a required input has no series (named), or is still arriving.
        """
        card = model.card
        if not card.inputs:
            return {}, {}
        ref = self.ctx.series.find(job.series_uid)
        if ref is None:
            return {}, {}
        reference = card.reference_input.name
        study = [s for s in self.ctx.series.study_series(ref.study_uid) if s.series_uid != ref.series_uid]
        usable = (SeriesState.DISPATCHED, SeriesState.UNMATCHED, SeriesState.SKIPPED)
        arriving = (SeriesState.RECEIVING, SeriesState.INCOMPLETE)
        inputs: dict[str, Sequence[Path]] = {}
        versions: dict[str, int] = {}
        pending: list[str] = []
        missing: list[str] = []
        for spec in card.inputs:
            if spec.name == reference:
                continue
            candidates = [s for s in study if (role := card.input_of(s.attrs)) is not None and role.name == spec.name]
            ready: list[SeriesInfo] = [s for s in candidates if s.state in usable]
            if any(s.state in arriving for s in candidates):
                pending.append(spec.name)
            elif ready:
                chosen = ready[0]  # most recently received first
                inputs[spec.name] = self.ctx.series.files(chosen.series_uid)
                versions[chosen.series_uid] = chosen.version
                if len(ready) > 1:
                    logger.info("job %d: input %s from series %s, the latest of %d that match", job.id, spec.name,
                                chosen.series_uid, len(ready))
            elif spec.required:
                missing.append(spec.name)
        if not pending and not missing:
            return inputs, versions
        wait = self.config.jobs.inputs_wait_seconds
        waited = time.time() - max([ref.last_received, *(s.last_received for s in study)])
        what = "; ".join(filter(None, [
            f"no series for input {', '.join(missing)}" if missing else "",
            f"input {', '.join(pending)} still arriving" if pending else ""]))
        if waited < wait:
            raise InputsPendingError(f"model {model.name} waits for the study's series: {what} "
                                     f"(up to {wait:.0f} s after the study's last instance)",
                                     retry_in=min(max(wait - waited, 1.0), 5.0))
        rules = "; ".join(f"{i.name}: {i.match or 'none'}" for i in card.inputs if i.name in missing + pending)
        raise ModelRefusedError(f"{what} of model {model.name} after waiting {wait:.0f} s (inputs_wait_seconds); "
                                f"its card's match rules: {rules}")

    def _supersession(self, job: Job, files: list[Path], provenance: Provenance, out_dir: Path) -> Supersession | None:
        """What this job replaces: earlier results of the same series and model, and the rejection note
        withdrawing those that were delivered (a note that cannot be built is logged; the new results
        still go out)."""
        job_ids = tuple(self.store.earlier_jobs(job))
        if not job_ids:
            return None
        earlier = self.store.earlier_results(job)
        delivered = [e for e in earlier if e.state in (OutboxState.SENT, OutboxState.SENDING)]
        rejection = None
        if delivered:
            try:
                note = build_rejection_note(
                    [Withdrawn(e.sop_uid, e.sop_class, e.series_uid, e.path) for e in delivered],
                    dcmread(files[0], stop_before_pixels=True), provenance,
                    series_number=self.config.outputs.rejection_series_number,
                    reason=self.config.outputs.rejection_reason,
                    replaced_by=f"job {job.id}, series version {job.series_version}")
                path = save_dataset(note, out_dir / "rejection-kos.dcm", fsync=self.config.node.fsync)
                rejection = ResultObject.of(note, path)
            except (PreannotError, OSError) as exc:
                logger.warning("job %d: earlier results of series %s not withdrawn: %s", job.id, job.series_uid, exc)
        withdraw_at = frozenset(d.name for d in self.config.destinations if d.withdraw_superseded)
        logger.info("job %d supersedes job(s) %s of series %s%s", job.id, ", ".join(str(i) for i in job_ids),
                    job.series_uid, f"; rejection note {rejection.sop_uid}" if rejection else "")
        return Supersession(job_ids, rejection, withdraw_at)

    def _route(self, name: str) -> Route | None:
        return next((r for r in self.config.routes if r.name == name), None)

    def _set_stage(self, stage: str) -> None:
        self.stage = stage

    def _fail(self, job: Job, reason: str, *, permanent: bool = False) -> None:
        """Record the failed attempt. When that cannot be written either (the disk that failed the job is the
        database's too), it is tried again until it is written or the node stops: the job is never left
        ``running`` by a worker that gave up on it."""
        wait = 1.0
        while True:
            try:
                state = self.store.fail(job.id, reason, backoff_seconds=self.config.jobs.backoff_seconds,
                                        backoff_max_seconds=self.config.jobs.backoff_max_seconds, permanent=permanent,
                                        lease=job.started_at)
                break
            except Exception as exc:
                logger.error("job %d: its failure cannot be recorded (%s: %s); again in %.0f s", job.id,
                             type(exc).__name__, exc, wait)
                if self.stop_event.wait(wait):
                    return  # the job stays running; the next start requeues it (JobStore.recover)
                wait = min(wait * 2, 30.0)
        if self.metrics is not None:
            self.metrics.observe_job(job.model, state.value)
        logger.warning("job %d %s (attempt %d/%d%s): %s", job.id, state.value, job.attempts, job.max_attempts,
                       ", permanent: not retried" if permanent else "", reason)

