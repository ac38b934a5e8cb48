"""Attention-head pruning: score heads, zero them, cut them out, save the result.

The chapter's head importance (Michel et al., 2019) puts a gate xi_h in front
of the output projection of every head, y = W_o [xi_1 z_1; ...; xi_H z_H],
and scores a head by how much the loss moves when its gate moves:

    I_h = E_x | dL(x) / d xi_h |      evaluated at xi = 1 (the unpruned model).

`transformers` 5.x has no `head_mask`, so the gate here is a forward pre-hook
on each attention output projection (`head_gates`).

Covers three model families, found by their attribute names:
- `chapter11.models.TransformerClassifier`: `blocks[i].attn.{q,k,v,o}`;
- BERT-style encoders (all-MiniLM-L6-v2): `attention.self.{query,key,value}`
  and `attention.output.dense`;
- LLaMA-style decoders (`LlamaForCausalLM`): `self_attn.{q,k,v,o}_proj`. With
  grouped-query attention, only whole key/value groups can be removed.

Heads are always named by their index in the dense model (the "original"
index), also after some were removed, so plans compose: removing head 3 and
then head 5 of a layer is the same as removing {3, 5} at once.

- `head_importance_loop` / `head_importance`: I_h per (layer, head).
- `mask_heads`: zero heads in place (soft); `remove_heads`: slice the q/k/v
  rows and o columns out (physical), giving a smaller model with the same
  outputs as the soft-masked one.
- `removal_order`, `plan_from_order`, `kept_heads`, `forward_macs`.
- `save_pruned` / `load_pruned`: standard checkpoint files plus
  `pruning_plan.json`, so uneven heads per layer survive a round trip.

But: no cross-attention-specific handling beyond what BERT's modules share,
no iterative re-scoring inside `head_importance` (call it again after each
removal for Michel's iterative variant), and `mask_heads` does not stop a
later optimizer step from reviving a zeroed head: remove heads before
fine-tuning, or re-mask.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..report import atomic_write_bytes, atomic_write_text

__all__ = [
    "attention_layers",
    "head_gates",
    "head_importance_loop",
    "head_importance",
    "per_example_loss",
    "mask_heads",
    "remove_heads",
    "kept_heads",
    "removal_order",
    "plan_from_order",
    "forward_macs",
    "save_pruned",
    "load_pruned",
    "PLAN_FILE",
]

PLAN_FILE = "pruning_plan.json"
_KEPT = "kept_heads"  # attribute on each attention module: original ids of the heads still there


# --------------------------------------------------------------------------- finding heads


@dataclass
class HeadLayer:
    """One attention layer seen uniformly: its module, projections and head size."""

    attn: nn.Module  # holds the bookkeeping (n_heads / num_attention_heads, kept_heads)
    names: tuple[tuple[nn.Module, str], ...]  # (owner, attribute) of q, k, v, o
    head_dim: int
    kind: str  # "ours" | "bert" | "llama"
    group: int = 1  # query heads per key/value head (grouped-query attention)

    def proj(self, i: int) -> nn.Linear:
        owner, attr = self.names[i]
        return getattr(owner, attr)

    @property
    def q(self) -> nn.Linear:
        return self.proj(0)

    @property
    def o(self) -> nn.Linear:
        return self.proj(3)

    @property
    def n_heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def kept(self) -> list[int]:
        return list(getattr(self.attn, _KEPT, range(self.n_heads)))


def attention_layers(model: nn.Module) -> list[HeadLayer]:
    """Every attention layer of `model`, in module order (layer index = position).

    >>> from chapter11.models import TransformerClassifier
    >>> layers = attention_layers(TransformerClassifier(patch_size=4, n_layers=2, n_heads=4))
    >>> [(layer.kind, layer.n_heads, layer.head_dim) for layer in layers]
    [('ours', 4, 16), ('ours', 4, 16)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    from ..models import Attention

    layers = []
    for module in model.modules():
        if isinstance(module, Attention):
            names = tuple((module, a) for a in ("q", "k", "v", "o"))
            layers.append(HeadLayer(module, names, module.head_dim, "ours"))
        elif all(hasattr(module, a) for a in ("self", "output")) and all(
            hasattr(module.self, a) for a in ("query", "key", "value", "attention_head_size")
        ):
            s = module.self
            names = ((s, "query"), (s, "key"), (s, "value"), (module.output, "dense"))
            layers.append(HeadLayer(s, names, s.attention_head_size, "bert"))
        elif all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            names = tuple((module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
            group = getattr(module, "num_key_value_groups", 1)
            layers.append(HeadLayer(module, names, module.head_dim, "llama", group))
    if not layers:
        raise TypeError(
            f"model: found no attention layers in {type(model).__name__}; supported are "
            "chapter11 TransformerClassifier, BERT-style (attention.self.query) and LLaMA-style (self_attn.q_proj) models"
        )
    return layers


def kept_heads(model: nn.Module) -> dict[int, list[int]]:
    """{layer: original ids of the heads still present}.

    >>> from chapter11.models import TransformerClassifier
    >>> model = remove_heads(TransformerClassifier(patch_size=4, n_heads=4), {0: [1, 2]})
    >>> kept_heads(model)
    {0: [0, 3], 1: [0, 1, 2, 3]}
    """
    return {i: layer.kept for i, layer in enumerate(attention_layers(model))}


def _original_heads(layer: HeadLayer) -> int:
    return getattr(layer.attn, "original_heads", layer.n_heads)


# --------------------------------------------------------------------------- gates and importance


@contextlib.contextmanager
def head_gates(model: nn.Module, gates: list[torch.Tensor]):
    """Inside the block, head h of layer l is multiplied by `gates[l][..., h]`.

    Each gate is (H_l,) for all examples or (B, H_l) for one gate per example;
    it scales the head's slice of the input of the output projection,
    xi_h * z_h, which is the chapter's head gate.

    >>> from chapter11.models import TransformerClassifier
    >>> model = TransformerClassifier(patch_size=4, max_len=10, n_layers=1, n_heads=2).eval()
    >>> x = torch.randn(3, 40)
    >>> with head_gates(model, [torch.ones(2)]):
    ...     same = torch.allclose(model(x), model(x))
    >>> same
    True
    """
    layers = attention_layers(model)
    if len(gates) != len(layers):
        raise ValueError(f"gates: need one tensor per attention layer ({len(layers)}), got {len(gates)}")
    handles = []

    def make_hook(gate: torch.Tensor, head_dim: int):
        def hook(module, args):
            z = args[0]  # (B, T, H * hd)
            B, T, width = z.shape
            g = gate.view(1, 1, -1, 1) if gate.dim() == 1 else gate.view(B, 1, -1, 1)  # (1|B, 1, H, 1)
            z = (z.view(B, T, width // head_dim, head_dim) * g.to(z.dtype)).view(B, T, width)  # (B, T, H * hd)
            return (z, *args[1:])

        return hook

    try:
        for layer, gate in zip(layers, gates):
            if gate.shape[-1] != layer.n_heads:
                raise ValueError(f"gates: layer has {layer.n_heads} heads, gate has shape {tuple(gate.shape)}")
            handles.append(layer.o.register_forward_pre_hook(make_hook(gate, layer.head_dim)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _split_batch(batch):
    """(inputs for model, targets) from an (x, y) pair or a dict with "labels"."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(f"batches: a dict batch needs a 'labels' entry, got keys {sorted(batch)}")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"batches: each batch must be an (x, y) pair or a dict with 'labels', got {type(batch).__name__}")


def per_example_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross entropy of each example, (B,): for (B, C) logits with (B,) labels,
    or the mean over positions for (B, T, V) logits with (B, T) next-token targets.

    >>> model = nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.eye(2))
    >>> per_example_loss(model, (torch.tensor([[0., 0.], [9., 0.]]), torch.tensor([0, 0]))).detach().round(decimals=3)
    tensor([0.6930, 0.0000])
    """
    inputs, y = _split_batch(batch)
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    logits = out.logits if hasattr(out, "logits") else out
    if logits.dim() == 2:  # (B, C)
        return F.cross_entropy(logits.float(), y, reduction="none")  # (B,)
    if logits.dim() == 3:  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")  # (B * T,)
        return loss.view(y.shape).mean(1)  # (B,)
    raise ValueError(f"model: expected (B, C) or (B, T, V) logits, got shape {tuple(logits.shape)}")


def _batch_size(batch) -> int:
    """Examples in a batch: the length of its labels, or of its first tensor."""
    if isinstance(batch, Mapping):
        if not batch:
            raise ValueError("batches: got an empty dict batch")
        return len(batch["labels"] if "labels" in batch else next(iter(batch.values())))
    inputs, y = _split_batch(batch)
    return len(y)


def _example(batch, i: int):
    if isinstance(batch, Mapping):
        return {k: v[i : i + 1] for k, v in batch.items()}
    return tuple(t[i : i + 1] for t in batch)


def _scores_table(layers: list[HeadLayer], per_layer: list[torch.Tensor]) -> torch.Tensor:
    """(L, H_max) in original head numbering, NaN where a head was removed."""
    width = max(_original_heads(layer) for layer in layers)
    table = torch.full((len(layers), width), float("nan"))
    for row, (layer, scores) in enumerate(zip(layers, per_layer)):
        table[row, layer.kept] = scores.detach().float().cpu()
    return table


def _normalise(table: torch.Tensor) -> torch.Tensor:
    norms = table.nan_to_num(0.0).norm(dim=1, keepdim=True).clamp_min(1e-12)  # (L, 1)
    return table / norms


def _start(model, batches):
    layers = attention_layers(model)
    if isinstance(batches, (torch.Tensor, Mapping)) or (isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], torch.Tensor)):
        raise TypeError("batches: pass an iterable of batches (e.g. [(x, y)]), not a single batch")
    return layers


def head_importance_loop(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """I_h = (1/N) sum_x |dL(x)/d xi_h| at xi = 1, one example x at a time.

    `batches` yields (x, y) pairs (or dicts of model inputs with "labels");
    `loss_fn(model, batch)` returns the (B,) per-example losses and defaults to
    `per_example_loss`. Returns (num_layers, num_heads) in original head
    numbering (NaN for removed heads); `normalize=True` divides each layer by
    its L2 norm, as Michel et al. do before comparing layers.

    >>> from chapter11.models import TransformerClassifier
    >>> _ = torch.manual_seed(0); model = TransformerClassifier(patch_size=4, max_len=10, n_layers=1, n_heads=2)
    >>> batch = (torch.randn(3, 40), torch.tensor([0, 1, 2]))
    >>> head_importance_loop(model, [batch]).shape
    torch.Size([1, 2])
    """
    layers = _start(model, batches)
    loss_fn = loss_fn or per_example_loss
    was_training = model.training
    model.eval()
    totals = [torch.zeros(layer.n_heads) for layer in layers]
    n = 0
    try:
        for batch in batches:
            for i in range(_batch_size(batch)):
                gates = [torch.ones(layer.n_heads, requires_grad=True) for layer in layers]  # (H,) each
                with head_gates(model, gates):
                    loss = loss_fn(model, _example(batch, i)).sum()
                grads = torch.autograd.grad(loss, gates, allow_unused=True)
                for l, grad in enumerate(grads):
                    if grad is not None:
                        for h in range(layers[l].n_heads):
                            totals[l][h] += abs(grad[h].item())
                n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("batches: is empty")
    table = _scores_table(layers, [t / n for t in totals])
    return _normalise(table) if normalize else table


def head_importance(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Vectorised `head_importance_loop`: one backward pass per batch.

    Each example gets its own gate row, (B, H), so d(sum_x L(x)) / d xi[x, h]
    is exactly dL(x)/d xi_h (examples do not interact in eval mode), and the
    absolute value is taken per example, as in the formula.

    >>> from chapter11.models import TransformerClassifier
    >>> _ = torch.manual_seed(0); model = TransformerClassifier(patch_size=4, max_len=10, n_layers=1, n_heads=2)
    >>> batch = (torch.randn(3, 40), torch.tensor([0, 1, 2]))
    >>> torch.allclose(head_importance(model, [batch]), head_importance_loop(model, [batch]), atol=1e-6)
    True
    """
    layers = _start(model, batches)
    loss_fn = loss_fn or per_example_loss
    was_training = model.training
    model.eval()
    totals = [torch.zeros(layer.n_heads) for layer in layers]
    n = 0
    try:
        for batch in batches:
            B = _batch_size(batch)
            gates = [torch.ones(B, layer.n_heads, requires_grad=True) for layer in layers]  # (B, H) each
            with head_gates(model, gates):
                loss = loss_fn(model, batch).sum()
            grads = torch.autograd.grad(loss, gates, allow_unused=True)
            for l, grad in enumerate(grads):
                if grad is not None:
                    totals[l] += grad.detach().abs().sum(0).float().cpu()  # (H,)
            n += B
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("batches: is empty")
    table = _scores_table(layers, [t / n for t in totals])
    return _normalise(table) if normalize else table


# --------------------------------------------------------------------------- plans


def _check_plan(layers: list[HeadLayer], heads, argument: str) -> dict[int, list[int]]:
    """{layer: sorted original head ids}, validated against the model."""
    if isinstance(heads, torch.Tensor):
        raise TypeError(f"{argument}: pass a dict {{layer: [head, ...]}}, not a tensor")
    if not isinstance(heads, Mapping):
        raise TypeError(f"{argument} must be a dict {{layer: [head, ...]}}, got {type(heads).__name__}")
    plan = {}
    for layer_id, ids in heads.items():
        if isinstance(layer_id, bool) or not isinstance(layer_id, int):
            raise TypeError(f"{argument}: layer indices must be int, got {layer_id!r}")
        if not 0 <= layer_id < len(layers):
            raise ValueError(f"{argument}: unknown layer index {layer_id}; the model has layers 0..{len(layers) - 1}")
        ids = [int(h) for h in ids]
        n = _original_heads(layers[layer_id])
        bad = [h for h in ids if not 0 <= h < n]
        if bad:
            raise ValueError(f"{argument}: layer {layer_id} has heads 0..{n - 1}, got {bad}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{argument}: layer {layer_id} lists a head twice: {ids}")
        plan[layer_id] = sorted(ids)
    return plan


def _mask_to_plan(layers: list[HeadLayer], head_mask) -> dict[int, list[int]]:
    """(L, H) 0/1 keep-mask -> {layer: heads to drop}; a dict passes through."""
    if not isinstance(head_mask, torch.Tensor):
        return _check_plan(layers, head_mask, "head_mask")
    width = max(_original_heads(layer) for layer in layers)
    if head_mask.shape != (len(layers), width):
        raise ValueError(f"head_mask: expected shape ({len(layers)}, {width}) (layers, heads), got {tuple(head_mask.shape)}")
    values = head_mask.detach().float()
    if not torch.all((values == 0) | (values == 1)):
        raise ValueError("head_mask: must hold only 0 (drop) and 1 (keep)")
    return {l: [h for h in range(_original_heads(layers[l])) if values[l, h] == 0] for l in range(len(layers))}


def removal_order(scores: torch.Tensor, min_heads: int = 1) -> list[tuple[int, int]]:
    """(layer, head) pairs, least important first, never emptying a layer below `min_heads`.

    Ties keep row-major order; NaN scores (already removed heads) are skipped.

    >>> removal_order(torch.tensor([[0.5, 0.1], [0.2, 0.9]]))
    [(0, 1), (1, 0)]
    >>> removal_order(torch.tensor([[0.5, 0.1, 0.3], [0.2, 0.9, 0.4]]), min_heads=2)
    [(0, 1), (1, 0)]
    """
    if scores.dim() != 2:
        raise ValueError(f"scores: expected (layers, heads), got shape {tuple(scores.shape)}")
    if min_heads < 1:
        raise ValueError(f"min_heads must be >= 1, got {min_heads}")
    present = ~torch.isnan(scores)  # (L, H)
    left = present.sum(1).tolist()
    flat = scores.nan_to_num(float("inf")).flatten()
    order = []
    for idx in torch.sort(flat, stable=True).indices.tolist():
        l, h = divmod(idx, scores.shape[1])
        if present[l, h] and left[l] > min_heads:
            order.append((l, h))
            left[l] -= 1
    return order


def plan_from_order(order: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    """[(layer, head), ...] -> {layer: sorted heads}.

    >>> plan_from_order([(1, 3), (0, 2), (1, 0)])
    {0: [2], 1: [0, 3]}
    """
    plan: dict[int, list[int]] = {}
    for l, h in order:
        plan.setdefault(int(l), []).append(int(h))
    return {l: sorted(plan[l]) for l in sorted(plan)}


# --------------------------------------------------------------------------- soft and physical removal


def _rows(layer: HeadLayer, heads: list[int]) -> tuple[list[int], list[int]]:
    """Current row indices of `heads` (original ids) in q/o, and in k/v (whole groups only)."""
    kept = layer.kept
    pos = {h: i for i, h in enumerate(kept)}
    hd = layer.head_dim
    q_rows = [pos[h] * hd + j for h in heads if h in pos for j in range(hd)]
    dropped = set(heads) | (set(range(_original_heads(layer))) - set(kept))
    kv_rows = []
    kept_groups = sorted({h // layer.group for h in kept})
    for g_pos, g in enumerate(kept_groups):
        if all(g * layer.group + j in dropped for j in range(layer.group)):
            kv_rows += [g_pos * hd + j for j in range(hd)]
    return q_rows, kv_rows


@torch.no_grad()
def mask_heads(model: nn.Module, head_mask) -> nn.Module:
    """Zero heads in place: their q rows and o columns (and k/v rows once a
    whole key/value group is dropped). The model keeps its shape.

    `head_mask` is a (num_layers, num_heads) tensor, 1 = keep and 0 = drop,
    or a dict {layer: [heads to drop]} in original head numbering.

    >>> from chapter11.models import TransformerClassifier
    >>> model = mask_heads(TransformerClassifier(patch_size=4, n_heads=4, d_model=8), torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]))
    >>> model.blocks[0].attn.o.weight[:, 2:4].abs().sum().item(), model.blocks[0].attn.o.weight[:, :2].ne(0).all().item()
    (0.0, True)
    """
    layers = attention_layers(model)
    plan = _mask_to_plan(layers, head_mask)
    for l, heads in plan.items():
        layer = layers[l]
        q_rows, kv_rows = _rows(layer, heads)
        for i, rows in ((0, q_rows), (1, kv_rows), (2, kv_rows)):
            proj = layer.proj(i)
            proj.weight[rows] = 0  # (out, in): zero the head's output rows
            if proj.bias is not None:
                proj.bias[rows] = 0
        layer.o.weight[:, q_rows] = 0  # (d_model, H * hd): zero the head's input columns
    return model


def _slice_linear(linear: nn.Linear, keep: list[int], dim: int) -> nn.Linear:
    """A new Linear with only rows (dim=0) or columns (dim=1) `keep`."""
    idx = torch.tensor(keep, dtype=torch.long, device=linear.weight.device)
    weight = linear.weight.index_select(dim, idx)  # (out', in) or (out, in')
    bias = None if linear.bias is None else (linear.bias.index_select(0, idx) if dim == 0 else linear.bias)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(linear.training)
    return new


@torch.no_grad()
def remove_heads(model: nn.Module, heads: Mapping[int, Iterable[int]]) -> nn.Module:
    """Physically remove heads {layer: [original head ids]} and return the smaller model.

    Works in place (copy.deepcopy first to keep the dense model). The q/k/v
    output rows and the o input columns of each removed head are sliced out,
    so the result computes exactly what `mask_heads` gives, with fewer FLOPs.
    Grouped-query attention: only whole key/value groups can go. Removing the
    last head of a layer, an unknown layer or an already removed head raises.

    >>> from chapter11.models import TransformerClassifier
    >>> model = remove_heads(TransformerClassifier(patch_size=4, d_model=8, n_heads=4), {1: [0, 3]})
    >>> model.blocks[1].attn.q.weight.shape, model.blocks[1].attn.o.weight.shape, model.blocks[1].attn.n_heads
    (torch.Size([4, 8]), torch.Size([8, 4]), 2)
    """
    layers = attention_layers(model)
    plan = _check_plan(layers, heads, "heads")
    for l, ids in plan.items():  # validate everything before changing anything
        layer = layers[l]
        gone = [h for h in ids if h not in layer.kept]
        if gone:
            raise ValueError(f"heads: layer {l} heads {gone} were already removed (kept: {layer.kept})")
        if len(ids) >= layer.n_heads:
            raise ValueError(f"heads: removing {ids} would leave layer {l} with no heads; keep at least one (or drop the layer)")
        if layer.group > 1:
            for h in ids:
                g = h // layer.group
                members = list(range(g * layer.group, (g + 1) * layer.group))
                if not all(m in ids or m not in layer.kept for m in members):
                    raise ValueError(
                        f"heads: layer {l} uses grouped-query attention ({layer.group} query heads per key/value head); "
                        f"remove whole groups, e.g. {members} together, not head {h} alone"
                    )
    for l, ids in plan.items():
        layer = layers[l]
        if not ids:
            continue
        if not hasattr(layer.attn, "original_heads"):
            layer.attn.original_heads = layer.n_heads
        new_kept = [h for h in layer.kept if h not in set(ids)]
        q_rows, kv_rows = _rows(layer, ids)
        q_keep = [r for r in range(layer.q.out_features) if r not in set(q_rows)]
        k_out = layer.proj(1).out_features
        kv_keep = [r for r in range(k_out) if r not in set(kv_rows)]
        for i, keep, dim in ((0, q_keep, 0), (1, kv_keep, 0), (2, kv_keep, 0), (3, q_keep, 1)):
            owner, attr = layer.names[i]
            setattr(owner, attr, _slice_linear(getattr(owner, attr), keep, dim))
        setattr(layer.attn, _KEPT, new_kept)
        n = len(new_kept)
        if layer.kind == "ours":
            layer.attn.n_heads = n
        elif layer.kind == "bert":
            layer.attn.num_attention_heads = n
            layer.attn.all_head_size = n * layer.head_dim
    return model


# --------------------------------------------------------------------------- cost


@torch.no_grad()
def forward_macs(model: nn.Module, *args, **kwargs) -> int:
    """Multiply-accumulates of one forward pass: every nn.Linear (in * out per
    row it sees) plus the two attention products QK^T and AV (T * T * hd per
    head and example each, full T x T as the eager kernels compute it).

    >>> forward_macs(nn.Linear(3, 2), torch.zeros(5, 3))
    30
    """
    total = [0]
    handles = []

    def linear_hook(module, inputs, output):
        x = inputs[0]
        total[0] += x.numel() // module.in_features * module.in_features * module.out_features

    def attention_hook(head_dim):
        def hook(module, inputs):
            z = inputs[0]  # (B, T, H * hd)
            B, T, width = z.shape
            total[0] += 2 * B * (width // head_dim) * T * T * head_dim

        return hook

    try:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(linear_hook))
        try:
            layers = attention_layers(model)
        except TypeError:
            layers = []
        for layer in layers:
            handles.append(layer.o.register_forward_pre_hook(attention_hook(layer.head_dim)))
        was_training = model.training
        model.eval()
        model(*args, **kwargs)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return int(total[0])


# --------------------------------------------------------------------------- checkpoints


def _our_config(model: nn.Module) -> dict:
    """Constructor arguments of a TransformerClassifier, read off its layers."""
    block = model.blocks[0]
    return {
        "vocab_size": model.embed.num_embeddings if isinstance(model.embed, nn.Embedding) else None,
        "patch_size": model.patch_size,
        "num_classes": model.head.out_features,
        "d_model": model.head.in_features,
        "n_heads": _original_heads(attention_layers(model)[0]),
        "n_layers": len(model.blocks),
        "d_ff": block.fc1.out_features,
        "max_len": model.pos.shape[1],
    }


def _class_path(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_class(path: str):
    module_name, _, name = path.rpartition(".")
    if not (module_name.startswith("transformers.") or module_name.startswith("chapter11.")):
        raise ValueError(f"pruning plan: refusing to import class {path!r}; only transformers.* and chapter11.* classes are rebuilt")
    return getattr(importlib.import_module(module_name), name)


def save_pruned(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model` to the folder `path`: standard checkpoint files plus `pruning_plan.json`.

    `transformers` models go through `save_pretrained` (config.json,
    model.safetensors); a `TransformerClassifier` gets config.json with its
    constructor arguments and model.safetensors. The plan records the class
    and, per layer, the original ids of the heads kept. Each file lands
    atomically (written to a temporary folder, then renamed into place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path, got {type(path).__name__}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    layers = attention_layers(model)
    plan = {
        "format": "chapter11.heads/1",
        "class": _class_path(model),
        "original_heads": [_original_heads(layer) for layer in layers],
        "kept_heads": {str(i): layer.kept for i, layer in enumerate(layers)},
    }
    if hasattr(model, "save_pretrained"):
        with tempfile.TemporaryDirectory(dir=folder, prefix=".save-") as tmp:
            model.save_pretrained(tmp)
            for file in sorted(Path(tmp).iterdir()):
                if file.is_file():
                    os.replace(file, folder / file.name)
    else:
        from ..models import TransformerClassifier
        from safetensors.torch import save

        if not isinstance(model, TransformerClassifier):
            raise TypeError(f"model: save_pruned supports transformers models and TransformerClassifier, got {type(model).__name__}")
        atomic_write_text(json.dumps(_our_config(model), indent=2), folder / "config.json")
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        atomic_write_bytes(save(state), folder / "model.safetensors")
    atomic_write_text(json.dumps(plan, indent=2), folder / PLAN_FILE)
    return folder


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(folder / shard))
        return state
    raise FileNotFoundError(f"path: no model.safetensors (or index) in {str(folder)!r}")


def load_pruned(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by `save_pruned`: original class, same heads removed, weights loaded.

    Plain `from_pretrained` cannot do this when layers kept different numbers
    of heads, since a config holds one head count for all layers.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path, got {type(path).__name__}")
    folder = Path(path)
    plan_file = folder / PLAN_FILE
    if not plan_file.is_file():
        raise FileNotFoundError(f"path: {str(folder)!r} holds no {PLAN_FILE}; was it written by save_pruned?")
    plan = json.loads(plan_file.read_text())
    cls = _import_class(plan["class"])
    config_dict = json.loads((folder / "config.json").read_text())
    if hasattr(cls, "config_class") and hasattr(cls, "from_pretrained"):
        config = cls.config_class.from_pretrained(folder, local_files_only=True)
        config._attn_implementation = config_dict.get("_attn_implementation", "eager") or "eager"
        model = cls(config)
    else:
        model = cls(**config_dict)
    layers = attention_layers(model)
    if len(layers) != len(plan["kept_heads"]):
        raise ValueError(f"path: plan has {len(plan['kept_heads'])} layers, rebuilt model has {len(layers)}")
    removed = {
        int(l): [h for h in range(n) if h not in set(kept)]
        for (l, kept), n in zip(sorted(plan["kept_heads"].items(), key=lambda kv: int(kv[0])), plan["original_heads"])
    }
    remove_heads(model, {l: ids for l, ids in removed.items() if ids})
    state = _read_state(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise ValueError(f"path: checkpoint does not match the rebuilt model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
