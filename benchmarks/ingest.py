"""Ingest: the same CT series sent by dcmtk's storescu (and by pynetdicom) into preannot (durable:
fsync + index), dcmtk's storescp and Orthanc, alternating runs; also the node's peak memory on a
large series.

    python -m benchmarks.ingest [--slices 300] [--repeat 3]

Peers: `storescp` (dcmtk, writes files, no fsync), Orthanc (Debian package, its own storage and
SQLite index), `preannot serve` (fsync of each file and folder, SQLite WAL synchronous=FULL, then
Success). Each run starts with an empty store; the time is the sender's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results_file import write_result

ROOT = Path(__file__).resolve().parents[1]
#: dcmtk leaves Nagle's algorithm on unless TCP_NODELAY is set in the environment; then every C-STORE
#: response waits for a delayed ACK (about 40 ms on Linux). The benchmark runs dcmtk both ways: as
#: shipped (what a default installation, and the issue's own measurement, get) and tuned.
SHIPPED_ENV = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
DCMTK_ENV = {**SHIPPED_ENV, "TCP_NODELAY": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    """Wait until something listens on the loopback port (a peer started as a process)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


class Peer:
    name = ""
    #: environment of dcmtk-based peers (set per configuration by the benchmark)
    env: dict[str, str] = DCMTK_ENV

    def start(self, work: Path) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def stored(self, work: Path) -> int:
        """How many instances the peer holds after a run (checked: a fast peer must also be complete)."""
        raise NotImplementedError

    def peak_rss_mb(self) -> float | None:
        proc = getattr(self, "proc", None)
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except (OSError, AttributeError):
            return None
        return None


