"""Matplotlib helpers the notebooks reuse, so every figure has labels and units.

Each helper draws on `ax` (a new figure when `ax` is None) and returns the
axes, so notebooks can compose panels. They only draw: no computation that a
reader would need to trust happens here.

But: no styling beyond labels, titles and legends; no interactive backends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = ["weight_histogram", "sparsity_bars", "metric_vs_sparsity", "curves_with_bands", "reliability_diagram", "mask_image"]


def _axes(ax, figsize=(6, 4)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _values(weights) -> np.ndarray:
    if isinstance(weights, torch.nn.Module):
        weights = [p for p in weights.parameters() if p.dim() >= 2]
    if isinstance(weights, torch.Tensor):
        weights = [weights]
    return np.concatenate([w.detach().float().cpu().flatten().numpy() for w in weights])


def weight_histogram(before, after=None, ax=None, bins: int = 100, title: str = "Weight distribution", drop_zeros: bool = True):
    """Histogram of weight values (a tensor, a list of tensors, or a model's weight matrices).

    With `after`, the pruned weights are overlaid; `drop_zeros` hides the spike
    of pruned zeros so the surviving distribution stays visible.
    """
    ax = _axes(ax)
    b = _values(before)
    ax.hist(b, bins=bins, alpha=0.6, label=f"before ({b.size:,} weights)", color="tab:blue")
    if after is not None:
        a = _values(after)
        kept = a[a != 0] if drop_zeros else a
        ax.hist(kept, bins=bins, alpha=0.6, label=f"after ({kept.size:,} non-zero)", color="tab:orange")
    ax.set_xlabel("weight value")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend()
    return ax


def sparsity_bars(report_or_dict, ax=None, title: str = "Sparsity per layer"):
    """Bar chart of per-layer sparsity, from a `SparsityReport` or {name: sparsity}."""
    ax = _axes(ax)
    data = report_or_dict.as_dict() if hasattr(report_or_dict, "as_dict") else dict(report_or_dict)
    names = list(data)
    ax.bar(range(len(names)), [100 * data[n] for n in names], color="tab:green")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    return ax


def metric_vs_sparsity(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    ax=None,
    xlabel: str = "sparsity (%)",
    ylabel: str = "test accuracy",
    title: str = "Accuracy against sparsity",
    percent_x: bool = True,
    reference: float | None = None,
    reference_label: str = "dense",
):
    """One line per method: {label: (sparsities, values)}; `reference` draws a dashed line."""
    ax = _axes(ax)
    for label, (xs, ys) in curves.items():
        xs = [100 * x for x in xs] if percent_x else list(xs)
        ax.plot(xs, ys, marker="o", label=label)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label=reference_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def curves_with_bands(
    curves: Mapping[str, tuple[Sequence[float], Sequence]],
    ax=None,
    xlabel: str = "remaining weights (%)",
    ylabel: str = "test accuracy",
    title: str = "Mean over seeds, band = ±1 sd",
    logx: bool = False,
    band: str = "sd",
    reference=None,
    reference_label: str = "dense",
):
    """One line per method with a shaded band: {label: (xs, [Summary per x])}.

    Each y is a `chapter11.stats.Summary`; the line is its mean and the band
    spans ±1 sd (`band="sd"`) or the 95% interval of the mean (`band="ci"`).
    `reference` (a number or a Summary) draws a dashed line with its own band.
    """
    if band not in ("sd", "ci"):
        raise ValueError(f"band must be 'sd' or 'ci', got {band!r}")
    ax = _axes(ax)

    def _limits(s):
        return (s.mean - s.sd, s.mean + s.sd) if band == "sd" else (s.low, s.high)

    for label, (xs, summaries) in curves.items():
        if len(xs) != len(summaries):
            raise ValueError(f"curves[{label!r}]: {len(xs)} x values but {len(summaries)} summaries")
        order = np.argsort(np.asarray(xs, dtype=float))
        x = np.asarray(xs, dtype=float)[order]
        mean = np.array([summaries[i].mean for i in order])
        lo, hi = np.array([_limits(summaries[i]) for i in order]).T
        line = ax.plot(x, mean, marker="o", label=f"{label} (n={summaries[0].n})")[0]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
    if reference is not None:
        mean = getattr(reference, "mean", reference)
        ax.axhline(mean, color="gray", linestyle="--", label=reference_label)
        if hasattr(reference, "sd"):
            lo, hi = _limits(reference)
            ax.axhspan(lo, hi, color="gray", alpha=0.15)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def reliability_diagram(data: Mapping[str, torch.Tensor], ax=None, label: str | None = None, title: str = "Reliability diagram"):
    """Accuracy per confidence bin against the diagonal of perfect calibration.

    `data` is what `chapter11.train.reliability_data` returns.
    """
    ax = _axes(ax, figsize=(4.5, 4.5))
    conf = data["confidence"].numpy()
    acc = data["accuracy"].numpy()
    keep = ~np.isnan(acc)
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
    ax.plot(conf[keep], acc[keep], marker="o", label=label)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    return ax


def mask_image(mask: torch.Tensor, ax=None, title: str = "Mask (dark = kept)"):
    """Show a 2-D mask as an image: kept weights dark, pruned light."""
    ax = _axes(ax)
    m = mask.detach().float().cpu()
    if m.dim() > 2:
        m = m.flatten(1)
    ax.imshow(m.numpy(), cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xlabel("input index")
    ax.set_ylabel("output index")
    ax.set_title(title)
    return ax
