"""One-shot pruning of a pretrained LLM from a little calibration text: magnitude, Wanda, SparseGPT.

Large language models are too costly to retrain after pruning, so these
methods prune once, layer by layer, using only the activations X (tokens,
d_in) that a few hundred calibration tokens produce at each Linear layer
W (d_out, d_in). Every method removes the weights with the smallest score:

- magnitude: |W_ij|, compared across the whole layer (the classical baseline).
- Wanda (Sun et al., 2023): S_ij = |W_ij| * ||X_:,j||_2, compared within each
  output row. An input feature with large activations protects its weights,
  which is what LLMs need: a few hidden dimensions carry values far larger
  than the rest, and magnitude alone prunes their weights blindly.
- SparseGPT (Frantar & Alistarh, 2023): the optimal-brain-surgeon (OBS)
  view. With H = 2 X^T X / N, removing w_ij raises the layer's squared output
  error by w_ij^2 / [H^-1]_jj, and the best repair of the *other* weights of
  row i is delta = -(w_ij / [H^-1]_jj) * H^-1[j, :]. Columns are processed
  left to right; the upper Cholesky factor U of H^-1 gives, in row j, exactly
  the inverse Hessian of the columns not yet processed, so the score is
  w^2 / U_jj^2 and the update of the columns to the right is
  -(w_ij / U_jj) * U[j, j:]. The mask is chosen inside blocks of columns,
  after the updates of the blocks before it.

Patterns: `sparsity=s` prunes that fraction (Wanda per row, magnitude per
layer, SparseGPT per block of columns); `n, m` keeps the n best of every m
consecutive inputs (N:M, e.g. 2:4, what sparse tensor cores run).

    >>> W = torch.tensor([[1.0, -2.0, 0.5, 4.0]])
    >>> X = torch.tensor([[10.0, 0.0, 1.0, 0.1], [0.0, 0.0, 1.0, 0.1]])
    >>> wanda_scores(W, X)
    tensor([[10.0000,  0.0000,  0.7071,  0.5657]])
    >>> wanda_mask(W, X, sparsity=0.5)
    tensor([[1., 0., 1., 0.]])

Covers: `wanda_scores`, `mask_from_scores`, `wanda_mask`, `sparsegpt_prune`
(each with a `_loop` twin), `calibration_sequences` and `prune_llm`, which
prunes every Linear inside the decoder blocks of a LLaMA-like model
(`model.model.layers`: LLaMA, Mistral, Qwen, our `tiny_llama`) block by block,
each block calibrated on the outputs of the already-pruned blocks before it,
and keeps the result as `<param>_mask` buffers (`chapter11.masks`), and
`statistics_bytes` (what each method must hold in memory). Notebook 09's
grids over methods, patterns and calibration sizes live in
`chapter11.experiments.exp09_oneshot`.

But: no quantisation (SparseGPT's joint sparse + quantised variant), no
outlier-aware or per-layer sparsity allocation (OWL), no channel permutation
for N:M, no fine-tuning after pruning (`chapter11.train` with the masks does
that). Embeddings, norms and `lm_head` are never pruned.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .masks import _install_built_masks, _RestorePoint
from .sparsity import all_finite, check_amount, check_model, check_sparsity
from .train import model_device, progress

__all__ = [
    "METHODS", "STAT_DTYPE", "wanda_scores_loop", "wanda_scores", "mask_from_scores_loop", "mask_from_scores",
    "wanda_mask_loop", "wanda_mask", "sparsegpt_prune_loop", "sparsegpt_prune", "statistics_bytes",
    "calibration_sequences", "decoder_layers", "PruneResult", "prune_llm",
]

METHODS = ("magnitude", "wanda", "sparsegpt")
SCOPES = ("row", "layer")
STAT_DTYPE = torch.float32  # what prune_llm accumulates its statistics in


# ------------------------------------------------------------------ checks


def _check_weight(W, name: str = "W") -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"{name} must be 2-D (d_out, d_in), got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"{name} must hold floats, got {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"{name} is empty, got shape {tuple(W.shape)}")
    if not all_finite(W):
        raise ValueError(f"{name} contains NaN or inf; scores cannot be ranked")
    return W.detach()


def _check_inputs(X, d_in: int, name: str = "X") -> torch.Tensor:
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of calibration inputs, got {type(X).__name__}")
    if X.dim() != 2:
        raise ValueError(f"{name} must be 2-D (tokens, d_in), got shape {tuple(X.shape)}")
    if X.shape[1] != d_in:
        raise ValueError(f"{name} must have d_in = {d_in} columns (W's width), got shape {tuple(X.shape)}")
    if X.shape[0] == 0:
        raise ValueError(f"{name} holds no calibration tokens (shape {tuple(X.shape)}); need at least one row")
    if not X.is_floating_point():
        raise TypeError(f"{name} must hold floats, got {X.dtype}")
    if not all_finite(X):
        raise ValueError(f"{name} contains NaN or inf activations; check the calibration data and the model")
    return X.detach()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_pattern(sparsity, n, m, d_in: int) -> tuple[float | None, int | None, int | None]:
    """Exactly one of `sparsity` or `n, m`; returns them checked."""
    if n is None and m is None:
        if sparsity is None:
            raise ValueError("give either sparsity (a fraction in [0, 1)) or n and m (an N:M pattern), got neither")
        return check_sparsity(sparsity), None, None
    if sparsity is not None:
        raise ValueError(f"give either sparsity or n and m, not both; got sparsity={sparsity}, n={n}, m={m}")
    if n is None or m is None:
        raise ValueError(f"n and m go together (keep n of every m inputs), got n={n!r}, m={m!r}")
    for arg, v in (("n", n), ("m", m)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{arg} must be a positive int, got {v!r}")
    if n > m:
        raise ValueError(f"n must be at most m (keep n of every m inputs), got n={n}, m={m}")
    if d_in % m:
        raise ValueError(f"m must divide d_in: m={m} does not divide d_in = {d_in}")
    return None, n, m


# ------------------------------------------------------------------- Wanda


def wanda_scores_loop(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * ||X_:,j||_2, with plain loops (Wanda's score).

    W is (d_out, d_in); X holds calibration inputs (tokens, d_in).

    >>> wanda_scores_loop(torch.tensor([[2.0, -1.0]]), torch.tensor([[3.0, 0.0], [4.0, 1.0]]))
    tensor([[10.,  1.]])
    """
    W = _check_weight(W)
    X = _check_inputs(X, W.shape[1])
    rows, cols = W.tolist(), X.tolist()
    norms = [math.sqrt(sum(x[j] ** 2 for x in cols)) for j in range(W.shape[1])]  # ||X_:,j||
    S = [[abs(w) * norms[j] for j, w in enumerate(row)] for row in rows]
    return torch.tensor(S, dtype=torch.promote_types(W.dtype, X.dtype))


