"""Issue 13, section 2: no mask is silently dropped or corrupted, bad input gets a clear error.

One test (or a small group) per case the issue lists for masks, magnitude,
csr and report; each failed on the code before the fix.
"""

import copy
import json
import math
import os
import time
import warnings

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, StepLR

from chapter11 import report
from chapter11.csr import SparseLinear, sparsify, to_csr
from chapter11.magnitude import masks_sparsity, prune_magnitude
from chapter11.masks import (
    MaskedOptimizer, apply_masks, enforce_masks, from_torch_prune, load_masked, load_masked_state_dict, mask_gradients,
    masks_of, prunable_parameters, remove_masks, save_masked, to_torch_prune,
)
from chapter11.models import LeNet300100

INF = math.inf


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def random_masks(model, keep=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.rand(p.shape, generator=g) < keep).float() for n, p in prunable_parameters(model).items()}


def masked_mlp(keep=0.3):
    model = mlp()
    masks = random_masks(model, keep)
    apply_masks(model, masks)
    return model, masks


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


def train_steps(model, opt, steps, scheduler=None):
    X, y = batch()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_masks_hold(model, masks):
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(masks_of(model)[name], mask), f"{name}: the mask changed"
        assert (params[name][mask == 0] == 0).all(), f"{name}: a pruned weight came back"


# --------------------------------------------- 3. from_torch_prune and PruningContainer


def test_from_torch_prune_reads_pruning_applied_twice():
    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.3)
    prune.random_unstructured(model[0], "weight", amount=0.3)  # second method: a PruningContainer
    prune.l1_unstructured(model[2], "weight", amount=0.5)
    assert isinstance(next(iter(model[0]._forward_pre_hooks.values())), prune.PruningContainer)
    expected = {"0.weight": model[0].weight_mask.clone(), "2.weight": model[2].weight_mask.clone()}
    X = torch.randn(5, 8)
    out = model(X)
    from_torch_prune(model)
    got = masks_of(model)
    assert sorted(got) == ["0.weight", "2.weight"]
    for name, mask in expected.items():
        assert torch.equal(got[name], mask), name
    assert abs(masks_sparsity(got) - (1 - (0.7 * 0.7 * 128 + 0.5 * 64) / 192)) < 0.02  # the product, not the last mask
    assert not model[0]._forward_pre_hooks and not hasattr(model[0], "weight_orig")
    torch.testing.assert_close(model(X), out)


@pytest.mark.parametrize("breakage", ["nan weights", "mask of 0.5"])
def test_from_torch_prune_converts_all_or_nothing(breakage):
    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    if breakage == "nan weights":
        prune.l1_unstructured(model[2], "weight", amount=0.5)
        with torch.no_grad():
            model[2].weight_orig[0, 0] = float("nan")
    else:
        prune.custom_from_mask(model[2], "weight", torch.full((4, 16), 0.5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="2.weight"):
        from_torch_prune(model)
    # nothing converted: both layers are still in torch's form, layer 0's mask included
    assert sorted(model.state_dict()) == sorted(before)
    assert all(torch.equal(v, before[k]) or torch.isnan(before[k]).any() for k, v in model.state_dict().items())
    assert model[0]._forward_pre_hooks and masks_of(model) == {}


# --------------------------------------------- 6. a pruned inf becomes exactly 0, never NaN


def test_apply_and_enforce_masks_turn_a_pruned_inf_into_zero():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[INF, -INF, 2.0, -INF]]))
    apply_masks(layer, {"weight": torch.tensor([[0.0, 1.0, 1.0, 0.0]])})
    assert layer.weight.tolist() == [[0.0, -INF, 2.0, 0.0]]  # pruned: exactly 0; kept: untouched
    with torch.no_grad():
        layer.weight[0, 0] = INF
    enforce_masks(layer)
    assert layer.weight.tolist() == [[0.0, -INF, 2.0, 0.0]]


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.1),
], ids=["sgd", "adam"])
def test_masked_optimizer_with_an_inf_gradient_keeps_pruned_weights_at_zero(make_opt):
    layer = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    apply_masks(layer, {"weight": torch.tensor([[1.0, 0.0, 1.0]])})
    opt = MaskedOptimizer(make_opt(layer.parameters()), layer)
    layer.weight.grad = torch.tensor([[0.5, INF, 0.5]])
    opt.step()
    assert layer.weight[0, 1].item() == 0.0  # not NaN
    assert torch.isfinite(layer.weight).all()
    for value in opt.state[layer.weight].values():
        if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
            assert value[0, 1].item() == 0.0, "optimizer state at a pruned weight must stay 0"
    layer.weight.grad = torch.tensor([[INF, -INF, 1.0]])
    mask_gradients(layer)
    assert layer.weight.grad.tolist() == [[INF, 0.0, 1.0]]


