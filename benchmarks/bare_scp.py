"""A bare pynetdicom storage SCP for the ingest benchmark: writes each dataset's raw bytes, nothing else.

    python -m benchmarks.bare_scp PORT FOLDER

No parsing, no fsync, no index: the floor of any receiver built on pynetdicom's association and
DIMSE machinery, to tell that machinery's cost from preannot's own work.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt


def main() -> None:
    port, folder = int(sys.argv[1]), Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)

    def on_store(event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        (folder / f"{uid}.dcm").write_bytes(event.encoded_dataset(include_meta=True))
        return 0x0000

    ae = AE("BARE")
    ae.maximum_pdu_size = 131072
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()
