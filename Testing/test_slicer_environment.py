"""The environments the Slicer-side tests run in a second and third time
(Makefile: .venv-slicer, .venv-slicer512) hold exactly what released 3D Slicer
ships (Testing/slicer-constraints.txt for 5.8, slicer-5.12-constraints.txt for
5.12), torch, what the module installs into Slicer
(dependencies.REQUIREMENTS) and test tooling, nothing else (issue 46): a
package Slicer lacks that the module does not install (contourpy before fault
1's fix) must fail there as it fails in Slicer, not be brought in by the dev
extra's matplotlib.

The static tests run everywhere; the ones that inspect the installed packages
run where the Makefile names the environment's constraints file in
FOCUSNET_SLICER_CONSTRAINTS.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPENDENCIES_PY = ROOT / "FocusNetSegment" / "FocusNetSegmentLib" / "dependencies.py"
CONSTRAINTS = (ROOT / "Testing" / "slicer-constraints.txt", ROOT / "Testing" / "slicer-5.12-constraints.txt")
SLICER_SOURCE = re.compile(r"#.*\bExternal_[A-Za-z0-9_-]+\.cmake\b")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def read_pins(path: Path):
    """{canonical name: (version, line)} of a constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if not spec:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", spec)
        assert match, f"{path.name}: not a plain name==version pin: {line!r}"
        name = canonical(match.group(1))
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = (match.group(2), line)
    return pins


def requirements():
    """dependencies.REQUIREMENTS, read from the file the Makefile reads."""
    return runpy.run_path(str(DEPENDENCIES_PY))["REQUIREMENTS"]


def makefile_variable(name: str) -> str:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(rf"^{name}\s*[:?]?=\s*(.*)$", text, re.M)
    assert match, f"Makefile has no {name}"
    return match.group(1).strip()


def slicer_recipe() -> str:
    text = (ROOT / "Makefile").read_text()
    match = re.search(r"^define slicer_venv\n(.*?)^endef", text, re.M | re.S)
    assert match, "Makefile has no slicer_venv recipe"
    return match.group(1)


def slicer_test_extra():
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as file:
        project = tomllib.load(file)["project"]
    return project, project["optional-dependencies"]["slicer-test"]


@pytest.mark.parametrize("path", CONSTRAINTS, ids=lambda p: p.name)
def test_every_pin_names_the_slicer_file_it_comes_from(path):
    pins = read_pins(path)
    for name in ("numpy", "scipy", "pydicom", "simpleitk", "vtk", "pip", "setuptools"):
        assert name in pins, f"{path.name} lacks {name}"
    for name, (_, line) in pins.items():
        assert SLICER_SOURCE.search(line), f"{path.name}: {name}'s pin does not name its Slicer source file"


