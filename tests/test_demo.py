"""`make demo` as a user runs it: the node, the stand-in PACS, the sample pushed, SEG + SR received."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_make_demo_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "node.devtools.demo", "--out", str(tmp_path / "demo")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DICOM SEG:" in proc.stdout and "DICOM SR :" in proc.stdout
    assert "region(s) of interest" in proc.stdout and "each result object received 1 time(s)" in proc.stdout
    assert (tmp_path / "demo" / "overlay.png").is_file()
