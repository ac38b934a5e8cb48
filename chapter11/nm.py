"""N:M semi-structured sparsity (2:4 by default), and when 2:4 pays on a GPU.

N:M keeps the N largest-magnitude weights in every group of M consecutive
weights along the input dimension (a row of an `nn.Linear` weight). 2:4 is
50% sparsity with a fixed pattern, which is what NVIDIA's sparse tensor cores
(cuSPARSELt, CUTLASS; GPUs of compute capability 8.0 or newer) accelerate:
the chapter's tip "ensure inference frameworks support desired sparsity".

    >>> nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5]])).tolist()
    [[0.0, 1.0, 1.0, 0.0]]

Covers:
- masks with loops (`nm_mask_loop`) and vectorised (`nm_mask`), checking a
  pattern (`is_nm`), masks for a whole model (`nm_masks`, used with
  `chapter11.masks.apply_masks`);
- the weight shapes of LLaMA-style decoders (`linear_shapes`, `LLAMA_WIDTHS`)
  and the token count from which 2:4 beats dense (`crossover_tokens_loop`,
  `crossover_tokens`, `crossovers`);
- on a CUDA GPU: one 2:4 `F.linear` against dense fp16, eager, replayed from
  a captured CUDA graph and through `torch.compile(mode="reduce-overhead")`
  (`semi_structured_benchmark`); a whole 2:4 LLM: its decoder Linear layers
  converted (`to_semi_structured`), logits checked against the masked model,
  prefill throughput against dense fp16 (`semi_structured_llm_benchmark`,
  `random_llama_2to4` for LLaMA-1B/7B widths); torch's CUDA CSR against dense
  (`cuda_csr_benchmark`); the command line `python -m chapter11 bench semi`;
- the GPU numbers recorded by earlier runs (`recorded_gpu_results`).
`gpu_skip_reason()` says in one line why the GPU parts cannot run here; every
GPU function raises `RuntimeError` with that line on a machine without one.

Why the conditions matter: in eager mode each cuSPARSELt call pays a host-side
cost (its plan is set up on every call), which swamps small products, so 2:4
is slower than dense at small token counts; replaying a CUDA graph removes the
host cost, and 2:4 pays only on wide layers with enough tokens. The hardware
limit is 2x (half the multiplies), never reached in full.

But: the groups run along the last dimension only (no channel permutation to
pick better groups); fp16/bf16 only on the GPU; prefill only (decoding one
token at a time is a matrix-vector product, where 2:4 has even less to win);
and a CPU gains no speed from N:M at all: only the accuracy cost can be
measured without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chapter11.masks import prunable_parameters, remove_masks

__all__ = [
    "nm_mask_loop",
    "nm_mask",
    "is_nm",
    "nm_masks",
    "LLAMA_WIDTHS",
    "linear_shapes",
    "llm_shapes",
    "crossover_tokens_loop",
    "crossover_tokens",
    "crossovers",
    "gpu_skip_reason",
    "semi_structured_benchmark",
    "decoder_linears",
    "check_2to4_linears",
    "to_semi_structured",
    "prefill_logits",
    "semi_structured_llm_benchmark",
    "random_llama_2to4",
    "cuda_csr_benchmark",
    "recorded_gpu_results",
    "format_layer_rows",
    "format_llm",
    "benchmark_main",
    "MODES",
]


def _check_nm(weight, n, m) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if n > m:
        raise ValueError(f"n must be at most m (keep n of every m weights), got n={n}, m={m}")
    if weight.dim() < 1 or weight.shape[-1] % m != 0:
        raise ValueError(f"weight's last dimension must be a multiple of m={m}, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must hold floats, got {weight.dtype}")
    if torch.isnan(weight).any():
        raise ValueError("weight contains NaN; magnitudes cannot be ranked")
    return weight.detach()


def nm_mask_loop(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """0/1 mask keeping the n largest |w| of every m consecutive weights, group by group.

    Ties keep the earlier position.

    >>> nm_mask_loop(torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 9.0, -8.0, 0.0]])).tolist()
    [[1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]]
    """
    W = _check_nm(weight, n, m)
    flat = W.reshape(-1).tolist()
    mask = [0.0] * len(flat)
    for start in range(0, len(flat), m):
        group = list(range(start, start + m))
        ranked = sorted(group, key=lambda j: -abs(flat[j]))  # sorted() is stable: ties keep order
        for j in ranked[:n]:
            mask[j] = 1.0
    return torch.tensor(mask, dtype=W.dtype, device=W.device).reshape(W.shape)


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """0/1 mask keeping the n largest |w| of every m along the last dim (vectorised).

    Agrees with `nm_mask_loop`, ties included.

    >>> nm_mask(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), n=1, m=2).tolist()
    [[1.0, 0.0, 1.0, 0.0]]
    """
    W = _check_nm(weight, n, m)
    groups = W.abs().reshape(-1, m)  # (num_groups, m)
    order = torch.argsort(groups, dim=1, descending=True, stable=True)  # (num_groups, m)
    mask = torch.zeros_like(groups)
    mask.scatter_(1, order[:, :n], 1.0)
    return mask.reshape(W.shape).to(W.dtype)


def is_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True if every group of m along the last dim holds at most n non-zeros.

    >>> is_nm(torch.tensor([[0.0, 1.0, 2.0, 0.0]])), is_nm(torch.tensor([[3.0, 1.0, 2.0, 0.0]]))
    (True, False)
    """
    W = _check_nm(weight, n, m)
    return bool(((W.reshape(-1, m) != 0).sum(dim=1) <= n).all())


