"""Where benchmark tables go: benchmarks/results/<date>-<host>[-<scenario>].md."""

from __future__ import annotations

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
