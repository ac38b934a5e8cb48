import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from chapter11.masks import (
    MaskedOptimizer, apply_masks, check_mask, enforce_masks, from_torch_prune, load_masked, masks_of,
    prunable_parameters, remove_masks, save_masked, to_torch_prune,
)
from chapter11.models import LeNet300100, SmallCNN


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def random_masks(model, keep=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.rand(p.shape, generator=g) < keep).float() for n, p in prunable_parameters(model).items()}


def test_hand_computed_2x4_mask():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -4.0], [5.0, 6.0, -7.0, 8.0]]))
    apply_masks(layer, {"weight": torch.tensor([[0, 1, 0, 1], [1, 0, 0, 1]])})
    assert torch.equal(layer.weight, torch.tensor([[0.0, -2.0, 0.0, -4.0], [5.0, 0.0, 0.0, 8.0]]))
    assert torch.equal(layer.weight_mask, torch.tensor([[0.0, 1, 0, 1], [1, 0, 0, 1]]))


def test_prunable_parameters_finds_linear_and_conv_and_checks_exclude():
    assert list(prunable_parameters(LeNet300100())) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert list(prunable_parameters(SmallCNN(), exclude=["fc", "conv1"])) == ["conv2.weight", "conv3.weight"]
    with pytest.raises(ValueError, match="exclude: unknown layer"):
        prunable_parameters(LeNet300100(), exclude=["fc9"])
    with pytest.raises(ValueError, match="no prunable"):
        prunable_parameters(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))


def test_masks_only_shrink_unless_regrow_is_allowed():
    layer = nn.Linear(2, 1, bias=False)
    apply_masks(layer, {"weight": torch.tensor([[1.0, 0.0]])})
    apply_masks(layer, {"weight": torch.tensor([[0.0, 1.0]])})
    assert torch.equal(layer.weight_mask, torch.zeros(1, 2))
    apply_masks(layer, {"weight": torch.tensor([[0.0, 1.0]])}, allow_regrow=True)
    assert torch.equal(layer.weight_mask, torch.tensor([[0.0, 1.0]]))
    assert layer.weight[0, 1] == 0  # a regrown weight restarts at zero


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(3, 8), "shape"),
        (torch.full((16, 8), 0.5), "only 0 and 1"),
        (torch.full((16, 8), float("nan")), "NaN"),
        ([[1.0]], "torch.Tensor"),
    ],
)
def test_invalid_masks_name_the_parameter(mask, message):
    with pytest.raises((ValueError, TypeError), match=message) as info:
        apply_masks(mlp(), {"0.weight": mask})
    assert "0.weight" in str(info.value)


def test_unknown_parameter_and_nan_weights():
    model = mlp()
    with pytest.raises(ValueError, match="unknown parameter name 'fc1.weight'"):
        apply_masks(model, {"fc1.weight": torch.ones(16, 8)})
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        apply_masks(model, {"0.weight": torch.ones(16, 8)})


def test_check_mask_accepts_bool_and_int():
    assert check_mask(torch.tensor([True, False]), torch.ones(2)).dtype == torch.float32


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-1),
    ],
    ids=["sgd-momentum-wd", "adam-wd", "adamw"],
)
def test_masks_survive_20_steps_and_a_save_load_round_trip(make_opt, tmp_path):
    model = mlp()
    masks = random_masks(model)
    apply_masks(model, masks)
    opt = MaskedOptimizer(make_opt(model.parameters()), model)
    X, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    for name, mask in masks.items():
        w = dict(model.named_parameters())[name]
        assert (w[mask == 0] == 0).all(), name
        assert not torch.equal(w[mask == 1], start[name][mask == 1]), "kept weights should train"
    path = save_masked(model, tmp_path / "m.pt")
    fresh = load_masked(mlp(), path)
    assert sorted(masks_of(fresh)) == sorted(masks)
    for (n1, a), (n2, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)


def test_load_masked_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        load_masked(mlp(), tmp_path / "nope.pt")


def test_torch_prune_round_trip_matches_torch_forward():
    model = mlp()
    masks = random_masks(model)
    apply_masks(model, masks)
    X = torch.randn(5, 8)
    expected = model(X)
    to_torch_prune(model)
    assert hasattr(model[0], "weight_orig") and torch.equal(model[0].weight_mask, masks["0.weight"])
    assert torch.allclose(model(X), expected)
    from_torch_prune(model)
    assert not hasattr(model[0], "weight_orig")
    assert torch.equal(masks_of(model)["0.weight"], masks["0.weight"])
    assert torch.allclose(model(X), expected)


def test_from_torch_prune_reads_torch_l1_unstructured():
    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    expected = model[0].weight_mask.clone()
    from_torch_prune(model)
    assert torch.equal(masks_of(model)["0.weight"], expected)


def test_remove_and_enforce():
    model = mlp()
    apply_masks(model, random_masks(model))
    with torch.no_grad():
        model[0].weight.add_(1.0)  # something outside the optimizer revived weights
    enforce_masks(model)
    assert (model[0].weight[model[0].weight_mask == 0] == 0).all()
    removed = remove_masks(model)
    assert sorted(removed) == ["0.weight", "2.weight"] and masks_of(model) == {}


