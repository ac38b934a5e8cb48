"""One explorer per experiment notebook: knobs over its recorded runs and results, no retraining.

Each function returns a `chapter11.plots.Explorer`. Shown in Jupyter it is a
row of sliders and buttons above a figure and one line of text; `set(...)`
moves the knobs from code and returns that line, which is how the notebooks
and `tests/test_explorers.py` check it. Explorers of recorded runs load the
JSON under `benchmarks/full/` themselves, so their notebook cell runs on its
own (the browser test runs only that cell). Explorers of a notebook's live
results take them as arguments.

    notebook  explorer                 knobs                                  reads
    01        schedules_explorer       sparsity x schedule                    the notebook's equal-budget sweep (+ a model)
    02        lottery_explorer         weights remaining                      benchmarks/full/02_lottery_mlp_seeds.json
    03        movement_explorer        criterion x sparsity                   benchmarks/full/03_movement_vs_magnitude.json
    04        structured_llm_explorer  cut                                    benchmarks/full/04_llm_structured.json
    05        onnx_explorer            sparsity x batch                       the notebook's accuracies, sizes and timings
    06        dynamic_explorer         method x sparsity x budget             benchmarks/full/06_dynamic_sparsity.json
    07        channels_explorer        criterion x filters removed            the notebook's accuracies per stage and seed
    08        csr_explorer             sparsity                               a seeded 6 x 8 matrix (computed, instant)
    09        oneshot_explorer         method x pattern                       benchmarks/full/09_llm_one_shot_pruning.json
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..csr import storage_bytes, to_csr
from ..plots import Explorer, weight_histogram
from ..report import load_full_run
from ..stats import difference, summarize

__all__ = ["schedules_explorer", "lottery_explorer", "movement_explorer", "structured_llm_explorer", "onnx_explorer",
           "dynamic_explorer", "channels_explorer", "csr_explorer", "oneshot_explorer"]


def _figure(ncols: int = 1, width: float = 6.0):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, 3.4), squeeze=False)
    return fig, list(axes[0])


def _band(ax, xs, summaries, label, highlight=False):
    means = [s.mean for s in summaries]
    sds = [s.sd if s.n > 1 else 0.0 for s in summaries]
    line, = ax.plot(xs, means, marker="o", label=label, lw=2.2 if highlight else 1.0, alpha=1.0 if highlight else 0.45)
    if highlight:
        ax.fill_between(xs, [m - d for m, d in zip(means, sds)], [m + d for m, d in zip(means, sds)], alpha=0.2,
                        color=line.get_color())


def _pm(s) -> str:
    return f"{s.mean:.3f} ± {s.sd:.3f}" if s.n > 1 else f"{s.mean:.3f}"


# --------------------------------------------------------------------------- 01


def _sweep_rows(sweeps: Mapping) -> list[dict]:
    rows = []
    for seed, sweep in sweeps.items():
        for r in sweep:
            test = r["test"] if "test" in r else r["after"]["test"]
            rows.append({"seed": seed, "method": r["method"], "target": r["target"], "test": test})
    return rows


def schedules_explorer(sweeps: Mapping, model: torch.nn.Module | None = None) -> Explorer:
    """Notebook 01: pick a target sparsity and a schedule; the accuracy band over seeds, and the weights cut.

    `sweeps` is {seed: rows of `equal_budget_sweep`} (each row has "method",
    "target" and a test accuracy, at the top level or under "after"). With
    `model`, the right panel shows its weight histogram before and after a
    global magnitude cut at the chosen sparsity (no training).
    """
    rows = _sweep_rows(sweeps)
    if not rows:
        raise ValueError("sweeps: holds no rows")
    targets = sorted({r["target"] for r in rows if r["method"] != "dense"})
    methods = [m for m in ("one-shot", "iterative", "cubic", "random") if any(r["method"] == m for r in rows)]
    acc = {(m, t): summarize([r["test"] for r in rows if r["method"] == m and r["target"] == t]) for m in methods for t in targets}
    dense = [r["test"] for r in rows if r["method"] == "dense"]

    def view(sparsity, schedule):
        import copy

        from ..magnitude import prune_magnitude

        fig, axes = _figure(2 if model is not None else 1, 11.0 if model is not None else 6.0)
        ax = axes[0]
        for m in methods:
            _band(ax, [100 * t for t in targets], [acc[m, t] for t in targets], m, highlight=(m == schedule))
        if dense:
            ax.axhline(summarize(dense).mean, color="gray", ls="--", lw=0.8, label="dense, same steps")
        ax.axvline(100 * sparsity, color="black", lw=0.8)
        ax.set(xlabel="sparsity (%)", ylabel="test accuracy", title="Equal fine-tuning budgets: mean ± sd over seeds")
        ax.legend(fontsize=8)
        if model is not None:
            cut = copy.deepcopy(model)
            prune_magnitude(cut, sparsity, scope="global")
            weight_histogram(model, cut, ax=axes[1], title=f"one global cut at {sparsity:.0%} (no fine-tuning)")
        s, one = acc[schedule, sparsity], acc["one-shot", sparsity]
        text = (f"{schedule} at {sparsity:.0%}: test accuracy {_pm(s)} over {s.n} seeds; "
                f"one-shot {_pm(one)}" + (f"; dense {_pm(summarize(dense))}" if dense else ""))
        if schedule != "one-shot" and s.n > 1:
            d = difference([r["test"] for r in rows if r["method"] == schedule and r["target"] == sparsity],
                           [r["test"] for r in rows if r["method"] == "one-shot" and r["target"] == sparsity])
            text += f"; {schedule} - one-shot {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
        return fig, text

    return Explorer(view, {"sparsity": targets, "schedule": methods}, {"sparsity": targets[len(targets) // 2]},
                    title="Notebook 01: schedule against sparsity at equal budgets")


# --------------------------------------------------------------------------- 02


def lottery_explorer(record: Mapping | None = None) -> Explorer:
    """Notebook 02: pick how many weights remain; the ticket against its two controls over the recorded seeds."""
    record = record or load_full_run("02_lottery_mlp_seeds")
    acc = record["results"]["accuracy"]
    remaining = [round(100 * d, 1) for d in acc["density"]]
    kinds = [k for k in ("ticket", "reinit", "random_mask") if k in acc]

    def view(remaining_pct):
        i = remaining.index(remaining_pct)
        fig, (ax,) = _figure()
        for k in kinds:
            _band(ax, remaining, [summarize(v) for v in acc[k]], k, highlight=True)
        ax.axvline(remaining_pct, color="black", lw=0.8)
        ax.set(xscale="log", xlabel="weights remaining (%, log)", ylabel="test accuracy",
               title=f"RECORDED: LeNet-300-100, {len(acc['seeds'])} seeds")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
        parts = [f"{k} {_pm(summarize(acc[k][i]))}" for k in kinds]
        text = f"{remaining_pct:g}% remaining: " + ", ".join(parts)
        for control in kinds[1:]:
            d = difference(acc["ticket"][i], acc[control][i])
            text += f"; ticket - {control} {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
        return fig, text

    return Explorer(view, {"remaining_pct": remaining}, {"remaining_pct": remaining[-1]},
                    title="Notebook 02: a lottery ticket against its controls (recorded run)")


# --------------------------------------------------------------------------- 03


def movement_explorer(record: Mapping | None = None) -> Explorer:
    """Notebook 03: pick a criterion and a sparsity; every recorded seed's test accuracy, against magnitude and dense."""
    record = record or load_full_run("03_movement_vs_magnitude")
    runs = record["results"]["runs"]
    methods = list(record["settings"]["methods"])
    sparsities = list(record["settings"]["sparsities"])

    def seeds_of(method, target):
        picked = [r for r in runs if r["method"] == method and abs(r["target"] - target) < 1e-6]
        return {r["seed"]: r["test"] for r in picked}

    dense = seeds_of("dense", 0.0)

    def view(criterion, sparsity):
        fig, (ax,) = _figure()
        for j, m in enumerate(methods):
            for k, s in enumerate(sparsities):
                values = list(seeds_of(m, s).values())
                x = k + (j - 1.5) * 0.18
                chosen = (m, s) == (criterion, sparsity)
                ax.scatter([x] * len(values), values, s=40 if chosen else 14, alpha=1.0 if chosen else 0.35,
                           color=f"C{j}", label=m if k == 0 else None, edgecolors="black" if chosen else "none")
        if dense:
            ax.axhline(summarize(list(dense.values())).mean, color="gray", ls="--", lw=0.8, label="dense")
        ax.axhline(1 / 9, color="red", ls=":", lw=0.8, label="chance (9 classes)")
        ax.set_xticks(range(len(sparsities)), [f"{100 * s:g}%" for s in sparsities])
        ax.set(xlabel="sparsity", ylabel="test accuracy",
               title=f"RECORDED: MiniLM fine-tuned while pruning, {record['settings']['steps']} steps, one dot per seed")
        ax.legend(fontsize=7, ncol=2)
        mine, mag = seeds_of(criterion, sparsity), seeds_of("magnitude", sparsity)
        text = (f"{criterion} at {100 * sparsity:g}%: seeds " + ", ".join(f"{seed}: {v:.3f}" for seed, v in sorted(mine.items()))
                + f"; mean {_pm(summarize(list(mine.values())))}; magnitude {_pm(summarize(list(mag.values())))}")
        if criterion != "magnitude":
            both = sorted(set(mine) & set(mag))
            d = difference([mine[s] for s in both], [mag[s] for s in both])
            text += f"; {criterion} - magnitude {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
        return fig, text

    return Explorer(view, {"criterion": methods, "sparsity": sparsities}, {"sparsity": sparsities[-1], "criterion": "soft"},
                    title="Notebook 03: movement against magnitude (recorded seeds)")


