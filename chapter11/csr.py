"""Compressed sparse row (CSR) storage for pruned weights, and kernels that use it.

The chapter's workflow ends with "Export: store sparse format (CSR)". A CSR
matrix keeps only the non-zeros of each row:

    data[k]     the k-th non-zero value, row by row            (nnz,)
    indices[k]  its column                                     (nnz,)
    indptr[i]   where row i starts in data; row i is data[indptr[i]:indptr[i+1]]   (rows + 1,)

Covers: building CSR with loops (`to_csr_loop`) and vectorised (`to_csr`),
going back (`to_dense_loop`, `to_dense`), the smallest index type that fits
(`index_dtype_for`: int16 up to 32,768 columns, else int32), storage in bytes
for dense / CSR / COO / bitmask / N:M (`storage_bytes`, `csr_nbytes`,
`traffic_limit`), reference kernels (`csr_matvec_loop`, `csr_matmul_loop`),
fast CPU kernels compiled by numba (`csr_matvec`, `csr_matmul`), a module
that runs a pruned `nn.Linear` through them (`SparseLinear`, `sparsify`).
The benchmark that times them against dense, scipy and `torch.sparse_csr`
is `chapter11.experiments.exp08_kernels` (`python -m chapter11 bench sparse`).

Why a sparse kernel can only win by so much: a matrix-vector product reads
every stored byte of the weight once and does one multiply-add per value, so
on a CPU it is limited by memory traffic. Dense float32 reads 4 bytes per
weight; CSR with int32 indices reads 8 bytes per *kept* weight. At sparsity s
the best possible speedup is 4 / (8 (1 - s)) = 5x at 90% (`traffic_limit`);
int16 indices (6 bytes per kept weight) raise it to 6.7x. A CSR weight small
enough to stay in the CPU's last-level cache between calls, while the dense
one is not, can beat that limit in a benchmark that repeats one product.

    >>> W = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    >>> A = to_csr(W)
    >>> A.data.tolist(), A.indices.tolist(), A.indptr.tolist()
    ([2.0, 1.0, 3.0], [1, 0, 2], [0, 1, 1, 3])
    >>> csr_matvec(A, torch.tensor([1.0, 1.0, 1.0])).tolist()
    [2.0, 0.0, 4.0]

But: no autograd through the kernels (inference only), no CSC/blocked
formats, float16 values are multiplied in float32 by the fast kernel, and
the kernels are tuned for 2-8 CPU threads, not for GPUs (see
`chapter11.nm` for the GPU paths).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import nn

from chapter11.bench import compare
from chapter11.masks import check_mask, refuse_torch_prune
from chapter11.sparsity import check_sparsity

__all__ = [
    "CSR", "index_dtype_for", "to_csr_loop", "to_csr", "to_dense_loop", "to_dense", "csr_nbytes", "storage_bytes",
    "traffic_limit", "csr_matvec_loop", "csr_matvec", "csr_matmul_loop", "csr_matmul",     "NUMBA_MIN_BATCH", "PARALLEL_MIN_WORK", "FIXED_WIDTH", "SparseLinear", "sparsify",
    "SPARSITIES", "IMPLS",
]

_VALUE_DTYPES = (np.float16, np.float32, np.float64)
_INDEX_NAMES = {"int16": np.int16, "int32": np.int32, "int64": np.int64}
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.99)
IMPLS = ("dense", "chapter11", "scipy", "torch_sparse")


# ---------------------------------------------------------------- the format


@dataclass(frozen=True, eq=False)
class CSR:
    """A matrix in compressed sparse row form (numpy arrays, read-only use).

    >>> A = to_csr(torch.tensor([[0.0, 5.0], [0.0, 0.0]]))
    >>> A
    CSR(shape=(2, 2), nnz=1, sparsity=0.750, values=float32, indices=int16, 18 bytes)
    """

    data: np.ndarray  # (nnz,) values
    indices: np.ndarray  # (nnz,) column of each value
    indptr: np.ndarray  # (rows + 1,) row i is data[indptr[i]:indptr[i + 1]]
    shape: tuple[int, int]

    def __post_init__(self):
        """Check the three arrays against each other and the shape: the kernels read them without bounds checks.

        >>> CSR(np.ones(2, np.float32), np.array([0, 9]), np.array([0, 1, 2]), (2, 4))
        Traceback (most recent call last):
        ...
        ValueError: indices: column 9 is outside the 4 columns of shape (2, 4)
        """
        shape = self.shape
        if (not isinstance(shape, (tuple, list)) or len(shape) != 2
                or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise ValueError(f"shape must be two non-negative ints (rows, cols), got {shape!r}")
        rows, cols = (int(n) for n in shape)
        arrays = {}
        for name in ("data", "indices", "indptr"):
            value = np.asarray(getattr(self, name))
            if value.ndim != 1:
                raise ValueError(f"{name} must be 1-D, got shape {value.shape}")
            arrays[name] = value
        data, indices, indptr = arrays["data"], arrays["indices"], arrays["indptr"]
        if data.dtype.type not in _VALUE_DTYPES:
            raise TypeError(f"data must hold float16, float32 or float64 values, got {data.dtype}")
        for name, value in (("indices", indices), ("indptr", indptr)):
            if value.size and not np.issubdtype(value.dtype, np.integer):
                raise TypeError(f"{name} must hold integers, got {value.dtype}")
        if indptr.shape[0] != rows + 1:
            raise ValueError(f"indptr must have rows + 1 = {rows + 1} entries for shape {(rows, cols)}, got {indptr.shape[0]}")
        if indices.shape[0] != data.shape[0]:
            raise ValueError(f"indices and data must have the same length (one column per value), got {indices.shape[0]} and {data.shape[0]}")
        if int(indptr[0]) != 0 or int(indptr[-1]) != data.shape[0]:
            raise ValueError(f"indptr must start at 0 and end at nnz = {data.shape[0]}, got {int(indptr[0])} ... {int(indptr[-1])}")
        if (np.diff(indptr.astype(np.int64)) < 0).any():
            raise ValueError("indptr must never decrease (row i is data[indptr[i]:indptr[i + 1]])")
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= cols):
            bad = int(indices.min()) if int(indices.min()) < 0 else int(indices.max())
            raise ValueError(f"indices: column {bad} is outside the {cols} columns of shape {(rows, cols)}")
        if not np.isfinite(data.astype(np.float64, copy=False)).all():
            raise ValueError(f"data holds {int((~np.isfinite(data)).sum())} NaN or infinite values")
        for name, value in arrays.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "shape", (rows, cols))

    @classmethod
    def _trusted(cls, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]) -> "CSR":
        """A CSR from arrays this module built itself (already consistent): no O(nnz) check."""
        csr = object.__new__(cls)
        for name, value in (("data", data), ("indices", indices), ("indptr", indptr), ("shape", shape)):
            object.__setattr__(csr, name, value)
        return csr

    @property
    def nnz(self) -> int:
        return int(self.data.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def sparsity(self) -> float:
        """1 - nnz / (rows * cols); a matrix with no elements has none (ValueError)."""
        total = self.shape[0] * self.shape[1]
        if total == 0:
            raise ValueError(f"csr has shape {self.shape}: no elements, so its sparsity is undefined")
        return 1.0 - self.nnz / total

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays: what storing or streaming this matrix costs."""
        return int(self.data.nbytes + self.indices.nbytes + self.indptr.nbytes)

    def to_scipy(self):
        """The same matrix as `scipy.sparse.csr_array` (shares memory where it can).

        scipy.sparse has no float16 (it builds one, but printing, `toarray`
        and some products fail), so float16 values are widened to float32,
        which holds every float16 exactly.

        >>> to_csr(torch.tensor([[0.0, 1.5]], dtype=torch.float16)).to_scipy().dtype
        dtype('float32')
        """
        import scipy.sparse as sp

        data = self.data.astype(np.float32) if self.data.dtype == np.float16 else self.data
        return sp.csr_array((data, self.indices, self.indptr), shape=self.shape)

    def to_torch(self) -> torch.Tensor:
        """The same matrix as a torch sparse CSR tensor (int16 indices widen to int32)."""
        index = np.int64 if self.indptr.dtype == np.int64 else np.int32
        return torch.sparse_csr_tensor(
            torch.from_numpy(self.indptr.astype(index, copy=False)),
            torch.from_numpy(self.indices.astype(index, copy=False)),
            torch.from_numpy(self.data),
            size=self.shape,
        )

    def mkl_tensor(self) -> torch.Tensor:
        """A torch CSR tensor with int32 indices, built once and cached.

        torch hands int32-indexed CSR products on the CPU to MKL's sparse BLAS
        (vectorised and threaded); int64 indices, what `W.to_sparse_csr()`
        gives, take a slower generic path. That index width alone was worth
        2-3x at 90% sparsity on a 2-core machine (notebook 08).
        """
        cached = self.__dict__.get("_mkl")
        if cached is None:
            values = self.data.astype(np.float64 if self.data.dtype == np.float64 else np.float32)  # float16 computes in float32
            with warnings.catch_warnings():  # torch calls sparse CSR support "beta"
                warnings.simplefilter("ignore")
                cached = torch.sparse_csr_tensor(
                    torch.from_numpy(self.indptr.astype(np.int32)),
                    torch.from_numpy(self.indices.astype(np.int32)),
                    torch.from_numpy(values),
                    size=self.shape,
                )
            object.__setattr__(self, "_mkl", cached)
        return cached

    def _sparsity_text(self) -> str:
        return f"{self.sparsity:.3f}" if self.shape[0] * self.shape[1] else "undefined"

    def __repr__(self) -> str:
        return (
            f"CSR(shape={self.shape}, nnz={self.nnz}, sparsity={self._sparsity_text()}, values={self.data.dtype}, "
            f"indices={self.indices.dtype}, {self.nbytes} bytes)"
        )


