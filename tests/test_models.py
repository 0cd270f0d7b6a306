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
    assert m.version == "0.3.0"
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
    assert "good  version 0.3.0" in result.output and "no-card  BROKEN" in result.output


def test_runner_predicts_label_map_of_volume_shape(small_series: Path, demo_runner: Any) -> None:
    volume = load_series(sorted(small_series.glob("*.dcm")))
    labels = demo_runner.predict(volume).labels
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
    assert np.array_equal(runner.predict(volume).labels, demo_runner.predict(volume).labels)


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
    a, b = gpu.predict(volume).labels, demo_runner.predict(volume).labels
    assert (a != b).mean() < 0.001


# --- memory-bounded resampling (node.inference.resample, put in place of the bundles' Spacingd) ------

def _meta_image(arr: np.ndarray, affine: np.ndarray) -> Any:
    from monai.data import MetaTensor

    return MetaTensor(torch.from_numpy(arr), affine=torch.as_tensor(affine),
                      meta={"original_channel_dim": "no_channel", "spatial_shape": np.array(arr.shape)})


@pytest.mark.parametrize("pixdim", [(1.40625, 1.40625, 2.5), (0.5, 0.93, 1.1), (1.5, 1.5, 2.0)])
@pytest.mark.parametrize("shape", [(41, 37, 23), (64, 64, 40)])
def test_bounded_spacing_gives_monai_spacing_voxels_and_inverse(pixdim: tuple[float, ...],
                                                                 shape: tuple[int, ...]) -> None:
    """Same voxels as stock MONAI forward (int16 in, float32 out), and the same way back through Invertd:
    nearest labels identical (ties included: 0.703125 -> 1.5 mm puts samples exactly half-way), trilinear
    probabilities identical."""
    from monai.transforms import Compose, EnsureChannelFirstd, Invertd, Orientationd, Spacingd

    from node.inference.resample import BoundedSpacingd

    rng = np.random.default_rng(7)
    arr = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    sp = (0.7, 0.75, 1.25) if shape[0] == 41 else (0.703125, 0.703125, 1.0)
    affine = np.array([[-sp[0], 0, 0, 120.3], [0, -sp[1], 0, -80.1], [0, 0, sp[2], -300.2], [0, 0, 0, 1]])
    head = [EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS", labels=None)]
    ref = Compose([*head, Spacingd("image", pixdim=pixdim, mode="bilinear")])
    new = Compose([*head, BoundedSpacingd("image", pixdim=pixdim, slab=3)])
    a = ref({"image": _meta_image(arr.astype(np.float32), affine)})
    b = new({"image": _meta_image(arr, affine)})  # int16 in: converted one slab at a time
    assert a["image"].shape == b["image"].shape and b["image"].dtype == torch.float32
    np.testing.assert_allclose(b["image"].affine.numpy(), a["image"].affine.numpy(), atol=1e-12)
    np.testing.assert_allclose(b["image"].numpy(), a["image"].numpy(), rtol=0, atol=1e-9)
    label = (a["image"] > 200).to(torch.uint8)
    a["pred"], b["pred"] = label.clone(), label.clone()
    back_ref = Invertd("pred", transform=ref, orig_keys="image", nearest_interp=True)(a)["pred"]
    back = Invertd("pred", transform=new, orig_keys="image", nearest_interp=True)(b)["pred"]
    assert back.shape == (1, *arr.shape) and back.dtype == torch.uint8  # nearest keeps the label type
    np.testing.assert_allclose(back.affine.numpy(), back_ref.affine.numpy(), atol=1e-12)
    np.testing.assert_array_equal(back.numpy(), back_ref.numpy().astype(np.uint8))
    assert 0.05 < back.numpy().mean() < 0.95  # the comparison is not vacuous
    # laid out so that the [k, j, i] transpose the runner takes is contiguous (no copy of the label map)
    assert back[0].numpy().transpose(2, 1, 0).flags.c_contiguous
    a = ref({"image": _meta_image(arr.astype(np.float32), affine)})  # Invertd used up the records: again
    b = new({"image": _meta_image(arr, affine)})
    probs = torch.rand((2, *a["image"].shape[1:]), generator=torch.Generator().manual_seed(3))
    a["pred"], b["pred"] = (_meta_image(probs.numpy().copy(), x["image"].affine.numpy()) for x in (a, b))
    soft_ref = Invertd("pred", transform=ref, orig_keys="image", nearest_interp=False)(a)["pred"]
    soft = Invertd("pred", transform=new, orig_keys="image", nearest_interp=False)(b)["pred"]
    assert soft.shape == soft_ref.shape == (2, *arr.shape)
    np.testing.assert_allclose(soft.numpy(), soft_ref.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(soft.argmax(0).numpy(), soft_ref.argmax(0).numpy())


def test_bounded_spacing_oblique_falls_back_to_monai() -> None:
    from node.inference.resample import BoundedSpacingd

    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    arr = np.arange(10 * 12 * 8, dtype=np.float32).reshape(1, 10, 12, 8)
    out = BoundedSpacingd("image", pixdim=(2.0, 2.0, 2.0))({"image": _meta_image(arr, affine)})["image"]
    assert out.ndim == 4 and out.dtype == torch.float32


def test_bounded_spacing_on_the_target_grid_is_a_copy() -> None:
    from monai.transforms import Compose, EnsureChannelFirstd, Invertd

    from node.inference.resample import BoundedSpacingd

    affine = np.diag([1.40625, 1.40625, 2.5, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    arr = np.random.default_rng(0).integers(-5, 5, size=(20, 22, 9)).astype(np.int16)
    t = Compose([EnsureChannelFirstd("image"), BoundedSpacingd("image", pixdim=(1.40625, 1.40625, 2.5))])
    d = t({"image": _meta_image(arr, affine)})
    assert d["image"].dtype == torch.float32 and np.array_equal(d["image"][0].numpy(), arr)
    d["pred"] = (d["image"] > 0).to(torch.uint8)
    back = Invertd("pred", transform=t, orig_keys="image", nearest_interp=True)(d)["pred"]
    assert back.dtype == torch.uint8 and np.array_equal(back[0].numpy(), arr > 0)


def test_only_spacingd_it_reproduces_is_substituted() -> None:
    from node.inference.resample import substitutable

    assert substitutable({"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"})
    assert substitutable({"_target_": "monai.transforms.Spacingd", "keys": "@k", "pixdim": "@pixdim",
                          "mode": ["nearest"], "padding_mode": "border", "_disabled_": "@x"})
    assert not substitutable({"_target_": "Spacingd", "keys": "image", "pixdim": 1, "align_corners": True})
    assert not substitutable({"_target_": "Spacingd", "keys": "image", "pixdim": 1, "padding_mode": "zeros"})
    assert not substitutable({"_target_": "Spacingd", "keys": "image", "pixdim": 1, "mode": 3})
    assert not substitutable({"_target_": "Spacingd", "keys": "image", "pixdim": 1, "scale_extent": True})
    assert not substitutable({"_target_": "Orientationd", "keys": "image"})


def test_demo_bundle_runs_node_transforms_unless_the_card_says_no(demo_model: Any, small_series: Path,
                                                                     demo_runner: Any, tmp_path: Path) -> None:
    from node.inference.registry import load_model
    from node.inference.resample import BoundedSpacingd

    assert any(isinstance(t, BoundedSpacingd) for t in demo_runner.preprocessing.transforms)
    copy = tmp_path / "lesion-ct-demo"
    shutil.copytree(demo_model.path, copy)
    card = copy / "model_card.toml"
    card.write_text(card.read_text() + "\n[bundle]\nsubstitute_transforms = false\n")
    stock = BundleRunner(load_model(copy), device="cpu")
    assert not any(isinstance(t, BoundedSpacingd) for t in stock.preprocessing.transforms)
    assert any(type(t).__name__ == "Spacingd" for t in stock.preprocessing.transforms)
    volume = load_series(sorted(small_series.glob("*.dcm")))
    np.testing.assert_array_equal(demo_runner.predict(volume).labels, stock.predict(volume).labels)


def test_bundle_scripts_resolve_to_their_own_bundle(demo_model: Any, tmp_path: Path) -> None:
    """Every Model Zoo bundle calls its package ``scripts``: another bundle's must not shadow ours."""
    import json
    import sys
    import types

    copy = tmp_path / "with-scripts"
    shutil.copytree(demo_model.path, copy)
    (copy / "scripts" / "marker.py").write_text(
        "from monai.transforms import MapTransform\n\n\nclass Marker(MapTransform):\n"
        "    def __call__(self, data):\n        return dict(data)\n")
    config = json.loads((copy / "configs" / "inference.json").read_text())
    config["preprocessing"]["transforms"].append({"_target_": "scripts.marker.Marker", "keys": "image"})
    (copy / "configs" / "inference.json").write_text(json.dumps(config))
    from node.inference.registry import load_model

    stale = types.ModuleType("scripts")  # as if another bundle's code had been left behind
    sys.modules["scripts"] = stale
    try:
        runner = BundleRunner(load_model(copy), device="cpu")
    finally:
        sys.modules.pop("scripts", None)
    assert runner.input_dtype is None  # the bundle's LoadImaged says dtype null: int16 CT goes in as is
    assert str(copy) not in sys.path
    marker = [t for t in runner.preprocessing.transforms if type(t).__name__ == "Marker"]
    assert len(marker) == 1
    source = Path(type(marker[0]).__call__.__globals__["__file__"])
    assert source == copy / "scripts" / "marker.py"


def test_large_volume_is_mapped_and_released(small_series: Path, tmp_path: Path) -> None:
    files = sorted(small_series.glob("*.dcm"))
    plain = load_series(files)
    mapped = load_series(files, scratch_dir=tmp_path, map_above_bytes=0)
    assert plain.mapping is None and mapped.mapping is not None
    assert list(tmp_path.iterdir()) == []  # the scratch file is unlinked from the start: nothing to clean up
    np.testing.assert_array_equal(mapped.pixels, plain.pixels)
    mapped.release_memory()  # pages go back to the page cache; the pixels read back unchanged
    np.testing.assert_array_equal(mapped.pixels, plain.pixels)
