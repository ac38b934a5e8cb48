"""Experiment 1, the drivers: schedules compared at equal budgets, live and recorded over 12 seeds at 95% and 98%.

Covers: `equal_budget_sweep`, which gives one-shot, iterative and cubic
magnitude pruning, a random mask and the dense model the same number of
optimizer steps at several target sparsities (`sweep_curve` summarises it
over seeds); and the recorded run of notebook 01's equal-budget comparison
at committed size (LeNet-300-100
on MNIST-1D with 10,000 signals, dense training until the validation accuracy
stops improving, then 400 fine-tuning steps for every method, 10 stages for
the gradual schedules) at the two extreme targets, where three live seeds
cannot separate the schedules. Each seed trains its own dense model exactly
as the notebook does (batch order `seed`, fine-tuning batches `100 + seed`).

    python -m chapter11.experiments.exp01_schedules            # about 5 min on 2 cores
    python -m chapter11.experiments.exp01_schedules --budgets  # the budget sweep, 8 seeds, 30-45 min on one core

But: only 95% and 98%; the other targets' orderings are wide enough for the
notebook's three live seeds.

And `budget_run` (`--budgets`, `benchmarks/full/01_budget_sweep.json`)
tests the reason notebook 01 gives for gradual schedules losing at 90-95%:
one-shot, iterative and cubic again at 90/95/98%, with 400, 1,600 and 4,000
fine-tuning steps for every method and for the dense reference.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from . import append_jsonl, driver_arguments, read_jsonl
from ..data import loaders, mnist1d, validation_loader, with_validation
from ..lottery import random_masks
from ..magnitude import global_magnitude_masks, layerwise_magnitude_masks, masks_sparsity
from ..masks import apply_masks, masks_of
from ..models import LeNet300100
from ..report import load_full_run, save_full_run
from ..schedules import _check_budget, cubic_schedule, iterative_schedule, prune_and_finetune
from ..sparsity import check_sparsity
from ..stats import Summary, difference, separated, summarize
from ..train import evaluate, fit, seed_everything, train

RUN_NAME = "01_extreme_sparsity_seeds"
SEEDS = list(range(12))
TARGETS = [0.95, 0.98]
# The notebook's committed-size settings (its setup cell).
SETTINGS = {"num_samples": 10_000, "ft_steps": 400, "stages": 10, "max_epochs": 100, "patience": 5, "lr": 2e-3, "batch": 128,
            "data": "with_validation(mnist1d(num_samples=10000, seed=42), fraction=0.2, seed=0)", "model": "LeNet300100(in_features=40)"}


def _split(settings: dict = SETTINGS):
    """Notebook 01's data: MNIST-1D generated locally, a fifth of the training set held out for validation."""
    return with_validation(mnist1d(num_samples=settings["num_samples"], seed=42), fraction=0.2, seed=0)


def _dense(seed: int, split, settings: dict = SETTINGS):
    """(model, {"val", "test"} accuracy functions): notebook 01's dense model for `seed`, trained to its validation plateau."""
    val_loader = validation_loader(split)
    _, test_loader = loaders(split, batch_size=settings["batch"])
    seed_everything(seed)
    model = LeNet300100(in_features=split.X_train.shape[1])
    train_loader, _ = loaders(split, batch_size=settings["batch"], seed=seed)
    fit(model, train_loader, val_loader, max_epochs=settings["max_epochs"], patience=settings["patience"], lr=settings["lr"], progress_bar=False)
    return model, {"val": lambda m: evaluate(m, val_loader)["accuracy"], "test": lambda m: evaluate(m, test_loader)["accuracy"]}


def one_seed(seed: int, split, targets=TARGETS, settings: dict = SETTINGS) -> list[dict]:
    """Notebook 01's dense training and equal-budget sweep for one seed; rows without models."""
    model, metrics = _dense(seed, split, settings)
    train_loader, _ = loaders(split, batch_size=settings["batch"], seed=100 + seed)
    rows = equal_budget_sweep(model, targets, train_loader, settings["ft_steps"], metrics, stages=settings["stages"], lr=settings["lr"], seed=seed)
    return [{"method": r["method"], "target": r["target"], "sparsity": r["sparsity"], "test": r["after"]["test"], "val": r["after"]["val"]} for r in rows]


def extreme_run(seeds=SEEDS, targets=TARGETS, save: bool = True) -> dict:
    """Run every seed; {"<method> <target>": [test accuracy per seed]} (dense once, as "dense"), saved when `save`."""
    started = time.time()
    torch.set_num_threads(1)
    split = _split()
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


BUDGET_RUN_NAME = "01_budget_sweep"
BUDGETS = [400, 1600, 4000]
BUDGET_TARGETS = [0.9, 0.95, 0.98]
BUDGET_METHODS = ("one-shot", "iterative", "cubic", "dense")
BUDGET_SEEDS = 8


