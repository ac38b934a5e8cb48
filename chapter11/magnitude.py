"""Magnitude pruning: drop the weights whose absolute value is below a threshold.

The chapter's criterion is a set, M = {w_i : |w_i| < tau}: every weight in M
is set to zero, every other weight is kept. This module turns that set into
0/1 masks, finds the tau that prunes a given fraction, and prunes whole models
either layer by layer (each matrix reaches the target sparsity) or globally
(one tau for all matrices, so layers with many small weights lose more).

Covers: `magnitude_mask`, `threshold_for_sparsity`, `layerwise_magnitude_masks`,
`global_magnitude_masks` and `prune_magnitude`, each with a `_loop` twin
where it is a formula. On inputs without ties the model-level masks are
exactly those of `torch.nn.utils.prune.l1_unstructured` /
`global_unstructured` (see tests/test_magnitude.py).

Sparsity here always means the fraction of the *whole* tensor (or scope) that
is zero, not the fraction of what is left: pruning to 0.5 and then to 0.8
gives 80% zeros in total (torch.nn.utils.prune's `amount` would give 90%).

But: no structured (row/channel) pruning, no gradient or movement scores;
biases, norms and embeddings are never touched unless `prunable_parameters`
lists them.

    >>> import torch
    >>> W = torch.tensor([[0.1, -0.5], [0.3, -0.05]])
    >>> magnitude_mask(W, threshold_for_sparsity(W, 0.5))
    tensor([[0., 1.],
            [1., 0.]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .masks import apply_masks, check_mask, masks_of, prunable_parameters
from .sparsity import check_model, check_sparsity

__all__ = [
    "magnitude_mask_loop",
    "magnitude_mask",
    "threshold_for_sparsity_loop",
    "threshold_for_sparsity",
    "smallest_mask_loop",
    "smallest_mask",
    "layerwise_magnitude_masks",
    "global_magnitude_masks",
    "prune_magnitude",
    "masks_sparsity",
    "iterative_magnitude_pruning",
    "SCOPES",
]

SCOPES = ("global", "layerwise")


def _check_tensor(W, name: str = "W") -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(W.shape)}); there is nothing to prune")
    if W.is_floating_point() and torch.isnan(W).any():
        raise ValueError(f"{name} contains NaN; magnitudes of NaN cannot be ranked")
    return W


def _check_threshold(threshold) -> float:
    if isinstance(threshold, torch.Tensor) and threshold.numel() == 1:
        threshold = threshold.item()
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a real number >= 0, got {type(threshold).__name__}")
    threshold = float(threshold)
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a real number >= 0 (inf prunes everything), got {threshold}")
    return threshold


# ---------------------------------------------------------------------------
# The criterion M = {w_i : |w_i| < tau}
# ---------------------------------------------------------------------------


def magnitude_mask_loop(W: torch.Tensor, threshold: float) -> torch.Tensor:
    """0/1 mask of W that keeps |w| >= tau, one element at a time.

    The chapter's pruned set is M = {w_i : |w_i| < tau}; the mask is 0 on M
    and 1 elsewhere. A weight exactly at tau is kept.

    >>> magnitude_mask_loop(torch.tensor([0.2, -0.7, 0.5]), 0.5)
    tensor([0., 1., 1.])
    """
    W = _check_tensor(W)
    tau = _check_threshold(threshold)
    values = W.detach().flatten().tolist()
    mask = []
    for w in values:
        mask.append(0.0 if abs(w) < tau else 1.0)
    return torch.tensor(mask, dtype=W.dtype if W.is_floating_point() else torch.float32).reshape(W.shape)


def magnitude_mask(W: torch.Tensor, threshold: float) -> torch.Tensor:
    """0/1 mask of W that keeps |w| >= tau (vectorised `magnitude_mask_loop`).

    >>> magnitude_mask(torch.tensor([[0.2, -0.7], [0.5, 0.0]]), 0.5)
    tensor([[0., 1.],
            [1., 0.]])
    """
    W = _check_tensor(W)
    tau = _check_threshold(threshold)
    dtype = W.dtype if W.is_floating_point() else torch.float32
    return (W.detach().abs() >= tau).to(dtype)  # same shape as W


# ---------------------------------------------------------------------------
# The tau that prunes a given fraction
# ---------------------------------------------------------------------------


def _count_to_prune(n: int, sparsity: float) -> int:
    """round(sparsity * n), the count torch.nn.utils.prune uses for a float amount."""
    return round(sparsity * n)


def threshold_for_sparsity_loop(W: torch.Tensor, sparsity: float) -> float:
    """The tau for which M = {|w| < tau} holds round(sparsity * n) weights.

    Sort the magnitudes a_1 <= ... <= a_n and let k = round(sparsity * n).
    Then tau = a_{k+1}, the smallest magnitude that survives (tau = 0 when
    k = 0, tau = inf when k = n). Ties: if a_k == a_{k+1}, every weight tied
    at tau is kept, so fewer than k weights are pruned; the achieved sparsity
    never exceeds the target. Use `smallest_mask` when an exact count matters.

    >>> threshold_for_sparsity_loop(torch.tensor([0.4, -0.1, 0.3, 0.2]), 0.5)
    0.30000001192092896
    """
    W = _check_tensor(W)
    sparsity = check_sparsity(sparsity, "sparsity")
    magnitudes = sorted(abs(w) for w in W.detach().flatten().tolist())
    n = len(magnitudes)
    k = _count_to_prune(n, sparsity)
    if k == 0:
        return 0.0
    if k >= n:
        return math.inf
    return float(magnitudes[k])  # 0-based index k is a_{k+1}


def threshold_for_sparsity(W: torch.Tensor, sparsity: float) -> float:
    """Vectorised `threshold_for_sparsity_loop`: tau = a_{k+1} of the sorted |W|.

    >>> W = torch.tensor([0.4, -0.1, 0.3, 0.2])
    >>> tau = threshold_for_sparsity(W, 0.5)
    >>> round(tau, 3), magnitude_mask(W, tau).tolist()
    (0.3, [1.0, 0.0, 1.0, 0.0])
    """
    W = _check_tensor(W)
    sparsity = check_sparsity(sparsity, "sparsity")
    n = W.numel()
    k = _count_to_prune(n, sparsity)
    if k == 0:
        return 0.0
    if k >= n:
        return math.inf
    # kthvalue is 1-based: the (k+1)-th smallest magnitude
    return float(torch.kthvalue(W.detach().abs().flatten().float(), k + 1).values)


# ---------------------------------------------------------------------------
# Exact-count selection (what the model-level pruners use)
# ---------------------------------------------------------------------------


def _check_scores(scores) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a tensor, got {type(scores).__name__}")
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise ValueError(f"scores contain NaN ({int(torch.isnan(scores).sum())} of {scores.numel()}); NaN cannot be ranked")
    return scores


def smallest_mask_loop(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask that zeroes exactly the k smallest scores (ties: lower index first).

    Selection sort in plain Python: repeatedly take the smallest remaining
    score. Same result as `smallest_mask`.

    >>> smallest_mask_loop(torch.tensor([0.3, 0.1, 0.1, 0.5]), 2)
    tensor([1., 0., 0., 1.])
    """
    _check_scores(scores)
    values = scores.detach().flatten().tolist()
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(values):
        raise ValueError(f"k must be an int between 0 and {len(values)}, got {k!r}")
    mask = [1.0] * len(values)
    for _ in range(k):
        best = None
        for i, v in enumerate(values):
            if mask[i] == 1.0 and (best is None or v < values[best]):
                best = i
        mask[best] = 0.0
    return torch.tensor(mask).reshape(scores.shape)


