"""Benchmarks that check first, then time: medians of repeats, ratios from one run.

Covers the timing harness every benchmark builds on: `time_callable`
(median of repeated calls), `compare` (several candidates timed interleaved
in one process, so a noisy neighbour slows them all alike, with ratios to a
reference), `recorded_runs` (the benchmark files in `benchmarks/`),
`QUIET_POOLS` (thread-pool settings for timing), and, from
`chapter11.report`, `machine_info` / `describe_machine` (what the numbers
were measured on).

The drivers that use it live in `chapter11.experiments.benchmarks` and run
from the command line:

    python -m chapter11 bench masks       [--json PATH] [--steps N]
    python -m chapter11 bench sparse      [--json PATH] [--quick]   (CSR kernels)
    python -m chapter11 bench structured  [--json PATH]             (pruned channels and heads)
    python -m chapter11 bench semi        [--json PATH]             (2:4 sparsity, CUDA only)

But: wall-clock or CPU-time timing only (no hardware counters), and one
process: the numbers describe this machine at this moment, which is why only
ratios measured side by side are ever reported as speedups. This module
imports the core only.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .report import describe_machine, machine_info  # noqa: F401 (part of the harness's interface)

__all__ = ["machine_info", "describe_machine", "time_callable", "compare", "recorded_runs", "QUIET_POOLS",
           "quiet_pools_missing", "BENCHMARKS"]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_callable(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> dict:
    """Median (and all) wall times of `fn()` over `repeats` calls after `warmup` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times": times}


def compare(
    candidates: Mapping[str, Callable[[], object]],
    repeats: int = 20,
    warmup: int = 3,
    reference: str | None = None,
    block: int = 1,
    clock: str = "wall",
) -> dict:
    """Time every candidate interleaved (rotating order each round); medians and ratios.

    Returns {"median_s": {name: s}, "ratio": {name: median / reference median},
    "times": {name: [...]}}. `reference` defaults to the first candidate.
    A ratio above 1 means slower than the reference.

    `block > 1` interleaves blocks instead of single calls: each round, every
    candidate gets one untimed call and then `block` timed calls in a row.
    Use it when candidates run on different thread pools (numpy, torch,
    numba), which keep spinning for a while after a call and would otherwise
    slow whichever candidate runs next.

    `clock="cpu"` times with `time.process_time` (CPU seconds of this whole
    process, all its threads) instead of the wall clock. On a machine shared
    with other work, the wall clock also counts the time other processes hold
    the cores; CPU time does not. It equals wall time only for single-threaded
    candidates, so use it to compare candidates that each run on one thread.
    """
    names = list(candidates)
    if not names:
        raise ValueError("candidates must hold at least one callable")
    reference = reference or names[0]
    if reference not in candidates:
        raise ValueError(f"reference {reference!r} is not one of {names}")
    for _ in range(warmup):
        for n in names:
            candidates[n]()
    _sync()
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    if clock not in clocks:
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    now = clocks[clock]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(-(-repeats // block)):  # ceil: every candidate gets at least `repeats` timed calls
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            if block > 1:
                candidates[n]()  # wake this candidate's threads; not timed
            for _ in range(block):
                t0 = now()
                candidates[n]()
                _sync()
                times[n].append(now() - t0)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    return {"median_s": med, "ratio": {n: med[n] / med[reference] for n in names}, "times": times}


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def recorded_runs(kind: str | None = None, folder=None) -> list[dict]:
    """Benchmark files recorded by earlier runs, each with where it came from.

    `benchmarks/provenance.json` describes the files that do not describe
    themselves: {file: {"kind" ("cpu"/"gpu"), "date", "commit", "by" (the
    command or script), "device", "torch", "what"}}. Returns
    [{"file", "kind", "date", "commit", "by", "device", "torch", "what", "data"}]
    for the entries of `kind` (all if None), oldest first. These numbers were
    measured then, not now: whoever shows them must say so.
    """
    root = Path(folder) if folder is not None else BENCHMARKS
    if not root.is_dir():
        raise FileNotFoundError(f"folder: no benchmarks folder at {str(root)!r}")
    if kind not in (None, "cpu", "gpu"):
        raise ValueError(f"kind must be None, 'cpu' or 'gpu', got {kind!r}")
    prov_path = root / "provenance.json"
    provenance = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    found = []
    for name, p in sorted(provenance.items()):
        if kind is not None and p.get("kind") != kind:
            continue
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{prov_path} describes {name}, which is missing")
        found.append({"file": f"benchmarks/{name}", "kind": p.get("kind"), "date": p["date"], "commit": p.get("commit", "not recorded"),
                      "by": p["by"], "device": p["device"], "torch": p.get("torch", "not recorded"), "what": p["what"],
                      "data": json.loads(path.read_text())})
    return sorted(found, key=lambda r: (r["date"], r["file"]))


# Idle thread pools should sleep, not spin, while the next candidate runs.
# OpenBLAS (numpy's BLAS) keeps its idle threads polling for about 0.1 s after
# each call; on two cores that stalled the threads of whichever candidate came
# next by a scheduler slice (4-8 ms per call, against 0.1-2 ms of work). With a
# short timeout its threads sleep at once; numpy's own dense times did not
# change (notebook 08). OpenBLAS reads the setting once, when numpy loads, so
# both command lines restart themselves with it, unless you set it yourself.
QUIET_POOLS = {"OPENBLAS_THREAD_TIMEOUT": "4"}


def quiet_pools_missing(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The `QUIET_POOLS` settings not already in `environ` (a user's own value is kept).

    >>> quiet_pools_missing({"OPENBLAS_THREAD_TIMEOUT": "7"})
    {}
    >>> quiet_pools_missing({})
    {'OPENBLAS_THREAD_TIMEOUT': '4'}
    """
    environ = os.environ if environ is None else environ
    return {k: v for k, v in QUIET_POOLS.items() if k not in environ}


if __name__ == "__main__":  # the old entry point: say where the drivers went instead of doing nothing
    import sys

    sys.exit(f"python -m chapter11.bench is the timing harness only; run the benchmarks with "
             f"python -m chapter11 bench {' '.join(sys.argv[1:]) or 'NAME'}   (python -m chapter11 bench --help lists them)")
