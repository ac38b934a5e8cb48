"""Export a (pruned) model to ONNX and run it with ONNX Runtime: sizes, speed, agreement.

The chapter's last two workflow steps are "export" and "benchmark on the
target runtime". This module covers the ONNX Runtime (ORT) path on a CPU:

- `export_onnx`: `torch.onnx.export` with a dynamic batch axis, written
  atomically (pruning masks are folded into the weights first).
- ONNX sparse initializers: a weight that is mostly zeros is stored as a
  `SparseTensorProto` (COO: the kept values plus one linear index per value).
  `to_sparse_tensor_loop` / `to_sparse_tensor` build one,
  `sparse_tensor_to_dense_loop` / `sparse_tensor_to_dense` go back, and
  `sparsify_onnx` rewrites a whole file. Bytes per kept float32 weight:
  4 (value) + 8 (int64 index, what the ONNX spec requires) = 12, so the file
  shrinks once fewer than 1/3 of the weights are kept (3.3x smaller at 90%
  sparsity). `index_dtype="int32"` stores 8 bytes per kept weight (5x at
  90%); ORT loads it, but `onnx.checker` rejects it as non-standard.
- `quantize_int8`: ORT's own dynamic quantizer (int8 weights, activations
  quantized on the fly), the chapter's "compound gains" with pruning.
- `ort_session`, `run_onnx`: a CPU session with a fixed thread count.
- `check_agreement`: the ONNX file against the PyTorch model on the same input.
- Timing the sessions against each other is Experiment 5's driver,
  `chapter11.experiments.exp05_onnx.benchmark_onnx`.

- `to_sparse_matmul_onnx`, `sparse_matmul_session`: ORT's one sparse
  kernel, the contrib operator `com.microsoft.SparseToDenseMatMul` (a sparse
  matrix times a dense one). Each mostly-zero Gemm becomes that operator plus
  a Transpose (and an Add for the bias). The operator reads its sparse
  argument only from a graph *input* of type `sparse_tensor`, fed at run time
  as an ORT CSR tensor (`SparseMatMulSession` keeps them and feeds them on
  every call); stored as a sparse initializer the file does not load.

What to expect (and why): ORT turns sparse initializers back into dense
tensors when it loads a model (microsoft/onnxruntime PR #5540), and its CPU
matrix kernels multiply every zero, so unstructured sparsity shrinks the file
but not the time. Only a physically smaller model (structured pruning,
`chapter11.structured.channels.remove_channels`), cheaper arithmetic (int8),
or the sparse contrib operator at high enough sparsity runs faster.

    >>> import numpy as np
    >>> sp = to_sparse_tensor(np.array([[0.0, 2.0], [0.0, 3.0]], dtype=np.float32), "W")
    >>> from onnx.numpy_helper import to_array
    >>> list(sp.dims), to_array(sp.values).tolist(), to_array(sp.indices).tolist()
    ([2, 2], [2.0, 3.0], [1, 3])
    >>> sparse_tensor_to_dense(sp).tolist()
    [[0.0, 2.0], [0.0, 3.0]]

But: single-file models under 2 GB only (no external data), CPU execution
provider only, float32 and int8 initializers as exported by torch / ORT's
quantizer; the sparse operator rewrite handles plain Gemm nodes (alpha = beta
= 1, transA = 0) with float32 weights only, and no static (calibrated)
quantization.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .masks import refuse_torch_prune, remove_masks
from .report import atomic_write_bytes
from .sparsity import check_sparsity
from .train import model_device

__all__ = [
    "export_onnx", "load_onnx", "save_onnx", "to_sparse_tensor_loop", "to_sparse_tensor",
    "sparse_tensor_to_dense_loop", "sparse_tensor_to_dense", "sparsify_onnx", "initializer_table", "quantize_int8",
    "ort_session", "run_onnx", "check_agreement", "file_bytes",     "replace_initializers", "to_sparse_matmul_onnx", "sparse_matmul_session", "SparseMatMulSession", "INDEX_DTYPES",
    "WEIGHTS_SUFFIX",
]

INDEX_DTYPES = ("int64", "int32")


# ---------------------------------------------------------------- export


def _check_path(path, name: str = "path") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _check_existing(path, name: str = "path") -> Path:
    path = _check_path(path, name)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no file at {str(path)!r}")
    return path


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path,
    dynamo: bool = True,
    opset_version: int | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """Export `model` (in eval mode) to an ONNX file at `path`; returns the path.

    The graph has one input "x" and one output "y"; with `dynamic_batch` the
    first axis is named "batch" and may take any size. A copy of the model is
    exported with any `chapter11.masks` buffers folded into the weights, so
    masked and plain models give the same file. `dynamo=True` uses the
    torch.export-based exporter (needs onnxscript), `dynamo=False` the older
    TorchScript one (deprecated in torch >= 2.9, but faster to run).

    >>> import tempfile, os, onnx
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = export_onnx(nn.Linear(3, 2), torch.zeros(1, 3), os.path.join(d, "m.onnx"), dynamo=False)
    ...     [n.op_type for n in onnx.load(p).graph.node]
    ['Gemm']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if example_input.ndim < 1:
        raise ValueError(f"example_input must have a batch axis, got shape {tuple(example_input.shape)}")
    path = _check_path(path)
    refuse_torch_prune(model)
    clean = copy.deepcopy(model).eval().cpu()  # ONNX Runtime runs here on the CPU, whatever device trained the model
    example_input = example_input.detach().cpu()
    remove_masks(clean)  # weights already hold the zeros; drop the *_mask buffers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer chatter; the result is checked by the caller
        if dynamo:
            shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
            with contextlib.redirect_stdout(io.StringIO()):
                program = torch.onnx.export(
                    clean, (example_input,), None, input_names=["x"], output_names=["y"], dynamo=True,
                    dynamic_shapes=shapes, opset_version=opset_version, verbose=False,
                )
            data = program.model_proto.SerializeToString()
        else:
            buffer = io.BytesIO()
            axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
            kwargs = {} if opset_version is None else {"opset_version": opset_version}
            torch.onnx.export(clean, (example_input,), buffer, input_names=["x"], output_names=["y"], dynamo=False,
                              dynamic_axes=axes, **kwargs)
            data = buffer.getvalue()
    return atomic_write_bytes(data, path)


