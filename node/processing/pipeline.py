"""Processing of one job: series files -> volume -> findings -> result objects (SEG, SR, ...) -> JobResult.

The pipeline takes its collaborators as arguments (a :class:`~node.inference.prediction.Runner`, the
model's registry entry, the output settings), so it runs the same in the node's worker, in
``preannot run`` (offline) and in tests. It never asks what kind of model ran: the findings come from
:func:`~node.processing.findings.predict_findings` and the objects from the registered outputs
(:data:`node.outputs.builders.OUTPUTS`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from node.config import NodeConfig, OutputsConfig, Route
from node.errors import ModelRefusedError, ModelTimeoutError, OutputError, VolumeError
from node.imaging.volume import Volume, load_series
from node.inference.prediction import Runner
from node.inference.registry import ModelInfo
from node.inference.rois import ROI
from node.outputs.builders import OUTPUTS, OutputRequest
from node.outputs.consistency import ConsistencyError, check_results
from node.outputs.equipment import Provenance, new_uid
from node.outputs.preview import write_preview
from node.outputs.result import ResultObject, save_dataset, write_private
from node.processing.findings import FindingOptions, Findings, predict_findings
from node.store.results import ClassResult, FindingResult, JobResult
from node.verdicts.regions import AIRegions

__all__ = ["JobOutput", "ModelContext", "PipelineOptions", "intensity_profile", "load_inputs", "process_series"]

logger = logging.getLogger(__name__)


@dataclass
class JobOutput:
    """What one run of the pipeline produced."""

    objects: list[ResultObject]
    result: JobResult
    #: the reported findings with their masks (for callers that draw or measure them further)
    rois: list[ROI]
    #: work left for after the results are queued (the preview, when deferred)
    deferred: Callable[[], None] | None = field(default=None, repr=False)
    #: the findings' regions on the source images, compact (:class:`node.verdicts.regions.AIRegions`), kept
    #: with the job to judge the radiologist's verdicts
    regions: bytes | None = field(default=None, repr=False)

    def finish(self) -> None:
        """Run the deferred work (a failure is logged: the preview is a convenience, not a result)."""
        if self.deferred is None:
            return
        work, self.deferred = self.deferred, None
        try:
            work()
        except Exception as exc:
            logger.warning("preview not written: %s: %s", type(exc).__name__, exc)


@dataclass(frozen=True, slots=True)
class ModelContext:
    """What runs on the series and who signs the results: the model, its loaded runner, the provenance."""

    model: ModelInfo
    runner: Runner
    provenance: Provenance


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    """How one run of the pipeline behaves."""

    #: which findings are reported (the route's selection)
    findings: FindingOptions = field(default_factory=FindingOptions)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    #: viewer objects beyond SEG + SR for this route: "gsps", "sc", "kos", "rtstruct"
    extra_outputs: Sequence[str] = ()
    timeout_seconds: float | None = None
    fsync: bool = True
    #: leave the preview PNG to :meth:`JobOutput.finish`, after the results are queued
    defer_preview: bool = False
    #: the follow-up of the job's findings (the node's :class:`node.followup.PriorFinder` bound by the worker):
    #: called with the volume, the findings, the model and a scratch folder; None: no follow-up
    followup: Callable[[Volume, list[ROI], ModelInfo, Path], Any] | None = None

    @classmethod
    def for_route(cls, route: Route | None, config: NodeConfig, *, defer_preview: bool = False) -> PipelineOptions:
        """The options of a job of ``route`` (None: no route, the defaults), the same in the node and in
        ``preannot run``."""
        return cls(findings=FindingOptions.for_route(route), outputs=config.outputs,
                   extra_outputs=tuple(route.extra_outputs) if route else (),
                   timeout_seconds=config.jobs.timeout_seconds, fsync=config.node.fsync, defer_preview=defer_preview)


def intensity_profile(pixels: np.ndarray) -> dict[str, float]:
    """Percentiles of the series' values (HU for CT) over a 1-in-64 voxel sample (every 4th voxel along
    each axis): an input statistic the verdict store watches for drift (a new kernel, contrast phase or
    calibration moves them). Values that are not finite are left out of the sample."""
    sample = np.asarray(pixels[::4, ::4, ::4], dtype=np.float32).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return {}
    p5, p25, p50, p75, p95 = (float(v) for v in np.percentile(sample, [5, 25, 50, 75, 95]))
    return {"p5": round(p5, 1), "p25": round(p25, 1), "p50": round(p50, 1), "p75": round(p75, 1),
            "p95": round(p95, 1), "mean": round(float(sample.mean()), 1)}


def finding_result(r: ROI) -> FindingResult:
    """The stored form of a reported finding."""
    return FindingResult(
        number=r.index, label=r.label, label_name=r.label_name, kind=r.kind, volume_mm3=r.volume_mm3,
        diameter_3d_mm=r.diameter_3d_mm if r.described else None,
        diameter_inplane_mm=r.diameter_inplane_mm if r.described else None, centroid_mm=r.centroid_mm,
        key_slice=r.key_slice, bbox=r.bbox, mean=r.mean, min=r.min, max=r.max, voxels=r.voxels,
        confidence=r.confidence, size_mm=r.size_mm, tracking_uid=r.tracking_uid,
        tracking_id=r.identifier())


def _class_results(findings: Findings) -> tuple[ClassResult, ...]:
    out = []
    for st in findings.statements:
        image = None
        if st.image_index is not None:
            ref = findings.volume.frames[st.image_index]
            image = str(findings.volume.sources[ref.source].SOPInstanceUID)
        out.append(ClassResult(concept=st.concept.meaning, value=st.name, label=st.label,
                               probability=round(float(st.probability), 4),
                               probabilities={name: round(float(p), 4) for _v, name, _c, p in st.probabilities},
                               image_uid=image, meaning=st.value.meaning))
    return tuple(out)


def load_inputs(model: ModelInfo, inputs: Mapping[str, Sequence[Path]], scratch_dir: Path | None = None
                ) -> dict[str, Volume]:
    """The other inputs of a study-level model (its card's ``[[inputs]]`` but the reference), read from their files
    (each input's ``volume`` choice for series holding several volumes).

    Raises:
        ModelRefusedError: a required input has no series, or a series is given for an input the card lacks.
        VolumeError: an input's series cannot be read as a volume.
    """
    card = model.card
    known = {i.name for i in card.inputs}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise ModelRefusedError(f"model {model.name} has no input {', '.join(unknown)} (its inputs: "
                                f"{', '.join(sorted(known))})")
    out: dict[str, Volume] = {}
    ref = card.reference_input.name
    for spec in card.inputs:
        if spec.name == ref:
            continue
        files = list(inputs.get(spec.name) or ())
        if not files:
            if spec.required:
                raise ModelRefusedError(f"no series for input {spec.name} of model {model.name} (its card's match: "
                                        f"{spec.match or 'none'})")
            logger.info("model %s: optional input %s not given; a channel of zeros", model.name, spec.name)
            continue
        try:
            out[spec.name] = load_series(files, scratch_dir=scratch_dir, volume=spec.volume or model.card.model.volume)
        except VolumeError as exc:
            raise VolumeError(f"input {spec.name}: {exc}") from exc
    return out


def _input_summary(name: str, volume: Volume, reference: bool) -> dict[str, Any]:
    ds = volume.sources[0]
    return {"name": name, "series_uid": volume.series_uid, "reference": reference,
            "description": str(ds.get("SeriesDescription", "") or ""), "modality": volume.modality,
            "instances": len(volume.sources), "selected": volume.selected}


def process_series(files: list[Path], ctx: ModelContext, out_dir: Path, *,
                   options: PipelineOptions | None = None, volume: Volume | None = None,
                   on_stage: Callable[[str], None] | None = None,
                   inputs: Mapping[str, Sequence[Path]] | None = None) -> JobOutput:
    """Run the whole processing of one series with one model, writing the results into ``out_dir``.

    ``volume`` skips reading the files (when the caller already holds it); ``on_stage`` is called with
    each stage's name as it starts. A study-level model (``[[inputs]]`` in its card) takes ``files`` as its
    reference input and ``inputs`` (the files of each other input, by name): the SEG is on the reference series,
    the SR cites every input series.

    Returns:
        The result objects (for the outbox), the typed result, the findings.

    Raises:
        VolumeError: the series cannot be read as a volume.
        ModelError / ModelTimeoutError: the model failed or ran past ``timeout_seconds``.
        OutputError: a result object could not be built.
    """
    opts = options or PipelineOptions()
    model, provenance, outputs = ctx.model, ctx.provenance, opts.outputs
    t_start = time.perf_counter()
    timeout_seconds = opts.timeout_seconds
    deadline = time.monotonic() + timeout_seconds if timeout_seconds else None
    timings: dict[str, float] = {}

    def stage(name: str) -> None:
        if on_stage is not None:
            on_stage(name)
        if deadline is not None and time.monotonic() > deadline:
            raise ModelTimeoutError(f"job passed its timeout of {timeout_seconds:.0f} s before stage {name}")

    stage("load")
    study_level = bool(model.card.inputs)
    choice = (model.card.reference_input.volume if study_level else None) or model.card.model.volume
    if volume is None:
        # a large volume goes to a mapped scratch file; of a series holding several volumes, the one the card names
        volume = load_series(files, scratch_dir=out_dir, volume=choice)
    timings.update({"read": volume.timings.get("read_headers", 0.0), "decode": volume.timings.get("decode", 0.0)})
    refused = model.card.refusal(model.name, volume.sources[0])
    if refused is not None:  # what its card says it is for (the node's routes already skip such series)
        raise ModelRefusedError(f"series {volume.series_uid}: {refused}")
    others: dict[str, Volume] = {}
    if study_level:
        others = load_inputs(model, inputs or {}, scratch_dir=out_dir)
    input_list = [_input_summary(model.card.reference_input.name, volume, True)] + [
        _input_summary(name, v, False) for name, v in others.items()] if study_level else []
    evidence = [ds for v in others.values() for ds in v.sources]
    # the SR lists (and the costly measures cover) at most [outputs] sr_max_findings findings
    finding_options = replace(opts.findings, listed_max=outputs.sr_max_findings or None)
    findings = predict_findings(volume, ctx.runner, model, options=finding_options, deadline=deadline, stage=stage,
                                inputs=others)
    del others  # a stacked input's pixels are gone already; its headers stay in ``evidence``
    timings.update(findings.timings)
    for r in findings.rois:  # one identity per finding, in the SR, the SEG, verdicts and follow-ups
        r.tracking_uid = new_uid(provenance.uid_root)
    followup = None
    if opts.followup is not None and not volume.projection and findings.rois is not None:
        stage("followup")  # a finding seen before keeps its identity; what changed goes into the SR
        t = time.perf_counter()
        followup = opts.followup(volume, findings.rois, model, out_dir)
        timings["followup"] = time.perf_counter() - t

    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    request = OutputRequest(volume=volume, rois=findings.rois, listed=findings.listed, labels=findings.labels,
                            statements=findings.statements, not_reported=findings.not_reported, card=model.card,
                            provenance=provenance, outputs=outputs, extra=opts.extra_outputs, evidence=evidence,
                            followup=followup)
    built: list[tuple[str, Dataset]] = []
    for output in OUTPUTS:
        if not output.wanted(request):
            continue
        stage(output.name)
        t = time.perf_counter()
        for stem, ds in output.build(request):
            request.made[stem] = ds
            built.append((stem, ds))
        timings[output.name] = time.perf_counter() - t
    if not built:
        raise OutputError(f"model {model.name}: the model card enables no output")
    stage("check")  # every number against the objects it describes, before anything is written or sent
    t = time.perf_counter()
    problems = check_results(volume, findings.rois, request.made, listed=findings.listed, produced=findings.produced,
                             left_out=findings.left_out, not_reported=findings.not_reported,
                             not_seen={c.tracking_uid for c in followup.not_seen()}
                             if followup is not None and followup.not_matched is None else set())
    timings["check"] = time.perf_counter() - t
    if problems:
        raise ConsistencyError(f"the results of series {volume.series_uid} fail the consistency check, nothing is "
                               "sent: " + "; ".join(problems[:10]) + (f" (and {len(problems) - 10} more)"
                                                                      if len(problems) > 10 else ""))
    objects: list[ResultObject] = []
    files_out: dict[str, str] = {}
    t = time.perf_counter()
    for stem, ds in built:
        p = save_dataset(ds, out_dir / f"{stem}.dcm", fsync=opts.fsync)
        objects.append(ResultObject.of(ds, p))
        files_out[stem] = str(p)
    timings["write"] = time.perf_counter() - t
    deferred = None
    if outputs.preview_png and findings.volume.shape[0] > 0:
        preview_path = out_dir / "preview.png"
        files_out["preview"] = str(preview_path)
        labels, rois = findings.labels, findings.listed

        def preview() -> None:
            t = time.perf_counter()
            kept = labels if labels is not None else np.zeros(volume.shape, dtype=np.uint8)
            write_preview(volume, kept, rois, preview_path, title=f"{model.name} {model.version}")
            timings["preview"] = time.perf_counter() - t

        if opts.defer_preview:  # off the critical path: the caller queues the results first, then calls finish()
            deferred = preview
        else:
            preview()
    timings["total"] = time.perf_counter() - t_start
    sx, sy, sz = volume.spacing
    resampled = None
    if findings.grid is not None:
        resampled = {**findings.grid.describe(), "rois_between_slices": findings.not_reported.get("between_slices", 0)}
    result = JobResult(
        model=model.identification(), series_uid=volume.series_uid,
        study_uid=str(volume.sources[0].get("StudyInstanceUID", "")), shape=volume.shape,
        spacing_mm=(round(sx, 4), round(sy, 4), round(sz, 4)),
        findings=tuple(finding_result(r) for r in findings.rois), classes=_class_results(findings),
        not_reported=dict(findings.not_reported), intensity=intensity_profile(volume.pixels), resampled=resampled,
        timings={k: round(v, 4) for k, v in timings.items()}, files=files_out, output_dir=str(out_dir),
        inputs=tuple(input_list), followup=followup.to_dict() if followup is not None else None)
    write_private(out_dir / "result.json", result.to_json(indent=2))
    logger.info("series %s: %d ROI(s)%s, %s in %.1f s (inference %.1f s)", volume.series_uid, len(findings.rois),
                "".join(f", {c.concept}: {c.value}" for c in result.classes),
                "+".join(k for k in ("seg", "sr") if k in files_out), timings["total"], timings.get("inference", 0.0))
    regions = None
    if findings.volume.shape[0] > 0 and not findings.volume.projection:
        codes = {}
        for r in findings.rois:
            spec = model.card.label(r.label)
            codes[r.label] = spec.type.code if spec is not None else ""
        regions = AIRegions.of_rois(findings.volume, findings.rois, codes).to_bytes()
    return JobOutput(objects=objects, result=result, rois=findings.rois, deferred=deferred, regions=regions)
