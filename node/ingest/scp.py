"""The DICOM listener: C-ECHO and C-STORE of any storage SOP class in any transfer syntax.

The C-STORE handler does the minimum: take the encoded bytes as received (no decode, no re-encode),
hand them to the spool (fsync + index), and answer. Errors become DICOM statuses:

========  ===========================================  ==============================
status    meaning                                      cause
========  ===========================================  ==============================
0x0000    Success                                      stored and indexed
0xA700    Refused: out of resources                    disk full / below the reserve
0xC000    Error: cannot understand                     unparseable dataset, missing UIDs
0x0110    Processing failure                           any other error while storing
========  ===========================================  ==============================
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pynetdicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node.config import NodeSection
from node.errors import InvalidInstanceError, OutOfSpaceError, PreannotError
from node.ingest import wakeups
from node.ingest.guard import ConnectionGuard, GuardedServer, SharedContexts
from node.ingest.spool import Spool
from node.net import bounds

__all__ = ["STATUS", "Listener", "ListenerStats", "configure_pynetdicom"]

logger = logging.getLogger(__name__)


def _called_ae(assoc: Any) -> str:
    """The AE title the peer called (routes can select on it: one AE title per priority or per model),
    from its A-ASSOCIATE-RQ; pynetdicom's ``acceptor.ae_title`` is always the node's own."""
    primitive = getattr(assoc.requestor, "primitive", None)
    called = getattr(primitive, "called_ae_title", None) if primitive is not None else None
    return str(called or assoc.acceptor.ae_title).strip()


def configure_pynetdicom() -> None:
    """pynetdicom's process-wide settings, applied once at start (before any association exists):
    identifiers (patient name, ID) in C-FIND/C-MOVE requests and responses never reach the logs."""
    pynetdicom._config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom._config.LOG_RESPONSE_IDENTIFIERS = False
    bounds.install()  # a PDU's announced length checked before its body is read (node.net.bounds)
    wakeups.install()  # the reactors woken by what they wait for, not every millisecond (node.ingest.wakeups)
    _answer_incomplete_requests()
    if not getattr(threading.excepthook, "_preannot", False):
        threading.excepthook = _protocol_error_hook(threading.excepthook)


#: C-STORE requests refused because their command lacked a mandatory element: {element name: count}
INCOMPLETE_REQUESTS: dict[str, int] = {}


def _answer_incomplete_requests() -> None:
    """A C-STORE request whose command set lacks a mandatory element (an empty Affected SOP Instance UID from a
    broken SCU, say) is one pynetdicom drops with a log line and no answer, so the sender waits for its DIMSE
    timeout (60 s by default) and then aborts. Such a request is answered at once: 0xC000 (cannot understand)
    naming what is missing, without storing the data set (there is no UID to check it against), or, without a
    Message ID to answer to, the association is aborted. Installed once, process-wide."""
    if getattr(Association._serve_request, "_preannot", False):
        return
    original = Association._serve_request

    def serve(self: Association, msg: Any, context_id: int) -> None:
        if not isinstance(msg, C_STORE) or msg.is_valid_request or self._sent_release:
            return original(self, msg, context_id)
        missing = [k for k in msg.REQUEST_KEYWORDS if getattr(msg, k, None) is None]
        for k in missing:
            INCOMPLETE_REQUESTS[k] = INCOMPLETE_REQUESTS.get(k, 0) + 1
        peer = f"{self.requestor.ae_title}@{self.requestor.address}"
        if msg.MessageID is None or context_id not in self._accepted_cx:
            logger.warning("association %s: C-STORE request from %s without %s: association aborted", self.name,
                           peer, ", ".join(missing))
            self.abort()
            return None
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = msg.MessageID
        if msg.AffectedSOPClassUID is not None:
            rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
        rsp.Status = STATUS["cannot_understand"]
        rsp.ErrorComment = f"request lacks {', '.join(missing)}"[:64]  # type: ignore[assignment]
        logger.warning("association %s: C-STORE request from %s without %s -> 0x%04X, nothing stored", self.name,
                       peer, ", ".join(missing), rsp.Status)
        self.dimse.send_msg(rsp, context_id)
        return None

    serve._preannot = True  # type: ignore[attr-defined]
    Association._serve_request = serve  # type: ignore[method-assign]


#: exceptions that ended a pynetdicom protocol-machine thread (a peer's PDU sequence it cannot handle)
PROTOCOL_ERRORS: dict[str, int] = {}


def _protocol_error_hook(previous: Callable[[threading.ExceptHookArgs], Any]) -> Callable[[threading.ExceptHookArgs], Any]:
    """A malformed PDU sequence can end pynetdicom's DUL thread with an exception (for example
    ``InvalidEventError: Invalid event 'Evt8' for the current state 'Sta13'``): an expected condition
    with a hostile or broken peer, logged as one line instead of a traceback (the listener then ends the
    association, see ``Listener._reap_unrequested``). Any other thread's exception goes to ``previous``."""
    def hook(args: threading.ExceptHookArgs) -> Any:
        if isinstance(args.thread, DULServiceProvider) and args.exc_type is not None:
            name = args.exc_type.__name__
            PROTOCOL_ERRORS[name] = PROTOCOL_ERRORS.get(name, 0) + 1
            assoc = getattr(args.thread, "assoc", None)
            peer = getattr(getattr(assoc, "requestor", None), "address", "?")
            logger.warning("association protocol error with %s, connection dropped: %s: %s", peer, name,
                           args.exc_value)
            return None
        return previous(args)
    hook._preannot = True  # type: ignore[attr-defined]
    return hook