def smallest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 float mask that zeroes exactly the k smallest scores, vectorised.

    A stable sort breaks ties by position, so the result is deterministic and
    equals `smallest_mask_loop`.

    >>> smallest_mask(torch.tensor([[0.3, 0.1], [0.1, 0.5]]), 2)
    tensor([[1., 0.],
            [0., 1.]])
    """
    flat = _check_scores(scores).detach().flatten()  # (n,)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= flat.numel():
        raise ValueError(f"k must be an int between 0 and {flat.numel()}, got {k!r}")
    order = torch.sort(flat, stable=True).indices  # (n,) ascending
    mask = torch.ones(flat.numel(), dtype=torch.float32, device=flat.device)
    mask[order[:k]] = 0.0
    return mask.reshape(scores.shape)


def _scores(model: nn.Module, name: str, param: torch.Tensor) -> torch.Tensor:
    """|w|, with already-masked weights pushed below every real magnitude (-1)."""
    if param.is_floating_point() and torch.isnan(param).any():
        raise ValueError(f"model: the weights of {name} contain NaN; magnitudes of NaN cannot be ranked")
    old = masks_of(model).get(name)
    scores = param.detach().abs().float()  # same shape as param
    if old is not None:
        scores = torch.where(old.bool(), scores, torch.full_like(scores, -1.0))
    return scores


def _respect_old(model: nn.Module, name: str, mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """New mask times the existing one, so a mask can only shrink."""
    old = masks_of(model).get(name)
    if old is not None:
        mask = mask * old.to(mask.dtype)
    return mask.to(dtype=param.dtype, device=param.device)


def layerwise_magnitude_masks(model: nn.Module, sparsity: float, exclude: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """{param_name: mask} pruning the smallest-|w| `sparsity` fraction of each matrix.

    Each prunable weight (see `chapter11.masks.prunable_parameters`) gets
    k = round(sparsity * numel) zeros. Weights already masked rank below
    every magnitude, and the result is multiplied into the old mask, so
    pruning again to a higher sparsity only removes more. Does not modify
    `model`; `prune_magnitude` applies the masks.

    >>> layer = nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[0.1, -0.5], [0.3, -0.05]]))
    >>> layerwise_magnitude_masks(layer, 0.5)["weight"]
    tensor([[0., 1.],
            [1., 0.]])
    """
    check_model(model)
    sparsity = check_sparsity(sparsity, "sparsity")
    masks = {}
    for name, param in prunable_parameters(model, exclude).items():
        scores = _scores(model, name, param)
        mask = smallest_mask(scores, _count_to_prune(param.numel(), sparsity))
        masks[name] = _respect_old(model, name, mask, param)
    return masks


def global_magnitude_masks(model: nn.Module, sparsity: float, exclude: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """{param_name: mask} with one tau across all prunable weights.

    The k = round(sparsity * total) smallest magnitudes over every prunable
    matrix together are pruned, so layer sparsities differ: layers whose
    weights are small (usually the big ones) lose more.

    >>> model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Linear(1, 2, bias=False))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(torch.tensor([[0.1, 0.2]]))
    ...     _ = model[1].weight.copy_(torch.tensor([[0.9], [0.05]]))
    >>> {k: v.tolist() for k, v in global_magnitude_masks(model, 0.5).items()}
    {'0.weight': [[0.0, 1.0]], '1.weight': [[1.0], [0.0]]}
    """
    check_model(model)
    sparsity = check_sparsity(sparsity, "sparsity")
    params = prunable_parameters(model, exclude)
    scores = [_scores(model, name, p).flatten() for name, p in params.items()]
    flat = torch.cat([s.cpu() for s in scores])  # (total,)
    flat_mask = smallest_mask(flat, _count_to_prune(flat.numel(), sparsity))  # (total,)
    masks, start = {}, 0
    for name, param in params.items():
        piece = flat_mask[start : start + param.numel()].reshape(param.shape)
        start += param.numel()
        masks[name] = _respect_old(model, name, piece, param)
    return masks


def prune_magnitude(model: nn.Module, sparsity: float, scope: str = "global", exclude: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Compute magnitude masks (`scope` "global" or "layerwise") and apply them.

    Returns the masks; the model's weights are zeroed in place and each mask
    is stored as a `<param>_mask` buffer (see `chapter11.masks.apply_masks`).

    >>> torch.manual_seed(0) is not None
    True
    >>> model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    >>> masks = prune_magnitude(model, 0.8, scope="layerwise")
    >>> [round(1 - float(m.mean()), 2) for m in masks.values()]
    [0.8, 0.8]
    """
    check_model(model)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    fn = global_magnitude_masks if scope == "global" else layerwise_magnitude_masks
    masks = fn(model, sparsity, exclude)
    apply_masks(model, masks)
    return masks


