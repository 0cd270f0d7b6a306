"""Rigid registration of a follow-up series to its prior (SimpleITK), with its quality checked.

CT is aligned on its HU, any other modality on its values scaled between their percentiles (MR has no absolute
scale). The two series are in different frames of reference and the patient lies differently, so their patient
coordinates say nothing about each other: the prior is aligned to the follow-up by intensity, a 6-parameter Euler
transform started from the two bodies' centres of mass: first Mattes mutual information on 8 and 4 mm voxels
(regular-step gradient descent), then the correlation on 2.5 mm voxels (conjugate gradient with a line search),
the refinement kept only when it correlates better. The refinement is what makes a sagittal 2 mm head MR moved by
5 degrees come out within 0.2 mm instead of 5 mm (the first stage alone stops early there; tests/test_followup.py).
The result is checked before anything is matched: the normalised cross-correlation of the two series over the
body after alignment must reach ``min_ncc`` and the rotation stay within ``max_rotation_deg``. A registration that
fails either gives no alignment, and the follow-up says so instead of matching findings at random.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from node.errors import PreannotError
from node.imaging.volume import Volume

__all__ = ["Alignment", "RegistrationError", "register"]

logger = logging.getLogger(__name__)

#: CT values outside this window carry no structure a rigid alignment needs (HU)
_WINDOW = (-1000.0, 1000.0)


class RegistrationError(PreannotError):
    """The prior could not be aligned to the follow-up (or the alignment failed its quality check)."""


@dataclass(frozen=True, slots=True)
class Alignment:
    """Prior patient coordinates -> follow-up patient coordinates: ``p_current = rotation @ p_prior + translation``."""

    rotation: np.ndarray
    translation: np.ndarray
    #: normalised cross-correlation of the two series over the body: before (centres of mass only) and after
    ncc_before: float
    ncc: float
    rotation_deg: float
    seconds: float

    def to_current(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) prior patient points -> follow-up patient points (mm)."""
        p = np.atleast_2d(np.asarray(points, dtype=np.float64))
        return p @ self.rotation.T + self.translation

    def describe(self) -> dict[str, float | list[float]]:
        return {"ncc_before": round(self.ncc_before, 4), "ncc": round(self.ncc, 4),
                "rotation_deg": round(self.rotation_deg, 2),
                "translation_mm": [round(float(v), 2) for v in self.translation], "seconds": round(self.seconds, 2)}


def _normalised(volume: Volume) -> np.ndarray:
    """The volume's values in the window the alignment works in: CT's own HU, clipped to [-1000, 1000]; any other
    modality (MR's arbitrary units) mapped linearly from its 0.5th..99.5th percentiles onto that window, so that the
    background lies near -1000 and the body threshold below (-500) means the same."""
    pixels = np.asarray(volume.pixels, dtype=np.float32)
    if volume.modality == "CT":
        return np.clip(pixels, *_WINDOW)
    sample = pixels[::2, ::4, ::4]
    lo, hi = (float(v) for v in np.percentile(sample[np.isfinite(sample)], [0.5, 99.5]))
    scaled = (pixels - lo) / max(hi - lo, 1e-6)
    return np.clip(scaled * 2000.0 - 1000.0, *_WINDOW).astype(np.float32)


def _image(volume: Volume) -> sitk.Image:
    """The volume as a SimpleITK image in patient coordinates (LPS, as ITK's)."""
    pixels = _normalised(volume)
    img = sitk.GetImageFromArray(pixels)  # [k, j, i] -> ITK (i, j, k)
    axes = volume.affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in volume.affine[:3, 3]])
    img.SetDirection([float(v) for v in (axes / spacing).ravel()])
    return img


def _shrunk(img: sitk.Image, target_mm: float = 4.0) -> sitk.Image:
    """``img`` smoothed and resampled to about ``target_mm`` voxels (registration and quality need no more)."""
    spacing = np.array(img.GetSpacing())
    factors = [max(round(target_mm / s), 1) for s in spacing]
    return sitk.Shrink(sitk.SmoothingRecursiveGaussian(img, target_mm / 2.0), factors)


