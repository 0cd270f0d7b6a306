"""`make bench`: every benchmark scenario, one after the other (not part of `make test`)."""

from __future__ import annotations

import sys

from benchmarks import stages


def main() -> None:
    sys.argv = [sys.argv[0], *sys.argv[1:]]
    stages.main()


if __name__ == "__main__":
    main()