def load_onnx(path):
    """`onnx.load` with a clear error for a missing file."""
    import onnx

    return onnx.load(str(_check_existing(path)))


def save_onnx(model_proto, path) -> Path:
    """Serialise an `onnx.ModelProto` to `path` atomically."""
    import onnx

    if not isinstance(model_proto, onnx.ModelProto):
        raise TypeError(f"model_proto must be an onnx.ModelProto, got {type(model_proto).__name__}")
    return atomic_write_bytes(model_proto.SerializeToString(), _check_path(path))


def replace_initializers(src, dst, weights) -> list[str]:
    """Copy the ONNX file `src` to `dst` with new values for named initializers; returns their names.

    `weights` maps initializer names to arrays or tensors of the same shape
    and dtype, or is an `nn.Module` whose `state_dict()` gives them (mask
    buffers are skipped). One export then serves many pruned copies of a
    model: the graph stays, only the numbers change (much faster than
    exporting each copy). Every given name must be an initializer of `src`.
    """
    from onnx import numpy_helper

    if isinstance(weights, nn.Module):
        weights = {k: v for k, v in weights.state_dict().items() if not k.endswith("_mask")}
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError(f"weights must be a non-empty mapping of names to arrays, or an nn.Module, got {type(weights).__name__}")
    model = load_onnx(src)
    inits = {i.name: i for i in model.graph.initializer}
    unknown = sorted(set(weights) - set(inits))
    if unknown:
        raise ValueError(f"weights: {unknown[:5]} are not initializers of src (it has {sorted(inits)[:8]}...)")
    for name, value in weights.items():
        old = numpy_helper.to_array(inits[name])
        new = _check_array(value, f"weights[{name!r}]")
        if new.shape != old.shape or new.dtype != old.dtype:
            raise ValueError(f"weights[{name!r}] has shape {new.shape} and dtype {new.dtype}; src holds {old.shape} {old.dtype}")
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), name))
    save_onnx(model, dst)
    return list(weights)


# ---------------------------------------------------------------- sparse initializers


def _check_array(array, name: str = "array") -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if isinstance(array, np.generic):
        array = np.asarray(array)
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(array).__name__}")
    if array.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if array.dtype.kind == "f" and np.isnan(array).any():
        raise ValueError(f"{name} holds NaN values; a sparse tensor cannot store them faithfully")
    return array


def _check_index_dtype(index_dtype) -> np.dtype:
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype must be one of {INDEX_DTYPES}, got {index_dtype!r}")
    dtype = np.dtype(index_dtype)
    return dtype


