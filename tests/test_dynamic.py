"""Tests for chapter11.dynamic: distributions, drop/grow, and SET/RigL invariants."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from chapter11.dynamic import (
    DynamicSparsity,
    GradualMagnitude,
    cosine_drop_fraction,
    dense_macs,
    density_schedule,
    drop,
    drop_loop,
    grow,
    grow_loop,
    gradual_sparsity,
    inference_flops,
    layer_sparsities,
    layer_sparsities_loop,
    random_mask,
    random_masks,
    reset_optimizer_state,
    training_flops,
    training_flops_loop,
)
from chapter11.experiments.exp06_dynamic import train_sparse
from chapter11.experiments.exp06_dynamic import compare_methods
from chapter11.masks import masks_of
from chapter11.models import LeNet300100, SmallCNN
from chapter11.train import train

torch.set_num_threads(2)


# ---------------------------------------------------------------- distributions


@pytest.mark.parametrize("fn", [layer_sparsities_loop, layer_sparsities])
def test_erk_hand_computed_two_layers(fn):
    # raw = sum(shape)/prod(shape): 6/8 and 3/2; eps = 0.5 * 10 / (6 + 3) = 5/9
    s = fn({"a": (4, 2), "b": (2, 1)}, 0.5, "erk")
    assert s["a"] == pytest.approx(1 - 5 / 9 * 6 / 8)  # 7/12
    assert s["b"] == pytest.approx(1 - 5 / 9 * 3 / 2)  # 1/6
    assert s["a"] == pytest.approx(7 / 12) and s["b"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("fn", [layer_sparsities_loop, layer_sparsities])
def test_erk_makes_a_layer_dense_when_its_density_would_pass_one(fn):
    # First pass: eps = 5001 / (0.02 * 10000 + 1.5 * 2) = 24.6, so b would get density 37 -> dense.
    # Second pass: eps = (0.5 * 10000 - 0.5 * 2) / (0.02 * 10000) = 24.995 -> a at sparsity 0.5001.
    s = fn({"a": (100, 100), "b": (2, 1)}, 0.5, "erk")
    assert s["b"] == 0.0
    assert s["a"] == pytest.approx(1 - 24.995 * 0.02)
    kept = (1 - s["a"]) * 10000 + (1 - s["b"]) * 2
    assert kept == pytest.approx(0.5 * 10002)


@pytest.mark.parametrize("fn", [layer_sparsities_loop, layer_sparsities])
def test_er_ignores_kernel_dimensions_and_erk_does_not(fn):
    shapes = {"conv": (8, 4, 3), "fc": (10, 8)}
    er = fn(shapes, 0.6, "er")
    erk = fn(shapes, 0.6, "erk")
    n = {"conv": 96, "fc": 80}
    # ER raw scores (8 + 4) / 32 and 18 / 80; ERK raw (8 + 4 + 3) / 96 and 18 / 80
    eps_er = 0.4 * 176 / (12 / 32 * 96 + 18 / 80 * 80)
    eps_erk = 0.4 * 176 / (15 / 96 * 96 + 18 / 80 * 80)
    assert er["conv"] == pytest.approx(1 - eps_er * 12 / 32)
    assert erk["conv"] == pytest.approx(1 - eps_erk * 15 / 96)
    for s in (er, erk):
        assert sum((1 - s[k]) * n[k] for k in n) == pytest.approx(0.4 * 176)


def test_uniform_gives_every_layer_the_target():
    assert layer_sparsities({"a": (3, 3), "b": (5, 2, 2)}, 0.7, "uniform") == {"a": 0.7, "b": 0.7}


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.99])
def test_loop_and_vectorised_distributions_agree_and_hit_the_total(distribution, sparsity):
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        shapes = {f"l{i}": tuple(int(d) for d in torch.randint(1, 40, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)) for i in range(4)}
        a = layer_sparsities_loop(shapes, sparsity, distribution)
        b = layer_sparsities(shapes, sparsity, distribution)
        assert a == pytest.approx(b, abs=1e-12)
        sizes = {k: math.prod(v) for k, v in shapes.items()}
        kept = sum((1 - a[k]) * sizes[k] for k in shapes)
        assert kept == pytest.approx((1 - sparsity) * sum(sizes.values()))
        assert all(0.0 <= v < 1.0 for v in a.values())


def test_distribution_bad_input():
    with pytest.raises(ValueError, match="distribution"):
        layer_sparsities({"a": (2, 2)}, 0.5, "gaussian")
    with pytest.raises(ValueError, match="sparsity"):
        layer_sparsities({"a": (2, 2)}, 1.0)
    with pytest.raises(ValueError, match="shapes"):
        layer_sparsities({"a": (4,)}, 0.5)


def test_random_mask_has_exact_count():
    m = random_mask((30, 20), 0.9, torch.Generator().manual_seed(0))
    assert int(m.sum()) == 60 and set(m.unique().tolist()) == {0.0, 1.0}


def test_random_masks_on_lenet_follow_erk():
    model = LeNet300100()
    masks = random_masks(model, 0.9, "erk", seed=0)
    target = layer_sparsities({n: m.shape for n, m in masks.items()}, 0.9, "erk")
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert abs(1 - kept / total - 0.9) < 1e-3
    for name, m in masks.items():
        assert abs((1 - m.mean().item()) - target[name]) < 1e-3
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(target["fc1.weight"], abs=1e-3)


# ---------------------------------------------------------------- drop and grow


def test_drop_hand_example():
    w = torch.tensor([[0.5, -0.1, 3.0], [0.0, 2.0, -0.2]])
    m = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    expected = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # -0.1 and -0.2 go; the 0.0 was already off
    assert torch.equal(drop_loop(w, m, 2), expected)
    assert torch.equal(drop(w, m, 2), expected)


def test_grow_hand_example():
    scores = torch.tensor([[5.0, 0.1, 0.3], [0.2, 9.0, 0.3]])
    m = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    expected = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # the two 0.3s among the off ones
    assert torch.equal(grow_loop(scores, m, 2), expected)
    assert torch.equal(grow(scores, m, 2), expected)


@pytest.mark.parametrize("seed", range(5))
def test_drop_and_grow_loops_match_vectorised_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, (7, 9), generator=g).float()  # many ties
    m = (torch.rand(7, 9, generator=g) < 0.4).float()
    s = torch.randint(0, 3, (7, 9), generator=g).float()
    for n in (0, 1, int(m.sum()) // 2, int(m.sum())):
        assert torch.equal(drop_loop(w, m, n), drop(w, m, n))
    for n in (0, 1, int((m == 0).sum()) // 2, int((m == 0).sum())):
        assert torch.equal(grow_loop(s, m, n), grow(s, m, n))


def test_drop_keeps_the_largest_active_magnitudes():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(20, 20, generator=g)
    m = (torch.rand(20, 20, generator=g) < 0.5).float()
    new = drop(w, m, 30)
    assert int(m.sum() - new.sum()) == 30
    dropped = (m == 1) & (new == 0)
    kept = new == 1
    assert w[kept].abs().min() >= w[dropped].abs().max()
    assert not ((new == 1) & (m == 0)).any()


def test_drop_grow_bad_input():
    m = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="only 1 active"):
        drop(torch.ones(2), m, 2)
    with pytest.raises(ValueError, match="only 1 inactive"):
        grow(torch.ones(2), m, 2)
    with pytest.raises(ValueError, match="n must be"):
        drop(torch.ones(2), m, -1)
    with pytest.raises(ValueError, match="shape"):
        grow(torch.ones(3), m, 1)


def test_cosine_drop_fraction():
    assert cosine_drop_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_drop_fraction(25, 0.3, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert cosine_drop_fraction(100, 0.3, 100) == 0.0
    assert cosine_drop_fraction(500, 0.3, 100) == 0.0
    with pytest.raises(ValueError, match="alpha"):
        cosine_drop_fraction(0, 1.5, 100)


# ---------------------------------------------------------------- the callback, in a real training loop


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 40, generator=g)
    y = (X[:, :10].sum(1) > 0).long() + 2 * (X[:, 10:20].sum(1) > 0).long()
    return DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))


class _Recorder:
    """Wraps a DynamicSparsity callback and keeps the masks before and after each update."""

    def __init__(self, inner):
        self.inner = inner
        self.events = []

    def __call__(self, step, model, optimizer, x, y):
        before = {n: m.clone() for n, m in masks_of(model).items()}
        self.inner(step, model, optimizer, x, y)
        if self.inner.is_update_step(step):
            after = {n: m.clone() for n, m in masks_of(model).items()}
            state = getattr(optimizer, "optimizer", optimizer).state
            moments = {n: {k: v.clone() for k, v in state[p].items() if isinstance(v, torch.Tensor) and v.shape == p.shape} for n, p in model.named_parameters() if n in after}
            weights = {n: p.detach().clone() for n, p in model.named_parameters() if n in after}
            self.events.append((step, before, after, moments, weights))


@pytest.mark.parametrize("method", ["set", "rigl"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_invariants_during_training(method, opt_name):
    torch.manual_seed(0)
    model = LeNet300100()
    random_masks(model, 0.8, "erk", seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt_name == "sgd" else torch.optim.Adam(model.parameters(), lr=1e-2)
    cb = _Recorder(DynamicSparsity(model, method, update_every=4, alpha=0.4, end_step=30, seed=0))
    train(model, _data(), epochs=4, optimizer=opt, callback=cb, progress_bar=False)
    assert len(cb.events) == 7  # steps 4, 8, ..., 28 (32 steps in all, none at or after end_step)
    moved_total = 0
    for step, before, after, moments, weights in cb.events:
        for name in before:
            # each layer's sparsity is unchanged by the update
            assert int(after[name].sum()) == int(before[name].sum())
            regrown = (after[name] == 1) & (before[name] == 0)
            dropped = (after[name] == 0) & (before[name] == 1)
            assert int(regrown.sum()) == int(dropped.sum())
            # a regrown connection was pruned before the update (trivially true
            # by the definition above, so also check it against the candidates)
            assert (before[name][regrown] == 0).all()
            # regrown weights start at zero, and their optimizer state is reset
            assert (weights[name][regrown] == 0).all()
            assert (weights[name][after[name] == 0] == 0).all()
            assert moments[name], "optimizer state should exist after the first step"
            for value in moments[name].values():
                assert (value[regrown] == 0).all()
            moved_total += int(regrown.sum())
    assert moved_total > 0
    # the history agrees with what the recorder saw
    for record, (step, before, after, _, _) in zip(cb.inner.history, cb.events):
        assert record["step"] == step
        for name in before:
            assert record["moved"][name] == int(((after[name] == 1) & (before[name] == 0)).sum())


def test_momentum_on_regrown_weights_was_nonzero_before_the_reset():
    """The reset test above can only fail if the state would otherwise be non-zero there."""
    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
    opt.step()
    assert (opt.state[p]["momentum_buffer"] != 0).all()
    reset_optimizer_state(opt, p, torch.tensor([True, False, True, False]))
    assert opt.state[p]["momentum_buffer"].tolist() == [0.0, 2.0, 0.0, 4.0]


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_drop_fraction_zero_never_changes_the_mask(method):
    torch.manual_seed(0)
    model = LeNet300100()
    masks = {n: m.clone() for n, m in random_masks(model, 0.9, "erk", seed=0).items()}
    cb = DynamicSparsity(model, method, update_every=2, alpha=0.0, end_step=100)
    train(model, _data(), epochs=2, lr=1e-2, callback=cb, progress_bar=False)
    assert len(cb.history) == 8
    for name, m in masks_of(model).items():
        assert torch.equal(m, masks[name])
    assert all(n == 0 for r in cb.history for n in r["moved"].values())


def test_rigl_grows_where_the_dense_gradient_is_largest():
    torch.manual_seed(0)
    model = LeNet300100()
    random_masks(model, 0.9, "erk", seed=0)
    before = {n: m.clone() for n, m in masks_of(model).items()}
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    # dense gradient, computed independently with the masked weights in place
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    g = model.fc2.weight.grad.abs().clone()
    model.zero_grad()
    cb = DynamicSparsity(model, "rigl", update_every=1, alpha=0.3, end_step=10)
    cb(1, model, torch.optim.SGD(model.parameters(), lr=0.1), x, y)
    after = masks_of(model)["fc2.weight"]
    regrown = (after == 1) & (before["fc2.weight"] == 0)
    left_out = (after == 0) & (before["fc2.weight"] == 0)
    assert regrown.sum() > 0
    assert g[regrown].min() >= g[left_out].max()


def test_set_regrowth_is_random_not_gradient_driven():
    torch.manual_seed(0)
    model = LeNet300100()
    random_masks(model, 0.9, "erk", seed=0)
    before = masks_of(model)["fc2.weight"].clone()
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    g = model.fc2.weight.grad.abs().clone()
    model.zero_grad()
    DynamicSparsity(model, "set", update_every=1, alpha=0.3, end_step=10)(1, model, torch.optim.SGD(model.parameters(), lr=0.1), x, y)
    after = masks_of(model)["fc2.weight"]
    regrown = (after == 1) & (before == 0)
    left_out = (after == 0) & (before == 0)
    # random growth: the regrown set is not the top-gradient set
    assert g[regrown].min() < g[left_out].max()


def test_dense_gradient_pass_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = SmallCNN(dims=1)
    random_masks(model, 0.9, "erk", seed=0)
    stats = {k: v.clone() for k, v in model.named_buffers() if "running" in k or "num_batches" in k}
    cb = DynamicSparsity(model, "rigl", update_every=1, end_step=10)
    cb(1, model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(8, 40), torch.randint(0, 10, (8,)))
    assert cb.history[0]["moved"]["conv3.weight"] > 0
    for k, v in model.named_buffers():
        if k in stats:
            assert torch.equal(v, stats[k]), k


def test_snapshots_and_turnover_history():
    torch.manual_seed(0)
    model = LeNet300100()
    random_masks(model, 0.9, "erk", seed=0)
    cb = DynamicSparsity(model, "set", update_every=3, alpha=0.3, end_step=12, snapshot="fc1.weight")
    train(model, _data(), epochs=2, lr=1e-2, callback=cb, progress_bar=False)
    steps = [s for s, _ in cb.snapshots["fc1.weight"]]
    assert steps == [0, 3, 6, 9]
    fractions = [r["drop_fraction"] for r in cb.history]
    assert fractions == sorted(fractions, reverse=True)  # cosine decay
    for r in cb.history:
        for name, s in r["sparsity"].items():
            assert s == pytest.approx(cb.history[0]["sparsity"][name])


def test_callback_bad_input():
    model = LeNet300100()
    with pytest.raises(ValueError, match="no masks"):
        DynamicSparsity(model)
    random_masks(model, 0.5)
    with pytest.raises(ValueError, match="method"):
        DynamicSparsity(model, "prune")
    with pytest.raises(ValueError, match="update_every"):
        DynamicSparsity(model, update_every=0)
    with pytest.raises(ValueError, match="snapshot"):
        DynamicSparsity(model, snapshot="fc9.weight")
    with pytest.raises(TypeError, match="optimizer"):
        reset_optimizer_state(object(), model.fc1.weight, torch.zeros_like(model.fc1.weight).bool())


@pytest.mark.parametrize("method", ["static", "rigl"])
def test_train_sparse_keeps_the_target_sparsity(method):
    torch.manual_seed(0)
    model = LeNet300100()
    run = train_sparse(model, _data(), method, sparsity=0.9, epochs=2, update_every=3, progress_bar=False)
    masks = masks_of(model)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(1 - kept / total - 0.9) < 1e-3
    assert len(run.history.losses) == 16
    assert (run.updater is None) == (method == "static")
    if run.updater is not None:
        assert [r["step"] for r in run.updater.history] == [3, 6, 9]  # end_step = 0.75 * 16 = 12
    with pytest.raises(ValueError, match="method"):
        train_sparse(LeNet300100(), _data(), "prune")


# ---------------------------------------------------------------- issue 13: validation


@pytest.mark.parametrize("fn", [drop, drop_loop, grow, grow_loop])
@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, float("nan")])
def test_drop_and_grow_refuse_masks_that_are_not_0_1(fn, bad):
    mask = torch.tensor([1.0, bad, 0.0, 1.0])
    with pytest.raises(ValueError, match="mask"):
        fn(torch.tensor([0.3, 0.2, 0.1, 0.4]), mask, 1)


@pytest.mark.parametrize("fn", [grow, grow_loop])
def test_grow_refuses_nan_gradients(fn):
    # Before the fix, NaN sorted as the largest score and was grown.
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.tensor([float("nan"), 0.1, 0.2]), torch.tensor([0.0, 0.0, 1.0]), 1)


@pytest.mark.parametrize("fn", [drop, drop_loop])
def test_drop_refuses_nan_weights(fn):
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.tensor([float("nan"), 0.1, 0.2]), torch.tensor([1.0, 1.0, 0.0]), 1)


def test_rigl_update_refuses_a_nan_dense_gradient():
    model = LeNet300100()
    random_masks(model, 0.9, "erk", seed=0)
    with torch.no_grad():
        model.fc3.bias[0] = float("nan")  # the loss, and every gradient, is NaN
    cb = DynamicSparsity(model, "rigl", update_every=1, end_step=10)
    with pytest.raises(ValueError, match="NaN"):
        cb(1, model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(4, 40), torch.randint(0, 10, (4,)))


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, True, 10), "alpha"),  # a bool is not a fraction (used to return 1.0)
        ((0, float("nan"), 10), "alpha"),
        ((0, -0.1, 10), "alpha"),
        ((0, "0.3", 10), "alpha"),
        ((-1, 0.3, 10), "step"),
        ((1.5, 0.3, 10), "step"),
        ((True, 0.3, 10), "step"),
        ((0, 0.3, 0), "end_step"),
        ((0, 0.3, float("nan")), "end_step"),
        ((0, 0.3, 10.0), "end_step"),
    ],
)
def test_cosine_drop_fraction_refuses_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        cosine_drop_fraction(*args)


def test_cosine_drop_fraction_accepts_numpy_integers():
    import numpy as np

    assert cosine_drop_fraction(np.int64(50), np.float64(0.3), np.int64(100)) == pytest.approx(0.15)


@pytest.mark.parametrize("end_step", [float("nan"), 0, 2.5, float("inf")])
def test_dynamic_sparsity_refuses_bad_end_step(end_step):
    model = LeNet300100()
    random_masks(model, 0.5)
    with pytest.raises(ValueError, match="end_step"):
        DynamicSparsity(model, end_step=end_step)


# ---------------------------------------------------------------- pruning from dense


def test_gradual_sparsity_matches_the_cubic_schedule_of_chapter11_schedules():
    from chapter11.schedules import cubic_sparsity

    steps = list(range(0, 60))
    ours = [gradual_sparsity(t, 0.9, 10, 50) for t in steps]
    theirs = cubic_sparsity(steps, 0.9, 0.0, t0=10, n=40, dt=1)
    assert ours == pytest.approx(theirs, abs=1e-12)
    with pytest.raises(ValueError, match="end_step"):
        gradual_sparsity(5, 0.9, 10, 10)


def test_gradual_magnitude_shrinks_masks_to_the_erk_targets():
    torch.manual_seed(0)
    model = LeNet300100()
    run = train_sparse(model, _data(), "gradual", sparsity=0.9, epochs=3, update_every=4, prune_start=0.25, progress_bar=False)
    cb = run.updater
    assert isinstance(cb, GradualMagnitude)
    # 24 steps: start 6, end 18, every 4 -> 10, 14, 18
    assert [r["step"] for r in cb.history] == [10, 14, 18]
    targets = layer_sparsities({n: p.shape for n, p in model.named_parameters() if n.endswith("weight")}, 0.9, "erk")
    for name, m in masks_of(model).items():
        assert int(m.sum()) == round((1 - targets[name]) * m.numel())
    # densities logged per step never grow, start dense, end at the targets
    d = run.densities
    assert d.shape == (24, 3) and (d[0] == 1).all()
    assert ((d[1:] - d[:-1]) <= 0).all()
    assert (d[:10] == 1).all() and not (d[10] == 1).all()  # step 10's update shows from step 11 on
    assert not run.dense_gradient.any()


def test_gradual_magnitude_removes_the_smallest_active_weights():
    torch.manual_seed(0)
    model = LeNet300100()
    cb = GradualMagnitude(model, 0.8, start_step=0, end_step=2, update_every=1)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    cb(1, model, None, None, None)
    pruned_layers = 0
    for name, m in masks_of(model).items():
        w = weights[name].abs()
        if (m == 0).any():
            assert w[m == 1].min() >= w[m == 0].max()
            pruned_layers += 1
    assert pruned_layers == 2  # at s(1) = 0.7, ERK leaves the 10x100 output layer dense


# ---------------------------------------------------------------- training FLOPs


def test_dense_macs_agree_with_torch_flop_counter():
    from chapter11.structured.channels import count_flops

    for model, x in [(LeNet300100(), torch.zeros(1, 40)), (SmallCNN(dims=1), torch.zeros(1, 40)), (SmallCNN(dims=2), torch.zeros(1, 1, 8, 8))]:
        macs = dense_macs(model.eval(), x)
        assert set(macs) == {n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1}
        assert 2 * sum(macs.values()) == count_flops(model, x)
    cnn = dense_macs(SmallCNN(dims=1), torch.zeros(7, 40))  # per example, whatever the batch
    assert cnn == {"conv1.weight": 40 * 32 * 5, "conv2.weight": 20 * 64 * 32 * 3, "conv3.weight": 10 * 64 * 64 * 3, "fc.weight": 640}


@pytest.mark.parametrize("seed", range(4))
def test_training_flops_loop_equals_vectorised(seed):
    g = torch.Generator().manual_seed(seed)
    macs = {"a": 100, "b": 2500, "c": 40}
    rows = torch.rand(30, 3, generator=g, dtype=torch.float64)
    flags = (torch.rand(30, generator=g) < 0.2).tolist()
    as_dicts = [dict(zip(macs, r.tolist())) for r in rows]
    loop = training_flops_loop(macs, as_dicts, flags)
    assert loop == pytest.approx(training_flops(macs, rows, flags), rel=1e-12)
    assert loop == pytest.approx(training_flops(macs, as_dicts, flags), rel=1e-12)


def test_training_flops_match_the_rigl_paper_closed_forms():
    # Evci et al. (2020), appendix H: static/SET cost 3 f_S per step; RigL averages
    # (3 f_S dT + 2 f_S + f_D) / (dT + 1) per step when every (dT + 1)-th step takes a dense gradient.
    macs = {"fc1": 12000, "fc2": 30000, "fc3": 1000}
    d = {"fc1": 0.2, "fc2": 0.05, "fc3": 0.5}
    f_s = sum(d[k] * macs[k] for k in macs)
    f_d = sum(macs.values())
    dT, periods = 4, 25
    steps = periods * (dT + 1)
    flags = [(t + 1) % (dT + 1) == 0 for t in range(steps)]
    expected = (3 * f_s * dT + 2 * f_s + f_d) / (dT + 1) / (3 * f_d)
    for fn in (training_flops_loop, training_flops):
        assert fn(macs, [d] * steps, flags) == pytest.approx(expected)
        assert fn(macs, [d] * steps, [False] * steps) == pytest.approx(f_s / f_d)
        assert fn(macs, [dict.fromkeys(macs, 1.0)] * 3, [True, False, True]) == pytest.approx(1.0)
    assert inference_flops(macs, d) == pytest.approx(f_s / f_d)


def test_training_flops_bad_input():
    with pytest.raises(ValueError, match="one dense_gradient flag per step"):
        training_flops({"a": 1}, [{"a": 0.5}], [])
    with pytest.raises(ValueError, match="must map exactly"):
        training_flops_loop({"a": 1}, [{"b": 0.5}], [False])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        training_flops({"a": 1}, [{"a": 1.5}], [False])
    with pytest.raises(ValueError, match="macs"):
        training_flops({}, [], [])


@pytest.mark.parametrize("method", ["dense", "static", "set", "rigl", "gradual"])
def test_train_sparse_logs_what_each_step_cost(method):
    torch.manual_seed(0)
    model = LeNet300100()
    run = train_sparse(model, _data(), method, sparsity=0.8, epochs=2, update_every=3, prune_start=0.25, progress_bar=False)
    macs = dense_macs(model, torch.zeros(1, 40))
    assert run.densities.shape == (16, 3) and run.dense_gradient.shape == (16,)
    if method == "dense":
        assert not masks_of(model) and run.training_flops(macs) == 1.0
        return
    final = {n: float(m.sum()) / m.numel() for n, m in masks_of(model).items()}
    erk = layer_sparsities({n: p.shape for n, p in model.named_parameters() if n.endswith("weight")}, 0.8, "erk")
    sparse = inference_flops(macs, final)
    assert sparse == pytest.approx(inference_flops(macs, {n: 1 - s for n, s in erk.items()}), abs=1e-3)
    flops = run.training_flops(macs)
    if method in ("static", "set"):
        assert flops == pytest.approx(sparse) and not run.dense_gradient.any()
    elif method == "rigl":
        # dense gradients exactly on the update steps 3, 6, 9 (end_step 12)
        assert torch.nonzero(run.dense_gradient).flatten().add(1).tolist() == [3, 6, 9]
        assert flops == pytest.approx(sparse + 3 * (1 - sparse) / 3 / 16)  # three steps at 2 f_S + f_D
    else:
        assert sparse < flops < 1.0


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("method", ["dense", "static", "set", "rigl", "gradual"])
def test_density_schedule_equals_what_training_logs(method, model_name):
    torch.manual_seed(0)
    model = LeNet300100() if model_name == "mlp" else SmallCNN(dims=1)
    shapes = {n: p.shape for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1}
    settings = dict(update_every=3, alpha=0.3, end_fraction=0.75, prune_start=0.25)
    run = train_sparse(model, _data(64 if model_name == "cnn" else 256), method, sparsity=0.9, epochs=3, progress_bar=False, **settings)
    steps = run.densities.shape[0]
    densities, flags = density_schedule(shapes, method, 0.9, steps, **settings)
    assert torch.equal(densities, run.densities)
    assert torch.equal(flags, run.dense_gradient)
    assert run.names == list(shapes)


def test_density_schedule_bad_input():
    with pytest.raises(ValueError, match="method"):
        density_schedule({"a": (2, 2)}, "prune", 0.5, 10)
    with pytest.raises(ValueError, match="steps"):
        density_schedule({"a": (2, 2)}, "static", 0.5, 0)
    with pytest.raises(ValueError, match="prune_start"):
        density_schedule({"a": (2, 2)}, "gradual", 0.5, 10, prune_start=0.8, end_fraction=0.5)


def test_compare_methods_trains_every_configuration_from_the_same_start():
    from chapter11.data import Split

    g = torch.Generator().manual_seed(0)
    X = torch.randn(96, 40, generator=g)
    y = (X[:, :5].sum(1) > 0).long()
    split = Split(X[:64], y[:64], X[64:], y[64:], 10)
    settings = dict(update_every=2, alpha=0.3, end_fraction=0.75, prune_start=0.25)
    table, runs = compare_methods(LeNet300100, split, ["dense", "static", "rigl", "gradual"], [0.8, 0.9], [0, 1], epochs=2,
                                  batch_size=16, lr=1e-2, keep_runs=True, snapshot=["fc1.weight"], **settings)
    assert set(table) == {"dense", "0.8/static", "0.8/rigl", "0.8/gradual", "0.9/static", "0.9/rigl", "0.9/gradual"}
    assert all(len(v["accuracy"]) == 2 for v in table.values())
    assert table["dense"]["training_flops"] == 1.0
    shapes = {n: p.shape for n, p in LeNet300100().named_parameters() if n.endswith("weight")}
    d, f = density_schedule(shapes, "rigl", 0.9, 8, **settings)
    macs = dense_macs(LeNet300100(), torch.zeros(1, 40))
    assert table["0.9/rigl"]["training_flops"] == pytest.approx(training_flops(macs, d, f))
    assert "fc1.weight" in runs["0.9/rigl", 1].updater.snapshots
    # the same seed gives the same result: a rerun of one configuration matches
    again, _ = compare_methods(LeNet300100, split, ["static"], [0.8], [1], epochs=2, batch_size=16, lr=1e-2, **settings)
    assert again["0.8/static"]["accuracy"] == table["0.8/static"]["accuracy"][1:]
    with pytest.raises(ValueError, match="methods"):
        compare_methods(LeNet300100, split, ["prune"], [0.8], [0], epochs=1)
