"""How many instances the PACS says a series has (route option ``expected_count_from``), asked by C-FIND on
a thread of its own, so the assembler's loop never waits for a PACS (a C-FIND may take up to the
destination's timeout, 30 s by default).

The assembler asks :meth:`InstanceCounter.expected`: the first time, the question is queued and the answer
is :data:`ASKING` (the series waits, as it would for any other completeness check); the counter's thread
asks the PACS and keeps the answer, which the assembler reads at a later tick. An answer is kept for
``ttl`` seconds, then asked again (a series that is still arriving is re-counted). No answer (the PACS is
down, or does not know the series) counts as "unknown": the series is not held for it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from node.config import NodeConfig
from node.net.scu import count_series_instances

__all__ = ["ASKING", "InstanceCounter"]

logger = logging.getLogger(__name__)


class _Asking:
    def __repr__(self) -> str:
        return "ASKING"


#: the answer while the PACS is being asked
ASKING = _Asking()


@dataclass(frozen=True, slots=True)
class _Question:
    destination: str
    study_uid: str
    series_uid: str


class InstanceCounter:
    """C-FIND instance counts, asked off the assembler's loop (see the module docstring).

    Without :meth:`start` (a unit test driving the assembler by hand), :meth:`expected` asks at once.
    """

    def __init__(self, config: NodeConfig, *, ttl: float = 30.0) -> None:
        self.config = config
        self.ttl = ttl
        self._answers: dict[_Question, tuple[int | None, float]] = {}
        self._asked: set[_Question] = set()
        self._queue: queue.Queue[_Question] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def expected(self, destination: str, study_uid: str, series_uid: str, *,
                 now: float | None = None) -> int | _Asking | None:
        """The number of instances ``destination`` reports for the series, None when it gave no answer, or
        :data:`ASKING` while the question is on its way."""
        q = _Question(destination, study_uid, series_uid)
        now = time.time() if now is None else now
        with self._lock:
            answer = self._answers.get(q)
            if answer is not None and now - answer[1] < self.ttl:
                return answer[0]
            if self._thread is not None:
                if q not in self._asked:
                    self._asked.add(q)
                    self._queue.put(q)
                return ASKING
        count = self._ask(q)  # no thread of its own: asked now
        with self._lock:
            self._answers[q] = (count, time.time())
        return count

    def forget(self, series_uid: str) -> None:
        """Drop what is known of a series (it was dispatched, or failed)."""
        with self._lock:
            for q in [q for q in self._answers if q.series_uid == series_uid]:
                del self._answers[q]

    def start(self, stop: threading.Event) -> None:
        """Answer the queued questions on a thread of its own until ``stop`` is set."""
        self._thread = threading.Thread(target=self._run, args=(stop,), name="instance-counts", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                q = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            count = self._ask(q)
            with self._lock:
                self._answers[q] = (count, time.time())
                self._asked.discard(q)

    def _ask(self, q: _Question) -> int | None:
        dest = self.config.destination(q.destination)
        assert dest.ae_title and dest.host and dest.port  # validated with the configuration
        try:
            return count_series_instances(ae_title=dest.ae_title, host=dest.host, port=dest.port,
                                          calling_ae=dest.calling_ae_title or self.config.node.ae_title,
                                          study_uid=q.study_uid, series_uid=q.series_uid, timeout=dest.timeout)
        except (OSError, RuntimeError, ValueError) as exc:  # a PACS that cannot answer never holds the series back
            logger.warning("series %s: C-FIND of %s failed: %s: %s", q.series_uid, q.destination,
                           type(exc).__name__, exc)
            return None
