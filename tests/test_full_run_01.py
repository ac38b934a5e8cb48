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
