"""A bundle tried before it is used: `preannot models add` builds it as the node will (its card's overrides and
removals, the node's transforms) and runs it once on a tiny synthetic input, so that what would otherwise fail
its first job is said at once, with the fix where there is one:

- a package the bundle's transforms or network import that is not installed (MONAI's optional imports, such as
  scikit-image for ``KeepLargestConnectedComponentd``);
- an argument the installed MONAI no longer takes (the card's ``[bundle] remove`` is drafted for it);
- a network that downloads weights when it is built (the card's override is drafted for it);
- any other error of its configuration, transforms, inferer or postprocessing on a real call.

Without the bundle's weights (not downloaded yet), it runs with seeded random ones made for its own network:
only the path is tried, not the results.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.errors import ModelError
from node.imaging.volume import FrameRef, Volume
from node.inference.prediction import ModelInputs
from node.inference.registry import ModelCard, ModelInfo, bundle_inputs, find_weights, read_inference_config

__all__ = ["Trial", "random_weights", "try_bundle"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Trial:
    """What trying a bundle found: ok, or the problem and what fixes it."""

    ok: bool
    seconds: float
    problem: str = ""
    fix: str = ""
    #: whether it ran on random weights (the bundle's own were not there)
    random_weights: bool = False


def random_weights(bundle: Path, *, seed: int = 0, overrides: dict[str, object] | None = None) -> Path:
    """Seeded random weights for the bundle's own ``network_def`` as the node builds it (the ``[bundle]`` overrides
    and removals of its model card applied, when it has one, then ``overrides``: e.g. a ``pretrained`` switched
    off so that building it downloads nothing), saved as ``models/model.pt``; returns the path."""
    import tomllib

    import torch
    from monai.bundle import ConfigParser

    from node.inference.registry import find_inference_config

    config = find_inference_config(bundle)
    if config is None:
        raise FileNotFoundError(f"{bundle}: no inference config")
    parser = ConfigParser()
    parser.read_config(str(config))
    card_path = bundle / "model_card.toml"
    card = tomllib.loads(card_path.read_text()).get("bundle", {}) if card_path.is_file() else {}
    for key in card.get("remove", []):
        parent_id, _, last = key.rpartition("#")
        parent = parser[parent_id] if parent_id else parser.config
        if isinstance(parent, dict):
            parent.pop(last, None)
        if parent_id:
            parser[parent_id] = parent
    for key, value in {**card.get("overrides", {}), **(overrides or {})}.items():
        if key.startswith("network_def"):
            parser[key] = value
    torch.manual_seed(seed)
    state = parser.get_parsed_content("network_def").state_dict()
    (bundle / "models").mkdir(exist_ok=True)
    path = bundle / "models" / "model.pt"
    torch.save(state, path)
    return path


def _tiny_volume(model: ModelInfo) -> Volume:
    """A small synthetic input of the kind the bundle takes: a 2D image (classifiers of 2D images), else a 3D
    stack of 2 mm voxels, its values spread like a scan's (an intensity ramp with noise)."""
    fmt = model.metadata.get("network_data_format") or {}
    image = (fmt.get("inputs") or {}).get("image") or {}
    shape = image.get("spatial_shape") if isinstance(image, dict) else None
    rng = np.random.default_rng(0)
    two_d = isinstance(shape, list) and len(shape) == 2
    dims = (1, 64, 64) if two_d else (12, 24, 24)
    pixels = (np.linspace(-200, 400, int(np.prod(dims))).reshape(dims) + rng.normal(0, 30, dims)).astype(np.float32)
    spacing = 0.5 if two_d else 2.0
    affine = np.diag([spacing, spacing, spacing, 1.0])
    positions = np.array([[0.0, 0.0, k * spacing] for k in range(dims[0])])
    return Volume(pixels=pixels, affine=affine, sources=[], frames=[FrameRef(0, None)] * dims[0],
                  modality=(model.card.model.modality or ["CT"])[0], series_uid="1.2.3.smoke", positions=positions,
                  projection=two_d)


def _explain(exc: BaseException) -> tuple[str, str]:
    """(the problem, its fix) from an error of the bundle."""
    text = f"{type(exc).__name__}: {exc}"
    root: BaseException = exc
    while root.__cause__ is not None or root.__context__ is not None:
        nxt = root.__cause__ or root.__context__
        assert nxt is not None
        root = nxt
    whole = text + " " + f"{type(root).__name__}: {root}"
    package = re.search(r"required package `([\w.-]+)` is not installed|No module named '([\w.-]+)'", whole)
    if package:
        name = package.group(1) or package.group(2)
        pip = {"skimage": "scikit-image", "sklearn": "scikit-learn", "cv2": "opencv-python-headless",
               "SimpleITK": "SimpleITK", "yaml": "pyyaml"}.get(name.split(".")[0], name.split(".")[0])
        return (f"the bundle needs the Python package {name!r}, which is not installed",
                f"install it where the node runs ({pip}) before using the model")
    arg = re.search(r"unexpected keyword argument '(\w+)'", whole)
    if arg:
        return (f"{whole[:400]}", f'an argument the installed MONAI no longer takes: [bundle] remove = '
                                  f'["network_def#{arg.group(1)}"] in the card (if it is the network\'s)')
    return whole[:600], ""


def try_bundle(folder: Path, card: ModelCard, metadata: dict[str, object], *, device: str = "cpu") -> Trial:
    """Build the bundle in ``folder`` as the node will and run it once on a tiny input (module docstring)."""
    import torch

    from node.inference.kinds import kind_of, load_runner

    t0 = time.perf_counter()
    random = False
    scratch = None
    try:
        try:
            weights = find_weights(folder)
        except ModelError:
            weights = None
        config = read_inference_config(folder)
        kind = kind_of(config, dict(metadata))
        if weights is None:  # seeded random weights for the bundle's own network, as it is built for the node
            scratch = tempfile.TemporaryDirectory(prefix="preannot-try-")
            copy = Path(scratch.name) / folder.name
            import shutil

            shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("models"))
            weights = random_weights(copy)
            folder_used = copy
            random = True
        else:
            folder_used = folder
        inputs = bundle_inputs(config, dict(metadata))
        model = ModelInfo(name=folder.name, version=str(metadata.get("version", "0")), path=folder_used.resolve(),
                          weights=weights, sha256=hashlib.sha256(b"trial").hexdigest(), card=card,
                          metadata=dict(metadata), kind=kind, inputs=inputs)
        runner = load_runner(model, device=device)
        tiny = _tiny_volume(model)
        given: Volume | ModelInputs = tiny
        if len(inputs) > 1:  # a study-level bundle: the tiny volume as each of its inputs
            volumes = {name: tiny for name in inputs.names}
            channels = None
            if inputs.mode == "channels":
                channels = np.ascontiguousarray(np.stack([tiny.pixels.transpose(2, 1, 0)] * len(inputs)))
            given = ModelInputs(volumes, inputs.names[0], inputs.mode, channels=channels)
        with torch.no_grad():
            runner.predict(given, deadline=time.monotonic() + 600)
        return Trial(True, time.perf_counter() - t0, random_weights=random)
    except Exception as exc:  # whatever the bundle does wrong is reported, never raised to the operator
        problem, fix = _explain(exc)
        return Trial(False, time.perf_counter() - t0, problem, fix, random_weights=random)
    finally:
        if scratch is not None:
            scratch.cleanup()
