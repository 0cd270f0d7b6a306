"""Draft model cards from a bundle's ``metadata.json`` (``preannot models add``).

Each output named in ``network_data_format.outputs.pred`` (``channel_def``, or ``label_def`` as some
bundles name the values of a single-channel label map) becomes a ``[[labels]]`` table: for a model whose
channel 0 is the background (segmentation), channels 1..n are label values 1..n; for a classifier, class
channel c is label value c + 1 (see ``node.inference.kinds``). Names are matched against a table of SNOMED CT codes for common anatomy and findings, chosen from
the DICOM content mapping resource (CID 7150 Segmentation Property Categories, CID 7151 Segmentation
Property Types, CID 4031 Common Anatomic Regions and the anatomic structure codes they draw on). A
name that is not in the table still gets a table, coded with a local placeholder and marked
``# UNMAPPED``: the card validates, the node runs, and the list of what to review is printed. Laterality
written in the name ("kidney_left") is matched to a lateral code where the table has one; otherwise the
structure's code is used and the card says that laterality is in the name only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import ModelError
from node.inference.bundle import downloading_args
from node.inference.kinds import kind_of
from node.inference.registry import bundle_inputs, read_inference_config

__all__ = ["DraftCard", "draft_card", "output_names"]

ANATOMY_CATEGORY = ("91723000", "SCT", "Anatomical structure")
FINDING_CATEGORY = ("49755003", "SCT", "Morphologically abnormal structure")

#: normalised name -> (code, meaning); anatomy (finding = false)
ANATOMY: dict[str, tuple[str, str]] = {
    "spleen": ("78961009", "Spleen"),
    "liver": ("10200004", "Liver"),
    "gallbladder": ("28231008", "Gallbladder"),
    "stomach": ("69695003", "Stomach"),
    "pancreas": ("15776009", "Pancreas"),
    "kidney": ("64033007", "Kidney"),
    "kidney right": ("9846003", "Right kidney"),
    "kidney left": ("18639004", "Left kidney"),
    "adrenal gland": ("23451007", "Adrenal gland"),
    "aorta": ("15825003", "Aorta"),
    "inferior vena cava": ("64131007", "Inferior vena cava"),
    "ivc": ("64131007", "Inferior vena cava"),
    "portal vein": ("32764006", "Portal vein"),
    "esophagus": ("32849002", "Esophagus"),
    "trachea": ("44567001", "Trachea"),
    "lung": ("39607008", "Lung"),
    "lung upper lobe left": ("44714003", "Upper lobe of left lung"),
    "lung lower lobe left": ("41224006", "Lower lobe of left lung"),
    "lung upper lobe right": ("45653009", "Upper lobe of right lung"),
    "lung middle lobe right": ("72481006", "Middle lobe of right lung"),
    "lung lower lobe right": ("90572001", "Lower lobe of right lung"),
    "heart": ("80891009", "Heart"),
    "heart myocardium": ("74281007", "Myocardium"),
    "heart ventricle left": ("87878005", "Left ventricle"),
    "heart ventricle right": ("53085002", "Right ventricle"),
    "heart atrium left": ("82471001", "Left atrium"),
    "heart atrium right": ("73829009", "Right atrium"),
    "pulmonary artery": ("81040000", "Pulmonary artery"),
    "brain": ("12738006", "Brain"),
    "urinary bladder": ("89837001", "Urinary bladder"),
    "bladder": ("89837001", "Urinary bladder"),
    "colon": ("71854001", "Colon"),
    "small bowel": ("30315005", "Small intestine"),
    "small intestine": ("30315005", "Small intestine"),
    "duodenum": ("38848004", "Duodenum"),
    "sacrum": ("54735007", "Sacrum"),
    "femur": ("71341001", "Femur"),
    "humerus": ("85050009", "Humerus"),
    "scapula": ("79601000", "Scapula"),
    "clavicula": ("51299004", "Clavicle"),
    "clavicle": ("51299004", "Clavicle"),
    "rib": ("113197003", "Rib"),
    "vertebrae c": ("122494005", "Cervical vertebra"),
    "vertebrae t": ("122495006", "Thoracic vertebra"),
    "vertebrae l": ("122496007", "Lumbar vertebra"),
    "prostate": ("41216001", "Prostate"),
}

#: normalised name -> (code, meaning); findings (finding = true, one ROI per connected component)
FINDINGS: dict[str, tuple[str, str]] = {
    "nodule": ("27925004", "Nodule"),
    "lung nodule": ("27925004", "Nodule"),
    "lesion": ("52988006", "Lesion"),
    "mass": ("4147007", "Mass"),
    "tumor": ("108369006", "Neoplasm"),
    "tumour": ("108369006", "Neoplasm"),
    "neoplasm": ("108369006", "Neoplasm"),
}

#: classifiers: (words found in the bundle's task or name, what is classified, its classes by channel name);
#: ACR BI-RADS breast composition as SNOMED CT codes it (the CID 6000-series breast imaging value sets)
CLASS_VOCABULARIES: list[tuple[tuple[str, ...], tuple[str, str, str], dict[str, tuple[str, str]]]] = [
    (("breast density", "breast composition"), ("129715009", "SCT", "Breast composition"), {
        "a": ("129716005", "Almost entirely fat"), "b": ("129717001", "Scattered fibroglandular densities"),
        "c": ("129718006", "Heterogeneously dense"), "d": ("129719003", "Extremely dense")}),
]

_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


@dataclass
class DraftCard:
    """A generated card and what a person must review."""

    text: str
    labels: int
    #: channel names with no code in the table (coded with a placeholder in the card)
    unmapped: list[str] = field(default_factory=list)
    #: channel names coded without their laterality (the structure's code; laterality in the name only)
    no_laterality: list[str] = field(default_factory=list)
    #: bundle config ids the installed MONAI does not accept (removed at load through ``[bundle] remove``)
    removed: list[str] = field(default_factory=list)
    #: network arguments that would download weights when the network is built (switched off in the card)
    no_download: list[str] = field(default_factory=list)
    #: inputs of a study-level bundle matched by their name only (the card's rule needs a person's review)
    unmatched_inputs: list[str] = field(default_factory=list)
    #: the inputs drafted as ``[[inputs]]`` tables (none for a one-series bundle)
    inputs: list[str] = field(default_factory=list)


def unaccepted_network_args(bundle: Path) -> list[str]:
    """``network_def`` arguments the installed MONAI's network class does not accept (arguments removed
    since the bundle was published, such as SwinUNETR's ``img_size`` in MONAI 1.5), as config ids."""
    import inspect

    from node.inference.registry import INFERENCE_CONFIGS

    path = next((bundle / "configs" / n for n in INFERENCE_CONFIGS if (bundle / "configs" / n).is_file()), None)
    if path is None:
        return []
    if path.suffix == ".json":
        config = json.loads(path.read_text())
    else:
        import yaml

        config = yaml.safe_load(path.read_text())
    net = config.get("network_def") if isinstance(config, dict) else None
    if not isinstance(net, dict):
        return []
    target = str(net.get("_target_", ""))
    if not target or ("." in target and not target.startswith("monai.")):
        return []  # the bundle's own network class: its own code decides
    import monai.networks.nets as nets

    cls = getattr(nets, target.rsplit(".", 1)[-1], None)
    if cls is None:
        return []
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [f"network_def#{k}" for k in net if not k.startswith("_") and k not in params]


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def _match(name: str) -> tuple[tuple[str, str] | None, bool, bool]:
    """(code, is_finding, laterality_lost) for a channel name."""
    n = _norm(name)
    m = re.fullmatch(r"(left|right) (.+)", n)
    if m and f"{m.group(2)} {m.group(1)}" in ANATOMY:  # "Right Kidney" as well as "kidney_right"
        n = f"{m.group(2)} {m.group(1)}"
    if n in FINDINGS:
        return FINDINGS[n], True, False
    if n in ANATOMY:
        return ANATOMY[n], False, False
    m = re.fullmatch(r"(vertebrae [ctl])\d+", n)
    if m:
        return ANATOMY[m.group(1)], False, False
    base = re.sub(r"\b(left|right)\b|\b\d+\b", " ", n)
    base = re.sub(r"\s+", " ", base).strip()
    if base in ANATOMY:
        return ANATOMY[base], False, base != n and bool(re.search(r"\b(left|right)\b", n))
    word = next((w for w in n.split() if w in FINDINGS), None)  # "enhancing tumor", "tumor core": a kind of finding
    if word is not None:
        return FINDINGS[word], True, False
    return None, False, False


