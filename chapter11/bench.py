"""Benchmarks that check first, then time: medians of repeats, ratios from one run.

Covers the timing harness every method module builds on: `machine_info`
(what the numbers were measured on), `time_callable` (median of repeated
calls), `compare` (several candidates timed interleaved in one process, so a
noisy neighbour slows them all alike, with ratios to a reference), and one
benchmark of the core itself, `bench_masks` (a training step with
`chapter11.masks` against `torch.nn.utils.prune`).

The command line lives in `chapter11.__main__` (it imports the method
modules, which import this harness):

    python -m chapter11 bench masks       [--json PATH] [--steps N]
    python -m chapter11 bench sparse      [--json PATH] [--quick]   (chapter11.csr)
    python -m chapter11 bench structured  [--json PATH]             (chapter11.structured)
    python -m chapter11 bench semi        [--json PATH]             (chapter11.nm, CUDA only)

`python -m chapter11.bench NAME ...` still works: `main` hands over to it.

But: wall-clock timing only (no hardware counters), and one process: the
numbers describe this machine at this moment, which is why only ratios
measured side by side are ever reported as speedups. This module imports no
method module at load time (`csr`, `export` and `structured.channels` import
it), so it has no command-line dispatch of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .report import atomic_write_text

__all__ = ["machine_info", "describe_machine", "time_callable", "compare", "recorded_runs", "bench_masks", "masks_main", "main",
           "QUIET_POOLS", "quiet_pools_missing", "BENCHMARKS"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> dict[str, str | int]:
    """CPU model, cores, torch threads, library versions and the GPU, if any."""
    import numpy

    info: dict[str, str | int] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    for name in ("scipy", "onnxruntime", "numba", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = "not installed"
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    # thread-pool settings change timings (see QUIET_POOLS), so they are part of the record
    env = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT", "OMP_NUM_THREADS") if k in os.environ]
    info["thread_env"] = " ".join(env) or "defaults"
    return info


def describe_machine() -> str:
    """One line for a benchmark header."""
    i = machine_info()
    return f"{i['cpu']}, {i['cores']} cores ({i['torch_threads']} torch threads), torch {i['torch']}, GPU: {i['gpu']}"


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


def _mlp(sizes: tuple[int, ...]) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def bench_masks(steps: int = 20, sparsity: float = 0.9, batch: int = 64, sizes=(1024, 4096, 4096, 10), seed: int = 0) -> dict:
    """Training-step time: dense vs chapter11 masks vs torch.nn.utils.prune, same masks.

    Each variant is a copy of one model with the same random masks; steps are
    interleaved. Before timing, one step of each masked variant is checked to
    leave exactly the same weights.
    """
    import copy

    import torch.nn.utils.prune as prune

    from .masks import MaskedOptimizer, apply_masks, prunable_parameters
    from .sparsity import check_sparsity

    check_sparsity(sparsity)
    torch.manual_seed(seed)
    dense = _mlp(tuple(sizes))
    g = torch.Generator().manual_seed(seed)
    masks = {n: (torch.rand(p.shape, generator=g) >= sparsity).float() for n, p in prunable_parameters(dense).items()}
    ours, theirs = copy.deepcopy(dense), copy.deepcopy(dense)
    apply_masks(ours, masks)
    for name, mask in masks.items():
        prune.custom_from_mask(theirs.get_submodule(name.rsplit(".", 1)[0]), "weight", mask)
    X = torch.randn(batch, sizes[0], generator=g)
    y = torch.randint(0, sizes[-1], (batch,), generator=g)

    def make_step(model, wrap):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        opt = MaskedOptimizer(opt, model) if wrap else opt

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X), y).backward()
            opt.step()

        return step

    variants = {"dense": make_step(dense, False), "chapter11": make_step(ours, True), "torch_prune": make_step(theirs, False)}
    variants["chapter11"]()
    variants["torch_prune"]()
    for name in masks:
        a = ours.get_submodule(name.rsplit(".", 1)[0]).weight
        module = theirs.get_submodule(name.rsplit(".", 1)[0])
        b = module.weight_orig * module.weight_mask  # .weight is only refreshed by the next forward
        if not torch.allclose(a, b, atol=1e-6):
            raise AssertionError(f"chapter11 and torch.nn.utils.prune disagree on {name} after one step")
        if (a[masks[name] == 0] != 0).any():
            raise AssertionError(f"{name}: a pruned weight came back to life")
    result = compare(variants, repeats=steps, warmup=2, reference="dense")
    med = result["median_s"]
    return {
        "dense_s": med["dense"],
        "chapter11_s": med["chapter11"],
        "torch_prune_s": med["torch_prune"],
        "chapter11_ratio": med["chapter11"] / med["dense"],
        "torch_prune_ratio": med["torch_prune"] / med["dense"],
        "steps": steps,
        "sparsity": sparsity,
        "batch": batch,
        "sizes": list(sizes),
        "machine": machine_info(),
    }


def masks_main(argv: list[str] | None = None) -> int:
    """`python -m chapter11 bench masks`: a training step, dense vs chapter11 masks vs torch.nn.utils.prune."""
    parser = argparse.ArgumentParser(prog="python -m chapter11 bench masks", description="Training step: dense vs masked (chapter11) vs torch.nn.utils.prune.")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (median reported)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--sizes", default="1024,4096,4096,10", help="layer widths of the MLP, comma-separated (default 1024,4096,4096,10)")
    parser.add_argument("--json", metavar="PATH", help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    try:
        sizes = tuple(int(v) for v in args.sizes.split(","))
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if len(sizes) < 2 or min(sizes) < 1:
        parser.error(f"--sizes needs at least two positive widths, got {args.sizes!r}")
    print(f"machine: {describe_machine()}", flush=True)
    r = bench_masks(steps=args.steps, sparsity=args.sparsity, sizes=sizes)
    print(f"MLP {'-'.join(map(str, r['sizes']))}, batch {r['batch']}, sparsity {r['sparsity']:.0%}, median of {r['steps']} interleaved steps")
    print(f"  dense              {r['dense_s'] * 1e3:8.1f} ms/step")
    print(f"  chapter11 masks    {r['chapter11_s'] * 1e3:8.1f} ms/step  ({r['chapter11_ratio']:.2f}x dense)")
    print(f"  torch.nn.utils.prune {r['torch_prune_s'] * 1e3:6.1f} ms/step  ({r['torch_prune_ratio']:.2f}x dense)")
    if args.json:
        atomic_write_text(json.dumps({k: r[k] for k in ("dense_s", "chapter11_s", "torch_prune_s", "chapter11_ratio", "torch_prune_ratio")} | {"machine": r["machine"]}, indent=2), args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m chapter11.bench NAME ...`, kept for old commands: the same as `python -m chapter11 bench NAME ...`."""
    from .__main__ import bench_main  # imported here: the dispatch imports the method modules, which import this one

    return bench_main(list(sys.argv[1:] if argv is None else argv))


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


if __name__ == "__main__":
    missing = quiet_pools_missing()
    if missing:
        os.execve(sys.executable, [sys.executable, "-m", "chapter11.bench", *sys.argv[1:]], {**os.environ, **missing})
    sys.exit(main())
