"""N:M semi-structured sparsity (2:4 by default), and when 2:4 pays on a GPU.

N:M keeps the N largest-magnitude weights in every group of M consecutive
weights along the input dimension (a row of an `nn.Linear` weight). 2:4 is
50% sparsity with a fixed pattern, which is what NVIDIA's sparse tensor cores
(cuSPARSELt, CUTLASS; GPUs of compute capability 8.0 or newer) accelerate:
the chapter's tip "ensure inference frameworks support desired sparsity".

    >>> nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5]])).tolist()
    [[0.0, 1.0, 1.0, 0.0]]

Covers:
- masks with loops (`nm_mask_loop`) and vectorised (`nm_mask`), checking a
  pattern (`is_nm`), masks for a whole model (`nm_masks`, used with
  `chapter11.masks.apply_masks`);
- the weight shapes of LLaMA-style decoders (`linear_shapes`, `LLAMA_WIDTHS`)
  and the token count from which 2:4 beats dense (`crossover_tokens_loop`,
  `crossover_tokens`, `crossovers`);
- on a CUDA GPU: a whole LLM's decoder Linear layers converted to 2:4
  semi-structured tensors (`decoder_linears`, `check_2to4_linears`,
  `to_semi_structured`) and a prefill that a CUDA graph can capture
  (`prefill_logits`). The benchmarks that time them against dense fp16,
  eager, from a CUDA graph and compiled, and the GPU numbers recorded by
  earlier runs, are in `chapter11.experiments.exp08_kernels`
  (`python -m chapter11 bench semi`).
`gpu_skip_reason()` says in one line why the GPU parts cannot run here; every
GPU function raises `RuntimeError` with that line on a machine without one.

Why the conditions matter: in eager mode each cuSPARSELt call pays a host-side
cost (its plan is set up on every call), which swamps small products, so 2:4
is slower than dense at small token counts; replaying a CUDA graph removes the
host cost, and 2:4 pays only on wide layers with enough tokens. The hardware
limit is 2x (half the multiplies), never reached in full.

But: the groups run along the last dimension only (no channel permutation to
pick better groups); fp16/bf16 only on the GPU; prefill only (decoding one
token at a time is a matrix-vector product, where 2:4 has even less to win);
and a CPU gains no speed from N:M at all: only the accuracy cost can be
measured without a GPU.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from chapter11.masks import prunable_parameters
from .sparsity import check_model

__all__ = [
    "nm_mask_loop", "nm_mask", "is_nm", "nm_masks", "LLAMA_WIDTHS", "linear_shapes", "llm_shapes",
    "crossover_tokens_loop", "crossover_tokens", "crossovers", "gpu_skip_reason", "decoder_linears",
    "check_2to4_linears", "to_semi_structured", "prefill_logits",
]


def _check_nm(weight, n, m) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if n > m:
        raise ValueError(f"n must be at most m (keep n of every m weights), got n={n}, m={m}")
    if weight.dim() < 1 or weight.shape[-1] % m != 0:
        raise ValueError(f"weight's last dimension must be a multiple of m={m}, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must hold floats, got {weight.dtype}")
    if torch.isnan(weight).any():
        raise ValueError("weight contains NaN; magnitudes cannot be ranked")
    return weight.detach()


def nm_mask_loop(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """0/1 mask keeping the n largest |w| of every m consecutive weights, group by group.

    Ties keep the earlier position.

    >>> nm_mask_loop(torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 9.0, -8.0, 0.0]])).tolist()
    [[1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]]
    """
    W = _check_nm(weight, n, m)
    flat = W.reshape(-1).tolist()
    mask = [0.0] * len(flat)
    for start in range(0, len(flat), m):
        group = list(range(start, start + m))
        ranked = sorted(group, key=lambda j: -abs(flat[j]))  # sorted() is stable: ties keep order
        for j in ranked[:n]:
            mask[j] = 1.0
    return torch.tensor(mask, dtype=W.dtype, device=W.device).reshape(W.shape)


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """0/1 mask keeping the n largest |w| of every m along the last dim (vectorised).

    Agrees with `nm_mask_loop`, ties included.

    >>> nm_mask(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), n=1, m=2).tolist()
    [[1.0, 0.0, 1.0, 0.0]]
    """
    W = _check_nm(weight, n, m)
    groups = W.abs().reshape(-1, m)  # (num_groups, m)
    order = torch.argsort(groups, dim=1, descending=True, stable=True)  # (num_groups, m)
    mask = torch.zeros_like(groups)
    mask.scatter_(1, order[:, :n], 1.0)
    return mask.reshape(W.shape).to(W.dtype)


def is_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True if every group of m along the last dim holds at most n non-zeros.

    >>> is_nm(torch.tensor([[0.0, 1.0, 2.0, 0.0]])), is_nm(torch.tensor([[3.0, 1.0, 2.0, 0.0]]))
    (True, False)
    """
    W = _check_nm(weight, n, m)
    return bool(((W.reshape(-1, m) != 0).sum(dim=1) <= n).all())


