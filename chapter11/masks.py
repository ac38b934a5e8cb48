"""Masks: 0/1 tensors that say which weights are kept.

A mask for parameter `fc1.weight` lives as a buffer `fc1.weight_mask`, the same
name `torch.nn.utils.prune` uses, so it travels with `state_dict()` and comes
back with `load_masked_state_dict`. Unlike `torch.nn.utils.prune` there is no
forward hook: the weight itself holds the zeros, and `MaskedOptimizer` keeps
them at zero through training by masking the gradient before each step and
re-zeroing after it. The forward pass then costs exactly what a dense one does.

A mask never un-prunes: applying a second mask multiplies it into the first.
Only code that says so (`allow_regrow=True`, used by dynamic sparsity) may
turn a zero back on.

Covers: finding prunable layers, applying/validating/removing masks, the
optimizer wrapper, conversion to and from `torch.nn.utils.prune`, and
checkpoints that keep their masks.
But: masks on embeddings or norms are allowed only if you name them yourself;
`prunable_parameters` lists the weights of Linear and Conv layers.

    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(4, 2, bias=False)
    >>> apply_masks(layer, {"weight": torch.tensor([[1., 0., 1., 0.], [0., 0., 1., 1.]])})
    >>> int((layer.weight == 0).sum()), sorted(masks_of(layer))
    (4, ['weight'])
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .report import atomic_torch_save

__all__ = [
    "PRUNABLE_TYPES",
    "prunable_parameters",
    "check_mask",
    "apply_masks",
    "masks_of",
    "remove_masks",
    "enforce_masks",
    "mask_gradients",
    "MaskedOptimizer",
    "to_torch_prune",
    "from_torch_prune",
    "save_masked",
    "load_masked_state_dict",
    "load_masked",
]

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUFFIX = "_mask"


def _split(name: str) -> tuple[str, str]:
    """'encoder.fc1.weight' -> ('encoder.fc1', 'weight')."""
    module_name, _, param_name = name.rpartition(".")
    return module_name, param_name


def prunable_parameters(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """Weights of every Linear/Conv layer, by parameter name, minus `exclude`.

    `exclude` holds module names (`"fc3"`) or parameter names (`"fc3.weight"`);
    a name that matches nothing raises, so a typo cannot keep a layer dense
    silently. The chapter advises keeping the first and last layers dense.

    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> list(prunable_parameters(model))
    ['0.weight', '2.weight']
    >>> list(prunable_parameters(model, exclude=["2"]))
    ['0.weight']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(exclude, str):
        exclude = [exclude]
    exclude = list(exclude)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for name in exclude:
        if name not in modules and name not in params:
            raise ValueError(f"exclude: unknown layer or parameter name {name!r}; known layers include {sorted(modules)[:8]}")
    found = {}
    for module_name, module in modules.items():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        pname = f"{module_name}.weight" if module_name else "weight"
        if module_name in exclude or pname in exclude:
            continue
        if any(module_name.startswith(e + ".") for e in exclude if e in modules and e):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            found[pname] = weight
    if not found:
        raise ValueError(f"model: {type(model).__name__} has no prunable Linear/Conv weights (after exclude={exclude})")
    return found


def _owner(model: nn.Module, name: str, argument: str = "masks") -> tuple[nn.Module, str, nn.Parameter]:
    module_name, param_name = _split(name)
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        raise ValueError(f"{argument}: unknown parameter name {name!r}") from None
    param = getattr(module, param_name, None)
    if not isinstance(param, nn.Parameter):
        raise ValueError(f"{argument}: unknown parameter name {name!r}")
    return module, param_name, param


def check_mask(mask, param: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Return `mask` as a 0/1 tensor of `param`'s dtype and device, or raise.

    >>> check_mask(torch.tensor([1, 0]), torch.ones(2))
    tensor([1., 0.])
    >>> check_mask(torch.tensor([0.5, 1.0]), torch.ones(2), name="fc1.weight")
    Traceback (most recent call last):
    ...
    ValueError: mask for fc1.weight must hold only 0 and 1, found 0.5
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask for {name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(param.shape):
        raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, but the parameter has shape {tuple(param.shape)}")
    if mask.is_floating_point() and torch.isnan(mask).any():
        raise ValueError(f"mask for {name} contains NaN")
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        raise ValueError(f"mask for {name} must hold only 0 and 1, found {mask[bad].flatten()[0].item():g}")
    return mask.to(dtype=param.dtype, device=param.device)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], allow_regrow: bool = False) -> None:
    """Zero the pruned weights of `model` and keep each mask as `<param>_mask`.

    A parameter that already has a mask gets the product of old and new, so
    pruning only ever removes. `allow_regrow=True` replaces the old mask
    instead (dynamic sparsity); regrown weights restart at zero.
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must map parameter names to 0/1 tensors, got {type(masks).__name__}")
    for name, mask in masks.items():
        module, param_name, param = _owner(model, name)
        if torch.isnan(param).any():
            raise ValueError(f"masks: the weights of {name} contain NaN; refusing to prune a broken model")
        mask = check_mask(mask, param, name)
        buffer_name = param_name + SUFFIX
        old = getattr(module, buffer_name, None)
        if old is not None and not allow_regrow:
            mask = old * mask
        if old is not None:
            old.copy_(mask)
        else:
            module.register_buffer(buffer_name, mask.clone())
        param.mul_(getattr(module, buffer_name))


def _masked_pairs(model: nn.Module) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    pairs = []
    for module_name, module in model.named_modules():
        for buffer_name, buf in module.named_buffers(recurse=False):
            if not buffer_name.endswith(SUFFIX):
                continue
            param = getattr(module, buffer_name[: -len(SUFFIX)], None)
            if isinstance(param, nn.Parameter):
                param_name = buffer_name[: -len(SUFFIX)]
                pairs.append((f"{module_name}.{param_name}" if module_name else param_name, param, buf))
    return pairs


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> mask buffer, for every masked parameter (empty if none)."""
    return {name: mask for name, _, mask in _masked_pairs(model)}


