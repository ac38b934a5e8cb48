"""The recorded full run of notebook 02 (Transformer lottery tickets over seeds).

`CH11_FULL=1` writes `benchmarks/full/02_lottery_ticket.json`; the committed
notebook loads it and plots it as recorded. These checks keep the file honest:
it exists and says where it came from, its settings are the ones the notebook
states (the notebook prints its Transformer config in a compared cell, and
its setup cell names the seeds and the late-rewinding step), its tables are
well formed, and the single seed the notebook trains live lies inside the
recorded spread.
"""

import ast
import json
import re
from pathlib import Path

import pytest

from chapter11.lottery import LotteryConfig, sparsity_schedule
from chapter11.report import load_full_run

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "02_lottery_ticket.ipynb"
TOLERANCE = 0.03  # accuracy points a live run may move on another CPU (AVX2 vs AVX-512 kernels)


@pytest.fixture(scope="module")
def run():
    return load_full_run("02_lottery_ticket")


@pytest.fixture(scope="module")
def notebook():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    outputs = "\n".join("".join(o.get("text", "")) for c in cells if c["cell_type"] == "code" for o in c.get("outputs", []))
    return source, outputs


def _constant(source: str, name: str):
    match = re.search(rf"^{name} = (.+?)(\s+#.*)?$", source, re.MULTILINE)
    assert match, f"the notebook no longer defines {name}"
    return ast.literal_eval(match.group(1))


def test_file_says_where_it_came_from(run):
    for key in ("date", "machine", "commit", "command", "settings", "seconds", "results"):
        assert key in run, key
    assert run["name"] == "02_lottery_ticket" and "CH11_FULL=1" in run["command"]
    assert run["seconds"] > 0 and len(run["commit"]) >= 7


def test_settings_match_the_notebook(run, notebook):
    source, outputs = notebook
    settings = run["settings"]["transformer"]
    printed = re.search(r"settings \(the recorded run must use the same\): (\{.*\})", outputs)
    assert printed, "the notebook no longer prints its Transformer settings"
    assert settings["config"] == json.loads(printed.group(1))
    assert settings["seeds"] == _constant(source, "TF_SEEDS")
    assert settings["late_rewind_step"] == _constant(source, "TF_LATE_STEP")
    config = LotteryConfig.from_json(settings["config"])
    assert config.rounds >= 3 and (1 - config.prune_fraction) ** config.rounds <= 0.2  # at most 20% remaining
    assert config.patience > 0  # every run stops on its validation plateau
    mlp = run["settings"]["mlp"]  # what the notebook's markdown promises for CH11_FULL=1
    assert mlp["config"]["prune_fraction"] == 0.2 and mlp["config"]["rounds"] == 10 and len(mlp["seeds"]) == 5


def test_tables_are_well_formed(run):
    config = LotteryConfig.from_json(run["settings"]["transformer"]["config"])
    seeds = run["settings"]["transformer"]["seeds"]
    tables = run["results"]["transformer"]
    expected = [1 - s for s in sparsity_schedule(config.prune_fraction, config.rounds)]
    for name, runs in (("accuracy", ("ticket", "reinit", "random_mask")), ("early_stop_step", ("ticket", "reinit", "random_mask")), ("late_rewind_accuracy", ("ticket",))):
        table = tables[name]
        assert table["seeds"] == seeds and table["density"] == pytest.approx(expected, abs=1e-3)
        for r in runs:
            assert len(table[r]) == len(expected) and all(len(row) == len(seeds) for row in table[r])
            if "accuracy" in name:
                assert all(0.0 <= v <= 1.0 for row in table[r] for v in row)
    assert len(seeds) >= 3
    mlp = run["results"]["mlp"]["accuracy"]
    assert mlp["density"][-1] == pytest.approx(0.8 ** 10, abs=1e-3) and len(mlp["seeds"]) == 5


