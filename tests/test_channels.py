"""Channel/filter/neuron pruning: scores (loop == vectorised, vs torch.nn.utils.prune),
soft mask == physical removal on MLP, CNN, Transformer MLP and ResNet-18, MACs, errors."""

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from chapter11.models import LeNet300100, SmallCNN, TransformerClassifier
from chapter11.structured.channels import (
    Group,
    bn_scale_importance,
    bn_scale_importance_loop,
    channel_scores,
    channels_to_remove,
    channels_to_remove_loop,
    count_flops,
    count_macs,
    count_macs_loop,
    dependency_groups,
    filter_norms,
    filter_norms_loop,
    mask_channels,
    plan_by_scores,
    predicted_speedup,
    recalibrate_batchnorm,
    recalibrate_batchnorm_loop,
    remove_channels,
    taylor_importance,
    taylor_importance_loop,
)


@functools.lru_cache(maxsize=1)
def _resnet18_once():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return resnet18(weights=None)


def _resnet18():
    return copy.deepcopy(_resnet18_once())  # building it (11 M weights) is the slow part


def _randomize_bn(model, seed=0):
    """Give every batch-norm non-trivial running stats and affine params, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


SHAPES = [(5, 7), (6, 3, 5), (4, 2, 3, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [1, 2])
def test_filter_norms_loop_equals_vectorised(shape, p):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(filter_norms_loop(w, p), filter_norms(w, p))


def test_filter_norms_hand_computed():
    w = torch.tensor([[[1.0, -2.0]], [[0.0, 0.5]], [[3.0, 4.0]]])  # (3 filters, 1 in, kernel 2)
    assert filter_norms(w, 1).tolist() == [3.0, 0.5, 7.0]
    assert filter_norms(w, 2).tolist() == pytest.approx([5**0.5, 0.5, 5.0])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [1, 2])
def test_lowest_norm_filters_match_torch_ln_structured(shape, p):
    """torch.nn.utils.prune.ln_structured(dim=0) removes the same filters as our scores + plan."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    layer = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else (nn.Conv1d if len(shape) == 3 else nn.Conv2d)(shape[1], shape[0], shape[2])
    with torch.no_grad():
        layer.weight.copy_(w)
    prune.ln_structured(layer, "weight", amount=2, n=p, dim=0)
    theirs = sorted(torch.nonzero(layer.weight_mask.flatten(1).sum(1) == 0).flatten().tolist())
    assert channels_to_remove(filter_norms(w, p), 2) == theirs


@pytest.mark.parametrize("with_bias", [False, True])
def test_taylor_loop_equals_vectorised(with_bias):
    g = torch.Generator().manual_seed(3)
    w, gw = torch.randn(6, 3, 5, generator=g), torch.randn(6, 3, 5, generator=g)
    b, gb = (torch.randn(6, generator=g), torch.randn(6, generator=g)) if with_bias else (None, None)
    torch.testing.assert_close(taylor_importance_loop(w, gw, b, gb), taylor_importance(w, gw, b, gb))


def test_taylor_hand_computed():
    w = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    grad = torch.tensor([[1.0, 1.0], [-1.0, 5.0]])
    assert taylor_importance(w, grad).tolist() == [9.0, 9.0]  # (1+2)^2, (-3+0)^2
    assert taylor_importance(w, grad, torch.tensor([1.0, 1.0]), torch.tensor([-3.0, 0.0])).tolist() == [0.0, 9.0]


def test_taylor_scores_equal_first_order_loss_change():
    """For one batch the score is (dL/dgate)^2 of a gate on each unit's weights: check with autograd."""
    torch.manual_seed(0)
    model = LeNet300100(in_features=8, hidden=(6, 5)).eval()
    x, y = torch.randn(16, 8), torch.randint(0, 10, (16,))
    scores = channel_scores(model, "taylor", batches=[(x, y)])
    assert all(p.grad is None for p in model.parameters())  # grads are cleared afterwards
    gate = torch.ones(6, requires_grad=True)
    h = torch.relu(nn.functional.linear(x, model.fc1.weight * gate[:, None], model.fc1.bias * gate))
    h = torch.relu(model.fc2(h))
    nn.functional.cross_entropy(model.fc3(h), y).backward()
    torch.testing.assert_close(scores["fc1"], gate.grad.square().detach())