def _make_sparse(values: np.ndarray, indices: np.ndarray, dims: Sequence[int], name: str):
    from onnx import helper, numpy_helper

    return helper.make_sparse_tensor(numpy_helper.from_array(values, name), numpy_helper.from_array(indices, ""), list(dims))


def to_sparse_tensor_loop(array, name: str, index_dtype: str = "int64"):
    """ONNX `SparseTensorProto` of `array`, built with a plain loop over its elements.

    ONNX's COO layout with linearised indices: element k of the flattened
    (row-major) array is kept when it is non-zero; `values` holds the kept
    numbers in order and `indices` their positions k, so the dense tensor is
    dense.flat[indices[j]] = values[j] and zero everywhere else.

    >>> import numpy as np
    >>> sp = to_sparse_tensor_loop(np.array([[0.0, 2.0, 0.0], [4.0, 0.0, 0.0]], dtype=np.float32), "W")
    >>> list(sp.dims), np.frombuffer(sp.indices.raw_data, np.int64).tolist()
    ([2, 3], [1, 3])
    """
    a = _check_array(array)
    index = _check_index_dtype(index_dtype)
    if a.size and a.size - 1 > np.iinfo(index).max:
        raise ValueError(f"index_dtype {index_dtype} cannot index {a.size} elements")
    flat = a.reshape(-1)  # (numel,) row-major
    kept_values, kept_positions = [], []
    for k in range(flat.shape[0]):
        if flat[k] != 0:
            kept_values.append(flat[k])
            kept_positions.append(k)
    values = np.array(kept_values, dtype=a.dtype)  # (nnz,)
    indices = np.array(kept_positions, dtype=index)  # (nnz,)
    return _make_sparse(values, indices, a.shape, name)


def to_sparse_tensor(array, name: str, index_dtype: str = "int64"):
    """Vectorised `to_sparse_tensor_loop` (np.flatnonzero).

    >>> import numpy as np
    >>> sp = to_sparse_tensor(np.eye(3, dtype=np.float32), "I")
    >>> np.frombuffer(sp.indices.raw_data, np.int64).tolist()
    [0, 4, 8]
    """
    a = _check_array(array)
    index = _check_index_dtype(index_dtype)
    if a.size and a.size - 1 > np.iinfo(index).max:
        raise ValueError(f"index_dtype {index_dtype} cannot index {a.size} elements")
    flat = a.reshape(-1)  # (numel,)
    positions = np.flatnonzero(flat)  # (nnz,)
    return _make_sparse(flat[positions], positions.astype(index), a.shape, name)


def _sparse_parts(sparse) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    import onnx
    from onnx import numpy_helper

    if not isinstance(sparse, onnx.SparseTensorProto):
        raise TypeError(f"sparse must be an onnx.SparseTensorProto, got {type(sparse).__name__}")
    dims = tuple(int(d) for d in sparse.dims)
    values = numpy_helper.to_array(sparse.values)  # (nnz,)
    indices = numpy_helper.to_array(sparse.indices)  # (nnz,) linear or (nnz, rank) coordinates
    if indices.ndim == 2:  # coordinate form: turn each row of coordinates into a linear position
        indices = np.ravel_multi_index(tuple(indices.T), dims) if indices.size else indices.reshape(0)
    if indices.shape[0] != values.shape[0]:
        raise ValueError(f"sparse: {values.shape[0]} values but {indices.shape[0]} indices")
    numel = int(np.prod(dims))
    if indices.size and (indices.min() < 0 or indices.max() >= numel):
        raise ValueError(f"sparse: indices must lie in [0, {numel}) for dims {list(dims)}")
    return values, indices, dims


def sparse_tensor_to_dense_loop(sparse) -> np.ndarray:
    """The dense numpy array of a `SparseTensorProto`, filled one value at a time.

    >>> import numpy as np
    >>> sparse_tensor_to_dense_loop(to_sparse_tensor(np.array([0.0, 5.0], dtype=np.float32), "v")).tolist()
    [0.0, 5.0]
    """
    values, indices, dims = _sparse_parts(sparse)
    flat = np.zeros(int(np.prod(dims)), dtype=values.dtype)  # (numel,)
    for j in range(values.shape[0]):
        flat[int(indices[j])] = values[j]
    return flat.reshape(dims)


