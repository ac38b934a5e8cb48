"""The recorded CH11_FULL=1 run of notebook 06 exists, matches the notebook's settings, and a live seed lands inside it."""

import ast
import json
from pathlib import Path

import pytest
import torch

from chapter11.report import load_full_run

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "06_dynamic_sparsity_rigl.ipynb"


def _notebook_constants() -> dict:
    """The literal settings assigned in the notebook's code cells (SPARSITIES, EPOCHS, SETTINGS, ...)."""
    nb = json.loads(NOTEBOOK.read_text())
    found = {}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.parse("".join(cell["source"])).body:
            if not isinstance(node, ast.Assign):
                continue
            targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
            values = node.value.elts if isinstance(node.value, ast.Tuple) and len(targets) > 1 else [node.value]
            for target, value in zip(targets, values):
                if not isinstance(target, ast.Name):
                    continue
                if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "offset_seeds" and len(value.args) == 1:
                    value = value.args[0]  # the seeds at CH11_SEED_OFFSET=0, which the recorded run used
                if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "dict":
                    found[target.id] = {k.arg: ast.literal_eval(k.value) for k in value.keywords}
                    continue
                try:
                    found[target.id] = ast.literal_eval(value)
                except ValueError:
                    pass
    return found


@pytest.fixture(scope="module")
def record():
    return load_full_run("06_dynamic_sparsity")


def test_record_has_provenance_and_the_notebooks_settings(record):
    for key in ("date", "machine", "commit", "command", "seconds", "settings", "results"):
        assert key in record, key
    assert "CH11_FULL=1" in record["command"] and record["seconds"] > 0
    nb = _notebook_constants()
    s = record["settings"]
    assert s["sparsities"] == nb["SPARSITIES"]
    assert s["methods"] == ["dense"] + nb["METHODS"]
    assert (s["epochs"], s["long_epochs"]) == (nb["EPOCHS"], 3 * nb["EPOCHS"])
    assert (s["batch"], s["lr"]) == (nb["BATCH"], nb["LR"])
    assert {k: s[k] for k in nb["SETTINGS"]} == nb["SETTINGS"]
    assert set(nb["SEEDS"]) <= set(s["seeds"]) and len(s["seeds"]) >= 5
    assert len(s["long_seeds"]) >= 3 and len(s["cnn_seeds"]) >= 3
    assert set(s["long_sparsities"]) <= set(s["sparsities"]) and set(s["cnn_sparsities"]) <= set(s["sparsities"])


def test_record_is_complete(record):
    s, r = record["settings"], record["results"]
    for arch, epochs_list, seeds, sparsities in [("MLP", [s["epochs"]], s["seeds"], s["sparsities"]),
                                                 ("MLP", [s["long_epochs"]], s["long_seeds"], s["long_sparsities"]),
                                                 ("CNN", [s["cnn_epochs"]], s["cnn_seeds"], s["cnn_sparsities"])]:
        for epochs in epochs_list:
            table = r[arch][str(epochs)]
            keys = {"dense"} | {f"{sp}/{m}" for sp in sparsities for m in s["methods"] if m != "dense"}
            assert set(table) == keys, (arch, epochs)
            for key, entry in table.items():
                assert len(entry["accuracy"]) == len(seeds), (arch, epochs, key)
                assert all(0.05 < a <= 1 for a in entry["accuracy"])
                assert 0 < entry["training_flops"] <= 1
            assert table["dense"]["training_flops"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("sparsity,method", [(0.9, "static"), (0.98, "rigl")])
def test_a_live_seed_lies_inside_the_recorded_spread(record, sparsity, method):
    from chapter11.data import loaders, mnist1d
    from chapter11.experiments.exp06_dynamic import train_sparse
    from chapter11.models import LeNet300100
    from chapter11.train import evaluate, seed_everything

    torch.set_num_threads(2)
    s = record["settings"]
    seed = s["seeds"][0]
    train_loader, test_loader = loaders(mnist1d(), batch_size=s["batch"], seed=seed)
    seed_everything(seed)
    model = LeNet300100()
    settings = {k: s[k] for k in ("update_every", "alpha", "end_fraction", "prune_start")}
    train_sparse(model, train_loader, method, sparsity, s["distribution"], epochs=s["epochs"], lr=s["lr"], seed=seed,
                 progress_bar=False, **settings)
    live = evaluate(model, test_loader)["accuracy"]
    recorded = record["results"]["MLP"][str(s["epochs"])][f"{sparsity}/{method}"]["accuracy"]
    assert min(recorded) - 0.03 <= live <= max(recorded) + 0.03, (live, recorded)


@pytest.fixture(scope="module")
def budget_record():
    return load_full_run("06_budget_sweep")


def test_budget_sweep_has_clean_provenance_and_the_notebooks_settings(budget_record):
    from chapter11.experiments import MIN_RECORDED_SEEDS
    from chapter11.experiments.exp06_dynamic import BUDGET_SETTINGS

    assert "uncommitted" not in budget_record["commit"] and "forced" not in budget_record["commit"], budget_record["commit"]
    s, nb = budget_record["settings"], _notebook_constants()
    assert {k: v for k, v in s.items() if k != "seeds"} == BUDGET_SETTINGS
    assert (s["batch"], s["lr"]) == (nb["BATCH"], nb["LR"]) and {k: s[k] for k in nb["SETTINGS"]} == nb["SETTINGS"]
    assert s["mlp_epochs"][0] == nb["EPOCHS"] and s["mlp_epochs"][1:] == [3 * nb["EPOCHS"], 5 * nb["EPOCHS"]]
    assert set(s["mlp_methods"]) == {"dense", *nb["METHODS"]} and len(s["seeds"]) >= MIN_RECORDED_SEEDS


def test_budget_sweep_is_complete(budget_record):
    from chapter11.experiments.exp06_dynamic import budget_differences

    s, r = budget_record["settings"], budget_record["results"]
    for arch in ("MLP", "CNN"):
        a = arch.lower()
        assert set(r[arch]) == {str(e) for e in s[f"{a}_epochs"]}
        for table in r[arch].values():
            keys = {"dense"} | {f"{sp}/{m}" for sp in s[f"{a}_sparsities"] for m in s[f"{a}_methods"] if m != "dense"}
            assert set(table) == keys, arch
            assert all(len(e["accuracy"]) == len(s["seeds"]) and 0 < e["training_flops"] <= 1 for e in table.values())
            assert table["dense"]["training_flops"] == 1.0
    diffs = budget_differences(budget_record)
    assert set(diffs) == {(arch, e, sp) for arch in ("MLP", "CNN") for e in s[f"{arch.lower()}_epochs"] for sp in s[f"{arch.lower()}_sparsities"]}
    assert all(set(d) == {"rigl - dense", "set - dense", "rigl - static", "rigl - set"} for d in diffs.values())
