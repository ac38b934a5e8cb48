"""Experiment 4, the drivers: where a pruned LLM spends its time, measured.

Covers: `time_by_part` (wall seconds in each part of a decoder, measured with
hooks while any call runs) and `measure_speed` (prefill latency and greedy
decoding throughput of several models, interleaved with
`chapter11.bench.compare`, with per-round ratios), which notebook 04 uses to
set the measured speed of its structured cuts beside the MAC counts of
`chapter11.structured.llm`. The cuts themselves (heads, neurons, blocks) are
the methods in `chapter11.structured`.

But: wall time on a shared CPU moves with other jobs; the notebook asserts
MAC counts and prints these.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..bench import compare
from ..structured.heads import _as_index, attention_layers
from ..structured.llm import PARTS, _part_of


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
                  threads: int | None = None) -> dict:
    """Prefill latency and greedy decoding throughput of each model, timed interleaved.

    - prefill: one forward pass over `prompt` (1, T), no cache;
    - decode: `generate(decode_prompt, max_new_tokens=new_tokens,
      min_new_tokens=new_tokens, do_sample=False)` with the KV cache, so
      every model produces exactly `new_tokens` tokens.

    Both go through `chapter11.bench.compare` (rotating order, medians), the
    first model being the reference. Before timing, each model's generate is
    checked to return `new_tokens` new tokens. Returns {"prefill": compare
    result, "decode": compare result, "prefill_speedup": {name: x},
    "decode_speedup": {name: x}, "decode_tokens_per_s": {name: tokens/s},
    "prefill_rounds": {name: [x per round]}, "decode_rounds": {name: [x per round]}};
    tokens/s counts new tokens over the whole generate call (its short
    prompt's prefill included). A round's speedup divides the reference's
    time by the model's time in the same round, so the spread of the rounds
    shows how much the machine's noise moves one ratio.

    On a machine shared with other jobs, `clock="cpu", threads=1` is the
    robust setting: torch runs on one thread (restored afterwards) and
    `time.process_time` counts only the CPU seconds of this process, not the
    time other jobs hold the cores.
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty dict {name: model}")
    for name, t in (("prompt", prompt), ("decode_prompt", decode_prompt)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != 1:
            raise ValueError(f"{name} must be a (1, T) tensor of token ids, got {getattr(t, 'shape', type(t).__name__)}")
    new_tokens = _as_index(new_tokens, "new_tokens")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if threads is not None:
        threads = _as_index(threads, "threads")
        if threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")

    def prefill(model):
        x = prompt.to(next(model.parameters()).device)
        return lambda: model(x)

    def decode(model):
        x = decode_prompt.to(next(model.parameters()).device)
        pad = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        pad = pad[0] if isinstance(pad, list) else pad
        return lambda: model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    saved_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.inference_mode(), _quiet_generate():
            for name, model in models.items():
                model.eval()
                out = decode(model)()
                if out.shape != (1, decode_prompt.shape[1] + new_tokens):
                    raise AssertionError(f"{name}: generate returned shape {tuple(out.shape)}, expected (1, {decode_prompt.shape[1] + new_tokens})")
            pre = compare({n: prefill(m) for n, m in models.items()}, repeats=repeats, warmup=warmup, clock=clock)
            dec = compare({n: decode(m) for n, m in models.items()}, repeats=repeats, warmup=warmup, clock=clock)
    finally:
        torch.set_num_threads(saved_threads)
    reference = next(iter(models))

    def rounds(result):
        ref = result["times"][reference]
        return {n: [r / t for r, t in zip(ref, ts)] for n, ts in result["times"].items()}

    return {
        "prefill": pre,
        "decode": dec,
        "prefill_speedup": {n: 1 / r for n, r in pre["ratio"].items()},
        "decode_speedup": {n: 1 / r for n, r in dec["ratio"].items()},
        "decode_tokens_per_s": {n: new_tokens / s for n, s in dec["median_s"].items()},
        "prefill_rounds": rounds(pre),
        "decode_rounds": rounds(dec),
    }
