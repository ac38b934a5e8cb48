"""Matplotlib helpers the notebooks reuse, so every figure has labels and units.

Each helper draws on `ax` (a new figure when `ax` is None) and returns the
axes, so notebooks can compose panels. They only draw: no computation that a
reader would need to trust happens here.

`Explorer` puts knobs (ipywidgets sliders and menus) on a view of results
already computed or recorded: moving one redraws, it never trains. Without
ipywidgets, or outside a Jupyter kernel, it draws one static figure and says
so.

But: no styling beyond labels, titles and legends; no interactive backends
beyond ipywidgets' own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = ["weight_histogram", "sparsity_bars", "metric_vs_sparsity", "curves_with_bands", "reliability_diagram", "mask_image",
           "Explorer"]


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


# --------------------------------------------------------------------------- explorers


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (a front end can show widgets), False in a script or a terminal IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _label(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class Explorer:
    """Knobs over results that are already computed: `view(**values)` returns (figure or None, text).

    `controls` maps each knob's name to its options, in order (the first is
    the default unless `values` says otherwise). Numbers get a slider,
    strings a row of buttons (a menu above four options). Every change
    calls `view` once and replaces the figure and the text under the knobs;
    `view` must only read what the notebook or a recorded run already holds,
    so an answer takes well under a second.

    `set(**values)` moves knobs from code, as a student would by hand, and
    returns the text now shown: the notebooks and the tests drive explorers
    that way. Shown in a Jupyter kernel, an explorer is a widget; without
    ipywidgets, or outside a kernel (`show()` from a script), it draws the
    current values once and prints a line saying it is static.

    >>> import matplotlib; matplotlib.use("Agg")
    >>> e = Explorer(lambda n, kind: (None, f"{kind} {n * n}"), {"n": [1, 2, 3], "kind": ["square", "area"]})
    >>> e.set(n=3)
    'square 9'
    >>> e.set(kind="cube")
    Traceback (most recent call last):
    ...
    ValueError: kind: 'cube' is not one of the explorer's options ['square', 'area']
    """

    def __init__(self, view, controls: Mapping[str, Sequence], values: Mapping | None = None, title: str = ""):
        if not callable(view):
            raise TypeError(f"view must be callable, got {type(view).__name__}")
        if not isinstance(controls, Mapping) or not controls:
            raise ValueError("controls: give at least one knob, as {name: [option, ...]}")
        self.controls = {}
        for name, options in controls.items():
            options = list(options)
            if not options:
                raise ValueError(f"controls: {name!r} has no options")
            self.controls[name] = options
        self.view, self.title = view, title
        self.values = {name: options[0] for name, options in self.controls.items()}
        self.figure, self.text = None, ""
        self._widgets, self._output, self._hold = {}, None, False
        for name, value in (values or {}).items():
            self._check(name, value)
            self.values[name] = value
        self._render()

    def _check(self, name, value) -> None:
        if name not in self.controls:
            raise ValueError(f"{name}: unknown control; this explorer has {sorted(self.controls)}")
        if value not in self.controls[name]:
            raise ValueError(f"{name}: {value!r} is not one of the explorer's options {self.controls[name]}")

    def _render(self) -> None:
        import matplotlib.pyplot as plt

        figure, text = self.view(**self.values)
        self.figure, self.text = figure, str(text)
        if self._output is not None:
            # One assignment of the output area's state: no `with output:` capture, which depends on the front end
            # (or nbclient) routing messages by id, and no flicker between clearing and drawing.
            outputs = []
            if figure is not None:
                import base64
                import io

                buffer = io.BytesIO()
                figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
                outputs.append({"output_type": "display_data", "metadata": {},
                                "data": {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii"),
                                         "text/plain": f"<figure: {self.text.splitlines()[0][:60]}>"}})
            outputs.append({"output_type": "stream", "name": "stdout", "text": self.text + "\n"})
            self._output.outputs = tuple(outputs)
        if figure is not None:
            plt.close(figure)

    def set(self, **values) -> str:
        """Move the named knobs (all at once, one redraw) and return the text now shown."""
        for name, value in values.items():
            self._check(name, value)
        self._hold = True
        try:
            for name, value in values.items():
                self.values[name] = value
                if name in self._widgets:
                    self._widgets[name].value = value
        finally:
            self._hold = False
        self._render()
        return self.text

    def widget(self):
        """The ipywidgets box (knobs above an output area), or None when ipywidgets is not installed."""
        try:
            import ipywidgets as widgets
        except ImportError:
            return None
        knobs = []
        for name, options in self.controls.items():
            pairs = [(_label(o), o) for o in options]
            if all(isinstance(o, (int, float)) and not isinstance(o, bool) for o in options):
                knob = widgets.SelectionSlider(options=pairs, value=self.values[name], description=name, continuous_update=False)
            elif len(options) <= 4:
                knob = widgets.ToggleButtons(options=pairs, value=self.values[name], description=name)
            else:
                knob = widgets.Dropdown(options=pairs, value=self.values[name], description=name)
            knob.observe(self._changed(name), names="value")
            self._widgets[name] = knob
            knobs.append(knob)
        self._output = widgets.Output()
        box = widgets.VBox(([widgets.HTML(f"<b>{self.title}</b>")] if self.title else []) + knobs + [self._output])
        box.add_class("ch11-explorer")
        self._render()
        return box

    def _changed(self, name):
        def on_change(change):
            self.values[name] = change["new"]
            if not self._hold:
                self._render()
        return on_change

    def show(self, reason: str | None = None) -> None:
        """Draw the current values once, as a static figure, with one line saying why it is static."""
        import matplotlib.pyplot as plt
        from IPython.display import display

        settings = ", ".join(f"{k}={_label(v)}" for k, v in self.values.items())
        print(f"{reason or 'static view'}: the figure for {settings}; call .set(...) for other values")
        figure, text = self.view(**self.values)
        if figure is not None:
            display(figure)
            plt.close(figure)
        print(text)

    def _ipython_display_(self):
        from IPython.display import display

        if not _in_kernel():
            return self.show("no Jupyter front end")
        box = self.widget()
        if box is None:
            return self.show("ipywidgets is not installed")
        display(box)
