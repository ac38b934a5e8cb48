"""Dynamic sparsity: train a sparse network from scratch and move its connections.

A static sparse network keeps the random mask it was born with. Dynamic
sparse training keeps the *number* of connections per layer fixed but, every
`update_every` steps, drops some active connections and grows the same number
of new ones elsewhere:

- SET (Mocanu et al., 2018): drop the active weights of smallest magnitude,
  grow new connections at random.
- RigL (Evci et al., 2020): drop the same way, grow where the dense gradient
  |dL/dw| is largest, i.e. where a connection would reduce the loss fastest.

The fraction dropped decays on a cosine schedule,
f(t) = alpha / 2 * (1 + cos(pi * t / T_end)), and no update happens after
T_end. Regrown weights start at zero and their optimizer state (momentum,
Adam moments) is reset, so they begin life like a fresh connection.

How many weights each layer keeps is set once, at initialisation, by a
sparsity distribution: uniform (every layer at sparsity s), Erdős–Rényi
(density proportional to (n_in + n_out) / (n_in * n_out)) or
Erdős–Rényi-Kernel, ERK (density proportional to the sum of all weight
dimensions over their product, so conv kernels count too). Small layers get
denser, big layers sparser, and the total matches s.

Training cost is counted the way the RigL paper reports it (appendix H):
in multiples of dense training FLOPs, a step costing 3 f_S (sparse forward
plus a backward of twice the forward), RigL's update steps 2 f_S + f_D (the
dense weight gradient), dense training 3 f_D per step, with f_S the forward
MACs of the masked layers scaled by each layer's density
(`training_flops_loop` / `training_flops`, `dense_macs`).

Covers: the three distributions (`layer_sparsities_loop` / `layer_sparsities`),
random initial masks, the drop and grow steps (`drop_loop` / `drop`,
`grow_loop` / `grow`), the cosine schedule, `DynamicSparsity`, a callback
for `chapter11.train.train` that runs SET or RigL around any optimizer,
`GradualMagnitude` (pruning from dense along Zhu & Gupta's cubic schedule,
to the same per-layer targets, as the baseline), the FLOP count, and
`density_schedule` (the density of every layer at every step, without
training). Experiment 6's driver, `chapter11.experiments.exp06_dynamic`,
wires them into one training function (`train_sparse`) and compares the
methods at equal steps (`compare_methods`).

But: it does not implement RigL's other knobs (growing with random noise,
non-zero initialisation of regrown weights, sparse gradient accumulation
over several batches), nor any speed-up: the weights are dense tensors with
zeros, so training here costs what dense training costs, and RigL's dense
gradient is an extra forward/backward pass on the update step (a sparse
implementation folds it into that step's backward pass, which is what the
FLOP count assumes). The FLOP count leaves out biases, norms, activations
and the cost of the mask updates themselves, as the paper does. In this
module a connection dropped at an update cannot be regrown in the same
update (the reference RigL code allows it; the connection then simply
survives), so every update moves exactly the number of connections it
reports.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .masks import apply_masks, masks_of, prunable_parameters
from .sparsity import check_model, check_sparsity

__all__ = [
    "DISTRIBUTIONS", "layer_sparsities_loop", "layer_sparsities", "random_mask", "random_masks",
    "cosine_drop_fraction", "drop_loop", "drop", "grow_loop", "grow", "reset_optimizer_state", "DynamicSparsity",
    "gradual_sparsity", "GradualMagnitude", "dense_macs", "training_flops_loop", "training_flops",
    "inference_flops", "density_schedule", "TRAIN_METHODS", ]

DISTRIBUTIONS = ("uniform", "er", "erk")
METHODS = ("set", "rigl")


# ---------------------------------------------------------------- distributions


def _check_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    if not isinstance(shapes, Mapping) or not shapes:
        raise ValueError(f"shapes must be a non-empty mapping name -> weight shape, got {shapes!r}")
    out = {}
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shapes: {name!r} has shape {shape}; need at least 2 dimensions, all >= 1")
        out[name] = shape
    return out


def _check_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return distribution


def layer_sparsities_loop(shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str = "erk") -> dict[str, float]:
    """Per-layer sparsity whose parameter-weighted total is `sparsity`, with plain loops.

    Erdős–Rényi-Kernel (Evci et al., 2020, eq. in section 3): layer l keeps a
    density eps * sum(shape_l) / prod(shape_l); "er" uses only the first two
    dimensions (out, in). eps is solved so that sum_l density_l * n_l equals
    (1 - s) * sum_l n_l. A layer whose density would pass 1 is made dense and
    eps is solved again over the rest (the paper's reference code does the
    same, one layer at a time). "uniform" gives every layer `sparsity`.

    Hand example, ERK at s = 0.5 with layers of shape (4, 2) and (2, 1):
    raw scores 6/8 = 0.75 and 3/2 = 1.5, sizes 8 and 2, so
    eps = 0.5 * 10 / (0.75 * 8 + 1.5 * 2) = 5/9; densities 5/12 and 5/6
    (3.33 + 1.67 = 5 weights kept, half of 10).

    >>> s = layer_sparsities_loop({"a": (4, 2), "b": (2, 1)}, 0.5)
    >>> {k: round(v, 4) for k, v in s.items()}
    {'a': 0.5833, 'b': 0.1667}
    """
    check_sparsity(sparsity, "sparsity")
    shapes = _check_shapes(shapes)
    _check_distribution(distribution)
    if distribution == "uniform":
        return {name: float(sparsity) for name in shapes}
    sizes = {}
    raw = {}
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        sizes[name] = n
        dims = shape if distribution == "erk" else shape[:2]
        prod = 1
        for d in dims:
            prod *= d
        raw[name] = sum(dims) / prod
    dense = set()
    while True:
        budget = 0.0  # weights the scaled layers must hold between them
        divisor = 0.0
        for name in shapes:
            if name in dense:
                budget -= sparsity * sizes[name]  # a dense layer holds s * n more than its share
            else:
                budget += (1 - sparsity) * sizes[name]
                divisor += raw[name] * sizes[name]
        eps = budget / divisor
        worst = max(raw[name] for name in shapes if name not in dense)
        if eps * worst <= 1:
            break
        for name in shapes:
            if name not in dense and raw[name] == worst:
                dense.add(name)
        if len(dense) == len(shapes):  # cannot happen for sparsity > 0, kept as a guard
            break
    result = {}
    for name in shapes:
        result[name] = 0.0 if name in dense else 1.0 - eps * raw[name]
    return result


def layer_sparsities(shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str = "erk") -> dict[str, float]:
    """Vectorised `layer_sparsities_loop` (same rule, tensors instead of loops).

    >>> s = layer_sparsities({"a": (4, 2), "b": (2, 1)}, 0.5, "er")
    >>> {k: round(v, 4) for k, v in s.items()}
    {'a': 0.5833, 'b': 0.1667}
    """
    check_sparsity(sparsity, "sparsity")
    shapes = _check_shapes(shapes)
    _check_distribution(distribution)
    names = list(shapes)
    if distribution == "uniform":
        return {name: float(sparsity) for name in names}
    sizes = torch.tensor([math.prod(shapes[n]) for n in names], dtype=torch.float64)  # (L,)
    dims = [shapes[n] if distribution == "erk" else shapes[n][:2] for n in names]
    raw = torch.tensor([sum(d) / math.prod(d) for d in dims], dtype=torch.float64)  # (L,)
    dense = torch.zeros(len(names), dtype=torch.bool)  # (L,)
    while True:
        budget = ((1 - sparsity) * sizes[~dense]).sum() - (sparsity * sizes[dense]).sum()
        eps = budget / (raw[~dense] * sizes[~dense]).sum()
        worst = raw[~dense].max()
        if eps * worst <= 1:
            break
        dense |= (raw == worst) & ~dense
        if dense.all():
            break
    result = torch.where(dense, torch.zeros_like(raw), 1.0 - eps * raw)  # (L,)
    return dict(zip(names, result.tolist()))


def _n_keep(n: int, sparsity: float) -> int:
    """Connections a layer of `n` weights keeps at `sparsity` (rounded to nearest)."""
    return int(round((1.0 - sparsity) * n))


def random_mask(shape: Sequence[int], sparsity: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A 0/1 mask with exactly round((1 - sparsity) * n) ones at uniformly random places.

    >>> m = random_mask((3, 4), 0.75, torch.Generator().manual_seed(0))
    >>> m.shape, int(m.sum())
    (torch.Size([3, 4]), 3)
    """
    sparsity = check_sparsity(sparsity, "sparsity")
    n = math.prod(shape)
    keep = _n_keep(n, sparsity)
    order = torch.randperm(n, generator=generator)  # (n,)
    mask = torch.zeros(n)
    mask[order[:keep]] = 1.0
    return mask.view(*shape)


