"""Memory of a study-level job: the Zoo's brats_mri_segmentation (as published; random weights; CPU-time patches)
on a clinical-size synthetic brain MR study of four sequences in three planes (T1 sagittal 240 x 240 x 100, T1c
axial 240 x 240 x 125, T2 coronal 240 x 240 x 100, FLAIR oblique 200 x 200 x 75), each job in a fresh process.

The weights are random with a constant output (the whole grid "whole tumour": one region), so that the figure is
the inputs' and the model's memory, not that of thousands of noise findings (issue 30 measures those).

Reported: the node's peak RSS (VmHWM) for the job, and, as "the model", the peak RSS of a bare MONAI script running
the same bundle (its preprocessing without the loader, inferer, postprocessing without the saver, the same weights)
on a 4-channel float32 image of the reference grid already in memory: what the bundle itself needs. The goal
(issue 27): the node's peak <= the model + 2 x the decoded inputs (float32).

    python -m benchmarks.study [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.e2e import RSS_SAMPLER
from benchmarks.results_file import machine, write_result

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work" / "study"
ZOO = ROOT.parent / "shared" / "data" / "model_zoo"
BRATS = "brats_mri_segmentation"

_CODE = RSS_SAMPLER + """
import numpy as np
from node.inference.kinds import load_runner
from node.inference.registry import Registry
from node.outputs.equipment import Provenance
from node.processing.pipeline import ModelContext, process_series
models, study = Path(sys.argv[1]), Path(sys.argv[2])
m = Registry(models).get(sys.argv[3])
runner = load_runner(m, device='cpu', amp=False)
folders = {p.name.split('_', 1)[1]: sorted(p.glob('*.dcm')) for p in study.iterdir() if p.is_dir()}
baseline = rss_mb()
threading.Thread(target=sample, daemon=True).start()
with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    out = process_series(folders['T1c'], ModelContext(m, runner, Provenance(model=m)), Path(tmp),
                         on_stage=lambda s: current.__setitem__(0, s),
                         inputs={n: f for n, f in folders.items() if n != 'T1c'})
    wall = time.perf_counter() - t
stop.set()
peaks.pop('start', None)
print(json.dumps({"baseline_mb": baseline, "peak_rss_mb": rss_mb('VmHWM:'), "stage_peaks": peaks, "wall_s": wall,
                  "timings": out.result.timings, "inputs": [i['name'] for i in out.result.inputs]}))
"""


_BARE = """
import json, sys
from pathlib import Path
import numpy as np, torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
bundle, shape = Path(sys.argv[1]), [int(v) for v in sys.argv[2].split(',')]
parser = ConfigParser()
parser.read_config(str(bundle / 'configs' / 'inference.json'))
parser['inferer#roi_size'] = [96, 96, 64]
parser['preprocessing']['transforms'] = parser['preprocessing']['transforms'][1:]
parser['postprocessing']['transforms'] = [t for t in parser['postprocessing']['transforms']
                                          if 'Save' not in t['_target_']]
net = parser.get_parsed_content('network_def')
net.load_state_dict(torch.load(bundle / 'models' / 'model.pt', weights_only=True))
net.eval()
pre, inferer, post = (parser.get_parsed_content(k) for k in ('preprocessing', 'inferer', 'postprocessing'))
image = MetaTensor(torch.from_numpy(np.random.default_rng(0).random((4, *shape), dtype=np.float32)),
                   affine=torch.eye(4, dtype=torch.float64))
data = pre({'image': image})
del image
with torch.no_grad():
    data['pred'] = inferer(data['image'][None], net)[0]
