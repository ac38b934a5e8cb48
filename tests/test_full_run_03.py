"""The recorded full runs of Experiment 3 (benchmarks/full/03_*.json) against notebook 03.

Checks that each record exists, was made with the settings the notebook
states (`chosen_grid()` for the grid, `GridSettings()` for the short
regime's records, `LMSettings()`), holds every method x sparsity x seed with the
sparsity reached exactly, and that the notebook's live single-seed results
(its committed outputs) lie inside the recorded spread, with a tolerance.
"""

import json
import re
from pathlib import Path

import pytest

from chapter11.experiments import exp03_movement as ex3
from chapter11.report import load_full_run

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "03_movement_vs_magnitude.ipynb"


@pytest.fixture(scope="module")
def grid():
    return load_full_run(ex3.FULL_RUN_NAME)


@pytest.fixture(scope="module")
def lm():
    return load_full_run(ex3.LM_FULL_RUN_NAME)


def _notebook_text() -> str:
    nb = json.loads(NOTEBOOK.read_text())
    out = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            out.append("".join(o.get("text", "")))
    return "\n".join(out)


def _assert_every_run_is_there(runs, settings):
    """A dense run for every seed, and every method x sparsity x seed of `settings` (GridSettings or LMSettings)."""
    seen = {(r["method"], r["target"], r["seed"]) for r in runs}
    for seed in settings.seeds:
        assert ("dense", 0.0, seed) in seen, seed
        for method in settings.methods:
            for sparsity in settings.sparsities:
                assert (method, sparsity, seed) in seen, (method, sparsity, seed)


def test_grid_record_matches_the_notebook_settings(grid):
    assert grid["settings"] == ex3.chosen_grid().as_dict()
    assert grid["command"] and grid["machine"]
    assert "uncommitted" not in grid["commit"] and len(grid["commit"]) == 40, grid["commit"]  # recorded from a clean commit
    source = NOTEBOOK.read_text()
    assert "G = chosen_grid()" in source and "load_full_run(FULL_RUN_NAME)" in source


def test_the_grid_runs_in_the_regime_the_ablation_chose_on_validation():
    ablation = load_full_run(ex3.ABLATION_NAME)
    table = ex3.ablation_table(ablation)
    best = max(table, key=lambda v: table[v]["hard"].mean)   # recomputed here, independently of chosen_variant
    assert ex3.chosen_variant(ablation) == best
    assert ablation["settings"]["variants"][best] == {"steps": ex3.chosen_grid().steps}
    assert ex3.chosen_grid().steps != ex3.GridSettings().steps  # the choice moved the grid away from the short regime


def test_grid_record_is_complete_and_every_target_is_reached(grid):
    s = ex3.chosen_grid()
    runs = grid["results"]["runs"]
    _assert_every_run_is_there(runs, s)
    for r in runs:
        assert r["steps"] == s.steps
        if r["method"] != "dense":
            assert abs(r["sparsity"] - r["target"]) < 1e-4, r["key"]
    assert grid["results"]["penalty"] in s.penalties
    assert len(grid["results"]["dense_long"]["val_trace"]) == s.dense_long_steps // s.eval_every


def test_live_minilm_results_lie_inside_the_recorded_spread():
    # the live runs use the short regime, GridSettings(): their record is the three extra seeds at 97%
    summaries = ex3.grid_summaries(load_full_run(ex3.MORE_SEEDS_NAME)["results"]["runs"])
    live = re.findall(r"^live (magnitude|hard|soft|mixed|dense)\s+sparsity ([\d.]+)\s+val ([\d.]+)\s+test ([\d.]+)",
                      _notebook_text(), flags=re.M)
    assert live, "notebook 03 must print its live results as 'live <method> sparsity .. val .. test ..'"
    for method, sparsity, _, test in live:
        recorded = summaries[method][0.0 if method == "dense" else float(sparsity)]
        low, high = min(recorded.values), max(recorded.values)
        collapsed = method != "dense" and float(test) < 1 / 9 + 0.01  # movement runs can collapse to chance (see notebook)
        assert collapsed or low - 0.08 <= float(test) <= high + 0.08, (method, sparsity, test, recorded.values)


