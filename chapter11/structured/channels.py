"""Channel, filter and neuron pruning: score, soft-mask, then physically remove.

Structured pruning removes whole output units of a layer: a row of a Linear
weight (a neuron) or a filter of a conv weight (an output channel). Three steps,
kept apart as in Torch-Pruning:

1. **Importance** (`filter_norms`, `taylor_importance`, `channel_scores`):
   - the L1/L2 norm of each filter or neuron (Li et al., 2017),
     S_j = ||W_j||_p over the j-th output slice;
   - first-order Taylor importance (Molchanov et al., 2019): the loss change
     when unit j is removed is about I_j = (sum_i g_i w_i)^2, the sum running
     over the weights (and bias) of unit j, averaged over mini-batches;
   - the batch-norm scale |gamma_j| of the norm after unit j (network
     slimming, Liu et al., 2017), and random scores as the control.
2. **Plan** (`channels_to_remove`, `plan_by_scores`): per layer, the indices
   of the lowest-scoring units, `{"conv2": [3, 7, ...]}`.
3. **Apply**: `mask_channels` zeroes those units in place (the model keeps its
   shape, so nothing gets faster); `remove_channels` returns a smaller dense
   copy in which each *dependency group* shrinks together: the producer layer
   (its rows), the batch-norm that follows it, and the consumer layer(s) that
   read its output (their input columns). Masks (`<param>_mask`) are sliced
   along, so unstructured zeros survive the removal and later fine-tuning.
4. **Recover**: `recalibrate_batchnorm` re-estimates every batch-norm's
   running statistics on a few training batches (train-mode forward passes,
   no gradient step), since the layers after a removal see new inputs; then
   fine-tune or distil (`chapter11.distill`).

Groups are known for `LeNet300100` (fc1 -> fc2 -> fc3), `SmallCNN`
(conv -> bn -> conv, conv3 -> bn3 -> fc), the MLPs inside `TransformerClassifier`
(blocks.i.fc1 -> blocks.i.fc2) and torchvision ResNets: there only the inner
convs of each residual block are prunable (BasicBlock conv1 -> bn1 -> conv2), so
the block's output width, which the residual addition ties across the whole
stage, never changes. Pass `groups=` for any other model.

`count_macs` counts multiply-accumulates of Conv/Linear layers with forward
hooks; `count_flops` asks PyTorch's own `FlopCounterMode` (the trusted
reference). The FLOP-predicted speedup is dense MACs / pruned MACs.

But: the activation between producer and consumer must map 0 to 0 (ReLU,
GELU) for soft masking and physical removal to agree; grouped/depthwise convs,
flatten-based heads (several input columns per channel) and the residual
(outer) channels of ResNet are not handled; the FLOP prediction ignores memory
traffic and framework overhead, which dominate at small sizes. The bn_scale
criterion here reads the gamma of a normally trained model; network slimming
proper also trains with an L1 penalty on gamma, which is not implemented.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from chapter11.masks import _mark, apply_masks, refuse_torch_prune
from chapter11.sparsity import check_amount, check_model

__all__ = [
    "Group", "filter_norms_loop", "filter_norms", "taylor_importance_loop", "taylor_importance",
    "channels_to_remove_loop", "channels_to_remove", "dependency_groups", "bn_scale_importance_loop",
    "bn_scale_importance", "CRITERIA", "channel_scores", "plan_by_scores", "mask_channels", "remove_channels",
    "recalibrate_batchnorm_loop", "recalibrate_batchnorm", "count_macs_loop", "count_macs", "count_flops",
    "predicted_speedup",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ---------------------------------------------------------------- importance


def _check_weight(weight, name: str = "weight") -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(f"{name} must have shape (out, in, *kernel) with at least 2 dims, got shape {tuple(weight.shape)}")
    return weight


def _check_p(p) -> int:
    if p not in (1, 2) or isinstance(p, bool):
        raise ValueError(f"p must be 1 (L1 norm) or 2 (L2 norm), got {p!r}")
    return p


def filter_norms_loop(weight: torch.Tensor, p: int = 1) -> torch.Tensor:
    """S_j = ||W_j||_p for each output unit j (Li et al., 2017), one weight at a time.

    `weight` is a Linear (out, in) or conv (out, in, *kernel) weight.

    >>> filter_norms_loop(torch.tensor([[1., -2.], [0., 3.]]), p=1)
    tensor([3., 3.])
    >>> filter_norms_loop(torch.tensor([[3., -4.], [0., 1.]]), p=2)
    tensor([5., 1.])
    """
    weight, p = _check_weight(weight), _check_p(p)
    scores = []
    for j in range(weight.shape[0]):
        total = 0.0
        for w in weight[j].flatten().tolist():
            total += abs(w) ** p
        scores.append(total ** (1.0 / p))
    return torch.tensor(scores, dtype=weight.dtype)


def filter_norms(weight: torch.Tensor, p: int = 1) -> torch.Tensor:
    """Vectorised `filter_norms_loop`: one norm per row of the flattened weight.

    >>> filter_norms(torch.tensor([[3., -4.], [0., 1.]]), p=2)
    tensor([5., 1.])
    """
    weight, p = _check_weight(weight), _check_p(p)
    return weight.detach().flatten(1).norm(p=p, dim=1)  # (out,)


def _check_grad(grad, like: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(grad).__name__}")
    if grad.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(grad.shape)}, but its parameter has shape {tuple(like.shape)}")
    return grad


def taylor_importance_loop(weight, grad, bias=None, bias_grad=None) -> torch.Tensor:
    """I_j = (sum_i g_i w_i)^2 over the weights (and bias) of unit j (Molchanov et al., 2019).

    First-order Taylor: removing unit j changes the loss by about
    -sum_i g_i w_i, so the square of that sum estimates its importance.

    >>> taylor_importance_loop(torch.tensor([[1., 2.], [3., 0.]]), torch.tensor([[1., 1.], [-1., 5.]]))
    tensor([9., 9.])
    >>> taylor_importance_loop(torch.tensor([[1.]]), torch.tensor([[2.]]), torch.tensor([1.]), torch.tensor([-2.]))
    tensor([0.])
    """
    weight = _check_weight(weight)
    grad = _check_grad(grad, weight, "grad")
    if (bias is None) != (bias_grad is None):
        raise ValueError("bias and bias_grad must be given together")
    scores = []
    for j in range(weight.shape[0]):
        total = 0.0
        for w, g in zip(weight[j].flatten().tolist(), grad[j].flatten().tolist()):
            total += w * g
        if bias is not None:
            total += float(bias[j]) * float(_check_grad(bias_grad, bias, "bias_grad")[j])
        scores.append(total * total)
    return torch.tensor(scores, dtype=weight.dtype)


def taylor_importance(weight, grad, bias=None, bias_grad=None) -> torch.Tensor:
    """Vectorised `taylor_importance_loop`.

    >>> taylor_importance(torch.tensor([[1., 2.], [3., 0.]]), torch.tensor([[1., 1.], [-1., 5.]]))
    tensor([9., 9.])
    """
    weight = _check_weight(weight)
    grad = _check_grad(grad, weight, "grad")
    if (bias is None) != (bias_grad is None):
        raise ValueError("bias and bias_grad must be given together")
    total = (weight.detach() * grad).flatten(1).sum(1)  # (out,)
    if bias is not None:
        total = total + bias.detach() * _check_grad(bias_grad, bias, "bias_grad")  # (out,)
    return total.square()


def channels_to_remove_loop(scores: torch.Tensor, amount, name: str = "scores") -> list[int]:
    """Indices of the `amount` lowest scores (ties: lower index first), sorted.

    `amount` is an int count or a float fraction, as in torch.nn.utils.prune;
    removing every unit of a layer is refused.

    >>> channels_to_remove_loop(torch.tensor([0.5, 0.1, 0.9, 0.1]), 2)
    [1, 3]
    >>> channels_to_remove_loop(torch.tensor([0.5, 0.1]), 1.0)
    Traceback (most recent call last):
    ...
    ValueError: amount=1.0 would remove all 2 units of scores; keep at least one
    """
    scores = _check_scores(scores, name)
    k = _check_removal(amount, scores.numel(), name)
    order = []
    for i, s in enumerate(scores.tolist()):  # insertion sort by (score, index)
        pos = len(order)
        while pos > 0 and order[pos - 1][0] > s:
            pos -= 1
        order.insert(pos, (s, i))
    return sorted(i for _, i in order[:k])


def channels_to_remove(scores: torch.Tensor, amount, name: str = "scores") -> list[int]:
    """Vectorised `channels_to_remove_loop` (a stable sort).

    >>> channels_to_remove(torch.tensor([0.5, 0.1, 0.9, 0.1]), 0.5)
    [1, 3]
    """
    scores = _check_scores(scores, name)
    k = _check_removal(amount, scores.numel(), name)
    order = torch.sort(scores, stable=True).indices  # (n,)
    return sorted(order[:k].tolist())


def _check_scores(scores, name: str) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of scores, got {scores!r:.80}")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN")
    return scores.detach().float().cpu()


def _normalize_amount(amount):
    """Python int for any integer (numpy ints too), float for any real; bools refused.

    torch.nn.utils.prune's rule: an integer is a count, a float a fraction. A
    numpy integer is an integer, so `np.int64(2)` removes 2 units, not 200%.
    """
    if isinstance(amount, (bool, np.bool_)) or (isinstance(amount, torch.Tensor) and amount.dtype == torch.bool):
        raise TypeError(f"amount must be an int count or a float fraction, got a bool ({amount!r})")
    if isinstance(amount, torch.Tensor) and amount.numel() == 1:
        amount = amount.item()
    if isinstance(amount, numbers.Integral):
        return int(amount)
    if isinstance(amount, numbers.Real):
        return float(amount)
    raise TypeError(f"amount must be an int count or a float fraction, got {type(amount).__name__}")


def _check_removal(amount, n: int, name: str) -> int:
    k = check_amount(_normalize_amount(amount), n)
    if k >= n:
        raise ValueError(f"amount={amount} would remove all {n} units of {name}; keep at least one")
    return k


# ---------------------------------------------------------------- dependency groups


@dataclass(frozen=True)
class Group:
    """Layers that shrink together when output units of `producer` are removed.

    `norm` is the batch-norm right after the producer (or None); `consumers`
    read the producer's output, one input column/channel per unit.
    """

    producer: str
    norm: str | None
    consumers: tuple[str, ...]


def dependency_groups(model: nn.Module) -> dict[str, Group]:
    """The prunable groups of a known architecture, keyed by producer name.

    >>> from chapter11.models import LeNet300100
    >>> sorted(dependency_groups(LeNet300100()))
    ['fc1', 'fc2']
    >>> dependency_groups(LeNet300100())["fc1"]
    Group(producer='fc1', norm=None, consumers=('fc2',))
    """
    check_model(model)
    from chapter11.models import LeNet300100, SmallCNN, TransformerClassifier

    if isinstance(model, LeNet300100):
        return {"fc1": Group("fc1", None, ("fc2",)), "fc2": Group("fc2", None, ("fc3",))}
    if isinstance(model, SmallCNN):
        return {
            "conv1": Group("conv1", "bn1", ("conv2",)),
            "conv2": Group("conv2", "bn2", ("conv3",)),
            "conv3": Group("conv3", "bn3", ("fc",)),
        }
    if isinstance(model, TransformerClassifier):
        return {f"blocks.{i}.fc1": Group(f"blocks.{i}.fc1", None, (f"blocks.{i}.fc2",)) for i in range(len(model.blocks))}
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        ResNet = None
    if ResNet is not None and isinstance(model, ResNet):
        groups = {}
        for name, module in model.named_modules():
            if isinstance(module, BasicBlock):
                groups[f"{name}.conv1"] = Group(f"{name}.conv1", f"{name}.bn1", (f"{name}.conv2",))
            elif isinstance(module, Bottleneck):
                groups[f"{name}.conv1"] = Group(f"{name}.conv1", f"{name}.bn1", (f"{name}.conv2",))
                groups[f"{name}.conv2"] = Group(f"{name}.conv2", f"{name}.bn2", (f"{name}.conv3",))
        return groups
    raise TypeError(
        f"model: no dependency groups known for {type(model).__name__}; pass groups={{producer: Group(producer, norm, consumers)}}"
    )


def _groups_for(model: nn.Module, groups: Mapping[str, Group] | None) -> dict[str, Group]:
    groups = dict(dependency_groups(model) if groups is None else groups)
    modules = dict(model.named_modules())
    for key, g in groups.items():
        if not isinstance(g, Group):
            raise TypeError(f"groups[{key!r}] must be a Group, got {type(g).__name__}")
        for role, name in [("producer", g.producer), ("norm", g.norm), *[("consumer", c) for c in g.consumers]]:
            if name is not None and name not in modules:
                raise ValueError(f"groups[{key!r}]: unknown {role} layer {name!r}")
    return groups


def _check_plan(model: nn.Module, plan, groups: dict[str, Group]) -> dict[str, list[int]]:
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan must map layer names to lists of unit indices, got {type(plan).__name__}")
    clean = {}
    for layer, indices in plan.items():
        if layer not in groups:
            raise ValueError(f"plan: unknown or unprunable layer {layer!r}; prunable layers are {sorted(groups)}")
        n = model.get_submodule(layer).weight.shape[0]
        values = indices.tolist() if isinstance(indices, torch.Tensor) else indices
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(f"plan[{layer!r}] must be a list of unit indices, got {type(indices).__name__}")
        values = list(values)
        bad = [i for i in values if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
        if bad:
            raise TypeError(f"plan[{layer!r}]: unit indices must be ints, got {bad[0]!r}")
        idx = sorted({int(i) for i in values})
        if idx and (idx[0] < 0 or idx[-1] >= n):
            raise ValueError(f"plan[{layer!r}]: indices must be in [0, {n}), got {idx[0]}..{idx[-1]}")
        if len(idx) >= n:
            raise ValueError(f"plan[{layer!r}]: removing all {n} units would delete the layer; keep at least one")
        clean[layer] = idx
    return clean


# ---------------------------------------------------------------- scores at model level


def bn_scale_importance_loop(norm: nn.Module) -> torch.Tensor:
    """S_j = |gamma_j| of the batch-norm after unit j (network slimming, Liu et al., 2017).

    Batch-norm multiplies channel j by gamma_j after normalising it, so a
    channel with gamma_j near 0 sends almost nothing on whatever its weights.

    >>> bn = nn.BatchNorm1d(3); bn.weight.data = torch.tensor([0.5, -2.0, 0.0])
    >>> bn_scale_importance_loop(bn)
    tensor([0.5000, 2.0000, 0.0000])
    """
    gamma = _check_norm(norm)
    return torch.tensor([abs(g) for g in gamma.tolist()], dtype=gamma.dtype)


def bn_scale_importance(norm: nn.Module) -> torch.Tensor:
    """Vectorised `bn_scale_importance_loop`.

    >>> bn = nn.BatchNorm1d(2); bn.weight.data = torch.tensor([-0.25, 1.0])
    >>> bn_scale_importance(bn)
    tensor([0.2500, 1.0000])
    """
    return _check_norm(norm).abs()  # (out,)


def _check_norm(norm) -> torch.Tensor:
    if not isinstance(norm, _NORM):
        raise TypeError(f"norm must be a BatchNorm layer, got {type(norm).__name__}")
    if not norm.affine:
        raise ValueError("norm has no scale gamma (affine=False); the bn_scale criterion needs one")
    return norm.weight.detach()


CRITERIA = ("l1", "l2", "taylor", "bn_scale", "random")


def channel_scores(
    model: nn.Module,
    criterion: str = "l1",
    batches: Iterable | None = None,
    loss_fn: Callable | None = None,
    groups: Mapping[str, Group] | None = None,
    max_batches: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """{producer: (out,) scores} for every prunable layer; the lowest scores go first.

    `criterion` is one of `CRITERIA`: "l1", "l2" (filter norms, no data),
    "taylor" (needs `batches` of (x, y); the model is left in eval mode with
    zero grads), "bn_scale" (|gamma| of the batch-norm after each producer;
    every group needs a norm) or "random" (uniform scores from `seed`, the
    control that ignores the model).
    """
    check_model(model)
    groups = _groups_for(model, groups)
    if criterion in ("l1", "l2"):
        p = 1 if criterion == "l1" else 2
        return {name: filter_norms(model.get_submodule(name).weight, p) for name in groups}
    if criterion == "bn_scale":
        missing = [name for name, g in groups.items() if g.norm is None]
        if missing:
            raise ValueError(f"criterion 'bn_scale' needs a batch-norm after every producer; {missing} have none")
        return {name: bn_scale_importance(model.get_submodule(g.norm)).float().cpu() for name, g in groups.items()}
    if criterion == "random":
        generator = torch.Generator().manual_seed(seed)
        return {name: torch.rand(model.get_submodule(name).weight.shape[0], generator=generator) for name in groups}
    if criterion != "taylor":
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if batches is None:
        raise ValueError("batches: the 'taylor' criterion needs batches of (x, y) to compute gradients")
    loss_fn = loss_fn or F.cross_entropy
    layers = {name: model.get_submodule(name) for name in groups}
    totals = {name: torch.zeros(m.weight.shape[0]) for name, m in layers.items()}
    seen = 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # batch-norm uses running stats, as at inference
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x.to(device)), y.to(device)).backward()
        for name, m in layers.items():
            bias = m.bias if m.bias is not None and m.bias.grad is not None else None
            totals[name] += taylor_importance(m.weight, m.weight.grad, bias, None if bias is None else bias.grad).float().cpu()
        seen += 1
        if max_batches is not None and seen >= max_batches:
            break
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if seen == 0:
        raise ValueError("batches: no batch was given")
    return {name: t / seen for name, t in totals.items()}


def plan_by_scores(scores: Mapping[str, torch.Tensor], amount) -> dict[str, list[int]]:
    """Remove the `amount` lowest-scoring units of every layer in `scores`.

    >>> plan_by_scores({"fc1": torch.tensor([3., 1., 2.]), "fc2": torch.tensor([1., 5.])}, 1)
    {'fc1': [1], 'fc2': [0]}
    """
    return {name: channels_to_remove(s, amount, name=name) for name, s in scores.items()}


# ---------------------------------------------------------------- soft masking


@torch.no_grad()
def mask_channels(model: nn.Module, plan: Mapping[str, Sequence[int]], groups=None, persistent: bool = True) -> nn.Module:
    """Zero the planned units in place: producer rows and bias, and the norm's scale and shift.

    With `persistent=True` the zeros are kept as `chapter11.masks` buffers, so
    `chapter11.train.train` keeps them at zero while fine-tuning.

    >>> from chapter11.models import LeNet300100
    >>> model = mask_channels(LeNet300100(), {"fc1": [0, 2]})
    >>> int((model.fc1.weight.abs().sum(1) == 0).sum())
    2
    """
    check_model(model)
    groups = _groups_for(model, groups)
    plan = _check_plan(model, plan, groups)
    masks = {}
    for layer, idx in plan.items():
        if not idx:
            continue
        g = groups[layer]
        for module_name in (g.producer, g.norm):
            if module_name is None:
                continue
            module = model.get_submodule(module_name)
            for pname in ("weight", "bias"):
                param = getattr(module, pname, None)
                if param is None:
                    continue
                mask = torch.ones_like(param)
                mask[idx] = 0
                masks[f"{module_name}.{pname}"] = mask
    if persistent:
        apply_masks(model, masks)
    else:
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
    return model


# ---------------------------------------------------------------- physical removal


def _take(tensor: torch.Tensor | None, keep: torch.Tensor, dim: int) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().index_select(dim, keep).clone()  # keep only the listed slices


_MASK = "_mask"


def _carry_masks(old: nn.Module, new: nn.Module, slices: Mapping[str, int | None], keep: torch.Tensor) -> None:
    """Copy `<param>_mask` buffers from `old` to `new`, sliced like their parameters.

    `slices[param]` is the dim whose units are kept (`keep`), or None for a
    parameter that keeps its shape (a consumer's bias). The new weights are
    multiplied by their masks, so a pruned weight stays exactly zero.
    """
    for buffer_name, mask in old.named_buffers(recurse=False):
        if not buffer_name.endswith(_MASK):
            continue
        param_name = buffer_name[: -len(_MASK)]
        if param_name not in slices:
            raise ValueError(f"cannot carry mask {buffer_name!r} of a {type(old).__name__} through channel removal")
        param = getattr(new, param_name, None)
        if param is None:
            continue
        dim = slices[param_name]
        sliced = mask.detach().clone() if dim is None else _take(mask, keep.to(mask.device), dim)
        new.register_buffer(buffer_name, sliced)
        _mark(new, param_name)  # still ours: torch's pruning applied on top is caught, not silently merged
        param.data.mul_(sliced)


def _new_producer(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    n = len(keep)
    if isinstance(m, nn.Linear):
        new = nn.Linear(m.in_features, n, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    elif isinstance(m, _CONV):
        _check_conv(m)
        new = type(m)(m.in_channels, n, m.kernel_size, m.stride, m.padding, m.dilation, 1, m.bias is not None, m.padding_mode,
                      device=m.weight.device, dtype=m.weight.dtype)
    else:
        raise TypeError(f"producer layer must be Linear or Conv, got {type(m).__name__}")
    new.weight.data = _take(m.weight, keep, 0)  # (n, in, *k)
    if m.bias is not None:
        new.bias.data = _take(m.bias, keep, 0)  # (n,)
    _carry_masks(m, new, {"weight": 0, "bias": 0}, keep)
    return new.train(m.training)


def _new_consumer(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    n = len(keep)
    if isinstance(m, nn.Linear):
        new = nn.Linear(n, m.out_features, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    elif isinstance(m, _CONV):
        _check_conv(m)
        new = type(m)(n, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, 1, m.bias is not None, m.padding_mode,
                      device=m.weight.device, dtype=m.weight.dtype)
    else:
        raise TypeError(f"consumer layer must be Linear or Conv, got {type(m).__name__}")
    new.weight.data = _take(m.weight, keep, 1)  # (out, n, *k)
    if m.bias is not None:
        new.bias.data = m.bias.detach().clone()
    _carry_masks(m, new, {"weight": 1, "bias": None}, keep)
    return new.train(m.training)


def _new_norm(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    if not isinstance(m, _NORM):
        raise TypeError(f"norm layer must be BatchNorm, got {type(m).__name__}")
    new = type(m)(len(keep), m.eps, m.momentum, m.affine, m.track_running_stats, device=keep.device)
    if m.affine:
        new.weight.data, new.bias.data = _take(m.weight, keep, 0), _take(m.bias, keep, 0)
    if m.track_running_stats:
        new.running_mean.copy_(m.running_mean[keep])
        new.running_var.copy_(m.running_var[keep])
        new.num_batches_tracked.copy_(m.num_batches_tracked)
    new = new.to(m.running_mean.dtype if m.running_mean is not None else torch.float32)
    _carry_masks(m, new, {"weight": 0, "bias": 0}, keep)
    return new.train(m.training)


def _check_conv(m: nn.Module) -> None:
    if m.groups != 1:
        raise ValueError(f"grouped conv (groups={m.groups}) is not supported by channel removal")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def remove_channels(model: nn.Module, plan: Mapping[str, Sequence[int]], groups=None, inplace: bool = False) -> nn.Module:
    """A smaller dense model without the planned units; dependent layers shrink together.

    Returns a copy unless `inplace=True`. Masks (`<param>_mask` buffers, from
    `chapter11.masks.apply_masks`, unstructured pruning or `mask_channels`)
    are sliced along with their weights: the producer's and the norm's masks
    lose the removed rows, each consumer's weight mask the removed input
    columns, so fine-tuning the smaller model keeps every pruned weight at zero.

    >>> from chapter11.models import LeNet300100
    >>> small = remove_channels(LeNet300100(), {"fc1": range(100), "fc2": [0]})
    >>> small.fc1.weight.shape, small.fc2.weight.shape, small.fc3.weight.shape
    (torch.Size([200, 40]), torch.Size([99, 200]), torch.Size([10, 99]))
    """
    check_model(model)
    refuse_torch_prune(model)
    groups = _groups_for(model, groups)
    plan = _check_plan(model, plan, groups)
    if not inplace:
        model = copy.deepcopy(model)
    for layer, idx in plan.items():
        if not idx:
            continue
        g = groups[layer]
        producer = model.get_submodule(g.producer)
        n = producer.weight.shape[0]
        dropped = torch.zeros(n, dtype=torch.bool)
        dropped[idx] = True
        keep = torch.nonzero(~dropped).flatten().to(producer.weight.device)  # (n_kept,)
        _replace(model, g.producer, _new_producer(producer, keep))
        if g.norm is not None:
            _replace(model, g.norm, _new_norm(model.get_submodule(g.norm), keep))
        for c in g.consumers:
            _replace(model, c, _new_consumer(model.get_submodule(c), keep))
    return model


# ---------------------------------------------------------------- batch-norm recalibration


def _norms(model: nn.Module) -> dict[str, nn.Module]:
    norms = {name: m for name, m in model.named_modules() if isinstance(m, _NORM) and m.track_running_stats}
    if not norms:
        raise ValueError(f"model: {type(model).__name__} has no batch-norm layer with running statistics to recalibrate")
    return norms


def _check_max_batches(max_batches) -> int | None:
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral) or max_batches < 1):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")
    return max_batches


def _batches_of(batches: Iterable, max_batches: int | None, device):
    seen = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        yield x.to(device)
        seen += 1
        if max_batches is not None and seen >= max_batches:
            return


@torch.no_grad()
def recalibrate_batchnorm_loop(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> int:
    """Re-estimate each batch-norm's running mean and variance on `batches`, with plain loops.

    After channels are removed, the next layer's outputs change, and the
    running statistics its batch-norm learnt on the dense model are stale.
    Recalibration runs the model forward in train mode without any gradient
    step and sets, per channel c, running_mean_c = average over batches of
    the batch mean of channel c, and running_var_c = average of the unbiased
    batch variances (what `torch.optim.swa_utils.update_bn` and momentum=None
    compute). Weights do not change. Returns the number of batches used.

    >>> bn = nn.BatchNorm1d(1)
    >>> recalibrate_batchnorm_loop(bn, [torch.tensor([[1.0], [3.0]]), torch.tensor([[5.0], [5.0]])])
    2
    >>> bn.running_mean, bn.running_var  # means 2 and 5, unbiased variances 2 and 0
    (tensor([3.5000]), tensor([1.]))
    """
    check_model(model)
    norms = _norms(model)
    max_batches = _check_max_batches(max_batches)
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in norms}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs[name].append(args[0].detach().cpu()))
               for name, m in norms.items()]
    was_training = model.training
    saved = {name: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for name, m in norms.items()}
    device = next(model.parameters()).device
    model.train()
    seen = 0
    try:
        for x in _batches_of(batches, max_batches, device):
            model(x)  # in train mode each norm normalises with the batch's own statistics
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        for name, m in norms.items():
            m.running_mean.copy_(saved[name][0]); m.running_var.copy_(saved[name][1]); m.num_batches_tracked.copy_(saved[name][2])
        raise ValueError("batches: no batch was given")
    for name, m in norms.items():
        means, variances = [], []
        for c in range(m.num_features):
            mean_sum, var_sum = 0.0, 0.0
            for x in inputs[name]:
                values = x.transpose(0, 1)[c].flatten().tolist()  # channel c over batch and positions
                mu = sum(values) / len(values)
                mean_sum += mu
                var_sum += sum((v - mu) ** 2 for v in values) / (len(values) - 1)
            means.append(mean_sum / seen)
            variances.append(var_sum / seen)
        m.running_mean.copy_(torch.tensor(means))
        m.running_var.copy_(torch.tensor(variances))
        m.num_batches_tracked.fill_(seen)
    return seen


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> int:
    """Vectorised `recalibrate_batchnorm_loop`: reset the running statistics, then forward passes in train mode.

    Momentum is set to None for the passes (a cumulative average, each batch
    weighted equally) and restored afterwards, as are the model's mode and
    its weights (untouched: no gradient is taken). `batches` yields x or
    (x, y); `max_batches` caps how many are used.

    >>> bn = nn.BatchNorm1d(1)
    >>> recalibrate_batchnorm(bn, [(torch.tensor([[1.0], [3.0]]), None), (torch.tensor([[5.0], [5.0]]), None)])
    2
    >>> bn.running_mean, bn.running_var
    (tensor([3.5000]), tensor([1.]))
    """
    check_model(model)
    norms = _norms(model)
    max_batches = _check_max_batches(max_batches)
    saved = {name: (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for name, m in norms.items()}
    for m in norms.values():
        m.reset_running_stats()
        m.momentum = None  # running stat = average over the batches seen since the reset
    was_training = model.training
    device = next(model.parameters()).device
    model.train()
    seen = 0
    try:
        for x in _batches_of(batches, max_batches, device):
            model(x)
            seen += 1
    finally:
        for name, m in norms.items():
            m.momentum = saved[name][0]
        model.train(was_training)
    if seen == 0:
        for name, m in norms.items():
            m.running_mean.copy_(saved[name][1]); m.running_var.copy_(saved[name][2]); m.num_batches_tracked.copy_(saved[name][3])
        raise ValueError("batches: no batch was given")
    return seen


# ---------------------------------------------------------------- MACs and FLOPs


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features  # each output sums in_features products
    kernel = math.prod(module.weight.shape[2:])
    return out.numel() * (module.in_channels // module.groups) * kernel


def _hooked_layers(model: nn.Module, example_input, fn) -> None:
    handles = [m.register_forward_hook(fn) for m in model.modules() if isinstance(m, (nn.Linear, *_CONV))]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()


def count_macs_loop(model: nn.Module, example_input) -> int:
    """Multiply-accumulates of all Conv/Linear layers for `example_input`, layer by layer.

    A conv output element costs (in_channels / groups) * prod(kernel) MACs; a
    Linear output element costs in_features. Counts the whole batch.

    >>> count_macs_loop(nn.Linear(3, 2), torch.zeros(4, 3))
    24
    """
    check_model(model)
    total = 0

    def hook(module, inputs, out):
        nonlocal total
        per_output = module.in_features if isinstance(module, nn.Linear) else module.in_channels // module.groups
        for k in (() if isinstance(module, nn.Linear) else module.weight.shape[2:]):
            per_output *= k
        elements = 1
        for d in out.shape:
            elements *= d
        total += elements * per_output

    _hooked_layers(model, example_input, hook)
    return total


def count_macs(model: nn.Module, example_input, by_layer: bool = False):
    """Vectorised `count_macs_loop`; with `by_layer=True`, {layer name: MACs}.

    >>> count_macs(nn.Conv1d(2, 4, 3), torch.zeros(1, 2, 10))
    192
    """
    check_model(model)
    names = {m: n for n, m in model.named_modules()}
    found: dict[str, int] = {}

    def hook(module, inputs, out):
        key = names[module]
        found[key] = found.get(key, 0) + _layer_macs(module, out)

    _hooked_layers(model, example_input, hook)
    return found if by_layer else sum(found.values())


def count_flops(model: nn.Module, example_input) -> int:
    """Total FLOPs by PyTorch's `FlopCounterMode` (a MAC counts as 2 FLOPs).

    It also counts matmuls outside Linear layers (attention), so it is the
    reference for models that have them.

    >>> count_flops(nn.Linear(3, 2, bias=False), torch.zeros(4, 3))
    48
    """
    check_model(model)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example_input)
    return int(counter.get_total_flops())


def predicted_speedup(dense: nn.Module, pruned: nn.Module, example_input) -> float:
    """FLOP-predicted speedup: dense FLOPs / pruned FLOPs on the same input."""
    return count_flops(dense, example_input) / count_flops(pruned, example_input)