# --------------------------------------------------------------------------- 04


def _kind(cut: str) -> str:
    return cut.partition(": ")[0]


def structured_llm_explorer(record: Mapping | None = None) -> Explorer:
    """Notebook 04: pick a recorded structured cut; its perplexity before and after recovery, and its speedups.

    Perplexities are mean ± sd over the record's calibration draws; measured
    speedups are the median of the per-round ratios with their interquartile
    range (one-thread CPU clock).
    """
    record = record or load_full_run("04_llm_structured")
    res, settings = record["results"], record["settings"]
    from .exp04_heads import CUTS

    cuts = sorted(res["cuts"], key=lambda c: CUTS.index(c) if c in CUTS else len(CUTS))  # the driver's order (JSON sorts keys)
    kinds = list(dict.fromkeys(_kind(c) for c in cuts))
    speed = res["speed"]

    def measured(measure: str, cut: str) -> str:
        q = speed[measure]["speedup"][cut]
        return f"{q['median']:.2f}x (IQR {q['q1']:.2f}-{q['q3']:.2f})"

    def view(cut):
        fig, (ax1, ax2) = _figure(2, 11.0)
        for j, kind in enumerate(kinds):
            cs = [c for c in cuts if _kind(c) == kind]
            xs = [res["cuts"][c]["removed_params"] / 1e6 for c in cs]
            for key, marker, alpha in (("ppl_before", "o", 0.35), ("ppl_after", "s", 1.0)):
                ys = [summarize(res["cuts"][c][key]) for c in cs]
                ax1.errorbar(xs, [y.mean for y in ys], yerr=[y.sd for y in ys], fmt=marker, color=f"C{j}", alpha=alpha,
                             label=kind if key == "ppl_after" else None)
            q = [speed["prefill"]["speedup"][c] for c in cs]
            ax2.errorbar(xs, [v["median"] for v in q], yerr=[[v["median"] - v["q1"] for v in q], [v["q3"] - v["median"] for v in q]],
                         fmt="s", color=f"C{j}", label=kind)
            ax2.scatter(xs, [res["cuts"][c]["predicted_prefill"] for c in cs], marker="_", s=300, color=f"C{j}")
        x = res["cuts"][cut]["removed_params"] / 1e6
        ax1.scatter([x], [summarize(res["cuts"][cut]["ppl_after"]).mean], s=160, facecolors="none", edgecolors="black")
        ax2.scatter([x], [speed["prefill"]["speedup"][cut]["median"]], s=160, facecolors="none", edgecolors="black")
        ax1.axhline(res["dense_ppl"], color="gray", ls="--", lw=0.8, label="dense")
        ax1.set(xlabel="parameters removed (millions)", ylabel="held-out perplexity", yscale="log",
                title="RECORDED: faint before recovery, solid after")
        ax1.legend(fontsize=7)
        ax2.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax2.set(xlabel="parameters removed (millions)", ylabel="prefill speedup (1 x 256)",
                title="measured (squares, IQR) and MAC-predicted (bars)")
        ax2.legend(fontsize=7)
        c = res["cuts"][cut]
        before, after = summarize(c["ppl_before"]), summarize(c["ppl_after"])
        text = (f"{cut}: {c['removed_params'] / 1e6:.2f} M parameters removed ({100 * c['share']:.1f}%); perplexity "
                f"{before:.2f} before recovery, {after:.2f} after {settings['recovery_steps']} steps (dense {res['dense_ppl']:.2f}; "
                f"{before.n} calibration draws); prefill 1 x {settings['prompt_tokens']}: predicted {c['predicted_prefill']:.2f}x, "
                f"measured {measured('prefill', cut)}; prefill {settings['batch_prompts']} x {settings['prompt_tokens']}: measured "
                f"{measured('prefill_batch', cut)}; decode: predicted {c['predicted_decode']:.2f}x, measured {measured('decode', cut)}")
        return fig, text

    return Explorer(view, {"cut": cuts}, title="Notebook 04: structured cuts of an LLM (recorded run)")


