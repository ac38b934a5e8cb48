import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from torch import nn

from chapter11.magnitude import prune_magnitude
from chapter11.masks import masks_of
from chapter11.sensitivity import (
    SensitivityResult,
    allocate_sparsity,
    allocate_sparsity_loop,
    allocation_sparsity,
    plot_sensitivity,
    prune_with_allocation,
    sensitivity_scan,
)

BAD_SPARSITY = [-0.1, 1.0, 1.5, float("nan")]


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def zeros_metric(model):
    """Fraction of non-zero weights in the whole model: a metric we can compute by hand."""
    weights = [model[0].weight, model[2].weight]
    return float(sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights))


def test_scan_hand_computed_and_restores_model():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = sensitivity_scan(model, zeros_metric, [0.0, 0.5, 0.75])
    assert result.baseline == 1.0
    assert result.sizes == {"0.weight": 48, "2.weight": 32}
    # pruning 0.5 of layer 0 removes 24 of 80 weights; of layer 2, 16 of 80
    assert result.metrics["0.weight"] == pytest.approx([1.0, 1 - 24 / 80, 1 - 36 / 80])
    assert result.metrics["2.weight"] == pytest.approx([1.0, 1 - 16 / 80, 1 - 24 / 80])
    assert result.drops()["2.weight"][1] == pytest.approx(16 / 80)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_scan_prunes_smallest_magnitudes():
    model = mlp(1)
    w = model[0].weight.detach().clone()
    seen = {}

    def metric(m):
        seen.setdefault("masks", []).append((m[0].weight == 0).clone())
        return 0.0

    sensitivity_scan(model, metric, [0.25], exclude=["2"])
    pruned = seen["masks"][1]  # [0] is the baseline call
    assert w.abs()[pruned].max() <= w.abs()[~pruned].min()


def test_scan_respects_existing_masks():
    model = mlp(2)
    prune_magnitude(model, 0.5, scope="layerwise")
    result = sensitivity_scan(model, zeros_metric, [0.25, 0.5, 0.75])
    # at or below the current sparsity nothing more is removed
    assert result.metrics["0.weight"][0] == result.metrics["0.weight"][1] == pytest.approx(0.5)
    assert result.metrics["0.weight"][2] < 0.5
    assert len(masks_of(model)) == 2


def random_result(seed, layers=3, grid=(0.0, 0.3, 0.5, 0.7, 0.9)):
    rng = np.random.default_rng(seed)
    metrics = {f"l{i}": sorted(rng.uniform(0.2, 1.0, len(grid)).tolist(), reverse=True) for i in range(layers)}
    sizes = {f"l{i}": int(rng.integers(10, 1000)) for i in range(layers)}
    return SensitivityResult(list(grid), 1.0, metrics, sizes)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [0.0, 0.4, 0.8, 0.9])
def test_allocation_loop_equals_vectorised_and_meets_budget(seed, budget):
    result = random_result(seed)
    a = allocate_sparsity_loop(result, budget)
    b = allocate_sparsity(result, budget)
    assert a == b
    assert allocation_sparsity(result, b) >= budget - 1e-9


def test_allocation_prefers_insensitive_layer():
    grid = [0.0, 0.5, 0.9]
    result = SensitivityResult(grid, 0.9, {"fragile": [0.9, 0.5, 0.1], "robust": [0.9, 0.9, 0.88]}, {"fragile": 100, "robust": 100})
    assert allocate_sparsity(result, 0.45) == {"fragile": 0.0, "robust": 0.9}


def test_allocation_bad_input():
    result = random_result(0)
    for bad in BAD_SPARSITY:
        with pytest.raises(ValueError, match="budget"):
            allocate_sparsity(result, bad)
    with pytest.raises(ValueError, match="budget"):
        allocate_sparsity(SensitivityResult([0.0, 0.5], 1.0, {"a": [1, 1]}, {"a": 3}), 0.6)
    with pytest.raises(ValueError, match="combinations"):
        allocate_sparsity(random_result(0, layers=12), 0.5)


@pytest.mark.parametrize("bad", BAD_SPARSITY)
def test_scan_bad_grid(bad):
    with pytest.raises(ValueError, match="sparsities"):
        sensitivity_scan(mlp(), zeros_metric, [0.0, bad])


def test_scan_grid_must_increase():
    with pytest.raises(ValueError, match="increasing"):
        sensitivity_scan(mlp(), zeros_metric, [0.5, 0.2])


def test_prune_with_allocation_counts_and_errors():
    model = mlp(3)
    masks = prune_with_allocation(model, {"0.weight": 0.25, "2.weight": 0.5})
    assert int((masks["0.weight"] == 0).sum()) == 12 and int((masks["2.weight"] == 0).sum()) == 16
    assert int((model[0].weight == 0).sum()) == 12
    with pytest.raises(ValueError, match="allocation"):
        prune_with_allocation(model, {"9.weight": 0.5})
    with pytest.raises(ValueError, match="sparsity"):
        prune_with_allocation(model, {"0.weight": 1.0})


def test_plot_sensitivity():
    result = sensitivity_scan(mlp(), zeros_metric, [0.0, 0.5])
    ax = plot_sensitivity(result, allocation={"0.weight": 0.5})
    assert "sparsity" in ax.get_xlabel()
    import matplotlib.pyplot as plt

    plt.close(ax.figure)


def test_match_budget_removes_exactly_the_budget_and_keeps_the_shape():
    from chapter11.masks import masks_of
    from chapter11.models import LeNet300100
    from chapter11.sensitivity import SensitivityResult, allocation_sparsity, match_budget, prune_with_allocation

    torch.manual_seed(0)
    model = LeNet300100(in_features=40)
    sizes = {n: p.numel() for n, p in model.named_parameters() if p.dim() > 1}
    result = SensitivityResult([0.0, 0.5, 0.95, 0.98], 1.0, {n: [1.0] * 4 for n in sizes}, sizes)
    grid_pick = {"fc1.weight": 0.5, "fc2.weight": 0.98, "fc3.weight": 0.0}          # what the grid gave seed 1 in notebook 01
    assert allocation_sparsity(result, grid_pick) > 0.82
    exact = match_budget(result, grid_pick, 0.8)
    assert exact["fc3.weight"] == 0.0 and exact["fc2.weight"] > exact["fc1.weight"] > 0
    prune_with_allocation(model, exact)
    removed = sum(int((m == 0).sum()) for m in masks_of(model).values())
    assert removed == round(0.8 * sum(sizes.values()))
    with pytest.raises(ValueError, match="fewer than the budget"):
        match_budget(result, {"fc1.weight": 0.5, "fc2.weight": 0.5, "fc3.weight": 0.0}, 0.8)
    with pytest.raises(ValueError, match="allocation: 'nope'"):
        match_budget(result, {"nope": 0.5}, 0.8)
