"""Classification bundles: a MONAI bundle whose output is one score per class, for a 2D image or a 3D volume
(the Model Zoo's ``breast_density_classification``: a mammogram in, BI-RADS density A-D out).

The bundle's own config runs as it is (its preprocessing without the loader, its inferer, its
postprocessing: a sigmoid or softmax). A 2D bundle (its metadata's input ``spatial_shape`` has two
dimensions) classifies each image of the series (a mammography series holds one image per view); a 3D
bundle classifies the volume. The input is given as the bundle's loader would: the image in its (x, y)
order, and when the metadata asks for several input channels (an RGB network fed a grey image, as the
breast density bundle says: "A single grayscale is copied to 3 channels"), the grey image copied to each.

The card describes the classes as ``[[labels]]``: class channel c is label value c + 1; the labels'
``category`` is what is classified (e.g. "Breast composition"), each label's ``type`` the class's code.
The SR states the class with the highest score, and every class's score, as the bundle's postprocessing
gives it (a sigmoid's scores need not add up to 1).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from node.errors import ModelError, ModelTimeoutError
from node.imaging.volume import Volume
from node.inference.bundle import LOADERS, SAVERS, LoadedBundle, target_name
from node.inference.prediction import ClassStatement, ModelInputs
from node.inference.registry import ModelCard, ModelInfo
from node.inference.rois import Regions

__all__ = ["ClassScores", "ClassificationRunner"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClassScores:
    """A classifier's scores: one row per image classified (one row for a 3D volume), one column per class
    channel."""

    scores: np.ndarray
    #: per row, the image of the series it is about (None: the whole series)
    images: tuple[int | None, ...]

    def regions(self, volume: Volume, card: ModelCard) -> Regions:
        return Regions([])

    def produced(self, card: ModelCard) -> dict[int, int]:
        return {}

    def statements(self, volume: Volume, card: ModelCard) -> list[ClassStatement]:
        classes = sorted(card.labels, key=lambda lab: lab.value)
        if self.scores.shape[1] != len(classes):
            raise ModelError(f"the model gave {self.scores.shape[1]} class score(s); its card describes "
                             f"{len(classes)} class(es) ({', '.join(c.name for c in classes)})")
        concept = classes[0].category
        out = []
        for row, image in zip(self.scores, self.images, strict=True):
            best = int(np.argmax(row))
            probabilities = tuple((c.value, c.name, c.type, float(p)) for c, p in zip(classes, row, strict=True))
            out.append(ClassStatement(concept=concept, value=classes[best].type, label=classes[best].value,
                                      name=classes[best].name, probability=float(row[best]),
                                      probabilities=probabilities, image_index=image))
        return out

    def buffer(self) -> np.ndarray | None:
        return None

    def compact(self) -> ClassScores:
        return self

    def expand(self) -> ClassScores:
        return self


class ClassificationRunner(LoadedBundle):
    """A loaded classification bundle, ready to classify.

    Raises:
        ModelError: the bundle's configuration or weights cannot be loaded.
    """

    what = "classification bundle"

    def _parse(self, model: ModelInfo) -> None:
        parser = self._open_config(model)
        if "preprocessing" in parser:
            transforms = list(parser["preprocessing"].get("transforms", []))
            parser["preprocessing"]["transforms"] = [t for t in transforms if target_name(t) not in LOADERS]
            self.preprocessing = parser.get_parsed_content("preprocessing")
        else:
            self.preprocessing = None
        self.inferer = parser.get_parsed_content("inferer")
        self.postprocessing = None
        if "postprocessing" in parser:
            post = parser["postprocessing"]
            if isinstance(post, dict) and "transforms" in post:
                parser["postprocessing"]["transforms"] = [t for t in post["transforms"] if target_name(t) not in SAVERS]
            self.postprocessing = parser.get_parsed_content("postprocessing")
        image = ((model.metadata.get("network_data_format") or {}).get("inputs") or {}).get("image", {})
        shape = image.get("spatial_shape") if isinstance(image, dict) else None
        self.dims = 2 if isinstance(shape, list) and len(shape) == 2 else 3
        self.channels = int(image.get("num_channels", 1) or 1) if isinstance(image, dict) else 1
        self.network = self._load_network(parser)

    def predict(self, volume: Volume | ModelInputs, *, deadline: float | None = None) -> ClassScores:
        """The class scores of each image of the series (2D bundle) or of the volume (3D bundle).

        Raises:
            ModelTimeoutError: the deadline passed.
            ModelError: the bundle failed.
        """
        if isinstance(volume, ModelInputs):
            raise ModelError(f"model {self.model.name}: a classification bundle takes one series, not a study's inputs")
        rows: list[np.ndarray] = []
        images: list[int | None] = []
        if self.dims == 2:
            for k in range(volume.shape[0]):
                if deadline is not None and time.monotonic() > deadline:
                    raise ModelTimeoutError(f"model {self.model.name}: the job passed its timeout")
                sx, sy, _ = volume.spacing
                plane = np.ascontiguousarray(volume.pixels[k].T, dtype=np.float32)  # (x, y), as a loader gives it
                rows.append(self._scores(plane, np.diag([sx, sy, 1.0]), volume.series_uid, deadline))
                images.append(k if volume.shape[0] > 1 else None)
        else:
            arr, affine = volume.to_monai(dtype=np.float32)
            rows.append(self._scores(arr, affine, volume.series_uid, deadline))
            images.append(None)
        return ClassScores(scores=np.stack(rows), images=tuple(images))

    def _scores(self, arr: np.ndarray, affine: np.ndarray, name: str, deadline: float | None) -> np.ndarray:
        if self.channels > 1:  # an RGB network fed a grey image: the grey copied to each channel, last axis
            arr = np.repeat(arr[..., None], self.channels, axis=-1)
            channel_dim: int | str = -1
        else:
            channel_dim = "no_channel"
        meta = {"original_affine": torch.as_tensor(affine), "spatial_shape": np.array(arr.shape[:self.dims]),
                "original_channel_dim": channel_dim, "filename_or_obj": name or "image"}
        image = MetaTensor(torch.from_numpy(arr), affine=torch.as_tensor(affine), meta=meta)
        try:
            data: dict[str, Any] = {"image": image}
            if self.preprocessing is not None:
                data = dict(self.preprocessing(data))
            inp = torch.as_tensor(data["image"])
            if inp.ndim == self.dims:  # no channel added by the bundle's own transforms
                inp = inp.unsqueeze(0)
            net = self._guarded(deadline)
            with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=self.amp):
                pred = self.inferer(inp.unsqueeze(0).to(self.device), net)
            data["pred"] = torch.as_tensor(pred)[0].float()
            if self.postprocessing is not None:
                data = self.postprocessing(data)
            scores = torch.as_tensor(data["pred"]).detach().float().cpu().numpy().reshape(-1)
        except ModelTimeoutError:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            raise ModelError(f"model {self.model.name}: out of GPU memory: {exc}") from exc
        except Exception as exc:
            raise self._failure(exc) from exc
        if not np.all(np.isfinite(scores)):
            raise ModelError(f"model {self.model.name} gave class scores that are not finite: {scores.tolist()}")
        return scores
