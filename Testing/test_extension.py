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


def _attributes_used(source, owner):
    """Names used as ``self.<owner>.<name>`` or ``<owner>.<name>`` (a local
    alias) in the module's source."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                node.value.attr == owner and isinstance(node.value.value, ast.Name) and node.value.value.id == "self":
            names.add(node.attr)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == owner:
            names.add(node.attr)
    return names


def test_widget_uses_only_widgets_the_ui_file_has():
    """The widget cannot run here (no Qt), so its wiring is checked against the
    .ui file: a renamed widget fails here, not at a click. (What it calls on
    the controller: test_slicer_controller.test_the_widget_holds_no_logic.)"""
    import ast
    import xml.etree.ElementTree as ElementTree

    source = (MODULE / "FocusNetSegment.py").read_text()
    ui_names = {w.get("name") for w in ElementTree.parse(MODULE / "Resources/UI/FocusNetSegment.ui").iter()
                if w.tag in ("widget", "layout")}
    used = _attributes_used(source, "ui")
    # Widgets named in strings, for getattr(ui, name): the buttons' tables.
    named = {node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant)
             and isinstance(node.value, str) and node.value.endswith(("Button", "Edit", "Box"))}
    assert used and named and {"show3DButton", "exportRtstructButton"} <= named
    assert (used | named) - ui_names == set(), "widgets the .ui file lacks"


def test_extensions_index_catalog_entry_matches_the_s4ext():
    """The JSON entry the Slicer Extensions Index takes since 2024 (schema v1.0.1:
    $schema, category and scm_url required; no other keys than these)."""
    entry = json.loads((ROOT / "FocusNet.json").read_text())
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "enabled", "scm_revision",
               "scm_type", "scm_url", "tier"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    s4ext = dict(line.split(" ", 1) for line in (ROOT / "FocusNet.s4ext").read_text().splitlines()
                 if line.strip() and not line.startswith("#") and " " in line)
    assert entry["category"] == s4ext["category"] and entry["scm_url"] == s4ext["scmurl"]
    assert entry["build_dependencies"] == s4ext["depends"].split()
    assert 1 <= entry["tier"] <= 5 and "\r" not in (ROOT / "FocusNet.json").read_text()


def test_minimum_slicer_version_is_stated_everywhere():
    assert 'VERSION_LESS "5.8"' in (ROOT / "CMakeLists.txt").read_text()
    assert "Slicer 5.8 or later" in (ROOT / "FocusNet.s4ext").read_text()
    assert "Slicer 5.8 or later" in (ROOT / "README.md").read_text()
