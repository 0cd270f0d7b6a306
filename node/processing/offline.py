"""``preannot run`` on a folder as a scanner or a CD writes it: find the series in it, say which can be
processed and why the others cannot, with the same eligibility rules as the node's routes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from node.config import Route
from node.inference.registry import ModelCard
from node.ingest.spool import routing_attributes
from node.net.scu import iter_dicom_files, unsendable
from node.schedule.eligibility import ineligibility, model_ineligibility

__all__ = ["FoundSeries", "assign_inputs", "discover_series"]

logger = logging.getLogger(__name__)



@dataclass
class FoundSeries:
    """One series found in a folder."""

    series_uid: str
    files: list[Path] = field(default_factory=list)
    frames: int = 0
    attrs: dict[str, object] = field(default_factory=dict)
    #: why the route's models cannot use it (None: eligible)
    skipped: str | None = None

    def describe(self) -> str:
        what = f"{self.attrs.get('Modality', '?')} {self.attrs.get('SeriesDescription', '')}".strip()
        return f"{self.series_uid}: {what}, {len(self.files)} file(s), {self.frames} image(s)"


def discover_series(root: Path, route: Route, *, card: ModelCard | None = None,
                    model: str = "") -> tuple[list[FoundSeries], list[str]]:
    """The series under ``root`` (a file or a folder, searched recursively), each judged eligible or
    not for ``route`` (and for the model's card, when given: its modality); and the files that were left out
    (DICOMDIR, vendor index files, unreadable), with why."""
    found: dict[str, FoundSeries] = {}
    left_out: list[str] = []
    seen: dict[str, Path] = {}
    for path in iter_dicom_files(root):
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            left_out.append(f"{path}: unreadable ({exc})")
            continue
        why = unsendable(ds)
        if why is not None:
            left_out.append(f"{path}: {why}")
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            left_out.append(f"{path}: no SeriesInstanceUID")
            continue
        sop = str(ds.get("SOPInstanceUID", ""))
        if sop in seen:  # the same instance again (a copy, another encoding): the node keeps one too
            left_out.append(f"{path}: the same SOP Instance UID as {seen[sop].name} (the same instance again)")
            continue
        seen[sop] = path
        entry = found.setdefault(uid, FoundSeries(series_uid=uid, attrs=routing_attributes(ds)))
        entry.files.append(path)
        entry.frames += max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    for entry in found.values():
        entry.skipped = ineligibility(route, entry.attrs, frames=entry.frames)
        if entry.skipped is None and card is not None:
            entry.skipped = model_ineligibility(model, card, entry.attrs)
    return sorted(found.values(), key=lambda s: -s.frames), left_out


def _series_number(s: FoundSeries) -> float:
    try:
        return float(str(s.attrs.get("SeriesNumber", "0")))
    except ValueError:
        return 0.0


def assign_inputs(found: list[FoundSeries], card: ModelCard) -> tuple[dict[str, FoundSeries], list[str]]:
    """The series a study-level model takes for each of its card's ``[[inputs]]`` among ``found`` (by the inputs'
    match rules; of several series one input matches, the last acquired: the highest SeriesNumber), and the
    required inputs no series matches."""
    chosen: dict[str, FoundSeries] = {}
    for spec in card.inputs:
        candidates = [s for s in found if s.skipped is None and (role := card.input_of(s.attrs)) is not None
                      and role.name == spec.name]
        if candidates:
            chosen[spec.name] = max(candidates, key=_series_number)
    missing = [i.name for i in card.inputs if i.required and i.name not in chosen]
    return chosen, missing
