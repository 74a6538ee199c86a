"""The bridge between FocusNetCore's images and Slicer's MRML scene (no Qt).

Geometry: SimpleITK images are LPS, MRML volumes RAS; ``IJKToRAS`` is built
from origin, spacing and direction with the first two axes negated, so
voxel (i, j, k) is the same physical point in both.

Segmentations are imported through a colour table so label values stay the
catalogue's on export: every organ of the set gets a segment (ID and name
its TG-263 name, the catalogue colour, the terminology tag) before the label
map is imported into exactly those segments, label value v into organ v.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from FocusNetCore.organs import CATALOGUE, OrganSet, terminology_string

from .startup import load_terminology  # noqa: F401  (part of the API: loaded at Slicer's start-up)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def ijk_to_ras_matrix(image: sitk.Image):
    import vtk

    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    linear = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    origin = LPS_TO_RAS @ np.asarray(image.GetOrigin())
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(linear[r, c]))
        matrix.SetElement(r, 3, float(origin[r]))
    return matrix


def _image_data(array: np.ndarray):
    import vtk
    from vtk.util import numpy_support

    data = vtk.vtkImageData()
    data.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True,
                                         array_type=numpy_support.get_vtk_array_type(array.dtype))
    data.GetPointData().SetScalars(scalars)
    return data


def volume_node_from_image(scene, image: sitk.Image, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A volume node holding ``image``'s voxels with its exact geometry."""
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetAndObserveImageData(_image_data(sitk.GetArrayFromImage(image)))
    node.SetIJKToRASMatrix(ijk_to_ras_matrix(image))
    return node


def image_from_volume_node(node) -> sitk.Image:
    """The node's voxels and geometry as a SimpleITK image (LPS)."""
    import vtk
    from vtk.util import numpy_support

    data = node.GetImageData()
    dims = data.GetDimensions()
    array = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    linear = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    origin = np.array([matrix.GetElement(r, 3) for r in range(3)])
    linear, origin = LPS_TO_RAS @ linear, LPS_TO_RAS @ origin
    spacing = np.linalg.norm(linear, axis=0)
    image = sitk.GetImageFromArray(array.copy())
    image.SetOrigin(tuple(origin))
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple((linear / spacing).ravel()))
    return image


def geometry_of_volume_node(node) -> Tuple[sitk.Image, Tuple[int, int, int]]:
    """The node's grid without its voxels: a one-voxel image with its origin,
    spacing and direction (LPS), and its size."""
    import vtk

    dims = node.GetImageData().GetDimensions()
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    linear = LPS_TO_RAS @ np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    origin = LPS_TO_RAS @ np.array([matrix.GetElement(r, 3) for r in range(3)])
    spacing = np.linalg.norm(linear, axis=0)
    image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    image.SetOrigin(tuple(origin))
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple((linear / spacing).ravel()))
    return image, tuple(int(v) for v in dims)


def color_table_node(scene, organs: OrganSet, name: str = "FocusNet organs"):
    """A colour table: entry v is organ v (name and catalogue colour)."""
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(organs.num_classes)
    node.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for organ_name in organs.names:
        r, g, b = (c / 255.0 for c in CATALOGUE[organ_name].color)
        node.SetColor(organs.label_of(organ_name), organ_name, r, g, b, 1.0)
    return node


def import_labels(scene, labels: sitk.Image, organs: OrganSet, reference_volume, name: str):
    """A segmentation node with one segment per organ of the set (empty ones
    too, so a reviewer can draw a missed organ), placed beside the CT in the
    subject hierarchy, its reference geometry the CT's."""
    import slicer
    import vtk

    labelmap = volume_node_from_image(scene, sitk.Cast(labels, sitk.sitkUInt8), f"{name} labels",
                                      "vtkMRMLLabelMapVolumeNode")
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    for organ_name in organs.names:
        organ = CATALOGUE[organ_name]
        segmentation.AddEmptySegment(organ_name, organ_name, [c / 255.0 for c in organ.color])
        segment = segmentation.GetSegment(organ_name)
        segment.SetTag("TerminologyEntry", terminology_string(organ))
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        ids.InsertNextValue(organ_name)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node, ids):
        raise RuntimeError(f"Slicer could not import the label map into segmentation {name!r}")
    scene.RemoveNode(labelmap)
    place_beside(scene, segmentation_node, reference_volume)
    return segmentation_node


