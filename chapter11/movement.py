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
    "standardize",
    "mixed_scores_loop",
    "mixed_scores",
    "soft_penalty_loop",
    "soft_penalty",
    "TopKSTE",
    "ThresholdSTE",
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


def topk_mask_loop(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the n - round(sparsity * n) largest scores, by repeated selection.

    Ties go to the lower index. Same result as `topk_mask` when scores differ.

    >>> topk_mask_loop(torch.tensor([0.3, -1.0, 2.0, 0.1]), 0.5)
    tensor([1., 0., 1., 0.])
    """
    values = scores.detach().flatten().tolist()
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
    flat = scores.detach().flatten()  # (n,)
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
    out = [1.0 if 1.0 / (1.0 + math.exp(-s)) > tau else 0.0 for s in scores.detach().flatten().tolist()]
    return torch.tensor(out, dtype=torch.float32).reshape(scores.shape)


def threshold_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Vectorised `threshold_mask_loop`.

    >>> threshold_mask(torch.tensor([[-2.0, 0.0], [0.5, 3.0]]), 0.5)
    tensor([[0., 0.],
            [1., 1.]])
    """
    tau = _check_threshold(threshold)
    return (torch.sigmoid(scores.detach().float()) > tau).float()  # same shape as scores


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


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------


class MaskedLinear(nn.Module):
    """A drop-in `nn.Linear` whose weight is multiplied by a mask on every forward pass.

    `method` picks the criterion (see the module docstring). `weight` and
    `bias` are the wrapped layer's own parameters (shared, not copied);
    "hard", "soft" and "mixed" add a learned `scores` parameter of the
    weight's shape. Set `sparsity` (top-k methods) or `threshold` (soft) at
    any time; `mask()` gives the current 0/1 mask without gradients.

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
        self.alpha = _check_alpha(alpha)
        if method == "magnitude":
            self.scores = None
        else:
            if score_init is None:
                score_init = 1.0 if method == "soft" else 0.0  # soft: sigmoid(1) = 0.73 > 0.5, all kept at first
            self.scores = nn.Parameter(torch.full_like(weight.detach(), float(score_init)))  # (out, in)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str = "hard", **kwargs) -> "MaskedLinear":
        """Wrap an existing `nn.Linear`, sharing its weight and bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, method=method, **kwargs)

    def _mask_with_grad(self) -> torch.Tensor:
        if self.method == "magnitude":
            return topk_mask(self.weight.abs(), self.sparsity).to(self.weight.dtype)  # no gradient to |W| through the mask
        if self.method == "hard":
            return TopKSTE.apply(self.scores, self.sparsity)
        if self.method == "soft":
            return ThresholdSTE.apply(self.scores, self.threshold)
        # mixed: select on the combined criterion, pass the gradient straight to the scores
        combined = mixed_scores(self.weight, self.scores, self.alpha)  # (out, in), no grad
        hard = topk_mask(combined, self.sparsity).to(self.scores.dtype)
        return hard + self.scores - self.scores.detach()  # value = hard mask, d(mask)/d(scores) = 1

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """The current 0/1 mask, shape (out_features, in_features)."""
        return self._mask_with_grad().detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pruned = self.weight * self._mask_with_grad()  # (out, in) W' = W * M
        return F.linear(x, pruned, self.bias)  # (..., out)

    def extra_repr(self) -> str:
        extra = f", threshold={self.threshold}" if self.method == "soft" else f", sparsity={self.sparsity:.3f}"
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method!r}{extra}"


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
    Returns the wrapped names.

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


