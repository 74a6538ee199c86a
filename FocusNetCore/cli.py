"""The ``focusnet`` command line: a thin layer over the Python API.

Exit codes: 0 success, 1 internal failure, 2 bad usage or bad input.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


def _phantom_variation(args, seed: int):
    from dataclasses import replace

    from .phantom import Variation

    variation = Variation.random(seed) if args.variation == "random" else Variation()
    given = {"pose": tuple(args.pose) if args.pose else None, "slice_mm": args.slice_mm, "pixel_mm": args.pixel_mm,
             "metal": args.metal or None, "z_range": tuple(args.scan_range) if args.scan_range else None,
             "fov_mm": args.fov_mm}
    return replace(variation, **{k: v for k, v in given.items() if v is not None})


def _cmd_phantom(args) -> int:
    from .phantom import NOISE_HU, generate_case, write_case

    out = Path(args.out)
    for k in range(args.n):
        seed = args.seed + k
        start = time.perf_counter()
        try:
            variation = _phantom_variation(args, seed).check()
        except ValueError as error:
            print(f"focusnet phantom: error: {error}", file=sys.stderr)
            return 2
        case = generate_case(seed, size=args.size, noise=tuple(args.noise) if args.noise else NOISE_HU,
                             variation=variation)
        paths = write_case(case, out, args.format, overwrite=args.overwrite)
        print(f"{case.name}: {case.image.GetSize()} voxels at "
              f"{tuple(round(s, 3) for s in case.image.GetSpacing())} mm, "
              f"{time.perf_counter() - start:.1f} s -> {paths[0]}")
    return EXIT_OK


def _cmd_demo(args) -> int:
    """The main job on its embedded default: a phantom CT segmented by the
    embedded model, with pictures and an evaluation against the phantom's
    ground truth. Offline; replaces its own earlier output in --out."""
    import json

    import SimpleITK as sitk

    from .evaluate import evaluate
    from .imageio import atomic_output
    from .organs import convert_labels
    from .phantom import PHANTOM_SET, generate_case, write_case
    from .preview import save_overlay
    from .segfile import write_seg_nrrd
    from .segment import EMBEDDED_MODEL, Segmenter

    out = Path(args.out)
    model = Path(args.model) if args.model else EMBEDDED_MODEL
    print(f"FocusNet demo: writing to {out.resolve()}")
    case = generate_case(args.seed, size=args.size, name="demo_case")
    written = write_case(case, out / "ground_truth", "nrrd", overwrite=True)
    print(f"  phantom CT {case.image.GetSize()} voxels at {tuple(round(v, 3) for v in case.image.GetSpacing())} mm "
          f"(synthetic; seed {args.seed})")
    segmenter = Segmenter(model, device=args.device, precision=args.precision)
    info = segmenter.model_info
    print(f"  model: {info['name']} ({model.name}); intended use: {info['intended_use'] or 'not stated'}")
    progress = _ProgressPrinter("text", "demo_case", 0, 1)
    result = segmenter.segment(case.image, progress=progress)
    organs = segmenter.config.organs
    written.append(write_seg_nrrd(result.labels, organs, out / "demo_case.seg.nrrd", overwrite=True))
    with atomic_output(out / "demo_case.report.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps({"input": "phantom seed %d" % args.seed, **result.report()}, indent=2))
    written.append(out / "demo_case.report.json")
    truth, _ = convert_labels(sitk.GetArrayViewFromImage(case.labels), PHANTOM_SET, organs)
    truth_image = sitk.GetImageFromArray(truth)
    truth_image.CopyInformation(case.labels)
    for name, labels, title in (("segmentation", result.labels, f"FocusNet ({info['name']})"),
                                ("ground_truth", truth_image, "phantom ground truth")):
        written.append(save_overlay(case.image, labels, organs, out / f"demo_case_{name}.png",
                                    point=case.landmarks["chiasm"], title=title, overwrite=True))
    rows, tables = evaluate(out, out / "ground_truth", organs.key, out)
    written.extend(tables)
    dice = {r["organ"]: r["dice"] for r in rows}
    small = [dice[n] for n in organs.small_names if n in dice]
    print(f"  segmented in {result.timings['total']:.1f} s on {result.device}: mean Dice {sum(dice.values()) / len(dice):.3f}"
          f" over {len(dice)} organs, {sum(small) / max(len(small), 1):.3f} over the small organs")
    for path in written:
        print(f"  wrote {path}")
    print("Open ground_truth/demo_case_ct.nrrd and demo_case.seg.nrrd in 3D Slicer (File > Add Data): the "
          "segments carry TG-263 names, colours and SNOMED CT terminology.")
    return EXIT_OK


class _ProgressPrinter:
    """``--progress json``: one JSON object per line on stdout (the protocol
    the Slicer module reads); otherwise short human-readable lines on stderr."""

    def __init__(self, mode: str, case: str, index: int, total: int):
        self.mode, self.case, self.index, self.total = mode, case, index, total
        self.last = None

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        import json

        overall = (self.index + fraction) / self.total
        if self.mode == "json":
            print(json.dumps({"stage": stage, "fraction": round(fraction, 4), "overall": round(overall, 4),
                              "case": self.case, "message": message}), flush=True)
        elif stage != self.last:
            print(f"[{self.index + 1}/{self.total}] {self.case}: {message}", file=sys.stderr, flush=True)
        self.last = stage


def _segment_inputs(inputs) -> list:
    """Each INPUT is a volume file, a DICOM series folder, or a folder of cases."""
    from .imageio import ImageReadError, find_volumes, scan_dicom_folder

    cases = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file():
            cases.append(path)
        elif path.is_dir():
            volumes = find_volumes(path)
            subfolders = sorted(p for p in path.iterdir() if p.is_dir())
            if volumes:
                cases.extend(volumes)
            elif any(True for f in path.iterdir() if f.is_file() and f.suffix.lower() in (".dcm", "")) and \
                    scan_dicom_folder(path):
                cases.append(path)
            elif subfolders:
                cases.extend(subfolders)
            else:
                raise ImageReadError(path, "folder holds no volume files, DICOM series or case folders")
        else:
            raise ImageReadError(path, "no such file or folder")
    return cases


SEGMENT_FORMATS = {"seg.nrrd": ".seg.nrrd", "nifti": ".nii.gz", "nrrd": ".nrrd", "rtstruct": ".rtstruct.dcm",
                   "dicomseg": ".seg.dcm"}  # --format -> the file's suffix


def _segment_formats(text: str) -> Tuple[str, ...]:
    """``segment --format``: one format or several joined by commas, each once."""
    formats = tuple(f.strip() for f in text.split(","))
    unknown = [f for f in formats if f not in SEGMENT_FORMATS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown format {', '.join(map(repr, unknown))} "
                                         f"(choose from {', '.join(SEGMENT_FORMATS)}, or several joined by commas)")
    if len(set(formats)) != len(formats):
        raise argparse.ArgumentTypeError(f"{text!r} names a format twice")
    return formats


def _cmd_segment(args) -> int:
    import json

    from .caseid import identity_of_input, stamp
    from .imageio import ImageReadError, OutputExistsError, atomic_output, case_name
    from .segment import Segmenter

    out = Path(args.out)
    cases = _segment_inputs(args.input)
    segmenter = Segmenter(args.model, device=args.device, precision=args.precision, backend=args.backend)
    formats = tuple(args.format)
    dicom_only = [f for f in formats if f in ("rtstruct", "dicomseg")]
    status = EXIT_OK
    for index, case in enumerate(cases):
        name = case_name(case)
        targets = {f: out / f"{name}{SEGMENT_FORMATS[f]}" for f in formats}
        report_path = out / f"{name}.report.json"
        progress = _ProgressPrinter(args.progress, name, index, len(cases))
        try:
            for path in (*targets.values(), report_path):
                if path.exists() and not args.overwrite:
                    raise OutputExistsError(path)
            if dicom_only and not Path(case).is_dir():
                raise ImageReadError(case, f"--format {','.join(dicom_only)} needs a DICOM CT series as input "
                                     "(the DICOM object must reference its images)")
            result = segmenter.segment(case, progress=progress)
            organs = segmenter.config.organs
            identity = identity_of_input(case)  # the case the contours belong to: in the files and the report
            stamp(result.labels, identity)
            for kind, target in targets.items():
                progress("write", 0.95, f"writing {target}")
                _write_segmentation(kind, result.labels, case, organs, target, args.overwrite, segmenter, out, name)
            first = next(iter(targets.values()))
            report = {"input": str(case), "output": str(first), "outputs": [str(t) for t in targets.values()],
                      "case": identity.to_dict(), **result.report()}
            with atomic_output(report_path, overwrite=args.overwrite) as tmp:
                tmp.write_text(json.dumps(report, indent=2))
            progress("done", 1.0, f"wrote {', '.join(map(str, targets.values()))}")
            if result.outside_scan:
                print(f"focusnet segment: {name}: not in the scan (judged from where the other organs lie; not "
                      f"drawn): {', '.join(result.outside_scan)}", file=sys.stderr, flush=True)
        except (ImageReadError, OutputExistsError) as error:
            status = max(status, EXIT_BAD_INPUT)
            _report_failure(args, name, str(error))
        except Exception as error:  # one case failing must not stop the others
            status = EXIT_INTERNAL
            _report_failure(args, name, f"internal error: {type(error).__name__}: {error}")
    return status


def _write_segmentation(kind: str, labels, case, organs, target: Path, overwrite: bool, segmenter, out: Path,
                        name: str) -> None:
    """One of ``segment``'s output files (``kind``: a --format) from the labels."""
    from .imageio import write_image
    from .segfile import write_label_table, write_seg_nrrd

    if kind == "seg.nrrd":
        write_seg_nrrd(labels, organs, target, overwrite=overwrite)
    elif kind == "rtstruct":
        from .rtstruct import write_rtstruct

        write_rtstruct(labels, case, organs, target, overwrite=overwrite)
    elif kind == "dicomseg":
        from .dicomseg import write_dicom_seg

        model = segmenter.model_info
        write_dicom_seg(labels, case, organs, target, overwrite=overwrite, model_name=model["name"],
                        model_version=model["code_version"] or "")
    else:
        write_image(labels, target, overwrite=overwrite)
        write_label_table(organs, out / f"{name}.labels.json", overwrite=True)


