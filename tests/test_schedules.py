import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from chapter11.schedules import (
    cubic_schedule,
    cubic_schedule_loop,
    cubic_sparsity,
    cubic_sparsity_loop,
    iterative_rate,
    iterative_schedule,
    iterative_schedule_loop,
    linear_schedule,
    linear_schedule_loop,
    make_schedule,
    one_shot_schedule,
    one_shot_schedule_loop,
    plot_schedules,
)

BAD_SPARSITY = [-0.1, 1.0, 1.5, float("nan")]
PAIRS = [
    (iterative_schedule_loop, iterative_schedule),
    (linear_schedule_loop, linear_schedule),
    (cubic_schedule_loop, cubic_schedule),
]


def test_cubic_hand_computed():
    # s_f = 0.8, s_i = 0.2, t0 = 10, n = 4, dt = 5: active on [10, 30]
    kw = dict(final_sparsity=0.8, initial_sparsity=0.2, t0=10, n=4, dt=5)
    assert cubic_sparsity(0, **kw) == 0.2
    assert cubic_sparsity(10, **kw) == pytest.approx(0.2)
    assert cubic_sparsity(20, **kw) == pytest.approx(0.8 - 0.6 * 0.125)  # halfway: (1/2)^3
    assert cubic_sparsity(30, **kw) == 0.8
    assert cubic_sparsity(1000, **kw) == 0.8


def test_cubic_loop_equals_vectorised_and_is_monotone():
    steps = list(range(-5, 120, 3))
    kw = dict(final_sparsity=0.9, initial_sparsity=0.1, t0=7, n=20, dt=5)
    a = cubic_sparsity_loop(steps, **kw)
    b = cubic_sparsity(steps, **kw)
    c = cubic_sparsity(torch.tensor(steps), **kw)
    assert np.allclose(a, b, atol=1e-12) and np.allclose(b, c, atol=1e-12)
    assert all(x <= y + 1e-15 for x, y in zip(b, b[1:]))
    # the derivative shrinks: early steps prune more than late ones
    inner = cubic_sparsity([7, 8, 106, 107], **kw)
    assert inner[1] - inner[0] > inner[3] - inner[2]


@pytest.mark.parametrize("loop, vec", PAIRS)
@pytest.mark.parametrize("stages", [1, 3, 10])
def test_stage_schedules_loop_equals_vectorised(loop, vec, stages):
    a, b = loop(0.8, stages=stages), vec(0.8, stages=stages)
    assert len(a) == len(b) == stages
    assert np.allclose(a, b, atol=1e-12)
    assert b[-1] == 0.8
    assert all(x < y for x, y in zip(b, b[1:]))


def test_iterative_prunes_the_same_fraction_of_survivors():
    s = iterative_schedule(0.8, stages=10)
    p = iterative_rate(0.8, 10)
    assert p == pytest.approx(1 - 0.2 ** 0.1)
    densities = [1.0] + [1 - x for x in s]
    for before, after in zip(densities, densities[1:]):
        assert (before - after) / before == pytest.approx(p)


def test_linear_and_one_shot_hand_computed():
    assert linear_schedule(0.6, stages=3) == pytest.approx([0.2, 0.4, 0.6])
    assert linear_schedule_loop(0.6, stages=2, initial_sparsity=0.2) == pytest.approx([0.4, 0.6])
    assert one_shot_schedule(0.8) == one_shot_schedule_loop(0.8) == [0.8]
    assert make_schedule("iterative", 0.8, stages=10) == iterative_schedule(0.8, 10)


@pytest.mark.parametrize("bad", BAD_SPARSITY)
def test_bad_sparsity_raises(bad):
    for call in (
        lambda: cubic_sparsity(1, bad),
        lambda: cubic_sparsity_loop([1], bad),
        lambda: iterative_schedule(bad),
        lambda: iterative_schedule_loop(bad),
        lambda: linear_schedule(bad),
        lambda: cubic_schedule(bad),
        lambda: one_shot_schedule(bad),
    ):
        with pytest.raises(ValueError, match="sparsity"):
            call()