# --------------------------------------------- MaskedOptimizer and torch's schedulers


def test_masked_optimizer_is_an_optimizer_for_step_lr():
    model, masks = masked_mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = MaskedOptimizer(inner, model)
    assert isinstance(opt, torch.optim.Optimizer) and opt.optimizer is inner and opt.model is model
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    scheduler = StepLR(opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        train_steps(model, opt, 4, scheduler)
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)
    assert_masks_hold(model, masks)


def test_cosine_schedule_sets_the_lr_the_wrapped_optimizer_uses():
    model, masks = masked_mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.2)
    opt = MaskedOptimizer(inner, model)
    scheduler = CosineAnnealingLR(opt, T_max=4)
    train_steps(model, opt, 2, scheduler)
    lr = inner.param_groups[0]["lr"]
    assert lr == pytest.approx(0.1)
    # the next step moves every kept weight by exactly -lr * grad
    X, y = batch(1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    w0 = model[0].weight.detach().clone()
    g = model[0].weight.grad.detach().clone()
    opt.step()
    kept = masks["0.weight"] == 1
    torch.testing.assert_close(model[0].weight.detach()[kept], (w0 - lr * g)[kept])
    assert_masks_hold(model, masks)


def test_masked_optimizer_state_dict_round_trip():
    model, masks = masked_mlp()
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    scheduler = StepLR(opt, step_size=1, gamma=0.5)
    train_steps(model, opt, 3, scheduler)
    state = copy.deepcopy(opt.state_dict())  # torch's state_dict shares the momentum tensors; a saved file would not
    assert state["param_groups"][0]["lr"] == pytest.approx(0.0125)
    twin = copy.deepcopy(model)
    opt2 = MaskedOptimizer(torch.optim.SGD(twin.parameters(), lr=1.0, momentum=0.9), twin)
    opt2.load_state_dict(state)
    scheduler2 = StepLR(opt2, step_size=1, gamma=0.5)
    scheduler2.load_state_dict(scheduler.state_dict())
    assert opt2.param_groups is opt2.optimizer.param_groups and opt2.state is opt2.optimizer.state  # still shared after load
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.0125)
    p, p2 = model[0].weight, twin[0].weight
    assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[p2]["momentum_buffer"])
    train_steps(model, opt, 2, scheduler)
    train_steps(twin, opt2, 2, scheduler2)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)
    assert_masks_hold(twin, masks)


def test_masked_optimizer_closure_masks_the_gradients_it_computes():
    model, masks = masked_mlp()
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    X, y = batch()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure))
    buf = opt.state[model[0].weight]["momentum_buffer"]
    assert (buf[masks["0.weight"] == 0] == 0).all()
    assert_masks_hold(model, masks)


# --------------------------------------------- load_masked / load_masked_state_dict


def test_load_masked_state_dict_refuses_an_unmasked_checkpoint_for_a_masked_model():
    model, masks = masked_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"state_dict.*no mask for '0.weight'"):
        load_masked_state_dict(model, mlp(seed=1).state_dict())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    fresh = load_masked_state_dict(mlp(seed=1), mlp(seed=2).state_dict())  # unmasked into unmasked: a plain load
    assert masks_of(fresh) == {}


