"""``focusnet study report``: the time-savings study from review logs.

Per mode (``manual``: contouring from scratch; ``ai``: correcting FocusNet's
contours) the median and interquartile range of the time per case; the
saving as a ratio and in minutes with bootstrap 95 % confidence intervals;
a Wilcoxon signed-rank test over the cases done both ways; per-organ edit
rates, Dice between the AI proposal and the final contour, and added path
length (APL). Writes CSV tables, PNG plots and a markdown report that reads
like the results section of a study.

``synthetic_log`` writes a documented synthetic log (for tests and the
README): it is invented data, and says so in every record.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .organs import ORGAN_SETS
from .study import ACTIVITY_RULES, TIMING_DEFINITIONS, append_record, case_id, read_records

BOOTSTRAP_SAMPLES = 2000
MIN_PAIRS_FOR_TEST = 5


# --------------------------------------------------------------------------
# Synthetic log
# --------------------------------------------------------------------------

def synthetic_log(path, n_cases: int = 40, seed: int = 0, paired_fraction: float = 0.5) -> Path:
    """A synthetic log of ``n_cases`` cases: each contoured manually or by
    correcting the AI, a fraction of them both ways (paired). Manual times
    around 60 min, AI-assisted around 25 min (the paper's report), edits
    concentrated on the small organs."""
    rng = np.random.default_rng(seed)
    organs = ORGAN_SETS["oar22"]
    path = Path(path)
    for k in range(n_cases):
        cid = case_id(f"synthetic-case-{seed}-{k}")
        both = rng.random() < paired_fraction
        modes = ["manual", "ai"] if both else [("manual", "ai")[k % 2]]
        for mode in modes:
            minutes = rng.normal(60, 10) if mode == "manual" else rng.normal(25, 6)
            wall = max(minutes, 5.0) * 60.0
            metrics, states = {}, {}
            for name in organs.names:
                small = name in organs.small_names
                edited = mode == "manual" or rng.random() < (0.6 if small else 0.25)
                dice = 0.0 if mode == "manual" else (float(rng.uniform(0.55, 0.9) if small else rng.uniform(0.85, 0.98))
                                                     if edited else 1.0)
                metrics[name] = {"dice": dice, "apl_mm": float(rng.gamma(2.0, 40.0 if small else 120.0)) if edited else 0.0,
                                 "surface_dice": min(1.0, dice + 0.05), "edited": bool(edited),
                                 "apl_tolerance_mm": 0.0, "surface_dice_tolerance_mm": 2.0,
                                 "voxels_added": int(rng.integers(10, 500)) if edited else 0, "voxels_removed": 0}
                states[name] = {"status": "edited" if edited else "accepted", "edits": int(rng.integers(1, 9)) if edited else 0}
            append_record(path, {"synthetic": True, "case_id": cid, "reviewer": f"reviewer {k % 3 + 1}", "mode": mode,
                                 "status": "finished", "wall_s": round(wall, 1), "active_s": round(wall * 0.7, 1),
                                 "idle_threshold_s": 60.0, "activity_rules": ACTIVITY_RULES,
                                 "model": {"name": "synthetic"}, "organs": states, "metrics": metrics,
                                 "software_version": "synthetic"})
    return path


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------

def _iqr(values) -> Tuple[float, float]:
    return float(np.percentile(values, 25)), float(np.percentile(values, 75))


def bootstrap_ci(manual: np.ndarray, ai: np.ndarray, statistic, rng, samples: int = BOOTSTRAP_SAMPLES):
    """Independent groups: manual and AI times resampled separately."""
    stats = []
    for _ in range(samples):
        stats.append(statistic(rng.choice(manual, len(manual)), rng.choice(ai, len(ai))))
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def paired_bootstrap_ci(manual: np.ndarray, ai: np.ndarray, statistic, rng, samples: int = BOOTSTRAP_SAMPLES):
    """Paired design: cases resampled with both their times, so the CI keeps
    the case-to-case correlation (narrower than resampling the groups apart)."""
    stats = []
    for _ in range(samples):
        pick = rng.integers(0, len(manual), len(manual))
        stats.append(statistic(manual[pick], ai[pick]))
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


# The rule for a case reviewed more than once in one mode (a re-review, a
# second reviewer): its last finished record counts, in every statistic.
REPEAT_RULE = "last finished record of each case and mode"


def last_records(finished: List[dict]) -> Tuple[List[dict], int]:
    """One record per (case, mode): the last one in log order; and how many were left out."""
    kept: Dict[Tuple[str, str], dict] = {}
    for r in finished:
        kept[(r["case_id"], r["mode"])] = r
    return list(kept.values()), len(finished) - len(kept)


def _median_or_none(values) -> Optional[float]:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(values)) if values else None


def analyse(records: List[dict], seed: int = 0) -> dict:
    """The study's statistics. Definitions:
    - time per case: ``wall_s`` (first sight of the contours to Finish), in minutes;
    - active time: ``active_s`` (gaps between acts longer than the record's
      ``idle_threshold_s`` left out); records without it are left out of its median;
    - saving: ratio of the median AI-assisted time to the median manual time,
      and their difference in minutes. With at least MIN_PAIRS_FOR_TEST cases
      done both ways it is computed over those cases with a paired bootstrap
      95 % CI (cases resampled); cases done one way only are reported apart.
      Otherwise over all cases with an independent-groups bootstrap CI;
    - repeated records of a case in one mode: REPEAT_RULE."""
    finished_all = [r for r in records if r.get("status") == "finished" and r.get("mode") in ("ai", "manual")
                    and r.get("case_id") and r.get("wall_s") is not None]
    finished, repeated = last_records(finished_all)
    times = {mode: np.array([r["wall_s"] / 60.0 for r in finished if r["mode"] == mode]) for mode in ("manual", "ai")}
    out = {"n_records": len(records), "n_finished": len(finished), "n_repeated_left_out": repeated,
           "repeat_rule": REPEAT_RULE,
           "n_incomplete": sum(1 for r in records if r.get("status") == "incomplete"),
           "synthetic": any(r.get("synthetic") for r in records), "modes": {}}
    for mode in ("manual", "ai"):
        if len(times[mode]):
            timed = [r for r in finished if r["mode"] == mode and r.get("active_s") is not None]
            active = [r["active_s"] / 60.0 for r in timed if int(r.get("activity_rules", 1)) >= ACTIVITY_RULES]
            out["modes"][mode] = {"n": int(len(times[mode])), "median_min": float(np.median(times[mode])),
                                  "iqr_min": _iqr(times[mode]), "median_active_min": _median_or_none(active),
                                  "n_with_active": len(active), "n_active_earlier_rules": len(timed) - len(active)}
    by_case: Dict[str, Dict[str, float]] = {}
    for r in finished:
        by_case.setdefault(r["case_id"], {})[r["mode"]] = r["wall_s"] / 60.0
    pairs = [(v["manual"], v["ai"]) for v in by_case.values() if "manual" in v and "ai" in v]
    ratio = lambda m, a: float(np.median(a) / np.median(m))  # noqa: E731
    saved = lambda m, a: float(np.median(m) - np.median(a))  # noqa: E731
    rng = np.random.default_rng(seed)
    if len(pairs) >= MIN_PAIRS_FOR_TEST:
        manual, ai = (np.array(v) for v in zip(*pairs))
        out["saving"] = {"design": "paired", "n": len(pairs),
                         "ratio": ratio(manual, ai), "ratio_ci": paired_bootstrap_ci(manual, ai, ratio, rng),
                         "minutes": saved(manual, ai), "minutes_ci": paired_bootstrap_ci(manual, ai, saved, rng)}
        unpaired = {mode: [v[mode] for v in by_case.values() if mode in v and len(v) == 1] for mode in ("manual", "ai")}
        out["unpaired"] = {mode: {"n": len(v), "median_min": _median_or_none(v)} for mode, v in unpaired.items()}
    elif len(times["manual"]) and len(times["ai"]):
        out["saving"] = {"design": "unpaired", "n": int(len(times["manual"]) + len(times["ai"])),
                         "ratio": ratio(times["manual"], times["ai"]),
                         "ratio_ci": bootstrap_ci(times["manual"], times["ai"], ratio, rng),
                         "minutes": saved(times["manual"], times["ai"]),
                         "minutes_ci": bootstrap_ci(times["manual"], times["ai"], saved, rng)}
    out["paired"] = {"n_pairs": len(pairs)}
    if len(pairs) >= MIN_PAIRS_FOR_TEST:
        from scipy.stats import wilcoxon

        manual, ai = np.array(pairs).T
        test = wilcoxon(manual, ai)
        out["paired"].update({"median_difference_min": float(np.median(manual - ai)),
                              "wilcoxon_statistic": float(test.statistic), "p_value": float(test.pvalue)})
    organs = {}
    ai_records = [r for r in finished if r["mode"] == "ai" and r.get("metrics")]
    for name in ORGAN_SETS["oar22"].names:
        entries = [r["metrics"][name] for r in ai_records if name in r["metrics"]]
        if not entries:
            continue
        states = [((r.get("organs") or {}).get(name) or {}) for r in ai_records if name in r["metrics"]]
        placed = [int(st.get("assisted_edits") or 0) for st in states]
        # when in the review the organs placed by a click were first changed (s from first sight)
        placed_at = [st.get("first_edit_s") for st, p in zip(states, placed) if p > 0]
        organs[name] = {"n": len(entries), "edit_rate": float(np.mean([bool(e.get("edited")) for e in entries])),
                        # click-to-find placements (assisted edits): the share of cases that used one
                        "click_rate": float(np.mean([p > 0 for p in placed])),
                        "placements": int(sum(placed)),
                        "placements_undone": int(sum(int(st.get("assisted_undone") or 0) for st in states)),
                        "median_first_change_s_placed": _median_or_none(placed_at),
                        "median_dice": _median_or_none([e.get("dice") for e in entries]),
                        "median_apl_mm": _median_or_none([e.get("apl_mm") or 0.0 for e in entries])}
    out["organs"] = organs
    out["recorded"] = {
        "idle_threshold_s": sorted({r["idle_threshold_s"] for r in finished if r.get("idle_threshold_s") is not None}),
        **{key: sorted({m[key] for r in ai_records for m in r["metrics"].values() if m.get(key) is not None})
           for key in ("apl_tolerance_mm", "surface_dice_tolerance_mm")}}
    return out


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------

def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _plots(records: List[dict], stats: dict, out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = last_records([r for r in records if r.get("status") == "finished" and r.get("mode") in ("ai", "manual")
                             and r.get("case_id") and r.get("wall_s") is not None])[0]  # as analyse counts them
    written = []
    figure, ax = plt.subplots(figsize=(5, 4.5))
    data = [[r["wall_s"] / 60 for r in finished if r["mode"] == m] for m in ("manual", "ai")]
    ax.boxplot(data, showfliers=False)
    ax.set_xticks([1, 2], ["manual", "AI-assisted"])
    for k, values in enumerate(data, start=1):
        ax.scatter(np.full(len(values), k) + np.random.default_rng(k).uniform(-0.12, 0.12, len(values)), values, s=12,
                   alpha=0.6)
    ax.set_ylabel("time per case (min)")
    ax.set_title("Delineation time per case")
    written.append(_save(figure, out / "time_per_case.png"))
    organs = list(stats["organs"])
    if organs:
        ai = [r for r in finished if r["mode"] == "ai" and r.get("metrics")]
        figure, ax = plt.subplots(figsize=(11, 4.5))
        ax.boxplot([[r["metrics"][n]["dice"] for r in ai if (r["metrics"].get(n) or {}).get("dice") is not None]
                    for n in organs], showfliers=False)
        ax.set_xticks(range(1, len(organs) + 1), organs, rotation=70, fontsize=8)
        ax.set_ylabel("Dice, AI proposal vs final")
        ax.set_title("How much of each AI contour survived review")
        written.append(_save(figure, out / "dice_ai_vs_final.png"))
        figure, ax = plt.subplots(figsize=(11, 4.5))
        ax.bar(range(len(organs)), [stats["organs"][n]["median_apl_mm"] for n in organs])
        ax.set_xticks(range(len(organs)), organs, rotation=70, fontsize=8)
        ax.set_ylabel("median added path length (mm)")
        ax.set_title("Contour added or changed by the reviewer (APL)")
        written.append(_save(figure, out / "apl_per_organ.png"))
    return written


def _values(values, unit: str) -> str:
    values = sorted({v for v in values if v is not None})
    return ", ".join(f"{v:g}" for v in values) + f" {unit}" if values else "not recorded"


def definitions(stats: dict) -> List[str]:
    """What each figure of the report means, as a markdown list; the
    thresholds and tolerances are the ones the records state."""
    used = stats["recorded"]
    return [
        f"- **Time per case** (`wall_s`): {TIMING_DEFINITIONS['wall_s']}.",
        f"- **Active time** (`active_s`): {TIMING_DEFINITIONS['active_s']}. Idle thresholds in these records: "
        f"{_values(used['idle_threshold_s'], 's')}.",
        f"- **Edits**: {TIMING_DEFINITIONS['edits']}; an organ is edited when its final contour differs from the "
        "AI proposal by at least one voxel.",
        "- **Saving**: the median AI-assisted time over the median manual time, and their difference in minutes. "
        f"With at least {MIN_PAIRS_FOR_TEST} cases done both ways, over those cases, with a 95 % bootstrap CI "
        "that resamples cases (paired); otherwise over all cases, resampling each mode apart. Wilcoxon "
        "signed-rank test over the paired cases.",
        f"- **Repeated records**: a case reviewed more than once in one mode counts once: the {stats['repeat_rule']}.",
        "- **Dice AI vs final**: 2|A∩F| / (|A| + |F|) between the AI proposal A and the reviewer's final contour F.",
        "- **APL** (added path length, Vaassen et al. 2020): the length of final contour, slice by slice, farther "
        "than the tolerance from the AI contour of the same slice; one in-plane pixel width per boundary pixel. "
        f"Tolerances in these records: {_values(used['apl_tolerance_mm'], 'mm')} (`apl_tolerance_mm`).",
        "- **Surface Dice** (`surface_dice`, Nikolov et al. 2021, by DeepMind's reference implementation): the "
        "area of both surfaces (marching-cubes surface elements) within the tolerance of the other, over their "
        "total area; `surface_dice_voxels` is the voxel-count form (MONAI's default). Tolerances in these "
        f"records: {_values(used['surface_dice_tolerance_mm'], 'mm')} (`surface_dice_tolerance_mm`).",
        "- **Medians and IQR** are over cases; missing values are left out and counted (`n_with_active`).",
    ]


def _markdown(stats: dict, problems: List[str]) -> str:
    lines = ["# Time-savings study", ""]
    if stats["synthetic"]:
        lines += ["**These records are synthetic (generated by `focusnet study synth`), not measurements.**", ""]
    modes = stats["modes"]
    lines += ["## Results", ""]
    text = []
    for mode, label in (("manual", "Contouring the 22 OARs from scratch"), ("ai", "Correcting FocusNet's contours")):
        if mode in modes:
            m = modes[mode]
            active = ("no active time recorded" if m["median_active_min"] is None
                      else f"median active time {m['median_active_min']:.1f} min")
            text.append(f"{label} took a median of {m['median_min']:.1f} min per case "
                        f"(IQR {m['iqr_min'][0]:.1f}-{m['iqr_min'][1]:.1f}; n = {m['n']}; {active}).")
            if m.get("n_active_earlier_rules"):
                text.append(f"{m['n_active_earlier_rules']} of these record(s) were timed under the earlier activity "
                            "rules (no `activity_rules`: FocusNet before 2026-12-02, when every render of the 3D "
                            "view counted as an act, so a pause with renders in it was not idle): their active "
                            "time can be too high and is left out of the active median; their time per case is "
                            "not affected.")
    if "saving" in stats:
        s = stats["saving"]
        over = (f"over the {s['n']} cases contoured both ways, paired 95 % bootstrap CI resampling cases"
                if s["design"] == "paired" else "over all cases, 95 % bootstrap CI resampling each mode apart")
        text.append(f"AI assistance took {s['ratio']:.2f} times the manual time ({over}: "
                    f"{s['ratio_ci'][0]:.2f}-{s['ratio_ci'][1]:.2f}), saving {s['minutes']:.1f} min per case in "
                    f"medians (95 % CI {s['minutes_ci'][0]:.1f}-{s['minutes_ci'][1]:.1f}).")
        for mode, u in (stats.get("unpaired") or {}).items():
            if u["n"]:
                text.append(f"Cases contoured only {'manually' if mode == 'manual' else 'with AI'}: "
                            f"n = {u['n']}, median {u['median_min']:.1f} min.")
    paired = stats["paired"]
    if "p_value" in paired:
        text.append(f"In the {paired['n_pairs']} cases contoured both ways, the median paired difference was "
                    f"{paired['median_difference_min']:.1f} min (Wilcoxon signed-rank W = {paired['wilcoxon_statistic']:.1f}, "
                    f"p = {paired['p_value']:.2g}).")
    else:
        text.append(f"{paired['n_pairs']} case(s) were contoured both ways; at least {MIN_PAIRS_FOR_TEST} are needed "
                    "for the paired test.")
    lines += [" ".join(text), ""]
    if stats["organs"]:
        lines += ["| organ | edited (% of AI cases) | placed by click (% of AI cases) | placements (undone) | "
                  "placed: median first change (s) | median Dice AI vs final | median APL (mm) |",
                  "|---|---|---|---|---|---|---|"]
        for name, o in stats["organs"].items():
            dice = "-" if o["median_dice"] is None else f"{o['median_dice']:.3f}"
            apl = "-" if o["median_apl_mm"] is None else f"{o['median_apl_mm']:.0f}"
            when = o.get("median_first_change_s_placed")
            lines.append(f"| {name} | {100 * o['edit_rate']:.0f} | {100 * o.get('click_rate', 0.0):.0f} | "
                         f"{o.get('placements', 0)} ({o.get('placements_undone', 0)}) | "
                         f"{'-' if when is None else f'{when:.0f}'} | {dice} | {apl} |")
        lines.append("")
    lines += [f"{stats['n_finished']} finished and {stats['n_incomplete']} incomplete sessions of {stats['n_records']} "
              f"records; a case reviewed more than once in one mode counts once ({stats['repeat_rule']}; "
              f"{stats['n_repeated_left_out']} record(s) left out).", "",
              "## Definitions", "", *definitions(stats), "",
              "![time per case](time_per_case.png)", "", "![Dice](dice_ai_vs_final.png)", "", "![APL](apl_per_organ.png)"]
    if problems:
        lines += ["", "Skipped: " + "; ".join(problems)]
    return "\n".join(lines) + "\n"


def study_report(logs, out_dir, seed: int = 0) -> Tuple[dict, List[Path]]:
    from .imageio import atomic_output

    records, problems = read_records(*logs)
    if not records:
        raise ValueError(f"no readable records in {', '.join(map(str, logs))}")
    stats = analyse(records, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = _plots(records, stats, out)
    with atomic_output(out / "organs.csv", overwrite=True) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["organ", "n", "edit_rate", "median_dice_ai_vs_final", "median_apl_mm"])
            for name, o in stats["organs"].items():
                writer.writerow([name, o["n"], f"{o['edit_rate']:.3f}",
                                 "" if o["median_dice"] is None else f"{o['median_dice']:.4f}",
                                 "" if o["median_apl_mm"] is None else f"{o['median_apl_mm']:.1f}"])
    written.append(out / "organs.csv")
    with atomic_output(out / "report.md", overwrite=True) as tmp:
        tmp.write_text(_markdown(stats, problems))
    written.append(out / "report.md")
    return stats, written