def budget_run(seeds=range(BUDGET_SEEDS), budgets=BUDGETS, targets=BUDGET_TARGETS, log: str | Path | None = None, save: bool = True) -> dict:
    """Is it the budget? One-shot, iterative and cubic at 90/95/98% with 400, 1,600 and 4,000 fine-tuning steps.

    Notebook 01 finds the gradual schedules behind one-shot at 90-95% and
    ahead only at 98% with 400 steps, where ten stages share 40 steps each.
    This run gives every method the same larger budgets, per seed on the
    notebook's dense model (trained exactly as there), with the dense model
    given the same steps as the reference. Returns {"test_accuracy": {"<method>
    <target> <steps>": [per seed]}, "val_accuracy": the same}; dense rows are
    "dense <steps>". Each finished (seed, budget) goes to the JSON-lines
    `log` first, so a killed run resumes where it stopped.
    """
    started = time.time()
    torch.set_num_threads(1)
    seeds, budgets, targets = list(seeds), list(budgets), list(targets)
    log = Path(log) if log is not None else Path("build") / f"{BUDGET_RUN_NAME}.jsonl"
    done = {(r["seed"], r["steps"]): r for r in read_jsonl(log)}
    split = _split()
    for seed in seeds:
        if all((seed, b) in done for b in budgets):
            continue
        model, metrics = _dense(seed, split)
        for steps in budgets:
            if (seed, steps) in done:
                continue
            train_loader, _ = loaders(split, batch_size=SETTINGS["batch"], seed=100 + seed)
            rows = equal_budget_sweep(model, targets, train_loader, steps, metrics, stages=SETTINGS["stages"], lr=SETTINGS["lr"], seed=seed,
                                      methods=BUDGET_METHODS)
            record = {"seed": seed, "steps": steps, "rows": [{k: r[k] for k in ("method", "target", "sparsity", "steps", "after")} for r in rows]}
            append_jsonl(log, record)
            done[seed, steps] = record
            print(f"seed {seed}, {steps} steps: " + ", ".join(f"{r['method']} {r['target']:.2f} {r['after']['test']:.3f}" for r in rows), flush=True)
    results: dict[str, dict[str, list[float]]] = {"test_accuracy": {}, "val_accuracy": {}}
    for seed in seeds:
        for steps in budgets:
            for r in done[seed, steps]["rows"]:
                key = f"dense {steps}" if r["method"] == "dense" else f"{r['method']} {r['target']} {steps}"
                results["test_accuracy"].setdefault(key, []).append(r["after"]["test"])
                results["val_accuracy"].setdefault(key, []).append(r["after"]["val"])
    results.update(seeds=seeds, budgets=budgets, targets=targets)
    if save:
        save_full_run(BUDGET_RUN_NAME, results, {**SETTINGS, "seeds": seeds, "budgets": budgets, "targets": targets, "methods": list(BUDGET_METHODS)},
                      command="python -m chapter11.experiments.exp01_schedules --budgets", seconds=time.time() - started)
    return results


def load_budget_sweep() -> dict:
    """The recorded budget sweep (FileNotFoundError says how to record it)."""
    return load_full_run(BUDGET_RUN_NAME)


def budget_differences(record: Mapping, metric: str = "test_accuracy") -> dict[tuple[str, float, int], Summary]:
    """{(method, target, steps): paired difference to one-shot at the same target and steps} from a budget record.

    >>> rec = {"results": {"budgets": [10], "targets": [0.9], "test_accuracy": {"one-shot 0.9 10": [0.5, 0.6], "iterative 0.9 10": [0.6, 0.8],
    ...        "cubic 0.9 10": [0.5, 0.6]}}}
    >>> round(budget_differences(rec)["iterative", 0.9, 10].mean, 3)
    0.15
    """
    res = record["results"]
    table = res[metric]
    return {(m, t, b): difference(table[f"{m} {t} {b}"], table[f"one-shot {t} {b}"])
            for m in ("iterative", "cubic") for t in res["targets"] for b in res["budgets"]}


def format_budget_table(record: Mapping, metric: str = "test_accuracy") -> str:
    """The budget sweep as text: per target and schedule, its difference to one-shot at each budget, * where the 95% interval excludes 0."""
    res = record["results"]
    diffs = budget_differences(record, metric)
    budgets, table = res["budgets"], res[metric]

    def row(label: str, cells: list[str]) -> str:
        return f"{label:<24}" + "".join(f"{c:>28}" for c in cells)

    lines = [row("", [f"{b:,} steps" for b in budgets])]
    for t in res["targets"]:
        lines.append(row(f"{t:.0%} one-shot", [f"{summarize(table[f'one-shot {t} {b}']):.3f}" for b in budgets]))
        for m in ("iterative", "cubic"):
            cells = []
            for b in budgets:
                d = diffs[m, t, b]
                mark = "*" if separated(table[f"{m} {t} {b}"], table[f"one-shot {t} {b}"]) else " "
                cells.append(f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]{mark}")
            lines.append(row(f"    {m} - one-shot", cells))
    lines.append(row("dense, same steps", [f"{summarize(table[f'dense {b}']):.3f}" for b in budgets]))
    return "\n".join(lines)