def test_load_masked_state_dict_names_unknown_and_missing_keys():
    model, _ = masked_mlp()
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"state_dict.*'fc9.weight_mask'"):
        load_masked_state_dict(mlp(), {**state, "fc9.weight_mask": torch.ones(3)})
    with pytest.raises(ValueError, match=r"state_dict.*'0.scale_mask'.*no matching parameter"):
        load_masked_state_dict(mlp(), {**state, "0.scale_mask": torch.ones(16)})  # the layer exists, the parameter does not
    with pytest.raises(ValueError, match=r"state_dict.*missing.*'2.bias'"):
        load_masked_state_dict(mlp(), {k: v for k, v in state.items() if k != "2.bias"})
    with pytest.raises(ValueError, match=r"state_dict.*'0.weight'.*\(16, 8\)"):
        load_masked_state_dict(nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 4)), state)
    with pytest.raises(TypeError, match="state_dict"):
        load_masked_state_dict(mlp(), [1, 2])
    fresh = mlp()
    keys = sorted(fresh.state_dict())
    with pytest.raises(ValueError):
        load_masked_state_dict(fresh, {**state, "fc9.weight_mask": torch.ones(3)})
    assert sorted(fresh.state_dict()) == keys, "a refused load must not leave mask buffers behind"


def test_load_masked_state_dict_refuses_weights_that_break_their_mask():
    model, masks = masked_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"][masks["0.weight"] == 0] = 1.0
    with pytest.raises(ValueError, match=r"state_dict.*0.weight.*non-zero"):
        load_masked_state_dict(mlp(), state)


def test_load_masked_refuses_a_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"path.*notes.txt.*not a checkpoint"):
        load_masked(mlp(), path)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(TypeError, match="state_dict"):
        load_masked(mlp(), tmp_path / "list.pt")


def test_masks_survive_training_with_a_scheduler_save_load_and_more_training(tmp_path):
    from chapter11.train import train

    model = LeNet300100()
    masks = {k: v.clone() for k, v in prune_magnitude(model, 0.8, exclude=["fc3"]).items()}
    g = torch.Generator().manual_seed(0)
    train_loader = [(torch.randn(64, 40, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(8)]
    opt = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model)
    scheduler = StepLR(opt, step_size=5, gamma=0.5)
    train(model, train_loader, epochs=2, optimizer=opt, callback=lambda *a: scheduler.step(), progress_bar=False)
    assert opt.param_groups[0]["lr"] < 1e-2
    assert_masks_hold(model, masks)
    fresh = load_masked(LeNet300100(), save_masked(model, tmp_path / "m.pt"))
    assert_masks_hold(fresh, masks)
    train(fresh, train_loader, epochs=1, lr=1e-2, progress_bar=False)  # wrapped automatically
    assert_masks_hold(fresh, masks)
    assert masks_sparsity(masks_of(fresh)) == pytest.approx(masks_sparsity(masks))


# --------------------------------------------- torch's pruning on top of our mask


def test_torch_pruning_over_our_mask_is_detected_and_repaired():
    model, masks = masked_mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.1)  # replaces the buffer 0.weight_mask with torch's own
    torch_mask = model[0].weight_mask.clone()
    assert not torch.equal(torch_mask, masks["0.weight"])  # what torch does: our mask is gone from the buffer
    for use in (masks_of, enforce_masks, remove_masks, to_torch_prune, lambda m: save_masked(m, "/nonexistent/x.pt")):
        with pytest.raises(ValueError, match=r"0.weight.*from_torch_prune"):
            use(model)
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match="from_torch_prune"):
        train_steps(model, opt, 1)
    with pytest.warns(UserWarning, match="0.weight"):
        from_torch_prune(model)
    assert torch.equal(masks_of(model)["0.weight"], masks["0.weight"] * torch_mask)  # our zeros and torch's
    assert_masks_hold(model, {"2.weight": masks["2.weight"]})


