"""``preannot synth``: make the sample series and labelled cases for training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from node.devtools.synth.phantom import CaseGeometry, make_phantom
from node.devtools.synth.writer import write_case, write_series

app = typer.Typer(help="Generate synthetic chest CT series with known lesions (ground truth as DICOM SEG).",
                  no_args_is_help=True)

#: The seed of the series shipped in sample_dicom/ (chosen for a mix of lesion sizes and types).
SAMPLE_SEED = 20261122


@app.command("sample")
def sample(
    out: Annotated[Path, typer.Option(help="Output folder for the CT series")] = Path("sample_dicom"),
    seed: Annotated[int, typer.Option(help="Random seed")] = SAMPLE_SEED,
    slices: Annotated[int, typer.Option(help="Number of slices")] = 96,
    size: Annotated[int, typer.Option(help="Rows and columns")] = 256,
    lesions: Annotated[int, typer.Option(help="Number of lesions")] = 3,
    compress: Annotated[bool, typer.Option(help="RLE Lossless transfer syntax")] = False,
) -> None:
    """Write the demo series (one CT series, no ground truth beside it) and print its lesions."""
    geom = CaseGeometry(size=size, slices=slices, spacing_xy=360.0 / size)
    phantom = make_phantom(seed, geom, n_lesions=lesions)
    paths = write_series(phantom, out, seed=seed, compress=compress, patient_name="SYNTHETIC^DEMO",
                         patient_id="PREANNOT-DEMO")
    typer.echo(f"wrote {len(paths)} CT instances to {out}")
    for les in phantom.lesions:
        typer.echo(f"  lesion {les.index}: {les.kind}, {les.diameter_mm:.1f} mm, {les.volume_mm3:.0f} mm3, "
                   f"attached to {les.attached_to}, centre {tuple(round(c, 1) for c in les.center)}")


@app.command("cases")
def cases(
    out: Annotated[Path, typer.Option(help="Output folder: one sub-folder per case")],
    n: Annotated[int, typer.Option(help="Number of cases")] = 10,
    first_seed: Annotated[int, typer.Option(help="Seed of the first case; case i uses first_seed + i")] = 1000,
    slices: Annotated[int, typer.Option(help="Slices per case")] = 96,
    size: Annotated[int, typer.Option(help="Rows and columns")] = 256,
    compress: Annotated[bool, typer.Option(help="RLE Lossless transfer syntax")] = False,
) -> None:
    """Write labelled cases: image series + ground-truth SEG + ground_truth.json per case."""
    geom = CaseGeometry(size=size, slices=slices, spacing_xy=360.0 / size)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    with typer.progressbar(range(n), label="generating cases") as bar:
        for i in bar:
            seed = first_seed + i
            case_dir = out / f"case_{seed:05d}"
            if (case_dir / "ground_truth.json").exists():
                continue
            info = write_case(make_phantom(seed, geom), case_dir, seed=seed, compress=compress)
            index.append({"case": case_dir.name, "lesions": len(info["lesions"])})  # type: ignore[arg-type]
    (out / "cases.json").write_text(json.dumps(index, indent=2))
    typer.echo(f"wrote {n} cases to {out}")


@app.command("mammo")
def mammo(
    out: Annotated[Path, typer.Option(help="Output folder: one sub-folder per mammogram, and classes.csv")],
    n: Annotated[int, typer.Option(help="Number of mammograms (densities A-D in turn)")] = 8,
    first_seed: Annotated[int, typer.Option(help="Seed of the first; image i uses first_seed + i")] = 3000,
) -> None:
    """Write synthetic mammograms of known breast density (BI-RADS A-D) and classes.csv (the reference classes
    ``preannot evaluate`` reads)."""
    from node.devtools.synth.mammo import DENSITY_FRACTIONS, write_mammogram

    out.mkdir(parents=True, exist_ok=True)
    rows = ["series,class"]
    densities = sorted(DENSITY_FRACTIONS)
    for i in range(n):
        seed = first_seed + i
        density = densities[i % len(densities)]
        folder = f"mg_{seed:05d}"
        write_mammogram(out / folder, seed=seed, density=density, patient_id=f"SYNTH-MG-{seed}")
        rows.append(f"{folder},{density}")
    (out / "classes.csv").write_text("\n".join(rows) + "\n")
    typer.echo(f"wrote {n} mammograms and classes.csv to {out}")


@app.command("mr")
def mr(
    out: Annotated[Path, typer.Option(help="Output folder: one sub-folder per series, and truth.json")],
    seed: Annotated[int, typer.Option(help="Random seed (lesion places and sizes, noise)")] = 4100,
    lesions: Annotated[int, typer.Option(help="Number of tumours")] = 1,
    without: Annotated[list[str] | None, typer.Option(
        help="Leave out a series (T1, T1c, T2, FLAIR, localizer, DWI); repeatable")] = None,
) -> None:
    """Write a synthetic brain MR study: T1 sagittal, T1 after gadolinium axial, T2 coronal, FLAIR axial oblique,
    a three-plane localizer and a diffusion series of three b-values, one frame of reference, known tumours."""
    from node.devtools.synth.study import write_mr_study

    series = write_mr_study(out, seed=seed, lesions=lesions, without=tuple(without or ()))
    for s in series:
        typer.echo(f"  {s.folder.name}: {s.description} ({s.plane}, {s.files} images)")
    typer.echo(f"wrote {len(series)} series to {out} (lesions in {out / 'truth.json'})")


@app.command("phases")
def phases(
    out: Annotated[Path, typer.Option(help="Output folder: one sub-folder per phase, and truth.json")],
    seed: Annotated[int, typer.Option(help="Random seed")] = 5200,
    without: Annotated[list[str] | None, typer.Option(
        help="Leave out a phase (artery, vein, excret); repeatable")] = None,
) -> None:
    """Write a synthetic three-phase contrast CT of the abdomen (arterial, portal venous, excretory: three grids,
    one frame of reference)."""
    from node.devtools.synth.study import write_phase_study

    series = write_phase_study(out, seed=seed, without=tuple(without or ()))
    for s in series:
        typer.echo(f"  {s.folder.name}: {s.description} ({s.files} images)")
    typer.echo(f"wrote {len(series)} series to {out}")


@app.command("followup")
def followup(
    out: Annotated[Path, typer.Option(help="Output folder: one sub-folder per pair (prior/, current/, truth)")],
    n: Annotated[int, typer.Option(help="Number of pairs")] = 1,
    first_seed: Annotated[int, typer.Option(help="Seed of the first pair; pair i uses first_seed + i")] = 31,
    shift_mm: Annotated[float, typer.Option(help="Table shift between the two scans (mm)")] = -15.0,
    rotation_deg: Annotated[float, typer.Option(help="Rotation of the patient about the table axis (degrees)")] = 4.0,
    days: Annotated[int, typer.Option(help="Days between the two studies")] = 182,
    random_motion: Annotated[bool, typer.Option(
        help="Each pair its own motion, drawn from its seed: up to 5 degrees about each axis, a table shift of "
             "10 to 25 mm and up to 8 mm across (instead of --shift-mm and --rotation-deg)")] = False,
) -> None:
    """Write follow-up pairs: one phantom patient scanned twice (another frame of reference, the table shifted
    and the patient rotated; one lesion grown 40 %, one shrunk, one unchanged, one gone, one new), with the truth
    (truth.json, and a SEG per time point whose lesions keep their tracking UID)."""
    from node.devtools.synth.followup import make_followup_pair, write_followup_pair

    out.mkdir(parents=True, exist_ok=True)
    written = 0
    seed = first_seed
    with typer.progressbar(length=n, label="generating pairs") as bar:
        while written < n:
            rotation, shift = (2.0, 0.0, rotation_deg), (4.0, -3.0, shift_mm)
            if random_motion:
                import numpy as np

                rng = np.random.default_rng(seed)
                rotation = tuple(float(v) for v in rng.uniform(-5.0, 5.0, 3))  # type: ignore[assignment]
                shift = (float(rng.uniform(-8, 8)), float(rng.uniform(-8, 8)),
                         float(rng.choice([-1, 1]) * rng.uniform(10, 25)))
            try:
                pair = make_followup_pair(seed, rotation_deg=rotation, translation_mm=shift)
            except ValueError as exc:
                typer.echo(f"  seed {seed} skipped: {exc}", err=True)
                seed += 1
                continue
            pair.days = days
            write_followup_pair(pair, out / f"pair_{seed:05d}", seed=seed)
            written += 1
            seed += 1
            bar.update(1)
    typer.echo(f"wrote {written} pair(s) to {out}")
