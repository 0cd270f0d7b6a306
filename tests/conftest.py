"""Shared fixtures: tiny synthetic series, free ports, the real demo model, dciodvfy, running nodes."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from node.devtools.synth.phantom import CaseGeometry, Phantom, make_phantom
from node.devtools.synth.writer import write_series

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "real_dicom"

#: a small grid for fast tests: 96 x 96 pixels of 3 mm, 24 slices of 5 mm
SMALL = CaseGeometry(size=96, slices=24, spacing_xy=3.0, spacing_z=5.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def small_phantom() -> Phantom:
    return make_phantom(4242, SMALL, n_lesions=2)


@pytest.fixture(scope="session")
def small_series(tmp_path_factory: pytest.TempPathFactory, small_phantom: Phantom) -> Path:
    """A 24-slice CT series with two lesions (uncompressed)."""
    out = tmp_path_factory.mktemp("small_series")
    write_series(small_phantom, out, seed=4242, patient_name="TESTPATIENT^ALICE", patient_id="PID-424242")
    return out


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return ROOT / "models"


@pytest.fixture(scope="session")
def demo_model(models_dir: Path) -> Any:
    from node.inference.registry import Registry

    return Registry(models_dir).get("lesion-ct-demo")


@pytest.fixture(scope="session")
def demo_runner(demo_model: Any) -> Any:
    from node.inference.runner import BundleRunner

    return BundleRunner(demo_model, device="cpu")


def dciodvfy_errors(path: Path) -> list[str]:
    """Error lines dciodvfy prints for a file (skips the test when dicom3tools is missing)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; `make test` installs it as root")
    proc = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@pytest.fixture
def dciodvfy() -> Callable[[Path], list[str]]:
    return dciodvfy_errors


def query_db(db: Path, sql: str) -> list[tuple]:
    """Read a running node's database (read-only connection, WAL allows it)."""
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return list(con.execute(sql).fetchall())
    finally:
        con.close()


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def node_toml(data_dir: Path, port: int, *, sink_port: int | None = None, stable: float = 1.0,
              allowed: str = '["TESTSCU", "STORESCU"]', extra: str = "", models: Path | None = None,
              delivery_backoff: float = 0.5, extra_outputs: str = "[]", route_extra: str = "") -> str:
    dest = f'''
[[destinations]]
name = "pacs"
ae_title = "SINK"
host = "127.0.0.1"
port = {sink_port}
timeout = 5
''' if sink_port else ""
    send_to = '["pacs"]' if sink_port else "[]"
    return f'''
[node]
ae_title = "PREANNOT"
bind = "127.0.0.1"
port = {port}
data_dir = "{data_dir}"
allowed_callers = {allowed}
stable_seconds = {stable}
free_space_reserve_mb = 0
{dest}
[[routes]]
name = "chest-ct"
match = {{ Modality = "CT", BodyPartExamined = ["CHEST", "THORAX"] }}
models = ["lesion-ct-demo"]
send_to = {send_to}
extra_outputs = {extra_outputs}
{route_extra}

[models]
dir = "{models or ROOT / 'models'}"
device = "cpu"

[jobs]
backoff_seconds = 0.5
stop_timeout_seconds = 10

[delivery]
backoff_seconds = {delivery_backoff}
backoff_max_seconds = 2
max_attempts = 50
poll_seconds = 0.3

[web]
enabled = false
{extra}
'''


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start an in-process node from a generated TOML; stopped at teardown."""
    from node.config import load_config
    from node.service import Node

    started: list[Node] = []

    def _make(**kwargs: Any) -> Node:
        port = free_port()
        cfg_path = tmp_path / f"node{len(started)}.toml"
        cfg_path.write_text(node_toml(tmp_path / "data", port, **kwargs))
        node = Node(load_config(cfg_path))
        node.start()
        started.append(node)
        return node

    yield _make
    for n in started:
        n.stop()
