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
- LLaMA-style decoders (`LlamaForCausalLM`): `self_attn.{q,k,v,o}_proj`.

Grouped-query attention (GQA, as in SmolLM2: 9 query heads share 3 key/value
heads) repeats each key/value head for its group of query heads, so every
group must keep the same number of query heads. Two kinds of plan are valid:
remove the same number of query heads from every group (k/v stay), or remove
whole groups (their k/v rows go too); any mix that leaves the kept groups
even is fine. A group's importance is the same formula with one gate for the
whole group, I_g = E_x |dL(x)/d xi_g| = E_x |sum_{h in g} dL(x)/d xi_h|
(`per="group"`).

Heads are always named by their index in the dense model (the "original"
index), also after some were removed, so plans compose: removing head 3 and
then head 5 of a layer is the same as removing {3, 5} at once.

- `head_importance_loop` / `head_importance`: I_h per (layer, head), or I_g
  per (layer, key/value group).
- `mask_heads`: zero heads in place (soft); `remove_heads`: slice the q/k/v
  rows and o columns out (physical), giving a smaller model with the same
  outputs as the soft-masked one. Unstructured masks (`weight_mask` buffers
  from `chapter11.masks`) are sliced with their weights.
- `removal_order` (single heads, or one head per group for GQA),
  `group_removal_order` (whole key/value groups), `plan_from_order`,
  `kept_heads`, `forward_macs`.
- Saving and loading a pruned model with uneven heads per layer:
  `chapter11.structured.checkpoint` (`save_pruned` / `load_pruned`).