def _ncc(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Normalised cross-correlation over the voxels where either image holds the body (> -500 HU)."""
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, _WINDOW[0])
    a = sitk.GetArrayViewFromImage(fixed).astype(np.float64)
    b = sitk.GetArrayViewFromImage(warped).astype(np.float64)
    body = (a > -500.0) | (b > -500.0)
    if body.sum() < 100:
        return 0.0
    a, b = a[body] - a[body].mean(), b[body] - b[body].mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denom) if denom else 0.0


#: the voxel size of the refinement (mm)
_FINE_MM = 2.5


def _refine(fixed: sitk.Image, moving: sitk.Image, start: sitk.Euler3DTransform, seed: int
            ) -> sitk.Euler3DTransform | None:
    """``start`` refined by the correlation metric on finer images (None when the optimiser fails)."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsConjugateGradientLineSearch(learningRate=1.0, numberOfIterations=25,
                                                  convergenceMinimumValue=1e-7, convergenceWindowSize=5,
                                                  lineSearchLowerLimit=0.0, lineSearchUpperLimit=3.0,
                                                  lineSearchEpsilon=0.05, lineSearchMaximumIterations=8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(sitk.Euler3DTransform(start), inPlace=False)
    try:
        found = reg.Execute(fixed, moving)
    except RuntimeError as exc:
        logger.info("registration refinement skipped: %s", exc)
        return None
    return sitk.Euler3DTransform(sitk.CompositeTransform(found).GetNthTransform(0)) \
        if isinstance(found, sitk.CompositeTransform) else sitk.Euler3DTransform(found)


def register(prior: Volume, current: Volume, *, min_ncc: float = 0.7, max_rotation_deg: float = 20.0,
             seed: int = 20261206) -> Alignment:
    """Align ``prior`` to ``current`` (rigid).

    Raises:
        RegistrationError: the optimiser failed, or the alignment failed its quality check (the message gives the
            figures).
    """
    t0 = time.perf_counter()
    fixed_img, moving_img = _image(current), _image(prior)
    fixed, moving = _shrunk(fixed_img), _shrunk(moving_img)
    body_f = sitk.Cast(fixed > -500.0, sitk.sitkUInt8)
    body_m = sitk.Cast(moving > -500.0, sitk.sitkUInt8)
    try:
        initial = sitk.CenteredTransformInitializer(body_f, body_m, sitk.Euler3DTransform(),
                                                    sitk.CenteredTransformInitializerFilter.MOMENTS)
    except RuntimeError as exc:
        raise RegistrationError(f"no body to align in one of the series: {exc}") from exc
    ncc_before = _ncc(fixed, moving, initial)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=48)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=300,
                                                 relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=False)
    try:
        found = reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise RegistrationError(f"the registration did not converge: {exc}") from exc
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(found).GetNthTransform(0)) \
        if isinstance(found, sitk.CompositeTransform) else sitk.Euler3DTransform(found)
    ncc = _ncc(fixed, moving, euler)
    # refined on a finer grid with the correlation metric (the same protocol at two time points: their values are
    # linearly related); kept only when it correlates better, so a refinement that wanders never makes it worse
    fine_f, fine_m = _shrunk(fixed_img, _FINE_MM), _shrunk(moving_img, _FINE_MM)
    refined = _refine(fine_f, fine_m, euler, seed)
    if refined is not None and _ncc(fine_f, fine_m, refined) > _ncc(fine_f, fine_m, euler):
        euler, ncc = refined, _ncc(fixed, moving, refined)
    # ``euler`` maps follow-up points to prior points; its inverse carries the prior's findings over
    m = np.array(euler.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.array(euler.GetCenter(), dtype=np.float64)
    t = np.array(euler.GetTranslation(), dtype=np.float64)
    # p_prior = m (p_cur - c) + c + t  ->  p_cur = m^T (p_prior - c - t) + c
    rotation = m.T
    translation = c - m.T @ (c + t)
    angle = math.degrees(math.acos(max(-1.0, min(1.0, (float(np.trace(m)) - 1.0) / 2.0))))
    seconds = time.perf_counter() - t0
    alignment = Alignment(rotation, translation, ncc_before, ncc, angle, seconds)
    logger.info("registration: NCC %.3f -> %.3f, rotation %.1f deg, translation %s mm, %.1f s", ncc_before, ncc,
                angle, np.round(translation, 1).tolist(), seconds)
    if ncc < min_ncc:
        raise RegistrationError(f"the aligned series correlate poorly (NCC {ncc:.2f} < {min_ncc:.2f}; before "
                                f"alignment {ncc_before:.2f}): not the same body region, or too different to align")
    if angle > max_rotation_deg:
        raise RegistrationError(f"the alignment rotates the patient by {angle:.0f} degrees (more than "
                                f"{max_rotation_deg:.0f}): not trusted")
    return alignment
