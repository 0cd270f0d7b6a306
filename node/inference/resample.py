"""Memory-bounded resampling: MONAI's ``Spacingd`` geometry and sampling, computed one slab at a time.

MONAI's ``Spacingd`` converts the whole input to float64, samples it through a dense grid of output
coordinates, and its inverse (run by ``Invertd``) builds that grid at the *input* resolution: for a
512 x 512 x 300 CT and a two-class probability map that is several GB on the way back, many times the
int16 volume. When the resampling is a scaling and shift along the array axes (the voxel axes of the
input and output grids are parallel, which is what ``Spacingd`` does to any image that is not oblique),
trilinear and nearest-neighbour sampling are separable: the same values come out one slab of output
slices at a time from per-axis index and weight vectors. Memory is the output plus one slab; the input
keeps its type (an int16 CT is converted one slab at a time); on CUDA it all stays on the GPU.

:class:`BoundedSpacingd` takes ``Spacingd``'s arguments for that case (``pixdim``, ``mode`` bilinear or
nearest, border padding, ``align_corners=False``, ``dtype`` of the computation), produces the same output
shape and affine, and records itself in the MetaTensor so that ``Invertd`` inverts it (honouring
``nearest_interp``). Nearest-neighbour indices are taken from MONAI's own resampler run on a ramp along
each axis, so that a sample falling exactly half-way between two voxels goes to the same side as in
stock MONAI: labels come out identical. Oblique grids fall back to MONAI's ``Spacing``.

The bundle runner puts :class:`BoundedSpacingd` in place of a published bundle's ``Spacingd`` when its
arguments are ones it reproduces (:func:`substitutable`); the card's ``[bundle] substitute_transforms = false``
keeps the bundle's own.
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
from monai.utils import ensure_tuple_rep

__all__ = ["BoundedSpacingd", "resample_separable", "substitutable"]

_ATOL = 1e-4
_MODES = ("bilinear", "nearest")
#: the ``Spacingd`` arguments whose value is reproduced whatever it is (the others must be absent or default)
_FREE_ARGS = {"_target_", "keys", "pixdim", "mode", "dtype", "allow_missing_keys", "_disabled_", "_desc_",
              "_requires_", "_mode_"}
_DEFAULT_ARGS = {"padding_mode": "border", "align_corners": False, "diagonal": False, "scale_extent": False,
                 "recompute_affine": False, "min_pixdim": None, "max_pixdim": None, "ensure_same_shape": True,
                 "lazy": False}

#: per axis: lower and upper input index and upper weight for each output index
Plan = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def substitutable(item: Any) -> bool:
    """Whether a bundle config entry is a ``Spacingd`` that :class:`BoundedSpacingd` reproduces exactly:
    no argument outside the ones it implements, those at ``Spacingd``'s defaults, modes bilinear or
    nearest (given literally or by reference: checked again when the transform is built)."""
    if not isinstance(item, dict) or str(item.get("_target_", "")).rsplit(".", 1)[-1] != "Spacingd":
        return False
    for key, value in item.items():
        if key in _FREE_ARGS:
            continue
        if key not in _DEFAULT_ARGS or value != _DEFAULT_ARGS[key]:
            return False
    modes = item.get("mode", "bilinear")
    modes = [modes] if isinstance(modes, str) else modes
    return isinstance(modes, list) and all(isinstance(m, str) and (m in _MODES or m.startswith("@")) for m in modes)


def _nearest_index(xform: np.ndarray, axis: int, n_in: int, n_out: int) -> np.ndarray:
    """The input index MONAI's ``spatial_resample`` (nearest, border, float64) samples for each output index
    along ``axis``: the resampler run on a ramp 0..n_in-1 along that axis (a few hundred values), with the
    same voxel-to-voxel scale and shift. Its sampling depends only on those and on the two sizes, and the
    off-axis entries are zero, so the other axes do not change these coordinates."""
    from monai.transforms.spatial.functional import spatial_resample

    shape, out_size, dst = [1, 1, 1], [1, 1, 1], np.eye(4)
    shape[axis], out_size[axis] = n_in, n_out
    dst[axis, axis], dst[axis, 3] = xform[axis, axis], xform[axis, 3]
    ramp = MetaTensor(torch.arange(n_in, dtype=torch.float64).reshape(1, *shape), affine=torch.eye(4, dtype=torch.float64))
    out = spatial_resample(ramp, torch.as_tensor(dst), out_size, "nearest", "border", False, torch.float64,
                           lazy=False, transform_info={})
    return torch.as_tensor(out).reshape(-1).round().to(torch.int64).numpy()


def _axis_plan(xform: np.ndarray, axis: int, n_out: int, n_in: int, nearest: bool) -> Plan:
    """Input indices (lower, upper) and upper weights for each output index along one axis: ``in = scale *
    out + shift`` in voxel-centre coordinates, clamped to the input (border padding), as ``grid_sample``
    with ``align_corners=False`` samples."""
    if nearest:
        idx = torch.from_numpy(_nearest_index(xform, axis, n_in, n_out))
        return idx, idx, torch.zeros(n_out, dtype=torch.float64)
    c = np.clip(float(xform[axis, axis]) * np.arange(n_out, dtype=np.float64) + float(xform[axis, 3]), 0.0, n_in - 1)
    lo = np.floor(c).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(c - lo)


def _lerp(x: torch.Tensor, dim: int, plan: Plan, nearest: bool) -> torch.Tensor:
    lo, hi, w = (p.to(x.device) for p in plan)
    if nearest:
        return x.index_select(dim, lo)
    shape = [1] * x.ndim
    shape[dim] = -1
    w = w.to(x.dtype).view(shape)
    a = x.index_select(dim, lo)
    a.mul_(1.0 - w)
    a.add_(x.index_select(dim, hi).mul_(w))
    return a


def resample_separable(img: torch.Tensor, plans: Sequence[Plan], out_shape: Sequence[int], *, nearest: bool,
                       compute: torch.dtype = torch.float64, slab: int = 16,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Resample a channel-first 3-D tensor ``[C, X, Y, Z]`` along its axes, ``slab`` output slices (Z) at a time.

    Args:
        img: the input, any dtype and device; only one slab is converted at a time.
        plans: per axis, from :func:`_axis_plan`.
        out_shape: the output's spatial shape.
        nearest: nearest neighbour (keeps the dtype) instead of trilinear (computed in ``compute``, stored
            as float32, as MONAI's ``Spacing`` does).
        out: an optional preallocated output (any strides) of shape ``[C, *out_shape]`` on ``img``'s device.
    """
    shape = [int(s) for s in out_shape]
    if out is None:
        out = torch.empty((img.shape[0], *shape), dtype=img.dtype if nearest else torch.float32, device=img.device)
    zlo, zhi, zw = plans[2]
    for z0 in range(0, shape[2], slab):
        z1 = min(z0 + slab, shape[2])
        first, last = int(zlo[z0:z1].min()), int(zhi[z0:z1].max()) + 1
        block = img[..., first:last]
        if not nearest:
            block = block.to(compute)
        part = _lerp(block, 3, (zlo[z0:z1] - first, zhi[z0:z1] - first, zw[z0:z1]), nearest)
        del block
        part = _lerp(part, 2, plans[1], nearest)
        part = _lerp(part, 1, plans[0], nearest)
        out[..., z0:z1] = part
    return out