But: no cross-attention-specific handling beyond what BERT's modules share,
no iterative re-scoring inside `head_importance` (call it again after each
removal for Michel's iterative variant), and `mask_heads` does not stop a
later optimizer step from reviving a zeroed head: remove heads before
fine-tuning, or re-mask. Layer indices are positions: after
`chapter11.structured.llm.remove_blocks`, layer 5 is the fifth block left.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..sparsity import check_model


__all__ = [
    "attention_layers", "head_gates", "head_importance_loop", "head_importance", "per_example_loss", "mask_heads",
    "remove_heads", "kept_heads", "removal_order", "group_removal_order", "plan_from_order", "forward_macs",
]

_KEPT = "kept_heads"  # attribute on each attention module: original ids of the heads still there


# --------------------------------------------------------------------------- finding heads


@dataclass
class HeadLayer:
    """One attention layer seen uniformly: its module, projections and head size."""

    attn: nn.Module  # holds the bookkeeping (n_heads / num_attention_heads, kept_heads)
    names: tuple[tuple[nn.Module, str], ...]  # (owner, attribute) of q, k, v, o
    head_dim: int
    kind: str  # "ours" | "bert" | "llama"
    group: int = 1  # query heads per key/value head now (grouped-query attention)

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

    @property
    def original_group(self) -> int:
        """Query heads per key/value head in the dense model: original head h is in group h // original_group."""
        return getattr(self.attn, "original_group", self.group)

    @property
    def kept_groups(self) -> list[int]:
        """Original ids of the key/value groups that still have query heads, in order."""
        return sorted({h // self.original_group for h in self.kept})


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
    check_model(model)
    return {i: layer.kept for i, layer in enumerate(attention_layers(model))}


def _original_heads(layer: HeadLayer) -> int:
    return getattr(layer.attn, "original_heads", layer.n_heads)


def _as_index(value, what: str) -> int:
    """`value` as a Python int; bools, floats and non-integer tensors are refused.

    >>> _as_index(np.int64(2), "head")
    2
    >>> _as_index(1.5, "head")
    Traceback (most recent call last):
    ...
    TypeError: head must be an integer (int or numpy integer), got 1.5 (float)
    """
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{what} must be an integer, got the boolean {value!r}; list head indices, not a keep/drop mask")
    if isinstance(value, torch.Tensor) and (value.dim() != 0 or value.is_floating_point() or value.is_complex()):
        raise TypeError(f"{what} must be an integer, got a tensor {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer (int or numpy integer), got {value!r} ({type(value).__name__})") from None


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
    check_model(model)
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
    check_model(model)
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


def _to_device(batch, device):
    """The batch with every tensor on `device` (the library loops move batches to the model)."""
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(t.to(device) if isinstance(t, torch.Tensor) else t for t in batch)
    return batch


def _check_per(per) -> str:
    if per not in ("head", "group"):
        raise ValueError(f"per must be 'head' (one gate per query head) or 'group' (one gate per key/value group), got {per!r}")
    return per


def _unit_index(layer: HeadLayer, per: str) -> list[int]:
    """For each current query head, the position of its unit (itself, or its key/value group) among the kept units."""
    if per == "head":
        return list(range(layer.n_heads))
    groups = layer.kept_groups
    return [groups.index(h // layer.original_group) for h in layer.kept]


def _scores_table(layers: list[HeadLayer], per_layer: list[torch.Tensor], per: str = "head") -> torch.Tensor:
    """(L, H_max) (or (L, G_max) for per="group") in original numbering, NaN where a head or group was removed."""
    if per == "head":
        width = max(_original_heads(layer) for layer in layers)
        positions = [layer.kept for layer in layers]
    else:
        width = max(_original_heads(layer) // layer.original_group for layer in layers)
        positions = [layer.kept_groups for layer in layers]
    table = torch.full((len(layers), width), float("nan"))
    for row, (where, scores) in enumerate(zip(positions, per_layer)):
        table[row, where] = scores.detach().float().cpu()
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
    per: str = "head",
) -> torch.Tensor:
    """I_h = (1/N) sum_x |dL(x)/d xi_h| at xi = 1, one example x at a time.

    `batches` yields (x, y) pairs (or dicts of model inputs with "labels");
    `loss_fn(model, batch)` returns the (B,) per-example losses and defaults to
    `per_example_loss`. Returns (num_layers, num_heads) in original head
    numbering (NaN for removed heads); `normalize=True` divides each layer by
    its L2 norm, as Michel et al. do before comparing layers.

    `per="group"` scores key/value groups instead: one gate xi_g scales all
    query heads of group g, so dL/d xi_g = sum_{h in g} dL/d xi_h, taken per
    example before the absolute value. Returns (num_layers, num_groups).
    Without grouped-query attention every head is its own group.

    >>> from chapter11.models import TransformerClassifier
    >>> _ = torch.manual_seed(0); model = TransformerClassifier(patch_size=4, max_len=10, n_layers=1, n_heads=2)
    >>> batch = (torch.randn(3, 40), torch.tensor([0, 1, 2]))
    >>> head_importance_loop(model, [batch]).shape
    torch.Size([1, 2])
    """
    check_model(model)
    layers = _start(model, batches)
    per = _check_per(per)
    loss_fn = loss_fn or per_example_loss
    units = [_unit_index(layer, per) for layer in layers]
    totals = [[0.0] * (max(u) + 1) for u in units]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            batch = _to_device(batch, device)
            for i in range(_batch_size(batch)):
                gates = [torch.ones(layer.n_heads, device=device, requires_grad=True) for layer in layers]  # (H,) each
                with head_gates(model, gates):
                    loss = loss_fn(model, _example(batch, i)).sum()
                grads = torch.autograd.grad(loss, gates, allow_unused=True)
                for l, grad in enumerate(grads):
                    if grad is None:
                        continue
                    per_unit = [0.0] * len(totals[l])
                    for h in range(layers[l].n_heads):  # the chain rule: a group gate's gradient sums its heads'
                        per_unit[units[l][h]] += grad[h].item()
                    for u, value in enumerate(per_unit):
                        totals[l][u] += abs(value)
                n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("batches: is empty")
    table = _scores_table(layers, [torch.tensor(t) / n for t in totals], per)
    return _normalise(table) if normalize else table


def head_importance(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable | None = None,
    normalize: bool = False,
    per: str = "head",
) -> torch.Tensor:
    """Vectorised `head_importance_loop`: one backward pass per batch.

    Each example gets its own gate row, (B, H), so d(sum_x L(x)) / d xi[x, h]
    is exactly dL(x)/d xi_h (examples do not interact in eval mode), and the
    absolute value is taken per example, as in the formula. `per="group"`
    sums each example's gradients over the heads of a key/value group first.

    >>> from chapter11.models import TransformerClassifier
    >>> _ = torch.manual_seed(0); model = TransformerClassifier(patch_size=4, max_len=10, n_layers=1, n_heads=2)
    >>> batch = (torch.randn(3, 40), torch.tensor([0, 1, 2]))
    >>> torch.allclose(head_importance(model, [batch]), head_importance_loop(model, [batch]), atol=1e-6)
    True
    """
    check_model(model)
    layers = _start(model, batches)
    per = _check_per(per)
    loss_fn = loss_fn or per_example_loss
    device = next(model.parameters()).device
    units = [torch.tensor(_unit_index(layer, per), device=device) for layer in layers]
    totals = [torch.zeros(int(u.max()) + 1) for u in units]
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            batch = _to_device(batch, device)
            B = _batch_size(batch)
            gates = [torch.ones(B, layer.n_heads, device=device, requires_grad=True) for layer in layers]  # (B, H) each
            with head_gates(model, gates):
                loss = loss_fn(model, batch).sum()
            grads = torch.autograd.grad(loss, gates, allow_unused=True)
            for l, grad in enumerate(grads):
                if grad is not None:
                    grad = grad.detach().float()  # (B, H)
                    per_unit = torch.zeros(B, len(totals[l]), device=device).index_add_(1, units[l], grad)  # (B, units)
                    totals[l] += per_unit.abs().sum(0).cpu()  # (units,)
            n += B
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("batches: is empty")
    table = _scores_table(layers, [t / n for t in totals], per)
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
        layer_id = _as_index(layer_id, f"{argument}: layer index {layer_id!r}")
        if not 0 <= layer_id < len(layers):
            raise ValueError(f"{argument}: unknown layer index {layer_id}; the model has layers 0..{len(layers) - 1}")
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"{argument}: layer {layer_id} needs a list of head indices, got {ids!r}")
        ids = [_as_index(h, f"{argument}: layer {layer_id} head {h!r}") for h in ids]
        n = _original_heads(layers[layer_id])
        bad = [h for h in ids if not 0 <= h < n]
        if bad:
            raise ValueError(f"{argument}: layer {layer_id} has heads 0..{n - 1}, got {bad}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{argument}: layer {layer_id} lists a head twice: {ids}")
        if layer_id in plan:
            raise ValueError(f"{argument}: layer {layer_id} appears twice")
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


def _check_scores(scores, argument: str = "scores") -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"{argument}: expected a (layers, heads) tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
    return scores.detach().float().cpu()


def _check_count(value, name: str, minimum: int = 1) -> int:
    value = _as_index(value, name)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def removal_order(scores: torch.Tensor, min_heads: int = 1, group: int = 1) -> list[tuple]:
    """Units to remove, least important first, never leaving a layer below `min_heads` query heads.

    `scores` is (layers, heads) in original numbering; NaN marks heads already
    removed. Ties keep row-major order.

    - `group=1` (plain multi-head attention): items are (layer, head).
    - `group > 1` (grouped-query attention, `group` query heads per key/value
      head in the dense model; head h is in group h // group): one step takes
      the least important remaining query head of *every* group of a layer
      still present, so the groups stay even. Items are
      (layer, (head, head, ...)), scored by the sum of their heads' scores.
      Every group keeps at least one head (see `group_removal_order` to drop
      whole groups).

    `plan_from_order(order[:k])` turns the first k items into a valid plan.

    >>> removal_order(torch.tensor([[0.5, 0.1], [0.2, 0.9]]))
    [(0, 1), (1, 0)]
    >>> removal_order(torch.tensor([[0.5, 0.1, 0.3], [0.2, 0.9, 0.4]]), min_heads=2)
    [(0, 1), (1, 0)]
    >>> removal_order(torch.tensor([[0.5, 0.1, 0.3, 0.2], [0.2, 0.9, 0.4, 0.8]]), group=2)
    [(0, (1, 3)), (1, (0, 2))]
    """
    scores = _check_scores(scores)
    min_heads = _check_count(min_heads, "min_heads")
    group = _check_count(group, "group")
    L, H = scores.shape
    present = ~torch.isnan(scores)  # (L, H)
    if group == 1:
        left = present.sum(1).tolist()
        flat = scores.nan_to_num(float("inf")).flatten()
        order = []
        for idx in torch.sort(flat, stable=True).indices.tolist():
            l, h = divmod(idx, H)
            if present[l, h] and left[l] > min_heads:
                order.append((l, h))
                left[l] -= 1
        return order
    if H % group:
        raise ValueError(f"group: {H} heads per layer do not split into groups of {group}")
    units = []  # (score, layer, step, heads)
    for l in range(L):
        members = []  # per group still present: its heads, least important first
        for g in range(H // group):
            heads = [h for h in range(g * group, (g + 1) * group) if present[l, h]]
            if heads:
                members.append(sorted(heads, key=lambda h: (scores[l, h].item(), h)))
        if not members:
            continue
        sizes = {len(m) for m in members}
        if len(sizes) > 1:
            raise ValueError(f"scores: layer {l} has uneven groups (heads present per group: {[len(m) for m in members]}); "
                             "a grouped-query layer always keeps the same number of heads in every group")
        size = sizes.pop()
        for step in range(size - 1):  # each group keeps at least one head
            if len(members) * (size - step - 1) < min_heads:
                break
            heads = tuple(sorted(m[step] for m in members))
            units.append((sum(scores[l, h].item() for h in heads), l, step, heads))
    units.sort(key=lambda u: (u[0], u[1], u[2]))  # within a layer, step sums never decrease
    return [(l, heads) for _, l, _, heads in units]


def group_removal_order(group_scores: torch.Tensor, group: int, min_groups: int = 1,
                        kept: Mapping[int, Iterable[int]] | None = None) -> list[tuple[int, tuple[int, ...]]]:
    """Whole key/value groups to remove, least important first: items (layer, (heads of the group)).

    `group_scores` is (layers, groups), e.g. `head_importance(model, batches, per="group")`;
    NaN marks groups already removed. Group g holds original heads
    g * group ... (g + 1) * group - 1; with `kept` (from `kept_heads(model)`)
    only the heads still present are listed. Every layer keeps at least
    `min_groups` groups.

    >>> group_removal_order(torch.tensor([[0.3, 0.1, 0.2], [0.9, 0.05, 0.4]]), group=2)
    [(1, (2, 3)), (0, (2, 3)), (0, (4, 5)), (1, (4, 5))]
    """
    group_scores = _check_scores(group_scores, "group_scores")
    group = _check_count(group, "group")
    min_groups = _check_count(min_groups, "min_groups")
    present = ~torch.isnan(group_scores)  # (L, G)
    left = present.sum(1).tolist()
    flat = group_scores.nan_to_num(float("inf")).flatten()
    order = []
    for idx in torch.sort(flat, stable=True).indices.tolist():
        l, g = divmod(idx, group_scores.shape[1])
        if present[l, g] and left[l] > min_groups:
            heads = range(g * group, (g + 1) * group)
            if kept is not None:
                still = set(kept.get(l, heads))
                heads = [h for h in heads if h in still]
            order.append((l, tuple(heads)))
            left[l] -= 1
    return order


def plan_from_order(order: Iterable[tuple], per_layer: int | None = None) -> dict[int, list[int]]:
    """[(layer, head) or (layer, (head, ...)), ...] -> {layer: sorted heads}.

    With `per_layer=k`, only the first k items of each layer are taken (the
    k least important units of every layer: a plan that is uniform across
    layers, which `checkpoint.save_pruned` can express in a plain config).

    >>> plan_from_order([(1, 3), (0, 2), (1, 0)])
    {0: [2], 1: [0, 3]}
    >>> plan_from_order([(0, (1, 4, 7)), (0, (0, 5, 6))])
    {0: [0, 1, 4, 5, 6, 7]}
    >>> plan_from_order([(1, 3), (0, 2), (1, 0)], per_layer=1)
    {0: [2], 1: [3]}
    """
    if isinstance(order, (str, bytes)) or not isinstance(order, Iterable):
        raise TypeError(f"order must be the list removal_order or group_removal_order returns, got {type(order).__name__}")
    if per_layer is not None:
        per_layer = _check_count(per_layer, "per_layer", minimum=0)
    plan: dict[int, list[int]] = {}
    taken: dict[int, int] = {}
    for item in order:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"order: items must be (layer, head) or (layer, heads), got {item!r}")
        l, heads = item
        l = _as_index(l, f"order: layer {l!r}")
        if per_layer is not None:
            if taken.get(l, 0) >= per_layer:
                continue
            taken[l] = taken.get(l, 0) + 1
        heads = heads if isinstance(heads, (tuple, list)) else [heads]
        plan.setdefault(l, []).extend(_as_index(h, f"order: layer {l} head {h!r}") for h in heads)
    return {l: sorted(plan[l]) for l in sorted(plan)}


# --------------------------------------------------------------------------- soft and physical removal


def _rows(layer: HeadLayer, heads: list[int]) -> tuple[list[int], list[int]]:
    """Current row indices of `heads` (original ids) in q/o, and in k/v (whole groups only)."""
    kept = layer.kept
    pos = {h: i for i, h in enumerate(kept)}
    hd = layer.head_dim
    q_rows = [pos[h] * hd + j for h in heads if h in pos for j in range(hd)]
    dropping = set(heads)
    kv_rows = []
    for g_pos, g in enumerate(layer.kept_groups):
        members = [h for h in kept if h // layer.original_group == g]
        if all(h in dropping for h in members):
            kv_rows += [g_pos * hd + j for j in range(hd)]
    return q_rows, kv_rows


@torch.no_grad()
def mask_heads(model: nn.Module, head_mask) -> nn.Module:
    """Zero heads in place: their q rows and o columns (and k/v rows once a
    whole key/value group is dropped). The model keeps its shape.

    `head_mask` is a (num_layers, num_heads) tensor, 1 = keep and 0 = drop,
    or a dict {layer: [heads to drop]} in original head numbering. Soft
    masks need not keep grouped-query groups even (only removal does).

    >>> from chapter11.models import TransformerClassifier
    >>> model = mask_heads(TransformerClassifier(patch_size=4, n_heads=4, d_model=8), torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]))
    >>> model.blocks[0].attn.o.weight[:, 2:4].abs().sum().item(), model.blocks[0].attn.o.weight[:, :2].ne(0).all().item()
    (0.0, True)
    """
    check_model(model)
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
    """Keep only rows (dim=0) or columns (dim=1) `keep` of `linear`, in place.

    The weight and bias become new, smaller parameters (same `requires_grad`);
    `weight_mask` / `bias_mask` buffers from `chapter11.masks` are sliced the
    same way, so unstructured pruning survives structured removal. The module
    object stays, with its hooks.

    >>> layer = nn.Linear(3, 4)
    >>> _slice_linear(layer, [0, 2], dim=0).weight.shape, layer.out_features
    (torch.Size([2, 3]), 2)
    """
    if hasattr(linear, "weight_orig") or hasattr(linear, "bias_orig"):
        raise ValueError(
            "model: a projection carries torch.nn.utils.prune's weight_orig/weight_mask; "
            "convert with chapter11.masks.from_torch_prune (or prune.remove) before removing heads or neurons"
        )
    idx = torch.tensor(keep, dtype=torch.long, device=linear.weight.device)
    with torch.no_grad():
        old = linear.weight
        linear.weight = nn.Parameter(old.index_select(dim, idx).clone(), requires_grad=old.requires_grad)  # (out', in) or (out, in')
        if linear.bias is not None and dim == 0:
            old = linear.bias
            linear.bias = nn.Parameter(old.index_select(0, idx).clone(), requires_grad=old.requires_grad)  # (out',)
        for name, buf in list(linear.named_buffers(recurse=False)):
            if name == "weight_mask" or (name == "bias_mask" and dim == 0):
                persistent = name not in linear._non_persistent_buffers_set
                linear.register_buffer(name, buf.index_select(dim if name == "weight_mask" else 0, idx).clone(), persistent=persistent)
    if dim == 0:
        linear.out_features = len(keep)
    else:
        linear.in_features = len(keep)
    return linear


def _check_groups(layer: HeadLayer, l: int, ids: list[int]) -> None:
    """Refuse a removal that would leave the key/value groups of a grouped-query layer uneven."""
    if layer.original_group == 1:
        return
    after: dict[int, list[int]] = {}
    for h in layer.kept:
        if h not in ids:
            after.setdefault(h // layer.original_group, []).append(h)
    counts = {g: len(v) for g, v in after.items()}
    if len(set(counts.values())) > 1:
        values = list(counts.values())
        usual = max(set(values), key=lambda c: (values.count(c), c))  # the most common count (ties: the larger)
        odd = next(g for g in sorted(after) if counts[g] != usual)
        ref = next(g for g in sorted(after) if counts[g] == usual)
        raise ValueError(
            f"heads: layer {l}, key/value group {odd} would keep {counts[odd]} query heads {after[odd]}, but group {ref} "
            f"keeps {counts[ref]} {after[ref]}; grouped-query attention ({layer.original_group} query heads per key/value "
            "head) needs the same number in every group: remove the same number of heads from each group, or whole groups"
        )


@torch.no_grad()
def remove_heads(model: nn.Module, heads: Mapping[int, Iterable[int]]) -> nn.Module:
    """Physically remove heads {layer: [original head ids]} and return the smaller model.

    Works in place (copy.deepcopy first to keep the dense model). The q/k/v
    output rows and the o input columns of each removed head are sliced out,
    so the result computes exactly what `mask_heads` gives, with fewer FLOPs;
    unstructured masks on those layers are sliced along.
    Grouped-query attention: every key/value group must keep the same number
    of query heads; a group whose heads all go loses its k/v rows. Removing
    the last head of a layer, an uneven plan, an unknown layer or an already
    removed head raises, before anything changes.

    >>> from chapter11.models import TransformerClassifier
    >>> model = remove_heads(TransformerClassifier(patch_size=4, d_model=8, n_heads=4), {1: [0, 3]})
    >>> model.blocks[1].attn.q.weight.shape, model.blocks[1].attn.o.weight.shape, model.blocks[1].attn.n_heads
    (torch.Size([4, 8]), torch.Size([8, 4]), 2)
    """
    check_model(model)
    layers = attention_layers(model)
    plan = _check_plan(layers, heads, "heads")
    for l, ids in plan.items():  # validate everything before changing anything
        layer = layers[l]
        gone = [h for h in ids if h not in layer.kept]
        if gone:
            raise ValueError(f"heads: layer {l} heads {gone} were already removed (kept: {layer.kept})")
        if len(ids) >= layer.n_heads:
            raise ValueError(f"heads: removing {ids} would leave layer {l} with no heads; keep at least one (or drop the layer)")
        _check_groups(layer, l, ids)
    for l, ids in plan.items():
        layer = layers[l]
        if not ids:
            continue
        if not hasattr(layer.attn, "original_heads"):
            layer.attn.original_heads = layer.n_heads
        if layer.kind == "llama" and not hasattr(layer.attn, "original_group"):
            layer.attn.original_group = layer.group
        drop = set(ids)
        new_kept = [h for h in layer.kept if h not in drop]
        new_groups = len({h // layer.original_group for h in new_kept})
        q_rows, kv_rows = _rows(layer, ids)
        q_keep = [r for r in range(layer.q.out_features) if r not in set(q_rows)]
        kv_keep = [r for r in range(layer.proj(1).out_features) if r not in set(kv_rows)]
        for i, keep, dim in ((0, q_keep, 0), (1, kv_keep, 0), (2, kv_keep, 0), (3, q_keep, 1)):
            _slice_linear(layer.proj(i), keep, dim)
        setattr(layer.attn, _KEPT, new_kept)
        n = len(new_kept)
        if layer.kind == "ours":
            layer.attn.n_heads = n
        elif layer.kind == "bert":
            layer.attn.num_attention_heads = n
            layer.attn.all_head_size = n * layer.head_dim
        elif layer.kind == "llama":
            layer.attn.num_key_value_groups = n // new_groups  # query heads per key/value head, read by repeat_kv / sdpa
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
    check_model(model)
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