def test_bad_other_arguments():
    with pytest.raises(ValueError, match="initial_sparsity"):
        cubic_sparsity(1, 0.5, initial_sparsity=0.7)
    with pytest.raises(ValueError, match="stages"):
        iterative_schedule(0.8, stages=0)
    with pytest.raises(ValueError, match="n "):
        cubic_sparsity(1, 0.8, n=0)
    with pytest.raises(ValueError, match="dt"):
        cubic_sparsity(1, 0.8, dt=0)
    with pytest.raises(ValueError, match="kind"):
        make_schedule("exponential", 0.8)
    with pytest.raises(ValueError, match="t "):
        cubic_sparsity_loop([math.nan], 0.8)


def test_plot_schedules_draws_one_line_each():
    ax = plot_schedules({k: make_schedule(k, 0.8, 10) for k in ("one-shot", "iterative", "linear", "cubic")})
    assert len(ax.get_lines()) == 4
    assert "sparsity" in ax.get_ylabel()
    import matplotlib.pyplot as plt

    plt.close(ax.figure)


# --- equal budgets --------------------------------------------------------------

from torch import nn

from chapter11.masks import masks_of
from chapter11.magnitude import masks_sparsity
from chapter11.experiments.exp01_schedules import SWEEP_METHODS, equal_budget_sweep, sweep_curve
from chapter11.schedules import prune_and_finetune, split_budget, split_budget_loop


@pytest.mark.parametrize("fn", [split_budget_loop, split_budget])
def test_split_budget_hand_computed(fn):
    assert fn(10, 3) == [4, 3, 3]
    assert fn(500, 10) == [50] * 10
    assert fn(2, 4) == [1, 1, 0, 0]
    assert fn(0, 2) == [0, 0]


def test_split_budget_twins_agree_and_add_up():
    for total in (0, 1, 7, 99, 500):
        for stages in (1, 2, 3, 10, 13):
            a, b = split_budget_loop(total, stages), split_budget(total, stages)
            assert a == b and sum(b) == total and max(b) - min(b) <= 1 and all(isinstance(x, int) for x in b)


