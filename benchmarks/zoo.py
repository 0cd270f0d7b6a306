"""Published Model Zoo bundles through the node's pipeline, per stage (GPU with AMP when there is one).

    python -m benchmarks.zoo --zoo ../shared/data/model_zoo [--size 512 --slices 300] [--device auto]

Each bundle (configs and scripts as published, seeded random weights: released weights cannot be
downloaded here; see node/devtools/zoo.py) runs through ``process_series`` on a synthetic chest CT:
one warm-up run, then ``--repeats`` timed runs. Printed as a table and JSON: the stages (read, inference,
ROIs, SEG, SR, total), peak GPU memory, and how many ROIs came out. Random weights make the number of
ROIs (and so the SEG/SR time) differ from a trained model's; the inference time does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def install_all(zoo: Path, models: Path, only: list[str]) -> list[str]:
    import shutil

    from node.devtools.zoo import DETECTION_CARD, SPLEEN_CARD, install_detector, install_segmenter
    from node.inference.cards import draft_card

    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    names = []
    if "spleen" in only:
        install_segmenter(zoo, "spleen_ct_segmentation", models, SPLEEN_CARD)
        names.append("spleen_ct_segmentation")
    if "wholebody" in only:
        card = draft_card(zoo / "wholeBody_ct_segmentation").text
        install_segmenter(zoo, "wholeBody_ct_segmentation", models, card)
        names.append("wholeBody_ct_segmentation")
    if "detection" in only:
        install_detector(zoo, models, DETECTION_CARD)
        names.append("lung_nodule_ct_detection")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "model_zoo")
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work",
                    help="installed bundles and outputs (the CT is benchmarks/work's, shared with the other scenarios)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", default="spleen,wholebody,detection")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    import torch

    from node.config import OutputsConfig
    from node.imaging.volume import load_series
    from node.inference.kinds import load_runner
    from node.inference.registry import load_model
    from node.outputs.equipment import Provenance
    from node.processing.pipeline import ModelContext, PipelineOptions, process_series

    if not args.zoo.is_dir():
        print(f"no Model Zoo bundles at {args.zoo}", file=sys.stderr)
        return 2
    from benchmarks.stages import ensure_series

    ct = ensure_series(args.size, args.slices)
    files = sorted(ct.glob("*.dcm"))
    names = install_all(args.zoo, args.work / "zoo_models", args.only.split(","))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    machine = f"{platform.node()}: {os.cpu_count()} cores, {gpu}; torch {torch.__version__}"
    print(machine, flush=True)
    rows = []
    for name in names:
        model = load_model(args.work / "zoo_models" / name)
        t0 = time.perf_counter()
        runner = load_runner(model, device=args.device, amp=True)
        load_s = time.perf_counter() - t0
        ctx = ModelContext(model, runner, Provenance.for_node(model, OutputsConfig(), device_uid="1.2.3"))
        runs = []
        for rep in range(args.repeats + 1):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            volume = load_series(files)
            out = process_series(files, ctx, args.work / "zoo_out" / f"{name}-{rep}", volume=volume,
                                 options=PipelineOptions(fsync=False))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
            if rep:  # the first run warms up (cuDNN autotuning, allocator)
                runs.append({**out.result.timings, "peak_gpu_gib": peak, "n_rois": len(out.rois)})
            print(f"  {name} run {rep}: inference {out.result.timings['inference']:.2f} s, total {out.result.timings['total']:.2f} s, "
                  f"{len(out.rois)} ROI(s), peak GPU {peak:.1f} GiB", flush=True)
        med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in
               ("inference", "rois", "seg", "sr", "total", "peak_gpu_gib", "n_rois")}
        rows.append({"model": name, "kind": model.kind, "device": str(runner.device), "amp": runner.amp,
                     "load_s": round(load_s, 2), **{k: round(v, 3) for k, v in med.items()}})
    print(f"\n{machine}; {args.size}x{args.size}x{args.slices} synthetic CT, median of {args.repeats} runs after a warm-up")
    print("| bundle | device | AMP | load (s) | inference (s) | ROIs (s) | SEG (s) | SR (s) | total (s) | peak GPU (GiB) | ROIs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['amp']} | {r['load_s']} | {r['inference']} | {r['rois']} | "
              f"{r['seg']} | {r['sr']} | {r['total']} | {r['peak_gpu_gib']} | {int(r['n_rois'])} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
