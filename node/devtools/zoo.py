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

__all__ = ["install_detector", "install_segmenter"]


def install_segmenter(zoo: Path, name: str, models_dir: Path, card: str, *, yaml_config: bool = False,
                      favour: int = 1) -> Path:
    """Copy segmentation bundle ``name`` from ``zoo`` into ``models_dir`` with seeded random weights whose
    output favours channel ``favour``, and its model card. ``yaml_config`` rewrites its inference config as
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
    state[last_bias][favour] = 3.0  # the class everywhere but where the random features disagree
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
