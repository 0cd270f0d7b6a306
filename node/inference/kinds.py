"""The kinds of model the node runs, recognised once from the bundle, each with its runner.

A kind is chosen when the bundle is read (``node.inference.registry``) from its inference config, and
from then on the node never asks again: the kind's runner returns a typed
:class:`~node.inference.prediction.Prediction`, and everything after (findings, outputs, evaluation)
follows the prediction's type. Kinds are tried in order; the first that recognises the config wins.

Adding a kind: a module with its runner (a :class:`~node.inference.bundle.LoadedBundle` whose
``predict`` returns a prediction type of its own, implementing the ``Prediction`` protocol), and one
entry in :data:`KINDS`. See docs/architecture.md, "Adding a kind of model".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.inference.prediction import Runner
    from node.inference.registry import ModelInfo

__all__ = ["KINDS", "Kind", "kind_named", "kind_of", "load_runner"]


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of model."""

    name: str
    #: whether a bundle is of this kind, from its inference config and its metadata (both dicts)
    recognizes: Callable[[dict[str, Any], dict[str, Any]], bool]
    #: "module:Class" of its runner (imported when a model of the kind is loaded)
    runner: str
    #: whether the bundle's output channel 0 is the background (cards then describe channels 1..n as
    #: label values 1..n); False for classifiers, whose channel 0 is a class (label value 1)
    background_channel: bool = True
    #: what the model gives, in words (``preannot models``)
    gives: str = ""

    def __str__(self) -> str:
        return self.name


def _is_detector(config: dict[str, Any], metadata: dict[str, Any]) -> bool:
    return "detector" in config


def _is_classifier(config: dict[str, Any], metadata: dict[str, Any]) -> bool:
    """One score per class: the task says classification, or the output is a vector ([1, n] or [n])."""
    task = f"{metadata.get('task', '')} {metadata.get('name', '')}".lower()
    fmt = metadata.get("network_data_format")
    pred = (fmt.get("outputs") or {}).get("pred", {}) if isinstance(fmt, dict) else {}
    shape = pred.get("spatial_shape") if isinstance(pred, dict) else None
    vector = isinstance(shape, list) and 0 < len(shape) <= 2 and all(isinstance(v, int) for v in shape) \
        and (len(shape) == 1 or shape[0] == 1)
    return "classif" in task or vector


def _any(config: dict[str, Any], metadata: dict[str, Any]) -> bool:
    return True


#: every kind, in the order they are tried (the last one recognises anything)
KINDS: tuple[Kind, ...] = (
    Kind("detection", _is_detector, "node.inference.detection:DetectionRunner", gives="boxes with scores"),
    Kind("classification", _is_classifier, "node.inference.classification:ClassificationRunner",
         background_channel=False, gives="a class with the score of each class"),
    Kind("segmentation", _any, "node.inference.runner:BundleRunner", gives="a label map"),
)


def kind_of(config: dict[str, Any], metadata: dict[str, Any] | None = None) -> Kind:
    """The kind of a bundle from its inference config and metadata."""
    return next(k for k in KINDS if k.recognizes(config, metadata or {}))


def kind_named(name: str) -> Kind:
    """The kind called ``name``; raises KeyError naming the kinds there are."""
    for k in KINDS:
        if k.name == name:
            return k
    raise KeyError(f"no model kind {name!r}; kinds: {[k.name for k in KINDS]}")


def load_runner(model: ModelInfo, *, device: str = "auto", amp: bool = True,
                on_progress: Callable[[float], None] | None = None) -> Runner:
    """The loaded runner of a model, of the model's kind.

    Raises:
        ModelError: the bundle cannot be loaded.
    """
    module, _, cls = model.kind.runner.partition(":")
    runner: Runner = getattr(importlib.import_module(module), cls)(model, device=device, amp=amp,
                                                                    on_progress=on_progress)
    return runner
