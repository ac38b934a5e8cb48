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

A pruned weight is exactly 0.0, whatever it held: the result is always
that of `masked_fill`, never a bare multiply, so a pruned `inf` (or an `inf`
gradient of a pruned weight) becomes 0 instead of NaN, and kept weights are
never touched (large tensors take a faster multiply that checks its own
products, see `_zero_pruned`).

Every function that changes several layers checks all of them first and
only then changes any, so a refused call leaves the model as it was. What
can only fail midway (a metric that raises, a block whose outputs overflow)
runs inside `restore_on_error`, which puts the parameters, buffers and masks
of the modules it watches back as they were.

torch.nn.utils.prune interop: `to_torch_prune` moves our masks into torch's
`weight_orig`/`weight_mask`/forward-hook form and `from_torch_prune` brings
torch's form back (for pruning applied several times, torch keeps the
product of all masks in `weight_mask`, and that product is what comes back).
To combine the two, call `to_torch_prune(model)` before torch's pruning
functions; torch then multiplies its new mask into ours. Calling
`prune.l1_unstructured` (or any torch method) directly on a layer that holds
our `weight_mask` replaces our buffer with torch's mask. We cannot stop that,
but we notice it for every mask installed by `apply_masks` or
`load_masked_state_dict` (each layer remembers which of its masks are ours):
every function here then refuses the model with a message, and
`from_torch_prune` repairs it (our pruned weights are still zeros of
`weight_orig`, so the rebuilt mask is torch's times `weight_orig != 0`) and
warns.

Covers: finding prunable layers, applying/validating/removing masks, the
optimizer wrapper (a `torch.optim.Optimizer`, so torch's learning-rate
schedulers accept it), conversion to and from `torch.nn.utils.prune`, and
checkpoints that keep their masks.
But: masks on embeddings or norms are allowed only if you name them yourself;
`prunable_parameters` lists the weights of Linear and Conv layers. The repair
after torch's pruning is exact only if the model was not trained under
torch's hook in between (training would have moved those zeros), and it
also prunes a kept weight that happens to be exactly 0.

    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(4, 2, bias=False)
    >>> apply_masks(layer, {"weight": torch.tensor([[1., 0., 1., 0.], [0., 0., 1., 1.]])})
    >>> int((layer.weight == 0).sum()), sorted(masks_of(layer))
    (4, ['weight'])
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from .report import atomic_torch_save
from .sparsity import check_model

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
    "restore_on_error",
    "refuse_torch_prune",
]

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUFFIX = "_mask"
OURS = "_chapter11_masks"  # module attribute: names of the parameters whose `<name>_mask` buffer we installed


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