def index_dtype_for(num_cols: int) -> np.dtype:
    """The narrowest signed integer type that can hold every column index.

    int16 reaches column 32,767, so up to 32,768 columns; int32 beyond.

    >>> index_dtype_for(4096), index_dtype_for(40000)
    (dtype('int16'), dtype('int32'))
    """
    if isinstance(num_cols, bool) or not isinstance(num_cols, (int, np.integer)) or num_cols < 0:
        raise ValueError(f"num_cols must be a non-negative int, got {num_cols!r}")
    if num_cols <= np.iinfo(np.int16).max + 1:
        return np.dtype(np.int16)
    if num_cols <= np.iinfo(np.int32).max + 1:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


def _index_dtype(index_dtype, num_cols: int) -> np.dtype:
    """Resolve the `index_dtype` argument (None = narrowest that fits)."""
    if index_dtype is None:
        return index_dtype_for(num_cols)
    if isinstance(index_dtype, torch.dtype):
        index_dtype = str(index_dtype).replace("torch.", "")
    try:
        dt = np.dtype(_INDEX_NAMES.get(index_dtype, index_dtype))
    except TypeError:
        dt = None
    if dt is None or dt not in (np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.int64)):
        raise ValueError(f"index_dtype must be None, 'int16', 'int32' or 'int64', got {index_dtype!r}")
    if num_cols > np.iinfo(dt).max + 1:
        raise ValueError(f"index_dtype {dt} cannot index {num_cols} columns; use {index_dtype_for(num_cols)} or wider")
    return dt


