"""Experiment 9, the drivers: one-shot pruning of SmolLM2-135M, every method and pattern, and the calibration ablation.

Covers: what notebook 09 runs around the method (`chapter11.oneshot`):
`prune_and_evaluate` (prune a copy, measure held-out perplexity),
`prune_grid` (method x pattern x calibration seed), `calibration_ablation`
(perplexity against the number of calibration sequences), `layer_means`
(per-layer numbers averaged by projection or block), `bench_prune_llm`
(`python -m chapter11 bench oneshot`: pruning time against a forward
pass, split by part), `ablation_run`, the recorded run with the sizes
too slow for the notebook, and `sufficient_calibration_run`, Wanda and
SparseGPT on 64 x 128 calibration tokens against a 16k-token held-out text,
and `long_evaluation_run`, the grid's other patterns judged on that text:

    python -m chapter11.experiments.exp09_oneshot grid        # the notebook's grid at its recorded size
    python -m chapter11.experiments.exp09_oneshot long-eval   # the grid's 30%, 70% and 2:4 on the 16k-token text
    python -m chapter11.experiments.exp09_oneshot ablation
    python -m chapter11.experiments.exp09_oneshot sufficient
    python -m chapter11.experiments.exp09_oneshot sparsegpt-curve   # SparseGPT from 1 to 64 sequences

But: perplexity on one held-out text (pydoc topics) and one model; the
calibration seeds vary the sample, not the text it is drawn from.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from torch import nn

from ..bench import time_callable
from ..masks import refuse_torch_prune
from ..oneshot import METHODS, PruneResult, calibration_sequences, prune_llm
from ..train import perplexity


def prune_and_evaluate(model: nn.Module, calibration: torch.Tensor | None, tokens: torch.Tensor, method: str = "wanda",
                       sparsity: float | None = 0.5, n: int | None = None, m: int | None = None, seq_len: int = 128,
                       batch_size: int = 8, **kwargs) -> tuple[float, PruneResult]:
    """Prune a copy of `model` with `prune_llm` and return (its perplexity on `tokens`, the PruneResult).

    `model` itself stays dense; perplexity runs over non-overlapping windows of
    `seq_len` tokens (`chapter11.train.perplexity`). Extra keywords go to `prune_llm`.
    """
    refuse_torch_prune(model)
    pruned = copy.deepcopy(model)
    try:
        result = prune_llm(pruned, calibration, method=method, sparsity=sparsity, n=n, m=m, batch_size=batch_size, **kwargs)
        return perplexity(pruned, tokens, block_size=seq_len, batch_size=batch_size), result
    finally:
        del pruned


def prune_grid(model: nn.Module, calibration_tokens: torch.Tensor, tokens: torch.Tensor, patterns: dict[str, dict],
               seeds: Sequence[int] = (0,), methods: Sequence[str] = METHODS, num_sequences: int = 8, seq_len: int = 128,
               measure_error: Sequence[str] = (), **kwargs) -> dict[tuple[str, str, int], tuple[float, PruneResult]]:
    """Every method at every pattern and calibration seed: {(method, label, seed): (perplexity, PruneResult)}.

    `patterns` maps a label to `prune_llm` keywords, e.g. {"50%": {"sparsity": 0.5},
    "2:4": {"sparsity": None, "n": 2, "m": 4}}. For each seed, `num_sequences` windows of
    `seq_len` tokens are drawn from `calibration_tokens` (`calibration_sequences`).
    Magnitude uses no calibration data, so it runs once per pattern, under the first seed.
    Wanda and SparseGPT also record per-layer output errors for the labels in
    `measure_error` (first seed only). Extra keywords go to `prune_llm`.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    runs = {}
    for seed in seeds:
        sample = calibration_sequences(calibration_tokens, num_sequences, seq_len, seed=seed)
        for label, pattern in patterns.items():
            for method in methods:
                if method == "magnitude" and seed != seeds[0]:
                    continue
                measure = method != "magnitude" and label in measure_error and seed == seeds[0]
                runs[method, label, seed] = prune_and_evaluate(model, None if method == "magnitude" else sample, tokens, method,
                                                               seq_len=seq_len, measure_error=measure, **pattern, **kwargs)
    return runs


