"""Movement pruning (Sanh et al., 2020): prune the weights that fine-tuning pushes toward zero.

Sign convention, stated once and used everywhere in this module. With the
loss gradient G^(t) = dL/dW at step t, the movement score is

    S = - sum_t G^(t) * W^(t)                                  (Sanh et al., eq. 4)

and the weights with the *smallest* S are pruned. A weight that gradient
descent pushes toward zero has G and W of the same sign, so G*W > 0 and its
score falls. The chapter writes m_i = sum_t g_i^(t) w_i^(t) and prunes the
smallest m_i: that is the same rule only if g is the update direction
(minus the gradient), g = -G. Read g as the raw gradient and the rule flips:
it would prune the weights moving *away* from zero. `sign_example` shows both
readings on two weights.

Four criteria share one layer, `MaskedLinear`, which multiplies its weight by
a 0/1 mask on every forward pass:

- "magnitude": keep the largest |W| (the baseline, no learned scores);
- "hard": hard movement pruning, keep the top-k of learned scores S; the mask
  passes gradients straight through (straight-through estimator), so
  dL/dS = dL/dW' * W with W' = W * M, and with plain SGD the scores are
  exactly lr * (the movement scores above) (tested);
- "soft": soft movement pruning, keep sigmoid(S) > threshold and add an L1
  penalty lambda * mean(sigmoid(S)) to the loss; the sparsity is whatever the
  penalty reaches, so always report `masked_sparsity(model)`;
- "mixed": keep the top-k of alpha * z(|W|) + (1 - alpha) * z(S), where z
  standardises a score within its layer (the chapter's "mixed objectives").

`wrap_linears` swaps chosen `nn.Linear` layers of any model (a `transformers`
BERT, say) for `MaskedLinear` in place; `finalize` swaps them back for plain
`nn.Linear` layers holding the zeros, so the result saves, loads and exports
like any model. `fine_prune` runs the experiment: fine-tune while the target
sparsity follows the cubic schedule of `chapter11.schedules.cubic_sparsity`.

But: unstructured masks only (no block or head movement pruning), one global
sparsity target shared by every wrapped layer (each layer keeps the same
fraction, as in the paper's local top-k), no distillation teacher, and a
pruned weight costs as much as a kept one until a sparse format
(`chapter11.csr`) or structured pruning makes use of the zeros.

    >>> import torch
    >>> from torch import nn
    >>> layer = MaskedLinear.from_linear(nn.Linear(4, 2), method="magnitude", sparsity=0.5)
    >>> int(layer.mask().sum())
    4
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .sparsity import check_amount, check_sparsity

__all__ = [
    "METHODS",
    "movement_scores_loop",
    "movement_scores",
    "sign_example",
    "topk_mask_loop",
    "topk_mask",
    "threshold_mask_loop",
    "threshold_mask",
    "global_threshold_loop",
    "global_threshold",
    "global_topk_masks",
    "standardize",
    "mixed_scores_loop",
    "mixed_scores",
    "soft_penalty_loop",
    "soft_penalty",
    "TopKSTE",
    "ThresholdSTE",
    "StraightThrough",
    "MaskedLinear",
    "encoder_linear_names",
    "wrap_linears",
    "masked_layers",
    "set_sparsity",
    "masked_sparsity",
    "finalize",
    "keep_encoder_layers",
    "minilm_classifier",
    "DocstringTask",
    "docstring_task",
    "FinePruneConfig",
    "FinePruneResult",
    "evaluate_classifier",
    "fine_prune",
    "GridSettings",
    "run_one",
    "run_grid",
    "grid_summaries",
    "FULL_RUN_NAME",
    "grid_log_path",
    "full_run",
    "first_cut",
    "FIRST_CUT_NAME",
    "first_cut_run",
    "SOURCE_PARTS",
    "stdlib_source_files",
    "stdlib_source",
    "spread_windows",
    "lm_windows",
    "lower_hidden",
    "TopBlocks",
    "hidden_perplexity",
    "AdaptResult",
    "adapt_top_blocks",
    "LMSettings",
    "LMData",
    "LM_TEXTS",
    "lm_texts",
    "lm_data",
    "lm_perplexities",
    "run_lm_one",
    "step_times",
    "run_lm_grid",
    "LM_FULL_RUN_NAME",
    "lm_full_run",
]

METHODS = ("magnitude", "hard", "soft", "mixed")


# ---------------------------------------------------------------------------
# Movement scores and their sign
# ---------------------------------------------------------------------------


def _check_history(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    if isinstance(weights, torch.Tensor) or isinstance(grads, torch.Tensor):
        raise TypeError("weights and grads must be sequences of tensors, one per step (use [W] for a single step)")
    if len(weights) == 0:
        raise ValueError("weights must hold at least one step, got an empty sequence")
    if len(weights) != len(grads):
        raise ValueError(f"weights and grads must have one entry per step, got {len(weights)} weights and {len(grads)} grads")
    shape = tuple(weights[0].shape)
    for t, (w, g) in enumerate(zip(weights, grads)):
        if tuple(w.shape) != shape or tuple(g.shape) != shape:
            raise ValueError(f"step {t}: weights and grads must all have shape {shape}, got {tuple(w.shape)} and {tuple(g.shape)}")


def movement_scores_loop(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """S_i = - sum_t G_i^(t) * W_i^(t), one step and one weight at a time.

    `grads` are loss gradients dL/dW (not update directions). Equivalent to
    the chapter's m_i = sum_t g_i^(t) w_i^(t) with g = -dL/dW. Smallest S is
    pruned first.

    >>> movement_scores_loop([torch.tensor([1.0, 1.0])], [torch.tensor([0.5, -0.5])])
    tensor([-0.5000,  0.5000])
    """
    _check_history(weights, grads)
    flat = [0.0] * weights[0].numel()
    for w, g in zip(weights, grads):
        for i, (wi, gi) in enumerate(zip(w.detach().flatten().tolist(), g.detach().flatten().tolist())):
            flat[i] -= gi * wi
    return torch.tensor(flat, dtype=weights[0].dtype).reshape(weights[0].shape)


def movement_scores(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Vectorised `movement_scores_loop`: S = -sum_t G^(t) * W^(t).

    >>> W = [torch.tensor([2.0, -1.0]), torch.tensor([1.5, -1.5])]
    >>> G = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])]
    >>> movement_scores(W, G)  # first weight shrinks toward 0, second grows away
    tensor([-3.5000,  2.5000])
    """
    _check_history(weights, grads)
    W = torch.stack([w.detach() for w in weights])  # (T, *shape)
    G = torch.stack([g.detach() for g in grads])  # (T, *shape)
    return -(G * W).sum(dim=0)  # (*shape)


def sign_example(lr: float = 0.1, steps: int = 3) -> dict[str, torch.Tensor]:
    """Two weights, both at +1.0, trained by SGD on L = 0.5*w1 - 0.5*w2.

    dL/dw = (+0.5, -0.5) at every step: w1 shrinks toward 0, w2 grows. The
    returned dict holds the weight and gradient history and three scores:
    `sanh` (S = -sum G*W: w1 lowest, pruned, correct), `chapter_update`
    (m = sum g*w with g = -G, the update direction: identical to `sanh`) and
    `chapter_raw_gradient` (m = sum G*W with the raw gradient: the signs flip
    and the rule would prune w2, the weight moving away from zero).

    >>> ex = sign_example(lr=0.1, steps=2)
    >>> [round(v, 3) for v in ex["weights"][-1].tolist()]
    [0.9, 1.1]
    >>> [round(v, 3) for v in ex["sanh"].tolist()]
    [-0.975, 1.025]
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    w = torch.tensor([1.0, 1.0], requires_grad=True)  # (2,)
    direction = torch.tensor([0.5, -0.5])  # dL/dw, constant
    weights, grads = [], []
    for _ in range(steps):
        loss = (direction * w).sum()
        (g,) = torch.autograd.grad(loss, w)
        weights.append(w.detach().clone())
        grads.append(g.clone())
        with torch.no_grad():
            w -= lr * g
    weights.append(w.detach().clone())  # final weights, for display
    history_w, history_g = weights[:-1], grads
    sanh = movement_scores(history_w, history_g)
    update = [-g for g in history_g]  # g in the chapter = update direction
    chapter_update = torch.stack([u * v for u, v in zip(update, history_w)]).sum(0)
    chapter_raw = torch.stack([g * v for g, v in zip(history_g, history_w)]).sum(0)
    return {
        "weights": weights,
        "grads": history_g,
        "sanh": sanh,
        "chapter_update": chapter_update,
        "chapter_raw_gradient": chapter_raw,
    }


# ---------------------------------------------------------------------------
# Masks from scores
# ---------------------------------------------------------------------------


def _num_pruned(n: int, sparsity: float) -> int:
    """round(sparsity * n) weights pruned, as torch.nn.utils.prune counts a float amount."""
    return check_amount(check_sparsity(sparsity, "sparsity"), n)


def _check_scores(scores, name: str = "scores") -> torch.Tensor:
    """Refuse what cannot be ranked: a non-tensor, or NaN (which top-k would rank as largest)."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN ({int(torch.isnan(scores).sum())} of {scores.numel()}); NaN scores cannot be ranked")
    return scores


