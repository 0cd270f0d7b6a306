"""Model Zoo bundles as published (../shared/data/model_zoo: configs, scripts, licences; no weights).

Each test gives a bundle random weights made here for its own ``network_def`` (the last layer's bias tilted
so that the outputs are not empty), writes a model card, and runs it through ``preannot run`` on a small
synthetic CT: the whole path (the bundle's own transforms, inferer and inversion, the node's outputs) runs
exactly as with released weights. Skipped cleanly without ../shared.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT

ZOO = ROOT.parent / "shared" / "data" / "model_zoo"
pytestmark = pytest.mark.skipif(not ZOO.is_dir(), reason=f"{ZOO} is not here (the shared data folder)")

SPLEEN_CARD = """
[model]
modality = ["CT"]
description = "MONAI Model Zoo spleen_ct_segmentation, random weights (test)."

[[labels]]
value = 1
name = "Spleen"
category = { code = "91723000", scheme = "SCT", meaning = "Anatomical structure" }
type = { code = "78961009", scheme = "SCT", meaning = "Spleen" }
finding_site = { code = "78961009", scheme = "SCT", meaning = "Spleen" }
color = [157, 108, 162]
finding = false

[bundle]
overrides = { "inferer#roi_size" = [32, 32, 32], "inferer#sw_batch_size" = 1 }
"""


def install(name: str, models_dir: Path, card: str, *, yaml_config: bool = False, favour: int = 1) -> Path:
    """Copy a Zoo bundle, give it seeded random weights whose output favours channel ``favour``, add the card."""
    import torch
    from monai.bundle import ConfigParser

    dst = models_dir / name
    shutil.copytree(ZOO / name, dst)
    cfg = dst / "configs" / "inference.json"
    if yaml_config:  # as several Zoo bundles publish it
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


def _config(tmp_path: Path, models_dir: Path) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n\n[models]\ndir = "{models_dir}"\ndevice = "cpu"\n')
    return cfg


@pytest.mark.parametrize("yaml_config", [False, True], ids=["json", "yaml"])
def test_spleen_bundle_as_published_gives_the_organ_with_its_volume(
        yaml_config: bool, tmp_path: Path, small_series: Path, dciodvfy: Callable[[Path], list[str]]) -> None:
    from pydicom import dcmread
    from typer.testing import CliRunner

    from node.cli import app

    models = tmp_path / "models"
    install("spleen_ct_segmentation", models, SPLEEN_CARD, yaml_config=yaml_config)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", "--model", "spleen_ct_segmentation", str(small_series), str(out),
                                 "--config", str(_config(tmp_path, models)), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "result.json").read_text())
    rois = result["rois"]
    # anatomy: one region for the whole organ (not one per connected piece), with its volume
    assert [(x["label_name"], x["kind"]) for x in rois] == [("Spleen", "anatomy")]
    assert rois[0]["volume_mm3"] > 0
    seg, sr = out / "seg.dcm", out / "sr.dcm"
    assert dciodvfy(seg) == [] and dciodvfy(sr) == []
    segment_labels = [s.SegmentLabel for s in dcmread(seg).SegmentSequence]
    assert segment_labels == ["Spleen"]
    text = str(dcmread(sr))
    assert "Spleen (AI)" in text and "Volume" in text


def test_card_override_of_a_missing_key_is_refused_at_load(tmp_path: Path) -> None:
    from node.errors import ModelError
    from node.inference.registry import load_model
    from node.inference.runner import BundleRunner

    card = SPLEEN_CARD.replace('"inferer#sw_batch_size" = 1', '"inferer#no_such_key" = 1')
    folder = install("spleen_ct_segmentation", tmp_path / "models", card)
    with pytest.raises(ModelError, match="no_such_key"):
        BundleRunner(load_model(folder), device="cpu")