def nm_masks(model: nn.Module, n: int = 2, m: int = 4, exclude: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """{parameter name: N:M mask} for every prunable weight, for `apply_masks`.

    Conv weights group along their flattened (in_channels * kernel) axis.
    A weight whose last dimension is not a multiple of m raises (exclude it).
    """
    masks = {}
    for name, p in prunable_parameters(model, exclude=exclude).items():
        W = p.detach().reshape(p.shape[0], -1)  # (out, in * kernel)
        if W.shape[1] % m:
            raise ValueError(f"{name} has {W.shape[1]} inputs per output, not a multiple of m={m}; pass exclude=[{name.rsplit('.', 1)[0]!r}]")
        masks[name] = nm_mask(W, n, m).reshape(p.shape)
    return masks


# ------------------------------------------------------------ LLM shapes

# Widths of LLaMA-style decoders (head_dim = hidden_size / num_heads). "llama-1b"
# is TinyLlama-1.1B's (LLaMA-2 architecture at 1.1 B parameters), "llama-7b" LLaMA-2-7B's.
LLAMA_WIDTHS: dict[str, dict[str, int]] = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_heads": 9, "num_kv_heads": 3, "num_layers": 30},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_heads": 32, "num_kv_heads": 4, "num_layers": 22},
    "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_heads": 32, "num_kv_heads": 32, "num_layers": 32},
}


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def linear_shapes(hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int | None = None) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each Linear in one LLaMA decoder layer.

    Attention: q and o are (hidden, hidden); k and v map hidden to
    num_kv_heads * head_dim (grouped-query attention shares them). MLP: gate
    and up map hidden to intermediate, down maps back.

    >>> linear_shapes(576, 1536, num_heads=9, num_kv_heads=3)["k_proj"]
    (192, 576)
    >>> linear_shapes(4096, 11008, 32)["down_proj"]
    (4096, 11008)
    """
    for name, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size), ("num_heads", num_heads)):
        _positive_int(v, name)
    kv = num_heads if num_kv_heads is None else _positive_int(num_kv_heads, "num_kv_heads")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size must be a multiple of num_heads, got {hidden_size} and {num_heads}")
    if num_heads % kv:
        raise ValueError(f"num_heads must be a multiple of num_kv_heads, got {num_heads} and {kv}")
    kv_width = kv * (hidden_size // num_heads)
    return {
        "q_proj": (hidden_size, hidden_size),
        "k_proj": (kv_width, hidden_size),
        "v_proj": (kv_width, hidden_size),
        "o_proj": (hidden_size, hidden_size),
        "gate_proj": (intermediate_size, hidden_size),
        "up_proj": (intermediate_size, hidden_size),
        "down_proj": (hidden_size, intermediate_size),
    }


def llm_shapes(names: Sequence[str] = ("smollm2-135m", "llama-1b", "llama-7b")) -> list[tuple[int, int]]:
    """The distinct (out_features, in_features) of the decoder Linears of the named widths, in order.

    >>> llm_shapes(["smollm2-135m"])
    [(576, 576), (192, 576), (1536, 576), (576, 1536)]
    """
    if isinstance(names, str):
        names = [names]
    shapes: list[tuple[int, int]] = []
    for name in names:
        if name not in LLAMA_WIDTHS:
            raise ValueError(f"names: unknown width {name!r}; choose from {sorted(LLAMA_WIDTHS)}")
        w = LLAMA_WIDTHS[name]
        for shape in linear_shapes(w["hidden_size"], w["intermediate_size"], w["num_heads"], w["num_kv_heads"]).values():
            if shape not in shapes:
                shapes.append(shape)
    return shapes


# ------------------------------------------------------------ crossover


def _check_curve(tokens, speedups) -> tuple[list[int], list[float]]:
    tokens, speedups = list(tokens), list(speedups)
    if not tokens or len(tokens) != len(speedups):
        raise ValueError(f"tokens and speedups must be non-empty and of equal length, got {len(tokens)} and {len(speedups)}")
    for t in tokens:
        _positive_int(t, "tokens")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"tokens must be distinct, got {tokens}")
    for v in speedups:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"speedups must be positive finite numbers, got {v!r}")
    return tokens, [float(v) for v in speedups]


def crossover_tokens_loop(tokens: Sequence[int], speedups: Sequence[float]) -> int | None:
    """Token count from which 2:4 beats dense for good, one measurement at a time.

    Walk the measurements in order of tokens and remember the last one where
    2:4 lost (speedup < 1). The crossover lies between it and the next one,
    interpolated on a log scale of tokens (token counts grow by factors):
    log t* = log t0 + (1 - v0) / (v1 - v0) * (log t1 - log t0).
    None if 2:4 still loses at the largest count; the smallest count if it
    never loses.

    >>> crossover_tokens_loop([256, 1024, 4096], [0.5, 0.8, 1.2])
    2048
    >>> crossover_tokens_loop([256, 1024], [0.5, 0.9]) is None
    True
    """
    tokens, speedups = _check_curve(tokens, speedups)
    pts = sorted(zip(tokens, speedups))
    last_loss = None
    for i, (_, v) in enumerate(pts):
        if v < 1:
            last_loss = i
    if last_loss is None:
        return pts[0][0]
    if last_loss == len(pts) - 1:
        return None
    (t0, v0), (t1, v1) = pts[last_loss], pts[last_loss + 1]
    log_t = math.log(t0) + (1 - v0) / (v1 - v0) * (math.log(t1) - math.log(t0))
    return int(round(math.exp(log_t)))


def crossover_tokens(tokens: Sequence[int], speedups: Sequence[float]) -> int | None:
    """`crossover_tokens_loop` with numpy: the last loss found by `flatnonzero`.

    >>> crossover_tokens([16, 1024, 4096], [0.3, 1.1, 1.4])  # between 16 and 1024, nearer 1024
    609
    >>> crossover_tokens([16, 1024], [1.2, 1.5])  # wins from the smallest measured count
    16
    """
    tokens, speedups = _check_curve(tokens, speedups)
    order = np.argsort(tokens)
    t = np.asarray(tokens, dtype=np.float64)[order]  # (k,)
    v = np.asarray(speedups, dtype=np.float64)[order]  # (k,)
    losses = np.flatnonzero(v < 1)
    if losses.size == 0:
        return int(t[0])
    i = int(losses[-1])
    if i == t.size - 1:
        return None
    log_t = np.log(t[i]) + (1 - v[i]) / (v[i + 1] - v[i]) * (np.log(t[i + 1]) - np.log(t[i]))
    return int(np.round(np.exp(log_t)))


def crossovers(rows: Iterable[Mapping], by: Sequence[str] = ("out_features", "in_features", "mode")) -> dict[tuple, int | None]:
    """{group: crossover in tokens} over benchmark rows grouped by the keys `by`.

    Rows with an "error" are left out; a group needs at least one row.

    >>> rows = [{"model": "m", "mode": "graph", "tokens": t, "speedup": v} for t, v in [(512, 0.9), (2048, 1.1)]]
    >>> crossovers(rows, by=("model", "mode"))
    {('m', 'graph'): 1024}
    """
    groups: dict[tuple, list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("error"):
            continue
        groups.setdefault(tuple(r[k] for k in by), []).append((r["tokens"], r["speedup"]))
    return {key: crossover_tokens([t for t, _ in pts], [v for _, v in pts]) for key, pts in groups.items()}


# --------------------------------------------------------------------- GPU

MODES = ("eager", "graph", "compile")


def gpu_skip_reason(min_capability: tuple[int, int] = (8, 0)) -> str | None:
    """None if a CUDA GPU of at least `min_capability` is here, else a one-line reason.

    >>> gpu_skip_reason() is None or isinstance(gpu_skip_reason(), str)
    True
    """
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    cap = torch.cuda.get_device_capability(0)
    if cap < tuple(min_capability):
        return f"{torch.cuda.get_device_name(0)} has compute capability {cap[0]}.{cap[1]}; 2:4 sparse tensor cores need {min_capability[0]}.{min_capability[1]} or newer"
    return None


def _need_gpu() -> None:
    reason = gpu_skip_reason()
    if reason:
        raise RuntimeError(reason)


def _check_modes(modes) -> tuple[str, ...]:
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise ValueError(f"modes must be a non-empty selection of {MODES}, got {modes!r}")
    return modes


def _cuda_per_call(candidates: Mapping[str, Callable[[], object]], repeats: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each candidate, interleaved (rotating order each round).

    Each round times `inner` back-to-back calls between two CUDA events, so
    the number includes any host time the GPU waits for (which is what eager
    2:4 loses), but not one synchronisation per call.
    """
    names = list(candidates)
    for fn in candidates.values():
        fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                candidates[n]()
            end.record()
            end.synchronize()
            times[n].append(start.elapsed_time(end) / 1e3 / inner)
    return {n: statistics.median(ts) for n, ts in times.items()}