class Storescp(Peer):
    name = "dcmtk storescp"

    def start(self, work: Path) -> int:
        port = _port()
        (work / "scp").mkdir()
        self.proc = subprocess.Popen(["storescp", "-dhl", "-aet", "STORESCP", "-od", str(work / "scp"), "-pdu",
                                      "131072", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=self.env)
        wait_port(port)
        return port

    def stored(self, work: Path) -> int:
        return len(list((work / "scp").iterdir()))


class OrthancPeer(Peer):
    name = "Orthanc"

    def start(self, work: Path) -> int:
        port, http = _port(), _port()
        cfg = {"Name": "BENCH", "StorageDirectory": str(work / "orthanc"), "IndexDirectory": str(work / "orthanc"),
               "DicomPort": port, "HttpPort": http, "DicomAet": "ORTHANC", "DicomCheckCalledAet": False,
               "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": []}
        (work / "orthanc.json").write_text(json.dumps(cfg))
        self.proc = subprocess.Popen(["Orthanc", str(work / "orthanc.json")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=self.env)  # Orthanc's DICOM layer is dcmtk
        self.http = http
        wait_port(port)
        return port

    def stored(self, work: Path) -> int:
        import httpx

        return int(httpx.get(f"http://127.0.0.1:{self.http}/statistics", timeout=10).json()["CountInstances"])


class BarePynetdicom(Peer):
    """benchmarks/bare_scp.py: pynetdicom writing raw bytes (no parse, no fsync, no index)."""

    name = "bare pynetdicom (raw bytes, no fsync)"

    def start(self, work: Path) -> int:
        port = _port()
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bare_scp", str(port), str(work / "bare")],
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        return port

    def stored(self, work: Path) -> int:
        return len(list((work / "bare").glob("*.dcm")))


class Preannot(Peer):
    """A real `preannot serve` process; subclasses add configuration (routes, destinations)."""

    name = "preannot (fsync + index)"
    stable_seconds = 3600.0

    def extra_config(self) -> str:
        return ""

    def start(self, work: Path) -> int:
        port = _port()
        self.db = work / "node" / "node.db"
        (work / "node.toml").write_text(f'''[node]
ae_title = "PREANNOT"
bind = "127.0.0.1"
port = {port}
data_dir = "{work / 'node'}"
allowed_callers = ["*"]
max_pdu = 131072
max_associations_per_caller = 8
free_space_reserve_mb = 0
stable_seconds = {self.stable_seconds}
[models]
dir = "{ROOT / 'models'}"
[web]
enabled = false
{self.extra_config()}''')
        self.proc = subprocess.Popen([sys.executable, "-m", "node.cli", "--log-level", "WARNING", "serve", "--config",
                                      str(work / "node.toml")], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(port)
        return port

    def query(self, sql: str) -> list[tuple]:
        """Read the node's database (read-only)."""
        import sqlite3

        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return list(con.execute(sql).fetchall())
        finally:
            con.close()

    def stored(self, work: Path) -> int:
        return int(self.query("SELECT COUNT(*) FROM instances")[0][0])


def _storescu(folder: Path, port: int, aec: str, env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(["storescu", "-aet", "STORESCU", "-aec", aec, "-pdu", "131072", "+sd", "127.0.0.1", str(port),
                    str(folder)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t


def _pynetdicom(folder: Path, port: int, aec: str, env: dict[str, str]) -> float:
    from node.net.scu import send_files

    files = [str(p) for p in sorted(folder.glob("*.dcm"))]
    t = time.perf_counter()
    outcomes = send_files(files, ae_title=aec, host="127.0.0.1", port=port, calling_ae="BENCHSCU")
    elapsed = time.perf_counter() - t
    if not all(o.ok for o in outcomes):
        raise RuntimeError(f"{sum(not o.ok for o in outcomes)} instance(s) refused")
    return elapsed


def durable_floor(folder: Path, work: Path) -> tuple[float, float]:
    """Seconds to store the series' files durably with no network and no DICOM at all, the way the
    spool does: temp file + fsync + rename + folder fsync; then the same plus one SQLite commit
    (WAL, synchronous=FULL) per file. The floor under any receiver that answers only once the
    instance is on disk, whatever its language."""
    import sqlite3

    blobs = [p.read_bytes() for p in sorted(folder.glob("*.dcm"))]
    results = []
    for with_index in (False, True):
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            root = Path(tmp)
            (root / "s").mkdir()
            con = sqlite3.connect(root / "i.db", isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("CREATE TABLE i (n INTEGER PRIMARY KEY, path TEXT)")
            t = time.perf_counter()
            for n, blob in enumerate(blobs):
                tmp_path, final = root / f"{n}.part", root / "s" / f"{n}.dcm"
                fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, blob)
                os.fsync(fd)
                os.close(fd)
                os.replace(tmp_path, final)
                dfd = os.open(root / "s", os.O_RDONLY)
                os.fsync(dfd)
                os.close(dfd)
                if with_index:
                    con.execute("BEGIN IMMEDIATE")
                    con.execute("INSERT INTO i (n, path) VALUES (?, ?)", (n, str(final)))
                    con.execute("COMMIT")
            results.append(time.perf_counter() - t)
            con.close()
    return results[0], results[1]


#: (label, sender, environment of the dcmtk processes: sender and peers)
CONFIGS = [
    ("storescu, dcmtk as shipped", _storescu, SHIPPED_ENV),
    ("storescu, TCP_NODELAY=1", _storescu, DCMTK_ENV),
    ("pynetdicom", _pynetdicom, DCMTK_ENV),
]


def run(args: argparse.Namespace) -> str:
    from benchmarks.stages import ensure_series

    series = ensure_series(args.size, args.slices)
    mb = sum(p.stat().st_size for p in series.glob("*.dcm")) / 1e6
    peers = [Storescp(), OrthancPeer(), BarePynetdicom(), Preannot()]
    configs = [c for c in CONFIGS if not args.only or any(o in c[0] for o in args.only)]
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeat):
        for label, sender, env in configs:
            for peer in peers:  # alternating: each repetition visits every peer in turn
                peer.env = env
                with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks" / "work") as tmp:
                    port = peer.start(Path(tmp))
                    try:
                        aec = {"dcmtk storescp": "STORESCP", "Orthanc": "ORTHANC"}.get(peer.name, "PREANNOT")
                        elapsed = sender(series, port, aec, env)
                        stored = peer.stored(Path(tmp))
                    finally:
                        peer.stop()
                    if stored != args.slices:
                        raise RuntimeError(f"{peer.name} stored {stored} of {args.slices} instances")
                times.setdefault((label, peer.name), []).append(elapsed)
                print(f"  rep {rep + 1}: {label} -> {peer.name}: {elapsed:.2f} s", flush=True)
    floors = [durable_floor(series, ROOT / "benchmarks" / "work") for _ in range(args.repeat)]
    files_only, with_index = statistics.median(f[0] for f in floors), statistics.median(f[1] for f in floors)
    lines = [f"### Ingest of a {args.size}x{args.size}x{args.slices} CT ({mb:.0f} MB, {args.slices} files), loopback",
             "", f"Command: `python -m benchmarks.ingest --size {args.size} --slices {args.slices} --repeat {args.repeat}"
             + "".join(f' --only "{o}"' for o in args.only) + "`  ",
             f"Machine: {platform.node()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; PDU 128 KiB; "
             "storescp with -dhl; every run checked complete", "",
             "| sender | receiver | median s | min s | max s | MB/s | ratio to storescp |", "|---|---|---|---|---|---|---|"]
    for label, _, _ in configs:
        base = statistics.median(times[(label, "dcmtk storescp")])
        for peer in peers:
            v = times[(label, peer.name)]
            med = statistics.median(v)
            lines.append(f"| {label} | {peer.name} | {med:.2f} | {min(v):.2f} | {max(v):.2f} | {mb / med:.0f} | "
                         f"{med / base:.2f} |")
    tuned = statistics.median(times[("storescu, TCP_NODELAY=1", "dcmtk storescp")]) \
        if ("storescu, TCP_NODELAY=1", "dcmtk storescp") in times else None
    lines += ["", "Durable storage alone, no network (the same files written as the spool writes them, median of "
              f"{args.repeat}):", "", "| floor | seconds | ratio to storescp (TCP_NODELAY=1) |", "|---|---|---|",
              f"| files: temp + fsync + rename + folder fsync | {files_only:.2f} | "
              f"{files_only / tuned:.2f} |" if tuned else f"| files | {files_only:.2f} | |",
              f"| files + one SQLite commit (WAL, FULL) each | {with_index:.2f} | "
              f"{with_index / tuned:.2f} |" if tuned else f"| files + index | {with_index:.2f} | |"]
    lines += ["", "\"as shipped\": no TCP_NODELAY in the environment of storescu, storescp and Orthanc (dcmtk's "
              "default); TCP_NODELAY=1: set for all three. pynetdicom (sender, bare receiver and preannot) sets no "
              "socket options."]
    return "\n".join(lines) + "\n"


def main() -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", action="append", default=[],
                    help="run only the configurations whose label contains this text (repeatable)")
    args = ap.parse_args()
    for tool in ("storescu", "storescp", "Orthanc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: make bench installs dcmtk and orthanc (as root)")
    (ROOT / "benchmarks" / "work").mkdir(parents=True, exist_ok=True)
    text = run(args)
    return write_result(text, "ingest")


if __name__ == "__main__":
    main()
