"""Run a MONAI bundle on a volume with MONAI's own bundle machinery.

The bundle's ``configs/inference.json`` provides ``network_def`` (or a TorchScript ``model.ts``),
``preprocessing``, ``inferer`` and ``postprocessing``. The node already holds the image in memory, so
a leading ``LoadImage(d)`` in the preprocessing is replaced by a MetaTensor carrying the RAS affine
that MONAI's ITK/NIfTI readers would have produced; ``SaveImage(d)`` in the postprocessing is dropped.
Everything else (spacing, orientation, intensity transforms, sliding-window inference, ``Invertd``,
activations, argmax) runs as the bundle says. CUDA with automatic mixed precision when available,
CPU otherwise. The network is loaded once per runner and reused.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from node.config import ModelsConfig
from node.errors import ModelError, ModelTimeoutError
from node.imaging.volume import Volume
from node.inference.postops import channel_argmax, channel_max
from node.inference.registry import ModelInfo

__all__ = ["BundleRunner", "LoadedBundle", "Runner", "configure_torch", "load_runner", "select_device"]

logger = logging.getLogger(__name__)

_LOADERS = ("LoadImage", "LoadImaged")
_SAVERS = ("SaveImage", "SaveImaged")


class Runner(Protocol):
    """Anything that turns a volume into a label volume of the same shape."""

    def predict(self, volume: Volume, *, deadline: float | None = None) -> np.ndarray: ...


def select_device(preference: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. ``cuda`` without a GPU raises ModelError."""
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        raise ModelError("device 'cuda' requested but no CUDA device is available")
    return torch.device("cpu")


def configure_torch(models: ModelsConfig) -> None:
    """Apply ``[models].threads`` (intra-op CPU threads; 0 keeps torch's default). Called once, at start,
    before any worker exists."""
    if models.threads > 0 and torch.get_num_threads() != models.threads:
        torch.set_num_threads(models.threads)
        logger.info("torch uses %d CPU thread(s) ([models].threads)", models.threads)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception (MONAI wraps transform errors in RuntimeError)."""
    seen = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


#: held while a bundle's own code is imported: ``sys.path`` and ``sys.modules`` are process-wide
_BUNDLE_CODE_LOCK = threading.Lock()


def _drop_scripts_modules() -> None:
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]


@contextmanager
def _bundle_code(root: Path) -> Iterator[None]:
    """The bundle root on ``sys.path`` while its configuration is parsed, as ``monai.bundle run`` does,
    so that ``$import scripts...`` and ``_target_: scripts.x.Y`` resolve to *this* bundle's code.

    Model Zoo bundles all call their package ``scripts``. Loading is serialised by a process-wide lock
    (workers preload in parallel), and no ``scripts`` module outlives the parse: it is imported fresh for
    each bundle and dropped from ``sys.modules`` afterwards. Objects built from it keep their own module
    (their globals), so two bundles whose ``scripts`` differ never see each other's code.
    """
    with _BUNDLE_CODE_LOCK:
        _drop_scripts_modules()
        sys.path.insert(0, str(root))
        try:
            yield
        finally:
            _drop_scripts_modules()
            with suppress(ValueError):  # the bundle may have removed it itself
                sys.path.remove(str(root))


def _target(item: Any) -> str:
    return str(item.get("_target_", "")).rsplit(".", 1)[-1] if isinstance(item, dict) else ""


def _substitute(parser: ConfigParser, section: str, substitutable: Callable[[Any], bool], target: str,
                name: str, *, stock: str) -> int:
    """Put the node's ``target`` transform in place of each transform of the bundle's ``section`` that
    ``substitutable`` accepts (the same voxels; see ``node.inference.resample`` and ``postops``); a
    ``stock`` transform with other arguments is left as the bundle has it, logged. Returns how many."""
    block = parser.get(section)
    transforms = block.get("transforms") if isinstance(block, dict) else None
    if not isinstance(transforms, list):
        return 0
    done = 0
    for n, item in enumerate(transforms):
        if substitutable(item):
            parser[f"{section}#transforms#{n}#_target_"] = target
            done += 1
        elif _target(item) == stock:
            logger.info("model %s: %s transform %d is a %s with arguments the node's equivalent does not "
                        "reproduce; MONAI's own runs", name, section, n, stock)
    return done


def _node_transforms(parser: ConfigParser, name: str) -> None:
    """The node's memory-bounded ``Spacingd`` (its inversion included) and fast arg-max-only ``AsDiscreted``
    in place of MONAI's, where they give the same voxels (card ``[bundle] substitute_transforms``)."""
    from node.inference import postops, resample

    _substitute(parser, "preprocessing", resample.substitutable, "node.inference.resample.BoundedSpacingd", name,
                stock="Spacingd")
    _substitute(parser, "postprocessing", postops.substitutable, "node.inference.postops.ChannelArgmaxd", name,
                stock="AsDiscreted")