@torch.no_grad()
def remove_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Make the zeros permanent and drop the mask buffers; returns the masks."""
    removed = {}
    for module_name, module in model.named_modules():
        for buffer_name in [b for b, _ in module.named_buffers(recurse=False) if b.endswith(SUFFIX)]:
            param_name = buffer_name[: -len(SUFFIX)]
            param = getattr(module, param_name, None)
            if not isinstance(param, nn.Parameter):
                continue
            mask = getattr(module, buffer_name)
            param.mul_(mask)
            delattr(module, buffer_name)
            removed[f"{module_name}.{param_name}" if module_name else param_name] = mask
    return removed


@torch.no_grad()
def enforce_masks(model: nn.Module) -> None:
    """Re-zero every masked weight (cheap: one fused multiply for all layers)."""
    pairs = _masked_pairs(model)
    if pairs:
        torch._foreach_mul_([p for _, p, _ in pairs], [m for _, _, m in pairs])


@torch.no_grad()
def mask_gradients(model: nn.Module) -> None:
    """Zero the gradient of every pruned weight, so optimizer state stays zero there."""
    pairs = [(p.grad, m) for _, p, m in _masked_pairs(model) if p.grad is not None]
    if pairs:
        torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])


class MaskedOptimizer:
    """Wrap any `torch.optim.Optimizer` so masked weights stay exactly zero.

    Each `step()` masks the gradients, runs the wrapped step, then re-zeroes
    the weights (weight decay and momentum cannot revive them). Masks are read
    from the model at every step, so a mask changed in place (dynamic
    sparsity) is honoured. Everything else is forwarded to the optimizer.

    >>> model = nn.Linear(3, 1, bias=False)
    >>> apply_masks(model, {"weight": torch.tensor([[1., 0., 1.]])})
    >>> opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1), model)
    >>> for _ in range(3):
    ...     opt.zero_grad(); model(torch.ones(1, 3)).sum().backward(); opt.step()
    >>> model.weight[0, 1].item()
    0.0
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.model = model

    def step(self, closure=None):
        pairs = _masked_pairs(self.model)
        grads = [(p.grad, m) for _, p, m in pairs if p.grad is not None]
        with torch.no_grad():
            if grads:
                torch._foreach_mul_([g for g, _ in grads], [m for _, m in grads])
        loss = self.optimizer.step(closure)
        with torch.no_grad():
            if pairs:
                torch._foreach_mul_([p for _, p, _ in pairs], [m for _, _, m in pairs])
        return loss

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name):
        return getattr(self.optimizer, name)


@torch.no_grad()
def to_torch_prune(model: nn.Module) -> nn.Module:
    """Move our masks into torch.nn.utils.prune's `weight_orig`/`weight_mask` form."""
    import torch.nn.utils.prune as prune

    for name, mask in remove_masks(model).items():
        module, param_name, _ = _owner(model, name)
        prune.custom_from_mask(module, param_name, mask.clone())
    return model


@torch.no_grad()
def from_torch_prune(model: nn.Module) -> nn.Module:
    """Turn torch.nn.utils.prune's reparametrisation back into our masks."""
    import torch.nn.utils.prune as prune

    found = {}
    for module_name, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                names = [h._tensor_name for h in hook._pruning_methods] if isinstance(hook, prune.PruningContainer) else [hook._tensor_name]
                for tname in names:
                    mask = getattr(module, tname + SUFFIX).detach().clone()
                    prune.remove(module, tname)
                    found[f"{module_name}.{tname}" if module_name else tname] = mask
    apply_masks(model, found)
    return model


def save_masked(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save `state_dict()` (weights and masks) atomically to `path`."""
    return atomic_torch_save(model.state_dict(), path)


def load_masked_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Like `load_state_dict`, but first creates the mask buffers the checkpoint holds."""
    for key, value in state_dict.items():
        if not key.endswith(SUFFIX):
            continue
        module_name, buffer_name = _split(key)
        module = model.get_submodule(module_name) if module_name else model
        param = getattr(module, buffer_name[: -len(SUFFIX)], None)
        if not isinstance(param, nn.Parameter):
            raise ValueError(f"state_dict: mask {key!r} has no matching parameter in {type(model).__name__}")
        check_mask(value, param, key[: -len(SUFFIX)])
        if buffer_name not in dict(module.named_buffers(recurse=False)):
            module.register_buffer(buffer_name, torch.ones_like(param))
    model.load_state_dict(state_dict)
    return model


def load_masked(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights and masks saved by `save_masked` into `model`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint at {str(path)!r}")
    return load_masked_state_dict(model, torch.load(path, map_location="cpu", weights_only=True))