def _toml_str(s: str) -> str:
    return json.dumps(s)


def _class_label(n: int, value: int, name: str, vocabulary: Any, draft: DraftCard, task: str) -> list[str]:
    """The ``[[labels]]`` table of a classifier's class: ``category`` what is classified, ``type`` the class."""
    if vocabulary is not None and _norm(name) in vocabulary[2]:
        cat = vocabulary[1]
        code, meaning = vocabulary[2][_norm(name)]
        typ = (code, "SCT", meaning)
        lines = ["[[labels]]"]
    else:
        cat = vocabulary[1] if vocabulary is not None else \
            (re.sub(r"[^A-Za-z0-9]+", "_", task).upper()[:16] or "CLASS", "99PREANNOT", task[:64] or "Class")
        draft.unmapped.append(name)
        typ = (re.sub(r"[^A-Za-z0-9]+", "_", name).upper()[:16] or f"CLASS{value}", "99PREANNOT", name[:64])
        lines = ["[[labels]]", f"# UNMAPPED: class {name!r} has no code in the node's table; give it one"]
    colour = _COLOURS[n % len(_COLOURS)]
    return [*lines, f"value = {value}", f"name = {_toml_str(name[:64])}",
            f'category = {{ code = "{cat[0]}", scheme = "{cat[1]}", meaning = {_toml_str(cat[2][:64])} }}',
            f'type = {{ code = "{typ[0]}", scheme = "{typ[1]}", meaning = {_toml_str(typ[2][:64])} }}',
            f"color = [{colour[0]}, {colour[1]}, {colour[2]}]", "finding = false", ""]


