"""Experiment 7, the recorded run: channel pruning against training from scratch at equal budgets.

Notebook 07 fine-tunes every pruned CNN for 2 epochs, while its scratch
control trains to its own early-stopping plateau, so "scratch wins" there
may be a budget effect. `equal_budget_run` removes the confound over 8
seeds, with the notebook's data, dense training, criteria, amounts and
batch-norm recalibration:

- pruned models fine-tuned with early stopping on validation, for at most
  E epochs, where E is the number of epochs the dense model trained
  (`"ft-es"`), beside the notebook's 2 epochs (`"ft2"`);
- Liu et al.'s two scratch controls (Rethinking the Value of Network
  Pruning, 2019): Scratch-E trains the pruned shape for E epochs, Scratch-B
  for as many epochs as cost the dense model's training FLOPs, E times the
  dense-to-pruned MAC ratio (both restore their best validation epoch);
- distillation against fine-tuning from the same recalibrated L1-pruned
  start, both 2 epochs, at 50% and 75%.

    python -m chapter11.experiments.exp07_channels              # 8 seeds, about 20 min of runs on one core
    python -m chapter11.experiments.exp07_channels --worker 0/2  # one of two processes sharing the log

`equal_budget_table` and `criterion_differences` summarise the record; the
notebook loads it (`load_equal_budget`) and asserts on it.

But: MNIST-1D and one small CNN; Scratch-B at 75% trains for about 15 times
the dense epochs, so it is the largest budget here, not a matched one for
the fine-tuned models (their whole pipeline costs E dense epochs plus at
most E epochs of the pruned model).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from . import driver_arguments, run_units
from ..data import loaders, mnist1d, validation_loader, with_validation
from ..distill import distill
from ..models import SmallCNN
from ..report import load_full_run, save_full_run
from ..stats import difference, summarize
from ..structured.channels import CRITERIA, channel_scores, count_macs, plan_by_scores, recalibrate_batchnorm, remove_channels
from ..train import evaluate, fit, seed_everything, train

RUN_NAME = "07_equal_budget"
SEEDS = 8
# Notebook 07's settings at committed size (its first code cell); the test compares them.
SETTINGS = {
    "amounts": [0.25, 0.5, 0.75],
    "criteria": list(CRITERIA),
    "batch": 256,
    "max_epochs": 20,
    "patience": 4,
    "dense_lr": 3e-3,
    "finetune_lr": 1e-3,
    "short_epochs": 2,
    "recal_batches": 10,
    "val_fraction": 0.2,
    "distill": {"criterion": "l1", "amounts": [0.5, 0.75], "temperature": 2.0, "alpha": 0.5},
}


def _split():
    return with_validation(mnist1d(), SETTINGS["val_fraction"], seed=0)


def run_seed(seed: int, split=None) -> dict:
    """Every model of one seed: {"val": {key: acc}, "test": {key: acc}, "epochs": {key: n}, "dense_epochs", "macs"}.

    Keys: "dense"; "ft2 <criterion> <amount>" and "ft-es <criterion> <amount>"
    (2 epochs, and early stopping for at most the dense epochs); "scratch-e
    <amount>", "scratch-b <amount>"; "distill2 l1 <amount>". The dense model,
    the scores and the batches are the notebook's: `seed_everything(seed)`
    before dense training, `seed + 100` before every recovery.
    """
    s = SETTINGS
    split = split if split is not None else _split()
    val_loader = validation_loader(split)
    seed_everything(seed)
    train_loader, test_loader = loaders(split, batch_size=s["batch"], seed=seed)
    dense = SmallCNN(dims=1)
    dense_fit = fit(dense, train_loader, val_loader, max_epochs=s["max_epochs"], patience=s["patience"], lr=s["dense_lr"], progress_bar=False)
    budget = dense_fit.epochs_run  # E: what the dense model trained for
    x1 = split.X_val[:1]
    dense_macs = count_macs(dense, x1)
    out = {"val": {}, "test": {}, "epochs": {}, "dense_epochs": budget, "macs": {"dense": dense_macs}}

    def score(key, model, epochs=None):
        out["val"][key] = evaluate(model, val_loader)["accuracy"]
        out["test"][key] = evaluate(model, test_loader)["accuracy"]
        if epochs is not None:
            out["epochs"][key] = epochs

    score("dense", dense, budget)
    widths, scores = {}, {}
    for crit in s["criteria"]:
        scores[crit] = channel_scores(dense, crit, batches=train_loader, max_batches=10, seed=seed)
        for amount in s["amounts"]:
            small = remove_channels(dense, plan_by_scores(scores[crit], amount))
            recalibrate_batchnorm(small, train_loader, max_batches=s["recal_batches"])
            widths[amount] = (small.conv1.out_channels, small.conv2.out_channels, small.conv3.out_channels)
            short, long = copy.deepcopy(small), small
            seed_everything(seed + 100)
            train(short, train_loader, epochs=s["short_epochs"], lr=s["finetune_lr"], progress_bar=False)
            score(f"ft2 {crit} {amount}", short, s["short_epochs"])
            seed_everything(seed + 100)
            result = fit(long, train_loader, val_loader, max_epochs=budget, patience=s["patience"], lr=s["finetune_lr"], progress_bar=False)
            score(f"ft-es {crit} {amount}", long, result.epochs_run)
    d = s["distill"]
    for amount in d["amounts"]:
        student = remove_channels(dense, plan_by_scores(scores[d["criterion"]], amount))
        recalibrate_batchnorm(student, train_loader, max_batches=s["recal_batches"])
        seed_everything(seed + 100)
        distill(student, dense, train_loader, epochs=s["short_epochs"], lr=s["finetune_lr"], temperature=d["temperature"], alpha=d["alpha"],
                progress_bar=False)
        score(f"distill2 {d['criterion']} {amount}", student, s["short_epochs"])
    for amount in s["amounts"]:
        seed_everything(seed)
        probe = SmallCNN(dims=1, channels=widths[amount])
        macs = count_macs(probe, x1)
        out["macs"][str(amount)] = macs
        for control, epochs in (("scratch-e", budget), ("scratch-b", round(budget * dense_macs / macs))):
            seed_everything(seed)
            scratch = SmallCNN(dims=1, channels=widths[amount])
            fit(scratch, train_loader, val_loader, max_epochs=epochs, patience=epochs, lr=s["dense_lr"], progress_bar=False)
            score(f"{control} {amount}", scratch, epochs)
    return out


def equal_budget_run(seeds=range(SEEDS), worker: int = 0, workers: int = 1, log: str | Path | None = None, save: bool = True) -> dict | None:
    """Run `run_seed` for every seed (resumable JSON-lines log) and record benchmarks/full/07_equal_budget.json.

    With `workers` > 1 this process runs only the seeds with index % workers
    == worker, into its own log, and records nothing; a last call with
    workers=1 finds them all in the logs and records (`run_units`). Returns {"seeds", "dense_epochs", "macs", "val",
    "test", "epochs"} with one value per seed for every key.
    """
    started = time.time()
    torch.set_num_threads(1)
    seeds = list(seeds)
    split = _split()

    def describe(row):
        return f"seed {row['seed']}: {row['seconds']:.0f} s, dense {row['test']['dense']:.3f}, " + ", ".join(
            f"{a}: ft-es best {max(row['test'][f'ft-es {c} {a}'] for c in SETTINGS['criteria']):.3f} scratch-e {row['test'][f'scratch-e {a}']:.3f} "
            f"scratch-b {row['test'][f'scratch-b {a}']:.3f}" for a in SETTINGS["amounts"])

    done = run_units(seeds, lambda seed: {"seed": seed, **run_seed(seed, split)}, lambda row: row["seed"],
                     log if log is not None else Path("build") / f"{RUN_NAME}.jsonl", worker, workers, describe)
    if done is None:
        return None
    rows = [done[seed] for seed in seeds]
    results = {"seeds": seeds, "dense_epochs": [r["dense_epochs"] for r in rows], "seconds_per_seed": [r["seconds"] for r in rows],
               "macs": rows[0]["macs"]}
    for part in ("val", "test", "epochs"):
        results[part] = {key: [r[part][key] for r in rows] for key in rows[0][part]}
    if save:
        save_full_run(RUN_NAME, results, {**SETTINGS, "seeds": seeds}, command="python -m chapter11.experiments.exp07_channels",
                      seconds=time.time() - started)
    return results


def load_equal_budget() -> dict:
    """The recorded run (FileNotFoundError says how to record it)."""
    return load_full_run(RUN_NAME)


def equal_budget_table(record: dict, metric: str = "test") -> dict[float, dict]:
    """Per amount: the criterion best on validation after early-stopped fine-tuning, and paired differences.

    Returns {amount: {"best": criterion, "ft2", "ft-es", "scratch-e",
    "scratch-b": Summary of `metric` for the best criterion / the controls,
    "es - ft2", "es - scratch-e", "es - scratch-b": paired Summaries,
    "epochs": Summary of the early-stopped epochs, "scratch-b epochs": Summary}}.
    The criterion is chosen on validation, whatever `metric` says.
    """
    r, s = record["results"], record["settings"]
    table = {}
    for amount in s["amounts"]:
        best = max(s["criteria"], key=lambda c: summarize(r["val"][f"ft-es {c} {amount}"]).mean)
        get = lambda key: r[metric][key]
        es, short = get(f"ft-es {best} {amount}"), get(f"ft2 {best} {amount}")
        e, b = get(f"scratch-e {amount}"), get(f"scratch-b {amount}")
        table[amount] = {"best": best, "ft2": summarize(short), "ft-es": summarize(es), "scratch-e": summarize(e), "scratch-b": summarize(b),
                         "es - ft2": difference(es, short), "es - scratch-e": difference(es, e), "es - scratch-b": difference(es, b),
                         "epochs": summarize(r["epochs"][f"ft-es {best} {amount}"]),
                         "scratch-b epochs": summarize(r["epochs"][f"scratch-b {amount}"])}
    return table


def criterion_differences(record: dict, amount: float, reference: str = "random", stage: str = "ft-es", metric: str = "val") -> dict:
    """{criterion: paired Summary of criterion - `reference`} at `amount`, after `stage` ("ft2" or "ft-es")."""
    r, s = record["results"], record["settings"]
    if amount not in s["amounts"]:
        raise ValueError(f"amount must be one of {s['amounts']}, got {amount!r}")
    if stage not in ("ft2", "ft-es"):
        raise ValueError(f"stage must be 'ft2' or 'ft-es', got {stage!r}")
    ref = r[metric][f"{stage} {reference} {amount}"]
    return {c: difference(r[metric][f"{stage} {c} {amount}"], ref) for c in s["criteria"] if c != reference}


def main(argv=None) -> int:
    args = driver_arguments(__doc__, SEEDS, argv, workers=True)
    equal_budget_run(args.seeds, worker=args.worker, workers=args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
