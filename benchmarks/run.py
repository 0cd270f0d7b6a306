"""`make bench`: every benchmark scenario, one after the other (not part of `make test`).

Each scenario writes its table to benchmarks/results/<date>-<host>-<scenario>.md and prints it; the
whole run is then gathered into benchmarks/results/<date>-<host>.md, headed by the machine.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

from benchmarks import e2e, ingest, stages
from benchmarks.results_file import write_result


def machine() -> str:
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


def prepare() -> None:
    """Generate every input first and flush it to disk, so no scenario is timed while the page cache
    writes back hundreds of megabytes of freshly generated files (it slows every fsync)."""
    from benchmarks.stages import ensure_series

    ensure_series(512, 300)
    ensure_series(512, 1000)
    e2e.ensure_studies()
    os.sync()


def main() -> None:
    started = time.time()
    prepare()
    parts = []
    for scenario in (stages, ingest, e2e):
        sys.argv = [sys.argv[0]]
        parts.append(scenario.main().read_text())
    head = [f"# Benchmarks, {time.strftime('%Y-%m-%d %H:%M')}", "", f"Machine: {machine()}  ",
            f"Command: `make bench` ({(time.time() - started) / 60:.0f} min)", ""]
    write_result("\n".join(head) + "\n" + "\n".join(parts), echo=False)  # each table was printed already


if __name__ == "__main__":
    main()