def _report_failure(args, case: str, message: str) -> None:
    import json

    if args.progress == "json":
        print(json.dumps({"stage": "error", "fraction": 1.0, "case": case, "message": message}), flush=True)
    print(f"focusnet segment: {case}: {message}", file=sys.stderr, flush=True)


def _cmd_dicom_ls(args) -> int:
    import pydicom

    from .imageio import ImageReadError, sorted_slices, check_slice_positions, scan_dicom_folder

    found = scan_dicom_folder(args.folder)
    if not found:
        raise ImageReadError(args.folder, "folder holds no DICOM files")
    print(f"{'modality':8s} {'files':>5s} {'spacing (mm)':>20s}  {'description':30s} series")
    for series in sorted(found.values(), key=lambda s: (s.modality, s.description)):
        spacing, note = "", ""
        if series.modality == "CT":
            try:
                files, positions = sorted_slices(Path(args.folder), series)
                ds = pydicom.dcmread(files[0], stop_before_pixels=True)
                gaps = np.diff(positions)
                spacing = f"{float(ds.PixelSpacing[1]):.2f} x {float(ds.PixelSpacing[0]):.2f} x {np.median(gaps):.2f}"
                check_slice_positions(args.folder, positions)
            except ImageReadError as error:
                note = f"  PROBLEM: {error.problem}"
        print(f"{series.modality:8s} {series.num_files:5d} {spacing:>20s}  {series.description[:30]:30s} "
              f"{series.series_uid}{note}")
    return EXIT_OK


def _cmd_train(args) -> int:
    from .train import train

    bundle = train(args.config, args.data, args.out, resume=args.resume, device=args.device,
                   progress=not args.no_progress, branch_from=args.branch_from, from_model=args.from_model,
                   from_stage=args.from_stage, fresh_sos=args.fresh_sos, workers=args.workers,
                   splits=args.splits, max_minutes=args.max_minutes)
    if bundle is None:
        print(f"stopped after {args.max_minutes:g} minutes; continue with: focusnet train --resume --config "
              f"{args.config} --data {args.data} --out {args.out}")
        return EXIT_OK
    print(f"model bundle: {bundle}")
    return EXIT_OK


def _cmd_study_report(args) -> int:
    from .studyreport import definitions, study_report

    stats, written = study_report(args.logs, args.out)
    for path in written:
        print(f"wrote {path}")
    print("Definitions (also in report.md):")
    print("\n".join(definitions(stats)))
    return EXIT_OK


def _cmd_study_synth(args) -> int:
    from .studyreport import synthetic_log

    if Path(args.out).exists():
        raise FileExistsError(f"{args.out}: already exists; refusing to add synthetic records to an existing log")
    print(f"wrote {synthetic_log(args.out, args.n, args.seed)} ({args.n} synthetic cases)")
    return EXIT_OK


