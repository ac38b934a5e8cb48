"""Experiment 1, recorded: one-shot, iterative and cubic magnitude pruning against a random mask at 95% and 98%, over 12 seeds.

Covers: notebook 01's equal-budget comparison at committed size (LeNet-300-100
on MNIST-1D with 10,000 signals, dense training until the validation accuracy
stops improving, then 400 fine-tuning steps for every method, 10 stages for
the gradual schedules) at the two extreme targets, where three live seeds
cannot separate the schedules. Each seed trains its own dense model exactly
as the notebook does (batch order `seed`, fine-tuning batches `100 + seed`).

    python -m chapter11.experiments.exp01_schedules       # about 5 min on 2 cores

But: only 95% and 98%; the other targets' orderings are wide enough for the
notebook's three live seeds.
"""

from __future__ import annotations

import time

import torch

from . import seeds_from_command_line
from ..data import loaders, mnist1d, validation_loader, with_validation
from ..models import LeNet300100
from ..report import load_full_run, save_full_run
from ..schedules import equal_budget_sweep
from ..train import evaluate, fit, seed_everything

RUN_NAME = "01_extreme_sparsity_seeds"
SEEDS = list(range(12))
TARGETS = [0.95, 0.98]
# The notebook's committed-size settings (its setup cell).
SETTINGS = {"num_samples": 10_000, "ft_steps": 400, "stages": 10, "max_epochs": 100, "patience": 5, "lr": 2e-3, "batch": 128,
            "data": "with_validation(mnist1d(num_samples=10000, seed=42), fraction=0.2, seed=0)", "model": "LeNet300100(in_features=40)"}


def one_seed(seed: int, split, targets=TARGETS, settings: dict = SETTINGS) -> list[dict]:
    """Notebook 01's dense training and equal-budget sweep for one seed; rows without models."""
    val_loader = validation_loader(split)
    _, test_loader = loaders(split, batch_size=settings["batch"])
    seed_everything(seed)
    model = LeNet300100(in_features=split.X_train.shape[1])
    train_loader, _ = loaders(split, batch_size=settings["batch"], seed=seed)
    fit(model, train_loader, val_loader, max_epochs=settings["max_epochs"], patience=settings["patience"], lr=settings["lr"], progress_bar=False)
    metrics = {"val": lambda m: evaluate(m, val_loader)["accuracy"], "test": lambda m: evaluate(m, test_loader)["accuracy"]}
    train_loader, _ = loaders(split, batch_size=settings["batch"], seed=100 + seed)
    rows = equal_budget_sweep(model, targets, train_loader, settings["ft_steps"], metrics, stages=settings["stages"], lr=settings["lr"], seed=seed)
    return [{"method": r["method"], "target": r["target"], "sparsity": r["sparsity"], "test": r["after"]["test"], "val": r["after"]["val"]} for r in rows]


def extreme_run(seeds=SEEDS, targets=TARGETS, save: bool = True) -> dict:
    """Run every seed; {"<method> <target>": [test accuracy per seed]} (dense once, as "dense"), saved when `save`."""
    started = time.time()
    torch.set_num_threads(1)
    split = with_validation(mnist1d(num_samples=SETTINGS["num_samples"], seed=42), fraction=0.2, seed=0)
    table: dict[str, list[float]] = {}
    for seed in seeds:
        for row in one_seed(seed, split, targets):
            key = "dense" if row["method"] == "dense" else f"{row['method']} {row['target']}"
            table.setdefault(key, []).append(row["test"])
    results = {"test_accuracy": table, "seeds": list(seeds), "targets": list(targets)}
    if save:
        save_full_run(RUN_NAME, results, {**SETTINGS, "seeds": list(seeds), "targets": list(targets)},
                      command="python -m chapter11.experiments.exp01_schedules", seconds=time.time() - started)
    return results


def load_extreme() -> dict:
    """The recorded 12-seed run (FileNotFoundError says how to record it)."""
    return load_full_run(RUN_NAME)


def main(argv=None) -> int:
    seeds = seeds_from_command_line(__doc__, len(SEEDS), argv)
    res = extreme_run(seeds=seeds)
    for key, values in res["test_accuracy"].items():
        print(f"{key:16s} {sum(values) / len(values):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
