"""The organ catalogue: the single source of names, colours, terminology and
label values for every organ FocusNet knows.

Names follow AAPM TG-263. SNOMED CT codes and laterality qualifiers follow the
HL7 mCODE TG-263 concept map (left 7771000, right 24028007), with the map's
known slip corrected: OpticNrv_R carries the *right* qualifier.

Two organ sets are defined, each an ordered tuple of catalogue names whose
position + 1 is the label value:

- ``oar22``: the paper's own 22 OARs (section 4.1), small organs as in its
  footnote 1 (lenses, optic nerves, chiasm, pituitary).
- ``pddca9``: the MICCAI 2015 / PDDCA set (brain stem, mandible, chiasm, optic
  nerves, parotids, submandibular glands), small organs: optic nerves, chiasm.

This module must stay importable without torch, Slicer or Qt: the Slicer
process reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Dict, Mapping, Optional, Tuple

LEFT = ("7771000", "Left")
RIGHT = ("24028007", "Right")
ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")


@dataclass(frozen=True)
class Organ:
    """One catalogue entry.

    ``volume_cc`` is the typical adult volume range in cm^3, used to flag
    implausible segmentations and to check the phantom.
    """

    name: str  # AAPM TG-263
    display_name: str
    color: Tuple[int, int, int]  # RGB 0..255
    snomed_code: str
    snomed_meaning: str
    laterality: Optional[str]  # "L", "R" or None
    small: bool
    volume_cc: Tuple[float, float]
    # An extra SNOMED type modifier besides laterality, written to DICOM SEG only
    # (a Slicer terminology entry has one type modifier: the laterality). No
    # catalogue organ uses one.
    modifier: Optional[Tuple[str, str]] = None

    @property
    def laterality_code(self) -> Optional[Tuple[str, str]]:
        return {"L": LEFT, "R": RIGHT}.get(self.laterality or "")

    @property
    def mirror_name(self) -> Optional[str]:
        """The contralateral organ's name (``Parotid_L`` -> ``Parotid_R``)."""
        if self.laterality == "L":
            return self.name[:-2] + "_R"
        if self.laterality == "R":
            return self.name[:-2] + "_L"
        return None


def _pair(base, display, color_l, color_r, code, meaning, small, volume, modifier=None):
    return (
        Organ(f"{base}_L", f"{display} left", color_l, code, meaning, "L", small, volume, modifier),
        Organ(f"{base}_R", f"{display} right", color_r, code, meaning, "R", small, volume, modifier),
    )


_ENTRIES = (
    *_pair("Eye", "Eye", (194, 135, 96), (216, 160, 120), "81745001", "Eye", False, (4.5, 9.5)),
    *_pair("Lens", "Lens", (120, 220, 255), (80, 180, 240), "78076003", "Lens", True, (0.12, 0.6)),
    *_pair("OpticNrv", "Optic nerve", (255, 230, 0), (230, 190, 0), "18234004", "Optic nerve",
           True, (0.25, 1.4)),
    Organ("OpticChiasm", "Optic chiasm", (255, 120, 0), "244453006", "Optic chiasm", None, True,
          (0.2, 1.3)),
    Organ("Pituitary", "Pituitary gland", (255, 80, 160), "56329008", "Pituitary gland", None,
          True, (0.15, 0.9)),
    Organ("Brainstem", "Brain stem", (160, 90, 220), "15926001", "Brainstem", None, False,
          (15.0, 40.0)),
    *_pair("Lobe_Temporal", "Temporal lobe", (120, 200, 120), (90, 170, 90), "78277001",
           "Temporal lobe", False, (35.0, 110.0)),
    Organ("SpinalCord", "Spinal cord", (255, 255, 140), "2748008", "Spinal cord", None, False,
          (4.0, 40.0)),  # in the field of view, which varies with the scan
    *_pair("Parotid", "Parotid gland", (60, 120, 255), (30, 80, 200), "45289007",
           "Parotid gland", False, (12.0, 50.0)),
    # The ear parts by their own codes, as Slicer's General Anatomy list and its
    # anatomic region list name them (not "Ear" 117590005 + an internal/middle
    # qualifier, which neither list has).
    *_pair("Ear_Internal", "Inner ear", (255, 60, 60), (200, 30, 30), "22945000", "Inner ear",
           False, (0.1, 1.0)),
    *_pair("Ear_Middle", "Middle ear", (255, 160, 140), (220, 120, 100), "25342003", "Middle ear",
           False, (0.3, 3.0)),
    *_pair("Joint_TM", "Temporomandibular joint", (140, 255, 200), (90, 220, 160), "53620006",
           "Temporomandibular joint", False, (0.4, 4.0)),
    *_pair("Bone_Mandible", "Mandible", (240, 240, 220), (210, 210, 190), "91609006",
           "Mandible", False, (15.0, 45.0)),
    Organ("Bone_Mandible", "Mandible", (230, 230, 210), "91609006", "Mandible", None, False,
          (35.0, 90.0)),
    *_pair("Glnd_Submand", "Submandibular gland", (190, 110, 40), (150, 85, 30), "385296007",
           "Submandibular gland", False, (3.5, 15.0)),
)

