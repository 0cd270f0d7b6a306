"""Identification of the algorithm and the node in every result object (IHE AI Results).

Each SEG and SR carries:
- the Algorithm Identification (name, version, family "Artificial Intelligence", parameters including
  the weights SHA-256) in the segment descriptions / measurement groups;
- a Contributing Equipment Sequence item with purpose of reference (Newcode1, 99IHE, "Processing
  Algorithm") as in the IHE AIR supplement, manufacturer, model name (the model), software versions
  (node version, model version, weights SHA-256) and the node's device UID;
- a series description and content label that say it is an unverified AI pre-annotation.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node import __version__
from node.config import OutputsConfig
from node.inference.registry import ModelInfo

__all__ = ["PROCESSING_ALGORITHM", "Provenance", "device_uid", "new_uid"]

#: Purpose of Reference for the contributing equipment, as defined by the IHE AIR supplement.
PROCESSING_ALGORITHM = hd.sr.CodedConcept("Newcode1", "99IHE", "Processing Algorithm")

UNVERIFIED_NOTE = "AI pre-annotation, NOT VERIFIED by a radiologist"


def new_uid(root: str | None) -> str:
    """A new UID under the configured root (or highdicom's default root)."""
    return generate_uid(prefix=root) if root else str(hd.UID())


def device_uid(outputs: OutputsConfig, data_dir: Path | None, *, create: bool = True) -> str:
    """The node's Device UID, recorded in every output's Contributing Equipment.

    Made once and kept in ``<data_dir>/device_uid`` by the running node (``create``). Without a data
    folder (``preannot run`` on a machine that is not a node) it is derived from the configured
    ``device_serial_number`` and UID root, so the same installation always gives the same UID.
    """
    p = data_dir / "device_uid" if data_dir is not None else None
    if p is not None and p.is_file():
        return p.read_text().strip()
    if p is None or not create:
        return generate_uid(prefix=outputs.uid_root or "2.25.", entropy_srcs=["preannot-device",
                                                                             outputs.device_serial_number])
    uid = new_uid(outputs.uid_root)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(uid + "\n")
    return uid


@dataclass(frozen=True)
class Provenance:
    """Who made a result: the model and the node. Build it with :meth:`for_node`."""

    model: ModelInfo
    manufacturer: str = "preannot"
    device_uid: str = ""
    device_serial_number: str = "preannot-node"
    institution_name: str | None = None
    uid_root: str | None = None

    @classmethod
    def for_node(cls, model: ModelInfo, outputs: OutputsConfig, *, device_uid: str) -> Provenance:
        """The provenance of results made by this node (``serve`` and ``run`` alike)."""
        return cls(model=model, manufacturer=outputs.manufacturer, device_uid=device_uid,
                   device_serial_number=outputs.device_serial_number, institution_name=outputs.institution_name,
                   uid_root=outputs.uid_root)

    def algorithm(self) -> hd.AlgorithmIdentificationSequence:
        fam = self.model.card.model.family
        return hd.AlgorithmIdentificationSequence(
            name=self.model.name, family=hd.sr.CodedConcept(fam.code, fam.scheme, fam.meaning),
            version=self.model.version, source="preannot", parameters={"weights_sha256": self.model.sha256})

    def contribution_description(self) -> str:
        """The unverified note, then what the model card says the model is and is for."""
        card = self.model.card.model
        parts = [UNVERIFIED_NOTE + "."]
        if card.description:
            parts.append(card.description.strip())
        if card.intended_use:
            parts.append(f"Intended use: {card.intended_use.strip()}")
        return " ".join(parts)[:1024]

    def sr_algorithm(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(name=self.model.name, version=self.model.version,
                                             parameters=[f"weights_sha256={self.model.sha256}"])

    def software_versions(self) -> list[str]:
        return [f"preannot {__version__}", f"{self.model.name} {self.model.version}",
                f"sha256:{self.model.sha256[:56]}"]

    def contributing_equipment(self) -> Dataset:
        """The IHE AIR Contributing Equipment item (built by hand: highdicom allows only CID 7005 purposes)."""
        item = Dataset()
        item.Manufacturer = self.manufacturer[:64]
        item.ManufacturerModelName = self.model.name[:64]
        item.SoftwareVersions = self.software_versions()
        item.DeviceSerialNumber = self.device_serial_number[:64]
        if self.device_uid:
            item.DeviceUID = self.device_uid
        if self.institution_name:
            item.InstitutionName = self.institution_name[:64]
        purpose = Dataset()
        purpose.CodeValue = PROCESSING_ALGORITHM.value
        purpose.CodingSchemeDesignator = PROCESSING_ALGORITHM.scheme_designator
        purpose.CodeMeaning = PROCESSING_ALGORITHM.meaning
        item.PurposeOfReferenceCodeSequence = [purpose]
        item.ContributionDateTime = _dt.datetime.now().strftime("%Y%m%d%H%M%S")
        item.ContributionDescription = self.contribution_description()
        return item

    def stamp(self, ds: Dataset) -> None:
        """Add the Contributing Equipment item to a built object."""
        seq = list(ds.get("ContributingEquipmentSequence", []))
        seq.append(self.contributing_equipment())
        ds.ContributingEquipmentSequence = seq

    def series_description(self, kind: str) -> str:
        return f"AI {kind} UNVERIFIED - {self.model.name} {self.model.version}"[:64]
