"""The result objects of a job, behind one interface: each output is registered once with when it is
wanted and how it is built from an :class:`OutputRequest`.

The pipeline walks :data:`OUTPUTS` in order (the SR comes after the SEG it references) and never asks what
kind of model ran: a builder decides from what the request holds (regions, their kinds, class statements)
and from the model card and the route. Adding an output: a builder function and one :class:`Output` entry
(see docs/architecture.md, "Adding an output").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from node.config import OutputsConfig
from node.imaging.volume import Volume
from node.inference.prediction import ClassStatement
from node.inference.registry import ModelCard
from node.inference.rois import ROI
from node.outputs.equipment import Provenance
from node.outputs.seg import build_seg
from node.outputs.sr import build_sr
from node.outputs.viewer_objects import build_capture, build_gsps, build_kos, build_rtstruct

__all__ = ["OUTPUTS", "Output", "OutputRequest"]


@dataclass
class OutputRequest:
    """Everything a builder may use."""

    volume: Volume
    #: the reported findings (numbered, with their tracking UIDs)
    rois: list[ROI]
    #: the findings painted on the series grid (None when there are no regions)
    labels: np.ndarray | None
    #: a classifier's statements
    statements: list[ClassStatement]
    #: findings left out, by reason (stated in the SR)
    not_reported: dict[str, int]
    card: ModelCard
    provenance: Provenance
    outputs: OutputsConfig
    #: the route's viewer objects beyond SEG + SR ("gsps", "sc", "kos", "rtstruct")
    extra: Sequence[str] = ()
    #: objects made by the builders before this one, by name (the SR references the SEG)
    made: dict[str, Dataset] = field(default_factory=dict)
    #: the headers of a study-level model's other input series (the SR cites them as evidence)
    evidence: Sequence[Dataset] = ()
    #: the findings measured in full, listed by the SR and drawn by the viewer objects (None: all of ``rois``);
    #: the SEG holds every finding
    listed: list[ROI] | None = None
    #: the follow-up of the job (:mod:`node.followup`): the SR states each finding's change and the prior's
    #: findings not seen any more
    followup: Any = None

    @property
    def shown(self) -> list[ROI]:
        return self.rois if self.listed is None else self.listed


@dataclass(frozen=True, slots=True)
class Output:
    """One kind of result object."""

    name: str
    wanted: Callable[[OutputRequest], bool]
    #: returns (file stem, dataset) pairs
    build: Callable[[OutputRequest], list[tuple[str, Dataset]]]


def _seg_wanted(r: OutputRequest) -> bool:
    if not r.rois or r.labels is None:
        return False
    if all(x.kind == "box" for x in r.rois):  # a detector's boxes: drawn by the SR, a SEG only if the card asks
        return r.card.outputs.box_masks
    return r.card.outputs.seg


def _seg(r: OutputRequest) -> list[tuple[str, Dataset]]:
    return [("seg", build_seg(r.volume, r.rois, r.card, r.provenance, series_number=r.outputs.seg_series_number))]


def _sr(r: OutputRequest) -> list[tuple[str, Dataset]]:
    seg = r.made.get("seg")
    return [("sr", build_sr(r.volume, r.shown, r.card, r.provenance, seg=seg if isinstance(seg, hd.seg.Segmentation)
                            else None,
                            series_number=r.outputs.sr_series_number, not_reported=r.not_reported,
                            statements=r.statements, inputs=r.evidence, unlisted=len(r.rois) - len(r.shown),
                            followup=r.followup))]


def _gsps(r: OutputRequest) -> list[tuple[str, Dataset]]:
    return [("gsps", build_gsps(r.volume, r.shown, r.provenance, series_number=r.outputs.gsps_series_number))]


def _captures(r: OutputRequest) -> list[tuple[str, Dataset]]:
    assert r.labels is not None
    caps = build_capture(r.volume, r.labels, r.shown, r.provenance, series_number=r.outputs.sc_series_number)
    return [(f"sc{n + 1:02d}", c) for n, c in enumerate(caps)]


def _kos(r: OutputRequest) -> list[tuple[str, Dataset]]:
    seg = r.made.get("seg")
    return [("kos", build_kos(r.volume, r.shown, r.provenance, series_number=r.outputs.kos_series_number,
                              also=[seg] if seg is not None else []))]


def _rtstruct(r: OutputRequest) -> list[tuple[str, Dataset]]:
    return [("rtstruct", build_rtstruct(r.volume, r.rois, r.card, r.provenance,
                                        series_number=r.outputs.rtstruct_series_number))]


def _extra(name: str) -> Callable[[OutputRequest], bool]:
    return lambda r: bool(r.rois) and r.labels is not None and name in r.extra


#: every output, in the order they are built
OUTPUTS: tuple[Output, ...] = (
    Output("seg", _seg_wanted, _seg),
    Output("sr", lambda r: r.card.outputs.sr, _sr),
    Output("gsps", _extra("gsps"), _gsps),
    Output("sc", _extra("sc"), _captures),
    Output("kos", _extra("kos"), _kos),
    Output("rtstruct", _extra("rtstruct"), _rtstruct),
)