#: the modality words bundles use in their metadata (``network_data_format.inputs.*.modality``) -> DICOM
_MODALITY_WORDS = {"ct": "CT", "mr": "MR", "mri": "MR", "pet": "PT", "pt": "PT", "mammogram": "MG",
                   "mammography": "MG", "mg": "MG", "x ray": "DX", "xray": "DX", "dx": "DX", "cr": "CR",
                   "ultrasound": "US", "us": "US"}


def _modality(meta: dict[str, Any], bundle: Path) -> str:
    """The DICOM modality the bundle's inputs are, from its metadata (its inputs' ``modality``), else from the
    words of its name and task; "" when nothing says."""
    fmt = meta.get("network_data_format")
    inputs = fmt.get("inputs", {}) if isinstance(fmt, dict) else {}
    for spec in inputs.values() if isinstance(inputs, dict) else []:
        word = _norm(str(spec.get("modality", ""))) if isinstance(spec, dict) else ""
        if word in _MODALITY_WORDS:
            return _MODALITY_WORDS[word]
    words = _norm(f"{meta.get('name', '')} {meta.get('task', '')} {bundle.name}").split()
    return next((_MODALITY_WORDS[w] for w in words if w in _MODALITY_WORDS and len(w) > 1), "")


def output_names(meta: dict[str, object]) -> dict[int, str]:
    """The bundle's outputs by channel or value, as its metadata names them: ``channel_def``, else
    ``label_def`` (the values of a single-channel label map)."""
    fmt = meta.get("network_data_format") if isinstance(meta, dict) else None
    outputs = fmt.get("outputs", {}) if isinstance(fmt, dict) else {}
    pred: object = (outputs.get("pred") or next(iter(outputs.values()), {})) if isinstance(outputs, dict) else {}
    if not isinstance(pred, dict):
        return {}
    for key in ("channel_def", "label_def"):
        names = pred.get(key)
        if isinstance(names, dict) and names:
            return {int(k): str(v) for k, v in names.items() if str(k).strip().isdigit()}
    return {}


_WHERE_RE = re.compile(r"x\[\[?(\d+)\]?\]\s*>\s*0(?:\.0*)?\s*,\s*(\d+)")


def postprocessed_values(config: dict[str, object]) -> dict[int, int]:
    """Output channel -> label value, where the bundle's postprocessing turns per-channel (sigmoid) outputs into one
    label map with a ``Lambdad`` of nested ``torch.where(x[[c]] > 0, value, ...)`` (brats: channel 2 -> 4, 0 -> 1,
    1 -> 2); empty when it does not."""
    post = config.get("postprocessing")
    transforms = post.get("transforms", []) if isinstance(post, dict) else []
    out: dict[int, int] = {}
    for t in transforms if isinstance(transforms, list) else []:
        if isinstance(t, dict) and str(t.get("_target_", "")).split(".")[-1] == "Lambdad":
            found = _WHERE_RE.findall(str(t.get("func", "")))
            if found:
                out = {int(c): int(v) for c, v in found}
    return out


