"""Experiment 4, the drivers: where a pruned LLM spends its time, measured.

Covers: `time_by_part` (wall seconds in each part of a decoder, measured with
hooks while any call runs) and `measure_speed` (prefill latency, at batch 1
or more, and greedy decoding throughput of several models, interleaved with
`chapter11.bench.compare`, with per-round ratios), which notebook 04 uses to
set the measured speed of its structured cuts beside the MAC counts of
`chapter11.structured.llm`. The cuts themselves (heads, neurons, blocks) are
the methods in `chapter11.structured`; `structured_cut` names the ten cuts of
the recorded run (`CUTS`) and builds each from `calibration_scores`, and
`full_run` records them (`python -m chapter11.experiments.exp04_heads`,
`benchmarks/full/04_llm_structured.json`): three calibration draws, the same
recovery for every cut, one-thread CPU-clock timing.

But: wall time on a shared CPU moves with other jobs; the notebook asserts
MAC counts and prints these.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import run_units
from ..bench import compare
from ..data import lm_batches
from ..distill import distill_lm
from ..report import load_full_run, save_full_run
from ..structured.channels import channels_to_remove
from ..structured.heads import (
    _as_index, _normalise, attention_layers, group_removal_order, head_importance, kept_heads, plan_from_order, remove_heads, removal_order,
)
from ..structured.llm import (
    PARTS, _part_of, block_influence, macs_per_token, mlp_widths, neuron_importance, parameter_count, remove_blocks, remove_neurons,
)


@torch.no_grad()
def time_by_part(model: nn.Module, fn: Callable[[], object], repeats: int = 1) -> dict[str, float]:
    """Wall seconds spent in each part of `model` while `fn()` runs, summed over `repeats` calls.

    Parts are measured with forward hooks: "attention projections" (q/k/v/o),
    "attention products" (the rest of each attention module: rotary
    embedding, QK^T, softmax, AV, the KV cache), "MLP", "norms", "embedding",
    "lm_head"; "other" is everything outside them (the generate loop, masks,
    sampling). "total" is the wall time of the calls. Hooks cost a few
    microseconds each, so shares of very short calls are rough.
    """
    repeats = _as_index(repeats, "repeats")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    seconds = dict.fromkeys(PARTS, 0.0)
    starts: dict[int, float] = {}
    handles = []
    cuda = next(model.parameters()).is_cuda

    def now() -> float:
        if cuda:  # kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize()
        return time.perf_counter()

    def pre(module, args):
        starts[id(module)] = now()

    def post_for(part):
        def post(module, args, output):
            seconds[part] += now() - starts.pop(id(module))
        return post

    def attn_post(module, args, kwargs, output):
        seconds["attention products"] += now() - starts.pop(id(module))

    try:
        for name, module in model.named_modules():
            part = _part_of(name)
            if part is not None and not name.endswith("mlp.gate_proj") and not name.endswith(("mlp.up_proj", "mlp.down_proj")):
                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(post_for(part)))
        for layer in attention_layers(model):
            handles.append(layer.attn.register_forward_pre_hook(pre))
            handles.append(layer.attn.register_forward_hook(attn_post, with_kwargs=True))
        t0 = now()
        for _ in range(repeats):
            fn()
        total = now() - t0
    finally:
        for handle in handles:
            handle.remove()
    seconds["attention products"] -= seconds["attention projections"]  # the attention module's time includes its projections
    seconds["other"] = max(total - sum(v for k, v in seconds.items() if k != "other"), 0.0)
    seconds["total"] = total
    return seconds


@contextlib.contextmanager
def _quiet_generate():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def measure_speed(models: Mapping[str, nn.Module], prompt: torch.Tensor, decode_prompt: torch.Tensor,
                  new_tokens: int = 64, repeats: int = 3, warmup: int = 1, clock: str = "wall",
                  threads: int | None = None, batch_prompt: torch.Tensor | None = None,
                  measures: tuple[str, ...] = ("prefill", "decode")) -> dict:
    """Prefill latency and greedy decoding throughput of each model, timed interleaved.

    The `measures`, each timed on its own:
    - "prefill": one forward pass over `prompt` (1, T), no cache;
    - "decode": `generate(decode_prompt, max_new_tokens=new_tokens,
      min_new_tokens=new_tokens, do_sample=False)` with the KV cache, so
      every model produces exactly `new_tokens` tokens;
    - "prefill_batch": one forward pass over `batch_prompt` (B, T).

    Each goes through `chapter11.bench.compare` (rotating order, medians), the
    first model being the reference. Before timing decoding, each model's
    generate is checked to return `new_tokens` new tokens. Returns, for each
    measure M: {M: compare result, "M_speedup": {name: x}, "M_rounds":
    {name: [x per round]}}, and with decoding "decode_tokens_per_s": {name:
    tokens/s} (new tokens over the whole generate call, its short prompt's
    prefill included). A round's speedup divides the reference's time by the
    model's time in the same round, so the spread of the rounds shows how
    much the machine's noise moves one ratio.

    On a machine shared with other jobs, `clock="cpu", threads=1` is the
    robust setting: torch runs on one thread (restored afterwards) and
    `time.process_time` counts only the CPU seconds of this process, not the
    time other jobs hold the cores.
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty dict {name: model}")
    if isinstance(measures, str) or not measures or not set(measures) <= {"prefill", "decode", "prefill_batch"}:
        raise ValueError(f"measures must name some of 'prefill', 'decode', 'prefill_batch', got {measures!r}")
    for name, t in (("prompt", prompt), ("decode_prompt", decode_prompt)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != 1:
            raise ValueError(f"{name} must be a (1, T) tensor of token ids, got {getattr(t, 'shape', type(t).__name__)}")
    if "prefill_batch" in measures and (not isinstance(batch_prompt, torch.Tensor) or batch_prompt.dim() != 2):
        raise ValueError(f"batch_prompt must be a (B, T) tensor of token ids for 'prefill_batch', got "
                         f"{getattr(batch_prompt, 'shape', type(batch_prompt).__name__)}")
    new_tokens = _as_index(new_tokens, "new_tokens")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if threads is not None:
        threads = _as_index(threads, "threads")
        if threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")

    def prefill(model, ids):
        x = ids.to(next(model.parameters()).device)
        return lambda: model(x)

    def decode(model):
        x = decode_prompt.to(next(model.parameters()).device)
        pad = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        pad = pad[0] if isinstance(pad, list) else pad
        return lambda: model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    calls = {"prefill": lambda m: prefill(m, prompt), "decode": decode, "prefill_batch": lambda m: prefill(m, batch_prompt)}
    saved_threads = torch.get_num_threads()
    results = {}
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.inference_mode(), _quiet_generate():
            for model in models.values():
                model.eval()
            if "decode" in measures:
                for name, model in models.items():
                    out = decode(model)()
                    if out.shape != (1, decode_prompt.shape[1] + new_tokens):
                        raise AssertionError(f"{name}: generate returned shape {tuple(out.shape)}, expected (1, {decode_prompt.shape[1] + new_tokens})")
            for measure in measures:
                results[measure] = compare({n: calls[measure](m) for n, m in models.items()}, repeats=repeats, warmup=warmup, clock=clock)
    finally:
        torch.set_num_threads(saved_threads)
    reference = next(iter(models))
    out = {}
    for measure, result in results.items():
        ref = result["times"][reference]
        out[measure] = result
        out[f"{measure}_speedup"] = {n: 1 / r for n, r in result["ratio"].items()}
        out[f"{measure}_rounds"] = {n: [r / t for r, t in zip(ref, ts)] for n, ts in result["times"].items()}
    if "decode" in results:
        out["decode_tokens_per_s"] = {n: new_tokens / s for n, s in results["decode"]["median_s"].items()}
    return out


# --------------------------------------------------------------------------- the recorded run

FULL_RUN_NAME = "04_llm_structured"
# Six cuts of 6.6% of SmolLM2-135M's parameters (the same count for the three head cuts: 30 key/value groups weigh
# as much as 120 query heads, 40 steps of one query head from each group), and four larger ones.
MATCHED_CUTS = ("heads: 1 of 3 groups per block", "heads: 30 groups, ranked globally", "heads: 120 query heads, ranked globally",
                "MLP: 171 neurons per block", "blocks: 2 of 30", "blocks + MLP: 1 block, 106 neurons")
LARGER_CUTS = ("heads: 2 of 3 groups per block", "MLP: 341 neurons per block", "blocks: 5 of 30", "blocks + MLP: 5 blocks, 341 neurons")
CUTS = MATCHED_CUTS + LARGER_CUTS


@dataclass(frozen=True)
class StructuredSettings:
    """Everything that defines the recorded run of Experiment 4 (`full_run`); the record stores it."""

    calib_seeds: tuple[int, ...] = (0, 1, 2)           # calibration draws: each gives its own scores, cuts and recovery batches
    calib_batches: int = 4                             # batches of 4 x 128 calibration tokens for the scores
    eval_tokens: int = 4096                            # held-out tokens per perplexity, in windows of 128
    random_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)    # random choices of one group per block: the control for the group scores
    recovery_steps: int = 40                           # distillation steps of 2 x 128 calibration tokens, every cut alike
    recovery_lr: float = 1e-4
    speed_repeats: int = 20                            # interleaved timed calls per model and measure
    prompt_tokens: int = 256                           # prefill: batch 1 and batch `batch_prompts` of this many tokens
    batch_prompts: int = 8
    decode_prompt_tokens: int = 32                     # decoding: this prompt, then `new_tokens` greedy tokens with the KV cache
    new_tokens: int = 64

    def as_dict(self) -> dict:
        return asdict(self)


