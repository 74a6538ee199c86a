"""DICOM export from the module: RTSTRUCT and DICOM SEG.

The plugins live in the running application, so they come in as a dict
(``slicer.modules.dicomPlugins`` inside Slicer):

- RTSTRUCT: SlicerRT's ``DicomRtImportExportPlugin`` when installed. Its
  ``ExportDicomRTStudy`` refuses a segmentation exported alone ("Must export
  the primary anatomical (CT/MR) image"), so the CT's exportable goes too,
  first, with the patient and study tags copied from the subject hierarchy's
  ``DICOM.`` attributes as Slicer's DICOM export dialog
  (qSlicerDICOMTagEditorWidget) does. SlicerRT writes a new CT series beside
  the structure set; both go to a new folder. Without SlicerRT,
  FocusNetCore's writer references the CT's own series from Slicer's DICOM
  database.
- DICOM SEG: the ``DICOMSegmentationPlugin`` (the QuantitativeReporting
  extension on Slicer 5.8 and 5.10, Slicer itself from 5.12). Its exporter
  class is called directly with the non-empty segments only (the plugin's
  ``export`` asks in a dialog about empty ones), after each segment is tagged
  with its algorithm type (AUTOMATIC; SEMIAUTOMATIC once a reviewer edited
  it; MANUAL for the manual baseline) and the model's name and version.
  Without the plugin, FocusNetCore's writer (highdicom) makes the same SEG
  from the CT's series in Slicer's DICOM database.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional

from .export import free_path

RT_PLUGIN = "DicomRtImportExportPlugin"
SEG_PLUGIN = "DICOMSegmentationPlugin"
# vtkMRMLSubjectHierarchyConstants::GetDICOMPatientTagNames / GetDICOMStudyTagNames
PATIENT_TAGS = ("PatientName", "PatientID", "PatientSex", "PatientBirthDate", "PatientComments")
STUDY_TAGS = ("StudyInstanceUID", "StudyID", "StudyDescription", "StudyDate", "StudyTime")
DICOM_PREFIX = "DICOM."


class DicomExportError(RuntimeError):
    pass


def hierarchy_tags(hierarchy, item) -> Dict[str, str]:
    """The patient and study tags of ``item``'s study, as the export dialog
    copies them into every exportable (empty where the hierarchy has none)."""
    study = hierarchy.GetItemAncestorAtLevel(item, "Study")
    patient = hierarchy.GetItemParent(study) if study else 0
    tags = {}
    for names, owner in ((PATIENT_TAGS, patient), (STUDY_TAGS, study)):
        for name in names:
            tags[name] = hierarchy.GetItemAttribute(owner, DICOM_PREFIX + name) if owner else ""
    if study and not tags["StudyInstanceUID"]:
        tags["StudyInstanceUID"] = hierarchy.GetItemUID(study, "DICOM")
    return tags


def tag_algorithm(segmentation_node, session, model: Optional[dict]) -> None:
    """DICOM SEG's SegmentAlgorithmType/Name for each segment: what made it."""
    model = model or {}
    name = " ".join(str(p) for p in (model.get("name") or "FocusNetv2", model.get("code_version") or "") if p)
    segmentation = segmentation_node.GetSegmentation()
    for organ, kind in session.algorithm_types().items():
        segment = segmentation.GetSegment(organ)
        if segment is None:
            continue
        segment.SetTag("DICOM.SegmentAlgorithmType", kind)
        if kind != "MANUAL":
            segment.SetTag("DICOM.SegmentAlgorithmName", name)