def test_to_torch_prune_then_torch_pruning_composes_the_masks():
    model, masks = masked_mlp(keep=0.5)
    to_torch_prune(model)
    prune.l1_unstructured(model[0], "weight", amount=0.75)  # on top of ours: torch keeps the product
    torch_mask = model[0].weight_mask.clone()
    assert (torch_mask <= masks["0.weight"]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the safe route needs no repair
        from_torch_prune(model)
    assert torch.equal(masks_of(model)["0.weight"], torch_mask)
    kept = int(masks["0.weight"].sum())
    assert int(torch_mask.sum()) == kept - round(0.75 * kept)  # torch's amount is a fraction of what is left
    assert_masks_hold(model, {"2.weight": masks["2.weight"]})


def test_apply_masks_on_a_layer_under_torch_pruning_says_what_to_do():
    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"0.weight.*torch.nn.utils.prune.*from_torch_prune"):
        apply_masks(model, {"0.weight": torch.ones(16, 8)})


# --------------------------------------------- magnitude, csr, report


@pytest.mark.parametrize("bad", [2.0, -1.0, 0.5, float("nan")])
def test_masks_sparsity_refuses_non_binary_masks(bad):
    with pytest.raises(ValueError, match=r"masks.*'b'"):
        masks_sparsity({"a": torch.ones(3), "b": torch.tensor([0.0, bad])})


def test_sparse_linear_refuses_a_non_binary_mask_and_zeroes_a_pruned_inf():
    layer = nn.Linear(3, 1, bias=False)
    layer.register_buffer("weight_mask", torch.tensor([[1.0, 2.0, 0.0]]))
    with pytest.raises(ValueError, match=r"linear.*weight_mask.*0 and 1"):
        SparseLinear.from_linear(layer)
    with pytest.raises(ValueError, match=r"weight_mask.*0 and 1"):
        sparsify(nn.Sequential(layer), min_sparsity=0.1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 5.0, INF]]))
    layer.weight_mask.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
    assert SparseLinear.from_linear(layer).values.tolist() == [1.0]


def test_csr_of_an_empty_matrix_has_a_repr():
    A = to_csr(torch.empty(0, 3))
    assert "shape=(0, 3)" in repr(A) and "sparsity=undefined" in repr(A)
    with pytest.raises(ValueError, match="no elements"):
        A.sparsity


def test_csr_to_scipy_widens_float16_exactly():
    W = torch.tensor([[0.0, 1.5, 0.0], [0.333, 0.0, -2.0]], dtype=torch.float16)
    S = to_csr(W).to_scipy()
    assert S.dtype == "float32"
    assert (S.toarray() == W.float().numpy()).all()
    assert "float32" in repr(S) and str(S)


@pytest.mark.parametrize("value", [torch.ones(2), torch.ones(0), __import__("numpy").ones(3)])
def test_record_refuses_a_tensor_of_many_numbers(value):
    with pytest.raises(TypeError, match=r"value for 'x'.*single number"):
        report.record("x", value)
    assert "x" not in report.recorded()


# --------------------------------------------- stale temp files of atomic writes


def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_write_removes_stale_temp_files_of_its_target_only(tmp_path):
    target = tmp_path / "run.json"
    dead, alive, old = _dead_pid(), os.getpid(), time.time() - 3600
    stale = [tmp_path / f".run.json.{dead}.abcd1234.tmp", tmp_path / ".run.json.k2j4h5g6.tmp"]  # a crashed writer; the old naming
    keep = [
        tmp_path / f".run.json.{alive}.live0000.tmp",  # its writer still runs
        tmp_path / f".run.json.{dead}.fresh000.tmp",  # too young to judge
        tmp_path / f".run.json.x.{dead}.other000.tmp",  # another target's
        tmp_path / f".run.{dead}.other111.tmp",  # another target's
    ]
    for path in stale + keep:
        path.write_text("partial")
        if "fresh" not in path.name:
            os.utime(path, (old, old))
    report.atomic_write_text("{}", target)
    assert target.read_text() == "{}"
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == sorted(p.name for p in keep)