STATUS = {
    "success": 0x0000,
    "out_of_resources": 0xA700,
    "cannot_understand": 0xC000,
    "processing_failure": 0x0110,
}


@dataclass
class ListenerStats:
    """Counters kept by the listener (exported as metrics)."""

    associations: int = 0
    associations_refused: int = 0
    instances: int = 0
    duplicates: int = 0
    conflicts: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_failure(self, reason: str) -> None:
        with self.lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1


class Listener:
    """A pynetdicom Storage SCP bound to a spool.

    Args:
        spool: where instances go.
        settings: the ``[node]`` section: AE title, bind address and port (0 picks a free port; see
            :attr:`port` after start), allowed callers (``"*"`` accepts any), their hosts and per-caller
            limit, association limits, PDU size and timeouts.
        ssl_context: a server-side TLS context, or None for plain TCP.
    """

    def __init__(self, spool: Spool, settings: NodeSection, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.spool = spool
        self.settings = settings
        self.ae_title = settings.ae_title
        self.bind = settings.bind
        self._port = settings.port
        self.allowed = list(settings.allowed_callers)
        self.stats = ListenerStats()
        self.caller_hosts = {ae.strip(): [ipaddress.ip_network(n, strict=False) for n in nets]
                             for ae, nets in settings.caller_hosts.items()}
        self.max_per_caller = settings.max_associations_per_caller
        self.guard = ConnectionGuard(
            max_pending=settings.max_pending_connections, max_per_host=settings.max_pending_per_host,
            timeout=settings.association_request_timeout,
            reserved=[n for nets in self.caller_hosts.values() for n in nets])
        #: accepted associations open now: id -> (association, calling AE). Kept by the association's own
        #: lifetime: an entry goes with its release or abort event, or, when the peer's PDUs killed pynetdicom's
        #: protocol thread so that no such event ever fires, with the sweep that finds the thread dead (its
        #: connection is closed then): a broken peer can never hold slots it no longer uses
        self._active: dict[int, tuple[Any, str]] = {}
        self._refused_assocs: set[int] = set()
        #: per open association: refused instances by status, and the first reason of each (summarised
        #: in one line when the association ends)
        self._refusals: dict[int, dict[str, list[Any]]] = {}
        #: acceptor threads that have not received their association request yet, with their address
        self._opening: dict[int, tuple[Any, tuple[str, int]]] = {}
        self._server: ThreadedAssociationServer | None = None
        ae = AE(ae_title=settings.ae_title)
        # pynetdicom counts connections still waiting for their association request against this
        # maximum: they get their own bounded share (the guard), and accepted associations are held to
        # max_associations in _on_accepted, so pending connections never take the PACS's capacity
        ae.maximum_associations = settings.max_associations + settings.max_pending_connections
        ae.maximum_pdu_size = settings.max_pdu
        ae.acse_timeout = settings.acse_timeout
        ae.dimse_timeout = settings.dimse_timeout
        ae.network_timeout = settings.network_timeout
        if "*" not in self.allowed:
            # pynetdicom rejects unlisted callers itself (A-ASSOCIATE-RJ, reason: calling AE not recognised)
            ae.require_calling_aet = self.allowed or ["\x00never"]
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        self.ae = ae
        self._ssl = ssl_context

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    def active_associations(self, calling_ae: str) -> int:
        """Associations of a calling AE open now (those counted against its per-caller limit)."""
        with self.stats.lock:
            return sum(1 for _a, c in self._active.values() if c == calling_ae)

    @property
    def listening(self) -> bool:
        """True while the server accepts connections."""
        return self._server is not None

    def start(self) -> None:
        """Start listening in background threads."""
        configure_pynetdicom()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        handlers += [(evt.EVT_CONN_OPEN, self._on_conn_open), (evt.EVT_CONN_CLOSE, self._on_conn_close)]
        server = cast(GuardedServer, self.ae.make_server((self.bind, self._port), evt_handlers=handlers,
                                                         ssl_context=self._ssl, server_class=GuardedServer))
        server.guard = self.guard
        server.contexts = SharedContexts(server.contexts)
        self._server = server
        threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="dicom-guard", daemon=True)
        self._sweeper.start()
        logger.info("DICOM listener %s on %s:%d (callers: %s, TLS: %s)", self.ae_title, self.bind, self.port,
                    "any" if "*" in self.allowed else ",".join(self.allowed) or "none",
                    "on" if self._ssl else "off")

    def stop(self) -> None:
        """Stop listening and close open associations."""
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()

    def _sweep_loop(self) -> None:
        while self._server is not None:
            self.guard.sweep()
            self._reap_unrequested()
            self._reap_dead()
            time.sleep(0.2)

    # A connection whose peer vanished (or whose protocol machine failed on a malformed PDU) before its
    # A-ASSOCIATE-RQ arrived leaves pynetdicom's association thread waiting for that request for the
    # whole acse_timeout, and pynetdicom counts it against the AE's maximum: forty such connections
    # refused the PACS for 30 s (found by tests/test_pdu_fuzz.py). Such a thread stays pending in the
    # guard (bounded per host and in all) until it has ended, and it is woken as soon as its connection
    # is gone, so it ends at once.

    def _on_conn_open(self, event: Any) -> None:
        with self.stats.lock:
            self._opening[id(event.assoc)] = (event.assoc, tuple(event.address))

    def _on_conn_close(self, event: Any) -> None:
        assoc = event.assoc
        if assoc.requestor.primitive is None:  # closed before its association request: wake its thread
            self._wake(assoc)
        else:
            self.guard.settle(tuple(event.address))

    @staticmethod
    def _wake(assoc: Any) -> None:
        """End an acceptor thread still waiting for its A-ASSOCIATE-RQ (pynetdicom reads an empty
        primitive as its ACSE timeout: it kills the association and closes the socket)."""
        if not getattr(assoc, "_preannot_woken", False):
            assoc._preannot_woken = True
            assoc.dul.to_user_queue.put(None)

    def _reap_dead(self) -> None:
        """Free the slots of accepted associations whose protocol machine died without a release or an abort
        (a malformed DIMSE message pynetdicom cannot handle ends its thread): their connection is closed."""
        with self.stats.lock:
            tracked = list(self._active.items())
        for key, (assoc, calling) in tracked:
            dul = getattr(assoc, "dul", None)
            dul_dead = dul is not None and dul.ident is not None and not dul.is_alive()
            if assoc.is_alive() and not dul_dead:
                continue
            with self.stats.lock:
                if self._active.pop(key, None) is None:
                    continue  # its release or abort came first
            sock = getattr(dul, "socket", None) if dul is not None else None
            with contextlib.suppress(Exception):  # the peer's connection goes with the slot
                if sock is not None:
                    sock.close()
            with contextlib.suppress(Exception):
                assoc.kill()
            logger.warning("association %s of %s ended without a release or an abort (its protocol machine "
                           "failed); its slot is free", assoc.name, calling)

    def _reap_unrequested(self) -> None:
        with self.stats.lock:
            tracked = list(self._opening.items())
        for key, (assoc, address) in tracked:
            if assoc.ident is None:  # not started yet
                continue
            if not assoc.is_alive() or assoc.requestor.primitive is not None:
                with self.stats.lock:
                    self._opening.pop(key, None)
                if not assoc.is_alive():
                    self.guard.settle(address)
                continue
            dul = assoc.dul
            if dul.ident is None:  # its protocol machine has not started yet
                continue
            sock = getattr(dul, "socket", None)
            if not dul.is_alive() or sock is None or getattr(sock, "socket", None) is None:
                self._wake(assoc)

    # --- handlers -------------------------------------------------------------------------------

    @staticmethod
    def _peer(event: Any) -> str:
        a = event.assoc
        return f"{a.requestor.ae_title}@{a.requestor.address}:{a.requestor.port}"

    def _policy_refusal(self, calling: str, address: str) -> str | None:
        """Why an accepted association must be dropped (host binding, node or per-caller limit), or None."""
        if len(self._active) >= self.settings.max_associations:
            return f"the node already has its maximum of {self.settings.max_associations} associations open"
        nets = self.caller_hosts.get(calling)
        if nets is not None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return f"calling AE {calling!r} from unparseable address {address!r}"
            if not any(ip in n for n in nets):
                return f"calling AE {calling!r} is bound to {[str(n) for n in nets]}, not {address}"
        if self.max_per_caller and sum(1 for _a, c in self._active.values() if c == calling) >= self.max_per_caller:
            return f"calling AE {calling!r} already has {self.max_per_caller} associations open"
        return None

    def _on_accepted(self, event: Any) -> None:
        self.guard.settle((event.assoc.requestor.address, event.assoc.requestor.port))
        calling = str(event.assoc.requestor.ae_title).strip()
        with self.stats.lock:
            reason = self._policy_refusal(calling, str(event.assoc.requestor.address))
            if reason is None:
                self._active[id(event.assoc)] = (event.assoc, calling)
                self.stats.associations += 1
            else:
                self.stats.associations_refused += 1
                self._refused_assocs.add(id(event.assoc))
        if reason is not None:
            logger.warning("association %s from %s aborted: %s", event.assoc.name, self._peer(event), reason)
            if "associations open" in reason:  # a limit (not a host-binding refusal, which is no evidence)
                self.spool.record_association_refusal(calling, reason)
            event.assoc.abort()
            return
        logger.info("association %s accepted from %s (called %s)", event.assoc.name, self._peer(event),
                    _called_ae(event.assoc))

    def _on_rejected(self, event: Any) -> None:
        self.guard.settle((event.assoc.requestor.address, event.assoc.requestor.port))
        calling = str(event.assoc.requestor.ae_title).strip()
        with self.stats.lock:
            self.stats.associations_refused += 1
        if "*" in self.allowed or calling in self.allowed:
            why = f"the node already has its maximum of {self.settings.max_associations} associations open"
            self.spool.record_association_refusal(calling, "association limit")
        else:
            why = "it is not in allowed_callers"
        logger.warning("association refused: calling AE %r from %s: %s", calling, event.assoc.requestor.address, why)

    def _closed(self, event: Any) -> None:
        with self.stats.lock:
            if id(event.assoc) in self._refused_assocs:
                self._refused_assocs.discard(id(event.assoc))
            else:
                self._active.pop(id(event.assoc), None)
            refusals = self._refusals.pop(id(event.assoc), None)
        if refusals and sum(n for n, _ in refusals.values()) > 1:
            parts = [f"{n} x {status} ({first})" for status, (n, first) in refusals.items()]
            logger.warning("association %s from %s: %d instance(s) refused: %s", event.assoc.name, self._peer(event),
                           sum(n for n, _ in refusals.values()), "; ".join(parts))

    def _refuse(self, assoc: Any, status: str, reason: str, *, level: int = logging.WARNING) -> int:
        """Answer a C-STORE with a failure status; the first refusal of each kind in an association is
        logged at once, the others only in the summary line when the association ends."""
        self.stats.count_failure(status)
        with self.stats.lock:
            per_assoc = self._refusals.setdefault(id(assoc), {})
            first = status not in per_assoc
            if first:
                per_assoc[status] = [1, reason]
            else:
                per_assoc[status][0] += 1
        code = STATUS[status]
        if first:
            logger.log(level, "association %s: instance refused -> 0x%04X %s: %s (further refusals of this "
                       "association are summarised when it ends)", assoc.name, code, status, reason)
        else:
            logger.debug("association %s: instance refused -> 0x%04X: %s", assoc.name, code, reason)
        return code

    def _on_released(self, event: Any) -> None:
        self._closed(event)
        logger.info("association %s released by %s", event.assoc.name, self._peer(event))

    def _on_aborted(self, event: Any) -> None:
        self._closed(event)
        logger.warning("association %s aborted (%s)", event.assoc.name, self._peer(event))

    def _on_echo(self, event: Any) -> int:
        return 0x0000

    def _on_store(self, event: Any) -> int:
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title)
        called = _called_ae(assoc)
        if id(assoc) in self._refused_assocs:  # dropped by policy: never store
            return STATUS["out_of_resources"]
        try:
            raw = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            return self._refuse(assoc, "cannot_understand", f"unreadable data ({exc})")
        try:
            result = self.spool.store(raw, calling_ae=calling, called_ae=called,
                                      expected_sop_uid=str(event.request.AffectedSOPInstanceUID or "") or None)
        except OutOfSpaceError as exc:
            return self._refuse(assoc, "out_of_resources", str(exc), level=logging.ERROR)
        except InvalidInstanceError as exc:
            return self._refuse(assoc, "cannot_understand", str(exc))
        except PreannotError as exc:
            return self._refuse(assoc, "processing_failure", f"could not store instance: {exc}", level=logging.ERROR)
        except Exception as exc:  # an unexpected fault must not reach pynetdicom (it logs a traceback, and goes on)
            logger.debug("C-STORE failure", exc_info=True)
            return self._refuse(assoc, "processing_failure", f"unexpected {type(exc).__name__}: {exc}",
                                level=logging.ERROR)
        with self.stats.lock:
            self.stats.instances += 1
            self.stats.bytes += len(raw)
            if result.duplicate:
                self.stats.duplicates += 1
            if result.conflict:
                self.stats.conflicts += 1
        logger.debug("stored %s (series %s)%s", result.sop_uid, result.series_uid,
                     " [duplicate]" if result.duplicate else "")
        return STATUS["success"]
