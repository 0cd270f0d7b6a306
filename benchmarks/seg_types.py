"""Binary vs label map SEG for a many-label model: size and build time.

    python -m benchmarks.seg_types [--size 512 --slices 200 --labels 104]

A synthetic CT, and a label map with ``--labels`` structures (boxes of 20 to 60 slices, 30 to 90 pixels
wide, seeded) coded with the draft card of ../shared's wholeBody bundle when present (otherwise generic
labels); each SEG type built by ``node.outputs.seg.build_seg`` and written to disk.
"""

from __future__ import annotations

import argparse
import time
import tomllib
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--labels", type=int, default=104)
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work")
    args = ap.parse_args(argv)

    from node.devtools.synth.phantom import CaseGeometry, make_phantom
    from node.devtools.synth.writer import write_series
    from node.imaging.volume import load_series
    from node.inference.cards import draft_card
    from node.inference.registry import ModelCard, ModelInfo
    from node.outputs.equipment import Provenance
    from node.outputs.result import save_dataset
    from node.outputs.seg import build_seg

    ct = args.work / f"ct_{args.size}x{args.size}x{args.slices}_seg"
    if len(list(ct.glob("*.dcm"))) != args.slices:
        geom = CaseGeometry(size=args.size, slices=args.slices, spacing_xy=360 / args.size, spacing_z=1.5)
        write_series(make_phantom(7, geom, n_lesions=2), ct, seed=7)
    vol = load_series(sorted(ct.glob("*.dcm")))
    wb = Path(__file__).resolve().parents[2] / "shared" / "data" / "model_zoo" / "wholeBody_ct_segmentation"
    if wb.is_dir():
        card = ModelCard.model_validate(tomllib.loads(draft_card(wb).text))
    else:
        card = ModelCard.model_validate({"labels": [
            {"value": v, "name": f"Structure {v}", "finding": False,
             "category": {"code": "91723000", "scheme": "SCT", "meaning": "Anatomical structure"},
             "type": {"code": "91723000", "scheme": "SCT", "meaning": "Anatomical structure"}}
            for v in range(1, args.labels + 1)]})
    lab = np.zeros(vol.shape, np.uint8)
    nk, nj, ni = vol.shape
    rng = np.random.default_rng(0)
    for v in range(1, min(args.labels, len(card.labels)) + 1):
        d, h, w = rng.integers(20, 61), rng.integers(30, 91), rng.integers(30, 91)
        k, j, i = rng.integers(0, max(nk - d, 1)), rng.integers(0, nj - h), rng.integers(0, ni - w)
        lab[k:k + d, j:j + h, i:i + w] = card.labels[v - 1].value
    model = ModelInfo(name="seg-types", version="1", path=Path("."), weights=Path("-"), sha256="0" * 64, card=card)
    print(f"{args.size}x{args.size}x{args.slices} CT, {len(np.unique(lab)) - 1} labels")
    print("| SEG type | frames | file size (MiB) | build time (s) |\n|---|---|---|---|")
    from node.inference.rois import extract_rois

    for kind in ("binary", "labelmap"):
        c = card.model_copy(update={"outputs": card.outputs.model_copy(update={"seg_type": kind})})
        rois = extract_rois(lab, vol, c)
        t0 = time.perf_counter()
        seg = build_seg(vol, rois, c, Provenance(model=model), series_number=1)
        dt = time.perf_counter() - t0
        p = save_dataset(seg, args.work / f"seg_{kind}.dcm", fsync=False)
        print(f"| {kind} | {int(seg.NumberOfFrames)} | {p.stat().st_size / 2**20:.1f} | {dt:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