def test_live_seed_lies_inside_the_recorded_spread(run, notebook):
    _, outputs = notebook
    match = re.search(r"live seed (\d+) ticket accuracy by round: \[([^\]]*)\]", outputs)
    assert match, "the notebook no longer prints its live Transformer result"
    seed, live = int(match.group(1)), [float(x) for x in match.group(2).split(",")]
    table = run["results"]["transformer"]["accuracy"]
    assert len(live) == len(table["density"])
    column = table["seeds"].index(seed)
    for got, values in zip(live, table["ticket"]):
        assert min(values) - TOLERANCE <= got <= max(values) + TOLERANCE, (got, values)
        assert abs(got - values[column]) <= TOLERANCE, (got, values[column])  # the same seed, recorded


def test_mlp_seeds_record_settles_the_mlp_comparison():
    from chapter11.experiments import exp02_lottery
    from chapter11.stats import separated

    rec = exp02_lottery.load_mlp_seeds()
    assert rec["settings"]["config"] == exp02_lottery.MLP_CONFIG.to_json()
    assert rec["settings"]["seeds"] == exp02_lottery.SEEDS and len(exp02_lottery.SEEDS) >= 8
    acc = rec["results"]["accuracy"]
    assert acc["seeds"] == exp02_lottery.SEEDS and len(acc["density"]) == exp02_lottery.MLP_CONFIG.rounds + 1
    for table in (acc, rec["results"]["early_stop_step"], rec["results"]["lowest_val_loss"]):
        assert all(len(row) == len(exp02_lottery.SEEDS) for run in ("ticket", "reinit", "random_mask") for row in table[run])
    ticket, reinit, random_mask = (acc[r][-1] for r in ("ticket", "reinit", "random_mask"))
    assert separated(ticket, reinit) and separated(ticket, random_mask)   # the claim notebook 02 states


def test_notebook_mlp_settings_match_the_recorded_driver():
    import json
    from pathlib import Path

    from chapter11.experiments import exp02_lottery

    source = "".join("".join(c["source"]) for c in json.loads((Path(__file__).resolve().parent.parent / "notebooks" / "02_lottery_ticket.ipynb").read_text())["cells"])
    cfg = exp02_lottery.MLP_CONFIG
    assert f"prune_fraction=0.2 if FULL else {cfg.prune_fraction}" in source and f"rounds=10 if FULL else {cfg.rounds}" in source


def test_deep_record_is_clean_complete_and_matches_its_driver(notebook):
    """benchmarks/full/02_lottery_deep.json: both models down to about 2% remaining, four networks per round."""
    from chapter11.experiments import MIN_RECORDED_SEEDS, exp02_lottery

    rec = exp02_lottery.load_deep()
    assert "uncommitted" not in rec["commit"] and len(rec["commit"]) == 40
    assert rec["command"] == "python -m chapter11.experiments.exp02_lottery --deep"
    configs = {k: c.to_json() for k, c in exp02_lottery.DEEP_CONFIGS.items()}
    assert rec["settings"]["configs"] == configs and len(rec["settings"]["seeds"]) >= MIN_RECORDED_SEEDS
    # the same Transformer and MLP as the notebook, pruned for more rounds
    source, outputs = notebook
    printed = json.loads(re.search(r"settings \(the recorded run must use the same\): (\{.*\})", outputs).group(1))
    assert {**configs["transformer"], "rounds": printed["rounds"], "controls": printed["controls"]} == printed
    assert {**configs["mlp"], "rounds": exp02_lottery.MLP_CONFIG.rounds} == {**exp02_lottery.MLP_CONFIG.to_json(), "seed": 0, "data_seed": 0}
    for name, config in exp02_lottery.DEEP_CONFIGS.items():
        expected = [1 - s for s in sparsity_schedule(config.prune_fraction, config.rounds)]
        assert expected[-1] < 0.02
        for key in ("accuracy", "early_stop_step"):
            table = rec["results"][name][key]
            assert table["seeds"] == rec["settings"]["seeds"] and table["density"] == pytest.approx(expected, abs=1e-3)
            for run in exp02_lottery.DEEP_RUNS:
                assert len(table[run]) == len(expected) and all(len(row) == len(table["seeds"]) for row in table[run])
                assert table[run][0] == table["ticket"][0]  # round 0 is the one dense run
        assert all(0.0 <= v <= 1.0 for run in exp02_lottery.DEEP_RUNS for row in rec["results"][name]["accuracy"][run] for v in row)
    assert "load_deep()" in source
