"""The recorded CH11_FULL=1 run of notebook 04 exists, matches the notebook's settings, and a live check lands inside it."""

import ast
import json
from pathlib import Path

import pytest
import torch

from chapter11.report import load_full_run

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "04_attention_head_pruning.ipynb"
COMMITTED_CONFIGS = ["heads: 1 of 3 groups per block", "MLP: 171 neurons per block", "blocks: 2 of 30",
                     "blocks + MLP: 5 blocks, 341 neurons"]


def _full_settings() -> dict:
    """Constants of the notebook's setup cell at CH11_FULL=1: `X = a if FULL else b` gives a, `X = c` gives c."""
    nb = json.loads(NOTEBOOK.read_text())
    found = {}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.parse("".join(cell["source"])).body:
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                continue
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "offset_seeds" and len(value.args) == 1:
                value = value.args[0]  # the seeds at CH11_SEED_OFFSET=0, which the recorded run used
            if isinstance(value, ast.IfExp) and getattr(value.test, "id", None) == "FULL":
                value = value.body
            try:
                found[node.targets[0].id] = ast.literal_eval(value)
            except ValueError:
                pass
    return found


@pytest.fixture(scope="module")
def record():
    return load_full_run("04_llm_structured")


def test_record_has_provenance_and_the_notebooks_settings(record):
    for key in ("date", "machine", "commit", "command", "seconds", "settings", "results"):
        assert key in record, key
    assert "CH11_FULL=1" in record["command"] and record["seconds"] > 0
    nb, s = _full_settings(), record["settings"]
    assert s["eval_tokens"] == nb["EVAL_TOKENS"] and s["calib_batches"] == nb["CALIB_BATCHES"]
    assert s["random_seeds"] == nb["RANDOM_SEEDS"] and s["speed_repeats"] == nb["SPEED_REPEATS"]
    assert s["recovery_steps"] == nb["RECOVERY_STEPS"] and s["new_tokens"] == nb["NEW_TOKENS"]
    source = NOTEBOOK.read_text()
    for name in COMMITTED_CONFIGS:
        assert name in s["configs"] and json.dumps(name)[1:-1] in source, name
    assert len(s["configs"]) > len(COMMITTED_CONFIGS)


def test_record_is_complete_and_keeps_the_robust_orderings(record):
    s, r = record["settings"], record["results"]
    assert 12 < r["dense_ppl"] < 40
    for key in ("config_ppl", "removed_params", "predicted_prefill", "predicted_decode", "prefill_speedup", "decode_speedup",
                "decode_tokens_per_s"):
        assert set(s["configs"]) <= set(r[key]), key
    assert len(r["heads_random_ppl"]) == len(s["random_seeds"]) == len(r["heads_random_ppl_1024"])
    assert r["heads_importance_ppl"] < sum(r["heads_random_ppl"]) / len(r["heads_random_ppl"])
    assert all(p > r["dense_ppl"] for p in r["config_ppl"].values())
    assert all(x > 1 for x in r["predicted_prefill"].values()) and all(x > 1 for x in r["predicted_decode"].values())
    largest = COMMITTED_CONFIGS[-1]
    assert r["recovery"]["config"] == largest and r["recovery"]["after"] < r["recovery"]["before"] == r["config_ppl"][largest]


@pytest.mark.slow
def test_a_live_random_choice_lies_inside_the_recorded_spread(record):
    from chapter11.data import pydoc_topics, text_tokens
    from chapter11.models import load_smollm
    from chapter11.structured.heads import group_removal_order, plan_from_order, remove_heads
    from chapter11.train import perplexity

    torch.set_num_threads(2)
    r = record["results"]
    seed = record["settings"]["random_seeds"][0]
    model, tokenizer = load_smollm()
    tokens = text_tokens(tokenizer, pydoc_topics("evaluation"))
    plan = plan_from_order(group_removal_order(torch.rand(30, 3, generator=torch.Generator().manual_seed(seed)), group=3), per_layer=1)
    live = perplexity(remove_heads(model, plan), tokens, block_size=128, batch_size=8, max_tokens=1024)
    spread = r["heads_random_ppl_1024"]
    assert 0.98 * min(spread) <= live <= 1.02 * max(spread), (live, spread)
