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

__all__ = ["DETECTION_CARD", "PHASE_CARD", "SPLEEN_CARD", "install_detector", "install_segmenter", "random_weights",
           "set_output_bias", "write_phase_bundle"]

from node.inference.smoke import random_weights

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


#: model card of the three-phase bundle :func:`write_phase_bundle` makes: its inputs matched by series description
PHASE_CARD = """
[model]
modality = ["CT"]
# a bundle that loads each phase under its own key and resamples them itself, as the Zoo's
# renalStructures_CECT_segmentation does
description = "Three-phase contrast CT kidney segmenter (synthetic, random weights)"

[[labels]]
value = 1
name = "Kidney"
category = { code = "91723000", scheme = "SCT", meaning = "Anatomical structure" }
type = { code = "64033007", scheme = "SCT", meaning = "Kidney" }
finding_site = { code = "64033007", scheme = "SCT", meaning = "Kidney" }
color = [200, 120, 60]
finding = false

[[inputs]]
name = "artery"
match = { Modality = "CT", SeriesDescription = "re:(?i)arter" }

[[inputs]]
name = "vein"
match = { Modality = "CT", SeriesDescription = "re:(?i)ven|portal" }

[[inputs]]
name = "excret"
match = { Modality = "CT", SeriesDescription = "re:(?i)excret|delay" }
"""


def write_phase_bundle(dst: Path, *, card: str | None = PHASE_CARD, bias: tuple[float, float] = (-3.0, 3.0),
                       seed: int = 0) -> Path:
    """A MONAI bundle taking three CT phases as separate keys (``artery``, ``vein``, ``excret``): its own
    ``Spacingd`` on each, ``ResampleToMatchd`` onto the arterial grid, ``ConcatItemsd`` into a 3-channel image, a
    small UNet, and ``Invertd`` back to the arterial series (the pattern of the Zoo's renalStructures_CECT bundle).
    Its weights are random with the last layer's bias set to ``bias`` (the default labels the whole arterial grid
    kidney: one region whose volume is the grid's, a number a test can check). ``card=None`` writes no card."""
    keys = ["artery", "vein", "excret"]
    config = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "phase_keys": keys,
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 3, "out_channels": 2,
                        "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 0},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "@phase_keys"},
            {"_target_": "EnsureChannelFirstd", "keys": "@phase_keys"},
            {"_target_": "Orientationd", "keys": "@phase_keys", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@phase_keys", "pixdim": [3.0, 3.0, 3.0], "mode": "bilinear"},
            {"_target_": "ResampleToMatchd", "keys": ["vein", "excret"], "key_dst": "artery", "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "@phase_keys", "a_min": -100, "a_max": 400, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "ConcatItemsd", "keys": "@phase_keys", "name": "image"},
            {"_target_": "EnsureTyped", "keys": "image"}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 32], "sw_batch_size": 1,
                    "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "artery",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]},
    }
    channel = {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
               "spatial_shape": ["*", "*", "*"], "dtype": "float32", "value_range": [-1024, 3071],
               "is_patch_data": False}
    metadata = {
        "version": "0.1.0", "name": "three_phase_kidney_ct", "task": "kidney segmentation on three-phase CT",
        "description": "Three-phase contrast CT kidney segmenter (synthetic test bundle, random weights)",
        "authors": "preannot", "intended_use": "Tests of study-level jobs; not for clinical use",
        "network_data_format": {
            "inputs": {k: dict(channel) for k in keys},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                                 "spatial_shape": ["*", "*", "*"], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": {"0": "background", "1": "kidney"}}}},
    }
    (dst / "configs").mkdir(parents=True, exist_ok=True)
    (dst / "configs" / "inference.json").write_text(json.dumps(config, indent=1))
    (dst / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=1))
    if card is not None:
        (dst / "model_card.toml").write_text(card)
    random_weights(dst, seed=seed)
    return set_output_bias(dst, bias)


def set_output_bias(bundle: Path, bias: tuple[float, ...]) -> Path:
    """Make the network in ``bundle``'s ``models/model.pt`` output the constant ``bias`` per channel: the last
    convolution's weights zeroed and its bias set. Every voxel then gets the same outputs, so what the bundle's
    postprocessing makes of them is known (brats with ``(-6, 6, -6)``: "whole tumour" over the whole grid)."""
    import torch

    path = bundle / "models" / "model.pt"
    state = torch.load(path, weights_only=True)
    last = [k for k, v in state.items() if k.endswith("weight") and v.ndim >= 4
            and state.get(k.removesuffix("weight") + "bias") is not None
            and tuple(state[k.removesuffix("weight") + "bias"].shape) == (len(bias),)][-1]
    state[last].zero_()
    state[last.removesuffix("weight") + "bias"].copy_(torch.tensor(bias))
    torch.save(state, path)
    return bundle
