"""The model registry: MONAI bundles under the models folder, each with the node's model card.

A model folder holds a MONAI bundle in the Model Zoo layout::

    <name>/configs/metadata.json     name, version, ...
    <name>/configs/inference.json    network_def, preprocessing, inferer, postprocessing
                                     (or inference.yaml / inference.yml, as several Zoo bundles ship)
    <name>/models/model.ts | model.pt
    <name>/model_card.toml           the node's card: labels and their codes, ROI rules, outputs

Only folders inside the configured models folder are ever loaded (bundle configs are code). A broken
bundle is reported with its reason and skipped; it does not stop the node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from node.errors import ModelError
from node.inference.kinds import Kind, kind_of

__all__ = ["BundleInputs", "CardInput", "CodeSpec", "LabelSpec", "ModelCard", "ModelInfo", "Registry", "bundle_inputs", "find_weights", "large_files",
           "read_inference_config", "scan_models"]

logger = logging.getLogger(__name__)


class CodeSpec(BaseModel):
    """A coded concept: code value, coding scheme designator (SCT, DCM, ...) and meaning."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    code: str
    scheme: str
    meaning: str


class LabelSpec(BaseModel):
    """One output label of the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    value: int = Field(ge=1, le=255)
    name: str
    category: CodeSpec
    type: CodeSpec
    finding_site: CodeSpec | None = None
    color: tuple[int, int, int] = (255, 64, 64)
    finding: bool = True
    min_volume_mm3: float = Field(0.0, ge=0)


class CardModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    modality: list[str] = Field(default_factory=list)
    description: str = ""
    intended_use: str = ""
    #: memory the model needs to run (MB, on the GPU or for CPU actors in RAM); 0: estimated from the weights
    memory_mb: float = Field(0.0, ge=0)
    #: for a series holding several volumes at the same positions (b-values, echoes, dynamics), which one the model
    #: takes: "first", "last", "max:<attribute>", "min:<attribute>" or "<attribute>=<value>" (attributes:
    #: DiffusionBValue, EchoTime, TemporalPosition, ImageComponent, TriggerTime, AcquisitionNumber)
    volume: str | None = None
    #: derived images (ImageType DERIVED: ADC or FA maps, subtractions, ...) the model reads, by ImageType value
    #: (e.g. ["ADC"]); by default a model runs on original images only
    derived: list[str] = Field(default_factory=list)
    #: the algorithm family recorded in the SEG's Algorithm Identification (CID 7162)
    family: CodeSpec = CodeSpec(code="123110", scheme="DCM", meaning="Artificial Intelligence")


class CardOutputs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    seg: bool = True
    sr: bool = True
    #: detection models: also a SEG with each box as a filled region (off by default: boxes are drawn by the SR)
    box_masks: bool = False
    #: "binary" (one bit plane per segment: every viewer) or "labelmap" (the Label Map Segmentation IOD: one
    #: 8-bit plane for all segments, far smaller for many-label models; fewer viewers read it yet)
    seg_type: Literal["binary", "labelmap"] = "binary"


class CardBundle(BaseModel):
    """``[bundle]``: how the node runs the bundle without editing its files."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: bundle config values replaced at load, by config id as ``monai.bundle run --key value`` takes them
    #: (``"inferer#roi_size" = [64, 64, 64]``, ``"inferer#sw_batch_size" = 1``); each id must exist in the
    #: bundle's inference config (checked when the model loads)
    overrides: dict[str, Any] = Field(default_factory=dict)
    #: bundle config ids removed at load (``"network_def#img_size"``: an argument the installed MONAI no
    #: longer accepts); each must exist (checked when the model loads). ``preannot models add`` fills it
    remove: list[str] = Field(default_factory=list)
    #: run the node's own equivalents of MONAI transforms where they give the same voxels with less memory
    #: and time: ``Spacingd`` (and its inversion) as ``node.inference.resample.BoundedSpacingd``, an
    #: arg-max-only ``AsDiscreted`` as ``node.inference.postops.ChannelArgmaxd``; false keeps the bundle's own
    substitute_transforms: bool = True


