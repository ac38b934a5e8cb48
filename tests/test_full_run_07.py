"""The recorded equal-budget run of notebook 07 exists, carries the notebook's settings and a clean commit, and is complete."""

import ast
import json
from pathlib import Path

import pytest

from chapter11.experiments import MIN_RECORDED_SEEDS
from chapter11.experiments.exp07_channels import RUN_NAME, SETTINGS, criterion_differences, equal_budget_table, load_equal_budget
from chapter11.structured.channels import CRITERIA

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "07_channel_pruning_distillation.ipynb"


def _notebook_settings() -> dict:
    """Constants of notebook 07's code cells at committed size (`A if FULL else B` gives B)."""
    found = {}
    for cell in json.loads(NOTEBOOK.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.parse("".join(cell["source"])).body:
            if not isinstance(node, ast.Assign) or not isinstance(node.targets[0], (ast.Name, ast.Tuple)):
                continue
            value = node.value.orelse if isinstance(node.value, ast.IfExp) else node.value
            names = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
            try:
                values = ast.literal_eval(value)
            except ValueError:
                continue
            values = values if len(names) > 1 else [values]
            found.update({n.id: v for n, v in zip(names, values) if isinstance(n, ast.Name)})
    return found


@pytest.fixture(scope="module")
def record():
    return load_equal_budget()


def test_record_has_clean_provenance_and_the_notebooks_settings(record):
    for key in ("date", "machine", "commit", "command", "seconds", "settings", "results"):
        assert key in record, key
    assert record["name"] == RUN_NAME and record["seconds"] > 0
    assert "uncommitted" not in record["commit"] and "forced" not in record["commit"], record["commit"]
    nb = _notebook_settings()
    s = record["settings"]
    assert {k: v for k, v in s.items() if k != "seeds"} == SETTINGS
    assert s["amounts"] == nb["AMOUNTS"] and s["criteria"] == list(CRITERIA)
    assert (s["max_epochs"], s["patience"]) == (nb["MAX_EPOCHS"], nb["PATIENCE"])
    assert (s["batch"], s["short_epochs"], s["recal_batches"]) == (nb["BATCH"], nb["RECOVERY_EPOCHS"], nb["RECAL_BATCHES"])
    assert len(s["seeds"]) >= MIN_RECORDED_SEEDS


def test_record_is_complete_and_its_budgets_are_the_stated_ones(record):
    s, r = record["settings"], record["results"]
    n = len(s["seeds"])
    keys = {"dense"} | {f"{stage} {c} {a}" for stage in ("ft2", "ft-es") for c in s["criteria"] for a in s["amounts"]}
    keys |= {f"{control} {a}" for control in ("scratch-e", "scratch-b") for a in s["amounts"]}
    keys |= {f"distill2 {s['distill']['criterion']} {a}" for a in s["distill"]["amounts"]}
    for part in ("val", "test", "epochs"):
        assert set(r[part]) == keys, part
        assert all(len(v) == n for v in r[part].values()), part
    assert all(0.05 < acc <= 1 for part in ("val", "test") for v in r[part].values() for acc in v)
    for i, budget in enumerate(r["dense_epochs"]):
        assert r["epochs"]["dense"][i] == budget <= s["max_epochs"]
        for a in s["amounts"]:
            assert r["epochs"][f"scratch-e {a}"][i] == budget
            assert r["epochs"][f"scratch-b {a}"][i] == round(budget * r["macs"]["dense"] / r["macs"][str(a)])
            for c in s["criteria"]:
                assert 1 <= r["epochs"][f"ft-es {c} {a}"][i] <= budget
                assert r["epochs"][f"ft2 {c} {a}"][i] == s["short_epochs"]


def test_summaries_read_the_record(record):
    table = equal_budget_table(record)
    assert set(table) == set(record["settings"]["amounts"])
    for amount, row in table.items():
        assert row["best"] in CRITERIA
        assert row["es - scratch-e"].n == len(record["settings"]["seeds"])
        assert abs(row["es - scratch-e"].mean - (row["ft-es"].mean - row["scratch-e"].mean)) < 1e-9
    diffs = criterion_differences(record, 0.5)
    assert set(diffs) == set(CRITERIA) - {"random"}
    with pytest.raises(ValueError, match="amount"):
        criterion_differences(record, 0.3)
    with pytest.raises(ValueError, match="stage"):
        criterion_differences(record, 0.5, stage="pruned")
