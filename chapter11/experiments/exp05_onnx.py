"""Experiment 5, the drivers: ONNX Runtime sessions of dense, pruned, sparse and quantised models, timed side by side.

Covers: `benchmark_onnx` (throughput of several sessions at each batch size,
each checked to return finite outputs of the same shape, then timed
interleaved with `chapter11.bench.compare`, with speedups over a reference)
and `format_benchmark` (its rows as a table, with file sizes). Exporting,
sparse initializers, ORT's sparse operator and int8 quantisation are the
methods in `chapter11.export`.

But: one random input per batch size; ORT's thread pool and the machine's
load move the wall-clock numbers, which is why `clock="cpu"` is offered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..bench import compare
from ..export import run_onnx


def benchmark_onnx(
    sessions: Mapping[str, object],
    batches: Sequence[int] = (1, 64),
    repeats: int = 20,
    warmup: int = 3,
    reference: str | None = None,
    seed: int = 0,
    clock: str = "wall",
) -> list[dict]:
    """Throughput of each session at each batch size, all timed interleaved in one run.

    Every session must take the same input (its feature shape is read from
    the first one); before timing, each is run once on the batch and must
    return finite outputs of the same shape. Rows:
    {"name", "batch", "median_s", "samples_per_s", "speedup"}, where speedup
    is the reference's median time over this one's (above 1 = faster).
    `clock="cpu"` times CPU seconds instead of wall seconds
    (`chapter11.bench.compare`): steadier on a busy machine, and the same
    thing for sessions created with `threads=1`.
    """
    names = list(sessions)
    if not names:
        raise ValueError("sessions must hold at least one session")
    reference = names[0] if reference is None else reference
    if reference not in sessions:
        raise ValueError(f"reference {reference!r} is not one of {names}")
    for b in batches:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batches must hold positive ints, got {b!r}")
    feature_shape = sessions[names[0]].get_inputs()[0].shape[1:]
    if not all(isinstance(d, int) for d in feature_shape):
        raise ValueError(f"the first session's input needs fixed feature sizes, got {feature_shape}")
    rng = np.random.default_rng(seed)
    rows = []
    for b in batches:
        x = rng.standard_normal((b, *feature_shape)).astype(np.float32)  # (B, features)
        shapes = set()
        for n in names:
            out = run_onnx(sessions[n], x)
            if not np.isfinite(out).all():
                raise AssertionError(f"session {n!r} returned non-finite outputs at batch {b}")
            shapes.add(out.shape)
        if len(shapes) != 1:
            raise AssertionError(f"sessions disagree on the output shape at batch {b}: {shapes}")
        result = compare({n: (lambda s=sessions[n]: run_onnx(s, x)) for n in names}, repeats=repeats, warmup=warmup, reference=reference, clock=clock)
        for n in names:
            med = result["median_s"][n]
            rows.append({"name": n, "batch": b, "median_s": med, "samples_per_s": b / med, "speedup": 1.0 / result["ratio"][n]})
    return rows


def format_benchmark(rows: Sequence[Mapping], sizes: Mapping[str, int] | None = None) -> str:
    """A fixed-width table of `benchmark_onnx` rows (and file sizes in MB, if given)."""
    header = f"{'model':<22}{'batch':>6}{'ms/call':>10}{'samples/s':>12}{'speedup':>9}" + (f"{'file MB':>9}" if sizes else "")
    lines = [header, "-" * len(header)]
    for r in rows:
        line = f"{r['name']:<22}{r['batch']:>6}{r['median_s'] * 1e3:>10.2f}{r['samples_per_s']:>12,.0f}{r['speedup']:>8.2f}x"
        if sizes:
            line += f"{sizes[r['name']] / 1e6:>9.1f}" if r["name"] in sizes else f"{'':>9}"
        lines.append(line)
    return "\n".join(lines)
