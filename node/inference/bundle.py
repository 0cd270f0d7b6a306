"""What every bundle runner shares: the device, the bundle's own code, its config with the card's changes.

A MONAI bundle's ``configs/inference.json`` (or ``.yaml``) provides ``network_def`` (or a TorchScript
``model.ts``), ``preprocessing``, ``inferer`` and ``postprocessing``. The node already holds the image in
memory, so a leading ``LoadImage(d)`` in the preprocessing is replaced by a MetaTensor carrying the RAS
affine that MONAI's ITK/NIfTI readers would have produced; ``SaveImage(d)`` in the postprocessing is
dropped. Everything else runs as the bundle says. CUDA with automatic mixed precision when available, CPU
otherwise. Each kind of model (``node.inference.kinds``) has its runner built on :class:`LoadedBundle`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from node.config import ModelsConfig
from node.errors import BundleError, ModelError, ModelTimeoutError
from node.inference.registry import ModelInfo

__all__ = ["LOADERS", "SAVERS", "LoadedBundle", "bundle_code", "configure_torch", "downloading_args", "root_cause",
           "select_device", "target_name"]

logger = logging.getLogger(__name__)

#: transforms that read files: the node gives the image itself instead
LOADERS = ("LoadImage", "LoadImaged")
#: transforms that write files: dropped (the node writes DICOM)
SAVERS = ("SaveImage", "SaveImaged")


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


def root_cause(exc: BaseException) -> BaseException:
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
def bundle_code(root: Path) -> Iterator[None]:
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


#: ``network_def`` arguments that make a network download weights from the internet when it is built
DOWNLOAD_ARGS = ("pretrained", "pretrained_backbone", "weights")


def downloading_args(network_def: Any) -> list[str]:
    """The ``network_def`` arguments (config ids) set so that building the network downloads weights:
    ``pretrained: true`` (torchvision and MONAI networks), a torchvision ``weights`` name."""
    if not isinstance(network_def, dict):
        return []
    out = []
    for key in DOWNLOAD_ARGS:
        value = network_def.get(key)
        if value is True or (isinstance(value, str) and value.strip().lower() not in ("", "none", "false", "null")):
            out.append(f"network_def#{key}")
    return out


def target_name(item: Any) -> str:
    """The class name a config item builds (``_target_``'s last part), or "" for anything else."""
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
        elif target_name(item) == stock:
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
    :func:`bundle_code`) with the card's overrides, and timing the load. Subclasses implement ``_parse``
    and ``predict``.

    Raises:
        ModelError: the bundle's configuration or weights cannot be loaded.
    """

    #: what the bundle is, in messages
    what = "bundle"
    #: the loaded network (set by ``_parse``)
    network: torch.nn.Module
    #: whether the network runs in channels-last layout (3D convolutions on the CPU; see ``_load_network``)
    channels_last: bool = False

    def __init__(self, model: ModelInfo, *, device: str = "auto", amp: bool = True,
                 on_progress: Callable[[float], None] | None = None) -> None:
        self.model = model
        self.device = select_device(device)
        self.amp = amp and self.device.type == "cuda"
        self.on_progress = on_progress
        t0 = time.perf_counter()
        try:
            with bundle_code(model.path):
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
        downloads = downloading_args(parser.get("network_def"))
        if downloads:
            flags = [d for d in downloads if not d.endswith("#weights")]
            fix = []
            if flags:
                fix.append("overrides = { " + ", ".join(f'"{d}" = false' for d in flags) + " }")
            if len(flags) < len(downloads):
                fix.append('remove = ["network_def#weights"]')
            raise ModelError(f"model {model.name}: {', '.join(downloads)} would make the network download weights "
                             "from the internet when it is built, which the node never does (the bundle's own weights "
                             f"replace them); set [bundle] {' and '.join(fix)} in model_card.toml "
                             "(`preannot models add` drafts it)")
        if model.card.bundle.substitute_transforms:
            _node_transforms(parser, model.name)
        return parser

    def _failure(self, exc: Exception) -> Exception:
        """What a failure inside the bundle's code raises for the job: the deadline passing (a timeout
        raised from inside the network call), or a ModelError naming the error and its root cause."""
        root = root_cause(exc)
        if isinstance(root, ModelTimeoutError):
            return root
        what = "out of memory" if isinstance(root, MemoryError) else "failed"
        detail = f"{type(exc).__name__}: {str(exc)[:200]}"
        if root is not exc:
            detail += f" (caused by {type(root).__name__}: {str(root)[:300]})"
        if isinstance(root, KeyError | TypeError | AttributeError | IndexError | ImportError | NotImplementedError):
            # the bundle's code meets something it does not handle: the same input fails the same way again
            return BundleError(f"model {self.model.name} {what}: {detail}")
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

    def _load_network(self, parser: ConfigParser) -> torch.nn.Module:
        """The network in eval mode: TorchScript ``model.ts`` as it is, else ``network_def`` with the weights."""
        weights = self.model.weights
        if weights.suffix == ".ts":
            net = torch.jit.load(str(weights), map_location=self.device)
        else:
            net = self._load_state(parser.get_parsed_content("network_def"))
        net.eval()
        # 3D convolutions on the CPU in channels-last layout: oneDNN's fast path, the same arithmetic (a
        # 96^3 UNet batch: 0.55 -> 0.35 s on the project's VM; docs/performance.md). A network that cannot take
        # the layout (a view on its activations) goes back to the default at its first batch
        self.channels_last = (self.device.type == "cpu" and not isinstance(net, torch.jit.ScriptModule)
                              and any(p.ndim == 5 for p in net.parameters()))
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last_3d)
        return net

    def _forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The network on one batch, in channels-last layout where it was loaded so (see ``_load_network``)."""
        if self.channels_last and isinstance(x, torch.Tensor) and x.ndim == 5:
            try:
                out: torch.Tensor = self.network(x.contiguous(memory_format=torch.channels_last_3d), *args, **kwargs)
                return out
            except RuntimeError as exc:
                self.channels_last = False
                self.network = self.network.to(memory_format=torch.contiguous_format)
                logger.info("model %s: channels-last layout refused (%s); the default layout from now on",
                            self.model.name, str(exc)[:200])
        result: torch.Tensor = self.network(x, *args, **kwargs)
        return result

    def _guarded(self, deadline: float | None) -> Callable[..., torch.Tensor]:
        """The network wrapped to check the deadline and report progress between sliding-window batches."""
        calls = {"n": 0}

        def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if deadline is not None and time.monotonic() > deadline:
                raise ModelTimeoutError(f"model {self.model.name}: inference passed the job timeout")
            calls["n"] += 1
            if self.on_progress is not None:
                self.on_progress(float(calls["n"]))
            return self._forward(x, *args, **kwargs)

        return run