def plot_budget_sweep(record: Mapping, metric: str = "test_accuracy", axes=None):
    """One panel per target: iterative and cubic minus one-shot (mean and 95% interval over seeds) against the fine-tuning budget."""
    import matplotlib.pyplot as plt

    res = record["results"]
    diffs = budget_differences(record, metric)
    if axes is None:
        _, axes = plt.subplots(1, len(res["targets"]), figsize=(4 * len(res["targets"]), 3.4), sharey=True)
    for ax, t in zip(axes, res["targets"]):
        for k, m in enumerate(("iterative", "cubic")):
            xs = [b * (1.04 if k else 0.96) for b in res["budgets"]]
            ds = [diffs[m, t, b] for b in res["budgets"]]
            ax.errorbar(xs, [d.mean for d in ds], yerr=[[d.mean - d.low for d in ds], [d.high - d.mean for d in ds]], marker="o", capsize=3, label=f"{m} - one-shot")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(res["budgets"], [f"{b:,}" for b in res["budgets"]])
        ax.minorticks_off()
        ax.set(title=f"{t:.0%} sparsity", xlabel="fine-tuning steps (every method)")
    axes[0].set_ylabel("test accuracy difference")
    axes[0].legend(fontsize=8)
    return axes


def main(argv=None) -> int:
    args = driver_arguments(__doc__, len(SEEDS), argv, {"--budgets": ("the budget sweep (budget_run) instead of the extreme-sparsity seeds", BUDGET_SEEDS)})
    res = budget_run(seeds=args.seeds) if args.budgets else extreme_run(seeds=args.seeds)
    for key, values in res["test_accuracy"].items():
        print(f"{key:20s} {sum(values) / len(values):.4f}")
    return 0


SWEEP_METHODS = ("one-shot", "iterative", "cubic", "random", "dense")


def _measure(model: nn.Module, metrics: Mapping[str, Callable[[nn.Module], float]]) -> dict[str, float]:
    return {name: float(fn(model)) for name, fn in metrics.items()}


