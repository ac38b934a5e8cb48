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

Covers: the three distributions (`layer_sparsities_loop` / `layer_sparsities`),
random initial masks, the drop and grow steps (`drop_loop` / `drop`,
`grow_loop` / `grow`), the cosine schedule, `DynamicSparsity`, a callback
for `chapter11.train.train` that runs SET or RigL around any optimizer, and
`train_sparse`, which wires them together for the notebook.

But: it does not implement RigL's other knobs (growing with random noise,
non-zero initialisation of regrown weights, sparse gradient accumulation
over several batches), nor any speed-up: the weights are dense tensors with
zeros, so training costs what dense training costs. In this module a
connection dropped at an update cannot be regrown in the same update (the
reference RigL code allows it; the connection then simply survives), so every
update moves exactly the number of connections it reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .masks import apply_masks, masks_of, prunable_parameters
from .sparsity import check_sparsity

__all__ = [
    "DISTRIBUTIONS",
    "layer_sparsities_loop",
    "layer_sparsities",
    "random_mask",
    "random_masks",
    "cosine_drop_fraction",
    "drop_loop",
    "drop",
    "grow_loop",
    "grow",
    "reset_optimizer_state",
    "DynamicSparsity",
    "train_sparse",
]

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
    check_sparsity(sparsity, "sparsity")
    params = prunable_parameters(model, exclude=exclude)
    targets = layer_sparsities({n: p.shape for n, p in params.items()}, sparsity, distribution)
    generator = torch.Generator().manual_seed(seed)
    masks = {n: random_mask(p.shape, targets[n], generator).to(p.device, p.dtype) for n, p in params.items()}
    if apply:
        apply_masks(model, masks, allow_regrow=True)
    return masks


# ---------------------------------------------------------------- schedule


def cosine_drop_fraction(step: int, alpha: float = 0.3, end_step: int = 1000) -> float:
    """f(t) = alpha / 2 * (1 + cos(pi * t / T_end)) for t < T_end, else 0.

    >>> cosine_drop_fraction(0, 0.3, 100), cosine_drop_fraction(50, 0.3, 100), cosine_drop_fraction(100, 0.3, 100)
    (0.3, 0.15, 0.0)
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if end_step < 1:
        raise ValueError(f"end_step must be >= 1, got {end_step}")
    if step >= end_step:
        return 0.0
    return round(alpha / 2 * (1 + math.cos(math.pi * step / end_step)), 12)


# ---------------------------------------------------------------- drop and grow


def _check_pair(scores: torch.Tensor, mask: torch.Tensor, scores_name: str) -> None:
    if not isinstance(scores, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError(f"{scores_name} and mask must be tensors, got {type(scores).__name__} and {type(mask).__name__}")
    if scores.shape != mask.shape:
        raise ValueError(f"{scores_name} has shape {tuple(scores.shape)} but mask has shape {tuple(mask.shape)}")


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
        record = {"step": step, "drop_fraction": fraction, "moved": {}, "sparsity": {}}
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


def train_sparse(
    model: nn.Module,
    loader: Iterable,
    method: str = "rigl",
    sparsity: float = 0.9,
    distribution: str = "erk",
    epochs: int = 1,
    lr: float = 1e-3,
    update_every: int = 100,
    alpha: float = 0.3,
    end_fraction: float = 0.75,
    eval_loader: Iterable | None = None,
    eval_every: int | None = None,
    exclude: Iterable[str] = (),
    seed: int = 0,
    snapshot: Iterable[str] = (),
    progress_bar: bool | None = None,
):
    """Sparse training from scratch: random masks, then Adam with static, SET or RigL masks.

    `method="static"` keeps the initial random mask; "set" and "rigl" update it
    every `update_every` steps until `end_fraction` of the training steps.
    Returns (History, DynamicSparsity or None for static).
    """
    from .train import train

    if method not in ("static",) + METHODS:
        raise ValueError(f"method must be 'static', 'set' or 'rigl', got {method!r}")
    if not 0 < end_fraction <= 1:
        raise ValueError(f"end_fraction must be in (0, 1], got {end_fraction}")
    random_masks(model, sparsity, distribution, exclude=exclude, seed=seed)
    callback = None
    if method != "static":
        end_step = max(1, int(end_fraction * epochs * len(loader)))
        callback = DynamicSparsity(model, method, update_every, alpha, end_step, seed=seed, snapshot=snapshot)
    history = train(model, loader, epochs=epochs, lr=lr, eval_loader=eval_loader, eval_every=eval_every,
                    callback=callback, progress_bar=progress_bar, desc=method)
    return history, callback
