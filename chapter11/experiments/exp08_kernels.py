"""Experiment 8, the drivers: sparse kernels timed against dense, on the CPU (CSR) and on a GPU (2:4).

Covers:
- CSR on the CPU: `benchmark` (our numba kernels, scipy and
  `torch.sparse_csr` against dense, at several sparsities and batch sizes,
  each checked against dense before it is timed), `crossover_sparsity` (from
  which sparsity a kernel beats dense), `plot_benchmark`, and the command
  line `python -m chapter11 bench sparse` (`sparse_main`);
- 2:4 on a CUDA GPU: one 2:4 `F.linear` against dense fp16, eager, replayed
  from a captured CUDA graph and through `torch.compile` (`semi_structured_benchmark`);
  a whole 2:4 LLM against dense fp16, logits checked first
  (`semi_structured_llm_benchmark`, `random_llama_2to4` for LLaMA-1B/7B
  widths); torch's CUDA CSR against dense (`cuda_csr_benchmark`); the
  numbers recorded by earlier GPU runs (`recorded_gpu_results`); and the
  command line `python -m chapter11 bench semi` (`semi_main`).

The formats and kernels are the methods (`chapter11.csr`, `chapter11.nm`);
this module only times them. Every GPU function raises `RuntimeError` with
`chapter11.nm.gpu_skip_reason()` on a machine without a suitable GPU.

But: the CPU numbers are for one random weight per sparsity, uniformly
pruned; real pruned layers have uneven rows, which costs the kernels a
little load balance.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit
from torch import nn

from ..bench import BENCHMARKS, compare, describe_machine, machine_info, recorded_runs
from ..csr import (FIXED_WIDTH, IMPLS, SPARSITIES, CSR, _backend, _kernel_operand, _matmul_fixed_serial, _matmul_serial, _matvec_serial,
                   _threads, _values, autotuned_backend, csr_matmul, csr_matvec, to_csr)
from ..masks import apply_masks, remove_masks
from ..models import load_smollm, tiny_llama
from ..nm import (LLAMA_WIDTHS, _need_gpu, _positive_int, check_2to4_linears, crossovers, decoder_linears, gpu_skip_reason,
                  llm_shapes, nm_mask, nm_masks, prefill_logits, to_semi_structured)
from ..report import _commit, atomic_write_bytes, atomic_write_text
from ..sparsity import check_sparsity
from ..train import default_device


def _random_pruned(size: int, sparsity: float, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) float32 matrix with exactly round(sparsity * size^2) zeros at random places."""
    W = rng.standard_normal((size, size), dtype=np.float32)  # (size, size)
    zeros = rng.permutation(size * size)[: round(sparsity * size * size)]
    W.reshape(-1)[zeros] = 0.0
    W[W == 0] = 0.0  # no negative zeros
    kept = W != 0
    W[kept & (np.abs(W) < 1e-3)] = 1e-3  # a random normal is never exactly 0, but be sure
    return W


