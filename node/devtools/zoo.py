"""Published MONAI Model Zoo bundles with random weights, for tests and benchmarks.

Released weights cannot be downloaded on these machines, so a bundle gets weights made here for its own
``network_def`` (seeded), with the last layer's bias tilted so that the outputs are not empty: the whole
path (the bundle's transforms, inferer and inversion, the node's outputs) then runs exactly as with
released weights, only the results mean nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["DETECTION_CARD", "SPLEEN_CARD", "install_detector", "install_segmenter", "random_weights"]

#: model card for spleen_ct_segmentation: the spleen as anatomy (add a [bundle] table for overrides)
SPLEEN_CARD = """
[model]
modality = ["CT"]
description = "MONAI Model Zoo spleen_ct_segmentation, random weights."

[[labels]]
value = 1
name = "Spleen"
category = { code = "91723000", scheme = "SCT", meaning = "Anatomical structure" }
type = { code = "78961009", scheme = "SCT", meaning = "Spleen" }
finding_site = { code = "78961009", scheme = "SCT", meaning = "Spleen" }
color = [157, 108, 162]
finding = false
"""

#: model card for lung_nodule_ct_detection; it ends with its [bundle.overrides] table (more keys may follow):
#: clinical DICOM is "raw" data for this bundle, so its own Spacingd runs
DETECTION_CARD = """
[model]
modality = ["CT"]
description = "MONAI Model Zoo lung_nodule_ct_detection, random weights."

[[labels]]
value = 1
name = "Nodule"
category = { code = "49755003", scheme = "SCT", meaning = "Morphologically abnormal structure" }
type = { code = "27925004", scheme = "SCT", meaning = "Nodule" }
finding_site = { code = "39607008", scheme = "SCT", meaning = "Lung" }

[bundle.overrides]
whether_raw_luna16 = true
"""


def install_segmenter(zoo: Path, name: str, models_dir: Path, card: str, *, yaml_config: bool = False,
                      favour: int = 1, tilt: float = 3.0) -> Path:
    """Copy segmentation bundle ``name`` from ``zoo`` into ``models_dir`` with seeded random weights whose
    output favours channel ``favour`` (by ``tilt`` on its last bias; 0 leaves the classes mixed), and its
    model card. ``yaml_config`` rewrites its inference config as
    ``inference.yaml`` (as several Zoo bundles publish it)."""
    import torch
    from monai.bundle import ConfigParser

    dst = models_dir / name
    shutil.copytree(zoo / name, dst)
    cfg = dst / "configs" / "inference.json"
    if yaml_config:
        import yaml

        (dst / "configs" / "inference.yaml").write_text(yaml.safe_dump(json.loads(cfg.read_text())))
        cfg.unlink()
        cfg = dst / "configs" / "inference.yaml"
    parser = ConfigParser()
    parser.read_config(str(cfg))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    state = net.state_dict()
    out_channels = int(parser["network_def"]["out_channels"])
    last_bias = [k for k, v in state.items() if k.endswith("bias") and v.shape == (out_channels,)][-1]
    state[last_bias] = torch.zeros(out_channels)
    state[last_bias][favour] = tilt  # the class everywhere but where the random features disagree
    (dst / "models").mkdir(exist_ok=True)
    torch.save(state, dst / "models" / "model.pt")
    (dst / "model_card.toml").write_text(card)
    return dst


def install_detector(zoo: Path, models_dir: Path, card: str, name: str = "lung_nodule_ct_detection") -> Path:
    """Copy detection bundle ``name`` with seeded random weights, the classification bias tilted so that it
    finds boxes, and its model card."""
    import torch
    from monai.bundle import ConfigParser

    dst = models_dir / name
    shutil.copytree(zoo / name, dst)
    parser = ConfigParser()
    parser.read_config(str(dst / "configs" / "inference.json"))
    parser["device"] = "cpu"
    torch.manual_seed(0)
    state = parser.get_parsed_content("network_def").state_dict()
    cls_bias = [k for k in state if "classification_head" in k and k.endswith("bias")][-1]
    state[cls_bias] = torch.full_like(state[cls_bias], 1.0)
    (dst / "models").mkdir(exist_ok=True)
    torch.save(state, dst / "models" / "model.pt")
    (dst / "model_card.toml").write_text(card)
    return dst


def random_weights(bundle: Path, *, seed: int = 0, overrides: dict[str, object] | None = None) -> Path:
    """Seeded random weights for the bundle's own ``network_def`` as the node builds it (the ``[bundle]`` overrides
    and removals of its model card applied, when it has one, then ``overrides``: e.g. a ``pretrained`` switched
    off so that building it downloads nothing), saved as ``models/model.pt``; returns the path."""
    import tomllib

    import torch
    from monai.bundle import ConfigParser

    from node.inference.registry import find_inference_config

    config = find_inference_config(bundle)
    if config is None:
        raise FileNotFoundError(f"{bundle}: no inference config")
    parser = ConfigParser()
    parser.read_config(str(config))
    card_path = bundle / "model_card.toml"
    card = tomllib.loads(card_path.read_text()).get("bundle", {}) if card_path.is_file() else {}
    for key in card.get("remove", []):
        parent_id, _, last = key.rpartition("#")
        parent = parser[parent_id] if parent_id else parser.config
        if isinstance(parent, dict):
            parent.pop(last, None)
        if parent_id:
            parser[parent_id] = parent
    for key, value in {**card.get("overrides", {}), **(overrides or {})}.items():
        if key.startswith("network_def"):
            parser[key] = value
    torch.manual_seed(seed)
    state = parser.get_parsed_content("network_def").state_dict()
    (bundle / "models").mkdir(exist_ok=True)
    path = bundle / "models" / "model.pt"
    torch.save(state, path)
    return path
