"""Inference on a Ray cluster: model actors that keep their models warm, the node as coordinator.

The node keeps everything that must survive (the job table, spool, outbox, audit): its worker threads
lease jobs as with the local backend and run the whole pipeline themselves, except the model call,
which goes to a :class:`ModelHost` actor. The volume reaches the actor through Ray's object store; only
the prediction comes back, in its compact form (``Prediction.compact``: the labels and the confidence of
the labelled voxels, the boxes, the classes).

- **Warm models.** An actor loads a model on first use (the registry's bundle, checked against the
  weights SHA-256 the node knows) and keeps up to ``max_models_per_actor``, evicting the least
  recently used, and earlier when the memory a model needs (``[model] memory_mb`` of its card, or four
  times its weights plus 512 MB) is not free.
- **Placement.** :class:`ActorPool` gives a job to a free actor, preferring one that has the model
  loaded, else the one with most free memory (GPU memory for GPU actors, available RAM for CPU
  actors). A model larger than any actor's total memory fails its job with the reason; one that does
  not fit *now* waits for an actor to free up.
- **Loss.** An actor, its process or its server that goes away mid-job raises
  :class:`~node.errors.ComputeLostError`: the worker puts the job back in the queue without counting
  the attempt, and it runs on another actor (Ray restarts the dead one). Results are written only by the
  node, in one transaction, so a job completes once.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from node.config import NodeConfig
from node.errors import ComputeLostError, ModelError, ModelTimeoutError, PreannotError
from node.imaging.volume import Volume
from node.inference.prediction import ModelInputs, Prediction
from node.inference.registry import ModelInfo

__all__ = ["ActorPool", "ModelHost", "RayRunner", "memory_need", "start_ray"]

logger = logging.getLogger(__name__)

_MB = 2**20


def memory_need(model: ModelInfo) -> int:
    """Bytes the model needs to run: the card's ``memory_mb``, else four times its weights plus 512 MB."""
    if model.card.model.memory_mb > 0:
        return int(model.card.model.memory_mb * _MB)
    return int(4 * model.weights.stat().st_size + 512 * _MB)


def _available_ram() -> tuple[int, int]:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0]) * 1024
    return info.get("MemAvailable", 0), info.get("MemTotal", 0)


