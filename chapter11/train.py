"""Training and evaluation loops, and the metrics the chapter asks for.

Covers: `seed_everything`; `train` (any classifier, any optimizer; masks are
kept at zero automatically), `evaluate`, `predict`; `train_lm` and
`perplexity` for causal language models; accuracy and expected calibration
error (ECE), each with a `_loop` twin, plus the data for a reliability diagram.

Progress bars: `progress(...)` wraps tqdm. They show by default and are
turned off by `CH11_PROGRESS=0` (set by the Makefile when notebooks run
headless, so committed outputs hold no bars) or by `progress=False`.

Device: `default_device()` is the one place that picks where models run:
CUDA when a GPU is present, else the CPU; `CH11_DEVICE=cpu|cuda` overrides
it. The loops here run on whatever device the model is on and move each
batch there, so the same code serves a laptop and a GPU.

But: one device at a time, no mixed precision, no gradient accumulation: the
models here are small on purpose.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .masks import MaskedOptimizer, masks_of
from .sparsity import check_model

__all__ = [
    "DEVICE_ENV",
    "default_device",
    "model_device",
    "seed_everything",
    "SEED_OFFSET_ENV",
    "seed_offset",
    "offset_seeds",
    "seeds_line",
    "progress",
    "History",
    "train",
    "fit",
    "evaluate",
    "predict",
    "accuracy_loop",
    "accuracy",
    "expected_calibration_error_loop",
    "expected_calibration_error",
    "reliability_data",
    "train_lm",
    "perplexity",
]


DEVICE_ENV = "CH11_DEVICE"


def default_device() -> torch.device:
    """Where models should run: `CH11_DEVICE` if set (`cpu`, `cuda`, `cuda:1`), else CUDA when available, else CPU.

    >>> import os; os.environ["CH11_DEVICE"] = "cpu"; default_device()
    device(type='cpu')
    >>> del os.environ["CH11_DEVICE"]
    """
    choice = os.environ.get(DEVICE_ENV, "").strip().lower()
    if choice in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or (choice.startswith("cuda:") and choice[5:].isdigit()):
        if not torch.cuda.is_available():
            raise RuntimeError(f"{DEVICE_ENV}={choice!r} asks for a GPU, but torch sees no CUDA device; use {DEVICE_ENV}=cpu")
        return torch.device(choice)
    raise ValueError(f"{DEVICE_ENV} must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {choice!r}")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    check_model(model)
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) with `seed`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


SEED_OFFSET_ENV = "CH11_SEED_OFFSET"


def seed_offset() -> int:
    """The integer in `CH11_SEED_OFFSET` (0 when unset): a new draw of every seed a notebook controls.

    A notebook's conclusions must survive a re-draw (another CPU, another
    seed), so every notebook and recorded-run driver adds this offset to its
    seeds: model initialisation, batch order, masks, random controls and
    calibration samples. The fixed datasets stay as they are.

    >>> import os; os.environ.pop("CH11_SEED_OFFSET", None) and None
    >>> seed_offset()
    0
    """
    raw = os.environ.get(SEED_OFFSET_ENV, "").strip()
    if raw == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{SEED_OFFSET_ENV} must be a non-negative integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{SEED_OFFSET_ENV} must be a non-negative integer, got {value}")
    return value


def offset_seeds(seeds: Iterable[int], offset: int | None = None) -> list[int]:
    """`seeds` shifted by `offset` (default: `seed_offset()`).

    >>> offset_seeds([0, 1, 2], offset=1000)
    [1000, 1001, 1002]
    """
    offset = seed_offset() if offset is None else offset
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"seeds must be integers, got {s!r}")
        out.append(int(s) + int(offset))
    return out


def seeds_line(seeds: Iterable[int], offset: int | None = None) -> str:
    """The line a notebook prints about its seeds (the output is not compared by nbval).

    >>> seeds_line([7919, 7920], offset=7919)
    'seeds [7919, 7920] (CH11_SEED_OFFSET=7919)'
    """
    offset = seed_offset() if offset is None else offset
    return f"seeds {list(seeds)} ({SEED_OFFSET_ENV}={offset})"


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None, enabled: bool | None = None, **kwargs):
    """A tqdm bar over `iterable`, or the bare iterable when bars are off."""
    if enabled is None:
        enabled = os.environ.get("CH11_PROGRESS", "1") != "0"
    if not enabled:
        if iterable is None:
            return _NoBar(total)
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, **kwargs)


class _NoBar:
    """Stands in for a manual tqdm bar (`update`, `set_postfix`, `close`)."""

    def __init__(self, total=None):
        self.total = total

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@dataclass
class History:
    """What `train` saw: the loss of every step and test metrics after each epoch."""

    losses: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # step count at each evaluation


def _wrap(optimizer: torch.optim.Optimizer | MaskedOptimizer, model: nn.Module):
    if isinstance(optimizer, MaskedOptimizer) or not masks_of(model):
        return optimizer
    return MaskedOptimizer(optimizer, model)


def train(
    model: nn.Module,
    loader: Iterable,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable | None = None,
    eval_loader: Iterable | None = None,
    eval_every: int | None = None,
    callback: Callable | None = None,
    max_steps: int | None = None,
    progress_bar: bool | None = None,
    desc: str = "train",
) -> History:
    """Train `model` on `loader` for `epochs` (or `max_steps`) and return a `History`.

    - `optimizer` defaults to Adam(lr). If the model carries masks, the
      optimizer is wrapped in `MaskedOptimizer`, so pruned weights stay zero.
    - `callback(step, model, optimizer, x, y)` runs after every optimizer
      step (dynamic sparsity updates its masks there).
    - With `eval_loader`, test accuracy and loss are recorded after every
      epoch, or every `eval_every` steps.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    loss_fn = loss_fn or F.cross_entropy
    optimizer = _wrap(optimizer or torch.optim.Adam(model.parameters(), lr=lr), model)
    history = History()
    step = 0
    total = max_steps if max_steps is not None else epochs * len(loader)
    bar = progress(total=total, desc=desc, enabled=progress_bar)
    device = model_device(model)

    def _evaluate():
        metrics = evaluate(model, eval_loader, loss_fn)
        history.test_accuracy.append(metrics["accuracy"])
        history.test_loss.append(metrics["loss"])
        history.steps.append(step)

    done = False
    for _ in range(epochs if max_steps is None else 10**9):
        model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            history.losses.append(loss.item())
            bar.update(1)
            if callback is not None:
                callback(step, model, optimizer, x, y)
            if eval_loader is not None and eval_every and step % eval_every == 0:
                _evaluate()
                model.train()  # evaluate() left it in eval mode
            if max_steps is not None and step >= max_steps:
                done = True
                break
        if eval_loader is not None and not eval_every:
            _evaluate()
        if done or (max_steps is not None and step >= max_steps):
            break
    bar.close()
    model.eval()
    return history


