"""What the HTTP service needs of a running node (``node.service.Node`` provides it).

The web layer depends on this protocol, not on the service module, so the service can import the web
layer to start it without an import cycle.
"""

from __future__ import annotations

from typing import Any, Protocol

from node.config import NodeConfig
from node.inference.registry import Registry
from node.metrics import NodeMetrics
from node.store.db import Database
from node.store.jobs import JobStore
from node.store.series import SeriesStore
from node.verdicts.store import VerdictStore

__all__ = ["NodeView"]


class NodeView(Protocol):
    config: NodeConfig
    db: Database
    store: JobStore
    series: SeriesStore
    registry: Registry
    metrics: NodeMetrics
    verdicts: VerdictStore

    @property
    def dicom_port(self) -> int: ...

    def status(self) -> dict[str, Any]: ...

    def readiness(self) -> dict[str, bool]: ...

    def reprocess(self, series_uid: str, *, actor: str | None = None) -> int: ...

    def record_http_verdict(self, job_id: int, body: dict[str, Any], *, actor: str) -> tuple[int, bool]: ...

    def verdict_summary(self, *, window: int | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]: ...