class ModelHost:
    """A model actor's state (wrapped by ``ray.remote`` in :class:`ActorPool`)."""

    def __init__(self, models_dir: str, device: str, amp: bool, max_models: int, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.models_dir = Path(models_dir)
        self.device = device
        self.amp = amp
        self.max_models = max_models
        self.runners: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.jobs_run = 0

    def pid(self) -> int:
        return os.getpid()

    def capacity(self) -> dict[str, Any]:
        """Free and total memory where the models run, and the models loaded (most recent last)."""
        import torch

        if self.device != "cpu" and torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            where = f"cuda ({torch.cuda.get_device_name(0)})"
        else:
            free, total = _available_ram()
            where = "cpu"
        return {"device": where, "free_bytes": int(free), "total_bytes": int(total), "loaded": list(self.runners),
                "pid": os.getpid(), "jobs_run": self.jobs_run, "cpu_seconds": round(time.process_time(), 3)}

    def _evict_one(self) -> None:
        import gc

        import torch

        name, _ = self.runners.popitem(last=False)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("actor %d: model %s evicted", os.getpid(), name)

    def _runner(self, name: str, sha256: str, need: int) -> Any:
        from node.inference.kinds import load_runner
        from node.inference.registry import load_model

        key = f"{name}@{sha256[:16]}"
        if key in self.runners:
            self.runners.move_to_end(key)
            return self.runners[key]
        total = self.capacity()["total_bytes"]
        if total < need:
            raise ModelError(f"model {name} needs {need / _MB:.0f} MB; this actor has {total / _MB:.0f} MB")
        model = load_model(self.models_dir / name)
        if model.sha256 != sha256:
            raise ModelError(f"model {name}: the actor's weights (sha256 {model.sha256[:16]}) differ from the node's "
                             f"({sha256[:16]}): deploy the same models folder on every Ray worker")
        while self.runners and (len(self.runners) >= self.max_models or self.capacity()["free_bytes"] < need):
            self._evict_one()
        runner = load_runner(model, device=self.device, amp=self.amp)
        self.runners[key] = runner
        return runner

    def load(self, name: str, sha256: str, need: int) -> list[str]:
        """Load a model ahead of its first job (``[models].preload``)."""
        self._runner(name, sha256, need)
        return list(self.runners)

    def run(self, name: str, sha256: str, need: int, volume: Volume | ModelInputs,
            seconds_left: float | None) -> Prediction:
        """The model's prediction on the volume, compact for the trip back (``Prediction.compact``)."""
        runner = self._runner(name, sha256, need)
        deadline = None if seconds_left is None else time.monotonic() + seconds_left
        self.jobs_run += 1
        return runner.predict(volume, deadline=deadline).compact()


def start_ray(config: NodeConfig) -> bool:
    """Connect to ``[compute].address`` or start a local Ray; True when this process started it."""
    import ray

    if ray.is_initialized():
        return False
    compute = config.compute
    kwargs: dict[str, Any] = {"namespace": compute.namespace, "include_dashboard": False, "log_to_driver": False,
                              "configure_logging": False}
    if compute.address:
        ray.init(address=compute.address, **kwargs)
        logger.info("Ray: connected to the cluster at %s (namespace %s)", compute.address, compute.namespace)
        return False
    import torch

    ray.init(num_cpus=max(os.cpu_count() or 1, int(compute.actors * compute.cpus_per_actor)),
             num_gpus=torch.cuda.device_count(), **kwargs)
    logger.info("Ray: started a local instance (%d CPU, %d GPU)", os.cpu_count() or 1, torch.cuda.device_count())
    return True


def _lost_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "ObjectLostError",
             "NodeDiedError", "LocalRayletDiedError", "RaySystemError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


class ActorPool:
    """The node's model actors: which is free, which holds which model, where a model fits."""

    def __init__(self, config: NodeConfig) -> None:
        import ray

        c = config.compute
        self.config = config
        remote = ray.remote(ModelHost)
        device = "cpu" if c.gpus_per_actor == 0 else config.models.device
        opts: dict[str, Any] = {"num_cpus": c.cpus_per_actor, "num_gpus": c.gpus_per_actor, "max_restarts": -1,
                                "max_task_retries": 0, "namespace": c.namespace, "get_if_exists": True}
        if c.address:  # on a cluster the node does not own: actors outlive a node restart, models stay warm
            opts["lifetime"] = "detached"
        models_dir = str(Path(config.models.dir).resolve())
        self.actors: list[Any] = [remote.options(name=f"preannot-model-{i}", **opts).remote(
            models_dir, device, config.models.amp, c.max_models_per_actor, c.threads_per_actor)
            for i in range(c.actors)]
        self._cond = threading.Condition()
        # a job thread holds a slot from before it leases a job until its job leaves the actor: at most
        # one leased job per actor waits for one, so a STAT job queued later is not stuck behind a routine
        # job leased ahead of it
        self._slots = threading.BoundedSemaphore(len(self.actors))
        self._holds = threading.local()
        self._free = set(range(len(self.actors)))
        self._loaded: dict[int, list[str]] = {i: [] for i in range(len(self.actors))}
        self._total: dict[int, int] = {}  # actor index -> its total memory (it does not change)
        #: actor index -> the job it runs (for the dashboard and the tests)
        self.busy: dict[int, int] = {}

    def claim_slot(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` s) until an actor can take one more job; True when this thread got a slot.
        Call before leasing a job; the slot goes back when the job leaves the actor (:meth:`run`) or with
        :meth:`drop_slot`."""
        if getattr(self._holds, "slot", False):
            return True
        self._holds.slot = self._slots.acquire(timeout=timeout)
        return bool(self._holds.slot)

    def drop_slot(self) -> None:
        """Give back this thread's slot, if it still holds one (no job leased, or the job ended before
        reaching an actor)."""
        if getattr(self._holds, "slot", False):
            self._holds.slot = False
            self._slots.release()

    def capacities(self, which: list[int] | None = None, timeout: float = 30.0) -> list[dict[str, Any] | None]:
        """The capacity of each actor (or of those in ``which``; None for one that does not answer). An
        actor runs one call at a time: ask only free ones when it matters (a busy one answers after its job)."""
        import ray

        silent: tuple[type[BaseException], ...] = (ray.exceptions.GetTimeoutError, *_lost_errors())
        out: list[dict[str, Any] | None] = []
        for i in range(len(self.actors)) if which is None else which:
            try:
                cap = ray.get(self.actors[i].capacity.remote(), timeout=timeout)
                self._total[i] = int(cap["total_bytes"])
                out.append(cap)
            except silent:
                out.append(None)
        return out

    def _choose(self, key: str, need: int) -> int | None:
        """A free actor for the model: one holding it, else the free one with most free memory where it fits."""
        warm = [i for i in self._free if key in self._loaded[i] and self._total.get(i, need) >= need]
        if warm:
            return min(warm)
        free = sorted(self._free)
        caps = dict(zip(free, self.capacities(free, timeout=10.0), strict=True))
        for i, cap in caps.items():
            if cap is not None:
                self._loaded[i] = cap["loaded"]
        fits = [i for i, cap in caps.items() if cap is not None and cap["total_bytes"] >= need]
        if not fits:
            return None
        return max(fits, key=lambda i: caps[i]["free_bytes"])  # type: ignore[index]

    def acquire(self, model: ModelInfo, job_id: int, *, wait: float = 3600.0) -> int:
        """An actor for the model (blocks while every actor is busy, or those free are too small for it).

        Raises:
            ModelError: the model needs more memory than any actor has (permanent for this pool).
        """
        need = memory_need(model)
        key = f"{model.name}@{model.sha256[:16]}"
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                if self._free:
                    i = self._choose(key, need)
                    if i is not None:
                        self._free.discard(i)
                        self.busy[i] = job_id
                        return i
                    if len(self._total) == len(self.actors) and max(self._total.values()) < need:
                        raise ModelError(f"model {model.name} needs {need / _MB:.0f} MB; the largest actor has "
                                         f"{max(self._total.values()) / _MB:.0f} MB ([model] memory_mb of its card, "
                                         "[compute] gpus_per_actor)")
                if not self._cond.wait(timeout=max(0.0, min(5.0, deadline - time.monotonic()))) \
                        and time.monotonic() >= deadline:
                    raise ComputeLostError(f"no actor free for model {model.name} in {wait:.0f} s")

    def release(self, i: int, loaded: list[str] | None = None) -> None:
        with self._cond:
            self.busy.pop(i, None)
            if loaded is not None:
                self._loaded[i] = loaded
            self._free.add(i)
            self._cond.notify_all()

    def run(self, model: ModelInfo, job_volume: Volume | ModelInputs, *, deadline: float | None,
            job_id: int = 0) -> Prediction:
        """Run the model on an actor; its output. Raises ComputeLostError, ModelTimeoutError or ModelError."""
        try:
            return self._run_on(self.acquire(model, job_id), model, job_volume, deadline=deadline)
        finally:
            self.drop_slot()  # the job left the actor: the next one can be leased

    def _run_on(self, i: int, model: ModelInfo, job_volume: Volume | ModelInputs, *,
                deadline: float | None) -> Prediction:
        import ray

        lost = _lost_errors()
        ref = None
        try:
            payload = ray.put(_portable(job_volume))
            left = None if deadline is None else max(1.0, deadline - time.monotonic())
            ref = self.actors[i].run.remote(model.name, model.sha256, memory_need(model), payload, left)
            out: Prediction = ray.get(ref, timeout=None if left is None else left + 60.0)
            key = f"{model.name}@{model.sha256[:16]}"
            self.release(i, loaded=list(dict.fromkeys([*self._loaded[i], key])))
            return out
        except ray.exceptions.GetTimeoutError as exc:
            ray.cancel(ref, force=True)
            self.release(i)
            raise ModelTimeoutError(f"model {model.name}: the actor passed the job timeout") from exc
        except ray.exceptions.RayTaskError as exc:  # the model failed on the actor: its own error, unwrapped
            self.release(i)
            cause = exc.cause
            if isinstance(cause, PreannotError):
                raise cause from None
            raise ModelError(f"model {model.name} failed on actor preannot-model-{i}: "
                             f"{type(cause).__name__}: {str(cause)[:300]}") from None
        except lost as exc:
            self.release(i, loaded=[])
            raise ComputeLostError(f"Ray actor preannot-model-{i} went away while running model {model.name}: "
                                   f"{type(exc).__name__}") from exc
        except BaseException:
            self.release(i)
            raise

    def preload(self, models: list[ModelInfo]) -> None:
        """Load each model on one actor ahead of its first job (spread over the actors)."""
        import ray

        for n, model in enumerate(models):
            i = n % len(self.actors)
            try:
                self._loaded[i] = ray.get(self.actors[i].load.remote(model.name, model.sha256, memory_need(model)))
            except Exception as exc:  # a model that cannot load fails its jobs with the reason when they run
                logger.warning("model %s not preloaded on actor %d: %s", model.name, i, exc)


def _portable(volume: Volume | ModelInputs) -> Volume | ModelInputs:
    """The volume (or a study's inputs) as the model needs it (pixels in memory, geometry), without the source
    headers."""
    if isinstance(volume, ModelInputs):
        return ModelInputs({name: _portable_volume(v) for name, v in volume.volumes.items()}, volume.reference,
                           volume.mode)
    return _portable_volume(volume)


def _portable_volume(volume: Volume) -> Volume:
    return Volume(pixels=np.ascontiguousarray(volume.pixels), affine=volume.affine, sources=[], frames=[],
                  modality=volume.modality, series_uid=volume.series_uid, positions=volume.positions,
                  tilt_deg=volume.tilt_deg, uneven=volume.uneven, geometry_note=volume.geometry_note)


class RayRunner:
    """A model run by the pool: the :class:`~node.inference.prediction.Runner` interface, whatever its kind."""

    def __init__(self, model: ModelInfo, pool: ActorPool, job_id: int = 0) -> None:
        self.model = model
        self.pool = pool
        self.job_id = job_id

    def predict(self, volume: Volume | ModelInputs, *, deadline: float | None = None) -> Prediction:
        """The prediction as the actor sent it (compact: the caller expands it)."""
        return self.pool.run(self.model, volume, deadline=deadline, job_id=self.job_id)