def _full(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


def _torch_hooks(module: nn.Module) -> dict[str, torch_prune.BasePruningMethod]:
    """Tensor name -> torch.nn.utils.prune hook (a method, or a PruningContainer of several)."""
    return {h._tensor_name: h for h in module._forward_pre_hooks.values() if isinstance(h, torch_prune.BasePruningMethod)}


def _ours(module: nn.Module) -> set[str]:
    return module.__dict__.get(OURS, set())


def _mark(module: nn.Module, param_name: str, ours: bool = True) -> None:
    names = set(_ours(module))
    if ours:
        names.add(param_name)
    else:
        names.discard(param_name)
    module.__dict__[OURS] = names


def _replaced_by_torch(module: nn.Module, module_name: str) -> list[str]:
    """Parameters whose mask we installed and torch's pruning then replaced."""
    ours = _ours(module)
    return [_full(module_name, t) for t in _torch_hooks(module) if t in ours] if ours and module._forward_pre_hooks else []


def refuse_torch_prune(model: nn.Module, argument: str = "model") -> None:
    """TypeError if any layer of `model` is in `torch.nn.utils.prune`'s form (weight_orig and a hook).

    Such a model cannot be copied (its `weight` is computed by the hook, and
    `copy.deepcopy` refuses it) and its hook would undo what a transform
    does, so every transform that copies or rebuilds a model calls this
    first. `from_torch_prune` converts it to our masks.

    >>> import torch.nn.utils.prune as torch_prune
    >>> layer = torch_prune.l1_unstructured(nn.Linear(4, 2), "weight", amount=0.5)
    >>> refuse_torch_prune(nn.Sequential(layer))
    Traceback (most recent call last):
    ...
    TypeError: model: layer 0 carries torch.nn.utils.prune's reparametrisation (weight_orig and a forward hook); convert it first with chapter11.masks.from_torch_prune(model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{argument} must be an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if _torch_hooks(module):
            raise TypeError(f"{argument}: layer {name or type(module).__name__} carries torch.nn.utils.prune's reparametrisation "
                            f"(weight_orig and a forward hook); convert it first with chapter11.masks.from_torch_prune({argument})")


def _refuse_replaced(names: list[str], argument: str = "model") -> None:
    if names:
        raise ValueError(
            f"{argument}: {names[0]} held our mask, then torch.nn.utils.prune was applied to it and replaced the "
            f"buffer {names[0]}{SUFFIX} with torch's own mask; call from_torch_prune(model) to rebuild the mask "
            "(ours times torch's) before using the model, and next time call to_torch_prune(model) before torch's "
            "pruning functions"
        )


def _owner(model: nn.Module, name: str, argument: str = "masks") -> tuple[nn.Module, str, nn.Parameter]:
    module_name, param_name = _split(name)
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        raise ValueError(f"{argument}: unknown parameter name {name!r}") from None
    if param_name in _torch_hooks(module):
        raise ValueError(
            f"{argument}: {name} is under torch.nn.utils.prune ({param_name}_orig, {param_name}{SUFFIX} and a "
            "forward pre-hook); call from_torch_prune(model) first to turn it into our mask"
        )
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


FAST_ZEROING_MIN_NUMEL = 1 << 16  # from here up, _zero_pruned multiplies by the mask instead of masked_fill_
FUSED_ZEROING = True  # large float32/float64 CPU tensors: multiply and check in one pass (numba), see _zero_pruned


@functools.cache  # compiled on first use, so importing chapter11.masks does not import numba
def _fused_multiply():
    """The numba kernel t *= m (as 0 + t*m) that also says whether any product is inf or NaN, in one parallel pass."""
    import numba

    # 'reassoc' alone lets LLVM vectorise the sum below (an integer count ran 1.4x slower than torch's multiply);
    # it allows neither x + 0.0 -> x (that needs 'nsz') nor v - v -> 0 (that needs 'nnan' and 'ninf')
    @numba.njit(parallel=True, boundscheck=False, cache=True, nogil=True, fastmath={"reassoc"})
    def multiply_flagging_nonfinite(t, m):  # t, m: 1-D, same dtype and length
        zero = t.dtype.type(0.0)
        flag = zero
        for i in numba.prange(t.shape[0]):
            v = t[i] * m[i] + zero  # + 0.0: a pruned negative weight becomes 0.0, not -0.0
            t[i] = v
            flag += v - v  # 0 for a finite v, NaN for inf or NaN; a NaN survives any order of summing
        return flag != flag

    return multiply_flagging_nonfinite, numba


def _fusable(t: torch.Tensor, m: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and m.dtype == t.dtype
            and m.device == t.device and t.shape == m.shape and t.is_contiguous() and m.is_contiguous()
            and not t.is_neg() and not m.is_neg())


def _multiply_fused(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run the fused kernel on each (tensor, mask); return the pairs that produced a non-finite value."""
    kernel, numba = _fused_multiply()
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))  # as many threads as torch uses
    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        bad = []
        for t, m in pairs:
            if kernel(t.detach().view(-1).numpy(), m.detach().view(-1).numpy()):
                bad.append((t, m))
            torch.autograd.graph.increment_version(t)  # an in-place change, as torch's own ops record it
    finally:
        numba.set_num_threads(old)
    return bad


