"""The race: preannot vs a bare MONAI + highdicom script, same published bundle, same CT, interleaved.

    python -m benchmarks.race [--zoo ../shared/data/model_zoo] [--repeats 3] [--device cpu]

The bundle is ``spleen_ct_segmentation`` as the Model Zoo publishes it (configs unchanged; seeded random
weights, no tilt, so that both classes come out), the CT the stages' 512 x 512 x 300 series. Each side runs
in its own process, one after the other, alternating which goes first: ``preannot run`` (the node's whole
offline pipeline: read, inference, ROIs, SEG, SR, preview) and ``benchmarks/bare_monai.py`` (the bundle's
own transforms through MONAI, then a highdicom SEG). Wall time is the process's, from start to exit;
peak RSS is the process's ``ru_maxrss``. The two SEGs are read back with highdicom and compared voxel by
voxel (Dice of the spleen segment). Targets (issue "real models"): preannot <= 0.5x the bare script's wall
time and peak RSS, Dice >= 0.999.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.results_file import machine, write_result

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work" / "race"


def _timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd``; its wall time (s) and peak RSS (MiB). Fails loudly with the log's tail."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{cmd[2:4]} failed ({code}):\n" + "\n".join(log.read_text().splitlines()[-20:]))
    return wall, usage.ru_maxrss / 1024


def _seg_mask(seg_path: Path, source_uids: list[str]) -> object:
    import highdicom as hd
    import numpy as np

    seg = hd.seg.segread(seg_path)
    number = seg.get_segment_numbers()[0]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, segment_numbers=[number],
                                               assert_missing_frames_are_empty=True)
    return np.asarray(pixels[..., 0] > 0)


def dice(a: object, b: object) -> float:
    import numpy as np

    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=ROOT.parent / "shared" / "data" / "model_zoo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import pydicom

    from benchmarks.stages import ensure_series
    from node.devtools.zoo import SPLEEN_CARD, install_segmenter

    if not (args.zoo / "spleen_ct_segmentation").is_dir():
        raise SystemExit(f"no spleen_ct_segmentation bundle under {args.zoo}")
    # the CT is made in a process of its own: the phantom generator's 6 GB peak would otherwise be the peak RSS that
    # Linux reports for every side (a forked child inherits its parent's high-water mark through exec)
    subprocess.run([sys.executable, "-c", "from benchmarks.stages import ensure_series; ensure_series(512, 300)"],
                   cwd=ROOT, check=True)
    ct = ensure_series(512, 300)
    shutil.rmtree(WORK, ignore_errors=True)
    models = WORK / "models"
    bundle = install_segmenter(args.zoo, "spleen_ct_segmentation", models, SPLEEN_CARD, tilt=0.0)
    config = WORK / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{WORK / "data"}"\n\n[models]\ndir = "{models}"\n'
                      f'device = "{args.device}"\n')
    py = sys.executable
    sides = {
        "preannot": lambda out: [py, "-m", "node.cli", "run", "--model", "spleen_ct_segmentation", str(ct), str(out),
                                 "--config", str(config), "--json"],
        "bare": lambda out: [py, "-m", "benchmarks.bare_monai", str(bundle), str(ct), str(out),
                             "--device", args.device],
    }
    runs: dict[str, list[tuple[float, float]]] = {"preannot": [], "bare": []}
    for rep in range(args.repeats):
        order = ["bare", "preannot"] if rep % 2 == 0 else ["preannot", "bare"]
        for side in order:
            out = WORK / f"{side}-{rep}"
            wall, rss = _timed(sides[side](out), WORK / f"{side}-{rep}.log")
            runs[side].append((wall, rss))
            print(f"  run {rep} {side:8s} {wall:6.1f} s  {rss:6.0f} MiB", flush=True)
    sources = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in ct.glob("*.dcm")),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    uids = [d.SOPInstanceUID for d in sources]
    d = dice(_seg_mask(WORK / "preannot-0" / "seg.dcm", uids), _seg_mask(WORK / "bare-0" / "seg.dcm", uids))
    med = {side: (statistics.median(w for w, _ in r), statistics.median(m for _, m in r)) for side, r in runs.items()}
    lines = [
        "## Race: preannot vs a bare MONAI + highdicom script (spleen_ct_segmentation as published)", "",
        f"Machine: {machine()}  ",
        f"Command: `python -m benchmarks.race --repeats {args.repeats} --device {args.device}`; 512 x 512 x 300 CT, "
        f"interleaved, median of {args.repeats}", "",
        "| side | wall (s) | peak RSS (MiB) | runs (s) |", "|---|---|---|---|",
    ]
    for side in ("bare", "preannot"):
        lines.append(f"| {side} | {med[side][0]:.1f} | {med[side][1]:.0f} | "
                     + ", ".join(f"{w:.1f}" for w, _ in runs[side]) + " |")
    ratio_t, ratio_m = med["preannot"][0] / med["bare"][0], med["preannot"][1] / med["bare"][1]
    lines += ["", f"preannot / bare: wall **{ratio_t:.2f}x** (target <= 0.5x), peak RSS **{ratio_m:.2f}x** "
                  f"(target <= 0.5x); Dice of the two SEGs **{d:.5f}** (target >= 0.999)", ""]
    print(json.dumps({"wall_ratio": round(ratio_t, 3), "rss_ratio": round(ratio_m, 3), "dice": round(d, 6)}))
    return write_result("\n".join(lines), "race")


if __name__ == "__main__":
    main()
