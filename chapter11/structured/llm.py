"""Structured pruning of decoder LLMs beyond heads: MLP width, whole blocks, and what it buys.

For LLaMA-style decoders (`LlamaForCausalLM`, e.g. SmolLM2-135M): a stack of
blocks `model.model.layers[i]`, each with `self_attn` (see
`chapter11.structured.heads`) and a gated MLP,
y = W_down (silu(W_gate x) * (W_up x)).

- **MLP neurons.** Neuron j is row j of W_gate and W_up and column j of
  W_down; removing it removes its contribution h_j W_down[:, j], where
  h = silu(W_gate x) * (W_up x) is the input of W_down. The score is the
  expected size of that contribution,

      S_j = E_t |h_{t,j}| * ||W_down[:, j]||_2,

  an activation-times-weight score (Wanda's |W| * ||X|| idea, per neuron).
  `neuron_scores_loop` / `neuron_scores` compute it from activations,
  `neuron_importance` collects it over calibration text; `mask_neurons`
  zeroes neurons, `remove_neurons` slices them out (and sliced
  `weight_mask` buffers with them).
- **Whole blocks** (ShortGPT, Men et al., 2024). A block that barely turns
  its input changes little; its block influence is

      BI_l = 1 - E_t cos(x_{l,t}, x_{l+1,t}),

  with x_l the hidden state entering block l and x_{l+1} the one leaving it.
  `cosine_influence_loop` / `cosine_influence` compute it from hidden states,
  `block_influence` over calibration text; `remove_blocks` deletes blocks and
  renumbers the rest (config and KV-cache indices included).
- **What it costs and buys.** `parameter_count`, `macs_by_part` (one forward
  pass, split into embedding / attention projections / attention products /
  MLP / lm_head) and `macs_per_token` (one decoding step at a given context
  length); the measured side (time per part, prefill and decoding speed) is
  in `chapter11.experiments.exp04_heads`.

Plans for neurons use current indices (neurons have no identity worth
keeping); `remove_neurons` records the new width in `config.intermediate_size`
when every layer has the same width, and `remove_blocks` records the new depth
in `config.num_hidden_layers`, so `save_pretrained` / `from_pretrained` (and
`chapter11.structured.checkpoint.save_pruned` / `load_pruned`, also for
uneven widths) round-trip.

But: gated LLaMA MLPs only (no MoE, no GPT-2 `c_fc`), no bias handling beyond
slicing it, no Taylor score for neurons (heads have the gradient score), and
block removal is one-shot by influence measured on the dense model
(ShortGPT's recipe), not re-scored after each removal.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..sparsity import check_model
from .heads import _as_index, _slice_linear, attention_layers

__all__ = [
    "decoder_layers", "mlp_modules", "mlp_widths", "set_mlp_widths", "neuron_scores_loop", "neuron_scores",
    "neuron_importance", "mask_neurons", "remove_neurons", "cosine_influence_loop", "cosine_influence",
    "block_influence", "remove_blocks", "parameter_count", "PARTS", "macs_by_part", "macs_per_token",
]

PARTS = ("embedding", "attention projections", "attention products", "MLP", "norms", "lm_head", "other")


# --------------------------------------------------------------------------- finding blocks


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (`model.model.layers` for LLaMA).

    >>> from chapter11.models import tiny_llama
    >>> len(decoder_layers(tiny_llama(hidden_size=16, num_layers=3, num_heads=2, intermediate_size=8)))
    3
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(hasattr(b, "self_attn") and hasattr(b, "mlp") for b in module):
            return module
    raise TypeError(f"model: {type(model).__name__} has no LLaMA-style decoder blocks (a ModuleList of modules with self_attn and mlp)")


def mlp_modules(model: nn.Module) -> list[nn.Module]:
    """The gated MLP of every block (modules with gate_proj, up_proj and down_proj)."""
    check_model(model)
    mlps = [block.mlp for block in decoder_layers(model)]
    for i, mlp in enumerate(mlps):
        if not all(isinstance(getattr(mlp, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")):
            raise TypeError(f"model: block {i} has no gated MLP (gate_proj, up_proj, down_proj as nn.Linear)")
    return mlps


def mlp_widths(model: nn.Module) -> list[int]:
    """Neurons per MLP, one entry per block; [] for a model without LLaMA blocks.

    >>> from chapter11.models import tiny_llama
    >>> mlp_widths(tiny_llama(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=8))
    [8, 8]
    """
    check_model(model)
    try:
        return [mlp.down_proj.in_features for mlp in mlp_modules(model)]
    except TypeError:
        return []


def _sync_config_width(model: nn.Module) -> None:
    widths = mlp_widths(model)
    config = getattr(model, "config", None)
    if widths and len(set(widths)) == 1 and config is not None and hasattr(config, "intermediate_size"):
        config.intermediate_size = widths[0]


def set_mlp_widths(model: nn.Module, widths: Sequence[int]) -> nn.Module:
    """Shrink every MLP to `widths[i]` neurons, keeping the first ones (used to rebuild a
    checkpoint's shapes before loading its weights; to prune, use `remove_neurons`)."""
    check_model(model)
    mlps = mlp_modules(model)
    if len(widths) != len(mlps):
        raise ValueError(f"widths: need one width per block ({len(mlps)}), got {len(widths)}")
    for i, (mlp, width) in enumerate(zip(mlps, widths)):
        width = _as_index(width, f"widths[{i}]")
        n = mlp.down_proj.in_features
        if not 1 <= width <= n:
            raise ValueError(f"widths[{i}] must be in 1..{n} (the block's current width), got {width}")
        if width < n:
            _remove_neuron_slices(mlp, list(range(width)))
    _sync_config_width(model)
    return model


# --------------------------------------------------------------------------- MLP neurons


def _check_neuron_inputs(h, w_down) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(h, torch.Tensor) or not isinstance(w_down, torch.Tensor):
        raise TypeError("h and w_down must be tensors")
    if h.dim() < 2 or w_down.dim() != 2 or h.shape[-1] != w_down.shape[1]:
        raise ValueError(f"h must be (..., F) and w_down (d, F) with the same F, got {tuple(h.shape)} and {tuple(w_down.shape)}")
    return h.reshape(-1, h.shape[-1]), w_down


def neuron_scores_loop(h: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """S_j = (1/N) sum_t |h_{t,j}| * ||W_down[:, j]||_2, with plain loops.

    `h` is (..., F), the input of the down projection for N tokens;
    `w_down` is its (d, F) weight.

    >>> neuron_scores_loop(torch.tensor([[1., -2.], [3., 0.]]), torch.tensor([[3., 0.], [4., 1.]]))
    tensor([10.,  1.])
    """
    h, w_down = _check_neuron_inputs(h, w_down)
    rows, cols = h.tolist(), w_down.tolist()
    scores = []
    for j in range(h.shape[1]):
        mean_abs = sum(abs(row[j]) for row in rows) / len(rows)
        norm = math.sqrt(sum(row[j] ** 2 for row in cols))
        scores.append(mean_abs * norm)
    return torch.tensor(scores)


def neuron_scores(h: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Vectorised `neuron_scores_loop`.

    >>> neuron_scores(torch.tensor([[1., -2.], [3., 0.]]), torch.tensor([[3., 0.], [4., 1.]]))
    tensor([10.,  1.])
    """
    h, w_down = _check_neuron_inputs(h, w_down)
    return h.detach().abs().float().mean(0) * w_down.detach().float().norm(dim=0)  # (F,)


def _token_batches(batches) -> Iterable[torch.Tensor]:
    """Input ids from each batch: a (B, T) LongTensor, an (x, y) pair, or a dict with input_ids."""
    if isinstance(batches, torch.Tensor):
        raise TypeError("batches: pass an iterable of (B, T) token batches (e.g. [ids]), not a single tensor")
    for batch in batches:
        if isinstance(batch, Mapping):
            batch = batch["input_ids"]
        elif isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor) or batch.dim() != 2:
            raise TypeError(f"batches: each batch must be (B, T) token ids, an (x, y) pair or a dict, got {type(batch).__name__}")
        yield batch


@torch.no_grad()
def neuron_importance(model: nn.Module, batches: Iterable) -> dict[int, torch.Tensor]:
    """{block: (F,) neuron scores S_j} over the tokens of `batches` (calibration text).

    Each batch is a (B, T) tensor of token ids (or an (x, y) pair); scores
    are token-weighted means, so they do not depend on how text is batched.
    """
    check_model(model)
    mlps = mlp_modules(model)
    device = next(model.parameters()).device
    totals = [torch.zeros(mlp.down_proj.in_features) for mlp in mlps]
    tokens = [0]

    def hook_for(i, mlp):
        def hook(module, args):
            h = args[0]  # (B, T, F)
            n = h.shape[0] * h.shape[1]
            totals[i] += neuron_scores(h, mlp.down_proj.weight).cpu() * n
        return hook

    handles = [mlp.down_proj.register_forward_pre_hook(hook_for(i, mlp)) for i, mlp in enumerate(mlps)]
    was_training = model.training
    model.eval()
    try:
        for ids in _token_batches(batches):
            model(ids.to(device))
            tokens[0] += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens[0] == 0:
        raise ValueError("batches: is empty")
    return {i: t / tokens[0] for i, t in enumerate(totals)}


def _check_neuron_plan(mlps: list[nn.Module], plan) -> dict[int, list[int]]:
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan must be a dict {{block: [neuron, ...]}}, got {type(plan).__name__}")
    clean = {}
    for layer, ids in plan.items():
        layer = _as_index(layer, f"plan: block index {layer!r}")
        if not 0 <= layer < len(mlps):
            raise ValueError(f"plan: unknown block {layer}; the model has blocks 0..{len(mlps) - 1}")
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [_as_index(j, f"plan: block {layer} neuron {j!r}") for j in ids]
        n = mlps[layer].down_proj.in_features
        if any(not 0 <= j < n for j in ids):
            raise ValueError(f"plan: block {layer} has neurons 0..{n - 1}, got {sorted(j for j in ids if not 0 <= j < n)[:5]}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"plan: block {layer} lists a neuron twice")
        if len(ids) >= n:
            raise ValueError(f"plan: removing all {n} neurons of block {layer} would delete its MLP; keep at least one (or remove the block)")
        clean[layer] = sorted(ids)
    return clean


@torch.no_grad()
def mask_neurons(model: nn.Module, plan: Mapping[int, Iterable[int]]) -> nn.Module:
    """Zero neurons {block: [neuron ids]} in place: gate/up rows and down columns. Shapes stay.

    >>> from chapter11.models import tiny_llama
    >>> model = mask_neurons(tiny_llama(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=4), {0: [1]})
    >>> model.model.layers[0].mlp.down_proj.weight[:, 1].abs().sum().item()
    0.0
    """
    check_model(model)
    mlps = mlp_modules(model)
    for layer, ids in _check_neuron_plan(mlps, plan).items():
        mlp = mlps[layer]
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[ids] = 0  # (F, d): the neuron's rows
            if proj.bias is not None:
                proj.bias[ids] = 0
        mlp.down_proj.weight[:, ids] = 0  # (d, F): the neuron's column
    return model


def _remove_neuron_slices(mlp: nn.Module, keep: list[int]) -> None:
    _slice_linear(mlp.gate_proj, keep, 0)
    _slice_linear(mlp.up_proj, keep, 0)
    _slice_linear(mlp.down_proj, keep, 1)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


@torch.no_grad()
def remove_neurons(model: nn.Module, plan: Mapping[int, Iterable[int]]) -> nn.Module:
    """Slice neurons {block: [neuron ids]} out of gate/up (rows) and down (columns), in place.

    The result computes what `mask_neurons` gives. `weight_mask` buffers are
    sliced along. When all blocks end with the same width it is written to
    `config.intermediate_size`.

    >>> from chapter11.models import tiny_llama
    >>> model = remove_neurons(tiny_llama(hidden_size=8, num_layers=2, num_heads=2, intermediate_size=6), {0: [0, 5], 1: [2, 3]})
    >>> mlp_widths(model), model.config.intermediate_size
    ([4, 4], 4)
    """
    check_model(model)
    mlps = mlp_modules(model)
    for layer, ids in _check_neuron_plan(mlps, plan).items():
        if ids:
            drop = set(ids)
            _remove_neuron_slices(mlps[layer], [j for j in range(mlps[layer].down_proj.in_features) if j not in drop])
    _sync_config_width(model)
    return model


# --------------------------------------------------------------------------- whole blocks


def _check_states(x_in, x_out) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x_in, torch.Tensor) or not isinstance(x_out, torch.Tensor):
        raise TypeError("x_in and x_out must be tensors")
    if x_in.shape != x_out.shape or x_in.dim() < 2 or x_in.numel() == 0:
        raise ValueError(f"x_in and x_out must have the same (..., d) shape, got {tuple(x_in.shape)} and {tuple(x_out.shape)}")
    return x_in.reshape(-1, x_in.shape[-1]), x_out.reshape(-1, x_out.shape[-1])


def cosine_influence_loop(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """BI = 1 - (1/N) sum_t cos(x_in[t], x_out[t]) with plain loops (ShortGPT's block influence).

    >>> cosine_influence_loop(torch.tensor([[1., 0.], [0., 2.]]), torch.tensor([[3., 0.], [2., 0.]]))
    0.5
    """
    a, b = _check_states(x_in, x_out)
    total = 0.0
    for u, v in zip(a.tolist(), b.tolist()):
        dot = sum(p * q for p, q in zip(u, v))
        norms = math.sqrt(sum(p * p for p in u)) * math.sqrt(sum(q * q for q in v))
        total += dot / max(norms, 1e-12)
    return 1.0 - total / len(a)


def cosine_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """Vectorised `cosine_influence_loop`.

    >>> cosine_influence(torch.tensor([[1., 0.], [0., 2.]]), torch.tensor([[3., 0.], [2., 0.]]))
    0.5
    """
    a, b = _check_states(x_in, x_out)
    cos = (a.double() * b.double()).sum(1) / (a.double().norm(dim=1) * b.double().norm(dim=1)).clamp_min(1e-12)  # (N,)
    return 1.0 - cos.mean().item()


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable) -> torch.Tensor:
    """(L,) block influence BI_l of every decoder block over the tokens of `batches`.

    Low BI: the block's output points where its input did, so removing it
    changes the residual stream least.
    """
    check_model(model)
    blocks = decoder_layers(model)
    device = next(model.parameters()).device
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    seen = {}
    tokens = [0]

    def pre_for(i):
        def pre(module, args, kwargs):
            seen[i] = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
        return pre

    def post_for(i):
        def post(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output  # (B, T, d)
            x = seen.pop(i)
            sums[i] += cosine_influence(x, out) * x.shape[0] * x.shape[1]
        return post

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre_for(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post_for(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        for ids in _token_batches(batches):
            model(ids.to(device))
            tokens[0] += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens[0] == 0:
        raise ValueError("batches: is empty")
    return (sums / tokens[0]).float()


def remove_blocks(model: nn.Module, blocks: Iterable[int]) -> nn.Module:
    """Delete decoder blocks (current indices) in place; the rest are renumbered.

    Updates `config.num_hidden_layers` (LLaMA's forward loops over that many
    blocks), `config.layer_types` if present, and each attention module's
    `layer_idx` (its slot in the KV cache).

    >>> from chapter11.models import tiny_llama
    >>> model = remove_blocks(tiny_llama(hidden_size=8, num_layers=4, num_heads=2, intermediate_size=4), [0, 2])
    >>> model.config.num_hidden_layers, [b.self_attn.layer_idx for b in model.model.layers]
    (2, [0, 1])
    """
    check_model(model)
    layers = decoder_layers(model)
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Iterable):
        raise TypeError(f"blocks must be a list of block indices, got {blocks!r}")
    drop = [_as_index(b, f"blocks: index {b!r}") for b in blocks]
    bad = [b for b in drop if not 0 <= b < len(layers)]
    if bad:
        raise ValueError(f"blocks: the model has blocks 0..{len(layers) - 1}, got {bad}")
    if len(set(drop)) != len(drop):
        raise ValueError(f"blocks: lists a block twice: {drop}")
    if len(drop) >= len(layers):
        raise ValueError(f"blocks: removing all {len(layers)} blocks leaves no model; keep at least one")
    kept = [b for i, b in enumerate(layers) if i not in set(drop)]
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None) if config is not None else None
    for i in sorted(drop, reverse=True):
        del layers[i]
    for i, block in enumerate(kept):
        if hasattr(block.self_attn, "layer_idx"):
            block.self_attn.layer_idx = i
        if hasattr(block, "layer_idx"):
            block.layer_idx = i
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(kept)
        if isinstance(layer_types, list) and len(layer_types) == len(kept) + len(drop):
            config.layer_types = [t for i, t in enumerate(layer_types) if i not in set(drop)]
    return model


# --------------------------------------------------------------------------- cost: parameters, MACs, time


def parameter_count(model: nn.Module) -> int:
    """Parameters, tied ones counted once.

    >>> parameter_count(nn.Linear(3, 2))
    8
    """
    check_model(model)
    return sum(p.numel() for p in model.parameters())


_LINEAR_PART = {"q_proj": "attention projections", "k_proj": "attention projections", "v_proj": "attention projections",
                "o_proj": "attention projections", "gate_proj": "MLP", "up_proj": "MLP", "down_proj": "MLP", "lm_head": "lm_head"}


def _part_of(name: str) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _LINEAR_PART:
        return _LINEAR_PART[leaf]
    if leaf == "embed_tokens":
        return "embedding"
    if leaf in ("input_layernorm", "post_attention_layernorm", "norm"):
        return "norms"
    if leaf == "mlp":
        return "MLP"
    return None


@torch.no_grad()
def macs_by_part(model: nn.Module, input_ids: torch.Tensor, context: int | None = None) -> dict[str, int]:
    """Multiply-accumulates of one forward pass over `input_ids` (B, T), by part.

    Linear layers count in * out per token; "attention products" counts QK^T
    and AV with every query attending to `context` positions (default T, the
    full T x T grid as `heads.forward_macs` counts it: 2 * H * T * T * head_dim
    per layer and sequence; pass (B, 1) ids and `context=c` for one decoding
    step over a cache of c positions). Embedding lookups and norms count 0.
    Without `context` the values sum to `heads.forward_macs(model, input_ids)`.
    """
    check_model(model)
    if context is not None:
        context = _as_index(context, "context")
        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
    parts = dict.fromkeys(PARTS, 0)
    handles = []

    def linear_hook(part):
        def hook(module, args, output):
            x = args[0]
            parts[part] += x.numel() // module.in_features * module.in_features * module.out_features
        return hook

    def product_hook(head_dim):
        def hook(module, args):
            z = args[0]  # (B, T, H * hd)
            B, T, width = z.shape
            parts["attention products"] += 2 * B * (width // head_dim) * T * (context or T) * head_dim
        return hook

    try:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(linear_hook(_LINEAR_PART.get(name.rsplit(".", 1)[-1], "other"))))
        for layer in attention_layers(model):
            handles.append(layer.o.register_forward_pre_hook(product_hook(layer.head_dim)))
        was_training = model.training
        model.eval()
        model(input_ids.to(next(model.parameters()).device))
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return parts


def macs_per_token(model: nn.Module, context: int) -> int:
    """Multiply-accumulates of one decoding step that attends to `context` cached positions.

    Every Linear runs once (in * out, lm_head included); each layer's
    attention products cost 2 * H * context * head_dim. So a prefill of T
    tokens costs T * macs_per_token(model, T) in `heads.forward_macs`'s count.

    >>> from chapter11.models import tiny_llama
    >>> macs_per_token(tiny_llama(vocab_size=10, hidden_size=4, num_layers=1, num_heads=2, intermediate_size=6), context=3)
    200

    (q, k, v, o: 4 x 16; MLP: 3 x 4 x 6 = 72; lm_head: 4 x 10 = 40; products: 2 x 2 heads x 3 x 2 dims = 24.)
    """
    check_model(model)
    context = _as_index(context, "context")
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    products = sum(2 * layer.n_heads * context * layer.head_dim for layer in attention_layers(model))
    return linear + products