def draft_card(bundle: Path) -> DraftCard:
    """A draft ``model_card.toml`` for the bundle at ``bundle``.

    Raises:
        ValueError: no readable ``configs/metadata.json``.
    """
    meta_path = bundle / "configs" / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_path}: {exc}") from exc
    try:
        kind = kind_of(read_inference_config(bundle), meta)
    except ModelError as exc:
        raise ValueError(str(exc)) from exc
    channels = output_names(meta)
    values = postprocessed_values(read_inference_config(bundle))
    if values and set(values) <= set(channels):  # sigmoid channels made one label map by the bundle's own code
        names = sorted((v, channels[c]) for c, v in values.items() if v > 0)
    elif kind.background_channel:
        names = [(v, n) for v, n in sorted(channels.items()) if v > 0 and _norm(n) != "background"]
    else:  # a classifier: every channel is a class
        names = [(v + 1, n) for v, n in sorted(channels.items())]
    if not names:  # a detector: its classes are not named in the metadata; guess from the task
        task = _norm(f"{meta.get('task', '')} {meta.get('name', '')}")
        guess = next((k for k in FINDINGS if k in task), "finding")
        names = [(1, guess)]
    draft = DraftCard(text="", labels=len(names))
    modality = _modality(meta, bundle)
    vocabulary = None
    if not kind.background_channel:  # a classifier: what it classifies, and its classes' codes where known
        words = _norm(f"{meta.get('task', '')} {meta.get('name', '')} {bundle.name}")
        vocabulary = next((v for v in CLASS_VOCABULARIES if any(w in words for w in v[0])), None)
    lines = ["# Draft made by `preannot models add` from configs/metadata.json: review every label (codes,",
             "# finding or anatomy, colours) before clinical use. See docs/models.md.", "", "[model]",
             f"modality = [{_toml_str(modality)}]" if modality else "modality = []",
             f"description = {_toml_str(str(meta.get('description', meta.get('name', bundle.name)))[:400])}",
             f"intended_use = {_toml_str(str(meta.get('intended_use', ''))[:400])}", ""]
    for n, (value, name) in enumerate(names):
        if vocabulary is not None or not kind.background_channel:
            lines += _class_label(n, value, name, vocabulary, draft, str(meta.get("task", "") or bundle.name))
            continue
        code, finding, lat_lost = _match(name)
        nice = name.replace("_", " ").strip()
        label = nice[:1].upper() + nice[1:]
        cat = FINDING_CATEGORY if finding else ANATOMY_CATEGORY
        lines.append("[[labels]]")
        if code is None:
            draft.unmapped.append(name)
            lines.append(f"# UNMAPPED: {name!r} is not in the node's code table; give it a SNOMED CT code")
            code = (re.sub(r"[^A-Za-z0-9]+", "_", name).upper()[:16] or f"LABEL{value}", label)
            typ = (code[0], "99PREANNOT", code[1])
        else:
            typ = (code[0], "SCT", code[1])
            if lat_lost:
                draft.no_laterality.append(name)
                lines.append(f"# laterality of {name!r} is in the name only (structure code without laterality)")
        colour = _COLOURS[n % len(_COLOURS)]
        lines += [f"value = {value}", f"name = {_toml_str(label[:64])}",
                  f'category = {{ code = "{cat[0]}", scheme = "{cat[1]}", meaning = "{cat[2]}" }}',
                  f'type = {{ code = "{typ[0]}", scheme = "{typ[1]}", meaning = {_toml_str(typ[2][:64])} }}']
        if not finding and typ[1] == "SCT":
            lines.append(f'finding_site = {{ code = "{typ[0]}", scheme = "SCT", meaning = {_toml_str(typ[2][:64])} }}')
        lines += [f"color = [{colour[0]}, {colour[1]}, {colour[2]}]", f"finding = {'true' if finding else 'false'}",
                  ""]
    lines += ["[outputs]", f"seg = {'true' if kind.background_channel else 'false'}", "sr = true", ""]
    draft.removed = unaccepted_network_args(bundle)
    try:
        draft.no_download = downloading_args(read_inference_config(bundle).get("network_def"))
    except ModelError:
        draft.no_download = []
    bundle_lines = []
    removals = list(draft.removed) + [d for d in draft.no_download if d.endswith("#weights")]
    if draft.removed:
        import monai

        bundle_lines += [f"# {', '.join(draft.removed)}: not accepted by the installed MONAI {monai.__version__} (an "
                         "argument", "# removed since the bundle was published); removed from the bundle's config "
                         "when it loads"]
    if draft.no_download:
        bundle_lines += [f"# {', '.join(draft.no_download)}: the published config downloads weights when the network "
                         "is built;", "# the node never downloads: the bundle's own weights file replaces them"]
        flags = [d for d in draft.no_download if not d.endswith("#weights")]
        if flags:
            bundle_lines.append("overrides = { " + ", ".join(f"{_toml_str(d)} = false" for d in flags) + " }")
    if removals:
        bundle_lines.append("remove = [" + ", ".join(_toml_str(r) for r in removals) + "]")
    if bundle_lines:
        lines += ["[bundle]", *bundle_lines, ""]
    inputs = bundle_inputs(read_inference_config(bundle), meta)
    if len(inputs) > 1:
        draft.inputs = list(inputs.names)
        lines += _input_tables(inputs.names, modality, draft)
        if any(n.strip().lower() == "adc" for n in inputs.names):  # a derived map: the card must say it takes one
            at = next(n for n, line in enumerate(lines) if line.startswith("modality ="))
            lines.insert(at + 1, 'derived = ["ADC"]')
    draft.text = "\n".join(lines)
    return draft