def nm_masks(model: nn.Module, n: int = 2, m: int = 4, exclude: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """{parameter name: N:M mask} for every prunable weight, for `apply_masks`.

    Conv weights group along their flattened (in_channels * kernel) axis.
    A weight whose last dimension is not a multiple of m raises (exclude it).
    """
    check_model(model)
    masks = {}
    for name, p in prunable_parameters(model, exclude=exclude).items():
        W = p.detach().reshape(p.shape[0], -1)  # (out, in * kernel)
        if W.shape[1] % m:
            raise ValueError(f"{name} has {W.shape[1]} inputs per output, not a multiple of m={m}; pass exclude=[{name.rsplit('.', 1)[0]!r}]")
        masks[name] = nm_mask(W, n, m).reshape(p.shape)
    return masks


# ------------------------------------------------------------ LLM shapes

# Widths of LLaMA-style decoders (head_dim = hidden_size / num_heads). "llama-1b"
# is TinyLlama-1.1B's (LLaMA-2 architecture at 1.1 B parameters), "llama-7b" LLaMA-2-7B's.
LLAMA_WIDTHS: dict[str, dict[str, int]] = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_heads": 9, "num_kv_heads": 3, "num_layers": 30},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_heads": 32, "num_kv_heads": 4, "num_layers": 22},
    "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_heads": 32, "num_kv_heads": 32, "num_layers": 32},
}


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def linear_shapes(hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int | None = None) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each Linear in one LLaMA decoder layer.

    Attention: q and o are (hidden, hidden); k and v map hidden to
    num_kv_heads * head_dim (grouped-query attention shares them). MLP: gate
    and up map hidden to intermediate, down maps back.

    >>> linear_shapes(576, 1536, num_heads=9, num_kv_heads=3)["k_proj"]
    (192, 576)
    >>> linear_shapes(4096, 11008, 32)["down_proj"]
    (4096, 11008)
    """
    for name, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size), ("num_heads", num_heads)):
        _positive_int(v, name)
    kv = num_heads if num_kv_heads is None else _positive_int(num_kv_heads, "num_kv_heads")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size must be a multiple of num_heads, got {hidden_size} and {num_heads}")
    if num_heads % kv:
        raise ValueError(f"num_heads must be a multiple of num_kv_heads, got {num_heads} and {kv}")
    kv_width = kv * (hidden_size // num_heads)
    return {
        "q_proj": (hidden_size, hidden_size),
        "k_proj": (kv_width, hidden_size),
        "v_proj": (kv_width, hidden_size),
        "o_proj": (hidden_size, hidden_size),
        "gate_proj": (intermediate_size, hidden_size),
        "up_proj": (intermediate_size, hidden_size),
        "down_proj": (hidden_size, intermediate_size),
    }


def llm_shapes(names: Sequence[str] = ("smollm2-135m", "llama-1b", "llama-7b")) -> list[tuple[int, int]]:
    """The distinct (out_features, in_features) of the decoder Linears of the named widths, in order.

    >>> llm_shapes(["smollm2-135m"])
    [(576, 576), (192, 576), (1536, 576), (576, 1536)]
    """
    if names is None or not isinstance(names, (str, Iterable)):
        raise TypeError(f"names must be a width name or a list of them, got {type(names).__name__}")
    if isinstance(names, str):
        names = [names]
    shapes: list[tuple[int, int]] = []
    for name in names:
        if name not in LLAMA_WIDTHS:
            raise ValueError(f"names: unknown width {name!r}; choose from {sorted(LLAMA_WIDTHS)}")
        w = LLAMA_WIDTHS[name]
        for shape in linear_shapes(w["hidden_size"], w["intermediate_size"], w["num_heads"], w["num_kv_heads"]).values():
            if shape not in shapes:
                shapes.append(shape)
    return shapes


# ------------------------------------------------------------ crossover


def _check_curve(tokens, speedups) -> tuple[list[int], list[float]]:
    tokens, speedups = list(tokens), list(speedups)
    if not tokens or len(tokens) != len(speedups):
        raise ValueError(f"tokens and speedups must be non-empty and of equal length, got {len(tokens)} and {len(speedups)}")
    for t in tokens:
        _positive_int(t, "tokens")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"tokens must be distinct, got {tokens}")
    for v in speedups:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"speedups must be positive finite numbers, got {v!r}")
    return tokens, [float(v) for v in speedups]


def crossover_tokens_loop(tokens: Sequence[int], speedups: Sequence[float]) -> int | None:
    """Token count from which 2:4 beats dense for good, one measurement at a time.

    Walk the measurements in order of tokens and remember the last one where
    2:4 lost (speedup < 1). The crossover lies between it and the next one,
    interpolated on a log scale of tokens (token counts grow by factors):
    log t* = log t0 + (1 - v0) / (v1 - v0) * (log t1 - log t0).
    None if 2:4 still loses at the largest count; the smallest count if it
    never loses.

    >>> crossover_tokens_loop([256, 1024, 4096], [0.5, 0.8, 1.2])
    2048
    >>> crossover_tokens_loop([256, 1024], [0.5, 0.9]) is None
    True
    """
    tokens, speedups = _check_curve(tokens, speedups)
    pts = sorted(zip(tokens, speedups))
    last_loss = None
    for i, (_, v) in enumerate(pts):
        if v < 1:
            last_loss = i
    if last_loss is None:
        return pts[0][0]
    if last_loss == len(pts) - 1:
        return None
    (t0, v0), (t1, v1) = pts[last_loss], pts[last_loss + 1]
    log_t = math.log(t0) + (1 - v0) / (v1 - v0) * (math.log(t1) - math.log(t0))
    return int(round(math.exp(log_t)))


def crossover_tokens(tokens: Sequence[int], speedups: Sequence[float]) -> int | None:
    """`crossover_tokens_loop` with numpy: the last loss found by `flatnonzero`.

    >>> crossover_tokens([16, 1024, 4096], [0.3, 1.1, 1.4])  # between 16 and 1024, nearer 1024
    609
    >>> crossover_tokens([16, 1024], [1.2, 1.5])  # wins from the smallest measured count
    16
    """
    tokens, speedups = _check_curve(tokens, speedups)
    order = np.argsort(tokens)
    t = np.asarray(tokens, dtype=np.float64)[order]  # (k,)
    v = np.asarray(speedups, dtype=np.float64)[order]  # (k,)
    losses = np.flatnonzero(v < 1)
    if losses.size == 0:
        return int(t[0])
    i = int(losses[-1])
    if i == t.size - 1:
        return None
    log_t = np.log(t[i]) + (1 - v[i]) / (v[i + 1] - v[i]) * (np.log(t[i + 1]) - np.log(t[i]))
    return int(np.round(np.exp(log_t)))


def crossovers(rows: Iterable[Mapping], by: Sequence[str] = ("out_features", "in_features", "mode")) -> dict[tuple, int | None]:
    """{group: crossover in tokens} over benchmark rows grouped by the keys `by`.

    Rows with an "error" are left out; a group needs at least one row.

    >>> rows = [{"model": "m", "mode": "graph", "tokens": t, "speedup": v} for t, v in [(512, 0.9), (2048, 1.1)]]
    >>> crossovers(rows, by=("model", "mode"))
    {('m', 'graph'): 1024}
    """
    groups: dict[tuple, list[tuple[int, float]]] = {}
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise TypeError(f"rows must be a list of benchmark rows (dicts), got {type(rows).__name__}")
    for r in rows:
        if r.get("error"):
            continue
        groups.setdefault(tuple(r[k] for k in by), []).append((r["tokens"], r["speedup"]))
    return {key: crossover_tokens([t for t, _ in pts], [v for _, v in pts]) for key, pts in groups.items()}


# --------------------------------------------------------------------- GPU


def gpu_skip_reason(min_capability: tuple[int, int] = (8, 0)) -> str | None:
    """None if a CUDA GPU of at least `min_capability` is here, else a one-line reason.

    >>> gpu_skip_reason() is None or isinstance(gpu_skip_reason(), str)
    True
    """
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    cap = torch.cuda.get_device_capability(0)
    if cap < tuple(min_capability):
        return f"{torch.cuda.get_device_name(0)} has compute capability {cap[0]}.{cap[1]}; 2:4 sparse tensor cores need {min_capability[0]}.{min_capability[1]} or newer"
    return None


def _need_gpu() -> None:
    reason = gpu_skip_reason()
    if reason:
        raise RuntimeError(reason)


# ------------------------------------------------------------ a 2:4 LLM


def decoder_linears(model: nn.Module, exclude: Iterable[str] = ("lm_head",)) -> dict[str, nn.Linear]:
    """{name: module} for every nn.Linear of `model` except those whose last name part is in `exclude`.

    For a `LlamaForCausalLM` these are the 7 Linears of each decoder layer
    (the output head `lm_head` stays dense: it is shared with the embedding in
    SmolLM2 and is not 2:4-pruned).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    exclude = set(exclude)
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in exclude}


