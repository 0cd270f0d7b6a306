"""The verdict store as an evaluation dataset: the radiologists' final SEGs (or classes) as the reference.

Each judged result whose latest verdict is a SEG (the radiologist's final segmentation, still in the
spool) becomes a case: the source series the node processed, and that SEG. A classification result judged
over HTTP (the class the radiologist gave, ``class_value``) becomes a case with that class as its reference. Two kinds of model can be
scored on these cases with ``preannot evaluate --from-verdicts``:

- the AI **as it was sent** (:func:`as_sent`): the node's own SEG of that job, read back, not re-run —
  its Dice against the final SEG is the agreement the verdict measured; for a detector (no SEG), the boxes
  of its stored result with their scores, scored lesion-wise (sensitivity, FROC) against the final SEG; for a
  classifier, the class scores it stated (AUC, confusion matrix against the radiologists' classes);
- any model of the registry (a new version, a shadow or candidate model), run on the same series.

Filters: model (the model whose results were judged), version, scanner, and a period.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from node.evaluate.dataset import Case, Dataset, load_reference
from node.imaging.volume import Volume
from node.inference.prediction import Boxes, LabelMap
from node.inference.registry import ModelInfo
from node.inference.rois import ROI
from node.store.jobs import JobStore
from node.store.results import FindingResult, JobResult
from node.store.series import SeriesStore
from node.verdicts.store import VerdictStore

__all__ = ["RecordedRunner", "as_sent", "verdict_dataset"]


def verdict_dataset(store: VerdictStore, series: SeriesStore, *, model: str | None = None, version: str | None = None,
                    scanner: str | None = None, since: float | None = None, until: float | None = None) -> Dataset:
    """(source series, final SEG) pairs from the latest SEG verdict of each judged result."""
    out = Dataset(root=store.db.path.parent / "verdicts")
    latest: dict[int, dict[str, Any]] = {}  # the latest final SEG of each judged result (a later SR does not replace it)
    for v in store.rows(model=model):
        if v["source"] == "seg" or _detail(v).get("reference_class") is not None:
            latest[v["job_id"]] = v
    for v in latest.values():
        if (version and v["model_version"] != version) or (scanner and v["scanner"] != scanner):
            continue
        if (since is not None and v["received_at"] < since) or (until is not None and v["received_at"] > until):
            continue
        files = series.files(v["series_uid"])
        stated = _detail(v).get("reference_class")
        if stated is not None:  # a classification: the radiologist's class is the reference
            if not files:
                out.problems.append(f"verdict {v['id']} (job {v['job_id']}): its source series is no longer in the "
                                    "spool (retention)")
                continue
            out.cases.append(Case(name=f"job{v['job_id']}", series_uid=v["series_uid"], image_files=files,
                                  reference_class=str(stated)))
            continue
        ref = Path(v["object_path"] or "")
        if not ref.is_file() or not files:
            out.problems.append(f"verdict {v['id']} (job {v['job_id']}): its final SEG or source series is no longer "
                                "in the spool (retention)")
            continue
        out.cases.append(Case(name=f"job{v['job_id']}", series_uid=v["series_uid"], image_files=files, reference=ref))
    return out


def _detail(v: dict[str, Any]) -> dict[str, Any]:
    """A verdict row's ``detail`` (stored as JSON text)."""
    d = v.get("detail") or {}
    if isinstance(d, str):
        try:
            d = json.loads(d)
        except ValueError:
            return {}
    return d if isinstance(d, dict) else {}


class RecordedRunner:
    """A runner that returns what the node sent for each series instead of running a model: its SEG read back
    (segmentation), or the boxes of its stored result with their scores (a detector, whose results have no
    SEG)."""

    def __init__(self, model: ModelInfo, segs: dict[str, Path], results: dict[str, JobResult] | None = None) -> None:
        self.model = model
        self.segs = segs
        self.results = results or {}
        self.label_map = {lab.name.lower(): lab.value for lab in model.card.labels}
        self.label_map.update({lab.type.meaning.lower(): lab.value for lab in model.card.labels})

    def predict(self, volume: Volume, *, deadline: float | None = None) -> Any:
        from node.errors import ModelError

        uid = volume.series_uid or ""
        seg = self.segs.get(uid)
        if seg is not None:
            case = Case(name="sent", series_uid=uid, image_files=[], reference=seg)
            return LabelMap(load_reference(case, volume, label_map=self.label_map))
        result = self.results.get(uid)
        if result is not None and result.findings and all(f.kind == "box" for f in result.findings):
            return Boxes(tuple(_box_roi(f, volume) for f in result.findings))
        if result is not None and result.classes:  # a classification: the scores it stated, in the card's order
            from node.inference.classification import ClassScores

            names = [lab.name for lab in sorted(self.model.card.labels, key=lambda lab: lab.value)]
            scores = np.array([[c.probabilities.get(n, 0.0) for n in names] for c in result.classes], dtype=np.float64)
            return ClassScores(scores, tuple(None for _ in result.classes))
        raise ModelError(f"no result of {self.model.name} was sent for series {uid}")


def _box_roi(f: FindingResult, volume: Volume) -> ROI:
    """A box the node reported, as an ROI on the series grid (its mask the box)."""
    (k0, k1), (j0, j1), (i0, i1) = f.bbox
    mask = np.ones((k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1), dtype=bool)
    return ROI(index=f.number, label=f.label, label_name=f.label_name, voxels=int(mask.size), volume_mm3=f.volume_mm3,
               diameter_3d_mm=f.diameter_3d_mm or 0.0, diameter_inplane_mm=f.diameter_inplane_mm or 0.0,
               centroid_mm=f.centroid_mm, bbox=f.bbox, mean=f.mean, min=f.min, max=f.max, key_slice=f.key_slice,
               mask=mask, offset=(k0, j0, i0), kind="box", confidence=f.confidence, size_mm=f.size_mm,
               tracking_uid=f.tracking_uid, described=f.diameter_3d_mm is not None)


def as_sent(jobs: JobStore, model: ModelInfo, dataset: Dataset) -> tuple[ModelInfo, RecordedRunner]:
    """The model "as sent" (its name suffixed) and a runner returning the node's result of each case's job."""
    segs: dict[str, Path] = {}
    results: dict[str, JobResult] = {}
    for case in dataset.cases:
        result = jobs.get(int(case.name.removeprefix("job"))).result
        if result is None:
            continue
        results[case.series_uid] = result
        path = result.files.get("seg")
        if path and not all(f.kind == "box" for f in result.findings):
            segs[case.series_uid] = Path(path)
    sent = dataclasses.replace(model, name=f"{model.name} (as sent)")
    return sent, RecordedRunner(sent, segs, results)
