"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin, 2019).

The search, for rounds r = 1, ..., R, starting from a network trained once:

1. prune p of the weights that are still alive, by magnitude, so the target
   sparsity after round r is s_r = 1 - (1 - p)^r (`sparsity_schedule`);
2. rewind the survivors, theta <- m_r * theta_k, where theta_k is a snapshot
   taken during the first training run: k = 0 is the initialisation theta_0
   of the original paper, k > 0 is "late rewinding" (Frankle et al., 2019/2020),
   which deeper networks and Transformers need;
3. train the sparse network again with the same data order and optimizer.

The hypothesis is about the *pairing* of mask and initial values, so every
round also trains two controls at the same sparsity:

- `"reinit"`: the ticket's mask with a fresh random initialisation;
- `"random_mask"`: a random mask with the same number of survivors in every
  layer, rewound to the same snapshot theta_k as the ticket.

Each run trains until the validation loss stops improving (`patience`
evaluations without a new minimum, as early stopping in Frankle & Carbin),
restores the weights of that minimum, and scores the test set once, there.
It keeps its validation curves and its early-stopping step. With `path`,
every finished round is written atomically (`records.json` last, after the
weights it refers to), and `find_ticket` continues from the last finished
round when called again: nothing finished is trained twice.
`find_tickets` repeats the search over seeds; `seed_table` and `seed_curve`
turn those searches into mean ± sd per round.

    >>> [round(s, 3) for s in sparsity_schedule(0.2, 3)]
    [0.0, 0.2, 0.36, 0.488]

But: one optimizer (Adam, no learning-rate schedule or warm-up), and the
output layer is pruned at the same rate as the rest unless you `exclude` it
(Frankle & Carbin prune it at half the rate). The controls are trained with
the same settings and the same early stopping as the ticket; nothing here
searches hyperparameters per sparsity.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from .data import Split
from .magnitude import global_magnitude_masks, layerwise_magnitude_masks
from .masks import SUFFIX, MaskedOptimizer, apply_masks, check_mask, load_masked_state_dict, masks_of, restore_on_error
from .report import atomic_torch_save, atomic_write_text
from .sparsity import check_model, check_sparsity
from .stats import Summary, summarize
from .train import evaluate, model_device, progress, seed_everything

__all__ = [
    "LotteryConfig", "LotteryResult", "sparsity_schedule_loop", "sparsity_schedule", "snapshot", "rewind_loop",
    "rewind", "rewind_error", "random_masks_loop", "random_masks", "early_stop_loop", "early_stop", "holdout",
    "batches", "train_run", "search_loaders", "find_ticket", "find_tickets", "seed_curve", "seed_table", "load_lottery", "CONTROLS",
    "RUNS",
]

CONTROLS = ("reinit", "random_mask")
RUNS = ("ticket",) + CONTROLS
SCOPES = ("global", "layerwise")
RECORDS = "records.json"


# ---------------------------------------------------------------------------
# The schedule: p of what remains, every round
# ---------------------------------------------------------------------------


def _check_schedule(prune_fraction, rounds) -> tuple[float, int]:
    prune_fraction = check_sparsity(prune_fraction, "prune_fraction")
    if prune_fraction == 0.0:
        raise ValueError("prune_fraction must be in (0, 1), got 0.0 (nothing would ever be pruned)")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
    return prune_fraction, rounds


def sparsity_schedule_loop(prune_fraction: float, rounds: int) -> list[float]:
    """Target sparsity after rounds 0..R when each round prunes `prune_fraction` of the survivors.

    Density d_r = (1 - p) * d_{r-1}, d_0 = 1, so s_r = 1 - (1 - p)^r; this
    twin multiplies one round at a time.

    >>> [round(s, 4) for s in sparsity_schedule_loop(0.5, 3)]
    [0.0, 0.5, 0.75, 0.875]
    """
    prune_fraction, rounds = _check_schedule(prune_fraction, rounds)
    out, density = [], 1.0
    for _ in range(rounds + 1):
        out.append(1.0 - density)
        density *= 1.0 - prune_fraction
    return out


