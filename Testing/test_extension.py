"""The Slicer extension's build files package everything the module needs."""
import json
import py_compile
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "FocusNetSegment"


def cmake_list(text, variable):
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, variable
    return [item.replace("${MODULE_NAME}", "FocusNetSegment") for item in match.group(1).split()]


def test_module_cmake_lists_every_script_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    listed = set(cmake_list(text, "MODULE_PYTHON_SCRIPTS") + cmake_list(text, "MODULE_PYTHON_RESOURCES"))
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*")
               if p.is_file() and "Testing" not in p.parts and p.name != "CMakeLists.txt" and "__pycache__" not in p.parts}
    assert on_disk - listed == set(), "not packaged"
    assert listed - on_disk == set(), "listed but missing"
    assert "slicerMacroBuildScriptedModule(" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_extension_bundles_the_whole_core_package():
    text = (ROOT / "CMakeLists.txt").read_text()
    listed = set(cmake_list(text, "FOCUSNETCORE_PYTHON_SCRIPTS") + cmake_list(text, "FOCUSNETCORE_PYTHON_RESOURCES"))
    core = {str(p.relative_to(ROOT)) for p in (ROOT / "FocusNetCore").rglob("*")
            if p.is_file() and p.suffix in (".py", ".pt", ".json") and "__pycache__" not in p.parts}
    assert core - listed == set(), "FocusNetCore files missing from the extension package"
    assert listed - core == set(), "listed but missing"
    assert "FocusNetCore/models/focusnet-phantom-cpu.pt" in listed
    assert "ctkMacroCompilePythonScript(" in text


def test_top_level_cmake_follows_the_extension_template():
    text = (ROOT / "CMakeLists.txt").read_text()
    for needle in ("cmake_minimum_required(", "project(FocusNet)", 'set(EXTENSION_HOMEPAGE', 'set(EXTENSION_CATEGORY',
                   'set(EXTENSION_CONTRIBUTORS', 'set(EXTENSION_DESCRIPTION', 'set(EXTENSION_ICONURL',
                   'set(EXTENSION_SCREENSHOTURLS', 'set(EXTENSION_DEPENDS "PyTorch")', "find_package(Slicer REQUIRED)",
                   "include(${Slicer_USE_FILE})", "add_subdirectory(FocusNetSegment)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needle in text, needle
    assert text.index("find_package(Slicer") < text.index("add_subdirectory(FocusNetSegment)") < \
        text.index("Slicer_EXTENSION_CPACK")


def test_s4ext_has_the_keys_slicer_reads():
    keys = {}
    for line in (ROOT / "FocusNet.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            keys[key] = value.strip()
    for key in ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "status", "description", "screenshoturls", "enabled"):
        assert key in keys, key
    assert keys["scm"] == "git" and keys["depends"] == "PyTorch" and keys["build_subdirectory"] == "."


def test_terminology_file_is_generated_from_the_catalogue():
    from FocusNetCore.terminology import terminology_context

    shipped = json.loads((MODULE / "Resources" / "FocusNet.term.json").read_text())
    assert shipped == terminology_context(), "regenerate: python -m FocusNetCore.terminology > ...term.json"
    types = shipped["SegmentationCodes"]["Category"][0]["Type"]
    assert {t["CodeValue"] for t in types} >= {"81745001", "78076003", "244453006", "56329008"}


def test_module_script_compiles_and_lib_stays_free_of_qt():
    py_compile.compile(str(MODULE / "FocusNetSegment.py"), doraise=True)
    for path in (MODULE / "FocusNetSegmentLib").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(qt|ctk)\b", text, re.M), path.name