def _graphed(fn: Callable[[], torch.Tensor], warmup: int = 3) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture one call of `fn` (static inputs) in a CUDA graph; returns (replay, static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream, as torch.cuda.graphs recommends
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay, out


def _compiled(fn: Callable[[], torch.Tensor], warmup: int = 3) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """`torch.compile(fn, mode="reduce-overhead")`, warmed up; returns (call, a fresh output)."""
    torch._dynamo.reset()  # fresh caches: a closure recompiled past the cache limit would silently run eagerly
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=False)
    for _ in range(warmup):
        compiled()
    torch.cuda.synchronize()
    return compiled, compiled().clone()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def semi_structured_benchmark(
    shapes: Sequence[tuple[int, int]] | None = None,
    tokens: Sequence[int] = (256, 1024, 4096, 16384),
    modes: Sequence[str] = ("eager", "graph"),
    repeats: int = 10,
    inner: int = 10,
    backend: str | None = None,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    tol: float = 1e-2,
) -> list[dict]:
    """2:4 `F.linear` against dense fp16 on the GPU, for each weight shape, token count and mode.

    For each (out_features, in_features) in `shapes` (default: the decoder
    Linears of SmolLM2-135M, LLaMA-1B and LLaMA-7B widths, `llm_shapes()`): a
    random weight W, 2:4-masked, and its `to_sparse_semi_structured` copy A;
    for each token count T an input x (T, in_features). Correctness first:
    `F.linear(x, A)` must match the dense masked product `F.linear(x, W)` to
    `tol` (relative to the largest output), and in graph/compile mode the
    replayed output must match too. Then dense and 2:4 are timed interleaved
    (`inner` calls per sample, median of `repeats`), in each mode:

    - "eager": plain calls, every one paying its host-side cost;
    - "graph": one call captured in a CUDA graph, timed by replaying it;
    - "compile": `torch.compile(mode="reduce-overhead")` (compiled code in
      CUDA graphs); a failure to compile is reported in the row's "error".

    Rows: {"out_features", "in_features", "tokens", "mode", "dense_s",
    "sparse_s", "speedup" (dense / sparse, above 1 = 2:4 faster),
    "max_rel_err", "backend", "error"}. `backend`: None lets torch pick
    (cuSPARSELt when present), "cutlass" forces CUTLASS (compute capability
    8.x only). Raises RuntimeError with `gpu_skip_reason()` without a GPU.
    """
    modes = _check_modes(modes)
    shapes = llm_shapes() if shapes is None else [tuple(s) for s in shapes]
    for s in shapes:
        if len(s) != 2:
            raise ValueError(f"shapes must hold (out_features, in_features) pairs, got {s!r}")
        for v in s:
            _positive_int(v, "shapes")
    for t in tokens:
        _positive_int(t, "tokens")
    _positive_int(repeats, "repeats")
    _positive_int(inner, "inner")
    if backend not in (None, "cutlass", "cusparselt"):
        raise ValueError(f"backend must be None, 'cutlass' or 'cusparselt', got {backend!r}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    _need_gpu()
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    old = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    compile_error = None  # one failure to compile is enough to know; do not pay for it on every shape
    rows = []
    try:
        for out_f, in_f in shapes:
            g = torch.Generator(device="cuda").manual_seed(seed + out_f * 7 + in_f)
            W = torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=g) / math.sqrt(in_f)  # (out, in)
            W = W * nm_mask(W)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                A = to_sparse_semi_structured(W)
            for T in tokens:
                x = torch.randn(T, in_f, device="cuda", dtype=dtype, generator=g)  # (T, in)
                want = F.linear(x, W)  # (T, out) dense masked product
                err = _rel_err(F.linear(x, A), want)
                if not err < tol:
                    raise AssertionError(f"2:4 F.linear disagrees with the dense masked product at {out_f}x{in_f}, {T} tokens: relative error {err:.2e}")
                dense_fn, sparse_fn = (lambda: F.linear(x, W)), (lambda: F.linear(x, A))
                base = {"out_features": out_f, "in_features": in_f, "tokens": T, "backend": type(A).__name__, "max_rel_err": err}
                for mode in modes:
                    row = dict(base, mode=mode, dense_s=None, sparse_s=None, speedup=None, error=None)
                    try:
                        if mode == "eager":
                            fns = {"dense": dense_fn, "sparse": sparse_fn}
                        elif mode == "graph":
                            (d, d_out), (s, s_out) = _graphed(dense_fn), _graphed(sparse_fn)
                            row["max_rel_err"] = max(err, _rel_err(d_out, want), _rel_err(s_out, want))
                            fns = {"dense": d, "sparse": s}
                        else:
                            if compile_error:
                                raise RuntimeError(compile_error)
                            (d, d_out), (s, s_out) = _compiled(dense_fn), _compiled(sparse_fn)
                            row["max_rel_err"] = max(err, _rel_err(d_out, want), _rel_err(s_out, want))
                            fns = {"dense": d, "sparse": s}
                        if not row["max_rel_err"] < tol:
                            raise AssertionError(f"{mode}: output disagrees with the dense masked product ({row['max_rel_err']:.2e})")
                        med = _cuda_per_call(fns, repeats, inner)
                        row.update(dense_s=med["dense"], sparse_s=med["sparse"], speedup=med["dense"] / med["sparse"])
                    except AssertionError:
                        raise
                    except Exception as e:  # report, do not hide: e.g. torch.compile refusing the sparse subclass
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                        if mode == "compile":
                            compile_error = row["error"]
                    finally:
                        fns = d = s = None
                    rows.append(row)
                del x, want
            del W, A
            torch.cuda.empty_cache()
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = old
    return rows


