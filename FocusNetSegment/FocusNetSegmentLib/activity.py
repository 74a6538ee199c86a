"""Acts of reviewing that change no contour, read from the MRML scene, for
the review's active-time clock (:meth:`ReviewSession.activity`).

Both front ends drive the same MRML nodes: scrolling a slice view moves its
slice node, window/level changes the CT's display node, rotating or zooming
the 3D view moves its camera node, selecting a segment or toggling its
visibility changes the segment editor or segmentation display node. So one
monitor, observing those nodes' ``ModifiedEvent``, serves the Slicer module
and the browser station alike, and slicer-core tests it without a GUI.

What is not observed, on purpose: the crosshair (it follows the mouse
pointer, not an act), and the segmentation node itself (edits are counted by
the session from the label maps).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

# MRML class -> activity kind. A node of a subclass counts as its base (IsA).
OBSERVED = (
    ("vtkMRMLSliceNode", "slice"),                     # scroll, pan, zoom, orientation of a slice view
    ("vtkMRMLCameraNode", "view3d"),                   # rotate, zoom, pan in 3D
    ("vtkMRMLScalarVolumeDisplayNode", "window_level"),  # window/level, presets
    ("vtkMRMLSegmentationDisplayNode", "display"),     # visibility, opacity, 3D surfaces
    ("vtkMRMLSegmentEditorNode", "selection"),         # selected segment, effect
    ("vtkMRMLLayoutNode", "view"),                     # layout changes
)


class ActivityMonitor:
    """Calls ``on_activity(kind)`` when a watched node of ``scene`` changes,
    including nodes added later. ``stop()`` removes every observer."""

    def __init__(self, scene, on_activity: Callable[[str], None]):
        self.scene = scene
        self.on_activity = on_activity
        self._observed: Dict[int, Tuple[object, int]] = {}
        self._scene_tags: List[int] = []

    def start(self) -> "ActivityMonitor":
        import vtk

        for index in range(self.scene.GetNumberOfNodes()):
            self._watch(self.scene.GetNthNode(index))

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def on_node_added(caller, event, node):
            self._watch(node)

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def on_node_removed(caller, event, node):
            entry = self._observed.pop(id(node), None)
            if entry is not None:
                entry[0].RemoveObserver(entry[1])

        self._callbacks = (on_node_added, on_node_removed)  # VTK holds Python callbacks weakly
        self._scene_tags = [self.scene.AddObserver(self.scene.NodeAddedEvent, on_node_added),
                            self.scene.AddObserver(self.scene.NodeRemovedEvent, on_node_removed)]
        return self

    def stop(self) -> None:
        for node, tag in self._observed.values():
            node.RemoveObserver(tag)
        self._observed.clear()
        for tag in self._scene_tags:
            self.scene.RemoveObserver(tag)
        self._scene_tags = []

    def _watch(self, node) -> None:
        if node is None or id(node) in self._observed:
            return
        kind = next((k for cls, k in OBSERVED if node.IsA(cls)), None)
        if kind is None:
            return

        # A kind with a signature counts only when the signature changes.
        signature = SIGNATURES.get(kind)
        last = [signature(node)] if signature else None

        def on_modified(caller, event, kind=kind):
            if signature is not None:
                now = signature(caller)
                if now == last[0]:
                    return
                last[0] = now
            self.on_activity(kind)

        self._observed[id(node)] = (node, node.AddObserver("ModifiedEvent", on_modified))


def _camera_pose(node) -> tuple:
    """What the reviewer moves in the 3D view: position, focal point, view up,
    view angle, parallel scale and projection."""
    return (tuple(node.GetPosition()), tuple(node.GetFocalPoint()), tuple(node.GetViewUp()), node.GetViewAngle(),
            node.GetParallelScale(), node.GetParallelProjection())


# Every render of the 3D view resets the camera's clipping range, which
# modifies its node too: only a changed pose is an act (a render that lands
# in an idle pause must not end the pause).
SIGNATURES = {"view3d": _camera_pose}
