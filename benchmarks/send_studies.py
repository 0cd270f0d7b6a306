"""Send study folders to a DICOM node, one association per folder, in order: the benchmarks' outside
PACS, in a process of its own, when dcmtk's ``storescu`` is not installed.

    python -m benchmarks.send_studies CALLED_AE PORT FOLDER [FOLDER ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from node.net.scu import send_files


def main(argv: list[str] | None = None) -> int:
    called, port, *folders = argv if argv is not None else sys.argv[1:]
    for folder in folders:
        out = send_files([str(p) for p in sorted(Path(folder).glob("*.dcm"))], ae_title=called, host="127.0.0.1",
                         port=int(port), calling_ae="BENCH")
        failed = [o for o in out if not o.ok]
        if failed:
            print(f"sending {folder}: {len(failed)} of {len(out)} failed", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