@pytest.mark.parametrize("seed", range(4))
def test_channels_to_remove_loop_equals_vectorised(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (11,), generator=g).float()  # many ties
    for amount in (0, 3, 0.5, 10):
        assert channels_to_remove_loop(scores, amount) == channels_to_remove(scores, amount)


def test_channels_to_remove_hand_computed():
    assert channels_to_remove(torch.tensor([0.5, 0.1, 0.9, 0.1]), 2) == [1, 3]
    assert channels_to_remove(torch.tensor([2.0, 2.0, 1.0]), 2) == [0, 2]  # tie: lower index first
    assert channels_to_remove(torch.tensor([1.0, 2.0]), 0.0) == []


CASES = {
    "mlp": (lambda: LeNet300100(), lambda: torch.randn(8, 40)),
    "cnn1d": (lambda: SmallCNN(dims=1), lambda: torch.randn(8, 40)),
    "cnn2d": (lambda: SmallCNN(dims=2), lambda: torch.randn(8, 1, 8, 8)),
    "transformer_mlp": (lambda: TransformerClassifier(patch_size=4, max_len=10), lambda: torch.randn(8, 40)),
    "resnet18": (_resnet18, lambda: torch.randn(2, 3, 32, 32)),
}


@pytest.mark.parametrize("case,criterion", [(c, "l1") for c in CASES] + [("cnn1d", "l2"), ("mlp", "l2")])
def test_removed_equals_soft_masked(case, criterion):
    make_model, make_x = CASES[case]
    torch.manual_seed(0)
    model, x = _randomize_bn(make_model()), make_x()
    plan = plan_by_scores(channel_scores(model, criterion), 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = remove_channels(model, plan)
    masked = mask_channels(copy.deepcopy(model), plan)
    with torch.no_grad():
        out_small, out_masked, out_dense = small(x), masked(x), model(x)
    torch.testing.assert_close(out_small, out_masked, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out_small, out_dense)  # pruning did change something
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    n_small, n_dense = (sum(p.numel() for p in m.parameters()) for m in (small, model))
    assert n_small < n_dense
    for layer, idx in plan.items():  # every producer lost exactly the planned units
        assert small.get_submodule(layer).weight.shape[0] == model.get_submodule(layer).weight.shape[0] - len(idx)


def test_resnet_prunes_only_inner_convs():
    groups = dependency_groups(_resnet18())
    assert len(groups) == 8  # one per BasicBlock
    assert groups["layer1.0.conv1"] == Group("layer1.0.conv1", "layer1.0.bn1", ("layer1.0.conv2",))
    assert all(name.endswith(".conv1") for name in groups)


def test_remove_channels_hand_computed_linear():
    model = LeNet300100(in_features=3, hidden=(4, 2), num_classes=2)
    small = remove_channels(model, {"fc1": [1, 3]})
    torch.testing.assert_close(small.fc1.weight, model.fc1.weight[[0, 2]])
    torch.testing.assert_close(small.fc1.bias, model.fc1.bias[[0, 2]])
    torch.testing.assert_close(small.fc2.weight, model.fc2.weight[:, [0, 2]])
    torch.testing.assert_close(small.fc2.bias, model.fc2.bias)
    assert small.fc3 is not model.fc3 and torch.equal(small.fc3.weight, model.fc3.weight)


def test_remove_channels_keeps_batchnorm_stats():
    model = _randomize_bn(SmallCNN(dims=1))
    small = remove_channels(model, {"conv2": [0, 5, 63]})
    keep = [i for i in range(64) if i not in (0, 5, 63)]
    torch.testing.assert_close(small.bn2.running_var, model.bn2.running_var[keep])
    torch.testing.assert_close(small.bn2.weight, model.bn2.weight[keep])
    assert small.conv3.weight.shape == (64, 61, 3)


def test_mask_channels_survives_training():
    from chapter11.train import train

    torch.manual_seed(0)
    model = SmallCNN(dims=1)
    mask_channels(model, {"conv1": [0, 1, 2], "conv3": [10]})
    data = [(torch.randn(8, 40), torch.randint(0, 10, (8,))) for _ in range(3)]
    train(model, data, epochs=1, lr=1e-2, progress_bar=False)
    assert model.conv1.weight[:3].abs().sum() == 0 and model.bn1.weight[:3].abs().sum() == 0
    assert model.conv3.bias[10] == 0 and model.bn3.bias[10] == 0
    assert model.conv1.weight[3:].abs().sum() > 0


@pytest.mark.parametrize("case", ["mlp", "cnn1d", "cnn2d", "resnet18"])
def test_count_macs_loop_vectorised_and_torch_agree(case):
    make_model, make_x = CASES[case]
    model, x = make_model().eval(), make_x()
    macs = count_macs(model, x)
    assert macs == count_macs_loop(model, x) == count_flops(model, x) // 2


def test_count_macs_hand_computed():
    conv = nn.Conv2d(3, 4, 3, padding=1)  # 8x8 output, 4 channels, 27 MACs each
    assert count_macs(conv, torch.zeros(2, 3, 8, 8)) == 2 * 4 * 8 * 8 * 27
    model = LeNet300100(in_features=40)
    assert count_macs(model, torch.zeros(1, 40), by_layer=True) == {"fc1": 12000, "fc2": 30000, "fc3": 1000}
    small = remove_channels(model, {"fc1": range(150)})
    assert count_macs(small, torch.zeros(1, 40)) == 150 * 40 + 150 * 100 + 1000
    assert predicted_speedup(model, small, torch.zeros(1, 40)) == pytest.approx(43000 / 22000)


def test_errors_name_the_problem():
    model = LeNet300100()
    with pytest.raises(ValueError, match="unknown or unprunable layer 'fc9'"):
        remove_channels(model, {"fc9": [0]})
    with pytest.raises(ValueError, match="unknown or unprunable layer 'fc3'"):
        mask_channels(model, {"fc3": [0]})  # the output layer has no consumer
    with pytest.raises(ValueError, match="removing all 100 units"):
        remove_channels(model, {"fc2": range(100)})
    with pytest.raises(ValueError, match=r"indices must be in \[0, 100\)"):
        remove_channels(model, {"fc2": [100]})
    with pytest.raises(ValueError, match="would remove all 3 units of fc1"):
        plan_by_scores({"fc1": torch.ones(3)}, 1.0)
    with pytest.raises(TypeError, match="no dependency groups known for Sequential"):
        remove_channels(nn.Sequential(nn.Linear(2, 2)), {"0": [0]})
    with pytest.raises(ValueError, match="p must be 1"):
        filter_norms(torch.ones(2, 2), p=3)
    with pytest.raises(ValueError, match="criterion must be"):
        channel_scores(model, "l3")
    with pytest.raises(ValueError, match="batches: the 'taylor' criterion needs"):
        channel_scores(model, "taylor")
    with pytest.raises(ValueError, match="grad has shape"):
        taylor_importance(torch.ones(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="unknown consumer layer 'nope'"):
        remove_channels(model, {"fc1": [0]}, groups={"fc1": Group("fc1", None, ("nope",))})


def test_custom_groups_for_other_models():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    groups = {"0": Group("0", None, ("2",))}
    x = torch.randn(5, 4)
    small = remove_channels(model, {"0": [1, 4]}, groups=groups)
    masked = mask_channels(copy.deepcopy(model), {"0": [1, 4]}, groups=groups, persistent=False)
    assert small[0].out_features == 4 and small[2].in_features == 4
    torch.testing.assert_close(small(x), masked(x))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_removed_equals_soft_masked_on_cuda():
    torch.manual_seed(0)
    model = _randomize_bn(_resnet18()).cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    plan = plan_by_scores(channel_scores(model, "l1"), 0.5)
    small = remove_channels(model, plan)
    masked = mask_channels(copy.deepcopy(model), plan)
    assert next(small.parameters()).is_cuda
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------- issue 13: masks survive removal


def _sgd_steps(model, steps=10, seed=0, in_shape=(40,)):
    from chapter11.train import train

    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(8, *in_shape, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(steps)]
    train(model, data, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress_bar=False)


def test_remove_channels_keeps_unstructured_masks_of_every_touched_layer():
    # The reproducer: magnitude masks on all three layers, then two fc1 neurons removed.
    from chapter11.magnitude import prune_magnitude
    from chapter11.masks import masks_of

    torch.manual_seed(0)
    model = LeNet300100()
    prune_magnitude(model, 0.8)
    before = {k: v.clone() for k, v in masks_of(model).items()}
    small = remove_channels(model, {"fc1": [0, 1]})
    masks = masks_of(small)
    assert sorted(masks) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    torch.testing.assert_close(masks["fc1.weight"], before["fc1.weight"][2:])  # producer: rows gone
    torch.testing.assert_close(masks["fc2.weight"], before["fc2.weight"][:, 2:])  # consumer: columns gone
    torch.testing.assert_close(masks["fc3.weight"], before["fc3.weight"])
    pruned = {name: masks[name] == 0 for name in masks}
    _sgd_steps(small)
    for name, where in pruned.items():
        assert small.get_parameter(name)[where].abs().sum() == 0, f"pruned weights of {name} came back"
    assert small.fc2.weight[~pruned["fc2.weight"]].abs().sum() > 0  # and the kept ones did train


def test_remove_channels_slices_conv_and_batchnorm_masks():
    from chapter11.masks import apply_masks, masks_of

    torch.manual_seed(0)
    model = _randomize_bn(SmallCNN(dims=1)).train()
    g = torch.Generator().manual_seed(1)
    unstructured = {n: (torch.rand(p.shape, generator=g) > 0.5).float() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1}
    apply_masks(model, unstructured)
    mask_channels(model, {"conv2": [3, 4]})  # masks on conv2 rows, conv2 bias and bn2's scale and shift
    small = remove_channels(model, {"conv2": [0, 4, 9], "conv3": [1]})
    keep2 = [i for i in range(64) if i not in (0, 4, 9)]
    keep3 = [i for i in range(64) if i != 1]
    masks = masks_of(small)
    torch.testing.assert_close(masks["conv2.weight"], masks_of(model)["conv2.weight"][keep2])
    torch.testing.assert_close(masks["conv2.bias"], masks_of(model)["conv2.bias"][keep2])
    torch.testing.assert_close(masks["bn2.weight"], masks_of(model)["bn2.weight"][keep2])
    torch.testing.assert_close(masks["conv3.weight"], masks_of(model)["conv3.weight"][keep3][:, keep2])
    torch.testing.assert_close(masks["fc.weight"], masks_of(model)["fc.weight"][:, keep3])
    assert masks["conv2.bias"][2] == 0 and masks["bn2.bias"][2] == 0  # old unit 3 is still switched off
    zeros = {n: m == 0 for n, m in masks.items()}
    _sgd_steps(small)
    for name, where in zeros.items():
        assert small.get_parameter(name)[where].abs().sum() == 0, name


# ---------------------------------------------------------------- issue 13: amount types


def test_numpy_integer_amount_is_a_count_and_float_a_fraction():
    s = torch.tensor([3.0, 1.0, 2.0, 0.0])
    assert channels_to_remove(s, np.int64(2)) == channels_to_remove_loop(s, np.int64(2)) == [1, 3]
    assert channels_to_remove(s, np.int32(1)) == [3]
    assert channels_to_remove(s, np.float64(0.5)) == [1, 3]  # a float is a fraction
    assert channels_to_remove(s, torch.tensor(1)) == [3]
    assert plan_by_scores({"fc1": s}, np.int64(3)) == {"fc1": [1, 2, 3]}
    for bad in (True, np.bool_(True)):
        with pytest.raises(TypeError, match="bool"):
            channels_to_remove(s, bad)
    with pytest.raises(TypeError, match="int count or a float fraction"):
        channels_to_remove(s, "2")


# ---------------------------------------------------------------- criteria: BN scale and random


def test_bn_scale_importance_loop_equals_vectorised_and_is_abs_gamma():
    bn = nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -2.0, 0.0, 1.5, -0.1]))
    torch.testing.assert_close(bn_scale_importance_loop(bn), bn_scale_importance(bn))
    torch.testing.assert_close(bn_scale_importance(bn), torch.tensor([0.5, 2.0, 0.0, 1.5, 0.1]))
    model = _randomize_bn(SmallCNN(dims=1))
    scores = channel_scores(model, "bn_scale")
    assert sorted(scores) == ["conv1", "conv2", "conv3"]
    torch.testing.assert_close(scores["conv2"], model.bn2.weight.detach().abs())
    with pytest.raises(ValueError, match="needs a batch-norm after every producer"):
        channel_scores(LeNet300100(), "bn_scale")
    with pytest.raises(TypeError, match="BatchNorm"):
        bn_scale_importance(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="affine=False"):
        bn_scale_importance(nn.BatchNorm1d(2, affine=False))