def _indptr_dtype(nnz: int) -> np.dtype:
    return np.dtype(np.int32) if nnz <= np.iinfo(np.int32).max else np.dtype(np.int64)


def _as_matrix(weight, name: str = "weight") -> np.ndarray:
    """`weight` as a 2-D float numpy array (a view when possible), or raise."""
    if isinstance(weight, torch.Tensor):
        if weight.dtype == torch.bfloat16:
            raise TypeError(f"{name} has dtype bfloat16, which numpy cannot hold; convert it to float16 or float32 first")
        weight = weight.detach().cpu()
        if weight.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {weight.layout}")
        weight = weight.numpy()
    if not isinstance(weight, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols), got shape {tuple(weight.shape)}")
    if weight.dtype not in _VALUE_DTYPES:
        raise TypeError(f"{name} must hold float16, float32 or float64 values, got {weight.dtype}")
    if not np.isfinite(weight).all():
        raise ValueError(f"{name} contains NaN or inf; a pruned weight must be finite to be stored")
    return weight


def to_csr_loop(weight, index_dtype=None) -> CSR:
    """CSR by visiting every entry in row order and keeping the non-zeros.

    >>> to_csr_loop(torch.tensor([[0.0, 7.0], [8.0, 0.0]])).indptr.tolist()
    [0, 1, 2]
    """
    W = _as_matrix(weight)  # (rows, cols)
    rows, cols = W.shape
    idx = _index_dtype(index_dtype, cols)
    data, indices, indptr = [], [], [0]
    for i in range(rows):
        for j in range(cols):
            if W[i, j] != 0:
                data.append(W[i, j])
                indices.append(j)
        indptr.append(len(data))
    return CSR(
        np.array(data, dtype=W.dtype),
        np.array(indices, dtype=idx),
        np.array(indptr, dtype=_indptr_dtype(len(data))),
        (rows, cols),
    )


def to_csr(weight, index_dtype=None) -> CSR:
    """CSR with numpy (vectorised); agrees with `to_csr_loop`.

    `index_dtype=None` picks int16 for up to 32,768 columns, else int32.

    >>> A = to_csr(torch.tensor([[0.0, 7.0, 0.0]]), index_dtype="int32")
    >>> A.indices.dtype, A.indices.tolist()
    (dtype('int32'), [1])
    """
    W = _as_matrix(weight)  # (rows, cols)
    rows, cols = W.shape
    idx = _index_dtype(index_dtype, cols)
    r, c = np.nonzero(W)  # row-major order: rows ascending, columns ascending within a row
    nnz = r.shape[0]
    counts = np.bincount(r, minlength=rows)  # (rows,)
    indptr = np.zeros(rows + 1, dtype=_indptr_dtype(nnz))
    np.cumsum(counts, out=indptr[1:])
    return CSR._trusted(np.ascontiguousarray(W[r, c]), c.astype(idx), indptr, (rows, cols))


def _check_csr(csr, name: str = "csr") -> CSR:
    if not isinstance(csr, CSR):
        raise TypeError(f"{name} must be a chapter11.csr.CSR (build one with to_csr), got {type(csr).__name__}")
    return csr


def to_dense_loop(csr: CSR) -> torch.Tensor:
    """Back to a dense tensor, writing each stored value at (row, indices[k]).

    >>> to_dense_loop(to_csr(torch.tensor([[0.0, 7.0]]))).tolist()
    [[0.0, 7.0]]
    """
    csr = _check_csr(csr)
    W = np.zeros(csr.shape, dtype=csr.dtype)  # (rows, cols)
    for i in range(csr.shape[0]):
        for k in range(csr.indptr[i], csr.indptr[i + 1]):
            W[i, csr.indices[k]] = csr.data[k]
    return torch.from_numpy(W)


