"""The recorded full run behind notebook 09's error bars (benchmarks/full/09_llm_one_shot_pruning.json).

Checks that the file is there with its provenance, that its settings are the ones the notebook states in
its setup cell, that it holds three or more calibration seeds, and that the live single-seed numbers in the
committed notebook lie inside the recorded spread (with a tolerance for other CPUs' float kernels).
"""

import ast
import json
import re
from pathlib import Path

import pytest

from chapter11.report import load_full_run
from chapter11.stats import summarize

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "09_llm_one_shot_pruning.ipynb"
NAME = "09_llm_one_shot_pruning"
TOLERANCE = 0.05  # relative slack beyond the recorded min..max
# SparseGPT from 8 x 128 tokens (fewer tokens than down_proj's 1,536 inputs: a rank-deficient Hessian) moves more
# with the CPU: the same seed and AVX2 kernels gave 40.00 / 71.30 / 175.25 on an AMD EPYC and 42.17 / 72.90 / 190.63
# on an Intel Xeon at 50% / 2:4 / 70% (+5.4%, +2.2%, +8.8%; benchmarks/cpu/09_live_results_by_cpu.json)
SPARSEGPT_TOLERANCE = 0.12


def _cells():
    return [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]


def _text(cell) -> str:
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def notebook_settings() -> dict:
    """SEQ_LEN, CAL_SEQS and EVAL_TOKENS as the notebook's setup cell defines them."""
    setup = "".join(_cells()[0]["source"])
    found = {}
    for name in ("SEQ_LEN", "CAL_SEQS", "EVAL_TOKENS"):
        match = re.search(rf"^{name}\s*=\s*([^#\n]+)", setup, re.MULTILINE)
        assert match, f"{name} is not set in the setup cell"
        found[name] = eval(match.group(1), {"__builtins__": {}}, dict(found))  # plain arithmetic on earlier names
    return found


def live_results() -> dict:
    """The single-seed perplexities the committed notebook printed (the LIVE_RESULTS line of the grid cell)."""
    for cell in _cells():
        for line in _text(cell).splitlines():
            if line.startswith("LIVE_RESULTS "):
                return json.loads(line.split(" ", 1)[1])
    raise AssertionError("the committed notebook printed no LIVE_RESULTS line")


def live_ablation() -> dict:
    for cell in _cells():
        for line in _text(cell).splitlines():
            if line.startswith("Wanda 50%, perplexity by calibration sequences"):
                return {int(k): v for k, v in ast.literal_eval(line.split(": ", 1)[1]).items()}
    raise AssertionError("the committed notebook printed no calibration ablation")


@pytest.fixture(scope="module")
def recorded():
    return load_full_run(NAME)


