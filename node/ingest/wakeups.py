"""pynetdicom's reactors woken by what they wait for, not by the clock.

pynetdicom runs two polling loops per association. The DUL thread, when a loop found nothing to do, sleeps
1 ms before it looks at the socket and at the primitives to send again; the association thread sleeps 1 ms
before every look at the DIMSE messages received. A C-STORE of a 512 x 512 CT slice crosses both loops
several times (each P-DATA PDU read, the message handed to the association, the response handed back): on
the project's VM, 5 ms per instance when the handler itself does nothing, against 1.3 ms for dcmtk's storescp.

:func:`install` keeps both loops and their 1 ms bound, and replaces each of those two sleeps by a wait that
ends at once when the awaited thing comes:

- a DUL thread waits in ``select`` on its socket and on a wake-up pipe that the association writes to when it
  hands the DUL a primitive to send (a response, a release, an abort);
- an association thread waits on its DIMSE message queue.

Nothing else changes: the same loops, states, timers and checks (release, abort, idle timeout) run as often as
before or more often. pynetdicom's version is pinned (pyproject.toml); :func:`install` checks that the loops it
relies on are there, and leaves pynetdicom as it is otherwise (with a warning in the log).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import queue
import select
import threading
import time as _time
from types import SimpleNamespace
from typing import Any

__all__ = ["install", "installed"]

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
_INSTALLED = False


def installed() -> bool:
    """Whether :func:`install` has patched pynetdicom in this process."""
    return _INSTALLED


class _Wake:
    """A DUL thread's wake-up pipe. Written by any thread through :meth:`wake`, read and closed by the DUL thread
    only; closed under the lock, so that a late wake-up never writes to a descriptor number reused since."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self.closed = False

    def wake(self) -> None:
        with self.lock:
            if not self.closed:
                with contextlib.suppress(BlockingIOError):  # the pipe is full: the DUL wakes anyway
                    os.write(self.write_fd, b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self.read_fd, 4096)  # one look at the queue serves every wake-up so far

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                os.close(self.read_fd)
                os.close(self.write_fd)


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's queue of primitives to send: a put also wakes the DUL thread."""

    def __init__(self, wake: _Wake) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake.wake()


def _dul_wait(dul: Any, wake: _Wake, delay: float) -> None:
    """The DUL's idle wait: until its socket is readable, a primitive is queued, or ``delay`` has passed."""
    if wake.closed:
        _time.sleep(delay)
        return
    fds: list[Any] = [wake.read_fd]
    sock = getattr(getattr(dul, "socket", None), "socket", None)
    try:
        if sock is not None and sock.fileno() >= 0:
            fds.append(sock)
        ready, _, _ = select.select(fds, [], [], delay)
    except (OSError, ValueError):  # the socket closed under us: the loop finds out on its next look
        _time.sleep(delay)
        return
    if wake.read_fd in ready:
        wake.drain()


def _assoc_wait(assoc: Any, delay: float) -> None:
    """The association's wait before a look at its DIMSE messages: until one is queued or ``delay`` has passed."""
    q = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    if q is None:
        _time.sleep(delay)
        return
    with q.not_empty:
        if not q._qsize():
            q.not_empty.wait(delay)


def _make_sleep(kind: str) -> Any:
    def sleep(seconds: float) -> None:
        me = threading.current_thread()
        wake = getattr(me, "_preannot_wake", None)
        if kind == "dul" and wake is not None:
            _dul_wait(me, wake, seconds)
        elif kind == "assoc" and seconds == 0.001 and hasattr(me, "dimse"):  # the acceptor's reactor loop
            _assoc_wait(me, seconds)
        else:
            _time.sleep(seconds)

    return sleep


def _time_with(sleep: Any) -> SimpleNamespace:
    """A stand-in for the ``time`` module in one pynetdicom module: the same functions, its own ``sleep``."""
    return SimpleNamespace(**{**{k: getattr(_time, k) for k in dir(_time) if not k.startswith("_")}, "sleep": sleep})


def install() -> bool:
    """Install the wake-ups (idempotent); False (pynetdicom left as it is) when its loops are not as expected."""
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return True
        from pynetdicom import association, dul

        dul_src = inspect.getsource(dul.DULServiceProvider.run_reactor)
        assoc_src = inspect.getsource(association.Association._run_reactor)
        if ("time.sleep(self._run_loop_delay)" not in dul_src or "time.sleep(0.001)" not in assoc_src
                or "self.dimse.get_msg(block=False)" not in assoc_src):
            logger.warning("pynetdicom's reactors are not the ones this node knows: they poll as shipped")
            return False
        base_init = dul.DULServiceProvider.__init__
        base_run = dul.DULServiceProvider.run_reactor
        base_kill = dul.DULServiceProvider.kill_dul

        def __init__(self: Any, assoc: Any) -> None:
            wake = _Wake()
            self._preannot_wake = wake
            base_init(self, assoc)  # binds run_reactor (below) as the thread's target
            self.to_provider_queue = _WakingQueue(wake)

        def run_reactor(self: Any) -> None:
            try:
                base_run(self)
            finally:
                self._preannot_wake.close()

        def kill_dul(self: Any) -> None:
            base_kill(self)
            self._preannot_wake.wake()

        dul.DULServiceProvider.__init__ = __init__  # type: ignore[method-assign]
        dul.DULServiceProvider.run_reactor = run_reactor  # type: ignore[method-assign]
        dul.DULServiceProvider.kill_dul = kill_dul  # type: ignore[method-assign]
        dul.time = _time_with(_make_sleep("dul"))  # type: ignore[assignment]
        association.time = _time_with(_make_sleep("assoc"))  # type: ignore[assignment]
        _INSTALLED = True
        return True
