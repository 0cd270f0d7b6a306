"""The baseline of the race (benchmarks/race.py): a bare MONAI + highdicom script, as a hospital would write it.

    python -m benchmarks.bare_monai BUNDLE SERIES_DIR OUT_DIR [--device cpu]

Runs the bundle's own ``configs/inference.json`` unchanged (MONAI's ConfigParser: its preprocessing with
``LoadImaged`` reading the DICOM folder through MONAI's ``PydicomReader``, its inferer, its postprocessing
without ``SaveImaged``), then writes a DICOM SEG of the label map with highdicom, referencing the source
images. Prints one JSON line: wall time (imports included), time to the label map, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("series", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    import highdicom as hd
    import numpy as np
    import pydicom
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(args.bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(args.bundle)
    parser["device"] = f"$torch.device('{args.device}')"
    # no ITK here: MONAI's pydicom reader reads the series folder (the one line a bare script must add)
    parser["preprocessing#transforms#0#reader"] = "PydicomReader"
    post = [t for t in parser["postprocessing"]["transforms"] if "SaveImage" not in t["_target_"]]
    parser["postprocessing"]["transforms"] = post
    pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    postprocessing = parser.get_parsed_content("postprocessing")
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(args.bundle / "models" / "model.pt", map_location=args.device, weights_only=True))
    net = net.to(args.device).eval()
    data = pre({"image": str(args.series)})
    with torch.no_grad(), torch.autocast(device_type=args.device, enabled=args.device == "cuda"):
        data["pred"] = inferer(data["image"].unsqueeze(0).to(args.device), net)[0]
    data = postprocessing(data)
    labels = np.asarray(data["pred"].cpu())[0].astype(np.uint8)  # MONAI's array order, RAS affine
    t_model = time.perf_counter() - t0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(data["pred"].affine, dtype=np.float64)  # to LPS
    del data

    first = pydicom.dcmread(next(args.series.glob("*.dcm")), stop_before_pixels=True)
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    sources = sorted((pydicom.dcmread(p) for p in args.series.glob("*.dcm")),
                     key=lambda d: float(np.dot(np.asarray(d.ImagePositionPatient, dtype=np.float64), normal)))
    # the label map's axes put back in the source images' order: [slice (along the normal), row, column]
    axes, flips = [], []
    for direction in (normal, iop[3:], iop[:3]):
        cos = [float(np.dot(affine[:3, a], direction) / np.linalg.norm(affine[:3, a])) for a in range(3)]
        a = int(np.argmax(np.abs(cos)))
        axes.append(a)
        flips.append(cos[a] < 0)
    volume = labels.transpose(axes)
    for axis, flip in enumerate(flips):
        if flip:
            volume = np.flip(volume, axis)
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Spleen",
        segmented_property_category=hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("78961009", "SCT", "Spleen"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="spleen_ct_segmentation", version="bare", family=hd.sr.CodedConcept("123110", "DCM", "AI")))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.ascontiguousarray(volume), segmentation_type="BINARY",
        segment_descriptions=[desc], series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="bare", manufacturer_model_name="script", software_versions="0",
        device_serial_number="0")
    args.out.mkdir(parents=True, exist_ok=True)
    seg.save_as(args.out / "seg.dcm")
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": round(wall, 2), "model_s": round(t_model, 2),
                      "maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
