"""Processing of one job: series files -> volume -> model -> ROIs -> DICOM SEG + SR (+ preview).

The pipeline takes its collaborators as arguments (a :class:`~node.inference.runner.Runner`, the
model's registry entry, the output settings), so it runs the same in the node's worker, in
``preannot run`` (offline) and in tests.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from node.config import OutputsConfig
from node.errors import ModelTimeoutError, OutputError
from node.imaging.regrid import regularize
from node.imaging.volume import Volume, load_series
from node.inference.registry import ModelInfo
from node.inference.rois import ROI, extract_rois, paint_rois, relocate_rois
from node.inference.runner import Runner
from node.outputs.equipment import Provenance
from node.outputs.preview import write_preview
from node.outputs.result import ResultObject, save_dataset, write_private
from node.outputs.seg import build_seg
from node.outputs.sr import build_sr
from node.outputs.viewer_objects import build_capture, build_gsps, build_kos, build_rtstruct

__all__ = ["JobOutput", "ModelContext", "PipelineOptions", "process_series"]

logger = logging.getLogger(__name__)


@dataclass
class JobOutput:
    """What one run of the pipeline produced."""

    objects: list[ResultObject]
    rois: list[ROI]
    timings: dict[str, float]
    summary: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    #: work left for after the results are queued (the preview, when deferred)
    deferred: Callable[[], None] | None = field(default=None, repr=False)

    def finish(self) -> None:
        """Run the deferred work (a failure is logged: the preview is a convenience, not a result)."""
        if self.deferred is None:
            return
        work, self.deferred = self.deferred, None
        try:
            work()
        except Exception as exc:
            logger.warning("preview not written: %s: %s", type(exc).__name__, exc)

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "timings": {k: round(v, 4) for k, v in self.timings.items()},
                "files": self.files, "rois": [r.to_dict() for r in self.rois]}


@dataclass(frozen=True, slots=True)
class ModelContext:
    """What runs on the series and who signs the results: the model, its loaded runner, the provenance."""

    model: ModelInfo
    runner: Runner
    provenance: Provenance


def select_findings(rois: list[ROI], min_confidence: float | None, max_findings: int | None
                    ) -> tuple[list[ROI], dict[str, int]]:
    """The findings a route reports: those at or above ``min_confidence`` (findings without a confidence
    are kept), then at most ``max_findings`` per label (most confident first, else largest). Anatomy is
    never dropped. Returns the kept ROIs, renumbered, and the count left out per reason."""
    dropped = {"below_min_confidence": 0, "over_max_findings": 0}
    kept: list[ROI] = []
    per_label: dict[int, int] = {}
    ranked = sorted(rois, key=lambda r: (r.kind == "anatomy", -(r.confidence if r.confidence is not None else 1.0),
                                         -r.volume_mm3))
    for r in ranked:
        if r.kind != "anatomy":
            if min_confidence is not None and r.confidence is not None and r.confidence < min_confidence:
                dropped["below_min_confidence"] += 1
                continue
            if max_findings is not None and per_label.get(r.label, 0) >= max_findings:
                dropped["over_max_findings"] += 1
                continue
            per_label[r.label] = per_label.get(r.label, 0) + 1
        kept.append(r)
    order = {id(r): n for n, r in enumerate(rois)}
    kept.sort(key=lambda r: order[id(r)])  # back in the model's own order (findings by size or score)
    for n, r in enumerate(kept, start=1):
        r.index = n
    return kept, {k: v for k, v in dropped.items() if v}


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    """How one run of the pipeline behaves."""

    #: findings below this confidence are not reported (route ``min_confidence``)
    min_confidence: float | None = None
    #: at most this many findings per label (route ``max_findings``), the most confident or largest first
    max_findings: int | None = None

    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    #: viewer objects beyond SEG + SR for this route: "gsps", "sc", "kos", "rtstruct"
    extra_outputs: Sequence[str] = ()
    timeout_seconds: float | None = None
    fsync: bool = True
    #: leave the preview PNG to :meth:`JobOutput.finish`, after the results are queued
    defer_preview: bool = False


def intensity_profile(pixels: np.ndarray) -> dict[str, float]:
    """Percentiles of the series' values (HU for CT) over a 1-in-64 voxel sample (every 4th voxel along
    each axis): an input statistic the verdict store watches for drift (a new kernel, contrast phase or
    calibration moves them)."""
    sample = np.asarray(pixels[::4, ::4, ::4], dtype=np.float32).ravel()
    if sample.size == 0:
        return {}
    p5, p25, p50, p75, p95 = (float(v) for v in np.percentile(sample, [5, 25, 50, 75, 95]))
    return {"p5": round(p5, 1), "p25": round(p25, 1), "p50": round(p50, 1), "p75": round(p75, 1),
            "p95": round(p95, 1), "mean": round(float(sample.mean()), 1)}


def process_series(files: list[Path], ctx: ModelContext, out_dir: Path, *,
                   options: PipelineOptions | None = None, volume: Volume | None = None,
                   on_stage: Callable[[str], None] | None = None) -> JobOutput:
    """Run the whole processing of one series with one model, writing the results into ``out_dir``.

    ``volume`` skips reading the files (when the caller already holds it); ``on_stage`` is called with
    each stage's name as it starts.

    Returns:
        The result objects (for the outbox), ROIs, per-stage timings and a summary.

    Raises:
        VolumeError: the series cannot be read as a volume.
        ModelError / ModelTimeoutError: the model failed or ran past ``timeout_seconds``.
        OutputError: a result object could not be built.
    """
    opts = options or PipelineOptions()
    model, runner, provenance, outputs = ctx.model, ctx.runner, ctx.provenance, opts.outputs
    timeout_seconds, fsync, extra_outputs = opts.timeout_seconds, opts.fsync, opts.extra_outputs
    t_start = time.perf_counter()
    deadline = time.monotonic() + timeout_seconds if timeout_seconds else None
    timings: dict[str, float] = {}

    def stage(name: str) -> None:
        if on_stage is not None:
            on_stage(name)
        if deadline is not None and time.monotonic() > deadline:
            raise ModelTimeoutError(f"job passed its timeout of {timeout_seconds:.0f} s before stage {name}")

    stage("load")
    if volume is None:
        volume = load_series(files, scratch_dir=out_dir)  # a large volume goes to a mapped scratch file
    timings.update({"read": volume.timings.get("read_headers", 0.0), "decode": volume.timings.get("decode", 0.0)})
    grid = None
    if volume.irregular:  # tilted or unevenly spaced: the model sees an orthogonal resampling
        stage("resample")
        t = time.perf_counter()
        grid = regularize(volume)
        timings["resample"] = time.perf_counter() - t
        logger.info("series %s: %s; resampled to an orthogonal grid %s for the model", volume.series_uid,
                    volume.geometry_note, grid.volume.shape if grid else "?")
    model_volume = grid.volume if grid is not None else volume
    stage("inference")
    t = time.perf_counter()
    detect = getattr(runner, "detect", None)
    with_confidence = getattr(runner, "predict_with_confidence", None)
    confidence = None
    if detect is not None:  # a detection model: boxes as ROIs, no label map from the model
        rois = detect(model_volume, deadline=deadline)
        labels = np.zeros(model_volume.shape, dtype=np.uint8)  # painted with the boxes below
    elif with_confidence is not None:
        labels, confidence = with_confidence(model_volume, deadline=deadline)
    else:
        labels = runner.predict(model_volume, deadline=deadline)
    timings["inference"] = time.perf_counter() - t

    stage("rois")
    t = time.perf_counter()
    if detect is None:
        rois = extract_rois(labels, model_volume, model.card, confidence=confidence)  # on the model's grid, in mm
    del confidence
    rois, dropped = select_findings(rois, opts.min_confidence, opts.max_findings)
    lost: list[ROI] = []
    if grid is None:
        # the runner's label map is ours: cleared and repainted with the kept ROIs (no second copy)
        kept = paint_rois(rois, out=labels)
    else:
        del labels
        rois, lost = relocate_rois(rois, grid)  # placed on the original slices for SEG, SR and viewers
        for r in lost:
            logger.warning("series %s: ROI %d (%.0f mm3) falls between the original slices; not reported",
                           volume.series_uid, r.index, r.volume_mm3)
        kept = paint_rois(rois, shape=volume.shape)
    timings["rois"] = time.perf_counter() - t

    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    objects: list[ResultObject] = []
    files_out: dict[str, str] = {}
    seg = None
    seg_wanted = model.card.outputs.box_masks if detect is not None else model.card.outputs.seg
    if rois and seg_wanted:
        stage("seg")
        t = time.perf_counter()
        seg = build_seg(volume, kept, model.card, provenance, series_number=outputs.seg_series_number,
                        label_values=sorted({r.label for r in rois}))
        p = save_dataset(seg, out_dir / "seg.dcm", fsync=fsync)
        objects.append(ResultObject.of(seg, p))
        files_out["seg"] = str(p)
        timings["seg"] = time.perf_counter() - t
    if model.card.outputs.sr:
        stage("sr")
        t = time.perf_counter()
        sr = build_sr(volume, rois, model.card, provenance, seg=seg, series_number=outputs.sr_series_number,
                      not_reported=dropped)
        p = save_dataset(sr, out_dir / "sr.dcm", fsync=fsync)
        objects.append(ResultObject.of(sr, p))
        files_out["sr"] = str(p)
        timings["sr"] = time.perf_counter() - t
    if rois and extra_outputs:
        stage("extra")
        t = time.perf_counter()
        extra: list[tuple[str, Dataset]] = []
        if "gsps" in extra_outputs:
            extra.append(("gsps", build_gsps(volume, rois, provenance, series_number=outputs.gsps_series_number)))
        if "sc" in extra_outputs:
            caps = build_capture(volume, kept, rois, provenance, series_number=outputs.sc_series_number)
            extra.extend((f"sc{n + 1:02d}", c) for n, c in enumerate(caps))
        if "kos" in extra_outputs:
            extra.append(("kos", build_kos(volume, rois, provenance, series_number=outputs.kos_series_number,
                                           also=[seg] if seg is not None else [])))
        if "rtstruct" in extra_outputs:
            extra.append(("rtstruct", build_rtstruct(volume, rois, model.card, provenance,
                                                     series_number=outputs.rtstruct_series_number)))
        for name, ds in extra:
            p = save_dataset(ds, out_dir / f"{name}.dcm", fsync=fsync)
            objects.append(ResultObject.of(ds, p))
            files_out[name] = str(p)
        timings["extra_outputs"] = time.perf_counter() - t
    if not objects:
        raise OutputError(f"model {model.name}: the model card enables no output")
    deferred = None
    if outputs.preview_png:
        preview_path = out_dir / "preview.png"
        files_out["preview"] = str(preview_path)

        def preview() -> None:
            t = time.perf_counter()
            write_preview(volume, kept, rois, preview_path, title=f"{model.name} {model.version}")
            timings["preview"] = time.perf_counter() - t

        if opts.defer_preview:  # off the critical path: the caller queues the results first, then calls finish()
            deferred = preview
        else:
            preview()
    timings["total"] = time.perf_counter() - t_start
    summary = {
        "series_uid": volume.series_uid, "study_uid": str(volume.sources[0].get("StudyInstanceUID", "")),
        "slices": volume.shape[0], "shape": list(volume.shape), "not_reported": dropped,
        "spacing_mm": [round(s, 4) for s in volume.spacing], "roi_count": len(rois),
        "intensity": intensity_profile(volume.pixels),
        "rois": [{"index": r.index, "label": r.label_name, "kind": r.kind, "confidence": r.confidence,
                  "volume_mm3": r.volume_mm3,
                  "diameter_mm": r.diameter_inplane_mm, "centroid_mm": list(r.centroid_mm)} for r in rois],
        "model": model.identification(),
    }
    if grid is not None:
        summary["resampled"] = {**grid.describe(), "rois_between_slices": len(lost)}
    result = JobOutput(objects=objects, rois=rois, timings=timings, summary=summary, files=files_out,
                       deferred=deferred)
    write_private(out_dir / "result.json", json.dumps(result.to_dict(), indent=2))
    logger.info("series %s: %d ROI(s), %s in %.1f s (inference %.1f s)", volume.series_uid, len(rois),
                "+".join(k for k in ("seg", "sr") if k in files_out), timings["total"], timings["inference"])
    return result
