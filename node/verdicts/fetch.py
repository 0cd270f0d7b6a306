"""Looking for verdicts in the PACS on a schedule, for PACS that cannot route them to the node.

Every ``[verdicts].fetch_minutes``, for each study the node sent a result for in the last
``fetch_days``: the SEG, SR and KO series the PACS holds for it (C-FIND at SERIES level, or QIDO-RS for
a DICOMweb source) that the node has not received and did not make itself are retrieved (C-MOVE to the
node's AE title, or WADO-RS pushed to the node by C-STORE). They arrive through the ordinary durable
ingest and are judged as if the PACS had routed them.
"""

from __future__ import annotations

import logging
import time

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from node.config import Destination, NodeConfig
from node.errors import DeliveryError
from node.net.fetch import cmove, wado_to_node
from node.store.jobs import JobStore
from node.store.series import SeriesStore

__all__ = ["VerdictFetcher"]

logger = logging.getLogger(__name__)

VERDICT_MODALITIES = ("SEG", "SR", "KO")


def _cfind_series(src: Destination, study_uid: str, calling_ae: str) -> list[str]:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = src.timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assert src.host and src.port and src.ae_title
    assoc = ae.associate(src.host, src.port, ae_title=src.ae_title)
    if not assoc.is_established:
        raise DeliveryError(f"{src.describe()}: no association for C-FIND")
    found = []
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.Modality = ""
        for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if status is None or int(status.Status) not in (0xFF00, 0xFF01) or ident is None:
                continue
            if str(ident.get("Modality", "")) in VERDICT_MODALITIES:
                found.append(str(ident.SeriesInstanceUID))
    finally:
        assoc.release()
    return found


class VerdictFetcher:
    def __init__(self, config: NodeConfig, series: SeriesStore, jobs: JobStore) -> None:
        self.config = config
        self.series = series
        self.jobs = jobs

    def _studies(self, now: float) -> list[str]:
        return self.jobs.studies_with_results(finished_since=now - self.config.verdicts.fetch_days * 86400)

    def _known(self, series_uid: str) -> bool:
        """Received already, or one of the node's own result series."""
        return self.series.known(series_uid) or self.jobs.made_series(series_uid)

    def run_once(self, now: float | None = None) -> int:
        """Look once; returns how many series were asked for. Raises DeliveryError when the source fails."""
        name = self.config.verdicts.fetch_from
        if name is None:
            return 0
        src = self.config.destination(name)
        calling = src.calling_ae_title or self.config.node.ae_title
        asked = 0
        for study in self._studies(time.time() if now is None else now):
            if src.kind == "dicom":
                new = [s for s in _cfind_series(src, study, calling) if not self._known(s)]
                for series_uid in new:
                    got = cmove(src, study, self.config.node.ae_title, calling, series_uid=series_uid)
                    logger.info("verdicts: series %s of study %s fetched from %s (%d instance(s))", series_uid, study,
                                src.describe(), got.completed)
            elif src.kind == "dicomweb":
                new = self._wado(src, study)
            else:
                raise DeliveryError(f"[verdicts].fetch_from {name!r} is of kind {src.kind}; it needs dicom or dicomweb")
            asked += len(new)
        return asked

    def _wado(self, src: Destination, study: str) -> list[str]:
        from node.net.dicomweb import dicomweb_client

        client = dicomweb_client(src, timeout=max(src.timeout, 60.0))
        found = [str(r["0020000E"]["Value"][0]) for r in client.search_for_series(study)
                 if str(r.get("00080060", {}).get("Value", [""])[0]) in VERDICT_MODALITIES]
        new = [s for s in found if not self._known(s)]
        for series_uid in new:
            got = wado_to_node(src, study, "127.0.0.1", self.config.node.port, self.config.node.ae_title,
                               src.calling_ae_title or src.name.upper()[:16], series_uid=series_uid)
            logger.info("verdicts: series %s of study %s fetched by WADO-RS from %s (%d instance(s))", series_uid,
                        study, src.url, got.completed)
        return new
