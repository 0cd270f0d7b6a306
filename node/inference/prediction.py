"""What a model gives: the one typed seam between a runner and the rest of the node.

A runner turns a volume into a :class:`Prediction`. Each kind of prediction knows how to become
findings (regions of interest measured on the images) and study-level statements (a class with its
probabilities), how to travel compactly between processes (Ray actors) and back, and how to follow the
series when the model saw a resampled grid. The pipeline, ``preannot run`` and ``preannot evaluate`` use
predictions only through this interface (see ``node.processing.findings.predict_findings``).

- :class:`LabelMap`: a segmentation (label per voxel, and where the bundle gives one, the winning
  class's probability per voxel);
- :class:`Boxes`: a detector's boxes, already ROIs of kind ``box`` on the grid the model saw;
- classes with probabilities: ``node.inference.classification.ClassScores``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from node.imaging.volume import Volume
from node.inference.registry import CodeSpec, ModelCard

if TYPE_CHECKING:
    from node.inference.rois import ROI, Regions

__all__ = ["Boxes", "ClassStatement", "LabelMap", "ModelInputs", "Prediction", "Runner"]


@dataclass(frozen=True, slots=True)
class ClassStatement:
    """A study-level (or image-level) coded statement of a model: "Breast composition: Extremely dense",
    with the probability of every class the model knows, in the card's order."""

    #: what is evaluated (the card labels' category, e.g. "Breast composition")
    concept: CodeSpec
    #: the class the model chose (highest probability), coded
    value: CodeSpec
    #: the card label value and name of the chosen class
    label: int
    name: str
    probability: float
    #: (label value, class name, class code, probability) for every class
    probabilities: tuple[tuple[int, str, CodeSpec, float], ...]
    #: the source image it is about (multi-image projection series), None for the whole series
    image_index: int | None = None


@runtime_checkable
class Prediction(Protocol):
    """What a runner returns; see the module docstring."""

    def regions(self, volume: Volume, card: ModelCard) -> Regions:
        """Candidate findings, with their cheap measures on ``volume`` (the grid the model saw), numbered from 1,
        and what the card's rules left out."""
        ...

    def produced(self, card: ModelCard) -> dict[int, int]:
        """What the model produced, by label value (voxels of a label map, boxes of a detector), whether or not
        the card describes the value: every one must end up in the results or be stated as left out."""
        ...

    def statements(self, volume: Volume, card: ModelCard) -> list[ClassStatement]:
        """Study-level coded statements (a classification), empty for the other kinds."""
        ...

    def buffer(self) -> np.ndarray | None:
        """A uint8 array of the model grid's shape that the caller may overwrite once it has the regions
        (the label map itself: the reported regions are painted into it, no second full-size array), or None."""
        ...

    def compact(self) -> Prediction:
        """A smaller equivalent for the trip from a model actor back to the node (see :meth:`expand`)."""
        ...

    def expand(self) -> Prediction:
        """The full prediction again, from :meth:`compact`'s."""
        ...


@dataclass(frozen=True)
class ModelInputs:
    """The series a study-level model takes, by input name in the bundle's order, and the input the results are
    made on (``reference``). ``mode`` says how the bundle takes them (``BundleInputs.mode``): ``channels`` (one
    image whose channels are the inputs, all on the reference grid: ``channels`` holds them stacked, float32
    ``[c, i, j, k]`` in MONAI's axis order) or ``keys`` (each volume on its own grid, under its own key: the bundle
    resamples them itself)."""

    volumes: dict[str, Volume]
    reference: str
    mode: str = "channels"
    channels: np.ndarray | None = field(default=None, repr=False)

    @property
    def reference_volume(self) -> Volume:
        return self.volumes[self.reference]


class Runner(Protocol):
    """A loaded model: a volume (or a study's :class:`ModelInputs`) in, a :class:`Prediction` out.

    ``predict`` raises ModelTimeoutError when ``deadline`` (a ``time.monotonic()`` value) passes, and
    ModelError when the model fails.
    """

    def predict(self, volume: Volume | ModelInputs, *, deadline: float | None = None) -> Prediction: ...


@dataclass(frozen=True, slots=True)
class LabelMap:
    """A segmentation: labels ``[k, j, i]`` (uint8, same shape as the volume the model saw) and, when the
    bundle applies a softmax before its argmax, the winning class's probability per voxel (float16)."""

    labels: np.ndarray
    confidence: np.ndarray | None = None
    #: :meth:`compact`'s form: the confidence of the labelled voxels only, in the order of ``labels > 0``
    labelled_confidence: np.ndarray | None = field(default=None, repr=False)

    def regions(self, volume: Volume, card: ModelCard) -> Regions:
        from node.inference.rois import Regions, extract_rois

        too_small: dict[int, int] = {}
        rois = extract_rois(self.labels, volume, card, confidence=self.confidence, too_small=too_small)
        return Regions(rois, too_small)

    def produced(self, card: ModelCard) -> dict[int, int]:
        """Voxels of each label value the model produced (0 left out): counted over the labelled voxels only,
        32 slices at a time (a count over every voxel converts the whole map to 64-bit integers first)."""
        counts: dict[int, int] = {}
        for k0 in range(0, self.labels.shape[0], 32):
            chunk = self.labels[k0:k0 + 32]
            values = chunk[chunk != 0]
            if values.size == 0:
                continue
            found = np.bincount(values.astype(np.int64, copy=False) if values.dtype != np.uint8 else values)
            for v in np.flatnonzero(found):
                counts[int(v)] = counts.get(int(v), 0) + int(found[v])
        return counts

    def statements(self, volume: Volume, card: ModelCard) -> list[ClassStatement]:
        return []

    def buffer(self) -> np.ndarray | None:
        return self.labels if self.labels.dtype == np.uint8 and self.labels.flags.writeable else None

    def compact(self) -> LabelMap:
        """Only the labels and the confidence of the labelled voxels: a full float map would be twice the
        label map on the wire, and a finding's confidence is its mean over its own voxels."""
        if self.confidence is None:
            return self
        return LabelMap(self.labels, None, self.confidence[self.labels > 0])

    def expand(self) -> LabelMap:
        # arrays from Ray's object store are read-only views: the pipeline repaints the label map in place
        labels = np.array(self.labels)
        if self.labelled_confidence is None:
            return LabelMap(labels, None if self.confidence is None else np.array(self.confidence))
        confidence = np.zeros(labels.shape, dtype=self.labelled_confidence.dtype)
        confidence[labels > 0] = self.labelled_confidence
        return LabelMap(labels, confidence)


@dataclass(frozen=True, slots=True)
class Boxes:
    """A detector's boxes as ROIs of kind ``box`` on the grid the model saw, by decreasing score."""

    rois: tuple[ROI, ...]

    def regions(self, volume: Volume, card: ModelCard) -> Regions:
        from node.inference.rois import Regions

        return Regions(list(self.rois))

    def produced(self, card: ModelCard) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.rois:
            out[r.label] = out.get(r.label, 0) + 1
        return out

    def statements(self, volume: Volume, card: ModelCard) -> list[ClassStatement]:
        return []

    def buffer(self) -> np.ndarray | None:
        return None

    def compact(self) -> Boxes:
        return self

    def expand(self) -> Boxes:
        return self

