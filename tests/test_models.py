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
from node.errors import ModelError, ModelTimeoutError
from node.imaging.volume import load_series
from node.inference.registry import Registry
from node.inference.runner import BundleRunner


def test_registry_lists_demo_model(models_dir: Path) -> None:
    reg = Registry(models_dir)
    m = reg.get("lesion-ct-demo")
    assert m.version == "0.2.0"
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
    assert "good  version 0.2.0" in result.output and "no-card  BROKEN" in result.output


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


# --- memory-bounded resampling (the demo bundle's scripts/transforms.py) -----------------------------

def _bounded_module(models_dir: Path) -> Any:
    import importlib.util

    path = models_dir / "lesion-ct-demo" / "scripts" / "transforms.py"
    spec = importlib.util.spec_from_file_location("lesion_ct_demo_transforms", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _meta_image(arr: np.ndarray, affine: np.ndarray) -> Any:
    from monai.data import MetaTensor

    return MetaTensor(torch.from_numpy(arr), affine=torch.as_tensor(affine),
                      meta={"original_channel_dim": "no_channel", "spatial_shape": np.array(arr.shape)})


@pytest.mark.parametrize("pixdim", [(1.40625, 1.40625, 2.5), (0.5, 0.93, 1.1)])
def test_bounded_spacing_matches_monai_spacing_and_inverts(models_dir: Path, pixdim: tuple[float, ...]) -> None:
    from monai.transforms import Compose, EnsureChannelFirstd, Invertd, Spacingd

    mod = _bounded_module(models_dir)
    rng = np.random.default_rng(7)
    arr = rng.integers(-1000, 1000, size=(41, 37, 23)).astype(np.int16)
    affine = np.array([[-0.7, 0, 0, 120.3], [0, -0.75, 0, -80.1], [0, 0, 1.25, -300.2], [0, 0, 0, 1]])
    ref = Compose([EnsureChannelFirstd("image"), Spacingd("image", pixdim=pixdim, mode="bilinear",
                                                              dtype=torch.float32)])
    new = Compose([EnsureChannelFirstd("image"), mod.BoundedSpacingd("image", pixdim=pixdim, slab=3)])
    a = ref({"image": _meta_image(arr.astype(np.float32), affine)})
    b = new({"image": _meta_image(arr, affine)})  # int16 in: converted one slab at a time
    assert a["image"].shape == b["image"].shape
    np.testing.assert_allclose(b["image"].affine.numpy(), a["image"].affine.numpy(), atol=1e-9)
    np.testing.assert_allclose(b["image"].numpy(), a["image"].numpy(), atol=0.05)  # float32 rounding of HU
    # a label map on the resampled grid goes back to the input grid, as MONAI's inverse puts it
    label = (a["image"] > 200).to(torch.uint8)
    a["pred"], b["pred"] = label.clone(), label.clone()
    back_xform = np.linalg.inv(b["image"].applied_operations[-1]["extra_info"]["xform"])
    back_ref = Invertd("pred", transform=ref, orig_keys="image", nearest_interp=True)(a)["pred"]
    back = Invertd("pred", transform=new, orig_keys="image", nearest_interp=True)(b)["pred"]
    assert back.shape == (1, *arr.shape) and back.dtype == torch.uint8  # nearest keeps the label type
    np.testing.assert_allclose(back.affine.numpy(), affine, atol=1e-9)
    # identical except where a sample falls exactly half-way between two voxels (MONAI's float
    # rounding picks either side; the bounded version rounds half to even)
    ties = np.zeros(arr.shape, dtype=bool)
    for axis, n in enumerate(arr.shape):
        c = back_xform[axis, axis] * np.arange(n) + back_xform[axis, 3]
        on_tie = np.abs(c - np.floor(c) - 0.5) < 1e-6
        ties |= on_tie.reshape([-1 if d == axis else 1 for d in range(3)])
    differ = back.numpy()[0] != back_ref.numpy()[0].astype(np.uint8)
    assert not (differ & ~ties).any()
    assert (~ties).mean() > 0.4  # the comparison is not vacuous
    # laid out so that the [k, j, i] transpose the runner takes is contiguous (no copy of the label map)
    assert back[0].numpy().transpose(2, 1, 0).flags.c_contiguous


def test_bounded_spacing_oblique_falls_back_to_monai(models_dir: Path) -> None:
    mod = _bounded_module(models_dir)
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    arr = np.arange(10 * 12 * 8, dtype=np.float32).reshape(1, 10, 12, 8)
    out = mod.BoundedSpacingd("image", pixdim=(2.0, 2.0, 2.0))({"image": _meta_image(arr, affine)})["image"]
    assert out.ndim == 4 and out.dtype == torch.float32


def test_bundle_scripts_resolve_to_their_own_bundle(demo_model: Any) -> None:
    """Every Model Zoo bundle calls its package ``scripts``: another bundle's must not shadow ours."""
    import sys
    import types

    stale = types.ModuleType("scripts")  # as if another bundle's code had been left behind
    sys.modules["scripts"] = stale
    try:
        runner = BundleRunner(demo_model, device="cpu")
    finally:
        sys.modules.pop("scripts", None)
    assert runner.input_dtype is None  # the bundle's LoadImaged says dtype null: int16 CT goes in as is
    assert str(demo_model.path) not in sys.path
    # the resampling transform came from this bundle's own scripts/transforms.py, not the stale module
    bounded = [t for t in runner.preprocessing.transforms if type(t).__name__ == "BoundedSpacingd"]
    assert len(bounded) == 1
    source = Path(type(bounded[0]).__call__.__globals__["__file__"])
    assert source == demo_model.path / "scripts" / "transforms.py"


def test_large_volume_is_mapped_and_released(small_series: Path, tmp_path: Path) -> None:
    files = sorted(small_series.glob("*.dcm"))
    plain = load_series(files)
    mapped = load_series(files, scratch_dir=tmp_path, map_above_bytes=0)
    assert plain.mapping is None and mapped.mapping is not None
    assert list(tmp_path.iterdir()) == []  # the scratch file is unlinked from the start: nothing to clean up
    np.testing.assert_array_equal(mapped.pixels, plain.pixels)
    mapped.release_memory()  # pages go back to the page cache; the pixels read back unchanged
    np.testing.assert_array_equal(mapped.pixels, plain.pixels)


def test_bounded_spacing_on_the_target_grid_is_a_copy(models_dir: Path) -> None:
    from monai.transforms import Compose, EnsureChannelFirstd, Invertd

    mod = _bounded_module(models_dir)
    affine = np.diag([1.40625, 1.40625, 2.5, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    arr = np.random.default_rng(0).integers(-5, 5, size=(20, 22, 9)).astype(np.int16)
    t = Compose([EnsureChannelFirstd("image"), mod.BoundedSpacingd("image", pixdim=(1.40625, 1.40625, 2.5))])
    d = t({"image": _meta_image(arr, affine)})
    assert d["image"].dtype == torch.float32 and np.array_equal(d["image"][0].numpy(), arr)
    d["pred"] = (d["image"] > 0).to(torch.uint8)
    back = Invertd("pred", transform=t, orig_keys="image", nearest_interp=True)(d)["pred"]
    assert back.dtype == torch.uint8 and np.array_equal(back[0].numpy(), arr > 0)