def random_masks(
    model: nn.Module,
    sparsity: float,
    distribution: str = "erk",
    exclude: Iterable[str] = (),
    seed: int = 0,
    apply: bool = True,
) -> dict[str, torch.Tensor]:
    """Random masks for every prunable weight, layer sparsities from `distribution`.

    With `apply=True` (default) they are installed on `model` (`apply_masks`).
    Returns {parameter name: mask}.
    """
    check_model(model)
    check_sparsity(sparsity, "sparsity")
    params = prunable_parameters(model, exclude=exclude)
    targets = layer_sparsities({n: p.shape for n, p in params.items()}, sparsity, distribution)
    generator = torch.Generator().manual_seed(seed)
    masks = {n: random_mask(p.shape, targets[n], generator).to(p.device, p.dtype) for n, p in params.items()}
    if apply:
        apply_masks(model, masks, allow_regrow=True)
    return masks


# ---------------------------------------------------------------- schedule


def _check_step(value, name: str, minimum: int) -> int:
    """An int (numpy ints too, never a bool) >= minimum, or a ValueError naming `name`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= {minimum} (a count of optimizer steps), got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} (a count of optimizer steps), got {value!r}")
    return int(value)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"alpha must be a real number in [0, 1] (the initial drop fraction), got {alpha!r}")
    if not 0 <= float(alpha) <= 1:  # also refuses NaN
        raise ValueError(f"alpha must be a real number in [0, 1] (the initial drop fraction), got {alpha!r}")
    return float(alpha)


def cosine_drop_fraction(step: int, alpha: float = 0.3, end_step: int = 1000) -> float:
    """f(t) = alpha / 2 * (1 + cos(pi * t / T_end)) for t < T_end, else 0.

    `step` is t (an int >= 0), `alpha` the initial drop fraction (a real in
    [0, 1]; a bool is refused), `end_step` is T_end (an int >= 1), the step
    after which the mask no longer moves.

    >>> cosine_drop_fraction(0, 0.3, 100), cosine_drop_fraction(50, 0.3, 100), cosine_drop_fraction(100, 0.3, 100)
    (0.3, 0.15, 0.0)
    >>> cosine_drop_fraction(0, True, 10)
    Traceback (most recent call last):
    ...
    ValueError: alpha must be a real number in [0, 1] (the initial drop fraction), got True
    """
    step = _check_step(step, "step", 0)
    alpha = _check_alpha(alpha)
    end_step = _check_step(end_step, "end_step", 1)
    if step >= end_step:
        return 0.0
    return round(alpha / 2 * (1 + math.cos(math.pi * step / end_step)), 12)


# ---------------------------------------------------------------- drop and grow


def _check_pair(scores: torch.Tensor, mask: torch.Tensor, scores_name: str) -> None:
    if not isinstance(scores, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError(f"{scores_name} and mask must be tensors, got {type(scores).__name__} and {type(mask).__name__}")
    if scores.shape != mask.shape:
        raise ValueError(f"{scores_name} has shape {tuple(scores.shape)} but mask has shape {tuple(mask.shape)}")
    if mask.is_floating_point() and torch.isnan(mask).any():
        raise ValueError("mask contains NaN; a mask holds only 0 (pruned) and 1 (kept)")
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        raise ValueError(f"mask must hold only 0 (pruned) and 1 (kept), found {mask[bad].flatten()[0].item():g}")
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise ValueError(f"{scores_name} contains NaN; NaN cannot be ranked (a diverged model or a bad gradient?)")


def _check_n(n: int, available: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if n > available:
        raise ValueError(f"n={n} but only {available} {what} connections exist")
    return n


def drop_loop(weight: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """New mask with the `n` active weights of smallest |w| switched off (plain loops).

    Ties go to the lower flat index, so the result is deterministic.

    >>> w = torch.tensor([[0.5, -0.1], [0.0, 2.0]])
    >>> drop_loop(w, torch.tensor([[1., 1.], [0., 1.]]), 1)
    tensor([[1., 0.],
            [0., 1.]])
    """
    _check_pair(weight, mask, "weight")
    flat_w = weight.detach().flatten().tolist()
    flat_m = mask.flatten().tolist()
    active = [i for i in range(len(flat_m)) if flat_m[i] != 0]
    _check_n(n, len(active), "active")
    active.sort(key=lambda i: (abs(flat_w[i]), i))
    new = list(flat_m)
    for i in active[:n]:
        new[i] = 0.0
    return torch.tensor(new, dtype=mask.dtype).view(mask.shape)


def drop(weight: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Vectorised `drop_loop`.

    >>> drop(torch.tensor([3., -1., 2., 0.5]), torch.tensor([1., 1., 1., 0.]), 2)
    tensor([1., 0., 0., 0.])
    """
    _check_pair(weight, mask, "weight")
    flat_m = mask.flatten()  # (n_total,)
    _check_n(n, int((flat_m != 0).sum()), "active")
    scores = weight.detach().abs().flatten().to(torch.float64)  # (n_total,)
    scores = torch.where(flat_m != 0, scores, torch.full_like(scores, math.inf))  # inactive last
    order = torch.sort(scores, stable=True).indices  # ascending |w|, ties by index
    new = flat_m.clone()
    new[order[:n]] = 0
    return new.view(mask.shape)