def test_makefile_reads_requirements_from_dependencies_py():
    """The environment gets dependencies.REQUIREMENTS itself, read from the
    module's file at build time (so the two cannot disagree), and the
    environment is rebuilt when that file changes."""
    assert (ROOT / makefile_variable("SLICER_REQUIREMENTS_FROM")).resolve() == DEPENDENCIES_PY
    recipe = slicer_recipe()
    assert "runpy.run_path('$(SLICER_REQUIREMENTS_FROM)')['REQUIREMENTS']" in recipe
    command = re.search(r'-c "(import runpy;[^"]*)"', recipe).group(1)
    command = command.replace("$(SLICER_REQUIREMENTS_FROM)", str(DEPENDENCIES_PY)).replace("\\\\n", "\\n")
    listed = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, check=True).stdout
    assert listed.split("\n")[:-1] == list(requirements().values())
    stamps = re.findall(r"^\$\(SLICER\w*_VENV\)/\.installed:(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert len(stamps) == 2 and all("$(SLICER_REQUIREMENTS_FROM)" in s for s in stamps)


def test_makefile_installs_nothing_of_the_project_dependencies():
    """Slicer's packages with --no-deps, the project with --no-deps, the
    tooling from the slicer-test extra: never the project with its own
    dependencies or the dev extra."""
    recipe = slicer_recipe()
    assert "pip install -q --no-deps -r $(2)" in recipe
    assert "pip install -q --no-deps -e ." in recipe
    assert not re.search(r"pip install(?![^\n]*--no-deps)[^\n]*\s-e\s", recipe)
    assert "[dev]" not in recipe and "[slicer-test]" not in recipe and "[review]" not in recipe
    assert "extra == \\\"slicer-test\\\"" in recipe


def test_slicer_test_extra_is_tooling_only():
    """The extra brings no runtime package: none that REQUIREMENTS installs,
    none that Slicer ships (it would replace Slicer's pin) and none of the
    project's own dependencies (matplotlib would bring contourpy)."""
    project, extra = slicer_test_extra()
    tools = {requirement_name(r) for r in extra} | {
        requirement_name(r) for r in makefile_variable("SLICER_NO_DEPS_TOOLS").split()}
    runtime = {requirement_name(r) for r in requirements().values()}
    runtime |= {requirement_name(r) for r in project["dependencies"]}
    for path in CONSTRAINTS:
        runtime |= set(read_pins(path))
    assert not tools & runtime, sorted(tools & runtime)
    # The MRML stand-in is the one the dev environment uses.
    dev = {requirement_name(r): r for r in project["optional-dependencies"]["dev"]}
    assert "slicer-core==5.11.0.6" in makefile_variable("SLICER_NO_DEPS_TOOLS").split()
    assert dev["slicer-core"] == "slicer-core==5.11.0.6"


# --- Inside .venv-slicer / .venv-slicer512 ---------------------------------

ENVIRONMENT = os.environ.get("FOCUSNET_SLICER_CONSTRAINTS")
in_slicer_environment = pytest.mark.skipif(
    not ENVIRONMENT, reason="runs in the Slicer environments (make test sets FOCUSNET_SLICER_CONSTRAINTS)")


def installed():
    return {canonical(d.metadata["Name"]): d for d in importlib.metadata.distributions()}


@in_slicer_environment
def test_slicer_packages_are_installed_exactly():
    dists = installed()
    wrong = {name: (version, dists[name].version if name in dists else None)
             for name, (version, _) in read_pins(ROOT / ENVIRONMENT).items()
             if name not in dists or dists[name].version != version}
    assert not wrong, wrong


@in_slicer_environment
def test_requirements_are_installed_and_satisfied():
    from packaging.requirements import Requirement  # Slicer ships packaging
    for requirement in requirements().values():
        parsed = Requirement(requirement)
        version = importlib.metadata.version(parsed.name)
        assert parsed.specifier.contains(version, prereleases=True), (requirement, version)


@in_slicer_environment
def test_nothing_else_is_installed():
    """Every installed distribution is pinned, is torch, a REQUIREMENT, a
    tool, or a dependency of one of those. matplotlib, pyyaml, tqdm and
    pynetdicom (the project's dependencies Slicer lacks) are not importable."""
    from packaging.requirements import Requirement
    dists = installed()
    pinned = set(read_pins(ROOT / ENVIRONMENT))
    _, extra = slicer_test_extra()
    no_deps = {requirement_name(r) for r in makefile_variable("SLICER_NO_DEPS_TOOLS").split()}
    # Slicer's packages and the --no-deps tools came without dependencies.
    roots = ["torch", *(requirement_name(r) for r in requirements().values()), *(requirement_name(r) for r in extra)]
    allowed, reached = pinned | no_deps | {"focusnet"}, set()
    while roots:
        name = roots.pop()
        if name in reached or name in pinned or name not in dists:
            continue
        reached.add(name)
        for requirement in dists[name].requires or []:
            parsed = Requirement(requirement)
            if parsed.marker is None or parsed.marker.evaluate({"extra": ""}):
                roots.append(canonical(parsed.name))
    allowed |= reached
    assert set(dists) <= allowed, sorted(set(dists) - allowed)
    for module in ("matplotlib", "yaml", "tqdm", "pynetdicom", "trame", "playwright"):
        assert importlib.util.find_spec(module) is None, f"{module} is installed; Slicer does not ship it"