def test_atomic_write_temp_names_carry_the_writer_pid(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        return real_replace(src, dst)

    monkeypatch.setattr(report.os, "replace", spy)
    report.atomic_write_bytes(b"x", tmp_path / "a.bin")
    assert seen and seen[0].startswith(f".a.bin.{os.getpid()}.") and seen[0].endswith(".tmp")


# ---------------------------------------------------------------- all or nothing (issue 25, item 2)


def _snapshot_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, state):
    now = model.state_dict()
    return set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())


def test_sensitivity_scan_puts_the_layer_back_when_the_metric_raises():
    from chapter11.sensitivity import sensitivity_scan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    state = _snapshot_state(model)
    calls = []

    def metric(m):
        calls.append(1)
        if len(calls) == 3:  # the baseline, layer 0 at 0%, then layer 0 at 50% raises
            raise RuntimeError("metric failed")
        return 1.0

    with pytest.raises(RuntimeError, match="metric failed"):
        sensitivity_scan(model, metric, [0.0, 0.5])
    assert _unchanged(model, state)


@pytest.mark.parametrize("twin", ["rewind", "rewind_loop"])
@pytest.mark.parametrize("bad, error", [("a list", TypeError), ("nan", ValueError), ("complex", TypeError)])
def test_rewind_refuses_a_bad_entry_before_overwriting_anything(twin, bad, error):
    from chapter11 import lottery

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    last = "2.bias"
    state[last] = {"a list": [0.0, 0.0], "nan": torch.full((2,), float("nan")), "complex": torch.zeros(2, dtype=torch.complex64)}[bad]
    before = _snapshot_state(model)
    with pytest.raises(error, match=r"state\['2.bias'\]"):
        getattr(lottery, twin)(model, state)
    assert _unchanged(model, before)