def sparse_tensor_to_dense(sparse) -> np.ndarray:
    """Vectorised `sparse_tensor_to_dense_loop` (one fancy-index assignment).

    >>> import numpy as np
    >>> sparse_tensor_to_dense(to_sparse_tensor(np.array([[0, 7], [1, 0]], dtype=np.int8), "q")).tolist()
    [[0, 7], [1, 0]]
    """
    values, indices, dims = _sparse_parts(sparse)
    flat = np.zeros(int(np.prod(dims)), dtype=values.dtype)  # (numel,)
    flat[indices.astype(np.int64)] = values
    return flat.reshape(dims)


def sparsify_onnx(src, dst, min_sparsity: float = 0.5, index_dtype: str = "int64", check: bool = True) -> dict[str, dict]:
    """Copy the ONNX file `src` to `dst`, storing mostly-zero initializers sparsely.

    An initializer moves to `graph.sparse_initializer` when its sparsity is
    at least `min_sparsity` and the sparse form takes fewer bytes. Returns
    {name: {"shape", "sparsity", "dense_bytes", "sparse_bytes"}} for the
    moved ones. With `check` (and int64 indices) the result must pass
    `onnx.checker.check_model`.
    """
    import onnx

    check_sparsity(min_sparsity, "min_sparsity")
    index = _check_index_dtype(index_dtype)
    model = load_onnx(src)
    graph = model.graph
    moved, keep = {}, []
    for init in graph.initializer:
        array = onnx.numpy_helper.to_array(init)
        if array.ndim == 0 or array.size == 0 or array.dtype.kind not in "fiu":
            keep.append(init)
            continue
        nnz = int(np.count_nonzero(array))
        s = 1.0 - nnz / array.size
        sparse_bytes = nnz * (array.dtype.itemsize + index.itemsize)
        if s < min_sparsity or sparse_bytes >= array.nbytes:
            keep.append(init)
            continue
        graph.sparse_initializer.append(to_sparse_tensor(array, init.name, index_dtype))
        moved[init.name] = {"shape": tuple(array.shape), "sparsity": s, "dense_bytes": int(array.nbytes), "sparse_bytes": sparse_bytes}
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if check and index_dtype == "int64":
        onnx.checker.check_model(model)
    save_onnx(model, dst)
    return moved


def initializer_table(path) -> list[dict]:
    """One row per stored weight of an ONNX file: name, shape, dtype, form, non-zeros, bytes.

    `bytes` is what the tensor's payload takes in the file (values, plus
    indices for sparse ones); the file adds a little graph description.
    """
    import onnx

    model = load_onnx(path)
    rows = []
    for init in model.graph.initializer:
        a = onnx.numpy_helper.to_array(init)
        rows.append({"name": init.name, "shape": tuple(a.shape), "dtype": str(a.dtype), "form": "dense",
                     "nnz": int(np.count_nonzero(a)), "bytes": int(a.nbytes)})
    for sp in model.graph.sparse_initializer:
        values, indices, dims = _sparse_parts(sp)
        raw_indices = onnx.numpy_helper.to_array(sp.indices)
        rows.append({"name": sp.values.name, "shape": dims, "dtype": str(values.dtype), "form": "sparse",
                     "nnz": int(np.count_nonzero(values)), "bytes": int(values.nbytes + raw_indices.nbytes)})
    return rows


# ---------------------------------------------------------------- quantization


