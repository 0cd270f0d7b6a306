"""Which stable series a route's models can use: decided from the index, before any job exists.

A PACS routes whole studies: with the axial CT come the scout, the dose report, the exam summary (a
secondary capture in RGB), sometimes a PDF or an RT plan. None of them is a volume a model can read, and
none must get an AI result. Each rule below skips such a series with its reason (recorded on the series,
in the audit trail, the API and the dashboard); route keys relax them.
"""

from __future__ import annotations

from typing import Any

from node.config import Route
from node.imaging.volume import PROJECTION_MODALITIES
from node.inference.registry import ModelCard

__all__ = ["ineligibility", "model_ineligibility"]

#: SOP classes that hold no image a model reads (prefixes): SR, KOS, presentation states, encapsulated
#: documents, RT plans/structures/doses/records, SEG/surface/registration, raw data, waveforms, spectroscopy
_NON_IMAGE = {
    "1.2.840.10008.5.1.4.1.1.88.": "a structured report",
    "1.2.840.10008.5.1.4.1.1.11.": "a presentation state",
    "1.2.840.10008.5.1.4.1.1.104.": "an encapsulated document (PDF, CDA, ...)",
    "1.2.840.10008.5.1.4.1.1.481.": "an RT object (plan, structure set, dose, record)",
    "1.2.840.10008.5.1.4.1.1.66": "a segmentation, registration, surface or raw data object",
    "1.2.840.10008.5.1.4.1.1.9.": "a waveform",
    "1.2.840.10008.5.1.4.1.1.4.2": "MR spectroscopy",
    "1.2.840.10008.5.1.4.1.1.67": "a real world value mapping",
    "1.2.840.10008.5.1.4.1.1.91.": "a content assessment",
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _values(attrs: dict[str, Any], key: str) -> list[str]:
    v = attrs.get(key)
    if v is None:
        return []
    return [str(x).upper() for x in (v if isinstance(v, list) else str(v).split("\\"))]


def ineligibility(route: Route, attrs: dict[str, Any], *, frames: int) -> str | None:
    """Why ``route``'s models must not run on a series with these index attributes and this many images
    (frames of multi-frame instances counted), or None when they may."""
    sop_class = str(attrs.get("SOPClassUID", ""))
    for prefix, what in _NON_IMAGE.items():
        if sop_class.startswith(prefix):
            return f"not an image: {what} (SOP class {sop_class})"
    if "Rows" not in attrs:
        return f"not an image: no pixel data (SOP class {sop_class or 'unknown'})"
    if route.skip_secondary_captures and sop_class.startswith(_SECONDARY_CAPTURE):
        return "a secondary capture (screenshot or exam summary), not an acquired volume"
    if route.skip_localizers and "LOCALIZER" in _values(attrs, "ImageType"):
        return "a localizer (scout) image, not an axial volume"
    photometric = str(attrs.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(str(attrs.get("SamplesPerPixel", "1")) or 1)
    if route.skip_color and (samples > 1 or not photometric.startswith("MONOCHROME")):
        return f"a colour image ({photometric}, {samples} samples per pixel); the models read greyscale"
    projection = str(attrs.get("Modality", "")).upper() in PROJECTION_MODALITIES
    if frames < route.min_slices and not projection:  # a mammogram or radiograph is one image by nature
        return f"only {frames} image(s); route {route.name} needs at least {route.min_slices} (min_slices)"
    return None



def model_ineligibility(name: str, card: ModelCard, attrs: dict[str, Any]) -> str | None:
    """Why the model ``name`` must not run on a series with these attributes (its card decides), or None.

    A study-level model (``[[inputs]]`` in its card) may use any series one of its inputs matches; the
    assembler makes its job on the reference input's series only.
    """
    why = card.refusal(name, attrs)
    if why is None and card.inputs and card.input_of(attrs) is None:
        names = ", ".join(i.name for i in card.inputs)
        return f"not one of model {name}'s inputs ({names}; their match rules are in its card)"
    return why