# ------------------------------------------------------------ a 2:4 LLM


def decoder_linears(model: nn.Module, exclude: Iterable[str] = ("lm_head",)) -> dict[str, nn.Linear]:
    """{name: module} for every nn.Linear of `model` except those whose last name part is in `exclude`.

    For a `LlamaForCausalLM` these are the 7 Linears of each decoder layer
    (the output head `lm_head` stays dense: it is shared with the embedding in
    SmolLM2 and is not 2:4-pruned).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    exclude = set(exclude)
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in exclude}


def check_2to4_linears(model: nn.Module, exclude: Iterable[str] = ("lm_head",)) -> list[str]:
    """Names of the decoder Linears, after checking each weight is 2:4 (ValueError names those that are not)."""
    linears = decoder_linears(model, exclude)
    if not linears:
        raise ValueError("model has no nn.Linear outside exclude; nothing to convert")
    bad = [name for name, m in linears.items() if m.weight.shape[-1] % 4 or not is_nm(m.weight.detach(), 2, 4)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"these Linear weights are not 2:4 sparse: {shown}; prune them with n=2, m=4 first (or exclude them)")
    return list(linears)


@torch.no_grad()
def to_semi_structured(model: nn.Module, exclude: Iterable[str] = ("lm_head",)) -> list[str]:
    """Swap every decoder Linear's 2:4 weight for a `SparseSemiStructuredTensor`, in place; returns their names.

    The model must already be on a CUDA GPU in float16 or bfloat16, with mask
    buffers removed (`chapter11.masks.remove_masks`), and every converted
    weight must be 2:4 (`check_2to4_linears`). Raises RuntimeError with
    `gpu_skip_reason()` without a suitable GPU.
    """
    _need_gpu()
    from torch.sparse import to_sparse_semi_structured

    names = check_2to4_linears(model, exclude)
    linears = decoder_linears(model, exclude)
    for name in names:
        W = linears[name].weight
        if W.device.type != "cuda" or W.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: weight must be float16/bfloat16 on a CUDA device, got {W.dtype} on {W.device}")
    for name in names:
        lin = linears[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
    return names


def _causal_mask(model: nn.Module, length: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """None for SDPA attention (its causal flag is faster); an additive (1, 1, T, T) mask for eager attention."""
    if getattr(model.config, "_attn_implementation", "eager") == "sdpa":
        return None
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)  # (T, T)
    return mask[None, None]  # (1, 1, T, T)


@torch.no_grad()
def prefill_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits after a prompt, written out for a LLaMA-style `...ForCausalLM` (B, vocab).

    The same computation as `model(input_ids).logits[:, -1]`, without a KV
    cache, attention-mask helpers or host-side checks, so that one call can
    be captured in a CUDA graph: embeddings, rotary positions, the decoder
    layers with a causal mask, the final norm, and the head on the last
    position only (what a server computes for a prompt).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, tokens) tensor, got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
    inner = model.model
    h = inner.embed_tokens(input_ids)  # (B, T, hidden)
    length = input_ids.shape[1]
    position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)  # (1, T)
    position_embeddings = inner.rotary_emb(h, position_ids)  # (cos, sin), each (1, T, head_dim)
    mask = _causal_mask(model, length, h.dtype, h.device)
    for layer in inner.layers:
        out = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
        h = out[0] if isinstance(out, tuple) else out  # transformers 4.x returned a tuple
    h = inner.norm(h[:, -1:])  # (B, 1, hidden)
    return model.lm_head(h)[:, 0]  # (B, vocab)


@torch.no_grad()
def _compare_logits(dense: nn.Module, sparse: nn.Module, vocab_size: int, generator: torch.Generator, length: int = 128) -> dict:
    ids = torch.randint(0, vocab_size, (2, length), device="cuda", generator=generator)  # (2, length)
    want = dense(input_ids=ids, use_cache=False).logits.float()  # (2, length, vocab)
    got = sparse(input_ids=ids, use_cache=False).logits.float()
    last = prefill_logits(sparse, ids).float()  # (2, vocab)
    return {
        "positions": int(want.shape[0] * want.shape[1]),
        "max_abs_diff": (got - want).abs().max().item(),
        "rel_diff": _rel_err(got, want),
        "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
        "prefill_rel_diff": _rel_err(last, want[:, -1]),
    }


def semi_structured_llm_benchmark(
    model: nn.Module,
    prompts: Sequence[tuple[int, int]] = ((1, 256), (1, 1024), (1, 2048), (4, 2048), (8, 2048)),
    modes: Sequence[str] = ("eager", "graph"),
    repeats: int = 10,
    inner: int = 3,
    label: str = "model",
    dtype: torch.dtype = torch.float16,
    logit_tol: float = 0.05,
    min_top1: float | None = 0.9,
    seed: int = 0,
) -> dict:
    """Convert a 2:4-pruned LLaMA-style LLM to semi-structured weights and time prefill against dense fp16.

    `model` (any device and dtype, masks allowed) must have 2:4 decoder
    Linears (pruned with `chapter11.oneshot.prune_llm(..., n=2, m=4)` or
    `nm_masks`). A copy is moved to the GPU in `dtype` with its masks made
    permanent: that is the dense baseline (the zeros multiplied like any
    weight). A second copy gets `to_semi_structured`. Correctness first: the
    2:4 model's logits on random prompts must match the masked dense model's
    (relative difference below `logit_tol`, the same top token at
    `min_top1` of the positions or more; None skips that check, for random
    weights whose logits are nearly tied). Then for each (batch, prompt
    length) in `prompts`, `prefill_logits` of both models is timed
    interleaved, eagerly and replayed from a CUDA graph.

    Returns {"label", "config", "linears" (how many converted), "logits"
    (the check), "rows": [{"model", "batch", "seq_len", "tokens", "mode",
    "dense_s", "sparse_s", "speedup", "dense_tokens_per_s",
    "sparse_tokens_per_s", "error"}], "crossover": {mode: tokens or None}}.
    """
    modes = _check_modes(modes)
    if "compile" in modes:
        raise ValueError("modes: the whole-model benchmark times 'eager' and 'graph' only")
    for b, t in prompts:
        _positive_int(b, "prompts batch")
        _positive_int(t, "prompts length")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    check_2to4_linears(model)
    _need_gpu()
    dense = copy.deepcopy(model)
    remove_masks(dense)
    dense = dense.to(device="cuda", dtype=dtype).eval()
    sparse = copy.deepcopy(dense)
    names = to_semi_structured(sparse)
    config = dense.config
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = _compare_logits(dense, sparse, config.vocab_size, g)
    if not logits["rel_diff"] < logit_tol or not logits["prefill_rel_diff"] < logit_tol:
        raise AssertionError(f"{label}: 2:4 logits differ from the masked dense model's: {logits}")
    if min_top1 is not None and logits["top1_agreement"] < min_top1:
        raise AssertionError(f"{label}: 2:4 and masked dense agree on the top token at only {logits['top1_agreement']:.3f} of positions")
    rows = []
    for batch, length in prompts:
        ids = torch.randint(0, config.vocab_size, (batch, length), device="cuda", generator=g)  # (B, T)
        base = {"model": label, "batch": batch, "seq_len": length, "tokens": batch * length}
        for mode in modes:
            row = dict(base, mode=mode, dense_s=None, sparse_s=None, speedup=None, dense_tokens_per_s=None, sparse_tokens_per_s=None, error=None)
            fns = {}
            try:
                fns = {"dense": lambda: prefill_logits(dense, ids), "sparse": lambda: prefill_logits(sparse, ids)}
                if mode == "graph":
                    want = fns["dense"]()
                    (d, d_out), (s, s_out) = _graphed(fns["dense"]), _graphed(fns["sparse"])
                    err = max(_rel_err(d_out, want), _rel_err(s_out, want))
                    if not err < logit_tol:
                        raise AssertionError(f"{label}: replayed graph output differs from eager dense ({err:.2e})")
                    fns = {"dense": d, "sparse": s}
                med = _cuda_per_call(fns, repeats, inner)
                row.update(dense_s=med["dense"], sparse_s=med["sparse"], speedup=med["dense"] / med["sparse"],
                           dense_tokens_per_s=batch * length / med["dense"], sparse_tokens_per_s=batch * length / med["sparse"])
            except AssertionError:
                raise
            except Exception as e:  # e.g. a layer that cannot be captured: say so in the row
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            finally:
                fns = None
            rows.append(row)
            torch.cuda.empty_cache()
    cross = {mode: c for (_, mode), c in crossovers(rows, by=("model", "mode")).items()}
    info = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")}
    del dense, sparse
    torch.cuda.empty_cache()
    return {"label": label, "config": info, "linears": len(names), "logits": logits, "rows": rows, "crossover": cross}


def random_llama_2to4(width: str, num_layers: int = 2, vocab_size: int = 4096, device=None, seed: int = 0) -> nn.Module:
    """A LLaMA decoder of the named width (`LLAMA_WIDTHS`) with random weights, its decoder Linears 2:4 by magnitude.

    For timing only: the speed of a matrix product does not depend on what
    the weights learned. `num_layers` decoder layers (not the real depth).
    Built directly on `device` (default: `chapter11.train.default_device()`) in float32.
    """
    from chapter11.models import tiny_llama
    from chapter11.train import default_device

    if width not in LLAMA_WIDTHS:
        raise ValueError(f"width must be one of {sorted(LLAMA_WIDTHS)}, got {width!r}")
    w = LLAMA_WIDTHS[width]
    device = torch.device(device) if device is not None else default_device()
    with torch.device(device):
        model = tiny_llama(vocab_size=vocab_size, hidden_size=w["hidden_size"], num_layers=_positive_int(num_layers, "num_layers"),
                           num_heads=w["num_heads"], num_kv_heads=w["num_kv_heads"], intermediate_size=w["intermediate_size"],
                           max_position_embeddings=32768, seed=seed)
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        for lin in decoder_linears(model).values():
            lin.weight.mul_(nm_mask(lin.weight))
    return model


# ------------------------------------------------------------ CUDA CSR


def cuda_csr_benchmark(size: int = 4096, sparsities: Sequence[float] = (0.5, 0.9, 0.99), batches: Sequence[int] = (1, 32), repeats: int = 20) -> list[dict]:
    """Time torch's CUDA CSR matmul (cuSPARSE) against dense fp32 on the GPU.

    Rows {"sparsity", "batch", "dense_s", "csr_s", "speedup", "max_rel_err"}.
    Raises RuntimeError when CUDA is absent.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(gpu_skip_reason())
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for s in sparsities:
        W = torch.randn(size, size, device="cuda", generator=g)  # (size, size)
        W[torch.rand(size, size, device="cuda", generator=g) < s] = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            A = W.to_sparse_csr()
        for b in batches:
            X = torch.randn(size, b, device="cuda", generator=g)  # (size, b)
            want = W @ X
            err = ((A @ X - want).abs().max() / want.abs().max()).item()
            if not err < 1e-4:
                raise AssertionError(f"CUDA CSR disagrees with dense at sparsity {s}, batch {b}: {err:.2e}")
            med = _cuda_per_call({"dense": lambda: W @ X, "csr": lambda: A @ X}, repeats, inner=5)
            rows.append({"sparsity": s, "batch": b, "dense_s": med["dense"], "csr_s": med["csr"], "speedup": med["dense"] / med["csr"], "max_rel_err": err})
    return rows