def quantize_int8(src, dst, per_channel: bool = False) -> Path:
    """ONNX Runtime's dynamic int8 quantization of `src`, written atomically to `dst`.

    Weights of MatMul/Gemm become int8 with a float scale (symmetric, zero
    point 0, so pruned zeros stay exactly zero); activations are quantized
    on the fly at run time (MatMulInteger). About 4x smaller weights.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = _check_existing(src, "src")
    dst = _check_path(dst, "dst")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".onnx", dir=dst.parent)
    os.close(fd)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a "consider pre-processing" hint at WARNING
    try:
        quantize_dynamic(str(src), tmp, weight_type=QuantType.QInt8, per_channel=per_channel)
        os.replace(tmp, dst)
    finally:
        root.setLevel(level)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


# ---------------------------------------------------------------- ORT's sparse operator

WEIGHTS_SUFFIX = ".sparse_weights.npz"


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def to_sparse_matmul_onnx(src, dst, min_sparsity: float = 0.5, store: str = "input") -> dict[str, dict]:
    """Copy `src` to `dst` with each mostly-zero Gemm running on `com.microsoft.SparseToDenseMatMul`.

    A Gemm y = x W^T + b (transB = 1, alpha = beta = 1, transA = 0) whose
    float32 weight W is at least `min_sparsity` zeros becomes
    y^T = SparseToDenseMatMul(W, x^T) (out, batch) between two Transposes,
    then Add b. (The operator's transB attribute would save the first
    Transpose, but ORT's shape inference ignores it and rejects the next
    layer.) `store` says where W goes:

    - "input" (what ORT runs): W becomes a graph input of type
      `sparse_tensor(float)`; its CSR parts are written next to `dst` as
      `dst + WEIGHTS_SUFFIX` (an .npz), and `sparse_matmul_session` feeds them.
    - "initializer": W stays in the file as a sparse initializer. ORT
      densifies those at load time, so the session refuses the graph; kept to
      show that failure.

    Returns {weight name: {"shape", "sparsity", "nnz"}} for the moved weights.
    """
    import onnx
    from onnx import TensorProto, helper

    check_sparsity(min_sparsity, "min_sparsity")
    if store not in ("input", "initializer"):
        raise ValueError(f"store must be 'input' or 'initializer', got {store!r}")
    dst = _check_path(dst, "dst")
    model = load_onnx(src)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    moved, parts, nodes = {}, {}, []
    for node in graph.node:
        w_name = node.input[1] if node.op_type == "Gemm" and len(node.input) >= 2 else None
        plain = (w_name in inits and uses.get(w_name) == 1 and _attr(node, "transB", 0) == 1 and _attr(node, "transA", 0) == 0
                 and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0)
        W = onnx.numpy_helper.to_array(inits[w_name]) if plain else None
        if W is None or W.dtype != np.float32 or W.ndim != 2 or 1 - np.count_nonzero(W) / W.size < min_sparsity:
            nodes.append(node)
            continue
        if not np.count_nonzero(W) and store == "input":
            raise ValueError(f"src: {w_name} is all zeros; ORT's CSR tensors cannot hold an empty matrix (remove the layer instead)")
        y = node.output[0]
        xt, yt, yd = f"{y}__input_t", f"{y}__sparse_t", f"{y}__dense"
        # ORT's shape inference for this operator ignores transB, so the input is transposed by its own node
        nodes.append(helper.make_node("Transpose", [node.input[0]], [xt], perm=[1, 0], name=f"{node.name}_input_t"))
        nodes.append(helper.make_node("SparseToDenseMatMul", [w_name, xt], [yt], domain="com.microsoft", name=f"{node.name}_sparse"))
        has_bias = len(node.input) >= 3 and node.input[2]
        nodes.append(helper.make_node("Transpose", [yt], [yd if has_bias else y], perm=[1, 0], name=f"{node.name}_transpose"))
        if has_bias:
            nodes.append(helper.make_node("Add", [yd, node.input[2]], [y], name=f"{node.name}_bias"))
        moved[w_name] = {"shape": tuple(W.shape), "sparsity": 1 - np.count_nonzero(W) / W.size, "nnz": int(np.count_nonzero(W))}
        parts[w_name] = W
    if not moved:
        raise ValueError(f"src: no Gemm weight is at least {min_sparsity:.0%} zeros; nothing to rewrite")
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [i for i in graph.initializer if i.name not in moved]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    info = [v for v in graph.value_info if v.name not in moved]  # the exporter's dense type for W no longer holds
    del graph.value_info[:]
    graph.value_info.extend(info)
    for name, W in parts.items():
        if store == "input":
            graph.input.append(helper.make_sparse_tensor_value_info(name, TensorProto.FLOAT, list(W.shape)))
        else:
            graph.sparse_initializer.append(to_sparse_tensor(W, name))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    save_onnx(model, dst)
    if store == "input":
        buffer = io.BytesIO()
        csr = {}
        for name, W in parts.items():
            rows, cols = np.nonzero(W)  # row-major order: CSR's order
            indptr = np.zeros(W.shape[0] + 1, dtype=np.int64)  # (rows + 1,)
            np.cumsum(np.bincount(rows, minlength=W.shape[0]), out=indptr[1:])
            csr[f"{name}::data"], csr[f"{name}::indices"] = W[rows, cols], cols.astype(np.int64)
            csr[f"{name}::indptr"], csr[f"{name}::shape"] = indptr, np.array(W.shape, dtype=np.int64)
        np.savez(buffer, **csr)
        atomic_write_bytes(buffer.getvalue(), Path(str(dst) + WEIGHTS_SUFFIX))
    return moved


class SparseMatMulSession:
    """An ORT session whose sparse-tensor inputs (weights) are fed as CSR on every call.

    Behaves like an `onnxruntime.InferenceSession` for `run_onnx`,
    `check_agreement` and `benchmark_onnx`: `get_inputs()` lists only the
    dense inputs, and `run(None, feeds)` adds the weights.
    """

    def __init__(self, session, weights: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]]):
        import onnxruntime as ort

        self.session = session
        self._arrays = dict(weights)  # ORT's CSR tensors point into these arrays: keep them alive
        device = ort.OrtDevice.make("cpu", 0)
        self._values = {}
        for name, (data, indices, indptr, shape) in self._arrays.items():
            tensor = ort.SparseTensor.sparse_csr_from_numpy(np.array(shape, dtype=np.int64), data, indices, indptr, device)
            self._values[name] = ort.OrtValue.ort_value_from_sparse_tensor(tensor)

    def get_inputs(self):
        return [i for i in self.session.get_inputs() if i.name not in self._values]

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, output_names, feeds):
        import onnxruntime as ort

        values = dict(self._values)
        values.update({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
        names = output_names or [o.name for o in self.session.get_outputs()]
        return [v.numpy() for v in self.session.run_with_ort_values(names, values)]


def sparse_matmul_session(path, threads: int = 2, spinning: bool = False) -> SparseMatMulSession:
    """A `SparseMatMulSession` for a file written by `to_sparse_matmul_onnx(..., store="input")`."""
    path = _check_existing(path)
    weights_path = _check_existing(Path(str(path) + WEIGHTS_SUFFIX), "weights file")
    with np.load(weights_path) as z:
        names = sorted({k.split("::")[0] for k in z.files})
        weights = {n: (z[f"{n}::data"], z[f"{n}::indices"], z[f"{n}::indptr"], tuple(int(d) for d in z[f"{n}::shape"])) for n in names}
    return SparseMatMulSession(ort_session(path, threads=threads, spinning=spinning), weights)


# ---------------------------------------------------------------- running


def ort_session(path, threads: int = 2, spinning: bool = False):
    """A CPU `onnxruntime.InferenceSession` for `path` with `threads` intra-op threads.

    Spinning (threads busy-waiting between calls) is off by default: on a
    shared machine it burns other people's cores for a small latency gain.
    """
    import onnxruntime as ort

    path = _check_existing(path)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session, x) -> np.ndarray:
    """Run a one-input session on `x` (tensor or array, cast to float32)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a torch tensor or numpy array, got {type(x).__name__}")
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"session must have exactly one input, it has {len(inputs)}")
    expected = inputs[0].shape
    if len(expected) != x.ndim or any(isinstance(e, int) and e != d for e, d in zip(expected, x.shape)):
        raise ValueError(f"x has shape {tuple(x.shape)}, the model expects {expected}")
    return session.run(None, {inputs[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0]


@torch.no_grad()
def check_agreement(model: nn.Module, session, x, tol: float = 1e-4, min_argmax_agreement: float | None = None) -> dict:
    """Compare the session's output with `model(x)`; raise AssertionError if they differ.

    Returns {"max_abs_diff", "rel_diff" (max |diff| / max |torch output|),
    "argmax_agreement" (fraction of rows whose largest output is the same)}.
    `tol` bounds rel_diff (1e-4 fits float32 exports; int8 needs 0.05-0.15).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    was_training = model.training
    model.eval()
    try:
        x_t = torch.as_tensor(x, dtype=torch.float32).cpu()
        ref = model(x_t.to(model_device(model))).cpu().numpy()  # (B, out), wherever the model lives
    finally:
        model.train(was_training)
    got = run_onnx(session, x_t)  # (B, out)
    if got.shape != ref.shape:
        raise AssertionError(f"ONNX output shape {got.shape} differs from PyTorch's {ref.shape}")
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    rel = diff / scale if scale > 0 else diff
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean()) if ref.ndim >= 2 and ref.size else 1.0
    result = {"max_abs_diff": diff, "rel_diff": rel, "argmax_agreement": agree}
    if not rel <= tol:
        raise AssertionError(f"ONNX and PyTorch outputs differ: rel_diff {rel:.3g} > tol {tol:g} ({result})")
    if min_argmax_agreement is not None and agree < min_argmax_agreement:
        raise AssertionError(f"ONNX and PyTorch pick the same class for only {agree:.3f} of rows (< {min_argmax_agreement})")
    return result


def file_bytes(path) -> int:
    """Size of a file in bytes."""
    return _check_existing(path).stat().st_size