def calibration_ablation(model: nn.Module, calibration_tokens: torch.Tensor, tokens: torch.Tensor,
                         sizes: Sequence[int], seeds: Sequence[int] = (0,), method: str = "wanda",
                         sparsity: float = 0.5, seq_len: int = 128, **kwargs) -> dict[int, list[float]]:
    """Held-out perplexity after pruning from `size` calibration sequences: {size: [perplexity per seed]}.

    Seed `s` draws `calibration_sequences(calibration_tokens, size, seq_len, seed=s)`,
    the same sample `prune_grid` draws for that size and seed, so the two can be
    put side by side. Extra keywords go to `prune_llm`.
    """
    if method not in METHODS or method == "magnitude":
        raise ValueError(f"method must use calibration data (wanda or sparsegpt), got {method!r}")
    if not sizes or not seeds:
        raise ValueError(f"sizes and seeds must be non-empty, got sizes={list(sizes)}, seeds={list(seeds)}")
    out = {}
    for size in sizes:
        out[size] = []
        for seed in seeds:
            sample = calibration_sequences(calibration_tokens, size, seq_len, seed=seed)  # (size, seq_len)
            ppl, _ = prune_and_evaluate(model, sample, tokens, method, sparsity=sparsity, seq_len=seq_len, **kwargs)
            out[size].append(ppl)
    return out