# ------------------------------------------------------------ recorded results

def recorded_gpu_results(folder=None) -> list[dict]:
    """GPU measurements recorded in `benchmarks/` by earlier runs, each with where it came from.

    Two kinds of file: the first H200 runs (`h200_gpu_check.json`,
    `h200_semi_structured_2to4.json`), described by `benchmarks/provenance.json`
    (`chapter11.bench.recorded_runs`: the files hold rows only), and the
    files `benchmark_main` writes (`benchmarks/gpu/semi_structured*.json`, by
    `scripts/gpu_check.sh`), which carry their own date, machine, commit and
    command. Returns [{"file", "date", "by", "device", "torch", "what",
    "data"}], oldest first. Nothing here is measured now; label it as recorded.
    """
    from chapter11.bench import BENCHMARKS, recorded_runs

    root = Path(folder) if folder is not None else BENCHMARKS
    found = recorded_runs("gpu", root)
    for path in sorted((root / "gpu").glob("semi_structured*.json")):
        data = json.loads(path.read_text())
        machine = data.get("machine", {})
        found.append({"file": f"benchmarks/gpu/{path.name}", "kind": "gpu", "date": data.get("date", "not recorded"),
                      "commit": data.get("commit", "not recorded"), "by": data.get("command", "not recorded"),
                      "device": machine.get("gpu", "not recorded"), "torch": machine.get("torch", "not recorded"),
                      "what": data.get("what", ""), "data": data})
    return sorted(found, key=lambda r: (r["date"], r["file"]))


