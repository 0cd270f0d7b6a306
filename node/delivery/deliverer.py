"""The delivery loop: sends due outbox items to their destinations, retries with backoff, dead-letters.

Each result object is recorded per destination: ``sent`` with the DICOM status, or ``pending`` again
with the reason and the time of the next attempt, or ``dead`` after ``delivery.max_attempts``. Items
left ``sending`` by a killed node are sent again at start; result objects keep their SOP Instance UIDs,
so a destination that had already stored one keeps a single copy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from node.config import Destination, NodeConfig
from node.delivery.notify import NotificationSender, is_notification
from node.delivery.senders import make_sender
from node.errors import ConfigError
from node.metrics import NodeMetrics
from node.net.scu import Sender
from node.store.jobs import JobStore, OutboxState

__all__ = ["Deliverer"]

logger = logging.getLogger(__name__)


class Deliverer(threading.Thread):
    """Background thread running :meth:`deliver_due` every ``delivery.poll_seconds``."""

    def __init__(self, *, config: NodeConfig, store: JobStore, stop: threading.Event,
                 sender_factory: Callable[[Destination], Sender] | None = None,
                 metrics: NodeMetrics | None = None) -> None:
        super().__init__(name="delivery", daemon=True)
        self.config = config
        self.store = store
        self.stop_event = stop
        self.sender_factory = sender_factory or (lambda d: make_sender(d, calling_ae=config.node.ae_title))
        self.wake = store.outbox_waiting  # set by the store when results are queued, and by resend/stop
        self.metrics = metrics

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.deliver_due()
            except Exception:
                logger.exception("delivery loop error")
            self.wake.wait(self.config.delivery.poll_seconds)
            self.wake.clear()  # anything queued before this point is picked up by the next deliver_due

    def deliver_due(self) -> int:
        """Send what is due now. Returns the number of objects delivered."""
        cfg = self.config.delivery
        delivered = 0
        for dest_name, items in self.store.due_deliveries().items():
            sender: Sender
            if is_notification(dest_name):  # a FHIR / HL7 message announcing a result ([notify])
                sender, where = NotificationSender(self.config.notify, dest_name), dest_name
            else:
                try:
                    dest = self.config.destination(dest_name)
                except ConfigError as exc:
                    for it in items:
                        self.store.delivery_failed(it, str(exc), max_attempts=1, backoff_seconds=0,
                                                   backoff_max_seconds=0)
                    continue
                sender, where = self.sender_factory(dest), dest.describe()
            here = 0
            outcomes = sender.send([it.path for it in items])
            by_path = {o.path: o for o in outcomes}
            if self.metrics is not None:
                self.metrics.delivery_attempts.labels(dest_name).inc(len(items))
            for it in items:
                o = by_path.get(it.path)
                if o is not None and o.ok:
                    self.store.delivered(it, o.status or "")
                    here += 1
                    continue
                reason = o.error if o is not None else "no outcome reported"
                state = self.store.delivery_failed(it, reason or "failed", max_attempts=cfg.max_attempts,
                                                   backoff_seconds=cfg.backoff_seconds,
                                                   backoff_max_seconds=cfg.backoff_max_seconds,
                                                   status=o.status if o else None)
                if self.metrics is not None:
                    self.metrics.delivery_failures.labels(dest_name, str(state == OutboxState.DEAD).lower()).inc()
                log = logger.error if state == OutboxState.DEAD else logger.warning
                log("delivery of %s to %s %s (attempt %d/%d): %s", it.sop_uid, dest_name,
                    "dead" if state == OutboxState.DEAD else "failed", it.attempts, cfg.max_attempts, reason)
            if here:
                logger.info("delivered %d object(s) to %s (%s)", here, dest_name, where)
            delivered += here
        return delivered
