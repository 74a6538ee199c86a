"""What the module needs while Slicer starts, and nothing heavy: no numpy,
SimpleITK, scipy or FocusNetCore is imported here (Slicer imports every
module's file at start-up; FocusNet's work is imported when the panel is
first opened)."""
from typing import Optional

# slicer.parameterNodeWrapper needs 5.4; Python 3.9 and pydicom 2.4 (5.8) are
# what the code is kept to and tested against (DESIGN "Supported Slicer").
MINIMUM_SLICER = (5, 8)


def check_slicer_version(major: int, minor: int) -> Optional[str]:
    """None when this Slicer is new enough, else the message to show."""
    if (int(major), int(minor)) >= MINIMUM_SLICER:
        return None
    return (f"FocusNet needs 3D Slicer {MINIMUM_SLICER[0]}.{MINIMUM_SLICER[1]} or later; this is "
            f"{major}.{minor}. Install a current Slicer release.")


def load_terminology(terminologies_logic, path) -> str:
    """Load a terminology context file (dcmqi segment-context JSON) into
    Slicer's Terminologies logic; returns the context's name. The module
    loads ``Resources/FocusNet.term.json`` at start, so Slicer's terminology
    selector resolves the codes our segments carry."""
    name = terminologies_logic.LoadTerminologyFromFile(str(path))
    if not name:
        raise RuntimeError(f"{path}: Slicer could not load this terminology context")
    return name
