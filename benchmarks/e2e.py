"""End-to-end, concurrency and large-series benchmarks against a real `preannot serve` process.

    python -m benchmarks.e2e [--scenario e2e|concurrency|large|all] [--repeat 3] [--model NAME]

Each scenario runs --repeat times (a fresh node or process each time); tables give median, min, max.

- e2e: a 512x512x300 CT from the first instance sent to the last result acknowledged by the
  destination, split into transfer, stable wait, queue, read, decode, inference, ROI, SEG, SR, delivery
  (from the node's own timestamps and per-stage timings).
- concurrency: 8 studies (256x256x96) pushed at once over 4 associations; studies/min, latency p50/p95
  (first instance sent -> results received), peak RSS of the node, objects lost.
- large: a 1000-slice 512x512 CT processed by the node's pipeline in a fresh process; peak RSS against
  the size of the decoded volume.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.ingest import Preannot
from benchmarks.results_file import write_result

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work"
#: the bundle under test (--model): the demo model by default; a heavier, full-resolution bundle in
#: models/ when a GPU is there to run it
MODEL = "lesion-ct-demo"


class Node(Preannot):
    """The node with a route to the demo model and the benchmark's storage SCP as destination."""

    name = "preannot"

    def __init__(self, sink_port: int, stable: float = 2.0, workers: int = 1) -> None:
        self.sink_port, self.stable_seconds, self.workers = sink_port, stable, workers

    def extra_config(self) -> str:
        return f'''
[[destinations]]
name = "pacs"
ae_title = "SINK"
host = "127.0.0.1"
port = {self.sink_port}
[[routes]]
name = "ct"
match = {{ Modality = "CT" }}
models = ["{MODEL}"]
send_to = ["pacs"]
[jobs]
workers = {self.workers}
[delivery]
poll_seconds = 0.2
'''


def _device() -> str:
    import torch

    return f"GPU ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "CPU"


def _header(title: str, command: str) -> list[str]:
    return [f"### {title}", "", f"Command: `{command}`  ",
            f"Machine: {platform.node()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}", ""]


def _table(runs: list[dict[str, float]], unit: dict[str, str] | None = None, bold: tuple[str, ...] = ()) -> list[str]:
    """Median, min and max of each figure over the runs (figures in the order of the first run)."""
    unit = unit or {}
    lines = ["| figure | median | min | max |", "|---|---|---|---|"]
    for name in runs[0]:
        v = [r[name] for r in runs]
        med, lo, hi = statistics.median(v), min(v), max(v)
        u = unit.get(name, "s")
        digits = {"MB": 0, "count": 0, "studies/min": 1}.get(u, 2)
        cells = [f"{x:.{digits}f}" for x in (med, lo, hi)]
        if name in bold:
            name, cells[0] = f"**{name}**", f"**{cells[0]}**"
        lines.append(f"| {name} ({u}) | {cells[0]} | {cells[1]} | {cells[2]} |")
    return lines


def _e2e_once(files: list[str]) -> dict[str, float]:
    from node.devtools.sink import StoreSink
    from node.net.scu import send_files
    from node.store.db import Database
    from node.store.series import SeriesStore

    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        sink = StoreSink(Path(tmp) / "sink", ae_title="SINK")
        node = Node(sink.port, stable=2.0)
        port = node.start(Path(tmp))
        try:
            t0 = time.time()
            outcomes = send_files(files, ae_title="PREANNOT", host="127.0.0.1", port=port, calling_ae="BENCH")
            t_sent = time.time()
            assert all(o.ok for o in outcomes)
            while True:
                rows = node.query("SELECT COUNT(*), SUM(state = 'sent'), MAX(sent_at) FROM outbox")
                if rows and rows[0][0] and rows[0][0] == rows[0][1]:
                    break
                time.sleep(0.2)
            t_end = rows[0][2]
            last_rx = SeriesStore(Database(node.db, readonly=True)).list_series()[0].last_received
            created, started, finished, result = node.query(
                "SELECT created_at, started_at, finished_at, result FROM jobs")[0]
            timings = json.loads(result)["timings"]
            rss = node.peak_rss_mb()
        finally:
            node.stop()
            sink.stop()
    total = t_end - t0
    transfer, stable = t_sent - t0, created - last_rx
    overhead = total - timings["inference"] - stable - transfer
    return {"transfer (300 instances, stored durably)": transfer, "stable wait (stable_seconds = 2)": stable,
            "queue": started - created, "read headers": timings["read"], "decode": timings["decode"],
            "inference": timings["inference"], "ROI": timings["rois"], "SEG": timings.get("seg", 0.0),
            "SR": timings.get("sr", 0.0), "delivery (job done -> last object acknowledged)": t_end - finished,
            "total, first instance sent -> last result acknowledged": total,
            "the node's own work around inference (total - transfer - stable wait - inference)": overhead,
            "the same with the transfer (total - stable wait - inference)": overhead + transfer,
            "peak RSS of the node": rss or 0.0}


