"""Deep Compression after pruning: weight sharing, Huffman coding, storage.

Han, Mao & Dally (2016) follow magnitude pruning with two more stages:

1. Weight sharing. The surviving weights of each layer are clustered with
   1-D k-means into k = 2^b values (centroids); each weight is stored as a
   b-bit cluster index plus one shared fp32 codebook per layer. Centroids
   start evenly spaced between the smallest and largest weight (linear
   initialisation, which the paper found keeps the rare large weights) and
   may then be fine-tuned: the gradient of a centroid is the sum of the
   gradients of the weights that share it.
2. Huffman coding of the cluster indices and of the sparse-matrix column
   offsets, whose distributions are far from uniform.

Storage format (counted bit for bit by `storage_table`), per weight matrix
of shape (rows, cols) with nnz kept weights, flattened to 2-D as (out, -1):

- dense:     32 * rows * cols bits (fp32).
- CSR:       values fp32 (32 * nnz) + relative column offsets (nnz offsets,
             fixed width w_off = bits for the largest offset) + row pointers
             ((rows + 1) * bits(nnz)) + a 128-bit header (shape, nnz, widths).
             The offset of the j-th kept weight in a row is col_j - col_{j-1} - 1,
             with col_{-1} = -1, so it is >= 0 and below cols.
- + sharing: values become b-bit cluster indices (b * nnz) + codebook (32 * 2^b).
- + Huffman: indices and offsets become Huffman bit streams, plus their
             canonical code tables (5 bits of code length per alphabet symbol).

`compress_layer` really builds those streams and `CompressedLayer.decode`
rebuilds the matrix from them, so the bytes counted are bytes that suffice.

But: biases are not counted (they stay fp32 and are tiny); the paper's fixed
5/8-bit offsets with zero padding are replaced by per-layer widths; no
quantisation-aware training beyond the centroid fine-tune.

    >>> code = HuffmanCode.from_symbols([0, 0, 0, 1, 2])
    >>> data, nbits = code.encode([0, 0, 0, 1, 2])
    >>> nbits, code.decode(data, nbits)
    (7, [0, 0, 0, 1, 2])
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .masks import prunable_parameters
from .sparsity import check_model

__all__ = [
    "linear_init",
    "assign_clusters_loop",
    "assign_clusters",
    "kmeans_1d",
    "SharedLayer",
    "share_weights",
    "finetune_centroids",
    "HuffmanCode",
    "huffman_encode",
    "huffman_decode",
    "relative_offsets_loop",
    "relative_offsets",
    "CompressedLayer",
    "compress_layer",
    "StorageRow",
    "storage_table",
    "format_storage_table",
    "HEADER_BITS",
    "LENGTH_BITS",
]

HEADER_BITS = 128  # rows, cols, nnz (32 bits each) + 4 one-byte widths
LENGTH_BITS = 5  # per symbol in a canonical Huffman table (lengths up to 31)


def _check_bits(bits, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"{name} must be an int between 1 and 16, got {bits!r}")
    return bits


def _width(max_value: int) -> int:
    """Bits needed to store integers 0..max_value (at least 1)."""
    return max(1, int(max_value).bit_length())


# ---------------------------------------------------------------------------
# Weight sharing: 1-D k-means
# ---------------------------------------------------------------------------


def linear_init(values: torch.Tensor, k: int) -> torch.Tensor:
    """k centroids evenly spaced over [min, max] of `values` (Han et al.'s linear init).

    >>> linear_init(torch.tensor([-1.0, 0.2, 3.0]), 5)
    tensor([-1.,  0.,  1.,  2.,  3.])
    """
    if not isinstance(values, torch.Tensor) or values.numel() == 0:
        raise ValueError("values must be a non-empty tensor of weights to cluster")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    v = values.detach().float().flatten()
    return torch.linspace(float(v.min()), float(v.max()), k)  # (k,)


def assign_clusters_loop(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each value, argmin_c |w - c| (ties: lower index).

    >>> assign_clusters_loop(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([0.0, 1.0]))
    tensor([0, 1, 0])
    """
    cs = centroids.detach().float().flatten().tolist()
    out = []
    for w in values.detach().float().flatten().tolist():
        best, best_d = 0, abs(w - cs[0])
        for j in range(1, len(cs)):
            d = abs(w - cs[j])
            if d < best_d:
                best, best_d = j, d
        out.append(best)
    return torch.tensor(out, dtype=torch.long)


def assign_clusters(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Vectorised `assign_clusters_loop` via an (n, k) distance matrix.

    >>> assign_clusters(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([0.0, 1.0]))
    tensor([0, 1, 0])
    """
    v = values.detach().float().flatten()  # (n,)
    c = centroids.detach().float().flatten()  # (k,)
    distances = (v[:, None] - c[None, :]).abs()  # (n, k)
    return distances.argmin(dim=1)  # (n,); argmin returns the first minimum


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 30, init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means in one dimension: (centroids (k,), assignments (n,)).

    Starts from `linear_init` unless `init` is given; an empty cluster keeps
    its centroid. Stops early when the assignments stop changing.

    >>> c, a = kmeans_1d(torch.tensor([0.0, 0.1, 0.9, 1.0]), 2)
    >>> [round(x, 2) for x in c.tolist()], a.tolist()
    ([0.05, 0.95], [0, 0, 1, 1])
    """
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a tensor, got {type(values).__name__}")
    v = values.detach().float().flatten()  # (n,)
    if not torch.isfinite(v).all():
        raise ValueError(f"values hold {int((~torch.isfinite(v)).sum())} NaN or infinite entries; k-means cannot place them")
    if init is not None:
        if not isinstance(init, torch.Tensor) or init.numel() != k or not torch.isfinite(init).all():
            raise ValueError(f"init must be a finite tensor of k = {k} centroids, got {getattr(init, 'shape', type(init).__name__)}")
    centroids = linear_init(v, k) if init is None else init.detach().float().flatten().clone()
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    assign = assign_clusters(v, centroids)
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=len(centroids)).float()  # (k,)
        sums = torch.bincount(assign, weights=v, minlength=len(centroids))  # (k,)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        new = assign_clusters(v, centroids)
        if torch.equal(new, assign):
            break
        assign = new
    return centroids, assign


@dataclass
class SharedLayer:
    """One weight matrix after sharing: codebook, index per kept weight, mask."""

    centroids: torch.Tensor  # (k,)
    indices: torch.Tensor  # (nnz,) long, in row-major order of the kept weights
    mask: torch.Tensor  # same shape as the weight, 1 = kept
    bits: int

    def weight(self) -> torch.Tensor:
        """Rebuild the dense weight: centroid values at kept positions, zeros elsewhere."""
        out = torch.zeros(self.mask.shape, dtype=self.centroids.dtype)
        out[self.mask.bool()] = self.centroids[self.indices]
        return out


@torch.no_grad()
def share_weights(model: nn.Module, bits: int | Mapping[str, int] = 5, exclude: Iterable[str] = (), iters: int = 30) -> dict[str, SharedLayer]:
    """Cluster each prunable layer's non-zero weights into 2^bits values, in place.

    `bits` may be one int or {param_name: bits}. Zeros (pruned weights) stay
    zero and are not clustered. Returns {param_name: SharedLayer}.

    >>> layer = nn.Linear(3, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[0.0, 0.5, 0.52]]))
    >>> shared = share_weights(layer, bits=1)
    >>> layer.weight.tolist(), shared["weight"].indices.tolist()
    ([[0.0, 0.5, 0.5199999809265137]], [0, 1])
    """
    check_model(model)
    params = prunable_parameters(model, exclude)
    out = {}
    for name, param in params.items():
        b = _check_bits(bits.get(name, 5) if isinstance(bits, Mapping) else bits, f"bits for {name}")
        mask = (param.detach() != 0).to(param.dtype)
        kept = param.detach()[mask.bool()]  # (nnz,)
        if kept.numel() == 0:
            raise ValueError(f"model: {name} has no non-zero weights to share")
        centroids, assign = kmeans_1d(kept, 2**b, iters=iters)
        layer = SharedLayer(centroids=centroids, indices=assign, mask=mask.cpu(), bits=b)
        param.copy_(layer.weight().to(param.dtype))
        out[name] = layer
    return out


def finetune_centroids(model: nn.Module, shared: Mapping[str, SharedLayer], loader: Iterable, steps: int = 100, lr: float = 1e-4, loss_fn=None) -> list[float]:
    """Train only the centroids: dL/dc_j = sum of dL/dw over the weights in cluster j.

    Everything else in the model stays frozen; after each Adam step on the
    centroids the weights are rewritten from the codebook, so they stay
    shared (and pruned weights stay zero). Returns the training losses.
    """
    check_model(model)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    loss_fn = loss_fn or F.cross_entropy
    params = dict(model.named_parameters())
    for name in shared:
        if name not in params:
            raise ValueError(f"shared: {name!r} is not a parameter of the model")
    centroids = {name: nn.Parameter(layer.centroids.clone()) for name, layer in shared.items()}
    optimizer = torch.optim.Adam(list(centroids.values()), lr=lr)
    losses, step = [], 0
    model.train()
    while step < steps:
        for x, y in loader:
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.zero_grad()
            for name, layer in shared.items():
                grad = params[name].grad[layer.mask.bool()]  # (nnz,)
                centroids[name].grad = torch.zeros_like(centroids[name]).index_add_(0, layer.indices, grad.float())
            optimizer.step()
            with torch.no_grad():
                for name, layer in shared.items():
                    layer.centroids = centroids[name].detach().clone()
                    params[name].copy_(layer.weight().to(params[name].dtype))
            losses.append(loss.item())
            step += 1
            if step >= steps:
                break
    model.zero_grad(set_to_none=True)
    model.eval()
    return losses


# ---------------------------------------------------------------------------
# Huffman coding (canonical, so the table is just one length per symbol)
# ---------------------------------------------------------------------------


def _code_lengths(frequencies: Mapping[int, int]) -> dict[int, int]:
    """Huffman code length of each symbol; deterministic tie-breaking by symbol."""
    items = sorted((f, s) for s, f in frequencies.items() if f > 0)
    if not items:
        raise ValueError("symbols must not be empty")
    if len(items) == 1:
        return {items[0][1]: 1}
    # heap entries: (frequency, smallest symbol in subtree, tuple of symbols)
    heap = [(f, s, (s,)) for f, s in items]
    heapq.heapify(heap)
    lengths = {s: 0 for _, s in items}
    while len(heap) > 1:
        f1, k1, s1 = heapq.heappop(heap)
        f2, k2, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (f1 + f2, min(k1, k2), s1 + s2))
    return lengths


