"""Experiment 6, the drivers: static, SET, RigL and gradual magnitude pruning trained for the same number of steps.

Covers: `train_sparse`, which trains one model by one of `TRAIN_METHODS`
(dense, static, SET, RigL, gradual magnitude) around `chapter11.train.train`
and logs the density of every layer at every step (`SparseRun`); and
`compare_methods`, which trains every method at every sparsity for
every seed from the same initial weights and the same batches in the same
order, checks that each run followed `chapter11.dynamic.density_schedule`
and ended at its layer sparsities, and reports test accuracy and training
FLOPs against dense. The methods themselves are `chapter11.dynamic`.

But: accuracy at the end of a fixed number of steps, not at a plateau; the
budget is the same for every method, and notebook 06 says what more steps
change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data import loaders
from ..dynamic import (METHODS, TRAIN_METHODS, DynamicSparsity, GradualMagnitude, _schedule_steps, dense_macs, density_schedule,
                       layer_sparsities, random_masks, training_flops)
from ..masks import masks_of, prunable_parameters
from ..sparsity import check_sparsity
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
                    if abs(1 - float(mask.sum()) / mask.numel() - targets[name]) > 1e-3:
                        raise RuntimeError(f"{key}, seed {seed}: {name} ended away from its {distribution} sparsity")
            macs = dense_macs(model, next(iter(test_loader))[0][:1].to(next(model.parameters()).device))
            entry = table.setdefault(key, {"accuracy": [], "training_flops": run.training_flops(macs)})
            entry["accuracy"].append(evaluate(model, test_loader)["accuracy"])
            if keep_runs:
                runs[key, seed] = run
    return table, runs