CATALOGUE: Dict[str, Organ] = {organ.name: organ for organ in _ENTRIES}

# Paper section 4.1, in the paper's order.
OAR22 = (
    "Eye_L", "Eye_R", "Lens_L", "Lens_R", "OpticNrv_L", "OpticNrv_R", "OpticChiasm",
    "Pituitary", "Brainstem", "Lobe_Temporal_L", "Lobe_Temporal_R", "SpinalCord",
    "Parotid_L", "Parotid_R", "Ear_Internal_L", "Ear_Internal_R", "Ear_Middle_L",
    "Ear_Middle_R", "Joint_TM_L", "Joint_TM_R", "Bone_Mandible_L", "Bone_Mandible_R",
)
# Paper section 4.5 (MICCAI 2015 / PDDCA).
PDDCA9 = (
    "Brainstem", "Bone_Mandible", "OpticChiasm", "OpticNrv_L", "OpticNrv_R",
    "Parotid_L", "Parotid_R", "Glnd_Submand_L", "Glnd_Submand_R",
)
PDDCA9_SMALL = ("OpticChiasm", "OpticNrv_L", "OpticNrv_R")

# The PDDCA archive's own structure file names.
PDDCA_FILE_NAMES: Mapping[str, str] = {
    "Brainstem": "BrainStem", "Bone_Mandible": "Mandible", "OpticChiasm": "Chiasm",
    "OpticNrv_L": "OpticNerve_L", "OpticNrv_R": "OpticNerve_R", "Parotid_L": "Parotid_L",
    "Parotid_R": "Parotid_R", "Glnd_Submand_L": "Submandibular_L",
    "Glnd_Submand_R": "Submandibular_R",
}


@dataclass(frozen=True)
class OrganSet:
    """An ordered organ set; label value = position + 1, background = 0."""

    key: str
    names: Tuple[str, ...]
    small_names: Tuple[str, ...]

    def __post_init__(self):
        unknown = [n for n in self.names if n not in CATALOGUE]
        if unknown:
            raise ValueError(f"organ set {self.key!r}: names not in the catalogue: {unknown}")
        stray = [n for n in self.small_names if n not in self.names]
        if stray:
            raise ValueError(f"organ set {self.key!r}: small organs not in the set: {stray}")

    @property
    def organs(self) -> Tuple[Organ, ...]:
        return tuple(CATALOGUE[n] for n in self.names)

    @property
    def num_classes(self) -> int:
        """Organ classes plus background."""
        return len(self.names) + 1

    def label_of(self, name: str) -> int:
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise KeyError(f"organ {name!r} is not in organ set {self.key!r}") from None

    def name_of(self, label: int) -> str:
        if not 1 <= label <= len(self.names):
            raise KeyError(f"label {label} is not in organ set {self.key!r} (1..{len(self.names)})")
        return self.names[label - 1]

    @property
    def small_labels(self) -> Tuple[int, ...]:
        return tuple(self.label_of(n) for n in self.small_names)

    @cached_property
    def mirror_labels(self) -> Tuple[int, ...]:
        """For each label (background first) the label of the contralateral
        organ (``Parotid_L`` <-> ``Parotid_R``); midline organs, background
        and organs whose partner is not in the set map to themselves.
        Computed once per set: training asks for it every iteration."""
        out = [0]
        for organ in self.organs:
            partner = organ.mirror_name
            out.append(self.label_of(partner) if partner in self.names else self.label_of(organ.name))
        return tuple(out)