def topk_mask_loop(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the n - round(sparsity * n) largest scores, by repeated selection.

    Ties go to the lower index. Same result as `topk_mask` when scores differ.

    >>> topk_mask_loop(torch.tensor([0.3, -1.0, 2.0, 0.1]), 0.5)
    tensor([1., 0., 1., 0.])
    """
    values = _check_scores(scores).detach().flatten().tolist()
    keep = len(values) - _num_pruned(len(values), sparsity)
    mask = [0.0] * len(values)
    for _ in range(keep):
        best = None
        for i, v in enumerate(values):
            if mask[i] == 0.0 and (best is None or v > values[best]):
                best = i
        mask[best] = 1.0
    return torch.tensor(mask, dtype=torch.float32).reshape(scores.shape)


def topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Vectorised `topk_mask_loop`: a 0/1 mask keeping exactly the top-k scores.

    >>> topk_mask(torch.tensor([[0.3, -1.0], [2.0, 0.1]]), 0.5)
    tensor([[1., 0.],
            [1., 0.]])
    """
    flat = _check_scores(scores).detach().flatten()  # (n,)
    keep = flat.numel() - _num_pruned(flat.numel(), sparsity)
    mask = torch.zeros_like(flat, dtype=torch.float32)  # (n,)
    if keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = 1.0
    return mask.reshape(scores.shape)


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must be a number strictly between 0 and 1 (it is compared with sigmoid(scores)), got {threshold!r}")
    return float(threshold)


def threshold_mask_loop(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Soft movement's mask: M_i = 1 if sigmoid(S_i) > threshold, one score at a time.

    >>> threshold_mask_loop(torch.tensor([-2.0, 0.0, 0.5]), 0.5)
    tensor([0., 0., 1.])
    """
    tau = _check_threshold(threshold)
    _check_scores(scores)
    out = [1.0 if 1.0 / (1.0 + math.exp(-s)) > tau else 0.0 for s in scores.detach().flatten().tolist()]
    return torch.tensor(out, dtype=torch.float32).reshape(scores.shape)


def threshold_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Vectorised `threshold_mask_loop`.

    >>> threshold_mask(torch.tensor([[-2.0, 0.0], [0.5, 3.0]]), 0.5)
    tensor([[0., 0.],
            [1., 1.]])
    """
    tau = _check_threshold(threshold)
    _check_scores(scores)
    return (torch.sigmoid(scores.detach().float()) > tau).float()  # same shape as scores


def _check_score_list(score_tensors) -> list[torch.Tensor]:
    if isinstance(score_tensors, torch.Tensor) or not isinstance(score_tensors, Sequence) or len(score_tensors) == 0:
        raise TypeError("score_tensors must be a non-empty sequence of tensors (one per layer)")
    return [_check_scores(S, f"score_tensors[{i}]") for i, S in enumerate(score_tensors)]


def global_threshold_loop(score_tensors: Sequence[torch.Tensor], sparsity: float) -> float:
    """The cut c such that `S > c` keeps all but the round(sparsity * N) smallest scores of all layers.

    N counts the scores of every tensor together: one threshold for the
    whole model, so layers end up with different sparsities (soft movement's
    global threshold). c is the k-th smallest score, k = round(sparsity * N);
    k = 0 gives -inf (keep everything). Scores tied with c are all pruned.

    >>> global_threshold_loop([torch.tensor([0.3, -1.0]), torch.tensor([2.0, 0.1])], 0.5)
    0.10000000149011612
    """
    tensors = _check_score_list(score_tensors)
    values = [v for S in tensors for v in S.detach().flatten().tolist()]
    k = _num_pruned(len(values), sparsity)
    if k == 0:
        return -math.inf
    for _ in range(k - 1):  # drop the k - 1 smallest, one at a time
        values.remove(min(values))
    return min(values)


def _kth_smallest(flat: torch.Tensor, k: int) -> float:
    """The k-th smallest value of a 1-D tensor (1 <= k <= n), exactly; same as `torch.kthvalue`.

    For large tensors a strided sample brackets the answer and `kthvalue`
    runs only on the values inside the bracket (about 4x faster on 10M
    scores); if the bracket misses, it falls back to the full `kthvalue`.
    """
    n = flat.numel()
    if n > 1_000_000:
        sample = flat[::64]  # (m,)
        m, q = sample.numel(), k / n
        margin = 5 * math.sqrt(q * (1 - q) / m) + 2 / m  # in quantile units: 5 standard errors
        lo = torch.kthvalue(sample, max(1, int((q - margin) * m))).values
        hi = torch.kthvalue(sample, min(m, math.ceil((q + margin) * m))).values
        below = int((flat < lo).sum())
        band = flat[(flat >= lo) & (flat <= hi)]  # (b,)
        if below < k <= below + band.numel():
            return float(torch.kthvalue(band, k - below).values)
    return float(torch.kthvalue(flat, k).values)


def _global_cut(score_tensors: Sequence[torch.Tensor], sparsity: float) -> tuple[torch.Tensor, int, float]:
    """(all scores as one flat tensor, how many to prune, the cut)."""
    if isinstance(score_tensors, torch.Tensor) or not isinstance(score_tensors, Sequence) or len(score_tensors) == 0:
        raise TypeError("score_tensors must be a non-empty sequence of tensors (one per layer)")
    for i, S in enumerate(score_tensors):
        if not isinstance(S, torch.Tensor):
            raise TypeError(f"score_tensors[{i}] must be a torch.Tensor, got {type(S).__name__}")
    flat = torch.cat([S.detach().flatten().float() for S in score_tensors])  # (N,)
    _check_scores(flat, "score_tensors")
    k = _num_pruned(flat.numel(), sparsity)
    return flat, k, (-math.inf if k == 0 else _kth_smallest(flat, k))


def global_threshold(score_tensors: Sequence[torch.Tensor], sparsity: float) -> float:
    """Vectorised `global_threshold_loop` (one k-th value over all layers' scores).

    >>> c = global_threshold([torch.tensor([[0.3, -1.0]]), torch.tensor([2.0, 0.1, 5.0])], 0.4)
    >>> c, [int((S > c).sum()) for S in (torch.tensor([[0.3, -1.0]]), torch.tensor([2.0, 0.1, 5.0]))]
    (0.10000000149011612, [1, 2])
    """
    return _global_cut(score_tensors, sparsity)[2]


def global_topk_masks(score_tensors: Sequence[torch.Tensor], sparsity: float, return_cut: bool = False):
    """0/1 masks, one per tensor, that prune exactly the round(sparsity * N) smallest scores of all tensors.

    The same choice as `topk_mask` on all the scores concatenated (ties at
    the cut keep the lower index, in concatenation order), computed with one
    k-th value instead of a top-k over N values. `return_cut=True` returns
    `(masks, cut)`.

    >>> [m.tolist() for m in global_topk_masks([torch.tensor([0.3, -1.0]), torch.tensor([2.0, 0.1, 0.1])], 0.4)]
    [[1.0, 0.0], [1.0, 1.0, 0.0]]
    """
    flat, k, cut = _global_cut(score_tensors, sparsity)
    keep = flat > cut  # (N,) bool
    extra = int((~keep).sum()) - k  # > 0 only when scores tie at the cut
    if extra > 0:
        tied = torch.nonzero(flat == cut).flatten()  # ascending indices
        keep[tied[:extra]] = True
    masks, start = [], 0
    for S in score_tensors:
        masks.append(keep[start:start + S.numel()].reshape(S.shape).float())
        start += S.numel()
    return (masks, cut) if return_cut else masks


def standardize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(x - mean) / std over the whole tensor; all-equal input gives zeros.

    >>> standardize(torch.tensor([1.0, 2.0, 3.0]))
    tensor([-1.,  0.,  1.])
    """
    x = x.detach().float()
    std = x.std(unbiased=True) if x.numel() > 1 else x.new_tensor(0.0)
    return (x - x.mean()) / (std + eps) if std > 0 else torch.zeros_like(x)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1] (weight of the magnitude term), got {alpha!r}")
    return float(alpha)


def mixed_scores_loop(weight: torch.Tensor, scores: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """alpha * z(|W|) + (1 - alpha) * z(S), with z(x) = (x - mean) / std, in plain loops.

    >>> mixed_scores_loop(torch.tensor([1.0, -3.0, 2.0]), torch.tensor([3.0, 1.0, 2.0]), alpha=0.75)
    tensor([-0.5000,  0.5000,  0.0000])
    """
    alpha = _check_alpha(alpha)
    if weight.shape != scores.shape:
        raise ValueError(f"weight and scores must have the same shape, got {tuple(weight.shape)} and {tuple(scores.shape)}")

    def z(values):
        n = len(values)
        mean = sum(values) / n
        var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
        std = math.sqrt(var)
        return [(v - mean) / (std + 1e-12) if std > 0 else 0.0 for v in values]

    mags = z([abs(v) for v in weight.detach().flatten().tolist()])
    movs = z(scores.detach().flatten().tolist())
    out = [alpha * a + (1 - alpha) * b for a, b in zip(mags, movs)]
    return torch.tensor(out, dtype=torch.float32).reshape(weight.shape)


def mixed_scores(weight: torch.Tensor, scores: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Vectorised `mixed_scores_loop`.

    >>> mixed_scores(torch.tensor([1.0, -3.0, 2.0]), torch.tensor([0.0, 0.0, 0.0]), alpha=0.5)
    tensor([-0.5000,  0.5000,  0.0000])
    """
    alpha = _check_alpha(alpha)
    if weight.shape != scores.shape:
        raise ValueError(f"weight and scores must have the same shape, got {tuple(weight.shape)} and {tuple(scores.shape)}")
    return alpha * standardize(weight.abs()) + (1 - alpha) * standardize(scores)  # same shape as weight


def soft_penalty_loop(score_tensors: Sequence[torch.Tensor]) -> float:
    """L1 penalty of soft movement: mean over layers of mean_i sigmoid(S_i), in loops.

    sigmoid(S) > 0, so its L1 norm is its sum; dividing by the count makes
    layers of different sizes weigh the same.

    >>> round(soft_penalty_loop([torch.tensor([0.0, 0.0]), torch.tensor([100.0])]), 3)
    0.75
    """
    if len(score_tensors) == 0:
        raise ValueError("score_tensors must hold at least one tensor")
    per_layer = []
    for S in score_tensors:
        values = [1.0 / (1.0 + math.exp(-s)) for s in S.detach().flatten().tolist()]
        per_layer.append(sum(values) / len(values))
    return sum(per_layer) / len(per_layer)


def soft_penalty(score_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Vectorised, differentiable `soft_penalty_loop` (a 0-d tensor to add to the loss).

    >>> round(float(soft_penalty([torch.tensor([0.0, 0.0]), torch.tensor([100.0])])), 3)
    0.75
    """
    if len(score_tensors) == 0:
        raise ValueError("score_tensors must hold at least one tensor")
    return torch.stack([torch.sigmoid(S).mean() for S in score_tensors]).mean()


# ---------------------------------------------------------------------------
# Straight-through estimators
# ---------------------------------------------------------------------------


class TopKSTE(torch.autograd.Function):
    """Forward: `topk_mask(scores, sparsity)`. Backward: the gradient passes unchanged to the scores."""

    @staticmethod
    def forward(ctx, scores, sparsity):
        return topk_mask(scores, sparsity).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_mask):
        return grad_mask, None


class ThresholdSTE(torch.autograd.Function):
    """Forward: `threshold_mask(scores, threshold)`. Backward: straight through, as in Sanh et al.'s code."""

    @staticmethod
    def forward(ctx, scores, threshold):
        return threshold_mask(scores, threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_mask):
        return grad_mask, None


class StraightThrough(torch.autograd.Function):
    """Forward: a given 0/1 `mask`, returned exactly. Backward: the gradient goes to `scores` unchanged.

    The trick `mask + scores - scores.detach()` has the same gradient but its
    value is rounded: 1 + 0.3 - 0.3 is 0.99999994 in float32. This returns
    the mask itself.

    >>> s = torch.tensor([0.3, -2.0], requires_grad=True)
    >>> m = StraightThrough.apply(s, torch.tensor([1.0, 0.0]))
    >>> m.tolist(), torch.autograd.grad((m * torch.tensor([2.0, 3.0])).sum(), s)[0].tolist()
    ([1.0, 0.0], [2.0, 3.0])
    """

    @staticmethod
    def forward(ctx, scores, mask):
        return mask.to(scores.dtype).clone()

    @staticmethod
    def backward(ctx, grad_mask):
        return grad_mask, None


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------


class MaskedLinear(nn.Module):
    """A drop-in `nn.Linear` whose weight is multiplied by a mask on every forward pass.

    `method` picks the criterion (see the module docstring). `weight` and
    `bias` are the wrapped layer's own parameters (shared, not copied);
    "hard", "soft" and "mixed" add a learned `scores` parameter of the
    weight's shape. Set `sparsity` (top-k methods) or `threshold` (soft) at
    any time, or `set_sparsity(model, s)` for all layers (soft layers then
    share one global cut on the scores); `mask()` gives the current 0/1 mask
    without gradients.

    `mask` (optional): an earlier 0/1 mask, e.g. a magnitude mask from
    `chapter11.masks`. It is kept as the buffer `weight_mask` (the name
    `chapter11.masks` uses, so `MaskedOptimizer` and checkpoints see it) and
    multiplies every mask this layer makes: those weights stay pruned
    whatever the criterion says, and they are the first counted toward the
    target sparsity (a layer never has fewer zeros than its old mask).

    >>> torch.manual_seed(0) is not None
    True
    >>> layer = MaskedLinear.from_linear(nn.Linear(3, 2), method="hard", sparsity=0.5)
    >>> layer(torch.ones(1, 3)).shape, tuple(layer.scores.shape), int(layer.mask().sum())
    (torch.Size([1, 2]), (2, 3), 3)
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        method: str = "hard",
        sparsity: float = 0.0,
        threshold: float = 0.5,
        alpha: float = 0.5,
        score_init: float | None = None,
        mask: torch.Tensor | None = None,
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise TypeError(f"weight must be a 2-D nn.Parameter (out_features, in_features), got {type(weight).__name__}")
        self.method = method
        self.weight = weight  # (out_features, in_features)
        self.bias = bias  # (out_features,) or None
        self.out_features, self.in_features = weight.shape
        self.sparsity = check_sparsity(sparsity, "sparsity")
        self.threshold = _check_threshold(threshold)
        self.cut: float | None = None  # soft: the global cut of the last set_sparsity (then `chosen` overrides threshold)
        self.register_buffer("chosen", None, persistent=False)  # soft: the exact 0/1 mask set_sparsity chose
        self.alpha = _check_alpha(alpha)
        if mask is not None:
            from .masks import check_mask

            mask = check_mask(mask, weight, "mask")  # exact 0/1, weight's shape, dtype and device
            self.register_buffer("weight_mask", mask.clone())
            with torch.no_grad():
                weight.copy_(torch.where(mask.bool(), weight, torch.zeros_like(weight)))
        if method == "magnitude":
            self.scores = None
        else:
            if score_init is None:
                score_init = 1.0 if method == "soft" else 0.0  # soft: sigmoid(1) = 0.73 > 0.5, all kept at first
            self.scores = nn.Parameter(torch.full_like(weight.detach(), float(score_init)))  # (out, in)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str = "hard", **kwargs) -> "MaskedLinear":
        """Wrap an existing `nn.Linear`, sharing its weight and bias (and keeping its `weight_mask`, if any)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if hasattr(linear, "weight_orig"):
            raise TypeError("linear carries torch.nn.utils.prune's reparametrisation (weight_orig); "
                            "convert it first with chapter11.masks.from_torch_prune")
        old = getattr(linear, "weight_mask", None)
        if old is not None and "mask" not in kwargs:
            kwargs["mask"] = old
        return cls(linear.weight, linear.bias, method=method, **kwargs)

    @property
    def fixed_mask(self) -> torch.Tensor | None:
        """The earlier mask this layer was given (`weight_mask`), or None."""
        return getattr(self, "weight_mask", None)

    def ranking(self) -> torch.Tensor:
        """What the criterion ranks, with -inf where the fixed mask already pruned (same shape as weight).

        magnitude: |W|; hard and soft: the scores S (with their gradient);
        mixed: alpha * z(|W|) + (1 - alpha) * z(S) (no gradient).
        """
        if self.method == "magnitude":
            values = self.weight.detach().abs()  # (out, in)
        elif self.method == "mixed":
            values = mixed_scores(self.weight, self.scores, self.alpha)  # (out, in)
        else:
            values = self.scores  # (out, in)
        fixed = self.fixed_mask
        return values if fixed is None else values.masked_fill(fixed == 0, -math.inf)

    def _mask_with_grad(self) -> torch.Tensor:
        ranked = self.ranking()  # (out, in)
        if self.method == "magnitude":
            mask = topk_mask(ranked, self.sparsity).to(self.weight.dtype)  # no gradient to |W| through the mask
        elif self.method == "hard":
            mask = TopKSTE.apply(ranked, self.sparsity)
        elif self.method == "soft" and self.chosen is None:
            mask = ThresholdSTE.apply(ranked, self.threshold)
        elif self.method == "soft":
            mask = StraightThrough.apply(self.scores, self.chosen)  # chosen across layers by set_sparsity
        else:  # mixed: select on the combined criterion, pass the gradient straight to the scores
            mask = StraightThrough.apply(self.scores, topk_mask(ranked, self.sparsity))  # value exactly 0/1
        fixed = self.fixed_mask
        return mask if fixed is None else mask * fixed  # 0/1 times 0/1 stays exact

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """The current 0/1 mask, shape (out_features, in_features)."""
        return self._mask_with_grad().detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pruned = self.weight * self._mask_with_grad()  # (out, in) W' = W * M
        return F.linear(x, pruned, self.bias)  # (..., out)

    def extra_repr(self) -> str:
        if self.method == "soft":
            extra = f", threshold={self.threshold}" if self.cut is None else f", cut={self.cut:.4g}"
        else:
            extra = f", sparsity={self.sparsity:.3f}"
        fixed = ", with an earlier mask" if self.fixed_mask is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method!r}{extra}{fixed}"


# ---------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------


def encoder_linear_names(model: nn.Module) -> list[str]:
    """Names of the `nn.Linear` layers inside a module called `encoder` (not embeddings, pooler or head).

    For a BERT-style model these are the query/key/value/output projections
    and the two feed-forward layers of every encoder block.

    >>> class Toy(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.encoder = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    ...         self.classifier = nn.Linear(2, 3)
    >>> encoder_linear_names(Toy())
    ['encoder.0', 'encoder.2']
    """
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, (nn.Linear, MaskedLinear)) and "encoder" in parts[:-1]:
            names.append(name)
    if not names:
        raise ValueError(f"model: {type(model).__name__} has no nn.Linear inside a submodule named 'encoder'; pass names=... explicitly")
    return names


def wrap_linears(model: nn.Module, method: str = "hard", names: Iterable[str] | None = None, **kwargs) -> list[str]:
    """Replace the named `nn.Linear` layers of `model` with `MaskedLinear`, in place.

    `names` defaults to `encoder_linear_names(model)`. Extra keyword
    arguments (sparsity, threshold, alpha, score_init) go to `MaskedLinear`.
    A layer that already holds a mask (`weight_mask`, from
    `chapter11.masks.apply_masks` or `prune_magnitude`) keeps it: its pruned
    weights stay pruned through training and `finalize`. Returns the
    wrapped names.

    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> wrap_linears(model, "magnitude", names=["0"], sparsity=0.25)
    ['0']
    >>> type(model[0]).__name__, int(model[0].mask().sum())
    ('MaskedLinear', 12)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    names = encoder_linear_names(model) if names is None else ([names] if isinstance(names, str) else list(names))
    if not names:
        raise ValueError("names must list at least one nn.Linear layer")
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"names: unknown layer {name!r}")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"names: layer {name!r} is a {type(module).__name__}, not an nn.Linear")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MaskedLinear.from_linear(modules[name], method=method, **kwargs))
    return names


def masked_layers(model: nn.Module) -> dict[str, MaskedLinear]:
    """{name: MaskedLinear} for every wrapped layer of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MaskedLinear)}