#: what a study-level model's input is called -> the conditions a series of it meets (drafted in its card); the
#: first entry whose pattern matches the input's name wins
INPUT_MATCHES: tuple[tuple[str, dict[str, str], str | None], ...] = (
    (r"^t1(c|ce|gd|\+c|_?post|_?contrast)$", {"SeriesDescription": "re:(?i)t1.*(post|gd|\\+c|ce\\b|contrast)|mprage.*gd"},
     None),
    (r"^t1(w|n|_?pre)?$", {"SeriesDescription": "re:(?i)t1", "ContrastBolusAgent": "!"}, None),
    (r"^flair$", {"SeriesDescription": "re:(?i)flair"}, None),
    (r"^t2(w)?$", {"SeriesDescription": "re:(?i)^(?!.*flair).*t2"}, None),
    (r"^adc$", {"ImageType": "contains:ADC"}, None),
    (r"^(hbv|dwi|b\d+|highb|high_b)$", {"ImageType": "contains:DIFFUSION"}, "max:DiffusionBValue"),
    (r"^(artery|arterial|art)$", {"SeriesDescription": "re:(?i)arter"}, None),
    (r"^(vein|venous|portal|pv)$", {"SeriesDescription": "re:(?i)ven|portal"}, None),
    (r"^(excret|excretory|delayed|delay|urographic)$", {"SeriesDescription": "re:(?i)excret|delay|urogra"}, None),
)


def _input_tables(names: tuple[str, ...], modality: str, draft: DraftCard) -> list[str]:
    """One ``[[inputs]]`` table per input of a study-level bundle, in its order, with the conditions a series of
    it is likely to meet (by the input's name; a name the table does not know is matched by SeriesDescription)."""
    lines = ["# The series of a study this model takes, in the bundle's order (the first is the reference: the SEG is",
             "# made on it). Review each match rule against your scanners' series descriptions (docs/models.md).", ""]
    for name in names:
        norm = name.strip().lower().replace(" ", "")
        found = next(((m, v) for pattern, m, v in INPUT_MATCHES if re.match(pattern, norm)), None)
        match = dict(found[0]) if found else {"SeriesDescription": f"re:(?i){re.escape(name)}"}
        if modality:
            match = {"Modality": modality, **match}
        if found is None:
            draft.unmatched_inputs.append(name)
            lines.append(f"# REVIEW: no rule known for an input named {name!r}; matched by its name in SeriesDescription")
        lines += ["[[inputs]]", f"name = {_toml_str(name)}",
                  "match = { " + ", ".join(f"{k} = {_toml_str(v)}" for k, v in match.items()) + " }"]
        if found is not None and found[1]:
            lines.append(f"volume = {_toml_str(found[1])}")
        lines.append("")
    return lines
