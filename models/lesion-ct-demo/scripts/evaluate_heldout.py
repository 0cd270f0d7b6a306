"""Held-out evaluation of lesion-ct-demo on synthetic cases it never saw (seeds from 200000 on).

    python models/lesion-ct-demo/scripts/evaluate_heldout.py --cases 20 --out models/lesion-ct-demo/docs/heldout_metrics.json

Each case goes through the node's own path: the bundle runner (MONAI preprocessing, sliding-window
inference, postprocessing) and the ROI extraction with the model card's minimum volume. Reported:
- Dice over all voxels of each case (cases without lesions and without predictions count as 1);
- lesion sensitivity: a ground-truth lesion is detected when a predicted ROI overlaps it;
- false positives per scan: predicted ROIs overlapping no ground-truth lesion;
- sensitivity by lesion diameter (<6 mm, 6-10 mm, >=10 mm).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from node.devtools.synth.phantom import CaseGeometry, make_phantom
from node.evaluate.metrics import dice_score
from node.imaging.volume import FrameRef, Volume
from node.inference.registry import Registry
from node.inference.rois import extract_rois, paint_rois
from node.inference.runner import BundleRunner

BUNDLE = Path(__file__).resolve().parents[1]


def phantom_volume(ph) -> Volume:  # type: ignore[no-untyped-def]
    g = ph.geometry
    affine = np.diag([g.spacing_xy, g.spacing_xy, g.spacing_z, 1.0])
    affine[:3, 3] = g.origin
    return Volume(pixels=ph.hu, affine=affine, sources=[], frames=[FrameRef(0, None)] * g.slices, modality="CT",
                  series_uid="synthetic")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=200000)
    ap.add_argument("--out", type=Path, default=BUNDLE / "docs" / "heldout_metrics.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = Registry(BUNDLE.parent).get(BUNDLE.name)
    runner = BundleRunner(model, device="cpu")
    geom = CaseGeometry()
    dices, per_case = [], []
    detected_by_bin: dict[str, list[int]] = {"<6 mm": [0, 0], "6-10 mm": [0, 0], ">=10 mm": [0, 0]}
    tp = total = fps = 0
    t0 = time.time()
    for n in range(args.cases):
        seed = args.first_seed + n
        ph = make_phantom(seed, geom)
        vol = phantom_volume(ph)
        t = time.time()
        labels = runner.predict(vol).labels
        infer_s = time.time() - t
        rois = extract_rois(labels, vol, model.card, outlines=False)
        pred = paint_rois(rois, shape=labels.shape) > 0
        dice = dice_score(pred, ph.mask)
        dices.append(dice)
        case_fp = 0
        for r in rois:
            k0, j0, i0 = r.offset
            sub = ph.labels[k0:k0 + r.mask.shape[0], j0:j0 + r.mask.shape[1], i0:i0 + r.mask.shape[2]]
            if not (sub[r.mask] > 0).any():
                case_fp += 1
        fps += case_fp
        found = 0
        for les in ph.lesions:
            hit = bool(pred[ph.labels == les.index].any())
            found += hit
            b = "<6 mm" if les.diameter_mm < 6 else "6-10 mm" if les.diameter_mm < 10 else ">=10 mm"
            detected_by_bin[b][0] += hit
            detected_by_bin[b][1] += 1
        tp += found
        total += len(ph.lesions)
        per_case.append({"seed": seed, "lesions": len(ph.lesions), "detected": found, "false_positives": case_fp,
                         "dice": round(dice, 4), "inference_s": round(infer_s, 2)})
        print(f"case {n + 1}/{args.cases} seed {seed}: {found}/{len(ph.lesions)} detected, {case_fp} FP, "
              f"Dice {dice:.3f} ({infer_s:.1f} s)", flush=True)
    result = {
        "model": model.identification(),
        "cases": args.cases, "seeds": [args.first_seed, args.first_seed + args.cases - 1],
        "geometry": "256 x 256 x 96, 1.41 x 1.41 x 2.5 mm",
        "dice_mean": round(float(np.mean(dices)), 4), "dice_median": round(float(np.median(dices)), 4),
        "lesions": total, "lesions_detected": tp, "lesion_sensitivity": round(tp / max(total, 1), 4),
        "false_positives_per_scan": round(fps / args.cases, 3),
        "sensitivity_by_diameter": {k: {"detected": v[0], "total": v[1],
                                        "sensitivity": round(v[0] / v[1], 3) if v[1] else None}
                                    for k, v in detected_by_bin.items()},
        "per_case": per_case, "seconds": round(time.time() - t0, 1),
        "command": "python models/lesion-ct-demo/scripts/evaluate_heldout.py --cases "
                   f"{args.cases} --first-seed {args.first_seed}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "per_case"}, indent=2))


if __name__ == "__main__":
    main()
