"""chapter11.export: ONNX export, sparse initializers, int8, ORT sessions, agreement, benchmark."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from chapter11.experiments.exp05_onnx import benchmark_onnx, format_benchmark
from chapter11.export import (
    check_agreement,
    export_onnx,
    file_bytes,
    initializer_table,
    load_onnx,
    ort_session,
    quantize_int8,
    run_onnx,
    sparse_tensor_to_dense,
    sparse_tensor_to_dense_loop,
    sparsify_onnx,
    to_sparse_tensor,
    to_sparse_tensor_loop,
    to_sparse_matmul_onnx,
    sparse_matmul_session,
    replace_initializers,
    WEIGHTS_SUFFIX,
)
from chapter11.magnitude import prune_magnitude
from chapter11.masks import masks_of
from chapter11.models import LeNet300100
from chapter11.structured.channels import channel_scores, plan_by_scores, remove_channels

TO_SPARSE = [to_sparse_tensor_loop, to_sparse_tensor]
TO_DENSE = [sparse_tensor_to_dense_loop, sparse_tensor_to_dense]


def _random(shape, sparsity, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(dtype)
    a[rng.random(shape) < sparsity] = 0
    return a


def _parts(sp):
    return numpy_helper.to_array(sp.values), numpy_helper.to_array(sp.indices), list(sp.dims)


# ---------------------------------------------------------------- sparse tensors

ARRAYS = {
    "random_2d": _random((7, 9), 0.8),
    "all_zero": np.zeros((3, 4), np.float32),
    "row": _random((1, 12), 0.5, seed=1),
    "column": _random((12, 1), 0.5, seed=2),
    "dense": np.arange(1, 7, dtype=np.float32).reshape(2, 3),
    "float16": _random((5, 6), 0.7, np.float16, seed=3),
    "int8": np.array([[0, -3, 0], [7, 0, 0]], dtype=np.int8),
    "3d": _random((2, 3, 4), 0.6, seed=4),
}


@pytest.mark.parametrize("name", ARRAYS)
@pytest.mark.parametrize("index_dtype", ["int64", "int32"])
def test_loop_and_vectorised_agree_and_round_trip(name, index_dtype):
    a = ARRAYS[name]
    sp_loop, sp_vec = to_sparse_tensor_loop(a, "w", index_dtype), to_sparse_tensor(a, "w", index_dtype)
    (v1, i1, d1), (v2, i2, d2) = _parts(sp_loop), _parts(sp_vec)
    assert d1 == d2 == list(a.shape)
    assert v1.dtype == v2.dtype == a.dtype and i1.dtype == i2.dtype == np.dtype(index_dtype)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(i1, i2)
    assert v1.shape[0] == np.count_nonzero(a)
    for to_dense in TO_DENSE:
        for sp in (sp_loop, sp_vec):
            back = to_dense(sp)
            assert back.dtype == a.dtype and back.shape == a.shape
            np.testing.assert_array_equal(back, a)


def test_hand_computed_sparse_tensor():
    a = np.array([[0.0, 1.5, 0.0], [0.0, 0.0, -2.0]], dtype=np.float32)
    values, indices, dims = _parts(to_sparse_tensor(a, "W"))
    assert values.tolist() == [1.5, -2.0]
    assert indices.tolist() == [1, 5]  # row-major positions: (0, 1) -> 1, (1, 2) -> 5
    assert dims == [2, 3]


def test_coordinate_indices_are_read_too():
    # ONNX also allows (nnz, rank) coordinates instead of linear positions
    values = numpy_helper.from_array(np.array([4.0, 5.0], np.float32), "W")
    coords = numpy_helper.from_array(np.array([[0, 2], [1, 0]], np.int64), "")
    sp = helper.make_sparse_tensor(values, coords, [2, 3])
    expected = [[0.0, 0.0, 4.0], [5.0, 0.0, 0.0]]
    for to_dense in TO_DENSE:
        assert to_dense(sp).tolist() == expected


@pytest.mark.parametrize("name", ["random_2d", "all_zero", "row", "3d"])
def test_onnxruntime_densifies_our_sparse_tensor_the_same_way(name):
    # trusted reference: ORT turns a sparse initializer into a dense tensor when it loads the graph
    a = ARRAYS[name]
    node = helper.make_node("Identity", ["c"], ["y"])
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(a.shape))],
                              sparse_initializer=[to_sparse_tensor(a, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    np.testing.assert_array_equal(got, a)
    np.testing.assert_array_equal(sparse_tensor_to_dense(to_sparse_tensor(a, "c")), got)


@pytest.mark.parametrize("fn", TO_SPARSE)
def test_to_sparse_rejects_bad_input(fn):
    with pytest.raises(ValueError, match="NaN"):
        fn(np.array([0.0, np.nan], np.float32), "w")
    with pytest.raises(ValueError, match="at least one dimension"):
        fn(np.float32(1.0), "w")
    with pytest.raises(TypeError, match="array"):
        fn([[0.0, 1.0]], "w")
    with pytest.raises(ValueError, match="index_dtype"):
        fn(np.zeros(3, np.float32), "w", index_dtype="int16")


@pytest.mark.parametrize("fn", TO_DENSE)
def test_to_dense_rejects_bad_input(fn):
    with pytest.raises(TypeError, match="SparseTensorProto"):
        fn(np.zeros(3))
    values = numpy_helper.from_array(np.array([1.0], np.float32), "W")
    out_of_range = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([6], np.int64), ""), [2, 3])
    with pytest.raises(ValueError, match="indices must lie"):
        fn(out_of_range)
    mismatch = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([0, 1], np.int64), ""), [2, 3])
    with pytest.raises(ValueError, match="values but"):
        fn(mismatch)


def test_torch_tensor_input_matches_numpy():
    t = torch.tensor([[0.0, 3.0], [0.0, 0.0]])
    assert _parts(to_sparse_tensor(t, "w"))[0].tolist() == [3.0]


# ---------------------------------------------------------------- exported models


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    dense = LeNet300100(in_features=20, hidden=(64, 48)).eval()
    pruned = copy.deepcopy(dense)
    prune_magnitude(pruned, 0.9, scope="layerwise")
    small = remove_channels(dense, plan_by_scores(channel_scores(dense, "l1"), 0.5)).eval()
    return {"dense": dense, "pruned": pruned, "structured": small}


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    x = torch.randn(1, 20)
    paths = {name: export_onnx(m, x, d / f"{name}.onnx", dynamo=False) for name, m in models.items()}
    paths["int8"] = quantize_int8(paths["pruned"], d / "int8.onnx")
    paths["sparse"] = d / "sparse.onnx"
    paths["sparse_int32"] = d / "sparse_int32.onnx"
    paths["int8_sparse"] = d / "int8_sparse.onnx"
    moved = {
        "sparse": sparsify_onnx(paths["pruned"], paths["sparse"]),
        "sparse_int32": sparsify_onnx(paths["pruned"], paths["sparse_int32"], index_dtype="int32"),
        "int8_sparse": sparsify_onnx(paths["int8"], paths["int8_sparse"]),
    }
    return paths, moved


SOURCE = {"dense": "dense", "pruned": "pruned", "structured": "structured", "int8": "pruned",
          "sparse": "pruned", "sparse_int32": "pruned", "int8_sparse": "pruned"}


@pytest.mark.parametrize("kind", list(SOURCE))
def test_every_exported_kind_agrees_with_pytorch(kind, models, files):
    paths, _ = files
    x = torch.randn(33, 20, generator=torch.Generator().manual_seed(1))  # a batch size never exported
    tol, agree = (0.15, 0.9) if "int8" in kind else (1e-5, 1.0)
    result = check_agreement(models[SOURCE[kind]], ort_session(paths[kind]), x, tol=tol, min_argmax_agreement=agree)
    assert result["rel_diff"] <= tol and result["argmax_agreement"] >= agree


def test_masks_are_folded_not_exported(models, files):
    paths, _ = files
    assert masks_of(models["pruned"])  # the PyTorch model still carries its masks
    names = [i.name for i in load_onnx(paths["pruned"]).graph.initializer]
    assert not any(n.endswith("_mask") for n in names), names
    sp = {r["name"]: r for r in initializer_table(paths["pruned"])}
    assert sp["fc2.weight"]["nnz"] == round(0.1 * 64 * 48)


def test_file_size_facts(files):
    paths, moved = files
    size = {k: file_bytes(p) for k, p in paths.items()}
    # zeros are still stored: the pruned dense file is the dense file's size
    assert abs(size["pruned"] - size["dense"]) / size["dense"] < 0.01
    # sparse storage: 12 bytes per kept float32 weight (int64 index) vs 4 per weight
    for name, m in moved["sparse"].items():
        nnz = round((1 - m["sparsity"]) * np.prod(m["shape"]))
        assert m["sparse_bytes"] == nnz * 12 and m["dense_bytes"] == np.prod(m["shape"]) * 4
    assert set(moved["sparse"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert size["sparse"] < 0.5 * size["pruned"]
    assert size["sparse_int32"] < size["sparse"]
    assert size["int8"] < 0.5 * size["pruned"]  # biases and the graph stay float32 / text
    weights = lambda path: sum(r["bytes"] for r in initializer_table(path) if len(r["shape"]) == 2)
    assert weights(paths["int8"]) * 4 == weights(paths["pruned"])  # int8 weights: exactly a quarter
    assert size["int8_sparse"] < size["int8"]
    assert size["structured"] < 0.6 * size["dense"]


def test_sparse_file_passes_onnx_checker_and_int32_does_not(files):
    paths, _ = files
    onnx.checker.check_model(load_onnx(paths["sparse"]))
    with pytest.raises(onnx.checker.ValidationError, match="INT64"):
        onnx.checker.check_model(load_onnx(paths["sparse_int32"]))


def test_int8_keeps_pruned_zeros(files):
    paths, _ = files
    rows = {r["name"]: r for r in initializer_table(paths["int8"])}
    quantized = [r for r in rows.values() if r["dtype"] == "int8" and len(r["shape"]) == 2]
    assert len(quantized) == 3
    for r in quantized:
        assert 1 - r["nnz"] / np.prod(r["shape"]) >= 0.9 - 1e-9, r  # symmetric int8: zero maps to zero


def test_sparsify_skips_dense_initializers(files, tmp_path):
    paths, _ = files
    moved = sparsify_onnx(paths["dense"], tmp_path / "d.onnx")
    assert moved == {}
    assert len(load_onnx(tmp_path / "d.onnx").graph.sparse_initializer) == 0


def test_sparsify_rejects_bad_arguments(files, tmp_path):
    paths, _ = files
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify_onnx(paths["pruned"], tmp_path / "x.onnx", min_sparsity=1.0)
    with pytest.raises(ValueError, match="index_dtype"):
        sparsify_onnx(paths["pruned"], tmp_path / "x.onnx", index_dtype="int8")
    with pytest.raises(FileNotFoundError, match="path"):
        sparsify_onnx(tmp_path / "missing.onnx", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_export_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="model"):
        export_onnx("not a model", torch.zeros(1, 3), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="example_input"):
        export_onnx(torch.nn.Linear(3, 2), [0.0, 0.0, 0.0], tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="batch axis"):
        export_onnx(torch.nn.Linear(3, 2), torch.tensor(1.0), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="path"):
        export_onnx(torch.nn.Linear(3, 2), torch.zeros(1, 3), 42)


def test_session_and_run_reject_bad_arguments(files, tmp_path):
    paths, _ = files
    with pytest.raises(FileNotFoundError):
        ort_session(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="threads"):
        ort_session(paths["dense"], threads=0)
    s = ort_session(paths["dense"])
    with pytest.raises(ValueError, match="shape"):
        run_onnx(s, np.zeros((2, 21), np.float32))
    with pytest.raises(TypeError, match="x must"):
        run_onnx(s, [[0.0] * 20])
    with pytest.raises(FileNotFoundError, match="src"):
        quantize_int8(tmp_path / "missing.onnx", tmp_path / "q.onnx")


def test_check_agreement_catches_a_wrong_model(models, files):
    paths, _ = files
    x = torch.randn(8, 20)
    with pytest.raises(AssertionError, match="differ"):
        check_agreement(models["dense"], ort_session(paths["pruned"]), x)
    with pytest.raises(ValueError, match="tol"):
        check_agreement(models["dense"], ort_session(paths["dense"]), x, tol=0)


def test_benchmark_rows_and_table(files):
    paths, _ = files
    sessions = {"dense": ort_session(paths["dense"]), "structured": ort_session(paths["structured"])}
    rows = benchmark_onnx(sessions, batches=(1, 4), repeats=3, warmup=1)
    assert [(r["name"], r["batch"]) for r in rows] == [("dense", 1), ("structured", 1), ("dense", 4), ("structured", 4)]
    for r in rows:
        assert r["median_s"] > 0 and r["samples_per_s"] == pytest.approx(r["batch"] / r["median_s"])
        if r["name"] == "dense":
            assert r["speedup"] == 1.0
    table = format_benchmark(rows, {"dense": file_bytes(paths["dense"])})
    assert len(table.splitlines()) == 2 + len(rows) and "structured" in table
    with pytest.raises(ValueError, match="batches"):
        benchmark_onnx(sessions, batches=(0,))
    with pytest.raises(ValueError, match="reference"):
        benchmark_onnx(sessions, reference="nope")
    with pytest.raises(ValueError, match="at least one"):
        benchmark_onnx({})


@pytest.mark.slow
def test_dynamo_exporter_agrees_with_pytorch(models, tmp_path):
    # the torch.export-based exporter (torch >= 2.9 default); slow on first use (imports onnxscript)
    model = models["pruned"]
    path = export_onnx(model, torch.zeros(1, 20), tmp_path / "dyn.onnx", dynamo=True)
    graph_input = load_onnx(path).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # the batch axis is symbolic
    check_agreement(model, ort_session(path), torch.randn(5, 20), tol=1e-5)


# ---------------------------------------------------------------- ORT's SparseToDenseMatMul


@pytest.mark.parametrize("dynamo", [False, True])
def test_sparse_matmul_rewrite_agrees_with_pytorch(models, tmp_path, dynamo):
    src = export_onnx(models["pruned"], torch.zeros(1, 20), tmp_path / "pruned.onnx", dynamo=dynamo)
    moved = to_sparse_matmul_onnx(src, tmp_path / "op.onnx")
    assert set(moved) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert all(abs(m["sparsity"] - 0.9) < 0.01 and m["nnz"] == round(0.1 * np.prod(m["shape"])) for m in moved.values())
    graph = onnx.load(tmp_path / "op.onnx").graph
    assert [n.op_type for n in graph.node].count("SparseToDenseMatMul") == 3 and "Gemm" not in [n.op_type for n in graph.node]
    assert not {i.name for i in graph.initializer} & set(moved)  # the weights left the file ...
    assert {i.name for i in graph.input} >= set(moved)  # ... and became sparse inputs
    session = sparse_matmul_session(tmp_path / "op.onnx")
    assert [i.name for i in session.get_inputs()] == ["x"]
    x = torch.randn(17, 20, generator=torch.Generator().manual_seed(2))
    result = check_agreement(models["pruned"], session, x, tol=1e-5, min_argmax_agreement=1.0)
    assert result["rel_diff"] <= 1e-5
    rows = benchmark_onnx({"dense": ort_session(src), "op": session}, batches=(1, 4), repeats=2, warmup=1)
    assert {r["name"] for r in rows} == {"dense", "op"}


def test_sparse_matmul_as_initializer_does_not_load(models, files, tmp_path):
    paths, _ = files
    to_sparse_matmul_onnx(paths["pruned"], tmp_path / "init.onnx", store="initializer")
    assert not (tmp_path / ("init.onnx" + WEIGHTS_SUFFIX)).exists()
    assert len(onnx.load(tmp_path / "init.onnx").graph.sparse_initializer) == 3
    with pytest.raises(Exception, match="tensor\\(float\\)' of input parameter"):  # ORT densified the sparse initializer
        ort_session(tmp_path / "init.onnx")


def test_sparse_matmul_skips_dense_layers_and_rejects_bad_arguments(models, files, tmp_path):
    paths, _ = files
    one = copy.deepcopy(models["dense"])
    prune_magnitude(one, 0.9, scope="layerwise", exclude=["fc1", "fc3"])
    src = export_onnx(one, torch.zeros(1, 20), tmp_path / "one.onnx", dynamo=False)
    assert set(to_sparse_matmul_onnx(src, tmp_path / "one_op.onnx")) == {"fc2.weight"}
    assert [n.op_type for n in onnx.load(tmp_path / "one_op.onnx").graph.node].count("Gemm") == 2  # fc1, fc3 stay dense
    check_agreement(one, sparse_matmul_session(tmp_path / "one_op.onnx"), torch.randn(5, 20), tol=1e-5)
    with pytest.raises(ValueError, match="no Gemm weight is at least 95% zeros"):
        to_sparse_matmul_onnx(paths["pruned"], tmp_path / "x.onnx", min_sparsity=0.95)
    with pytest.raises(ValueError, match="no Gemm weight is at least 50% zeros"):
        to_sparse_matmul_onnx(paths["dense"], tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="store must be"):
        to_sparse_matmul_onnx(paths["pruned"], tmp_path / "x.onnx", store="disk")
    with pytest.raises(ValueError, match="min_sparsity"):
        to_sparse_matmul_onnx(paths["pruned"], tmp_path / "x.onnx", min_sparsity=1.0)
    empty = copy.deepcopy(models["dense"])
    with torch.no_grad():
        empty.fc2.weight.zero_()
    with pytest.raises(ValueError, match="fc2.weight is all zeros"):
        to_sparse_matmul_onnx(export_onnx(empty, torch.zeros(1, 20), tmp_path / "empty.onnx", dynamo=False), tmp_path / "x.onnx")
    to_sparse_matmul_onnx(paths["pruned"], tmp_path / "lost.onnx")
    (tmp_path / ("lost.onnx" + WEIGHTS_SUFFIX)).unlink()
    with pytest.raises(FileNotFoundError, match="weights file"):
        sparse_matmul_session(tmp_path / "lost.onnx")


def test_replace_initializers_gives_the_pruned_model_from_the_dense_graph(models, files, tmp_path):
    paths, _ = files
    names = replace_initializers(paths["dense"], tmp_path / "swapped.onnx", models["pruned"])  # its mask buffers are skipped
    assert set(names) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"}
    check_agreement(models["pruned"], ort_session(tmp_path / "swapped.onnx"), torch.randn(9, 20), tol=1e-5, min_argmax_agreement=1.0)
    assert file_bytes(tmp_path / "swapped.onnx") == file_bytes(paths["dense"])
    with pytest.raises(ValueError, match="not initializers of src"):
        replace_initializers(paths["dense"], tmp_path / "x.onnx", {"fc9.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="has shape"):
        replace_initializers(paths["dense"], tmp_path / "x.onnx", {"fc1.bias": np.zeros(3, np.float32)})
    with pytest.raises(TypeError, match="non-empty mapping"):
        replace_initializers(paths["dense"], tmp_path / "x.onnx", {})