class CardInput(BaseModel):
    """``[[inputs]]``: one input of a model that takes several series of a study (in the bundle's order)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: the bundle's key for it (a multi-phase bundle's "artery"), or its input channel's name (brats' "FLAIR")
    name: str
    #: which series of the study it is: conditions on the series' attributes, as a route's ``match``
    #: (Modality, SeriesDescription = "re:(?i)flair", ImageType = "contains:ADC", ...)
    match: dict[str, Any] = Field(default_factory=dict)
    required: bool = True
    #: the series the results are made on (their SEG on its slices); default: the first input
    reference: bool = False
    #: of a series holding several volumes (b-values, echoes), which one (see ``[model] volume``)
    volume: str | None = None


class ModelCard(BaseModel):
    """The node's model card (``model_card.toml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: CardModel = Field(default_factory=CardModel)
    labels: list[LabelSpec] = Field(min_length=1)
    outputs: CardOutputs = Field(default_factory=CardOutputs)
    bundle: CardBundle = Field(default_factory=CardBundle)
    #: the series a study-level model takes (none: the model takes the one series it is routed)
    inputs: list[CardInput] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_reference(self) -> ModelCard:
        refs = [i.name for i in self.inputs if i.reference]
        if len(refs) > 1:
            raise ValueError(f"[[inputs]]: one reference input, not {refs}")
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"[[inputs]]: names must be unique ({names})")
        if self.inputs and not self.reference_input.required:
            raise ValueError(f"[[inputs]]: the reference input {self.reference_input.name!r} must be required")
        return self

    @property
    def reference_input(self) -> CardInput:
        """The input the results are made on (the one marked ``reference``, else the first)."""
        return next((i for i in self.inputs if i.reference), self.inputs[0])

    def input_of(self, attrs: Any) -> CardInput | None:
        """The input a series with these attributes is (the first whose conditions hold), or None."""
        from node.conditions import matches

        return next((i for i in self.inputs if matches(i.match, attrs)), None)

    def label(self, value: int) -> LabelSpec | None:
        return next((lab for lab in self.labels if lab.value == value), None)

    def refusal(self, name: str, attrs: Any) -> str | None:
        """Why the model ``name`` must not run on a series with these attributes (a mapping of DICOM keywords),
        or None: the card's ``modality`` list, when it has one, decides what it may run on."""
        wanted = [m.upper() for m in self.model.modality]
        modality = str(attrs.get("Modality", "") or "").upper()
        if wanted and modality not in wanted:
            return (f"model {name} is for {', '.join(wanted)} (its card's modality); the series is "
                    f"{modality or 'of no modality'}")
        image_type = attrs.get("ImageType") or []
        image_type = [str(v).upper() for v in (str(image_type).split("\\") if isinstance(image_type, str)
                                               else list(image_type))]
        if modality == "MR" and image_type[:1] == ["DERIVED"]:  # an ADC or FA map, a subtraction, a reformat
            taken = {d.upper() for d in self.model.derived}
            if not taken & set(image_type[1:]):
                return (f"a derived image (ImageType {'/'.join(image_type)}); model {name} reads original images "
                        "(its card's [model] derived lists the derived ones it takes)")
        return None


@dataclass(frozen=True)
class ModelInfo:
    """A loadable model: where it is and what it is."""

    name: str
    version: str
    path: Path
    weights: Path
    sha256: str
    card: ModelCard
    metadata: dict = field(default_factory=dict, repr=False)
    #: what the bundle takes (several inputs: in the card's ``[[inputs]]``)
    inputs: BundleInputs = field(default_factory=lambda: BundleInputs(("image",)))
    #: what kind of model it is (recognised once from its inference config; see node.inference.kinds)
    kind: Kind = field(default_factory=lambda: kind_of({}, {}))

    @property
    def inference_config(self) -> Path:
        """The bundle's inference config: ``inference.json``, or ``inference.yaml`` / ``.yml``."""
        return find_inference_config(self.path) or self.path / "configs" / "inference.json"

    def identification(self) -> dict[str, str]:
        """Name, version and weights SHA-256, as recorded in every output and audit record."""
        return {"name": self.name, "version": self.version, "weights_sha256": self.sha256}


#: inference config names, in the order they are looked for
INFERENCE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")


