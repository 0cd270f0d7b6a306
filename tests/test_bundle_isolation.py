"""Two bundles whose ``scripts`` packages differ, two workers, jobs interleaved: each job gets its own
bundle's code (bundle loading is serialised and no ``scripts`` module outlives a parse)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import torch
from pydicom import dcmread
from pydicom.uid import generate_uid

from node.config import load_config
from node.inference.registry import Registry
from node.inference.runner import BundleRunner
from node.net.scu import send_files
from node.service import Node
from node.store.jobs import JobState
from tests.conftest import free_port, wait_for

_INFERENCE = {
    "imports": ["$import torch"],
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "network_def": {"_target_": "scripts.net.Zeros"},
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "scripts.marks.Note", "keys": "image"},
    ]},
    "inferer": {"_target_": "SimpleInferer"},
    "postprocessing": {"_target_": "Compose", "transforms": [{"_target_": "scripts.marks.Paint", "keys": "pred"}]},
}

# The same module names and class names in both bundles; only the constants differ.
_MARKS = '''
import numpy as np
import torch
from monai.transforms import MapTransform

from scripts.where import CORNER, LABEL  # resolved when the bundle is parsed: must be this bundle's


class Note(MapTransform):
    def __call__(self, data):
        return dict(data)


class Paint(MapTransform):
    """A 4x4x3 cube of LABEL at CORNER (i, j, k): which bundle ran is visible in the labels."""

    def __call__(self, data):
        d = dict(data)
        pred = torch.zeros_like(d["pred"], dtype=torch.uint8)
        i, j, k = CORNER
        pred[0, i:i + 4, j:j + 4, k:k + 3] = LABEL
        d["pred"] = pred
        return d
'''

_NET = '''
import torch


class Zeros(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)
'''


def _bundle(root: Path, name: str, label: int, corner: tuple[int, int, int]) -> None:
    b = root / name
    (b / "configs").mkdir(parents=True)
    (b / "scripts").mkdir()
    (b / "models").mkdir()
    (b / "configs" / "metadata.json").write_text(json.dumps({"version": "1.0.0", "name": name}))
    (b / "configs" / "inference.json").write_text(json.dumps(_INFERENCE))
    (b / "scripts" / "__init__.py").write_text("")
    (b / "scripts" / "net.py").write_text(_NET)
    (b / "scripts" / "marks.py").write_text(_MARKS)
    (b / "scripts" / "where.py").write_text(f"LABEL = {label}\nCORNER = {corner}\n")
    torch.save({}, b / "models" / "model.pt")
    (b / "model_card.toml").write_text(f'''
[model]
description = "test bundle {name}"

[[labels]]
value = {label}
name = "{name}-mark"
category = {{ code = "49755003", scheme = "SCT", meaning = "Morphologically abnormal structure" }}
type = {{ code = "27925004", scheme = "SCT", meaning = "Nodule" }}
''')


def _copy_series(files: list[Path]) -> list[bytes]:
    """The series under new Series/SOP Instance UIDs (a new series each call)."""
    series_uid = generate_uid()
    out = []
    for f in files:
        ds = dcmread(f)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def send_series_copies(tmp_path: Path, files: list[Path], copies: int, port: int) -> None:
    """Send ``copies`` copies of a series (new UIDs each) to the node on ``port`` in one association, as TESTSCU."""
    batch: list[Path] = []
    for s in range(copies):
        for n, raw in enumerate(_copy_series(files)):
            p = tmp_path / "send" / f"s{s}" / f"{n:03d}.dcm"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(raw)
            batch.append(p)
    assert all(o.ok for o in send_files([str(p) for p in batch], ae_title="PREANNOT", host="127.0.0.1",
                                         port=port, calling_ae="TESTSCU"))


def test_two_workers_two_bundles_each_job_uses_its_own_scripts(tmp_path: Path, small_series: Path) -> None:
    models = tmp_path / "models"
    _bundle(models, "bundle-a", 1, (10, 10, 4))
    _bundle(models, "bundle-b", 2, (60, 60, 14))
    port = free_port()
    cfg = load_config(None, env={}, overrides={
        "node": {"ae_title": "PREANNOT", "bind": "127.0.0.1", "port": port, "data_dir": str(tmp_path / "data"),
                 "allowed_callers": ["TESTSCU"], "stable_seconds": 3.0, "free_space_reserve_mb": 0},
        "routes": [{"name": "both", "match": {"Modality": "CT"}, "models": ["bundle-a", "bundle-b"]}],
        "models": {"dir": str(models), "device": "cpu", "preload": True},
        "jobs": {"workers": 2, "backoff_seconds": 0.2}, "web": {"enabled": False}})
    node = Node(cfg)
    node.start()  # both workers preload both bundles at once: the race the lock prevents
    try:
        send_series_copies(tmp_path, sorted(small_series.glob("*.dcm")), 4, port)
        wait_for(lambda: len(node.store.list_jobs(state=JobState.DONE)) == 8
                 or node.store.list_jobs(state=JobState.DEAD), 180, what="8 jobs")
        jobs = node.store.list_jobs()
        assert [j.state for j in jobs] == [JobState.DONE] * 8, [(j.id, j.state, j.error) for j in jobs]
        for j in jobs:
            assert j.result is not None and j.result.shape[0] == 24  # each series whole (not cut by a slow disk)
            rois = j.result.findings
            expected = "bundle-a-mark" if j.model == "bundle-a" else "bundle-b-mark"
            assert [r.label_name for r in rois] == [expected], (j.id, j.model, rois)
            # the cube sits where this bundle paints it (4 x 4 pixels of 3 mm, 3 slices of 5 mm)
            assert rois[0].volume_mm3 == 4 * 4 * 3 * 3.0 * 3.0 * 5.0
        # no bundle code is left importable process-wide, and neither bundle root stays on sys.path
        assert "scripts" not in sys.modules
        assert not any(str(models) in p for p in sys.path)
    finally:
        node.stop()


def test_runner_keeps_its_bundle_code_after_another_bundle_loads(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _bundle(models, "bundle-a", 1, (1, 1, 1))
    _bundle(models, "bundle-b", 2, (1, 1, 1))
    reg = Registry(models)
    a = BundleRunner(reg.get("bundle-a"), device="cpu")
    b = BundleRunner(reg.get("bundle-b"), device="cpu")
    paint_a = a.postprocessing.transforms[-1]
    paint_b = b.postprocessing.transforms[-1]
    assert type(paint_a) is not type(paint_b)  # two classes, one per bundle, though both are scripts.marks.Paint
    assert Path(type(paint_a).__call__.__globals__["__file__"]).is_relative_to(models / "bundle-a")
    assert Path(type(paint_b).__call__.__globals__["__file__"]).is_relative_to(models / "bundle-b")
    assert type(paint_a).__call__.__globals__["LABEL"] == 1
    assert type(paint_b).__call__.__globals__["LABEL"] == 2
    assert "scripts" not in sys.modules
