"""ROI extraction, SEG and SR for many findings (a noisy model): the cost per finding.

    python -m benchmarks.many_findings [--findings 1000]

A label map with ``--findings`` separate 2 x 2 x 1 voxel components on the small synthetic CT
(96 x 96 x 24), run through ``extract_rois``, ``build_seg`` and ``build_sr`` with the demo model's card.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--findings", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from node.devtools.synth.phantom import CaseGeometry, make_phantom
    from node.devtools.synth.writer import write_series
    from node.imaging.volume import load_series
    from node.inference.registry import Registry
    from node.inference.rois import extract_rois
    from node.outputs.equipment import Provenance
    from node.outputs.seg import build_seg
    from node.outputs.sr import build_sr

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        write_series(make_phantom(4242, CaseGeometry(size=96, slices=48, spacing_xy=3.0, spacing_z=2.5), n_lesions=2),
                     Path(tmp), seed=4242)
        vol = load_series(sorted(Path(tmp).glob("*.dcm")))
        model = Registry(root / "models").get("lesion-ct-demo")
        card = model.card.model_copy(update={"labels": [model.card.labels[0].model_copy(update={"min_volume_mm3": 0})]})
        lab = np.zeros(vol.shape, np.uint8)
        n = 0
        for k in range(0, vol.shape[0], 2):
            for j in range(2, vol.shape[1] - 3, 4):
                for i in range(2, vol.shape[2] - 3, 4):
                    if n < args.findings:
                        lab[k, j:j + 2, i:i + 2] = 1
                        n += 1
        prov = Provenance(model=model)
        times: dict[str, list[float]] = {"rois": [], "seg": [], "sr": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            rois = extract_rois(lab, vol, card)
            times["rois"].append(time.perf_counter() - t)
            t = time.perf_counter()
            seg = build_seg(vol, rois, card, prov, series_number=1)
            times["seg"].append(time.perf_counter() - t)
            t = time.perf_counter()
            build_sr(vol, rois, card, prov, seg=seg, series_number=2)
            times["sr"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(rois)} findings, median of {args.repeats}: ROIs {med['rois']:.2f} s, SEG {med['seg']:.2f} s, "
          f"SR {med['sr']:.2f} s; ROIs + SR {med['rois'] + med['sr']:.2f} s "
          f"({1000 * (med['rois'] + med['sr']) / max(len(rois), 1):.1f} ms per finding)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
