"""Layer sensitivity: how much does pruning one layer alone hurt?

Prune a single layer by magnitude to each sparsity of a grid, with every
other layer left dense, and measure a metric (test accuracy, say). Layers
whose curve stays flat can be pruned hard; layers whose curve falls early
should stay denser. From those curves `allocate_sparsity` picks one sparsity
per layer so that the weights removed reach a global budget,

    sum_l n_l s_l >= budget * sum_l n_l,

with the least total drop sum_l (baseline - metric_l(s_l)). The sum assumes
drops add up across layers, which is only an approximation: the notebook
checks it by pruning with the chosen sparsities and measuring.

Covers: `sensitivity_scan` (with the result's `drops`), `allocate_sparsity`
(exhaustive search over the grid, `_loop` twin in plain loops and a
vectorised numpy twin), `match_budget` (a grid allocation usually overshoots
the budget; this scales it back so that it removes exactly the budget),
`prune_with_allocation`, `plot_sensitivity`.

But: the exhaustive search grows as len(grid) ** layers, so it is meant for
a handful of layers (it refuses more than ~5 million combinations); there is
no fine-tuning inside the scan, and the metric must be "higher is better".
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .magnitude import smallest_mask
from .masks import apply_masks, masks_of, prunable_parameters
from .sparsity import check_model, check_sparsity

__all__ = [
    "SensitivityResult",
    "sensitivity_scan",
    "allocate_sparsity_loop",
    "allocate_sparsity",
    "prune_with_allocation",
    "allocation_sparsity",
    "match_budget",
    "plot_sensitivity",
    "MAX_COMBINATIONS",
]

MAX_COMBINATIONS = 5_000_000


@dataclass
class SensitivityResult:
    """What `sensitivity_scan` measured.

    `metrics[name][j]` is the metric with only layer `name` pruned to
    `sparsities[j]`; `sizes[name]` is that layer's weight count.
    """

    sparsities: list[float]
    baseline: float
    metrics: dict[str, list[float]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def drops(self) -> dict[str, list[float]]:
        """baseline - metric for every layer and grid point (positive = worse)."""
        return {name: [self.baseline - m for m in values] for name, values in self.metrics.items()}


def _check_grid(sparsities) -> list[float]:
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Iterable):
        raise TypeError(f"sparsities must be a sequence of sparsity values, got {type(sparsities).__name__}")
    grid = [check_sparsity(s, "sparsities") for s in sparsities]
    if not grid:
        raise ValueError("sparsities must hold at least one value")
    if any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"sparsities must be strictly increasing, got {grid}")
    return grid


@torch.no_grad()
def sensitivity_scan(model: nn.Module, metric_fn: Callable[[nn.Module], float], sparsities: Sequence[float], exclude: Iterable[str] = ()) -> SensitivityResult:
    """Prune each prunable layer alone to each sparsity and record `metric_fn(model)`.

    The model is restored after every measurement, also when `metric_fn`
    raises (weights and masks are untouched when this returns). Existing
    masks are respected: masked weights rank as the smallest.

    >>> torch.manual_seed(0) is not None
    True
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    >>> result = sensitivity_scan(model, lambda m: float(m[0].weight.abs().sum() > 0), [0.0, 0.5])
    >>> result.metrics, result.sizes
    ({'0.weight': [1.0, 1.0], '1.weight': [1.0, 1.0]}, {'0.weight': 16, '1.weight': 8})
    """
    check_model(model)
    grid = _check_grid(sparsities)
    if not callable(metric_fn):
        raise TypeError(f"metric_fn must be callable (model -> float), got {type(metric_fn).__name__}")
    params = prunable_parameters(model, exclude)
    old_masks = masks_of(model)
    result = SensitivityResult(sparsities=grid, baseline=float(metric_fn(model)))
    for name, param in params.items():
        saved = param.detach().clone()
        scores = param.detach().abs().float()  # same shape as param
        if name in old_masks:
            scores = torch.where(old_masks[name].bool(), scores, torch.full_like(scores, -1.0))
        values = []
        for s in grid:
            mask = smallest_mask(scores, round(s * param.numel())).to(param.dtype)
            param.mul_(mask)
            try:
                values.append(float(metric_fn(model)))
            finally:  # a metric that raises must not leave the layer pruned
                param.copy_(saved)
        result.metrics[name] = values
        result.sizes[name] = param.numel()
    return result


def _allocation_inputs(result: SensitivityResult, budget: float):
    budget = check_sparsity(budget, "budget")
    names = list(result.metrics)
    if not names:
        raise ValueError("result: the scan holds no layers")
    for name in names:  # a NaN drop compares false both ways, so the twins would choose differently
        values = [result.baseline, *result.metrics[name]]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) for v in values):
            raise ValueError(f"result: the metric of {name} (or the baseline) holds NaN or a non-number; rescan with a metric that returns numbers")
        if len(result.metrics[name]) != len(result.sparsities):
            raise ValueError(f"result: {name} has {len(result.metrics[name])} metrics for {len(result.sparsities)} sparsities")
    combos = len(result.sparsities) ** len(names)
    if combos > MAX_COMBINATIONS:
        raise ValueError(f"result: {len(names)} layers x {len(result.sparsities)} grid points = {combos:,} combinations; more than {MAX_COMBINATIONS:,}, so scan fewer layers or a coarser grid")
    if max(result.sparsities) < budget:
        raise ValueError(f"budget {budget} is above the largest scanned sparsity {max(result.sparsities)}; no allocation can reach it")
    return budget, names


def allocate_sparsity_loop(result: SensitivityResult, budget: float) -> dict[str, float]:
    """Per-layer sparsities from the grid with sum_l n_l s_l >= budget * N and least sum of drops.

    Tries every combination in plain loops (itertools.product order). Among
    equally small drops it prefers the higher overall sparsity, then the
    first combination found.

    >>> r = SensitivityResult([0.0, 0.5, 0.9], 1.0, {"a": [1.0, 0.9, 0.2], "b": [1.0, 1.0, 0.95]}, {"a": 100, "b": 100})
    >>> allocate_sparsity_loop(r, 0.6)
    {'a': 0.5, 'b': 0.9}
    """
    budget, names = _allocation_inputs(result, budget)
    drops = result.drops()
    total = sum(result.sizes[n] for n in names)
    need = budget * total - 1e-9 * total
    best, best_key = None, None
    for combo in itertools.product(range(len(result.sparsities)), repeat=len(names)):
        removed = 0.0
        loss = 0.0
        for name, j in zip(names, combo):
            removed += result.sizes[name] * result.sparsities[j]
            loss += drops[name][j]
        if removed < need:
            continue
        key = (loss, -removed)
        if best_key is None or key < best_key:
            best, best_key = combo, key
    return {name: result.sparsities[j] for name, j in zip(names, best)}


def allocate_sparsity(result: SensitivityResult, budget: float) -> dict[str, float]:
    """Vectorised `allocate_sparsity_loop`: the whole grid of combinations as one numpy array.

    >>> r = SensitivityResult([0.0, 0.5, 0.9], 1.0, {"a": [1.0, 0.9, 0.2], "b": [1.0, 1.0, 0.95]}, {"a": 100, "b": 100})
    >>> allocate_sparsity(r, 0.6)
    {'a': 0.5, 'b': 0.9}
    """
    budget, names = _allocation_inputs(result, budget)
    drops = result.drops()
    grid = np.asarray(result.sparsities, dtype=np.float64)  # (G,)
    L, G = len(names), len(grid)
    total = sum(result.sizes[n] for n in names)
    need = budget * total - 1e-9 * total
    removed = np.zeros((G,) * L)  # (G, ..., G), one axis per layer
    loss = np.zeros((G,) * L)
    for axis, name in enumerate(names):
        shape = [1] * L
        shape[axis] = G
        removed = removed + (result.sizes[name] * grid).reshape(shape)
        loss = loss + np.asarray(drops[name], dtype=np.float64).reshape(shape)
    removed, loss = removed.ravel(), loss.ravel()  # (G**L,) in itertools.product order
    feasible = np.flatnonzero(removed >= need)
    # lexsort: last key is primary -> loss first, then -removed, then position
    order = np.lexsort((feasible, -removed[feasible], loss[feasible]))
    best = np.unravel_index(feasible[order[0]], (G,) * L)
    return {name: result.sparsities[int(j)] for name, j in zip(names, best)}


def prune_with_allocation(model: nn.Module, allocation: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Prune each named weight by magnitude to its own sparsity and apply the masks.

    >>> model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    >>> masks = prune_with_allocation(model, {"0.weight": 0.5, "1.weight": 0.0})
    >>> int((masks["0.weight"] == 0).sum()), int((masks["1.weight"] == 0).sum())
    (10, 0)
    """
    check_model(model)
    if not isinstance(allocation, Mapping):
        raise TypeError(f"allocation must map parameter names to sparsities, got {type(allocation).__name__}")
    params = prunable_parameters(model)
    old = masks_of(model)
    masks = {}
    for name, s in allocation.items():
        if name not in params:
            raise ValueError(f"allocation: {name!r} is not a prunable parameter; choose from {sorted(params)}")
        s = check_sparsity(s, f"allocation[{name!r}] sparsity")
        param = params[name]
        scores = param.detach().abs().float()
        if name in old:
            scores = torch.where(old[name].bool(), scores, torch.full_like(scores, -1.0))
        masks[name] = smallest_mask(scores, round(s * param.numel())).to(param.dtype)
        if name in old:
            masks[name] = masks[name] * old[name]
    apply_masks(model, masks)
    return masks