def find_inference_config(folder: Path) -> Path | None:
    """The bundle's inference config file, or None."""
    return next((folder / "configs" / n for n in INFERENCE_CONFIGS if (folder / "configs" / n).is_file()), None)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(folder: Path) -> ModelInfo:
    """Read one bundle folder.

    Raises:
        ModelError: a required file is missing or invalid; the message names it.
    """
    meta_path = folder / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise ModelError(f"{folder.name}: no configs/metadata.json (not a MONAI bundle)")
    try:
        metadata = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{folder.name}: configs/metadata.json is not valid JSON: {exc}") from exc
    if find_inference_config(folder) is None:
        raise ModelError(f"{folder.name}: no configs/inference.json or configs/inference.yaml")
    config = read_inference_config(folder)
    inputs = bundle_inputs(config, metadata)
    weights = find_weights(folder)
    card_path = folder / "model_card.toml"
    if not card_path.is_file():
        raise ModelError(f"{folder.name}: no model_card.toml (labels and codes for the outputs)")
    try:
        card = ModelCard.model_validate(tomllib.loads(card_path.read_text()))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ModelError(f"{folder.name}: invalid model_card.toml: {exc}") from exc
    described = [i.name for i in card.inputs]
    if len(inputs) > 1 and sorted(described) != sorted(inputs.names):
        missing = [n for n in inputs.names if n not in described]
        raise ModelError(f"{folder.name}: the bundle takes {len(inputs)} inputs ({', '.join(inputs)}); its card "
                         + (f"does not describe {', '.join(missing)}" if missing else f"describes {described}")
                         + ": one [[inputs]] table per input, with the series it is (docs/models.md)")
    if len(inputs) == 1 and card.inputs:
        raise ModelError(f"{folder.name}: its card describes {len(card.inputs)} inputs ({', '.join(described)}); "
                         "the bundle takes one")
    return ModelInfo(name=folder.name,
                     version=str(metadata.get("version", "0")), path=folder.resolve(), weights=weights,
                     sha256=_sha256(weights), card=card, metadata=metadata, kind=kind_of(config, metadata),
                     inputs=inputs)


#: weights files, in the order they are looked for (a bundle's ``large_files`` list may name others)
WEIGHTS = ("models/model.ts", "models/model.pt")