def check_2to4_linears(model: nn.Module, exclude: Iterable[str] = ("lm_head",)) -> list[str]:
    """Names of the decoder Linears, after checking each weight is 2:4 (ValueError names those that are not)."""
    check_model(model)
    linears = decoder_linears(model, exclude)
    if not linears:
        raise ValueError("model has no nn.Linear outside exclude; nothing to convert")
    bad = [name for name, m in linears.items() if m.weight.shape[-1] % 4 or not is_nm(m.weight.detach(), 2, 4)]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"these Linear weights are not 2:4 sparse: {shown}; prune them with n=2, m=4 first (or exclude them)")
    return list(linears)


@torch.no_grad()
def to_semi_structured(model: nn.Module, exclude: Iterable[str] = ("lm_head",)) -> list[str]:
    """Swap every decoder Linear's 2:4 weight for a `SparseSemiStructuredTensor`, in place; returns their names.

    The model must already be on a CUDA GPU in float16 or bfloat16, with mask
    buffers removed (`chapter11.masks.remove_masks`), and every converted
    weight must be 2:4 (`check_2to4_linears`). Raises RuntimeError with
    `gpu_skip_reason()` without a suitable GPU.
    """
    check_model(model)
    _need_gpu()
    from torch.sparse import to_sparse_semi_structured

    names = check_2to4_linears(model, exclude)
    linears = decoder_linears(model, exclude)
    for name in names:
        W = linears[name].weight
        if W.device.type != "cuda" or W.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: weight must be float16/bfloat16 on a CUDA device, got {W.dtype} on {W.device}")
    for name in names:
        lin = linears[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
    return names


def _causal_mask(model: nn.Module, length: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """None for SDPA attention (its causal flag is faster); an additive (1, 1, T, T) mask for eager attention."""
    if getattr(model.config, "_attn_implementation", "eager") == "sdpa":
        return None
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)  # (T, T)
    return mask[None, None]  # (1, 1, T, T)


@torch.no_grad()
def prefill_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits after a prompt, written out for a LLaMA-style `...ForCausalLM` (B, vocab).

    The same computation as `model(input_ids).logits[:, -1]`, without a KV
    cache, attention-mask helpers or host-side checks, so that one call can
    be captured in a CUDA graph: embeddings, rotary positions, the decoder
    layers with a causal mask, the final norm, and the head on the last
    position only (what a server computes for a prompt).
    """
    check_model(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, tokens) tensor, got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
    inner = model.model
    h = inner.embed_tokens(input_ids)  # (B, T, hidden)
    length = input_ids.shape[1]
    position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)  # (1, T)
    position_embeddings = inner.rotary_emb(h, position_ids)  # (cos, sin), each (1, T, head_dim)
    mask = _causal_mask(model, length, h.dtype, h.device)
    for layer in inner.layers:
        out = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
        h = out[0] if isinstance(out, tuple) else out  # transformers 4.x returned a tuple
    h = inner.norm(h[:, -1:])  # (B, 1, hidden)
    return model.lm_head(h)[:, 0]  # (B, vocab)


# ------------------------------------------------------------ CUDA CSR


# ------------------------------------------------------------ recorded results


# ------------------------------------------------------------ command line