def test_random_criterion_depends_on_seed_only():
    a = channel_scores(SmallCNN(dims=1), "random", seed=3)
    b = channel_scores(_randomize_bn(SmallCNN(dims=1)), "random", seed=3)
    c = channel_scores(SmallCNN(dims=1), "random", seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv2"], c["conv2"])
    assert {k: v.shape for k, v in a.items()} == {"conv1": (32,), "conv2": (64,), "conv3": (64,)}


# ---------------------------------------------------------------- batch-norm recalibration


def _bn_batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 40, generator=g) * 2 + 1, torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def test_recalibrate_loop_vectorised_and_torch_update_bn_agree():
    from torch.optim.swa_utils import update_bn

    torch.manual_seed(0)
    small = remove_channels(_randomize_bn(SmallCNN(dims=1)), {"conv1": range(8), "conv2": range(0, 64, 2)})
    batches = _bn_batches()
    ours, loop, ref = copy.deepcopy(small), copy.deepcopy(small), copy.deepcopy(small)
    assert recalibrate_batchnorm(ours, batches) == 4
    assert recalibrate_batchnorm_loop(loop, batches) == 4
    update_bn([x for x, _ in batches], ref)  # torch's own: reset, momentum None, forward in train mode
    for name in ("bn1", "bn2", "bn3"):
        for stat in ("running_mean", "running_var"):
            a, b, c = (getattr(m.get_submodule(name), stat) for m in (ours, loop, ref))
            torch.testing.assert_close(a, c)
            torch.testing.assert_close(b, c, atol=1e-4, rtol=1e-4)
        assert getattr(ours, name).momentum == small.get_submodule(name).momentum  # restored
    assert not ours.training  # the mode it had
    for (n, p), q in zip(small.named_parameters(), ours.parameters()):
        assert torch.equal(p, q), f"{n} changed: recalibration must not take a gradient step"


