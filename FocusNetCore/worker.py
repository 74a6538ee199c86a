"""``focusnet worker``: a long-lived inference process for click-to-find.

FocusNetv2's small-organ branch segments a small organ inside an ROI centred
wherever SOL-Net points. A reviewer who sees that SOL-Net missed a lens, the
chiasm or the pituitary (or put it in the wrong place) clicks where the organ
is, and SOS-Net segments it there: the model's own branch, organ-aware, with
S-Net's features of the case kept in memory, so an answer takes a fraction of
a second.

Protocol: one JSON object per line on stdin, one answer per line on stdout
(nothing else is ever written to stdout; logs go to stderr). Each request
may carry an ``id``, which its answer repeats.

    {"id": 1, "op": "open", "ct": "ct.nrrd", "out": "work/ct.seg.nrrd"}
        segments the CT once (the whole FocusNetv2 pipeline) and keeps its
        features; ``out`` (optional) receives the contours as .seg.nrrd.
        -> {"id": 1, "ok": true, "case": "ct", "seg": "work/ct.seg.nrrd",
            "report": {...the segmentation report...}, "seconds": 7.1}
    {"id": 2, "op": "refine", "organ": "Lens_L", "point": [x, y, z], "out": "work/lens.nrrd"}
        ``point`` in LPS millimetres (DICOM's patient coordinates; Slicer's
        RAS is (-x, -y, z)). SOS-Net segments the organ in its ROI centred
        there; the mask, on the CT's own grid and only over the ROI's extent
        (origin, spacing and direction the CT's), is written to ``out`` (a
        volume file: .nrrd, .nii.gz, .mha).
        -> {"id": 2, "ok": true, "organ": "Lens_L", "mask": "work/lens.nrrd",
            "region": [i0, j0, k0, i1, j1, k1], "voxels": 140, "volume_cc": 0.21,
            "head": "click", "probability": 0.83, "seconds": 0.05}
        ``region``: the mask's voxel box on the CT's grid (start inclusive,
        stop exclusive, (i, j, k) order): the contour is to be replaced inside
        it only. ``head``: "fine" where the bundle draws the organ with a
        fine head (FocusNetCore.finesos; it answers the click too, its ROI
        centred on the click, the mask the component nearest it), else
        "click" where it has a click-to-find head for the organ
        (bundle.with_click_heads: chosen for ROIs centred on the organ
        itself), else "pipeline" (the coarse head the segmentation used).
    {"id": 3, "op": "close"}      forget the case (its features)
    {"id": 4, "op": "quit"}       end the process (so does the end of stdin)

A failed request answers ``{"ok": false, "error": "..."}`` naming what was
wrong (no case open, an unknown organ, a point outside the scan, a file that
cannot be read); the worker goes on serving.

Click-placing is for the small organs (those SOS-Net segments: the lenses,
optic nerves, chiasm and pituitary in ``oar22``); a large organ is answered
with an error that says so, since S-Net draws those and the Segment Editor's
tools edit them.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Optional

import numpy as np
import SimpleITK as sitk
import torch

from .imageio import ImageReadError, write_image
from .networks import roi_start
from .preprocess import Grid, resample_labels
from . import finesos
from .segment import Segmenter


class WorkerError(ValueError):
    """A request the worker cannot serve; the message says why."""


class Worker:
    def __init__(self, segmenter: Segmenter):
        self.segmenter = segmenter
        self.state: Optional[dict] = None
        self.case: Optional[str] = None
        # The bundle's click-to-find heads (bundle.with_click_heads), where it
        # has them: SOS-Net heads chosen for ROIs at the organ itself rather
        # than where SOL-Net points. Other organs use the pipeline's head.
        self.click_heads = {organ: (self.prepared_head(organ, entry["state_dict"]), float(entry["threshold"]))
                            for organ, entry in (segmenter.meta.get("click_heads") or {}).items()}

    def prepared_head(self, organ: str, state_dict) -> torch.nn.Module:
        """An SOS-Net head for ``organ`` holding ``state_dict``, prepared as the
        segmenter prepared its model (BatchNorm folded, its precision, its device)."""
        from .bundle import click_head
        from .precision import for_inference

        head = click_head(self.segmenter.config, organ, state_dict)
        return for_inference(head, self.segmenter.precision).to(self.segmenter.device)

    # -- requests ----------------------------------------------------------------
    def open(self, ct: str, out: Optional[str] = None) -> dict:
        from .imageio import case_name
        from .segfile import write_seg_nrrd

        path = Path(ct)
        if not path.exists():
            raise WorkerError(f"{ct}: no such CT file or DICOM folder")
        start = time.perf_counter()
        result = self.segmenter.segment(str(path), keep_state=True)  # a CT that fails keeps the open case
        self.state, self.case = result.state, case_name(path)
        answer = {"case": self.case, "report": {"input": str(path), **result.report()}}
        if out:
            write_seg_nrrd(result.labels, self.segmenter.config.organs, out, overwrite=True)
            answer["seg"] = str(out)
        answer["seconds"] = round(time.perf_counter() - start, 3)
        return answer

    def refine(self, organ: str, point, out: str) -> dict:
        start = time.perf_counter()
        mask, region, probability = self.place(organ, point)
        write_image(mask, out, overwrite=True)
        voxels = int(sitk.GetArrayViewFromImage(mask).sum())
        head = ("fine" if organ in self.segmenter.fine_heads else "click" if organ in self.click_heads
                else "pipeline")
        return {"organ": organ, "mask": str(out), "region": region, "voxels": voxels, "head": head,
                "volume_cc": round(voxels * float(np.prod(mask.GetSpacing())) / 1000.0, 4),
                "probability": probability, "seconds": round(time.perf_counter() - start, 3)}

    def close(self) -> dict:
        self.state, self.case = None, None
        return {}

    # -- the small-organ branch at a point --------------------------------------
    def place(self, organ: str, point):
        """SOS-Net's mask of ``organ`` with its ROI centred at ``point`` (LPS
        mm): (mask image on the CT's grid over the ROI's extent, its region
        (i0, j0, k0, i1, j1, k1), the mean probability inside the mask)."""
        k, at, roi_corner = self._roi_at(organ, point)
        if organ in self.segmenter.fine_heads:
            return self._place_fine(organ, point, tuple(a + c for a, c in zip(at, roi_corner)))
        config, model = self.segmenter.config, self.segmenter.model
        head, threshold = self.click_heads.get(organ) or (model.sosnet.heads[k], config.sos_threshold(k))
        prob = self._probability(head, roi_corner)
        mask = finesos.component_at(prob > threshold, at)
        probability = round(float(prob[mask].mean()), 4) if mask.any() else None
        out, lo, hi = self._on_ct_grid(mask, roi_corner)
        return out, [int(v) for v in lo] + [int(v) for v in hi], probability

    def _place_fine(self, organ: str, point, centre):
        """``place`` with the bundle's fine head for ``organ`` (the one the
        segmentation drew it with), its ROI centred on the click's model
        voxel ``centre``: the mask on the CT's grid over the fine ROI's
        extent, the component nearest the click."""
        image, pre = self.state["image"], self.state["preprocessed"]
        head, threshold = self.segmenter.fine_heads[organ]
        label = self.segmenter.config.organs.label_of(organ)
        result = finesos.draw(head, threshold, image, self.state["features"], pre.grid, centre,
                              self.segmenter.config.preprocess, label, self.segmenter.fine_roi)
        at = result.grid.physical_to_index(np.asarray(point, dtype=float))[::-1]
        result.mask = finesos.component_at(result.probability > threshold, at)
        on_ct = finesos.to_reference(result, image, at=np.asarray(point, dtype=float))
        ct_grid = Grid.of(image)
        lo, hi = ct_grid.box_reached_by(result.grid)
        out = sitk.GetImageFromArray(on_ct[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]].astype(np.uint8))
        ct_grid.sub_grid(lo, hi - lo).apply_to(out)
        probability = round(float(result.probability[result.mask].mean()), 4) if result.mask.any() else None
        return out, [int(v) for v in lo] + [int(v) for v in hi], probability

    def dice_of_heads(self, organ: str, point, heads, thresholds, truth: np.ndarray) -> np.ndarray:
        """What ``place`` would score against ``truth`` (the organ's mask on the
        CT's grid, (z, y, x)) with each of ``heads`` (SOS-Net heads for
        ``organ``, prepared as the segmenter's model) at each of
        ``thresholds``: Dice, shape (len(heads), len(thresholds)). Click-to-
        find's heads are chosen by it (``focusnet click-heads``): the answer
        the reviewer sees, on the CT's own slices."""
        _, at, roi_corner = self._roi_at(organ, point)
        total = float(truth.sum())
        out = np.zeros((len(heads), len(thresholds)))
        for h, head in enumerate(heads):
            prob = self._probability(head, roi_corner)
            for t, threshold in enumerate(thresholds):
                image, lo, hi = self._on_ct_grid(finesos.component_at(prob > threshold, at), roi_corner)
                mask = sitk.GetArrayViewFromImage(image) > 0
                inside = truth[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
                denominator = float(mask.sum()) + total
                out[h, t] = 2.0 * float((mask & inside).sum()) / denominator if denominator else 1.0
        return out

    def _roi_at(self, organ: str, point):
        """(small-organ index, the point inside the ROI (z, y, x), the ROI's
        corner on the model grid), after checking the request."""
        if self.state is None:
            raise WorkerError("no case is open: send an 'open' request first")
        config = self.segmenter.config
        organs = config.organs
        if organ not in organs.names:
            raise WorkerError(f"unknown organ {organ!r}; the model's organs are {', '.join(organs.names)}")
        if organ not in organs.small_names:
            raise WorkerError(f"click-placing is for the small organs ({', '.join(organs.small_names)}); {organ} is "
                              "drawn by S-Net: correct it with the Segment Editor's tools")
        try:
            point = np.asarray([float(v) for v in point], dtype=float)
        except (TypeError, ValueError):
            raise WorkerError(f"point must be three numbers (LPS mm), got {point!r}") from None
        if point.shape != (3,) or not np.all(np.isfinite(point)):
            raise WorkerError(f"point must be three finite numbers (LPS mm), got {point.tolist()!r}")
        ct_grid = Grid.of(self.state["image"])
        ct_index = ct_grid.physical_to_index(point)
        if np.any(ct_index < -0.5) or np.any(ct_index > np.asarray(ct_grid.size) - 0.5):
            raise WorkerError(f"point {point.tolist()} (LPS mm) lies outside the CT")
        pre = self.state["preprocessed"]
        model_index = pre.grid.physical_to_index(point)  # (x, y, z)
        centre = tuple(int(round(v)) for v in model_index[::-1])  # (z, y, x)
        if any(c < 0 or c >= n for c, n in zip(centre, pre.grid.shape)):
            raise WorkerError(f"point {point.tolist()} (LPS mm) lies outside the part of the scan the model "
                              "sees (the head and neck)")
        roi_corner = roi_start(centre, config.roi_size)
        return organs.small_names.index(organ), tuple(c - s for c, s in zip(centre, roi_corner)), roi_corner

    def _probability(self, head, roi_corner) -> np.ndarray:
        model = self.segmenter.model
        with torch.inference_mode():
            prob = head(model.sos_roi(self.state["volume"], self.state["features"], roi_corner))
        return prob[0, 0].float().cpu().numpy()

    def _on_ct_grid(self, mask: np.ndarray, roi_corner):
        """The ROI's mask (model grid) -> the CT's grid over the ROI's extent
        only: (image, lo, hi), its voxel box (i, j, k), stop exclusive."""
        pre, ct_grid = self.state["preprocessed"], Grid.of(self.state["image"])
        roi_grid = pre.grid.sub_grid(roi_corner[::-1], self.segmenter.config.roi_size[::-1])
        roi_image = sitk.GetImageFromArray(mask.astype(np.uint8))
        roi_grid.apply_to(roi_image)
        lo, hi = ct_grid.box_reached_by(roi_grid)
        region_grid = ct_grid.sub_grid(lo, hi - lo)
        out = sitk.GetImageFromArray(resample_labels(roi_image, region_grid).astype(np.uint8))
        region_grid.apply_to(out)
        return out, lo, hi


# -- the process -------------------------------------------------------------------

def serve(worker: Worker, stdin: IO[str], stdout: IO[str], log: IO[str]) -> int:
    """Answer requests until "quit" or the end of stdin."""
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        request_id = None
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise WorkerError("a request is a JSON object")
            request_id = request.get("id")
            op = request.get("op")
            if op == "quit":
                _answer(stdout, request_id, {"ok": True})
                return 0
            answer = _dispatch(worker, op, request)
            _answer(stdout, request_id, {"ok": True, **answer})
        except (WorkerError, ImageReadError, FileNotFoundError, FileExistsError, KeyError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
            _answer(stdout, request_id, {"ok": False, "error": str(message)})
        except json.JSONDecodeError as error:
            _answer(stdout, None, {"ok": False, "error": f"not JSON ({error.msg} at column {error.colno}): {line[:80]}"})
        except Exception as error:  # the worker keeps serving; the reviewer sees what went wrong
            print(f"focusnet worker: internal error on {line[:200]}: {type(error).__name__}: {error}", file=log,
                  flush=True)
            _answer(stdout, request_id, {"ok": False, "error": f"internal error: {type(error).__name__}: {error}"})
    return 0


def _dispatch(worker: Worker, op, request: dict) -> dict:
    if op == "open":
        if not request.get("ct"):
            raise WorkerError("'open' needs 'ct' (a CT file or DICOM folder)")
        return worker.open(str(request["ct"]), request.get("out"))
    if op == "refine":
        for key in ("organ", "point", "out"):
            if key not in request:
                raise WorkerError(f"'refine' needs 'organ', 'point' (LPS mm) and 'out'; '{key}' is missing")
        return worker.refine(str(request["organ"]), request["point"], str(request["out"]))
    if op == "close":
        return worker.close()
    raise WorkerError(f"unknown op {op!r}; ops are open, refine, close, quit")


def _answer(stdout: IO[str], request_id, payload: dict) -> None:
    stdout.write(json.dumps({"id": request_id, **payload} if request_id is not None else payload) + "\n")
    stdout.flush()


def main(model: Optional[str] = None, device: str = "auto") -> int:
    segmenter = Segmenter(model, device=device)
    worker = Worker(segmenter)
    print(f"focusnet worker: ready ({segmenter.model_info['name']}, {segmenter.device}, {segmenter.precision}; "
          f"click-to-find heads: {', '.join(worker.click_heads) or 'none, the pipeline heads answer'})",
          file=sys.stderr, flush=True)
    return serve(worker, sys.stdin, sys.stdout, sys.stderr)
