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
import sys
import tempfile
from typing import Dict, List

# import name -> pip requirement (what FocusNetCore needs besides torch)
REQUIREMENTS: Dict[str, str] = {
    "pydicom": "pydicom>=2.4",
    "scipy": "scipy>=1.10",
    "yaml": "pyyaml>=6.0",
    "matplotlib": "matplotlib>=3.7",
    "tqdm": "tqdm>=4.60",
}
PROTECTED = ("numpy", "SimpleITK", "vtk")


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


def pip_command(requirements: List[str]) -> List[str]:
    """``python -m pip install`` of ``requirements`` constrained so numpy,
    SimpleITK and vtk stay exactly as they are."""
    constraints = tempfile.NamedTemporaryFile("w", suffix="-focusnet-constraints.txt", delete=False)
    constraints.write("\n".join(protected_constraints()) + "\n")
    constraints.close()
    return [sys.executable, "-m", "pip", "install", "--constraint", constraints.name, *requirements]