def plot_sensitivity(result: SensitivityResult, ax=None, allocation: Mapping[str, float] | None = None, ylabel: str = "test accuracy", title: str = "Sensitivity: one layer pruned at a time"):
    """One curve per layer (metric vs sparsity %); marks the `allocation` if given (off-grid values on the line between grid points)."""
    import matplotlib.pyplot as plt

    if not isinstance(result, SensitivityResult):
        raise TypeError(f"result must be a SensitivityResult (from sensitivity_scan), got {type(result).__name__}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    xs = [100 * s for s in result.sparsities]
    for name, values in result.metrics.items():
        (line,) = ax.plot(xs, values, marker="o", label=f"{name} ({result.sizes[name]:,} weights)")
        if allocation is not None and name in allocation:
            # a grid value sits on its point; a matched one (`match_budget`) between two, read off the line
            s = allocation[name]
            ax.plot([100 * s], [float(np.interp(s, result.sparsities, values))], marker="*", markersize=16, color=line.get_color(), linestyle="none")
    ax.axhline(result.baseline, color="gray", linestyle="--", label="dense")
    ax.set_xlabel("sparsity of that layer (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(title + ("\n(stars: chosen per-layer sparsity)" if allocation else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def allocation_sparsity(result: SensitivityResult, allocation: Mapping[str, float]) -> float:
    """Overall sparsity of an allocation over the scanned layers, sum n_l s_l / N.

    >>> r = SensitivityResult([0.0, 0.5], 1.0, {"a": [1, 1], "b": [1, 1]}, {"a": 300, "b": 100})
    >>> allocation_sparsity(r, {"a": 0.5, "b": 0.0})
    0.375
    """
    total = sum(result.sizes[n] for n in allocation)
    if total == 0 or math.isnan(total):
        raise ValueError("allocation: names no scanned layer")
    return sum(result.sizes[n] * s for n, s in allocation.items()) / total


def match_budget(result: SensitivityResult, allocation: Mapping[str, float], budget: float) -> dict[str, float]:
    """Scale an allocation so that it removes exactly `round(budget * N)` weights, keeping its shape.

    A grid allocation only guarantees `sum_l n_l s_l >= budget * N`, and with
    a coarse grid it can remove several points more than the budget, which
    would compare a sparser model with a denser one. Every layer's count of
    removed weights is multiplied by the same factor `budget * N / removed`
    and rounded down, and the weights still missing go one each to the
    layers with the largest rounding remainders (ties: the larger layer). So
    a layer the allocation spared stays spared, and a layer it cut hardest
    is still cut hardest. The result is per-layer sparsities `k_l / n_l`
    with `sum_l k_l = round(budget * N)`.

    >>> r = SensitivityResult([0.0, 0.5, 0.9], 1.0, {"a": [1, 1, 1], "b": [1, 1, 1]}, {"a": 100, "b": 100})
    >>> allocation_sparsity(r, {"a": 0.5, "b": 0.9})
    0.7
    >>> m = match_budget(r, {"a": 0.5, "b": 0.9}, 0.6)
    >>> m, allocation_sparsity(r, m)
    ({'a': 0.43, 'b': 0.77}, 0.6)
    """
    budget = check_sparsity(budget, "budget")
    if not isinstance(allocation, Mapping) or not allocation:
        raise ValueError("allocation: must map at least one scanned layer to its sparsity")
    unknown = [n for n in allocation if n not in result.sizes]
    if unknown:
        raise ValueError(f"allocation: {unknown[0]!r} is not a scanned layer; choose from {sorted(result.sizes)}")
    sizes = {n: int(result.sizes[n]) for n in allocation}
    removed = {n: round(check_sparsity(s, f"allocation[{n!r}] sparsity") * sizes[n]) for n, s in allocation.items()}
    want = round(budget * sum(sizes.values()))
    have = sum(removed.values())
    if have < want:
        raise ValueError(f"allocation removes {have} weights, fewer than the budget's {want}: it cannot be scaled up without a new search")
    if have == 0:
        return {n: 0.0 for n in allocation}
    exact = {n: k * want / have for n, k in removed.items()}
    counts = {n: math.floor(x) for n, x in exact.items()}
    missing = want - sum(counts.values())
    for n in sorted(exact, key=lambda n: (-(exact[n] - counts[n]), -sizes[n], n))[:missing]:
        counts[n] += 1
    return {n: counts[n] / sizes[n] for n in allocation}