@torch.no_grad()
def set_sparsity(model: nn.Module, sparsity: float) -> None:
    """Set the target sparsity of every `MaskedLinear` of `model`.

    Top-k layers (magnitude, hard, mixed) each keep their own top
    (1 - sparsity) share. Soft layers share one cut on the scores
    (`global_threshold`; `global_topk_masks` breaks ties), so that together
    they prune exactly round(sparsity * N) of their N weights; each soft
    layer then has its own sparsity. Soft masks are chosen from the scores
    as they are now and kept until the next call: call again after the
    scores change (fine-pruning does, before every step and at the end).
    """
    sparsity = check_sparsity(sparsity, "sparsity")
    layers = masked_layers(model)
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no MaskedLinear layers; call wrap_linears first")
    soft = [layer for layer in layers.values() if layer.method == "soft"]
    for layer in layers.values():
        layer.sparsity = sparsity
    if soft:
        ranked = [layer.ranking().detach() for layer in soft]
        masks, cut = global_topk_masks(ranked, sparsity, return_cut=True)
        for layer, chosen in zip(soft, masks):
            layer.cut = cut
            layer.chosen = chosen.to(layer.scores.dtype)


@torch.no_grad()
def masked_sparsity(model: nn.Module) -> float:
    """Fraction of masked-out weights over all `MaskedLinear` layers (what a run actually reached)."""
    layers = masked_layers(model)
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no MaskedLinear layers")
    zeros = sum(int((layer.mask() == 0).sum()) for layer in layers.values())
    total = sum(layer.weight.numel() for layer in layers.values())
    return zeros / total


