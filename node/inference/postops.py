"""Fast arg-max over channels, for the bundles' ``AsDiscreted(argmax=True)``.

``torch.argmax`` over the channel dimension of a full-resolution probability map is pathologically slow
on the CPU: 12 s for two channels of a 512 x 512 x 300 CT on a 2-core machine, where a running
comparison takes 0.1 s per channel. :class:`ChannelArgmaxd` gives the same labels (the first maximum wins
a tie, as ``torch.argmax``; a NaN never wins) one channel at a time, on whichever device the tensor is,
holding the running maximum and the label map only. The bundle runner puts it in place of an
``AsDiscreted`` that does nothing but the arg-max (:func:`substitutable`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import get_equivalent_dtype

__all__ = ["ChannelArgmaxd", "channel_argmax", "channel_max", "substitutable"]

_FREE_ARGS = {"_target_", "keys", "argmax", "dtype", "allow_missing_keys", "_disabled_", "_desc_", "_requires_",
              "_mode_"}
_DEFAULT_ARGS: dict[str, Any] = {"to_onehot": None, "threshold": None, "rounding": None, "dim": 0, "keepdim": True}


def substitutable(item: Any) -> bool:
    """Whether a bundle config entry is an ``AsDiscreted`` that only takes the arg-max over channels."""
    if not isinstance(item, dict) or str(item.get("_target_", "")).rsplit(".", 1)[-1] != "AsDiscreted":
        return False
    if any(k not in _FREE_ARGS and (k not in _DEFAULT_ARGS or v != _DEFAULT_ARGS[k]) for k, v in item.items()):
        return False
    argmax = item.get("argmax", False)
    return argmax is True or (isinstance(argmax, list) and bool(argmax) and all(a is True for a in argmax))


def channel_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The index of the largest channel per voxel (uint8 up to 256 channels, else int16) and that maximum,
    for a channel-first tensor; the first channel wins a tie."""
    n = int(x.shape[0])
    best = x[0].clone()
    index = torch.zeros(x.shape[1:], dtype=torch.uint8 if n <= 256 else torch.int16, device=x.device)
    for c in range(1, n):
        wins = x[c] > best
        index.masked_fill_(wins, c)
        torch.maximum(best, x[c], out=best)
        del wins
    return index, best


def channel_max(x: torch.Tensor) -> torch.Tensor:
    """The largest channel value per voxel (``amax`` over dim 0, one channel at a time)."""
    best = x[0].clone()
    for c in range(1, int(x.shape[0])):
        torch.maximum(best, x[c], out=best)
    return best


class ChannelArgmaxd(MapTransform):
    """``AsDiscreted(keys, argmax=True, dtype=...)``, fast: same labels, channel dimension kept (size 1).

    Args:
        keys: the keys to reduce.
        dtype: the output type (``AsDiscrete``'s default float32).
    """

    def __init__(self, keys: KeysCollection, argmax: Any = True, dtype: Any = torch.float32,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.dtype = get_equivalent_dtype(dtype if dtype is not None else torch.float32, torch.Tensor)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            raw = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            index, best = channel_argmax(raw)
            del best
            out = index.unsqueeze(0).to(self.dtype)
            d[key] = MetaTensor(out, meta=dict(img.meta), applied_operations=list(img.applied_operations)) \
                if isinstance(img, MetaTensor) else out
        return d