# --------------------------------------------------------------------------- 05


def onnx_explorer(acc: Mapping, sizes: Mapping, dense_bytes: int, speed: Mapping) -> Explorer:
    """Notebook 05: pick a sparsity and a batch; accuracy, bytes on disk and the sparse operator's speed.

    `acc` maps "dense" and "unstructured <s>" to test accuracies over seeds
    (a `Summary` or a list), `sizes` {s: bytes with sparse initializers},
    `speed` {(model name, batch): speedup against dense} as the notebook
    timed them (missing pairs show as "not timed").
    """
    sweep = sorted(sizes)
    batches = sorted({b for _, b in speed})
    acc = {k: (v if hasattr(v, "mean") else summarize(v)) for k, v in acc.items()}

    def view(sparsity, batch):
        fig, (ax1, ax2) = _figure(2, 11.0)
        xs = [100 * (1 - s) for s in sweep]
        _band(ax1, xs, [acc[f"unstructured {s}"] for s in sweep], "unstructured", highlight=True)
        ax1.axhline(acc["dense"].mean, color="gray", ls="--", lw=0.8, label="dense")
        ax1.axvline(100 * (1 - sparsity), color="black", lw=0.8)
        ax1.set(xscale="log", xlabel="weights remaining (%, log)", ylabel="test accuracy", title="Accuracy, mean ± sd")
        ax1.legend(fontsize=8)
        timed = [s for s in sweep if (f"sparse op {s}", batch) in speed]
        ax2.plot([100 * s for s in timed], [speed[f"sparse op {s}", batch] for s in timed], "o-", label="sparse operator")
        ax2.axhline(1.0, color="gray", ls="--", lw=0.8, label="dense")
        ax2.axvline(100 * sparsity, color="black", lw=0.8)
        ax2.set(yscale="log", xlabel="sparsity (%)", ylabel="speedup over dense (log)", title=f"ONNX Runtime, batch {batch}")
        ax2.legend(fontsize=8)
        op = speed.get((f"sparse op {sparsity}", batch))
        text = (f"{sparsity:.0%} sparse: accuracy {_pm(acc[f'unstructured {sparsity}'])} (dense {_pm(acc['dense'])}); "
                f"file {dense_bytes / 1e6:.2f} MB with zeros stored, {sizes[sparsity] / 1e6:.2f} MB as sparse initializers; "
                f"sparse operator at batch {batch}: " + (f"{op:.2f}x dense" if op is not None else "not timed"))
        return fig, text

    return Explorer(view, {"sparsity": sweep, "batch": batches}, {"sparsity": 0.9 if 0.9 in sweep else sweep[0]},
                    title="Notebook 05: what ONNX Runtime makes of the zeros")