@torch.no_grad()
def finalize(model: nn.Module) -> dict[str, torch.Tensor]:
    """Swap every `MaskedLinear` back for a plain `nn.Linear` holding W where M = 1 and 0 elsewhere, in place.

    Kept weights are copied, never multiplied, so they come back bit for bit.
    Returns the masks by parameter name (`"encoder.0.weight"`), ready for
    `chapter11.masks.apply_masks` if the zeros must stay zero in later
    training. A layer that was wrapped with an earlier mask (`weight_mask`)
    gets its `weight_mask` back, now the product of the old mask and the new
    one, so `MaskedOptimizer` keeps every pruned weight at zero.

    >>> model = nn.Sequential(nn.Linear(4, 2))
    >>> _ = wrap_linears(model, "magnitude", names=["0"], sparsity=0.5)
    >>> masks = finalize(model)
    >>> type(model[0]).__name__, int((model[0].weight == 0).sum()), list(masks)
    ('Linear', 4, ['0.weight'])
    """
    layers = masked_layers(model)
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no MaskedLinear layers to finalize")
    masks = {}
    for name, layer in layers.items():
        mask = layer.mask()  # (out, in), exactly 0/1
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device, dtype=layer.weight.dtype)
        linear.weight.copy_(torch.where(mask.bool(), layer.weight, torch.zeros_like(layer.weight)))  # no rescaling
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        if layer.fixed_mask is not None:
            linear.register_buffer("weight_mask", mask.clone())
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
        masks[f"{name}.weight"] = mask
    return masks


# ---------------------------------------------------------------------------
# Experiment 3: data, model size, fine-pruning loop
# ---------------------------------------------------------------------------


def keep_encoder_layers(model: nn.Module, n: int) -> nn.Module:
    """Keep only the first `n` pretrained blocks of a BERT-style encoder, in place (a CPU-budget cut)."""
    base = getattr(model, "bert", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"model: {type(model).__name__} has no encoder.layer ModuleList to cut")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(layers):
        raise ValueError(f"n must be an int between 1 and {len(layers)}, got {n!r}")
    base.encoder.layer = layers[:n]
    model.config.num_hidden_layers = n
    return model


def minilm_classifier(num_labels: int, layers: int = 6, freeze_word_embeddings: bool = True, seed: int = 0) -> nn.Module:
    """Pretrained all-MiniLM-L6-v2 with a fresh head, cut to its first `layers` blocks.

    Freezing the 30,522 x 384 word-embedding table (never pruned here) saves
    an Adam update of 11.7M numbers per step. `seed` fixes the fresh head.
    """
    from .models import load_minilm
    from .train import seed_everything

    seed_everything(seed)
    model, _ = load_minilm(num_labels=num_labels)
    keep_encoder_layers(model, layers)
    if freeze_word_embeddings:
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    return model


@dataclass
class DocstringTask:
    """Tokenised stdlib-docstring classification: which package a docstring comes from.

    `val` (optional) is for every choice (steps, penalties); `test` is
    reported once, at the end.
    """

    train: torch.utils.data.TensorDataset  # (input_ids (N, T), attention_mask (N, T), labels (N,))
    test: torch.utils.data.TensorDataset
    class_names: list[str]
    train_counts: list[int]
    test_counts: list[int]
    val: torch.utils.data.TensorDataset | None = None
    val_counts: list[int] | None = None


def docstring_task(tokenizer, max_length: int = 32, max_per_class: int | None = 120, test_per_class: int = 30,
                   packages: Sequence[str] | None = None, seed: int = 0, val_per_class: int = 0) -> DocstringTask:
    """Split `chapter11.data.stdlib_docstrings` per class into train, validation and test, then tokenise.

    Each class gives its first `test_per_class` (shuffled) docstrings to the
    test set, the next `val_per_class` to the validation set and the rest,
    up to `max_per_class` in all, to the training set. Texts are cut to
    `max_length` tokens.
    """
    from .data import DEFAULT_PACKAGES, stdlib_docstrings

    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
        raise ValueError(f"max_length must be an int >= 4, got {max_length!r}")
    if isinstance(test_per_class, bool) or not isinstance(test_per_class, int) or test_per_class < 1:
        raise ValueError(f"test_per_class must be a positive int, got {test_per_class!r}")
    if isinstance(val_per_class, bool) or not isinstance(val_per_class, int) or val_per_class < 0:
        raise ValueError(f"val_per_class must be an int >= 0, got {val_per_class!r}")
    texts, labels, names = stdlib_docstrings(packages=tuple(packages or DEFAULT_PACKAGES), max_per_class=max_per_class, seed=seed)
    split = {"train": ([], []), "val": ([], []), "test": ([], [])}
    seen = [0] * len(names)
    for text, label in zip(texts, labels):
        part = "test" if seen[label] < test_per_class else "val" if seen[label] < test_per_class + val_per_class else "train"
        seen[label] += 1
        split[part][0].append(text)
        split[part][1].append(label)
    for label, n in enumerate(seen):
        if n <= test_per_class + val_per_class:
            raise ValueError(f"test_per_class={test_per_class} and val_per_class={val_per_class} leave no training "
                             f"example for class {names[label]!r} ({n} docstrings)")

    def encode(part):
        x, y = split[part]
        enc = tokenizer(x, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(y))

    counts = {p: [split[p][1].count(k) for k in range(len(names))] for p in split}
    val = encode("val") if val_per_class else None
    return DocstringTask(encode("train"), encode("test"), list(names), counts["train"], counts["test"],
                         val, counts["val"] if val_per_class else None)


@dataclass(frozen=True)
class FinePruneConfig:
    """Hyperparameters of one fine-pruning run (defaults: the committed notebook size)."""

    steps: int = 100  # optimizer steps in all
    batch_size: int = 16
    lr: float = 1e-4  # AdamW on the model's weights
    head_lr: float = 1e-3  # the fresh classification head learns faster
    score_lr: float = 1e-2  # AdamW on the movement scores (hard, soft, mixed), as in Sanh et al.
    warmup_frac: float = 0.1  # cubic schedule: dense for this fraction of the steps ...
    ramp_frac: float = 0.6  # ... then reaches the final sparsity over this fraction, then holds it
    penalty: float = 0.0  # soft movement: final lambda of the L1 penalty (ramped with the schedule)
    alpha: float = 0.5  # mixed: weight of the magnitude term
    seed: int = 0  # fixes the order of the training batches

    def schedule(self, step: int, final_sparsity: float) -> float:
        """The sparsity at `step`: cubic (Zhu & Gupta) after warm-up, the same for every method.

        >>> cfg = FinePruneConfig(steps=100)
        >>> [round(cfg.schedule(t, 0.9), 4) for t in (0, 10, 40, 70, 100)]
        [0.0, 0.0, 0.7875, 0.9, 0.9]
        """
        from .schedules import cubic_sparsity

        return cubic_sparsity(step, final_sparsity, t0=int(self.warmup_frac * self.steps),
                              n=max(1, int(self.ramp_frac * self.steps)))

    def penalty_at(self, step: int) -> float:
        """Soft movement's lambda at `step`: `penalty` times the schedule's progress (0 -> 1)."""
        return self.penalty * self.schedule(step, 0.5) / 0.5


@dataclass
class FinePruneResult:
    method: str
    target_sparsity: float | None
    sparsity: float  # achieved, over the wrapped layers
    accuracy: float  # test accuracy, measured once at the end
    penalty: float | None = None  # soft movement's final lambda
    val_accuracy: float | None = None  # at the end, when the task has a validation split
    losses: list[float] = field(default_factory=list)
    sparsity_trace: list[float] = field(default_factory=list)  # achieved sparsity every few steps
    trace_steps: list[int] = field(default_factory=list)
    val_trace: list[float] = field(default_factory=list)  # validation accuracy at val_steps
    val_steps: list[int] = field(default_factory=list)


def _classifier_logits(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=attn)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset, batch_size: int = 64) -> float:
    """Accuracy of a (input_ids, attention_mask) -> logits classifier on a TensorDataset."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for ids, attn, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        logits = _classifier_logits(model, ids.to(device), attn.to(device))  # (B, classes)
        correct += int((logits.argmax(-1).cpu() == y).sum())
    return correct / len(dataset)


def _check_method(model: nn.Module, method: str | None, config) -> dict[str, MaskedLinear]:
    if method is not None and method not in METHODS:
        raise ValueError(f"method must be None (dense) or one of {METHODS}, got {method!r}")
    layers = masked_layers(model)
    if method is not None and not layers:
        raise ValueError("model has no MaskedLinear layers; call wrap_linears(model, method) first")
    if method is not None and any(layer.method != method for layer in layers.values()):
        raise ValueError(f"method={method!r} but the model's MaskedLinear layers use {sorted({l.method for l in layers.values()})}")
    if method == "soft" and not config.penalty > 0:
        raise ValueError(f"soft movement needs config.penalty > 0 (its L1 penalty), got {config.penalty}")
    if method == "mixed":
        for layer in layers.values():
            layer.alpha = _check_alpha(config.alpha)
    return layers


def _optimizer(model: nn.Module, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW without weight decay; wrapped in `MaskedOptimizer` when the model holds earlier masks."""
    from .masks import MaskedOptimizer, masks_of

    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    return MaskedOptimizer(optimizer, model) if masks_of(model) else optimizer


