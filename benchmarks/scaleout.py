"""Scale-out on Ray: 1 model actor vs 2, throughput and latency; a STAT study behind a routine batch.

    python -m benchmarks.scaleout [--studies 8] [--repeats 3] [--address HOST:PORT] [--gpus-per-actor 0]
                                  [--no-stat]

A local Ray cluster is started (``ray start --head``, as on a head server) unless ``--address`` names
one. For each actor count a fresh node (``[compute] backend = "ray"``, one torch thread per actor)
receives the concurrency scenario's studies (256 x 256 x 96 CT, the demo model) by C-STORE, one
association each, back to back, from the PACS in processes of its own (dcmtk's ``storescu`` and
``storescp`` when installed; else a pynetdicom sender process and the in-process test sink):

- **throughput**: studies / minute from the first instance sent to the last job done (the median of
  ``--repeats`` runs);
- **latency**: each job's time to result (its series' last instance -> its results queued), p50, p95;
- **CPU per study**: the node process's and the actors' (each actor reports its process CPU time);
- **STAT behind a batch**: the same routine batch, then one more study sent to the node's STAT AE title
  (a route with ``priority = "stat"``): its time to result against the routine ones'.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.ingest import wait_port
from benchmarks.results_file import machine, write_result

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work" / "scaleout"


def ray_cli() -> list[str]:
    """Ray's command line: the ``ray`` script beside this interpreter, else its module (a ``--target`` install)."""
    script = Path(sys.executable).parent / "ray"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]


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


def _send(folders: list[Path], port: int, called: str) -> None:
    """The PACS pushes the studies, one association each, from processes of its own (dcmtk's storescu
    when installed): the sender's work is not the node's, and must not hold the node's interpreter."""
    if shutil.which("storescu"):
        cmds = [["storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port),
                 *(str(p) for p in sorted(f.glob("*.dcm")))] for f in folders]
    else:
        cmds = [[sys.executable, "-m", "benchmarks.send_studies", called, str(port), *map(str, folders)]]
    for cmd in cmds:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"sending to {called} failed ({done.returncode}): {done.stderr[-2000:]}")


