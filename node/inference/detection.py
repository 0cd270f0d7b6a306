"""Detection bundles: a MONAI detector (RetinaNet and its inferer, as ``lung_nodule_ct_detection`` lays
them out) whose output is boxes with labels and scores rather than a label map.

The bundle's own config builds everything: ``network`` (from ``network_def``), ``detector`` (for
example ``RetinaNetDetector`` with its anchor generator), ``detector_ops`` (box selection and
sliding-window settings) and ``inferer`` (the bundle's ``scripts`` inferer). The node feeds the
bundle's ``preprocessing`` (without its loaders) a MetaTensor with the RAS affine MONAI's readers give,
runs the inferer, and maps each box from the preprocessed image back to the series' own voxel grid
through the preprocessed image's affine (``Orientationd`` and ``Spacingd`` are accounted for exactly).
The bundle's ``postprocessing`` (which writes boxes in world coordinates for its own evaluation) is not
used.

Each box becomes an :class:`~node.inference.rois.ROI` of kind ``box``: its mask is the box on the
series grid, measured as any region (``rois.measure_region``), its key slice the box centre's slice, its
outline the rectangle there (``rois.describe``), its confidence the detector's score. The SEG, SR, presentation state and captures then treat it like any finding.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from node.errors import ModelError, ModelTimeoutError
from node.imaging.volume import Volume
from node.inference.bundle import LOADERS, LoadedBundle, target_name
from node.inference.prediction import Boxes, ModelInputs
from node.inference.registry import ModelInfo
from node.inference.rois import ROI, measure_region

__all__ = ["DetectionRunner", "boxes_to_rois"]

logger = logging.getLogger(__name__)


class DetectionRunner(LoadedBundle):
    """A loaded detection bundle, ready to detect.

    Raises:
        ModelError: the bundle's configuration or weights cannot be loaded.
    """

    what = "detection bundle"

    def _parse(self, model: ModelInfo) -> None:
        parser = self._open_config(model)
        missing = [k for k in ("network_def", "detector", "inferer", "preprocessing") if k not in parser]
        if missing:
            raise ModelError(f"model {model.name}: a detection bundle needs {', '.join(missing)} in "
                             f"{model.inference_config.name}")
        transforms = list(parser["preprocessing"]["transforms"])
        parser["preprocessing"]["transforms"] = [t for t in transforms if target_name(t) not in LOADERS]
        self.preprocessing = parser.get_parsed_content("preprocessing")
        net = parser.get_parsed_content("network") if "network" in parser else parser.get_parsed_content("network_def")
        self.network = self._load_state(net).eval()
        self.detector = parser.get_parsed_content("detector")
        if "detector_ops" in parser:
            parser.get_parsed_content("detector_ops")
        self.inferer = parser.get_parsed_content("inferer")
        self.box_key = getattr(self.detector, "target_box_key", "box")
        self.label_key = getattr(self.detector, "target_label_key", "label")
        self.score_key = getattr(self.detector, "pred_score_key", f"{self.label_key}_scores")

    def predict(self, volume: Volume | ModelInputs, *, deadline: float | None = None) -> Boxes:
        """The boxes found in ``volume``, as ROIs on its grid (numbered by decreasing score).

        Raises:
            ModelTimeoutError: the deadline passed.
            ModelError: the bundle failed.
        """
        if isinstance(volume, ModelInputs):
            raise ModelError(f"model {self.model.name}: a detection bundle takes one series, not a study's inputs")
        if deadline is not None and time.monotonic() > deadline:
            raise ModelTimeoutError(f"model {self.model.name}: the job passed its timeout before inference")
        arr, affine = volume.to_monai(dtype=np.float32)
        meta = {"original_affine": torch.as_tensor(affine), "spatial_shape": np.array(arr.shape),
                "original_channel_dim": "no_channel", "filename_or_obj": volume.series_uid or "volume"}
        image = MetaTensor(torch.from_numpy(arr), affine=torch.as_tensor(affine), meta=meta)
        try:
            data: dict[str, Any] = self.preprocessing({"image": image})
            img = data["image"]
            img_affine = np.asarray(img.affine, dtype=np.float64) if isinstance(img, MetaTensor) else affine
            with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=self.amp):
                out = self.inferer([torch.as_tensor(img).to(self.device)], self.network)
            pred = out[0] if isinstance(out, list | tuple) else out
            boxes = pred[self.box_key].detach().float().cpu().numpy().reshape(-1, 6)
            labels = pred[self.label_key].detach().cpu().numpy().reshape(-1).astype(int)
            scores = pred[self.score_key].detach().float().cpu().numpy().reshape(-1)
        except ModelTimeoutError:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            raise ModelError(f"model {self.model.name}: out of GPU memory: {exc}") from exc
        except Exception as exc:
            raise self._failure(exc) from exc
        # the detector's labels count from 0; the card's label values from 1
        return Boxes(tuple(boxes_to_rois(boxes, labels + 1, scores, img_affine, volume, self.model.card)))


def boxes_to_rois(boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, box_affine: np.ndarray,
                  volume: Volume, card: Any) -> list[ROI]:
    """Boxes ``[x1, y1, z1, x2, y2, z2]`` in the voxel space of an image with RAS affine ``box_affine``,
    as ROIs on ``volume``'s grid (corners mapped through world coordinates, then rounded outwards)."""
    if len(boxes) == 0:
        return []
    ras_to_vox = np.linalg.inv(volume.ras_affine())
    to_vol = ras_to_vox @ box_affine
    nk, nj, ni = volume.shape
    widths = volume.slab_widths()
    rois: list[ROI] = []
    for box, lab, score in zip(boxes, labels, scores, strict=True):
        spec = card.label(int(lab))
        if spec is None:
            raise ModelError(f"the detector gave label {int(lab) - 1} (card value {int(lab)}), which the model card "
                             "does not describe")
        lo, hi = box[:3], box[3:]
        corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        ijk = (corners @ to_vol.T)[:, :3]
        i0, j0, k0 = np.floor(ijk.min(axis=0) + 0.5).astype(int)
        i1, j1, k1 = np.ceil(ijk.max(axis=0) - 0.5).astype(int)
        i0, j0, k0 = max(int(i0), 0), max(int(j0), 0), max(int(k0), 0)
        i1, j1, k1 = min(int(i1), ni - 1), min(int(j1), nj - 1), min(int(k1), nk - 1)
        if i1 < i0 or j1 < j0 or k1 < k0:  # entirely outside the series
            continue
        mask = np.ones((k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1), dtype=bool)
        roi = measure_region(mask, (k0, j0, i0), label=spec.value, name=spec.name, kind="box", volume=volume,
                             widths=widths, confidence=None)
        if roi is None:
            continue
        roi.key_slice = (k0 + k1) // 2  # the slice through the box's centre
        roi.confidence = round(float(score), 4)
        rois.append(roi)
    rois.sort(key=lambda r: -(r.confidence or 0.0))
    for n, r in enumerate(rois, start=1):
        r.index = n
    return rois