@torch.no_grad()
def _zero_pruned(tensors: list[torch.Tensor], masks: list[torch.Tensor], finite: bool = False,
                 fused: bool | None = None) -> None:
    """Set each tensor to exactly 0 where its mask is 0 (or its bool mask True), leave the rest untouched.

    Small tensors take `masked_fill_` with a bool mask: exact and, at that
    size, as fast as anything. A large tensor is multiplied by its 0/1 mask
    instead (`0 + t * m` so that a pruned negative weight becomes 0.0 and
    not -0.0): on a 4096 x 4096 weight that ran about 5x faster than
    `mask == 0` and `masked_fill_` (2-core AMD EPYC, `python -m chapter11
    bench masks` times both). But inf * 0 is NaN, and a pruned weight must
    be 0, so each product is checked, and only a tensor with a non-finite
    product gets the exact `masked_fill_`. A NaN or inf at a kept entry stays
    as it was. On the CPU (float32/float64, contiguous) a numba kernel
    multiplies and flags non-finite products in the same pass; elsewhere
    torch multiplies and a second read (the norm) checks. The second read
    was the whole gap between `MaskedOptimizer` and two bare multiplies
    (`python -m chapter11 bench masks` times the variants side by side).
    `finite=True` is the caller's word that every tensor is finite (its 0/1
    masks too), so no product can be NaN and none is checked. `fused=False`
    takes the two-pass path everywhere (None: `FUSED_ZEROING`), which is how
    `bench masks` times the step that came before the kernel.
    """
    fused = FUSED_ZEROING if fused is None else fused
    large, one_pass = [], []
    for t, m in zip(tensors, masks):
        if m.dtype == torch.bool:  # True marks a pruned entry
            t.masked_fill_(m, 0)
        elif t.numel() < FAST_ZEROING_MIN_NUMEL:
            t.masked_fill_(m == 0, 0)
        elif fused and not finite and _fusable(t, m):
            one_pass.append((t, m))
        else:
            torch.addcmul(t.new_zeros(()), t, m, out=t)
            if not finite:
                large.append((t, m))
    bad = _multiply_fused(one_pass) if one_pass else []
    if large:
        norms = torch._foreach_norm([t for t, _ in large])
        if not bool(torch.isfinite(torch.stack(norms)).all()):
            bad += [(t, m) for (t, m), norm in zip(large, norms) if not torch.isfinite(norm)]
    for t, m in bad:
        t.masked_fill_(m == 0, 0)


def _install(module: nn.Module, param_name: str, param: nn.Parameter, mask: torch.Tensor, allow_regrow: bool,
             finite: bool = False) -> None:
    buffer_name = param_name + SUFFIX
    old = module._buffers.get(buffer_name)
    if old is not None and not allow_regrow:
        mask = old * mask
    if old is not None:
        old.copy_(mask)
    else:
        module.register_buffer(buffer_name, mask.clone())
    _zero_pruned([param], [module._buffers[buffer_name]], finite=finite)
    _mark(module, param_name)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], allow_regrow: bool = False) -> None:
    """Zero the pruned weights of `model` and keep each mask as `<param>_mask`.

    A parameter that already has a mask gets the product of old and new, so
    pruning only ever removes. `allow_regrow=True` replaces the old mask
    instead (dynamic sparsity); regrown weights restart at zero. Every mask
    is checked before any is applied. A pruned weight becomes exactly 0,
    even an inf one; kept weights are not touched.

    >>> layer = nn.Linear(3, 1, bias=False)
    >>> _ = layer.weight.data.copy_(torch.tensor([[float("inf"), -2.0, float("inf")]]))
    >>> apply_masks(layer, {"weight": torch.tensor([[0., 1., 1.]])})
    >>> layer.weight.tolist()
    [[0.0, -2.0, inf]]
    """
    check_model(model)
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must map parameter names to 0/1 tensors, got {type(masks).__name__}")
    plan = []
    for name, mask in masks.items():
        module, param_name, param = _owner(model, name)
        if torch.isnan(param).any():
            raise ValueError(f"masks: the weights of {name} contain NaN; refusing to prune a broken model")
        plan.append((module, param_name, param, check_mask(mask, param, name)))
    for module, param_name, param, mask in plan:
        _install(module, param_name, param, mask, allow_regrow)


