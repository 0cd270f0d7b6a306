"""A noisy model on a full-size CT: the node's cost per finding, through the whole pipeline.

    python -m benchmarks.many_findings [--findings 2000] [--size 512] [--slices 300] [--repeats 3]

The stages' synthetic chest CT (``--size`` x ``--size`` x ``--slices``, read from disk once) and a label map
holding ``--findings`` separate blobs of 4 to 60 voxels (seeded; the kind of speckle random weights or a model
on an unusual scanner produce), given by a runner that returns that label map, through
:func:`node.processing.pipeline.process_series` as the node runs it: regions and their measures, the
selection, SEG, SR (with the node's default cap on the findings it lists), the consistency check of every
number against the objects, writing (fsynced). The figures are the pipeline's own stage timings; the target
(issue 30) is ROIs + SR <= 2 s for 2,000 findings on 300 x 512 x 512.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.results_file import machine, write_result

ROOT = Path(__file__).resolve().parents[1]


def speckle(shape: tuple[int, int, int], findings: int, seed: int = 7) -> np.ndarray:
    """A uint8 label map with ``findings`` separate blobs (label 1) of 4 to 60 voxels, none touching another."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    taken = np.zeros(shape, bool)
    placed = 0
    while placed < findings:
        d, h, w = (int(v) for v in rng.integers(1, 5, size=3))
        k, j, i = (int(rng.integers(1, s - e - 1)) for s, e in zip(shape, (d, h, w), strict=True))
        if taken[k - 1:k + d + 1, j - 1:j + h + 1, i - 1:i + w + 1].any():
            continue
        labels[k:k + d, j:j + h, i:i + w] = 1
        taken[k - 1:k + d + 1, j - 1:j + h + 1, i - 1:i + w + 1] = True
        placed += 1
    return labels


class FixedLabels:
    """A runner whose prediction is a given label map (the model's time is not what is measured here)."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def predict(self, volume: Any, *, deadline: float | None = None) -> Any:
        from node.inference.prediction import LabelMap

        return LabelMap(self.labels.copy())


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--findings", type=int, default=2000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from benchmarks.stages import ensure_series
    from node.config import OutputsConfig
    from node.imaging.volume import load_series
    from node.inference.registry import Registry
    from node.outputs.equipment import Provenance
    from node.processing.pipeline import ModelContext, PipelineOptions, process_series

    ct = ensure_series(args.size, args.slices)
    files = sorted(ct.glob("*.dcm"))
    model = Registry(ROOT / "models").get("lesion-ct-demo")
    card = model.card.model_copy(update={"labels": [model.card.labels[0].model_copy(update={"min_volume_mm3": 0})]})
    model = dataclasses.replace(model, card=card)
    volume = load_series(files)
    labels = speckle(volume.shape, args.findings)
    ctx = ModelContext(model, FixedLabels(labels), Provenance(model=model))  # type: ignore[arg-type]
    options = PipelineOptions(outputs=OutputsConfig(preview_png=False))
    rows: list[dict[str, float]] = []
    reported = listed = 0
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = process_series(files, ctx, Path(tmp), options=options, volume=volume)
            rows.append(out.result.timings)
            reported = len(out.result.findings)
            listed = sum(1 for f in out.result.findings if f.diameter_3d_mm is not None)
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in ("rois", "seg", "sr", "check", "write")}
    both = med["rois"] + med["sr"]
    lines = [
        "## Many findings on a full-size CT (a noisy model)", "",
        f"Machine: {machine()}  ",
        f"Command: `python -m benchmarks.many_findings --findings {args.findings} --size {args.size} "
        f"--slices {args.slices} --repeats {args.repeats}`; median of {args.repeats}", "",
        f"{reported} findings in the SEG and result.json, {listed} described in full and listed in the SR.", "",
        "| ROIs (s) | SEG (s) | SR (s) | check (s) | write (s) | ROIs + SR (s) | per finding (ms) |",
        "|---|---|---|---|---|---|---|",
        f"| {med['rois']:.2f} | {med['seg']:.2f} | {med['sr']:.2f} | {med['check']:.2f} | {med['write']:.2f} | "
        f"**{both:.2f}** | {1000 * both / max(reported, 1):.2f} |", "",
        "Target (issue 30): ROIs + SR <= 2 s for 2,000 findings on 300 x 512 x 512.", "",
    ]
    print("\n".join(lines))
    return write_result("\n".join(lines), "many-findings")


if __name__ == "__main__":
    main()