def fine_prune(model: nn.Module, task: DocstringTask, method: str | None, final_sparsity: float = 0.0,
               config: FinePruneConfig = FinePruneConfig(), trace_every: int = 10,
               eval_every: int | None = None) -> FinePruneResult:
    """Fine-tune `model` on `task` while pruning its wrapped layers; `method=None` fine-tunes dense.

    Every method follows the same schedule, s_t = `config.schedule(t,
    final_sparsity)` (cubic, after a dense warm-up), set before every step
    with `set_sparsity`: top-k methods per layer, soft movement through one
    global cut on its scores, so all four reach the target exactly and differ
    only in their scores. Soft movement also adds lambda_t *
    `soft_penalty(scores)` to the loss, lambda_t = `config.penalty_at(t)`.
    `eval_every` records validation accuracy along the way (needs
    `task.val`). The model is left wrapped (call `finalize` afterwards) and
    in eval mode.
    """
    final = check_sparsity(final_sparsity, "final_sparsity")
    layers = _check_method(model, method, config)
    if eval_every is not None and task.val is None:
        raise ValueError("eval_every needs a task with a validation split (docstring_task(..., val_per_class=...))")
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(task.train, batch_size=config.batch_size, shuffle=True, generator=generator, drop_last=True)
    scores = [layer.scores for layer in layers.values() if layer.scores is not None]
    score_ids = {id(s) for s in scores}
    head, body = [], []
    for name, p in model.named_parameters():
        if id(p) in score_ids or not p.requires_grad:
            continue
        (head if name.startswith(("classifier", "bert.pooler")) else body).append(p)
    optimizer = _optimizer(model, [{"params": body, "lr": config.lr}, {"params": head, "lr": config.head_lr},
                                   {"params": scores, "lr": config.score_lr, "weight_decay": 0.0}])
    result = FinePruneResult(method or "dense", final if method is not None else None, 0.0, 0.0,
                             penalty=config.penalty if method == "soft" else None)
    device = next(model.parameters()).device
    step = 0
    while step < config.steps:
        for ids, attn, y in loader:
            ids, attn, y = ids.to(device), attn.to(device), y.to(device)
            model.train()
            if method is not None:
                set_sparsity(model, config.schedule(step, final))
            loss = F.cross_entropy(_classifier_logits(model, ids, attn), y)
            result.losses.append(loss.item())
            if method == "soft":
                loss = loss + config.penalty_at(step) * soft_penalty(scores)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if method is not None and (step % trace_every == 0 or step == config.steps):
                result.trace_steps.append(step)
                result.sparsity_trace.append(masked_sparsity(model))
            if eval_every is not None and (step % eval_every == 0 or step == config.steps):
                if method is not None:
                    set_sparsity(model, config.schedule(step, final))
                result.val_steps.append(step)
                result.val_trace.append(evaluate_classifier(model, task.val))
            if step >= config.steps:
                break
    if method is not None:
        set_sparsity(model, config.schedule(step, final))  # soft: the cut for the final scores
    model.eval()
    result.sparsity = masked_sparsity(model) if layers else 0.0
    if task.val is not None:
        result.val_accuracy = result.val_trace[-1] if result.val_steps[-1:] == [step] else evaluate_classifier(model, task.val)
    result.accuracy = evaluate_classifier(model, task.test)
    return result


# ---------------------------------------------------------------------------
# Experiment 3 at full size: every method x sparsity x seed, with a resumable log
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GridSettings:
    """Everything that defines the Experiment 3 grid (`run_grid`); the recorded JSON stores it."""

    layers: int = 6  # all of MiniLM's pretrained blocks
    max_length: int = 16  # tokens per docstring (32 doubles the cost; see the notebook for what 16 reaches)
    max_per_class: int = 120  # 9 balanced classes
    test_per_class: int = 30  # 270 test docstrings, reported once
    val_per_class: int = 20  # 180 validation docstrings, for every choice
    steps: int = 150  # optimizer steps per run (batch 16: about 3.8 epochs of 630 docstrings)
    batch_size: int = 16
    lr: float = 1e-4
    head_lr: float = 1e-3
    score_lr: float = 1e-2
    warmup_frac: float = 0.1
    ramp_frac: float = 0.6
    alpha: float = 0.5  # mixed: weight of the magnitude term
    sparsities: tuple[float, ...] = (0.5, 0.9, 0.97)
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    penalties: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)  # soft movement's lambda: candidates, chosen on validation
    penalty_sparsity: float = 0.97  # ... at this sparsity, with the first seed
    dense_long_steps: int = 200  # one longer dense run (first seed) shows where the plateau is; 0 skips it
    eval_every: int = 25  # validation accuracy along the dense runs

    def config(self, seed: int, penalty: float = 0.0, steps: int | None = None) -> FinePruneConfig:
        return FinePruneConfig(steps=steps or self.steps, batch_size=self.batch_size, lr=self.lr, head_lr=self.head_lr,
                               score_lr=self.score_lr, warmup_frac=self.warmup_frac, ramp_frac=self.ramp_frac,
                               penalty=penalty, alpha=self.alpha, seed=seed)

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _run_key(method: str | None, sparsity: float, seed: int, penalty: float, steps: int) -> str:
    return f"{method or 'dense'}|{sparsity:g}|{seed}|{penalty:g}|{steps}"


def run_one(task: DocstringTask, settings: GridSettings, method: str | None, sparsity: float, seed: int,
            penalty: float = 0.0, steps: int | None = None, eval_every: int | None = None, device=None) -> dict:
    """One fine-pruning run of the grid from fresh pretrained weights; a JSON-ready record.

    `device` defaults to `chapter11.train.default_device()`.
    """
    import time

    from .train import default_device

    model = minilm_classifier(len(task.class_names), layers=settings.layers, seed=seed).to(device or default_device())
    if method is not None:
        wrap_linears(model, method)
    config = settings.config(seed, penalty if method == "soft" else 0.0, steps)
    wall, cpu = time.perf_counter(), time.process_time()
    r = fine_prune(model, task, method, sparsity if method is not None else 0.0, config, eval_every=eval_every)
    return {
        "key": _run_key(method, sparsity if method is not None else 0.0, seed, config.penalty, config.steps),
        "method": r.method, "target": sparsity if method is not None else 0.0, "seed": seed, "steps": config.steps,
        "penalty": config.penalty, "sparsity": r.sparsity, "val": r.val_accuracy, "test": r.accuracy,
        "final_loss": sum(r.losses[-10:]) / len(r.losses[-10:]),
        "val_steps": r.val_steps, "val_trace": r.val_trace,
        "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
    }


