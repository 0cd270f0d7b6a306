"""The race: preannot vs a bare MONAI + highdicom script, same published bundle, same CT, interleaved.

    python -m benchmarks.race [--zoo ../shared/data/model_zoo] [--repeats 3] [--device cpu] [--variant spleen|many|both]

The bundle is ``spleen_ct_segmentation`` as the Model Zoo publishes it (configs unchanged), the CT the stages'
512 x 512 x 300 series, in two variants of seeded random weights:

- ``spleen``: no tilt, so that both classes come out; the card makes the label an organ (one region);
- ``many``: the last bias tilted by 0.4 towards the background and the label a finding ("Speck"), so that the
  random weights leave about 2,900 small findings: the noisy model of issue 30, whose per-finding work must not
  slow the node down (the SEG holds every finding, the SR lists the first 100).

Each side runs
in its own process, one after the other, alternating which goes first: ``preannot run`` (the node's whole
offline pipeline: read, inference, ROIs, SEG, SR, preview) and ``benchmarks/bare_monai.py`` (the bundle's
own transforms through MONAI, then a highdicom SEG of the label). Wall time is the process's, from start to
exit; peak RSS is the process's ``ru_maxrss``. The two SEGs are read back and compared voxel by voxel (Dice of
the label: preannot's segments together against the bare script's one). Targets (issue 30): preannot <= 0.5x
the bare script's wall time and peak RSS, Dice >= 0.999.
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
    with log.open("w") as err, log.with_suffix(".out").open("w") as out:  # stdout apart: preannot's JSON
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{cmd[2:4]} failed ({code}):\n" + "\n".join(log.read_text().splitlines()[-20:]))
    return wall, usage.ru_maxrss / 1024


def _seg_mask(seg_path: Path, grid: object) -> object:
    """The union of a SEG's segments on the source slices (the verdict intake's reader of returned SEGs)."""
    import pydicom

    from node.verdicts.regions import read_seg

    return read_seg(pydicom.dcmread(seg_path), grid).mask()  # type: ignore[arg-type]


def dice(a: object, b: object) -> float:
    import numpy as np

    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


#: the variants: (the card's label name, whether it is a finding, the favoured output channel, the tilt)
VARIANTS = {"spleen": ("Spleen", False, 1, 0.0), "many": ("Speck", True, 0, 0.4)}


def _race(variant: str, args: argparse.Namespace, ct: Path) -> tuple[list[str], dict[str, float]]:
    from node.devtools.zoo import SPLEEN_CARD, install_segmenter
    from node.imaging.volume import load_series
    from node.verdicts.regions import Grid

    name, finding, favour, tilt = VARIANTS[variant]
    work = WORK / variant
    shutil.rmtree(work, ignore_errors=True)
    models = work / "models"
    card = SPLEEN_CARD.replace('name = "Spleen"', f'name = "{name}"').replace(
        "finding = false", f"finding = {str(finding).lower()}")
    bundle = install_segmenter(args.zoo, "spleen_ct_segmentation", models, card, favour=favour, tilt=tilt)
    config = work / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{work / "data"}"\n\n[models]\ndir = "{models}"\n'
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
            out = work / f"{side}-{rep}"
            wall, rss = _timed(sides[side](out), work / f"{side}-{rep}.log")
            runs[side].append((wall, rss))
            print(f"  {variant} run {rep} {side:8s} {wall:6.1f} s  {rss:6.0f} MiB", flush=True)
    grid = Grid.of_volume(load_series(sorted(ct.glob("*.dcm"))))
    d = dice(_seg_mask(work / "preannot-0" / "seg.dcm", grid), _seg_mask(work / "bare-0" / "seg.dcm", grid))
    result = json.loads((work / "preannot-0.out").read_text())
    findings = int(result["roi_count"])
    med = {side: (statistics.median(w for w, _ in r), statistics.median(m for _, m in r)) for side, r in runs.items()}
    lines = [
        f"### {variant}: {name.lower()} as {'findings' if finding else 'an organ'}, last bias tilted {tilt} towards "
        f"channel {favour}: preannot reports {findings} region(s)", "",
        "| side | wall (s) | peak RSS (MiB) | runs (s) |", "|---|---|---|---|",
    ]
    for side in ("bare", "preannot"):
        lines.append(f"| {side} | {med[side][0]:.1f} | {med[side][1]:.0f} | "
                     + ", ".join(f"{w:.1f}" for w, _ in runs[side]) + " |")
    ratio_t, ratio_m = med["preannot"][0] / med["bare"][0], med["preannot"][1] / med["bare"][1]
    lines += ["", f"preannot / bare: wall **{ratio_t:.2f}x** (target <= 0.5x), peak RSS **{ratio_m:.2f}x** "
                  f"(target <= 0.5x); Dice of the two SEGs **{d:.5f}** (target >= 0.999)", "",
              "preannot's own stage timings (s), run 0: " + ", ".join(
                  f"{k} {v:.2f}" for k, v in result["timings"].items()), ""]
    return lines, {"wall_ratio": round(ratio_t, 3), "rss_ratio": round(ratio_m, 3), "dice": round(d, 6),
                   "findings": findings}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=ROOT.parent / "shared" / "data" / "model_zoo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", choices=[*VARIANTS, "both"], default="both")
    args = ap.parse_args(argv)

    from benchmarks.stages import ensure_series

    if not (args.zoo / "spleen_ct_segmentation").is_dir():
        raise SystemExit(f"no spleen_ct_segmentation bundle under {args.zoo}")
    # the CT is made in a process of its own: the phantom generator's 6 GB peak would otherwise be the peak RSS that
    # Linux reports for every side (a forked child inherits its parent's high-water mark through exec)
    subprocess.run([sys.executable, "-c", "from benchmarks.stages import ensure_series; ensure_series(512, 300)"],
                   cwd=ROOT, check=True)
    ct = ensure_series(512, 300)
    lines = [
        "## Race: preannot vs a bare MONAI + highdicom script (spleen_ct_segmentation as published)", "",
        f"Machine: {machine()}  ",
        f"Command: `python -m benchmarks.race --repeats {args.repeats} --device {args.device} --variant "
        f"{args.variant}`; 512 x 512 x 300 CT, interleaved, median of {args.repeats}", "",
    ]
    summary = {}
    for variant in (VARIANTS if args.variant == "both" else [args.variant]):
        part, summary[variant] = _race(variant, args, ct)
        lines += part
    print(json.dumps(summary))
    return write_result("\n".join(lines), "race")


if __name__ == "__main__":
    main()
