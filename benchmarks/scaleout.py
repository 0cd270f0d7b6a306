"""Scale-out on Ray: 1 model actor vs 2, throughput and latency; a STAT study behind a routine batch.

    python -m benchmarks.scaleout [--studies 8] [--address HOST:PORT] [--gpus-per-actor 0]

A local Ray cluster is started (``ray start --head``, as on a head server) unless ``--address`` names
one. For each actor count a fresh node (``[compute] backend = "ray"``, one torch thread per actor)
receives the concurrency scenario's studies (256 x 256 x 96 CT, the demo model) by C-STORE, one
association each, back to back:

- **throughput**: studies / minute from the first instance sent to the last job done;
- **latency**: each job's time to result (its series' last instance -> its results queued), p50, p95;
- **STAT behind a batch**: the same routine batch, then one more study sent to the node's STAT AE title
  (a route with ``priority = "stat"``): its time to result against the routine ones'.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.results_file import machine, write_result

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work" / "scaleout"
RAY = Path(sys.executable).parent / "ray"


def _config(data: Path, port: int, sink_port: int, actors: int, address: str, gpus: float) -> str:
    return f'''
[node]
ae_title = "PREANNOT"
port = {port}
data_dir = "{data}"
allowed_callers = ["BENCH"]
stable_seconds = 1.0
fsync = true

[[destinations]]
name = "pacs"
ae_title = "SINK"
host = "127.0.0.1"
port = {sink_port}

[[routes]]
name = "routine"
called_ae = ["PREANNOT"]
match = {{ Modality = "CT" }}
models = ["lesion-ct-demo"]
send_to = ["pacs"]

[[routes]]
name = "stat"
called_ae = ["STAT"]
match = {{ Modality = "CT" }}
models = ["lesion-ct-demo"]
send_to = ["pacs"]
priority = "stat"

[models]
dir = "{ROOT / 'models'}"
device = "{'cuda' if gpus else 'cpu'}"

[compute]
backend = "ray"
address = "{address}"
actors = {actors}
threads_per_actor = 1
gpus_per_actor = {gpus}

[web]
enabled = false
'''


def _send(folder: Path, port: int, called: str) -> None:
    from node.net.scu import send_files

    out = send_files([str(p) for p in sorted(folder.glob("*.dcm"))], ae_title=called, host="127.0.0.1", port=port,
                     calling_ae="BENCH")
    if not all(o.ok for o in out):
        raise SystemExit(f"sending {folder} failed")


def _run(actors: int, address: str, folders: list[Path], stat: Path | None, gpus: float) -> dict[str, Any]:
    from node.config import load_config
    from node.devtools.sink import StoreSink
    from node.service import Node
    from tests.conftest import free_port

    tmp = Path(tempfile.mkdtemp(dir=WORK))
    sink = StoreSink(tmp / "pacs", ae_title="SINK")
    port = free_port()
    cfg = tmp / "node.toml"
    cfg.write_text(_config(tmp / "data", port, sink.port, actors, address, gpus))
    node = Node(load_config(cfg))
    node.start()
    try:
        assert node.pool is not None
        node.pool.preload([node.registry.get("lesion-ct-demo")] * actors)  # warm on every actor: no load timed
        t0 = time.time()
        for f in folders:
            _send(f, port, "PREANNOT")
        if stat is not None:
            _send(stat, port, "STAT")
        total = len(folders) + (stat is not None)
        while len(node.store.list_jobs(state="done")) < total:
            if node.store.list_jobs(state="dead"):
                raise SystemExit("a job died")
            time.sleep(0.2)
        jobs = node.store.list_jobs(state="done", limit=1000)
        end = max(j.finished_at or 0 for j in jobs)
        routine = [j.result["time_to_result_s"] for j in jobs if j.priority == "routine" and j.result]
        stat_t = [j.result["time_to_result_s"] for j in jobs if j.priority == "stat" and j.result]
        if stat is not None and not stat_t:
            raise SystemExit(f"no STAT job among {[(j.id, j.route, j.priority) for j in jobs]}")
        lat = sorted(routine)
        return {"actors": actors, "studies": total, "wall_s": end - t0,
                "throughput_per_min": 60.0 * total / (end - t0),
                "p50_s": statistics.median(lat), "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
                "stat_s": stat_t[0] if stat_t else None, "routine_max_s": max(lat)}
    finally:
        node.stop()
        sink.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    ap.add_argument("--gpus-per-actor", type=float, default=0.0)
    args = ap.parse_args(argv)

    from benchmarks.e2e import ensure_studies

    WORK.mkdir(parents=True, exist_ok=True)
    folders = ensure_studies(args.studies + 1)
    batch, stat = folders[: args.studies], folders[args.studies]
    started = None
    address = args.address
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if address is None:
        from tests.conftest import free_port

        rport = free_port()
        started = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        subprocess.run([str(RAY), "start", "--head", f"--port={rport}", f"--num-cpus={os.cpu_count()}",
                        "--include-dashboard=false", f"--temp-dir={started}", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=180)
        address = f"127.0.0.1:{rport}"
    try:
        rows = []
        for actors in (1, 2):
            thr = _run(actors, address, batch, None, args.gpus_per_actor)
            pri = _run(actors, address, batch, stat, args.gpus_per_actor)
            rows.append({**thr, "stat_s": pri["stat_s"], "routine_max_with_stat_s": pri["routine_max_s"]})
            print(f"  {actors} actor(s): {thr['throughput_per_min']:.1f} studies/min, p95 {thr['p95_s']:.1f} s; "
                  f"STAT {pri['stat_s']:.1f} s (routine up to {pri['routine_max_s']:.1f} s)", flush=True)
    finally:
        if started is not None:
            subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)
            shutil.rmtree(started, ignore_errors=True)
    ratio = rows[1]["throughput_per_min"] / rows[0]["throughput_per_min"]
    lines = ["## Scale-out on Ray: 1 actor vs 2, and a STAT study behind a routine batch", "",
             f"Machine: {machine()}  ",
             f"Command: `python -m benchmarks.scaleout --studies {args.studies}"
             + (f" --gpus-per-actor {args.gpus_per_actor}" if args.gpus_per_actor else "") + "`; "
             f"{args.studies} studies 256 x 256 x 96, demo model, one torch thread per actor, local Ray cluster", "",
             "| actors | throughput (studies/min) | p50 time to result (s) | p95 (s) | STAT behind the batch (s) | "
             "routine, slowest (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['actors']} | {r['throughput_per_min']:.1f} | {r['p50_s']:.1f} | {r['p95_s']:.1f} | "
                     f"{r['stat_s']:.1f} | {r['routine_max_with_stat_s']:.1f} |")
    lines += ["", f"2 actors / 1 actor: throughput **{ratio:.2f}x** (target >= 1.8x)", ""]
    return write_result("\n".join(lines), "scaleout")


if __name__ == "__main__":
    main()
