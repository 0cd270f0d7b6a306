"""preannot evaluate: metrics against known answers, dataset matching, the report in a browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from node.cli import app
from node.devtools.synth.phantom import make_phantom
from node.devtools.synth.writer import write_case
from node.evaluate import EvalOptions, discover, evaluate, label_metrics, lesion_matches, load_reference
from node.imaging.volume import Volume, load_series
from node.inference.prediction import LabelMap
from node.inference.registry import Registry
from tests.conftest import ROOT, SMALL


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    for seed in (7001, 7002, 7003):
        write_case(make_phantom(seed, SMALL, n_lesions=2), root / f"case_{seed}", seed=seed)
    return root


class ReferenceRunner:
    """Predicts exactly the reference (to check that a perfect model scores perfectly)."""

    def __init__(self, root: Path, model: Any) -> None:
        self.refs = {c.series_uid: c for c in discover(root).cases}
        self.model = model

    def predict(self, volume: Volume, *, deadline: float | None = None) -> LabelMap:
        return LabelMap(load_reference(self.refs[volume.series_uid], volume, label_map={"nodule": 1}))


def test_perfect_prediction_scores_perfectly(labelled: Path, tmp_path: Path) -> None:
    model = Registry(ROOT / "models").get("lesion-ct-demo")
    summary = evaluate(labelled, [model], tmp_path / "out", runner_factory=lambda m: ReferenceRunner(labelled, m),
                       options=EvalOptions(bootstrap=200))
    nod = summary["models"]["lesion-ct-demo"]["labels"]["Nodule"]
    assert nod["voxel"]["dice"]["mean"] == pytest.approx(1.0)
    assert nod["voxel"]["hd95_mm"]["mean"] == pytest.approx(0.0)
    assert nod["voxel"]["asd_mm"]["mean"] == pytest.approx(0.0)
    assert nod["voxel"]["nsd"]["mean"] == pytest.approx(1.0)
    # every reference lesion above the card's minimum volume is found, with no false positive
    assert nod["detection"]["fp_per_scan"] == 0.0


def test_known_shift_gives_expected_surface_distance() -> None:
    ref = np.zeros((20, 20, 20), bool)
    ref[5:15, 5:15, 5:15] = True
    pred = np.roll(ref, 1, axis=2)  # one voxel along i
    m = label_metrics(pred, ref, (1.0, 1.0, 1.0), tolerance_mm=0.5)
    assert m["dice"] == pytest.approx(0.9)
    assert m["hd95_mm"] == pytest.approx(1.0)
    assert 0.0 < m["asd_mm"] < 1.0
    assert m["nsd"] < 1.0
    m2 = label_metrics(pred, ref, (1.0, 1.0, 2.0), tolerance_mm=3.0)  # 2 mm along i
    assert m2["hd95_mm"] == pytest.approx(2.0)
    assert m2["nsd"] == pytest.approx(1.0)
    empty = label_metrics(np.zeros_like(ref), np.zeros_like(ref), (1, 1, 1))
    assert empty["dice"] == 1.0 and empty["hd95_mm"] == 0.0


def test_missed_lesion_lowers_sensitivity() -> None:
    ref = np.zeros((20, 40, 40), bool)
    ref[5:9, 5:9, 5:9] = True
    ref[10:14, 25:30, 25:30] = True
    pred = np.zeros_like(ref)
    pred[5:9, 5:9, 5:9] = True  # first found
    pred[2:4, 35:38, 35:38] = True  # a false positive
    m = lesion_matches(pred, ref, (1.0, 1.0, 1.0))
    assert (m.ref_lesions, m.detected, m.pred_is_tp.count(False)) == (2, 1, 1)
    assert m.counts_at(0.0) == (1, 1)
    assert m.counts_at(20.0) == (1, 0)  # the small false positive is under the operating volume
    c = lesion_matches(pred, ref, (1.0, 1.0, 1.0), rule="centroid", centroid_mm=2.0)
    assert c.detected == 1


def test_nifti_reference_and_problems(labelled: Path, tmp_path: Path) -> None:
    import nibabel as nib

    root = tmp_path / "ds"
    shutil.copytree(labelled / "case_7001" / "image", root / "a" / "image")
    vol = load_series(sorted((root / "a" / "image").glob("*.dcm")))
    ref = load_reference(discover(labelled).cases[0], load_series(
        sorted((labelled / "case_7001" / "image").glob("*.dcm"))), label_map={"nodule": 1})
    nib.save(nib.Nifti1Image(ref.transpose(2, 1, 0).astype(np.uint8), vol.ras_affine()), root / "a" / "labels.nii.gz")
    shutil.copytree(labelled / "case_7002" / "image", root / "b" / "image")  # no reference
    shutil.copy(labelled / "case_7003" / "ground_truth_seg.dcm", root / "orphan_seg.dcm")  # no image series
    ds = discover(root)
    assert len(ds.cases) == 1 and ds.cases[0].reference.name == "labels.nii.gz"
    assert np.array_equal(load_reference(ds.cases[0], vol), ref)
    assert any("has no reference" in p for p in ds.problems)
    assert any("not in the dataset" in p for p in ds.problems)


def test_report_two_models_resumable_in_browser(labelled: Path, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "lesion-ct-demo", models_dir / "lesion-ct-demo")
    shutil.copytree(ROOT / "models" / "lesion-ct-demo", models_dir / "lesion-ct-demo-b")
    meta = json.loads((models_dir / "lesion-ct-demo-b" / "configs" / "metadata.json").read_text())
    meta["version"] = "0.1.0-b"
    (models_dir / "lesion-ct-demo-b" / "configs" / "metadata.json").write_text(json.dumps(meta))
    out = tmp_path / "report"
    args = ["evaluate", str(labelled), "--out", str(out), "-m", "lesion-ct-demo", "-m", "lesion-ct-demo-b",
            "--bootstrap", "200"]
    env = {"PREANNOT_MODELS__DIR": str(models_dir)}
    r = CliRunner().invoke(app, args, env=env)
    assert r.exit_code == 0, r.output
    assert "Wilcoxon" in r.output and "report:" in r.output
    for f in ("report.html", "metrics.csv", "summary.json"):
        assert (out / f).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 3
    assert [c["metric"] for c in summary["comparisons"]] == ["dice", "nsd", "sensitivity at 2 FP/scan"]
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + 3 * 2
    again = CliRunner().invoke(app, args, env=env)  # resumable: nothing recomputed
    assert again.exit_code == 0 and again.output.count("already done") == 6
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "http" not in html.split("<body>")[1].split("dataset")[0]
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package chromium)")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'chr'}", "--window-size=1300,2400",
                    f"--screenshot={shot}", f"file://{out / 'report.html'}"], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 50_000
