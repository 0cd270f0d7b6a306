"""Connections before the AE title is known: bounded, timed out, never able to starve a known PACS.

A TCP connection becomes an association only once its A-ASSOCIATE-RQ has arrived and been accepted;
until then nobody knows who it is. Without limits, a host that opens connections and sends a few bytes
(or nothing) holds them for as long as the operating system lets it, and pynetdicom counts them against
``max_associations``: the real PACS is then refused ("local limit exceeded"). The guard:

- admits at most ``max_pending_connections`` such pending connections in all and
  ``max_pending_per_host`` per source address (more are closed at once, with one summary log line
  per address and minute);
- closes any that has not completed its association within ``association_request_timeout`` seconds
  (a partial PDU, a slow drip, a TLS handshake that never ends);
- never holds back addresses listed in ``caller_hosts`` (capacity reserved for the known callers).

Accepted associations are then counted against ``max_associations`` by the listener itself, so pending
connections never use the PACS's capacity.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["ConnectionGuard", "GuardedServer", "SharedContexts"]

logger = logging.getLogger(__name__)

_Address = tuple[str, int]


class ConnectionGuard:
    """Bookkeeping of pending (not yet associated) connections."""

    def __init__(self, *, max_pending: int, max_per_host: int, timeout: float,
                 reserved: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> None:
        self.max_pending = max_pending
        self.max_per_host = max_per_host
        self.timeout = timeout
        self.reserved = list(reserved)
        self._pending: dict[_Address, tuple[socket.socket, float]] = {}
        self._lock = threading.Lock()
        self._refused: dict[str, int] = {}
        self._last_log: dict[str, float] = {}
        #: counters for metrics and tests
        self.refused_total = 0
        self.timed_out_total = 0

    def _is_reserved(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in self.reserved)

    def admit(self, sock: socket.socket, address: _Address) -> bool:
        """Whether a new connection may wait for its association request (registered if so)."""
        host = address[0]
        with self._lock:
            if not self._is_reserved(host):
                from_host = sum(1 for (h, _p) in self._pending if h == host)
                if len(self._pending) >= self.max_pending or from_host >= self.max_per_host:
                    self.refused_total += 1
                    self._refused[host] = self._refused.get(host, 0) + 1
                    self._log_refusals(host, from_host)
                    return False
            self._pending[address] = (sock, time.monotonic())
            return True

    def _log_refusals(self, host: str, from_host: int) -> None:
        now = time.monotonic()
        if now - self._last_log.get(host, -1e9) < 60.0:
            return
        self._last_log[host] = now
        n = self._refused.pop(host, 0)
        logger.warning("closing connections from %s before any association: %d since the last report (%d "
                       "waiting from it, %d in all; limits %d per host, %d in all); next report in a minute",
                       host, n, from_host, len(self._pending), self.max_per_host, self.max_pending)

    def settle(self, address: Any) -> None:
        """The connection at ``address`` is associated, rejected or closed: no longer pending."""
        with self._lock:
            self._pending.pop(tuple(address) if isinstance(address, list) else address, None)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def sweep(self, now: float | None = None) -> int:
        """Close the connections pending for longer than the timeout. Returns how many were closed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            late = [(a, s) for a, (s, t) in self._pending.items() if now - t > self.timeout]
            for a, _s in late:
                del self._pending[a]
            for host in [h for h, t in self._last_log.items() if now - t > 3600.0]:  # forget quiet hosts
                del self._last_log[host]
                self._refused.pop(host, None)
        for _address, sock in late:
            with contextlib.suppress(OSError):  # already gone
                sock.shutdown(socket.SHUT_RDWR)
            self.timed_out_total += 1
        if late:
            hosts = sorted({a[0] for a, _s in late})
            logger.warning("closed %d connection(s) that sent no complete association request within %.0f s "
                           "(from %s)", len(late), self.timeout, ", ".join(hosts))
        return len(late)


class SharedContexts(list):  # type: ignore[type-arg]
    """The server's supported presentation contexts, shared by every association instead of copied.

    pynetdicom deep-copies the acceptor's supported contexts for each new association; with every storage
    SOP class and transfer syntax (about 170 x 35 UIDs) that copy costs about 50 ms of CPU, so twenty
    connections from a misbehaving host delayed the PACS by a second. Negotiation only reads them
    (``presentation.negotiate_as_acceptor`` builds new result contexts), so one list serves all.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a :class:`ConnectionGuard` at accept time."""

    guard: ConnectionGuard
    #: the listen backlog: socketserver's default of 5 lets a burst of connections from one misbehaving
    #: host fill the kernel's queue, and the PACS's next SYN is then dropped and retried a second later
    request_queue_size = 256

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept without doing a TLS handshake in the accept loop (a client that never finishes it would
        block every other connection): the handshake happens in the connection's own thread."""
        assert self.socket is not None
        client, address = self.socket.accept()
        client.settimeout(self.guard.timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def shutdown(self) -> None:
        """Stop serving and close the listening socket (this server is not in the AE's own server list:
        the listener made it with ``AE.make_server`` and runs it itself)."""
        socketserver.TCPServer.shutdown(self)
        self.server_close()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.guard.admit(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                logger.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                self.guard.settle(client_address)
                self.shutdown_request(request)
                return
        request.settimeout(None)  # the association's own timeouts (ACSE/DIMSE/network) take over
        # this starts the association's own thread and returns: the connection stays pending until the
        # listener sees it accepted, rejected or closed
        super().process_request_thread(request, client_address)
