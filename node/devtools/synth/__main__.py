"""Command line for the synthetic data generator: ``python -m node.devtools.synth --help``.

Also available as ``preannot synth``.
"""

from __future__ import annotations

from node.devtools.synth.cli import app

if __name__ == "__main__":
    app()