def calibration_scores(model: nn.Module, calib_tokens: torch.Tensor, seed: int, batches: int) -> dict:
    """The scores every cut of `structured_cut` ranks by, from `batches` batches of 4 x 128 tokens drawn with `seed`.

    "group": I_g per (block, key/value group); "group_normalised" and
    "head" (I_h per query head): divided by their block's L2 norm, so that
    one ranking across blocks is fair (Michel et al.); "neuron": S_j per MLP
    neuron of every block; "influence": BI per block.
    """
    calib = list(lm_batches(calib_tokens, block_size=128, batch_size=4, num_batches=batches, seed=seed))
    group = head_importance(model, calib, per="group")
    return {"group": group, "group_normalised": _normalise(group),
            "head": head_importance(model, calib, per="head", normalize=True),
            "neuron": neuron_importance(model, [x for x, _ in calib]), "influence": block_influence(model, [x for x, _ in calib])}


def structured_cut(model: nn.Module, name: str, scores: dict) -> nn.Module:
    """A pruned copy of SmolLM2-135M (`model` stays as it is): cut `name` of `CUTS`, chosen by `scores` (`calibration_scores`)."""
    cfg = model.config
    if (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) != (30, 9, 3, 1536):
        raise ValueError("model: the cuts of the recorded run are sized for SmolLM2-135M (30 blocks, 9 query and 3 key/value "
                         f"heads, 1,536 MLP neurons); got {cfg.num_hidden_layers} blocks, {cfg.num_attention_heads} and "
                         f"{cfg.num_key_value_heads} heads, {cfg.intermediate_size} neurons")
    if name not in CUTS:
        raise ValueError(f"name: unknown cut {name!r}; one of {list(CUTS)}")
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    by_influence = torch.argsort(scores["influence"]).tolist()

    def neurons(m: nn.Module, n: int, blocks: list[int]) -> nn.Module:  # `blocks`: the original numbers of m's blocks
        return remove_neurons(m, {i: channels_to_remove(scores["neuron"][b], n) for i, b in enumerate(blocks)})

    def without(k: int) -> tuple[nn.Module, list[int]]:
        cut = sorted(by_influence[:k])
        return remove_blocks(copy.deepcopy(model), cut), [b for b in range(30) if b not in cut]

    if name.startswith("heads: ") and "per block" in name:
        per_layer = int(name.split()[1])
        return remove_heads(copy.deepcopy(model), plan_from_order(group_removal_order(scores["group"], group=group), per_layer=per_layer))
    if name == "heads: 30 groups, ranked globally":
        return remove_heads(copy.deepcopy(model), plan_from_order(group_removal_order(scores["group_normalised"], group=group)[:30]))
    if name == "heads: 120 query heads, ranked globally":  # 40 steps, each one query head from each of a block's 3 groups
        return remove_heads(copy.deepcopy(model), plan_from_order(removal_order(scores["head"], group=group)[:40]))
    if name.startswith("MLP: "):
        return neurons(copy.deepcopy(model), int(name.split()[1]), list(range(30)))
    if name.startswith("blocks: "):
        return without(int(name.split()[1]))[0]
    k, n = (int(name.split()[3]), int(name.split()[5]))  # "blocks + MLP: K block(s), N neurons"
    pruned, kept = without(k)
    return neurons(pruned, n, kept)