def _install_built_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """`apply_masks` for masks that chapter11 itself has just built, without the checks.

    For the callers (such as `chapter11.oneshot.prune_llm`) whose masks are 0/1
    tensors of each parameter's shape, dtype and device by construction, and
    whose weights were checked to be finite: the checks would read every
    weight and mask again for nothing, and a finite weight times 0 or 1 needs
    no check for NaN.
    """
    for name, mask in masks.items():
        module, param_name, param = _owner(model, name)
        _install(module, param_name, param, mask, allow_regrow=False, finite=True)


def _masked_pairs(model: nn.Module) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    pairs, replaced = [], []
    for module_name, module in model.named_modules():
        replaced += _replaced_by_torch(module, module_name)
        for buffer_name, buf in module._buffers.items():
            if buf is None or not buffer_name.endswith(SUFFIX):
                continue
            param_name = buffer_name[: -len(SUFFIX)]
            param = module._parameters.get(param_name)
            if isinstance(param, nn.Parameter):
                pairs.append((_full(module_name, param_name), param, buf))
    _refuse_replaced(replaced)
    return pairs


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> mask buffer, for every masked parameter (empty if none)."""
    check_model(model)
    return {name: mask for name, _, mask in _masked_pairs(model)}


@torch.no_grad()
def remove_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Make the zeros permanent and drop the mask buffers; returns the masks."""
    check_model(model)
    removed = {}
    for name, param, mask in _masked_pairs(model):
        module_name, param_name = _split(name)
        module = model.get_submodule(module_name) if module_name else model
        _zero_pruned([param], [mask])
        delattr(module, param_name + SUFFIX)
        _mark(module, param_name, ours=False)
        removed[name] = mask
    return removed


@torch.no_grad()
def enforce_masks(model: nn.Module) -> None:
    """Re-zero every masked weight (an inf there becomes 0, not NaN)."""
    check_model(model)
    pairs = _masked_pairs(model)
    _zero_pruned([p for _, p, _ in pairs], [m for _, _, m in pairs])


@torch.no_grad()
def mask_gradients(model: nn.Module) -> None:
    """Zero the gradient of every pruned weight, so optimizer state stays zero there.

    >>> layer = nn.Linear(2, 1, bias=False)
    >>> apply_masks(layer, {"weight": torch.tensor([[0., 1.]])})
    >>> layer.weight.grad = torch.tensor([[float("inf"), 3.0]])
    >>> mask_gradients(layer); layer.weight.grad.tolist()
    [[0.0, 3.0]]
    """
    check_model(model)
    pairs = [(p.grad, m) for _, p, m in _masked_pairs(model) if p.grad is not None]
    _zero_pruned([g for g, _ in pairs], [m for _, m in pairs])


def _shared(name: str) -> property:
    """An attribute of MaskedOptimizer that is the wrapped optimizer's own (read and written through)."""

    def get(self):
        inner = self.__dict__.get("optimizer")
        if inner is not None:
            return getattr(inner, name)
        if f"_setup_{name}" in self.__dict__:
            return self.__dict__[f"_setup_{name}"]
        raise AttributeError(f"MaskedOptimizer wraps no optimizer yet, so it has no {name}")

    def set(self, value):
        inner = self.__dict__.get("optimizer")
        if inner is not None:
            setattr(inner, name, value)
        else:  # torch.optim.Optimizer.__init__ setting up, before the wrapped optimizer is attached
            self.__dict__[f"_setup_{name}"] = value

    return property(get, set, doc=f"The wrapped optimizer's `{name}` (the same object).")


