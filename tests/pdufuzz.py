"""A PDU-level fuzzer for a DICOM Upper Layer acceptor (PS3.8 section 9), from raw sockets.

Each *case* is one connection carrying malformed PDUs or an abusive sequence of valid ones: unknown
PDU types, lying length fields, truncated or corrupted A-ASSOCIATE-RQ items, bad presentation contexts,
out-of-order PDUs, malformed P-DATA after an accepted association, abort storms. Cases are drawn from a
seeded generator, so a failing case is reproduced by its seed and index.

Used by ``tests/test_pdu_fuzz.py``: after every case a known caller must get its C-ECHO answered
within a second.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = ["Case", "FuzzTarget", "cases"]

APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"
CT_STORAGE = b"1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = b"1.2.840.10008.1.2"
EXPLICIT_LE = b"1.2.840.10008.1.2.1"


def item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body) & 0xFFFF) + body


def pdu(kind: int, body: bytes, *, length: int | None = None) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body) if length is None else length & 0xFFFFFFFF) + body


def presentation_context(ctx_id: int, abstract: bytes, transfers: list[bytes]) -> bytes:
    return item(0x20, bytes([ctx_id & 0xFF, 0, 0, 0]) + item(0x30, abstract) + b"".join(item(0x40, t) for t in transfers))


def user_info(max_pdu: int = 16384, impl_uid: bytes = b"1.2.826.0.1.3680043.9.9999.1") -> bytes:
    return item(0x50, item(0x51, struct.pack(">I", max_pdu & 0xFFFFFFFF)) + item(0x52, impl_uid))


def assoc_rq_body(*, called: bytes = b"PREANNOT", calling: bytes = b"FUZZER", version: int = 1,
                  contexts: list[bytes] | None = None, app: bytes | None = None, user: bytes | None = None) -> bytes:
    ctxs = contexts if contexts is not None else [presentation_context(1, VERIFICATION, [IMPLICIT_LE])]
    return (struct.pack(">HH", version & 0xFFFF, 0) + called[:16].ljust(16) + calling[:16].ljust(16) + bytes(32)
            + item(0x10, APP_CONTEXT if app is None else app) + b"".join(ctxs) + (user_info() if user is None else user))


def assoc_rq(**kw: object) -> bytes:
    return pdu(0x01, assoc_rq_body(**kw))  # type: ignore[arg-type]


def pdv(ctx_id: int, header: int, data: bytes, *, length: int | None = None) -> bytes:
    n = len(data) + 2 if length is None else length
    return struct.pack(">IBB", n & 0xFFFFFFFF, ctx_id & 0xFF, header & 0xFF) + data


ABORT = pdu(0x07, bytes(4))
RELEASE_RQ = pdu(0x05, bytes(4))


@dataclass
class FuzzTarget:
    """Where and as whom the fuzzer connects."""

    host: str
    port: int
    #: source addresses of the attacker (loopback aliases such as 127.0.0.2 are other hosts to the node)
    sources: tuple[str, ...] = ("127.0.0.2",)
    #: an AE title the node accepts (some cases abuse an accepted association)
    known_ae: bytes = b"TESTSCU"
    called_ae: bytes = b"PREANNOT"
    timeout: float = 2.0


@dataclass
class Case:
    """One fuzz case: a name (its category), and what it does over one or more connections."""

    name: str
    run: Callable[[FuzzTarget], int]  # returns the number of PDUs written
    #: PDUs written (filled by run)
    pdus: int = 0
    notes: list[str] = field(default_factory=list)


def _connect(t: FuzzTarget, rng: random.Random) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(t.timeout)
    s.bind((rng.choice(t.sources), 0))
    s.connect((t.host, t.port))
    return s


def _send_all(s: socket.socket, chunks: list[bytes]) -> int:
    """Write the chunks, stopping quietly when the node has closed the connection (a fine answer)."""
    n = 0
    for c in chunks:
        try:
            s.sendall(c)
        except OSError:
            break
        n += 1
    return n


def _read_pdu(s: socket.socket) -> tuple[int, bytes] | None:
    """One PDU from the node, or None when it closes or stays silent."""
    try:
        head = b""
        while len(head) < 6:
            chunk = s.recv(6 - len(head))
            if not chunk:
                return None
            head += chunk
        kind, _, length = struct.unpack(">BBI", head)
        body = b""
        while len(body) < min(length, 1 << 20):
            chunk = s.recv(min(length, 1 << 20) - len(body))
            if not chunk:
                return None
            body += chunk
        return kind, body
    except OSError:
        return None


def _one_shot(chunks: list[bytes], *, read: bool = False) -> Callable[[FuzzTarget], int]:
    def run(t: FuzzTarget, _rng: random.Random = random.Random(0)) -> int:
        s = _connect(t, _rng)
        try:
            n = _send_all(s, chunks)
            if read:
                _read_pdu(s)
            return n
        finally:
            s.close()
    return run


def _valid_body(rng: random.Random, t: FuzzTarget, *, known: bool) -> bytes:
    return assoc_rq_body(called=t.called_ae, calling=t.known_ae if known else b"FUZZER")


def _mutate_bytes(rng: random.Random, data: bytes, flips: int) -> bytes:
    b = bytearray(data)
    for _ in range(flips):
        b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def _bad_contexts(rng: random.Random) -> list[bytes]:
    choice = rng.randrange(9)
    if choice == 0:
        return []  # no presentation context at all
    if choice == 1:
        return [presentation_context(2 * i + 1, VERIFICATION, [IMPLICIT_LE]) for i in range(rng.randint(128, 200))]
    if choice == 2:
        return [presentation_context(2, VERIFICATION, [IMPLICIT_LE])]  # even context id
    if choice == 3:
        return [presentation_context(1, VERIFICATION, [IMPLICIT_LE])] * 3  # duplicate ids
    if choice == 4:
        return [presentation_context(1, b"", [IMPLICIT_LE])]  # empty abstract syntax
    if choice == 5:
        return [presentation_context(1, b"9" * rng.randint(65, 4000), [IMPLICIT_LE])]  # over-long UID
    if choice == 6:
        return [presentation_context(1, VERIFICATION, [])]  # no transfer syntax
    if choice == 7:
        return [presentation_context(1, bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))),
                                     [bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))])]
    return [item(0x20, bytes(rng.randrange(256) for _ in range(rng.randint(0, 12))))]  # truncated sub-items


def _case(rng: random.Random, t: FuzzTarget) -> tuple[str, Callable[[FuzzTarget], int]]:
    """Draw one case."""
    kind = rng.choice(["type", "length", "truncate", "item-length", "item-type", "contexts", "ae", "protocol",
                       "bitflip", "sequence", "known-pdata", "abort-storm", "huge", "user-info"])
    body = _valid_body(rng, t, known=rng.random() < 0.5)
    if kind == "type":
        ptype = rng.choice([0x00, *range(0x08, 0x100)])
        return kind, _one_shot([pdu(ptype, bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))))])
    if kind == "length":
        lie = rng.choice([0, 1, len(body) - 1, len(body) + rng.randint(1, 5000), 0xFFFFFFFF, rng.randrange(1 << 32)])
        return kind, _one_shot([pdu(0x01, body, length=lie)])
    if kind == "truncate":
        full = pdu(0x01, body)
        return kind, _one_shot([full[:rng.randrange(1, len(full))]])
    if kind == "item-length":  # one item's length field lies (the application context item, at offset 68)
        b = bytearray(body)
        b[70:72] = struct.pack(">H", rng.choice([0, 1, 0xFFFF, rng.randrange(1 << 16)]))
        return kind, _one_shot([pdu(0x01, bytes(b))], read=True)
    if kind == "item-type":
        junk = item(rng.choice([0x00, 0x11, 0x21, 0x31, 0x41, 0x54, 0x99, 0xFF]),
                    bytes(rng.randrange(256) for _ in range(rng.randint(0, 100))))
        pos = 68 + rng.randrange(0, max(1, len(body) - 68))
        return kind, _one_shot([pdu(0x01, body[:pos] + junk + body[pos:])], read=True)
    if kind == "contexts":
        rq = assoc_rq(called=t.called_ae, calling=t.known_ae if rng.random() < 0.5 else b"FUZZER",
                      contexts=_bad_contexts(rng))
        return kind, _one_shot([rq], read=True)
    if kind == "ae":
        ae = rng.choice([b"", b" " * 16, b"\x00" * 16, bytes(rng.randrange(256) for _ in range(16)), b"\\\\..//PREANNOT"])
        side = rng.random() < 0.5
        rq = assoc_rq(called=ae if side else t.called_ae, calling=t.known_ae if side else ae)
        return kind, _one_shot([rq], read=True)
    if kind == "protocol":
        return kind, _one_shot([assoc_rq(version=rng.choice([0, 2, 0xFFFF]), calling=t.known_ae,
                                         called=t.called_ae)], read=True)
    if kind == "bitflip":
        return kind, _one_shot([_mutate_bytes(rng, pdu(0x01, body), rng.randint(1, 12))], read=True)
    if kind == "user-info":
        user = rng.choice([b"", item(0x50, b""), item(0x50, item(0x51, b"\x00")), user_info(max_pdu=0),
                           user_info(max_pdu=0xFFFFFFFF), item(0x50, item(0x52, b"") + item(0x51, bytes(4)) * 50),
                           item(0x50, item(0x55, b"x" * 200))])
        return kind, _one_shot([assoc_rq(called=t.called_ae, calling=t.known_ae, user=user)], read=True)
    if kind == "sequence":
        seqs = [
            [pdu(0x04, pdv(1, 0x03, b"\x00" * 20))],  # P-DATA before any association
            [RELEASE_RQ],  # release before any association
            [pdu(0x02, body)],  # an A-ASSOCIATE-AC sent to an acceptor
            [pdu(0x03, bytes([0, 1, 1, 1]))],  # an A-ASSOCIATE-RJ sent to an acceptor
            [pdu(0x06, bytes(4))],  # A-RELEASE-RP unasked
            [pdu(0x01, body), pdu(0x01, body)],  # two requests in a row
            [ABORT],
            [pdu(0x01, body), ABORT],
            [pdu(0x01, body), RELEASE_RQ, RELEASE_RQ, ABORT],
        ]
        return kind, _one_shot(rng.choice(seqs))
    if kind == "abort-storm":
        n = rng.randint(5, 20)

        def storm(tt: FuzzTarget) -> int:
            written = 0
            for _ in range(n):
                s = _connect(tt, rng)
                try:
                    written += _send_all(s, [assoc_rq(called=tt.called_ae, calling=tt.known_ae), ABORT])
                finally:
                    s.close()
            return written
        return kind, storm
    if kind == "huge":  # announce 2 GiB, send a little, vanish
        return kind, _one_shot([struct.pack(">BBI", rng.choice([0x01, 0x04]), 0, 0x7FFFFFFF)
                                + bytes(rng.randrange(256) for _ in range(rng.randint(0, 8000)))])
    # known-pdata: an association the node accepts, then malformed P-DATA
    return kind, _known_pdata(rng)


def _known_pdata(rng: random.Random) -> Callable[[FuzzTarget], int]:
    variant = rng.randrange(8)

    def run(t: FuzzTarget) -> int:
        s = _connect(t, random.Random(rng.random()))
        try:
            ctxs = [presentation_context(1, VERIFICATION, [IMPLICIT_LE]),
                    presentation_context(3, CT_STORAGE, [EXPLICIT_LE, IMPLICIT_LE])]
            n = _send_all(s, [assoc_rq(called=t.called_ae, calling=t.known_ae, contexts=ctxs)])
            reply = _read_pdu(s)
            if reply is None or reply[0] != 0x02:
                return n
            garbage = bytes(rng.randrange(256) for _ in range(rng.randint(0, 2000)))
            if variant == 0:  # PDV length larger than the PDU
                chunks = [pdu(0x04, pdv(1, 0x03, garbage, length=len(garbage) + 5000))]
            elif variant == 1:  # presentation context never negotiated
                chunks = [pdu(0x04, pdv(rng.choice([2, 5, 255]), 0x03, garbage))]
            elif variant == 2:  # a "command" that is garbage
                chunks = [pdu(0x04, pdv(1, 0x03, garbage))]
            elif variant == 3:  # command fragments never completed, then silence and close
                chunks = [pdu(0x04, pdv(3, 0x01, garbage))]
            elif variant == 4:  # dataset fragment with no command before it
                chunks = [pdu(0x04, pdv(3, 0x02, garbage))]
            elif variant == 5:  # zero-length PDV, message control header with reserved bits
                chunks = [pdu(0x04, struct.pack(">I", 0)), pdu(0x04, pdv(1, 0xFC, b""))]
            elif variant == 6:  # a C-ECHO-RQ command whose group length lies
                cmd = (struct.pack("<HHI", 0x0000, 0x0000, 4) + struct.pack("<I", 0xFFFFFF)
                       + struct.pack("<HHI", 0x0000, 0x0100, 2) + struct.pack("<H", 0x0030))
                chunks = [pdu(0x04, pdv(1, 0x03, cmd))]
            else:  # release, then data after the release
                chunks = [RELEASE_RQ, pdu(0x04, pdv(1, 0x03, garbage))]
            return n + _send_all(s, chunks)
        finally:
            s.close()
    return run


def cases(seed: int, count: int, target: FuzzTarget) -> Iterator[Case]:
    """``count`` cases drawn from ``seed``."""
    rng = random.Random(seed)
    for _ in range(count):
        name, run = _case(rng, target)
        yield Case(name, run)