def test_recalibration_estimates_the_statistics_of_the_new_inputs():
    # After removal the running stats are stale; after recalibration bn2's running mean is the
    # mean of its inputs (the same per-batch average computed here by hand).
    torch.manual_seed(0)
    small = remove_channels(_randomize_bn(SmallCNN(dims=1)), {"conv1": range(16)})
    batches = _bn_batches(3, seed=1)
    seen = []
    handle = small.bn2.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    recalibrate_batchnorm(small, batches)
    handle.remove()
    expected = torch.stack([x.mean(dim=(0, 2)) for x in seen]).mean(0)  # (64,)
    torch.testing.assert_close(small.bn2.running_mean, expected)
    assert int(small.bn2.num_batches_tracked) == 3


def test_recalibrate_bad_input():
    with pytest.raises(ValueError, match="no batch-norm"):
        recalibrate_batchnorm(LeNet300100(), _bn_batches())
    model = _randomize_bn(SmallCNN(dims=1))
    before = model.bn1.running_mean.clone()
    with pytest.raises(ValueError, match="no batch was given"):
        recalibrate_batchnorm(model, [])
    torch.testing.assert_close(model.bn1.running_mean, before)  # left as it was
    with pytest.raises(ValueError, match="max_batches"):
        recalibrate_batchnorm(model, _bn_batches(), max_batches=0)
    assert recalibrate_batchnorm(model, _bn_batches(5), max_batches=2) == 2
