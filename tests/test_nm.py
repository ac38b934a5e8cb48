"""N:M masks: hand-computed cases, loop == vectorised, invariants, bad input, GPU paths."""

import pytest
import torch
from torch import nn

from chapter11.masks import apply_masks
from chapter11.nm import cuda_csr_benchmark, gpu_skip_reason, is_nm, nm_mask, nm_mask_loop, nm_masks, semi_structured_benchmark

cuda = pytest.mark.skipif(gpu_skip_reason() is not None, reason=f"GPU test skipped: {gpu_skip_reason()}")


def test_two_four_hand_computed():
    W = torch.tensor([[0.1, -3.0, 2.0, 0.5, 7.0, 0.0, 0.0, -1.0]])
    want = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]])
    assert torch.equal(nm_mask(W), want)
    assert torch.equal(nm_mask_loop(W), want)


def test_ties_keep_the_earlier_position():
    W = torch.ones(2, 4)
    assert nm_mask(W).tolist() == [[1.0, 1.0, 0.0, 0.0]] * 2
    assert torch.equal(nm_mask(W), nm_mask_loop(W))


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (1, 2), (4, 8), (3, 3), (4, 4)])
@pytest.mark.parametrize("shape", [(8, 16), (3, 24), (2, 3, 24)])
def test_loop_and_vectorised_agree_and_invariants(n, m, shape):
    if shape[-1] % m:
        pytest.skip("shape not divisible by m")
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(n * 10 + m))
    W[..., 1::4] = W[..., 0::4]  # some ties
    mask = nm_mask(W, n, m)
    assert torch.equal(mask, nm_mask_loop(W, n, m))
    groups = mask.reshape(-1, m).bool()
    assert (groups.sum(dim=1) == n).all()  # exactly n kept per group
    assert abs((1 - mask.mean().item()) - (1 - n / m)) < 1e-6  # sparsity 1 - n/m
    mags = W.abs().reshape(-1, m)
    min_kept = torch.where(groups, mags, torch.inf).min(dim=1).values
    max_dropped = torch.where(groups, -torch.inf, mags).max(dim=1).values
    assert (min_kept >= max_dropped).all()  # every kept weight outweighs every dropped one
    assert is_nm(W * mask, n, m)


def test_is_nm():
    assert is_nm(torch.tensor([[0.0, 1.0, 0.0, 2.0]]))
    assert not is_nm(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert is_nm(torch.zeros(2, 8))


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.ones(2, 4), 5, 4), ValueError, "n must be at most m"),
        ((torch.ones(2, 6), 2, 4), ValueError, "multiple of m=4"),
        ((torch.ones(2, 4), 0, 4), ValueError, "n must be a positive int"),
        ((torch.ones(2, 4), 2, 2.0), ValueError, "m must be a positive int"),
        ((torch.tensor([[1.0, float("nan"), 0.0, 1.0]]), 2, 4), ValueError, "NaN"),
        ((torch.ones(2, 4, dtype=torch.int64), 2, 4), TypeError, "floats"),
        (([[1.0, 2.0, 3.0, 4.0]], 2, 4), TypeError, "torch.Tensor"),
        ((torch.tensor(1.0), 1, 1), ValueError, "last dimension"),
    ],
)
def test_bad_input(args, error, match):
    for fn in (nm_mask, nm_mask_loop, is_nm):
        with pytest.raises(error, match=match):
            fn(*args)


def test_nm_masks_on_a_model_with_apply_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 3))
    with pytest.raises(ValueError, match="not a multiple of m=8"):
        nm_masks(model, n=2, m=8)
    masks = nm_masks(model, n=2, m=4)
    assert set(masks) == {"0.weight", "2.weight"}
    apply_masks(model, masks)
    assert is_nm(model[0].weight) and is_nm(model[2].weight)
    conv = nn.Conv1d(2, 3, kernel_size=2)  # (3, 2, 2): 4 inputs per output
    cmask = nm_masks(nn.Sequential(conv))["0.weight"]
    assert cmask.shape == conv.weight.shape and cmask.sum().item() == 3 * 2
    assert set(nm_masks(model, exclude=["2"])) == {"0.weight"}


def test_gpu_paths_explain_themselves_without_a_gpu():
    reason = gpu_skip_reason()
    if reason is None:
        pytest.skip("a suitable GPU is present; the cuda tests cover it")
    assert isinstance(reason, str) and "\n" not in reason
    with pytest.raises(RuntimeError, match=reason[:20]):
        semi_structured_benchmark(sizes=(128,))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            cuda_csr_benchmark(size=64)


@pytest.mark.cuda
@cuda
def test_semi_structured_matches_dense_on_gpu():
    rows = semi_structured_benchmark(sizes=(1024,), batch=256, repeats=3)
    assert rows[0]["max_rel_err"] < 1e-2 and rows[0]["speedup"] > 0
    if torch.cuda.get_device_capability(0)[0] != 8:
        return  # torch's CUTLASS 2:4 kernels exist only for compute capability 8.x (A100-class); Hopper uses cuSPARSELt
    rows = semi_structured_benchmark(sizes=(1024,), batch=256, repeats=3, backend="cutlass")
    assert "CUTLASS" in rows[0]["backend"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_csr_matches_dense_on_gpu():
    rows = cuda_csr_benchmark(size=512, sparsities=(0.9,), batches=(1, 8), repeats=3)
    assert len(rows) == 2 and all(r["max_rel_err"] < 1e-4 for r in rows)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_nm_mask_on_gpu_matches_cpu():
    W = torch.randn(64, 128)
    assert torch.equal(nm_mask(W.cuda()).cpu(), nm_mask(W))