def sparsity_schedule(prune_fraction: float, rounds: int) -> list[float]:
    """Vectorised `sparsity_schedule_loop`: s_r = 1 - (1 - p)^r for r = 0..R.

    >>> [round(s, 4) for s in sparsity_schedule(0.2, 2)]
    [0.0, 0.2, 0.36]
    """
    prune_fraction, rounds = _check_schedule(prune_fraction, rounds)
    r = torch.arange(rounds + 1, dtype=torch.float64)  # (R+1,)
    return (1.0 - (1.0 - prune_fraction) ** r).tolist()


# ---------------------------------------------------------------------------
# Snapshots and rewinding
# ---------------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer of `model`, masks left out.

    >>> layer = nn.Linear(2, 1)
    >>> sorted(snapshot(layer))
    ['bias', 'weight']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(SUFFIX)}


def _rewind_masks(model: nn.Module, state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise TypeError(f"state must map names to tensors (see snapshot), got {type(state).__name__}")
    own = {k: v for k, v in model.state_dict().items() if not k.endswith(SUFFIX)}
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"state does not fit {type(model).__name__}: missing {missing[:4]}, unexpected {extra[:4]}")
    for k, v in own.items():  # every entry is checked before any weight is overwritten
        if not isinstance(state[k], torch.Tensor):
            raise TypeError(f"state[{k!r}] must be a tensor, got {type(state[k]).__name__}")
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"state[{k!r}] has shape {tuple(state[k].shape)}, the model's has {tuple(v.shape)}")
        if state[k].is_complex() and not v.is_complex():
            raise TypeError(f"state[{k!r}] is {state[k].dtype}, the model's is {v.dtype}")
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            raise ValueError(f"state[{k!r}] holds NaN or infinite values; a snapshot to rewind to must be finite")
    merged = dict(masks_of(model))
    params = dict(model.named_parameters())
    for name, mask in (masks or {}).items():
        if name not in params:
            raise ValueError(f"masks: unknown parameter name {name!r}")
        mask = check_mask(mask, params[name], name)
        merged[name] = merged[name] * mask if name in merged else mask
    return merged


