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
