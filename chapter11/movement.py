"""Movement pruning (Sanh et al., 2020): prune the weights that fine-tuning pushes toward zero.

Sign convention, stated once and used everywhere in this module. With the
loss gradient G^(t) = dL/dW at step t, the movement score is

    S = - sum_t G^(t) * W^(t)                                  (Sanh et al., eq. 4)

and the weights with the *smallest* S are pruned. A weight that gradient
descent pushes toward zero has G and W of the same sign, so G*W > 0 and its
score falls. The chapter writes m_i = sum_t g_i^(t) w_i^(t) and prunes the
smallest m_i: that is the same rule only if g is the update direction
(minus the gradient), g = -G. Read g as the raw gradient and the rule flips:
it would prune the weights moving *away* from zero (both readings, on two
weights: `chapter11.experiments.exp03_movement.sign_example`).

Four criteria share one layer, `MaskedLinear`, which masks its weight in forward:

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
like any model. In between, fine-tune while the sparsity follows a schedule
(`chapter11.schedules.cubic_sparsity`), as Experiment 3's loop does for a
BERT classifier (`chapter11.experiments.exp03_movement.fine_prune`).

But: unstructured masks only (no block or head movement pruning), one global
sparsity target shared by every wrapped layer (each keeps the same fraction,
as in the paper's local top-k), no distillation teacher, and pruned weights
cost as much as kept ones until `chapter11.csr` or structured pruning uses them.

    >>> int(MaskedLinear.from_linear(nn.Linear(4, 2), method="magnitude", sparsity=0.5).mask().sum())
    4
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .sparsity import check_amount, check_model, check_sparsity

__all__ = [
    "METHODS", "movement_scores_loop", "movement_scores", "topk_mask_loop", "topk_mask",
    "threshold_mask_loop", "threshold_mask", "global_threshold_loop", "global_threshold", "global_topk_masks",
    "standardize", "mixed_scores_loop", "mixed_scores", "soft_penalty_loop", "soft_penalty", "TopKSTE",
    "ThresholdSTE", "StraightThrough", "MaskedLinear", "encoder_linear_names", "wrap_linears", "masked_layers",
    "set_sparsity", "masked_sparsity", "finalize",
]

METHODS = ("magnitude", "hard", "soft", "mixed")


# ---------------------------------------------- Movement scores and their sign


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


# ----------------------------------------------------------- Masks from scores


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
    x = _check_scores(x, "x").detach().float()
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


def _check_score_tensors(score_tensors) -> None:
    if any(S.numel() == 0 for S in _check_score_list(score_tensors)):
        raise ValueError("score_tensors: every tensor must be non-empty (the mean of nothing is undefined)")


def soft_penalty_loop(score_tensors: Sequence[torch.Tensor]) -> float:
    """L1 penalty of soft movement: mean over layers of mean_i sigmoid(S_i), in loops.

    sigmoid(S) > 0, so its L1 norm is its sum; dividing by the count makes
    layers of different sizes weigh the same.

    >>> round(soft_penalty_loop([torch.tensor([0.0, 0.0]), torch.tensor([100.0])]), 3)
    0.75
    """
    _check_score_tensors(score_tensors)
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
    _check_score_tensors(score_tensors)
    return torch.stack([torch.sigmoid(S).mean() for S in score_tensors]).mean()


# ------------------------------------------------- Straight-through estimators


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


# ------------------------------------------------------------------- The layer


class MaskedLinear(nn.Module):
    """A drop-in `nn.Linear` whose weight is multiplied by a mask on every forward pass.

    `method` picks the criterion (see the module docstring). `weight` and
    `bias` are the wrapped layer's own parameters (shared, not copied);
    "hard", "soft" and "mixed" add learned `scores` of the weight's shape
    (`score_init`: 0, soft 1, or "magnitude" for |W|). Set `sparsity` (top-k
    methods) or `threshold` (soft) at any time, or `set_sparsity(model, s)`
    for all layers (soft: one global cut on the scores); `mask()` gives the
    current 0/1 mask without gradients.

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
        score_init: float | str | None = None,
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
        if score_init is None:
            score_init = 1.0 if method == "soft" else 0.0  # soft: sigmoid(1) = 0.73 > 0.5, all kept at first
        if score_init != "magnitude" and (isinstance(score_init, (bool, str)) or not math.isfinite(score_init)):
            raise ValueError(f"score_init must be a number, None or 'magnitude', got {score_init!r}")
        start = weight.detach().abs() if score_init == "magnitude" else torch.full_like(weight.detach(), float(score_init))  # (out, in)
        self.scores = None if method == "magnitude" else nn.Parameter(start.clone())  # magnitude: no learned scores

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


# ---------------------------------------------------------------- Whole models


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
    check_model(model)
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
    check_model(model)
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
    return {name: m for name, m in check_model(model).named_modules() if isinstance(m, MaskedLinear)}


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
