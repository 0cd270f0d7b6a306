"""The corpus: every folder of real scanner DICOM (../shared/data/real_dicom) through `preannot run`, with the demo
model made to accept any modality (so real MR, enhanced multi-frame, projection and odd-geometry headers all reach
the outputs) and with every Model Zoo bundle (random weights, CPU-time settings) on the series it is made for.

For each run: no traceback; every series processed or refused with a reason that names it; every SEG and SR the
node wrote passes the node's consistency check (it ran before the files were written) and dciodvfy with 0 errors.
Slow (minutes): `make test-slow`, in CI.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from node.cli import app
from tests.conftest import ROOT, SHARED

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/real_dicom is absent")]

FOLDERS = sorted(p.name for p in SHARED.iterdir() if p.is_dir()) if SHARED.is_dir() else []


@pytest.fixture(scope="module")
def any_modality(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model with no modality in its card: it runs on whatever series it is given."""
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(ROOT / "models" / "lesion-ct-demo", models / "any-modality")
    card = models / "any-modality" / "model_card.toml"
    card.write_text(card.read_text().replace('modality = ["CT"]', "modality = []"))
    return models


def _check_run(r: object, out: Path, dciodvfy: Callable[[Path], list[str]]) -> tuple[int, int]:
    output = r.output  # type: ignore[attr-defined]
    code = r.exit_code  # type: ignore[attr-defined]
    assert "Traceback" not in output, output
    assert code in (0, 1, 2), output
    if code == 1:
        assert "failed" in output and ("Error:" in output or "FAILED" in output), output
    written = sorted(out.rglob("*.dcm"))
    for p in written:
        assert dciodvfy(p) == [], (p, output[-2000:])
    return code, len(written)


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_real_folder_is_processed_or_refused_with_its_reason(
        folder: str, any_modality: Path, tmp_path: Path, dciodvfy: Callable[[Path], list[str]]) -> None:
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", "-m", "any-modality", str(SHARED / folder), str(out), "--device", "cpu"],
                           env={"PREANNOT_MODELS__DIR": str(any_modality)})
    code, written = _check_run(r, out, dciodvfy)
    if code == 0:
        assert written >= 1  # at least the SR of each processed series


ZOO = ROOT.parent / "shared" / "data" / "model_zoo"
GE_CT = SHARED / "dcm_qa_ct" / "GE"

#: CPU-time settings for the corpus (a coarser resampling and smaller patches; the code path is the published one)
CT_BUNDLES = {
    "spleen_ct_segmentation": '{ "inferer#roi_size" = [64, 64, 32], "preprocessing#transforms#3#pixdim" = [3.0, 3.0, 4.0] }',
    "wholeBody_ct_segmentation": '{ "inferer#roi_size" = [64, 64, 32], "pixdim" = [4.0, 4.0, 4.0] }',
    "swin_unetr_btcv_segmentation": '{ "inferer#roi_size" = [64, 64, 64], "inferer#overlap" = 0.0, '
                                    '"preprocessing#transforms#3#pixdim" = [3.0, 3.0, 4.0] }',
}


@pytest.mark.skipif(not (ZOO.is_dir() and GE_CT.is_dir()), reason="the shared data folder is absent")
@pytest.mark.parametrize("bundle", sorted(CT_BUNDLES))
def test_zoo_ct_bundles_as_published_on_the_real_tilted_ct(bundle: str, tmp_path: Path,
                                                           dciodvfy: Callable[[Path], list[str]]) -> None:
    """Each CT segmentation bundle of the Zoo, added by `models add` (its drafted card as it is) with random weights,
    on the real gantry-tilted GE CT: processed, every number checked, SEG and SR valid."""
    from node.devtools import zoo

    models = tmp_path / "models"
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[models]\ndir = "{models}"\ndevice = "cpu"\n')
    r = CliRunner().invoke(app, ["models", "add", str(ZOO / bundle), "--config", str(cfg)])
    assert "draft model_card.toml" in r.output, r.output
    card = models / bundle / "model_card.toml"
    text = card.read_text()
    if "[bundle]" in text:
        text = text.replace("[bundle]\n", f"[bundle]\noverrides = {CT_BUNDLES[bundle]}\n", 1)
    else:
        text += f"\n[bundle]\noverrides = {CT_BUNDLES[bundle]}\n"
    card.write_text(text)
    zoo.random_weights(models / bundle)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", "-m", bundle, str(GE_CT), str(out), "--config", str(cfg)])
    code, written = _check_run(r, out, dciodvfy)
    assert code == 0 and written >= 1, r.output[-3000:]
