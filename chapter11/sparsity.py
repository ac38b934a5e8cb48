"""The chapter's sparsity formula, s = 1 - nonzero / total.

Covers: the sparsity and density of a tensor, a module or a whole model, a
per-parameter report that prints as a table and renders as HTML, and the
argument checks every pruning function shares (`check_sparsity`,
`check_amount`).

But: it only counts exact zeros. A weight of 1e-30 is "alive"; rounding small
weights to zero is a pruning decision, made elsewhere (`chapter11.magnitude`).

    >>> import torch
    >>> sparsity(torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
    0.5
    >>> density(torch.tensor([0.0, 0.0, 0.0, 3.0]))
    0.25
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import nn

__all__ = [
    "sparsity_loop",
    "sparsity",
    "density",
    "count_loop",
    "count",
    "sparsity_report",
    "SparsityReport",
    "check_sparsity",
    "check_amount",
    "check_model",
    "all_finite",
]


def _tensors_of(x, name: str = "x") -> list[torch.Tensor]:
    """The tensors whose zeros count: a tensor itself, or a module's parameters."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, nn.Module):
        tensors = [p for p in x.parameters()]
        if not tensors:
            raise ValueError(f"{name}: the module {type(x).__name__} has no parameters, so its sparsity is undefined")
        return tensors
    raise TypeError(f"{name} must be a torch.Tensor or an nn.Module, got {type(x).__name__}")


def count_loop(x) -> tuple[int, int]:
    """(nonzero, total) by visiting every element in a plain Python loop.

    >>> count_loop(torch.tensor([0.0, 2.0, 0.0]))
    (1, 3)
    """
    nonzero = total = 0
    for t in _tensors_of(x):
        for value in t.detach().flatten().tolist():
            total += 1
            if value != 0:
                nonzero += 1
    return nonzero, total


def count(x) -> tuple[int, int]:
    """(nonzero, total), vectorised; agrees with `count_loop`.

    >>> count(torch.tensor([0.0, 2.0, 0.0]))
    (1, 3)
    """
    nonzero = total = 0
    for t in _tensors_of(x):
        nonzero += int(torch.count_nonzero(t.detach()))
        total += t.numel()
    return nonzero, total


def _ratio(nonzero: int, total: int) -> float:
    if total == 0:
        raise ValueError("x has no elements, so its sparsity is undefined")
    return 1.0 - nonzero / total


def sparsity_loop(x) -> float:
    """s = 1 - nonzero / total, with explicit loops over every element.

    This is the chapter's formula literally: count the non-zero weights one by
    one, divide by the total, subtract from one.

    >>> sparsity_loop(torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    0.75
    """
    return _ratio(*count_loop(x))


def sparsity(x) -> float:
    """s = 1 - nonzero / total for a tensor, a module or a model (vectorised).

    For a module, every parameter counts (biases and norms included); use
    `sparsity_report` to see them one by one.

    >>> sparsity(torch.zeros(3, 4))
    1.0
    >>> sparsity(nn.Linear(2, 2, bias=False))
    0.0
    """
    return _ratio(*count(x))


def density(x) -> float:
    """density = 1 - sparsity, the fraction of weights kept.

    >>> density(torch.tensor([1.0, 0.0]))
    0.5
    """
    return 1.0 - sparsity(x)


@dataclass(frozen=True)
class ReportRow:
    name: str
    shape: tuple[int, ...]
    total: int
    nonzero: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.total if self.total else 0.0