def _quartiles(values: list[float]) -> dict:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": q2, "q1": q1, "q3": q3}


def full_run(settings: StructuredSettings = StructuredSettings(), worker: int = 0, workers: int = 1, log=None,
             command: str = "python -m chapter11.experiments.exp04_heads", save: bool = True) -> dict | None:
    """Experiment 4's recorded run: every cut for each calibration draw, each recovered alike, and their speed.

    Units (resumable JSON-lines log under build/, `run_units`):
    - ("speed", "prefill_batch") and ("speed", "prefill", "decode"): the
      dense model and the cuts of the first calibration draw, timed
      interleaved with the one-thread CPU clock (`measure_speed`,
      `speed_repeats` rounds): prefill of `batch_prompts` x and 1 x
      `prompt_tokens` tokens, and greedy decoding;
    - ("dense",) and ("random", seed): perplexities without recovery;
    - ("cut", calib_seed, name): scores from that draw, the cut, its
      perplexity, `recovery_steps` of distillation from the dense model
      (only MLPs learn, on batches drawn with that seed) and its perplexity
      after.
    Every process runs on one thread. With `workers` > 1 this process runs
    every `workers`-th unit and records nothing (returns None).
    """
    import time

    from ..data import pydoc_topics, text_tokens
    from ..models import load_smollm
    from ..train import perplexity

    started = time.time()
    torch.set_num_threads(1)
    model, tokenizer = load_smollm()
    model.eval()
    eval_tokens = text_tokens(tokenizer, pydoc_topics("evaluation"))
    calib_tokens = text_tokens(tokenizer, pydoc_topics("calibration"))
    dense_params = parameter_count(model)
    context = settings.decode_prompt_tokens + settings.new_tokens // 2  # positions a decoding step attends to, on average
    memo: dict[int, dict] = {}

    def scores(seed: int) -> dict:
        if seed not in memo:
            memo[seed] = calibration_scores(model, calib_tokens, seed, settings.calib_batches)
        return memo[seed]

    def ppl(m: nn.Module) -> float:
        return perplexity(m, eval_tokens, block_size=128, batch_size=8, max_tokens=settings.eval_tokens)

    def run_unit(unit):
        if unit[0] == "dense":
            return {"unit": list(unit), "ppl": ppl(model)}
        if unit[0] == "random":
            rand = torch.rand(30, 3, generator=torch.Generator().manual_seed(unit[1]))
            plan = plan_from_order(group_removal_order(rand, group=3), per_layer=1)
            return {"unit": list(unit), "ppl": ppl(remove_heads(copy.deepcopy(model), plan))}
        if unit[0] == "speed":  # ("speed", "prefill_batch") or ("speed", "prefill", "decode"): the two halves of the timing
            cuts = {name: structured_cut(model, name, scores(settings.calib_seeds[0])) for name in CUTS}
            ids = eval_tokens[: settings.batch_prompts * settings.prompt_tokens].view(settings.batch_prompts, settings.prompt_tokens)
            decode_ids = eval_tokens[-settings.decode_prompt_tokens:].view(1, -1)
            speed = measure_speed({"dense": model, **cuts}, ids[:1], decode_ids, new_tokens=settings.new_tokens,
                                  repeats=settings.speed_repeats, warmup=1, clock="cpu", threads=1, batch_prompt=ids, measures=unit[1:])
            return {"unit": list(unit), **{m: {"median_s": speed[m]["median_s"], "times": speed[m]["times"],
                                               "speedup": {n: _quartiles(r) for n, r in speed[f"{m}_rounds"].items()}} for m in unit[1:]}}
        _, seed, name = unit
        cut = structured_cut(model, name, scores(seed))
        before = ppl(cut)
        mlps = [f"model.layers.{i}.mlp" for i in range(len(cut.model.layers))]
        losses = distill_lm(cut, model, calib_tokens, steps=settings.recovery_steps, trainable=mlps, block_size=128, batch_size=2,
                            lr=settings.recovery_lr, seed=seed, progress_bar=False)
        return {"unit": list(unit), "removed_params": dense_params - parameter_count(cut), "kept_heads": kept_heads(cut),
                "blocks": len(cut.model.layers), "mlp_widths": mlp_widths(cut),
                "predicted_prefill": macs_per_token(model, settings.prompt_tokens) / macs_per_token(cut, settings.prompt_tokens),
                "predicted_decode": macs_per_token(model, context) / macs_per_token(cut, context),
                "ppl_before": before, "ppl_after": ppl(cut), "losses": losses}

    def describe(row):
        if row["unit"][0] == "speed":
            return f"speed, {' and '.join(row['unit'][1:])}: {row['seconds']:.0f} s"
        if row["unit"][0] == "cut":
            return f"{row['unit'][2]}, draw {row['unit'][1]}: {row['ppl_before']:.2f} -> {row['ppl_after']:.2f} ({row['seconds']:.0f} s)"
        return f"{' '.join(map(str, row['unit']))}: {row['ppl']:.2f} ({row['seconds']:.0f} s)"

    # Two workers take alternate units: the first starts with the batch prefill (the longest unit, about 1.6 times the other
    # half of the timing) and the short perplexity-only units, while the second starts with the rest of the timing and cuts.
    light = [("dense",), *(("random", s) for s in settings.random_seeds)]
    cuts = [("cut", seed, name) for seed in settings.calib_seeds for name in CUTS]
    units = [("speed", "prefill_batch"), ("speed", "prefill", "decode")]
    for unit in light:
        units += [unit, cuts.pop(0)] if cuts else [unit]
    units += cuts
    done = run_units(units, run_unit, lambda row: tuple(row["unit"]), log if log is not None else Path("build") / f"{FULL_RUN_NAME}.jsonl",
                     worker, workers, describe)
    if done is None:
        return None
    cut_rows = {name: [done["cut", seed, name] for seed in settings.calib_seeds] for name in CUTS}
    for name, rows in cut_rows.items():
        if len({r["removed_params"] for r in rows}) != 1:
            raise AssertionError(f"{name}: the calibration draws removed different numbers of parameters")
    results = {
        "dense_ppl": done["dense",]["ppl"],
        "random_ppl": [done["random", s]["ppl"] for s in settings.random_seeds],
        "cuts": {name: {"removed_params": rows[0]["removed_params"], "share": rows[0]["removed_params"] / dense_params,
                        "predicted_prefill": rows[0]["predicted_prefill"], "predicted_decode": rows[0]["predicted_decode"],
                        **{key: [r[key] for r in rows] for key in ("ppl_before", "ppl_after", "kept_heads", "blocks", "mlp_widths")},
                        "first_loss": [r["losses"][0] for r in rows], "last_loss": [r["losses"][-1] for r in rows]}
                 for name, rows in cut_rows.items()},
        "speed": {m: done[u][m] for u in units[:2] for m in u[1:]},
        "seconds_per_unit": {" ".join(map(str, u)): done[u]["seconds"] for u in units},
    }
    if not save:
        return {"results": results, "settings": settings.as_dict()}
    save_full_run(FULL_RUN_NAME, results, settings.as_dict(), command, time.time() - started)
    return load_full_run(FULL_RUN_NAME)


if __name__ == "__main__":  # python -m chapter11.experiments.exp04_heads [--worker I/N]: the recorded run of Experiment 4
    import sys

    from . import parse_worker

    worker, workers = parse_worker(sys.argv[1:])
    full_run(worker=worker, workers=workers)
