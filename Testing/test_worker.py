"""``focusnet worker``: the click-to-find process, over its real JSON-lines
protocol on a subprocess with the embedded model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FocusNetCore.metrics import dice
from FocusNetCore.organs import ORGAN_SETS, convert_labels
from FocusNetCore.phantom import PHANTOM_SET, generate_case, write_case

ROOT = Path(__file__).resolve().parents[1]
ORGANS = ORGAN_SETS["oar22"]


class Worker:
    def __init__(self):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen([sys.executable, "-m", "FocusNetCore", "worker", "--device", "cpu"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, bufsize=1, env=env)
        self.next_id = 0

    def ask(self, request=None, raw=None):
        self.next_id += 1
        line = raw if raw is not None else json.dumps({"id": self.next_id, **request})
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        if raw is None:
            assert answer["id"] == self.next_id
        return answer


@pytest.fixture(scope="module")
def opened(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker")
    case = generate_case(1000, "full")  # a held-out seed: never in the embedded model's training
    write_case(case, folder, "nrrd")
    worker = Worker()
    before = worker.ask({"op": "refine", "organ": "Lens_L", "point": [0, 0, 0], "out": str(folder / "x.nrrd")})
    assert not before["ok"] and "no case is open" in before["error"]
    answer = worker.ask({"op": "open", "ct": str(folder / "phantom_1000_ct.nrrd"), "out": str(folder / "ai.seg.nrrd")})
    yield worker, answer, case, folder
    worker.process.stdin.close()  # the end of stdin ends the worker
    assert worker.process.wait(60) == 0


def true_centre_lps(case, name):
    labels, _ = convert_labels(sitk.GetArrayViewFromImage(case.labels), PHANTOM_SET, ORGANS)
    where = np.argwhere(labels == ORGANS.label_of(name)).mean(axis=0)[::-1]  # (x, y, z) index
    return labels, list(case.labels.TransformContinuousIndexToPhysicalPoint([float(v) for v in where]))


def test_open_segments_once_and_writes_the_contours(opened):
    worker, answer, case, folder = opened
    assert answer["ok"] and answer["seg"] == str(folder / "ai.seg.nrrd")
    assert [o["name"] for o in answer["report"]["organs"]] == list(ORGANS.names)
    seg = sitk.ReadImage(answer["seg"])
    assert seg.GetSize() == case.image.GetSize() and seg.GetOrigin() == pytest.approx(case.image.GetOrigin())


@pytest.mark.parametrize("organ, head, at_least", [("Lens_L", "fine", 0.8), ("Lens_R", "fine", 0.7),
                                                   ("OpticNrv_L", "fine", 0.75), ("OpticNrv_R", "fine", 0.8),
                                                   ("Pituitary", "fine", 0.85)])
def test_refine_at_the_true_centre_gives_the_organ(opened, organ, head, at_least):
    """A click at a small organ's centre: the mask, on the CT's own grid
    over the ROI only, matches the phantom's organ - in well under a second
    (measured in benchmarks/click_latency.py; here only bounded). The
    embedded model draws the small organs with fine heads, which answer the
    click too. On this phantom they measure Lens_L 0.88, Lens_R 0.78,
    OpticNrv_L 0.86, OpticNrv_R 0.88, Pituitary 0.95 (bfloat16 on an
    AVX512-BF16 CPU; the coarse pipeline heads answered before: 0.78, 0.59,
    0.64, 0.79, 0.83). The floors leave room for the other precisions."""
    worker, _, case, folder = opened
    labels, point = true_centre_lps(case, organ)
    answer = worker.ask({"op": "refine", "organ": organ, "point": point, "out": str(folder / f"{organ}.nrrd")})
    assert answer["ok"], answer
    assert answer["head"] == head
    mask = sitk.ReadImage(answer["mask"])
    assert mask.GetSpacing() == pytest.approx(case.image.GetSpacing())
    assert mask.GetDirection() == pytest.approx(case.image.GetDirection())
    i0, j0, k0, i1, j1, k1 = answer["region"]
    assert mask.GetOrigin() == pytest.approx(case.image.TransformIndexToPhysicalPoint((i0, j0, k0)))
    assert list(mask.GetSize()) == [i1 - i0, j1 - j0, k1 - k0]
    full = np.zeros(labels.shape, bool)
    full[k0:k1, j0:j1, i0:i1] = sitk.GetArrayViewFromImage(mask) > 0
    assert answer["voxels"] == int(full.sum()) > 0
    assert dice(full, labels == ORGANS.label_of(organ)) >= at_least
    assert answer["seconds"] < 5.0


def test_bad_requests_are_answered_and_the_worker_goes_on(opened):
    worker, _, case, folder = opened
    _, lens = true_centre_lps(case, "Lens_L")
    out = str(folder / "bad.nrrd")
    cases = [({"op": "refine", "organ": "Parotid_L", "point": lens, "out": out}, "click-placing is for the small organs"),
             ({"op": "refine", "organ": "Lens_X", "point": lens, "out": out}, "unknown organ 'Lens_X'"),
             ({"op": "refine", "organ": "Lens_L", "point": [0, 0, 5000], "out": out}, "lies outside the CT"),
             ({"op": "refine", "organ": "Lens_L", "point": [1, "a", 2], "out": out}, "point must be three numbers"),
             ({"op": "refine", "organ": "Lens_L", "point": lens}, "'out' is missing"),
             ({"op": "open", "ct": str(folder / "missing.nrrd")}, "missing.nrrd: no such CT file"),
             ({"op": "segment"}, "unknown op 'segment'")]
    for request, message in cases:
        answer = worker.ask(request)
        assert not answer["ok"] and message in answer["error"], (request, answer)
    answer = worker.ask(raw="{not json")
    assert not answer["ok"] and "not JSON" in answer["error"]
    # the open case survived all of it, a failed open included
    answer = worker.ask({"op": "refine", "organ": "Lens_L", "point": lens, "out": out})
    assert answer["ok"] and answer["voxels"] > 0
    assert worker.ask({"op": "close"})["ok"]
    answer = worker.ask({"op": "refine", "organ": "Lens_L", "point": lens, "out": out})
    assert not answer["ok"] and "no case is open" in answer["error"]