class MaskedOptimizer(torch.optim.Optimizer):
    """Wrap any `torch.optim.Optimizer` so masked weights stay exactly zero.

    Each `step()` masks the gradients, runs the wrapped step, then re-zeroes
    the weights (weight decay and momentum cannot revive them; an inf
    gradient at a pruned weight leaves it at 0, not NaN). Masks are read from
    the model at every step, so a mask changed in place (dynamic sparsity) is
    honoured. A closure's gradients are masked before the wrapped step uses
    them.

    It is a `torch.optim.Optimizer` whose `param_groups`, `state` and
    `defaults` are the wrapped optimizer's own objects, so torch's
    learning-rate schedulers (`StepLR`, `CosineAnnealingLR`, ...) accept it and
    change the lr the wrapped optimizer uses. `state_dict`/`load_state_dict`
    are the wrapped optimizer's, and `.optimizer` is the wrapped optimizer.

    >>> model = nn.Linear(3, 1, bias=False)
    >>> apply_masks(model, {"weight": torch.tensor([[1., 0., 1.]])})
    >>> opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1), model)
    >>> scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    >>> for _ in range(3):
    ...     opt.zero_grad(); model(torch.ones(1, 3)).sum().backward(); opt.step(); scheduler.step()
    >>> model.weight[0, 1].item(), opt.optimizer.param_groups[0]["lr"]
    (0.0, 0.05)
    """

    param_groups = _shared("param_groups")
    state = _shared("state")
    defaults = _shared("defaults")

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        # Let torch set up its hook tables on copies of the groups, then share the real ones.
        super().__init__([dict(g) for g in optimizer.param_groups], dict(optimizer.defaults))
        for name in ("param_groups", "state", "defaults"):
            self.__dict__.pop(f"_setup_{name}", None)
        self.optimizer = optimizer
        self.model = model

    def step(self, closure=None):
        pairs = _masked_pairs(self.model)  # (name, parameter, mask); read now, so in-place mask changes count

        def mask_grads():  # _zero_pruned runs without autograd itself
            grads = [(p.grad, m) for _, p, m in pairs if p.grad is not None]
            _zero_pruned([g for g, _ in grads], [m for _, m in grads])

        if closure is None:
            mask_grads()
            loss = self.optimizer.step()
        else:

            def masked_closure():
                with torch.enable_grad():
                    loss = closure()
                mask_grads()
                return loss

            loss = self.optimizer.step(masked_closure)
        _zero_pruned([p for _, p, _ in pairs], [m for _, _, m in pairs])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if "optimizer" not in self.__dict__:  # torch.optim.Optimizer.__init__ setting up
            return super().add_param_group(param_group)
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __getstate__(self) -> dict:  # like torch's Optimizer: hooks are not copied or pickled
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)

    def __repr__(self) -> str:
        return f"MaskedOptimizer({self.optimizer!r})"

    def __getattr__(self, name):
        # Only reached for names not found normally: forward public ones (e.g. SGD's options) to the wrapped optimizer.
        inner = self.__dict__.get("optimizer")
        if inner is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(inner, name)


@torch.no_grad()
def to_torch_prune(model: nn.Module) -> nn.Module:
    """Move our masks into torch.nn.utils.prune's `weight_orig`/`weight_mask` form.

    Torch's pruning functions applied afterwards multiply their mask into
    ours (a `PruningContainer`); `from_torch_prune` brings the product back.

    >>> import torch.nn.utils.prune as prune
    >>> layer = nn.Linear(4, 1, bias=False)
    >>> _ = layer.weight.data.copy_(torch.tensor([[1., -2., 3., -4.]]))
    >>> apply_masks(layer, {"weight": torch.tensor([[1., 1., 0., 1.]])})
    >>> _ = to_torch_prune(layer)
    >>> _ = prune.l1_unstructured(layer, "weight", amount=1)  # torch prunes 1 of the 3 left: the 1.0
    >>> masks_of(from_torch_prune(layer))["weight"].tolist()
    [[0.0, 1.0, 0.0, 1.0]]
    """
    check_model(model)
    for name, mask in remove_masks(model).items():
        module, param_name, _ = _owner(model, name, "model")
        torch_prune.custom_from_mask(module, param_name, mask.clone())
    return model


