"""N:M semi-structured sparsity (2:4 by default) and the GPU paths that use it.

N:M keeps the N largest-magnitude weights in every group of M consecutive
weights along the input dimension (a row of an `nn.Linear` weight). 2:4 is
50% sparsity with a fixed pattern, which is what NVIDIA's sparse tensor cores
(cuSPARSELt, CUTLASS; GPUs of compute capability 8.0 or newer) accelerate:
the chapter's tip "ensure inference frameworks support desired sparsity".

    >>> nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5]])).tolist()
    [[0.0, 1.0, 1.0, 0.0]]

Covers: masks with loops (`nm_mask_loop`) and vectorised (`nm_mask`),
checking a pattern (`is_nm`), masks for a whole model (`nm_masks`, used with
`chapter11.masks.apply_masks`), and on a CUDA GPU: 2:4 semi-structured
matmul against dense fp16 (`semi_structured_benchmark`) and torch's CUDA CSR
matmul against dense (`cuda_csr_benchmark`). `gpu_skip_reason()` says in one
line why the GPU parts cannot run here.

But: the groups run along the last dimension only (no channel permutation to
pick better groups), and a CPU gains no speed from N:M at all: only the
accuracy cost can be measured without a GPU.
"""

from __future__ import annotations

import statistics
import warnings
from typing import Iterable, Sequence

import torch
from torch import nn

from chapter11.masks import prunable_parameters

__all__ = ["nm_mask_loop", "nm_mask", "is_nm", "nm_masks", "gpu_skip_reason", "semi_structured_benchmark", "cuda_csr_benchmark"]


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
    masks = {}
    for name, p in prunable_parameters(model, exclude=exclude).items():
        W = p.detach().reshape(p.shape[0], -1)  # (out, in * kernel)
        if W.shape[1] % m:
            raise ValueError(f"{name} has {W.shape[1]} inputs per output, not a multiple of m={m}; pass exclude=[{name.rsplit('.', 1)[0]!r}]")
        masks[name] = nm_mask(W, n, m).reshape(p.shape)
    return masks


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


def _cuda_median(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def semi_structured_benchmark(sizes: Sequence[int] = (2048, 4096, 8192), batch: int = 4096, repeats: int = 20, backend: str | None = None) -> list[dict]:
    """Time 2:4 `to_sparse_semi_structured` (fp16) against dense fp16 on the GPU.

    For each size k: W (k, k) 2:4-pruned, X (k, batch); checks the sparse
    product against dense first, then returns rows {"size", "batch",
    "backend", "dense_s", "sparse_s", "speedup", "max_rel_err"}.
    `backend` "cutlass" forces CUTLASS; None lets torch pick (cuSPARSELt when present).
    Raises RuntimeError with `gpu_skip_reason()` when no suitable GPU is here.
    """
    reason = gpu_skip_reason()
    if reason:
        raise RuntimeError(reason)
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if backend not in (None, "cutlass", "cusparselt"):
        raise ValueError(f"backend must be None, 'cutlass' or 'cusparselt', got {backend!r}")
    old = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    rows = []
    try:
        for k in sizes:
            g = torch.Generator(device="cuda").manual_seed(k)
            W = torch.randn(k, k, device="cuda", dtype=torch.float16, generator=g)  # (k, k)
            W = W * nm_mask(W)
            X = torch.randn(k, batch, device="cuda", dtype=torch.float16, generator=g)  # (k, batch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                A = to_sparse_semi_structured(W)
            want = torch.mm(W, X)
            got = torch.mm(A, X)
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
            if not err < 1e-2:
                raise AssertionError(f"2:4 product disagrees with dense at size {k}: relative error {err:.2e}")
            dense_s = _cuda_median(lambda: torch.mm(W, X), repeats)
            sparse_s = _cuda_median(lambda: torch.mm(A, X), repeats)
            rows.append({"size": k, "batch": batch, "backend": type(A).__name__, "dense_s": dense_s, "sparse_s": sparse_s, "speedup": dense_s / sparse_s, "max_rel_err": err})
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = old
    return rows


def cuda_csr_benchmark(size: int = 4096, sparsities: Sequence[float] = (0.5, 0.9, 0.99), batches: Sequence[int] = (1, 32), repeats: int = 20) -> list[dict]:
    """Time torch's CUDA CSR matmul (cuSPARSE) against dense fp32 on the GPU.

    Rows {"sparsity", "batch", "dense_s", "csr_s", "speedup", "max_rel_err"}.
    Raises RuntimeError when CUDA is absent.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(gpu_skip_reason())
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for s in sparsities:
        W = torch.randn(size, size, device="cuda", generator=g)  # (size, size)
        W[torch.rand(size, size, device="cuda", generator=g) < s] = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            A = W.to_sparse_csr()
        for b in batches:
            X = torch.randn(size, b, device="cuda", generator=g)  # (size, b)
            want = W @ X
            err = ((A @ X - want).abs().max() / want.abs().max()).item()
            if not err < 1e-4:
                raise AssertionError(f"CUDA CSR disagrees with dense at sparsity {s}, batch {b}: {err:.2e}")
            dense_s = _cuda_median(lambda: W @ X, repeats)
            csr_s = _cuda_median(lambda: A @ X, repeats)
            rows.append({"sparsity": s, "batch": b, "dense_s": dense_s, "csr_s": csr_s, "speedup": dense_s / csr_s, "max_rel_err": err})
    return rows
