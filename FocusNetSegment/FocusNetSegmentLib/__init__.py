"""Slicer-side logic of the FocusNet module that needs MRML but not Qt:
the module's logic (``logic.SegmentOARsLogic``), the scene bridge, the
background segmentation process, the review session with its timing, and
export. Tested headless against the slicer-core wheel.

Importing the package makes FocusNetCore importable when it is not yet: in
an installed extension it lies beside the module; in the source tree
(Developer mode, "Add module path" = FocusNetSegment/) one level up.
"""
import importlib.util
import sys
from pathlib import Path


def find_core_directory(module_dir) -> str:
    """The folder holding the FocusNetCore package: beside the module in an
    installed extension, one level up in the source tree."""
    module_dir = Path(module_dir).resolve()
    for candidate in (module_dir, module_dir.parent):
        if (candidate / "FocusNetCore" / "__init__.py").is_file():
            return str(candidate)
    raise RuntimeError(f"FocusNetCore was found neither in {module_dir} nor in {module_dir.parent}: "
                       "the extension is incompletely installed")


if importlib.util.find_spec("FocusNetCore") is None:
    try:
        sys.path.insert(0, find_core_directory(Path(__file__).resolve().parents[1]))
    except RuntimeError:
        pass  # the logic says so, with this message, when it needs the core
