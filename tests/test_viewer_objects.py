"""Outputs for viewers without SEG support, produced by a configured route: GSPS, burned-in secondary
captures, key object selection and RTSTRUCT; each validated with dciodvfy and checked for references."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from node.devtools.sink import StoreSink
from node.net.scu import send_files
from node.store.jobs import JobState
from tests.conftest import wait_for


def test_route_with_all_viewer_outputs(make_node: Callable[..., Any], small_series: Path, tmp_path: Path,
                                       dciodvfy: Callable[[Path], list[str]]) -> None:
    sink = StoreSink(tmp_path / "pacs", ae_title="SINK")
    try:
        node = make_node(sink_port=sink.port, stable=0.5, extra_outputs='["gsps", "sc", "kos", "rtstruct"]')
        files = sorted(small_series.glob("*.dcm"))
        assert all(o.ok for o in send_files([str(p) for p in files], ae_title="PREANNOT", host="127.0.0.1",
                                            port=node.listener.port, calling_ae="TESTSCU"))
        job = wait_for(lambda: node.store.list_jobs(state=JobState.DONE), 120, what="the job")[0]
        out = job.result.files
        assert {"seg", "sr", "gsps", "kos", "rtstruct"} <= set(out) and any(k.startswith("sc") for k in out)
        sources = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): dcmread(p, stop_before_pixels=True)
                   for p in files}
        study = next(iter(sources.values())).StudyInstanceUID
        for name, path in out.items():
            if name == "preview":
                continue
            assert dciodvfy(Path(path)) == [], name
            ds = dcmread(path)
            assert ds.StudyInstanceUID == study, name
            assert "UNVERIFIED" in ds.SeriesDescription, name
            eq = ds.ContributingEquipmentSequence[-1].PurposeOfReferenceCodeSequence[0]
            assert eq.CodeMeaning == "Processing Algorithm", name
        rois = job.result.findings
        gsps = dcmread(out["gsps"])
        refs = {r.ReferencedSOPInstanceUID for s in gsps.ReferencedSeriesSequence for r in s.ReferencedImageSequence}
        assert refs <= set(sources) and len(refs) == len({r.key_slice for r in rois})
        texts = [t.UnformattedTextValue for a in gsps.GraphicAnnotationSequence for t in a.TextObjectSequence]
        assert all("UNVERIFIED" in t for t in texts) and len(texts) == len(rois)
        caps = [dcmread(v) for k, v in out.items() if k.startswith("sc")]
        for sc in caps:
            assert sc.BurnedInAnnotation == "YES" and list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
            assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in sources
            banner = sc.pixel_array[:3, :, 0].astype(int)
            assert banner.mean() > 120  # the red banner is burned in
        kos = dcmread(out["kos"])
        assert kos.ConceptNameCodeSequence[0].CodeMeaning == "Of Interest"
        evidence = {i.ReferencedSOPInstanceUID for s in kos.CurrentRequestedProcedureEvidenceSequence
                    for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
        assert evidence & set(sources) and dcmread(out["seg"]).SOPInstanceUID in evidence
        rt = dcmread(out["rtstruct"])
        assert len(rt.StructureSetROISequence) == len(rois)
        for rc in rt.ROIContourSequence:
            for c in rc.ContourSequence:
                assert c.ContourImageSequence[0].ReferencedSOPInstanceUID in sources
                pts = np.array(c.ContourData, dtype=float).reshape(-1, 3)
                z = float(sources[c.ContourImageSequence[0].ReferencedSOPInstanceUID].ImagePositionPatient[2])
                assert np.allclose(pts[:, 2], z)  # each contour lies on its slice
        n = len([k for k in out if k != "preview"])
        wait_for(lambda: len(sink.received) == n, 60, what="all objects at the destination")
    finally:
        sink.stop()
