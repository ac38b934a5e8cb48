"""The recorded 12-seed run behind notebook 01's claims at 95% and 98% (chapter11.experiments.exp01_schedules)."""

import json
from pathlib import Path

from chapter11.experiments import exp01_schedules
from chapter11.stats import difference, separated

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "01_iterative_magnitude_pruning.ipynb"


def test_record_has_provenance_and_every_seed():
    rec = exp01_schedules.load_extreme()
    for key in ("date", "machine", "commit", "command", "seconds", "settings", "results"):
        assert key in rec, key
    s, table = rec["settings"], rec["results"]["test_accuracy"]
    assert s["seeds"] == exp01_schedules.SEEDS and len(s["seeds"]) >= 8 and s["targets"] == exp01_schedules.TARGETS
    assert {k: s[k] for k in exp01_schedules.SETTINGS} == exp01_schedules.SETTINGS
    assert set(table) == {"dense"} | {f"{m} {t}" for m in ("one-shot", "iterative", "cubic", "random") for t in s["targets"]}
    assert all(len(v) == len(s["seeds"]) and all(0.1 < x < 1 for x in v) for v in table.values())


def test_record_carries_the_notebooks_claims():
    table = exp01_schedules.load_extreme()["results"]["test_accuracy"]
    for m in ("iterative", "cubic"):
        assert separated(table[f"{m} 0.98"], table["one-shot 0.98"]) and difference(table[f"{m} 0.98"], table["one-shot 0.98"]).mean > 0
    assert separated(table["iterative 0.95"], table["one-shot 0.95"]) and difference(table["iterative 0.95"], table["one-shot 0.95"]).mean < 0


def test_driver_settings_are_the_notebooks():
    source = "".join("".join(c["source"]) for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code")
    s = exp01_schedules.SETTINGS
    assert (s["lr"], s["batch"]) == (2e-3, 128)
    for text in (f"NUM_SAMPLES = 20_000 if FULL else {s['num_samples']:_}", f"FT_STEPS = 1000 if FULL else {s['ft_steps']}",
                 f"FINAL, STAGES = 0.8, {s['stages']}", f"MAX_EPOCHS, PATIENCE = {s['max_epochs']}, {s['patience']}",
                 "LR, BATCH = 2e-3, 128", "loaders(split, batch_size=BATCH, seed=100 + seed)"):
        assert text in source, text


def test_budget_run_resumes_from_its_log(tmp_path):
    """A tiny budget sweep: every method gets the same steps, each (seed, budget) is logged once and not redone."""
    log = tmp_path / "budget.jsonl"
    res = exp01_schedules.budget_run(seeds=[0], budgets=[10, 20], targets=[0.9], log=log, save=False)
    assert set(res["test_accuracy"]) == {f"{m} 0.9 {b}" for m in ("one-shot", "iterative", "cubic") for b in (10, 20)} | {"dense 10", "dense 20"}
    lines = log.read_text().splitlines()
    assert [json.loads(x)["steps"] for x in lines] == [10, 20]
    assert all(r["steps"] == json.loads(x)["steps"] for x in lines for r in json.loads(x)["rows"])
    again = exp01_schedules.budget_run(seeds=[0], budgets=[10, 20], targets=[0.9], log=log, save=False)
    assert again == res and log.read_text().splitlines() == lines      # read back, nothing retrained


def test_budget_record_is_clean_complete_and_carries_the_notebooks_claims():
    rec = exp01_schedules.load_budget_sweep()
    assert "uncommitted" not in rec["commit"] and len(rec["commit"]) == 40
    s, res = rec["settings"], rec["results"]
    assert len(s["seeds"]) >= 8 and s["budgets"] == exp01_schedules.BUDGETS and s["targets"] == exp01_schedules.BUDGET_TARGETS
    assert {k: s[k] for k in exp01_schedules.SETTINGS} == exp01_schedules.SETTINGS
    keys = {f"{m} {t} {b}" for m in ("one-shot", "iterative", "cubic") for t in s["targets"] for b in s["budgets"]} | {f"dense {b}" for b in s["budgets"]}
    for metric in ("test_accuracy", "val_accuracy"):
        assert set(res[metric]) == keys and all(len(v) == len(s["seeds"]) and all(0.1 < x < 1 for x in v) for v in res[metric].values())
    d = exp01_schedules.budget_differences(rec)
    assert d["iterative", 0.9, 400].high < 0 < d["iterative", 0.9, 4000].high
    assert all(d["cubic", t, b].mean > 0 for t in s["targets"] for b in s["budgets"])
