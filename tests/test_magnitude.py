import math

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from chapter11.magnitude import (
    iterative_magnitude_pruning,
    global_magnitude_masks,
    layerwise_magnitude_masks,
    magnitude_mask,
    magnitude_mask_loop,
    masks_sparsity,
    prune_magnitude,
    smallest_mask,
    smallest_mask_loop,
    threshold_for_sparsity,
    threshold_for_sparsity_loop,
)
from chapter11.masks import enforce_masks, masks_of
from chapter11.models import LeNet300100

BAD_SPARSITY = [-0.1, 1.0, 1.5, float("nan")]


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 3))


# ---- the criterion -------------------------------------------------------


def test_magnitude_mask_hand_computed():
    W = torch.tensor([[0.5, -0.2, 0.0], [-0.9, 0.49, 0.51]])
    expected = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    for fn in (magnitude_mask_loop, magnitude_mask):
        assert torch.equal(fn(W, 0.5), expected)
        assert torch.equal(fn(W, 0.0), torch.ones(2, 3))  # tau = 0 prunes nothing
        assert torch.equal(fn(W, math.inf), torch.zeros(2, 3))


@pytest.mark.parametrize("shape", [(7,), (5, 4), (3, 2, 3, 3)])
def test_magnitude_mask_loop_equals_vectorised(shape):
    torch.manual_seed(1)
    W = torch.randn(shape)
    for tau in (0.0, 0.3, 1.0, 5.0):
        assert torch.equal(magnitude_mask_loop(W, tau), magnitude_mask(W, tau))


@pytest.mark.parametrize("fn", [magnitude_mask_loop, magnitude_mask])
def test_magnitude_mask_bad_threshold(fn):
    with pytest.raises(ValueError, match="threshold"):
        fn(torch.ones(3), -0.1)
    with pytest.raises(ValueError, match="threshold"):
        fn(torch.ones(3), float("nan"))
    with pytest.raises(TypeError, match="W"):
        fn([1.0, 2.0], 0.1)


# ---- thresholds ------------------------------------------------------------


def test_threshold_hand_computed():
    W = torch.tensor([0.4, -0.1, 0.3, 0.2, -0.6])
    for fn in (threshold_for_sparsity_loop, threshold_for_sparsity):
        assert fn(W, 0.0) == 0.0
        assert fn(W, 0.4) == pytest.approx(0.3)  # k = 2 pruned: 0.1, 0.2
        assert fn(W, 0.8) == pytest.approx(0.6)  # k = 4
        assert fn(W, 0.99) == math.inf  # round(4.95) = 5: everything


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.8, 0.95])
def test_threshold_loop_equals_vectorised_and_hits_target(s):
    torch.manual_seed(2)
    W = torch.randn(20, 30)
    tau = threshold_for_sparsity(W, s)
    assert tau == threshold_for_sparsity_loop(W, s)
    achieved = int((magnitude_mask(W, tau) == 0).sum()) / W.numel()
    assert achieved == pytest.approx(round(s * W.numel()) / W.numel(), abs=1e-9)


def test_threshold_with_ties_keeps_tied_weights():
    W = torch.tensor([0.1, 0.2, 0.2, 0.2, 0.9])
    tau = threshold_for_sparsity(W, 0.4)  # k = 2, but a_2 == a_3 == 0.2
    assert tau == pytest.approx(0.2)
    assert magnitude_mask(W, tau).tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]  # sparsity 0.2 <= 0.4


@pytest.mark.parametrize("bad", BAD_SPARSITY)
def test_bad_sparsity_raises_naming_sparsity(bad):
    model = mlp()
    for call in (
        lambda: threshold_for_sparsity(torch.randn(4), bad),
        lambda: threshold_for_sparsity_loop(torch.randn(4), bad),
        lambda: layerwise_magnitude_masks(model, bad),
        lambda: global_magnitude_masks(model, bad),
        lambda: prune_magnitude(model, bad),
    ):
        with pytest.raises(ValueError, match="sparsity"):
            call()


def test_bad_scope_and_exclude():
    with pytest.raises(ValueError, match="scope"):
        prune_magnitude(mlp(), 0.5, scope="local")
    with pytest.raises(ValueError, match="exclude"):
        prune_magnitude(mlp(), 0.5, exclude=["fc9"])


# ---- exact-count selection ------------------------------------------------


def test_smallest_mask_loop_equals_vectorised_with_ties():
    torch.manual_seed(3)
    scores = torch.randint(0, 4, (6, 5)).float()  # many ties
    for k in (0, 1, 7, 15, 30):
        a, b = smallest_mask_loop(scores, k), smallest_mask(scores, k)
        assert torch.equal(a, b)
        assert int((b == 0).sum()) == k
    with pytest.raises(ValueError, match="k"):
        smallest_mask(scores, 31)


