"""Which of FocusNetCore's requirements are missing from Slicer's Python, and
the pip command that installs them without touching what Slicer ships.

torch comes from the PyTorch extension (PyTorchUtils); everything else by a
selective pip install under a constraints file that pins Slicer's own
numpy, SimpleITK and vtk to the versions already installed, so pip can never
replace them.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

# import name -> pip requirement: what inference and the review need besides
# torch (training's pyyaml, matplotlib and tqdm are not installed into Slicer).
# Slicer's Python already has pydicom; it is listed for older builds.
REQUIREMENTS: Dict[str, str] = {
    "scipy": "scipy>=1.10",
    "pydicom": "pydicom>=2.4",
    # DICOM SEG without Slicer's plugin; with Slicer's pydicom 2.4 pip picks
    # highdicom 0.22, the last release for it.
    "highdicom": "highdicom>=0.22",
    # RTSTRUCT export without SlicerRT: FocusNet's writer traces each organ's
    # outline with contourpy (matplotlib's contouring, without matplotlib),
    # which released Slicer does not ship (issue 46).
    "contourpy": "contourpy>=1.0",
    # The review's surface Dice (Nikolov et al.'s reference implementation;
    # pure Python, brings absl-py).
    "surface_distance": "surface-distance>=0.1",
    # S-Net and SOL-Net on the CPU, 1.3-1.7x PyTorch's speed there (the
    # segmentation subprocess falls back to PyTorch without it); pip picks
    # the last release with wheels for Slicer's Python.
    "openvino": "openvino>=2024.0",
}
# The PyTorch extension installs torch; this is the range FocusNetCore supports.
TORCH_REQUIREMENT = ">=2.1"
PROTECTED = ("numpy", "SimpleITK", "vtk", "pydicom")

NO_PYTORCH_EXTENSION = ("FocusNet needs PyTorch: install the PyTorch extension from the Extensions Manager, "
                        "restart Slicer, and click Segment OARs again.")
TORCH_QUESTION = "FocusNet needs PyTorch. Install it now (several GB for a GPU build)?"
TORCH_FAILED = "PyTorch could not be installed (offline?). Install it with the PyTorch extension's module."


def packages_question(missing: List[str]) -> str:
    return (f"FocusNet needs these Python packages: {', '.join(missing)}. Install them? (Slicer's own "
            f"{', '.join(PROTECTED)} are kept as they are.)")


def missing_requirements() -> List[str]:
    return [req for module, req in REQUIREMENTS.items() if importlib.util.find_spec(module) is None]


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def protected_constraints() -> List[str]:
    """``name==version`` of every protected package that is installed."""
    pins = []
    for name in PROTECTED:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def pip_command(requirements: List[str], folder: Path, python: str = sys.executable) -> List[str]:
    """``python -m pip install`` of ``requirements`` constrained so numpy,
    SimpleITK, vtk and pydicom stay exactly as they are (inside Slicer
    ``python`` is PythonSlicer). The constraints file is
    ``folder``/pip-constraints.txt, written again (atomically) on every call:
    one file, not one more in the temporary folder per install."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pip-constraints.txt"
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".pip-constraints-", delete=False) as part:
        part.write("\n".join(protected_constraints()) + "\n")
    os.replace(part.name, path)
    return [python, "-m", "pip", "install", "--progress-bar", "off", "--constraint", str(path), *requirements]
