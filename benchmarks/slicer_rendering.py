"""A picture of a FocusNet segmentation as Slicer holds it: the phantom
segmented by the embedded model, imported into an MRML scene by
FocusNetSegmentLib (the module's own code path), converted to closed
surfaces by Slicer's segmentation logic and rendered offscreen with VTK.

    .venv/bin/python benchmarks/slicer_rendering.py --out docs/images/slicer_segmentation_3d.png
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "FocusNetSegment"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/images/slicer_segmentation_3d.png")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    import vtk
    from FocusNetCore.phantom import generate_case
    from FocusNetCore.segment import Segmenter
    from FocusNetSegmentLib import scene as bridge

    case = generate_case(args.seed, "full")
    segmenter = Segmenter(args.model, device="cpu")
    result = segmenter.segment(case.image)
    scene = bridge.new_scene()
    ct = bridge.volume_node_from_image(scene, case.image, "Phantom CT")
    seg = bridge.import_labels(scene, result.labels, segmenter.config.organs, ct, "Phantom CT OARs")
    seg.CreateClosedSurfaceRepresentation()
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.08, 0.08, 0.12)
    segmentation = seg.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        surface = vtk.vtkPolyData()
        seg.GetClosedSurfaceRepresentation(segment_id, surface)
        if surface.GetNumberOfPoints() == 0:
            continue
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(surface)
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(segmentation.GetNthSegment(i).GetColor())
        renderer.AddActor(actor)
    # RAS: look at the face from the front, a little from the patient's left and above.
    camera = renderer.GetActiveCamera()
    camera.SetViewUp(0, 0, 1)
    camera.SetPosition(-250, 700, 250)
    renderer.ResetCamera()
    camera.Zoom(1.4)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(900, 700)
    window.AddRenderer(renderer)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(args.out)
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    print(f"wrote {args.out} ({segmenter.model_info['name']}, {sum(o.present for o in result.organs)} organs)")


if __name__ == "__main__":
    main()
