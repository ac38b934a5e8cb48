"""The recorded run of notebook 04 (`exp04_heads.full_run`) exists, is clean, holds the driver's settings, and a live check lands on it."""

import json
from pathlib import Path

import pytest
import torch

from chapter11.experiments.exp04_heads import CUTS, FULL_RUN_NAME, MATCHED_CUTS, StructuredSettings
from chapter11.report import load_full_run

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "04_attention_head_pruning.ipynb"
LIVE_CUTS = ["heads: 1 of 3 groups per block", "MLP: 171 neurons per block", "blocks: 2 of 30", "blocks + MLP: 5 blocks, 341 neurons"]


@pytest.fixture(scope="module")
def record():
    return load_full_run(FULL_RUN_NAME)


def test_record_is_clean_and_holds_the_drivers_settings(record):
    for key in ("date", "machine", "commit", "command", "seconds", "settings", "results"):
        assert key in record, key
    assert "uncommitted" not in record["commit"] and len(record["commit"]) == 40, record["commit"]
    assert record["command"] == "python -m chapter11.experiments.exp04_heads" and record["seconds"] > 0
    assert record["settings"] == json.loads(json.dumps(StructuredSettings().as_dict()))  # tuples come back as lists
    source = NOTEBOOK.read_text()
    for name in LIVE_CUTS:  # the notebook's live cuts are recorded under the same names
        assert name in CUTS and name in source, name


def test_record_is_complete(record):
    s, r = record["settings"], record["results"]
    draws = len(s["calib_seeds"])
    assert draws >= 3 and 12 < r["dense_ppl"] < 40 and len(r["random_ppl"]) == len(s["random_seeds"])
    assert set(r["cuts"]) == set(CUTS)
    for name, cut in r["cuts"].items():
        assert len(cut["ppl_before"]) == len(cut["ppl_after"]) == len(cut["first_loss"]) == draws, name
        assert all(p > r["dense_ppl"] for p in cut["ppl_before"] + cut["ppl_after"]), name
        assert cut["predicted_prefill"] > 1 and cut["predicted_decode"] > 1, name
    heads = [c for c in MATCHED_CUTS if c.startswith("heads")]
    assert len({r["cuts"][c]["removed_params"] for c in heads}) == 1  # the three head cuts remove the same parameters
    assert all(0.05 < r["cuts"][c]["share"] < 0.07 for c in MATCHED_CUTS)
    for measure in ("prefill", "prefill_batch", "decode"):
        speed = r["speed"][measure]
        assert set(speed["speedup"]) == {"dense", *CUTS}, measure
        assert all(len(t) == s["speed_repeats"] for t in speed["times"].values()), measure
        assert all(q["q1"] <= q["median"] <= q["q3"] for q in speed["speedup"].values()), measure
        assert speed["speedup"]["dense"]["median"] == 1.0


@pytest.mark.slow
def test_a_live_random_choice_reproduces_the_recorded_one(record):
    from chapter11.data import pydoc_topics, text_tokens
    from chapter11.models import load_smollm
    from chapter11.structured.heads import group_removal_order, plan_from_order, remove_heads
    from chapter11.train import perplexity

    torch.set_num_threads(2)
    s, r = record["settings"], record["results"]
    model, tokenizer = load_smollm()
    tokens = text_tokens(tokenizer, pydoc_topics("evaluation"))
    seed = s["random_seeds"][0]
    plan = plan_from_order(group_removal_order(torch.rand(30, 3, generator=torch.Generator().manual_seed(seed)), group=3), per_layer=1)
    live = perplexity(remove_heads(model, plan), tokens, block_size=128, batch_size=8, max_tokens=s["eval_tokens"])
    assert live == pytest.approx(r["random_ppl"][0], rel=0.02)  # no training involved: only the kernels may differ