def large_files(folder: Path) -> list[dict[str, Any]]:
    """The files a bundle's ``large_files.yml`` / ``.yaml`` / ``.json`` names (path, url, hash), [] without one."""
    for name in ("large_files.yml", "large_files.yaml", "large_files.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            if path.suffix == ".json":
                data = json.loads(path.read_text())
            else:
                import yaml

                data = yaml.safe_load(path.read_text())
        except Exception as exc:  # any parse error is the bundle's, named
            raise ModelError(f"{folder.name}: {name} cannot be read: {exc}") from exc
        entries = data.get("large_files") if isinstance(data, dict) else None
        return [e for e in entries or [] if isinstance(e, dict) and e.get("path")]
    return []


def find_weights(folder: Path) -> Path:
    """The bundle's weights: ``models/model.ts`` or ``models/model.pt``, else a weights file its ``large_files``
    list names (.ts, .pt, .pth).

    Raises:
        ModelError: none is there; the message names the file the bundle's list names and where it comes from
            (the node never downloads).
    """
    named = [str(e["path"]) for e in large_files(folder)
             if str(e["path"]).endswith((".ts", ".pt", ".pth")) and not str(e["path"]).startswith("/")]
    for rel in (*WEIGHTS, *named):
        path = (folder / rel).resolve()
        if path.is_file() and folder.resolve() in path.parents:
            return path
    if named:
        entry = next(e for e in large_files(folder) if str(e["path"]) == named[0])
        source = f" (the bundle gives its address: {entry['url']})" if entry.get("url") else ""
        what = f"{named[0]}, which is not" if len(named) == 1 else f"{', '.join(named)}, none of which is"
        raise ModelError(f"{folder.name}: no weights: its large_files list names {what} there{source}; put the "
                         "file there by hand (the node never downloads)")
    raise ModelError(f"{folder.name}: no weights: no models/model.ts or models/model.pt, and no large_files list "
                     "naming another")


@dataclass(frozen=True)
class BundleInputs:
    """What a bundle takes: its inputs' names, and how: ``keys`` (its loader reads each as a key of its own and the
    bundle resamples and combines them itself) or ``channels`` (one image whose channels are the inputs: the node
    resamples them onto the reference series' grid and stacks them)."""

    names: tuple[str, ...]
    mode: str = "channels"

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Any:
        return iter(self.names)


def bundle_inputs(config: dict[str, Any], metadata: dict[str, Any]) -> BundleInputs:
    """The inputs a bundle takes: the keys its loader reads (its label key aside) when there are several, else the
    input channels its metadata names when there are several distinct ones (brats: T1c, T1, T2, FLAIR), else one,
    ``image``. A grey image copied to several channels (``channel_def`` naming one "image") is one input."""
    pre = config.get("preprocessing")
    transforms = pre.get("transforms", []) if isinstance(pre, dict) else []
    first = transforms[0] if transforms and isinstance(transforms[0], dict) else {}
    if str(first.get("_target_", "")).rsplit(".", 1)[-1] in ("LoadImage", "LoadImaged"):
        keys = first.get("keys", "image")
        if isinstance(keys, str) and keys.startswith("@") and isinstance(config.get(keys[1:]), list):
            keys = config[keys[1:]]  # "@phase_keys": a reference to a top-level list of keys
        keys = keys if isinstance(keys, list) else [keys]
        resolved = []
        for k in keys:  # "@image_key": a reference to a top-level string of the config
            if isinstance(k, str) and k.startswith("@") and isinstance(config.get(k[1:]), str):
                k = config[k[1:]]
            resolved.append(str(k))
        resolved = [k for k in resolved if k.lower() not in ("label", "seg", "mask")]
        if len(resolved) > 1:
            return BundleInputs(tuple(resolved), "keys")
    fmt = metadata.get("network_data_format") if isinstance(metadata, dict) else None
    inputs = fmt.get("inputs", {}) if isinstance(fmt, dict) else {}
    image = inputs.get("image") if isinstance(inputs, dict) else None
    channels = image.get("channel_def") if isinstance(image, dict) else None
    names = list(dict.fromkeys(str(v) for v in channels.values())) if isinstance(channels, dict) else []
    if len(names) > 1:
        return BundleInputs(tuple(names), "channels")
    return BundleInputs(("image",), "channels")


def read_inference_config(folder: Path) -> dict[str, Any]:
    """The bundle's inference config as a dict (JSON or YAML), {} when it has none.

    Raises:
        ModelError: the file cannot be parsed (named).
    """
    cfg = find_inference_config(folder)
    if cfg is None:
        return {}
    try:
        if cfg.suffix == ".json":
            keys = json.loads(cfg.read_text())
        else:
            import yaml

            keys = yaml.safe_load(cfg.read_text())
    except Exception as exc:  # any read or parse error (OSError, JSON, YAML) is the bundle's, named
        raise ModelError(f"{folder.name}: {cfg.name} cannot be read: {exc}") from exc
    return keys if isinstance(keys, dict) else {}


def scan_models(root: Path) -> tuple[dict[str, ModelInfo], dict[str, str]]:
    """Scan a models folder.

    Returns:
        (models by folder name, reasons by folder name for the bundles that could not be loaded)
    """
    models: dict[str, ModelInfo] = {}
    broken: dict[str, str] = {}
    if not root.is_dir():
        return models, {str(root): "models folder does not exist"}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        try:
            models[folder.name] = load_model(folder)
        except ModelError as exc:
            broken[folder.name] = str(exc)
            logger.error("model %s skipped: %s", folder.name, exc)
    return models, broken


class Registry:
    """The models available to the node, scanned once at start (``reload()`` to rescan)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models: dict[str, ModelInfo] = {}
        self.broken: dict[str, str] = {}
        self.reload()

    def reload(self) -> None:
        self.models, self.broken = scan_models(self.root)

    def get(self, name: str) -> ModelInfo:
        """The model called ``name``; raises ModelError (with the reason, when it is broken) otherwise."""
        if name in self.models:
            return self.models[name]
        if name in self.broken:
            raise ModelError(f"model {name!r} is broken: {self.broken[name]}")
        raise ModelError(f"no model {name!r} in {self.root}; available: {sorted(self.models)}")
