"""Experiment 6, the drivers: static, SET, RigL and gradual magnitude pruning trained for the same number of steps.

Covers: `train_sparse`, which trains one model by one of `TRAIN_METHODS`
(dense, static, SET, RigL, gradual magnitude) around `chapter11.train.train`
and logs the density of every layer at every step (`SparseRun`); and
`compare_methods`, which trains every method at every sparsity for
every seed from the same initial weights and the same batches in the same
order, checks that each run followed `chapter11.dynamic.density_schedule`
and ended at its layer sparsities, and reports test accuracy and training
FLOPs against dense. The methods themselves are `chapter11.dynamic`.

And `budget_run` (`python -m chapter11.experiments.exp06_dynamic`,
`benchmarks/full/06_budget_sweep.json`): every method at 1x, 3x and 5x the
steps over 8 seeds, with `budget_differences` for the paired intervals.

But: accuracy at the end of a fixed number of steps, not at a plateau; the
budget is the same for every method, and the budget sweep says what more
steps change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import driver_arguments, run_units
from ..data import loaders, mnist1d
from ..dynamic import (METHODS, TRAIN_METHODS, DynamicSparsity, GradualMagnitude, _schedule_steps, dense_macs, density_schedule,
                       layer_sparsities, random_masks, training_flops)
from ..masks import masks_of, prunable_parameters
from ..models import LeNet300100, SmallCNN
from ..report import save_full_run
from ..sparsity import check_sparsity
from ..stats import difference
from ..train import History, evaluate, seed_everything


@dataclass
class SparseRun:
    """What `train_sparse` returns.

    `updater` is the `DynamicSparsity` (SET, RigL) or `GradualMagnitude`
    callback, None for dense and static; `densities[t, j]` is the density of
    layer `names[j]` during step t + 1, and `dense_gradient[t]` says whether
    RigL took a dense gradient on that step: together they give the training
    FLOPs (`self.training_flops(macs)`).
    """

    history: History
    updater: object | None
    names: list[str]
    densities: torch.Tensor  # (steps, layers)
    dense_gradient: torch.Tensor  # (steps,) bool

    def training_flops(self, macs: Mapping[str, int]) -> float:
        return training_flops({n: macs[n] for n in self.names}, self.densities, self.dense_gradient)


def train_sparse(
    model: nn.Module,
    loader: Iterable,
    method: str = "rigl",
    sparsity: float = 0.9,
    distribution: str = "erk",
    epochs: int = 1,
    lr: float = 1e-3,
    update_every: int = 100,
    alpha: float = 0.3,
    end_fraction: float = 0.75,
    prune_start: float = 0.1,
    eval_loader: Iterable | None = None,
    eval_every: int | None = None,
    exclude: Iterable[str] = (),
    seed: int = 0,
    snapshot: Iterable[str] = (),
    progress_bar: bool | None = None,
) -> SparseRun:
    """Train `model` for `epochs` with Adam(lr) by one of `TRAIN_METHODS`, and log what each step cost.

    - "dense": no masks (the reference).
    - "static": a random mask (per-layer sparsity from `distribution`), never moved.
    - "set" / "rigl": the same random start, updated every `update_every`
      steps until `end_fraction` of training (`DynamicSparsity`).
    - "gradual": dense start, pruned by magnitude along the cubic schedule
      from `prune_start` to `end_fraction` of training (`GradualMagnitude`),
      every `update_every` steps, to the same per-layer targets.

    All methods take the same number of optimizer steps (equal training
    budgets in steps; `SparseRun.training_flops` says what each step cost).
    """
    from ..train import train

    if method not in TRAIN_METHODS:
        raise ValueError(f"method must be one of {TRAIN_METHODS}, got {method!r}")
    check_sparsity(sparsity, "sparsity")
    names = list(prunable_parameters(model, exclude=exclude))
    total_steps = epochs * len(loader)
    start_step, end_step = _schedule_steps(total_steps, end_fraction, prune_start, method)
    updater = None
    if method in ("static",) + METHODS:
        random_masks(model, sparsity, distribution, exclude=exclude, seed=seed)
    if method in METHODS:
        updater = DynamicSparsity(model, method, update_every, alpha, end_step, seed=seed, snapshot=snapshot)
    elif method == "gradual":
        updater = GradualMagnitude(model, sparsity, distribution, start_step, end_step, update_every, exclude=exclude)

    def current() -> list[float]:
        masks = masks_of(model)
        return [float(masks[n].sum()) / masks[n].numel() if n in masks else 1.0 for n in names]

    rows, flags, now = [], [], current()

    def callback(step, model_, optimizer, x, y):
        nonlocal now
        rows.append(now)  # the masks this step's forward and backward used
        took_dense = False
        if updater is not None:
            before = len(updater.history)
            updater(step, model_, optimizer, x, y)
            if len(updater.history) > before:
                took_dense = bool(updater.history[-1].get("dense_gradient", False))
                now = current()
        flags.append(took_dense)

    history = train(model, loader, epochs=epochs, lr=lr, eval_loader=eval_loader, eval_every=eval_every,
                    callback=callback, progress_bar=progress_bar, desc=method)
    densities = torch.tensor(rows, dtype=torch.float64).reshape(-1, len(names))  # (steps, layers)
    return SparseRun(history, updater, names, densities, torch.tensor(flags, dtype=torch.bool))


def compare_methods(
    make_model: Callable[[], nn.Module],
    split,
    methods: Sequence[str],
    sparsities: Sequence[float],
    seeds: Sequence[int],
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    distribution: str = "erk",
    device=None,
    snapshot: Iterable[str] = (),
    keep_runs: bool = False,
    **schedule,
):
    """Train every method at every sparsity for every seed, all for the same number of steps.

    For each seed and configuration the batches come from a fresh
    `chapter11.data.loaders(split, batch_size, seed)` and the model from
    `make_model()` right after `seed_everything(seed)`, so every method sees
    the same weights at the start and the same batches in the same order.
    "dense" in `methods` trains once per seed. `schedule` holds
    `train_sparse`'s update_every, alpha, end_fraction and prune_start.
    Every run is checked: its logged densities equal `density_schedule` and
    its layers end at their `distribution` sparsities (RuntimeError if not).

    Returns `(table, runs)`: table maps "dense" or f"{sparsity}/{method}" to
    {"accuracy": [test accuracy per seed], "training_flops": fraction of dense
    training}; runs maps (key, seed) to the `SparseRun` when `keep_runs`.
    `snapshot` names layers whose masks SET/RigL copy at every update.
    """
    unknown = [m for m in methods if m not in TRAIN_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty list from {TRAIN_METHODS}, got {list(methods)!r}")
    for sp in sparsities:
        check_sparsity(sp, "sparsities")
    if not seeds:
        raise ValueError("seeds is empty: need at least one seed")
    table: dict[str, dict] = {}
    runs: dict[tuple[str, int], SparseRun] = {}
    for seed in seeds:
        configs = [("dense", 0.0)] if "dense" in methods else []
        configs += [(m, sp) for sp in sparsities for m in methods if m != "dense"]
        for method, sp in configs:
            train_loader, test_loader = loaders(split, batch_size=batch_size, seed=seed)  # the same batches for every method
            seed_everything(seed)
            model = make_model()
            if device is not None:
                model = model.to(device)
            run = train_sparse(model, train_loader, method, sp, distribution, epochs=epochs, lr=lr, seed=seed,
                               snapshot=snapshot if method in METHODS else (), progress_bar=False, **schedule)
            key = "dense" if method == "dense" else f"{sp}/{method}"
            shapes = {n: tuple(p.shape) for n, p in prunable_parameters(model).items()}
            densities, dense_grad = density_schedule(shapes, method, sp, run.densities.shape[0], distribution,
                                                     **{k: schedule[k] for k in schedule if k != "snapshot"})
            if not (torch.equal(run.densities.cpu(), densities) and torch.equal(run.dense_gradient.cpu(), dense_grad)):
                raise RuntimeError(f"{key}, seed {seed}: the logged layer densities differ from density_schedule")
            if method != "dense":
                targets = layer_sparsities(shapes, sp, distribution)
                for name, mask in masks_of(model).items():
                    # a layer holds whole weights: within one weight of its target (a 160-weight conv1 cannot come closer than 1e-3)
                    if abs(1 - float(mask.sum()) / mask.numel() - targets[name]) > max(1e-3, 1 / mask.numel()):
                        raise RuntimeError(f"{key}, seed {seed}: {name} ended away from its {distribution} sparsity")
            macs = dense_macs(model, next(iter(test_loader))[0][:1].to(next(model.parameters()).device))
            entry = table.setdefault(key, {"accuracy": [], "training_flops": run.training_flops(macs)})
            entry["accuracy"].append(evaluate(model, test_loader)["accuracy"])
            if keep_runs:
                runs[key, seed] = run
    return table, runs


# ---------------------------------------------------------------------------
# The budget as the variable: 1x, 3x and 5x the steps, 8 seeds (recorded)
# ---------------------------------------------------------------------------

BUDGET_RUN_NAME = "06_budget_sweep"
BUDGET_SEEDS = 8
# Notebook 06's model, data and schedule settings (its first code cell; the test compares them).
BUDGET_SETTINGS = {
    "batch": 64, "lr": 2e-3, "distribution": "erk", "data": "mnist1d(num_samples=5000, seed=42)",
    "update_every": 20, "alpha": 0.3, "end_fraction": 0.75, "prune_start": 0.1,
    "mlp_epochs": [10, 30, 50], "mlp_sparsities": [0.9, 0.95], "mlp_methods": ["dense", "static", "set", "rigl", "gradual"],
    "cnn_epochs": [18], "cnn_sparsities": [0.95, 0.98], "cnn_methods": ["dense", "static", "set", "rigl"],
}
_SCHEDULE_KEYS = ("update_every", "alpha", "end_fraction", "prune_start")


def _budget_units(seeds: Sequence[int]) -> list[tuple[str, int, int]]:
    """(model, epochs, seed) in the order they run: seed by seed, so that workers share the long runs."""
    s = BUDGET_SETTINGS
    return [(arch, e, seed) for seed in seeds for arch in ("MLP", "CNN") for e in s[f"{arch.lower()}_epochs"]]


def budget_run(seeds=range(BUDGET_SEEDS), worker: int = 0, workers: int = 1, log=None, save: bool = True) -> dict | None:
    """Is RigL's gap to dense a matter of budget? Record benchmarks/full/06_budget_sweep.json.

    Notebook 06 trains every method for 10 epochs, where the dense MLP is not
    at its plateau. Here the budget is the variable: the MLP at 90% and 95%
    with 10, 30 and 50 epochs (1x, 3x, 5x) for dense and every method, and the
    CNN at 95% and 98% with 18 epochs (3x its recorded 6), where SET and RigL
    might separate. Each (model, epochs, seed) is one `compare_methods` call
    (same initial weights and batches for every method of a seed), logged to
    JSON lines so a killed run resumes; with `workers` > 1 this process runs
    every `workers`-th unit from `worker`, into its own log, and records
    nothing (`run_units`). Results have
    the layout of the 06_dynamic_sparsity record: {model: {epochs: {"dense" or
    "<sparsity>/<method>": {"accuracy": [per seed], "training_flops"}}}}.
    """
    started = time.time()
    torch.set_num_threads(1)
    s, seeds = BUDGET_SETTINGS, list(seeds)
    split = mnist1d()
    models = {"MLP": LeNet300100, "CNN": lambda: SmallCNN(dims=1)}
    schedule = {k: s[k] for k in _SCHEDULE_KEYS}

    def run_unit(unit):
        arch, epochs, seed = unit
        table, _ = compare_methods(models[arch], split, s[f"{arch.lower()}_methods"], s[f"{arch.lower()}_sparsities"], [seed], epochs,
                                   s["batch"], s["lr"], s["distribution"], **schedule)
        return {"arch": arch, "epochs": epochs, "seed": seed, "table": table}

    def describe(row):
        return (f"{row['arch']} {row['epochs']} epochs, seed {row['seed']}: {row['seconds']:.0f} s, "
                + ", ".join(f"{k} {v['accuracy'][0]:.3f}" for k, v in row["table"].items()))

    done = run_units(_budget_units(seeds), run_unit, lambda row: (row["arch"], row["epochs"], row["seed"]),
                     log if log is not None else Path("build") / f"{BUDGET_RUN_NAME}.jsonl", worker, workers, describe)
    if done is None:
        return None
    results: dict = {"seconds_per_unit": {}}
    for arch, epochs, seed in _budget_units(seeds):
        row = done[arch, epochs, seed]
        by_key = results.setdefault(arch, {}).setdefault(str(epochs), {})
        for key, entry in row["table"].items():
            by_key.setdefault(key, {"accuracy": [], "training_flops": entry["training_flops"]})["accuracy"].extend(entry["accuracy"])
        results["seconds_per_unit"][f"{arch} {epochs} {seed}"] = row["seconds"]
    if save:
        save_full_run(BUDGET_RUN_NAME, results, {**s, "seeds": seeds}, command="python -m chapter11.experiments.exp06_dynamic",
                      seconds=time.time() - started)
    return results


def budget_differences(record: dict, pairs=(("rigl", "dense"), ("set", "dense"), ("rigl", "static"), ("rigl", "set"))) -> dict:
    """{(model, epochs, sparsity): {"a - b": paired Summary over seeds}} for each pair of the recorded budget sweep."""
    out = {}
    for arch in ("MLP", "CNN"):
        for epochs, table in record["results"][arch].items():
            for sp in sorted({float(k.split("/")[0]) for k in table if k != "dense"}):
                key = lambda m: "dense" if m == "dense" else f"{sp}/{m}"
                out[arch, int(epochs), sp] = {f"{a} - {b}": difference(table[key(a)]["accuracy"], table[key(b)]["accuracy"])
                                              for a, b in pairs if key(a) in table and key(b) in table}
    return out


def main(argv=None) -> int:
    """python -m chapter11.experiments.exp06_dynamic [--seeds N] [--worker I/N]: the recorded budget sweep."""
    args = driver_arguments("Notebook 06's methods at 1x, 3x and 5x the steps, recorded over 8 seeds.", BUDGET_SEEDS, argv, workers=True)
    budget_run(args.seeds, worker=args.worker, workers=args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
