"""Result objects: DICOM SEG and TID 1500 SR, and the identification they carry."""

from node.outputs.equipment import PROCESSING_ALGORITHM, Provenance, new_uid
from node.outputs.seg import build_seg
from node.outputs.sr import build_sr

__all__ = ["PROCESSING_ALGORITHM", "Provenance", "build_seg", "build_sr", "new_uid"]