def benchmark(
    size: int = 4096,
    sparsities: Sequence[float] = SPARSITIES,
    batches: Sequence[int] = (1, 32),
    repeats: int = 15,
    seed: int = 0,
    num_threads: int | None = None,
    verbose: bool = True,
    min_time_s: float = 1.0,
) -> list[dict]:
    """Time dense, our CSR kernel, scipy and torch.sparse_csr in one process; return rows.

    For every (sparsity, batch): check all candidates against dense, then time
    them interleaved and keep the medians. Dense is the faster of numpy and
    torch in this run. Each row is {"impl", "sparsity", "batch", "median_s",
    "speedup_vs_dense", "traffic_limit"}; the traffic limit is dense bytes over
    our CSR bytes (float32 values, the narrowest index type: int16 for 4096
    columns). The printed line also shows the backend that auto passed over.

    Every candidate gets at least `repeats` timed calls; fast configurations
    get more (up to 5x), so that each is timed for about `min_time_s` and
    its medians are not decided by a few noisy calls.
    """
    import scipy.sparse as sp

    if isinstance(size, bool) or not isinstance(size, int) or size < 4:
        raise ValueError(f"size must be an int >= 4, got {size!r}")
    sparsities = [check_sparsity(s, "sparsities") for s in sparsities]
    for b in batches:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batches must hold positive ints, got {b!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if not min_time_s >= 0:
        raise ValueError(f"min_time_s must be >= 0, got {min_time_s!r}")
    rng = np.random.default_rng(seed)
    mkl = torch.backends.mkl.is_available()
    rows = []
    with _threads(num_threads):
        for s in sparsities:
            W = _random_pruned(size, s, rng)  # (size, size)
            Wt = torch.from_numpy(W)
            ours = to_csr(W)
            dense_bytes = W.nbytes
            limit = dense_bytes / ours.nbytes
            scipy_A = sp.csr_array(W)  # scipy picks its own index type (int32 here)
            with torch.sparse.check_sparse_tensor_invariants(False):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch_A = Wt.to_sparse_csr()  # what a user gets: int64 indices
            for batch in batches:
                x = rng.standard_normal((size, batch), dtype=np.float32)  # (size, batch)
                if batch == 1:
                    x = x[:, 0].copy()  # (size,)
                xt = torch.from_numpy(x)
                kernel = csr_matvec if batch == 1 else csr_matmul
                candidates = {
                    "numpy_dense": lambda: W @ x,
                    "torch_dense": lambda: torch.mv(Wt, xt) if batch == 1 else torch.mm(Wt, xt),
                    "chapter11": lambda: kernel(ours, x),  # backend="auto"
                    "scipy": lambda: scipy_A @ x,
                    "torch_sparse": lambda: (torch_A @ xt),
                }
                candidates["chapter11"]()  # settles auto's choice (timed once on both paths where the CPU decides)
                chosen = autotuned_backend(ours, batch) or _backend("auto", None, None, batch)
                if mkl:  # the backend that "auto" passed over, for comparison
                    other = "mkl" if chosen == "numba" else "numba"
                    candidates[other] = lambda other=other: kernel(ours, x, backend=other)
                # correctness first: every candidate against float64 dense (each call also timed once)
                want = W.astype(np.float64) @ x.astype(np.float64)
                scale = np.abs(W).astype(np.float64) @ np.abs(x).astype(np.float64) + 1e-30
                round_s = 0.0
                for name, fn in candidates.items():
                    t0 = time.perf_counter()
                    got = fn()
                    round_s += time.perf_counter() - t0
                    got = np.asarray(got.numpy() if name.startswith("torch") else got, dtype=np.float64)
                    err = float(np.max(np.abs(got - want) / scale))
                    if not err < 1e-5:
                        raise AssertionError(f"{name} disagrees with dense at sparsity {s}, batch {batch}: relative error {err:.2e}")
                reps = max(repeats, min(5 * repeats, math.ceil(min_time_s / max(round_s, 1e-9))))
                # blocks of consecutive calls, rotated round by round: thread pools keep spinning
                # for a while after a call and would slow the next candidate
                med = compare(candidates, repeats=reps, warmup=1, block=min(10, -(-reps // 3)))["median_s"]
                best_dense = min(med["numpy_dense"], med["torch_dense"])
                dense_name = "numpy" if med["numpy_dense"] <= med["torch_dense"] else "torch"
                for impl, key in (("dense", None), ("chapter11", "chapter11"), ("scipy", "scipy"), ("torch_sparse", "torch_sparse")):
                    t = best_dense if key is None else med[key]
                    rows.append(
                        {"impl": impl, "sparsity": s, "batch": batch, "median_s": t, "speedup_vs_dense": best_dense / t, "traffic_limit": limit}
                        | ({"backend": chosen} if impl == "chapter11" else {})
                        # the path auto passed over, timed in the same rounds, so "was auto's choice the faster?" is in the record
                        | ({"other_backend": other, "other_speedup_vs_dense": best_dense / med[other]} if impl == "chapter11" and mkl else {})
                    )
                if verbose:
                    line = "  ".join(f"{k} {best_dense / med[k]:5.2f}x" for k in candidates if not k.endswith("_dense"))
                    print(f"s={s:<5} batch={batch:<3} dense({dense_name}) {best_dense * 1e3:8.2f} ms  {line}  limit {limit:5.2f}x  (auto ran {chosen})", flush=True)
    return rows


def crossover_sparsity(rows: list[dict], impl: str = "chapter11", batch: int = 1) -> float | None:
    """Lowest sparsity where `impl` beats dense, interpolated between measured points.

    None if it never does; the lowest measured sparsity if it always does.

    >>> rows = [{"impl": "chapter11", "batch": 1, "sparsity": s, "speedup_vs_dense": v} for s, v in [(0.5, 0.5), (0.8, 1.5)]]
    >>> round(crossover_sparsity(rows), 3)
    0.65
    """
    pts = sorted((r["sparsity"], r["speedup_vs_dense"]) for r in rows if r["impl"] == impl and r["batch"] == batch)
    if not pts:
        raise ValueError(f"rows hold no results for impl={impl!r}, batch={batch}")
    if pts[0][1] >= 1:
        return pts[0][0]
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if v0 < 1 <= v1:
            return s0 + (1 - v0) * (s1 - s0) / (v1 - v0)
    return None


def plot_benchmark(rows: list[dict], path=None):
    """Speedup over dense against sparsity, one panel per batch, with the traffic limit.

    Returns the figure; with `path` also saves a PNG there (atomically).
    """
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.8), squeeze=False)
    styles = {"chapter11": "o-", "scipy": "s--", "torch_sparse": "^--", "dense": "k-"}
    for ax, batch in zip(axes[0], batches):
        sub = [r for r in rows if r["batch"] == batch]
        for impl in IMPLS:
            pts = sorted((r["sparsity"], r["speedup_vs_dense"]) for r in sub if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[impl], label=impl if impl != "dense" else "dense (best of numpy, torch)")
        lim = sorted({(r["sparsity"], r["traffic_limit"]) for r in sub})
        ax.plot([p[0] for p in lim], [p[1] for p in lim], ":", color="gray", label="traffic limit (dense / CSR bytes)")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (fraction of zeros)")
        ax.set_ylabel("speedup over dense (x)")
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        atomic_write_bytes(buf.getvalue(), path)
    return fig


def sparse_main(argv=None) -> int:
    """`python -m chapter11 bench sparse [--quick] [--json PATH] [--plot PATH]`."""
    parser = argparse.ArgumentParser(prog="python -m chapter11 bench sparse", description="CSR kernels against dense, scipy and torch.sparse_csr")
    parser.add_argument("--quick", action="store_true", help="2048x2048 and 5 repeats instead of 4096x4096 and 15")
    parser.add_argument("--size", type=int, default=None, help="rows = cols of the weight (default 4096, quick 2048)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per candidate (default 15, quick 5)")
    parser.add_argument("--threads", type=int, default=None, help="threads for numba and torch (default: numba's)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per configuration, at most 5x the repeats (default 1)")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON here")
    parser.add_argument("--plot", metavar="PATH", default="build/bench_sparse.png", help="save the plot here (default build/bench_sparse.png)")
    args = parser.parse_args(argv)
    size = args.size or (2048 if args.quick else 4096)
    repeats = args.repeats or (5 if args.quick else 15)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("machine:", json.dumps(machine_info()), flush=True)
    print(f"weight {size}x{size} float32, at least {repeats} interleaved repeats, numba threads {args.threads or numba.get_num_threads()}, torch threads {torch.get_num_threads()}", flush=True)
    rows = benchmark(size=size, repeats=repeats, num_threads=args.threads, min_time_s=args.min_time)
    for batch in sorted({r["batch"] for r in rows}):
        cross = crossover_sparsity(rows, "chapter11", batch)
        where = "never (not at any measured sparsity)" if cross is None else f"{cross:.2f}"
        print(f"batch {batch}: chapter11 beats dense from sparsity {where}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        plot_benchmark(rows, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        atomic_write_text(json.dumps(rows, indent=1), args.json)
        print(f"json: {args.json}")
    return 0


MODES = ("eager", "graph", "compile")


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

    try:
        model, tokenizer = load_smollm()
    except Exception as e:  # not installed on this machine: same shapes with random weights, said plainly
        model = random_llama_2to4("smollm2-135m", num_layers=LLAMA_WIDTHS["smollm2-135m"]["num_layers"], vocab_size=49152)
        return model, f"random weights at SmolLM2-135M shapes, 2:4 by magnitude (SmolLM2 did not load: {type(e).__name__}: {e})"
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    try:
        from ..data import pydoc_topics, text_tokens
        from ..oneshot import prune_llm

        seq_len = 128
        calib = text_tokens(tokenizer, pydoc_topics("calibration"), max_tokens=calibration_tokens)  # (tokens,)
        calib = calib[: len(calib) // seq_len * seq_len].reshape(-1, seq_len).to(model.device)  # (sequences, 128)
        prune_llm(model, calib, method=method, sparsity=None, n=2, m=4, progress_bar=False)
        check_2to4_linears(model)
        how = f"SmolLM2-135M-Instruct pruned 2:4 by {method} (chapter11.oneshot.prune_llm, {calib.numel()} calibration tokens)"
    except Exception as e:  # the one-shot module may be missing or have another signature: fall back, and say so
        masks = nm_masks(model, exclude=["lm_head"])

        apply_masks(model, masks)
        how = f"SmolLM2-135M-Instruct pruned 2:4 by magnitude (prune_llm({method}) unavailable: {type(e).__name__}: {e})"
    return model, how


def semi_main(argv: Sequence[str] | None = None) -> int:
    """`python -m chapter11 bench semi`: 2:4 vs dense fp16 per layer and for whole LLMs (CUDA GPU only)."""
    import datetime


    parser = argparse.ArgumentParser(prog="python -m chapter11 bench semi", description=semi_main.__doc__)
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


# Two earlier versions of the serial row loop, kept to be timed against ours.
@njit(boundscheck=False, cache=True, nogil=True)
def _matvec_signed_in_order(data, indices, indptr, x, out):  # pragma: no cover - compiled
    for i in range(out.shape[0]):
        total = x.dtype.type(0)
        for k in range(indptr[i], indptr[i + 1]):
            total += data[k] * x[indices[k]]  # signed index: numba adds a negative-index test
        out[i] = total


@njit(inline="always", boundscheck=False)
def _row_dot_in_order(data, indices, x, start, end):  # pragma: no cover - compiled
    total = x.dtype.type(0)
    for k in range(np.uint64(start), np.uint64(end)):
        total += data[k] * x[np.uint64(indices[k])]  # no fastmath: adds in order, one at a time
    return total


@njit(boundscheck=False, cache=True, nogil=True)
def _matvec_unsigned_in_order(data, indices, indptr, x, out):  # pragma: no cover - compiled
    for i in range(out.shape[0]):
        out[i] = _row_dot_in_order(data, indices, x, indptr[i], indptr[i + 1])


def _run_serial(kernel, csr: CSR, x, batched: bool = False) -> np.ndarray:
    csr, x, dtype, _ = _kernel_operand(csr, x, 2 if batched else 1, "X" if batched else "x")
    out = np.empty((csr.shape[0], x.shape[1]) if batched else csr.shape[0], dtype=dtype)
    kernel(_values(csr, dtype), csr.indices, csr.indptr, x, out)
    return out


def matvec_variants() -> dict[str, Callable]:
    """Three compiled versions of the same one-thread row loop, to time side by side.

    Each maps (csr, x) to y (numpy). They differ in one detail at a time:
    "signed index" (numba guards every x[indices[k]] against a negative
    index), "unsigned index" (no guard; the sum still runs in order) and
    "unsigned, reordered" (ours: fastmath reassoc lets the compiler split the
    sum across SIMD lanes with gathers). Notebook 08 times them.

    >>> A = to_csr(torch.tensor([[1.0, 0.0, 2.0]]))
    >>> [f(A, np.ones(3, np.float32)).tolist() for f in matvec_variants().values()]
    [[3.0], [3.0], [3.0]]
    """
    return {
        "signed index": lambda csr, x: _run_serial(_matvec_signed_in_order, csr, x),
        "unsigned index": lambda csr, x: _run_serial(_matvec_unsigned_in_order, csr, x),
        "unsigned, reordered": lambda csr, x: _run_serial(_matvec_serial, csr, x),
    }


def matmul_variants() -> dict[str, Callable]:
    """Our one-thread batch kernel with the width known at run time, and fixed at 32.

    Each maps (csr, X) to Y (numpy); "fixed width" needs exactly
    `FIXED_WIDTH` columns in X.

    >>> A = to_csr(torch.tensor([[1.0, 0.0, 2.0]]))
    >>> [f(A, np.ones((3, 32), np.float32))[0, :2].tolist() for f in matmul_variants().values()]
    [[3.0, 3.0], [3.0, 3.0]]
    """

    def fixed(csr, X):
        if np.shape(X)[-1] != FIXED_WIDTH:
            raise ValueError(f"X must have {FIXED_WIDTH} columns for the fixed-width kernel, got shape {tuple(np.shape(X))}")
        return _run_serial(_matmul_fixed_serial, csr, X, batched=True)

    return {"general width": lambda csr, X: _run_serial(_matmul_serial, csr, X, batched=True), "fixed width": fixed}