def new_scene():
    """A headless MRML scene with the logic Slicer registers at start-up that
    segmentations need (binary-labelmap representation, subject hierarchy)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    hierarchy = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    hierarchy.SetMRMLScene(scene)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    segmentations.SetMRMLApplicationLogic(application)
    scene._focusnet_logic = (application, hierarchy, segmentations)  # keep them alive with the scene
    return scene


def place_beside(scene, node, reference_volume) -> None:
    """Put ``node`` under the CT's parent in the subject hierarchy (its study),
    so DICOM SEG and RTSTRUCT export find the study."""
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    reference_item = hierarchy.GetItemByDataNode(reference_volume)
    if not reference_item:
        reference_item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), reference_volume)
    parent = hierarchy.GetItemParent(reference_item)
    item = hierarchy.GetItemByDataNode(node)
    if not item:
        hierarchy.CreateItem(parent, node)
    else:
        hierarchy.SetItemParent(item, parent)


def export_labels(scene, segmentation_node, reference_volume, organs: OrganSet,
                  segment_ids: Optional[Iterable[str]] = None) -> sitk.Image:
    """Segments -> label image on the CT's grid, each organ with its catalogue
    label value (through the colour table), voxel for voxel."""
    import slicer
    import vtk

    ids = vtk.vtkStringArray()
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in (segment_ids or [segmentation.GetNthSegmentID(i)
                                       for i in range(segmentation.GetNumberOfSegments())]):
        ids.InsertNextValue(segment_id)
    colors = color_table_node(scene, organs, "FocusNet export colours")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "FocusNet export")
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, ids, labelmap, reference_volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colors)
    if not ok:
        raise RuntimeError("Slicer could not export the segments to a label map")
    image = image_from_volume_node(labelmap)
    scene.RemoveNode(labelmap)
    scene.RemoveNode(colors)
    return image


def segment_names(segmentation_node) -> List[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def save_segmentation(scene, segmentation_node, path) -> None:
    """Write a ``.seg.nrrd`` with Slicer's own storage node (refuses to replace a file)."""
    import os


    if os.path.exists(path):
        raise FileExistsError(f"{path}: already exists; refusing to overwrite an exported segmentation")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    if not storage.WriteData(segmentation_node):
        raise RuntimeError(f"{path}: Slicer could not write the segmentation")
    scene.RemoveNode(storage)


def load_segmentation(scene, path, name: Optional[str] = None):
    """A ``.seg.nrrd`` (any Slicer segmentation file) read into a new
    segmentation node with Slicer's own storage node."""
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such segmentation file")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or os.path.basename(str(path)))
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    ok = storage.ReadData(node)
    scene.RemoveNode(storage)
    if not ok or node.GetSegmentation().GetNumberOfSegments() == 0:
        scene.RemoveNode(node)
        raise ValueError(f"{path}: not a readable segmentation (no segments)")
    return node


