"""Segmentation bundles: a MONAI bundle whose output is a label map (see ``node.inference.bundle`` for what
every bundle runner shares).

Everything in the bundle's config runs as the bundle says (spacing, orientation, intensity transforms,
sliding-window inference, ``Invertd``, activations, argmax); the node gives the image in memory and keeps
the labels. The network is loaded once per runner and reused.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from node.errors import ModelError, ModelTimeoutError
from node.imaging.volume import Volume
from node.inference.bundle import LOADERS, SAVERS, LoadedBundle, target_name
from node.inference.postops import channel_argmax, channel_max
from node.inference.prediction import LabelMap, ModelInputs
from node.inference.registry import ModelInfo

__all__ = ["BundleRunner"]

logger = logging.getLogger(__name__)


class BundleRunner(LoadedBundle):
    """A loaded MONAI bundle, ready to predict.

    Args:
        model: the registry entry.
        device: "auto", "cpu" or "cuda".
        amp: use autocast on CUDA.
        on_progress: called with a fraction in [0, 1] during sliding-window inference.

    Raises:
        ModelError: the bundle's configuration or weights cannot be loaded.
    """

    def _parse(self, model: ModelInfo) -> None:
        parser = self._open_config(model)
        pre = parser["preprocessing"]
        transforms = list(pre["transforms"]) if isinstance(pre, dict) else []
        self._has_loader = bool(transforms) and target_name(transforms[0]) in LOADERS
        #: the keys the bundle's loader read (the node gives its image, or each input, under them)
        self.loader_keys = list(self.model.inputs.names) if self.model.inputs.mode == "keys" else [_loader_key(
            transforms[0], parser) if self._has_loader else "image"]
        #: the dtype the bundle's loader would have produced (LoadImage's default is float32;
        #: ``"dtype": null`` keeps the stored type, which bounded transforms can use to save memory)
        self.input_dtype: np.dtype | None = np.dtype(np.float32)
        if self._has_loader:
            if isinstance(transforms[0], dict) and "dtype" in transforms[0]:
                raw = transforms[0]["dtype"]  # evaluated on its own ("$np.int16" style or null)
                given = None if raw is None else ConfigParser({"dtype": raw}).get_parsed_content("dtype")
                self.input_dtype = None if given is None else np.dtype(given)
            parser["preprocessing"]["transforms"] = transforms[1:]
        if "postprocessing" in parser:
            post = parser["postprocessing"]
            if isinstance(post, dict) and "transforms" in post:
                parser["postprocessing"]["transforms"] = [t for t in post["transforms"]
                                                          if target_name(t) not in SAVERS]
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        self.postprocessing = (parser.get_parsed_content("postprocessing")
                               if "postprocessing" in parser else None)
        self._split = _confidence_split(self.postprocessing)
        self._binary = _binary_split(self.postprocessing)
        self._pre_on_device = True
        #: the series goes in its stored integer type even where the loader says float32, when nothing before
        #: the node's resampling depends on the type (it converts slab by slab: the same values, half the memory)
        self._keep_stored = self._has_loader and self.input_dtype == np.float32 and _typeless_until_resample(
            getattr(self.preprocessing, "transforms", ()))
        self.network = self._load_network(parser)

    def predict(self, volume: Volume | ModelInputs, *, deadline: float | None = None) -> LabelMap:
        """The label map (and confidence) of ``volume`` (or of a study's inputs, on the reference input's
        grid); see :meth:`predict_with_confidence`."""
        labels, confidence = self.predict_with_confidence(volume, deadline=deadline)
        return LabelMap(labels, confidence)

    def _images(self, volume: Volume | ModelInputs) -> tuple[dict[str, MetaTensor], Volume]:
        """The bundle's input(s) as its loader would have made them, and the volume the labels must come back on:
        one image under the loader's key; a study's inputs as the channels of one image (on the reference grid),
        or each under its own key (``ModelInputs.mode``)."""
        if isinstance(volume, ModelInputs):
            ref = volume.reference_volume
            if volume.mode == "keys":
                return {name: self._image(v, v.series_uid) for name, v in volume.volumes.items()}, ref
            _, affine = ref.to_monai(dtype=None)
            stacked = volume.channels if volume.channels is not None else np.stack(
                [v.to_monai(dtype=np.float32)[0] for v in volume.volumes.values()])
            meta = {"original_affine": torch.as_tensor(affine), "spatial_shape": np.array(stacked.shape[1:]),
                    "original_channel_dim": 0, "filename_or_obj": ref.series_uid or "study"}
            image = MetaTensor(torch.from_numpy(stacked), affine=torch.as_tensor(affine), meta=meta)
            return {self.loader_keys[0]: image}, ref
        return {self.loader_keys[0]: self._image(volume, volume.series_uid)}, volume

    def _image(self, volume: Volume, name: str) -> MetaTensor:
        stored = volume.pixels.dtype
        keep = self._keep_stored and (stored.kind in "iu" or stored == np.float32)
        arr, affine = volume.to_monai(dtype=None if keep else self.input_dtype)
        meta = {"original_affine": torch.as_tensor(affine),
                "spatial_shape": np.array(arr.shape), "original_channel_dim": "no_channel",
                "filename_or_obj": name or "volume"}
        return MetaTensor(torch.from_numpy(arr), affine=torch.as_tensor(affine), meta=meta)

    def predict_with_confidence(self, source: Volume | ModelInputs, *, deadline: float | None = None
                                ) -> tuple[np.ndarray, np.ndarray | None]:
        """Label volume (uint8, ``[k, j, i]``, same shape as ``volume.pixels``) and, when the bundle's
        postprocessing applies a softmax and then an argmax, the winning class's probability per voxel
        (float16, same shape; None otherwise): a finding's confidence is its mean over the finding.

        Raises:
            ModelTimeoutError: the deadline (``time.monotonic()`` value) passed during inference.
            ModelError: the bundle failed, or returned a label map of another shape.
        """
        images, volume = self._images(source)
        try:
            data = self._preprocess(images)
            del images  # dropped once preprocessing has made its own copies
            volume.release_memory()  # a mapped volume's pages go back to the page cache while the model runs
            inp = data["image"] if "image" in data else data[self.loader_keys[0]]
            if not isinstance(inp, torch.Tensor):
                inp = torch.as_tensor(inp)
            inp = inp.unsqueeze(0).to(self.device)
            net = self._guarded(deadline)
            with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=self.amp):
                pred = self.inferer(inp, net)
            data["pred"] = pred[0].float()
            del pred, inp  # the network output lives on in data["pred"] only: postprocessing may replace it
            confidence = None
            if self._binary is not None and int(data["pred"].shape[0]) == 2:
                # two classes: the probability of class 1 alone carries the softmax, the resampling back and the
                # argmax (class 1 where it is over 0.5; p0 = 1 - p1 and the resampling is linear): half the work
                logits = data["pred"]
                p1 = torch.sigmoid(logits[1:2] - logits[0:1])
                data["pred"] = MetaTensor(p1, meta=dict(logits.meta), applied_operations=list(
                    logits.applied_operations)) if isinstance(logits, MetaTensor) else p1
                del logits
                data = self._binary(data)
                p1 = torch.as_tensor(data["pred"])
                confidence = torch.maximum(p1, 1.0 - p1).to(torch.float16).cpu().numpy()
                data["pred"] = (p1 > 0.5).to(torch.uint8)
                del p1
            elif self._split is not None:  # probabilities on the input grid, then the argmax and the rest
                head, tail = self._split
                data = head(data)
                probs = data["pred"]
                confidence = channel_max(torch.as_tensor(probs)).to(torch.float16).cpu().numpy()
                data = tail(data)
            elif self.postprocessing is not None:
                data = self.postprocessing(data)
        except ModelTimeoutError:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            raise ModelError(f"model {self.model.name}: out of GPU memory: {exc}") from exc
        except Exception as exc:  # any bundle failure becomes a job failure with its root cause
            raise self._failure(exc) from exc
        out = data.pop("pred")
        del data
        out = torch.as_tensor(out).detach()  # on the device: argmax and the uint8 cast before the copy back
        if out.ndim == 4:
            out = out[0] if out.shape[0] == 1 else channel_argmax(out)[0]
        if out.is_floating_point():
            out = out.round()
        # no copy when the bundle already returns uint8 laid out as [k, j, i] (see BoundedSpacingd's inverse)
        labels = out.to(torch.uint8).cpu().numpy().transpose(2, 1, 0)
        if labels.shape != volume.shape:
            raise ModelError(f"model {self.model.name} returned labels of shape {labels.shape}; the volume is "
                             f"{volume.shape} (does the bundle's postprocessing invert its resampling?)")
        conf = None
        if confidence is not None:
            conf = confidence[0] if confidence.ndim == 4 else confidence
            conf = np.ascontiguousarray(conf.transpose(2, 1, 0)) if conf.shape[::-1] == labels.shape else None
        return np.ascontiguousarray(labels), conf

    def _preprocess(self, images: dict[str, MetaTensor]) -> dict[str, Any]:
        """The bundle's preprocessing, on the GPU when the model runs there (resampling included), so that
        only the series itself crosses to the device. A bundle transform that cannot run on the GPU makes it
        run on the CPU from then on (logged once)."""
        if self.device.type == "cuda" and self._pre_on_device:
            try:
                return dict(self.preprocessing({k: v.to(self.device) for k, v in images.items()}))
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # a transform written for numpy/CPU tensors: run it where it works
                self._pre_on_device = False
                logger.warning("model %s: preprocessing fails on %s (%s: %s); it runs on the CPU from now on",
                               self.model.name, self.device, type(exc).__name__, str(exc)[:200])
        return dict(self.preprocessing(dict(images)))


def _loader_key(loader: Any, parser: ConfigParser) -> str:
    """The key a single-input bundle's loader reads ("image", or what ``@image_key`` names)."""
    keys = loader.get("keys", "image") if isinstance(loader, dict) else "image"
    key = keys[0] if isinstance(keys, list) and keys else keys
    for _ in range(4):  # "@image_key" -> its raw value (parsing here would freeze the config before its edits)
        if not (isinstance(key, str) and key.startswith("@")):
            break
        key = parser.get(key[1:], "image")
    return key if isinstance(key, str) and not key.startswith(("@", "$")) else "image"


