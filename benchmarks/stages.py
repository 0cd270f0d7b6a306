"""Per-stage timing of one job on a 512 x 512 x 300 CT: read, decode, inference, ROI, SEG, SR, send.

    python -m benchmarks.stages [--slices 300] [--size 512] [--repeat 3] [--device auto]

The series is generated once under benchmarks/work/ (synthetic chest CT, 0.7 mm pixels, 1 mm slices).
Each repetition runs the node's own code: load_series, the bundle runner, extract_rois, build_seg,
build_sr (written with fsync) and a C-STORE of both objects to a local storage SCP.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.results_file import write_result

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work"


def ensure_series(size: int, slices: int) -> Path:
    from node.devtools.synth.phantom import CaseGeometry, make_phantom
    from node.devtools.synth.writer import write_series

    out = WORK / f"ct_{size}x{size}x{slices}"
    if len(list(out.glob("*.dcm"))) == slices:
        return out
    print(f"generating a {size}x{size}x{slices} CT in {out} ...", flush=True)
    geom = CaseGeometry(size=size, slices=slices, spacing_xy=360.0 / size, spacing_z=1.0)
    write_series(make_phantom(31337, geom, n_lesions=4), out, seed=31337)
    return out


def run(args: argparse.Namespace) -> list[dict[str, float]]:
    import torch

    from node.config import OutputsConfig
    from node.devtools.sink import StoreSink
    from node.imaging.volume import load_series
    from node.inference.registry import Registry
    from node.inference.rois import extract_rois
    from node.inference.runner import BundleRunner
    from node.net.scu import send_files
    from node.outputs.equipment import Provenance
    from node.outputs.result import save_dataset
    from node.outputs.seg import build_seg
    from node.outputs.sr import build_sr

    series = ensure_series(args.size, args.slices)
    files = sorted(series.glob("*.dcm"))
    model = Registry(ROOT / "models").get(args.model)
    runner = BundleRunner(model, device=args.device)
    prov = Provenance(model=model)
    outputs = OutputsConfig()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sink = StoreSink(Path(tmp) / "sink", ae_title="SINK")
        try:
            for rep in range(args.repeat):
                t = {}
                t0 = time.perf_counter()
                vol = load_series(files)
                t["read"] = vol.timings["read_headers"]
                t["decode"] = vol.timings["decode"]
                a = time.perf_counter()
                labels = runner.predict(vol).labels
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t["inference"] = time.perf_counter() - a
                a = time.perf_counter()
                rois = extract_rois(labels, vol, model.card)
                t["roi"] = time.perf_counter() - a
                a = time.perf_counter()
                seg = build_seg(vol, rois, model.card, prov, series_number=outputs.seg_series_number) if rois else None
                paths = []
                if seg is not None:
                    paths.append(str(save_dataset(seg, Path(tmp) / f"seg{rep}.dcm")))
                t["seg"] = time.perf_counter() - a
                a = time.perf_counter()
                sr = build_sr(vol, rois, model.card, prov, seg=seg, series_number=outputs.sr_series_number)
                paths.append(str(save_dataset(sr, Path(tmp) / f"sr{rep}.dcm")))
                t["sr"] = time.perf_counter() - a
                a = time.perf_counter()
                outcomes = send_files(paths, ae_title="SINK", host="127.0.0.1", port=sink.port)
                assert all(o.ok for o in outcomes), outcomes
                t["send"] = time.perf_counter() - a
                t["total"] = time.perf_counter() - t0
                t["all_but_inference"] = t["total"] - t["inference"]
                t["rois_found"] = float(len(rois))
                rows.append(t)
                print(f"  run {rep + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()), flush=True)
        finally:
            sink.stop()
    return rows


def table(rows: list[dict[str, float]], args: argparse.Namespace) -> str:
    import torch

    keys = ["read", "decode", "inference", "roi", "seg", "sr", "send", "all_but_inference", "total"]
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else \
        f"CPU ({torch.get_num_threads()} threads)"
    lines = [f"### Stages of one job, {args.size}x{args.size}x{args.slices} CT, model {args.model} on {dev}", "",
             f"Command: `python -m benchmarks.stages --size {args.size} --slices {args.slices} --repeat {args.repeat}"
             f" --device {args.device}`  ",
             f"Machine: {platform.node()}, {platform.processor() or platform.machine()}, "
             f"{__import__('os').cpu_count()} cores; {time.strftime('%Y-%m-%d')}", "",
             "| stage | median s | min s | max s |", "|---|---|---|---|"]
    for k in keys:
        vals = [r[k] for r in rows]
        lines.append(f"| {k} | {statistics.median(vals):.2f} | {min(vals):.2f} | {max(vals):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default="lesion-ct-demo")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    rows = run(args)
    text = table(rows, args)
    return write_result(text, "stages")


if __name__ == "__main__":
    main()
