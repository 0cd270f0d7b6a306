"""Results for viewers that cannot show a SEG: presentation state, burned-in captures, key images, RTSTRUCT.

Each is a new series in the source study, marked as an unverified AI pre-annotation, with the IHE AIR
Contributing Equipment item and the algorithm named in its description:

- ``gsps``: Grayscale Softcopy Presentation State with, on each ROI's key slice, the outline, the
  long axis and a short text ("AI Nodule 1: 17.6 mm, 3164 mm3 - UNVERIFIED"), lung window;
- ``sc``: Secondary Capture images of the key slices (RGB), outline burned in, banner
  "AI pre-annotation - not validated", ImageType DERIVED\\SECONDARY, BurnedInAnnotation YES;
- ``kos``: Key Object Selection (IHE Key Image Note, title "Of Interest") referencing the key slices;
- ``rtstruct``: RT Structure Set with one ROI per finding, closed planar contours on every slice.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage
from scipy import ndimage

from node.errors import OutputError
from node.imaging.volume import Volume, display_window
from node.inference.contour import mask_outline
from node.inference.registry import ModelCard
from node.inference.rois import ROI
from node.outputs.equipment import Provenance, new_uid

__all__ = ["EXTRA_OUTPUTS", "build_capture", "build_gsps", "build_kos", "build_rtstruct"]

EXTRA_OUTPUTS = ("gsps", "sc", "kos", "rtstruct")
BANNER = "AI pre-annotation - not validated"


def _label(roi: ROI) -> str:
    return f"AI {roi.label_name} {roi.index}: {roi.diameter_inplane_mm:.1f} mm, {roi.volume_mm3:.0f} mm3 - UNVERIFIED"


def _key_sources(volume: Volume, rois: Sequence[ROI]) -> list[tuple[int, Dataset]]:
    """(slice index, source dataset) of each distinct key slice, in slice order."""
    ks = sorted({r.key_slice for r in rois})
    return [(k, volume.sources[volume.frames[k].source]) for k in ks]


def build_gsps(volume: Volume, rois: Sequence[ROI], provenance: Provenance, *,
               series_number: int) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """Outlines, long axes and labels on the key slices (units PIXEL), with a lung window."""
    if not rois:
        raise OutputError("a presentation state needs at least one ROI")
    if any(volume.frames[r.key_slice].frame is not None for r in rois):
        raise OutputError("presentation states over multi-frame sources are not supported")
    layer = hd.pr.GraphicLayer(layer_name="AI_ROI", order=1, description="AI pre-annotation (unverified)",
                               display_color=hd.color.CIELabColor.from_rgb(255, 64, 64))
    annotations = []
    for k, src in _key_sources(volume, rois):
        graphics, texts = [], []
        for r in (r for r in rois if r.key_slice == k):
            outline = np.array(r.key_outline_ij, dtype=np.float64) + 0.5
            if len(outline) >= 4:
                graphics.append(hd.pr.GraphicObject(graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                                                    graphic_data=outline, units=hd.pr.AnnotationUnitsValues.PIXEL))
            axis = np.array(r.key_axis_ij, dtype=np.float64) + 0.5
            if not np.allclose(axis[0], axis[1]):
                graphics.append(hd.pr.GraphicObject(graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                                                    graphic_data=axis, units=hd.pr.AnnotationUnitsValues.PIXEL))
            x = float(min(max(outline[:, 0].max() + 4, 1), int(src.Columns) - 1)) if len(outline) else 10.0
            y = float(min(max(outline[:, 1].min(), 1), int(src.Rows) - 1)) if len(outline) else 10.0
            texts.append(hd.pr.TextObject(text_value=_label(r)[:64], units=hd.pr.AnnotationUnitsValues.PIXEL,
                                          anchor_point=(x, y), anchor_point_visible=True))
        annotations.append(hd.pr.GraphicAnnotation(referenced_images=[src], graphic_layer=layer,
                                                   graphic_objects=graphics or None, text_objects=texts))
    refs = [src for _, src in _key_sources(volume, rois)]
    voi = hd.pr.SoftcopyVOILUTTransformation(window_center=-600.0, window_width=1500.0) \
        if volume.modality == "CT" else None
    try:
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=refs, series_instance_uid=new_uid(provenance.uid_root), series_number=series_number,
            sop_instance_uid=new_uid(provenance.uid_root), instance_number=1, manufacturer=provenance.manufacturer,
            manufacturer_model_name=provenance.model.name[:64],
            software_versions=provenance.software_versions(),  # type: ignore[arg-type]
            device_serial_number=provenance.device_serial_number, content_label="AI_UNVERIFIED",
            content_description="AI pre-annotation, not verified"[:64], graphic_layers=[layer],
            graphic_annotations=annotations, voi_lut_transformations=[voi] if voi else None,
            institution_name=provenance.institution_name)
    except (ValueError, TypeError) as exc:
        raise OutputError(f"highdicom refused the presentation state: {exc}") from exc
    gsps.SeriesDescription = provenance.series_description("GSPS")
    gsps.Laterality = ""  # General Series, Type 2C: the chest is not a paired structure
    provenance.stamp(gsps)
    return gsps


def _orientation_letters(vector: np.ndarray) -> str:
    letters = [("L", "R"), ("P", "A"), ("H", "F")]
    out = ""
    for axis in np.argsort(-np.abs(vector)):
        if abs(vector[axis]) > 0.3:
            out += letters[axis][0] if vector[axis] > 0 else letters[axis][1]
    return out[:3] or "L"


def _render(volume: Volume, labels: np.ndarray, k: int, rois: Sequence[ROI]) -> np.ndarray:
    """RGB uint8 image of slice k with the outlines burned in and the banner on top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows, cols = volume.pixels.shape[1:]
    lo, hi = display_window(volume.pixels[k], volume.modality)
    fig = Figure(figsize=(cols / 100, rows / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(volume.pixels[k], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    if labels[k].any():
        ax.contour(labels[k] > 0, levels=[0.5], colors=["#ff2020"], linewidths=1.0)
    for r in (r for r in rois if r.key_slice == k):
        (x0, y0), (x1, y1) = r.key_axis_ij
        ax.plot([x0, x1], [y0, y1], color="#ffd000", linewidth=0.8)
        ax.text(min(x1, x0), max(y0, y1) + 6, f"{r.label_name} {r.index}: {r.diameter_inplane_mm:.1f} mm",
                color="#ffd000", fontsize=max(cols / 70, 5), va="top")
    ax.add_patch(Rectangle((-0.5, -0.5), cols, rows * 0.07, color="#b00000"))
    ax.text(cols / 2, rows * 0.035, BANNER, color="white", ha="center", va="center", fontsize=max(cols / 40, 6),
            fontweight="bold")
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.axis("off")
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[:rows, :cols, :3])


def build_capture(volume: Volume, labels: np.ndarray, rois: Sequence[ROI], provenance: Provenance, *,
                  series_number: int) -> list[hd.sc.SCImage]:
    """One Secondary Capture (RGB, burned-in outline and banner) per key slice, in a new series."""
    if not rois:
        raise OutputError("burned-in captures need at least one ROI")
    series_uid = new_uid(provenance.uid_root)
    out = []
    for n, (k, src) in enumerate(_key_sources(volume, rois), start=1):
        rgb = _render(volume, labels, k, rois)
        iop = np.array([float(v) for v in src.ImageOrientationPatient])
        orientation = (_orientation_letters(iop[:3]), _orientation_letters(iop[3:]))
        spacing = tuple(float(v) for v in src.PixelSpacing)
        try:
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=src, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
                coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=series_number,
                sop_instance_uid=new_uid(provenance.uid_root), instance_number=n,
                manufacturer=provenance.manufacturer, pixel_spacing=spacing,  # type: ignore[arg-type]
                patient_orientation=orientation, transfer_syntax_uid=ExplicitVRLittleEndian)
        except (ValueError, TypeError) as exc:
            raise OutputError(f"highdicom refused the secondary capture: {exc}") from exc
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.Laterality = ""  # General Series, Type 2C
        sc.BurnedInAnnotation = "YES"
        sc.SeriesDescription = provenance.series_description("CAPTURE")
        sc.DerivationDescription = f"{BANNER}; {provenance.model.name} {provenance.model.version}"[:1024]
        sc.ImageComments = BANNER
        src_ref = Dataset()
        src_ref.ReferencedSOPClassUID = src.SOPClassUID
        src_ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        sc.SourceImageSequence = [src_ref]
        provenance.stamp(sc)
        out.append(sc)
    return out


def build_kos(volume: Volume, rois: Sequence[ROI], provenance: Provenance, *, series_number: int,
              also: Sequence[Dataset] = ()) -> hd.ko.KeyObjectSelectionDocument:
    """IHE Key Image Note: the key slices (and the given result objects) as "Of Interest"."""
    if not rois:
        raise OutputError("a key object selection needs at least one ROI")
    refs = [src for _, src in _key_sources(volume, rois)]
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=provenance.device_uid or new_uid(provenance.uid_root),
                                                       name="preannot", model_name=provenance.model.name[:64])
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=codes.DCM.OfInterest, referenced_objects=[*refs, *also],
            observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                          observer_identifying_attributes=device),
            description=f"AI pre-annotation (unverified): key images of {len(rois)} finding(s), "
                        f"{provenance.model.name} {provenance.model.version}")
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=[*refs, *also], content=content, series_instance_uid=new_uid(provenance.uid_root),
            series_number=series_number, sop_instance_uid=new_uid(provenance.uid_root), instance_number=1,
            manufacturer=provenance.manufacturer, institution_name=provenance.institution_name)
    except (ValueError, TypeError) as exc:
        raise OutputError(f"highdicom refused the key object selection: {exc}") from exc
    kos.SeriesDescription = provenance.series_description("KEY IMAGES")
    provenance.stamp(kos)
    return kos


