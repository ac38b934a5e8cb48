"""CSR format, kernels, storage accounting, SparseLinear and the sparse benchmark."""

import json
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from chapter11.csr import (
    CSR,
    FIXED_WIDTH,
    NUMBA_MIN_BATCH,
    SparseLinear,
    _backend,
    csr_matmul,
    csr_matmul_loop,
    csr_matvec,
    csr_matvec_loop,
    csr_nbytes,
    index_dtype_for,
    sparsify,
    storage_bytes,
    to_csr,
    to_csr_loop,
    to_dense,
    to_dense_loop,
    traffic_limit,
)
from chapter11.experiments.exp08_kernels import matmul_variants, matvec_variants
from chapter11.experiments.exp08_kernels import benchmark, sparse_main, crossover_sparsity


BACKENDS_HERE = ("auto", "numba") + (("mkl",) if torch.backends.mkl.is_available() else ())


def pruned(rows, cols, sparsity, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W[torch.rand(rows, cols, generator=g) < sparsity] = 0.0
    return W.to(dtype)


def same_csr(a: CSR, b: CSR):
    assert a.shape == b.shape
    for name in ("data", "indices", "indptr"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


EDGE_CASES = {
    "empty_rows_and_cols": torch.tensor([[0.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]),
    "all_zero": torch.zeros(3, 4),
    "row_1xN": torch.tensor([[0.0, 1.5, 0.0, -2.0, 0.0]]),
    "col_Nx1": torch.tensor([[0.0], [3.0], [0.0], [-1.0]]),
    "single_zero": torch.zeros(1, 1),
    "no_zeros": torch.arange(1.0, 7.0).reshape(2, 3),
    "random": pruned(17, 23, 0.7),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_round_trip_exact_and_loop_agrees(case, dtype):
    W = EDGE_CASES[case].to(dtype)
    A = to_csr(W)
    same_csr(A, to_csr_loop(W))
    for back in (to_dense(A), to_dense_loop(A)):
        assert back.dtype == dtype
        assert torch.equal(back, W)
    assert A.nnz == int(torch.count_nonzero(W))
    assert A.indptr[0] == 0 and A.indptr[-1] == A.nnz and len(A.indptr) == W.shape[0] + 1


def test_hand_computed_layout_matches_scipy():
    W = EDGE_CASES["empty_rows_and_cols"]
    A = to_csr(W, index_dtype="int32")
    assert A.data.tolist() == [5.0, 1.0]
    assert A.indices.tolist() == [1, 0]
    assert A.indptr.tolist() == [0, 0, 1, 1, 2]
    S = sp.csr_array(W.numpy())
    np.testing.assert_array_equal(A.indices, S.indices)
    np.testing.assert_array_equal(A.indptr, S.indptr)
    np.testing.assert_array_equal(A.data, S.data)


def test_numpy_input_and_interop():
    W = pruned(9, 11, 0.6).numpy()
    A = to_csr(W)
    assert torch.equal(to_dense(A), torch.from_numpy(W))
    np.testing.assert_array_equal(A.to_scipy().toarray(), W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(A.to_torch().to_dense(), torch.from_numpy(W))


def test_index_dtype_chosen_by_size():
    assert index_dtype_for(1) == np.int16
    assert index_dtype_for(32768) == np.int16  # last column index 32767 still fits
    assert index_dtype_for(32769) == np.int32
    W = torch.zeros(1, 40000)
    W[0, 39999] = 1.0
    A = to_csr(W)
    assert A.indices.dtype == np.int32 and A.indices.tolist() == [39999]
    assert torch.equal(to_dense(A), W)
    assert to_csr(torch.ones(2, 100)).indices.dtype == np.int16
    assert to_csr(torch.ones(2, 100), index_dtype=torch.int32).indices.dtype == np.int32
    with pytest.raises(ValueError, match="index_dtype int16 cannot index 40000 columns"):
        to_csr(W, index_dtype="int16")
    with pytest.raises(ValueError, match="index_dtype must be"):
        to_csr(W, index_dtype="uint8")


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.zeros(2, 2, 2), ValueError, "weight must be 2-D"),
        (torch.zeros(4), ValueError, "weight must be 2-D"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN"),
        (torch.tensor([[1.0, float("inf")]]), ValueError, "NaN or inf"),
        (torch.zeros(2, 2, dtype=torch.int32), TypeError, "float16, float32 or float64"),
        (torch.zeros(2, 2, dtype=torch.bfloat16), TypeError, "bfloat16"),
        ([[1.0, 0.0]], TypeError, "torch.Tensor or numpy array"),
    ],
)
def test_bad_weights_raise(bad, error, match):
    for fn in (to_csr, to_csr_loop, storage_bytes):
        with pytest.raises(error, match=match):
            fn(bad)


def test_to_dense_wants_csr():
    with pytest.raises(TypeError, match="csr must be a chapter11.csr.CSR"):
        to_dense(torch.zeros(2, 2))


# ------------------------------------------------------------------ kernels

SHAPES = [(1, 1), (1, 13), (13, 1), (37, 50), (128, 96)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_matvec_agrees_with_loop_scipy_and_torch(shape, sparsity):
    W = pruned(*shape, sparsity, seed=shape[0] * 7 + shape[1])
    x = torch.randn(shape[1], generator=torch.Generator().manual_seed(1))
    A = to_csr(W)
    want = (W.double() @ x.double()).float()
    S = sp.csr_array(W.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T = W.to_sparse_csr()
    ours = [csr_matvec(A, x, backend=b) for b in BACKENDS_HERE] + [csr_matvec(A, x, num_threads=1)]
    for got in (csr_matvec_loop(A, x), *ours, torch.from_numpy(S @ x.numpy()), T @ x):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 3, 32, 64])
def test_matmul_agrees_with_loop_scipy_and_torch(shape, batch):
    W = pruned(*shape, 0.8, seed=shape[0] + batch)
    X = torch.randn(shape[1], batch, generator=torch.Generator().manual_seed(2))  # (cols, batch)
    A = to_csr(W)
    want = (W.double() @ X.double()).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T = W.to_sparse_csr()
    ours = [csr_matmul(A, X, backend=b) for b in BACKENDS_HERE] + [csr_matmul(A, X, num_threads=1)]
    for got in (csr_matmul_loop(A, X), *ours, torch.from_numpy(sp.csr_array(W.numpy()) @ X.numpy()), T @ X):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index_dtype", ["int16", "int32", "int64"])
def test_teaching_variants_agree_with_the_loop(index_dtype):
    W = pruned(37, 29, 0.7, seed=11)
    W[3] = 0.0  # an empty row
    A = to_csr(W, index_dtype=index_dtype)
    x = torch.randn(29, generator=torch.Generator().manual_seed(3))
    X = torch.randn(29, FIXED_WIDTH, generator=torch.Generator().manual_seed(4))
    want = csr_matvec_loop(A, x).numpy()
    for name, f in matvec_variants().items():
        np.testing.assert_allclose(f(A, x), want, rtol=1e-5, atol=1e-5, err_msg=name)
    want = csr_matmul_loop(A, X).numpy()
    for name, f in matmul_variants().items():
        np.testing.assert_allclose(f(A, X), want, rtol=1e-5, atol=1e-5, err_msg=name)
    assert set(matvec_variants()) == {"signed index", "unsigned index", "unsigned, reordered"}
    with pytest.raises(ValueError, match=f"X must have {FIXED_WIDTH} columns"):
        matmul_variants()["fixed width"](A, X[:, :8])


def test_fixed_width_path_is_taken_and_agrees(monkeypatch):
    import chapter11.csr as csr_module

    W = pruned(300, 200, 0.5, seed=12)  # 30k values x 32 columns: above PARALLEL_MIN_WORK, so threaded
    A = to_csr(W)
    X = torch.randn(200, FIXED_WIDTH, generator=torch.Generator().manual_seed(5))
    want = (W.double() @ X.double()).float()
    for threads in (1, 2, None):
        torch.testing.assert_close(csr_matmul(A, X, num_threads=threads, backend="numba"), want, rtol=1e-5, atol=1e-4)
    calls = []
    real = csr_module._matmul_fixed_serial
    monkeypatch.setattr(csr_module, "_matmul_fixed_serial", lambda *args: calls.append(args[3].shape) or real(*args))
    csr_matmul(A, X, num_threads=1)
    csr_matmul(A, X[:, :31].contiguous(), num_threads=1)  # any other width takes the general kernel
    assert calls == [(200, FIXED_WIDTH)]


def test_auto_backend_rules():
    mkl = torch.backends.mkl.is_available()
    assert _backend("auto", None, None, batch=1) == "numba"
    assert _backend("auto", None, None, batch=NUMBA_MIN_BATCH) == "numba"
    assert _backend("auto", None, None, batch=NUMBA_MIN_BATCH - 1) == ("mkl" if mkl else "numba")
    assert _backend("auto", np.empty(1), None, batch=2) == "numba"  # out= is ours only
    assert _backend("auto", None, 1, batch=2) == "numba"
    assert _backend("numba", None, None, batch=2) == "numba"
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend("cuda", None, None, batch=1)


def test_kernels_propagate_nan_and_inf_in_the_input():
    # fastmath here is reassoc + contract only: NaN and inf keep their meaning
    W = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 1.0], [0.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    A = to_csr(W)
    x = torch.tensor([float("nan"), 1.0, 1.0, 1.0, 1.0, float("inf")])
    for threads in (1, None):
        y = csr_matvec(A, x, num_threads=threads, backend="numba")
        assert torch.isnan(y[0]) and y[1].item() == 3.0
    X = torch.stack([x, torch.ones(6)], dim=1)  # (6, 2)
    Y = csr_matmul(A, X, backend="numba")
    assert torch.isnan(Y[0, 0]) and Y[0, 1].item() == 4.0 and Y[1].tolist() == [3.0, 3.0]


def test_parallel_kernels_on_a_matrix_big_enough_for_threads():
    W = pruned(700, 600, 0.3, seed=3)  # about 294k non-zeros: above PARALLEL_MIN_WORK
    A = to_csr(W, index_dtype="int32")
    x = torch.randn(600, generator=torch.Generator().manual_seed(4))
    X = torch.randn(600, 8, generator=torch.Generator().manual_seed(5))
    S = sp.csr_array(W.numpy())
    for threads in (1, 2):
        torch.testing.assert_close(csr_matvec(A, x, num_threads=threads), torch.from_numpy(S @ x.numpy()), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(csr_matmul(A, X, num_threads=threads), torch.from_numpy(S @ X.numpy()), rtol=1e-4, atol=1e-4)


def test_kernels_keep_numpy_in_numpy_out_and_other_dtypes():
    W = pruned(20, 30, 0.5, seed=6)
    x = np.random.default_rng(0).standard_normal(30).astype(np.float32)
    y = csr_matvec(to_csr(W), x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    y64 = csr_matvec(to_csr(W.double()), torch.from_numpy(x).double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, W.double() @ torch.from_numpy(x).double())
    y16 = csr_matvec(to_csr(W.half()), torch.from_numpy(x))  # float16 values, float32 arithmetic
    torch.testing.assert_close(y16, W.half().float() @ torch.from_numpy(x), rtol=1e-5, atol=1e-5)
    out = np.empty(20, np.float32)
    assert csr_matvec(to_csr(W), x, out=out) is out


def test_kernels_reject_bad_operands():
    A = to_csr(pruned(4, 5, 0.5))
    with pytest.raises(ValueError, match=r"x must have shape \(cols,\) with cols = 5"):
        csr_matvec(A, torch.ones(4))
    with pytest.raises(ValueError, match=r"x must have shape"):
        csr_matvec_loop(A, torch.ones(5, 1))
    with pytest.raises(ValueError, match=r"X must have shape \(cols, batch\)"):
        csr_matmul(A, torch.ones(5))
    with pytest.raises(TypeError, match="x must hold floats"):
        csr_matvec(A, torch.ones(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_threads must be"):
        csr_matvec(A, torch.ones(5), num_threads=0)
    with pytest.raises(ValueError, match="out must be"):
        csr_matvec(A, torch.ones(5), out=np.empty(3, np.float32))
    with pytest.raises(TypeError, match="csr must be"):
        csr_matmul(torch.ones(4, 5), torch.ones(5, 2))


# ---------------------------------------------------------------- storage


@pytest.mark.parametrize("index_dtype", [None, "int16", "int32", "int64"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_csr_nbytes_matches_the_arrays(index_dtype, dtype):
    W = pruned(31, 47, 0.8, dtype=dtype)
    A = to_csr(W, index_dtype=index_dtype)
    assert A.nbytes == csr_nbytes(31, 47, A.nnz, A.dtype, index_dtype) == storage_bytes(W, index_dtype=index_dtype)["csr"]


def test_csr_nbytes_matches_scipy_arrays():
    W = pruned(64, 64, 0.9)
    S = sp.csr_array(W.numpy())  # int32 indices and row pointers
    assert csr_nbytes(64, 64, S.nnz, "float32", "int32") == S.data.nbytes + S.indices.nbytes + S.indptr.nbytes


def test_storage_bytes_hand_computed():
    W = torch.zeros(4, 8)
    W[1, 3] = 2.0
    W[2, 0] = -1.0
    got = storage_bytes(W, index_dtype="int32")
    assert got["dense"] == 4 * 8 * 4
    assert got["csr"] == 2 * (4 + 4) + 5 * 4
    assert got["coo"] == 2 * (4 + 4 + 4)
    assert got["bitmask"] == 32 // 8 + 2 * 4
    assert got["nm"] == 16 * 4 + 16 * 2 // 8  # half the values kept, 2 bits each
    half = storage_bytes(W.half(), index_dtype="int16")
    assert half["dense"] == 64 and half["csr"] == 2 * 4 + 5 * 4


def test_traffic_limit():
    assert traffic_limit(0.9) == pytest.approx(5.0)
    assert traffic_limit(0.5) == pytest.approx(1.0)
    assert traffic_limit(0.9, value_bytes=2, index_bytes=2) == pytest.approx(5.0)
    W = torch.from_numpy(np.where(np.arange(64 * 4096).reshape(64, 4096) % 10 == 0, 1.0, 0.0).astype(np.float32))
    b = storage_bytes(W, index_dtype="int32")
    assert b["dense"] / b["csr"] == pytest.approx(traffic_limit(0.9), rel=0.02)  # row pointers cost a little
    with pytest.raises(ValueError, match="sparsity must be in"):
        traffic_limit(1.0)
    with pytest.raises(ValueError, match="index_bytes must be a positive int"):
        traffic_limit(0.5, index_bytes=0)


# ------------------------------------------------------ SparseLinear / sparsify


def test_sparse_linear_matches_linear():
    torch.manual_seed(0)
    layer = nn.Linear(30, 20)
    with torch.no_grad():
        layer.weight[torch.rand(20, 30) < 0.9] = 0.0
    sparse = SparseLinear.from_linear(layer)
    for x in (torch.randn(1, 30), torch.randn(7, 30), torch.randn(2, 3, 30), torch.randn(30)):
        torch.testing.assert_close(sparse(x), layer(x).detach(), rtol=1e-5, atol=1e-5)
    assert "sparsity=" in repr(sparse)
    assert set(sparse.state_dict()) == {"values", "col_indices", "row_offsets", "bias"}
    with pytest.raises(ValueError, match="in_features = 30"):
        sparse(torch.randn(2, 29))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        SparseLinear.from_linear(nn.Conv1d(1, 1, 3))


def test_sparse_linear_uses_the_mask_and_no_bias():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]))
    layer.register_buffer("weight_mask", torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
    sparse = SparseLinear.from_linear(layer)
    assert sparse(torch.ones(1, 4)).tolist() == [[1.0, 8.0]]


def test_sparsify_swaps_only_sparse_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Sequential(nn.Linear(20, 20), nn.ReLU()), nn.Linear(20, 3))
    with torch.no_grad():
        model[0].weight[torch.rand(20, 10) < 0.95] = 0.0
        model[2][0].weight[torch.rand(20, 20) < 0.3] = 0.0
    out = sparsify(model, min_sparsity=0.8)
    assert isinstance(out[0], SparseLinear) and isinstance(out[2][0], nn.Linear) and isinstance(out[3], nn.Linear)
    assert isinstance(model[0], nn.Linear)  # the original is untouched
    x = torch.randn(5, 10)
    torch.testing.assert_close(out(x), model(x).detach(), rtol=1e-5, atol=1e-5)
    assert sparsify(model, min_sparsity=0.0, inplace=True) is model and isinstance(model[3], SparseLinear)
    with pytest.raises(ValueError, match="min_sparsity must be in"):
        sparsify(model, min_sparsity=1.5)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparsify("model")


# ---------------------------------------------------------------- benchmark


def test_benchmark_rows_and_crossover(tmp_path):
    rows = benchmark(size=64, sparsities=(0.5, 0.9), batches=(1, 4), repeats=1, verbose=False, min_time_s=0.0)
    assert len(rows) == 2 * 2 * 4
    assert {r["impl"] for r in rows} == {"dense", "chapter11", "scipy", "torch_sparse"}
    for r in rows:
        mkl = torch.backends.mkl.is_available()
        ours = {"backend"} | ({"other_backend", "other_speedup_vs_dense"} if mkl else set())
        assert set(r) == {"impl", "sparsity", "batch", "median_s", "speedup_vs_dense", "traffic_limit"} | (ours if r["impl"] == "chapter11" else set())
        if r["impl"] == "chapter11":  # small products: the static rule, batch 1 ours and narrow batches MKL (where torch has it)
            assert r["backend"] == ("numba" if r["batch"] == 1 or not mkl else "mkl")
            if mkl:  # the path auto passed over, timed beside it
                assert {r["backend"], r["other_backend"]} == {"numba", "mkl"} and r["other_speedup_vs_dense"] > 0
        assert r["median_s"] > 0
        if r["impl"] == "dense":
            assert r["speedup_vs_dense"] == 1.0
    lim = {r["sparsity"]: r["traffic_limit"] for r in rows}
    # int16 indices for 64 columns: 6 bytes per kept value plus 65 int32 row offsets
    assert lim[0.9] == pytest.approx(64 * 64 * 4 / (410 * 6 + 65 * 4)) and lim[0.5] == pytest.approx(64 * 64 * 4 / (2048 * 6 + 65 * 4))
    fake = [{"impl": "chapter11", "batch": 1, "sparsity": s, "speedup_vs_dense": v} for s, v in [(0.5, 0.4), (0.8, 0.8), (0.9, 1.6)]]
    assert crossover_sparsity(fake) == pytest.approx(0.825)
    assert crossover_sparsity([dict(fake[0])]) is None
    with pytest.raises(ValueError, match="rows hold no results"):
        crossover_sparsity(fake, batch=32)
    with pytest.raises(ValueError, match="sparsities must be in"):
        benchmark(size=64, sparsities=(1.0,), repeats=1, verbose=False)


def test_bench_command_line_quiets_openblas(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    cmd = [sys.executable, "-m", "chapter11", "bench", "sparse", "--size", "16", "--repeats", "1", "--min-time", "0", "--plot", ""]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "OPENBLAS_THREAD_TIMEOUT=4" in done.stdout  # restarted itself with the setting, recorded in machine info
    env["OPENBLAS_THREAD_TIMEOUT"] = "7"  # a user's own choice is kept
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "OPENBLAS_THREAD_TIMEOUT=7" in done.stdout, done.stdout[-500:]


def test_benchmark_main_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "rows.json", tmp_path / "plot.png"
    sparse_main(["--size", "48", "--repeats", "1", "--min-time", "0", "--json", str(out), "--plot", str(png)])
    rows = json.loads(out.read_text())
    assert len(rows) == 5 * 2 * 4
    assert png.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "limit" in printed and "beats dense" in printed


@pytest.mark.parametrize("fields, message", [
    (dict(indices=[0, 1, 30000, 32000], indptr=[0, 2, 4], shape=(2, 4)), "indices: column 32000 is outside the 4 columns"),
    (dict(indices=[0, 1, -1, 2], indptr=[0, 2, 4], shape=(2, 4)), "indices: column -1"),
    (dict(indices=[0, 1, 2, 3], indptr=[0, 3, 2, 4], shape=(3, 4)), "indptr must never decrease"),
    (dict(indices=[0, 1, 2, 3], indptr=[1, 2, 4], shape=(2, 4)), "indptr must start at 0 and end at nnz = 4"),
    (dict(indices=[0, 1, 2, 3], indptr=[0, 2, 3], shape=(2, 4)), "end at nnz = 4"),
    (dict(indices=[0, 1, 2, 3], indptr=[0, 2, 4], shape=(3, 4)), "indptr must have rows \\+ 1 = 4 entries"),
    (dict(indices=[0, 1, 2], indptr=[0, 2, 4], shape=(2, 4)), "indices and data must have the same length"),
    (dict(indices=[0, 1, 2, 3], indptr=[0, 2, 4], shape=(2, -4)), "shape must be two non-negative ints"),
    (dict(indices=[0.0, 1.0, 2.0, 3.0], indptr=[0, 2, 4], shape=(2, 4)), "indices must hold integers"),
    (dict(indices=[[0, 1, 2, 3]], indptr=[0, 2, 4], shape=(2, 4)), "indices must be 1-D"),
])
def test_csr_refuses_inconsistent_arrays(fields, message):
    # the numba kernels read data/indices/indptr without bounds checks: a CSR that is not consistent never exists
    data = np.ones(4, dtype=np.float32)
    with pytest.raises((ValueError, TypeError), match=message):
        CSR(data, **{k: np.asarray(v) for k, v in fields.items() if k != "shape"}, shape=fields["shape"])


def test_csr_checks_values_and_accepts_what_it_built():
    with pytest.raises(TypeError, match="data must hold float16, float32 or float64"):
        CSR(np.ones(2, dtype=np.int32), np.array([0, 1]), np.array([0, 2]), (1, 2))
    with pytest.raises(ValueError, match="NaN or infinite"):
        CSR(np.array([1.0, np.nan], dtype=np.float32), np.array([0, 1]), np.array([0, 2]), (1, 2))
    A = CSR(np.array([2.0, 3.0], dtype=np.float32), [1, 0], [0, 1, 2], (2, 2))  # lists become arrays, checked
    assert isinstance(A.indices, np.ndarray) and to_dense(A).tolist() == [[0.0, 2.0], [3.0, 0.0]]
    W = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
    for built in (to_csr(W), to_csr_loop(W)):
        assert torch.equal(to_dense(built), W)


def _count_backends(monkeypatch, csr_module, name: str) -> list[str]:
    """Wrap `csr_module.<name>` so every call appends its `backend`; returns that list."""
    calls = []
    real = getattr(csr_module, name)

    def counting(csr, X, out=None, num_threads=None, backend="auto"):
        calls.append(backend)
        return real(csr, X, out=out, num_threads=num_threads, backend=backend)

    monkeypatch.setattr(csr_module, name, counting)
    return calls


def _autotune_calls(csr_module) -> int:
    """Calls per path of one autotune: a warm-up, then per block one untimed call and the block's timed ones."""
    blocks = -(-csr_module.AUTOTUNE_REPEATS // csr_module.AUTOTUNE_BLOCK)
    return 1 + blocks * (1 + csr_module.AUTOTUNE_BLOCK)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch build has no MKL: auto has only our kernel to choose")
def test_auto_times_both_paths_once_for_a_large_matrix_vector_product(monkeypatch):
    from chapter11 import csr as csr_module

    monkeypatch.setattr(csr_module, "_autotuned", {})
    rng = np.random.default_rng(1)
    W = rng.standard_normal((64, 64)).astype(np.float32) * (rng.random((64, 64)) > 0.5)
    A = to_csr(W)
    x = rng.standard_normal(64).astype(np.float32)
    calls = _count_backends(monkeypatch, csr_module, "csr_matvec")
    csr_module.csr_matvec(A, x)
    assert calls == ["auto"] and csr_module.autotuned_backend(A, 1) is None  # under AUTOTUNE_MIN_NNZ: ours, untimed
    monkeypatch.setattr(csr_module, "AUTOTUNE_MIN_NNZ", A.nnz)
    calls.clear()
    y = csr_module.csr_matvec(A, x)
    np.testing.assert_allclose(y, W @ x, rtol=1e-5, atol=1e-5)
    assert csr_module.autotuned_backend(A, 1) in ("numba", "mkl")
    assert calls.count("numba") == calls.count("mkl") == _autotune_calls(csr_module)  # timed interleaved, once
    calls.clear()
    csr_module.csr_matvec(A, x)
    assert calls == ["auto"]  # settled: not timed again
    monkeypatch.setattr(csr_module, "_autotuned", {})
    csr_module.csr_matvec(A, x, num_threads=1)  # a thread count is a feature of ours: never timed
    assert calls == ["auto", "auto"] and csr_module.autotuned_backend(A, 1) is None


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch build has no MKL: auto has only our kernel to choose")
def test_auto_times_both_paths_once_for_a_large_product_and_keeps_the_faster(monkeypatch):
    from chapter11 import csr as csr_module

    monkeypatch.setattr(csr_module, "_autotuned", {})
    monkeypatch.setattr(csr_module, "AUTOTUNE_MIN_WORK", 64 * 32)
    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 64)).astype(np.float32) * (rng.random((64, 64)) > 0.5)
    A = to_csr(W)
    X = rng.standard_normal((64, 32)).astype(np.float32)
    assert csr_module.autotuned_backend(A, 32) is None
    calls = _count_backends(monkeypatch, csr_module, "csr_matmul")
    Y = csr_module.csr_matmul(A, X)
    np.testing.assert_allclose(Y, W @ X, rtol=1e-5, atol=1e-5)
    chosen = csr_module.autotuned_backend(A, 32)
    assert chosen in ("numba", "mkl")
    assert calls.count("numba") == calls.count("mkl") == _autotune_calls(csr_module)  # timed interleaved, once
    calls.clear()
    csr_module.csr_matmul(A, X)
    assert calls == ["auto"]  # the second call does not time again
    assert csr_module.autotuned_backend(A, 16) is None  # narrow batches: MKL by rule, never timed
    csr_module.csr_matmul(A, X[:, :16])
    assert csr_module.autotuned_backend(A, 16) is None