def wanda_scores(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """S = |W| * ||X_:,j||_2 broadcast over rows (vectorised; agrees with `wanda_scores_loop`).

    >>> wanda_scores(torch.tensor([[2.0, -1.0]]), torch.tensor([[3.0, 0.0], [4.0, 1.0]]))
    tensor([[10.,  1.]])
    """
    W = _check_weight(W)
    X = _check_inputs(X, W.shape[1])
    dtype = torch.promote_types(torch.promote_types(W.dtype, X.dtype), torch.float32)
    norms = X.to(dtype).norm(dim=0)  # (d_in,)
    return W.abs().to(dtype) * norms  # (d_out, d_in)


# ------------------------------------------------------- scores -> 0/1 mask


def _check_scores(scores, sparsity, n, m, scope) -> tuple[torch.Tensor, float | None, int | None, int | None]:
    S = _check_weight(scores, "scores")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    sparsity, n, m = _check_pattern(sparsity, n, m, S.shape[1])
    return S, sparsity, n, m


def mask_from_scores_loop(scores: torch.Tensor, sparsity: float | None = None, n: int | None = None, m: int | None = None,
                          scope: str = "row") -> torch.Tensor:
    """0/1 mask that drops the lowest scores, with plain loops.

    - `sparsity`, `scope="row"`: round(sparsity * d_in) lowest of each row (Wanda's comparison group);
    - `sparsity`, `scope="layer"`: round(sparsity * numel) lowest of the whole matrix;
    - `n, m`: the n highest of every m consecutive entries of a row are kept.

    Ties: the earlier position (row-major) is pruned first, and kept first in N:M groups.

    >>> mask_from_scores_loop(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), sparsity=0.5)
    tensor([[1., 0., 1., 0.]])
    >>> mask_from_scores_loop(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), n=1, m=2)
    tensor([[1., 0., 1., 0.]])
    """
    S, sparsity, n, m = _check_scores(scores, sparsity, n, m, scope)
    values = S.tolist()
    d_out, d_in = S.shape
    mask = [[1.0] * d_in for _ in range(d_out)]
    if n is not None:
        for i in range(d_out):
            for start in range(0, d_in, m):
                ranked = sorted(range(start, start + m), key=lambda j: -values[i][j])  # stable: ties keep order
                for j in ranked[n:]:
                    mask[i][j] = 0.0
    elif scope == "row":
        k = check_amount(sparsity, d_in, "sparsity")
        for i in range(d_out):
            for j in sorted(range(d_in), key=lambda j: values[i][j])[:k]:
                mask[i][j] = 0.0
    else:
        k = check_amount(sparsity, d_out * d_in, "sparsity")
        flat = sorted(range(d_out * d_in), key=lambda f: values[f // d_in][f % d_in])
        for f in flat[:k]:
            mask[f // d_in][f % d_in] = 0.0
    return torch.tensor(mask, dtype=S.dtype, device=S.device)


def _prune_lowest(S: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask dropping the k lowest entries of each row of S; ties: earlier positions go first.

    A k-th value search (linear time) instead of a full sort: everything below
    the k-th value goes, and as many entries equal to it as are still needed,
    leftmost first, which is exactly what a stable sort would drop. When no
    row has more entries at its k-th value than it needs (the usual case for
    real-valued scores), the mask is simply S > kth and the tie pass is skipped.
    """
    if k == 0:
        return torch.ones_like(S)
    # the k-th smallest value of each row; topk measured 1.2x faster than kthvalue on our CPUs
    kth = S.topk(k, dim=-1, largest=False, sorted=False).values.amax(dim=-1, keepdim=True)  # (rows, 1)
    kept = S > kth
    if bool((kept.sum(dim=-1) == S.shape[-1] - k).all()):  # exactly k at or below the k-th value in every row
        return kept.to(S.dtype)
    below = S < kth
    ties = S == kth
    need = k - below.sum(dim=-1, keepdim=True)  # (rows, 1)
    pruned = below | (ties & (ties.cumsum(dim=-1) <= need))
    return (~pruned).to(S.dtype)


def _select(S: torch.Tensor, sparsity, n, m, scope: str) -> torch.Tensor:
    """`mask_from_scores` without the argument checks (used inside loops)."""
    d_out, d_in = S.shape
    if n is not None:
        groups = S.reshape(d_out, d_in // m, m)  # (d_out, groups, m)
        order = torch.argsort(groups, dim=-1, descending=True, stable=True)  # best first, ties keep order
        mask = torch.zeros_like(groups)
        mask.scatter_(-1, order[..., :n], 1.0)
        return mask.reshape(d_out, d_in)
    if scope == "row":
        return _prune_lowest(S, check_amount(sparsity, d_in, "sparsity"))  # (d_out, d_in)
    flat = S.reshape(1, d_out * d_in)  # (1, numel), row-major
    return _prune_lowest(flat, check_amount(sparsity, d_out * d_in, "sparsity")).reshape(d_out, d_in)


def mask_from_scores(scores: torch.Tensor, sparsity: float | None = None, n: int | None = None, m: int | None = None,
                     scope: str = "row") -> torch.Tensor:
    """Vectorised `mask_from_scores_loop` (same masks, ties included).

    >>> mask_from_scores(torch.tensor([[4.0, 1.0], [0.5, 3.0]]), sparsity=0.5, scope="layer")
    tensor([[1., 0.],
            [0., 1.]])
    """
    S, sparsity, n, m = _check_scores(scores, sparsity, n, m, scope)
    return _select(S, sparsity, n, m, scope)


def wanda_mask_loop(W: torch.Tensor, X: torch.Tensor, sparsity: float | None = None, n: int | None = None,
                    m: int | None = None) -> torch.Tensor:
    """Wanda's mask with plain loops: drop the lowest |W_ij| ||X_:,j|| of each row (or of each N:M group).

    >>> wanda_mask_loop(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), torch.tensor([[1.0, 3.0, 2.0, 4.0]]), n=2, m=4)
    tensor([[0., 1., 0., 1.]])
    """
    return mask_from_scores_loop(wanda_scores_loop(W, X), sparsity, n, m, scope="row")


def wanda_mask(W: torch.Tensor, X: torch.Tensor, sparsity: float | None = None, n: int | None = None,
               m: int | None = None) -> torch.Tensor:
    """Wanda's 0/1 mask (vectorised): per output row with `sparsity`, per group of m inputs with `n, m`.

    >>> wanda_mask(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), torch.tensor([[1.0, 3.0, 2.0, 4.0]]), n=2, m=4)
    tensor([[0., 1., 0., 1.]])
    """
    return mask_from_scores(wanda_scores(W, X), sparsity, n, m, scope="row")


# --------------------------------------------------------------- SparseGPT


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _hessian(X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    X = X.to(dtype)
    return 2.0 * X.T @ X / X.shape[0]  # (d_in, d_in)


def _check_obs_args(block_size, damp, m) -> None:
    if not _is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if m is not None and block_size % m:
        raise ValueError(f"block_size must be a multiple of m so that N:M groups stay inside a block, got block_size={block_size}, m={m}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0 (a fraction of mean(diag H)), got {damp!r}")


def _inverse_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor U of (H + damp * mean(diag H) I)^-1, dead inputs), in H's dtype.

    An input whose diagonal entry is 0 never fired on the calibration data:
    it gets a 1 on the diagonal (so H can be inverted) and its weights are
    zeroed by the caller, since nothing says they matter.
    """
    if not torch.isfinite(H).all():
        raise ValueError("X: the Hessian 2 X^T X / N holds NaN or inf; check the calibration activations")
    H = H.clone()  # (d_in, d_in)
    dead = torch.diagonal(H) == 0  # (d_in,)
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ValueError(f"damp: H + damp * mean(diag H) I is not positive definite with damp={damp}; use a larger damp")
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # (d_in, d_in), H^-1 = U^T U
    return U, dead


def _check_dead(dead: torch.Tensor, sparsity, n, m, where: str) -> None:
    """Refuse when more inputs never fired than the pattern may prune: SparseGPT would zero them all, past the target."""
    count = int(dead.sum())
    if not count:
        return
    if n is not None:
        too_many = bool((dead.reshape(-1, m).sum(1) > m - n).any())  # a group with more dead inputs than it may drop
    else:
        too_many = count > round(sparsity * dead.numel())
    if too_many:
        raise ValueError(f"calibration: {count} of the {dead.numel()} inputs of {where} were exactly 0 on every calibration token, "
                         f"more than the {'%d:%d pattern' % (n, m) if n is not None else f'{sparsity:.0%} target'} prunes; "
                         "SparseGPT would zero them all and overshoot the target. The calibration data does not reach this layer "
                         "(look for activations that overflowed or vanished before it), or prune it with magnitude or Wanda")


def _sparsegpt_args(W, X, sparsity, n, m, block_size, damp):
    W = _check_weight(W)
    X = _check_inputs(X, W.shape[1])
    sparsity, n, m = _check_pattern(sparsity, n, m, W.shape[1])
    _check_obs_args(block_size, damp, m)
    return W, X, sparsity, n, m


def sparsegpt_prune_loop(W: torch.Tensor, X: torch.Tensor, sparsity: float | None = None, n: int | None = None,
                         m: int | None = None, block_size: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT, the plain per-column algorithm: every OBS update applied at once, weight by weight.

    H = 2 X^T X / N + damp * mean(diag H) I, U = upper Cholesky factor of H^-1.
    For j = 0, 1, ..., d_in - 1: at the start of each block of `block_size`
    columns (or of each N:M group) choose the mask there by w^2 / U_jj^2; then for
    every row i whose w_ij is pruned, update the rest of that row:
    W[i, j:] -= (w_ij / U_jj) * U[j, j:] (which sets w_ij to 0 and repairs
    the columns to its right). Returns (W_new in W's dtype, 0/1 mask).

    >>> W_new, mask = sparsegpt_prune_loop(torch.tensor([[1.0, 0.5]]), torch.tensor([[1.0, 1.0], [1.0, 0.9]]), sparsity=0.5)
    >>> mask.tolist(), round(W_new[0, 0].item(), 2)
    ([[0.0, 1.0]], 0.0)
    >>> round(W_new[0, 1].item(), 2)  # takes over the pruned weight's work (least squares: 2.805 / 1.81 = 1.55 undamped)
    1.54
    """
    W0, X, sparsity, n, m = _sparsegpt_args(W, X, sparsity, n, m, block_size, damp)
    dtype = _compute_dtype(W0, X)
    U, dead = _inverse_factor(_hessian(X, dtype), damp)
    W = W0.to(dtype).clone()  # (d_out, d_in)
    W[:, dead] = 0.0
    d_out, d_in = W.shape
    mask = torch.ones_like(W)
    for j in range(d_in):
        if n is None and j % block_size == 0:
            end = min(j + block_size, d_in)
            scores = W[:, j:end] ** 2 / torch.diagonal(U)[j:end] ** 2  # (d_out, block)
            mask[:, j:end] = mask_from_scores_loop(scores, sparsity, scope="layer")
        if n is not None and j % m == 0:
            scores = W[:, j:j + m] ** 2 / torch.diagonal(U)[j:j + m] ** 2  # (d_out, m)
            mask[:, j:j + m] = mask_from_scores_loop(scores, n=n, m=m)
        for i in range(d_out):
            if mask[i, j] == 0:
                W[i, j:] -= (W[i, j] / U[j, j]) * U[j, j:]
                W[i, j] = 0.0
    return W.to(W0.dtype), mask.to(W0.dtype)


def _sparsegpt_blocked(W: torch.Tensor, U: torch.Tensor, sparsity, n, m, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same algorithm with lazy block updates; W (d_out, d_in) and U (d_in, d_in) in one float dtype.

    Works on W transposed, so that the column being pruned is a contiguous
    row and each OBS update inside a block is a single rank-1 `addr_`.
    """
    d_out, d_in = W.shape
    Wt = W.T.contiguous()  # (d_in, d_out): row j holds column j of W
    maskt = torch.ones_like(Wt)  # (d_in, d_out)
    d = torch.diagonal(U)  # (d_in,)
    for i1 in range(0, d_in, block_size):
        i2 = min(i1 + block_size, d_in)
        W1, M1 = Wt[i1:i2], maskt[i1:i2]  # (B, d_out) views
        U1 = U[i1:i2, i1:i2]  # (B, B)
        E1 = torch.zeros_like(W1)  # (B, d_out): w / U_jj for pruned weights, 0 for kept ones
        S1 = torch.zeros_like(W1)  # (B, d_out): 1 / U_jj where pruned, 0 where kept
        if n is None:
            M1.copy_(_select((W1 ** 2 / d[i1:i2, None] ** 2).T, sparsity, None, None, "layer").T)
            S1.copy_((1.0 - M1) / d[i1:i2, None])
        for i in range(i2 - i1):
            if n is not None and i % m == 0:
                group = slice(i, i + m)
                M1[group] = _select((W1[group] ** 2 / d[i1 + i:i1 + i + m, None] ** 2).T, None, n, m, "row").T
                S1[group] = (1.0 - M1[group]) / d[i1 + i:i1 + i + m, None]
            torch.mul(W1[i], S1[i], out=E1[i])  # (d_out,)
            W1[i:].addr_(U1[i, i:], E1[i], alpha=-1.0)  # OBS update of this block's columns i, i+1, ...
        W1.mul_(M1)  # exact zeros where pruned
        Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1.0)  # the lazy update of every column right of the block
    return Wt.T, maskt.T


def sparsegpt_prune(W: torch.Tensor, X: torch.Tensor, sparsity: float | None = None, n: int | None = None,
                    m: int | None = None, block_size: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT with lazy block updates (agrees with `sparsegpt_prune_loop` to rounding).

    Inside a block of `block_size` columns the OBS updates run column by
    column on the block only; the columns to the right get them all at once
    as one matrix product when the block is done, which is what makes it fast.
    Computes in float32, or float64 when W or X is; returns (W_new in W's dtype, 0/1 mask).

    >>> W_new, mask = sparsegpt_prune(torch.tensor([[1.0, 0.5]]), torch.tensor([[1.0, 1.0], [1.0, 0.9]]), sparsity=0.5)
    >>> mask.tolist(), [round(w, 2) for w in W_new[0].tolist()]
    ([[0.0, 1.0]], [0.0, 1.54])
    """
    W0, X, sparsity, n, m = _sparsegpt_args(W, X, sparsity, n, m, block_size, damp)
    dtype = _compute_dtype(W0, X)
    U, dead = _inverse_factor(_hessian(X, dtype), damp)
    W = W0.to(dtype).clone()  # (d_out, d_in)
    W[:, dead] = 0.0
    W, mask = _sparsegpt_blocked(W, U, sparsity, n, m, block_size)
    return W.to(W0.dtype), mask.to(W0.dtype)


# ------------------------------------------------------------ LLM pipeline


def statistics_bytes(d_in: int, method: str, dtype: torch.dtype = STAT_DTYPE) -> int:
    """Bytes of calibration statistics one Linear layer with `d_in` inputs needs.

    magnitude: none; Wanda: one squared norm per input (a d_in vector);
    SparseGPT: the d_in x d_in Hessian.

    >>> [statistics_bytes(576, method) for method in METHODS]
    [0, 2304, 1327104]
    """
    if not _is_int(d_in) or d_in < 1:
        raise ValueError(f"d_in must be a positive int, got {d_in!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    size = torch.empty((), dtype=dtype).element_size()
    return {"magnitude": 0, "wanda": d_in * size, "sparsegpt": d_in * d_in * size}[method]


def calibration_sequences(tokens: torch.Tensor, num_sequences: int, seq_len: int = 128, seed: int = 0) -> torch.Tensor:
    """(num_sequences, seq_len) windows of `tokens` at random offsets (seeded), as the papers sample calibration data.

    >>> calibration_sequences(torch.arange(10), 2, seq_len=3, seed=0).shape
    torch.Size([2, 3])
    """
    for arg, v in (("num_sequences", num_sequences), ("seq_len", seq_len)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{arg} must be a positive int, got {v!r}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor of token ids, got {type(tokens).__name__} {tuple(getattr(tokens, 'shape', ()))}")
    if len(tokens) < seq_len:
        raise ValueError(f"tokens: need at least seq_len = {seq_len} tokens, got {len(tokens)}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len + 1, (num_sequences,), generator=g)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])  # (num_sequences, seq_len)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a LLaMA-like causal LM (`model.model.layers`), or a ValueError."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError(f"model: {type(model).__name__} has no decoder blocks (expected model.model.layers, as in LLaMA, Mistral or Qwen)")


@dataclass
class PruneResult:
    """What `prune_llm` did: per-layer sparsity (parameter name -> fraction of zeros), the time taken, ...

    `statistics_bytes`: bytes of calibration statistics each layer needed;
    `output_error`: relative output error ||X (W - W')^T||^2 / ||X W^T||^2 of each layer on
    its calibration inputs (only with `measure_error=True`);
    `seconds_by_part`: where `seconds` went: "capture" (the model up to the
    first block), "statistics_pass" (each block run with its hooks),
    "pruning" (scores, masks, SparseGPT's updates), "output_pass" (each pruned
    block run again to feed the next) and "other" (checks, copies kept for
    all-or-nothing, bookkeeping). The two passes are the algorithm's floor.
    """

    method: str
    pattern: str
    sparsity: float
    layers: dict[str, float]
    seconds: float
    statistics_bytes: dict[str, int] = field(default_factory=dict)
    output_error: dict[str, float] = field(default_factory=dict)
    seconds_by_part: dict[str, float] = field(default_factory=dict)


class _Stop(Exception):
    pass


def _capture_inputs(model: nn.Module, first: nn.Module, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword arguments) that the first decoder block receives, per batch."""
    captured = []

    shared: list[torch.Tensor] = []  # tensors equal across batches (the causal mask) are kept once

    def dedupe(value):
        if not isinstance(value, torch.Tensor):
            return value
        for seen in shared:
            if seen.shape == value.shape and seen.dtype == value.dtype and seen.device == value.device and torch.equal(seen, value):
                return seen
        shared.append(value)
        return value

    def hook(module, args, kwargs):
        kwargs = {k: dedupe(v) for k, v in kwargs.items()}
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for x in batches:
            try:
                model(input_ids=x, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise ValueError("model: its forward pass did not reach the first decoder block")
    return captured


def _run_block(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
    outputs = []
    for hidden, kwargs in inputs:
        out = layer(hidden, **kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out).detach())  # (B, T, hidden)
    return outputs


def _check_finite(tensors: list[torch.Tensor], where: str) -> None:
    if not all(all_finite(t) for t in tensors):
        raise ValueError(f"calibration: the activations {where} contain NaN or inf; the model or its weights are broken")


class _Statistics:
    """Forward pre-hooks on a block's Linear layers that accumulate what the method needs.

    Wanda: the sum of squares of each input column; SparseGPT (or `gram=True`): X^T X.
    Layers fed by the same tensor (q, k, v; gate, up) share one statistic: the
    first of them to see a tensor owns it, the others read the owner's.
    With `stop_when_done`, the last Linear to see its input raises `_Stop`
    after recording it: the rest of the block (in LLaMA, `down_proj`'s product)
    is not needed. `calls` counts each layer's calls in this batch, so a
    caller can first check that every layer runs exactly once per pass.
    """

    def __init__(self, linears: dict[str, nn.Linear], squares: bool, gram: bool):
        self.want_squares, self.want_gram = squares, gram
        self.squares: dict[str, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.owner: dict[str, str] = {}
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}  # this batch: id(input) -> (input, owner)
        self.calls: dict[str, int] = {}  # this batch: calls per layer
        self.stop_when_done = False
        self._handles = [lin.register_forward_pre_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name):
        def hook(module, args):
            self.calls[name] = self.calls.get(name, 0) + 1
            self._record(name, args[0])
            if self.stop_when_done and len(self.calls) == len(self._handles):
                raise _Stop  # every layer has seen its input: the rest of the block is not needed

        return hook

    def _record(self, name: str, x: torch.Tensor) -> None:
        seen = self._seen.get(id(x))
        if seen is not None and seen[0] is x:
            self.owner.setdefault(name, seen[1])
            return
        self.owner.setdefault(name, name)
        self._seen[id(x)] = (x, name)
        X = x.detach().reshape(-1, x.shape[-1]).to(STAT_DTYPE)  # (tokens, d_in)
        if self.want_squares:
            self.squares[name] = self.squares.get(name, 0) + (X * X).sum(0)  # (d_in,)
        if self.want_gram:
            self.gram[name] = self.gram.get(name, 0) + X.T @ X  # (d_in, d_in)
        self.tokens[name] = self.tokens.get(name, 0) + X.shape[0]

    def end_batch(self):
        self._seen.clear()
        self.calls.clear()

    def of(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """(sum of squares, X^T X, tokens) seen by layer `name`."""
        owner = self.owner[name]
        return self.squares.get(owner), self.gram.get(owner), self.tokens[owner]

    def remove(self):
        for h in self._handles:
            h.remove()
        self._seen.clear()


def _check_calibration(calibration, method: str, vocab: int | None) -> torch.Tensor | None:
    if calibration is None:
        if method == "magnitude":
            return None
        raise ValueError(f"calibration: {method} needs calibration token ids (num_sequences, seq_len), got None")
    if not isinstance(calibration, torch.Tensor):
        raise TypeError(f"calibration must be a LongTensor of token ids (num_sequences, seq_len), got {type(calibration).__name__}")
    if calibration.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"calibration must hold integer token ids, got {calibration.dtype}")
    if calibration.dim() != 2 or calibration.numel() == 0:
        raise ValueError(f"calibration must be a non-empty (num_sequences, seq_len) tensor, got shape {tuple(calibration.shape)}")
    if vocab is not None and (int(calibration.min()) < 0 or int(calibration.max()) >= vocab):
        raise ValueError(f"calibration: token ids must lie in [0, {vocab}), got [{int(calibration.min())}, {int(calibration.max())}]")
    return calibration.long()


def _pattern_name(sparsity, n, m) -> str:
    return f"{n}:{m}" if n is not None else f"{sparsity:.0%}"


@torch.no_grad()
def prune_llm(
    model: nn.Module,
    calibration: torch.Tensor | None,
    method: str = "wanda",
    sparsity: float | None = 0.5,
    n: int | None = None,
    m: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    batch_size: int = 8,
    blocks: Sequence[int] | None = None,
    measure_error: bool = False,
    progress_bar: bool | None = None,
    magnitude_scope: str = "layer",
) -> PruneResult:
    """Prune every Linear inside the decoder blocks of `model` in place; returns a `PruneResult`.

    `calibration`: token ids (num_sequences, seq_len); magnitude may take None.
    Block l is calibrated on the outputs of blocks 0..l-1 *after* they were
    pruned, so each block learns to work with what its pruned predecessors
    produce. For each block: run it on the calibration activations with hooks
    on its Linear layers (Wanda: squared column norms; SparseGPT: X^T X), prune,
    then run it again with the pruned weights to feed the next block. The
    first run stops as soon as every Linear has seen its input (in LLaMA,
    before `down_proj`'s product), once the very first run has shown that each
    Linear runs exactly once per pass (the decoder blocks of one model are
    taken to be alike).
    Embeddings, norms and `lm_head` stay dense. Masks are kept as
    `<param>_mask` buffers (as `chapter11.masks.apply_masks` keeps them), so they survive
    save/load and `MaskedOptimizer`. Runs on the model's device.

    Give `n, m` for an N:M pattern (then `sparsity` must be None or 1 - n/m).
    `blocks` restricts pruning to those block indices (the others stay dense).
    `measure_error=True` also records each layer's relative output error on
    its calibration inputs (one X^T X per layer, so it costs more for Wanda).
    `magnitude_scope="row"` makes magnitude compare |W| within each output row,
    Wanda's group: the control that separates Wanda's score from its grouping.

    All or nothing: the pattern, NaN or infinite weights and torch's pruning
    reparametrisation are checked in every chosen block before any is
    touched, and if a block fails midway (non-finite activations, an
    interrupt), every block pruned so far gets its weights and masks back
    (`chapter11.masks.restore_on_error`; it holds one copy of the blocks
    changed so far).
    """
    check_model(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if magnitude_scope not in ("layer", "row"):
        raise ValueError(f"magnitude_scope must be 'layer' or 'row', got {magnitude_scope!r}")
    if n is not None or m is not None:
        if sparsity is not None and not (_is_int(n) and _is_int(m) and m > 0 and abs(sparsity - (1 - n / m)) < 1e-12):
            raise ValueError(f"give either sparsity or n and m: sparsity={sparsity} does not match {n}:{m}; pass sparsity=None")
        sparsity = None
    layers = decoder_layers(model)
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    chosen = list(range(len(layers))) if blocks is None else list(blocks)
    if not chosen or any(not _is_int(b) or not 0 <= b < len(layers) for b in chosen):
        raise ValueError(f"blocks must be a non-empty list of indices in [0, {len(layers)}), got {blocks!r}")
    linears = [{name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)} for layer in layers]
    for l in chosen:  # check everything that can be checked before touching any layer
        if not linears[l]:
            raise ValueError(f"model: decoder block {l} holds no nn.Linear layers to prune")
        for name, lin in linears[l].items():
            if hasattr(lin, "weight_orig"):
                raise TypeError(f"model: layer {name} of block {l} carries torch.nn.utils.prune's reparametrisation "
                                "(weight_orig); convert the model with chapter11.masks.from_torch_prune first")
            if not all_finite(lin.weight):
                raise ValueError(f"model: layer {name} of block {l} holds NaN or infinite weights; refusing to prune a broken model")
            try:
                _check_pattern(sparsity, n, m, lin.in_features)
            except ValueError as err:
                raise ValueError(f"{err} (layer {name} of block {l})") from None
    if method == "sparsegpt":  # block_size and damp mean nothing to magnitude and Wanda
        _check_obs_args(block_size, damp, m)
    premasked = [name for l in chosen for name, lin in linears[l].items() if hasattr(lin, "weight_mask")]
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    calibration = _check_calibration(calibration, method, vocab)
    use_data = calibration is not None and (method != "magnitude" or measure_error)

    start = time.perf_counter()
    device = model_device(model)
    was_training = model.training
    model.eval()
    result = PruneResult(method, _pattern_name(sparsity, n, m), 0.0, {}, 0.0)
    parts = dict.fromkeys(("capture", "statistics_pass", "pruning", "output_pass"), 0.0)
    inputs = None
    if use_data:
        tick = time.perf_counter()
        batches = [x.to(device) for x in calibration.split(batch_size)]
        inputs = _capture_inputs(model, layers[0], batches)
        parts["capture"] += time.perf_counter() - tick
        _check_finite([h for h, _ in inputs], "entering decoder block 0")
    last = max(chosen)
    points = []  # the blocks changed so far, as they were: all or nothing
    zeros: dict[str, int] = {}  # zero weights per pruned layer
    stop_early = None  # decided by the first statistics pass: True when each Linear of a block runs once per pass
    try:
        for l in progress(range(last + 1), desc=f"prune_llm {method}", enabled=progress_bar):
            layer = layers[l]
            if l not in chosen:
                if use_data and l < last:
                    tick = time.perf_counter()
                    inputs = [(h, kw) for h, (_, kw) in zip(_run_block(layer, inputs), inputs)]
                    parts["output_pass"] += time.perf_counter() - tick
                continue
            stats = None
            if use_data:
                tick = time.perf_counter()
                stats = _Statistics(linears[l], squares=method == "wanda" and not measure_error,
                                    gram=method == "sparsegpt" or measure_error)
                try:
                    for hidden, kwargs in inputs:
                        stats.stop_when_done = bool(stop_early)
                        try:
                            layer(hidden, **kwargs)
                        except _Stop:
                            pass
                        if stop_early is None:  # the first full pass: may later passes stop once every layer has its input?
                            stop_early = set(stats.calls) == set(linears[l]) and all(c == 1 for c in stats.calls.values())
                        stats.end_batch()
                finally:
                    stats.remove()
                parts["statistics_pass"] += time.perf_counter() - tick
            points.append(_RestorePoint(linears[l].values()))
            masks, before, factors = {}, {}, {}
            prefix = _prefix(model, layer)
            tick = time.perf_counter()
            for name, lin in linears[l].items():
                W = lin.weight.detach()  # (d_out, d_in)
                if measure_error:
                    before[name] = W.clone()
                sq, G, tokens = stats.of(name) if stats is not None else (None, None, 0)
                if method == "magnitude":
                    mask = _select(W.abs().to(STAT_DTYPE), sparsity, n, m, magnitude_scope)
                elif method == "wanda":
                    sq = sq if sq is not None else torch.diagonal(G)  # (d_in,) squared column norms
                    mask = _select(W.abs().to(STAT_DTYPE) * sq.sqrt(), sparsity, n, m, "row")
                else:
                    owner = stats.owner[name]
                    if owner not in factors:  # q, k, v (and gate, up) share one H and one factor
                        factors[owner] = _inverse_factor(2.0 * G / tokens, damp)
                    U, dead = factors[owner]
                    _check_dead(dead, sparsity, n, m, f"layer {name} of block {l}")
                    W_new = W.to(U.dtype).clone()  # (d_out, d_in)
                    W_new[:, dead] = 0.0
                    W_new, mask = _sparsegpt_blocked(W_new, U, sparsity, n, m, block_size)
                    if not all_finite(W_new):
                        raise ValueError(f"model: SparseGPT's update of layer {name} of block {l} produced NaN or inf "
                                         "weights; try a larger damp")
                    lin.weight.copy_(W_new.to(W.dtype))
                masks[f"{name}.weight"] = mask.to(W.dtype)
                result.statistics_bytes[f"{prefix}{name}.weight"] = statistics_bytes(lin.in_features, method)
            _install_built_masks(layer, masks)  # 0/1 masks of the right shapes, weights checked finite above
            parts["pruning"] += time.perf_counter() - tick
            for name, lin in linears[l].items():
                full = f"{prefix}{name}.weight"
                zeros[full] = int((lin.weight == 0).sum())
                result.layers[full] = zeros[full] / lin.weight.numel()
                if measure_error and stats is not None:
                    result.output_error[full] = _relative_error(before[name], lin.weight.detach(), stats.of(name)[1])
            if use_data and l < last:
                tick = time.perf_counter()
                outputs = _run_block(layer, inputs)
                parts["output_pass"] += time.perf_counter() - tick
                _check_finite(outputs, f"leaving decoder block {l}")
                inputs = [(h, kw) for h, (_, kw) in zip(outputs, inputs)]
    except BaseException:
        for point in reversed(points):  # a block that fails midway leaves the model as it was
            point.restore()
        raise
    finally:
        model.train(was_training)
    total = sum(lin.weight.numel() for l in chosen for lin in linears[l].values())
    result.sparsity = sum(zeros.values()) / total
    result.seconds = time.perf_counter() - start
    result.seconds_by_part = parts | {"other": max(0.0, result.seconds - sum(parts.values()))}
    asked = sparsity if sparsity is not None else 1 - n / m
    if premasked and result.sparsity > asked + 0.005:
        warnings.warn(f"{len(premasked)} of the pruned layers already held masks: prune_llm multiplies its masks into them "
                      f"(a mask never un-prunes), so the blocks are {result.sparsity:.1%} sparse, not the {asked:.1%} asked",
                      stacklevel=2)
    return result


def _prefix(model: nn.Module, layer: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is layer:
            return f"{name}." if name else ""
    return ""


def _relative_error(W: torch.Tensor, W_new: torch.Tensor, G: torch.Tensor) -> float:
    """||X (W - W')^T||^2 / ||X W^T||^2 from the Gram matrix G = X^T X."""
    W = W.to(G.dtype)
    D = W - W_new.to(G.dtype)  # (d_out, d_in)
    return float(((D @ G) * D).sum() / ((W @ G) * W).sum())