def build_rtstruct(volume: Volume, rois: Sequence[ROI], card: ModelCard, provenance: Provenance, *,
                   series_number: int) -> Dataset:
    """RT Structure Set: one ROI per finding, CLOSED_PLANAR contours (patient mm) on each slice it covers."""
    if not rois:
        raise OutputError("an RT structure set needs at least one ROI")
    if any(f.frame is not None for f in volume.frames):
        raise OutputError("RTSTRUCT over multi-frame sources is not supported")
    first = volume.sources[0]
    now = _dt.datetime.now()
    ds = Dataset()
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
               "SpecificCharacterSet"):
        if kw in first:
            setattr(ds, kw, first.data_element(kw).value)  # type: ignore[union-attr]
        elif kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
            setattr(ds, kw, "")
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = new_uid(provenance.uid_root)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = new_uid(provenance.uid_root)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = provenance.series_description("RTSTRUCT")
    ds.OperatorsName = ""
    ds.Manufacturer = provenance.manufacturer
    ds.ManufacturerModelName = provenance.model.name[:64]
    ds.SoftwareVersions = provenance.software_versions()
    ds.DeviceSerialNumber = provenance.device_serial_number
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "AI_UNVERIFIED"
    ds.StructureSetName = f"{provenance.model.name}"[:64]
    ds.StructureSetDescription = f"AI pre-annotation, NOT VERIFIED - {provenance.model.name} {provenance.model.version}"
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    ds.ApprovalStatus = "UNAPPROVED"
    for_uid = str(first.FrameOfReferenceUID)
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    contour_images = []
    for src in volume.sources:
        ci = Dataset()
        ci.ReferencedSOPClassUID = src.SOPClassUID
        ci.ReferencedSOPInstanceUID = src.SOPInstanceUID
        contour_images.append(ci)
    rt_series = Dataset()
    rt_series.SeriesInstanceUID = first.SeriesInstanceUID
    rt_series.ContourImageSequence = contour_images
    rt_study = Dataset()
    rt_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired), as required
    rt_study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    rt_study.RTReferencedSeriesSequence = [rt_series]
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = for_uid
    ref_for.RTReferencedStudySequence = [rt_study]
    ds.ReferencedFrameOfReferenceSequence = [ref_for]
    roi_seq, contour_seq, obs_seq = [], [], []
    for r in rois:
        spec = card.label(r.label)
        item = Dataset()
        item.ROINumber = r.index
        item.ReferencedFrameOfReferenceUID = for_uid
        item.ROIName = f"AI {r.label_name} {r.index}"[:64]
        item.ROIDescription = f"{_label(r)}"[:1024]
        item.ROIGenerationAlgorithm = "AUTOMATIC"
        item.ROIGenerationDescription = f"{provenance.model.name} {provenance.model.version} "\
                                        f"sha256:{provenance.model.sha256[:16]}"[:64]
        roi_seq.append(item)
        contours = []
        assert r.mask is not None
        k0, j0, i0 = r.offset
        for kk in range(r.mask.shape[0]):
            plane = r.mask[kk]
            if not plane.any():
                continue
            comp, n = ndimage.label(plane)
            src = volume.sources[volume.frames[k0 + kk].source]
            for c in range(1, n + 1):
                pts = mask_outline(comp == c)[:-1]  # CLOSED_PLANAR: the closing point is implied
                if len(pts) < 3:
                    continue
                ijk = np.array([[x + i0, y + j0, k0 + kk] for x, y in pts], dtype=np.float64)
                xyz = volume.voxel_to_patient(ijk)
                cont = Dataset()
                ci = Dataset()
                ci.ReferencedSOPClassUID = src.SOPClassUID
                ci.ReferencedSOPInstanceUID = src.SOPInstanceUID
                cont.ContourImageSequence = [ci]
                cont.ContourGeometricType = "CLOSED_PLANAR"
                cont.NumberOfContourPoints = len(xyz)
                cont.ContourData = [f"{v:.3f}" for v in xyz.ravel()]
                contours.append(cont)
        rc = Dataset()
        rc.ReferencedROINumber = r.index
        rc.ROIDisplayColor = list(spec.color) if spec else [255, 64, 64]
        rc.ContourSequence = DicomSequence(contours)
        contour_seq.append(rc)
        obs = Dataset()
        obs.ObservationNumber = r.index
        obs.ReferencedROINumber = r.index
        obs.RTROIInterpretedType = "CONTROL"
        obs.ROIInterpreter = ""
        obs.ROIObservationLabel = "AI UNVERIFIED"
        obs_seq.append(obs)
    ds.StructureSetROISequence = roi_seq
    ds.ROIContourSequence = contour_seq
    ds.RTROIObservationsSequence = obs_seq
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    provenance.stamp(ds)
    return ds
