import multiprocessing
import subprocess
import sys

import numpy as np
import pytest

from FocusNetCore.editmetrics import added_path_length, edit_metrics
from FocusNetCore.study import append_record, case_id, read_records
from FocusNetCore.studyreport import study_report, synthetic_log


def square(size=20, lo=5, hi=15, z=3):
    mask = np.zeros((z, size, size), bool)
    mask[1, lo:hi, lo:hi] = True
    return mask


def test_apl_square_grown_by_one_voxel():
    """Every pixel of the grown square's outline is new: APL = its outline (4 x 11 pixels) x 0.8 mm."""
    ai, final = square(), square(lo=4, hi=16)
    assert added_path_length(ai, final, (3.0, 0.8, 0.8)) == pytest.approx(44 * 0.8)
    assert added_path_length(ai, ai, (3.0, 0.8, 0.8)) == 0.0
    m = edit_metrics(ai, final, (3.0, 0.8, 0.8))
    assert m["edited"] and m["voxels_added"] == 12 * 12 - 10 * 10 and m["voxels_removed"] == 0


def test_apl_and_surface_dice_for_a_contour_shifted_by_2mm():
    """Shifted 2 pixels (1 mm each) along x, the 10 x 10 square's new outline has: the right
    column (10 pixels, all new), the left column (8 new: its end pixels lie on the old top and
    bottom rows), and one new pixel each where the top and bottom rows extend past the old ones."""
    ai = square()
    final = np.roll(ai, 2, axis=2)
    assert added_path_length(ai, final, (3.0, 1.0, 1.0)) == pytest.approx(10 + 8 + 1 + 1)
    m = edit_metrics(ai, final, (3.0, 1.0, 1.0), tolerance_mm=2.0)
    assert m["surface_dice"] == pytest.approx(1.0)  # everything within 2 mm
    assert m["hd95_symmetric"] == pytest.approx(2.0)
    assert edit_metrics(ai, final, (3.0, 1.0, 1.0), tolerance_mm=1.0)["surface_dice"] < 1.0


def test_damaged_last_line_is_reported_and_skipped(tmp_path):
    log = tmp_path / "log.jsonl"
    append_record(log, {"case_id": "a", "mode": "ai", "status": "finished", "wall_s": 10.0})
    append_record(log, {"case_id": "b", "mode": "manual", "status": "finished", "wall_s": 20.0})
    with open(log, "ab") as handle:
        handle.write(b'{"case_id": "c", "mode": "ai", "wall')  # a crash mid-write
    records, problems = read_records(log)
    assert [r["case_id"] for r in records] == ["a", "b"]
    assert len(problems) == 1 and "log.jsonl:3" in problems[0]
    append_record(log, {"case_id": "d", "mode": "ai", "status": "finished", "wall_s": 30.0})
    records, problems = read_records(log)
    assert [r["case_id"] for r in records] == ["a", "b", "d"] and len(problems) == 1


def _writer(args):
    log, worker, count = args
    for k in range(count):
        append_record(log, {"case_id": f"{worker}-{k}", "mode": "ai", "status": "finished", "wall_s": float(k),
                            "padding": "x" * 5000})


def test_concurrent_appends_do_not_corrupt(tmp_path):
    log = tmp_path / "shared.jsonl"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_writer, [(str(log), w, 50) for w in range(4)])
    records, problems = read_records(log)
    assert not problems and len(records) == 200
    assert len({r["case_id"] for r in records}) == 200


def test_case_ids_are_hashes():
    cid = case_id("1.2.840.113619.2.55.3.2831164356.779.1234567890.123")
    assert len(cid) == 16 and "1.2.840" not in cid


def test_report_on_a_synthetic_log(tmp_path):
    log = synthetic_log(tmp_path / "synthetic.jsonl", n_cases=40, seed=3)
    stats, written = study_report([log], tmp_path / "report")
    assert stats["modes"]["manual"]["n"] >= 10 and stats["modes"]["ai"]["n"] >= 10
    assert stats["modes"]["manual"]["median_min"] > stats["modes"]["ai"]["median_min"]
    low, high = stats["saving"]["minutes_ci"]
    assert low <= stats["saving"]["minutes"] <= high and low > 0
    assert stats["paired"]["n_pairs"] >= 5 and stats["paired"]["p_value"] < 0.05
    assert stats["organs"]["OpticChiasm"]["edit_rate"] > stats["organs"]["Brainstem"]["edit_rate"]
    for name in ("time_per_case.png", "dice_ai_vs_final.png", "apl_per_organ.png", "organs.csv", "report.md"):
        assert (tmp_path / "report" / name).stat().st_size > 100, name
    report = (tmp_path / "report" / "report.md").read_text()
    assert "synthetic" in report and "Wilcoxon" in report and "95 % bootstrap CI" in report


def test_study_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "FocusNetCore", "study", "synth", "--out", str(tmp_path / "l.jsonl"),
                          "--n", "12"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    again = subprocess.run([sys.executable, "-m", "FocusNetCore", "study", "synth", "--out", str(tmp_path / "l.jsonl")],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "refusing" in again.stderr
    out = subprocess.run([sys.executable, "-m", "FocusNetCore", "study", "report", str(tmp_path / "l.jsonl"),
                          "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r" / "report.md").is_file()
