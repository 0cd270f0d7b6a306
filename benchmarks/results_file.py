"""Where benchmark tables go: benchmarks/results/<date>-<host>[-<scenario>].md."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(text: str, scenario: str | None = None, *, echo: bool = True) -> Path:
    """Print a table (unless ``echo`` is off), write it to the results folder and say where."""
    if echo:
        print(text)
    suffix = f"-{scenario}" if scenario else ""
    out = RESULTS / f"{time.strftime('%Y-%m-%d')}-{platform.node()}{suffix}.md"
    out.write_text(text)
    print(f"written to {out}")
    return out


def machine() -> str:
    """The machine in one line: host, cores, memory, GPU, Python and torch."""
    import torch

    mem = ""
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()}: {os.cpu_count()} cores{mem}, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")