@torch.no_grad()
def from_torch_prune(model: nn.Module) -> nn.Module:
    """Turn torch.nn.utils.prune's reparametrisation back into our masks.

    A tensor pruned several times (a `PruningContainer`) gets torch's
    combined mask, the product of all. Every layer is checked (0/1 mask, no
    NaN weights) before any is converted, so a refusal leaves the model in
    torch's form. If torch's pruning replaced one of our masks (see the
    module docstring), the mask is rebuilt as torch's mask times
    `weight_orig != 0`, with a warning.
    """
    check_model(model)
    plan = []
    for module_name, module in model.named_modules():
        ours = _ours(module)
        for tname in _torch_hooks(module):
            name = _full(module_name, tname)
            orig = module._parameters.get(tname + "_orig")
            mask = module._buffers.get(tname + SUFFIX)
            if orig is None or mask is None:
                raise ValueError(f"model: {name} has a torch.nn.utils.prune hook but no {tname}_orig parameter or {tname}{SUFFIX} buffer")
            if orig.is_floating_point() and torch.isnan(orig).any():
                raise ValueError(f"model: the weights of {name} contain NaN; refusing to convert a broken model")
            mask = check_mask(mask, orig, name).clone()  # (same shape as the weight)
            if tname in ours:
                mask = mask * (orig != 0).to(mask.dtype)
                warnings.warn(
                    f"from_torch_prune: torch.nn.utils.prune had replaced our mask of {name}; rebuilt it as torch's mask "
                    f"times ({tname}_orig != 0), which restores ours unless the model was trained under torch's hook "
                    "since. Next time call to_torch_prune(model) before torch's pruning functions.",
                    UserWarning,
                    stacklevel=2,
                )
            plan.append((module, tname, orig, mask))
    for module, tname, orig, mask in plan:
        _zero_pruned([orig], [mask])  # so torch's remove (orig * its mask) cannot make inf * 0 = NaN
        torch_prune.remove(module, tname)
        _mark(module, tname, ours=False)
        _install(module, tname, module._parameters[tname], mask, allow_regrow=True)
    return model


def _refuse_torch_form(model: nn.Module, argument: str = "model") -> None:
    for module_name, module in model.named_modules():
        _refuse_replaced(_replaced_by_torch(module, module_name), argument)
        for tname in _torch_hooks(module):
            name = _full(module_name, tname)
            raise ValueError(
                f"{argument}: {name} is under torch.nn.utils.prune ({tname}_orig and a forward pre-hook); call "
                f"from_torch_prune(model) first, so the checkpoint holds {name} and {name}{SUFFIX} as load_masked expects"
            )