# ---- agreement with torch.nn.utils.prune ------------------------------------


@pytest.mark.parametrize("s", [0.1, 0.5, 0.8, 0.93])
def test_layerwise_equals_torch_l1_unstructured(s):
    model = mlp()
    ours = layerwise_magnitude_masks(model, s)
    for name, mask in ours.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        clone = nn.Linear(module.in_features, module.out_features)
        with torch.no_grad():
            clone.weight.copy_(module.weight)
        prune.l1_unstructured(clone, "weight", amount=s)
        assert torch.equal(mask, clone.weight_mask), name


@pytest.mark.parametrize("s", [0.2, 0.5, 0.8, 0.95])
def test_global_equals_torch_global_unstructured(s):
    model = mlp()
    ours = global_magnitude_masks(model, s)
    theirs = mlp()  # same seed, same weights
    params = [(m, "weight") for m in theirs if isinstance(m, nn.Linear)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=s)
    theirs_masks = {f"{i}.weight": m.weight_mask for i, m in enumerate(theirs) if isinstance(m, nn.Linear)}
    assert set(ours) == set(theirs_masks)
    for name in ours:
        assert torch.equal(ours[name], theirs_masks[name]), name


def test_global_sparsity_on_lenet_and_exclude():
    torch.manual_seed(0)
    model = LeNet300100()
    masks = global_magnitude_masks(model, 0.8, exclude=["fc3"])
    assert set(masks) == {"fc1.weight", "fc2.weight"}
    assert abs(masks_sparsity(masks) - 0.8) < 1e-4


# ---- invariants --------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_kept_weights_dominate_pruned_ones(scope):
    model = mlp(4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = prune_magnitude(model, 0.6, scope=scope)
    groups = [list(masks)] if scope == "global" else [[n] for n in masks]
    for group in groups:
        kept = torch.cat([before[n][masks[n] == 1].abs() for n in group])
        pruned = torch.cat([before[n][masks[n] == 0].abs() for n in group])
        assert kept.min() >= pruned.max()


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_masks_only_shrink_across_stages(scope):
    model = mlp(5)
    previous = None
    for s in [0.1 * i for i in range(1, 9)]:
        prune_magnitude(model, s, scope=scope)
        current = {n: m.clone() for n, m in masks_of(model).items()}
        assert abs(masks_sparsity(current) - s) < 0.01
        if previous is not None:
            for n in current:
                assert torch.all(current[n] <= previous[n]), n
        previous = current
        with torch.no_grad():  # a little "fine-tuning": kept weights move, some shrink
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        enforce_masks(model)


def test_lower_target_never_regrows():
    model = mlp(6)
    prune_magnitude(model, 0.7, scope="global")
    masks = global_magnitude_masks(model, 0.3)
    assert abs(masks_sparsity(masks) - 0.7) < 0.01  # the old zeros stay zero


def test_prune_magnitude_applies_masks():
    model = mlp(7)
    masks = prune_magnitude(model, 0.5, scope="layerwise")
    for name, mask in masks.items():
        weight = model.get_parameter(name)
        assert torch.all(weight[mask == 0] == 0)
        assert torch.equal(masks_of(model)[name], mask)


def test_iterative_magnitude_pruning_tracks_stages_and_finetunes():
    from chapter11.masks import masks_of as _masks_of
    from chapter11.schedules import iterative_schedule

    model = mlp(8)
    calls = []

    def finetune(m):  # moves surviving weights; masked ones must stay zero
        calls.append(1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1)

    def metric(m):
        return float(sum(int((p != 0).sum()) for p in m.parameters()))

    rows = iterative_magnitude_pruning(model, iterative_schedule(0.8, 10), finetune=finetune, metric_fn=metric, scope="layerwise")
    assert len(rows) == 10 == len(calls)
    assert abs(rows[-1]["sparsity"] - 0.8) < 0.005
    assert all(a["sparsity"] <= b["sparsity"] for a, b in zip(rows, rows[1:]))
    assert all("finetuned" in r and "pruned" in r for r in rows)
    assert set(_masks_of(model)) == {"0.weight", "2.weight", "4.weight"}
    with pytest.raises(ValueError, match="decrease"):
        iterative_magnitude_pruning(mlp(), [0.5, 0.3])
    with pytest.raises(ValueError, match="sparsity"):
        iterative_magnitude_pruning(mlp(), [0.5, 1.0])


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_prune_magnitude_refuses_nan_weights_naming_the_parameter(scope):
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"2.weight.*NaN"):
        prune_magnitude(model, 0.5, scope=scope)
    assert masks_of(model) == {}
