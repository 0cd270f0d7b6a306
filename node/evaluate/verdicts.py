"""The verdict store as an evaluation dataset: the radiologists' final SEGs as the reference.

Each judged result whose latest verdict is a SEG (the radiologist's final segmentation, still in the
spool) becomes a case: the source series the node processed, and that SEG. Two kinds of model can be
scored on these cases with ``preannot evaluate --from-verdicts``:

- the AI **as it was sent** (:func:`as_sent`): the node's own SEG of that job, read back, not re-run —
  its Dice against the final SEG is the agreement the verdict measured;
- any model of the registry (a new version, a shadow or candidate model), run on the same series.

Filters: model (the model whose results were judged), version, scanner, and a period.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from node.evaluate.dataset import Case, Dataset, load_reference
from node.imaging.volume import Volume
from node.inference.prediction import LabelMap
from node.inference.registry import ModelInfo
from node.store.jobs import JobStore
from node.store.series import SeriesStore
from node.verdicts.store import VerdictStore

__all__ = ["RecordedRunner", "as_sent", "verdict_dataset"]

def verdict_dataset(store: VerdictStore, series: SeriesStore, *, model: str | None = None, version: str | None = None,
                    scanner: str | None = None, since: float | None = None, until: float | None = None) -> Dataset:
    """(source series, final SEG) pairs from the latest SEG verdict of each judged result."""
    out = Dataset(root=store.db.path.parent / "verdicts")
    latest: dict[int, dict[str, Any]] = {}  # the latest final SEG of each judged result (a later SR does not replace it)
    for v in store.rows(model=model):
        if v["source"] == "seg":
            latest[v["job_id"]] = v
    for v in latest.values():
        if (version and v["model_version"] != version) or (scanner and v["scanner"] != scanner):
            continue
        if (since is not None and v["received_at"] < since) or (until is not None and v["received_at"] > until):
            continue
        ref = Path(v["object_path"] or "")
        files = series.files(v["series_uid"])
        if not ref.is_file() or not files:
            out.problems.append(f"verdict {v['id']} (job {v['job_id']}): its final SEG or source series is no longer "
                                "in the spool (retention)")
            continue
        out.cases.append(Case(name=f"job{v['job_id']}", series_uid=v["series_uid"], image_files=files, reference=ref))
    return out

class RecordedRunner:
    """A runner that returns what the node sent for each series (its SEG, read back) instead of running a model."""

    def __init__(self, model: ModelInfo, segs: dict[str, Path]) -> None:
        self.model = model
        self.segs = segs
        self.label_map = {lab.name.lower(): lab.value for lab in model.card.labels}
        self.label_map.update({lab.type.meaning.lower(): lab.value for lab in model.card.labels})

    def predict(self, volume: Volume, *, deadline: float | None = None) -> LabelMap:
        from node.errors import ModelError

        seg = self.segs.get(volume.series_uid or "")
        if seg is None:
            raise ModelError(f"no result of {self.model.name} was sent for series {volume.series_uid}")
        case = Case(name="sent", series_uid=volume.series_uid or "", image_files=[], reference=seg)
        return LabelMap(load_reference(case, volume, label_map=self.label_map))

def as_sent(jobs: JobStore, model: ModelInfo, dataset: Dataset) -> tuple[ModelInfo, RecordedRunner]:
    """The model "as sent" (its name suffixed) and a runner returning the node's SEG of each case's job."""
    segs: dict[str, Path] = {}
    for case in dataset.cases:
        result = jobs.get(int(case.name.removeprefix("job"))).result
        path = result.files.get("seg") if result is not None else None
        if path:
            segs[case.series_uid] = Path(path)
    sent = dataclasses.replace(model, name=f"{model.name} (as sent)")
    return sent, RecordedRunner(sent, segs)
