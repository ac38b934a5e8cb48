"""The lab checkers: library fill-ins pass, wrong ones fail with a useful message that never gives the answer.

The graded lab notebooks that call these checkers are tested in tests/test_labs.py.
"""

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from chapter11 import check


CORRECT = {
    "sparsity": "from chapter11.sparsity import sparsity",
    "magnitude_mask": "from chapter11.magnitude import magnitude_mask",
    "threshold_for_sparsity": "from chapter11.magnitude import threshold_for_sparsity",
    "movement_scores": "from chapter11.movement import movement_scores",
    "to_csr": "def to_csr(A):\n    from chapter11.csr import to_csr as lib\n    c = lib(A)\n    return c.data, c.indices, c.indptr",
    "rigl_update": ("def rigl_update(weight, grad, mask, n):\n    from chapter11.dynamic import drop, grow\n"
                    "    s = torch.where(mask == 0, grad.abs(), torch.full_like(grad, -1.0))\n"
                    "    return grow(s, drop(weight, mask, n), n) if n else mask.clone()"),
    "head_importance": "def head_importance(gate_grads):\n    return gate_grads.abs().mean(0)",
}

# (blank name, wrong code, a phrase the failure message must contain)
WRONG = {
    "sparsity": ("def sparsity(W):\n    return float((W != 0).sum()) / W.numel()", "not the sparsity"),
    "magnitude_mask": ("def magnitude_mask(W, threshold):\n    return (W.abs() > threshold).float()", "ties exactly at the threshold"),
    "threshold_for_sparsity": ("def threshold_for_sparsity(W, sparsity):  # off by one: the largest pruned magnitude\n"
                               "    return float(W.abs().flatten().sort().values[max(round(sparsity * W.numel()) - 1, 0)])",
                               "prunes"),
    "movement_scores": ("def movement_scores(weights, grads):\n    return sum(g * w for w, g in zip(weights, grads))", "wrong sign"),
    "to_csr": ("def to_csr(A):\n    r, c = np.nonzero(A)\n    return A[r, c], c, np.bincount(r, minlength=A.shape[0])", "indptr"),
    "rigl_update": ("def rigl_update(weight, grad, mask, n):\n    return mask.clone()", "dropped 0"),
    "head_importance": ("def head_importance(gate_grads):\n    return gate_grads.mean(0).abs()", "differs from the reference"),
}


CHECKERS = {
    "sparsity": "check_sparsity",
    "magnitude_mask": "check_magnitude_mask",
    "threshold_for_sparsity": "check_threshold_for_sparsity",
    "movement_scores": "check_movement_scores",
    "to_csr": "check_to_csr",
    "rigl_update": "check_rigl_update",
    "head_importance": "check_head_importance",
}


def _function(code, name):
    namespace = {"torch": torch, "np": np}
    exec(code, namespace)
    return namespace[name]


def _run_checker(name, code):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = getattr(check, CHECKERS[name])(_function(code, name))
    return result, out.getvalue()


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_library_fill_ins_pass(name):
    result, out = _run_checker(name, CORRECT[name])
    assert result is True, out
    assert "failed" not in out


@pytest.mark.parametrize("name", sorted(WRONG))
def test_wrong_fill_in_fails_with_useful_message(name):
    result, out = _run_checker(name, WRONG[name][0])
    assert result is False, out
    line = next(l for l in out.splitlines() if "failed" in l)
    assert line.startswith(f"check_{name}: case "), line
    assert WRONG[name][1] in line, line


def test_unfilled_blank_is_reported_not_crashing():
    out = io.StringIO()
    def blank(W):
        raise NotImplementedError("fill in sparsity")
    with contextlib.redirect_stdout(out):
        assert check.check_sparsity(blank) is False
    assert "raised NotImplementedError" in out.getvalue()


def test_failure_message_does_not_leak_expected_values():
    from chapter11.sparsity import sparsity
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        check.check_sparsity(lambda W: 0.123456)
    first = sparsity(check._sparse_randn(4, 5, 0.4, 1))
    assert f"{first}" not in out.getvalue() and f"{first:.3f}" not in out.getvalue()


def test_checker_does_not_let_student_mutate_reference():
    def mutating(W, threshold):
        mask = (W.abs() >= threshold).float()
        W.zero_()
        return mask
    with contextlib.redirect_stdout(io.StringIO()):
        assert check.check_magnitude_mask(mutating) is True


def test_rigl_checker_accepts_other_tie_breaks():
    def reversed_ties(weight, grad, mask, n):
        # same rule, ties broken toward the higher index
        flat_w, flat_g, m = weight.flatten().tolist(), grad.flatten().tolist(), mask.flatten().tolist()
        active = sorted((i for i in range(len(m)) if m[i]), key=lambda i: (abs(flat_w[i]), -i))[:n]
        grow = sorted((i for i in range(len(m)) if not m[i]), key=lambda i: (-abs(flat_g[i]), -i))[:n]
        new = list(m)
        for i in active:
            new[i] = 0.0
        for i in grow:
            new[i] = 1.0
        return torch.tensor(new).view(mask.shape)
    with contextlib.redirect_stdout(io.StringIO()):
        assert check.check_rigl_update(reversed_ties) is True


# ---------------------------------------------------------------- issue 19: checkers that cannot be fooled
# Each wrong solution below passed an earlier version of the checkers; each
# right one failed. Every entry is one test.