class LoadedBundle:
    """What every bundle runner shares: the device, loading the bundle's config under its own code (see
    :func:`_bundle_code`) with the card's overrides, and timing the load. Subclasses implement ``_parse``.

    Raises:
        ModelError: the bundle's configuration or weights cannot be loaded.
    """

    #: what the bundle is, in messages
    what = "bundle"

    def __init__(self, model: ModelInfo, *, device: str = "auto", amp: bool = True,
                 on_progress: Callable[[float], None] | None = None) -> None:
        self.model = model
        self.device = select_device(device)
        self.amp = amp and self.device.type == "cuda"
        self.on_progress = on_progress
        t0 = time.perf_counter()
        try:
            with _bundle_code(model.path):
                self._parse(model)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"model {model.name}: cannot load the {self.what}: {type(exc).__name__}: {exc}") from exc
        self.load_seconds = time.perf_counter() - t0
        logger.info("%s %s %s loaded on %s in %.1f s (weights sha256 %s)", self.what, model.name, model.version,
                    self.device, self.load_seconds, model.sha256[:16])

    def _parse(self, model: ModelInfo) -> None:
        raise NotImplementedError

    def _open_config(self, model: ModelInfo) -> ConfigParser:
        """The bundle's inference config and metadata, its root and device set, the card's overrides applied
        (an id that is not in the config fails the load, named)."""
        parser = ConfigParser()
        parser.read_config(str(model.inference_config))
        parser.read_meta(str(model.path / "configs" / "metadata.json"))
        parser["bundle_root"] = str(model.path)
        parser["device"] = f"$torch.device('{self.device}')"
        for key, value in model.card.bundle.overrides.items():
            try:
                parser[key]
            except (KeyError, IndexError, ValueError) as exc:
                raise ModelError(f"model {model.name}: model_card.toml [bundle] overrides {key!r}, which is not in "
                                 f"{model.inference_config.name}") from exc
            parser[key] = value
        for key in model.card.bundle.remove:
            parent_id, _, last = key.rpartition("#")
            try:
                parent = parser[parent_id] if parent_id else parser.config
                if not isinstance(parent, dict) or last not in parent:
                    raise KeyError(key)
            except (KeyError, IndexError, ValueError) as exc:
                raise ModelError(f"model {model.name}: model_card.toml [bundle] remove {key!r}, which is not in "
                                 f"{model.inference_config.name}") from exc
            del parent[last]
            if parent_id:
                parser[parent_id] = parent  # resets the parser's references
        if model.card.bundle.substitute_transforms:
            _node_transforms(parser, model.name)
        return parser

    def _failure(self, exc: Exception) -> Exception:
        """What a failure inside the bundle's code raises for the job: the deadline passing (a timeout
        raised from inside the network call), or a ModelError naming the error and its root cause."""
        root = _root_cause(exc)
        if isinstance(root, ModelTimeoutError):
            return root
        what = "out of memory" if isinstance(root, MemoryError) else "failed"
        detail = f"{type(exc).__name__}: {str(exc)[:200]}"
        if root is not exc:
            detail += f" (caused by {type(root).__name__}: {str(root)[:300]})"
        return ModelError(f"model {self.model.name} {what}: {detail}")

    def _load_state(self, net: torch.nn.Module) -> torch.nn.Module:
        """The weights file (a state dict, possibly under "model" or "state_dict") loaded into ``net``."""
        state = torch.load(str(self.model.weights), map_location=self.device, weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelError(f"model {self.model.name}: weights do not match network_def: {exc}") from exc
        return net.to(self.device)


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
        self._has_loader = bool(transforms) and _target(transforms[0]) in _LOADERS
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
                                                          if _target(t) not in _SAVERS]
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        self.postprocessing = (parser.get_parsed_content("postprocessing")
                               if "postprocessing" in parser else None)
        self._split = _confidence_split(self.postprocessing)
        self._pre_on_device = True
        #: the series goes in its stored integer type even where the loader says float32, when nothing before
        #: the node's resampling depends on the type (it converts slab by slab: the same values, half the memory)
        self._keep_stored = self._has_loader and self.input_dtype == np.float32 and _typeless_until_resample(
            getattr(self.preprocessing, "transforms", ()))
        self.network = self._load_network(parser)

    def _load_network(self, parser: ConfigParser) -> torch.nn.Module:
        weights = self.model.weights
        if weights.suffix == ".ts":
            net = torch.jit.load(str(weights), map_location=self.device)
        else:
            net = self._load_state(parser.get_parsed_content("network_def"))
        net.eval()
        return net

    def predict(self, volume: Volume, *, deadline: float | None = None) -> np.ndarray:
        """Label volume (uint8, ``[k, j, i]``, same shape as ``volume.pixels``); see :meth:`predict_with_confidence`."""
        return self.predict_with_confidence(volume, deadline=deadline)[0]

    def predict_with_confidence(self, volume: Volume, *, deadline: float | None = None
                                ) -> tuple[np.ndarray, np.ndarray | None]:
        """Label volume (uint8, ``[k, j, i]``, same shape as ``volume.pixels``) and, when the bundle's
        postprocessing applies a softmax and then an argmax, the winning class's probability per voxel
        (float16, same shape; None otherwise): a finding's confidence is its mean over the finding.

        Raises:
            ModelTimeoutError: the deadline (``time.monotonic()`` value) passed during inference.
            ModelError: the bundle failed, or returned a label map of another shape.
        """
        stored = volume.pixels.dtype
        keep = self._keep_stored and (stored.kind in "iu" or stored == np.float32)
        arr, affine = volume.to_monai(dtype=None if keep else self.input_dtype)
        meta = {"original_affine": torch.as_tensor(affine),
                "spatial_shape": np.array(arr.shape), "original_channel_dim": "no_channel",
                "filename_or_obj": volume.series_uid or "volume"}
        image = MetaTensor(torch.from_numpy(arr), affine=torch.as_tensor(affine), meta=meta)
        del arr  # the image holds it; dropped with the image once preprocessing has made its own copy
        try:
            data = self._preprocess(image)
            del image
            volume.release_memory()  # a mapped volume's pages go back to the page cache while the model runs
            inp = data["image"]
            if not isinstance(inp, torch.Tensor):
                inp = torch.as_tensor(inp)
            inp = inp.unsqueeze(0).to(self.device)
            net = self._guarded(deadline)
            with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=self.amp):
                pred = self.inferer(inp, net)
            data["pred"] = pred[0].float()
            del pred, inp  # the network output lives on in data["pred"] only: postprocessing may replace it
            confidence = None
            if self._split is not None:  # probabilities on the input grid, then the argmax and the rest
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

    def _preprocess(self, image: MetaTensor) -> dict[str, Any]:
        """The bundle's preprocessing, on the GPU when the model runs there (resampling included), so that
        only the series itself crosses to the device. A bundle transform that cannot run on the GPU makes it
        run on the CPU from then on (logged once)."""
        if self.device.type == "cuda" and self._pre_on_device:
            try:
                return dict(self.preprocessing({"image": image.to(self.device)}))
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # a transform written for numpy/CPU tensors: run it where it works
                self._pre_on_device = False
                logger.warning("model %s: preprocessing fails on %s (%s: %s); it runs on the CPU from now on",
                               self.model.name, self.device, type(exc).__name__, str(exc)[:200])
        return dict(self.preprocessing({"image": image}))

    def _guarded(self, deadline: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The network wrapped to check the deadline and report progress between sliding-window batches."""
        calls = {"n": 0}

        def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if deadline is not None and time.monotonic() > deadline:
                raise ModelTimeoutError(f"model {self.model.name}: inference passed the job timeout")
            calls["n"] += 1
            if self.on_progress is not None:
                self.on_progress(float(calls["n"]))
            result: torch.Tensor = self.network(x, *args, **kwargs)
            return result

        return run


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


def load_runner(model: ModelInfo, *, device: str = "auto", amp: bool = True,
                on_progress: Callable[[float], None] | None = None) -> Runner:
    """The runner for a model: :class:`BundleRunner` for a segmentation bundle, ``DetectionRunner`` for a
    detection bundle (``model.kind``)."""
    if model.kind == "detection":
        from node.inference.detection import DetectionRunner

        return DetectionRunner(model, device=device, amp=amp, on_progress=on_progress)
    return BundleRunner(model, device=device, amp=amp, on_progress=on_progress)
