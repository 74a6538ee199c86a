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
    # The definitions are printed, with the thresholds and tolerances the records state.
    assert "paused while no page was open" in out.stdout and "Idle thresholds in these records: 60 s" in out.stdout
    assert "area of both surfaces" in out.stdout and "2 mm (`surface_dice_tolerance_mm`)" in out.stdout


def _record(case, mode, minutes, **extra):
    return {"case_id": case, "mode": mode, "status": "finished", "wall_s": minutes * 60.0, **extra}


def test_saving_ci_is_a_paired_bootstrap_over_cases():
    """Cases differ a lot (10-100 min) but each saves about half: resampling
    cases keeps that pairing, so the CI is narrower than the one that resamples
    manual and AI times apart (the design is paired)."""
    from FocusNetCore.studyreport import analyse, bootstrap_ci

    rng = np.random.default_rng(1)
    manual = rng.uniform(10, 100, 30)
    ai = manual * rng.normal(0.5, 0.03, 30)
    records = [_record(f"c{k}", "manual", m) for k, m in enumerate(manual)]
    records += [_record(f"c{k}", "ai", a) for k, a in enumerate(ai)]
    records += [_record("only-ai", "ai", 20.0)]
    stats = analyse(records, seed=0)
    saving = stats["saving"]
    assert saving["design"] == "paired" and saving["n"] == 30
    independent = bootstrap_ci(manual, ai, lambda m, a: float(np.median(a) / np.median(m)),
                               np.random.default_rng(0))
    paired_width = saving["ratio_ci"][1] - saving["ratio_ci"][0]
    assert paired_width < 0.5 * (independent[1] - independent[0])
    assert saving["ratio_ci"][0] <= saving["ratio"] <= saving["ratio_ci"][1]
    assert stats["unpaired"]["ai"] == {"n": 1, "median_min": 20.0}


def test_repeated_records_follow_one_rule_and_missing_fields_warn_nothing():
    import warnings

    from FocusNetCore.studyreport import REPEAT_RULE, _markdown, analyse

    records = [_record(f"c{k}", "manual", 60.0) for k in range(6)]
    records += [_record(f"c{k}", "ai", 30.0) for k in range(6)]
    records += [_record(f"c{k}", "ai", 90.0) for k in range(4)]  # second reviews: the last ones count, everywhere
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "All-NaN slice" or empty-median warning
        stats = analyse(records)
        text = _markdown(stats, [])
    assert stats["n_repeated_left_out"] == 4 and stats["repeat_rule"] == REPEAT_RULE
    assert stats["modes"]["ai"]["n"] == 6 and stats["modes"]["ai"]["median_min"] == pytest.approx(90.0)
    assert stats["modes"]["ai"]["median_active_min"] is None
    assert stats["paired"]["n_pairs"] == 6 and stats["paired"]["median_difference_min"] == pytest.approx(-30.0)
    assert stats["saving"]["design"] == "paired" and stats["saving"]["minutes"] == pytest.approx(-30.0)
    assert "no active time recorded" in text and "4 record(s) left out" in text and "apl_tolerance_mm" in text
    assert "Idle thresholds in these records: not recorded" in text


def test_active_time_timed_under_the_earlier_activity_rules_is_left_out_and_said():
    """Records without ``activity_rules`` (before a 3D render stopped counting
    as an act) keep their time per case but not their active time, and the
    report says how many."""
    from FocusNetCore.study import ACTIVITY_RULES
    from FocusNetCore.studyreport import _markdown, analyse

    records = [_record(f"c{k}", "ai", 30.0, active_s=600.0, activity_rules=ACTIVITY_RULES) for k in range(3)]
    records += [_record(f"d{k}", "ai", 30.0, active_s=1500.0) for k in range(2)]  # inflated by renders
    stats = analyse(records)
    ai = stats["modes"]["ai"]
    assert ai["n"] == 5 and ai["median_min"] == pytest.approx(30.0)
    assert ai["median_active_min"] == pytest.approx(10.0) and ai["n_with_active"] == 3
    assert ai["n_active_earlier_rules"] == 2
    assert "2 of these record(s) were timed under the earlier activity rules" in _markdown(stats, [])
    trusted = analyse(records[:3])
    assert trusted["modes"]["ai"]["n_active_earlier_rules"] == 0
    assert "earlier activity rules" not in _markdown(trusted, [])


def test_edit_metrics_state_their_tolerances():
    mask = np.zeros((3, 10, 10), bool)
    mask[1, 3:7, 3:7] = True
    grown = mask.copy()
    grown[1, 2:8, 2:8] = True
    metrics = edit_metrics(mask, grown, (3.0, 1.0, 1.0))
    assert metrics["apl_tolerance_mm"] == 0.0 and metrics["surface_dice_tolerance_mm"] == 2.0
    assert metrics["apl_mm"] == pytest.approx(20.0)  # the 6x6 square's 20 boundary pixels, none on the old one
    assert edit_metrics(mask, grown, (3.0, 1.0, 1.0), apl_tolerance_mm=1.5)["apl_mm"] == 0.0


def test_click_placements_are_reported_per_organ():
    """Click-to-find placements (assisted edits) are counted apart from hand
    edits in the records; the report says in what share of the AI cases each
    organ was placed by a click."""
    from FocusNetCore.studyreport import _markdown, analyse

    metrics = {"Lens_L": {"edited": True, "dice": 0.4, "apl_mm": 30.0},
               "Brainstem": {"edited": False, "dice": 1.0, "apl_mm": 0.0}}
    records = []
    for k in range(4):
        organs = {"Lens_L": {"status": "edited", "edits": 0, "assisted_edits": 1 if k < 3 else 0,
                             "assisted_undone": 1 if k == 0 else 0, "first_edit_s": 10.0 * (k + 1)},
                  "Brainstem": {"status": "accepted", "edits": 0}}  # a record from before click to find
        records.append(_record(f"c{k}", "ai", 20.0, metrics=metrics, organs=organs))
    stats = analyse(records)
    assert stats["organs"]["Lens_L"]["click_rate"] == pytest.approx(0.75)
    assert stats["organs"]["Brainstem"]["click_rate"] == 0.0
    assert stats["organs"]["Lens_L"]["placements"] == 3 and stats["organs"]["Lens_L"]["placements_undone"] == 1
    assert stats["organs"]["Lens_L"]["median_first_change_s_placed"] == pytest.approx(20.0)  # 10, 20, 30 s
    assert "| Lens_L | 100 | 75 | 3 (1) | 20 | 0.400 | 30 |" in _markdown(stats, [])
    assert "| Brainstem | 0 | 0 | 0 (0) | - | 1.000 | 0 |" in _markdown(stats, [])
