"""One CT under review, in any MRML scene: the segmentation node, its
ReviewSession (statuses, flags, timing) and the exports.

Both front ends drive this one class — the Slicer module (in Slicer's own
scene) and the browser review station of ``focusnet review`` (in
trame-slicer's scene) — so review, timing and export behave the same in
both. A session that was interrupted (a crash, a closed server) is resumed
from its checkpoint, with the contours as last autosaved when the front end
autosaves them (``autosave``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import SimpleITK as sitk

from FocusNetCore.imageio import write_image
from FocusNetCore.organs import OrganSet, get_organ_set
from FocusNetCore.study import case_id as hashed_case_id

from . import export
from .activity import ActivityMonitor
from .review import ReviewSession
from .scene import export_labels, import_labels


class ReviewCase:
    def __init__(self, scene, volume_node, segmentation_node, session: ReviewSession, folder, case_uid: str = ""):
        self.scene, self.volume_node, self.segmentation_node = scene, volume_node, segmentation_node
        self.session = session
        self.folder = Path(folder)
        self.case_uid = case_uid
        # Scroll, window/level, view changes, selection and visibility are acts of reviewing too.
        self.activity = ActivityMonitor(scene, session.activity).start()
        # click-to-find undo stack: (organ, the label map before over the box it changed, the organs changed)
        self._placed: List[Tuple[str, sitk.Image, List[str]]] = []

    def close(self) -> None:
        """Stop observing the scene (the checkpoint of an unfinished session stays)."""
        self.session.stop()
        self.activity.stop()

    @property
    def organs(self) -> OrganSet:
        return self.session.organs

    @staticmethod
    def paths(folder, case_id: str):
        folder = Path(folder)
        return folder / f"{case_id}.review.json", folder / f"{case_id}.working.nrrd"

    @property
    def _working_path(self) -> Path:
        return self.paths(self.folder, self.session.case_id)[1]

    # -- opening ---------------------------------------------------------------
    @classmethod
    def open(cls, scene, volume_node, labels: Optional[sitk.Image], *, folder, log_path, case_uid: str,
             reviewer: str = "", report: Optional[dict] = None, name: Optional[str] = None,
             resume: bool = True, client: str = "slicer", shown: bool = True,
             idle_threshold_s: Optional[float] = None, save_each_edit: bool = False,
             clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> "ReviewCase":
        """``labels`` are the AI contours on the CT's grid (mode "ai"), or None
        for contouring from scratch (mode "manual"). ``report`` is the
        segmentation report (model, timings, per-organ results for the flags).
        With ``resume`` an unfinished session of the same case continues: its
        times and statuses from the checkpoint, its contours from the
        autosave. ``shown``: the reviewer sees the case from now on (the wall
        clock starts); the browser station passes False and says when a page
        shows it (``session.shown()`` / ``session.hidden()``).
        ``save_each_edit``: each edit's contours are on disk (the autosave)
        before the edit is counted, so a crash right after an edit loses
        neither (the browser station, whose server a crash takes down)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        organs = get_organ_set((report or {}).get("model", {}).get("organ_set", "oar22"))
        cid = hashed_case_id(case_uid)
        checkpoint, working = cls.paths(folder, cid)
        mode = "ai" if labels is not None else "manual"
        if labels is None:
            from .scene import image_from_volume_node

            reference = image_from_volume_node(volume_node)
            labels_for_scene = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
            labels_for_scene.CopyInformation(reference)
        else:
            labels_for_scene = labels
        name = name or f"{volume_node.GetName()} OARs" + ("" if mode == "ai" else " (manual)")
        resuming = resume and checkpoint.exists()
        if resuming and working.exists():
            labels_for_scene = cls._read_autosave(working, case_uid, labels_for_scene)
        node = import_labels(scene, labels_for_scene, organs, volume_node, name)
        node.CreateDefaultDisplayNodes()
        results = (report or {}).get("organs")
        if results is None and labels is not None:  # contours from elsewhere, no report: flags from the labels
            results = organ_results_from_labels(labels, organs)
        common = dict(model=(report or {}).get("model"), ai_labels=labels, clock=clock, wall=wall, client=client,
                      inference_seconds=(report or {}).get("timings_s", {}).get("total"), organ_results=results)
        if resuming:
            session = ReviewSession.resume(checkpoint, node, organs, log_path, **common)
        else:
            if idle_threshold_s is not None:
                common["idle_threshold_s"] = idle_threshold_s
            session = ReviewSession(node, organs, mode=mode, case_id=cid, reviewer=reviewer, log_path=log_path,
                                    checkpoint_path=checkpoint, **common)
        case = cls(scene, volume_node, node, session, folder, case_uid)
        if save_each_edit:
            session.save_contours = case.autosave
        session.start(shown=shown)
        return case

    @staticmethod
    def _read_autosave(working: Path, case_uid: str, reference: sitk.Image) -> sitk.Image:
        """The autosaved contours of an unfinished review, refused unless they
        are this CT's: the case uid in their header, and its grid."""
        from FocusNetCore.caseid import CaseIdentity, check_same_case, check_same_grid, identity_in_header

        check_same_case(CaseIdentity(case_uid), identity_in_header(working), working)
        labels = sitk.ReadImage(str(working))
        check_same_grid(reference, labels, working)
        return labels

    # -- while reviewing --------------------------------------------------------
    def autosave(self) -> Path:
        """Write the contours as they are now (a label map on the CT's grid,
        replacing the previous autosave atomically), so a session resumed
        after a crash has them."""
        from FocusNetCore.caseid import HEADER_KEY

        labels = self.final_labels()
        if self.case_uid:
            labels.SetMetaData(HEADER_KEY, self.case_uid)  # resumed only onto this CT
        # Uncompressed: written after every edit in the browser station, where speed matters more than size.
        return write_image(labels, self._working_path, overwrite=True, compress=False)

    # -- click to find ---------------------------------------------------------
    def place(self, organ: str, mask: sitk.Image) -> dict:
        """Make ``mask`` (a click-to-find answer: 0/1 on the CT's grid over
        SOS-Net's ROI) ``organ``'s whole contour: the click says the organ is
        there, so its contour elsewhere goes, and the placed voxels are taken
        from any other organ that held them (the one label map that every
        export is written from holds the placement). One assisted edit, saved
        before it is counted; :meth:`undo_place` restores every changed
        contour as it was. Returns what changed: the organ's volume before
        and after (cc) and the organs that gave up voxels."""
        import numpy as np

        from .scene import region_of, replace_labels_in_region

        if organ not in self.organs.names:
            raise ValueError(f"unknown organ {organ!r}")
        whole = self.final_labels()
        array = sitk.GetArrayViewFromImage(whole)
        value = self.organs.label_of(organ)
        i0, j0, k0, i1, j1, k1 = region_of(mask, whole)
        lo, hi = np.array([k0, j0, i0]), np.array([k1, j1, i1])
        old = np.argwhere(array == value)
        if len(old):  # the box also covers the organ's old contour, which the placement removes
            lo, hi = np.minimum(lo, old.min(axis=0)), np.maximum(hi, old.max(axis=0) + 1)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        before = np.array(array[box])
        after = np.where(before == value, 0, before).astype(before.dtype)
        placed = np.zeros(before.shape, bool)
        inner = tuple(slice(int(a - b), int(a - b + n)) for a, b, n in zip((k0, j0, i0), lo, mask.GetSize()[::-1]))
        placed[inner] = sitk.GetArrayViewFromImage(mask) > 0
        after[placed] = value
        names = {self.organs.label_of(n): n for n in self.organs.names}
        losers = sorted({names[int(v)] for v in np.unique(before[placed]) if int(v) in names and int(v) != value})
        changed = [organ, *losers]
        voxel_cc = float(np.prod(whole.GetSpacing())) / 1000.0
        region_before, region_after = (self._region(a, whole, lo) for a in (before, after))
        with self.session.assisting(*changed):
            replace_labels_in_region(self.segmentation_node, self.volume_node, self.organs, region_after, changed)
        self._placed.append((organ, region_before, changed))
        self.session.record_assisted_edit(organ)
        for loser in losers:  # their contours changed too: edited (SEMIAUTOMATIC in the exports), not placed
            self.session.mark_changed(loser)
        return {"organ": organ, "before_cc": round(float((before == value).sum()) * voxel_cc, 3),
                "after_cc": round(float(placed.sum()) * voxel_cc, 3), "taken_from": losers}

    @staticmethod
    def _region(array, whole: sitk.Image, lo) -> sitk.Image:
        """``array`` as an image on ``whole``'s grid, its first voxel at ``lo`` (z, y, x)."""
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(whole.GetSpacing())
        image.SetDirection(whole.GetDirection())
        image.SetOrigin(whole.TransformIndexToPhysicalPoint([int(v) for v in lo[::-1]]))
        return image

    def placement_distance_mm(self, organ: str, mask: sitk.Image) -> Optional[float]:
        """How far (mm) a click-to-find answer's centre lies from where the
        model put ``organ`` (its AI contour; else its contour now): None when
        neither has the organ, or the answer is empty."""
        import numpy as np

        def centre(image, value):
            where = np.argwhere(sitk.GetArrayViewFromImage(image) == value)
            if not len(where):
                return None
            return np.asarray(image.TransformContinuousIndexToPhysicalPoint(
                [float(v) for v in where.mean(axis=0)[::-1]]))

        here = centre(mask, 1)
        if here is None:
            return None
        value = self.organs.label_of(organ)
        for labels in (self.session.ai_labels, None):
            there = centre(labels if labels is not None else self.final_labels(), value)
            if there is not None:
                return float(np.linalg.norm(here - there))
        return None

    @property
    def can_undo_place(self) -> bool:
        return bool(self._placed) and not self.session.finished

    def undo_place(self) -> Optional[str]:
        """Undo the last placement (every contour it changed, as it was);
        returns the organ, or None when there is nothing to undo."""
        from .scene import replace_labels_in_region

        if not self._placed:
            return None
        organ, before, changed = self._placed[-1]
        with self.session.assisting(*changed):
            replace_labels_in_region(self.segmentation_node, self.volume_node, self.organs, before, changed)
        self._placed.pop()
        self.session.record_assisted_edit(organ, undo=True)
        return organ

    def final_labels(self) -> sitk.Image:
        return export_labels(self.scene, self.segmentation_node, self.volume_node, self.organs)

    # -- finishing ---------------------------------------------------------------
    def export(self, kind: str, folder, base_name: str, ct_series_folder=None,
               labels: Optional[sitk.Image] = None) -> Path:
        """Write the reviewed contours; never replaces a file (numbered names).
        For RTSTRUCT and DICOM SEG, ``labels`` (read from the scene
        beforehand) lets the writing run off the GUI thread."""
        base = os.path.join(str(folder), base_name)
        if kind == "seg.nrrd":
            path = export.export_seg_nrrd(self.scene, self.segmentation_node, base + ".seg.nrrd")
            if self.case_uid:  # the reviewed contours stay bound to their CT, wherever the file goes
                from FocusNetCore.caseid import stamp_nrrd_file

                stamp_nrrd_file(path, self.case_uid)
        elif kind == "nifti":
            path = export.export_nifti(self.scene, self.segmentation_node, self.volume_node, self.organs,
                                       base + ".nii.gz")
        elif kind in ("rtstruct", "dicomseg"):
            if ct_series_folder is None:
                raise ValueError(f"{'RTSTRUCT' if kind == 'rtstruct' else 'DICOM SEG'} export needs the CT's "
                                 "DICOM series folder")
            if kind == "rtstruct":
                path = export.export_rtstruct(self.scene, self.segmentation_node, self.volume_node, self.organs,
                                              ct_series_folder, base + ".rtstruct.dcm", labels=labels,
                                              algorithm_types=self.session.algorithm_types())
            else:
                path = export.export_dicom_seg(self.scene, self.segmentation_node, self.volume_node, self.organs,
                                               ct_series_folder, base + ".seg.dcm",
                                               self.session.algorithm_types(), self.session.model, labels=labels)
        else:
            raise ValueError(f"unknown export kind {kind!r}; use seg.nrrd, nifti, rtstruct or dicomseg")
        return Path(path)

    def finish(self, final_labels: Optional[sitk.Image] = None) -> dict:
        """Append the session's timing record (with the edit metrics against
        the AI contours) to the study log and drop the checkpoint and autosave.
        ``final_labels`` (read from the scene beforehand) lets a front end
        compute the metrics off its GUI thread."""
        record = self.session.finish(self.final_labels() if final_labels is None else final_labels)
        if self._working_path.exists():
            self._working_path.unlink()
        return record



def organ_results_from_labels(labels: sitk.Image, organs: OrganSet) -> list:
    """Per-organ presence and volume (cc) of a label map, in the segmentation
    report's form: what the review's flags need when contours come without a
    report (``focusnet review --seg``)."""
    import numpy as np

    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=len(organs.names) + 1)
    voxel_cc = float(np.prod(labels.GetSpacing())) / 1000.0
    return [{"name": name, "present": bool(counts[organs.label_of(name)] > 0),
             "volume_cc": round(float(counts[organs.label_of(name)]) * voxel_cc, 3)} for name in organs.names]