@pytest.mark.parametrize("bad", [(-1, 2), (1.5, 2), (True, 2), (10, 0), (10, 1.0)])
def test_split_budget_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="total_steps|stages"):
        split_budget(*bad)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _loader(n_batches=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        X = torch.randn(8, 6, generator=g)
        batches.append((X, (X[:, 0] > 0).long() + (X[:, 1] > 0).long()))
    return batches


class CountingLoader:
    """A loader that counts the batches (= optimizer steps) drawn from it."""

    def __init__(self, batches):
        self.batches, self.drawn = batches, 0

    def __iter__(self):
        for b in self.batches:
            self.drawn += 1
            yield b

    def __len__(self):
        return len(self.batches)


@pytest.mark.parametrize("schedule", [[0.8], iterative_schedule(0.8, 10), [0.3, 0.6]])
def test_prune_and_finetune_spends_exactly_the_budget(schedule):
    loader = CountingLoader(_loader())
    model = _net()
    rows = prune_and_finetune(model, schedule, loader, total_steps=23, lr=1e-2)
    assert loader.drawn == 23 == sum(r["steps"] for r in rows)
    assert [r["steps"] for r in rows] == split_budget(23, len(schedule))
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    assert abs(masks_sparsity(masks_of(model)) - schedule[-1]) <= 1 / sum(w.numel() for w in weights)
    assert all(float((w == 0).float().mean()) > 0 for w in weights)  # pruned weights stayed at zero through training


def test_equal_budget_sweep_is_fair_and_leaves_dense_alone():
    dense = _net()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    loader = CountingLoader(_loader())
    norm = lambda m: float(sum(p.detach().abs().sum() for p in m.parameters()))
    rows = equal_budget_sweep(dense, [0.5, 0.9], loader, 12, {"norm": norm}, stages=3, lr=1e-2, seed=1, keep_stages=[0.9], keep_models=True)
    assert loader.drawn == 12 * (2 * 4 + 1)  # every run took exactly its 12 steps
    assert [(r["method"], r["target"]) for r in rows] == [(m, t) for t in (0.5, 0.9) for m in SWEEP_METHODS[:-1]] + [("dense", 0.0)]
    assert all(r["steps"] == 12 for r in rows)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items()) and not masks_of(dense)
    by = {(r["method"], r["target"]): r for r in rows}
    for t in (0.5, 0.9):
        one_shot, random = masks_of(by["one-shot", t]["model"]), masks_of(by["random", t]["model"])
        for name in one_shot:  # the random control keeps the one-shot count in every layer, elsewhere
            kept = int(one_shot[name].sum())
            assert kept == int(random[name].sum())
            if 0 < kept < one_shot[name].numel():
                assert not torch.equal(one_shot[name], random[name])
        assert by["one-shot", t]["sparsity"] == by["random", t]["sparsity"] == pytest.approx(by["iterative", t]["sparsity"], abs=1e-12)
        assert "pruned" in by["one-shot", t] and "pruned" not in by["iterative", t]
    assert len(by["iterative", 0.9]["stages"]) == 3 and "stages" not in by["iterative", 0.5]
    assert by["dense", 0.0]["pruned"]["norm"] == pytest.approx(norm(dense))
    assert by["dense", 0.0]["sparsity"] == 0.0 and not masks_of(by["dense", 0.0]["model"])


def test_equal_budget_sweep_rejects_bad_input():
    dense, loader, metrics = _net(), _loader(), {"a": lambda m: 0.0}
    with pytest.raises(ValueError, match="methods"):
        equal_budget_sweep(dense, [0.5], loader, 2, metrics, methods=("one-shot", "lucky"))
    with pytest.raises(TypeError, match="metrics"):
        equal_budget_sweep(dense, [0.5], loader, 2, {"a": 1.0})
    with pytest.raises(ValueError, match="targets"):
        equal_budget_sweep(dense, [1.0], loader, 2, metrics)
    with pytest.raises(ValueError, match="stage_metric"):
        equal_budget_sweep(dense, [0.5], loader, 2, metrics, stage_metric="b")
    with pytest.raises(ValueError, match="scope"):
        equal_budget_sweep(dense, [0.5], loader, 2, metrics, scope="local")
    pruned = _net()
    prune_and_finetune(pruned, [0.5], loader, 0)
    with pytest.raises(ValueError, match="unpruned"):
        equal_budget_sweep(pruned, [0.5], loader, 2, metrics)


def test_sweep_curve_summarises_over_seeds():
    sweeps = [[{"method": "one-shot", "target": t, "after": {"acc": v + s}, "pruned": {"acc": v}} for t, v in ((0.9, 0.5), (0.5, 0.7))] for s in (0.0, 0.1, 0.2)]
    xs, ys = sweep_curve(sweeps, "one-shot", "acc")
    assert xs == [0.5, 0.9] and [round(y.mean, 6) for y in ys] == [0.8, 0.6] and ys[0].n == 3
    assert ys[0].sd == pytest.approx(0.1)
    _, before = sweep_curve(sweeps, "one-shot", "acc", when="pruned")
    assert [y.sd for y in before] == pytest.approx([0.0, 0.0], abs=1e-12)
    with pytest.raises(ValueError, match="method"):
        sweep_curve(sweeps, "random", "acc")
    with pytest.raises(ValueError, match="metric"):
        sweep_curve(sweeps, "one-shot", "loss")
    with pytest.raises(ValueError, match="same targets"):
        sweep_curve([sweeps[0], sweeps[1][:1]], "one-shot", "acc")
