"""Checkers for the lab notebooks in notebooks/exercises/.

Each `check_*` runs a student's function on hidden cases (random tensors and
edge cases: ties, all zeros, sparsity 0, ...), compares with the library's
own implementation, prints one short line, and returns True or False. On a
failure the line names the first failing case and what kind of difference
it found, never the expected values.

    >>> from chapter11.sparsity import sparsity
    >>> check_sparsity(sparsity)
    check_sparsity: passed all 8 cases
    True
    >>> check_sparsity(lambda W: float((W == 0).sum()))   # a count, not a fraction
    check_sparsity: case 1 of 8 (random 4x5 with zeros) failed: returned 8.0, which is not the sparsity of this tensor
    False

But: the checkers test results, not style or speed, and a determined student
can read this file; they are for learning, not for exams.
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
]


class _Fail(Exception):
    """A case failed; the message says how, without the expected answer."""


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sparse_randn(rows: int, cols: int, zero_fraction: float, seed: int) -> torch.Tensor:
    g = _gen(seed)
    W = torch.randn(rows, cols, generator=g)  # (rows, cols)
    W[torch.rand(rows, cols, generator=g) < zero_fraction] = 0.0
    return W


def _run(name: str, cases: list[tuple[str, Callable[[], None]]]) -> bool:
    """Run the cases in order; print the first failure or a pass line."""
    for i, (label, case) in enumerate(cases, start=1):
        try:
            case()
        except _Fail as e:
            print(f"{name}: case {i} of {len(cases)} ({label}) failed: {e}")
            return False
        except Exception as e:  # the student's code raised
            print(f"{name}: case {i} of {len(cases)} ({label}) failed: your function raised "
                  f"{type(e).__name__}: {str(e)[:120]}")
            return False
    print(f"{name}: passed all {len(cases)} cases")
    return True


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise _Fail(f"{what} should be a torch.Tensor, got {type(x).__name__}")
    return x


def _same_mask(got, expected: torch.Tensor, what: str = "the mask") -> None:
    got = _as_tensor(got, what)
    if tuple(got.shape) != tuple(expected.shape):
        raise _Fail(f"{what} has shape {tuple(got.shape)}, the input has shape {tuple(expected.shape)}")
    values = set(torch.unique(got.detach().float()).tolist())
    if not values <= {0.0, 1.0}:
        raise _Fail(f"{what} should hold only 0 and 1, it holds other values too")
    wrong = int((got.detach().float() != expected.float()).sum())
    if wrong:
        raise _Fail(f"{what} differs from the reference at {wrong} of {expected.numel()} positions")


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone()  # the student must not be able to change our reference input


# ---------------------------------------------------------------- lab 1: sparsity


def check_sparsity(fn: Callable[[torch.Tensor], float]) -> bool:
    """fn(W) -> s = 1 - nonzero / total, as a Python float."""
    from chapter11.sparsity import sparsity

    inputs = [
        ("random 4x5 with zeros", _sparse_randn(4, 5, 0.4, 1)),
        ("no zeros", torch.randn(3, 3, generator=_gen(2)) + 10),
        ("all zeros", torch.zeros(2, 6)),
        ("one element, zero", torch.zeros(1)),
        ("1-D vector", torch.tensor([0.0, -1.0, 0.0, 2.0])),
        ("3-D tensor", _sparse_randn(6, 8, 0.7, 3).reshape(2, 3, 8)),
        ("integer tensor", torch.tensor([[0, 1], [2, 0], [0, 0]])),
        ("tiny non-zeros are not zeros", torch.tensor([1e-30, 0.0, -1e-30, 0.0])),
    ]

    def case(W):
        def run():
            got = fn(_copy(W))
            if isinstance(got, torch.Tensor) and got.numel() == 1:
                got = got.item()
            if not isinstance(got, (float, int)) or isinstance(got, bool):
                raise _Fail(f"returned a {type(got).__name__}, expected a float")
            if not math.isclose(float(got), sparsity(W), abs_tol=1e-9):
                raise _Fail(f"returned {got!r}, which is not the sparsity of this tensor")
        return run

    return _run("check_sparsity", [(label, case(W)) for label, W in inputs])


# ---------------------------------------------------------------- lab 2: magnitude


def check_magnitude_mask(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> bool:
    """fn(W, threshold) -> 0/1 mask, 1 where |w| >= threshold (a weight at tau is kept)."""
    from chapter11.magnitude import magnitude_mask

    tied = torch.tensor([[0.5, -0.5, 0.2], [0.5, 0.9, -0.1]])
    inputs = [
        ("random 5x4, threshold 0.5", torch.randn(5, 4, generator=_gen(10)), 0.5),
        ("negative weights count by size", torch.tensor([-3.0, 0.1, -0.2, 2.0]), 1.0),
        ("ties exactly at the threshold", tied, 0.5),
        ("all zeros", torch.zeros(3, 3), 0.1),
        ("threshold 0 keeps everything", torch.randn(2, 5, generator=_gen(11)), 0.0),
        ("threshold above every weight", torch.randn(4, 4, generator=_gen(12)), 100.0),
        ("3-D tensor", torch.randn(2, 3, 4, generator=_gen(13)), 0.7),
    ]

    def case(W, tau):
        def run():
            _same_mask(fn(_copy(W), tau), magnitude_mask(W, tau))
        return run

    return _run("check_magnitude_mask", [(label, case(W, t)) for label, W, t in inputs])


def check_threshold_for_sparsity(fn: Callable[[torch.Tensor, float], float]) -> bool:
    """fn(W, sparsity) -> tau such that magnitude_mask(W, tau) prunes round(sparsity * n) weights.

    Any tau that gives the same mask as the library's is accepted.
    """
    from chapter11.magnitude import magnitude_mask, threshold_for_sparsity

    inputs = [
        ("random 10x10, sparsity 0.8", torch.randn(10, 10, generator=_gen(20)), 0.8),
        ("sparsity 0 prunes nothing", torch.randn(4, 6, generator=_gen(21)), 0.0),
        ("random 7x3, sparsity 0.5", torch.randn(7, 3, generator=_gen(22)), 0.5),
        ("ties at the cut", torch.tensor([0.1, 0.3, 0.3, 0.3, 0.9, -0.3]), 0.5),
        ("all zeros", torch.zeros(4, 4), 0.5),
        ("sparsity 0.95 of 20 weights", torch.randn(20, generator=_gen(23)), 0.95),
    ]

    def case(W, s):
        def run():
            tau = fn(_copy(W), s)
            if isinstance(tau, torch.Tensor) and tau.numel() == 1:
                tau = tau.item()
            if not isinstance(tau, (float, int)) or math.isnan(tau):
                raise _Fail(f"returned {tau!r}, expected a number")
            expected = magnitude_mask(W, threshold_for_sparsity(W, s))
            got = magnitude_mask(W, tau)
            pruned, want = int((got == 0).sum()), int((expected == 0).sum())
            if pruned != want:
                raise _Fail(f"your threshold prunes {pruned} of {W.numel()} weights; check how many it should prune")
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
            if torch.allclose(got.double(), expected.double(), atol=1e-5):
                return
            if torch.allclose(-got.double(), expected.double(), atol=1e-5):
                raise _Fail("the scores have the wrong sign: weights moving toward zero must score low")
            raise _Fail("the scores differ from the reference (do you sum over every step?)")
        return run

    return _run("check_movement_scores", [(label, case(w, g)) for label, w, g in inputs])


# ---------------------------------------------------------------- lab 4: CSR


def check_to_csr(fn: Callable[[np.ndarray], tuple]) -> bool:
    """fn(A) -> (data, indices, indptr) for a 2-D numpy array A, as scipy.sparse stores them."""
    from chapter11.csr import to_csr

    inputs = [
        ("random 5x6 at 70% sparsity", _sparse_randn(5, 6, 0.7, 40)),
        ("an empty row in the middle", torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 3.0]])),
        ("all zeros", torch.zeros(3, 4)),
        ("no zeros", torch.randn(2, 3, generator=_gen(41)) + 5),
        ("one row", torch.tensor([[0.0, 0.0, 7.0, 0.0, -1.0]])),
        ("one column", torch.tensor([[0.0], [2.0], [0.0], [4.0]])),
        ("negative values and an empty last row", torch.tensor([[-1.0, 0.0, -2.0], [0.0, 0.0, 0.0]])),
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
                    raise _Fail(f"{label} has length {g.shape[0] if g.ndim else 'scalar'}; "
                                f"check how long {label} must be for a {A.shape[0]}x{A.shape[1]} matrix")
                if not np.allclose(g.astype(np.float64), e.astype(np.float64)):
                    raise _Fail(f"{label} differs from the reference")
        return run

    return _run("check_to_csr", [(label, case(W)) for label, W in inputs])


# ---------------------------------------------------------------- lab 5: RigL


def check_rigl_update(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]) -> bool:
    """fn(weight, grad, mask, n) -> new mask after one RigL step.

    Drop the n active weights of smallest |w|; grow the n connections that
    were inactive before the step with the largest |grad|. Ties may be broken
    either way: the checker tests the rule, not an order.
    """
    from chapter11.dynamic import drop, grow

    def setup(rows, cols, density, seed):
        g = _gen(seed)
        w = torch.randn(rows, cols, generator=g)
        mask = (torch.rand(rows, cols, generator=g) < density).float()
        return w * mask, torch.randn(rows, cols, generator=g), mask

    inputs = [
        ("random 6x6 at density 0.5, n=3", *setup(6, 6, 0.5, 50), 3),
        ("n=0 changes nothing", *setup(4, 4, 0.5, 51), 0),
        ("ties in |w| and |grad|", torch.tensor([[0.5, -0.5, 0.0], [0.5, 0.0, 0.0]]),
         torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 1.0]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), 1),
        ("all-zero gradient", *setup(5, 4, 0.4, 52)[:1], torch.zeros(5, 4), setup(5, 4, 0.4, 52)[2], 2),
        ("random 8x10 at density 0.2, n=5", *setup(8, 10, 0.2, 53), 5),
    ]

    def case(w, grad, mask, n):
        def run():
            got = _as_tensor(fn(_copy(w), _copy(grad), _copy(mask), n), "the new mask")
            if tuple(got.shape) != tuple(mask.shape):
                raise _Fail(f"the new mask has shape {tuple(got.shape)}, expected {tuple(mask.shape)}")
            got = got.detach().float()
            if not set(torch.unique(got).tolist()) <= {0.0, 1.0}:
                raise _Fail("the new mask should hold only 0 and 1")
            if int(got.sum()) != int(mask.sum()):
                raise _Fail(f"the new mask has {int(got.sum())} active weights, the old one {int(mask.sum())}: "
                            "RigL keeps the count fixed")
            dropped = (mask == 1) & (got == 0)
            grown = (mask == 0) & (got == 1)
            if int(dropped.sum()) != n or int(grown.sum()) != n:
                raise _Fail(f"dropped {int(dropped.sum())} and grew {int(grown.sum())} connections, expected {n} each"
                            " (a connection dropped in this step cannot be regrown in it)")
            scores = torch.where(mask == 0, grad.abs(), torch.full_like(grad, -1.0))  # never regrow the dropped
            dropped_ref = drop(w, mask, n)
            reference = grow(scores, dropped_ref, n) if n else dropped_ref
            if torch.equal(got, reference.float()):
                return
            # differs from the library: accept it only if the difference is a tie
            kept_active = (mask == 1) & (got == 1)
            if dropped.any() and kept_active.any() and w.abs()[dropped].max() > w.abs()[kept_active].min():
                raise _Fail("a dropped weight is larger in |w| than one you kept active")
            not_grown = (mask == 0) & (got == 0)
            if grown.any() and not_grown.any() and grad.abs()[grown].min() < grad.abs()[not_grown].max():
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
            if not torch.allclose(got.double(), expected.double(), atol=1e-5, rtol=1e-4):
                raise _Fail("the importance differs from the reference (absolute value per example, then average?)")
        return run

    return _run("check_head_importance", [(label, case(g, e)) for label, g, e in inputs])