def _read_logs(log_path) -> dict[str, dict]:
    """Finished runs from `log_path` and its worker logs (`<stem>.w<i>.jsonl` next to it)."""
    import json
    from pathlib import Path

    done: dict[str, dict] = {}
    log_path = Path(log_path)
    for path in sorted(log_path.parent.glob(log_path.stem + "*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["key"]] = rec
    return done


def run_grid(settings: GridSettings = GridSettings(), log_path=None, progress=print, worker: int = 0,
             workers: int = 1, poll_s: float = 30.0) -> dict:
    """Run Experiment 3's grid; returns {"penalty", "penalty_search", "dense_long", "runs"}.

    Order: the long dense run, soft movement's lambda search on validation
    (first seed, `penalty_sparsity`), then seed by seed the dense reference
    and every method x sparsity with the chosen lambda. Each finished run is
    appended to `log_path` (JSON lines) and skipped when the same run is
    found there, so an interrupted grid resumes where it stopped.

    `workers > 1` splits the runs between that many processes started with
    `worker = 0 .. workers - 1` and the same `log_path`: each runs every
    `workers`-th run and logs to `<stem>.w<worker>.jsonl`; soft movement
    waits (polling every `poll_s` seconds) until the lambda search is
    complete. A last call with `workers=1` finds everything done and
    assembles the result.
    """
    import json
    import time
    from pathlib import Path

    from .models import load_minilm

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1 or not 0 <= worker < workers:
        raise ValueError(f"need 0 <= worker < workers, got worker={worker!r}, workers={workers!r}")
    if workers > 1 and log_path is None:
        raise ValueError("workers > 1 needs a log_path to share finished runs")
    done = _read_logs(log_path) if log_path is not None else {}
    own_log = None
    if log_path is not None:
        log_path = Path(log_path)
        own_log = log_path if workers == 1 else log_path.with_name(f"{log_path.stem}.w{worker}.jsonl")
    _, tokenizer = load_minilm()
    task = docstring_task(tokenizer, max_length=settings.max_length, max_per_class=settings.max_per_class,
                          test_per_class=settings.test_per_class, val_per_class=settings.val_per_class)
    first = settings.seeds[0]
    # every run of the grid, in order; soft runs other than the lambda search wait for the chosen lambda
    plan: list[tuple] = []
    if settings.dense_long_steps:
        plan.append(("dense_long", None, 0.0, first, 0.0, settings.dense_long_steps, settings.eval_every))
    if "soft" in settings.methods:
        plan += [("search", "soft", settings.penalty_sparsity, first, lam, None, None) for lam in settings.penalties]
    for seed in settings.seeds:
        plan.append(("run", None, 0.0, seed, 0.0, None, settings.eval_every))
        for sparsity in sorted(settings.sparsities, reverse=True):
            plan += [("run", method, sparsity, seed, None, None, None) for method in settings.methods]

    def key(method, sparsity, seed, penalty, steps):
        return _run_key(method, sparsity if method is not None else 0.0, seed, penalty if method == "soft" else 0.0,
                        steps or settings.steps)

    def chosen_penalty(wait: bool):
        while True:
            found = {**_read_logs(log_path), **done} if log_path is not None else done
            search = [found.get(key("soft", settings.penalty_sparsity, first, lam, None)) for lam in settings.penalties]
            if all(search):
                return max(search, key=lambda r: (r["val"], -r["penalty"]))["penalty"], search  # ties: smaller lambda
            if not wait:
                raise RuntimeError("the lambda search is not finished")
            time.sleep(poll_s)

    for index, (kind, method, sparsity, seed, penalty, steps, eval_every) in enumerate(plan):
        if index % workers != worker:
            continue
        if penalty is None:
            penalty = chosen_penalty(wait=True)[0] if method == "soft" else 0.0
        k = key(method, sparsity, seed, penalty, steps)
        if k in done:
            continue
        rec = run_one(task, settings, method, sparsity, seed, penalty, steps, eval_every)
        done[k] = rec
        if own_log is not None:
            own_log.parent.mkdir(parents=True, exist_ok=True)
            with open(own_log, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if progress:
            progress(f"{k}: sparsity {rec['sparsity']:.4f} val {rec['val']:.3f} test {rec['test']:.3f} "
                     f"({rec['wall_s']:.0f} s wall, {rec['cpu_s']:.0f} s CPU)")
    if workers > 1:
        return {}
    out = {"dense_long": None, "penalty_search": [], "runs": [], "penalty": None}
    if "soft" in settings.methods:
        out["penalty"], out["penalty_search"] = chosen_penalty(wait=False)
    for kind, method, sparsity, seed, penalty, steps, _ in plan:
        if kind == "search":
            continue
        if penalty is None:
            penalty = out["penalty"] if method == "soft" else 0.0
        rec = done[key(method, sparsity, seed, penalty, steps)]
        if kind == "dense_long":
            out["dense_long"] = rec
        else:
            out["runs"].append(rec)
    return out


def grid_summaries(runs: Sequence[dict], metric: str = "test") -> dict[str, dict[float, object]]:
    """{method: {target sparsity: chapter11.stats.Summary of `metric` over seeds}} from `run_grid`'s runs.

    >>> rs = [{"method": "hard", "target": 0.9, "test": v} for v in (0.5, 0.6, 0.7)]
    >>> f"{grid_summaries(rs)['hard'][0.9]:.2f}"
    '0.60 ± 0.10'
    """
    from .stats import summarize

    values: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        values.setdefault(r["method"], {}).setdefault(float(r["target"]), []).append(float(r[metric]))
    return {m: {s: summarize(v) for s, v in sorted(by.items())} for m, by in values.items()}


FULL_RUN_NAME = "03_movement_vs_magnitude"


def grid_log_path(settings: GridSettings = GridSettings()):
    """build/03_movement_vs_magnitude.<hash of the settings>.runs.jsonl: one log per setting, never mixed."""
    import hashlib
    import json

    from .report import FULL_RUNS

    digest = hashlib.sha1(json.dumps(settings.as_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return FULL_RUNS.parent.parent / "build" / f"{FULL_RUN_NAME}.{digest}.runs.jsonl"


def full_run(settings: GridSettings = GridSettings(), command: str = "python -m chapter11.movement", log_path=None) -> dict:
    """Run the whole grid and record it with `chapter11.report.save_full_run` (benchmarks/full/03_movement_vs_magnitude.json).

    The recorded `seconds` cover only this call; `wall_s_all_runs` and
    `cpu_s_all_runs` add up every run, also those found in the log.
    """
    import time

    from .report import load_full_run, save_full_run

    if log_path is None:
        log_path = grid_log_path(settings)
    start = time.perf_counter()
    results = run_grid(settings, log_path=log_path)
    cpu = sum(r["cpu_s"] for r in [results["dense_long"], *results["penalty_search"], *results["runs"]] if r)
    results["cpu_s_all_runs"] = round(cpu, 1)
    results["wall_s_all_runs"] = round(sum(r["wall_s"] for r in [results["dense_long"], *results["penalty_search"], *results["runs"]] if r), 1)
    save_full_run(FULL_RUN_NAME, results, settings.as_dict(), command, time.perf_counter() - start)
    return load_full_run(FULL_RUN_NAME)



MORE_SEEDS_NAME = "03_more_seeds_97"


def more_seeds_settings() -> GridSettings:
    """The grid's settings for three more seeds (3, 4, 5), at 97% only, magnitude and soft movement.

    Soft movement's lambda is fixed at 1, the value the grid chose on
    validation (its only candidate here, so the "search" is the seed-3 run).
    """
    return GridSettings(seeds=(3, 4, 5), sparsities=(0.97,), methods=("magnitude", "soft"), penalties=(1.0,),
                        dense_long_steps=0)


def more_seeds_run(worker: int = 0, workers: int = 1,
                   command: str = "python -m chapter11.movement more-seeds") -> dict | None:
    """Run `more_seeds_settings()` (resumable log under build/); the last call (workers=1) records
    benchmarks/full/03_more_seeds_97.json. Does soft movement's lead at 97% survive three more seeds?"""
    import time

    from .report import load_full_run, save_full_run

    settings = more_seeds_settings()
    start = time.perf_counter()
    results = run_grid(settings, log_path=grid_log_path(settings), worker=worker, workers=workers)
    if workers > 1:
        return None
    results["cpu_s_all_runs"] = round(sum(r["cpu_s"] for r in [*results["penalty_search"], *results["runs"]]), 1)
    save_full_run(MORE_SEEDS_NAME, results, settings.as_dict(), command, time.perf_counter() - start)
    return load_full_run(MORE_SEEDS_NAME)


# ---------------------------------------------------------------------------
# Why movement breaks the network where pruning starts: the first cut, scored four ways
# ---------------------------------------------------------------------------


@torch.no_grad()
def _val_loss_accuracy(model: nn.Module, dataset) -> tuple[float, float]:
    model.eval()
    device = next(model.parameters()).device
    ids, attn, y = (t.to(device) for t in dataset.tensors)
    logits = _classifier_logits(model, ids, attn)  # (N, classes)
    return F.cross_entropy(logits, y).item(), float((logits.argmax(-1) == y).float().mean())


def first_cut(task: DocstringTask, settings: GridSettings, seed: int = 0, warmup_steps: int | None = None,
              sparsities: Sequence[float] = (0.01, 0.03, 0.1)) -> dict:
    """Validation loss and accuracy after the first cut, with the weights chosen four ways.

    Fine-tunes a hard-movement model for the schedule's warm-up (nothing
    pruned yet; scores learn as in `fine_prune`) while also summing Sanh et
    al.'s eq. 4 exactly, S = -sum_t G * W. Then, with no further training,
    prunes each layer to each sparsity by: the learned scores ("movement"),
    the exact sums ("movement_eq4"), |W| ("magnitude") and a random order
    ("random"). Returns {"dense": (loss, acc), "movement": {s: (loss, acc)}, ...,
    "removed_abs_w": {kind: {s: mean |W| of the removed weights / mean |W| of all}}}.
    """
    config = settings.config(seed)
    steps = int(config.warmup_frac * config.steps) if warmup_steps is None else warmup_steps
    model = minilm_classifier(len(task.class_names), layers=settings.layers, seed=seed)
    wrap_linears(model, "hard")
    layers = masked_layers(model)
    scores = [layer.scores for layer in layers.values()]
    score_ids = {id(s) for s in scores}
    head, body = [], []
    for name, p in model.named_parameters():
        if id(p) not in score_ids and p.requires_grad:
            (head if name.startswith(("classifier", "bert.pooler")) else body).append(p)
    optimizer = _optimizer(model, [{"params": body, "lr": config.lr}, {"params": head, "lr": config.head_lr},
                                   {"params": scores, "lr": config.score_lr}])
    loader = torch.utils.data.DataLoader(task.train, batch_size=config.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed), drop_last=True)
    eq4 = {name: torch.zeros_like(layer.weight) for name, layer in layers.items()}
    set_sparsity(model, 0.0)
    step = 0
    while step < steps:
        for ids, attn, y in loader:
            model.train()
            loss = F.cross_entropy(_classifier_logits(model, ids, attn), y)
            optimizer.zero_grad()
            loss.backward()
            for name, layer in layers.items():
                eq4[name] -= layer.weight.grad * layer.weight.detach()  # S = -sum_t G * W
            optimizer.step()
            step += 1
            if step >= steps:
                break
    learned = {name: layer.scores.detach().clone() for name, layer in layers.items()}
    g = torch.Generator().manual_seed(seed)
    orders = {"movement": learned, "movement_eq4": eq4,
              "magnitude": {name: layer.weight.detach().abs() for name, layer in layers.items()},
              "random": {name: torch.rand(layer.weight.shape, generator=g) for name, layer in layers.items()}}
    out = {"steps": steps, "dense": _val_loss_accuracy(model, task.val), "removed_abs_w": {}}
    mean_abs = (sum(float(layer.weight.detach().abs().sum()) for layer in layers.values())
                / sum(layer.weight.numel() for layer in layers.values()))
    for kind, ranking in orders.items():
        out[kind], out["removed_abs_w"][kind] = {}, {}
        for name, layer in layers.items():
            layer.scores.data.copy_(ranking[name])
        for s in sparsities:
            set_sparsity(model, s)
            out[kind][s] = _val_loss_accuracy(model, task.val)
            removed = [(layer.weight.detach().abs() * (1 - layer.mask())).sum() for layer in layers.values()]
            count = sum(int((layer.mask() == 0).sum()) for layer in layers.values())
            out["removed_abs_w"][kind][s] = float(sum(removed)) / max(count, 1) / mean_abs  # mean |W| removed / mean |W|
    return out


FIRST_CUT_NAME = "03_first_cut"


def first_cut_run(settings: GridSettings = GridSettings(), command: str = "python -m chapter11.movement first-cut",
                  sparsities: Sequence[float] = (0.01, 0.03, 0.1)) -> dict:
    """`first_cut` for every seed of `settings`, recorded in benchmarks/full/03_first_cut.json."""
    import time

    from .models import load_minilm
    from .report import load_full_run, save_full_run

    start = time.perf_counter()
    _, tokenizer = load_minilm()
    task = docstring_task(tokenizer, max_length=settings.max_length, max_per_class=settings.max_per_class,
                          test_per_class=settings.test_per_class, val_per_class=settings.val_per_class)
    results = {}
    for seed in settings.seeds:
        r = first_cut(task, settings, seed, sparsities=sparsities)
        removed = r.pop("removed_abs_w")
        results[str(seed)] = {k: ({str(s): list(v) for s, v in r[k].items()} if isinstance(r[k], dict) else r[k]) for k in r}
        results[str(seed)]["removed_abs_w"] = {k: {str(s): v for s, v in by.items()} for k, by in removed.items()}
    save_full_run(FIRST_CUT_NAME, results, {**settings.as_dict(), "first_cut_sparsities": list(sparsities)}, command,
                  time.perf_counter() - start)
    return load_full_run(FIRST_CUT_NAME)


# ---------------------------------------------------------------------------
# Movement pruning during domain adaptation of an LLM: frozen lower blocks, cached
# ---------------------------------------------------------------------------


SOURCE_PARTS = ("adapt", "heldout")


def stdlib_source_files(part: str) -> dict[str, str]:
    """{file name: source} of the standard library's top-level modules, split by file into two halves.

    Files `<stdlib>/*.py` sorted by name; even positions form `"adapt"`, odd
    positions `"heldout"`, so no file is in both. Packages (folders, which
    hold `pydoc_data`'s help topics) are left out. On Python 3.11 that is 84
    files in each half.

    >>> list(stdlib_source_files("adapt"))[:2], list(stdlib_source_files("heldout"))[:2]
    (['__future__.py', '_aix_support.py'], ['__hello__.py', '_bootsubprocess.py'])
    """
    import sysconfig

    if part not in SOURCE_PARTS:
        raise ValueError(f"part must be one of {SOURCE_PARTS}, got {part!r}")
    from pathlib import Path

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    chosen = files[SOURCE_PARTS.index(part)::2]
    return {p.name: p.read_text(encoding="utf-8", errors="replace") for p in chosen}


def stdlib_source(part: str, max_chars: int | None = None) -> str:
    """`stdlib_source_files(part)` joined by blank lines; `max_chars` keeps the first that many characters.

    >>> stdlib_source("adapt", max_chars=29)[3:]
    'Record of phased-in incomp'
    """
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be None or a positive int, got {max_chars!r}")
    text = "\n\n".join(stdlib_source_files(part).values())
    return text if max_chars is None else text[:max_chars]


def spread_windows(tokenizer, texts: Sequence[str], n: int, block_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` windows (x, y) of `block_size` tokens spread over many texts: one per text, round robin, seeded.

    Texts are shuffled (seeded), those shorter than 8 * block_size characters
    skipped; window i comes from text i mod (number of texts), at a seeded
    random character offset. Spreading windows over files measures how well
    a model does on Python in general, not on one file.
    """
    from .data import text_tokens

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    span = 8 * block_size  # characters read per window: code runs about 3 characters per token
    usable = [t for t in texts if len(t) >= span]
    if not usable:
        raise ValueError(f"texts: none has the {span} characters a window of {block_size} tokens needs")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(usable), generator=g).tolist()
    rows = []
    for i in range(n):
        text = usable[order[i % len(usable)]]
        start = int(torch.randint(0, len(text) - span + 1, (1,), generator=g))
        ids = text_tokens(tokenizer, text[start:start + span])  # (m,)
        if len(ids) < block_size + 1:
            raise ValueError(f"a window of {span} characters gave {len(ids)} tokens, fewer than block_size + 1 = {block_size + 1}")
        rows.append(ids[: block_size + 1])
    windows = torch.stack(rows)  # (n, T + 1)
    return windows[:, :-1], windows[:, 1:]


def lm_windows(tokens: torch.Tensor, block_size: int, max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive windows (x, y) of a 1-D token tensor, y = x shifted by one, as `chapter11.train.perplexity` cuts them.

    >>> x, y = lm_windows(torch.arange(10), 4)
    >>> x.tolist(), y.tolist()
    ([[0, 1, 2, 3], [4, 5, 6, 7]], [[1, 2, 3, 4], [5, 6, 7, 8]])
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor, got {type(tokens).__name__}")
    n = (len(tokens) - 1) // block_size
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"tokens: need more than block_size + 1 = {block_size + 1} tokens, got {len(tokens)}")
    x = tokens[: n * block_size].view(n, block_size)  # (n, T)
    y = tokens[1 : n * block_size + 1].view(n, block_size)  # (n, T)
    return x, y


def _decoder(model: nn.Module):
    base = getattr(model, "model", None)
    if base is None or not isinstance(getattr(base, "layers", None), nn.ModuleList) or not hasattr(base, "rotary_emb"):
        raise TypeError(f"model must be a LLaMA-style causal LM (model.model.layers, model.model.rotary_emb), got {type(model).__name__}")
    return base


def _run_blocks(layers: Iterable[nn.Module], h: torch.Tensor, rotary: nn.Module) -> torch.Tensor:
    """Run decoder blocks on hidden states h (B, T, H) with causal attention, as LlamaModel does."""
    B, T, _ = h.shape
    position_ids = torch.arange(T, device=h.device).unsqueeze(0)  # (1, T)
    cos_sin = rotary(h, position_ids)  # ((1, T, head_dim), (1, T, head_dim))
    causal = torch.full((T, T), torch.finfo(h.dtype).min, device=h.device, dtype=h.dtype).triu(1)  # (T, T)
    mask = causal[None, None]  # (1, 1, T, T): 0 on and below the diagonal
    for layer in layers:
        out = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=cos_sin)
        h = out[0] if isinstance(out, tuple) else out  # (B, T, H)
    return h


@torch.no_grad()
def lower_hidden(model: nn.Module, ids: torch.Tensor, first_trainable: int, batch_size: int = 8) -> torch.Tensor:
    """Hidden states after the frozen blocks 0 .. first_trainable - 1: (N, T, hidden), computed once.

    Adapting only the blocks above them, these are the same at every step,
    so a run pays for the lower blocks once instead of at every step.
    """
    base = _decoder(model)
    if isinstance(first_trainable, bool) or not isinstance(first_trainable, int) or not 0 <= first_trainable < len(base.layers):
        raise ValueError(f"first_trainable must be an int in [0, {len(base.layers) - 1}], got {first_trainable!r}")
    model.eval()
    device = base.embed_tokens.weight.device
    out = []
    for i in range(0, len(ids), batch_size):
        h = base.embed_tokens(ids[i:i + batch_size].to(device))  # (b, T, H)
        out.append(_run_blocks(base.layers[:first_trainable], h, base.rotary_emb))
    return torch.cat(out)  # (N, T, H)


class TopBlocks(nn.Module):
    """The top blocks of a LLaMA-style LM as a model of their own: hidden states in, logits out.

    `layers` is a trainable copy of blocks first_trainable .. L-1; the final
    norm is a frozen copy; the output projection is the original model's
    (tied to the embeddings), frozen and shared, not copied.
    `TopBlocks(model, k)(lower_hidden(model, ids, k))` gives model(ids).logits.
    """

    def __init__(self, model: nn.Module, first_trainable: int):
        import copy

        super().__init__()
        base = _decoder(model)
        if isinstance(first_trainable, bool) or not isinstance(first_trainable, int) or not 0 <= first_trainable < len(base.layers):
            raise ValueError(f"first_trainable must be an int in [0, {len(base.layers) - 1}], got {first_trainable!r}")
        self.first_trainable = first_trainable
        self.layers = copy.deepcopy(base.layers[first_trainable:])
        self.norm = copy.deepcopy(base.norm).requires_grad_(False)
        self.rotary = base.rotary_emb  # buffers only
        self.register_buffer("head_weight", model.get_output_embeddings().weight.detach(), persistent=False)  # (V, H), shared

    def mlp_linear_names(self) -> list[str]:
        """The MLP projections of every block here: gate_proj, up_proj and down_proj."""
        return [f"layers.{i}.mlp.{p}" for i in range(len(self.layers)) for p in ("gate_proj", "up_proj", "down_proj")]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = _run_blocks(self.layers, h, self.rotary)  # (B, T, H)
        return F.linear(self.norm(h), self.head_weight)  # (B, T, V)


@torch.no_grad()
def hidden_perplexity(top: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token loss) of `top` on cached hidden states (N, T, H) and their targets (N, T)."""
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} must share (N, T)")
    top.eval()
    device = top.head_weight.device if hasattr(top, "head_weight") else next(top.parameters()).device
    total = 0.0
    for i in range(0, len(hidden), batch_size):
        logits = top(hidden[i:i + batch_size].to(device))  # (b, T, V)
        y = targets[i:i + batch_size].flatten().to(device)  # (b * T,)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y, reduction="sum").item()
    return math.exp(total / targets.numel())


@dataclass
class AdaptResult:
    method: str
    target_sparsity: float | None
    sparsity: float  # achieved over the pruned MLP projections
    losses: list[float] = field(default_factory=list)
    step_wall_s: list[float] = field(default_factory=list)  # per optimizer step
    step_cpu_s: list[float] = field(default_factory=list)


def adapt_top_blocks(top: TopBlocks, hidden: torch.Tensor, targets: torch.Tensor, method: str | None,
                     final_sparsity: float = 0.0, config: FinePruneConfig = FinePruneConfig()) -> AdaptResult:
    """Adapt `top` to new text with the causal-LM loss while pruning its MLP projections.

    `hidden` (N, T, H) are `lower_hidden` outputs, `targets` (N, T) the next
    tokens. Each step draws `config.batch_size` windows (seeded). The same
    schedule and optimizer settings as `fine_prune` (`config.head_lr` is not
    used); `method=None` adapts dense. `top` is wrapped in place (call
    `finalize` afterwards) and left in eval mode.
    """
    import time

    final = check_sparsity(final_sparsity, "final_sparsity")
    if method is not None and method not in METHODS:
        raise ValueError(f"method must be None (dense) or one of {METHODS}, got {method!r}")
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} must share (N, T)")
    if method is not None and not masked_layers(top):
        wrap_linears(top, method, names=top.mlp_linear_names())
    layers = _check_method(top, method, config)
    scores = [layer.scores for layer in layers.values() if layer.scores is not None]
    score_ids = {id(s) for s in scores}
    body = [p for p in top.parameters() if p.requires_grad and id(p) not in score_ids]
    optimizer = _optimizer(top, [{"params": body, "lr": config.lr}, {"params": scores, "lr": config.score_lr}])
    g = torch.Generator().manual_seed(config.seed)
    device = top.head_weight.device
    result = AdaptResult(method or "dense", final if method is not None else None, 0.0)
    for step in range(config.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        top.train()
        if method is not None:
            set_sparsity(top, config.schedule(step, final))
        idx = torch.randint(0, len(hidden), (config.batch_size,), generator=g)  # (B,)
        logits = top(hidden[idx].to(device))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets[idx].flatten().to(device))
        result.losses.append(loss.item())
        if method == "soft":
            loss = loss + config.penalty_at(step) * soft_penalty(scores)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        result.step_wall_s.append(time.perf_counter() - wall)
        result.step_cpu_s.append(time.process_time() - cpu)
    if method is not None:
        set_sparsity(top, config.schedule(config.steps, final))
    top.eval()
    result.sparsity = masked_sparsity(top) if layers else 0.0
    return result


@dataclass(frozen=True)
class LMSettings:
    """Everything that defines the LLM part of Experiment 3 (`run_lm_grid`); the recorded JSON stores it."""

    first_trainable: int = 28  # SmolLM2-135M has 30 blocks: adapt (and prune) blocks 28 and 29
    block_size: int = 64  # tokens per window
    train_windows: int = 64  # from the "adapt" half of the stdlib source, minus its validation files
    val_windows: int = 16  # from every 5th file of the "adapt" half, for every choice
    eval_windows: int = 16  # held-out source ("heldout" half) and general text, reported once
    steps: int = 60
    batch_size: int = 4
    lrs: tuple[float, ...] = (1e-4, 3e-4)  # chosen on validation, dense, first seed
    score_lr: float = 1e-2
    warmup_frac: float = 0.1
    ramp_frac: float = 0.6
    sparsities: tuple[float, ...] = (0.5, 0.8)
    methods: tuple[str, ...] = ("magnitude", "hard")
    seeds: tuple[int, ...] = (0, 1, 2)

    def config(self, seed: int, lr: float) -> FinePruneConfig:
        return FinePruneConfig(steps=self.steps, batch_size=self.batch_size, lr=lr, score_lr=self.score_lr,
                               warmup_frac=self.warmup_frac, ramp_frac=self.ramp_frac, seed=seed)

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class LMData:
    """Token windows (x, y) of each text and the frozen lower blocks' outputs for them."""

    x: dict[str, torch.Tensor]  # name -> (N, T) input ids
    y: dict[str, torch.Tensor]  # name -> (N, T) next tokens
    hidden: dict[str, torch.Tensor]  # name -> (N, T, H) after blocks 0 .. first_trainable - 1
    cache_cpu_s: float = 0.0


LM_TEXTS = ("train", "val", "python", "general")


def lm_texts() -> dict[str, list[str]]:
    """The four text sources of the LLM part, as lists of documents (files or help topics).

    - "train": `stdlib_source_files("adapt")` except every 5th file;
    - "val": every 5th file of the "adapt" half (files the adaptation never sees);
    - "python": `stdlib_source_files("heldout")`, the other half of the files;
    - "general": `chapter11.data.pydoc_topics("evaluation")`, English prose
      about Python from its help pages (not code, and in no source file).
    """
    from .data import pydoc_topics

    adapt = list(stdlib_source_files("adapt").values())
    return {"train": [t for i, t in enumerate(adapt) if i % 5 != 4], "val": adapt[4::5],
            "python": list(stdlib_source_files("heldout").values()), "general": pydoc_topics("evaluation")}


def lm_data(model: nn.Module, tokenizer, settings: LMSettings = LMSettings()) -> LMData:
    """Windows of the four texts of `lm_texts` and their cached lower-block outputs."""
    import time

    counts = {"train": settings.train_windows, "val": settings.val_windows,
              "python": settings.eval_windows, "general": settings.eval_windows}
    x, y = {}, {}
    for i, (name, texts) in enumerate(lm_texts().items()):
        x[name], y[name] = spread_windows(tokenizer, texts, counts[name], settings.block_size, seed=i)
    cpu = time.process_time()
    hidden = {name: lower_hidden(model, x[name], settings.first_trainable) for name in LM_TEXTS}
    return LMData(x, y, hidden, time.process_time() - cpu)


def lm_perplexities(top: nn.Module, data: LMData, names: Sequence[str] = ("val", "python", "general")) -> dict[str, float]:
    return {name: hidden_perplexity(top, data.hidden[name], data.y[name]) for name in names}


def run_lm_one(model: nn.Module, data: LMData, settings: LMSettings, method: str | None, sparsity: float,
               seed: int, lr: float) -> dict:
    """Adapt a fresh copy of the top blocks (pruning their MLPs with `method`) and measure perplexities."""
    import statistics

    top = TopBlocks(model, settings.first_trainable)
    r = adapt_top_blocks(top, data.hidden["train"], data.y["train"], method, sparsity if method else 0.0,
                         settings.config(seed, lr))
    ppl = lm_perplexities(top, data)
    return {"method": r.method, "target": sparsity if method else 0.0, "seed": seed, "lr": lr, "sparsity": r.sparsity,
            "val": ppl["val"], "python": ppl["python"], "general": ppl["general"],
            "first_loss": r.losses[0], "final_loss": sum(r.losses[-5:]) / len(r.losses[-5:]),
            "step_cpu_s": statistics.median(r.step_cpu_s), "step_wall_s": statistics.median(r.step_wall_s)}


def step_times(model: nn.Module, data: LMData, settings: LMSettings, repeats: int = 3) -> dict:
    """Seconds per training step (forward + backward of a batch) with and without the cache, interleaved.

    "cached": the top blocks on stored lower-block outputs; "uncached": the
    frozen lower blocks recomputed first (what every step would cost without
    the cache). Medians from `chapter11.bench.compare`; ratio = uncached / cached.
    """
    from .bench import compare

    top = TopBlocks(model, settings.first_trainable)
    top.train()
    device = top.head_weight.device
    ids, y = data.x["train"][: settings.batch_size], data.y["train"][: settings.batch_size].to(device)
    h = data.hidden["train"][: settings.batch_size].to(device)

    def step(hidden):
        top.zero_grad(set_to_none=True)
        F.cross_entropy(top(hidden).flatten(0, 1), y.flatten()).backward()

    timing = compare({"cached": lambda: step(h),
                      "uncached": lambda: step(lower_hidden(model, ids, settings.first_trainable))},
                     repeats=repeats, warmup=1)
    return {"cached_s": timing["median_s"]["cached"], "uncached_s": timing["median_s"]["uncached"],
            "ratio": timing["ratio"]["uncached"]}


def run_lm_grid(settings: LMSettings = LMSettings(), progress=print) -> dict:
    """The LLM part: pretrained perplexities, the learning rate chosen on validation, then every method x sparsity x seed."""
    from .models import load_smollm
    from .train import default_device

    model, tokenizer = load_smollm()
    model.to(default_device())
    data = lm_data(model, tokenizer, settings)
    out = {"pretrained": lm_perplexities(TopBlocks(model, settings.first_trainable), data),
           "cache_cpu_s": round(data.cache_cpu_s, 1), "windows": {k: list(v.shape) for k, v in data.x.items()}}
    out["step_times"] = step_times(model, data, settings)
    first = settings.seeds[0]
    search = []
    for lr in settings.lrs:
        search.append(run_lm_one(model, data, settings, None, 0.0, first, lr))
        if progress:
            progress(f"dense lr {lr:g}: val ppl {search[-1]['val']:.3f}")
    out["lr_search"] = search
    out["lr"] = min(search, key=lambda r: r["val"])["lr"]
    runs = []
    for seed in settings.seeds:
        for sparsity in (0.0, *settings.sparsities):
            for method in ((None,) if sparsity == 0.0 else settings.methods):
                if method is None and seed == first:
                    rec = next(r for r in search if r["lr"] == out["lr"])
                else:
                    rec = run_lm_one(model, data, settings, method, sparsity, seed, out["lr"])
                runs.append(rec)
                if progress:
                    progress(f"{rec['method']} {sparsity:g} seed {seed}: ppl python {rec['python']:.3f} general {rec['general']:.3f}")
    out["runs"] = runs
    return out


LM_FULL_RUN_NAME = "03_llm_adaptation"


def lm_full_run(settings: LMSettings = LMSettings(), command: str = "python -m chapter11.movement lm") -> dict:
    """Run the LLM grid and record it (benchmarks/full/03_llm_adaptation.json)."""
    import time

    from .report import load_full_run, save_full_run

    start = time.perf_counter()
    results = run_lm_grid(settings)
    save_full_run(LM_FULL_RUN_NAME, results, settings.as_dict(), command, time.perf_counter() - start)
    return load_full_run(LM_FULL_RUN_NAME)


if __name__ == "__main__":  # python -m chapter11.movement [lm | worker I/N]: the recorded full runs of Experiment 3
    import sys

    torch.set_num_threads(2)
    args = sys.argv[1:]
    if args == ["lm"]:
        lm_full_run()
    elif args == ["first-cut"]:
        first_cut_run()
    elif args[:1] == ["more-seeds"]:  # more-seeds [worker I/N]
        if len(args) == 3 and args[1] == "worker":
            i, n = (int(v) for v in args[2].split("/"))
            more_seeds_run(worker=i, workers=n)
        else:
            more_seeds_run()
    elif len(args) == 2 and args[0] == "worker":  # worker I/N: one of N processes sharing the grid's log
        i, n = (int(v) for v in args[1].split("/"))
        run_grid(worker=i, workers=n, log_path=grid_log_path())
    elif args:
        raise SystemExit("usage: python -m chapter11.movement [lm | first-cut | more-seeds [worker I/N] | worker I/N]")
    else:
        full_run()
