"""A PDU's announced length checked before its body is read.

pynetdicom reads a PDU's 6-byte header, then reads as many bytes as the header announces into one growing
buffer. A peer announcing a 4 GiB PDU and streaming zeros therefore grows the node by as much as it sends, bounded
only by the timeouts; it needs no accepted association to do so (the A-ASSOCIATE-RQ is a PDU too). This module
wraps pynetdicom's socket read so that the body of a PDU is read only when its announced length is within:

- for a P-DATA-TF: the maximum PDU length the node announced for the association (``[node] max_pdu``; when that
  is 0, "unlimited", :data:`UNLIMITED_CAP`);
- for an association request, accept or reject: :data:`ASSOCIATION_CAP` (a request with every storage SOP class
  and every transfer syntax is far smaller);
- for a release or an abort: their fixed size (4 bytes).

Over the limit, the read fails as a broken connection would: pynetdicom ends the association and closes the
socket, nothing is buffered, and the node logs one line naming the peer and the length.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pynetdicom.transport import AssociationSocket

__all__ = ["ASSOCIATION_CAP", "UNLIMITED_CAP", "PDUTooLargeError", "install"]

logger = logging.getLogger(__name__)

#: the largest A-ASSOCIATE-RQ/AC/RJ body read (bytes)
ASSOCIATION_CAP = 1 << 20
#: the largest P-DATA-TF body read when the node announced no maximum (``max_pdu = 0``)
UNLIMITED_CAP = 64 << 20
_FIXED = {0x05: 4, 0x06: 4, 0x07: 4}  # A-RELEASE-RQ, A-RELEASE-RP, A-ABORT

_installed = False
_lock = threading.Lock()


class PDUTooLargeError(OSError):
    """A PDU announced a length over the node's limit: the connection is closed before its body is read."""


def _limit(sock: AssociationSocket, pdu_type: int) -> int:
    if pdu_type in _FIXED:
        return _FIXED[pdu_type]
    if pdu_type != 0x04:
        return ASSOCIATION_CAP
    assoc = getattr(sock, "_assoc", None)
    local: Any = None
    if assoc is not None:
        local = assoc.acceptor if getattr(assoc, "is_acceptor", False) else assoc.requestor
    maximum = getattr(local, "maximum_length", None) if local is not None else None
    return int(maximum) if maximum else UNLIMITED_CAP


def _peer(sock: AssociationSocket) -> str:
    try:
        host, port = sock.socket.getpeername()[:2]  # type: ignore[union-attr]
        return f"{host}:{port}"
    except (OSError, AttributeError):
        return "a peer"


def install() -> None:
    """Wrap ``AssociationSocket.recv`` once (idempotent): every association the node makes or accepts is bounded."""
    global _installed
    with _lock:
        if _installed:
            return
        original = AssociationSocket.recv

        def bounded_recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
            header = self.__dict__.pop("_preannot_pdu_type", None)
            if header is None:  # a PDU header: remember its type for the read of its body
                data = original(self, nr_bytes)
                if nr_bytes == 6 and len(data) == 6:
                    self.__dict__["_preannot_pdu_type"] = data[0]
                return data
            limit = _limit(self, header)
            if nr_bytes > limit:
                logger.warning("closing the connection of %s: its PDU (type 0x%02X) announces %d bytes, over the "
                               "limit of %d; nothing of it was read", _peer(self), header, nr_bytes, limit)
                raise PDUTooLargeError(f"PDU of {nr_bytes} bytes announced; limit {limit}")
            return original(self, nr_bytes)

        AssociationSocket.recv = bounded_recv  # type: ignore[method-assign]
        _installed = True