def test_iterative_pruning_rejects_its_arguments_before_the_first_cut():
    from chapter11.magnitude import iterative_magnitude_pruning
    from chapter11.schedules import prune_and_finetune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    state = _snapshot_state(model)
    loader = [(torch.randn(5, 4), torch.randint(0, 2, (5,)))]
    cases = [
        (lambda: iterative_magnitude_pruning(model, [0.5], finetune="train please"), TypeError, "finetune must be callable"),
        (lambda: iterative_magnitude_pruning(model, [0.5], metric_fn=3), TypeError, "metric_fn must be callable"),
        (lambda: iterative_magnitude_pruning(model, [0.5], scope="per-row"), ValueError, "scope must be one of"),
        (lambda: prune_and_finetune(model, [0.5], loader, total_steps=4, lr=-1.0), ValueError, "lr must be a positive number"),
        (lambda: prune_and_finetune(model, [0.5], None, total_steps=4), TypeError, "train_loader must be an iterable"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        assert _unchanged(model, state), message


# ---------------------------------------------------------------- torch.nn.utils.prune form (issue 25, item 5)


def _torch_pruned_lenet():
    model = LeNet300100()
    prune.l1_unstructured(model.fc2, "weight", amount=0.5)
    return model


@pytest.mark.parametrize("transform", ["export_onnx", "sparsify", "remove_channels", "remove_channels_inplace", "prune_and_evaluate"])
def test_copying_transforms_refuse_torch_prune_form_with_the_fix(transform, tmp_path):
    from chapter11.structured.channels import remove_channels

    model = _torch_pruned_lenet()
    calls = {
        "export_onnx": lambda: __import__("chapter11.export", fromlist=["export_onnx"]).export_onnx(model, torch.randn(1, 40), tmp_path / "m.onnx"),
        "sparsify": lambda: sparsify(model, min_sparsity=0.4),
        "remove_channels": lambda: remove_channels(model, {"fc1": [0, 1]}),
        "remove_channels_inplace": lambda: remove_channels(model, {"fc1": [0, 1]}, inplace=True),
        "prune_and_evaluate": lambda: __import__("chapter11.experiments.exp09_oneshot", fromlist=["x"]).prune_and_evaluate(
            model, None, torch.zeros(1, 8, dtype=torch.long), method="magnitude"),
    }
    with pytest.raises(TypeError, match=r"fc2 carries torch.nn.utils.prune's reparametrisation.*from_torch_prune"):
        calls[transform]()
    assert hasattr(model.fc2, "weight_orig")  # untouched


def test_masks_stay_ours_through_remove_channels_and_load_pruned(tmp_path):
    # torch's pruning applied on top of our masks must be caught and merged by from_torch_prune, not silently win
    from chapter11.models import TransformerClassifier
    from chapter11.structured.channels import remove_channels
    from chapter11.structured.checkpoint import load_pruned, save_pruned

    torch.manual_seed(0)
    model = LeNet300100()
    prune_magnitude(model, 0.8, scope="layerwise")
    small = remove_channels(model, {"fc1": list(range(50))})
    zeros_before = int((small.fc2.weight == 0).sum())
    prune.l1_unstructured(small.fc2, "weight", amount=0.1)  # torch's mask replaces ours as the hook's mask
    with pytest.warns(UserWarning, match="had replaced our mask"):
        from_torch_prune(small)
    assert int((small.fc2.weight == 0).sum()) >= zeros_before and int((small.fc2.weight_mask == 0).sum()) >= zeros_before

    tf = TransformerClassifier(vocab_size=32, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=8)
    prune_magnitude(tf, 0.6, scope="layerwise")
    loaded = load_pruned(save_pruned(tf, tmp_path / "tf"))
    fc = loaded.blocks[0].fc1
    zeros_before = int((fc.weight == 0).sum())
    prune.l1_unstructured(fc, "weight", amount=0.1)
    with pytest.warns(UserWarning, match="had replaced our mask"):
        from_torch_prune(loaded)
    assert int((fc.weight_mask == 0).sum()) >= zeros_before


def test_a_dirty_tree_does_not_record_into_benchmarks_but_loses_nothing(tmp_path, monkeypatch):
    from chapter11 import report

    full = tmp_path / "benchmarks" / "full"
    monkeypatch.setattr(report, "FULL_RUNS", full)
    monkeypatch.setattr(report, "UNCOMMITTED_RUNS", tmp_path / "build" / "uncommitted_runs")
    monkeypatch.setattr(report, "_commit", lambda: "a" * 40 + report.DIRTY)
    monkeypatch.delenv(report.FORCE_DIRTY_ENV, raising=False)
    with pytest.warns(UserWarning, match="uncommitted changes"):
        path = report.save_full_run("r", {"x": 1}, {}, "cmd", 1.0)
    assert path == tmp_path / "build" / "uncommitted_runs" / "r.json" and not (full / "r.json").exists()
    assert json.loads(path.read_text())["results"] == {"x": 1}
    forced = report.save_full_run("r", {"x": 2}, {}, "cmd", 1.0, force=True)
    assert forced == full / "r.json"
    record = report.load_full_run("r")
    assert record["commit"] == "a" * 40 + "+uncommitted changes (forced)"
    assert "a" * 40 + "+uncommitted changes (forced)" in report.provenance(record)
    monkeypatch.setenv(report.FORCE_DIRTY_ENV, "1")
    assert report.save_full_run("r", {"x": 3}, {}, "cmd", 1.0) == full / "r.json"
    elsewhere = tmp_path / "mine"  # a record written outside benchmarks/ is the user's own: written where asked
    monkeypatch.delenv(report.FORCE_DIRTY_ENV)
    assert report.save_full_run("r", {"x": 4}, {}, "cmd", 1.0, folder=elsewhere) == elsewhere / "r.json"
    monkeypatch.setattr(report, "_commit", lambda: "b" * 40)
    clean = report.load_full_run(report.save_full_run("c", {}, {}, "cmd", 1.0).stem)
    assert clean["commit"] == "b" * 40 and "b" * 40 + ";" in report.provenance(clean)
