"""FocusNet's segment terminology against 3D Slicer's own terminology files.

Every organ's ``TerminologyEntry`` (``FocusNetCore.organs.terminology_string``)
must resolve: category, type and type modifier (laterality) in the module's
context ``FocusNetSegment/Resources/FocusNet.term.json`` and, where the type is
one of Slicer's "3D Slicer General Anatomy list", there too; anatomic region and
region modifier (if any) in Slicer's "Anatomic codes - DICOM master list". The
Slicer files are whole copies from Slicer v5.8.1 (Testing/data/slicer-terminology/).

Codes match as Slicer's vtkSlicerTerminologiesModuleLogic matches them: by coding
scheme designator and code value (GetCodeInArray); meanings are free text.
The plain-JSON checks need no Slicer; the last test runs the same entries through
Slicer's own Terminologies logic (slicer-core) and FocusNet's resolver.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

import pytest

from FocusNetCore.organs import (ANATOMICAL_STRUCTURE, CATALOGUE, LEFT, ORGAN_SETS, RIGHT, SLICER_ANATOMIC_CONTEXT,
                                 TERMINOLOGY_CONTEXT, terminology_string)

ROOT = Path(__file__).resolve().parents[1]
TERM_FILE = ROOT / "FocusNetSegment" / "Resources" / "FocusNet.term.json"
FIXTURE = ROOT / "Testing" / "data" / "slicer-terminology"
ANATOMY_FILE = "AnatomicRegionAndModifier-DICOM-Master.json"
GENERAL_ANATOMY_FILE = "SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json"
# Git blob ids of the files at Slicer v5.8.1 (the same at v5.10.0 and v5.12.3).
SLICER_BLOBS = {ANATOMY_FILE: "d63bb998c313485766fe52a823d5a539fe727951",
                GENERAL_ANATOMY_FILE: "f1ea8d77bef853ff9f718064544d073539432826"}
GENERAL_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"

# The organs the module's context covers: the paper's 22 and the PDDCA set.
NAMES = list(dict.fromkeys(ORGAN_SETS["oar22"].names + ORGAN_SETS["pddca9"].names))
EARS = ("Ear_Internal_L", "Ear_Internal_R", "Ear_Middle_L", "Ear_Middle_R")
# Slicer has the mandible only whole (no left/right modifier in any of its
# lists); the paper's mandible halves exist in FocusNet's own context only.
ONLY_IN_FOCUSNET_CONTEXT = {"Bone_Mandible_L", "Bone_Mandible_R"}
OLD_EAR_ENTRY = (f"{TERMINOLOGY_CONTEXT}~SCT^123037004^Anatomical Structure~SCT^117590005^Ear~SCT^24028007^Right~"
                 f"{SLICER_ANATOMIC_CONTEXT}~SCT^117590005^Ear~SCT^260521003^Internal")


def slicer_file(name: str) -> bytes:
    return gzip.decompress((FIXTURE / f"{name}.gz").read_bytes())


def git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture(scope="module")
def focusnet_context():
    return json.loads(TERM_FILE.read_text())


@pytest.fixture(scope="module")
def general_anatomy():
    return json.loads(slicer_file(GENERAL_ANATOMY_FILE))


@pytest.fixture(scope="module")
def anatomy():
    return json.loads(slicer_file(ANATOMY_FILE))


def parse(entry: str):
    """A serialized entry as Slicer's DeserializeTerminologyEntry splits it:
    7 ``~`` parts, codes ``scheme^value^meaning`` (``^^``: none -> None)."""
    parts = entry.split("~")
    assert len(parts) == 7, entry

    def code(text):
        fields = text.split("^")
        assert len(fields) == 3, text
        return None if not fields[1] else (fields[0], fields[1])

    return {"context": parts[0], "category": code(parts[1]), "type": code(parts[2]),
            "type_modifier": code(parts[3]), "anatomic_context": parts[4], "region": code(parts[5]),
            "region_modifier": code(parts[6])}


def find(items, code):
    """The item with this (scheme, value), as Slicer's GetCodeInArray finds it."""
    for item in items or ():
        if (item.get("CodingSchemeDesignator"), item.get("CodeValue")) == code:
            return item
    return None


