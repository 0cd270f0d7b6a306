"""Memory-bounded resampling for this bundle: MONAI's ``Spacingd`` geometry, computed slab by slab.

MONAI's ``Spacingd`` converts the whole input to float32 and samples it through a dense grid of
output coordinates; its inverse (run by ``Invertd``) builds that grid at the *input* resolution. For a
512 x 512 x 1000 CT that is a 1 GB float copy on the way in and a 3 GB grid on the way back, many times
the int16 volume itself. When the resampling is a pure scaling and shift along the array axes (the
voxel axes of the input and output grids are parallel: always the case for ``Spacingd`` on an image
that is not resampled to a new orientation), trilinear and nearest-neighbour sampling are separable, so
the same result is computed one slab of output slices at a time with per-axis index and weight
vectors: memory is the output plus one slab, and the input can stay int16.

``BoundedSpacingd`` takes the same main arguments as ``Spacingd`` (``pixdim``, ``mode``; border
padding, ``align_corners=False``), produces the same output shape, affine and sampling positions, and
records itself in the MetaTensor's ``applied_operations`` so that ``Invertd`` inverts it (honouring
``nearest_interp``). Oblique cases fall back to MONAI's own ``Spacing``.

The module lives in the bundle (``scripts/``) so the bundle stays self-contained: ``monai.bundle run``
puts the bundle root on ``sys.path``, and so does preannot's bundle runner.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import compute_shape_offset, to_affine_nd, zoom_affine
from monai.transforms import InvertibleTransform, MapTransform, Spacing

__all__ = ["BoundedSpacingd"]

_ATOL = 1e-4


def _axis_plan(scale: float, shift: float, n_out: int, n_in: int, nearest: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input indices (lower, upper) and upper weights for each output index along one axis.

    ``in = scale * out + shift`` in voxel-centre coordinates, clamped to the input (border padding),
    as ``grid_sample`` with ``align_corners=False`` and ``padding_mode="border"`` samples.
    """
    c = np.clip(scale * np.arange(n_out, dtype=np.float64) + shift, 0.0, n_in - 1)
    if nearest:  # grid_sample's nearest rounds half to even, as numpy's rint does
        idx = torch.from_numpy(np.rint(c).astype(np.int64))
        return idx, idx, torch.zeros(n_out, dtype=torch.float32)
    lo = np.floor(c).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy((c - lo).astype(np.float32))


def _lerp(x: torch.Tensor, dim: int, plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
          nearest: bool) -> torch.Tensor:
    lo, hi, w = plan
    if nearest:
        return x.index_select(dim, lo)
    shape = [1] * x.ndim
    shape[dim] = -1
    w = w.view(shape)
    a = x.index_select(dim, lo)
    a.mul_(1.0 - w)
    a.add_(x.index_select(dim, hi).mul_(w))
    return a


def resample_separable(img: torch.Tensor, xform: np.ndarray, out_shape: Sequence[int], *, nearest: bool,
                       slab: int = 16, out: torch.Tensor | None = None) -> torch.Tensor:
    """Resample a channel-first 3-D tensor ``[C, X, Y, Z]`` along its axes, ``slab`` output slices (Z) at a time.

    Args:
        img: the input, any dtype; only one slab is converted at a time.
        xform: 4 x 4 voxel-to-voxel matrix (output index -> input index), diagonal plus translation.
        out_shape: the output's spatial shape.
        nearest: nearest neighbour (keeps the dtype) instead of trilinear (float32).
        out: an optional preallocated output (any strides) of shape ``[C, *out_shape]``.
    """
    n_in = img.shape[1:]
    dtype = img.dtype if nearest else torch.float32
    if tuple(int(s) for s in out_shape) == tuple(int(s) for s in n_in) and np.allclose(xform, np.eye(4), atol=_ATOL):
        # same grid (the input is already at the target spacing): a copy, as MONAI's Spacing returns
        if out is None:  # contiguous, whatever the input's strides (the sliding window reads it many times)
            out = torch.empty(img.shape, dtype=dtype)
        out.copy_(img)
        return out
    plans = [_axis_plan(float(xform[a, a]), float(xform[a, 3]), int(out_shape[a]), int(n_in[a]), nearest)
             for a in range(3)]
    if out is None:
        out = torch.empty((img.shape[0], *[int(s) for s in out_shape]), dtype=dtype)
    zlo, zhi, zw = plans[2]
    for z0 in range(0, int(out_shape[2]), slab):
        z1 = min(z0 + slab, int(out_shape[2]))
        first, last = int(zlo[z0:z1].min()), int(zhi[z0:z1].max()) + 1
        block = img[..., first:last]
        if not nearest:
            block = block.to(torch.float32)
        part = _lerp(block, 3, (zlo[z0:z1] - first, zhi[z0:z1] - first, zw[z0:z1]), nearest)
        del block
        part = _lerp(part, 2, plans[1], nearest)
        part = _lerp(part, 1, plans[0], nearest)
        out[..., z0:z1] = part
    return out