def _cmd_evaluate(args) -> int:
    from .evaluate import evaluate

    rows, written = evaluate(args.pred, args.gt, args.organs, Path(args.out) if args.out else Path(args.pred))
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="focusnet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"focusnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="generate synthetic head-and-neck CT phantoms with ground truth")
    p.add_argument("--n", type=int, default=1, help="number of cases (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first case; case k uses seed+k")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=("nrrd", "nifti", "pddca", "nnunet", "dicom"), default="nrrd")
    p.add_argument("--size", choices=("full", "small"), default="full",
                   help="full: 512 x 512 clinical matrix; small: 160 x 160 for fast tests")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--noise", nargs=2, type=float, metavar=("LO", "HI"),
                   help="range (HU) the noise's standard deviation is drawn from (default 10 30); another "
                        "range gives the same patients with only the noise's level changed")
    # Scans as departments make them (phantom.Variation): the same patients, the truth painted alike.
    p.add_argument("--pose", nargs=3, type=float, metavar=("YAW", "PITCH", "ROLL"),
                   help="head pose in degrees (default: drawn within +-4)")
    p.add_argument("--slice-mm", type=float, help="slice thickness and spacing in mm (default 2.5-3.5)")
    p.add_argument("--pixel-mm", type=float, help="in-plane pixel size in mm (default 0.78-1.25)")
    p.add_argument("--metal", action="store_true", help="dental fillings with streak artefacts")
    p.add_argument("--scan-range", nargs=2, type=float, metavar=("BOTTOM", "TOP"),
                   help="the scan's extent in head-frame mm (0 at the eyes, about +90 the vertex, -200 the "
                        "shoulders)")
    p.add_argument("--fov-mm", type=float, help="cut the field of view to this width left-right (a truncated scan)")
    p.add_argument("--variation", choices=("random",),
                   help="random: each case drawn within issue 48's ranges (pose +-15 deg, slices 1-5 mm, "
                        "pixels 0.5-1.2 mm, metal in 30 %%, scan from -200..-60 to 0..125 mm, a cut field of "
                        "view in 30 %%); the options above override it")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("segment", help="segment the organs at risk on CT volumes")
    p.add_argument("input", nargs="+", help="volume file(s) (NRRD, NIfTI, MHA), DICOM series folder(s), "
                                           "or folder(s) of cases")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=None, help="model bundle (default: the embedded phantom model)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cuda or cpu")
    p.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto: bfloat16 on CUDA and on CPUs with native bfloat16 (AMX, AVX512-BF16), else float32")
    p.add_argument("--backend", choices=("auto", "torch", "openvino"), default="auto",
                   help="what runs S-Net and SOL-Net over the scan: auto = OpenVINO on the CPU (1.3-1.7x PyTorch's speed "
                        "there, same results), PyTorch on a GPU")
    p.add_argument("--format", type=_segment_formats, default=("seg.nrrd",),
                   help=f"{', '.join(SEGMENT_FORMATS)}, or several joined by commas (one segmentation, each file "
                        "written from it: e.g. rtstruct,dicomseg). rtstruct: a DICOM RT Structure Set for the "
                        "planning system; dicomseg: a DICOM SEG (both for DICOM input only). Default seg.nrrd")
    p.add_argument("--progress", choices=("text", "json"), default="text",
                   help="json: one JSON object per line on stdout (stage, fraction, message)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("dicom", help="DICOM helpers")
    dicom_sub = p.add_subparsers(dest="dicom_command", required=True)
    q = dicom_sub.add_parser("ls", help="list the series of a DICOM folder (modality, slices, spacing, problems)")
    q.add_argument("folder")
    q.set_defaults(func=_cmd_dicom_ls)

    p = sub.add_parser("study", help="the time-savings study: reports from review logs")
    study_sub = p.add_subparsers(dest="study_command", required=True)
    q = study_sub.add_parser("report", help="times per mode, savings with confidence intervals, edit metrics, plots")
    q.add_argument("logs", nargs="+", help="review log(s) (JSON Lines, as the Slicer module writes them)")
    q.add_argument("--out", required=True, help="output folder for report.md, organs.csv and the plots")
    q.set_defaults(func=_cmd_study_report)
    q = study_sub.add_parser("synth", help="write a synthetic review log (invented data, for trying the report)")
    q.add_argument("--out", required=True)
    q.add_argument("--n", type=int, default=40)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_cmd_study_synth)

    p = sub.add_parser("evaluate", help="per-organ Dice, 95HD and surface Dice of predictions against ground truth")
    p.add_argument("--pred", required=True, help="folder of predictions (<case>.seg.nrrd, .nii.gz or .nrrd)")
    p.add_argument("--gt", required=True, help="folder of ground truth (phantom, PDDCA, nnU-Net or DICOM layout)")
    p.add_argument("--organs", default="oar22", help="organ set: oar22 or pddca9")
    p.add_argument("--out", default=None, help="where to write evaluation.csv and evaluation.md (default --pred)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("train", help="train FocusNetv2 on contoured CTs (runs under torchrun for several GPUs)")
    p.add_argument("--config", required=True, help="training configuration (YAML), e.g. configs/paper.yaml")
    p.add_argument("--data", required=True, help="folder of cases: phantom/NRRD pairs, PDDCA, nnU-Net or DICOM")
    p.add_argument("--out", required=True, help="run folder: cache, checkpoints, validation CSV/PNG, model.pt")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--splits", default=None, metavar="JSON",
                   help="the run's train/validation/test split: {\"train\": [case names], \"validation\": [...], "
                        "\"test\": [...]} (default: from the configuration's validation_cases, test_cases and "
                        "split_seed; written to <out>/splits.json either way)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop cleanly after this many minutes with a checkpoint that --resume continues (a queue's "
                        "time limit); no model.pt until the run has finished")
    p.add_argument("--workers", type=int, default=None,
                   help="processes per rank that preprocess the cache and make training crops ahead of the GPU "
                        "(default: the rank's CPU cores less one, at most 8; 0: in the training process). The "
                        "run is the same for every count")
    p.add_argument("--branch-from", default=None, metavar="CHECKPOINT",
                   help="start from another run's checkpoint taken after its snet and solnet stages "
                        "(ablations, e.g. FocusNetv1 = adversarial: false, share those stages)")
    p.add_argument("--fresh-sos", action="store_true",
                   help="with --branch-from: SOS-Net starts from new weights, not the checkpoint's (an ablation "
                        "branched from a run whose SOS-Net had trained)")
    p.add_argument("--from-model", default=None, metavar="BUNDLE",
                   help="start from a model bundle's weights (same network settings) at --from-stage")
    p.add_argument("--from-stage", default=None,
                   choices=("snet", "snet_fixed_bn", "solnet", "aae_pretrain", "sos", "finetune"),  # train.STAGES
                   help="with --from-model: the first stage to train; the earlier ones are the bundle's")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("review", help="review and correct the contours in a browser (needs focusnet[review])")
    p.add_argument("input", help="the CT: a volume file (NRRD, NIfTI, MHA) or a DICOM series folder")
    p.add_argument("--seg", default=None, help="contours to review (.seg.nrrd); default: segment now with --model")
    p.add_argument("--model", default=None, help="model bundle (default: the embedded phantom model)")
    p.add_argument("--out", default="focusnet-review",
                   help="folder for the export, the AI contours, the review log and unfinished sessions")
    p.add_argument("--port", type=int, default=8080, help="port (0: any free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback; any other requires the access token printed at start)")
    p.add_argument("--reviewer", default="", help="reviewer id written into the timing record")
    p.add_argument("--device", default="auto", help="where the model runs: auto, cpu or cuda")
    p.add_argument("--idle-threshold", type=float, default=60.0, metavar="S",
                   help="seconds without any act of reviewing after which time counts as idle (default 60)")
    p.set_defaults(func=_cmd_review)

    p = sub.add_parser("worker", help="a long-lived inference process for click-to-find (JSON lines on stdin/stdout)",
                       description="Reads one JSON request per line on stdin (open a CT, refine a small organ at a "
                                   "point, close, quit) and answers one JSON line each on stdout; see "
                                   "FocusNetCore/worker.py and the README's 'Click to find'.")
    p.add_argument("--model", default=None, help="model bundle (default: the embedded phantom model)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("node", help="run as a DICOM node: CT in by C-STORE, RTSTRUCT and SEG out to a destination",
                       description="focusnet node --spool DIR --destination AE@HOST:PORT [...] serves; "
                                   "focusnet node status --spool DIR prints the queue as JSON; "
                                   "focusnet node retry --spool DIR [--job ID ...] queues failed jobs again.")
    p.add_argument("action", nargs="?", choices=("run", "status", "retry"), default="run")
    p.add_argument("--job", dest="jobs", action="append", default=[], metavar="ID",
                   help="retry: a failed job (its id or SeriesInstanceUID), repeatable; default all failed jobs")
    p.add_argument("--spool", required=True, help="the node's folder: received series, queue, results, logs")
    p.add_argument("--port", type=int, default=11112, help="port to listen on (default 11112; 0: any free one)")
    p.add_argument("--ae-title", default="FOCUSNET", help="this node's AE title (default FOCUSNET)")
    p.add_argument("--destination", help="where results go: AE_TITLE@HOST:PORT (the planning system)")
    p.add_argument("--allow", nargs="+", default=[], metavar="AE_TITLE",
                   help="calling AE titles that may send (required off loopback; others are rejected)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--settle", type=float, default=10.0, metavar="S",
                   help="a series is complete after S seconds with no new instance (default 10)")
    p.add_argument("--model", default=None, help="model bundle (default: the embedded phantom model)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--format", default="rtstruct,dicomseg", help="what to send: rtstruct, dicomseg or both (default)")
    p.add_argument("--tls", nargs=3, metavar=("CERT", "KEY", "CA"), default=None,
                   help="accept associations over TLS only; callers need a certificate signed by CA")
    p.add_argument("--retry-window", type=float, default=600.0, metavar="S",
                   help="keep retrying delivery for S seconds (backoff 2 s doubling to 60 s), then fail the job "
                        "(default 600)")
    p.add_argument("--keep-days", type=float, default=7.0, metavar="D",
                   help="delete a finished job's images and results D days after delivery (default 7; 0: at once)")
    p.set_defaults(func=_cmd_node)

    p = sub.add_parser("postprocess", help="choose a bundle's post-processing (SOS-Net thresholds, the small organs "
                                           "S-Net draws alone, largest component, hole filling) per organ on "
                                           "validation cases, and write the bundle with it")
    p.add_argument("--model", default=None, help="model bundle (default: the embedded phantom model)")
    p.add_argument("--data", required=True, help="cases with ground truth, as `focusnet train` reads them")
    p.add_argument("--validation-cases", type=int, default=2,
                   help="the last N cases of --data, sorted as training sorts them (default 2: training's split)")
    p.add_argument("--chunk-slices", type=int, default=None, metavar="N",
                   help="slices per inference chunk, stored in the new bundle and used to choose the rest (default: "
                        "the bundle's own). More slices give S-Net and SOL-Net context across fewer chunk borders "
                        "and cost memory")
    p.add_argument("--out", required=True, help="the new bundle (the input bundle is never changed)")
    p.set_defaults(func=_cmd_postprocess)

    p = sub.add_parser("sos-heads", help="take the SOS-Net head of named small organs, with its threshold, from "
                                         "bundles over the same S-Net and SOL-Net (trained on from this one at "
                                         "its SOS-Net stage), and write the bundle with them")
    p.add_argument("--model", default=None, help="model bundle (default: the embedded phantom model)")
    p.add_argument("--head", dest="heads", action="append", required=True, metavar="ORGAN=BUNDLE",
                   help="the small organ whose head comes from BUNDLE; repeat for several")
    p.add_argument("--note", default="", help="how the donors were made and the heads chosen (kept in the bundle)")
    p.add_argument("--out", required=True, help="the new bundle (the input bundle is never changed)")
    p.set_defaults(func=_cmd_sos_heads)

    p = sub.add_parser("fine-sos", help="train a fine head per small organ (or --organ: S-Net's features and the CT "
                                        "at 2 x 1 x 1 mm voxels around it) on a bundle's S-Net, keep those that "
                                        "beat the bundle on --select, and write the bundle with them")
    p.add_argument("--model", default=None, help="model bundle (default: the embedded phantom model); run "
                   "`focusnet postprocess` on it first: the fine heads are chosen against what it draws")
    p.add_argument("--data", default=None, action="append", help="training cases with ground truth, as "
                   "`focusnet train` reads them; repeat for several folders (required unless --heads-from)")
    p.add_argument("--select", required=True, help="cases with ground truth held aside to choose on (never the "
                   "cases you report results on)")
    p.add_argument("--organ", dest="organs", action="append", default=None, metavar="NAME",
                   help="an organ to give a fine head; repeat for several (default: the small organs). Fine heads "
                        "the bundle has for other organs stay")
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--width", type=int, default=16, help="channels of the heads' blocks")
    p.add_argument("--blocks", type=int, default=2, help="SE residual blocks per head (each two 3x3x3 "
                   "convolutions: 2 see 9 fine voxels across, 4 see 17)")
    p.add_argument("--zoom", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="fine voxels per model voxel along z, y, x (default 1 2 2: 2 x 1 x 1 mm on the 2 mm grid)")
    p.add_argument("--batch", type=int, default=4, help="ROIs per organ per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's rate (cosine schedule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-cache", default=None, metavar="FILE",
                   help="keep the training samples (S-Net's features, fine CT and truth per organ and case) in "
                        "FILE: a later run with the same bundle, cases, organs and zoom reads them back instead "
                        "of segmenting every case again (about 3 s a case on 2 CPU cores)")
    p.add_argument("--shape-weight", type=float, default=0.0, metavar="W",
                   help="FocusNetv2's shape term with the bundle's (frozen) shape autoencoder, weighted W; 0 "
                        "(default): the segmentation loss alone, as FocusNetv1")
    p.add_argument("--adversarial", action="store_true",
                   help="with --shape-weight: train a copy of the autoencoder against the heads (FocusNetv2's "
                        "AAE, eq. 8: L_rec - 0.001 L_shape) instead of keeping it frozen; the bundle's own "
                        "autoencoder is kept as it is")
    p.add_argument("--fine-shape", type=int, default=0, metavar="STEPS",
                   help="with --shape-weight: the shape term's autoencoder on the fine heads' own grid instead "
                        "of the bundle's (which sees the masks averaged down to the model grid), pre-trained "
                        "for STEPS steps on the training cases' true masks first")
    p.add_argument("--ct-noise", type=float, default=0.0, metavar="HU",
                   help="augmentation: white Gaussian noise added to each training ROI's fine CT, its standard "
                        "deviation drawn from 0 to HU (default 0: none)")
    p.add_argument("--trained-out", default=None, metavar="FILE",
                   help="also keep every head trained, chosen or not, with its scores case by case on --select "
                        "(a torch file: organ -> state_dict, settings, scores), so a run's heads are not lost "
                        "where none beats the bundle; never overwritten")
    p.add_argument("--from-bundle-heads", action="store_true",
                   help="start each organ's head from the bundle's own fine head for it (trained on further, e.g. "
                        "on noisier cases, at a lower --lr) instead of afresh; --width, --blocks and --zoom must "
                        "be that head's")
    p.add_argument("--heads-from", default=None, metavar="FILE",
                   help="score and choose the heads of an earlier run's --trained-out FILE instead of training "
                        "(trained on this bundle's S-Net; --organ picks among them)")
    p.add_argument("--ensemble", action="store_true",
                   help="also score, for each organ the bundle already has a fine head for on the same fine "
                        "voxels, the average of that head's probability and the new head's; keep whichever of "
                        "the two beats the bundle more")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--note", default="", help="how the heads were made (kept in the bundle)")
    p.add_argument("--out", required=True, help="the new bundle (the input bundle is never changed)")
    p.set_defaults(func=_cmd_fine_sos)

    p = sub.add_parser("click-heads", help="choose click-to-find's SOS-Net head per small organ (the bundle's own or a "
                                           "donor's) at the organs' true centres on cases with ground truth, and write "
                                           "the bundle with them")
    p.add_argument("--model", default=None, help="model bundle (default: the embedded phantom model)")
    p.add_argument("--donor", dest="donors", action="append", default=[], metavar="BUNDLE",
                   help="a bundle trained from --model at its sos stage (`focusnet train --from-model --from-stage "
                        "sos`), whose heads are candidates; repeat for several")
    p.add_argument("--data", required=True,
                   help="cases with ground truth, as `focusnet train` reads them, used for nothing else (all are used)")
    p.add_argument("--note", default="", help="how the donors were made (kept in the bundle)")
    p.add_argument("--out", required=True, help="the new bundle (the input bundle is never changed)")
    p.set_defaults(func=_cmd_click_heads)

    p = sub.add_parser("demo", help="the main job on its embedded default: a phantom case end to end")
    p.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    p.add_argument("--seed", type=int, default=2026, help="phantom seed (default 2026, never used in training)")
    p.add_argument("--size", choices=("full", "small"), default="full")
    p.add_argument("--model", default=None, help="model bundle (default: the embedded phantom model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto: bfloat16 on CUDA and on CPUs with native bfloat16 (AMX, AVX512-BF16), else float32")
    p.set_defaults(func=_cmd_demo)
    return parser