@dataclass
class FitResult:
    """What `fit` chose on the validation set: the best epoch and the curves that led there."""

    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    val_accuracy: list[float]
    history: History


def fit(
    model: nn.Module,
    loader: Iterable,
    val_loader: Iterable,
    max_epochs: int = 100,
    patience: int = 5,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    min_delta: float = 0.0,
    callback: Callable | None = None,
    progress_bar: bool | None = None,
    desc: str = "fit",
) -> FitResult:
    """Train until validation accuracy stops improving, then restore the best epoch's weights.

    Early stopping as Frankle & Carbin use it: after every epoch the model is
    scored on `val_loader` (never the test set); training stops once
    `patience` epochs pass without a gain larger than `min_delta`, or at
    `max_epochs`, and the weights (and mask buffers) of the best epoch are
    loaded back. One optimizer serves all epochs, so Adam's moments carry over
    as in one long `train` call.
    """
    check_model(model)
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
        raise ValueError(f"max_epochs must be an int >= 1, got {max_epochs!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be an int >= 1, got {patience!r}")
    optimizer = _wrap(optimizer or torch.optim.Adam(model.parameters(), lr=lr), model)
    history = History()
    best, best_epoch, best_state, since = -1.0, 0, None, 0
    val_accuracy: list[float] = []
    bar = progress(total=max_epochs, desc=desc, enabled=progress_bar)
    for epoch in range(1, max_epochs + 1):
        h = train(model, loader, epochs=1, optimizer=optimizer, callback=callback, progress_bar=False)
        history.losses += h.losses
        acc = evaluate(model, val_loader)["accuracy"]
        val_accuracy.append(acc)
        bar.update(1)
        if acc > best + min_delta:
            best, best_epoch, since = acc, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_epoch, best, len(val_accuracy), val_accuracy, history)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) over the whole loader, in eval mode."""
    check_model(model)
    model.eval()
    device = model_device(model)
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, loader: Iterable, loss_fn: Callable | None = None) -> dict[str, float]:
    """{"loss": mean loss, "accuracy": fraction correct} on `loader`."""
    check_model(model)
    logits, labels = predict(model, loader)
    loss = (loss_fn or F.cross_entropy)(logits, labels).item()
    return {"loss": loss, "accuracy": accuracy(logits, labels)}


def accuracy_loop(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose largest logit is the label, one row at a time.

    >>> accuracy_loop(torch.tensor([[2., 1.], [0., 3.]]), torch.tensor([0, 0]))
    0.5
    """
    correct = 0
    for row, label in zip(logits.tolist(), labels.tolist()):
        best = max(range(len(row)), key=lambda j: row[j])
        correct += int(best == label)
    return correct / len(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Vectorised `accuracy_loop`.

    >>> accuracy(torch.tensor([[2., 1.], [0., 3.]]), torch.tensor([0, 1]))
    1.0
    """
    if len(labels) == 0:
        raise ValueError("labels is empty")
    return (logits.argmax(-1) == labels).float().mean().item()


def _check_probs(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> None:
    if probs.dim() != 2 or labels.dim() != 1 or len(probs) != len(labels):
        raise ValueError(f"probs must be (N, C) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")


def expected_calibration_error_loop(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width confidence bins.

    Bins are (k/n, (k+1)/n], confidence 0 going to the first bin.

    >>> p = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    >>> round(expected_calibration_error_loop(p, torch.tensor([0, 1]), n_bins=2), 3)
    0.25
    """
    _check_probs(probs, labels, n_bins)
    sums = [[0, 0.0, 0.0] for _ in range(n_bins)]  # count, correct, confidence
    for row, label in zip(probs.tolist(), labels.tolist()):
        conf = max(row)
        pred = row.index(conf)
        b = min(max(math.ceil(conf * n_bins) - 1, 0), n_bins - 1)
        sums[b][0] += 1
        sums[b][1] += float(pred == label)
        sums[b][2] += conf
    n = len(labels)
    return sum(c / n * abs(cor / c - cf / c) for c, cor, cf in sums if c)


def reliability_data(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, torch.Tensor]:
    """Per bin: `count`, `accuracy`, `confidence` (NaN where a bin is empty) and `edges`."""
    _check_probs(probs, labels, n_bins)
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    bins = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    count = torch.bincount(bins, minlength=n_bins).float()
    acc = torch.bincount(bins, weights=correct, minlength=n_bins) / count
    mean_conf = torch.bincount(bins, weights=conf, minlength=n_bins) / count
    return {"count": count, "accuracy": acc, "confidence": mean_conf, "edges": torch.linspace(0, 1, n_bins + 1)}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Vectorised `expected_calibration_error_loop`.

    >>> p = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    >>> round(expected_calibration_error(p, torch.tensor([0, 1]), n_bins=2), 3)
    0.25
    """
    data = reliability_data(probs, labels, n_bins)
    weight = data["count"] / len(labels)
    gap = (data["accuracy"] - data["confidence"]).abs()
    return float(torch.nansum(weight * gap))


def _lm_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out  # (B, T, V)


def train_lm(
    model: nn.Module,
    tokens: torch.Tensor,
    steps: int,
    block_size: int = 64,
    batch_size: int = 16,
    lr: float = 3e-3,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    progress_bar: bool | None = None,
    teacher: nn.Module | None = None,
    loss_fn: Callable | None = None,
) -> list[float]:
    """Next-token training on random windows of `tokens`; returns the loss of every step.

    `loss_fn(student_logits, y, teacher_logits_or_None)` replaces cross entropy,
    for distillation; `teacher` is run without gradients when given.
    """
    check_model(model)
    from .data import lm_batches

    optimizer = _wrap(optimizer or torch.optim.AdamW(model.parameters(), lr=lr), model)
    losses = []
    device = model_device(model)
    model.train()
    for x, y in progress(lm_batches(tokens, block_size, batch_size, steps, seed), total=steps, desc="train_lm", enabled=progress_bar):
        x, y = x.to(device), y.to(device)
        logits = _lm_logits(model, x)  # (B, T, V)
        if loss_fn is None:
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        else:
            with torch.no_grad():
                t_logits = _lm_logits(teacher, x) if teacher is not None else None
            loss = loss_fn(logits, y, t_logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, block_size: int = 64, batch_size: int = 16, max_tokens: int | None = None) -> float:
    """exp(mean next-token loss) over consecutive, non-overlapping windows of `tokens`."""
    check_model(model)
    model.eval()
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    n = (len(tokens) - 1) // block_size
    if n < 1:
        raise ValueError(f"tokens: need more than block_size + 1 = {block_size + 1} tokens, got {len(tokens)}")
    device = model_device(model)
    x = tokens[: n * block_size].view(n, block_size)  # (n, T)
    y = tokens[1 : n * block_size + 1].view(n, block_size)  # (n, T)
    total = 0.0
    for i in range(0, n, batch_size):
        logits = _lm_logits(model, x[i : i + batch_size].to(device))  # (b, T, V)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y[i : i + batch_size].flatten().to(device), reduction="sum").item()
    return math.exp(total / (n * block_size))