# --------------------------------------------------------------------------- 06


def dynamic_explorer(record: Mapping | None = None) -> Explorer:
    """Notebook 06: pick a method, a sparsity and a training budget; accuracy over the recorded seeds and training FLOPs."""
    record = record or load_full_run("06_dynamic_sparsity")
    res = record["results"]
    settings = sorted(((model, int(epochs)) for model in res for epochs in res[model]), key=lambda me: (me[0] != "MLP", me[1]))
    labels = [f"{model}, {epochs} epochs" for model, epochs in settings]
    cells = {}
    for (model, epochs), label in zip(settings, labels):
        for key, v in res[model][str(epochs)].items():
            cells[label, key] = v
    methods = ["static", "set", "rigl", "gradual"]
    sparsities = sorted({float(k.split("/")[0]) for _, k in cells if "/" in k})

    def view(method, sparsity, budget):
        fig, (ax,) = _figure()
        here = [s for s in sparsities if (budget, f"{s:g}/{method}") in cells]
        for j, m in enumerate(methods):
            xs = [100 * s for s in sparsities if (budget, f"{s:g}/{m}") in cells]
            ys = [summarize(cells[budget, f"{s:g}/{m}"]["accuracy"]) for s in sparsities if (budget, f"{s:g}/{m}") in cells]
            if xs:
                _band(ax, xs, ys, m, highlight=(m == method))
        if (budget, "dense") in cells:
            ax.axhline(summarize(cells[budget, "dense"]["accuracy"]).mean, color="gray", ls="--", lw=0.8, label="dense")
        ax.axvline(100 * sparsity, color="black", lw=0.8)
        ax.set(xlabel="sparsity (%)", ylabel="test accuracy", title=f"RECORDED: {budget}")
        ax.legend(fontsize=8)
        key = (budget, f"{sparsity:g}/{method}")
        if key not in cells:
            return fig, (f"{method} at {sparsity:.0%}, {budget}: not recorded (recorded here: "
                         + ", ".join(f"{s:.0%}" for s in here or sparsities if (budget, f"{s:g}/static") in cells) + ")")
        s = summarize(cells[key]["accuracy"])
        text = f"{method} at {sparsity:.0%}, {budget}: accuracy {_pm(s)} over {s.n} seeds"
        if (budget, "dense") in cells:
            dense = cells[budget, "dense"]
            d = difference(cells[key]["accuracy"], dense["accuracy"])
            text += (f"; minus dense {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]; training FLOPs "
                     f"{cells[key]['training_flops'] / dense['training_flops']:.2f}x dense")
        return fig, text

    return Explorer(view, {"method": methods, "sparsity": sparsities, "budget": labels},
                    {"method": "rigl", "sparsity": 0.9 if 0.9 in sparsities else sparsities[0]},
                    title="Notebook 06: dynamic sparsity by budget (recorded run)")