def masks_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of zeros over all masks together; every mask must hold only 0 and 1.

    >>> masks_sparsity({"a": torch.tensor([0., 1.]), "b": torch.tensor([0., 0., 1., 1.])})
    0.5
    >>> masks_sparsity({"a": torch.tensor([0., 2.])})
    Traceback (most recent call last):
    ...
    ValueError: mask for masks['a'] must hold only 0 and 1, found 2
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must map parameter names to 0/1 tensors, got {type(masks).__name__}")
    for name, mask in masks.items():
        check_mask(mask, mask, f"masks[{name!r}]")
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        raise ValueError("masks: no mask elements, so the sparsity is undefined")
    kept = sum(float(m.sum()) for m in masks.values())
    return 1.0 - kept / total


def iterative_magnitude_pruning(
    model: nn.Module,
    schedule: Sequence[float],
    finetune: Callable[[nn.Module], object] | None = None,
    metric_fn: Callable[[nn.Module], float] | None = None,
    scope: str = "global",
    exclude: Iterable[str] = (),
) -> list[dict[str, float]]:
    """Prune to each target of `schedule` in turn, fine-tuning after each stage.

    For every stage: `prune_magnitude(model, s, scope, exclude)`, then
    `finetune(model)` (skipped when None), then `metric_fn(model)`. Returns
    one dict per stage with the target, the achieved sparsity over the
    prunable weights, and the metric measured right after pruning
    ("pruned") and after fine-tuning ("finetuned"). The schedule must not
    decrease: a mask never un-prunes.

    >>> torch.manual_seed(0) is not None
    True
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> rows = iterative_magnitude_pruning(model, [0.25, 0.5], metric_fn=lambda m: 1.0)
    >>> [(r["target"], r["sparsity"]) for r in rows]
    [(0.25, 0.25), (0.5, 0.5)]
    """
    check_model(model)
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or not schedule:
        raise ValueError(f"schedule must be a non-empty sequence of sparsities, got {schedule!r}")
    targets = [check_sparsity(s, "schedule sparsity") for s in schedule]
    if any(b < a for a, b in zip(targets, targets[1:])):
        raise ValueError(f"schedule must not decrease (a mask never un-prunes), got {targets}")
    for name, fn in (("finetune", finetune), ("metric_fn", metric_fn)):  # refuse before the first cut, not after it
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable (model -> ...) or None, got {type(fn).__name__}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    prunable_parameters(model, exclude)  # a model with nothing to prune, or a bad exclude, fails here
    rows = []
    for s in targets:
        masks = prune_magnitude(model, s, scope=scope, exclude=exclude)
        row = {"target": s, "sparsity": masks_sparsity(masks)}
        if metric_fn is not None:
            row["pruned"] = float(metric_fn(model))
        if finetune is not None:
            finetune(model)
            if metric_fn is not None:
                row["finetuned"] = float(metric_fn(model))
        rows.append(row)
    return rows