def test_masked_optimizer_keeps_its_old_api_and_copies():
    import copy
    import pickle

    model = mlp()
    apply_masks(model, random_masks(model))
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = MaskedOptimizer(inner, model)
    assert isinstance(opt, torch.optim.Optimizer) and opt.optimizer is inner
    assert opt.param_groups[0]["lr"] == 0.1 and opt.defaults is inner.defaults
    assert "MaskedOptimizer(SGD" in repr(opt)
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    opt.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert calls == [1] and inner.state[model[0].weight]["momentum_buffer"] is opt.state[model[0].weight]["momentum_buffer"]
    twin = copy.deepcopy(opt)
    assert twin.optimizer is not inner and twin.param_groups is twin.optimizer.param_groups
    again = pickle.loads(pickle.dumps(opt))
    assert again.param_groups[0]["lr"] == 0.1 and again.model is not model
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        MaskedOptimizer(object(), model)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        MaskedOptimizer(inner, "model")
    with pytest.raises(AttributeError):
        opt.no_such_option


def test_apply_masks_checks_every_mask_before_applying_any():
    model = mlp()
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="2.weight"):
        apply_masks(model, {"0.weight": torch.zeros(16, 8), "2.weight": torch.full((4, 16), 2.0)})
    assert masks_of(model) == {} and torch.equal(model[0].weight, before)


@pytest.mark.parametrize("fast_from,fused", [(0, True), (0, False), (None, True)],
                         ids=["fused-multiply-path", "torch-multiply-path", "default-sizes"])
def test_masked_step_fast_path_keeps_pruned_weights_exactly_zero_even_with_inf_gradients(fast_from, fused, monkeypatch):
    """The multiply fast paths fall back to masked_fill where inf * 0 would give NaN; a NaN at a kept weight stays."""
    from chapter11 import masks as masks_module
    from chapter11.masks import MaskedOptimizer, _zero_pruned

    if fast_from is not None:  # every tensor through the multiply path, as a large layer would go
        monkeypatch.setattr(masks_module, "FAST_ZEROING_MIN_NUMEL", fast_from)
    monkeypatch.setattr(masks_module, "FUSED_ZEROING", fused)

    model = nn.Linear(3, 2, bias=False)
    apply_masks(model, {"weight": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])})
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    model.weight.grad = torch.tensor([[1.0, float("inf"), 2.0], [float("-inf"), 1.0, 1.0]])
    opt.step()
    assert model.weight[0, 1].item() == 0.0 and model.weight[1, 0].item() == 0.0
    assert torch.isfinite(model.weight).all()
    model.weight.grad = torch.tensor([[float("nan"), float("inf"), 2.0], [0.0, 1.0, 1.0]])
    opt.step()
    assert torch.isnan(model.weight[0, 0]) and model.weight[0, 1].item() == 0.0  # the kept NaN is the user's to see
    # bool masks (True = pruned) and float masks give the same result, in one call
    a, b = torch.tensor([float("inf"), 2.0, -1.0]), torch.tensor([float("inf"), 2.0, -1.0])
    _zero_pruned([a, b], [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([True, False, True])])
    assert a.tolist() == b.tolist() == [0.0, 2.0, 0.0]
    assert not torch.signbit(a).any()  # a pruned negative weight is 0.0, not -0.0 (prints as 0.)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_fused_zeroing_equals_masked_fill_on_a_large_tensor(dtype, bad, monkeypatch):
    """The one-pass numba multiply gives masked_fill's result bit for bit: pruned entries 0.0 (never -0.0 or NaN), kept untouched."""
    from chapter11 import masks as masks_module
    from chapter11.masks import FAST_ZEROING_MIN_NUMEL, _fusable, _zero_pruned

    ran = []  # the one-pass kernel must actually run, not the two-pass path beside it
    kernel = masks_module._multiply_fused
    monkeypatch.setattr(masks_module, "_multiply_fused", lambda pairs: ran.append(len(pairs)) or kernel(pairs))

    g = torch.Generator().manual_seed(0)
    n = 2 * FAST_ZEROING_MIN_NUMEL + 3  # not a multiple of any vector width
    t = torch.randn(n, generator=g, dtype=dtype)
    m = (torch.rand(n, generator=g) > 0.5).to(dtype)
    t[5], t[n - 1], t[7] = bad, bad, bad  # two at pruned entries, one kept
    m[5], m[n - 1], m[7] = 0.0, 0.0, 1.0
    for clean in (True, False):
        a = t.clone()
        if clean:
            a[5], a[n - 1], a[7] = 1.0, -1.0, 2.0  # all finite: no fallback at all
        expected = a.masked_fill(m == 0, 0.0)
        assert _fusable(a, m)
        version = a._version
        _zero_pruned([a], [m])
        assert a._version > version  # the in-place change is visible to autograd's checks
        assert torch.equal(torch.isnan(a), torch.isnan(expected))
        assert torch.equal(a.nan_to_num(5.0), expected.nan_to_num(5.0)) and not torch.signbit(a[m == 0]).any()
    assert ran == [1, 1]
    _zero_pruned([t.clone()], [m], fused=False)  # the two-pass path, on request
    assert ran == [1, 1]
    assert not _fusable(torch.zeros(4, 4).t(), torch.ones(4, 4)) and not _fusable(torch.zeros(4), torch.ones(4, dtype=torch.float64))