# ------------------------------------------------------------ command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def format_layer_rows(rows: Sequence[Mapping]) -> str:
    """A fixed-width table of `semi_structured_benchmark` rows."""
    lines = [f"{'weight (out x in)':>18s} {'tokens':>7s} {'mode':>8s} {'dense ms':>9s} {'2:4 ms':>8s} {'2:4 speedup':>11s}"]
    for r in rows:
        shape = f"{r['out_features']}x{r['in_features']}"
        if r.get("error"):
            lines.append(f"{shape:>18s} {r['tokens']:7d} {r['mode']:>8s}   failed: {r['error']}")
        else:
            lines.append(f"{shape:>18s} {r['tokens']:7d} {r['mode']:>8s} {r['dense_s'] * 1e3:9.3f} {r['sparse_s'] * 1e3:8.3f} {r['speedup']:10.2f}x")
    return "\n".join(lines)


def format_llm(result: Mapping) -> str:
    """A few lines on one `semi_structured_llm_benchmark` result: the model, the logit check, tokens/s, crossover."""
    c, lg = result["config"], result["logits"]
    lines = [f"{result['label']}: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, MLP {c['intermediate_size']}; "
             f"{result['linears']} Linears converted; logits vs masked dense: rel diff {lg['rel_diff']:.1e}, same top token {lg['top1_agreement']:.3f}"]
    for r in result["rows"]:
        head = f"  batch {r['batch']} x {r['seq_len']:5d} tokens {r['mode']:>6s}"
        if r.get("error"):
            lines.append(f"{head}: failed: {r['error']}")
        else:
            lines.append(f"{head}: dense {r['dense_tokens_per_s']:12,.0f} tok/s, 2:4 {r['sparse_tokens_per_s']:12,.0f} tok/s, {r['speedup']:.2f}x")
    lines.append(f"  crossover (tokens from which 2:4 wins): {result['crossover']}")
    return "\n".join(lines)


