"""Checkers for the lab notebooks in notebooks/exercises/.

Each `check_*` runs a student's function on hidden cases (random tensors and
edge cases: ties, all zeros, NaN, rounding edges, active weights that are
exactly zero, ...), compares with the library's own implementation or with
the rule the lab states, prints one short line, and returns True or False.
On a failure the line names the first failing case and what is wrong with
the student's answer, never the expected values or the formula.

    >>> from chapter11.sparsity import sparsity
    >>> check_sparsity(sparsity)
    check_sparsity: passed all 10 cases
    True
    >>> check_sparsity(lambda W: float((W == 0).sum()))   # a count, not a fraction
    check_sparsity: case 1 of 10 (random 4x5 with zeros) failed: returned 8.0, which is not the sparsity of this tensor
    False

Answers are accepted in any reasonable form: a sparsity may come back as a
Python float, an `np.float32`, or a one-element tensor of float32 (whose
rounding is allowed for; sparsities differ by at least 1/numel, far more);
masks may be float, int or bool tensors or numpy arrays.

But: the checkers test results, not style or speed, and a determined student
can read this file; they are for learning, not for exams. The graded labs
(`chapter11.labs`) keep further tests hidden in the instructor's notebooks.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

__all__ = [
    "check_sparsity",
    "check_magnitude_mask",
    "check_threshold_for_sparsity",
    "check_movement_scores",
    "check_to_csr",
    "check_rigl_update",
    "check_head_importance",
    "graded",
]

SPARSITY_ATOL = 1e-6  # float32 rounding of a fraction in [0, 1] is < 6e-8; cases have numel < 1e5


class _Fail(Exception):
    """A case failed; the message says how, without the expected answer."""


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sparse_randn(rows: int, cols: int, zero_fraction: float, seed: int) -> torch.Tensor:
    g = _gen(seed)
    W = torch.randn(rows, cols, generator=g)  # (rows, cols)
    W[torch.rand(rows, cols, generator=g) < zero_fraction] = 0.0
    return W


_raising = False  # set by `graded`: a failure raises AssertionError with its line instead of printing it


def _run(name: str, cases: list[tuple[str, Callable[[], None]]]) -> bool:
    """Run the cases in order; print the first failure or a pass line (under `graded`, raise the failure)."""
    for i, (label, case) in enumerate(cases, start=1):
        try:
            case()
        except _Fail as e:
            line = f"{name}: case {i} of {len(cases)} ({label}) failed: {e}"
        except Exception as e:  # the student's code raised
            line = f"{name}: case {i} of {len(cases)} ({label}) failed: your function raised {type(e).__name__}: {str(e)[:120]}"
        else:
            continue
        if _raising:
            raise AssertionError(line)
        print(line)
        return False
    print(f"{name}: passed all {len(cases)} cases")
    return True


def _as_number(x) -> float:
    """A Python float from a one-number answer: float, int, np.float32, a 0-d/1-element array or tensor.

    >>> _as_number(np.float32(0.25)), _as_number(torch.tensor([0.5])), _as_number(3)
    (0.25, 0.5, 3.0)
    """
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    elif isinstance(x, np.ndarray) and x.size == 1:
        x = x.item()
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        shape = f" of shape {tuple(x.shape)}" if hasattr(x, "shape") else ""
        raise _Fail(f"returned a {type(x).__name__}{shape}, expected one number")
    return float(x)


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise _Fail(f"{what} should be a torch.Tensor, got {type(x).__name__}")
    return x.detach()


def _zero_one(got, shape: tuple, what: str) -> torch.Tensor:
    """The answer as a float 0/1 tensor of the expected shape, or a _Fail saying what is off."""
    got = _as_tensor(got, what)
    if tuple(got.shape) != tuple(shape):
        raise _Fail(f"{what} has shape {tuple(got.shape)}, the input has shape {tuple(shape)}")
    got = got.float()
    if not set(torch.unique(got).tolist()) <= {0.0, 1.0}:
        raise _Fail(f"{what} should hold only 0 and 1, it holds other values too")
    return got


def _same_mask(got, expected: torch.Tensor, what: str = "the mask") -> None:
    got = _zero_one(got, tuple(expected.shape), what)
    wrong = int((got != expected.float()).sum())
    if wrong:
        raise _Fail(f"{what} differs from the reference at {wrong} of {expected.numel()} positions")


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone()  # the student must not be able to change our reference input


def _below(x: float, dtype=torch.float32) -> float:
    """The largest value of `dtype` below x: a weight a hair under a threshold."""
    return torch.tensor(x, dtype=dtype).nextafter(torch.tensor(-math.inf, dtype=dtype)).item()


# ---------------------------------------------------------------- lab 1: sparsity


def check_sparsity(fn: Callable[[torch.Tensor], float]) -> bool:
    """fn(W) -> s = 1 - nonzero / total, as a number (float, np.float32 or a one-element tensor)."""
    from chapter11.sparsity import sparsity

    nan_inf = torch.tensor([math.nan, 0.0, math.inf, -0.0, -math.inf, 1.0])
    inputs = [
        ("random 4x5 with zeros", _sparse_randn(4, 5, 0.4, 1)),
        ("no zeros", torch.randn(3, 3, generator=_gen(2)) + 10),
        ("all zeros", torch.zeros(2, 6)),
        ("one element, zero", torch.zeros(1)),
        ("1-D vector", torch.tensor([0.0, -1.0, 0.0, 2.0])),
        ("3-D tensor", _sparse_randn(6, 8, 0.7, 3).reshape(2, 3, 8)),
        ("integer tensor", torch.tensor([[0, 1], [2, 0], [0, 0]])),
        ("tiny non-zeros", torch.tensor([1e-30, 0.0, -1e-30, 0.0])),
        ("NaN, inf and -0.0", nan_inf),
        ("float64, 1,000 weights", _sparse_randn(25, 40, 0.37, 4).double()),
    ]

    def case(W):
        def run():
            got = _as_number(fn(_copy(W)))
            if math.isnan(got) or not math.isclose(got, sparsity(W), rel_tol=0.0, abs_tol=SPARSITY_ATOL):
                raise _Fail(f"returned {got!r}, which is not the sparsity of this tensor")
        return run

    return _run("check_sparsity", [(label, case(W)) for label, W in inputs])


# ---------------------------------------------------------------- lab 2: magnitude


def check_magnitude_mask(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> bool:
    """fn(W, threshold) -> 0/1 mask, 1 where |w| >= threshold (a weight at tau is kept)."""
    from chapter11.magnitude import magnitude_mask

    tied = torch.tensor([[0.5, -0.5, 0.2], [0.5, 0.9, -0.1]])
    hair = torch.tensor([_below(0.5), 0.5, -_below(0.5), -0.5, _below(0.25), 0.3])  # float32
    hair64 = torch.tensor([0.5 - 1e-12, 0.5, -(0.5 - 1e-12), 0.75], dtype=torch.float64)
    inputs = [
        ("random 5x4, threshold 0.5", torch.randn(5, 4, generator=_gen(10)), 0.5),
        ("negative weights count by size", torch.tensor([-3.0, 0.1, -0.2, 2.0]), 1.0),
        ("ties exactly at the threshold", tied, 0.5),
        ("all zeros", torch.zeros(3, 3), 0.1),
        ("threshold 0", torch.randn(2, 5, generator=_gen(11)), 0.0),
        ("threshold 0 with exact zeros", _sparse_randn(4, 5, 0.5, 14), 0.0),
        ("threshold above every weight", torch.randn(4, 4, generator=_gen(12)), 100.0),
        ("3-D tensor", torch.randn(2, 3, 4, generator=_gen(13)), 0.7),
        ("weights a hair from the threshold", hair, 0.5),
        ("float64 weights a hair from the threshold", hair64, 0.5),
    ]

    def case(W, tau):
        def run():
            _same_mask(fn(_copy(W), tau), magnitude_mask(W, tau))
        return run

    return _run("check_magnitude_mask", [(label, case(W, t)) for label, W, t in inputs])


def check_threshold_for_sparsity(fn: Callable[[torch.Tensor, float], float]) -> bool:
    """fn(W, sparsity) -> tau such that magnitude_mask(W, tau) prunes round(sparsity * n) weights.

    Any tau >= 0 that gives the same mask as the library's is accepted (inf
    prunes everything).
    """
    from chapter11.magnitude import magnitude_mask, threshold_for_sparsity

    inputs = [
        ("random 10x10, sparsity 0.8", torch.randn(10, 10, generator=_gen(20)), 0.8),
        ("sparsity 0", torch.randn(4, 6, generator=_gen(21)), 0.0),
        ("random 7x3, sparsity 0.5", torch.randn(7, 3, generator=_gen(22)), 0.5),
        ("ties at the cut", torch.tensor([0.1, 0.3, 0.3, 0.3, 0.9, -0.3]), 0.5),
        ("all zeros", torch.zeros(4, 4), 0.5),
        ("sparsity 0.95 of 20 weights", torch.randn(20, generator=_gen(23)), 0.95),
        ("10 weights, sparsity 0.37", torch.randn(10, generator=_gen(24)), 0.37),
        ("100 weights, sparsity 0.29", torch.randn(100, generator=_gen(25)), 0.29),
        ("10 weights, sparsity 0.96", torch.randn(2, 5, generator=_gen(26)), 0.96),
        ("random 6x6 with zeros, sparsity 0.6", _sparse_randn(6, 6, 0.3, 27), 0.6),
    ]

    def case(W, s):
        def run():
            tau = _as_number(fn(_copy(W), s))
            if math.isnan(tau) or tau < 0:
                raise _Fail(f"returned {tau!r}; a threshold is a number >= 0 (inf prunes everything)")
            expected = magnitude_mask(W, threshold_for_sparsity(W, s))
            got = magnitude_mask(W, tau)
            pruned, want = int((got == 0).sum()), int((expected == 0).sum())
            if pruned != want:
                raise _Fail(f"your threshold prunes {pruned} of {W.numel()} weights, "
                            "which is not the count this sparsity asks for")
            _same_mask(got, expected, "the mask from your threshold")
        return run

    return _run("check_threshold_for_sparsity", [(label, case(W, s)) for label, W, s in inputs])


# ---------------------------------------------------------------- lab 3: movement


def check_movement_scores(fn: Callable[[list, list], torch.Tensor]) -> bool:
    """fn(weights, grads) -> S = -sum_t grads[t] * weights[t] (lists of equal-shape tensors)."""
    from chapter11.movement import movement_scores

    def history(steps, shape, seed):
        g = _gen(seed)
        return ([torch.randn(*shape, generator=g) for _ in range(steps)],
                [torch.randn(*shape, generator=g) for _ in range(steps)])

    inputs = [
        ("one step, 3 weights", [torch.tensor([1.0, -2.0, 0.5])], [torch.tensor([0.5, 0.5, -1.0])]),
        ("5 steps, 4x3 weights", *history(5, (4, 3), 30)),
        ("all-zero gradients", [torch.randn(3, 3, generator=_gen(31))] * 2, [torch.zeros(3, 3)] * 2),
        ("all-zero weights", [torch.zeros(2, 4)] * 3, history(3, (2, 4), 32)[1]),
        ("weights shrinking toward zero", [torch.tensor([2.0, -2.0]), torch.tensor([1.0, -1.0])],
         [torch.tensor([1.0, -1.0]), torch.tensor([1.0, -1.0])]),
        ("20 steps, 3-D weights", *history(20, (2, 2, 3), 33)),
    ]

    def case(weights, grads):
        def run():
            got = _as_tensor(fn([_copy(w) for w in weights], [_copy(g) for g in grads]), "the scores")
            expected = movement_scores(weights, grads)
            if tuple(got.shape) != tuple(expected.shape):
                raise _Fail(f"scores have shape {tuple(got.shape)}, the weights have shape {tuple(expected.shape)}")
            close = torch.isclose(got.double(), expected.double(), atol=1e-5, rtol=1e-5)
            if close.all():
                return
            if torch.allclose(-got.double(), expected.double(), atol=1e-5, rtol=1e-5):
                raise _Fail("the scores have the wrong sign: weights moving toward zero must score low")
            raise _Fail(f"the scores differ from the reference at {int((~close).sum())} of {close.numel()} positions")
        return run

    return _run("check_movement_scores", [(label, case(w, g)) for label, w, g in inputs])


# ---------------------------------------------------------------- lab 4: CSR


def check_to_csr(fn: Callable[[np.ndarray], tuple]) -> bool:
    """fn(A) -> (data, indices, indptr) for a 2-D numpy array A, as scipy.sparse stores them.

    `data` must hold the non-zeros exactly (any float dtype that represents
    them exactly); `indices` and `indptr` must be integers.
    """
    from chapter11.csr import to_csr

    inputs = [
        ("random 5x6 at 70% sparsity", _sparse_randn(5, 6, 0.7, 40)),
        ("an empty row in the middle", torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 3.0]])),
        ("all zeros", torch.zeros(3, 4)),
        ("no zeros", torch.randn(2, 3, generator=_gen(41)) + 5),
        ("one row", torch.tensor([[0.0, 0.0, 7.0, 0.0, -1.0]])),
        ("one column", torch.tensor([[0.0], [2.0], [0.0], [4.0]])),
        ("negative values and an empty last row", torch.tensor([[-1.0, 0.0, -2.0], [0.0, 0.0, 0.0]])),
        ("tiny and large values", torch.tensor([[3e-30, 0.0, 123456.7], [0.0, -1e-7, 0.0]])),
    ]

    def case(W):
        def run():
            A = W.numpy().copy()
            got = fn(A)
            if not isinstance(got, (tuple, list)) or len(got) != 3:
                raise _Fail("return a tuple (data, indices, indptr)")
            ref = to_csr(W)
            for label, g, e in zip(("data", "indices", "indptr"), got, (ref.data, ref.indices, ref.indptr)):
                g = np.asarray(g)
                if g.shape != e.shape:
                    raise _Fail(f"{label} has shape {g.shape}; "
                                f"check how long {label} must be for a {A.shape[0]}x{A.shape[1]} matrix")
                if label != "data" and g.size and g.dtype.kind not in "iu":
                    raise _Fail(f"{label} should hold integers, it has dtype {g.dtype}")
                if g.size and g.dtype.kind not in "iuf":
                    raise _Fail(f"{label} should hold numbers, it has dtype {g.dtype}")
                wrong = int((g.astype(np.float64) != e.astype(np.float64)).sum())
                if wrong:
                    raise _Fail(f"{label} differs from the reference at {wrong} of {e.size} entries")
        return run

    return _run("check_to_csr", [(label, case(W)) for label, W in inputs])


# ---------------------------------------------------------------- lab 5: RigL


def check_rigl_update(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]) -> bool:
    """fn(weight, grad, mask, n) -> new mask after one RigL step.

    Drop the n active weights (mask == 1) of smallest |w|; grow the n
    connections that were inactive before the step with the largest |grad|.
    Ties may be broken either way: the checker tests the rule, not an order.
    Active weights may be exactly zero (RigL starts regrown weights at 0).
    """

    def setup(rows, cols, density, seed, active_zeros=0.0):
        g = _gen(seed)
        w = torch.randn(rows, cols, generator=g)
        mask = (torch.rand(rows, cols, generator=g) < density).float()
        w = w * mask * (torch.rand(rows, cols, generator=g) >= active_zeros).float()
        return w, torch.randn(rows, cols, generator=g), mask

    just_dropped = (torch.tensor([[0.01, 0.9, -0.8], [0.0, 0.0, 0.0]]),   # the smallest active weight ...
                    torch.tensor([[5.0, 0.1, 0.1], [1.0, -2.0, 0.5]]),    # ... has the largest |grad|
                    torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), 1)
    active_zero = (torch.tensor([[0.0, 0.7, -0.3, 0.0], [0.0, 0.0, 0.9, 0.0]]),  # two active weights are 0
                   torch.tensor([[3.0, 0.1, 0.2, 0.5], [2.0, 1.5, 0.3, -0.4]]),
                   torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]]), 2)
    inputs = [
        ("random 6x6 at density 0.5, n=3", *setup(6, 6, 0.5, 50), 3),
        ("n=0", *setup(4, 4, 0.5, 51), 0),
        ("ties in |w| and |grad|", torch.tensor([[0.5, -0.5, 0.0], [0.5, 0.0, 0.0]]),
         torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 1.0]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), 1),
        ("all-zero gradient", *setup(5, 4, 0.4, 52)[:1], torch.zeros(5, 4), setup(5, 4, 0.4, 52)[2], 2),
        ("random 8x10 at density 0.2, n=5", *setup(8, 10, 0.2, 53), 5),
        ("the smallest active weight has the largest gradient", *just_dropped),
        ("active weights that are exactly zero", *active_zero),
        ("random 6x8, a third of the active weights just regrown at 0, n=4", *setup(6, 8, 0.5, 54, 1 / 3), 4),
    ]

    def case(w, grad, mask, n):
        def run():
            got = _zero_one(fn(_copy(w), _copy(grad), _copy(mask), n), tuple(mask.shape), "the new mask")
            if int(got.sum()) != int(mask.sum()):
                raise _Fail(f"the new mask has {int(got.sum())} active weights, the old one {int(mask.sum())}: "
                            "RigL keeps the count fixed")
            dropped = (mask == 1) & (got == 0)
            grown = (mask == 0) & (got == 1)
            if int(dropped.sum()) != n or int(grown.sum()) != n:
                raise _Fail(f"dropped {int(dropped.sum())} and grew {int(grown.sum())} connections, expected {n} each")
            kept = (mask == 1) & (got == 1)
            if n and kept.any() and w.abs()[dropped].max() > w.abs()[kept].min():
                raise _Fail("a dropped weight is larger in |w| than one you kept active")
            idle = (mask == 0) & (got == 0)
            if n and idle.any() and grad.abs()[grown].min() < grad.abs()[idle].max():
                raise _Fail("a grown connection has a smaller |grad| than one you left inactive")
        return run

    return _run("check_rigl_update", [(label, case(*args)) for label, *args in inputs])


# ---------------------------------------------------------------- lab 6: head importance


def check_head_importance(fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """fn(gate_grads) -> importance (layers, heads) from per-example gate gradients.

    `gate_grads[x, l, h]` is dL(x)/d xi_{l,h} for example x: the checker
    computes them from a tiny transformer with the library's head gates and
    compares your importance with `chapter11.structured.heads.head_importance`.
    """
    from chapter11.models import TransformerClassifier
    from chapter11.structured.heads import head_gates, head_importance, per_example_loss

    def from_model(n_layers, n_heads, batch, seed):
        torch.manual_seed(seed)
        model = TransformerClassifier(patch_size=4, max_len=10, n_layers=n_layers, n_heads=n_heads).eval()
        g = _gen(seed)
        data = (torch.randn(batch, 40, generator=g), torch.randint(0, 10, (batch,), generator=g))
        gates = [torch.ones(batch, n_heads, requires_grad=True) for _ in range(n_layers)]  # (B, H) each
        with head_gates(model, gates):
            loss = per_example_loss(model, data).sum()
        grads = torch.autograd.grad(loss, gates)
        per_example = torch.stack([gr.detach() for gr in grads], dim=1)  # (B, L, H)
        return per_example, head_importance(model, [data])

    def synthetic(values):
        t = torch.tensor(values)  # (B, L, H)
        return t, t.abs().mean(0)

    inputs = [
        ("tiny transformer, 1 layer x 2 heads, 6 examples", *from_model(1, 2, 6, 60)),
        ("tiny transformer, 2 layers x 4 heads, 5 examples", *from_model(2, 4, 5, 61)),
        ("gradients of both signs", *synthetic([[[1.0, -2.0]], [[-1.0, 2.0]]])),
        ("all-zero gradients", *synthetic([[[0.0, 0.0, 0.0]]] * 3)),
        ("one example", *synthetic([[[0.5, -0.25], [3.0, 0.0]]])),
    ]

    def case(grads, expected):
        def run():
            got = _as_tensor(fn(_copy(grads)), "the importance")
            if tuple(got.shape) != tuple(expected.shape):
                raise _Fail(f"importance has shape {tuple(got.shape)}, expected (layers, heads) = {tuple(expected.shape)}")
            close = torch.isclose(got.double(), expected.double(), atol=1e-5, rtol=1e-4)
            if not close.all():
                raise _Fail(f"the importance differs from the reference for {int((~close).sum())} of {close.numel()} heads")
        return run

    return _run("check_head_importance", [(label, case(g, e)) for label, g, e in inputs])


# What the labs' graded test cells call. The table is made when this module is
# imported, so a notebook that rebinds `check.check_sparsity` (or any name in
# this module) does not change which checker grades it; the labs build also
# flags solution cells that touch `chapter11.check` (`chapter11.labs`).
_GRADERS = {name: globals()[name] for name in __all__ if name.startswith("check_")}


def graded(checker: str, fn: Callable) -> None:
    """Run checker `checker` (e.g. "check_sparsity") on `fn` for points: return if it passes, else raise.

    The AssertionError carries the checker's one line, so nbgrader's
    Validate button and the feedback show what failed, not a bare
    `AssertionError`.

    >>> from chapter11.sparsity import sparsity
    >>> graded("check_sparsity", sparsity)
    check_sparsity: passed all 10 cases
    >>> graded("check_sparsity", lambda W: 0.5)
    Traceback (most recent call last):
    AssertionError: check_sparsity: case 1 of 10 (random 4x5 with zeros) failed: returned 0.5, which is not the sparsity of this tensor
    """
    global _raising
    if checker not in _GRADERS:
        raise ValueError(f"checker must be one of {sorted(_GRADERS)}, got {checker!r}")
    _raising = True
    try:
        _GRADERS[checker](fn)
    finally:
        _raising = False