data = post(data)
hwm = next(int(line.split()[1]) / 1024 for line in open('/proc/self/status') if line.startswith('VmHWM:'))
print(json.dumps({"peak_rss_mb": hwm, "labels": sorted(int(v) for v in torch.unique(data['pred']))}))
"""


def ensure_model() -> Path:
    from node.devtools import zoo
    from node.inference.cards import draft_card

    models = WORK / "models"
    dst = models / BRATS
    if not (dst / "models" / "model.pt").is_file():
        import shutil

        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(ZOO / BRATS, dst)
        card = draft_card(dst).text + '\n[bundle]\noverrides = { "inferer#roi_size" = [96, 96, 64] }\n'
        (dst / "model_card.toml").write_text(card)
        zoo.random_weights(dst, seed=1)
        zoo.set_output_bias(dst, (-6.0, 6.0, -6.0))
    return models


def ensure_study() -> Path:
    from node.devtools.synth.study import write_mr_study

    study = WORK / "mr-2.5"
    if not (study / "truth.json").is_file():
        write_mr_study(study, seed=4200, scale=2.5, without=("localizer", "DWI"))
    return study


def decoded_mb(study: Path) -> tuple[float, float]:
    """The four inputs' decoded size: as stored (their bits allocated) and as float32."""
    from pydicom import dcmread

    stored = f32 = 0.0
    for folder in study.iterdir():
        if not folder.is_dir():
            continue
        files = sorted(folder.glob("*.dcm"))
        ds = dcmread(files[0], stop_before_pixels=True)
        voxels = int(ds.Rows) * int(ds.Columns) * len(files)
        stored += voxels * int(ds.BitsAllocated) / 8
        f32 += voxels * 4
    return stored / 2**20, f32 / 2**20


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    models, study = ensure_model(), ensure_study()
    stored, f32 = decoded_mb(study)
    from pydicom import dcmread

    t1c = sorted(next(study.glob("*_T1c")).glob("*.dcm"))
    ds = dcmread(t1c[0], stop_before_pixels=True)
    grid = f"{int(ds.Columns)},{int(ds.Rows)},{len(t1c)}"  # MONAI's [i, j, k]
    runs = []
    for n in range(args.repeat):
        proc = subprocess.run([sys.executable, "-c", _CODE, str(models), str(study), BRATS], cwd=ROOT, capture_output=True,
                              text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        bare = subprocess.run([sys.executable, "-c", _BARE, str(models / BRATS), grid], cwd=ROOT,
                              capture_output=True, text=True, check=True)
        r["bare_mb"] = json.loads(bare.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        runs.append(r)
        print(f"  run {n + 1}: peak {r['peak_rss_mb']:.0f} MB (bare bundle {r['bare_mb']:.0f} MB), "
              f"{r['wall_s']:.1f} s", flush=True)
    lines = [f"## Study-level job memory: brats on a 4-sequence MR study, {args.repeat} runs", "",
             f"Machine: {machine()}  ", f"Command: `python -m benchmarks.study --repeat {args.repeat}`", "",
             f"Decoded inputs: {stored:.0f} MB as stored (16-bit), {f32:.0f} MB as float32", "",
             "| run | node's peak RSS (MB) | the model: bare bundle's peak RSS (MB) | node - model (MB) | "
             "(node - model) / decoded inputs (float32) | node's imports + model loaded (MB) | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for n, r in enumerate(runs, 1):
        over = r["peak_rss_mb"] - r["bare_mb"]
        lines.append(f"| {n} | {r['peak_rss_mb']:.0f} | {r['bare_mb']:.0f} | {over:.0f} | **{over / f32:.2f}x** | "
                     f"{r['baseline_mb']:.0f} | {r['wall_s']:.1f} |")
    lines += ["", "Peak RSS by stage (MB; a stage's figure includes what earlier stages still hold):", "",
              "| run | " + " | ".join(runs[0]["stage_peaks"]) + " |",
              "|---|" + "---|" * len(runs[0]["stage_peaks"])]
    for n, r in enumerate(runs, 1):
        lines.append(f"| {n} | " + " | ".join(f"{v:.0f}" for v in r["stage_peaks"].values()) + " |")
    return write_result("\n".join(lines) + "\n", "study")


if __name__ == "__main__":
    main()