def type_resolves(context: dict, parsed: dict) -> bool:
    category = find(context["SegmentationCodes"]["Category"], parsed["category"])
    organ_type = category and find(category.get("Type"), parsed["type"])
    if not organ_type:
        return False
    return parsed["type_modifier"] is None or find(organ_type.get("Modifier"), parsed["type_modifier"]) is not None


def region_resolves(anatomic_context: dict, parsed: dict) -> bool:
    if parsed["region"] is None:
        return True  # no anatomic region
    if parsed["anatomic_context"] != anatomic_context["AnatomicContextName"]:
        return False
    region = find(anatomic_context["AnatomicCodes"]["AnatomicRegion"], parsed["region"])
    if not region:
        return False
    return parsed["region_modifier"] is None or find(region.get("Modifier"), parsed["region_modifier"]) is not None


def test_fixture_is_slicers_own_files(general_anatomy, anatomy):
    for name, blob in SLICER_BLOBS.items():
        assert git_blob(slicer_file(name)) == blob, name
    assert anatomy["AnatomicContextName"] == SLICER_ANATOMIC_CONTEXT
    assert general_anatomy["SegmentationCategoryTypeContextName"] == GENERAL_ANATOMY


def test_organ_sets_cover_the_22_organs_and_the_ears():
    assert len(ORGAN_SETS["oar22"].names) == 22 and set(EARS) <= set(ORGAN_SETS["oar22"].names)
    assert set(ORGAN_SETS["oar22"].names) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_category_type_and_laterality_resolve_in_focusnets_context(name, focusnet_context):
    organ = CATALOGUE[name]
    parsed = parse(terminology_string(organ))
    assert parsed["context"] == focusnet_context["SegmentationCategoryTypeContextName"] == TERMINOLOGY_CONTEXT
    assert parsed["category"] == ("SCT", ANATOMICAL_STRUCTURE[0])
    assert parsed["type"] == ("SCT", organ.snomed_code)
    assert parsed["type_modifier"] == ({"L": ("SCT", LEFT[0]), "R": ("SCT", RIGHT[0])}.get(organ.laterality))
    assert type_resolves(focusnet_context, parsed), terminology_string(organ)


@pytest.mark.parametrize("name", NAMES)
def test_anatomic_region_and_modifier_resolve_in_slicers_anatomic_context(name, anatomy):
    parsed = parse(terminology_string(CATALOGUE[name]))
    assert parsed["anatomic_context"] == SLICER_ANATOMIC_CONTEXT
    assert region_resolves(anatomy, parsed), terminology_string(CATALOGUE[name])


def test_types_from_slicers_general_anatomy_resolve_there(general_anatomy):
    """Where FocusNet's type is one of Slicer's General Anatomy types, the whole
    category/type/modifier resolves there too (the entry then means the same
    in Slicer's list as in ours); only the mandible halves lack a modifier."""
    structures = find(general_anatomy["SegmentationCodes"]["Category"], ("SCT", ANATOMICAL_STRUCTURE[0]))
    in_slicer, lacking = [], set()
    for name in NAMES:
        parsed = parse(terminology_string(CATALOGUE[name]))
        if find(structures["Type"], parsed["type"]) is None:
            continue
        in_slicer.append(name)
        if not type_resolves(general_anatomy, parsed):
            lacking.add(name)
    assert set(EARS) <= set(in_slicer)
    assert {"OpticChiasm", "Pituitary", "SpinalCord", "Lobe_Temporal_L", "Bone_Mandible"} <= set(in_slicer)
    assert lacking == ONLY_IN_FOCUSNET_CONTEXT


