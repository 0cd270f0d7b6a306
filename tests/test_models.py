"""Model registry and the MONAI bundle runner (the real demo bundle on CPU)."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from node.cli import app
from node.dicom.volume import load_series
from node.errors import ModelError, ModelTimeoutError
from node.inference.registry import Registry
from node.inference.runner import BundleRunner


def test_registry_lists_demo_model(models_dir: Path) -> None:
    reg = Registry(models_dir)
    m = reg.get("lesion-ct-demo")
    assert m.version == "0.1.0"
    assert m.sha256 == hashlib.sha256(m.weights.read_bytes()).hexdigest()
    assert m.card.labels[0].type.code == "27925004"
    assert m.weights.stat().st_size < 8 * 2**20  # a few MB at most


def test_broken_bundle_is_reported_not_fatal(tmp_path: Path, models_dir: Path) -> None:
    shutil.copytree(models_dir / "lesion-ct-demo", tmp_path / "good")
    shutil.copytree(models_dir / "lesion-ct-demo", tmp_path / "no-card")
    (tmp_path / "no-card" / "model_card.toml").unlink()
    (tmp_path / "no-meta" / "configs").mkdir(parents=True)
    shutil.copytree(models_dir / "lesion-ct-demo", tmp_path / "bad-card")
    (tmp_path / "bad-card" / "model_card.toml").write_text("[[labels]]\nvalue = 0\nname = 'x'\n")
    reg = Registry(tmp_path)
    assert sorted(reg.models) == ["good"]
    assert "model_card.toml" in reg.broken["no-card"]
    assert "metadata.json" in reg.broken["no-meta"]
    assert "invalid model_card.toml" in reg.broken["bad-card"]
    with pytest.raises(ModelError, match="broken"):
        reg.get("no-card")
    with pytest.raises(ModelError, match="available"):
        reg.get("nope")
    result = CliRunner().invoke(app, ["models"], env={"PREANNOT_MODELS__DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert "good  version 0.1.0" in result.output and "no-card  BROKEN" in result.output


def test_runner_predicts_label_map_of_volume_shape(small_series: Path, demo_runner: Any) -> None:
    volume = load_series(sorted(small_series.glob("*.dcm")))
    labels = demo_runner.predict(volume)
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1}
    assert demo_runner.device.type == "cpu"


def test_runner_deadline(small_series: Path, demo_runner: Any) -> None:
    volume = load_series(sorted(small_series.glob("*.dcm")))
    with pytest.raises(ModelTimeoutError, match="timeout"):
        demo_runner.predict(volume, deadline=time.monotonic() - 1)


def test_torchscript_bundle_loads_and_agrees(tmp_path: Path, models_dir: Path, small_series: Path,
                                            demo_runner: Any) -> None:
    """The same bundle with models/model.ts instead of model.pt (the Model Zoo's other layout)."""
    bundle = tmp_path / "lesion-ts"
    shutil.copytree(models_dir / "lesion-ct-demo", bundle)
    (bundle / "models" / "model.pt").unlink()
    scripted = torch.jit.script(demo_runner.network.cpu().eval())
    scripted.save(str(bundle / "models" / "model.ts"))
    ts_model = Registry(tmp_path).get("lesion-ts")
    assert ts_model.weights.name == "model.ts"
    runner = BundleRunner(ts_model, device="cpu")
    volume = load_series(sorted(small_series.glob("*.dcm")))
    assert np.array_equal(runner.predict(volume), demo_runner.predict(volume))


def test_mismatched_weights_are_a_clear_error(tmp_path: Path, models_dir: Path) -> None:
    bundle = tmp_path / "wrong"
    shutil.copytree(models_dir / "lesion-ct-demo", bundle)
    torch.save({"unexpected.weight": torch.zeros(1)}, bundle / "models" / "model.pt")
    with pytest.raises(ModelError, match="do not match network_def"):
        BundleRunner(Registry(tmp_path).get("wrong"), device="cpu")


def test_cuda_requested_without_gpu(models_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelError, match="no CUDA device"):
        BundleRunner(Registry(models_dir).get("lesion-ct-demo"), device="cuda")


@pytest.mark.gpu
def test_cuda_amp_prediction_matches_cpu(small_series: Path, models_dir: Path, demo_runner: Any) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpu = BundleRunner(Registry(models_dir).get("lesion-ct-demo"), device="cuda", amp=True)
    volume = load_series(sorted(small_series.glob("*.dcm")))
    a, b = gpu.predict(volume), demo_runner.predict(volume)
    assert (a != b).mean() < 0.001