def _meta_without_affine(img: Any) -> dict[str, Any]:
    """The image's metadata less its affine (the new tensor gets its own)."""
    return {k: v for k, v in img.meta.items() if k != "affine"} if isinstance(img, MetaTensor) else {}


def _identity(xform: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int]) -> bool:
    return list(in_shape) == list(out_shape) and np.allclose(xform, np.eye(4), atol=_ATOL)


class BoundedSpacingd(MapTransform, InvertibleTransform):
    """``Spacingd`` (border padding, ``align_corners=False``) with memory bounded by the output plus one slab.

    Args:
        keys: keys of the images to resample.
        pixdim: output voxel size (mm) along the spatial axes (a value <= 0 keeps the input's).
        mode: "bilinear" (trilinear in 3-D) or "nearest", or one per key.
        dtype: the type trilinear sampling computes in (``Spacingd``'s default float64); the output is float32.
        slab: output slices computed at a time.
    """

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float] | float, mode: str | Sequence[str] = "bilinear",
                 dtype: Any = np.float64, slab: int = 16, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        bad = [m for m in self.mode if m not in _MODES]
        if bad:
            raise ValueError(f"BoundedSpacingd: mode must be 'bilinear' or 'nearest', not {bad[0]!r}")
        self.pixdim = np.atleast_1d(np.asarray(pixdim, dtype=np.float64))
        self.compute = torch.float64 if np.dtype(dtype if dtype is not None else np.float64) == np.float64 \
            else torch.float32
        self.slab = slab
        self._fallback = {m: Spacing(pixdim=pixdim, mode=m, padding_mode="border", dtype=dtype) for m in _MODES}

    def _target_affine(self, src: np.ndarray) -> np.ndarray:
        pixdim = np.asarray(self.pixdim[:3].tolist() + [self.pixdim[-1]] * (3 - len(self.pixdim[:3])),
                            dtype=np.float64)
        spacing = np.sqrt(np.sum(src[:3, :3] ** 2, axis=0))
        pixdim = np.where(pixdim <= 0, spacing, pixdim)  # as Spacing: a non-positive value keeps the input's
        return zoom_affine(src, pixdim, diagonal=False)

    def _resample(self, img: MetaTensor, mode: str) -> MetaTensor:
        if img.ndim != 4:
            raise ValueError(f"BoundedSpacingd expects a channel-first 3-D image, got shape {tuple(img.shape)}")
        src = to_affine_nd(3, img.affine.cpu().numpy().astype(np.float64))
        dst = self._target_affine(src)
        in_shape = [int(s) for s in img.shape[1:]]
        shape_out, offset = compute_shape_offset(in_shape, src, dst)
        out_shape = [int(s) for s in shape_out]
        dst[:3, -1] = offset[:3]
        xform = np.linalg.solve(src, dst)
        if not np.allclose(xform[:3, :3], np.diag(np.diag(xform[:3, :3])), atol=_ATOL):
            # rotated grids are not separable: MONAI's dense resampling (same result, more memory)
            out = self._fallback[mode](img)
            assert isinstance(out, MetaTensor)
            return out
        nearest = mode == "nearest"
        raw = img.as_tensor()
        if _identity(xform, in_shape, out_shape):  # already on the grid: a float32 copy, as Spacing returns
            data = raw.to(torch.float32, copy=True).contiguous()
        else:
            plans = [_axis_plan(xform, a, out_shape[a], in_shape[a], nearest) for a in range(3)]
            data = resample_separable(raw, plans, out_shape, nearest=nearest, compute=self.compute, slab=self.slab)
            if data.dtype != torch.float32:
                data = data.to(torch.float32)  # Spacing's output type, whatever the mode
        result = MetaTensor(data, affine=torch.as_tensor(dst, dtype=torch.float64), meta=_meta_without_affine(img),
                            applied_operations=list(img.applied_operations))
        result.meta["spatial_shape"] = np.asarray(out_shape)
        self.push_transform(result, orig_size=in_shape,
                            extra_info={"mode": mode, "src_affine": src, "dst_affine": dst})
        return result

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, mode in self.key_iterator(d, self.mode):
            img = d[key]
            if not isinstance(img, MetaTensor):
                raise TypeError(f"BoundedSpacingd: {key!r} must be a MetaTensor with an affine")
            d[key] = self._resample(img, mode)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            op = self.pop_transform(img)
            info = op["extra_info"]
            src = np.asarray(info["src_affine"], dtype=np.float64)
            here = (to_affine_nd(3, img.affine.cpu().numpy().astype(np.float64)) if isinstance(img, MetaTensor)
                    else np.asarray(info["dst_affine"], dtype=np.float64))
            back = np.linalg.solve(here, src)  # as MONAI's inverse computes it (same ties in nearest mode)
            orig = [int(s) for s in op["orig_size"]]
            nearest = info["mode"] == "nearest"  # Invertd(nearest_interp=True) rewrites "mode" to "nearest"
            raw = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            c = raw.shape[0]
            # laid out so that the label map, transposed to [k, j, i] by the runner, is already contiguous
            out = torch.empty_strided((c, *orig), (orig[0] * orig[1] * orig[2], 1, orig[0], orig[0] * orig[1]),
                                      dtype=raw.dtype if nearest else torch.float32, device=raw.device)
            cur = [int(s) for s in raw.shape[1:]]
            if _identity(back, cur, orig):
                out.copy_(raw)
            else:  # the way back: from the resampled grid (dst) to the input grid (src)
                plans = [_axis_plan(back, a, orig[a], cur[a], nearest) for a in range(3)]
                resample_separable(raw, plans, orig, nearest=nearest, compute=self.compute, slab=self.slab, out=out)
            meta = _meta_without_affine(img)
            meta["spatial_shape"] = np.asarray(orig)
            ops = list(img.applied_operations) if isinstance(img, MetaTensor) else []
            d[key] = MetaTensor(out, affine=torch.as_tensor(src, dtype=torch.float64), meta=meta,
                                applied_operations=ops)
        return d