def _smollm_2to4(method: str, calibration_tokens: int) -> tuple[nn.Module, str]:
    """SmolLM2 pruned 2:4 by `chapter11.oneshot.prune_llm`, or a stated fallback."""
    from chapter11.models import load_smollm

    try:
        model, tokenizer = load_smollm()
    except Exception as e:  # not installed on this machine: same shapes with random weights, said plainly
        model = random_llama_2to4("smollm2-135m", num_layers=LLAMA_WIDTHS["smollm2-135m"]["num_layers"], vocab_size=49152)
        return model, f"random weights at SmolLM2-135M shapes, 2:4 by magnitude (SmolLM2 did not load: {type(e).__name__}: {e})"
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    try:
        from chapter11.data import pydoc_topics, text_tokens
        from chapter11.oneshot import prune_llm

        seq_len = 128
        calib = text_tokens(tokenizer, pydoc_topics("calibration"), max_tokens=calibration_tokens)  # (tokens,)
        calib = calib[: len(calib) // seq_len * seq_len].reshape(-1, seq_len).to(model.device)  # (sequences, 128)
        prune_llm(model, calib, method=method, sparsity=None, n=2, m=4, progress_bar=False)
        check_2to4_linears(model)
        how = f"SmolLM2-135M-Instruct pruned 2:4 by {method} (chapter11.oneshot.prune_llm, {calib.numel()} calibration tokens)"
    except Exception as e:  # the one-shot module may be missing or have another signature: fall back, and say so
        masks = nm_masks(model, exclude=["lm_head"])
        from chapter11.masks import apply_masks

        apply_masks(model, masks)
        how = f"SmolLM2-135M-Instruct pruned 2:4 by magnitude (prune_llm({method}) unavailable: {type(e).__name__}: {e})"
    return model, how


def benchmark_main(argv: Sequence[str] | None = None) -> int:
    """`python -m chapter11 bench semi`: 2:4 vs dense fp16 per layer and for whole LLMs (CUDA GPU only)."""
    import datetime

    from chapter11.bench import describe_machine, machine_info
    from chapter11.report import _commit, atomic_write_text

    parser = argparse.ArgumentParser(prog="python -m chapter11 bench semi", description=benchmark_main.__doc__)
    parser.add_argument("--widths", default="smollm2-135m,llama-1b,llama-7b", help=f"layer shapes of these widths ({', '.join(LLAMA_WIDTHS)})")
    parser.add_argument("--tokens", type=_int_list, default=[256, 1024, 4096, 16384], help="token counts per layer product (comma-separated)")
    parser.add_argument("--modes", default="eager,graph", help="comma-separated: eager, graph, compile")
    parser.add_argument("--compile-widths", default="llama-7b", help="widths also timed with torch.compile (reduce-overhead); '' for none")
    parser.add_argument("--compile-tokens", type=_int_list, default=[4096], help="token counts for the compile mode (each one compiles anew)")
    parser.add_argument("--repeats", type=int, default=10, help="timed samples per candidate (median reported)")
    parser.add_argument("--llm", action="store_true", help="also the end-to-end 2:4 LLMs: SmolLM2 and random LLaMA-1B/7B-width blocks")
    parser.add_argument("--method", default="wanda", choices=("wanda", "sparsegpt"), help="one-shot pruning method for SmolLM2")
    parser.add_argument("--llm-layers", type=int, default=2, help="decoder layers of the random LLaMA-1B/7B-width models")
    parser.add_argument("--json", metavar="PATH", help="write everything (with machine, date, command) as JSON here")
    args = parser.parse_args(list(argv) if argv is not None else None)
    modes = _check_modes([m.strip() for m in args.modes.split(",") if m.strip()])
    widths = [w.strip() for w in args.widths.split(",") if w.strip()]
    compile_widths = [w.strip() for w in args.compile_widths.split(",") if w.strip()]
    result = {
        "what": "2:4 semi-structured (to_sparse_semi_structured) vs dense fp16: F.linear per LLM layer shape, and prefill of whole 2:4 LLMs",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m chapter11 bench semi " + " ".join(sys.argv[2:] if argv is None else argv),
        "machine": machine_info(),
        "commit": _commit(),
        "skip_reason": gpu_skip_reason(),
    }
    print(f"machine: {describe_machine()}", flush=True)
    def save():  # after every step, so a run cut short by a time limit keeps what it measured
        if args.json:
            atomic_write_text(json.dumps(result, indent=1, default=str), args.json)

    def layer_part(rows):
        result["layers"] = result.get("layers", []) + rows
        result["layer_crossover"] = [{"out_features": o, "in_features": i, "mode": m, "tokens": c} for (o, i, m), c in crossovers(result["layers"]).items()]
        print(format_layer_rows(rows), flush=True)
        for c in result["layer_crossover"]:
            if c["mode"] in {r["mode"] for r in rows}:
                where = "never, at the measured counts" if c["tokens"] is None else f"from about {c['tokens']:,} tokens"
                print(f"crossover {c['out_features']}x{c['in_features']} {c['mode']}: 2:4 wins {where}", flush=True)
        save()

    def llm_part(model, how, **kwargs):
        r = semi_structured_llm_benchmark(model, **kwargs)
        r["masks"] = how
        result.setdefault("llm", []).append(r)
        print(how)
        print(format_llm(r), flush=True)
        save()

    save()
    if result["skip_reason"]:
        print(f"skipped the 2:4 GPU benchmark: {result['skip_reason']}")
    else:
        # cheapest and surest first: layers eagerly and replayed, then whole LLMs, then torch.compile (slow to compile, may fail)
        layer_part(semi_structured_benchmark(llm_shapes(widths), tokens=args.tokens, modes=modes, repeats=args.repeats))
        if args.llm:
            model, how = _smollm_2to4(args.method, calibration_tokens=16 * 128)
            llm_part(model, how, label="smollm2-135m", prompts=((1, 256), (1, 1024), (1, 2048), (4, 2048), (8, 2048), (16, 2048)))
            del model
            for width in ("llama-1b", "llama-7b"):
                model = random_llama_2to4(width, num_layers=args.llm_layers)
                llm_part(model, "random weights, 2:4 by magnitude", label=f"{width} ({args.llm_layers} random layers)", min_top1=None,
                         prompts=((1, 256), (1, 1024), (1, 4096), (4, 4096)))
                del model
                torch.cuda.empty_cache()
        if compile_widths and "compile" not in modes:
            layer_part(semi_structured_benchmark(llm_shapes(compile_widths), tokens=args.compile_tokens, modes=("compile",), repeats=args.repeats))
    if args.json:
        print(f"json: {args.json}")
    return 0