#: transforms that neither read nor change the voxel type (the affine and axes only)
_TYPELESS = ("EnsureChannelFirstd", "Orientationd")


def _typeless_until_resample(transforms: Any) -> bool:
    """Whether the preprocessing reaches the node's resampling through type-agnostic transforms only."""
    for t in transforms:
        name = type(t).__name__
        if name == "BoundedSpacingd":
            return True
        if name not in _TYPELESS:
            return False
    return False


def _binary_split(post: Any) -> Any:
    """For a postprocessing that is exactly a softmax, the inversion of the preprocessing's resampling and the
    argmax (the Zoo's two-class segmenters), the inversion alone (applied to class 1's probability; see
    ``predict_with_confidence``); None for any other postprocessing."""
    transforms = list(getattr(post, "transforms", []) or [])
    names = [type(t).__name__ for t in transforms]
    if names != ["Activationsd", "Invertd", "ChannelArgmaxd"]:
        return None
    act, inv, arg = transforms
    keys = {tuple(act.keys), tuple(inv.keys), tuple(arg.keys)}
    plain = (all(bool(s) for s in act.softmax) and not any(act.sigmoid)
             and all(o is None for o in getattr(act, "other", [None])))
    if len(keys) != 1 or not plain or list(act.keys) != ["pred"]:
        return None
    from monai.transforms import Compose

    return Compose([inv])


def _confidence_split(post: Any) -> tuple[Any, Any] | None:
    """The postprocessing cut just before its argmax, when a softmax comes first (its output is then a
    probability per class); None when there is no such pair."""
    transforms = list(getattr(post, "transforms", []) or [])
    soft = next((n for n, t in enumerate(transforms)
                 if type(t).__name__ == "Activationsd" and any(getattr(t, "softmax", ()))), None)
    arg = next((n for n, t in enumerate(transforms)
                if type(t).__name__ == "ChannelArgmaxd"
                or (type(t).__name__ == "AsDiscreted" and any(getattr(t, "argmax", ())))), None)
    if soft is None or arg is None or arg < soft:
        return None
    from monai.transforms import Compose

    return Compose(transforms[:arg]), Compose(transforms[arg:])