def to_dense(csr: CSR) -> torch.Tensor:
    """Back to a dense tensor (vectorised); exact inverse of `to_csr`.

    >>> to_dense(to_csr(torch.tensor([[0.0, 7.0], [0.0, 0.0]]))).tolist()
    [[0.0, 7.0], [0.0, 0.0]]
    """
    csr = _check_csr(csr)
    W = np.zeros(csr.shape, dtype=csr.dtype)  # (rows, cols)
    rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))  # (nnz,) row of each value
    W[rows, csr.indices] = csr.data
    return torch.from_numpy(W)


# ------------------------------------------------------------ storage in bytes


def csr_nbytes(rows: int, cols: int, nnz: int, value_dtype="float32", index_dtype=None) -> int:
    """Bytes of a CSR matrix: nnz * (value + index) + (rows + 1) * row-pointer.

    Row pointers are int32 unless nnz needs int64; `index_dtype=None` is the
    narrowest that fits `cols` (as in `to_csr`).

    >>> csr_nbytes(4096, 4096, 1677722, "float32", "int32")
    13438164
    """
    for arg, v in (("rows", rows), ("cols", cols), ("nnz", nnz)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{arg} must be a non-negative int, got {v!r}")
    if nnz > rows * cols:
        raise ValueError(f"nnz must be at most rows * cols = {rows * cols}, got {nnz}")
    value = np.dtype(str(value_dtype).replace("torch.", "")).itemsize
    index = _index_dtype(index_dtype, cols).itemsize
    return int(nnz * (value + index) + (rows + 1) * _indptr_dtype(nnz).itemsize)


def storage_bytes(weight, value_dtype=None, index_dtype=None, n: int = 2, m: int = 4) -> dict[str, int]:
    """Bytes to store `weight` in each format, counting its exact zeros.

    - dense: every value.
    - csr: values + column indices + row pointers (`csr_nbytes`).
    - coo: values + a row and a column index per value.
    - bitmask: one bit per position + the kept values.
    - nm: an N:M compressed matrix (what 2:4 GPUs store): N of every M values
      plus ceil(log2 M) bits of position each, whatever the zeros (it only
      applies when each group of M holds at most N non-zeros).

    >>> W = torch.zeros(4, 8); W[0, 0] = 1.0
    >>> storage_bytes(W, index_dtype="int32")
    {'dense': 128, 'csr': 28, 'coo': 12, 'bitmask': 8, 'nm': 68}
    """
    W = _as_matrix(weight)  # (rows, cols)
    rows, cols = W.shape
    nnz = int(np.count_nonzero(W))
    vdt = W.dtype if value_dtype is None else np.dtype(str(value_dtype).replace("torch.", ""))
    v = vdt.itemsize
    idx = _index_dtype(index_dtype, cols)
    row_idx = _index_dtype(index_dtype, rows)
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int) or not 1 <= n <= m:
        raise ValueError(f"n and m must be ints with 1 <= n <= m (keep n of every m), got n={n!r}, m={m!r}")
    kept_nm = rows * cols * n // m
    return {
        "dense": rows * cols * v,
        "csr": csr_nbytes(rows, cols, nnz, vdt, idx),
        "coo": nnz * (v + idx.itemsize + row_idx.itemsize),
        "bitmask": math.ceil(rows * cols / 8) + nnz * v,
        "nm": kept_nm * v + math.ceil(kept_nm * max(1, math.ceil(math.log2(m))) / 8),
    }


def traffic_limit(sparsity: float, value_bytes: int = 4, index_bytes: int = 4) -> float:
    """Dense bytes over CSR bytes: the most a memory-bound CSR kernel can gain.

    value / ((1 - s) (value + index)), ignoring the small row-pointer array.

    >>> round(traffic_limit(0.9), 6)
    5.0
    >>> round(traffic_limit(0.9, index_bytes=2), 2)
    6.67
    """
    s = check_sparsity(sparsity)
    for arg, b in (("value_bytes", value_bytes), ("index_bytes", index_bytes)):
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise ValueError(f"{arg} must be a positive int, got {b!r}")
    return value_bytes / ((1.0 - s) * (value_bytes + index_bytes))


# ------------------------------------------------------------------- kernels


def _as_operand(x, csr: CSR, ndim: int, name: str) -> tuple[np.ndarray, bool]:
    """(x as a float numpy array, whether the caller gave a torch tensor)."""
    is_torch = isinstance(x, torch.Tensor)
    if is_torch:
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != ndim or x.shape[0] != csr.shape[1]:
        want = "(cols,)" if ndim == 1 else "(cols, batch)"
        raise ValueError(f"{name} must have shape {want} with cols = {csr.shape[1]}, got {tuple(x.shape)}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must hold floats, got {x.dtype}")
    return x, is_torch


def _back(y: np.ndarray, is_torch: bool):
    return torch.from_numpy(y) if is_torch else y