ORGAN_SETS: Dict[str, OrganSet] = {
    "oar22": OrganSet("oar22", OAR22, tuple(n for n in OAR22 if CATALOGUE[n].small)),
    "pddca9": OrganSet("pddca9", PDDCA9, PDDCA9_SMALL),
    # What the phantom labels: the 22 OARs plus the submandibular glands, so
    # both sets above can be derived from it.
    "phantom24": OrganSet("phantom24", OAR22 + ("Glnd_Submand_L", "Glnd_Submand_R"),
                          tuple(n for n in OAR22 if CATALOGUE[n].small)),
}

# A whole organ made of halves that other sets keep apart.
UNIONS: Mapping[str, Tuple[str, ...]] = {"Bone_Mandible": ("Bone_Mandible_L", "Bone_Mandible_R")}


def get_organ_set(key: str) -> OrganSet:
    try:
        return ORGAN_SETS[key]
    except KeyError:
        raise KeyError(f"unknown organ set {key!r}; known: {sorted(ORGAN_SETS)}") from None


def convert_labels(labels, source: OrganSet, target: OrganSet):
    """Map a label array from one organ set to another by organ name.

    Organs of ``source`` that ``target`` lacks become background; a target
    organ that ``source`` holds only as halves (the whole mandible) is their
    union. Returns the new array and the target organs that could not be
    made (absent from ``source``).
    """
    import numpy as np

    lookup = np.zeros(max(source.num_classes, int(labels.max(initial=0)) + 1), dtype=np.uint16)
    missing = []
    for name in target.names:
        parts = (name,) if name in source.names else UNIONS.get(name, ())
        parts = [p for p in parts if p in source.names]
        if not parts:
            missing.append(name)
        for part in parts:
            lookup[source.label_of(part)] = target.label_of(name)
    out = lookup[labels]
    return out.astype(np.uint8 if target.num_classes < 256 else np.uint16), missing


# The terminology context our segments point at: FocusNetSegment/Resources/FocusNet.term.json
# (FocusNetCore.terminology), which the Slicer module loads at start. Slicer's own
# "3D Slicer General Anatomy list" lacks several of these types (lens, optic nerve,
# brainstem, parotid, ...) and a left/right mandible.
TERMINOLOGY_CONTEXT = "FocusNet head-and-neck organs at risk"
SLICER_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def terminology_string(organ: Organ) -> str:
    """The organ's terminology entry as Slicer stores it in a segment's
    ``TerminologyEntry`` tag: context~category~type~type modifier~anatomic
    context~anatomic region~region modifier, codes as scheme^value^meaning.
    The organ is the type, its laterality the type modifier. No anatomic
    region: the type already is the anatomy (Slicer's "Anatomical Structure"
    category has showAnatomy false), as in Slicer's own General Anatomy list.
    Codes are those of Slicer's lists where Slicer has them
    (Testing/test_terminology.py checks against Slicer's files)."""
    def code(c):
        return f"SCT^{c[0]}^{c[1]}" if c else "^^"

    category = code(ANATOMICAL_STRUCTURE)
    organ_type = code((organ.snomed_code, organ.snomed_meaning))
    return "~".join([TERMINOLOGY_CONTEXT, category, organ_type, code(organ.laterality_code),
                     SLICER_ANATOMIC_CONTEXT, "^^", "^^"])


def terminology_entry(organ: Organ) -> dict:
    """The organ's segment context in the dcmqi segment-context JSON schema
    (the form Slicer's Terminologies module reads from a ``.term.json``)."""
    entry = {
        "CodeMeaning": organ.snomed_meaning,
        "CodingSchemeDesignator": "SCT",
        "CodeValue": organ.snomed_code,
        "recommendedDisplayRGBValue": list(organ.color),
    }
    modifiers = [m for m in (organ.modifier, organ.laterality_code) if m]
    if modifiers:
        entry["Modifier"] = [
            {"CodeMeaning": meaning, "CodingSchemeDesignator": "SCT", "CodeValue": code}
            for code, meaning in modifiers
        ]
    return entry