def _cmd_worker(args) -> int:
    from .worker import main

    return main(args.model, args.device)


def _cmd_node(args) -> int:
    import json
    import os
    import signal

    from .node import Destination, Node, NodeError, NodeOptions, Spool, configure_logging

    try:
        if args.action == "status":
            print(json.dumps(Spool(args.spool, create=False).status(), indent=1))
            return EXIT_OK
        if args.action == "retry":
            moved = Spool(args.spool, create=False).retry(args.jobs)
            print(f"queued again: {', '.join(moved) if moved else 'nothing (no failed job)'}")
            return EXIT_OK
        if args.jobs:
            raise NodeError("--job is for `focusnet node retry`")
        if not args.destination:
            raise NodeError("--destination AE_TITLE@HOST:PORT is required: where the results go")
        options = NodeOptions(spool=Path(args.spool), destination=Destination.parse(args.destination),
                              port=args.port, ae_title=args.ae_title, host=args.host, allow=args.allow,
                              settle_s=args.settle, model=args.model, device=args.device,
                              formats=[f.strip() for f in args.format.split(",") if f.strip()],
                              tls=tuple(args.tls) if args.tls else None, retry_window_s=args.retry_window,
                              keep_days=args.keep_days)
        configure_logging()
        os.umask(0o077)  # patient data: everything the node writes is its user's alone (files 0600, folders 0700)
        node = Node(options)
    except NodeError as error:
        print(f"focusnet node: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    signal.signal(signal.SIGTERM, lambda *_: node.stop())
    try:
        node.run()
    except KeyboardInterrupt:
        node.stop()
    except NodeError as error:  # e.g. the port is taken
        print(f"focusnet node: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:
        print(f"focusnet node: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def _cmd_postprocess(args) -> int:
    import tempfile

    import dataclasses

    from .bundle import with_postprocess
    from .data import CachedCase, discover_cases, load_training_cases
    from .postprocess import SOS_THRESHOLDS, choose, choose_snet_small, choose_sos_thresholds_from_scores, mean_dice
    from .segment import Segmenter
    from .train import branch_and_snet_labels
    from .worker import Worker

    segmenter = Segmenter(args.model, device="cpu", precision="float32")
    organs = segmenter.config.organs
    if args.chunk_slices is not None:
        config = segmenter.model.config
        segmenter.model.config = dataclasses.replace(
            config, preprocess=dataclasses.replace(config.preprocess, chunk_slices=args.chunk_slices))
    with tempfile.TemporaryDirectory() as cache:
        cases, problems = load_training_cases(args.data, cache, segmenter.config.preprocess, organs, print)
        # In memory: the cache on disk goes with this block.
        cases = [CachedCase(c.name, c.image, c.labels, c.present) for c in cases]
    if args.validation_cases < 1 or len(cases) < args.validation_cases:
        raise ValueError(f"{args.data}: {len(cases)} usable case(s), --validation-cases {args.validation_cases}")
    validation = cases[len(cases) - args.validation_cases:]
    # SOS-Net's thresholds first: the labels the plan is chosen on are drawn
    # with them. They are scored on the CT's own grid, as the user gets the
    # contours: a threshold chosen on the 2 mm model grid was up to 0.05
    # Dice worse there (optic nerves).
    names = {case.name for case in validation}
    sources = [source for source in discover_cases(args.data)[0] if source.name in names]
    worker = Worker(segmenter)  # dice_of_heads scores the heads it is given
    heads = {name: [segmenter.model.sosnet.heads[k]] for k, name in enumerate(organs.small_names)}
    scores = _true_centre_dice(worker, sources, organs, heads, SOS_THRESHOLDS)
    thresholds, report = choose_sos_thresholds_from_scores({name: rows[0] for name, rows in scores.items()},
                                                           organs.small_names)
    for name, row in report.items():
        print(f"SOS-Net threshold {name}: {row['threshold']} (Dice at the true centre on the CT's grid "
              f"{row['dice_at_0.5']:.3f} at 0.5, {row['dice']:.3f} with it; {row['cases']} case(s))")
    segmenter.model.config = dataclasses.replace(segmenter.model.config, sos_thresholds=thresholds)
    # Then which small organs S-Net draws better alone, with those thresholds.
    branch, snet = branch_and_snet_labels(segmenter.model, validation)
    snet_small, report = choose_snet_small(branch, snet, organs)
    for name, row in report.items():
        print(f"{name}: validation Dice {row['branch']:.3f} with the small-organ branch, {row['snet']:.3f} S-Net alone"
              f" ({row['cases']} cases, s.e. of the difference {row['gain_standard_error']:.3f})"
              f"{': S-Net draws it' if row['snet_chosen'] else ''}")
    segmenter.model.config = dataclasses.replace(segmenter.model.config, snet_small=snet_small)
    pairs = []
    for case in validation:
        pairs.append((segmenter.model_grid_labels(case.image), case.labels))
        print(f"{case.name}: segmented")
    plan = choose(pairs, organs)
    for step in ("largest_component", "fill_holes"):
        print(f"{step}: {', '.join(plan[step]) or 'none'}")
    print(f"validation mean Dice {mean_dice(pairs, organs):.4f} without, {mean_dice(pairs, organs, plan):.4f} with")
    with_postprocess(segmenter.bundle_path, plan, args.out, sos_thresholds=thresholds, snet_small=snet_small,
                     chunk_slices=args.chunk_slices)
    print(f"wrote {args.out}")
    return EXIT_OK


def _cmd_sos_heads(args) -> int:
    from .bundle import with_sos_heads
    from .segment import EMBEDDED_MODEL

    donors = {}
    for entry in args.heads:
        organ, sep, bundle = entry.partition("=")
        if not sep or not organ or not bundle:
            raise ValueError(f"--head {entry!r}: expected ORGAN=BUNDLE, e.g. OpticNrv_L=runs/x/model.pt")
        if organ in donors:
            raise ValueError(f"--head {entry!r}: {organ} is given twice")
        donors[organ] = bundle
    base = Path(args.model) if args.model else EMBEDDED_MODEL
    with_sos_heads(base, donors, args.out, note=args.note)
    print(f"wrote {args.out} (SOS-Net heads taken: {', '.join(f'{o} from {b}' for o, b in donors.items())}; "
          "choose the thresholds and post-processing again with focusnet postprocess)")
    return EXIT_OK


def _cmd_fine_sos(args) -> int:
    from . import finesos
    from .bundle import fine_head, with_fine_heads
    from .segment import EMBEDDED_MODEL, Segmenter

    if min(args.iterations, args.width, args.batch, args.blocks) < 1:
        raise ValueError(f"--iterations, --width, --batch and --blocks must be >= 1 (got {args.iterations}, "
                         f"{args.width}, {args.batch}, {args.blocks})")
    zoom = tuple(args.zoom or finesos.ZOOM)
    if not all(1 <= z <= 4 for z in zoom):
        raise ValueError(f"--zoom must be 1 to 4 fine voxels per model voxel on each axis, got "
                         f"{' '.join(map(str, zoom))}")
    if not args.shape_weight >= 0:
        raise ValueError(f"--shape-weight must be >= 0, got {args.shape_weight}")
    if not 0 <= args.ct_noise < 1000:
        raise ValueError(f"--ct-noise must be 0 to 1000 HU, got {args.ct_noise}")
    if args.fine_shape < 0 or (args.fine_shape and not args.shape_weight > 0):
        raise ValueError(f"--fine-shape makes the shape term's autoencoder: it needs --shape-weight > 0 and "
                         f"STEPS >= 1 (got --fine-shape {args.fine_shape}, --shape-weight {args.shape_weight})")
    if args.adversarial and not args.shape_weight > 0:
        raise ValueError("--adversarial trains the shape autoencoder against the heads: it needs --shape-weight > 0")
    if args.heads_from:
        training = [flag for flag, given in (("--data", args.data), ("--samples-cache", args.samples_cache),
                                             ("--trained-out", args.trained_out),
                                             ("--from-bundle-heads", args.from_bundle_heads)) if given]
        if training:
            raise ValueError(f"--heads-from {args.heads_from} scores heads trained before: {', '.join(training)} "
                             "would train new ones")
    elif not args.data:
        raise ValueError("--data: the training cases are needed (or --heads-from an earlier run's --trained-out)")
    if args.trained_out and Path(args.trained_out).exists():
        raise ValueError(f"--trained-out {args.trained_out}: exists already (never overwritten)")
    base = Path(args.model) if args.model else EMBEDDED_MODEL
    segmenter = Segmenter(base, device=args.device)
    names = args.organs or list(segmenter.config.organs.small_names)
    unknown = [name for name in names if name not in segmenter.config.organs.names]
    if unknown:
        raise ValueError(f"--organ {', '.join(unknown)}: not among the bundle's organs "
                         f"({', '.join(segmenter.config.organs.names)})")
    if args.heads_from:
        entries, trained = _trained_heads(args.heads_from, segmenter, args.organs)
        heads = {name: fine_head(segmenter.config, entry).to(segmenter.device) for name, entry in entries.items()}
    else:
        heads, trained = _train_fine_heads(args, segmenter, base, names, zoom)
        settings = {"zoom": list(zoom), "roi": list(finesos.FINE_ROI), "width": int(args.width),
                    "blocks": int(args.blocks)}
        entries = {name: {"state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}, **settings}
                   for name, head in heads.items()}
    scores = finesos.scores_on(segmenter, heads, args.select)
    report = finesos.choose(scores)
    _print_fine_report(report, "new fine head")
    if args.trained_out:
        import json

        import torch

        from .imageio import atomic_output

        plain = lambda value: json.loads(json.dumps(value, default=float))  # noqa: E731 (numpy scalars -> float)
        kept = {name: {**entries[name], "report": plain(report[name]),
                       "scores": {"pipeline": plain(scores[name]["pipeline"]),
                                  "current": plain(scores[name].get("current")),
                                  "fine": [[float(t), plain(v)] for t, v in scores[name]["fine"].items()]}}
                for name in heads}
        with atomic_output(args.trained_out) as tmp:
            torch.save({"heads": kept, "trained": trained, "select": str(args.select), "model": str(base),
                        "model_checksum": segmenter.meta["checksum"]}, tmp)
        print(f"wrote {args.trained_out} (every head trained, with its scores)")
    if args.ensemble:
        _choose_ensembles(segmenter, entries, report, args.select)
    chosen = {}
    for name, row in report.items():
        if row["fine"]:
            chosen[name] = {**entries[name], "threshold": row["threshold"],
                            "chosen_on": {"data": str(args.select), "trained": trained,
                                          **({"ensemble": True} if row.get("ensemble") else {}),
                                          **{k: row[k] for k in ("cases", "pipeline", "dice")}}}
    with_fine_heads(base, chosen, args.out, note=args.note)
    print(f"wrote {args.out} (fine heads: {', '.join(chosen) or 'none'})")
    return EXIT_OK


def _print_fine_report(report: dict, what: str) -> None:
    for name, row in report.items():
        current = "" if row["current"] is None else f", the bundle's fine head {row['current']:.3f}"
        print(f"{name}: Dice on the CT's grid over {row['cases']} case(s): pipeline {row['pipeline']:.3f}{current}, "
              f"{what} {row['dice']:.3f} at {row['threshold']} (gain s.e. {row['gain_standard_error']:.3f})"
              f"{': the fine head draws it' if row['fine'] else ''}", flush=True)


def _train_fine_heads(args, segmenter, base, names, zoom):
    """fine-sos's training: organ -> trained FineHead, and the record of how."""
    from . import finesos

    initial = _bundle_heads_to_train_on(segmenter, base, names, args.width, args.blocks, zoom) \
        if args.from_bundle_heads else None
    samples = (finesos.cached_samples(args.samples_cache, segmenter, args.data, names, zoom=zoom)
               if args.samples_cache else finesos.build_samples(segmenter, args.data, names, zoom=zoom))
    if not samples:
        raise ValueError(f"{', '.join(map(str, args.data))}: no case holds a small organ")
    print("samples: " + ", ".join(f"{name} {len(rows)}" for name, rows in samples.items()), flush=True)
    precision = segmenter.precision if segmenter.device == "cpu" else "float32"
    autoencoder = None
    if args.shape_weight > 0 and args.fine_shape:
        width = float(segmenter.meta.get("autoencoder_width") or 0.25)  # the bundle's autoencoder's, if it has one
        autoencoder = finesos.fine_autoencoder(samples, zoom, args.fine_shape, width=width, seed=args.seed)
    elif args.shape_weight > 0:
        autoencoder = segmenter.autoencoder
        if autoencoder is None:
            raise ValueError(f"{base}: --shape-weight needs the bundle's shape autoencoder, and it has none")
        for p in autoencoder.parameters():
            p.requires_grad_(False)
    heads = finesos.train_heads(samples, args.width, args.iterations, batch=args.batch, lr=args.lr, seed=args.seed,
                                precision=precision, autoencoder=autoencoder, shape_weight=args.shape_weight,
                                zoom=zoom, blocks=args.blocks, adversarial=args.adversarial,
                                ct_noise=args.ct_noise / segmenter.config.preprocess.hu_scale, initial=initial)
    trained = {"data": [str(d) for d in args.data], "iterations": int(args.iterations), "batch": int(args.batch),
               "lr": float(args.lr), "seed": int(args.seed), "precision": precision,
               "shape_weight": float(args.shape_weight), "adversarial": bool(args.adversarial),
               "fine_shape_steps": int(args.fine_shape),
               "ct_noise_hu": float(args.ct_noise)}
    if initial:
        trained["from_bundle_heads"] = {name: segmenter.meta["fine_heads"][name].get("checksum", "")
                                        for name in initial}
    return heads, trained


def _trained_heads(path, segmenter, organs) -> Tuple[dict, dict]:
    """fine-sos --heads-from: organ -> fine head entry (state_dict and
    settings) of an earlier run's --trained-out file, and how they were
    trained; refused where the file is not one, was trained on another
    bundle's S-Net, or lacks an organ asked for."""
    import torch

    from .bundle import fine_settings

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # missing, truncated, or not a torch file
        raise ValueError(f"--heads-from {path}: not a readable fine-sos --trained-out file "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("heads"), dict):
        raise ValueError(f"--heads-from {path}: not a fine-sos --trained-out file (no heads)")
    checksum = payload.get("model_checksum")
    if checksum is None:
        print(f"{path}: records no model checksum (written before they were kept): its heads are taken to be "
              f"trained on this bundle's S-Net ({payload.get('model', '?')})", flush=True)
    elif checksum != segmenter.meta["checksum"]:
        raise ValueError(f"--heads-from {path}: its heads were trained on another network (checksum "
                         f"{checksum[:12]}, this bundle's {segmenter.meta['checksum'][:12]})")
    names = organs or list(payload["heads"])
    missing = [name for name in names if name not in payload["heads"]]
    if missing:
        raise ValueError(f"--heads-from {path}: no head for {', '.join(missing)} (it has "
                         f"{', '.join(payload['heads'])})")
    entries = {name: {"state_dict": payload["heads"][name]["state_dict"], **fine_settings(payload["heads"][name])}
               for name in names}
    return entries, {**dict(payload.get("trained") or {}), "heads_from": str(path)}


def _choose_ensembles(segmenter, entries: dict, report: dict, select) -> None:
    """fine-sos --ensemble: for each organ whose bundle head shares the new
    head's fine voxels and ROI, score their average on ``select``; where it
    beats the bundle and the new head alone, ``entries`` and ``report``
    take it."""
    from . import finesos
    from .bundle import ensemble_entry, fine_head

    fine = segmenter.meta.get("fine_heads") or {}
    pairs = {}
    for name, entry in entries.items():
        current = fine.get(name)
        if current is None:
            continue
        try:
            pairs[name] = ensemble_entry([current, entry])
        except ValueError as error:
            print(f"{name}: no ensemble with the bundle's fine head ({error})", flush=True)
    if not pairs:
        return
    heads = {name: fine_head(segmenter.config, entry).to(segmenter.device) for name, entry in pairs.items()}
    averaged = finesos.choose(finesos.scores_on(segmenter, heads, select))
    _print_fine_report(averaged, "the bundle's and the new head averaged")
    for name, row in averaged.items():
        if row["fine"] and (not report[name]["fine"] or row["dice"] > report[name]["dice"]):
            print(f"{name}: the average is kept", flush=True)
            report[name] = {**row, "ensemble": True}
            entries[name] = pairs[name]


def _bundle_heads_to_train_on(segmenter, base, names, width: int, blocks: int, zoom) -> dict:
    """fine-sos --from-bundle-heads: organ -> the bundle's fine head's
    weights, refused where an organ has none or its head is not of the
    --width, --blocks and --zoom asked for."""
    fine = segmenter.meta.get("fine_heads") or {}
    problems = []
    for name in names:
        entry = fine.get(name)
        if entry is None:
            problems.append(f"{name} has no fine head")
            continue
        have = (int(entry["width"]), int(entry["blocks"]), tuple(int(z) for z in entry["zoom"]))
        if have != (int(width), int(blocks), tuple(zoom)):
            problems.append(f"{name}'s fine head is --width {have[0]} --blocks {have[1]} --zoom "
                            f"{' '.join(map(str, have[2]))}")
    if problems:
        raise ValueError(f"{base}: --from-bundle-heads: {'; '.join(problems)} (asked for --width {width} "
                         f"--blocks {blocks} --zoom {' '.join(map(str, zoom))})")
    return {name: fine[name]["state_dict"] for name in names}


def _cmd_click_heads(args) -> int:
    from .bundle import donor_heads, load_bundle, with_click_heads
    from .data import discover_cases
    from .postprocess import SOS_THRESHOLDS, choose_click_heads
    from .segment import EMBEDDED_MODEL, Segmenter
    from .worker import Worker

    base = Path(args.model) if args.model else EMBEDDED_MODEL
    model, _ = load_bundle(base)  # as stored (BatchNorm not folded): donors' heads are compared with it
    organs = model.config.organs
    sources = [str(base)] + list(args.donors)
    donors = [donor_heads(base, model, {name: donor for name in organs.small_names}) for donor in args.donors]
    cases, problems = discover_cases(args.data)
    for problem in problems:
        print(f"skipped: {problem}")
    if not cases:
        raise ValueError(f"{args.data}: no cases with ground truth")
    segmenter = Segmenter(base, device="cpu", precision="float32")
    worker = Worker(segmenter)  # dice_of_heads scores the heads it is given
    pipeline = [model.config.sos_threshold(k) for k in range(len(organs.small_names))]
    thresholds = sorted(set(SOS_THRESHOLDS) | set(pipeline))
    heads = {name: [segmenter.model.sosnet.heads[k]] + [worker.prepared_head(name, donor[name][1]) for donor in donors]
             for k, name in enumerate(organs.small_names)}
    by_organ = _true_centre_dice(worker, cases, organs, heads, thresholds)
    scores = [{name: rows[c] for name, rows in by_organ.items()} for c in range(len(sources))]
    chosen, report = choose_click_heads(scores, thresholds, pipeline, organs.small_names)
    for name, row in report.items():
        listed = ", ".join(f"{'its own' if c == 0 else sources[c]} {r['dice']:.3f} at {r['threshold']}"
                           for c, r in enumerate(row["candidates"]))
        verdict = (f"click head from {sources[chosen[name][0]]} at {chosen[name][1]}" if name in chosen
                   else "the pipeline's head")
        print(f"{name}: Dice at the true centre (CT grid) over {row['cases']} case(s): pipeline {row['pipeline']:.3f} (gain s.e. {row['gain_standard_error']:.3f}); "
              f"{listed} -> {verdict}")
    picked = {name: (sources[c], t) for name, (c, t) in chosen.items()}
    chosen_on = {name: {"data": str(args.data), "cases": report[name]["cases"], "pipeline_dice": report[name]["pipeline"],
                        "dice": report[name]["candidates"][chosen[name][0]]["dice"]} for name in chosen}
    with_click_heads(base, picked, args.out, note=args.note, scores=chosen_on)
    print(f"wrote {args.out} (click-to-find heads: {', '.join(chosen) or 'none'})")
    return EXIT_OK


def _true_centre_dice(worker, sources, organs, heads, thresholds) -> dict:
    """Per small organ that the cases hold: Dice on the CT's grid of each of
    ``heads[name]`` at each of ``thresholds`` with SOS-Net's ROI at the
    organ's true centre (Worker.dice_of_heads, what a click there gives),
    as an array (heads x cases x thresholds)."""
    from .data import load_case

    rows = {name: [] for name in organs.small_names}
    for source in sources:
        image, labels, _ = load_case(source, organs)
        worker.open(str(source.image))
        for name in organs.small_names:
            truth = labels == organs.label_of(name)
            if not truth.any():
                continue
            centre = np.argwhere(truth).mean(axis=0)[::-1]  # (i, j, k)
            point = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in centre])
            rows[name].append(worker.dice_of_heads(name, point, heads[name], thresholds, truth))
        print(f"{source.name}: scored", flush=True)
    return {name: np.stack(found, axis=1) for name, found in rows.items() if found}


def _cmd_review(args) -> int:
    try:
        from FocusNetReview.app import ReviewOptions, ReviewStation
    except ImportError as error:
        print(f"focusnet review needs the review extra: pip install 'focusnet[review]' ({error})", file=sys.stderr)
        return EXIT_BAD_INPUT
    options = ReviewOptions(input=args.input, seg=args.seg, model=args.model, out=args.out, host=args.host,
                            port=args.port, reviewer=args.reviewer, device=args.device,
                            idle_threshold_s=args.idle_threshold)
    if not args.idle_threshold > 0:
        print(f"--idle-threshold must be a positive number of seconds, got {args.idle_threshold}", file=sys.stderr)
        return EXIT_BAD_INPUT
    ReviewStation(options).start()
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    from .imageio import ImageReadError, OutputExistsError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ImageReadError, OutputExistsError, FileNotFoundError, FileExistsError, ValueError, KeyError) as error:
        print(f"focusnet {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
