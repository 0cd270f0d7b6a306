"""The command line: run (offline), send, echo, status/jobs/retry/cancel, config check/init, synth."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from node.cli import app
from node.config import load_config
from node.devtools.sink import StoreSink
from node.service import Stores
from node.store.db import Database
from node.store.jobs import JobStore
from tests.conftest import ROOT, free_port, node_toml

runner = CliRunner()


def test_version() -> None:
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("preannot ")


def test_run_offline(small_series: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = runner.invoke(app, ["run", "--model", "lesion-ct-demo", str(small_series), str(out), "--device", "cpu"],
                      env={"PREANNOT_MODELS__DIR": str(ROOT / "models")})
    assert r.exit_code == 0, r.output
    assert "region(s) of interest" in r.output and "timings (s)" in r.output
    result = json.loads((out / "result.json").read_text())
    assert result["shape"][0] == 24
    assert (out / "sr.dcm").is_file() and (out / "preview.png").is_file()
    assert set(result["timings"]) >= {"read", "decode", "inference", "rois", "sr", "total"}


def test_run_errors(tmp_path: Path, small_series: Path) -> None:
    env = {"PREANNOT_MODELS__DIR": str(ROOT / "models")}
    r = runner.invoke(app, ["run", "--model", "lesion-ct-demo", str(tmp_path), str(tmp_path / "o")], env=env)
    assert r.exit_code == 2 and "no DICOM series" in r.output
    r = runner.invoke(app, ["run", "--model", "lesion-ct-demo", str(tmp_path / "nowhere"), str(tmp_path / "o")],
                      env=env)
    assert r.exit_code == 2 and "no such file or folder" in r.output
    # a wrong model name is said before the folder is scanned
    r = runner.invoke(app, ["run", "--model", "nope", str(small_series), str(tmp_path / "o")], env=env)
    assert r.exit_code == 2 and "no model 'nope'" in r.output and "series under" not in r.output


def test_run_as_a_process_ends_with_its_status_and_its_outputs_complete(small_series: Path, tmp_path: Path) -> None:
    """``preannot run`` in a process of its own (it skips the interpreter's teardown): exit status 0 with every
    output written and its JSON printed whole; a failure's status and message as before."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PREANNOT_MODELS__DIR": str(ROOT / "models")}
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.cli", "run", "--model", "lesion-ct-demo", str(small_series),
                        str(out), "--device", "cpu", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    printed = json.loads(r.stdout)
    assert json.loads((out / "result.json").read_text())["series_uid"] == printed["series_uid"]
    assert {"sr", "preview"} <= set(printed["files"]) and all(Path(f).is_file() for f in printed["files"].values())
    r = subprocess.run([sys.executable, "-m", "node.cli", "run", "--model", "lesion-ct-demo", str(tmp_path / "none"),
                        str(tmp_path / "o")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no such file or folder" in r.stderr


def test_run_on_a_scanner_folder(small_series: Path, tmp_path: Path) -> None:
    """A folder as a CD holds it: DICOMDIR, a scout beside the axial series, a text file."""
    import shutil

    from pydicom import dcmread
    from pydicom.fileset import FileSet
    from pydicom.uid import generate_uid

    cd = tmp_path / "cd"
    shutil.copytree(small_series, cd / "DIR")
    first = sorted((cd / "DIR").glob("*.dcm"))[0]
    scout = dcmread(first)
    scout.SeriesInstanceUID, scout.SOPInstanceUID = generate_uid(), generate_uid()
    scout.file_meta.MediaStorageSOPInstanceUID = scout.SOPInstanceUID
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.save_as(cd / "DIR" / "SCOUT.dcm", enforce_file_format=True)
    fs = FileSet()
    fs.add(first)
    fs.write(tmp_path / "fs")
    shutil.copy(tmp_path / "fs" / "DICOMDIR", cd / "DICOMDIR")
    (cd / "README.TXT").write_text("not DICOM")
    env = {"PREANNOT_MODELS__DIR": str(ROOT / "models")}
    r = runner.invoke(app, ["run", "-m", "lesion-ct-demo", str(cd), str(tmp_path / "out"), "--device", "cpu"], env=env)
    assert r.exit_code == 0, r.output
    assert "DICOMDIR" in r.output and "2 series under" in r.output and "skipped: a localizer" in r.output
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["shape"][0] == 24  # the axial series, not the scout
    # a skipped series can still be named explicitly (the operator decides)
    r = runner.invoke(app, ["run", "-m", "lesion-ct-demo", str(cd), str(tmp_path / "o2"), "--series",
                            str(scout.SeriesInstanceUID), "--device", "cpu"], env=env)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o2" / "result.json").read_text())["shape"][0] == 1
    r = runner.invoke(app, ["run", "-m", "lesion-ct-demo", str(cd), str(tmp_path / "o3"), "--series", "1.2.3"],
                      env=env)
    assert r.exit_code == 2 and "no series 1.2.3" in r.output


def test_send_and_echo(small_series: Path, tmp_path: Path) -> None:
    sink = StoreSink(tmp_path / "recv", ae_title="SINK")
    try:
        r = runner.invoke(app, ["send", str(small_series), "--to", f"SINK@127.0.0.1:{sink.port}"])
        assert r.exit_code == 0, r.output
        assert "sent 24 of 24" in r.output
        assert len(sink.files()) == 24
        assert runner.invoke(app, ["echo", f"SINK@127.0.0.1:{sink.port}"]).exit_code == 0
    finally:
        sink.stop()
    port = free_port()
    r = runner.invoke(app, ["send", str(small_series), "--to", f"SINK@127.0.0.1:{port}"])
    assert r.exit_code == 1 and "0 of 24" in r.output
    r = runner.invoke(app, ["send", str(small_series), "--to", "garbage"])
    assert r.exit_code == 2


def test_status_jobs_retry_cancel(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(node_toml(tmp_path / "data", free_port()))
    # read-only commands never create a data folder: before the node ran, they say how to point at it
    r = runner.invoke(app, ["status", "--config", str(cfg)])
    assert r.exit_code == 2 and "no node database" in r.output and not (tmp_path / "data").exists()
    (tmp_path / "data").mkdir()
    store: JobStore = Stores.over(Database(load_config(cfg, env={}).data_dir / "node.db")).jobs
    with store.db.tx() as c:
        jid = store.create(c, series_uid="1.2.3", series_version=1, model="lesion-ct-demo", route="r",
                           send_to=[], max_attempts=1, config_version="v", now=1.0)
    store.lease(lease_seconds=10, now=2.0)
    store.fail(jid, "ModelError: boom", backoff_seconds=1, backoff_max_seconds=1, now=3.0)
    r = runner.invoke(app, ["status", "--config", str(cfg)])
    assert r.exit_code == 0 and "dead 1" in r.output and "boom" in r.output
    r = runner.invoke(app, ["status", "--config", str(cfg), "--json"])
    assert json.loads(r.output)["jobs"]["dead"] == 1
    r = runner.invoke(app, ["jobs", "--config", str(cfg), "--state", "dead"])
    assert "boom" in r.output
    assert runner.invoke(app, ["jobs", "--config", str(cfg), "--state", "weird"]).exit_code == 2
    r = runner.invoke(app, ["retry", str(jid), "--config", str(cfg)])
    assert r.exit_code == 0 and store.get(jid).state == "queued"
    assert runner.invoke(app, ["retry", "999", "--config", str(cfg)]).exit_code == 1
    assert runner.invoke(app, ["cancel", str(jid), "--config", str(cfg)]).exit_code == 0
    assert store.get(jid).state == "cancelled"
    audit = [r["actor"] for r in store.db.query("SELECT actor FROM events WHERE kind IN ('job.retry', 'job.cancelled')")]
    assert audit == ["cli", "cli"]


def test_config_init_and_check(tmp_path: Path) -> None:
    r = runner.invoke(app, ["config", "init"])
    assert r.exit_code == 0
    p = tmp_path / "node.toml"
    p.write_text(r.output.replace('dir = "models"', f'dir = "{ROOT / "models"}"'))
    r = runner.invoke(app, ["config", "check", "--config", str(p)])
    assert r.exit_code == 0, r.output
    assert "is valid" in r.output
    p.write_text(p.read_text().replace('models = ["lesion-ct-demo"]', 'models = ["missing-model"]'))
    r = runner.invoke(app, ["config", "check", "--config", str(p)])
    assert r.exit_code == 2 and "missing-model" in r.output
    p.write_text("[node]\nport = -1\n")
    r = runner.invoke(app, ["config", "check", "--config", str(p)])
    assert r.exit_code == 2 and "node.port" in r.output


def test_synth_cases(tmp_path: Path) -> None:
    r = runner.invoke(app, ["synth", "cases", "--out", str(tmp_path), "--n", "2", "--slices", "12", "--size", "64"])
    assert r.exit_code == 0, r.output
    cases = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(cases) == 2
    for c in cases:
        assert len(list((c / "image").glob("*.dcm"))) == 12
        assert (c / "ground_truth_seg.dcm").is_file() and (c / "ground_truth.json").is_file()