def scenario_e2e(repeat: int = 3) -> str:
    from benchmarks.stages import ensure_series

    files = [str(p) for p in sorted(ensure_series(512, 300).glob("*.dcm"))]
    runs = []
    for n in range(repeat):  # a fresh node each time
        runs.append(_e2e_once(files))
        print(f"  e2e run {n + 1}: total {runs[-1]['total, first instance sent -> last result acknowledged']:.2f} s",
              flush=True)
    lines = _header(f"End to end, 512x512x300 CT, model {MODEL} on {_device()}, {repeat} runs",
                    f"python -m benchmarks.e2e --scenario e2e --repeat {repeat} --model {MODEL}")
    lines += _table(runs, unit={"peak RSS of the node": "MB"},
                    bold=("total, first instance sent -> last result acknowledged",
                          "the node's own work around inference (total - transfer - stable wait - inference)"))
    lines += ["", "The preview PNG is drawn after the results are queued for delivery, off this path."]
    return "\n".join(lines) + "\n"


def _concurrency_once(folders: list[Path], associations: int) -> dict[str, float]:
    from pydicom import dcmread

    from node.devtools.sink import StoreSink
    from node.net.scu import send_files
    from node.store.db import Database
    from node.store.series import SeriesStore

    studies = len(folders)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        sink = StoreSink(Path(tmp) / "sink", ae_title="SINK")
        node = Node(sink.port, stable=2.0)
        port = node.start(Path(tmp))
        first_sent: dict[str, float] = {}
        lost = []

        def push(chunk: list[Path]) -> None:
            for d in chunk:
                files = [str(p) for p in sorted(d.glob("*.dcm"))]
                first_sent[d.name] = time.time()
                out = send_files(files, ae_title="PREANNOT", host="127.0.0.1", port=port, calling_ae="BENCH")
                lost.extend(o for o in out if not o.ok)

        try:
            t0 = time.time()
            threads = [threading.Thread(target=push, args=(folders[i::associations],)) for i in range(associations)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            while True:
                jobs = node.query("SELECT COUNT(*), SUM(state IN ('done', 'dead')) FROM jobs")[0]
                pending = node.query("SELECT COUNT(*) FROM outbox WHERE state != 'sent'")[0][0]
                if jobs[0] == studies and jobs[1] == studies and pending == 0:
                    break
                time.sleep(0.5)
            t_end = time.time()
            study_of_series = {s.series_uid: s.study_uid
                               for s in SeriesStore(Database(node.db, readonly=True)).list_series(limit=10000)}
            sent_at: dict[str, float] = {}
            for series_uid, t_sent in node.query("SELECT j.series_uid, MAX(o.sent_at) FROM outbox o JOIN jobs j "
                                                 "ON o.job_id = j.id GROUP BY j.series_uid"):
                study = study_of_series[series_uid]
                sent_at[study] = max(sent_at.get(study, 0.0), t_sent)
            done = list(sent_at.items())
            rss = node.peak_rss_mb()
            dead = node.query("SELECT COUNT(*) FROM jobs WHERE state = 'dead'")[0][0]
        finally:
            node.stop()
            sink.stop()
    study_of = {d.name: str(dcmread(next(d.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID) for d in folders}
    latency = sorted(dict(done)[study_of[name]] - first_sent[name] for name in first_sent)
    p95 = latency[min(len(latency) - 1, round(0.95 * (len(latency) - 1)))]
    counts = list(sink.received.values())
    return {"throughput": studies / (t_end - t0) * 60, "latency p50 (first instance sent -> results received)":
            statistics.median(latency), "latency p95": p95, "peak RSS of the node": rss or 0.0,
            "instances refused or lost": float(len(lost)), "jobs dead": float(dead),
            "result objects received": float(len(counts)),
            "result objects received more than once": float(sum(c > 1 for c in counts))}


def ensure_studies(studies: int = 8) -> list[Path]:
    """The concurrency scenario's small studies (256x256x96), generated once under benchmarks/work."""
    from node.devtools.synth.phantom import CaseGeometry, make_phantom
    from node.devtools.synth.writer import write_series

    folders = []
    for n in range(studies):
        d = WORK / "studies" / f"study_{n:02d}"
        if len(list(d.glob("*.dcm"))) != 96:
            write_series(make_phantom(40000 + n, CaseGeometry()), d, seed=40000 + n)
        folders.append(d)
    return folders


def scenario_concurrency(studies: int = 8, associations: int = 4, repeat: int = 3) -> str:
    folders = ensure_studies(studies)
    runs = []
    for n in range(repeat):
        runs.append(_concurrency_once(folders, associations))
        print(f"  concurrency run {n + 1}: {runs[-1]['throughput']:.1f} studies/min", flush=True)
    lines = _header(f"Concurrency: {studies} studies (256x256x96) over {associations} associations at once, "
                    f"{repeat} runs", f"python -m benchmarks.e2e --scenario concurrency --repeat {repeat}")
    lines += _table(runs, unit={"throughput": "studies/min", "peak RSS of the node": "MB",
                                "instances refused or lost": "count", "jobs dead": "count",
                                "result objects received": "count",
                                "result objects received more than once": "count"})
    return "\n".join(lines) + "\n"


#: the start of a child process that measures its own memory stage by stage (benchmarks e2e and study):
#: ``rss_mb(key)``, and ``sample()`` keeping the peak RSS of the stage named in ``current[0]`` every 20 ms
RSS_SAMPLER = """
import json, sys, tempfile, threading, time
from pathlib import Path

def rss_mb(key='VmRSS:'):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0

peaks, current, stop = {}, ['start'], threading.Event()
def sample():  # the peak RSS of each stage, sampled every 20 ms
    while not stop.is_set():
        peaks[current[0]] = max(peaks.get(current[0], 0.0), rss_mb())
        time.sleep(0.02)
"""

_LARGE_CODE = RSS_SAMPLER + """
from node.inference.registry import Registry
from node.inference.runner import BundleRunner
from node.outputs.equipment import Provenance
from node.processing.pipeline import ModelContext, process_series
threading.Thread(target=sample, daemon=True).start()
def on_stage(name):
    current[0] = name
models, model, series = sys.argv[1:4]
m = Registry(Path(models)).get(model)
files = sorted(Path(series).glob('*.dcm'))
runner = BundleRunner(m)
peaks['imports and model'] = rss_mb()
with tempfile.TemporaryDirectory() as tmp:
    out = process_series(files, ModelContext(m, runner, Provenance(model=m)), Path(tmp), on_stage=on_stage)
    current[0] = 'preview'
time.sleep(0.05)
stop.set()
peaks.pop('start', None)
# VmHWM, not getrusage's ru_maxrss: after fork + exec, ru_maxrss still carries the parent's peak (the
# benchmark process, which may just have generated the series)
hwm = next(int(line.split()[1]) / 1024 for line in open('/proc/self/status') if line.startswith('VmHWM:'))
print(json.dumps({"peak_rss_mb": hwm, "stage_peaks": peaks,
                  "timings": out.result.timings, "shape": list(out.result.shape)}))
"""


def scenario_large(slices: int = 1000, repeat: int = 3) -> str:
    from benchmarks.stages import ensure_series

    series = ensure_series(512, slices)
    results = []
    for n in range(repeat):  # a fresh process each time: its peak RSS is the figure
        proc = subprocess.run([sys.executable, "-c", _LARGE_CODE, str(ROOT / "models"), MODEL, str(series)],
                              cwd=ROOT, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  large run {n + 1}: peak RSS {results[-1]['peak_rss_mb']:.0f} MB", flush=True)
    k, j, i = results[0]["shape"]
    decoded_mb = k * j * i * 2 / 2**20
    runs = [{"peak RSS of the process": r["peak_rss_mb"], "ratio peak RSS / decoded volume":
             r["peak_rss_mb"] / decoded_mb, **r["timings"]} for r in results]
    lines = _header(f"Large series: 512x512x{slices} CT through the pipeline (model {MODEL}, {_device()}), "
                    f"{repeat} runs", f"python -m benchmarks.e2e --scenario large --slices {slices} --repeat {repeat} "
                    f"--model {MODEL}")
    lines += [f"Decoded volume (int16): {decoded_mb:.0f} MB", ""]
    lines += _table(runs, unit={"peak RSS of the process": "MB", "ratio peak RSS / decoded volume": "x"},
                    bold=("ratio peak RSS / decoded volume",))
    lines += ["", "Peak RSS by stage (sampled every 20 ms; a stage's figure includes what earlier stages still hold):",
              ""]
    lines += _table([{stage: mb for stage, mb in r["stage_peaks"].items()} for r in results],
                    unit={stage: "MB" for stage in results[0]["stage_peaks"]})
    return "\n".join(lines) + "\n"


def main() -> Path:
    global MODEL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="all", choices=["e2e", "concurrency", "large", "all"])
    ap.add_argument("--slices", type=int, default=1000, help="slices of the large series")
    ap.add_argument("--model", default=MODEL, help="bundle in models/ to route to (default: the demo model)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each scenario (median, min, max)")
    args = ap.parse_args()
    MODEL = args.model
    WORK.mkdir(parents=True, exist_ok=True)
    texts = []
    if args.scenario in ("e2e", "all"):
        texts.append(scenario_e2e(args.repeat))
    if args.scenario in ("concurrency", "all"):
        texts.append(scenario_concurrency(repeat=args.repeat))
    if args.scenario in ("large", "all"):
        texts.append(scenario_large(args.slices, args.repeat))
    text = "\n".join(texts)
    return write_result(text, args.scenario)


if __name__ == "__main__":
    main()