def terminology_resolves(terminologies_logic, entry: str) -> bool:
    """Whether a segment's ``TerminologyEntry`` tag names a loaded context in
    which its category, type and type modifier (laterality) all exist, and,
    where it names an anatomic region, a loaded anatomic context in which
    that region and its region modifier exist. Codes match as Slicer matches
    them: by coding scheme and code value."""
    import slicer

    parsed = slicer.vtkSlicerTerminologyEntry()
    if not terminologies_logic.DeserializeTerminologyEntry(entry, parsed):
        return False
    context = parsed.GetTerminologyContextName()
    wanted_category, wanted_type = parsed.GetCategoryObject(), parsed.GetTypeObject()
    wanted_modifier = parsed.GetTypeModifierObject()

    def same(a, b):
        return (a.GetCodingSchemeDesignator(), a.GetCodeValue()) == (b.GetCodingSchemeDesignator(), b.GetCodeValue())

    def type_resolves():
        for c in range(terminologies_logic.GetNumberOfCategoriesInTerminology(context)):
            category = slicer.vtkSlicerTerminologyCategory()
            terminologies_logic.GetNthCategoryInTerminology(context, c, category)
            if not same(category, wanted_category):
                continue
            for t in range(terminologies_logic.GetNumberOfTypesInTerminologyCategory(context, category)):
                organ_type = slicer.vtkSlicerTerminologyType()
                terminologies_logic.GetNthTypeInTerminologyCategory(context, category, t, organ_type)
                if not same(organ_type, wanted_type):
                    continue
                if not wanted_modifier.GetCodeValue():
                    return True
                for m in range(terminologies_logic.GetNumberOfTypeModifiersInTerminologyType(context, category,
                                                                                             organ_type)):
                    modifier = slicer.vtkSlicerTerminologyType()
                    terminologies_logic.GetNthTypeModifierInTerminologyType(context, category, organ_type, m,
                                                                            modifier)
                    if same(modifier, wanted_modifier):
                        return True
        return False

    def api(new, old):  # Slicer 5.10 renamed "anatomic context" to "region context"
        return getattr(terminologies_logic, new, None) or getattr(terminologies_logic, old)

    def region_resolves():
        region_of_entry = getattr(parsed, "GetRegionObject", None) or parsed.GetAnatomicRegionObject
        modifier_of_entry = getattr(parsed, "GetRegionModifierObject", None) or parsed.GetAnatomicRegionModifierObject
        wanted_region, wanted_region_modifier = region_of_entry(), modifier_of_entry()
        if not wanted_region.GetCodeValue():
            return True  # no anatomic region
        region_context = (getattr(parsed, "GetRegionContextName", None) or parsed.GetAnatomicContextName)()
        if not region_context:
            return False
        count = api("GetNumberOfRegionsInRegionContext", "GetNumberOfRegionsInAnatomicContext")
        nth = api("GetNthRegionInRegionContext", "GetNthRegionInAnatomicContext")
        count_modifiers = api("GetNumberOfRegionModifierInRegion", "GetNumberOfRegionModifierInAnatomicRegion")
        nth_modifier = api("GetNthRegionModifierInRegion", "GetNthRegionModifierInAnatomicRegion")
        for r in range(count(region_context)):
            region = slicer.vtkSlicerTerminologyType()
            nth(region_context, r, region)
            if not same(region, wanted_region):
                continue
            if not wanted_region_modifier.GetCodeValue():
                return True
            if not region.GetHasModifiers():  # Slicer logs an error when asked for modifiers of such a region
                return False
            for m in range(count_modifiers(region_context, region)):
                modifier = slicer.vtkSlicerTerminologyType()
                nth_modifier(region_context, region, m, modifier)
                if same(modifier, wanted_region_modifier):
                    return True
        return False

    return type_resolves() and region_resolves()