class SparsityReport:
    """One row per parameter plus a global row; prints as a table, shows as HTML.

    >>> model = nn.Linear(4, 2)
    >>> with torch.no_grad():
    ...     _ = model.weight[0].zero_()
    >>> report = sparsity_report(model)
    >>> report.rows[0].name, report.rows[0].nonzero, round(report.global_sparsity, 3)
    ('weight', 4, 0.4)
    """

    def __init__(self, rows: list[ReportRow]):
        self.rows = rows
        self.total = sum(r.total for r in rows)
        self.nonzero = sum(r.nonzero for r in rows)

    @property
    def global_sparsity(self) -> float:
        return 1.0 - self.nonzero / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, float]:
        """name -> sparsity, for plotting."""
        return {r.name: r.sparsity for r in self.rows}

    def _table(self) -> list[tuple[str, str, str, str, str]]:
        body = [(r.name, "x".join(map(str, r.shape)) or "scalar", str(r.total), str(r.nonzero), f"{r.sparsity:.2%}") for r in self.rows]
        body.append(("(global)", "", str(self.total), str(self.nonzero), f"{self.global_sparsity:.2%}"))
        return body

    def __str__(self) -> str:
        header = ("name", "shape", "total", "nonzero", "sparsity")
        rows = [header] + self._table()
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = []
        for k, r in enumerate(rows):
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
            lines.append("  ".join(cells).rstrip())
            if k == 0 or k == len(rows) - 2:
                lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("name", "shape", "total", "nonzero", "sparsity"))
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self._table())
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def sparsity_report(model: nn.Module, only_weights: bool = False) -> SparsityReport:
    """Per-parameter sparsity of `model`, with a global row.

    `only_weights=True` keeps parameters with two or more dimensions (the
    matrices and kernels pruning acts on) and drops biases and norms.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rows = []
    for name, p in model.named_parameters():
        if only_weights and p.dim() < 2:
            continue
        rows.append(ReportRow(name, tuple(p.shape), p.numel(), int(torch.count_nonzero(p.detach()))))
    if not rows:
        raise ValueError(f"model: {type(model).__name__} has no parameters to report")
    return SparsityReport(rows)


def check_sparsity(value, name: str = "sparsity") -> float:
    """Return `value` as a float if it is a valid target sparsity in [0, 1).

    Sparsity 1.0 would delete a layer whole, which is structured pruning's job,
    so it is refused here.

    >>> check_sparsity(0.8)
    0.8
    >>> check_sparsity(1.0)
    Traceback (most recent call last):
    ...
    ValueError: sparsity must be in [0, 1), got 1.0
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number in [0, 1), got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def check_amount(amount, n: int, name: str = "amount") -> int:
    """Number of elements to prune out of `n`, following torch.nn.utils.prune.

    An int (numpy integers included) is a count (0..n); a float is a fraction
    in [0, 1] rounded to the nearest count.

    >>> import numpy as np
    >>> check_amount(0.5, 8), check_amount(3, 8), check_amount(np.int64(2), 8)
    (4, 3, 2)
    """
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 0:
        raise ValueError(f"n (the number of elements {name} applies to) must be an int >= 0, got {n!r}")
    if isinstance(amount, bool) or not isinstance(amount, Real):
        raise TypeError(f"{name} must be an int count or a float fraction, got {type(amount).__name__}")
    if isinstance(amount, Integral):
        amount = int(amount)
        if not 0 <= amount <= n:
            raise ValueError(f"{name} must be between 0 and {n} when given as a count, got {amount}")
        return amount
    amount = float(amount)
    if math.isnan(amount) or not 0.0 <= amount <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] when given as a fraction, got {amount}")
    return round(amount * n)


def check_model(model, name: str = "model") -> nn.Module:
    """Return `model` if it is a `torch.nn.Module`; TypeError naming the argument otherwise.

    >>> check_model(None)
    Traceback (most recent call last):
    ...
    TypeError: model must be a torch.nn.Module, got NoneType
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def all_finite(t: torch.Tensor) -> bool:
    """True if no entry of the float tensor `t` is NaN or infinite; one cheap reduction when that is so.

    A NaN or an inf anywhere makes the sum NaN or infinite, so a finite sum
    proves every entry finite without building a boolean tensor. Only a
    non-finite sum (which a large finite tensor can also reach, by overflow)
    falls back to the exact elementwise test.

    >>> all_finite(torch.tensor([1.0, -2.0])), all_finite(torch.tensor([1.0, float("nan")]))
    (True, False)
    >>> all_finite(torch.tensor([3e38, 3e38]))  # the sum overflows, the entries are finite
    True
    """
    if not t.is_floating_point() and not t.is_complex():
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