def _canonical(lengths: Mapping[int, int]) -> dict[int, str]:
    """Canonical codes: sort by (length, symbol), count upward, shift at each new length."""
    code, prev_len, out = 0, 0, {}
    for symbol, length in sorted(lengths.items(), key=lambda kv: (kv[1], kv[0])):
        code <<= length - prev_len
        out[symbol] = format(code, f"0{length}b")
        code += 1
        prev_len = length
    return out


@dataclass
class HuffmanCode:
    """A canonical Huffman code over non-negative int symbols.

    >>> code = HuffmanCode.from_symbols([3, 3, 3, 3, 1, 1, 7])
    >>> code.codes
    {3: '0', 1: '10', 7: '11'}
    """

    lengths: dict[int, int]
    codes: dict[int, str] = field(init=False)

    def __post_init__(self):
        if any(length > 2**LENGTH_BITS - 1 for length in self.lengths.values()):
            raise ValueError(f"lengths: a code longer than {2**LENGTH_BITS - 1} bits does not fit the {LENGTH_BITS}-bit table")
        self.codes = _canonical(self.lengths)
        self._decode_table = {c: s for s, c in self.codes.items()}

    @classmethod
    def from_symbols(cls, symbols: Iterable[int]) -> "HuffmanCode":
        symbols = [int(s) for s in symbols]
        if any(s < 0 for s in symbols):
            raise ValueError("symbols must be non-negative ints")
        return cls(_code_lengths(Counter(symbols)))

    def encode(self, symbols: Iterable[int]) -> tuple[bytes, int]:
        """(bytes, number of meaningful bits); the last byte is zero-padded."""
        try:
            bitstring = "".join(self.codes[int(s)] for s in symbols)
        except KeyError as err:
            raise ValueError(f"symbols: {err.args[0]} is not in this code's alphabet") from None
        nbits = len(bitstring)
        padded = bitstring + "0" * (-nbits % 8)
        data = int(padded, 2).to_bytes(len(padded) // 8, "big") if padded else b""
        return data, nbits

    def decode(self, data: bytes, nbits: int) -> list[int]:
        """Inverse of `encode`: read bits until each prefix matches a code."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        if isinstance(nbits, bool) or not isinstance(nbits, int) or nbits < 0:
            raise ValueError(f"nbits must be an int >= 0 (the number of meaningful bits in data), got {nbits!r}")
        if nbits > 8 * len(data):
            raise ValueError(f"nbits ({nbits}) exceeds the {8 * len(data)} bits in data")
        bits = format(int.from_bytes(data, "big"), f"0{8 * len(data)}b")[:nbits] if data else ""
        out, current = [], ""
        for bit in bits:
            current += bit
            symbol = self._decode_table.get(current)
            if symbol is not None:
                out.append(symbol)
                current = ""
        if current:
            raise ValueError("data ends in the middle of a code word")
        return out

    def table_bits(self, alphabet_size: int) -> int:
        """Bits to store the code: one LENGTH_BITS length per symbol 0..alphabet_size-1."""
        if alphabet_size <= max(self.lengths):
            raise ValueError(f"alphabet_size must exceed the largest symbol {max(self.lengths)}, got {alphabet_size}")
        return LENGTH_BITS * alphabet_size


def huffman_encode(symbols: Sequence[int]) -> tuple[HuffmanCode, bytes, int]:
    """Build a code from the symbol counts and encode: (code, bytes, nbits).

    >>> code, data, nbits = huffman_encode([5, 5, 6])
    >>> code.codes, data, nbits  # bits 001, zero-padded to one byte 0x20
    ({5: '0', 6: '1'}, b' ', 3)
    """
    if isinstance(symbols, (str, bytes)) or not isinstance(symbols, Iterable):
        raise TypeError(f"symbols must be a sequence of ints, got {type(symbols).__name__}")
    code = HuffmanCode.from_symbols(symbols)
    data, nbits = code.encode(symbols)
    return code, data, nbits


def huffman_decode(code: HuffmanCode, data: bytes, nbits: int) -> list[int]:
    """Decode what `huffman_encode` produced.

    >>> huffman_decode(*huffman_encode([5, 5, 6]))
    [5, 5, 6]
    """
    return code.decode(data, nbits)


# ---------------------------------------------------------------------------
# CSR with relative column offsets
# ---------------------------------------------------------------------------


def _as_2d(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() < 1:
        raise ValueError("weight must be a tensor with at least one dimension")
    return weight.detach().reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.detach().reshape(1, -1)


def relative_offsets_loop(weight: torch.Tensor) -> tuple[list[int], list[int]]:
    """(row_ptr, offsets) of the non-zeros, row by row: offset = col - previous col - 1.

    >>> relative_offsets_loop(torch.tensor([[0., 2., 0., 3.], [4., 0., 0., 0.]]))
    ([0, 2, 3], [1, 1, 0])
    """
    W = _as_2d(weight).tolist()
    row_ptr, offsets = [0], []
    for row in W:
        prev = -1
        for col, value in enumerate(row):
            if value != 0:
                offsets.append(col - prev - 1)
                prev = col
        row_ptr.append(len(offsets))
    return row_ptr, offsets


def relative_offsets(weight: torch.Tensor) -> tuple[list[int], list[int]]:
    """Vectorised `relative_offsets_loop` (torch.nonzero is row-major).

    >>> relative_offsets(torch.tensor([[0., 2., 0., 3.], [4., 0., 0., 0.]]))
    ([0, 2, 3], [1, 1, 0])
    """
    W = _as_2d(weight)  # (rows, cols)
    rows, cols = W.nonzero(as_tuple=True)  # (nnz,), (nnz,) row-major
    counts = torch.bincount(rows, minlength=W.shape[0])  # (rows,)
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # (rows+1,)
    prev = torch.cat([torch.tensor([-1]), cols[:-1]])  # (nnz,) previous column
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]  # first kept weight of its row
    prev = torch.where(first, torch.full_like(prev, -1), prev)
    return row_ptr.tolist(), (cols - prev - 1).tolist()


@dataclass
class CompressedLayer:
    """The real byte streams of one layer after all of Deep Compression's stages."""

    shape: tuple[int, ...]
    row_ptr: list[int]
    centroids: torch.Tensor  # (k,) fp32 codebook
    index_code: HuffmanCode
    index_data: bytes
    index_nbits: int
    offset_code: HuffmanCode
    offset_data: bytes
    offset_nbits: int

    def decode(self) -> torch.Tensor:
        """Rebuild the weight from the streams alone."""
        rows = self.shape[0]
        cols = math.prod(self.shape[1:]) if len(self.shape) > 1 else self.shape[0]
        if len(self.shape) == 1:
            rows = 1
        offsets = self.offset_code.decode(self.offset_data, self.offset_nbits) if self.offset_nbits or self.row_ptr[-1] else []
        indices = self.index_code.decode(self.index_data, self.index_nbits) if self.row_ptr[-1] else []
        W = torch.zeros(rows, cols, dtype=torch.float32)
        for r in range(rows):
            col = -1
            for j in range(self.row_ptr[r], self.row_ptr[r + 1]):
                col += offsets[j] + 1
                W[r, col] = self.centroids[indices[j]]
        return W.reshape(self.shape)


def compress_layer(shared: SharedLayer) -> CompressedLayer:
    """Encode a shared layer's cluster indices and column offsets with Huffman.

    >>> layer = SharedLayer(torch.tensor([-1.0, 1.0]), torch.tensor([1, 0, 1]), torch.tensor([[0., 1., 1.], [1., 0., 0.]]), bits=1)
    >>> c = compress_layer(layer)
    >>> c.decode().tolist()
    [[0.0, 1.0, -1.0], [1.0, 0.0, 0.0]]
    """
    # structure comes from the mask: a kept weight whose centroid is exactly 0.0
    # would otherwise vanish from a value-based CSR
    if not isinstance(shared, SharedLayer):
        raise TypeError(f"shared must be a SharedLayer (from share_weights), got {type(shared).__name__}")
    row_ptr, offsets = relative_offsets(shared.mask)
    indices = shared.indices.tolist()
    index_code, index_data, index_nbits = huffman_encode(indices) if indices else (HuffmanCode({0: 1}), b"", 0)
    offset_code, offset_data, offset_nbits = huffman_encode(offsets) if offsets else (HuffmanCode({0: 1}), b"", 0)
    return CompressedLayer(tuple(shared.mask.shape), row_ptr, shared.centroids.float().clone(), index_code, index_data, index_nbits, offset_code, offset_data, offset_nbits)


# ---------------------------------------------------------------------------
# Storage accounting
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageRow:
    """Bits of one layer (or the total) at each stage."""

    name: str
    numel: int
    nnz: int
    dense_bits: int
    csr_bits: int
    shared_bits: int
    huffman_bits: int

    def ratios(self) -> tuple[float, float, float]:
        """Compression ratios dense / stage for CSR, + sharing, + Huffman."""
        return (self.dense_bits / self.csr_bits, self.dense_bits / self.shared_bits, self.dense_bits / self.huffman_bits)


def _layer_row(name: str, shared: SharedLayer) -> tuple[StorageRow, CompressedLayer]:
    mask2d = _as_2d(shared.mask)
    rows, cols = mask2d.shape
    numel = rows * cols
    nnz = int(shared.indices.numel())
    row_ptr, offsets = relative_offsets(shared.mask)
    off_width = _width(max(offsets) if offsets else 0)
    ptr_bits = (rows + 1) * _width(nnz)
    structure = HEADER_BITS + ptr_bits
    dense = 32 * numel
    csr = structure + 32 * nnz + off_width * nnz
    sharing = structure + shared.bits * nnz + 32 * len(shared.centroids) + off_width * nnz
    compressed = compress_layer(shared)
    index_table = compressed.index_code.table_bits(2**shared.bits)
    offset_table = compressed.offset_code.table_bits(max(offsets) + 1 if offsets else 1)
    huff = structure + 32 * len(shared.centroids) + compressed.index_nbits + index_table + compressed.offset_nbits + offset_table
    return StorageRow(name, numel, nnz, dense, csr, sharing, huff), compressed


def storage_table(shared: Mapping[str, SharedLayer], verify: bool = True) -> list[StorageRow]:
    """One `StorageRow` per layer plus a "total" row (bits at each stage).

    With `verify`, every layer is decoded from its Huffman streams and
    compared with the shared weight, so a wrong count cannot hide.

    >>> layer = SharedLayer(torch.tensor([-1.0, 1.0]), torch.tensor([1, 0, 1]), torch.tensor([[0., 1., 1.], [1., 0., 0.]]), bits=1)
    >>> row = storage_table({"fc": layer})[0]
    >>> row.dense_bits, row.csr_bits, row.shared_bits  # header 128 + row_ptr 3 x 2 bits = 134
    (192, 233, 204)
    """
    if not isinstance(shared, Mapping):
        raise TypeError(f"shared must map layer names to SharedLayer (from share_weights), got {type(shared).__name__}")
    if not shared:
        raise ValueError("shared must hold at least one layer (see share_weights)")
    rows = []
    for name, layer in shared.items():
        row, compressed = _layer_row(name, layer)
        if verify and not torch.equal(compressed.decode(), layer.weight().float()):
            raise RuntimeError(f"{name}: decoding the compressed streams did not give back the shared weight")
        rows.append(row)
    total = StorageRow(
        "total",
        sum(r.numel for r in rows),
        sum(r.nnz for r in rows),
        sum(r.dense_bits for r in rows),
        sum(r.csr_bits for r in rows),
        sum(r.shared_bits for r in rows),
        sum(r.huffman_bits for r in rows),
    )
    return rows + [total]


def format_storage_table(rows: Sequence[StorageRow]) -> str:
    """Bytes (bits / 8, rounded up) and ratios per stage as a fixed-width table."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable) or not all(isinstance(r, StorageRow) for r in rows):
        raise TypeError("rows must be a list of StorageRow (from storage_table)")
    header = f"{'layer':<12}{'weights':>9}{'kept':>8}{'dense B':>10}{'CSR B':>9}{'+share B':>10}{'+Huff B':>9}{'CSR x':>7}{'share x':>9}{'Huff x':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        b = [math.ceil(x / 8) for x in (r.dense_bits, r.csr_bits, r.shared_bits, r.huffman_bits)]
        x = r.ratios()
        if r.name == "total":
            lines.append("-" * len(header))
        lines.append(f"{r.name:<12}{r.numel:>9,}{r.nnz:>8,}{b[0]:>10,}{b[1]:>9,}{b[2]:>10,}{b[3]:>9,}{x[0]:>7.1f}{x[1]:>9.1f}{x[2]:>8.1f}")
    return "\n".join(lines)