class BoundedSpacingd(MapTransform, InvertibleTransform):
    """``Spacingd`` (border padding, ``align_corners=False``) with memory bounded by the output plus one slab.

    Args:
        keys: keys of the images to resample.
        pixdim: output voxel size (mm) along the spatial axes.
        mode: "bilinear" (trilinear in 3-D) or "nearest".
        slab: output slices computed at a time.
    """

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float], mode: str = "bilinear", slab: int = 16,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"BoundedSpacingd: mode must be 'bilinear' or 'nearest', not {mode!r}")
        self.pixdim = np.asarray(pixdim, dtype=np.float64)
        self.mode = mode
        self.slab = slab
        self._fallback = Spacing(pixdim=pixdim, mode=mode, padding_mode="border", dtype=torch.float32)

    def _resample(self, img: MetaTensor) -> MetaTensor:
        if img.ndim != 4:
            raise ValueError(f"BoundedSpacingd expects a channel-first 3-D image, got shape {tuple(img.shape)}")
        src = to_affine_nd(3, img.affine.numpy().astype(np.float64))
        dst = zoom_affine(src, self.pixdim, diagonal=False)
        in_shape = [int(s) for s in img.shape[1:]]
        out_shape, offset = compute_shape_offset(in_shape, src, dst)
        dst[:3, -1] = offset[:3]
        xform = np.linalg.solve(src, dst)
        if not np.allclose(xform[:3, :3], np.diag(np.diag(xform[:3, :3])), atol=_ATOL):
            # rotated grids are not separable: MONAI's dense resampling (same result, more memory)
            out: MetaTensor = self._fallback(img)
            return out
        data = resample_separable(img.as_tensor(), xform, [int(s) for s in out_shape],
                                  nearest=self.mode == "nearest", slab=self.slab)
        result = MetaTensor(data, affine=torch.as_tensor(dst, dtype=torch.float64), meta=dict(img.meta),
                            applied_operations=list(img.applied_operations))
        result.meta["spatial_shape"] = np.asarray(out_shape)
        self.push_transform(result, orig_size=in_shape,
                            extra_info={"mode": self.mode, "src_affine": src, "xform": xform})
        return result

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, MetaTensor):
                raise TypeError(f"BoundedSpacingd: {key!r} must be a MetaTensor with an affine")
            d[key] = self._resample(img)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            op = self.pop_transform(img)
            info = op["extra_info"]
            back = np.linalg.inv(np.asarray(info["xform"], dtype=np.float64))
            orig = [int(s) for s in op["orig_size"]]
            nearest = info["mode"] == "nearest"  # Invertd(nearest_interp=True) rewrites "mode" to "nearest"
            raw = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            c = raw.shape[0]
            # written so that the label map, transposed to [k, j, i] by the caller, is already contiguous
            out = torch.empty_strided((c, *orig), (orig[0] * orig[1] * orig[2], 1, orig[0], orig[0] * orig[1]),
                                      dtype=raw.dtype if nearest else torch.float32)
            resample_separable(raw, back, orig, nearest=nearest, slab=self.slab, out=out)
            meta = dict(img.meta) if isinstance(img, MetaTensor) else {}
            meta["spatial_shape"] = np.asarray(orig)
            ops = list(img.applied_operations) if isinstance(img, MetaTensor) else []
            d[key] = MetaTensor(out, affine=torch.as_tensor(info["src_affine"], dtype=torch.float64), meta=meta,
                                applied_operations=ops)
        return d