@torch.no_grad()
def rewind_loop(model: nn.Module, state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """theta <- m * theta_k, one element at a time.

    Every parameter and buffer is reset to `state` (a `snapshot`); masked
    weights (the model's own masks, times `masks` if given) are then set to
    mask * snapshot element by element. Slow; for tests and small examples.

    >>> layer = nn.Linear(2, 1, bias=False)
    >>> theta0 = {"weight": torch.tensor([[0.5, -0.25]])}
    >>> _ = rewind_loop(layer, theta0, {"weight": torch.tensor([[0., 1.]])})
    >>> layer.weight.tolist(), layer.weight_mask.tolist()
    ([[0.0, -0.25]], [[0.0, 1.0]])
    """
    check_model(model)
    merged = _rewind_masks(model, state, masks)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, target in tensors.items():
        if name.endswith(SUFFIX):
            continue
        flat_target = target.view(-1)
        flat_state = state[name].reshape(-1).tolist()
        flat_mask = merged[name].reshape(-1).tolist() if name in merged else None
        for i in range(len(flat_state)):
            value = flat_state[i]
            if flat_mask is not None:
                value = value * flat_mask[i]
            flat_target[i] = value
    apply_masks(model, {k: v for k, v in merged.items()})
    return model


@torch.no_grad()
def rewind(model: nn.Module, state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Vectorised `rewind_loop`: load `state`, then multiply in the masks.

    The model keeps (and `masks` only shrinks) its `<param>_mask` buffers, so
    after `rewind` the surviving weights equal the snapshot exactly and the
    pruned ones are exactly zero.

    >>> layer = nn.Linear(2, 1, bias=False)
    >>> theta0 = {"weight": torch.tensor([[0.5, -0.25]])}
    >>> _ = rewind(layer, theta0, {"weight": torch.tensor([[0., 1.]])})
    >>> layer.weight.tolist()
    [[0.0, -0.25]]
    """
    check_model(model)
    merged = _rewind_masks(model, state, masks)
    with restore_on_error(model):  # all or nothing, also for what the checks above cannot foresee
        for name, target in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items():
            if not name.endswith(SUFFIX):
                target.copy_(state[name])
        apply_masks(model, merged)
    return model


@torch.no_grad()
def rewind_error(model: nn.Module, state: Mapping[str, torch.Tensor]) -> float:
    """max |theta - m * theta_k| over every parameter (0.0 right after `rewind`).

    >>> layer = nn.Linear(2, 1, bias=False)
    >>> theta0 = {"weight": torch.tensor([[0.5, -0.25]])}
    >>> rewind_error(rewind(layer, theta0, {"weight": torch.tensor([[1., 0.]])}), theta0)
    0.0
    """
    check_model(model)
    masks = masks_of(model)
    worst = 0.0
    for name, param in model.named_parameters():
        expected = state[name].to(param.device)
        if name in masks:
            expected = expected * masks[name]
        worst = max(worst, float((param - expected).abs().max()) if param.numel() else 0.0)
    return worst


# ---------------------------------------------------------------------------
# Controls: a random mask of the same shape per layer
# ---------------------------------------------------------------------------


def _check_masks(masks) -> None:
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError(f"masks must be a non-empty mapping of parameter names to 0/1 tensors, got {masks!r:.60}")
    for name, mask in masks.items():
        check_mask(mask, mask, name)


def random_masks_loop(masks: Mapping[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A random mask per layer that keeps exactly as many weights as `masks` does.

    For each layer: draw a random order of its n positions, keep the first k
    (k = survivors of the given mask), set them to 1 one index at a time.

    >>> m = random_masks_loop({"w": torch.tensor([[1., 0., 0., 1.]])}, seed=0)
    >>> m["w"].shape, int(m["w"].sum())
    (torch.Size([1, 4]), 2)
    """
    _check_masks(masks)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, mask in masks.items():
        n, k = mask.numel(), int(mask.sum())
        order = torch.randperm(n, generator=generator).tolist()
        values = [0.0] * n
        for i in order[:k]:
            values[i] = 1.0
        out[name] = torch.tensor(values, dtype=mask.dtype).reshape(mask.shape)
    return out


def random_masks(masks: Mapping[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Vectorised `random_masks_loop` (same seed, same masks).

    >>> m = random_masks({"a": torch.ones(3), "b": torch.tensor([0., 0., 1.])}, seed=1)
    >>> [int(v.sum()) for v in m.values()]
    [3, 1]
    """
    _check_masks(masks)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, mask in masks.items():
        n, k = mask.numel(), int(mask.sum())
        order = torch.randperm(n, generator=generator)  # (n,)
        flat = torch.zeros(n, dtype=mask.dtype)
        flat[order[:k]] = 1.0
        out[name] = flat.reshape(mask.shape)
    return out


# ---------------------------------------------------------------------------
# Early stopping: the step of minimum validation loss
# ---------------------------------------------------------------------------


def _check_curve(steps, val_losses) -> None:
    if len(steps) != len(val_losses) or len(steps) == 0:
        raise ValueError(f"steps and val_losses must be non-empty and equally long, got {len(steps)} and {len(val_losses)}")
    for i, loss in enumerate(val_losses):  # NaN compares false both ways: the twins would pick different minima
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or math.isnan(loss):
            raise ValueError(f"val_losses[{i}] must be a number, not NaN, got {loss!r}")


def early_stop_loop(steps: Iterable[int], val_losses: Iterable[float]) -> tuple[int, int]:
    """(index, step) of the first minimum of the validation loss, by scanning.

    >>> early_stop_loop([10, 20, 30, 40], [1.0, 0.7, 0.7, 0.9])
    (1, 20)
    """
    steps, val_losses = list(steps), list(val_losses)
    _check_curve(steps, val_losses)
    best = 0
    for i, loss in enumerate(val_losses):
        if loss < val_losses[best]:
            best = i
    return best, steps[best]


def early_stop(steps: Iterable[int], val_losses: Iterable[float]) -> tuple[int, int]:
    """Vectorised `early_stop_loop` (torch.argmin returns the first minimum).

    >>> early_stop([10, 20, 30], [0.5, 0.4, 0.6])
    (1, 20)
    """
    steps, val_losses = list(steps), list(val_losses)
    _check_curve(steps, val_losses)
    best = int(torch.argmin(torch.tensor(val_losses, dtype=torch.float64)))
    return best, steps[best]


def holdout(data: Split, val_size: int, seed: int = 0) -> tuple[Split, Split]:
    """(train part, validation part) of `data`'s training set; the test set is untouched.

    Both returned `Split`s carry the held-out examples as their test tensors,
    so `loaders(train_part)` gives a training loader and a validation loader.

    >>> X, y = torch.arange(10.).reshape(5, 2), torch.arange(5)
    >>> tr, val = holdout(Split(X, y, X[:1], y[:1], 5), val_size=2)
    >>> len(tr.X_train), len(tr.X_test), len(val.X_test)
    (3, 2, 2)
    """
    if not isinstance(data, Split):
        raise TypeError(f"data must be a chapter11.data.Split, got {type(data).__name__}")
    n = len(data.y_train)
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 < val_size < n:
        raise ValueError(f"val_size must be an int between 1 and {n - 1}, got {val_size!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (n,)
    tr, va = order[: n - val_size], order[n - val_size :]
    part = Split(data.X_train[tr], data.y_train[tr], data.X_train[va], data.y_train[va], data.num_classes)
    return part, part


def batches(X: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int | None = None) -> DataLoader:
    """Batches of (X, y) cut by index slicing: shuffled with `seed`, or in order when `seed` is None.

    The same batches a `DataLoader(shuffle=True)` would give in spirit (every
    example once per epoch, a new seeded order each epoch), but each batch is
    one indexing operation instead of `batch_size` item lookups and a collate,
    which makes the loader 4-6x cheaper; for these small models that is a
    quarter of the training time.

    >>> [y.tolist() for _, y in batches(torch.zeros(5, 2), torch.arange(5), 2)]
    [[0, 1], [2, 3], [4]]
    >>> sorted(sum((y.tolist() for _, y in batches(torch.zeros(5, 2), torch.arange(5), 2, seed=0)), []))
    [0, 1, 2, 3, 4]
    """
    if len(X) != len(y):
        raise ValueError(f"X and y must have the same length, got {len(X)} and {len(y)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    data = TensorDataset(X, y)
    order = SequentialSampler(data) if seed is None else RandomSampler(data, generator=torch.Generator().manual_seed(seed))
    return DataLoader(data, batch_size=None, sampler=BatchSampler(order, batch_size, drop_last=False))


# ---------------------------------------------------------------------------
# One training run and the search
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LotteryConfig:
    """Settings of a lottery-ticket search (all plain values, saved with the records)."""

    rounds: int = field(default=5, metadata={"help": "pruning rounds after the dense run"})
    prune_fraction: float = field(default=0.2, metadata={"help": "fraction of the surviving weights pruned each round"})
    rewind_step: int = field(default=0, metadata={"help": "0: rewind to theta_0; k > 0: to the weights after k steps of the dense run"})
    scope: str = field(default="global", metadata={"help": "'global' (one threshold) or 'layerwise' magnitude pruning"})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "layers kept dense, e.g. ('embed', 'head')"})
    epochs: int = field(default=10, metadata={"help": "most epochs per training run"})
    patience: int = field(default=0, metadata={"help": "evaluations without a new minimum of validation loss before a run stops; 0 trains all epochs"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    batch_size: int = field(default=64, metadata={"help": "training batch size"})
    eval_every: int = field(default=50, metadata={"help": "steps between validation evaluations"})
    val_size: int = field(default=500, metadata={"help": "training examples held out for early stopping"})
    controls: tuple[str, ...] = field(default=CONTROLS, metadata={"help": "subset of ('reinit', 'random_mask') trained each round"})
    seed: int = field(default=0, metadata={"help": "seeds the initialisation; controls use seed + round"})
    data_seed: int = field(default=0, metadata={"help": "seeds the holdout split and the batch order (same for every run)"})

    def __post_init__(self):
        _check_schedule(self.prune_fraction, self.rounds)
        for name in ("epochs", "batch_size", "eval_every", "val_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("seed", "data_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"patience must be an int >= 0, got {self.patience!r}")
        if isinstance(self.rewind_step, bool) or not isinstance(self.rewind_step, int) or self.rewind_step < 0:
            raise ValueError(f"rewind_step must be an int >= 0, got {self.rewind_step!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        for name in ("exclude", "controls"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown:
            raise ValueError(f"controls must be a subset of {CONTROLS}, got {self.controls!r}")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping) -> "LotteryConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})


def train_run(
    model: nn.Module,
    train_loader,
    val_loader,
    test_loader,
    config: LotteryConfig,
    capture_step: int | None = None,
    progress_bar: bool | None = None,
    desc: str = "train",
) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Train `model` once, stop early on validation, and return (record, snapshot after `capture_step` steps or None).

    Adam at `config.lr`; every `config.eval_every` steps the model is scored
    on `val_loader`. With `config.patience > 0` training stops once that many
    evaluations pass without a new minimum of the validation loss (at most
    `config.epochs` epochs); with 0 it runs all epochs. Either way the weights
    of the first minimum of the validation loss (the early-stopping point of
    Frankle & Carbin) are restored at the end, and the test set is scored
    once, on those weights.

    The record holds the evaluation `steps`, `val_loss`, `val_accuracy`,
    `train_loss` (mean over each interval), `early_stop_index`,
    `early_stop_step`, `early_stop_val_accuracy`, `early_stop_accuracy` (test),
    `total_steps` and `stopped_early` (True when patience ran out before the
    epoch limit: the run had converged on validation).
    """
    check_model(model)
    if config.eval_every > config.epochs * len(train_loader):
        raise ValueError(f"config.eval_every={config.eval_every} is larger than the {config.epochs * len(train_loader)} training steps; nothing would be evaluated")
    device = model_device(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if masks_of(model):
        optimizer = MaskedOptimizer(optimizer, model)
    steps, val_loss, val_accuracy, train_curve, window = [], [], [], [], []
    best_loss, best_state, since, captured, step, stopped = math.inf, None, 0, None, 0, False
    bar = progress(total=config.epochs * len(train_loader), desc=desc, enabled=progress_bar)
    for _ in range(config.epochs):
        model.train()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            window.append(loss.item())
            bar.update(1)
            if capture_step is not None and step == capture_step:
                captured = snapshot(model)
            if step % config.eval_every == 0:
                metrics = evaluate(model, val_loader)
                model.train()
                steps.append(step)
                val_loss.append(metrics["loss"])
                val_accuracy.append(metrics["accuracy"])
                train_curve.append(sum(window) / len(window))
                window = []
                if metrics["loss"] < best_loss:  # strict: the first minimum wins, as in early_stop
                    best_loss, since = metrics["loss"], 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    since += 1
                    stopped = config.patience > 0 and since >= config.patience
            if stopped:
                break
        if stopped:
            break
    bar.close()
    if capture_step is not None and captured is None:
        raise ValueError(f"rewind_step={capture_step} is beyond the {step} steps of the dense run")
    model.load_state_dict(best_state)
    model.eval()
    index, stop_step = early_stop(steps, val_loss)
    record = {
        "steps": steps,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "train_loss": train_curve,
        "early_stop_index": index,
        "early_stop_step": stop_step,
        "early_stop_val_accuracy": val_accuracy[index],
        "early_stop_accuracy": evaluate(model, test_loader)["accuracy"],
        "total_steps": step,
        "stopped_early": stopped,
    }
    return record, captured


@dataclass
class LotteryResult:
    """What a search produced: config, one record per round, masks per round, rewind target.

    `rounds[r]` has `round`, `target_sparsity`, `sparsity`, `density`,
    `rewind_error` and `runs` = {"ticket": record, "reinit": ..., "random_mask": ...}
    (round 0 is the dense run, stored as "ticket" and shared by the controls).
    `masks[r]` is {param: mask} of round r (empty for round 0).
    """

    config: LotteryConfig
    rounds: list[dict]
    masks: list[dict[str, torch.Tensor]]
    rewind_state: dict[str, torch.Tensor]
    theta_0: dict[str, torch.Tensor]

    def curve(self, run: str = "ticket", key: str = "early_stop_accuracy") -> tuple[list[float], list[float]]:
        """(densities, values) of `key` for `run` over all rounds (round 0 is the dense run)."""
        if run not in RUNS:
            raise ValueError(f"run must be one of {RUNS}, got {run!r}")
        xs, ys = [], []
        for rec in self.rounds:
            if run not in rec["runs"] and rec["round"] > 0:
                continue  # that control was not trained (config.controls)
            xs.append(rec["density"])
            ys.append(_value(rec, run, key))
        return xs, ys


def _masks_path(path: Path, r: int) -> Path:
    return path / f"round_{r}.pt"


def _save_round(path: Path | None, config: LotteryConfig, records: list[dict], r: int, model: nn.Module, masks: dict) -> None:
    if path is None:
        return
    atomic_torch_save({"state": model.state_dict(), "masks": masks}, _masks_path(path, r))
    atomic_write_text(json.dumps({"config": config.to_json(), "rounds": records}, indent=1), path / RECORDS)


def _load_records(path: Path, config: LotteryConfig) -> list[dict]:
    file = path / RECORDS
    if not file.is_file():
        return []
    data = json.loads(file.read_text())
    saved = LotteryConfig.from_json(data["config"])
    mismatch = [f.name for f in fields(LotteryConfig) if f.name != "rounds" and getattr(saved, f.name) != getattr(config, f.name)]
    if mismatch:
        raise ValueError(f"path: {str(path)!r} holds a search with different settings ({', '.join(mismatch)}); use another path or the same config")
    return data["rounds"]


def _masked_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total


def search_loaders(data: Split, config: LotteryConfig) -> tuple[Callable[[], tuple[DataLoader, DataLoader]], DataLoader]:
    """(fresh, test_loader) of a search: `fresh()` builds new training and validation loaders.

    The training set of `data` loses `config.val_size` examples to the
    validation set (`holdout`, `config.data_seed`); a new pair of loaders per
    run means every run sees the same batch order, resumed or not. Anything
    trained beside a search (a control, a fine-tuning reference) uses these
    loaders to see the same data in the same order.
    """
    train_part, _ = holdout(data, config.val_size, seed=config.data_seed)

    def fresh() -> tuple[DataLoader, DataLoader]:
        return (batches(train_part.X_train, train_part.y_train, config.batch_size, seed=config.data_seed),
                batches(train_part.X_test, train_part.y_test, 512))

    return fresh, batches(data.X_test, data.y_test, 512)


def find_ticket(
    model_fn: Callable[[], nn.Module],
    data: Split,
    config: LotteryConfig = LotteryConfig(),
    path: str | os.PathLike | None = None,
    progress_bar: bool | None = None,
    device: str | torch.device | None = None,
) -> LotteryResult:
    """Iterative magnitude pruning with rewinding, plus the controls, round by round.

    `model_fn()` builds a fresh model (it is seeded before each call, on the
    CPU, and then moved to `device` when one is given). The
    training set of `data` loses `config.val_size` examples to a validation
    set used only for early stopping; test accuracy comes from `data`'s test set.
    With `path` (a folder) finished rounds are saved and reused: call again
    with the same config (a larger `rounds` continues the search).
    """
    if not callable(model_fn):
        raise TypeError(f"model_fn must be a callable returning an nn.Module, got {type(model_fn).__name__}")
    if not isinstance(config, LotteryConfig):
        raise TypeError(f"config must be a LotteryConfig, got {type(config).__name__}")
    if not isinstance(data, Split):
        raise TypeError(f"data must be a chapter11.data.Split, got {type(data).__name__}")
    path = Path(path) if path is not None else None
    fresh_loaders, test_loader = search_loaders(data, config)
    schedule = sparsity_schedule(config.prune_fraction, config.rounds)
    mask_fn = global_magnitude_masks if config.scope == "global" else layerwise_magnitude_masks

    def build(seed: int) -> nn.Module:
        seed_everything(seed)
        model = model_fn()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model_fn must return an nn.Module, got {type(model).__name__}")
        return model if device is None else model.to(device)

    records = _load_records(path, config) if path is not None else []
    all_masks: list[dict] = []
    if records:
        saved = torch.load(path / "rewind.pt", map_location="cpu", weights_only=True)
        theta_0, rewind_state = saved["theta_0"], saved["rewind"]
        for r in range(len(records)):
            all_masks.append(torch.load(_masks_path(path, r), map_location="cpu", weights_only=True)["masks"])
        last = torch.load(_masks_path(path, len(records) - 1), map_location="cpu", weights_only=True)["state"]
        trained = load_masked_state_dict(build(config.seed), last)
    else:
        # Round 0: the dense run, which also takes the snapshot to rewind to.
        model = build(config.seed)
        theta_0 = snapshot(model)
        tr, va = fresh_loaders()
        capture = config.rewind_step if config.rewind_step > 0 else None
        seed_everything(config.seed)
        run, state = train_run(model, tr, va, test_loader, config, capture_step=capture, progress_bar=progress_bar, desc="round 0 dense")
        rewind_state = state if capture else theta_0
        if path is not None:
            atomic_torch_save({"theta_0": theta_0, "rewind": rewind_state}, path / "rewind.pt")
        records.append({"round": 0, "target_sparsity": 0.0, "sparsity": 0.0, "density": 1.0, "rewind_error": 0.0, "runs": {"ticket": run}})
        all_masks.append({})
        trained = model
        _save_round(path, config, records, 0, model, {})

    for r in range(len(records), config.rounds + 1):
        # prune from the weights the previous round trained; old zeros rank lowest
        masks = {k: v.detach().clone() for k, v in mask_fn(trained, schedule[r], config.exclude).items()}
        if all_masks[-1] and any(bool((masks[k] > all_masks[-1][k]).any()) for k in masks):
            raise RuntimeError(f"round {r}: a mask grew back; masks must only shrink")
        model = build(config.seed)
        rewind(model, rewind_state, masks)
        error = rewind_error(model, rewind_state)
        runs = {}
        tr, va = fresh_loaders()
        seed_everything(config.seed + r)
        runs["ticket"], _ = train_run(model, tr, va, test_loader, config, progress_bar=progress_bar, desc=f"round {r} ticket")
        if "reinit" in config.controls:
            control = build(config.seed + 1000 + r)
            apply_masks(control, masks)
            tr, va = fresh_loaders()
            runs["reinit"], _ = train_run(control, tr, va, test_loader, config, progress_bar=progress_bar, desc=f"round {r} reinit")
        if "random_mask" in config.controls:
            control = build(config.seed)
            rewind(control, rewind_state, random_masks(masks, seed=config.seed + r))
            tr, va = fresh_loaders()
            seed_everything(config.seed + r)
            runs["random_mask"], _ = train_run(control, tr, va, test_loader, config, progress_bar=progress_bar, desc=f"round {r} random mask")
        measured = _masked_sparsity(masks)
        records.append(
            {"round": r, "target_sparsity": schedule[r], "sparsity": measured, "density": 1.0 - measured, "rewind_error": error, "runs": runs}
        )
        all_masks.append(masks)
        trained = model
        _save_round(path, config, records, r, model, masks)

    return LotteryResult(config, records[: config.rounds + 1], all_masks[: config.rounds + 1], rewind_state, theta_0)


def find_tickets(
    model_fn: Callable[[], nn.Module],
    data: Split,
    config: LotteryConfig,
    seeds: Iterable[int],
    path: str | os.PathLike | None = None,
    progress_bar: bool | None = None,
    device: str | torch.device | None = None,
) -> list[LotteryResult]:
    """`find_ticket` once per seed: `config.seed` is replaced by each seed, all else is shared.

    With `path`, seed s is saved under `path/seed_<s>` (and resumed from there).
    The data split and batch order (`config.data_seed`) are the same for every
    seed, so seeds differ only in the initialisation and the controls' draws.
    """
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct ints, got {seeds!r}")
    if not isinstance(config, LotteryConfig):
        raise TypeError(f"config must be a LotteryConfig, got {type(config).__name__}")
    out = []
    for seed in seeds:
        folder = None if path is None else Path(path) / f"seed_{seed}"
        out.append(find_ticket(model_fn, data, replace(config, seed=seed), path=folder, progress_bar=progress_bar, device=device))
    return out


def _value(rec: dict, run: str, key: str):
    runs = rec["runs"]
    chosen = runs.get(run, runs["ticket"] if rec["round"] == 0 else None)
    if chosen is None:
        raise ValueError(f"run {run!r} was not trained in round {rec['round']} (config.controls)")
    if key not in chosen or isinstance(chosen[key], list):
        raise ValueError(f"key must be one of {sorted(k for k, v in chosen.items() if not isinstance(v, list))}, got {key!r}")
    return chosen[key]


def seed_table(results: Iterable[LotteryResult], runs: Iterable[str] = RUNS, key: str = "early_stop_accuracy") -> dict:
    """Plain (JSON-ready) table of `key` per round and seed: {"density": [...], "seeds": [...], run: [[v per seed] per round]}.

    Every search must share its settings except the seed; the densities of
    round r must agree to within one weight (they do: pruning keeps exact counts).

    >>> rec = lambda r, d, v: {"round": r, "density": d, "runs": {"ticket": {"acc": v}}}
    >>> a = LotteryResult(LotteryConfig(rounds=1, seed=0), [rec(0, 1.0, 0.5), rec(1, 0.8, 0.6)], [], {}, {})
    >>> b = LotteryResult(LotteryConfig(rounds=1, seed=1), [rec(0, 1.0, 0.7), rec(1, 0.8, 0.8)], [], {}, {})
    >>> seed_table([a, b], runs=["ticket"], key="acc")
    {'density': [1.0, 0.8], 'seeds': [0, 1], 'ticket': [[0.5, 0.7], [0.6, 0.8]]}
    """
    if not isinstance(results, Iterable) or not isinstance(runs, Iterable):
        raise TypeError(f"results must be LotteryResults (from find_tickets) and runs names, got {type(results).__name__}")
    results, runs = list(results), list(runs)
    if not results or not all(isinstance(r, LotteryResult) for r in results):
        raise TypeError("results must be a non-empty list of LotteryResult (see find_tickets)")
    unknown = [r for r in runs if r not in RUNS]
    if unknown or not runs:
        raise ValueError(f"runs must be a non-empty subset of {RUNS}, got {runs!r}")
    first = results[0]
    for res in results[1:]:
        differ = [f.name for f in fields(LotteryConfig) if f.name != "seed" and getattr(res.config, f.name) != getattr(first.config, f.name)]
        if differ or len(res.rounds) != len(first.rounds):
            raise ValueError(f"results must differ only in their seed; found different {differ or ['number of rounds']}")
        for a, b in zip(first.rounds, res.rounds):
            if abs(a["density"] - b["density"]) > 1e-3:
                raise ValueError(f"round {a['round']}: densities {a['density']} and {b['density']} differ between seeds")
    table = {"density": [rec["density"] for rec in first.rounds], "seeds": [res.config.seed for res in results]}
    for run in runs:
        table[run] = [[_value(res.rounds[i], run, key) for res in results] for i in range(len(first.rounds))]
    return table


def seed_curve(table: Mapping, run: str = "ticket") -> tuple[list[float], list[Summary]]:
    """(densities, [Summary over seeds per round]) of one run of a `seed_table`, for `plots.curves_with_bands`.

    >>> xs, ys = seed_curve({"density": [1.0, 0.8], "seeds": [0, 1], "ticket": [[0.5, 0.7], [0.6, 0.8]]})
    >>> xs, [round(s.mean, 2) for s in ys]
    ([1.0, 0.8], [0.6, 0.7])
    """
    if not isinstance(table, Mapping):
        raise TypeError(f"table must be the dict seed_table returns, got {type(table).__name__}")
    if run not in table:
        raise ValueError(f"run {run!r} is not in the table; it holds {sorted(k for k in table if k not in ('density', 'seeds'))}")
    return list(table["density"]), [summarize(values) for values in table[run]]


def load_lottery(path: str | os.PathLike) -> LotteryResult:
    """Read back a search saved by `find_ticket(..., path=path)` without training anything."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path, got {type(path).__name__}")
    path = Path(path)
    file = path / RECORDS
    if not file.is_file():
        raise FileNotFoundError(f"path: no {RECORDS} in {str(path)!r}")
    data = json.loads(file.read_text())
    config = LotteryConfig.from_json(data["config"])
    masks = [torch.load(_masks_path(path, r["round"]), map_location="cpu", weights_only=True)["masks"] for r in data["rounds"]]
    saved = torch.load(path / "rewind.pt", map_location="cpu", weights_only=True)
    return LotteryResult(config, data["rounds"], masks, saved["rewind"], saved["theta_0"])
