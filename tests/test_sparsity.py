import math

import pytest
import torch
from torch import nn

from chapter11.sparsity import check_amount, check_sparsity, count, count_loop, density, sparsity, sparsity_loop, sparsity_report

CASES = [
    torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 3.0, 0.0]]),  # 2x4, 3 non-zero
    torch.zeros(3, 5),
    torch.ones(7),
    torch.tensor([-0.0, 1e-30, -2.0]),
    torch.randn(4, 6, 3).masked_fill(torch.rand(4, 6, 3) < 0.7, 0.0),
]


@pytest.mark.parametrize("impl", [sparsity_loop, sparsity])
def test_hand_computed_2x4(impl):
    assert impl(CASES[0]) == 1 - 3 / 8


@pytest.mark.parametrize("x", CASES)
def test_loop_and_vectorised_agree(x):
    assert count_loop(x) == count(x)
    assert sparsity_loop(x) == sparsity(x)
    assert density(x) == pytest.approx(1 - sparsity(x))


def test_negative_zero_counts_as_zero_and_tiny_values_do_not():
    assert count(CASES[3]) == (2, 3)


def test_module_counts_every_parameter():
    layer = nn.Linear(4, 2)  # 8 weights + 2 biases
    with torch.no_grad():
        layer.weight.zero_()
    assert sparsity(layer) == sparsity_loop(layer) == 8 / 10


def test_report_rows_and_global_row():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[:, :2] = 0
    report = sparsity_report(model)
    assert [r.name for r in report.rows] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert report.rows[0].nonzero == 6 and report.rows[0].sparsity == 0.5
    assert report.global_sparsity == pytest.approx(6 / 23)
    text = str(report)
    assert "(global)" in text and "50.00%" in text
    assert "<table>" in report._repr_html_()
    assert [r.name for r in sparsity_report(model, only_weights=True).rows] == ["0.weight", "2.weight"]


def test_bad_inputs_name_the_argument():
    with pytest.raises(TypeError, match="x must be a torch.Tensor or an nn.Module"):
        sparsity([1, 2, 3])
    with pytest.raises(ValueError, match="no parameters"):
        sparsity(nn.ReLU())
    with pytest.raises(ValueError, match="no elements"):
        sparsity(torch.zeros(0))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparsity_report(torch.zeros(2))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_check_sparsity_rejects(bad):
    with pytest.raises(ValueError, match="sparsity"):
        check_sparsity(bad)


def test_check_sparsity_types_and_names():
    assert check_sparsity(0) == 0.0
    with pytest.raises(TypeError, match="target"):
        check_sparsity("0.5", name="target")
    with pytest.raises(TypeError):
        check_sparsity(True)


def test_check_amount_follows_torch_prune_conventions():
    assert check_amount(0.25, 8) == 2 and check_amount(8, 8) == 8 and check_amount(1.0, 8) == 8
    with pytest.raises(ValueError, match="amount"):
        check_amount(9, 8)
    with pytest.raises(ValueError, match="amount"):
        check_amount(-0.5, 8)


def test_check_amount_reads_numpy_integers_as_counts():
    import numpy as np

    from chapter11.sparsity import check_amount

    assert check_amount(np.int64(2), 10) == 2 and check_amount(np.int32(0), 10) == 0
    with pytest.raises(ValueError, match="count"):
        check_amount(np.int64(11), 10)
    with pytest.raises(TypeError, match="amount"):
        check_amount(np.bool_(True), 10)