@pytest.mark.parametrize("name", EARS)
def test_ears_resolve_in_slicers_own_files(name, general_anatomy, anatomy):
    """The issue's case: each ear's category, type and laterality are Slicer's
    own General Anatomy entry, and the ear part with that laterality is an
    anatomic region (with its modifier) in Slicer's anatomic context."""
    organ = CATALOGUE[name]
    parsed = parse(terminology_string(organ))
    assert type_resolves(general_anatomy, parsed), name
    structures = find(general_anatomy["SegmentationCodes"]["Category"], ("SCT", ANATOMICAL_STRUCTURE[0]))
    assert find(structures["Type"], parsed["type"])["CodeMeaning"] == organ.snomed_meaning
    assert region_resolves(anatomy, parsed)
    as_region = dict(parsed, region=parsed["type"], region_modifier=parsed["type_modifier"])
    assert region_resolves(anatomy, as_region), name


def test_the_check_fails_on_the_old_ear_terminology(general_anatomy, anatomy, focusnet_context):
    old = parse(OLD_EAR_ENTRY)
    assert not region_resolves(anatomy, old)  # 117590005 "Ear" is no region of Slicer's
    assert not type_resolves(general_anatomy, old)  # nor a General Anatomy type
    assert not type_resolves(focusnet_context, old)  # nor, any more, one of ours
    middle = parse(terminology_string(CATALOGUE["Ear_Middle_L"]))
    assert region_resolves(anatomy, dict(middle, region=("SCT", "25342003"), region_modifier=("SCT", LEFT[0])))
    # Slicer's regions take laterality as modifier, not an internal/middle qualifier.
    assert not region_resolves(anatomy, dict(middle, region=("SCT", "25342003"), region_modifier=("SCT", "260528009")))
    assert not region_resolves(anatomy, dict(middle, anatomic_context="Another anatomic context",
                                             region=("SCT", "25342003"), region_modifier=None))


def test_slicers_terminology_logic_resolves_every_organ(tmp_path):
    """The same through Slicer's Terminologies logic, with FocusNet's resolver
    (FocusNetSegmentLib.scene.terminology_resolves), which checks regions too."""
    slicer = pytest.importorskip("slicer")
    sys.path.insert(0, str(ROOT / "FocusNetSegment"))
    from FocusNetSegmentLib import scene as bridge

    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert bridge.load_terminology(logic, TERM_FILE) == TERMINOLOGY_CONTEXT
    for name in SLICER_BLOBS:
        (tmp_path / name).write_bytes(slicer_file(name))
    assert logic.LoadTerminologyFromFile(str(tmp_path / GENERAL_ANATOMY_FILE)) == GENERAL_ANATOMY
    load_regions = getattr(logic, "LoadRegionContextFromFile", None) or logic.LoadAnatomicContextFromFile
    assert load_regions(str(tmp_path / ANATOMY_FILE)) == SLICER_ANATOMIC_CONTEXT

    for name in NAMES:
        entry = terminology_string(CATALOGUE[name])
        assert bridge.terminology_resolves(logic, entry), entry
        if name in EARS:
            in_slicers_list = entry.replace(TERMINOLOGY_CONTEXT, GENERAL_ANATOMY, 1)
            assert bridge.terminology_resolves(logic, in_slicers_list), in_slicers_list
            code = entry.split("~")[2:4]  # the ear part and its laterality, as region and modifier
            with_region = "~".join(entry.split("~")[:5] + code)
            assert bridge.terminology_resolves(logic, with_region), with_region
    assert not bridge.terminology_resolves(logic, OLD_EAR_ENTRY)
    # A type that resolves but a region that does not: the resolver checks the region.
    good_type = terminology_string(CATALOGUE["Ear_Internal_R"]).split("~")[:5]
    assert not bridge.terminology_resolves(logic, "~".join(good_type + ["SCT^117590005^Ear", "SCT^24028007^Right"]))
    assert not bridge.terminology_resolves(logic, "~".join(good_type + ["SCT^22945000^Inner ear",
                                                                        "SCT^260521003^Internal"]))