def test_recorded_run_is_clean_and_made_by_its_driver(recorded):
    from chapter11.experiments.exp09_oneshot import ONE_SHOT_RUN_NAME, ONE_SHOT_SETTINGS

    assert recorded["name"] == NAME == ONE_SHOT_RUN_NAME
    assert recorded["command"] == "python -m chapter11.experiments.exp09_oneshot grid"
    assert re.match(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC", recorded["date"])
    assert recorded["machine"] and recorded["seconds"] > 0
    assert "uncommitted" not in recorded["commit"] and len(recorded["commit"]) == 40, recorded["commit"]  # a clean commit
    assert recorded["settings"] == json.loads(json.dumps(ONE_SHOT_SETTINGS))
    source = NOTEBOOK.read_text()
    # SparseGPT's numbers move with the thread count: the grid ran at the notebook's two threads, like the other 09 records
    assert recorded["results"]["unit_threads"] == [2] and "torch.set_num_threads(2)" in source
    # the notebook's CH11_FULL=1 branch runs the driver, and writes no record of its own
    assert "one_shot_run()" in source and "save_full_run" not in source


def test_recorded_settings_match_the_notebook(recorded):
    s, nb = recorded["settings"], notebook_settings()
    assert (s["seq_len"], s["calibration_sequences"], s["eval_tokens"]) == (nb["SEQ_LEN"], nb["CAL_SEQS"], nb["EVAL_TOKENS"])
    assert len(s["seeds"]) >= 3 and s["seeds"][0] == 0
    assert {"30%", "50%", "70%", "2:4"} <= set(s["patterns"])
    ppl = recorded["results"]["perplexity"]
    for pattern in s["patterns"]:
        assert len(ppl[f"magnitude {pattern}"]) == 1  # needs no calibration data: one run
        if pattern in ("30%", "50%", "70%", "2:4"):
            assert all(len(ppl[f"{m} {pattern}"]) == len(s["seeds"]) for m in ("wanda", "sparsegpt"))
    ablation = recorded["results"]["calibration_ablation"]
    assert 1 in s["calibration_sizes"] and nb["CAL_SEQS"] in s["calibration_sizes"] and max(s["calibration_sizes"]) >= 16
    assert all(len(ablation[str(size)]) == len(s["seeds"]) for size in s["calibration_sizes"])


def _inside(value, values, slack=TOLERANCE):
    return min(values) * (1 - slack) <= value <= max(values) * (1 + slack)


def test_live_single_seed_results_lie_inside_the_recorded_spread(recorded):
    live, ppl = live_results(), recorded["results"]["perplexity"]
    assert abs(live.pop("dense") - recorded["results"]["dense"]) / recorded["results"]["dense"] < 0.02
    assert len(live) >= 6
    for key, value in live.items():
        slack = SPARSEGPT_TOLERANCE if key.startswith("sparsegpt") else TOLERANCE
        assert _inside(value, ppl[key], slack), (key, value, ppl[key])
    ablation = recorded["results"]["calibration_ablation"]
    for size, value in live_ablation().items():
        if str(size) in ablation:
            assert _inside(value, ablation[str(size)]), (size, value, ablation[str(size)])


def test_recorded_orderings_hold_on_average(recorded):
    ppl = recorded["results"]["perplexity"]
    dense = recorded["results"]["dense"]
    for pattern in ("50%", "70%", "2:4"):
        magnitude = ppl[f"magnitude {pattern}"][0]
        for method in ("wanda", "sparsegpt"):
            mean = summarize(ppl[f"{method} {pattern}"]).mean
            assert dense < mean < magnitude / 2, (method, pattern, mean, magnitude)


def test_large_calibration_record_matches_the_full_run(recorded):
    """benchmarks/full/09_calibration_ablation.json: 32 and 64 sequences, the same method, seeds and evaluation."""
    from chapter11.experiments.exp09_oneshot import ABLATION_RUN_NAME, ABLATION_SETTINGS

    large = load_full_run(ABLATION_RUN_NAME)
    s, full = large["settings"], recorded["settings"]
    assert s == ABLATION_SETTINGS and large["command"] == "python -m chapter11.experiments.exp09_oneshot ablation"
    assert f"{s['method']} {s['sparsity']:.0%}" == full["ablation_method"]
    assert (s["seq_len"], s["eval_tokens"], s["seeds"]) == (full["seq_len"], full["eval_tokens"], full["seeds"])
    assert min(s["sizes"]) > max(full["calibration_sizes"]) and max(s["sizes"]) == 64
    assert all(len(large["results"]["perplexity"][str(size)]) == len(s["seeds"]) for size in s["sizes"])
    assert "ABLATION_RUN_NAME" in NOTEBOOK.read_text()


def test_sufficient_calibration_record_is_clean_complete_and_matches_its_driver():
    from chapter11.experiments.exp09_oneshot import SUFFICIENT_RUN_NAME, SUFFICIENT_SETTINGS

    rec = load_full_run(SUFFICIENT_RUN_NAME)
    assert "uncommitted" not in rec["commit"] and len(rec["commit"]) == 40
    assert rec["settings"] == SUFFICIENT_SETTINGS
    ppl, s = rec["results"]["perplexity"], rec["settings"]
    for p, sizes in s["sizes_by_pattern"].items():
        assert len(ppl[f"magnitude-layer {p}"]) == len(ppl[f"magnitude-row {p}"]) == 1
        for size in sizes:
            for method in ("wanda", "sparsegpt"):
                values = ppl[f"{method} {p} {size}x{s['seq_len']}"]
                assert len(values) == len(s["seeds"]) and all(rec["results"]["dense"] < v < 1e4 for v in values)


def test_long_evaluation_record_is_clean_and_pairs_with_the_grid_and_the_sufficient_run(recorded):
    """benchmarks/full/09_long_evaluation.json: the grid's samples at 30%, 70% and 2:4, judged like the sufficient run."""
    from chapter11.experiments.exp09_oneshot import LONG_EVAL_RUN_NAME, LONG_EVAL_SETTINGS, SUFFICIENT_RUN_NAME

    rec, suff = load_full_run(LONG_EVAL_RUN_NAME), load_full_run(SUFFICIENT_RUN_NAME)
    assert rec["command"] == "python -m chapter11.experiments.exp09_oneshot long-eval"
    assert "uncommitted" not in rec["commit"] and len(rec["commit"]) == 40, rec["commit"]
    s, grid, ss = rec["settings"], recorded["settings"], suff["settings"]
    assert s == LONG_EVAL_SETTINGS and rec["results"]["unit_threads"] == [2]
    # the grid's calibration samples (same size, length and seeds) ...
    assert (s["calibration_sequences"], s["seq_len"], s["seeds"]) == (grid["calibration_sequences"], grid["seq_len"], grid["seeds"])
    # ... judged on the sufficient run's text: at least 16k tokens in windows of at least 512
    assert (s["eval_tokens"], s["eval_window"]) == (ss["eval_tokens"], ss["eval_window"]) and s["eval_tokens"] >= 16384 and s["eval_window"] >= 512
    assert abs(rec["results"]["dense"] / suff["results"]["dense"] - 1) < 1e-3
    # with the sufficient run's 50% at 8 sequences, every pattern the grid gives a verdict for is judged on the long text
    assert set(s["patterns"]) | {p for p, sizes in ss["sizes_by_pattern"].items() if grid["calibration_sequences"] in sizes} \
        == {p for p in grid["patterns"] if len(recorded["results"]["perplexity"][f"wanda {p}"]) == len(grid["seeds"])}
    ppl = rec["results"]["perplexity"]
    for p in s["patterns"]:
        assert len(ppl[f"magnitude {p}"]) == 1
        assert all(len(ppl[f"{m} {p}"]) == len(s["seeds"]) and min(ppl[f"{m} {p}"]) > rec["results"]["dense"] for m in ("wanda", "sparsegpt"))
    assert "LONG_EVAL_RUN_NAME" in NOTEBOOK.read_text()


def test_sparsegpt_curve_record_is_clean_and_pairs_with_the_wanda_curve(recorded):
    """benchmarks/full/09_sparsegpt_calibration.json: SparseGPT from 1 to 64 sequences on the Wanda curve's samples."""
    from chapter11.experiments.exp09_oneshot import ABLATION_RUN_NAME, SPARSEGPT_CURVE_RUN_NAME, SPARSEGPT_CURVE_SETTINGS

    rec = load_full_run(SPARSEGPT_CURVE_RUN_NAME)
    assert "uncommitted" not in rec["commit"] and len(rec["commit"]) == 40
    s, wanda = rec["settings"], load_full_run(ABLATION_RUN_NAME)["settings"]
    assert s == SPARSEGPT_CURVE_SETTINGS and s["method"] == "sparsegpt"
    for key in ("sparsity", "seq_len", "eval_tokens", "seeds"):   # what makes the two curves pair up by size and seed
        assert s[key] == wanda[key], key
    sizes = {str(k) for k in s["sizes"]}
    assert sizes <= set(recorded["results"]["calibration_ablation"]) | {str(k) for k in wanda["sizes"]}
    ppl = rec["results"]["perplexity"]
    assert set(ppl) == sizes and all(len(v) == len(s["seeds"]) and all(recorded["results"]["dense"] < x < 1e4 for x in v) for v in ppl.values())
    assert "SPARSEGPT_CURVE_RUN_NAME" in NOTEBOOK.read_text()
