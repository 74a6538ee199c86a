import pytest

from FocusNetCore.organs import CATALOGUE, LEFT, ORGAN_SETS, RIGHT, get_organ_set, terminology_entry


def test_organ_sets_have_unique_labels_names_and_the_papers_counts():
    assert len(ORGAN_SETS["oar22"].names) == 22
    assert len(ORGAN_SETS["pddca9"].names) == 9
    for organ_set in ORGAN_SETS.values():
        assert len(set(organ_set.names)) == len(organ_set.names)
        labels = [organ_set.label_of(n) for n in organ_set.names]
        assert labels == list(range(1, len(organ_set.names) + 1))
        assert [organ_set.name_of(v) for v in labels] == list(organ_set.names)
        display = [CATALOGUE[n].display_name for n in organ_set.names]
        assert len(set(display)) == len(display)
        colors = [CATALOGUE[n].color for n in organ_set.names]
        assert len(set(colors)) == len(colors)


def test_small_organs_are_the_papers():
    # Paper footnote 1 (22-OAR set) and section 4.5 (PDDCA).
    assert set(ORGAN_SETS["oar22"].small_names) == {
        "Lens_L", "Lens_R", "OpticNrv_L", "OpticNrv_R", "OpticChiasm", "Pituitary"}
    assert set(ORGAN_SETS["pddca9"].small_names) == {"OpticNrv_L", "OpticNrv_R", "OpticChiasm"}
    for name in ORGAN_SETS["oar22"].small_names:
        assert CATALOGUE[name].small


def test_laterality_is_coded_left_and_right():
    for organ in CATALOGUE.values():
        if organ.name.endswith("_L"):
            assert organ.laterality_code == LEFT, organ.name
            assert CATALOGUE[organ.mirror_name].laterality_code == RIGHT
        elif organ.name.endswith("_R"):
            assert organ.laterality_code == RIGHT, organ.name  # the mCODE map's slip for OpticNrv_R
        else:
            assert organ.laterality is None


def test_terminology_entry_carries_code_and_laterality():
    # The inner ear's own code (Slicer's "Inner ear"), not "Ear" 117590005 + a qualifier.
    entry = terminology_entry(CATALOGUE["Ear_Internal_R"])
    assert (entry["CodeValue"], entry["CodeMeaning"]) == ("22945000", "Inner ear")
    assert [m["CodeValue"] for m in entry["Modifier"]] == ["24028007"]
    assert entry["recommendedDisplayRGBValue"] == list(CATALOGUE["Ear_Internal_R"].color)
    assert terminology_entry(CATALOGUE["Ear_Middle_L"])["CodeValue"] == "25342003"


def test_unknown_lookups_name_the_problem():
    with pytest.raises(KeyError, match="unknown organ set 'oar23'"):
        get_organ_set("oar23")
    with pytest.raises(KeyError, match="not in organ set 'pddca9'"):
        ORGAN_SETS["pddca9"].label_of("Lens_L")