def test_lm_record_matches_settings_and_is_complete(lm):
    s = ex3.LMSettings()
    assert lm["settings"] == s.as_dict()
    assert "uncommitted" not in lm["commit"] and len(lm["commit"]) == 40, lm["commit"]  # recorded from a clean commit
    runs = lm["results"]["runs"]
    _assert_every_run_is_there(runs, s)
    for r in runs:
        assert r["lr"] == lm["results"]["lr"]
        if r["method"] != "dense":
            assert abs(r["sparsity"] - r["target"]) < 1e-4
    assert lm["results"]["lr"] in s.lrs
    assert lm["results"]["step_times"]["ratio"] > 1.0  # recomputing the frozen blocks costs more


def test_live_lm_results_lie_inside_the_recorded_spread(lm):
    live = re.findall(r"^live (dense|magnitude|hard|soft|mixed)\s+sparsity ([\d.]+)\s+perplexity python ([\d.]+)\s+general ([\d.]+)",
                      _notebook_text(), flags=re.M)
    assert live, "notebook 03 must print its live LLM results as 'live <method> sparsity .. perplexity python .. general ..'"
    for method, sparsity, python, general in live:
        rec = [r for r in lm["results"]["runs"] if r["method"] == method and abs(r["target"] - float(sparsity)) < 1e-9]
        assert rec, (method, sparsity)
        for key, value in (("python", float(python)), ("general", float(general))):
            values = [r[key] for r in rec]
            assert 0.9 * min(values) <= value <= 1.1 * max(values), (method, sparsity, key, value, values)


def test_first_cut_record_matches_the_notebook_and_holds_every_seed():
    fc = load_full_run(ex3.FIRST_CUT_NAME)
    sparsities = ["0.01", "0.03", "0.1"]
    assert fc["settings"] == {**ex3.GridSettings().as_dict(), "first_cut_sparsities": [float(s) for s in sparsities]}
    assert sorted(fc["results"]) == [str(seed) for seed in ex3.GridSettings().seeds]
    for r in fc["results"].values():
        assert r["steps"] == int(ex3.GridSettings().warmup_frac * ex3.GridSettings().steps)
        for kind in ("movement", "movement_eq4", "magnitude", "random"):
            assert sorted(r[kind]) == sparsities and sorted(r["removed_abs_w"][kind]) == sparsities
    source = NOTEBOOK.read_text()
    assert "load_full_run(FIRST_CUT_NAME)" in source and "first_cut(task, S, seed=LIVE_SEED)" in source and "LIVE_SEED = seed_offset()" in source


def test_more_seeds_record_matches_its_settings_and_is_complete():
    more = load_full_run(ex3.MORE_SEEDS_NAME)
    s = ex3.more_seeds_settings()
    assert more["settings"] == s.as_dict()
    assert set(s.seeds).isdisjoint(ex3.GridSettings().seeds)
    seen = {(r["method"], r["target"], r["seed"]) for r in more["results"]["runs"]}
    assert seen == {("dense", 0.0, seed) for seed in s.seeds} | {(m, 0.97, seed) for m in s.methods for seed in s.seeds}
    for r in more["results"]["runs"]:
        assert r["steps"] == s.steps and (r["method"] == "dense" or abs(r["sparsity"] - 0.97) < 1e-4)
        assert r["method"] != "soft" or r["penalty"] == 1.0  # the short-regime grid's choice on validation
    assert "load_full_run(MORE_SEEDS_NAME)" in NOTEBOOK.read_text()


@pytest.mark.parametrize("argv", [["worker", "2/2"], ["worker", "x"], ["worker"], ["--worker", "1/0"], ["1/2"]])
def test_the_driver_refuses_a_bad_worker_argument(argv):
    with pytest.raises(SystemExit, match="worker"):
        ex3._worker(argv)
