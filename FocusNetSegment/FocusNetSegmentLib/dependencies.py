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
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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


def torch_version() -> Optional[str]:
    """The installed torch's version, read from its metadata (torch is never
    imported into Slicer's process); None when it is not installed."""
    if not torch_available():
        return None
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def version_tuple(version: str) -> Tuple[int, ...]:
    """"2.1.0+cu121" -> (2, 1, 0); "2.0.0a0" -> (2, 0, 0)."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = re.match(r"\d+", piece)
        parts.append(int(digits.group()) if digits else 0)
    return tuple(parts)


def torch_too_old(version: Optional[str]) -> bool:
    return version is not None and version_tuple(version) < version_tuple(TORCH_REQUIREMENT.lstrip(">="))


def pytorch_extension_available() -> bool:
    return importlib.util.find_spec("PyTorchUtils") is not None


@dataclass
class InstallPlan:
    """What the first click must install: PyTorch ("install", "upgrade" of a
    too-old one, or None) through the PyTorch extension, and the missing
    packages through pip; one question lists it all."""
    torch_action: Optional[str]
    torch_installed: Optional[str]
    packages: List[str]

    @property
    def ready(self) -> bool:
        return self.torch_action is None and not self.packages

    def names(self) -> List[str]:
        torch = [f"PyTorch {TORCH_REQUIREMENT}"] if self.torch_action else []
        return torch + list(self.packages)

    def question(self) -> str:
        lines = ["FocusNet needs to install:"]
        if self.torch_action == "install":
            lines.append(f"- PyTorch {TORCH_REQUIREMENT}, with the PyTorch extension (several GB for a GPU build)")
        elif self.torch_action == "upgrade":
            lines.append(f"- PyTorch {TORCH_REQUIREMENT} in place of the installed {self.torch_installed}, which "
                         "is too old, with the PyTorch extension (other modules using PyTorch get it too)")
        lines += [f"- {requirement}" for requirement in self.packages]
        lines.append(f"Install now? Slicer's own {', '.join(PROTECTED)} are kept as they are.")
        return "\n".join(lines)


def install_plan() -> InstallPlan:
    version = torch_version()
    action = "install" if not torch_available() else "upgrade" if torch_too_old(version) else None
    return InstallPlan(action, version, missing_requirements())


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