def save_masked(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save `state_dict()` (weights and masks) atomically to `path`.

    A model under torch.nn.utils.prune is refused (its checkpoint would hold
    `weight_orig`): call `from_torch_prune` first.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _refuse_torch_form(model)
    return atomic_torch_save(model.state_dict(), path)


def _shape(value) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


@torch.no_grad()
def load_masked_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Like `load_state_dict`, but first creates the mask buffers the checkpoint holds.

    Everything is checked before anything changes: every key must name a
    tensor of `model` with the same shape (a `<param>_mask` key may name a
    mask the model does not have yet), masks must be 0/1, weights must be 0
    where their mask is, and a model that carries a mask refuses a checkpoint
    without it (loading would drop the mask).

    >>> layer = nn.Linear(2, 1, bias=False)
    >>> apply_masks(layer, {"weight": torch.tensor([[0., 1.]])})
    >>> fresh = load_masked_state_dict(nn.Linear(2, 1, bias=False), layer.state_dict())
    >>> fresh.weight_mask.tolist()
    [[0.0, 1.0]]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must map names to tensors (what save_masked writes), got {type(state_dict).__name__}")
    kind = type(model).__name__
    own = model.state_dict()
    params = dict(model.named_parameters())
    new = {}  # key -> (module, buffer name, parameter) for masks the model does not have yet
    for key in state_dict:
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be strings, got {key!r}")
        if key in own or not key.endswith(SUFFIX):
            continue
        module_name, buffer_name = _split(key)
        try:
            module = model.get_submodule(module_name) if module_name else model
        except AttributeError:
            raise ValueError(f"state_dict: key {key!r} names no layer of {kind} (unknown layer {module_name!r})") from None
        param = module._parameters.get(buffer_name[: -len(SUFFIX)])
        if not isinstance(param, nn.Parameter):
            raise ValueError(f"state_dict: mask {key!r} has no matching parameter {key[: -len(SUFFIX)]!r} in {kind}")
        new[key] = (module, buffer_name, param)
    expected = set(own) | set(new)
    missing = sorted(expected - set(state_dict))
    dropped = [k for k in missing if k.endswith(SUFFIX) and k[: -len(SUFFIX)] in params]
    if dropped:
        raise ValueError(
            f"state_dict has no mask for {dropped[0][: -len(SUFFIX)]!r}, but {kind} carries one, and loading would drop it; "
            "load into a fresh model, or call remove_masks(model) first if you mean to"
        )
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"state_dict does not fit {kind}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, value in state_dict.items():
        want = _shape(own[key]) if key in own else tuple(new[key][2].shape)
        if _shape(value) is not None and want is not None and _shape(value) != want:
            raise ValueError(f"state_dict[{key!r}] has shape {_shape(value)}, but {kind} expects {want}")
    for key, value in state_dict.items():
        name = key[: -len(SUFFIX)]
        if not key.endswith(SUFFIX) or name not in params:
            continue
        mask = check_mask(value, params[name], name)
        weight = state_dict[name]
        pruned = mask.to(weight.device) == 0
        if (weight[pruned] != 0).any():
            raise ValueError(
                f"state_dict: {name} has {int((weight[pruned] != 0).sum())} non-zero weights where its mask is 0; "
                "a checkpoint written by save_masked never does"
            )
    for key, (module, buffer_name, param) in new.items():
        module.register_buffer(buffer_name, torch.ones_like(param))
    model.load_state_dict(state_dict)
    for key in state_dict:
        name = key[: -len(SUFFIX)]
        if key.endswith(SUFFIX) and name in params:
            module_name, param_name = _split(name)
            _mark(model.get_submodule(module_name) if module_name else model, param_name)
    return model


def load_masked(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights and masks saved by `save_masked` into `model`."""
    check_model(model)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises pickle, zip and runtime errors of many kinds
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
        raise ValueError(f"path: {str(path)!r} is not a checkpoint written by save_masked (torch.load: {type(err).__name__} {first})") from err
    return load_masked_state_dict(model, state)


class _RestorePoint:
    """Parameters, buffers and mask marks of some modules, copied so they can be put back."""

    def __init__(self, modules: Iterable[nn.Module]):
        self.saved = []
        for m in modules:
            params = {k: (p, p.detach().clone()) for k, p in m._parameters.items() if p is not None}
            buffers = {k: (b, None if b is None else b.detach().clone()) for k, b in m._buffers.items()}
            self.saved.append((m, params, buffers, set(m.__dict__[OURS]) if OURS in m.__dict__ else None))

    @torch.no_grad()
    def restore(self) -> None:
        for m, params, buffers, ours in reversed(self.saved):
            for k, (p, value) in params.items():
                m._parameters[k] = p
                p.copy_(value)
            for k in [k for k in m._buffers if k not in buffers]:  # buffers added since (new masks)
                del m._buffers[k]
            for k, (b, value) in buffers.items():
                m._buffers[k] = b
                if b is not None:
                    b.copy_(value)
            if ours is None:
                m.__dict__.pop(OURS, None)
            else:
                m.__dict__[OURS] = ours


@contextlib.contextmanager
def restore_on_error(modules: nn.Module | Iterable[nn.Module]) -> Iterator[_RestorePoint]:
    """All or nothing: if the block raises, every watched module gets its parameters, buffers and masks back.

    `modules`: a model (all its submodules are watched) or some modules. The
    values are copied on entry (memory: one copy of the watched tensors), and
    the same tensor objects are refilled on error, so optimizers and other
    references stay valid. The error is re-raised.

    >>> layer = nn.Linear(2, 1)
    >>> try:
    ...     with restore_on_error(layer):
    ...         apply_masks(layer, {"weight": torch.tensor([[0.0, 1.0]])})
    ...         raise RuntimeError("failed midway")
    ... except RuntimeError:
    ...     pass
    >>> int((layer.weight == 0).sum()), hasattr(layer, "weight_mask")
    (0, False)
    """
    if isinstance(modules, nn.Module):
        modules = list(modules.modules())
    point = _RestorePoint(list(modules))
    try:
        yield point
    except BaseException:
        point.restore()
        raise