def csr_matvec_loop(csr: CSR, x):
    """y = W x with W in CSR: y[i] = sum over k in row i of data[k] * x[indices[k]].

    The reference kernel: one row at a time, one stored value at a time.

    >>> A = to_csr(torch.tensor([[1.0, 0.0, 2.0]]))
    >>> csr_matvec_loop(A, torch.tensor([3.0, 5.0, 7.0])).tolist()
    [17.0]
    """
    csr = _check_csr(csr)
    x, is_torch = _as_operand(x, csr, 1, "x")  # (cols,)
    y = np.zeros(csr.shape[0], dtype=np.result_type(csr.dtype, x.dtype))  # (rows,)
    for i in range(csr.shape[0]):
        total = 0.0
        for k in range(csr.indptr[i], csr.indptr[i + 1]):
            total += float(csr.data[k]) * float(x[csr.indices[k]])
        y[i] = total
    return _back(y, is_torch)


def csr_matmul_loop(csr: CSR, X):
    """Y = W X for a batch of columns X (cols, batch): each row of W meets every column.

    >>> A = to_csr(torch.tensor([[1.0, 0.0, 2.0]]))
    >>> csr_matmul_loop(A, torch.tensor([[1.0, 0.0], [5.0, 5.0], [1.0, 1.0]])).tolist()
    [[3.0, 2.0]]
    """
    csr = _check_csr(csr)
    X, is_torch = _as_operand(X, csr, 2, "X")  # (cols, batch)
    Y = np.zeros((csr.shape[0], X.shape[1]), dtype=np.result_type(csr.dtype, X.dtype))  # (rows, batch)
    for i in range(csr.shape[0]):
        for b in range(X.shape[1]):
            total = 0.0
            for k in range(csr.indptr[i], csr.indptr[i + 1]):
                total += float(csr.data[k]) * float(X[csr.indices[k], b])
            Y[i, b] = total
    return _back(Y, is_torch)


# Compiled kernels. Two details decide their speed (notebook 08 measures both):
# - indices are read as unsigned (np.uint64(...)): numba treats a signed index
#   as possibly negative and adds a wrap-around test to every access, which
#   made the one-thread row loop 1.4x slower here;
# - fastmath reassoc + contract: the compiler may reorder a row's sum into SIMD
#   lanes (AVX2 gathers, fused multiply-add). The result then differs from the
#   left-to-right loop by rounding only (tests compare with a tolerance).
# Each kernel comes serial and parallel (rows split across threads).
_FAST = {"reassoc", "contract"}


@njit(inline="always", fastmath=_FAST, boundscheck=False)
def _row_dot(data, indices, x, start, end):  # pragma: no cover - compiled
    total = x.dtype.type(0)
    for k in range(np.uint64(start), np.uint64(end)):
        total += data[k] * x[np.uint64(indices[k])]
    return total


@njit(inline="always", fastmath=_FAST, boundscheck=False)
def _row_times_batch(data, indices, X, start, end, out_row, width):  # pragma: no cover - compiled
    # X (cols, batch) and out_row (batch,) are row-major: the batch is the
    # contiguous axis, so each stored value updates `width` neighbours (SIMD).
    # Four stored values per pass over out_row: a quarter of the loads and
    # stores of out_row, and of the loop set-up, of one value per pass.
    for b in range(width):
        out_row[b] = 0
    k = np.uint64(start)
    end = np.uint64(end)
    one = np.uint64(1)
    while k + np.uint64(4) <= end:
        v0, v1, v2, v3 = data[k], data[k + one], data[k + 2 * one], data[k + 3 * one]
        r0 = X[np.uint64(indices[k])]
        r1 = X[np.uint64(indices[k + one])]
        r2 = X[np.uint64(indices[k + 2 * one])]
        r3 = X[np.uint64(indices[k + 3 * one])]
        for b in range(width):
            out_row[b] += (v0 * r0[b] + v1 * r1[b]) + (v2 * r2[b] + v3 * r3[b])
        k += np.uint64(4)
    while k < end:
        v = data[k]
        row = X[np.uint64(indices[k])]
        for b in range(width):
            out_row[b] += v * row[b]
        k += one


@njit(parallel=True, fastmath=_FAST, boundscheck=False, cache=True, nogil=True)
def _matvec_kernel(data, indices, indptr, x, out):  # pragma: no cover - compiled
    for i in prange(out.shape[0]):
        out[i] = _row_dot(data, indices, x, indptr[i], indptr[i + 1])


@njit(fastmath=_FAST, boundscheck=False, cache=True, nogil=True)
def _matvec_serial(data, indices, indptr, x, out):  # pragma: no cover - compiled
    for i in range(out.shape[0]):
        out[i] = _row_dot(data, indices, x, indptr[i], indptr[i + 1])


@njit(parallel=True, fastmath=_FAST, boundscheck=False, cache=True, nogil=True)
def _matmul_kernel(data, indices, indptr, X, out):  # pragma: no cover - compiled
    for i in prange(out.shape[0]):
        _row_times_batch(data, indices, X, indptr[i], indptr[i + 1], out[i], out.shape[1])