def _process_cpu() -> float:
    """CPU seconds of this process (the node; the harness's polling is one COUNT query every 0.2 s)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Pacs:
    """The PACS receiving the results: dcmtk's storescp in its own process when installed, else the
    node's test sink (in this process: it receives two small objects per study)."""

    def __init__(self, folder: Path) -> None:
        from node.devtools.sink import StoreSink
        from tests.conftest import free_port

        folder.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.sink: StoreSink | None = None
        if shutil.which("storescp"):
            self.port = free_port()
            self.proc = subprocess.Popen(["storescp", "--fork", "-aet", "SINK", "-od", str(folder), "-uf",
                                          str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(self.port, timeout=10)
        else:
            self.sink = StoreSink(folder, ae_title="SINK")
            self.port = self.sink.port

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        if self.sink is not None:
            self.sink.stop()


def _run(actors: int, address: str, folders: list[Path], stat: Path | None, gpus: float) -> dict[str, Any]:
    from node.config import load_config
    from node.service import Node
    from tests.conftest import free_port

    tmp = Path(tempfile.mkdtemp(dir=WORK))
    sink = _Pacs(tmp / "pacs")
    port = free_port()
    cfg = tmp / "node.toml"
    cfg.write_text(_config(tmp / "data", port, sink.port, actors, address, gpus))
    node = Node(load_config(cfg))
    node.start()
    try:
        assert node.pool is not None
        node.pool.preload([node.registry.get("lesion-ct-demo")] * actors)  # warm on every actor: no load timed
        actors_cpu0 = sum(c["cpu_seconds"] for c in node.pool.capacities() if c)
        cpu0 = _process_cpu()
        t0 = time.time()
        _send(folders, port, "PREANNOT")
        if stat is not None:
            _send([stat], port, "STAT")
        total = len(folders) + (stat is not None)
        while (counts := node.store.counts()).get("done", 0) < total:  # one COUNT query: cheap polling
            if counts.get("dead"):
                raise SystemExit("a job died")
            time.sleep(0.2)
        node_cpu = _process_cpu() - cpu0
        jobs = node.store.list_jobs(state="done", limit=1000)
        end = max(j.finished_at or 0 for j in jobs)
        routine = [j.result.time_to_result_s for j in jobs if j.priority == "routine" and j.result]
        stat_t = [j.result.time_to_result_s for j in jobs if j.priority == "stat" and j.result]
        if stat is not None and not stat_t:
            raise SystemExit(f"no STAT job among {[(j.id, j.route, j.priority) for j in jobs]}")
        lat = sorted(routine)
        return {"actors": actors, "studies": total, "wall_s": end - t0,
                "throughput_per_min": 60.0 * total / (end - t0),
                "p50_s": statistics.median(lat), "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
                "stat_s": stat_t[0] if stat_t else None, "routine_max_s": max(lat),
                "node_cpu_per_study_s": node_cpu / total,
                "actor_cpu_per_study_s": (sum(c["cpu_seconds"] for c in node.pool.capacities() if c)
                                          - actors_cpu0) / total}
    finally:
        node.stop()
        sink.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    ap.add_argument("--gpus-per-actor", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=1, help="runs per actor count; the median is reported")
    ap.add_argument("--no-stat", action="store_true", help="skip the STAT-behind-a-batch runs")
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
        subprocess.run([*ray_cli(), "start", "--head", f"--port={rport}", f"--num-cpus={os.cpu_count()}",
                        "--include-dashboard=false", f"--temp-dir={started}", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=180)
        address = f"127.0.0.1:{rport}"
    try:
        rows = []
        for actors in (1, 2):
            runs = sorted((_run(actors, address, batch, None, args.gpus_per_actor) for _ in range(args.repeats)),
                          key=lambda r: r["throughput_per_min"])
            thr = {**runs[len(runs) // 2], "all": [r["throughput_per_min"] for r in runs]}  # the median run
            pri = None if args.no_stat else _run(actors, address, batch, stat, args.gpus_per_actor)
            rows.append({**thr, "stat_s": pri and pri["stat_s"], "routine_max_with_stat_s": pri and pri["routine_max_s"]})
            print(f"  {actors} actor(s): {thr['throughput_per_min']:.1f} studies/min (runs: "
                  + ", ".join(f"{t:.1f}" for t in thr["all"]) + f"), p95 {thr['p95_s']:.1f} s; CPU per study: node "
                  f"{thr['node_cpu_per_study_s']:.2f} s, actors {thr['actor_cpu_per_study_s']:.2f} s"
                  + (f"; STAT {pri['stat_s']:.1f} s (routine up to {pri['routine_max_s']:.1f} s)" if pri else ""),
                  flush=True)
    finally:
        if started is not None:
            subprocess.run([*ray_cli(), "stop", "--force"], env=env, capture_output=True, timeout=120)
            shutil.rmtree(started, ignore_errors=True)
    ratio = rows[1]["throughput_per_min"] / rows[0]["throughput_per_min"]
    peers = "dcmtk storescu / storescp" if shutil.which("storescu") and shutil.which("storescp") else \
        "a pynetdicom sender process / the in-process test sink"
    lines = ["## Scale-out on Ray: 1 actor vs 2, and a STAT study behind a routine batch", "",
             f"Machine: {machine()}  ",
             f"Command: `python -m benchmarks.scaleout --studies {args.studies} --repeats {args.repeats}"
             + (f" --gpus-per-actor {args.gpus_per_actor}" if args.gpus_per_actor else "")
             + (" --no-stat" if args.no_stat else "") + "`; "
             f"{args.studies} studies 256 x 256 x 96, demo model, one torch thread per actor, local Ray cluster; "
             f"PACS: {peers}; median of {args.repeats} run(s) per actor count", "",
             "| actors | throughput (studies/min) | runs | p50 time to result (s) | p95 (s) | node CPU / study (s) | "
             "actor CPU / study (s) | STAT behind the batch (s) | routine, slowest (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stat_cells = (f"{r['stat_s']:.1f} | {r['routine_max_with_stat_s']:.1f}" if r["stat_s"] is not None
                      else "— | —")
        lines.append(f"| {r['actors']} | {r['throughput_per_min']:.1f} | " + ", ".join(f"{t:.1f}" for t in r["all"])
                     + f" | {r['p50_s']:.1f} | {r['p95_s']:.1f} | {r['node_cpu_per_study_s']:.2f} | "
                     f"{r['actor_cpu_per_study_s']:.2f} | {stat_cells} |")
    lines += ["", f"2 actors / 1 actor: throughput **{ratio:.2f}x** (target >= 1.8x)", ""]
    return write_result("\n".join(lines), "scaleout")


if __name__ == "__main__":
    main()