class DicomExporter:
    """How the module reaches the running application's DICOM side.
    ``plugins``: name -> plugin class (``slicer.modules.dicomPlugins``);
    ``file_for_instance``: SOP Instance UID -> file (``slicer.dicomDatabase.fileForInstance``);
    ``seg_exporter``: the ``DICOMSegmentationExporter`` class of the SEG plugin's module."""

    def __init__(self, plugins: Dict[str, Callable], hierarchy, file_for_instance: Optional[Callable[[str], str]] = None,
                 seg_exporter=None):
        self.plugins, self.hierarchy = dict(plugins or {}), hierarchy
        self.file_for_instance, self.seg_exporter = file_for_instance, seg_exporter

    @classmethod
    def from_application(cls, slicer) -> "DicomExporter":
        """From the running Slicer (the ``slicer`` module): its registered DICOM
        plugins, the SEG plugin's exporter class and the DICOM database."""
        import importlib

        plugins = dict(getattr(slicer.modules, "dicomPlugins", None) or {})
        seg_exporter = None
        if SEG_PLUGIN in plugins:
            seg_exporter = getattr(importlib.import_module(plugins[SEG_PLUGIN].__module__),
                                   "DICOMSegmentationExporter", None)
        database = getattr(slicer, "dicomDatabase", None)
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        return cls(plugins, hierarchy, database.fileForInstance if database else None, seg_exporter)

    def export(self, kind: str, logic, folder: Path, base: str) -> Path:
        if kind == "rtstruct":
            if RT_PLUGIN in self.plugins:
                return self._with_slicer_rt(logic, folder, base)
            return self._with_focusnet_writer(logic, folder, base)
        if kind == "dicomseg":
            if SEG_PLUGIN in self.plugins and self.seg_exporter is not None:
                return self._seg(logic, folder, base)
            return self._with_focusnet_writer(logic, folder, base, "dicomseg")
        raise ValueError(f"unknown DICOM export {kind!r}")

    # -- RTSTRUCT ----------------------------------------------------------------------
    def _with_slicer_rt(self, logic, folder: Path, base: str) -> Path:
        plugin = self.plugins[RT_PLUGIN]()
        ct_item = self.hierarchy.GetItemByDataNode(logic.volume_node)
        seg_item = self.hierarchy.GetItemByDataNode(logic.segmentation_node)
        ct_exportables = list(plugin.examineForExport(ct_item) or [])
        seg_exportables = list(plugin.examineForExport(seg_item) or [])
        if not ct_exportables or not seg_exportables:
            raise DicomExportError(f"{RT_PLUGIN}: the CT and its segmentation cannot be exported together "
                                   "(both must be under one study in the Data module)")
        target = free_path(folder / f"{base} RTSTRUCT")  # never into an existing folder
        target.mkdir(parents=True)
        tags = hierarchy_tags(self.hierarchy, ct_item)
        exportables = ct_exportables + seg_exportables  # the CT first: it supplies the study
        for exportable in exportables:
            exportable.directory = str(target)
            for name, value in tags.items():
                exportable.setTag(name, value)
        seg_exportables[0].setTag("SeriesDescription", "FocusNet OARs")
        error = plugin.export(exportables)
        if error:
            raise DicomExportError(f"{RT_PLUGIN}: {error}")
        return target

    def _with_focusnet_writer(self, logic, folder: Path, base: str, kind: str = "rtstruct") -> Path:
        series = self.ct_series_folder(logic.volume_node, kind)
        try:
            return logic.case.export(kind, folder, base, ct_series_folder=series)
        finally:
            shutil.rmtree(series, ignore_errors=True)

    def ct_series_folder(self, volume_node, kind: str = "rtstruct") -> Path:
        """A temporary folder with just the CT's DICOM files (from Slicer's DICOM database)."""
        uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
        if not uids or self.file_for_instance is None:
            what = ("RTSTRUCT export needs the CT loaded from Slicer's DICOM database (or the SlicerRT extension): "
                    "a structure set" if kind == "rtstruct" else
                    "DICOM SEG export needs the CT loaded from Slicer's DICOM database: a segmentation")
            raise DicomExportError(f"{what} must reference the CT's DICOM images.")
        folder = Path(tempfile.mkdtemp(prefix="FocusNet-CT-"))
        for k, uid in enumerate(uids):
            source = self.file_for_instance(uid)
            if not source or not Path(source).is_file():
                shutil.rmtree(folder, ignore_errors=True)
                raise DicomExportError(f"the CT's DICOM instance {uid} is no longer in Slicer's DICOM database")
            shutil.copy(source, folder / f"{k:05d}.dcm")
        return folder

    # -- DICOM SEG ------------------------------------------------------------------
    def _seg(self, logic, folder: Path, base: str) -> Path:
        names = logic.non_empty_organs()
        if not names:
            raise DicomExportError("DICOM SEG export: every segment is empty")
        tag_algorithm(logic.segmentation_node, logic.session, logic.session.model)
        target = free_path(folder / f"{base}.seg.dcm")
        exporter = self.seg_exporter(logic.segmentation_node)
        try:
            exporter.export(str(folder), target.name, {"SeriesDescription": "FocusNet OARs", "SeriesNumber": "300",
                                                        "ContentCreatorName": "FocusNet"},
                            segmentIDs=list(names), skipEmpty=True)
        finally:
            exporter.cleanup()
        return target
