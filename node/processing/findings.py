"""From a volume to findings: the model's prediction, placed on the series, selected as a route says.

:func:`predict_findings` is the one path from a series to its findings, used by the node's worker,
``preannot run`` and ``preannot evaluate`` alike, whatever the model's kind:

1. a tilted or unevenly spaced series is resampled to an orthogonal grid for the model
   (``node.imaging.regrid``);
2. the runner's :class:`~node.inference.prediction.Prediction` gives candidate regions (measured) and
   study-level statements (classes);
3. regions found on a resampled grid are placed back on the original slices and measured there (what
   cannot be placed, being thinner than the slice spacing, is counted in ``not_reported``);
4. the route's selection (minimum confidence, cap per label) keeps the reported findings, counting what
   it leaves out by reason; the findings are numbered from 1 in the model's own order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from node.config import Route
from node.errors import ModelTimeoutError, VolumeError
from node.imaging.onto import resample_onto, same_frame
from node.imaging.regrid import Regridded, regularize
from node.imaging.volume import Volume
from node.inference.prediction import ClassStatement, ModelInputs, Runner
from node.inference.registry import ModelInfo
from node.inference.rois import NOT_REPORTED, ROI, describe, on_source, paint_rois

__all__ = ["NOT_REPORTED", "FindingOptions", "Findings", "listed_findings", "model_inputs", "predict_findings",
           "select_findings"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FindingOptions:
    """Which findings are reported (a route's settings; the same in the node, ``run`` and ``evaluate``)."""

    #: findings below this confidence are not reported (route ``min_confidence``)
    min_confidence: float | None = None
    #: at most this many findings per label (route ``max_findings``), the most confident or largest first
    max_findings: int | None = None
    #: the costly measures (diameters, long axis, outline) for the anatomy and at most this many findings, the
    #: first in the report's order: those the SR lists (``[outputs] sr_max_findings``); None: every finding
    listed_max: int | None = None

    @classmethod
    def for_route(cls, route: Route | None) -> FindingOptions:
        if route is None:
            return cls()
        return cls(min_confidence=route.min_confidence, max_findings=route.max_findings)


@dataclass
class Findings:
    """What the model found in one series, on the series' own slices."""

    volume: Volume
    #: the reported findings, numbered from 1
    rois: list[ROI]
    #: those measured in full and listed in the SR and viewer objects (:func:`listed_findings`); the others are in
    #: the SEG and the job's result only
    listed: list[ROI]
    #: every candidate region on the series' slices, before the route's selection (``evaluate`` sweeps its
    #: operating points over them); the reported ROIs are among them
    candidates: list[ROI]
    #: study-level statements (a classifier's class with its probabilities)
    statements: list[ClassStatement]
    #: findings the model produced that are not reported, by reason (``rois.NOT_REPORTED``)
    not_reported: dict[str, int]
    #: the reported regions painted on the series grid (for the SEG); None when there are no regions
    labels: np.ndarray | None
    #: the orthogonal resampling the model saw (tilted or uneven series), else None
    grid: Regridded | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: what the model produced, by label value (voxels of a label map, boxes)
    produced: dict[int, int] = field(default_factory=dict)
    #: label value -> reason -> regions left out (every produced value is reported or accounted here)
    left_out: dict[int, dict[str, int]] = field(default_factory=dict)


def _count(left_out: dict[int, dict[str, int]], label: int, reason: str, n: int = 1) -> None:
    if n:
        per = left_out.setdefault(label, {})
        per[reason] = per.get(reason, 0) + n


def select_findings(rois: list[ROI], min_confidence: float | None, max_findings: int | None, *,
                    left_out: dict[int, dict[str, int]] | None = None) -> tuple[list[ROI], dict[str, int]]:
    """The findings a route reports: those at or above ``min_confidence`` (findings without a confidence
    are kept), then at most ``max_findings`` per label (most confident first, else largest). Anatomy is
    never dropped. Returns the kept ROIs, renumbered, and the count left out per reason (also counted per
    label in ``left_out`` when given)."""
    dropped = {"below_min_confidence": 0, "over_max_findings": 0}
    book: dict[int, dict[str, int]] = left_out if left_out is not None else {}
    kept: list[ROI] = []
    per_label: dict[int, int] = {}
    ranked = sorted(rois, key=lambda r: (r.kind == "anatomy", -(r.confidence if r.confidence is not None else 1.0),
                                         -r.volume_mm3))
    for r in ranked:
        if r.kind != "anatomy":
            if min_confidence is not None and r.confidence is not None and r.confidence < min_confidence:
                dropped["below_min_confidence"] += 1
                _count(book, r.label, "below_min_confidence")
                continue
            if max_findings is not None and per_label.get(r.label, 0) >= max_findings:
                dropped["over_max_findings"] += 1
                _count(book, r.label, "over_max_findings")
                continue
            per_label[r.label] = per_label.get(r.label, 0) + 1
        kept.append(r)
    order = {id(r): n for n, r in enumerate(rois)}
    kept.sort(key=lambda r: order[id(r)])  # back in the model's own order (findings by size or score)
    for n, r in enumerate(kept, start=1):
        r.index = n
    return kept, {k: v for k, v in dropped.items() if v}


def listed_findings(rois: list[ROI], limit: int | None) -> list[ROI]:
    """The findings the SR lists: every organ (anatomy) and the first ``limit`` others in the report's order
    (findings are numbered largest, or most confident, first); all of them when ``limit`` is None."""
    if limit is None:
        return list(rois)
    out, n = [], 0
    for r in rois:
        if r.kind == "anatomy":
            out.append(r)
        elif n < limit:
            out.append(r)
            n += 1
    return out


#: the pixels of an input whose values went into a stacked image (its headers stay, for the SR's evidence)
_RELEASED = np.zeros((0, 0, 0), dtype=np.float32)


def model_inputs(grid: Volume, model: ModelInfo, inputs: Mapping[str, Volume]) -> ModelInputs:
    """A study-level model's inputs as its bundle takes them (``model.inputs``): each volume under its own key
    (``keys``: the bundle resamples), or stacked as channels on ``grid``, the grid the model sees of the
    reference input (``channels``). Stacking consumes the other inputs' pixels (each is released once it is on
    the grid, so the peak is the stack and one input; their headers stay, the SR cites them). An optional input
    that is missing is a channel of zeros.

    Raises:
        VolumeError: an input is in another frame of reference than the reference input, or misses the grid.
    """
    card = model.card
    ref = card.reference_input.name
    names = list(model.inputs.names)
    if model.inputs.mode == "keys":
        volumes = {}
        for name in names:
            if name == ref:
                volumes[name] = grid
            elif name in inputs:
                v = inputs[name]
                regular = regularize(v) if v.irregular else None  # the bundle's own resampling assumes a regular grid
                volumes[name] = regular.volume if regular is not None else v
        return ModelInputs(volumes, ref, "keys")
    for name in names:
        if name != ref and name in inputs:
            why = same_frame(inputs[name], grid, name=name, reference_name=ref)
            if why is not None:
                raise VolumeError(why)
    k_n, rows, cols = grid.shape
    stacked = np.zeros((len(names), cols, rows, k_n), dtype=np.float32)  # MONAI's [c, i, j, k]
    volumes = {}
    for c, name in enumerate(names):
        slot = stacked[c].transpose(2, 1, 0)  # a [k, j, i] view of channel c
        if name == ref:
            slot[...] = grid.pixels
            volumes[name] = grid
        elif name in inputs:
            v = inputs[name]
            resample_onto(v, grid, out=slot)
            v.release_memory()
            v.pixels, v.mapping = _RELEASED, None  # the stack holds its values now
            volumes[name] = v
    return ModelInputs(volumes, ref, "channels", channels=stacked)


def predict_findings(volume: Volume, runner: Runner, model: ModelInfo, *, options: FindingOptions | None = None,
                     deadline: float | None = None, stage: Callable[[str], None] | None = None,
                     inputs: Mapping[str, Volume] | None = None) -> Findings:
    """Run the model on the series and return its findings on the series' own slices (see the module
    docstring). ``stage`` is called with each stage's name as it starts (and may raise, e.g. on timeout).

    A study-level model (``[[inputs]]`` in its card) takes ``volume`` as its reference input and ``inputs`` (the
    other inputs by name; see :func:`model_inputs`): the findings are on the reference series.

    Raises:
        VolumeError: the series cannot be resampled for the model, or an input cannot be placed on its grid.
        ModelError / ModelTimeoutError: the model failed or passed ``deadline``.
    """
    opts = options or FindingOptions()
    timings: dict[str, float] = {}

    def begin(name: str) -> float:
        if stage is not None:
            stage(name)
        if deadline is not None and time.monotonic() > deadline:
            raise ModelTimeoutError(f"the job passed its timeout before stage {name}")
        return time.perf_counter()

    grid = None
    if volume.irregular:  # tilted or unevenly spaced: the model sees an orthogonal resampling
        t = begin("resample")
        grid = regularize(volume)
        timings["resample"] = time.perf_counter() - t
        logger.info("series %s: %s; resampled to an orthogonal grid %s for the model", volume.series_uid,
                    volume.geometry_note, grid.volume.shape if grid else "?")
    model_volume = grid.volume if grid is not None else volume
    given: Volume | ModelInputs = model_volume
    if len(model.inputs) > 1:
        t = begin("inputs")
        given = model_inputs(model_volume, model, inputs or {})
        timings["inputs"] = time.perf_counter() - t
    t = begin("inference")
    prediction = runner.predict(given, deadline=deadline).expand()
    del given
    timings["inference"] = time.perf_counter() - t

    t = begin("rois")
    regions = prediction.regions(model_volume, model.card)
    produced = prediction.produced(model.card)
    candidates = regions.rois
    statements = prediction.statements(volume, model.card)
    left_out: dict[int, dict[str, int]] = {}
    for value, n in regions.too_small.items():
        _count(left_out, value, "below_min_volume", n)
    for value in produced:
        if model.card.label(value) is None:
            _count(left_out, value, "not_in_card")
            logger.warning("series %s: the model produced label value %d (%d voxel(s) or box(es)), which its card "
                           "does not describe; stated in the results", volume.series_uid, value, produced[value])
    if grid is not None:
        candidates, lost = on_source(candidates, grid)  # placed on the original slices, measured there
        for r in lost:
            _count(left_out, r.label, "between_slices")
            logger.warning("series %s: ROI %d (%.0f mm3 on the resampled grid) falls between the original slices; "
                           "not reported (stated in the results)", volume.series_uid, r.index, r.volume_mm3)
    rois, _ = select_findings(list(candidates), opts.min_confidence, opts.max_findings, left_out=left_out)
    dropped: dict[str, int] = {}
    for per in left_out.values():
        for reason, n in per.items():
            dropped[reason] = dropped.get(reason, 0) + n
    listed = listed_findings(rois, opts.listed_max)
    describe(listed, volume)  # the costly measures, for the findings the SR lists only
    labels = None
    if rois:
        buffer = prediction.buffer() if grid is None else None  # a label map is ours to repaint: no second copy
        labels = paint_rois(rois, out=buffer) if buffer is not None and buffer.shape == volume.shape \
            else paint_rois(rois, shape=volume.shape)
    del prediction
    timings["rois"] = time.perf_counter() - t
    return Findings(volume=volume, rois=rois, listed=listed, candidates=list(candidates), statements=statements,
                    not_reported=dropped, labels=labels, grid=grid, timings=timings, produced=produced,
                    left_out=left_out)
