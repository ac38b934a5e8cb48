"""Edge and bad input, table by table: each case raises an error that names the argument, and loop twins agree.

A row is (call, error type, a regex the message must match). A call that
returned a value, raised a raw error, or raised without naming what is wrong
fails its row.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from chapter11 import distill, lottery, magnitude, movement, sensitivity


# ---------------------------------------------------------------- loop twins on edge input (issue 25, item 7)

NAN = float("nan")
TWIN_CASES = {
    "early_stop [1, nan, 0.5]": (lottery.early_stop_loop, lottery.early_stop, ([10, 20, 30], [1.0, NAN, 0.5]), ValueError, r"val_losses\[1\]"),
    "smallest_mask with NaN": (magnitude.smallest_mask_loop, magnitude.smallest_mask, (torch.tensor([0.3, NAN, 0.1]), 1), ValueError,
                               "scores contain NaN"),
    "allocate_sparsity with a NaN metric": (
        sensitivity.allocate_sparsity_loop, sensitivity.allocate_sparsity,
        (sensitivity.SensitivityResult([0.0, 0.5], 1.0, {"a": [1.0, NAN], "b": [1.0, 0.9]}, {"a": 10, "b": 10}), 0.25),
        ValueError, "metric of a"),
    "distillation_loss with label -1": (distill.distillation_loss_loop, distill.distillation_loss,
                                        (torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, -1])), ValueError, "labels must be class indices"),
    "distillation_loss with label 3 of 3": (distill.distillation_loss_loop, distill.distillation_loss,
                                            (torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 3])), ValueError, "0..2"),
    "soft_penalty([empty])": (movement.soft_penalty_loop, movement.soft_penalty, ([torch.zeros(0)],), ValueError, "non-empty"),
}


@pytest.mark.parametrize("case", sorted(TWIN_CASES))
def test_twins_raise_the_same_error_on_edge_input(case):
    loop, vectorised, args, error, message = TWIN_CASES[case]
    for fn in (loop, vectorised):
        with pytest.raises(error, match=message):
            fn(*args)


def test_twins_still_agree_where_the_input_is_fine():
    assert lottery.early_stop_loop([1, 2, 3], [1.0, 0.5, 0.5]) == lottery.early_stop([1, 2, 3], [1.0, 0.5, 0.5]) == (1, 2)
    scores = torch.tensor([0.3, 0.2, 0.1, 0.2])
    assert torch.equal(magnitude.smallest_mask_loop(scores, 2), magnitude.smallest_mask(scores, 2))
    s, t, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    assert math.isclose(distill.distillation_loss_loop(s, t, y).item(), distill.distillation_loss(s, t, y).item(), rel_tol=1e-5)
    assert math.isclose(movement.soft_penalty_loop([torch.zeros(2)]), float(movement.soft_penalty([torch.zeros(2)])))
    r = sensitivity.SensitivityResult([0.0, 0.5], 1.0, {"a": [1.0, 0.5], "b": [1.0, 0.9]}, {"a": 10, "b": 10})
    assert sensitivity.allocate_sparsity_loop(r, 0.25) == sensitivity.allocate_sparsity(r, 0.25)


def test_soft_penalty_error_names_the_argument():
    with pytest.raises((TypeError, ValueError), match="score_tensors"):
        movement.soft_penalty([])
    with pytest.raises(ValueError, match="score_tensors"):
        movement.soft_penalty([nn.Parameter(torch.zeros(0))])
