"""The Slicer terminology context (dcmqi segment-context JSON) of an organ
set, generated from the catalogue: ``FocusNetSegment/Resources/FocusNet.term.json``
is this function's output (a test keeps the two equal).

    python -m FocusNetCore.terminology > FocusNetSegment/Resources/FocusNet.term.json
"""
from __future__ import annotations

import json

from .organs import ANATOMICAL_STRUCTURE, CATALOGUE, ORGAN_SETS, TERMINOLOGY_CONTEXT as CONTEXT_NAME


def terminology_context() -> dict:
    names = []
    for organ_set in ("oar22", "pddca9"):
        names += [n for n in ORGAN_SETS[organ_set].names if n not in names]
    types = []
    seen = set()
    for name in names:
        organ = CATALOGUE[name]
        if organ.snomed_code in seen:
            continue
        seen.add(organ.snomed_code)
        entry = {"CodeMeaning": organ.snomed_meaning, "CodingSchemeDesignator": "SCT",
                 "CodeValue": organ.snomed_code, "recommendedDisplayRGBValue": list(organ.color),
                 "showAnatomy": False}
        if organ.laterality:
            entry["Modifier"] = [{"CodeMeaning": m, "CodingSchemeDesignator": "SCT", "CodeValue": c,
                                  "recommendedDisplayRGBValue": list(CATALOGUE[f"{name[:-2]}_{m[0]}"].color)}
                                 for c, m in (("7771000", "Left"), ("24028007", "Right"))]
        types.append(entry)
    return {
        "SegmentationCategoryTypeContextName": CONTEXT_NAME,
        "@schema": "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/segment-context-schema.json#",
        "SegmentationCodes": {"Category": [{
            "CodeMeaning": ANATOMICAL_STRUCTURE[1], "CodingSchemeDesignator": "SCT",
            "CodeValue": ANATOMICAL_STRUCTURE[0], "showAnatomy": False, "Type": types}]},
    }


def main() -> None:
    print(json.dumps(terminology_context(), indent=2))


if __name__ == "__main__":
    main()