def segment_editor_node(scene, tag: str):
    """The module's own Segment Editor parameter node (a singleton with
    ``tag``, so the Segment Editor module's settings are left alone)."""
    node = scene.GetSingletonNode(tag, "vtkMRMLSegmentEditorNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
        node.UnRegister(None)
        node.SetSingletonTag(tag)
        node = scene.AddNode(node)
    return node


def region_of(mask: sitk.Image, reference: sitk.Image, size=None) -> Tuple[int, int, int, int, int, int]:
    """The voxel box (i0, j0, k0, i1, j1, k1; stop exclusive) that ``mask``
    covers on ``reference``'s grid (of ``size``, default the reference's);
    refused unless it lies on that grid (same spacing and direction, origin
    on a voxel, inside)."""
    size = np.asarray(size if size is not None else reference.GetSize())
    if not (np.allclose(mask.GetSpacing(), reference.GetSpacing(), atol=1e-4)
            and np.allclose(mask.GetDirection(), reference.GetDirection(), atol=1e-5)):
        raise ValueError("the mask is not on the CT's grid (spacing or direction differ)")
    start = np.asarray(reference.TransformPhysicalPointToContinuousIndex(mask.GetOrigin()))
    if not np.allclose(start, np.round(start), atol=1e-3):
        raise ValueError("the mask's origin does not lie on a voxel of the CT's grid")
    start = np.round(start).astype(int)
    stop = start + np.asarray(mask.GetSize())
    if np.any(start < 0) or np.any(stop > size):
        raise ValueError(f"the mask's box {start.tolist()}-{stop.tolist()} reaches outside the CT "
                         f"({size.tolist()} voxels)")
    return tuple(int(v) for v in start) + tuple(int(v) for v in stop)


def replace_in_region(segmentation_node, segment_id: str, reference_volume, mask: sitk.Image) -> None:
    """Make ``segment_id``'s contour equal to ``mask`` (0/1 on the CT's grid)
    inside the mask's box, and leave it as it was outside; other segments are
    untouched. Two modifications in Slicer's segmentation logic: the box is
    cleared of the segment (merge-min with zeros), then the mask is added
    (merge-mask) - what the Segment Editor's erase and paint do."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    box = region_of(mask, *geometry_of_volume_node(reference_volume))
    array = (sitk.GetArrayFromImage(mask) > 0).astype(np.uint8)
    matrix = vtk.vtkMatrix4x4()
    reference_volume.GetIJKToRASMatrix(matrix)
    modifier = slicer.vtkOrientedImageData()
    modifier.SetExtent(box[0], box[3] - 1, box[1], box[4] - 1, box[2], box[5] - 1)
    modifier.SetImageToWorldMatrix(matrix)
    modifier.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True,
                                                                 array_type=vtk.VTK_UNSIGNED_CHAR))
    empty = slicer.vtkOrientedImageData()
    empty.DeepCopy(modifier)
    empty.GetPointData().GetScalars().Fill(0)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    extent = modifier.GetExtent()
    if not (logic.SetBinaryLabelmapToSegment(empty, segmentation_node, segment_id, logic.MODE_MERGE_MIN, extent)
            and logic.SetBinaryLabelmapToSegment(modifier, segmentation_node, segment_id, logic.MODE_MERGE_MASK,
                                                 extent)):
        raise RuntimeError(f"Slicer could not write the new contour of {segment_id}")


def replace_labels_in_region(segmentation_node, reference_volume, organs: OrganSet, region: sitk.Image,
                             names: Iterable[str]) -> None:
    """Make each of ``names``'s contours equal to ``region == its label value``
    inside ``region``'s box (a label map on the CT's grid over a box), in two
    passes: every named segment is cleared from the box first, then each is
    written; so no two segments ever hold one voxel (an overlap would put a
    segment in a layer of its own, and the label map every export is written
    from would keep only one of them)."""
    names = list(names)
    array = sitk.GetArrayViewFromImage(region)
    empty = sitk.Image(region.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(region)
    for name in names:
        replace_in_region(segmentation_node, name, reference_volume, empty)
    for name in names:
        mask = (array == organs.label_of(name)).astype(np.uint8)
        if mask.any():
            image = sitk.GetImageFromArray(mask)
            image.CopyInformation(region)
            replace_in_region(segmentation_node, name, reference_volume, image)


def segment_in_region(scene, segmentation_node, segment_id: str, reference_volume, organs: OrganSet,
                      like: sitk.Image) -> sitk.Image:
    """``segment_id``'s contour (0/1) over ``like``'s box on the CT's grid
    (what :func:`replace_in_region` replaces: kept for undo)."""
    whole = export_labels(scene, segmentation_node, reference_volume, organs, [segment_id])
    i0, j0, k0, i1, j1, k1 = region_of(like, whole)
    array = (sitk.GetArrayViewFromImage(whole)[k0:k1, j0:j1, i0:i1] > 0).astype(np.uint8)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(like)
    return out


def segment_volumes_cc(segmentation_node) -> dict:
    """Each segment's volume now (cc, by name), from its binary label map:
    one count per shared label map (layer), so a 22-organ segmentation costs
    as many passes as it has layers."""
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    counts, volumes = {}, {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        labelmap = segment.GetRepresentation("Binary labelmap")
        key = id(labelmap)
        if key not in counts:
            bins = layer_counts(labelmap)
            if bins is None:
                volumes[segment.GetName()] = 0.0
                continue
            matrix = vtk.vtkMatrix4x4()
            labelmap.GetImageToWorldMatrix(matrix)
            columns = np.array([[matrix.GetElement(r, c) for r in range(3)] for c in range(3)])
            counts[key] = (bins, float(abs(np.linalg.det(columns))) / 1000.0)
        bins, voxel_cc = counts[key]
        value = segment.GetLabelValue()
        volumes[segment.GetName()] = float(bins[value]) * voxel_cc if value < len(bins) else 0.0
    return volumes


def layer_counts(labelmap) -> Optional[np.ndarray]:
    """Voxels per label value of a (shared) binary label map, in one pass;
    None when it holds no voxels."""
    from vtk.util import numpy_support

    scalars = labelmap.GetPointData().GetScalars() if labelmap is not None and labelmap.GetPointData() else None
    if scalars is None:
        return None
    return np.bincount(numpy_support.vtk_to_numpy(scalars).ravel().astype(np.int64), minlength=256)