def equal_budget_sweep(
    dense: nn.Module,
    targets: Sequence[float],
    train_loader: Iterable,
    total_steps: int,
    metrics: Mapping[str, Callable[[nn.Module], float]],
    stages: int = 10,
    lr: float = 1e-3,
    scope: str = "global",
    seed: int = 0,
    methods: Sequence[str] = SWEEP_METHODS,
    keep_stages: Iterable[float] = (),
    stage_metric: str | None = None,
    keep_models: bool = False,
) -> list[dict]:
    """Compare pruning methods on copies of a trained `dense` model, every one with `total_steps` optimizer steps.

    For each target sparsity s:

    - "one-shot": magnitude-prune to s at once (scope "global" or
      "layerwise"), then fine-tune `total_steps` steps;
    - "iterative": `iterative_schedule(s, stages)`, the same budget shared
      among the stages by `split_budget`;
    - "cubic": `cubic_schedule(s, stages)` (Zhu & Gupta), budget shared the same way;
    - "random": a random mask with the one-shot mask's count in every layer
      (seeded by `seed`), on the trained weights, then the same fine-tune.

    And once, "dense": the unpruned copy trained `total_steps` more steps,
    so a pruned model is never compared with a dense one that trained less.

    Returns one row per run: {"method", "target", "sparsity" (measured over
    the masks), "steps" (optimizer steps taken), "after" (metrics at the
    end)}; one-shot, random and dense rows also hold "pruned" (metrics right
    after pruning, before any training: the accuracy cliff), and "iterative"
    and "cubic" rows for targets in `keep_stages` hold "stages", the per-stage rows of
    `prune_and_finetune` measured with `metrics[stage_metric]` (default: the
    first metric). With `keep_models` every row also holds its trained
    "model". `metrics` maps names to model -> float functions (e.g.
    validation and test accuracy); `dense` itself is not changed.

    >>> torch.manual_seed(0) is not None
    True
    >>> dense = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> loader = [(torch.randn(5, 4), torch.randint(0, 2, (5,)))] * 4
    >>> rows = equal_budget_sweep(dense, [0.5], loader, 4, {"w": lambda m: float(m[0].weight.detach().abs().sum())}, stages=2)
    >>> [(r["method"], r["steps"], round(r["sparsity"], 2)) for r in rows]
    [('one-shot', 4, 0.5), ('iterative', 4, 0.5), ('cubic', 4, 0.5), ('random', 4, 0.5), ('dense', 4, 0.0)]
    """
    if not isinstance(dense, nn.Module):
        raise TypeError(f"dense must be an nn.Module, got {type(dense).__name__}")
    if masks_of(dense):
        raise ValueError("dense must be unpruned: it already holds masks")
    targets = [check_sparsity(t, "targets") for t in targets]
    if not targets:
        raise ValueError("targets must hold at least one sparsity")
    unknown = [m for m in methods if m not in SWEEP_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {SWEEP_METHODS}, got {list(methods)!r}")
    if not isinstance(metrics, Mapping) or not metrics or not all(callable(f) for f in metrics.values()):
        raise TypeError("metrics must map names to callables model -> float, e.g. {'val': ..., 'test': ...}")
    if scope not in ("global", "layerwise"):
        raise ValueError(f"scope must be 'global' or 'layerwise', got {scope!r}")
    _check_budget(total_steps, stages)
    keep_stages = {check_sparsity(t, "keep_stages") for t in keep_stages}
    stage_metric = next(iter(metrics)) if stage_metric is None else stage_metric
    if stage_metric not in metrics:
        raise ValueError(f"stage_metric must be one of {list(metrics)}, got {stage_metric!r}")
    mask_fn = global_magnitude_masks if scope == "global" else layerwise_magnitude_masks
    rows = []
    for s in targets:
        for method in [m for m in methods if m != "dense"]:
            model = copy.deepcopy(dense)
            row = {"method": method, "target": s}
            if method in ("iterative", "cubic"):
                metric_fn = metrics[stage_metric] if s in keep_stages else None
                schedule = iterative_schedule(s, stages) if method == "iterative" else cubic_schedule(s, stages)
                stage_rows = prune_and_finetune(model, schedule, train_loader, total_steps, lr=lr, scope=scope, metric_fn=metric_fn)
                row["steps"] = sum(r["steps"] for r in stage_rows)
                if s in keep_stages:
                    row["stages"] = stage_rows
            else:
                if method == "one-shot":
                    masks = mask_fn(model, s)
                else:
                    masks = random_masks(mask_fn(model, s), seed=seed)
                apply_masks(model, masks)
                row["pruned"] = _measure(model, metrics)
                if total_steps > 0:
                    train(model, train_loader, lr=lr, max_steps=total_steps, progress_bar=False, desc=method)
                row["steps"] = total_steps
            row["sparsity"] = masks_sparsity(masks_of(model))
            row["after"] = _measure(model, metrics)
            if keep_models:
                row["model"] = model
            rows.append(row)
    if "dense" in methods:
        model = copy.deepcopy(dense)
        if total_steps > 0:
            train(model, train_loader, lr=lr, max_steps=total_steps, progress_bar=False, desc="dense")
        row = {"method": "dense", "target": 0.0, "sparsity": 0.0, "steps": total_steps, "pruned": _measure(dense, metrics), "after": _measure(model, metrics)}
        if keep_models:
            row["model"] = model
        rows.append(row)
    return rows


def sweep_curve(sweeps: Sequence[Sequence[Mapping]], method: str, metric: str, when: str = "after") -> tuple[list[float], list[Summary]]:
    """(targets, [Summary over seeds per target]) of one method from several `equal_budget_sweep`s.

    `sweeps[i]` is the sweep of seed i; every sweep must hold the same
    targets for `method`. `when` is "after" (fine-tuned) or "pruned".

    >>> one = [{"method": "random", "target": 0.5, "after": {"acc": 0.6}}]
    >>> two = [{"method": "random", "target": 0.5, "after": {"acc": 0.8}}]
    >>> xs, ys = sweep_curve([one, two], "random", "acc")
    >>> xs, round(ys[0].mean, 2), ys[0].n
    ([0.5], 0.7, 2)
    """
    if when not in ("after", "pruned"):
        raise ValueError(f"when must be 'after' or 'pruned', got {when!r}")
    per_seed = []
    for sweep in sweeps:
        rows = {r["target"]: r for r in sweep if r["method"] == method}
        if not rows:
            raise ValueError(f"method {method!r} is not in the sweep; it holds {sorted({r['method'] for r in sweep})}")
        per_seed.append(rows)
    targets = sorted(per_seed[0])
    if any(sorted(rows) != targets for rows in per_seed):
        raise ValueError(f"every sweep must hold the same targets for {method!r}")
    values = []
    for t in targets:
        column = []
        for rows in per_seed:
            measured = rows[t].get(when)
            if measured is None or metric not in measured:
                raise ValueError(f"{method!r} at {t}: no {when!r} value of metric {metric!r}")
            column.append(measured[metric])
        values.append(summarize(column))
    return targets, values


if __name__ == "__main__":
    raise SystemExit(main())