@njit(fastmath=_FAST, boundscheck=False, cache=True, nogil=True)
def _matmul_serial(data, indices, indptr, X, out):  # pragma: no cover - compiled
    for i in range(out.shape[0]):
        _row_times_batch(data, indices, X, indptr[i], indptr[i + 1], out[i], out.shape[1])


# The same product with the batch width fixed at compile time. For a width the
# compiler knows, the loop over the batch unrolls into straight SIMD code with
# no run-time checks; at 32 columns that beat the general kernel by 1.1-1.5x
# here, and MKL in 10 of 12 comparisons at 80-99% sparsity (0.86x to 1.28x its
# speed; notebook 08). Only 32 gets a copy: narrower batches went faster
# through MKL, and from 64 columns the general loop did best.
FIXED_WIDTH = 32


@njit(parallel=True, fastmath=_FAST, boundscheck=False, cache=True, nogil=True)
def _matmul_fixed_kernel(data, indices, indptr, X, out):  # pragma: no cover - compiled
    for i in prange(out.shape[0]):
        _row_times_batch(data, indices, X, indptr[i], indptr[i + 1], out[i], FIXED_WIDTH)


@njit(fastmath=_FAST, boundscheck=False, cache=True, nogil=True)
def _matmul_fixed_serial(data, indices, indptr, X, out):  # pragma: no cover - compiled
    for i in range(out.shape[0]):
        _row_times_batch(data, indices, X, indptr[i], indptr[i + 1], out[i], FIXED_WIDTH)


# Below this many multiply-adds the kernels stay on one thread: a parallel launch
# costs microseconds on an idle machine, but a whole scheduler slice (about 4 ms)
# when another thread holds the second core, and a small product cannot earn that back.
PARALLEL_MIN_WORK = 50_000


def _use_threads(num_threads, work: int) -> bool:
    threads = numba.get_num_threads() if num_threads is None else num_threads
    return threads > 1 and work >= PARALLEL_MIN_WORK


def _compute_dtype(csr: CSR) -> np.dtype:
    return np.dtype(np.float64) if csr.dtype == np.float64 else np.dtype(np.float32)


def _kernel_operand(csr, x, ndim: int, name: str) -> tuple[CSR, np.ndarray, np.dtype, bool]:
    """Checked CSR, x as a contiguous array of the compute dtype, that dtype, and whether x was torch."""
    csr = _check_csr(csr)
    x, is_torch = _as_operand(x, csr, ndim, name)
    dtype = _compute_dtype(csr)
    return csr, np.ascontiguousarray(x, dtype=dtype), dtype, is_torch


def _values(csr: CSR, dtype: np.dtype) -> np.ndarray:
    return csr.data if csr.data.dtype == dtype else csr.data.astype(dtype)


class _threads:
    """Context manager: run numba kernels with `num_threads` threads, then restore."""

    def __init__(self, num_threads):
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int) or not 1 <= num_threads <= numba.config.NUMBA_NUM_THREADS):
            raise ValueError(f"num_threads must be None or an int in [1, {numba.config.NUMBA_NUM_THREADS}], got {num_threads!r}")
        self.num_threads = num_threads

    def __enter__(self):
        self.old = numba.get_num_threads()
        if self.num_threads is not None:
            numba.set_num_threads(self.num_threads)

    def __exit__(self, *exc):
        numba.set_num_threads(self.old)


BACKENDS = ("auto", "mkl", "numba")

# "auto" sends a batch of fewer columns than this to MKL. Measured on
# 4096x4096 at 80-99% sparsity (2-core AMD EPYC): MKL won by up to 2x at batch
# 2-16; at 32 ours (the fixed-width kernel) was ahead in most runs, and from
# 64 (the general one) by 1.2-1.8x.
NUMBA_MIN_BATCH = 32
# From there up the winner depends on the CPU (a 2-core Intel Xeon: MKL 10-20%
# ahead at batch 32). So a product of at least this many multiply-adds is timed
# once on both paths per shape, nnz, batch and dtype, and "auto" keeps the faster.
AUTOTUNE_MIN_WORK = 1 << 22
# A matrix-vector product is timed the same way from this many stored values (ours
# led MKL's at 80-95% on an AVX2 EPYC, MKL's led ours at 90-99% on an AVX-512 one).
AUTOTUNE_MIN_NNZ = 1 << 17
# Timed calls per path, in blocks after one untimed call (`bench.compare`'s `block`): single
# alternating calls let one path's still-spinning threads slow the other, and the 90% vector product
# went to ours in 3 of 4 trials though MKL's won every side-by-side run; blocks matched them 20 of 20.
AUTOTUNE_REPEATS, AUTOTUNE_BLOCK = 10, 5
_autotuned: dict[tuple, str] = {}