def _model_and_texts(eval_tokens: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """SmolLM2-135M, the calibration half of the pydoc topics and the first `eval_tokens` + 1 tokens of the
    evaluation half: what the recorded runs prune and score on (ValueError if that half is too short)."""
    from ..data import pydoc_topics, text_tokens
    from ..models import load_smollm

    model, tokenizer = load_smollm()
    cal_tokens = text_tokens(tokenizer, pydoc_topics("calibration"))
    held_out = text_tokens(tokenizer, pydoc_topics("evaluation"), max_tokens=eval_tokens + 1)
    if len(held_out) != eval_tokens + 1:
        raise ValueError(f"the evaluation half holds {len(held_out) - 1} tokens, fewer than eval_tokens = {eval_tokens}")
    return model, cal_tokens, held_out


ABLATION_RUN_NAME = "09_calibration_ablation"


ABLATION_SETTINGS = {"method": "wanda", "sparsity": 0.5, "seq_len": 128, "eval_tokens": 1024,
                     "sizes": [32, 64], "seeds": [0, 1, 2]}


SPARSEGPT_CURVE_RUN_NAME = "09_sparsegpt_calibration"
# SparseGPT's calibration curve: the Wanda curve's sizes, seeds, samples and evaluation, so the two pair up per size and seed.
SPARSEGPT_CURVE_SETTINGS = {"method": "sparsegpt", "sparsity": 0.5, "seq_len": 128, "eval_tokens": 1024,
                            "sizes": [1, 4, 8, 16, 32, 64], "seeds": [0, 1, 2]}


def ablation_run(command: str = "python -m chapter11.experiments.exp09_oneshot ablation", name: str = ABLATION_RUN_NAME,
                 settings: dict = ABLATION_SETTINGS) -> dict:
    """A recorded calibration curve: by default notebook 09's largest Wanda sizes (32 and 64 sequences, three seeds).

    Too slow for the notebook's budget, so it is run once and saved with
    `save_full_run` as `benchmarks/full/<name>.json`; the notebook loads it
    beside the sizes it runs itself. With `SPARSEGPT_CURVE_RUN_NAME` and
    `SPARSEGPT_CURVE_SETTINGS` it records SparseGPT from 1 to 64 sequences on
    the same samples (`... exp09_oneshot sparsegpt-curve`).
    """
    from ..report import load_full_run, save_full_run

    s = settings
    start = time.perf_counter()
    model, cal_tokens, eval_tokens = _model_and_texts(s["eval_tokens"])
    ppl = calibration_ablation(model, cal_tokens, eval_tokens, s["sizes"], s["seeds"], method=s["method"],
                               sparsity=s["sparsity"], seq_len=s["seq_len"], progress_bar=False)
    save_full_run(name, {"perplexity": {str(k): v for k, v in ppl.items()}}, s, command, time.perf_counter() - start)
    return load_full_run(name)


def sparsegpt_curve_run() -> dict:
    """SparseGPT at 50% from 1 to 64 calibration sequences, three seeds: record 09_sparsegpt_calibration.json."""
    return ablation_run("python -m chapter11.experiments.exp09_oneshot sparsegpt-curve", SPARSEGPT_CURVE_RUN_NAME,
                        SPARSEGPT_CURVE_SETTINGS)


SUFFICIENT_RUN_NAME = "09_sufficient_calibration"


SUFFICIENT_SETTINGS = {"sequences": [8, 64], "seq_len": 128, "eval_tokens": 16384, "eval_window": 512,
                       "seeds": [0, 1, 2], "patterns": {"50%": {"sparsity": 0.5}, "2:4": {"sparsity": None, "n": 2, "m": 4}},
                       "sizes_by_pattern": {"50%": [8, 64], "2:4": [64]}}


def sufficient_calibration_run(command: str = "python -m chapter11.experiments.exp09_oneshot sufficient") -> dict:
    """Wanda and SparseGPT on the same sufficient calibration, judged on a long held-out text.

    The notebook's grid calibrates on 8 x 128 = 1,024 tokens, fewer than
    `down_proj`'s 1,536 inputs, so SparseGPT's X^T X there is rank-deficient
    (only the damping makes it invertible). This run gives both methods 64 x 128
    tokens (and, at 50%, also the grid's 8 x 128 on the same seeds, so the
    change is paired), evaluates on 16,384 held-out tokens in windows of 512, and
    adds magnitude compared per output row (Wanda's group) beside magnitude per
    layer. Saved as `benchmarks/full/09_sufficient_calibration.json`.
    """
    from ..report import load_full_run, save_full_run

    s = SUFFICIENT_SETTINGS
    start = time.perf_counter()
    model, cal_tokens, eval_tokens = _model_and_texts(s["eval_tokens"])
    window = s["eval_window"]

    def log(line: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:6.1f} min] {line}", flush=True)

    results = {"dense": perplexity(model, eval_tokens, block_size=window, batch_size=8), "perplexity": {}, "seconds": {}}
    log(f"dense {results['dense']:.2f}")
    for label, pattern in s["patterns"].items():
        for scope in ("layer", "row"):
            ppl, _ = prune_and_evaluate(model, None, eval_tokens, "magnitude", seq_len=window, magnitude_scope=scope,
                                        progress_bar=False, **pattern)
            results["perplexity"][f"magnitude-{scope} {label}"] = [ppl]
            log(f"magnitude per {scope} {label}: {ppl:.2f}")
        for size in s["sizes_by_pattern"][label]:
            for method in ("wanda", "sparsegpt"):
                key = f"{method} {label} {size}x{s['seq_len']}"
                for seed in s["seeds"]:
                    sample = calibration_sequences(cal_tokens, size, s["seq_len"], seed=seed)
                    ppl, r = prune_and_evaluate(model, sample, eval_tokens, method, seq_len=window, progress_bar=False, **pattern)
                    results["perplexity"].setdefault(key, []).append(ppl)
                    results["seconds"].setdefault(key, []).append(r.seconds)
                    log(f"{key} seed {seed}: {ppl:.2f} (pruning {r.seconds:.0f} s)")
    save_full_run(SUFFICIENT_RUN_NAME, results, s, command, time.perf_counter() - start)
    return load_full_run(SUFFICIENT_RUN_NAME)


ONE_SHOT_RUN_NAME = "09_llm_one_shot_pruning"


