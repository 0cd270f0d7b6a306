"""A minimal storage SCP that writes what it receives to a folder: the stand-in PACS of the demo
and of tests (``<folder>/<SOPInstanceUID>.dcm``; a re-sent object overwrites its file and is counted).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.ingest.uids import safe_uid

__all__ = ["StoreSink"]


class StoreSink:
    """Receive C-STOREs into ``folder``. ``received`` counts stores per SOP Instance UID."""

    def __init__(self, folder: Path, *, ae_title: str = "PACS", port: int = 0, bind: str = "127.0.0.1") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.received: dict[str, int] = {}
        self._lock = threading.Lock()
        server = self.ae.start_server((bind, port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        assert server is not None
        self._server = server
        self.port = int(server.server_address[1])

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        uid = str(ds.SOPInstanceUID)
        raw = event.encoded_dataset(include_meta=True)
        final = self.folder / f"{safe_uid(uid)}.dcm"
        part = final.with_suffix(".part")  # whoever lists the folder sees whole files only
        part.write_bytes(raw)
        part.replace(final)
        with self._lock:
            self.received[uid] = self.received.get(uid, 0) + 1
        return 0x0000

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("*.dcm"))

    def stop(self) -> None:
        self._server.shutdown()