def grow_loop(scores: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """New mask with the `n` inactive connections of largest score switched on (plain loops).

    RigL's score is |dense gradient|, SET's a random number. Ties go to the
    lower flat index.

    >>> grow_loop(torch.tensor([0.9, 0.2, 0.7, 0.1]), torch.tensor([1., 0., 0., 0.]), 1)
    tensor([1., 0., 1., 0.])
    """
    _check_pair(scores, mask, "scores")
    flat_s = scores.detach().flatten().tolist()
    flat_m = mask.flatten().tolist()
    inactive = [i for i in range(len(flat_m)) if flat_m[i] == 0]
    _check_n(n, len(inactive), "inactive")
    inactive.sort(key=lambda i: (-flat_s[i], i))
    new = list(flat_m)
    for i in inactive[:n]:
        new[i] = 1.0
    return torch.tensor(new, dtype=mask.dtype).view(mask.shape)


def grow(scores: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Vectorised `grow_loop`.

    >>> grow(torch.tensor([[0.9, 0.2], [0.7, 0.8]]), torch.tensor([[1., 0.], [0., 0.]]), 2)
    tensor([[1., 0.],
            [1., 1.]])
    """
    _check_pair(scores, mask, "scores")
    flat_m = mask.flatten()  # (n_total,)
    _check_n(n, int((flat_m == 0).sum()), "inactive")
    s = scores.detach().flatten().to(torch.float64)  # (n_total,)
    s = torch.where(flat_m == 0, s, torch.full_like(s, -math.inf))  # active ones last
    order = torch.sort(s, descending=True, stable=True).indices  # largest first, ties by index
    new = flat_m.clone()
    new[order[:n]] = 1
    return new.view(mask.shape)


@torch.no_grad()
def reset_optimizer_state(optimizer, param: torch.Tensor, where: torch.Tensor) -> int:
    """Zero every per-weight optimizer state of `param` (momentum, Adam moments) at `where`.

    `optimizer` may be a torch optimizer or a `MaskedOptimizer`. Scalar state
    (Adam's step count) is shared by the whole tensor and left alone. Returns
    how many state tensors were touched.

    >>> p = nn.Parameter(torch.ones(3))
    >>> opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    >>> p.grad = torch.ones(3); opt.step()
    >>> reset_optimizer_state(opt, p, torch.tensor([False, True, False]))
    1
    >>> opt.state[p]["momentum_buffer"]
    tensor([1., 0., 1.])
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch optimizer or a MaskedOptimizer, got {type(optimizer).__name__}")
    touched = 0
    for value in inner.state.get(param, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.masked_fill_(where.to(value.device).bool(), 0)
            touched += 1
    return touched


# ---------------------------------------------------------------- the callback


class DynamicSparsity:
    """SET or RigL as a `callback(step, model, optimizer, x, y)` for `chapter11.train.train`.

    Every `update_every` steps before `end_step`, each masked layer drops
    floor(f(t) * active) of its active weights (smallest |w|) and grows as many
    among the connections that were off (SET: at random; RigL: largest
    |dense gradient| on the current batch). Regrown weights are zero and their
    optimizer state is reset. The dense gradient is computed only on update
    steps, by one extra forward/backward; batch-norm running statistics are
    restored afterwards so the extra pass leaves no trace.

    `self.history` holds one dict per update: step, drop fraction, and per
    layer the number of connections moved and the sparsity after the update.
    Layers named in `snapshot` have their mask copied at every update
    (`self.snapshots[name] == [(step, mask), ...]`, starting with step 0).

    >>> from chapter11.models import LeNet300100
    >>> model = LeNet300100()
    >>> _ = random_masks(model, 0.9, "erk", seed=0)
    >>> rigl = DynamicSparsity(model, "rigl", update_every=1, alpha=0.3, end_step=10)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> rigl(1, model, opt, torch.randn(8, 40), torch.randint(0, 10, (8,)))
    >>> rigl.history[0]["moved"]["fc1.weight"]  # floor(0.3 / 2 * (1 + cos(pi / 10)) * 1720 active)
    503
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "rigl",
        update_every: int = 100,
        alpha: float = 0.3,
        end_step: int = 1000,
        loss_fn: Callable | None = None,
        seed: int = 0,
        snapshot: Iterable[str] = (),
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
        cosine_drop_fraction(0, alpha, end_step)  # validates alpha and end_step
        self.masks = masks_of(model)
        if not self.masks:
            raise ValueError("model has no masks; call random_masks(model, sparsity) (or apply_masks) first")
        snapshot = [snapshot] if isinstance(snapshot, str) else list(snapshot)
        for name in snapshot:
            if name not in self.masks:
                raise ValueError(f"snapshot: {name!r} is not a masked parameter; masked: {sorted(self.masks)}")
        self.method, self.update_every, self.alpha, self.end_step = method, update_every, alpha, end_step
        self.loss_fn = loss_fn or F.cross_entropy
        self.generator = torch.Generator().manual_seed(seed)
        self.params = dict(model.named_parameters())
        self.history: list[dict] = []
        self.snapshots = {name: [(0, self.masks[name].detach().cpu().clone())] for name in snapshot}

    def is_update_step(self, step: int) -> bool:
        return step % self.update_every == 0 and step < self.end_step

    def dense_gradients(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """|dL/dw| for every masked weight, pruned ones included, on batch (x, y)."""
        buffers = {k: b.clone() for k, b in model.named_buffers() if not k.endswith("_mask")}
        was_training = model.training
        model.train()
        for p in model.parameters():
            p.grad = None
        loss = self.loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, [self.params[n] for n in self.masks])
        with torch.no_grad():
            named = dict(model.named_buffers())
            for k, b in buffers.items():
                named[k].copy_(b)
        model.train(was_training)
        return {n: g.abs() for n, g in zip(self.masks, grads)}

    def __call__(self, step: int, model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
        if not self.is_update_step(step):
            return
        fraction = cosine_drop_fraction(step, self.alpha, self.end_step)
        grads = self.dense_gradients(model, x, y) if self.method == "rigl" and fraction > 0 else None
        record = {"step": step, "drop_fraction": fraction, "dense_gradient": grads is not None, "moved": {}, "sparsity": {}}
        new_masks = {}
        for name, mask in self.masks.items():
            param = self.params[name]
            active = int(mask.sum())
            n = min(int(fraction * active), mask.numel() - active)  # floor, as in RigL
            if self.method == "rigl":
                scores = grads[name] if grads is not None else torch.zeros_like(mask)
            else:
                scores = torch.rand(mask.shape, generator=self.generator).to(mask.device)
            dropped = drop(param, mask, n)
            grown = grow(scores, mask, n)  # candidates: off before this update
            new = dropped + grown - mask  # keep = in both; new = grown only
            regrown = (new != 0) & (mask == 0)
            with torch.no_grad():
                param.masked_fill_(regrown, 0.0)  # regrown weights start at zero
            reset_optimizer_state(optimizer, param, new != mask)
            new_masks[name] = new
            record["moved"][name] = n
            record["sparsity"][name] = 1.0 - float(new.sum()) / new.numel()
        apply_masks(model, new_masks, allow_regrow=True)  # copies into the buffers in place
        for name in self.snapshots:
            self.snapshots[name].append((step, self.masks[name].detach().cpu().clone()))
        self.history.append(record)


# ---------------------------------------------------------------- pruning from dense, for comparison


def gradual_sparsity(step: int, sparsity: float, start_step: int, end_step: int) -> float:
    """Zhu & Gupta's (2017) cubic schedule s(t) = s_f * (1 - (1 - (t - t0) / (t_end - t0))^3).

    0 up to `start_step` (t0), `sparsity` (s_f) from `end_step` on. The same
    formula as `chapter11.schedules.cubic_sparsity` with s_i = 0 (a test
    checks they agree); kept here so this module stands on the core alone.

    >>> [round(gradual_sparsity(t, 0.8, 10, 20), 3) for t in (0, 10, 15, 20, 30)]
    [0.0, 0.0, 0.7, 0.8, 0.8]
    """
    sparsity = check_sparsity(sparsity, "sparsity")
    step = _check_step(step, "step", 0)
    start_step = _check_step(start_step, "start_step", 0)
    end_step = _check_step(end_step, "end_step", start_step + 1)
    if step <= start_step:
        return 0.0
    if step >= end_step:
        return sparsity
    return sparsity * (1.0 - (1.0 - (step - start_step) / (end_step - start_step)) ** 3)


class GradualMagnitude:
    """Pruning from dense as a `callback(step, model, optimizer, x, y)` for `chapter11.train.train`.

    The model trains dense; every `update_every` steps from `start_step` to
    `end_step` (and at `end_step` itself) each layer drops its smallest active
    weights until it reaches its share of `gradual_sparsity(step, ...)` under
    `distribution` (ERK by default, the same per-layer split the sparse
    methods use). Masks only shrink. On construction every prunable weight
    gets an all-ones mask, so `train` wraps its optimizer in `MaskedOptimizer`
    and pruned weights stay at zero.

    `self.history` holds one dict per update: step, target sparsity and the
    sparsity of each layer after the update.

    >>> from chapter11.models import LeNet300100
    >>> model = LeNet300100()
    >>> prune = GradualMagnitude(model, 0.9, start_step=0, end_step=4, update_every=2)
    >>> for step in (1, 2, 3, 4):
    ...     prune(step, model, None, None, None)
    >>> [(r["step"], round(r["target"], 4)) for r in prune.history]
    [(2, 0.7875), (4, 0.9)]
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        distribution: str = "erk",
        start_step: int = 0,
        end_step: int = 1000,
        update_every: int = 100,
        exclude: Iterable[str] = (),
    ):
        self.sparsity = check_sparsity(sparsity, "sparsity")
        self.distribution = _check_distribution(distribution)
        self.start_step = _check_step(start_step, "start_step", 0)
        self.end_step = _check_step(end_step, "end_step", self.start_step + 1)
        self.update_every = _check_step(update_every, "update_every", 1)
        self.params = prunable_parameters(model, exclude=exclude)
        self.shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        present = masks_of(model)
        ones = {n: torch.ones_like(p) for n, p in self.params.items() if n not in present}
        if ones:
            apply_masks(model, ones)
        self.masks = {n: m for n, m in masks_of(model).items() if n in self.params}
        self.history: list[dict] = []

    def is_update_step(self, step: int) -> bool:
        if step == self.end_step:
            return True
        return self.start_step < step < self.end_step and (step - self.start_step) % self.update_every == 0

    def __call__(self, step: int, model: nn.Module, optimizer, x, y) -> None:
        if not self.is_update_step(step):
            return
        target = gradual_sparsity(step, self.sparsity, self.start_step, self.end_step)
        layer_targets = layer_sparsities(self.shapes, target, self.distribution)
        new_masks, record = {}, {"step": step, "target": target, "sparsity": {}}
        for name, mask in self.masks.items():
            active = int(mask.sum())
            n = max(0, active - _n_keep(mask.numel(), layer_targets[name]))
            new_masks[name] = drop(self.params[name], mask, n)  # smallest |w| among the active ones
            record["sparsity"][name] = 1.0 - (active - n) / mask.numel()
        apply_masks(model, new_masks)  # product with the old mask: only shrinks
        self.history.append(record)


# ---------------------------------------------------------------- training FLOPs, as the RigL paper counts them


def dense_macs(model: nn.Module, example_input: torch.Tensor, exclude: Iterable[str] = ()) -> dict[str, int]:
    """Multiply-accumulates of one dense forward pass per example, for each prunable weight's layer.

    A Linear output element costs in_features MACs; a conv output element
    costs (in_channels / groups) * prod(kernel). Keys are parameter names
    (`"fc1.weight"`), so they match masks and `layer_sparsities`. Biases,
    norms and activations are left out, as in the RigL paper's count.

    >>> from chapter11.models import LeNet300100
    >>> dense_macs(LeNet300100(), torch.zeros(1, 40))
    {'fc1.weight': 12000, 'fc2.weight': 30000, 'fc3.weight': 1000}
    """
    check_model(model)
    params = prunable_parameters(model, exclude=exclude)
    modules = {name.rpartition(".")[0]: name for name in params if name.endswith("weight")}
    found: dict[str, int] = {}
    handles = []
    for module_name, module in model.named_modules():
        if module_name not in modules:
            continue

        def hook(m, inputs, out, key=modules[module_name]):
            per_output = m.in_features if isinstance(m, nn.Linear) else (m.in_channels // m.groups) * math.prod(m.kernel_size)
            found[key] = found.get(key, 0) + out.numel() * per_output

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: found[name] for name in params if name in found}


def _flop_args(macs: Mapping[str, int], densities, dense_gradient):
    if not isinstance(macs, Mapping) or not macs:
        raise ValueError(f"macs must be a non-empty mapping layer -> dense MACs, got {macs!r:.80}")
    names = list(macs)
    if isinstance(densities, torch.Tensor):
        rows = densities.detach().to(torch.float64).cpu()  # (T, L)
        if rows.dim() != 2 or rows.shape[1] != len(names):
            raise ValueError(f"densities must have shape (steps, {len(names)}), got {tuple(rows.shape)}")
    else:
        densities = list(densities)
        for i, row in enumerate(densities):
            if not isinstance(row, Mapping) or set(row) != set(names):
                raise ValueError(f"densities[{i}] must map exactly the layers {names}, got {row!r:.80}")
        rows = torch.tensor([[float(row[n]) for n in names] for row in densities], dtype=torch.float64).reshape(-1, len(names))
    flags = torch.as_tensor(list(dense_gradient) if not isinstance(dense_gradient, torch.Tensor) else dense_gradient).bool().flatten()
    if rows.shape[0] == 0 or flags.numel() != rows.shape[0]:
        raise ValueError(f"need one dense_gradient flag per step and at least one step, got {flags.numel()} flags for {rows.shape[0]} steps")
    if torch.isnan(rows).any() or (rows < 0).any() or (rows > 1).any():
        raise ValueError("densities must lie in [0, 1]")
    return names, rows, flags


def training_flops_loop(macs: Mapping[str, int], densities, dense_gradient) -> float:
    """Training FLOPs as a fraction of dense training, counted as in RigL (Evci et al., 2020, appendix H).

    With M_l the dense forward MACs of layer l and d_l(t) its density during
    step t, the sparse forward pass costs f_S(t) = sum_l d_l(t) M_l and the
    dense one f_D = sum_l M_l. A training step costs 3 f_S(t) (forward, plus
    a backward pass of twice the forward: gradients for activations and for
    weights); a step on which RigL takes the dense gradient costs
    2 f_S(t) + f_D (the weight gradient is dense). Dense training costs
    3 f_D per step, so the result is 1.0 for dense and about the average
    density for a static mask (exactly it for an MLP, where every weight is
    used once per example).

    `densities` is one {layer: d} per step, `dense_gradient` one bool per step.
    Hand example, one layer with M = 10: step 1 at density 0.5 costs
    3 * 5 = 15, step 2 at 0.5 with a dense gradient 2 * 5 + 10 = 20; dense
    training costs 2 * 30 = 60, so 35 / 60.

    >>> round(training_flops_loop({"fc": 10}, [{"fc": 0.5}, {"fc": 0.5}], [False, True]), 4)
    0.5833
    """
    names, rows, flags = _flop_args(macs, densities, dense_gradient)
    f_dense = 0.0
    for name in names:
        f_dense += macs[name]
    total = 0.0
    for t in range(rows.shape[0]):
        f_sparse = 0.0
        for j, name in enumerate(names):
            f_sparse += float(rows[t, j]) * macs[name]
        total += 2 * f_sparse + f_dense if flags[t] else 3 * f_sparse
    return total / (3 * f_dense * rows.shape[0])


def training_flops(macs: Mapping[str, int], densities, dense_gradient) -> float:
    """Vectorised `training_flops_loop`; `densities` may be a (steps, layers) tensor in `macs` order.

    >>> round(training_flops({"a": 100, "b": 300}, torch.tensor([[1.0, 0.1]] * 4), [False] * 4), 4)
    0.325
    """
    names, rows, flags = _flop_args(macs, densities, dense_gradient)
    m = torch.tensor([float(macs[n]) for n in names], dtype=torch.float64)  # (L,)
    f_sparse = rows @ m  # (T,)
    f_dense = m.sum()
    per_step = torch.where(flags, 2 * f_sparse + f_dense, 3 * f_sparse)  # (T,)
    return float(per_step.sum() / (3 * f_dense * rows.shape[0]))


def inference_flops(macs: Mapping[str, int], densities: Mapping[str, float]) -> float:
    """Forward FLOPs of a sparse network as a fraction of the dense one: sum_l d_l M_l / sum_l M_l.

    >>> inference_flops({"a": 100, "b": 300}, {"a": 1.0, "b": 0.1})
    0.325
    """
    return training_flops(macs, [densities], [False])


def _schedule_steps(total_steps: int, end_fraction, prune_start, method: str) -> tuple[int, int]:
    """(start_step, end_step) of the mask schedule for `total_steps` optimizer steps.

    SET/RigL update until end_step = floor(end_fraction * T) (at least 1);
    gradual pruning runs from floor(prune_start * T) to end_step.
    """
    for value, name in ((end_fraction, "end_fraction"), (prune_start, "prune_start")):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a real number in [0, 1], got {value!r}")
    if end_fraction == 0:
        raise ValueError(f"end_fraction must be in (0, 1], got {end_fraction}")
    if method == "gradual" and prune_start >= end_fraction:
        raise ValueError(f"prune_start ({prune_start}) must come before end_fraction ({end_fraction})")
    end_step = max(1, int(end_fraction * total_steps))
    start_step = int(prune_start * total_steps)
    return start_step, (max(end_step, start_step + 1) if method == "gradual" else end_step)


def density_schedule(
    shapes: Mapping[str, Sequence[int]],
    method: str,
    sparsity: float,
    steps: int,
    distribution: str = "erk",
    update_every: int = 100,
    alpha: float = 0.3,
    end_fraction: float = 0.75,
    prune_start: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The density of every layer at every step, and RigL's dense-gradient steps, without training.

    Returns `(densities, dense_gradient)` of shapes (steps, layers) and
    (steps,), exactly what `train_sparse` logs for the same settings (a test
    checks it): the number of connections per layer does not depend on the
    weights, only on the method and schedule. Row t is step t + 1; an update
    at step u shows from step u + 1 on. The keywords mean what they mean in
    `train_sparse`, with `steps` = epochs * batches per epoch.

    >>> d, g = density_schedule({"fc": (10, 10)}, "rigl", 0.9, 6, update_every=2, end_fraction=0.9)
    >>> d[:, 0].tolist(), g.tolist()
    ([0.1, 0.1, 0.1, 0.1, 0.1, 0.1], [False, True, False, True, False, False])
    >>> d, _ = density_schedule({"fc": (10, 10)}, "gradual", 0.9, 6, update_every=2, end_fraction=0.75, prune_start=0.0)
    >>> d[:, 0].tolist()
    [1.0, 1.0, 0.21, 0.21, 0.1, 0.1]
    """
    shapes = _check_shapes(shapes)
    if method not in TRAIN_METHODS:
        raise ValueError(f"method must be one of {TRAIN_METHODS}, got {method!r}")
    sparsity = check_sparsity(sparsity, "sparsity")
    steps = _check_step(steps, "steps", 1)
    start_step, end_step = _schedule_steps(steps, end_fraction, prune_start, method)
    names = list(shapes)
    sizes = [math.prod(shapes[n]) for n in names]
    flags = torch.zeros(steps, dtype=torch.bool)  # (T,)
    if method == "dense":
        return torch.ones(steps, len(names), dtype=torch.float64), flags
    if method != "gradual":
        targets = layer_sparsities(shapes, sparsity, distribution)
        row = torch.tensor([_n_keep(n, targets[name]) / n for name, n in zip(names, sizes)], dtype=torch.float64)
        if method == "rigl":
            _check_step(update_every, "update_every", 1)
            for t in range(1, steps + 1):
                if t % update_every == 0 and t < end_step and cosine_drop_fraction(t, alpha, end_step) > 0:
                    flags[t - 1] = True
        return row.expand(steps, len(names)).clone(), flags
    prune = GradualMagnitude.__new__(GradualMagnitude)  # only its schedule is needed, not a model
    prune.start_step, prune.end_step = start_step, end_step
    prune.update_every = _check_step(update_every, "update_every", 1)
    active = list(sizes)
    rows = []
    for t in range(1, steps + 1):
        rows.append([a / n for a, n in zip(active, sizes)])
        if prune.is_update_step(t):
            targets = layer_sparsities(shapes, gradual_sparsity(t, sparsity, prune.start_step, prune.end_step), distribution)
            active = [min(a, _n_keep(n, targets[name])) for a, n, name in zip(active, sizes, names)]
    return torch.tensor(rows, dtype=torch.float64), flags




TRAIN_METHODS = ("dense", "static", "set", "rigl", "gradual")
