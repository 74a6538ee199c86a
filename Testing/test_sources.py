"""Rules the sources keep that no behavioural test can catch reliably."""
import ast
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("FocusNetCore", "FocusNetSegment", "Testing", "benchmarks")
                 for p in (ROOT / folder).rglob("*.py"))


def test_no_numpy_view_outlives_its_simpleitk_image():
    """sitk.GetArrayViewFromImage's array borrows the image's buffer and does
    not keep the image alive ("requires that the SimpleITK image object is
    kept around while the buffer is being used"). A view of a temporary,
    GetArrayViewFromImage(resample(...)), reads freed memory: usually the
    old values, sometimes others (the fine heads' CT went through such a
    view), sometimes a segmentation fault. Views are taken of named images
    only; a temporary is copied (GetArrayFromImage)."""
    assert len(SOURCES) > 50
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                    == "GetArrayViewFromImage" and node.args and _temporary(node.args[0])):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:100]}")
    assert not found, "views of temporary images:\n" + "\n".join(found)


def _temporary(node) -> bool:
    """An expression that names no object kept alive: a call, or an attribute
    or item of one (segment(image).labels: the result, and with it the image,
    is freed once the view is taken; it segfaulted a benchmark)."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return not isinstance(node, ast.Name)


def test_the_rule_catches_an_attribute_of_a_temporary():
    assert _temporary(ast.parse("segmenter.segment(case.image).labels", mode="eval").body)
    assert _temporary(ast.parse("resample(image)", mode="eval").body)
    assert not _temporary(ast.parse("result.labels", mode="eval").body)
    assert not _temporary(ast.parse("images[0]", mode="eval").body)


def test_the_view_rule_is_real():
    """What the rule above prevents: the view's memory is the image's own."""
    image = sitk.Image([4, 4, 4], sitk.sitkFloat32)
    view = sitk.GetArrayViewFromImage(image)
    image[1, 2, 3] = 5.0  # written through the image, seen through the view
    assert view[3, 2, 1] == 5.0
    assert not view.flags.owndata
