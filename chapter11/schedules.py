"""Pruning schedules: how sparsity grows from 0 to the final target.

A schedule is a list of target sparsities, one per pruning stage (or one per
training step for the cubic schedule). Each value is the fraction of *all*
prunable weights that should be zero after that stage, so the list never
decreases and ends at the final sparsity.

- one-shot: [s_f], everything at once.
- iterative: n stages that each remove the same fraction p of the weights
  still alive, density_i = (1 - p)^i with (1 - p)^n = 1 - s_f. Ten stages
  to 80% remove p = 1 - 0.2^(1/10) = 14.9% of the survivors each time.
- linear: equal steps in sparsity, s_i = s_0 + (s_f - s_0) i / n. Later stages
  then remove a growing share of the survivors.
- cubic (Zhu & Gupta, 2017): s_t = s_f + (s_0 - s_f)(1 - (t - t_0)/(n dt))^3
  for t_0 <= t <= t_0 + n dt; s_0 before t_0, s_f after. It prunes fast
  while many redundant weights remain and slowly near the end.

Each schedule has a `_loop` twin; `plot_schedules` draws them side by side.

Comparing schedules is only fair at equal cost, so `split_budget` shares one
budget of fine-tuning steps among the stages and `prune_and_finetune` prunes
along a schedule spending exactly that budget. Notebook 01's comparison of
schedules at equal budgets, against a random mask and the dense model, is
`chapter11.experiments.exp01_schedules.equal_budget_sweep`.

But: schedules only say *how much*; *which* weights go is the criterion's job
(`chapter11.magnitude`). `prune_and_finetune` fine-tunes with a fresh Adam
per stage and a fixed number of steps: no early stopping inside it and no
learning-rate schedule.

    >>> [round(s, 3) for s in iterative_schedule(0.8, stages=3)]
    [0.415, 0.658, 0.8]
    >>> round(cubic_sparsity(5, 0.8, n=10), 3)
    0.7
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Real

import numpy as np
import torch
from torch import nn

from .magnitude import iterative_magnitude_pruning
from .sparsity import check_model, check_sparsity
from .train import train

__all__ = [
    "cubic_sparsity_loop", "cubic_sparsity", "one_shot_schedule_loop", "one_shot_schedule",
    "iterative_schedule_loop", "iterative_schedule", "iterative_rate", "linear_schedule_loop", "linear_schedule",
    "cubic_schedule_loop", "cubic_schedule", "make_schedule", "SCHEDULES", "plot_schedules", "split_budget_loop",
    "split_budget", "prune_and_finetune",
]


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(float(value)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _check_pair(final_sparsity, initial_sparsity) -> tuple[float, float]:
    final = check_sparsity(final_sparsity, "final_sparsity")
    initial = check_sparsity(initial_sparsity, "initial_sparsity")
    if initial > final:
        raise ValueError(f"initial_sparsity ({initial}) must not exceed final_sparsity ({final}); a schedule never un-prunes")
    return final, initial


# ---------------------------------------------------------------------------
# Cubic schedule of Zhu & Gupta (2017), per training step
# ---------------------------------------------------------------------------


def _cubic_args(final_sparsity, initial_sparsity, t0, n, dt):
    final, initial = _check_pair(final_sparsity, initial_sparsity)
    t0 = _check_real(t0, "t0")
    n = _check_positive_int(n, "n")
    dt = _check_real(dt, "dt")
    if dt <= 0:
        raise ValueError(f"dt must be > 0, got {dt}")
    return final, initial, t0, n, dt


def cubic_sparsity_loop(steps: Sequence[float], final_sparsity: float, initial_sparsity: float = 0.0, t0: float = 0, n: int = 10, dt: float = 1) -> list[float]:
    """s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 for each t in `steps`, one at a time.

    Before t0 the sparsity is s_i; after t0 + n dt it stays at s_f.

    >>> [round(s, 3) for s in cubic_sparsity_loop([0, 1, 5, 10, 12], 0.8)]
    [0.0, 0.217, 0.7, 0.8, 0.8]
    """
    final, initial, t0, n, dt = _cubic_args(final_sparsity, initial_sparsity, t0, n, dt)
    out = []
    for t in steps:
        t = _check_real(t, "t")
        if t <= t0:
            out.append(initial)
        elif t >= t0 + n * dt:
            out.append(final)
        else:
            progress = (t - t0) / (n * dt)
            out.append(final + (initial - final) * (1.0 - progress) ** 3)
    return out


def cubic_sparsity(t, final_sparsity: float, initial_sparsity: float = 0.0, t0: float = 0, n: int = 10, dt: float = 1):
    """Zhu & Gupta's cubic sparsity at step t (a float), or at many steps (a list).

    Vectorised with numpy when `t` is a sequence, array or tensor; agrees
    with `cubic_sparsity_loop`.

    >>> cubic_sparsity(0, 0.9), cubic_sparsity(100, 0.9)
    (0.0, 0.9)
    >>> [round(s, 4) for s in cubic_sparsity([2, 4], 0.5, initial_sparsity=0.1, t0=2, n=4, dt=0.5)]
    [0.1, 0.5]
    """
    final, initial, t0, n, dt = _cubic_args(final_sparsity, initial_sparsity, t0, n, dt)
    scalar = isinstance(t, Real) and not isinstance(t, bool)
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    steps = np.atleast_1d(np.asarray(t, dtype=np.float64))  # (T,)
    if steps.dtype.kind not in "fi" or np.isnan(steps).any():
        raise ValueError(f"t must be real step numbers, got {t!r}")
    progress = np.clip((steps - t0) / (n * dt), 0.0, 1.0)  # (T,) in [0, 1]
    values = final + (initial - final) * (1.0 - progress) ** 3  # (T,)
    values = np.where(progress >= 1.0, final, values)  # exact s_f at and after the end
    values = np.where(progress <= 0.0, initial, values)  # exact s_i up to t0
    return float(values[0]) if scalar else values.tolist()


# ---------------------------------------------------------------------------
# Stage schedules: one target sparsity per prune-and-fine-tune stage
# ---------------------------------------------------------------------------


def one_shot_schedule_loop(final_sparsity: float) -> list[float]:
    """One stage straight to s_f.

    >>> one_shot_schedule_loop(0.8)
    [0.8]
    """
    out = []
    for s in [check_sparsity(final_sparsity, "final_sparsity")]:
        out.append(s)
    return out


def one_shot_schedule(final_sparsity: float) -> list[float]:
    """One stage straight to s_f (same as the loop twin; here for symmetry).

    >>> one_shot_schedule(0.5)
    [0.5]
    """
    return [check_sparsity(final_sparsity, "final_sparsity")]


def iterative_rate(final_sparsity: float, stages: int = 10) -> float:
    """Fraction p of the survivors each stage removes: (1 - p)^n = 1 - s_f.

    >>> round(iterative_rate(0.8, 10), 4)
    0.1487
    """
    final = check_sparsity(final_sparsity, "final_sparsity")
    stages = _check_positive_int(stages, "stages")
    return 1.0 - (1.0 - final) ** (1.0 / stages)


def iterative_schedule_loop(final_sparsity: float, stages: int = 10) -> list[float]:
    """n stages, each pruning the same fraction p of what is still alive.

    density_0 = 1; density_i = density_{i-1} (1 - p); s_i = 1 - density_i.

    >>> [round(s, 4) for s in iterative_schedule_loop(0.75, stages=2)]
    [0.5, 0.75]
    """
    p = iterative_rate(final_sparsity, stages)
    density, out = 1.0, []
    for _ in range(stages):
        density *= 1.0 - p
        out.append(1.0 - density)
    out[-1] = check_sparsity(final_sparsity, "final_sparsity")  # no float drift at the end
    return out


def iterative_schedule(final_sparsity: float, stages: int = 10) -> list[float]:
    """s_i = 1 - (1 - s_f)^(i/n), i = 1..n (closed form of the loop twin).

    >>> [round(s, 4) for s in iterative_schedule(0.75, stages=2)]
    [0.5, 0.75]
    """
    final = check_sparsity(final_sparsity, "final_sparsity")
    stages = _check_positive_int(stages, "stages")
    i = np.arange(1, stages + 1)  # (n,)
    out = (1.0 - (1.0 - final) ** (i / stages)).tolist()
    out[-1] = final
    return out


def linear_schedule_loop(final_sparsity: float, stages: int = 10, initial_sparsity: float = 0.0) -> list[float]:
    """n equal steps in sparsity: s_i = s_0 + (s_f - s_0) i / n.

    >>> linear_schedule_loop(0.8, stages=4)
    [0.2, 0.4, 0.6000000000000001, 0.8]
    """
    final, initial = _check_pair(final_sparsity, initial_sparsity)
    stages = _check_positive_int(stages, "stages")
    out = []
    for i in range(1, stages + 1):
        out.append(initial + (final - initial) * i / stages)
    out[-1] = final
    return out


def linear_schedule(final_sparsity: float, stages: int = 10, initial_sparsity: float = 0.0) -> list[float]:
    """Vectorised `linear_schedule_loop`.

    >>> [round(s, 2) for s in linear_schedule(0.8, stages=4)]
    [0.2, 0.4, 0.6, 0.8]
    """
    final, initial = _check_pair(final_sparsity, initial_sparsity)
    stages = _check_positive_int(stages, "stages")
    out = (initial + (final - initial) * np.arange(1, stages + 1) / stages).tolist()
    out[-1] = final
    return out


def cubic_schedule_loop(final_sparsity: float, stages: int = 10, initial_sparsity: float = 0.0) -> list[float]:
    """The cubic schedule sampled once per stage, t = 1..n with t0 = 0, dt = 1.

    >>> [round(s, 3) for s in cubic_schedule_loop(0.8, stages=2)]
    [0.7, 0.8]
    """
    stages = _check_positive_int(stages, "stages")
    return cubic_sparsity_loop(list(range(1, stages + 1)), final_sparsity, initial_sparsity, t0=0, n=stages, dt=1)


def cubic_schedule(final_sparsity: float, stages: int = 10, initial_sparsity: float = 0.0) -> list[float]:
    """Vectorised `cubic_schedule_loop`.

    >>> [round(s, 3) for s in cubic_schedule(0.8, stages=4)]
    [0.463, 0.7, 0.788, 0.8]
    """
    stages = _check_positive_int(stages, "stages")
    return cubic_sparsity(list(range(1, stages + 1)), final_sparsity, initial_sparsity, t0=0, n=stages, dt=1)


SCHEDULES = {
    "one-shot": lambda s, stages=1: one_shot_schedule(s),
    "iterative": iterative_schedule,
    "linear": linear_schedule,
    "cubic": cubic_schedule,
}


def make_schedule(kind: str, final_sparsity: float, stages: int = 10) -> list[float]:
    """The stage targets of schedule `kind` ("one-shot", "iterative", "linear", "cubic").

    >>> make_schedule("one-shot", 0.8), len(make_schedule("cubic", 0.8, stages=5))
    ([0.8], 5)
    """
    if kind not in SCHEDULES:
        raise ValueError(f"kind must be one of {sorted(SCHEDULES)}, got {kind!r}")
    return SCHEDULES[kind](final_sparsity, stages=stages)


def plot_schedules(schedules: Mapping[str, Sequence[float]], ax=None, title: str = "Pruning schedules"):
    """Draw {label: [s_1, ..., s_n]} as sparsity (%) against stage, starting from 0 at stage 0.

    Returns the axes.
    """
    import matplotlib.pyplot as plt

    if not isinstance(schedules, Mapping) or not schedules:
        raise TypeError(f"schedules must map names to lists of sparsities, got {type(schedules).__name__}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    markers = "osd^v<>"
    for k, (label, values) in enumerate(schedules.items()):
        values = [0.0] + [float(v) for v in values]
        ax.plot(range(len(values)), [100 * v for v in values], marker=markers[k % len(markers)], drawstyle="steps-post" if len(values) == 2 else "default", label=label)
    ax.set_xlabel("pruning stage")
    ax.set_ylabel("sparsity (% of prunable weights)")
    ax.set_title(title)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


# ---------------------------------------------------------------------------
# Equal budgets: one number of fine-tuning steps, shared among the stages
# ---------------------------------------------------------------------------


def _check_budget(total_steps, stages) -> tuple[int, int]:
    if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)) or total_steps < 0:
        raise ValueError(f"total_steps must be an int >= 0, got {total_steps!r}")
    return int(total_steps), _check_positive_int(stages, "stages")


def split_budget_loop(total_steps: int, stages: int) -> list[int]:
    """Share T fine-tuning steps among n stages: floor(T/n) each, one more for the first T mod n.

    The shares differ by at most one and add up to T exactly, so a 10-stage
    schedule costs what one-shot pruning with T steps of fine-tuning costs.

    >>> split_budget_loop(10, 3)
    [4, 3, 3]
    """
    total_steps, stages = _check_budget(total_steps, stages)
    out = []
    for i in range(stages):
        out.append(total_steps // stages + (1 if i < total_steps % stages else 0))
    return out


def split_budget(total_steps: int, stages: int) -> list[int]:
    """Vectorised `split_budget_loop`.

    >>> split_budget(500, 10)[:3], sum(split_budget(7, 4))
    ([50, 50, 50], 7)
    """
    total_steps, stages = _check_budget(total_steps, stages)
    base, extra = divmod(total_steps, stages)
    return (base + (np.arange(stages) < extra)).astype(int).tolist()  # (stages,)


def prune_and_finetune(
    model: nn.Module,
    schedule: Sequence[float],
    train_loader: Iterable,
    total_steps: int,
    lr: float = 1e-3,
    scope: str = "global",
    exclude: Iterable[str] = (),
    metric_fn: Callable[[nn.Module], float] | None = None,
) -> list[dict]:
    """Prune by magnitude along `schedule`, fine-tuning after each stage, with `total_steps` steps in all.

    Stage i gets `split_budget(total_steps, len(schedule))[i]` optimizer steps
    (a fresh Adam at `lr` each stage; pruned weights stay zero). One-shot
    (`[s_f]`) and a 10-stage schedule therefore spend the same budget. Returns
    the rows of `chapter11.magnitude.iterative_magnitude_pruning`, each with
    the `steps` its fine-tune took.

    >>> torch.manual_seed(0) is not None
    True
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> loader = [(torch.randn(5, 4), torch.randint(0, 2, (5,)))] * 3
    >>> rows = prune_and_finetune(model, [0.5, 0.75], loader, total_steps=5)
    >>> from chapter11.magnitude import masks_sparsity
    >>> from chapter11.masks import masks_of
    >>> [(r["target"], r["steps"]) for r in rows], round(masks_sparsity(masks_of(model)), 2)
    ([(0.5, 3), (0.75, 2)], 0.75)
    """
    check_model(model)
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Iterable):
        raise ValueError(f"schedule must be a non-empty sequence of sparsities, got {schedule!r}")
    schedule = list(schedule)
    budgets = split_budget(total_steps, max(len(schedule), 1))
    lr = _check_real(lr, "lr")  # everything is checked before the first cut
    if not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if train_loader is None or isinstance(train_loader, (str, bytes)) or not isinstance(train_loader, Iterable):
        raise TypeError(f"train_loader must be an iterable of (inputs, labels) batches, got {type(train_loader).__name__}")
    taken = []

    def finetune(m):
        steps = budgets[len(taken)]
        if steps > 0:  # train(max_steps=0) would still take one step
            train(m, train_loader, lr=lr, max_steps=steps, progress_bar=False, desc="fine-tune")
        taken.append(steps)

    rows = iterative_magnitude_pruning(model, schedule, finetune=finetune, metric_fn=metric_fn, scope=scope, exclude=exclude)
    for row, steps in zip(rows, taken):
        row["steps"] = steps
    return rows


