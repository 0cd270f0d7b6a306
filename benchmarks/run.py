"""`make bench`: every benchmark scenario, one after the other (not part of `make test`).

Each scenario writes its table to benchmarks/results/<date>-<host>-<scenario>.md and prints it; the
whole run is then gathered into benchmarks/results/<date>-<host>.md, headed by the machine.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from benchmarks import e2e, followup_matching, ingest, race, scaleout, stages
from benchmarks.results_file import machine, write_result


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
    parts.append(scaleout.main(["--repeats", "3"]).read_text())  # Ray: 1 actor vs 2, a STAT study behind a routine batch
    parts.append(followup_matching.markdown(followup_matching.run(50, 310000, None)))  # follow-up: 50 synthetic pairs
    if (Path(__file__).resolve().parents[2] / "shared" / "data" / "model_zoo").is_dir():
        parts.append(race.main([]).read_text())  # the published bundle against a bare MONAI script
    else:
        print("race skipped: no ../shared/data/model_zoo (the published bundles)")
    head = [f"# Benchmarks, {time.strftime('%Y-%m-%d %H:%M')}", "", f"Machine: {machine()}  ",
            f"Command: `make bench` ({(time.time() - started) / 60:.0f} min)", ""]
    write_result("\n".join(head) + "\n" + "\n".join(parts), echo=False)  # each table was printed already


if __name__ == "__main__":
    main()