# Notebook 09's grid at its recorded size: the notebook's calibration and evaluation, three calibration seeds, two more
# patterns (4:8 with the first seed only) and Wanda's calibration curve; the notebook sets its live run beside it.
ONE_SHOT_SETTINGS = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised)", "calibration_sequences": 8, "seq_len": 128,
                     "eval_tokens": 1024, "seeds": [0, 1, 2], "patterns": ["30%", "50%", "70%", "2:4", "4:8"],
                     "calibration_sizes": [1, 4, 8, 16], "ablation_method": "wanda 50%"}
ONE_SHOT_PATTERNS = {"30%": {"sparsity": 0.3}, "50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7},
                     "2:4": {"sparsity": None, "n": 2, "m": 4}, "4:8": {"sparsity": None, "n": 4, "m": 8}}
ONE_SEED_PATTERNS = ("4:8",)


def _pruned_unit(unit: tuple, model: nn.Module, sample: torch.Tensor, tokens: torch.Tensor, methods: Sequence[str],
                 window: int, pattern: dict) -> dict:
    """One logged unit of a recorded grid: each method's perplexity and pruning time (magnitude reads no calibration)."""
    row: dict = {"unit": list(unit), "perplexity": {}, "prune_seconds": {}, "threads": torch.get_num_threads()}
    for method in methods:
        ppl, result = prune_and_evaluate(model, None if method == "magnitude" else sample, tokens, method, seq_len=window,
                                         progress_bar=False, **pattern)
        row["perplexity"][method], row["prune_seconds"][method] = ppl, result.seconds
    return row


def _grid_methods(seed: int, seeds: Sequence[int]) -> list[str]:
    """Every method for the first calibration seed; magnitude, which reads no calibration, only there."""
    return [m for m in METHODS if m != "magnitude" or seed == seeds[0]]


def _grid_results(rows: dict, dense: float, seeds: Sequence[int], labels: Sequence[str]) -> dict:
    """A recorded grid's results from its units' rows keyed (pattern, seed): per method and pattern, one value per seed run."""
    def values(method: str, label: str, key: str) -> list[float]:
        return [rows[label, seed][key][method] for seed in seeds if (label, seed) in rows and method in rows[label, seed][key]]

    return {"dense": dense,
            "perplexity": {f"{m} {p}": values(m, p, "perplexity") for m in METHODS for p in labels},
            "seconds": {f"{m} {p}": values(m, p, "prune_seconds") for m in METHODS for p in labels}}


LONG_EVAL_RUN_NAME = "09_long_evaluation"


# The grid's other verdicts on the long text: its 8 x 128 calibration samples (the same three seeds) at 30%, 70% and 2:4,
# judged like 09_sufficient_calibration (which holds 50%): 16,384 held-out tokens in windows of 512.
LONG_EVAL_SETTINGS = {"calibration_sequences": 8, "seq_len": 128, "eval_tokens": 16384, "eval_window": 512,
                      "seeds": [0, 1, 2], "patterns": ["30%", "70%", "2:4"]}


