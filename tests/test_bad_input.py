"""Edge and bad input, table by table: each case raises an error that names the argument, and loop twins agree.

A row is (call, error type, a regex the message must match). A call that
returned a value, raised a raw error, or raised without naming what is wrong
fails its row.
"""

from __future__ import annotations

import math
import tempfile

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


# ---------------------------------------------------------------- bad input, module by module (issue 25, item 8)


def _lenet():
    from chapter11.models import LeNet300100

    return LeNet300100()


def _cases():
    from chapter11 import csr, deep_compression, masks, report, sparsity, stats
    from chapter11.structured import channels, heads, llm

    W = torch.randn(4, 8)
    return {
        # sparsity
        "check_amount n=-4": (lambda: sparsity.check_amount(0.5, n=-4), ValueError, "n .*must be an int >= 0"),
        "check_model None": (lambda: sparsity.check_model(None), TypeError, "model must be a torch.nn.Module"),
        # masks: model=None in every function that takes a model
        **{f"masks.{fn} None": (lambda fn=fn: getattr(masks, fn)(None), TypeError, "model must be a torch.nn.Module")
           for fn in ("masks_of", "remove_masks", "enforce_masks", "mask_gradients", "to_torch_prune", "from_torch_prune")},
        "apply_masks None": (lambda: masks.apply_masks(None, {}), TypeError, "model must be a torch.nn.Module"),
        # movement, heads, llm: model=None
        **{f"movement.{fn} None": (lambda fn=fn: getattr(movement, fn)(None), TypeError, "model must be")
           for fn in ("encoder_linear_names", "wrap_linears", "masked_layers", "masked_sparsity", "finalize")},
        "standardize str": (lambda: movement.standardize("abc"), TypeError, "x must be a torch.Tensor"),
        "forward_macs None": (lambda: heads.forward_macs(None), TypeError, "model must be"),
        **{f"llm.{fn} None": (lambda fn=fn: getattr(llm, fn)(None), TypeError, "model must be")
           for fn in ("mlp_widths", "parameter_count", "mlp_modules")},
        # channels: plans hold ints only
        "remove_channels 1.5": (lambda: channels.remove_channels(_lenet(), {"fc1": [1.5]}), TypeError, "unit indices must be ints"),
        "remove_channels True": (lambda: channels.remove_channels(_lenet(), {"fc1": [True]}), TypeError, "unit indices must be ints"),
        "remove_channels '12'": (lambda: channels.remove_channels(_lenet(), {"fc1": "12"}), TypeError, "must be a list of unit indices"),
        # stats
        "summarize overflow": (lambda: stats.summarize([1e308, 1e308]), ValueError, "too large"),
        "summarize_loop overflow": (lambda: stats.summarize_loop([1e308, 1e308]), ValueError, "too large"),
        "summarize confidence=5": (lambda: stats.summarize([1.0, 2.0], confidence=5), ValueError, "confidence must be a number in"),
        "summarize_loop confidence=5": (lambda: stats.summarize_loop([1.0, 2.0], confidence=5), ValueError, "confidence"),
        # deep compression
        "huffman_decode nbits=-1": (lambda: deep_compression.huffman_decode(deep_compression.huffman_encode([0, 1, 1])[0], b"\x00", -1),
                                    ValueError, "nbits must be an int >= 0"),
        "kmeans_1d NaN": (lambda: deep_compression.kmeans_1d(torch.tensor([0.0, float("nan"), 1.0]), 2), ValueError, "NaN or infinite"),
        "kmeans_1d init size": (lambda: deep_compression.kmeans_1d(torch.tensor([0.0, 0.5, 1.0]), 2, init=torch.zeros(3)), ValueError,
                                "init must be a finite tensor of k = 2"),
        # csr
        "storage_bytes n=5 m=4": (lambda: csr.storage_bytes(W, n=5, m=4), ValueError, "1 <= n <= m"),
        # lottery
        "LotteryConfig seed='a'": (lambda: lottery.LotteryConfig(seed="a"), ValueError, "seed must be an int"),
        "LotteryConfig data_seed=-1": (lambda: lottery.LotteryConfig(data_seed=-1), ValueError, "data_seed must be an int"),
        # plots and tables of results: the wrong object says which one is expected
        "plot_schedules None": (lambda: __import__("chapter11.schedules", fromlist=["x"]).plot_schedules(None), TypeError, "schedules must map"),
        "plot_sensitivity str": (lambda: sensitivity.plot_sensitivity("abc"), TypeError, "result must be a SensitivityResult"),
        "compress_layer None": (lambda: deep_compression.compress_layer(None), TypeError, "shared must be a SharedLayer"),
        "storage_table str": (lambda: deep_compression.storage_table("abc"), TypeError, "shared must map layer names"),
        "format_storage_table str": (lambda: deep_compression.format_storage_table("abc"), TypeError, "rows must be a list of StorageRow"),
        "crossovers str": (lambda: __import__("chapter11.nm", fromlist=["x"]).crossovers("abc"), TypeError, "rows must be a list"),
        # None where a sequence or a path belongs
        "summarize None": (lambda: stats.summarize(None), TypeError, "values must be a sequence of numbers"),
        "summarize_loop None": (lambda: stats.summarize_loop(None), TypeError, "values must be a sequence of numbers"),
        "huffman_encode None": (lambda: deep_compression.huffman_encode(None), TypeError, "symbols must be a sequence"),
        "seed_table None": (lambda: lottery.seed_table(None), TypeError, "results must be LotteryResults"),
        "seed_curve None": (lambda: lottery.seed_curve(None), TypeError, "table must be the dict seed_table returns"),
        "load_lottery None": (lambda: lottery.load_lottery(None), TypeError, "path must be a folder path"),
        "llm_shapes None": (lambda: __import__("chapter11.nm", fromlist=["x"]).llm_shapes(None), TypeError, "names must be"),
        "plan_from_order None": (lambda: heads.plan_from_order(None), TypeError, "order must be the list"),
        # report: names stay inside the recorded-runs folder
        "load_full_run ../outside": (lambda: report.load_full_run("../outside"), ValueError, "plain file stem"),
        "save_full_run ..": (lambda: report.save_full_run("..", {}, {}, "x", 1.0, folder=tempfile.mkdtemp()), ValueError, "plain file stem"),
    }


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_a_clear_error(case):
    call, error, message = CASES[case]
    with pytest.raises(error, match=message):
        call()