def set_sparsity(model: nn.Module, sparsity: float) -> None:
    """Set the target sparsity of every top-k `MaskedLinear` (soft layers ignore it)."""
    sparsity = check_sparsity(sparsity, "sparsity")
    layers = masked_layers(model)
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no MaskedLinear layers; call wrap_linears first")
    for layer in layers.values():
        layer.sparsity = sparsity


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
    """Swap every `MaskedLinear` back for a plain `nn.Linear` holding W * M, in place.

    Returns the masks by parameter name (`"encoder.0.weight"`), ready for
    `chapter11.masks.apply_masks` if the zeros must stay zero in later training.

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
        mask = layer.mask()  # (out, in)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device, dtype=layer.weight.dtype)
        linear.weight.copy_(layer.weight * mask)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
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
    """Tokenised stdlib-docstring classification: which package a docstring comes from."""

    train: torch.utils.data.TensorDataset  # (input_ids (N, T), attention_mask (N, T), labels (N,))
    test: torch.utils.data.TensorDataset
    class_names: list[str]
    train_counts: list[int]
    test_counts: list[int]


def docstring_task(tokenizer, max_length: int = 32, max_per_class: int | None = 120, test_per_class: int = 30,
                   packages: Sequence[str] | None = None, seed: int = 0) -> DocstringTask:
    """Split `chapter11.data.stdlib_docstrings` per class into train and test, then tokenise.

    Each class gives its first `test_per_class` (shuffled) docstrings to the
    test set and the rest, up to `max_per_class` in all, to the training set.
    Texts are cut to `max_length` tokens.
    """
    from .data import DEFAULT_PACKAGES, stdlib_docstrings

    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
        raise ValueError(f"max_length must be an int >= 4, got {max_length!r}")
    if isinstance(test_per_class, bool) or not isinstance(test_per_class, int) or test_per_class < 1:
        raise ValueError(f"test_per_class must be a positive int, got {test_per_class!r}")
    texts, labels, names = stdlib_docstrings(packages=tuple(packages or DEFAULT_PACKAGES), max_per_class=max_per_class, seed=seed)
    split = {"train": ([], []), "test": ([], [])}
    seen = [0] * len(names)
    for text, label in zip(texts, labels):
        part = "test" if seen[label] < test_per_class else "train"
        seen[label] += 1
        split[part][0].append(text)
        split[part][1].append(label)
    for label, n in enumerate(seen):
        if n <= test_per_class:
            raise ValueError(f"test_per_class={test_per_class} leaves no training example for class {names[label]!r} ({n} docstrings)")

    def encode(part):
        x, y = split[part]
        enc = tokenizer(x, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(y))

    counts = {p: [split[p][1].count(k) for k in range(len(names))] for p in split}
    return DocstringTask(encode("train"), encode("test"), list(names), counts["train"], counts["test"])


@dataclass(frozen=True)
class FinePruneConfig:
    """Hyperparameters of one fine-pruning run (defaults: the committed notebook size)."""

    steps: int = 120  # optimizer steps in all
    batch_size: int = 16
    lr: float = 1e-4  # AdamW on the model's weights
    head_lr: float = 1e-3  # the fresh classification head learns faster
    score_lr: float = 1e-2  # AdamW on the movement scores (hard, soft, mixed)
    warmup_frac: float = 0.1  # cubic schedule: dense for this fraction of the steps ...
    ramp_frac: float = 0.6  # ... then reaches the final sparsity over this fraction, then holds it
    penalty: float = 0.0  # soft movement: final lambda of the L1 penalty (ramped with the schedule)
    alpha: float = 0.5  # mixed: weight of the magnitude term
    seed: int = 0


@dataclass
class FinePruneResult:
    method: str
    target_sparsity: float | None
    sparsity: float  # achieved, over the wrapped layers
    accuracy: float
    penalty: float | None = None  # soft movement's final lambda
    losses: list[float] = field(default_factory=list)
    sparsity_trace: list[float] = field(default_factory=list)  # achieved sparsity every few steps
    trace_steps: list[int] = field(default_factory=list)


def _classifier_logits(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=attn)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset, batch_size: int = 64) -> float:
    """Accuracy of a (input_ids, attention_mask) -> logits classifier on a TensorDataset."""
    model.eval()
    correct = 0
    for ids, attn, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        correct += int((_classifier_logits(model, ids, attn).argmax(-1) == y).sum())
    return correct / len(dataset)


def fine_prune(model: nn.Module, task: DocstringTask, method: str | None, final_sparsity: float = 0.0,
               config: FinePruneConfig = FinePruneConfig(), trace_every: int = 10) -> FinePruneResult:
    """Fine-tune `model` on `task` while pruning its wrapped layers; `method=None` fine-tunes dense.

    Top-k methods follow s_t = cubic_sparsity(t, final_sparsity, t0=warmup,
    n=ramp) from `chapter11.schedules`. Soft movement ignores
    `final_sparsity`; its penalty weight ramps up with the same cubic shape,
    lambda_t = config.penalty * s_t / s_f. The model is left wrapped (call
    `finalize` afterwards) and in eval mode.
    """
    from .schedules import cubic_sparsity

    if method is not None and method not in METHODS:
        raise ValueError(f"method must be None (dense) or one of {METHODS}, got {method!r}")
    final = check_sparsity(final_sparsity, "final_sparsity")
    layers = masked_layers(model)
    if method is not None and not layers:
        raise ValueError("model has no MaskedLinear layers; call wrap_linears(model, method) first")
    if method is not None and any(layer.method != method for layer in layers.values()):
        raise ValueError(f"method={method!r} but the model's MaskedLinear layers use {sorted({l.method for l in layers.values()})}")
    if method == "soft" and not config.penalty > 0:
        raise ValueError(f"soft movement needs config.penalty > 0 to prune anything, got {config.penalty}")
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(task.train, batch_size=config.batch_size, shuffle=True, generator=generator, drop_last=True)
    scores = [layer.scores for layer in layers.values() if layer.scores is not None]
    score_ids = {id(s) for s in scores}
    head, body = [], []
    for name, p in model.named_parameters():
        if id(p) in score_ids or not p.requires_grad:
            continue
        (head if name.startswith(("classifier", "bert.pooler")) else body).append(p)
    groups = [{"params": body, "lr": config.lr}, {"params": head, "lr": config.head_lr}]
    if scores:
        groups.append({"params": scores, "lr": config.score_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    t0 = int(config.warmup_frac * config.steps)
    ramp = max(1, int(config.ramp_frac * config.steps))
    result = FinePruneResult(method or "dense", final if method not in (None, "soft") else None, 0.0, 0.0,
                             penalty=config.penalty if method == "soft" else None)
    step = 0
    while step < config.steps:
        for ids, attn, y in loader:
            model.train()
            if method is not None:
                s_t = cubic_sparsity(step, final if method != "soft" else 0.5, t0=t0, n=ramp)
                if method != "soft":
                    set_sparsity(model, s_t)
            loss = F.cross_entropy(_classifier_logits(model, ids, attn), y)
            result.losses.append(loss.item())
            if method == "soft":
                loss = loss + config.penalty * (s_t / 0.5) * soft_penalty(scores)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if method is not None and (step % trace_every == 0 or step == config.steps):
                result.trace_steps.append(step)
                result.sparsity_trace.append(masked_sparsity(model))
            if step >= config.steps:
                break
    model.eval()
    result.sparsity = masked_sparsity(model) if layers else 0.0
    result.accuracy = evaluate_classifier(model, task.test)
    return result