# --------------------------------------------------------------------------- 07


def channels_explorer(acc: Mapping, dense_val: Sequence[float] | None = None) -> Explorer:
    """Notebook 07: pick a criterion and how many filters to remove; validation accuracy after each recovery stage.

    `acc` is the notebook's {(stage, criterion, amount): [accuracy per seed]}.
    """
    stages = [s for s in ("removed", "recalibrated", "fine-tuned") if any(k[0] == s for k in acc)]
    criteria = sorted({k[1] for k in acc if k[0] == "removed"}, key=lambda c: (c == "random", c))
    amounts = sorted({k[2] for k in acc if k[0] == "removed"})

    def view(criterion, removed):
        fig, (ax,) = _figure()
        for j, stage in enumerate(stages):
            for i, c in enumerate(criteria):
                if (stage, c, removed) not in acc:
                    continue
                s = summarize(acc[stage, c, removed])
                x = i + (j - 1) * 0.25
                ax.bar(x, s.mean, width=0.24, yerr=s.sd if s.n > 1 else 0, color=f"C{j}", label=stage if i == 0 else None,
                       alpha=1.0 if c == criterion else 0.35, capsize=3)
        if dense_val:
            ax.axhline(summarize(dense_val).mean, color="gray", ls="--", lw=0.8, label="dense")
        ax.set_xticks(range(len(criteria)), criteria)
        ax.set(ylabel="validation accuracy", title=f"{removed:.0%} of the filters removed, mean ± sd over seeds")
        ax.legend(fontsize=8)
        parts = [f"{stage} {_pm(summarize(acc[stage, criterion, removed]))}" for stage in stages if (stage, criterion, removed) in acc]
        return fig, f"{criterion}, {removed:.0%} removed: " + "; ".join(parts)

    return Explorer(view, {"criterion": criteria, "removed": amounts}, {"removed": amounts[len(amounts) // 2]},
                    title="Notebook 07: channel pruning, stage by stage")


# --------------------------------------------------------------------------- 08


def _csr_matrix(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tenths = torch.randint(-90, 91, (6, 8), generator=g)  # integers: the same matrix on every CPU
    tenths[tenths == 0] = 1  # exact zeros appear only where the slider prunes
    return tenths.float() / 10  # (6, 8), one decimal so the arrays read easily


def csr_explorer(seed: int = 0) -> Explorer:
    """Notebook 08: pick a sparsity; a 6 x 8 matrix pruned by magnitude, its CSR arrays and its bytes against dense."""
    W = _csr_matrix(seed)
    order = W.abs().flatten().argsort(stable=True)  # smallest first: the k smallest are cut
    sparsities = [round(0.125 * i, 3) for i in range(8)]

    def pruned(sparsity):
        k = round(sparsity * W.numel())
        keep = torch.ones(W.numel(), dtype=torch.bool)
        keep[order[:k]] = False
        return W * keep.view_as(W)

    def view(sparsity):
        import matplotlib.pyplot as plt

        P = pruned(sparsity)
        csr = to_csr(P)
        sizes = storage_bytes(P, index_dtype="int32")
        fig, (ax,) = _figure(1, 5.5)
        ax.imshow(P.abs().numpy(), cmap="Greys", vmin=0)
        for (i, j), v in zip(torch.cartesian_prod(torch.arange(6), torch.arange(8)).tolist(), P.flatten().tolist()):
            ax.text(j, i, f"{v:g}" if v else "·", ha="center", va="center", fontsize=8,
                    color="white" if abs(v) > 0.6 * float(W.abs().max()) else "black")
        ax.set(title=f"{sparsity:.1%} zeros: nnz {csr.data.size}", xticks=[], yticks=[])
        plt.tight_layout()
        text = (f"sparsity {sparsity:.3f}: nnz {csr.data.size}\n"
                f"data    {[round(float(v), 1) for v in csr.data]}\n"
                f"indices {csr.indices.tolist()}\n"
                f"indptr  {csr.indptr.tolist()}\n"
                f"bytes: dense {sizes['dense']}, CSR with int32 indices {sizes['csr']} "
                f"({sizes['csr'] / sizes['dense']:.2f}x dense)")
        return fig, text

    return Explorer(view, {"sparsity": sparsities}, {"sparsity": 0.5}, title="Notebook 08: CSR, live")


# --------------------------------------------------------------------------- 09


def oneshot_explorer(record: Mapping | None = None) -> Explorer:
    """Notebook 09: pick a method and a sparsity pattern; held-out perplexity over the recorded calibration seeds."""
    record = record or load_full_run("09_llm_one_shot_pruning")
    res = record["results"]
    patterns = list(record["settings"]["patterns"])
    methods = [m for m in ("magnitude", "wanda", "sparsegpt") if f"{m} {patterns[0]}" in res["perplexity"]]

    def view(method, pattern):
        fig, (ax,) = _figure(1, 7.0)
        for j, m in enumerate(methods):
            for i, p in enumerate(patterns):
                values = res["perplexity"][f"{m} {p}"]
                s = summarize(values)
                chosen = (m, p) == (method, pattern)
                ax.bar(i + (j - 1) * 0.27, s.mean, width=0.26, yerr=s.sd if s.n > 1 else 0, color=f"C{j}", capsize=3,
                       label=m if i == 0 else None, alpha=1.0 if chosen else 0.4, edgecolor="black" if chosen else None)
        ax.axhline(res["dense"], color="gray", ls="--", lw=0.8, label="dense")
        ax.set_xticks(range(len(patterns)), patterns)
        ax.set(yscale="log", xlabel="pattern", ylabel="held-out perplexity (log)",
               title="RECORDED: SmolLM2-135M pruned in one shot")
        ax.legend(fontsize=8)
        values = res["perplexity"][f"{method} {pattern}"]
        seconds = res["seconds"][f"{method} {pattern}"]
        text = (f"{method} {pattern}: perplexity " + ", ".join(f"{v:.2f}" for v in values)
                + f" over {len(values)} calibration seed(s) (dense {res['dense']:.2f}); pruning took "
                + ", ".join(f"{s:.1f}" for s in seconds) + " s")
        if method != "magnitude" and len(values) > 1:
            other = "sparsegpt" if method == "wanda" else "wanda"
            d = difference(values, res["perplexity"][f"{other} {pattern}"])
            text += f"; {method} - {other} {d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"
        return fig, text

    return Explorer(view, {"method": methods, "pattern": patterns}, {"method": "wanda", "pattern": "50%"},
                    title="Notebook 09: one-shot pruning of an LLM (recorded run)")