def _rigl_by_sorting(weight, grad, mask, n, active=None, regrow_dropped=False):
    """A plain RigL step written the way a student would; `active` and `regrow_dropped` inject the mistakes."""
    flat_w, flat_g = weight.flatten(), grad.flatten()
    is_active = mask.flatten().bool() if active is None else active.flatten()
    new = is_active.float().clone()
    candidates = torch.nonzero(is_active).flatten()
    order = flat_w[candidates].abs().argsort(stable=True)
    new[candidates[order[:n]]] = 0.0
    inactive = (new == 0) if regrow_dropped else ~mask.flatten().bool() & (new == 0)
    scores = torch.where(inactive, flat_g.abs(), torch.full_like(flat_g, -1.0))
    if n:
        new[scores.argsort(descending=True, stable=True)[:n]] = 1.0
    return new.view(mask.shape)


def _threshold_floor(W, sparsity):
    k = math.floor(sparsity * W.numel())
    if k == 0:
        return 0.0
    if k >= W.numel():
        return math.inf
    return float(W.abs().flatten().sort().values[k])


def _csr_values_off(A):
    r, c = np.nonzero(A)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=A.shape[0]))])
    return A[r, c] * (1 + 5e-6), c, indptr  # relative error 5e-6: inside np.allclose's default rtol


def _magnitude_tau0_special(W, threshold):
    if threshold == 0:
        return (W != 0).float()
    return (W.abs() >= threshold).float()


SNEAKY_WRONG = {
    "rigl regrows a just-dropped connection": (
        "check_rigl_update", lambda w, g, m, n: _rigl_by_sorting(w, g, m, n, regrow_dropped=True)),
    "rigl takes the active set from w != 0": (
        "check_rigl_update", lambda w, g, m, n: _rigl_by_sorting(w, g, m, n, active=(w != 0))),
    "threshold with floor(s n) instead of round(s n)": ("check_threshold_for_sparsity", _threshold_floor),
    "csr values off by 5e-6": ("check_to_csr", _csr_values_off),
    "sparsity counts NaN as zero": ("check_sparsity", lambda W: 1 - float((W.abs() > 0).sum()) / W.numel()),
    "magnitude mask compared in float16": (
        "check_magnitude_mask", lambda W, t: (W.half().abs() >= t).float()),
    "magnitude mask drops exact zeros when tau = 0": ("check_magnitude_mask", _magnitude_tau0_special),
}


@pytest.mark.parametrize("label", sorted(SNEAKY_WRONG))
def test_sneaky_wrong_solution_fails(label):
    name, fn = SNEAKY_WRONG[label]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert getattr(check, name)(fn) is False, out.getvalue()
    assert " failed: " in out.getvalue()


SNEAKY_RIGHT = {
    "sparsity as a float32 tensor": ("check_sparsity", lambda W: 1 - torch.count_nonzero(W) / W.numel()),
    "sparsity as np.float32": ("check_sparsity", lambda W: np.float32(1 - np.count_nonzero(W.numpy()) / W.numel())),
    "sparsity as a 0-d numpy array": ("check_sparsity", lambda W: np.array(1 - np.count_nonzero(W.numpy()) / W.size(0) / W[0].numel())),
    "threshold as np.float32": (
        "check_threshold_for_sparsity",
        lambda W, s: np.float32(__import__("chapter11.magnitude", fromlist=["x"]).threshold_for_sparsity(W, s))),
    "magnitude mask as a bool tensor": ("check_magnitude_mask", lambda W, t: W.abs() >= t),
    "csr with float64 data, int32 indices and lists": (
        "check_to_csr",
        lambda A: (A[np.nonzero(A)].astype(np.float64), np.nonzero(A)[1].astype(np.int32).tolist(),
                   [0] + np.cumsum((A != 0).sum(1)).tolist())),
    "rigl written by sorting": ("check_rigl_update", _rigl_by_sorting),
}


@pytest.mark.parametrize("label", sorted(SNEAKY_RIGHT))
def test_right_solution_in_another_form_passes(label):
    name, fn = SNEAKY_RIGHT[label]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert getattr(check, name)(fn) is True, out.getvalue()


def _failure_line(name, fn):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert getattr(check, name)(fn) is False
    return out.getvalue()


def test_head_importance_message_does_not_give_the_answer_away():
    line = _failure_line("check_head_importance", lambda g: g.mean(0).abs()).lower()
    for giveaway in ("abs", "average", "mean", "per example"):
        assert giveaway not in line, line


def test_rigl_message_does_not_state_the_rule():
    line = _failure_line("check_rigl_update", lambda w, g, m, n: _rigl_by_sorting(w, g, m, n, regrow_dropped=True))
    assert "regrown" not in line and "cannot" not in line, line


def test_movement_message_does_not_hint_the_formula():
    line = _failure_line("check_movement_scores", lambda W, G: -G[-1] * W[-1])
    assert "sum" not in line and "every step" not in line, line


def test_failure_messages_never_print_a_reference_number():
    """A wrong threshold's message names counts of the student's own result, not the expected count."""
    line = _failure_line("check_threshold_for_sparsity", _threshold_floor)
    assert "should prune" not in line or not any(ch.isdigit() for ch in line.split("should prune")[1]), line