def _backend(backend: str, out, num_threads, batch: int) -> str:
    """Which compiled path runs the product: "numba" (ours) or "mkl" (torch's int32 CSR)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    mkl = torch.backends.mkl.is_available()
    if backend == "mkl":
        if not mkl:
            raise ValueError("backend='mkl' needs a torch build with MKL; use backend='numba'")
        return "mkl"
    if backend == "numba" or not mkl or out is not None or num_threads is not None:
        return "numba"  # `out=` and a thread count are features of our kernel
    # auto: ours for a vector and for wide batches, MKL's in between; where
    # the CPU decides (large products) `_auto_backend` times both and may overrule
    return "numba" if batch == 1 or batch >= NUMBA_MIN_BATCH else "mkl"


def autotuned_backend(csr: CSR, batch: int, dtype=np.float32) -> str | None:
    """The backend "auto" measured as faster for this product (batch 1: `csr_matvec`), or None if it timed none."""
    return _autotuned.get((csr.shape, csr.nnz, batch, np.dtype(dtype).str))


def _choose(csr: CSR, X: np.ndarray, backend: str, out, num_threads) -> str:
    """The path of a product with a vector (X 1-D) or a matrix: `_backend`'s rule, settled by timing both
    paths once where "auto" meets a product large enough for the CPU to decide."""
    vector = X.ndim == 1
    batch = 1 if vector else X.shape[1]
    static = _backend(backend, out, num_threads, batch)
    small = csr.nnz < AUTOTUNE_MIN_NNZ if vector else (batch == 1 or csr.nnz * batch < AUTOTUNE_MIN_WORK)
    if backend != "auto" or static == "mkl" or out is not None or num_threads is not None or small or not torch.backends.mkl.is_available():
        return static
    key = (csr.shape, csr.nnz, batch, X.dtype.str)
    if key not in _autotuned:  # interleaved medians, so a noisy moment hits both; a tie goes to ours
        product = csr_matvec if vector else csr_matmul
        median = compare({name: lambda name=name: product(csr, X, backend=name) for name in ("numba", "mkl")},
                         repeats=AUTOTUNE_REPEATS, warmup=1, block=AUTOTUNE_BLOCK)["median_s"]
        _autotuned[key] = min(median, key=lambda name: (median[name], name != "numba"))
    return _autotuned[key]


def csr_matvec(csr: CSR, x, out=None, num_threads: int | None = None, backend: str = "auto"):
    """y = W x with the compiled kernel; agrees with `csr_matvec_loop`.

    Two compiled paths, picked by `backend`: "numba" runs our own kernel, rows
    split across `num_threads` threads when the matrix holds at least
    `PARALLEL_MIN_WORK` values (`num_threads=1`: serial); "mkl" hands the
    product to torch's int32-indexed CSR (MKL sparse BLAS). "auto" (default)
    is ours, except that from `AUTOTUNE_MIN_NNZ` stored values both paths are
    timed once per shape on this CPU and the faster kept (`autotuned_backend`;
    ours led at 80-95% on one EPYC, MKL's at 90-99% on another: book/benchmarks.md).

    Takes and returns numpy arrays or torch tensors (the same kind as `x`).
    float16 values are multiplied in float32.

    >>> A = to_csr(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))
    >>> csr_matvec(A, np.array([3.0, 5.0, 7.0], dtype=np.float32)).tolist()
    [17.0, 0.0]
    """
    csr, x, dtype, is_torch = _kernel_operand(csr, x, 1, "x")  # x: (cols,)
    if out is not None and not (isinstance(out, np.ndarray) and out.shape == (csr.shape[0],) and out.dtype == dtype and out.flags.c_contiguous):
        raise ValueError(f"out must be a contiguous {dtype} numpy array of shape ({csr.shape[0]},)")
    if _choose(csr, x, backend, out, num_threads) == "mkl":
        y = (csr.mkl_tensor() @ torch.from_numpy(x)).numpy()  # (rows,)
        return _back(y, is_torch)
    if out is None:
        out = np.empty(csr.shape[0], dtype=dtype)  # (rows,)
    kernel = _matvec_kernel if _use_threads(num_threads, csr.nnz) else _matvec_serial
    with _threads(num_threads):
        kernel(_values(csr, dtype), csr.indices, csr.indptr, x, out)
    return _back(out, is_torch)


def csr_matmul(csr: CSR, X, out=None, num_threads: int | None = None, backend: str = "auto"):
    """Y = W X for X (cols, batch), compiled; agrees with `csr_matmul_loop`.

    Keep the batch on the last (contiguous) axis: that is what lets each
    stored weight update a whole row of `batch` outputs with SIMD.
    `backend` as in `csr_matvec`, except that "auto" (when torch has MKL
    and neither `out` nor `num_threads` is given) picks MKL for batches
    narrower than `NUMBA_MIN_BATCH`, where MKL's product beat ours (notebook
    08), and for wider batches times both paths once per product shape on
    this CPU and keeps the faster (`autotuned_backend` says which).

    >>> A = to_csr(torch.tensor([[1.0, 0.0, 2.0]]))
    >>> csr_matmul(A, torch.tensor([[1.0, 0.0], [5.0, 5.0], [1.0, 1.0]])).tolist()
    [[3.0, 2.0]]
    """
    csr, X, dtype, is_torch = _kernel_operand(csr, X, 2, "X")  # X: (cols, batch)
    shape = (csr.shape[0], X.shape[1])
    if out is not None and not (isinstance(out, np.ndarray) and out.shape == shape and out.dtype == dtype and out.flags.c_contiguous):
        raise ValueError(f"out must be a contiguous {dtype} numpy array of shape {shape}")
    if _choose(csr, X, backend, out, num_threads) == "mkl":
        Y = (csr.mkl_tensor() @ torch.from_numpy(X)).numpy()  # (rows, batch)
        return _back(Y, is_torch)
    if out is None:
        out = np.empty(shape, dtype=dtype)  # (rows, batch)
    threads = _use_threads(num_threads, csr.nnz * X.shape[1])
    if X.shape[1] == FIXED_WIDTH:
        kernel = _matmul_fixed_kernel if threads else _matmul_fixed_serial
    else:
        kernel = _matmul_kernel if threads else _matmul_serial
    with _threads(num_threads):
        kernel(_values(csr, dtype), csr.indices, csr.indptr, X, out)
    return _back(out, is_torch)


# ----------------------------------------------------------- modules in a model


def _masked_weight(linear: nn.Linear, name: str = "linear") -> torch.Tensor:
    """The weight with its `weight_mask` applied (exactly 0 where the mask is 0), or raise for a non-0/1 mask."""
    weight = linear.weight.detach()  # (out_features, in_features)
    mask = getattr(linear, "weight_mask", None)
    if mask is None:
        return weight
    mask = check_mask(mask, weight, f"{name}.weight_mask")
    return torch.where(mask == 0, torch.zeros_like(weight), weight)


class SparseLinear(nn.Module):
    """A pruned `nn.Linear` whose weight lives in CSR and runs through `csr_matvec`/`csr_matmul`.

    Inference only: the output carries no gradient. The CSR arrays are
    buffers (`values`, `col_indices`, `row_offsets`), so `state_dict` keeps them.

    >>> layer = nn.Linear(3, 2)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])); _ = layer.bias.zero_()
    >>> sparse = SparseLinear.from_linear(layer)
    >>> sparse(torch.tensor([[1.0, 1.0, 1.0]])).tolist()
    [[1.0, 2.0]]
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, index_dtype=None):
        super().__init__()
        csr = to_csr(weight.detach().float(), index_dtype=index_dtype)
        self.out_features, self.in_features = csr.shape
        self.register_buffer("values", torch.from_numpy(csr.data))  # (nnz,)
        self.register_buffer("col_indices", torch.from_numpy(csr.indices))  # (nnz,)
        self.register_buffer("row_offsets", torch.from_numpy(csr.indptr))  # (out_features + 1,)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.register_buffer("bias", bias.detach().float().clone())
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, index_dtype=None) -> "SparseLinear":
        """Build from an `nn.Linear`, applying its `weight_mask` (0/1 only) if it has one.

        A pruned weight is dropped whatever it holds (an inf too); kept
        weights are stored as they are.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(_masked_weight(linear), linear.bias, index_dtype=index_dtype)

    @property
    def csr(self) -> CSR:
        return CSR._trusted(self.values.numpy(), self.col_indices.numpy(), self.row_offsets.numpy(), (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in in_features = {self.in_features}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        X = x.detach().reshape(-1, self.in_features).float()  # (B, in)
        if X.shape[0] == 1:
            y = csr_matvec(self.csr, X[0].numpy())[None, :]  # (1, out)
        else:
            y = csr_matmul(self.csr, X.T.contiguous().numpy()).T  # (B, out)
        y = torch.from_numpy(np.ascontiguousarray(y))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        csr = self.csr
        return f"in_features={self.in_features}, out_features={self.out_features}, sparsity={csr._sparsity_text()}, bytes={csr.nbytes}"


def sparsify(model: nn.Module, min_sparsity: float = 0.8, inplace: bool = False) -> nn.Module:
    """Swap every `nn.Linear` whose weight is at least `min_sparsity` zeros for a `SparseLinear`.

    The default 0.8 is where CSR with int16 indices drops to 30% of the dense
    bytes (traffic limit 3.3x) and where our kernels beat dense at batch 1 and
    batch 32 on two cores (notebook 08 measures the crossover on your
    machine); below it the dense layer stays. Returns a copy unless `inplace`.

    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.zero_()
    >>> [type(m).__name__ for m in sparsify(model, min_sparsity=0.5)]
    ['SparseLinear', 'ReLU', 'Linear']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    min_sparsity = check_sparsity(min_sparsity, "min_sparsity")
    refuse_torch_prune(model)
    model = model if inplace else copy.deepcopy(model)
    swaps = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                weight = _masked_weight(child, f"{name}.{child_name}" if name else child_name)
                if 1.0 - torch.count_nonzero(weight).item() / weight.numel() >= min_sparsity:
                    swaps.append((module, child_name, child))
    for module, child_name, child in swaps:
        setattr(module, child_name, SparseLinear.from_linear(child))
    return model
