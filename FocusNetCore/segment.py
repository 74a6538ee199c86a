"""Segmenting a CT: the Python API behind ``focusnet segment`` and the
Slicer module.

    seg = Segmenter()                      # the embedded default model
    result = seg.segment("ct.nrrd", progress=print_progress)
    result.labels                          # SimpleITK label image on the CT's own grid
    result.organs                          # volume, centroid, confidence, shape score
    result.timings                         # seconds per stage

Layers, each callable in memory: file -> image (imageio) -> model-grid array
(preprocess) -> labels (FocusNetV2.segment, chunked) -> labels on the
original grid (preprocess.labels_to_original).
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import SimpleITK as sitk
import torch

from .bundle import fine_head, fine_roi, load_bundle
from .bundleinfo import embedded_model_path
from .imageio import check_finite, read_image
from .metrics import dice
from .networks import PROBABILITY_SCALE, ShapeAutoencoder, roi_paste, roi_pool, roi_start
from . import fieldofview, finesos, openvino_backend, postprocess
from .organs import CATALOGUE
from .precision import channels_last, dtype_of, for_inference, output_problem, resolve
from .preprocess import labels_to_original, preprocess

EMBEDDED_MODEL = embedded_model_path()

Progress = Callable[[str, float, str], None]


@dataclass
class OrganResult:
    name: str
    label: int
    present: bool
    volume_cc: float
    centroid_mm: Optional[List[float]]  # LPS, world coordinates
    confidence: Optional[float]  # mean probability of the organ's class inside it
    shape_score: Optional[float] = None  # small organs: Dice of the autoencoder's reconstruction (1 = plausible)
    typical_volume_cc: List[float] = field(default_factory=list)
    # The score below which the review flags the shape as implausible: the
    # bundle's ``shape_score_threshold``, measured on held-out cases when its
    # autoencoder tells wrong shapes from right ones. None: no shape flag. The
    # embedded bundle has none: its autoencoder (width 0.25, on the 2 mm model
    # grid) scores 0.00 on all 36 small organs of held-out phantoms 1000-1005,
    # every one with Dice >= 0.6, and a mask dilated by 2 voxels reconstructs
    # better than the right one, so a flag from it would mark every small
    # organ and tell the reviewer nothing (issue 44).
    shape_threshold: Optional[float] = None
    # Judged outside the scan's field of view from where the other organs
    # lie (fieldofview.py): not drawn, and "not in scan" rather than missing.
    outside_scan: bool = False


@dataclass
class SegmentationResult:
    labels: sitk.Image
    organs: List[OrganResult]
    timings: Dict[str, float]
    device: str
    model: dict
    precision: str = "float32"
    # With Segmenter.segment(keep_state=True): what SOS-Net needs to segment a
    # small organ at another point later (FocusNetCore.worker): the
    # preprocessed scan, the model-grid volume and S-Net's features.
    state: Optional[dict] = None
    # fieldofview.Judgement.to_dict(): organs outside the field of view, the anchors, a note
    field_of_view: Optional[dict] = None

    def report(self) -> dict:
        return {"model": self.model, "device": self.device, "precision": self.precision, "timings_s": self.timings,
                "organs": [asdict(o) for o in self.organs], "field_of_view": self.field_of_view}

    @property
    def outside_scan(self) -> List[str]:
        return list((self.field_of_view or {}).get("outside", []))


def _quiet(stage: str, fraction: float, message: str) -> None:
    pass


class Segmenter:
    """Loads a model bundle once and segments any number of CTs."""

    def __init__(self, bundle: Union[str, Path, None] = None, device: str = "auto", precision: str = "auto",
                 backend: str = "auto"):
        """``precision``: "auto" (bfloat16 on CUDA and on CPUs that compute it
        natively, else float32), "float32" or "bfloat16"; see precision.py.
        ``backend``: what runs S-Net and SOL-Net over the scan: "auto"
        (OpenVINO on the CPU where it is installed, else PyTorch), "torch" or
        "openvino"; see openvino_backend.py."""
        path = Path(bundle) if bundle is not None else EMBEDDED_MODEL
        if bundle is None and not path.is_file():
            raise FileNotFoundError(f"{path}: the embedded model is missing from this installation")
        self.bundle_path = path
        self.model, self.meta = load_bundle(path)
        self.config = self.model.config
        self.device = self._choose_device(device)
        self.requested_precision = precision
        self.precision = resolve(precision, self.device)
        self.precision_note = ""
        if self.precision == "bfloat16":
            self.precision_note = self._probe_bfloat16()
            if self.precision_note:
                self.precision = "float32"
                print(f"focusnet: bfloat16 measured wrong on this machine ({self.precision_note}); "
                      "computing in float32", file=sys.stderr, flush=True)
        self.backend = openvino_backend.resolve(backend, self.device)
        loaded = self.model.to(self.device)
        self.model = for_inference(loaded, self.precision)
        if self.backend == "openvino":
            chunks, problem = openvino_backend.for_model(loaded, self.meta["checksum"], self.precision)
            if problem:
                self.precision_note = problem
                print(f"focusnet: OpenVINO's bfloat16 measured wrong on this machine ({problem}); its S-Net and "
                      "SOL-Net compute in float32", file=sys.stderr, flush=True)
            self.model.chunk_forward = chunks
        # Organs drawn by their fine heads (FocusNetCore.finesos): name -> (head, threshold)
        fine = self.meta.get("fine_heads") or {}
        self.fine_heads = {organ: (fine_head(self.config, entry).to(self.device), float(entry["threshold"]))
                           for organ, entry in fine.items()}
        self.fine_roi = fine_roi(fine, finesos.FINE_ROI)
        self.autoencoder = None
        if "autoencoder_state" in self.meta:
            self.autoencoder = ShapeAutoencoder(self.config.roi_size, self.meta["autoencoder_width"])
            self.autoencoder.load_state_dict(self.meta["autoencoder_state"])
            self.autoencoder.eval()
        # Where the organs lie relative to each other (fieldofview.py): the bundle's own,
        # from its training cases; the embedded model's from its phantoms; else none.
        self.anatomy = self.meta.get("anatomy")
        if self.anatomy is None and path.resolve() == EMBEDDED_MODEL.resolve() and fieldofview.PHANTOM_PRIOR.is_file():
            self.anatomy = fieldofview.phantom_prior()

    def _probe_bfloat16(self) -> str:
        """"" when the model in bfloat16 (as inference runs it) gives S-Net logits
        close to float32's on a fixed input, else why not (precision.py)."""
        reference = self.model.to(self.device).eval()
        candidate = for_inference(reference, "bfloat16")
        generator = torch.Generator().manual_seed(0)
        size = (1, 1, 8, 32, 32)  # small: where bfloat16 is emulated this costs seconds
        volume = torch.randn(size, generator=generator).to(self.device)
        with torch.inference_mode():
            expected = reference.snet(volume)[0].float()
            got = candidate.snet(channels_last(volume.to(torch.bfloat16)))[0].float()
        return output_problem(got, expected, "S-Net's output")

    @staticmethod
    def _choose_device(device: str) -> str:
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but no CUDA GPU is available (use --device cpu or auto)")
        if device not in ("cpu",) and not device.startswith("cuda"):
            raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
        return device

    @property
    def model_info(self) -> dict:
        prov = self.meta.get("provenance", {})
        return {"file": str(self.bundle_path), "name": prov.get("name", "FocusNetv2"),
                "intended_use": prov.get("intended_use", ""), "checksum": self.meta.get("checksum", ""),
                "organ_set": self.config.organ_set, "code_version": prov.get("code_version", ""),
                # why bfloat16 was not used although asked for ("" when it was used or not asked for)
                "precision_probe": self.precision_note,
                # what ran S-Net and SOL-Net: "torch" or "openvino"
                "backend": self.backend,
                # what the bundle's post-processing does (organ names per step; none for older bundles)
                "postprocess": {k: v for k, v in (self.meta.get("postprocess") or {}).items()
                                if k in ("largest_component", "fill_holes")},
                # the organs drawn by fine heads (finesos), each with its weights' checksum and threshold
                "fine_heads": {organ: {"checksum": entry.get("checksum", ""), "threshold": entry["threshold"]}
                               for organ, entry in (self.meta.get("fine_heads") or {}).items()}}

    def segment(self, image_or_path, progress: Optional[Progress] = None,
                small_organ_branch: bool = True, keep_state: bool = False,
                judge_field_of_view: bool = True) -> SegmentationResult:
        """``small_organ_branch=False`` keeps the S-Net's own small-organ labels
        (the ablation's "S-Net alone"); ``keep_state`` keeps what a later
        :meth:`place_small_organ` needs (``result.state``);
        ``judge_field_of_view=False`` keeps every organ the network drew
        (fieldofview.py; measurements of the judgement itself)."""
        progress = progress or _quiet
        timings: Dict[str, float] = {}
        start = time.perf_counter()
        progress("read", 0.0, "reading the CT")
        if isinstance(image_or_path, sitk.Image):
            image = image_or_path
            check_finite("the image given", image)
        else:
            image = read_image(image_or_path)
        timings["read"] = time.perf_counter() - start

        t = time.perf_counter()
        progress("preprocess", 0.1, "resampling to the model grid")
        pre = preprocess(image, self.config.preprocess)
        timings["preprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        progress("inference", 0.2, f"FocusNetv2 on {self.device} ({self.precision}, {self.backend})")
        fine = small_organ_branch and bool(self.fine_heads)
        out = self._infer(pre.image, progress, small_organ_branch, keep_state or fine)
        # S-Net's own labels (before the branch): where the fine heads centre their ROIs
        snet_labels = out["probabilities"][0].argmax(0).cpu().numpy().astype(np.uint8) if fine or keep_state else None
        drawn_fine = self._draw_fine(image, pre, out, snet_labels) if fine else []
        timings["inference"] = time.perf_counter() - t

        t = time.perf_counter()
        progress("postprocess", 0.85, "back to the CT's grid")
        model_labels = out["labels"][0].cpu().numpy().astype(np.uint8)
        if small_organ_branch:  # the bundle's post-processing (not in the ablation's "S-Net alone")
            model_labels = postprocess.apply(model_labels, self.meta.get("postprocess"), self.config.organs)
        # Sub-voxel boundaries from S-Net's probabilities; SOS-Net's organs by distance.
        drawn_by_sos = [label for label, drawn in zip(self.config.organs.small_labels, out.get("small") or [])
                        if drawn is not None]
        resampled = model_labels
        if drawn_fine:  # the fine heads' organs go to the CT's grid from their own grid, drawn over the rest
            resampled = np.where(np.isin(model_labels, [r.label for r in drawn_fine]), 0, model_labels)
        labels = labels_to_original(resampled, pre.grid, image, probabilities=out["probabilities"][0].cpu().numpy(),
                                    hard=drawn_by_sos)
        if drawn_fine:
            array = sitk.GetArrayFromImage(labels)
            for result in drawn_fine:
                array[finesos.to_reference(result, image)] = result.label
                model_labels = np.where(model_labels == result.label, 0, model_labels)
                corner, coarse = finesos.to_model_grid(result, pre.grid)
                region = roi_pool(torch.as_tensor(model_labels)[None, None], corner, coarse.shape)[0, 0].numpy()
                region[coarse] = result.label
                roi_paste(torch.as_tensor(model_labels)[None, None], torch.as_tensor(region)[None, None], corner)
            fixed = sitk.GetImageFromArray(array)
            fixed.CopyInformation(labels)
            labels = fixed
        # Organs the scan cannot hold, judged from where the others are: not drawn.
        judgement = fieldofview.judge(labels, self.config.organs, self.anatomy if judge_field_of_view else None)
        if judgement.removed:
            labels = fieldofview.remove(labels, self.config.organs, judgement.removed)
            model_labels = np.where(np.isin(model_labels, [self.config.organs.label_of(n) for n in judgement.removed]),
                                    0, model_labels)
        organs = self._organ_results(labels, model_labels, out, {r.label: r for r in drawn_fine})
        for organ in organs:
            organ.outside_scan = organ.name in judgement.outside
        timings["postprocess"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        progress("done", 1.0, f"{sum(o.present for o in organs)} organs in {timings['total']:.1f} s")
        state = None
        if keep_state:
            state = {"image": image, "preprocessed": pre, "features": out["features"],
                     "snet_labels": snet_labels,
                     "volume": channels_last(torch.as_tensor(pre.image)[None, None].to(self.device,
                                                                                       dtype_of(self.precision)))}
        return SegmentationResult(labels, organs, {k: round(v, 3) for k, v in timings.items()}, self.device,
                                  self.model_info, self.precision, state, judgement.to_dict())

    def model_grid_labels(self, array: np.ndarray) -> np.ndarray:
        """The network's labels for a volume already on the model grid and
        normalised (a training cache's case), before any post-processing."""
        return self._infer(array, _quiet)["labels"][0].cpu().numpy().astype(np.uint8)

    def _infer(self, array: np.ndarray, progress: Progress, branch: bool = True, keep: bool = False) -> dict:
        volume = torch.as_tensor(array)[None, None]
        try:
            return self._run(volume, progress, branch, keep)
        except torch.cuda.OutOfMemoryError:
            # Out of GPU memory: finish on the CPU rather than fail.
            progress("inference", 0.2, "GPU out of memory: falling back to the CPU (slower)")
            torch.cuda.empty_cache()
            self.device = "cpu"
            self.precision = resolve(self.requested_precision, "cpu")
            self.model.to("cpu", dtype_of(self.precision))
            return self._run(volume, progress, branch, keep)

    def _run(self, volume: torch.Tensor, progress: Progress, branch: bool = True, keep: bool = False) -> dict:
        volume = channels_last(volume.to(self.device, dtype_of(self.precision)))
        with torch.inference_mode():
            return self.model.segment(volume, small_organ_branch=branch, keep_features=keep, keep_heatmaps=False,
                                      progress=lambda f: progress("inference", 0.2 + 0.6 * f, f"segmenting {f:.0%}"))

    def _draw_fine(self, image: sitk.Image, pre, out: dict, snet_labels: np.ndarray) -> List["finesos.FineResult"]:
        """The organs of the bundle's fine heads, each in an ROI centred on
        S-Net's own contour of it, else (a small organ) where the branch
        pooled its ROI; an organ neither found keeps the pipeline's answer
        (none), and so does one whose fine mask is empty."""
        organs = self.config.organs
        branch = dict(zip(organs.small_labels, out.get("small") or []))
        features = out["features"]
        drawn = []
        for organ, (head, threshold) in self.fine_heads.items():
            label = organs.label_of(organ)
            centre = finesos.snet_centre(snet_labels, label)
            if centre is None and branch.get(label) is not None:
                start = branch[label][0]
                centre = tuple(s + r // 2 for s, r in zip(start, self.config.roi_size))
            if centre is None:
                continue
            result = finesos.draw(head, threshold, image, features, pre.grid, centre, self.config.preprocess,
                                  label, self.fine_roi)
            if result.mask.any():
                drawn.append(result)
        return drawn

    def _organ_results(self, labels: sitk.Image, model_labels: np.ndarray, out: dict,
                       fine: Optional[dict] = None) -> List[OrganResult]:
        organs = self.config.organs
        voxel_cc = float(np.prod(labels.GetSpacing())) / 1000.0
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(labels)
        found = set(stats.GetLabels())
        probabilities = out["probabilities"][0]
        small = dict(zip(organs.small_labels, out.get("small") or []))
        results = []
        for name in organs.names:
            label = organs.label_of(name)
            typical = list(CATALOGUE[name].volume_cc)
            if label not in found:
                results.append(OrganResult(name, label, False, 0.0, None, None, None, typical))
                continue
            centroid = [round(v, 2) for v in stats.GetCentroid(label)]
            volume = round(float(stats.GetNumberOfPixels(label)) * voxel_cc, 3)
            inside = torch.as_tensor(model_labels == label)
            confidence, shape = None, None
            if fine and label in fine:
                result = fine[label]
                confidence = float(result.probability[result.mask].mean())
                if label in small:  # the shape autoencoder knows the small organs only
                    region = roi_pool(inside[None, None].float(), roi_start(finesos.snet_centre(
                        model_labels, label) or (0, 0, 0), self.config.roi_size), self.config.roi_size)[0, 0] > 0.5
                    shape = self._shape_score(region)
            elif label in small and small[label] is not None:
                start, prob = small[label]
                region = roi_pool(torch.as_tensor(model_labels == label)[None, None].float(), start,
                                  self.config.roi_size)[0, 0] > 0.5
                values = prob[0].float().cpu()[region]
                confidence = float(values.mean()) if values.numel() else None
                shape = self._shape_score(region)
            elif inside.any():
                confidence = float(probabilities[label].float().cpu()[inside].mean()) / PROBABILITY_SCALE
            threshold = self.meta.get("shape_score_threshold") if shape is not None else None
            results.append(OrganResult(name, label, True, volume, centroid,
                                       None if confidence is None else round(confidence, 4),
                                       None if shape is None else round(shape, 4), typical,
                                       None if threshold is None else float(threshold)))
        return results

    def _shape_score(self, mask: torch.Tensor) -> Optional[float]:
        if self.autoencoder is None or not mask.any():
            return None
        with torch.inference_mode():
            recon, _, _ = self.autoencoder(mask[None, None].float())
        return dice(recon[0, 0].numpy() > 0.5, mask.numpy())

