"""`make bench`: every benchmark scenario, one after the other (not part of `make test`).

Each writes its table to benchmarks/results/<date>-<host>-<scenario>.md and prints it.
"""

from __future__ import annotations

import sys

from benchmarks import e2e, ingest, stages


def main() -> None:
    for scenario in (stages, ingest, e2e):
        sys.argv = [sys.argv[0]]
        scenario.main()


if __name__ == "__main__":
    main()