def long_evaluation_run(log_path=None, command: str = "python -m chapter11.experiments.exp09_oneshot long-eval") -> dict:
    """The grid's 8-sequence points at 30%, 70% and 2:4 judged on 16,384 held-out tokens in windows of 512.

    The grid scores on 1,024 tokens in windows of 128; this run prunes from the
    grid's own calibration samples (same size, same seeds, so each seed pairs
    with the grid's) and evaluates each model the way `sufficient_calibration_run`
    does, which already holds 50%. Magnitude reads no calibration, so it runs once
    per pattern. Each (pattern, seed) unit is logged under build/ and resumes;
    run it at two threads, like the grid (SparseGPT moves with the thread count).
    Saved as `benchmarks/full/09_long_evaluation.json`.
    """
    from pathlib import Path

    from ..report import FULL_RUNS, load_full_run, save_full_run
    from . import run_units

    s = LONG_EVAL_SETTINGS
    start = time.perf_counter()
    model, cal_tokens, held_out = _model_and_texts(s["eval_tokens"])
    seeds, window = list(s["seeds"]), s["eval_window"]

    def run_unit(unit: tuple) -> dict:
        if unit[0] == "dense":
            return {"unit": list(unit), "perplexity": {"dense": perplexity(model, held_out, block_size=window, batch_size=8)},
                    "prune_seconds": {}, "threads": torch.get_num_threads()}
        label, seed = unit
        sample = calibration_sequences(cal_tokens, s["calibration_sequences"], s["seq_len"], seed=seed)
        return _pruned_unit(unit, model, sample, held_out, _grid_methods(seed, seeds), window, ONE_SHOT_PATTERNS[label])

    log = Path(log_path) if log_path is not None else FULL_RUNS.parent.parent / "build" / f"{LONG_EVAL_RUN_NAME}.jsonl"
    units = [("dense",)] + [(label, seed) for label in s["patterns"] for seed in seeds]
    done = run_units(units, run_unit, lambda row: tuple(row["unit"]), log,
                     describe=lambda row: f"[{(time.perf_counter() - start) / 60:5.1f} min] {tuple(row['unit'])}: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in row["perplexity"].items()))

    rows = {u: row for u, row in done.items() if u[0] != "dense"}
    results = {
        **_grid_results(rows, done[("dense",)]["perplexity"]["dense"], seeds, s["patterns"]),
        "unit_seconds": round(sum(row["seconds"] for row in done.values()), 1),
        "unit_threads": sorted({row["threads"] for row in done.values()}),
    }
    save_full_run(LONG_EVAL_RUN_NAME, results, s, command, time.perf_counter() - start)
    return load_full_run(LONG_EVAL_RUN_NAME)


def one_shot_units(settings: dict = ONE_SHOT_SETTINGS) -> list[tuple]:
    """The units of `one_shot_run`, in order: the dense model, each pattern x calibration seed, each extra calibration size x seed.

    >>> units = one_shot_units()
    >>> len(units), units[0], units[1], units[-1]
    (23, ('dense',), ('grid', '30%', 0), ('calibration', 16, 2))
    """
    seeds = list(settings["seeds"])
    units: list[tuple] = [("dense",)]
    for label in settings["patterns"]:
        units += [("grid", label, seed) for seed in (seeds[:1] if label in ONE_SEED_PATTERNS else seeds)]
    extra = [n for n in settings["calibration_sizes"] if n != settings["calibration_sequences"]]
    return units + [("calibration", n, seed) for n in extra for seed in seeds]


def one_shot_run(worker: int = 0, workers: int = 1, settings: dict = ONE_SHOT_SETTINGS, log_path=None,
                 command: str = "python -m chapter11.experiments.exp09_oneshot grid", save: bool = True) -> dict | None:
    """Notebook 09's grid at its recorded size: record benchmarks/full/09_llm_one_shot_pruning.json.

    Every method at every pattern and calibration seed (magnitude, which uses
    no calibration, once per pattern), the dense perplexity, and Wanda at 50%
    from each extra number of calibration sequences (`calibration_sizes`; the
    grid's own size comes from the grid). Each unit of `one_shot_units` is
    logged under build/ as it finishes, so a killed run resumes; `workers > 1`
    splits the units between processes (`worker` 0 .. workers - 1) and a last
    call with `workers=1` assembles and saves (`save=False`: only returns the
    results).

    SparseGPT's perplexities depend on the thread count (the summation order of
    its Hessian moves the greedy column updates: 13-15% apart at 70%, 2:4 and
    4:8 in some seeds between one and two threads, inside the spread over
    calibration seeds); Wanda's and magnitude's did not move. The notebook and the other 09
    records run at two threads, so record the grid in one process at two
    threads where its numbers must pair with them (`unit_threads` in the
    results says what each unit ran with).
    """
    from pathlib import Path

    from ..report import FULL_RUNS, load_full_run, save_full_run
    from . import run_units

    s = settings
    unknown = [p for p in s["patterns"] if p not in ONE_SHOT_PATTERNS]
    if unknown:
        raise ValueError(f"settings['patterns']: unknown pattern(s) {unknown}; known: {list(ONE_SHOT_PATTERNS)}")
    start = time.perf_counter()
    model, cal_tokens, held_out = _model_and_texts(s["eval_tokens"])
    seeds, seq_len = list(s["seeds"]), s["seq_len"]

    def run_unit(unit: tuple) -> dict:
        if unit[0] == "dense":
            return {"unit": list(unit), "perplexity": {"dense": perplexity(model, held_out, block_size=seq_len, batch_size=8)}}
        kind, arg, seed = unit
        size = s["calibration_sequences"] if kind == "grid" else arg
        sample = calibration_sequences(cal_tokens, size, seq_len, seed=seed)
        if kind == "grid":
            return _pruned_unit(unit, model, sample, held_out, _grid_methods(seed, seeds), seq_len, ONE_SHOT_PATTERNS[arg])
        return _pruned_unit(unit, model, sample, held_out, ["wanda"], seq_len, ONE_SHOT_PATTERNS["50%"])

    log = Path(log_path) if log_path is not None else FULL_RUNS.parent.parent / "build" / f"{ONE_SHOT_RUN_NAME}.jsonl"
    units = one_shot_units(s)
    done = run_units(units, run_unit, lambda row: tuple(row["unit"]), log, worker, workers,
                     describe=lambda row: f"{tuple(row['unit'])}: " + ", ".join(f"{k} {v:.2f}" for k, v in row["perplexity"].items())
                     + f" ({row['seconds']:.0f} s)")
    if done is None:
        return None
    grid = _grid_results({u[1:]: row for u, row in done.items() if u[0] == "grid"}, done[("dense",)]["perplexity"]["dense"],
                         seeds, s["patterns"])
    by_size = {s["calibration_sequences"]: grid["perplexity"].get("wanda 50%", [])}
    by_size.update({n: [done["calibration", n, seed]["perplexity"]["wanda"] for seed in seeds if ("calibration", n, seed) in done]
                    for n in {u[1] for u in done if u[0] == "calibration"}})
    results = {
        **grid,
        "calibration_ablation": {str(n): by_size[n] for n in sorted(by_size)},
        "unit_seconds": round(sum(row["seconds"] for row in done.values()), 1),
        "unit_threads": sorted({row["threads"] for row in done.values() if "threads" in row}),
    }
    if not save:
        return results
    save_full_run(ONE_SHOT_RUN_NAME, results, s, command, time.perf_counter() - start)
    return load_full_run(ONE_SHOT_RUN_NAME)


def bench_prune_llm(model: nn.Module, calibration: torch.Tensor, methods: Sequence[str] = ("wanda", "sparsegpt"),
                    sparsity: float = 0.5, batch_size: int = 8, repeats: int = 3) -> dict:
    """`prune_llm` time against one forward pass over the same calibration tokens, with its split by part.

    The forward pass (the model's full forward, `lm_head` included, in
    batches of `batch_size`) is the unit: pruning cannot cost less than about
    two block passes over the calibration data. Forward passes are timed
    `repeats` times (median) before and after the pruning runs, so a noisy
    moment shows as a gap between the two. Each method prunes a fresh copy.
    Returns {"forward_s", "forward_after_s", "methods": {method: {"seconds",
    "ratio", "seconds_by_part"}}}.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty list from {METHODS}, got {list(methods)!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    refuse_torch_prune(model)
    was_training = model.training
    model.eval()

    @torch.no_grad()
    def forward():
        for x in calibration.split(batch_size):
            model(input_ids=x, use_cache=False)

    def forward_s() -> float:
        return time_callable(forward, repeats=repeats, warmup=0)["median_s"]

    try:
        forward()  # warm-up
        before = forward_s()
        rows = {}
        for method in methods:
            pruned = copy.deepcopy(model)
            result = prune_llm(pruned, calibration, method=method, sparsity=sparsity, batch_size=batch_size, progress_bar=False)
            rows[method] = {"seconds": result.seconds, "ratio": result.seconds / before, "seconds_by_part": result.seconds_by_part}
            del pruned
        after = forward_s()
    finally:
        model.train(was_training)
    return {"forward_s": before, "forward_after_s": after, "sparsity": sparsity, "calibration_shape": list(calibration.shape),
            "batch_size": batch_size, "methods": rows}


def bench_main(argv: Sequence[str] | None = None) -> int:
    """`python -m chapter11 bench oneshot`: prune_llm on SmolLM2-135M against one forward pass, split by part."""
    import argparse
    import json

    from ..bench import describe_machine, machine_info
    from ..data import pydoc_topics, text_tokens
    from ..models import load_smollm, tiny_llama
    from ..report import atomic_write_text

    parser = argparse.ArgumentParser(prog="python -m chapter11 bench oneshot",
                                     description="prune_llm (Wanda, SparseGPT) time against one forward pass over its calibration tokens.")
    parser.add_argument("--sequences", type=int, default=16, help="calibration sequences (default 16)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--model", default=None, help="a local checkpoint folder or .gguf file (default: the bundled SmolLM2-135M)")
    parser.add_argument("--tiny", action="store_true", help="a small random LLaMA instead (for a quick check)")
    parser.add_argument("--json", metavar="PATH", help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    if args.sequences < 1 or args.seq_len < 1:
        parser.error("--sequences and --seq-len must be positive")
    print(f"machine: {describe_machine()}", flush=True)
    if args.tiny:
        model = tiny_llama()
        tokens = torch.randint(0, model.config.vocab_size, (args.sequences * args.seq_len * 2,), generator=torch.Generator().manual_seed(0))
    else:
        model, tokenizer = load_smollm(args.model)
        tokens = text_tokens(tokenizer, pydoc_topics("calibration"))
    calibration = calibration_sequences(tokens, args.sequences, args.seq_len, seed=0)
    r = bench_prune_llm(model, calibration)
    print(f"{args.sequences} x {args.seq_len} calibration tokens; one forward pass {r['forward_s']:.2f} s "
          f"(again after pruning: {r['forward_after_s']:.2f} s)")
    for method, row in r["methods"].items():
        split = ", ".join(f"{k} {v:.2f}" for k, v in row["seconds_by_part"].items())
        print(f"  {method:10s} {row['seconds']:7.2f} s = {row['ratio']:.2f}x a forward pass  ({split} s)")
    if args.json:
        atomic_write_text(json.dumps(r | {"model": "tiny_llama" if args.tiny else (args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised)"),
                                          "machine": machine_info()}, indent=2), args.json)
    return 0


def layer_means(values: dict[str, float], by: str = "projection") -> dict:
    """Average per-layer numbers (e.g. `PruneResult.output_error`) by projection name or by block index.

    >>> layer_means({"model.layers.0.mlp.up_proj.weight": 0.1, "model.layers.1.mlp.up_proj.weight": 0.3}, by="projection")
    {'up_proj': 0.2}
    >>> layer_means({"model.layers.0.mlp.up_proj.weight": 0.1, "model.layers.0.self_attn.q_proj.weight": 0.3}, by="block")
    {0: 0.2}
    """
    if by not in ("projection", "block"):
        raise ValueError(f"by must be 'projection' or 'block', got {by!r}")
    groups: dict = {}
    for name, value in values.items():
        parts = name.split(".")
        if by == "projection":
            key = parts[-2]
        else:
            numbers = [p for p in parts if p.isdigit()]
            if not numbers:
                raise ValueError(f"values: {name!r} holds no block index")
            key = int(numbers[0])
        groups.setdefault(key, []).append(float(value))
    return {key: sum(v) / len(v) for key, v in groups.items()}


if __name__ == "__main__":  # python -m chapter11.experiments.exp09_oneshot grid|long-eval|ablation|sufficient|sparsegpt-curve
    import sys

    torch.set_num_threads(2)  # every 09 record runs at two threads: SparseGPT's numbers move with the thread count
    runs = {"grid": one_shot_run, "long-eval": long_evaluation_run, "ablation": ablation_run,
            "sufficient": sufficient_calibration_run, "sparsegpt-curve": sparsegpt_curve_run}
    args = sys.argv[1:]
    if len(args) != 1 or args[0] not in runs:
        raise SystemExit(f"usage: python -m chapter11.experiments.exp09_oneshot {' | '.join(runs)}")
    runs[args[0]]()
