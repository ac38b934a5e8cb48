"""Experiment 3, the drivers: movement against magnitude pruning on MiniLM and on SmolLM2, live and recorded.

Covers: everything notebook 03 and its recorded runs need that is not the
method itself (the method is `chapter11.movement`):

- the task: which stdlib package a docstring comes from (`docstring_task`),
  on pretrained all-MiniLM-L6-v2 with a fresh head (`minilm_classifier`);
- `fine_prune`, the fine-pruning loop every method shares (cubic schedule
  after a dense warm-up, soft movement's ramped L1 penalty), and its
  `FinePruneConfig`;
- the grid: `GridSettings`, `run_one` (one seed), `run_grid` (resumable,
  splittable between worker processes), `full_run` and `more_seeds_run`
  (the records in `benchmarks/full/`), `grid_summaries`;
- the first-cut diagnosis (`first_cut`, `first_cut_run`): why movement
  breaks the network where pruning starts;
- the LLM part: SmolLM2's top blocks adapted to Python source with its
  lower blocks frozen and cached (`TopBlocks`, `LMSettings`, `lm_data`,
  `run_lm_one`, `lm_full_run`), and step times.

    python -m chapter11.experiments.exp03_movement [lm | first-cut | ablation [worker I/N] | more-seeds [worker I/N] | worker I/N]

But: one small task and one model size per part, chosen to run on two CPU
cores; the recorded runs, not the live cells, carry the seed statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..movement import (METHODS, MaskedLinear, _check_alpha, movement_scores, masked_layers, masked_sparsity, set_sparsity, soft_penalty,
                        wrap_linears)
from ..sparsity import check_sparsity
from . import append_jsonl, read_logs, worker_log

# ---------------------------------------------------------------------------
# The sign convention, worked on two weights
# ---------------------------------------------------------------------------


def sign_example(lr: float = 0.1, steps: int = 3) -> dict[str, torch.Tensor]:
    """Two weights, both at +1.0, trained by SGD on L = 0.5*w1 - 0.5*w2.

    dL/dw = (+0.5, -0.5) at every step: w1 shrinks toward 0, w2 grows. The
    returned dict holds the weight and gradient history and three scores:
    `sanh` (S = -sum G*W: w1 lowest, pruned, correct), `chapter_update`
    (m = sum g*w with g = -G, the update direction: identical to `sanh`) and
    `chapter_raw_gradient` (m = sum G*W with the raw gradient: the signs flip
    and the rule would prune w2, the weight moving away from zero).

    >>> ex = sign_example(lr=0.1, steps=2)
    >>> [round(v, 3) for v in ex["weights"][-1].tolist()]
    [0.9, 1.1]
    >>> [round(v, 3) for v in ex["sanh"].tolist()]
    [-0.975, 1.025]
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    w = torch.tensor([1.0, 1.0], requires_grad=True)  # (2,)
    direction = torch.tensor([0.5, -0.5])  # dL/dw, constant
    weights, grads = [], []
    for _ in range(steps):
        loss = (direction * w).sum()
        (g,) = torch.autograd.grad(loss, w)
        weights.append(w.detach().clone())
        grads.append(g.clone())
        with torch.no_grad():
            w -= lr * g
    weights.append(w.detach().clone())  # final weights, for display
    history_w, history_g = weights[:-1], grads
    sanh = movement_scores(history_w, history_g)
    update = [-g for g in history_g]  # g in the chapter = update direction
    chapter_update = torch.stack([u * v for u, v in zip(update, history_w)]).sum(0)
    chapter_raw = torch.stack([g * v for g, v in zip(history_g, history_w)]).sum(0)
    return {
        "weights": weights,
        "grads": history_g,
        "sanh": sanh,
        "chapter_update": chapter_update,
        "chapter_raw_gradient": chapter_raw,
    }


# ---------------------------------------------------------------------------
# Experiment 3: data, model size, fine-pruning loop
# ---------------------------------------------------------------------------


def keep_encoder_layers(model: nn.Module, n: int) -> nn.Module:
    """Keep only the first `n` pretrained blocks of a BERT-style encoder, in place (a CPU-budget cut)."""
    base = getattr(model, "bert", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"model: {type(model).__name__} has no encoder.layer ModuleList to cut")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(layers):
        raise ValueError(f"n must be an int between 1 and {len(layers)}, got {n!r}")
    base.encoder.layer = layers[:n]
    model.config.num_hidden_layers = n
    return model


def minilm_classifier(num_labels: int, layers: int = 6, freeze_word_embeddings: bool = True, seed: int = 0) -> nn.Module:
    """Pretrained all-MiniLM-L6-v2 with a fresh head, cut to its first `layers` blocks.

    Freezing the 30,522 x 384 word-embedding table (never pruned here) saves
    an Adam update of 11.7M numbers per step. `seed` fixes the fresh head.
    """
    from ..models import load_minilm
    from ..train import seed_everything

    seed_everything(seed)
    model, _ = load_minilm(num_labels=num_labels)
    keep_encoder_layers(model, layers)
    if freeze_word_embeddings:
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    return model


@dataclass
class DocstringTask:
    """Tokenised stdlib-docstring classification: which package a docstring comes from.

    `val` (optional) is for every choice (steps, penalties); `test` is
    reported once, at the end.
    """

    train: torch.utils.data.TensorDataset  # (input_ids (N, T), attention_mask (N, T), labels (N,))
    test: torch.utils.data.TensorDataset
    class_names: list[str]
    train_counts: list[int]
    test_counts: list[int]
    val: torch.utils.data.TensorDataset | None = None
    val_counts: list[int] | None = None


def docstring_task(tokenizer, max_length: int = 32, max_per_class: int | None = 120, test_per_class: int = 30,
                   packages: Sequence[str] | None = None, seed: int = 0, val_per_class: int = 0) -> DocstringTask:
    """Split `chapter11.data.stdlib_docstrings` per class into train, validation and test, then tokenise.

    Each class gives its first `test_per_class` (shuffled) docstrings to the
    test set, the next `val_per_class` to the validation set and the rest,
    up to `max_per_class` in all, to the training set. Texts are cut to
    `max_length` tokens.
    """
    from ..data import DEFAULT_PACKAGES, stdlib_docstrings

    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
        raise ValueError(f"max_length must be an int >= 4, got {max_length!r}")
    if isinstance(test_per_class, bool) or not isinstance(test_per_class, int) or test_per_class < 1:
        raise ValueError(f"test_per_class must be a positive int, got {test_per_class!r}")
    if isinstance(val_per_class, bool) or not isinstance(val_per_class, int) or val_per_class < 0:
        raise ValueError(f"val_per_class must be an int >= 0, got {val_per_class!r}")
    texts, labels, names = stdlib_docstrings(packages=tuple(packages or DEFAULT_PACKAGES), max_per_class=max_per_class, seed=seed)
    split = {"train": ([], []), "val": ([], []), "test": ([], [])}
    seen = [0] * len(names)
    for text, label in zip(texts, labels):
        part = "test" if seen[label] < test_per_class else "val" if seen[label] < test_per_class + val_per_class else "train"
        seen[label] += 1
        split[part][0].append(text)
        split[part][1].append(label)
    for label, n in enumerate(seen):
        if n <= test_per_class + val_per_class:
            raise ValueError(f"test_per_class={test_per_class} and val_per_class={val_per_class} leave no training "
                             f"example for class {names[label]!r} ({n} docstrings)")

    def encode(part):
        x, y = split[part]
        enc = tokenizer(x, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(y))

    counts = {p: [split[p][1].count(k) for k in range(len(names))] for p in split}
    val = encode("val") if val_per_class else None
    return DocstringTask(encode("train"), encode("test"), list(names), counts["train"], counts["test"],
                         val, counts["val"] if val_per_class else None)


@dataclass(frozen=True)
class FinePruneConfig:
    """Hyperparameters of one fine-pruning run (defaults: the committed notebook size)."""

    steps: int = 100  # optimizer steps in all
    batch_size: int = 16
    lr: float = 1e-4  # AdamW on the model's weights
    head_lr: float = 1e-3  # the fresh classification head learns faster
    score_lr: float = 1e-2  # AdamW on the movement scores (hard, soft, mixed), as in Sanh et al.
    warmup_frac: float = 0.1  # cubic schedule: dense for this fraction of the steps ...
    ramp_frac: float = 0.6  # ... then reaches the final sparsity over this fraction, then holds it
    penalty: float = 0.0  # soft movement: final lambda of the L1 penalty (ramped with the schedule)
    alpha: float = 0.5  # mixed: weight of the magnitude term
    seed: int = 0  # fixes the order of the training batches

    def schedule(self, step: int, final_sparsity: float) -> float:
        """The sparsity at `step`: cubic (Zhu & Gupta) after warm-up, the same for every method.

        >>> cfg = FinePruneConfig(steps=100)
        >>> [round(cfg.schedule(t, 0.9), 4) for t in (0, 10, 40, 70, 100)]
        [0.0, 0.0, 0.7875, 0.9, 0.9]
        """
        from ..schedules import cubic_sparsity

        return cubic_sparsity(step, final_sparsity, t0=int(self.warmup_frac * self.steps),
                              n=max(1, int(self.ramp_frac * self.steps)))

    def penalty_at(self, step: int) -> float:
        """Soft movement's lambda at `step`: `penalty` times the schedule's progress (0 -> 1)."""
        return self.penalty * self.schedule(step, 0.5) / 0.5


@dataclass
class FinePruneResult:
    method: str
    target_sparsity: float | None
    sparsity: float  # achieved, over the wrapped layers
    accuracy: float  # test accuracy, measured once at the end
    penalty: float | None = None  # soft movement's final lambda
    val_accuracy: float | None = None  # at the end, when the task has a validation split
    losses: list[float] = field(default_factory=list)
    sparsity_trace: list[float] = field(default_factory=list)  # achieved sparsity every few steps
    trace_steps: list[int] = field(default_factory=list)
    val_trace: list[float] = field(default_factory=list)  # validation accuracy at val_steps
    val_steps: list[int] = field(default_factory=list)


def _classifier_logits(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=attn)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset, batch_size: int = 64) -> float:
    """Accuracy of a (input_ids, attention_mask) -> logits classifier on a TensorDataset."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for ids, attn, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        logits = _classifier_logits(model, ids.to(device), attn.to(device))  # (B, classes)
        correct += int((logits.argmax(-1).cpu() == y).sum())
    return correct / len(dataset)


def _check_method(model: nn.Module, method: str | None, config) -> dict[str, MaskedLinear]:
    if method is not None and method not in METHODS:
        raise ValueError(f"method must be None (dense) or one of {METHODS}, got {method!r}")
    layers = masked_layers(model)
    if method is not None and not layers:
        raise ValueError("model has no MaskedLinear layers; call wrap_linears(model, method) first")
    if method is not None and any(layer.method != method for layer in layers.values()):
        raise ValueError(f"method={method!r} but the model's MaskedLinear layers use {sorted({l.method for l in layers.values()})}")
    if method == "soft" and not config.penalty > 0:
        raise ValueError(f"soft movement needs config.penalty > 0 (its L1 penalty), got {config.penalty}")
    if method == "mixed":
        for layer in layers.values():
            layer.alpha = _check_alpha(config.alpha)
    return layers


def _optimizer(model: nn.Module, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW without weight decay; wrapped in `MaskedOptimizer` when the model holds earlier masks."""
    from ..masks import MaskedOptimizer, masks_of

    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    return MaskedOptimizer(optimizer, model) if masks_of(model) else optimizer


def fine_prune(model: nn.Module, task: DocstringTask, method: str | None, final_sparsity: float = 0.0,
               config: FinePruneConfig = FinePruneConfig(), trace_every: int = 10,
               eval_every: int | None = None) -> FinePruneResult:
    """Fine-tune `model` on `task` while pruning its wrapped layers; `method=None` fine-tunes dense.

    Every method follows the same schedule, s_t = `config.schedule(t,
    final_sparsity)` (cubic, after a dense warm-up), set before every step
    with `set_sparsity`: top-k methods per layer, soft movement through one
    global cut on its scores, so all four reach the target exactly and differ
    only in their scores. Soft movement also adds lambda_t *
    `soft_penalty(scores)` to the loss, lambda_t = `config.penalty_at(t)`.
    `eval_every` records validation accuracy along the way (needs
    `task.val`). The model is left wrapped (call `finalize` afterwards) and
    in eval mode.
    """
    final = check_sparsity(final_sparsity, "final_sparsity")
    layers = _check_method(model, method, config)
    if eval_every is not None and task.val is None:
        raise ValueError("eval_every needs a task with a validation split (docstring_task(..., val_per_class=...))")
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(task.train, batch_size=config.batch_size, shuffle=True, generator=generator, drop_last=True)
    scores = [layer.scores for layer in layers.values() if layer.scores is not None]
    score_ids = {id(s) for s in scores}
    head, body = [], []
    for name, p in model.named_parameters():
        if id(p) in score_ids or not p.requires_grad:
            continue
        (head if name.startswith(("classifier", "bert.pooler")) else body).append(p)
    optimizer = _optimizer(model, [{"params": body, "lr": config.lr}, {"params": head, "lr": config.head_lr},
                                   {"params": scores, "lr": config.score_lr, "weight_decay": 0.0}])
    result = FinePruneResult(method or "dense", final if method is not None else None, 0.0, 0.0,
                             penalty=config.penalty if method == "soft" else None)
    device = next(model.parameters()).device
    step = 0
    while step < config.steps:
        for ids, attn, y in loader:
            ids, attn, y = ids.to(device), attn.to(device), y.to(device)
            model.train()
            if method is not None:
                set_sparsity(model, config.schedule(step, final))
            loss = F.cross_entropy(_classifier_logits(model, ids, attn), y)
            result.losses.append(loss.item())
            if method == "soft":
                loss = loss + config.penalty_at(step) * soft_penalty(scores)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if method is not None and (step % trace_every == 0 or step == config.steps):
                result.trace_steps.append(step)
                result.sparsity_trace.append(masked_sparsity(model))
            if eval_every is not None and (step % eval_every == 0 or step == config.steps):
                if method is not None:
                    set_sparsity(model, config.schedule(step, final))
                result.val_steps.append(step)
                result.val_trace.append(evaluate_classifier(model, task.val))
            if step >= config.steps:
                break
    if method is not None:
        set_sparsity(model, config.schedule(step, final))  # soft: the cut for the final scores
    model.eval()
    result.sparsity = masked_sparsity(model) if layers else 0.0
    if task.val is not None:
        result.val_accuracy = result.val_trace[-1] if result.val_steps[-1:] == [step] else evaluate_classifier(model, task.val)
    result.accuracy = evaluate_classifier(model, task.test)
    return result


# ---------------------------------------------------------------------------
# Experiment 3 at full size: every method x sparsity x seed, with a resumable log
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GridSettings:
    """Everything that defines the Experiment 3 grid (`run_grid`); the recorded JSON stores it."""

    layers: int = 6  # all of MiniLM's pretrained blocks
    max_length: int = 16  # tokens per docstring (32 doubles the cost; see the notebook for what 16 reaches)
    max_per_class: int = 120  # 9 balanced classes
    test_per_class: int = 30  # 270 test docstrings, reported once
    val_per_class: int = 20  # 180 validation docstrings, for every choice
    steps: int = 150  # optimizer steps per run (batch 16: about 3.8 epochs of 630 docstrings)
    batch_size: int = 16
    lr: float = 1e-4
    head_lr: float = 1e-3
    score_lr: float = 1e-2
    warmup_frac: float = 0.1
    ramp_frac: float = 0.6
    alpha: float = 0.5  # mixed: weight of the magnitude term
    sparsities: tuple[float, ...] = (0.5, 0.9, 0.97)
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    penalties: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)  # soft movement's lambda: candidates, chosen on validation
    penalty_sparsity: float = 0.97  # ... at this sparsity, with the first seed
    dense_long_steps: int = 200  # one longer dense run (first seed) shows where the plateau is; 0 skips it
    eval_every: int = 25  # validation accuracy along the dense runs

    def config(self, seed: int, penalty: float = 0.0, steps: int | None = None) -> FinePruneConfig:
        return FinePruneConfig(steps=steps or self.steps, batch_size=self.batch_size, lr=self.lr, head_lr=self.head_lr,
                               score_lr=self.score_lr, warmup_frac=self.warmup_frac, ramp_frac=self.ramp_frac,
                               penalty=penalty, alpha=self.alpha, seed=seed)

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _run_key(method: str | None, sparsity: float, seed: int, penalty: float, steps: int) -> str:
    return f"{method or 'dense'}|{sparsity:g}|{seed}|{penalty:g}|{steps}"


def run_one(task: DocstringTask, settings: GridSettings, method: str | None, sparsity: float, seed: int,
            penalty: float = 0.0, steps: int | None = None, eval_every: int | None = None, device=None,
            score_init: float | str | None = None) -> dict:
    """One fine-pruning run of the grid from fresh pretrained weights; a JSON-ready record.

    `device` defaults to `chapter11.train.default_device()`; `score_init`
    goes to `MaskedLinear` (None: its default).
    """
    import time

    from ..train import default_device

    model = minilm_classifier(len(task.class_names), layers=settings.layers, seed=seed).to(device or default_device())
    if method is not None:
        wrap_linears(model, method, **({} if score_init is None or method == "magnitude" else {"score_init": score_init}))
    config = settings.config(seed, penalty if method == "soft" else 0.0, steps)
    wall, cpu = time.perf_counter(), time.process_time()
    r = fine_prune(model, task, method, sparsity if method is not None else 0.0, config, eval_every=eval_every)
    return {
        "key": _run_key(method, sparsity if method is not None else 0.0, seed, config.penalty, config.steps),
        "method": r.method, "target": sparsity if method is not None else 0.0, "seed": seed, "steps": config.steps,
        "penalty": config.penalty, "sparsity": r.sparsity, "val": r.val_accuracy, "test": r.accuracy,
        "final_loss": sum(r.losses[-10:]) / len(r.losses[-10:]),
        "val_steps": r.val_steps, "val_trace": r.val_trace,
        "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
    }


def run_grid(settings: GridSettings = GridSettings(), log_path=None, progress=print, worker: int = 0,
             workers: int = 1, poll_s: float = 30.0) -> dict:
    """Run Experiment 3's grid; returns {"penalty", "penalty_search", "dense_long", "runs"}.

    Order: the long dense run, soft movement's lambda search on validation
    (first seed, `penalty_sparsity`), then seed by seed the dense reference
    and every method x sparsity with the chosen lambda. Each finished run is
    appended to `log_path` (JSON lines) and skipped when the same run is
    found there, so an interrupted grid resumes where it stopped.

    `workers > 1` splits the runs between that many processes started with
    `worker = 0 .. workers - 1` and the same `log_path`: each runs every
    `workers`-th run and logs to `<stem>.w<worker>.jsonl`; soft movement
    waits (polling every `poll_s` seconds) until the lambda search is
    complete. A last call with `workers=1` finds everything done and
    assembles the result.
    """
    import time

    from ..models import load_minilm

    def logged() -> dict[str, dict]:  # every run any worker has logged so far, by key
        return {rec["key"]: rec for rec in read_logs(log_path)} if log_path is not None else {}

    own_log = worker_log(log_path, worker, workers)
    done = logged()
    _, tokenizer = load_minilm()
    task = docstring_task(tokenizer, max_length=settings.max_length, max_per_class=settings.max_per_class,
                          test_per_class=settings.test_per_class, val_per_class=settings.val_per_class)
    first = settings.seeds[0]
    # every run of the grid, in order; soft runs other than the lambda search wait for the chosen lambda
    plan: list[tuple] = []
    if settings.dense_long_steps:
        plan.append(("dense_long", None, 0.0, first, 0.0, settings.dense_long_steps, settings.eval_every))
    if "soft" in settings.methods:
        plan += [("search", "soft", settings.penalty_sparsity, first, lam, None, None) for lam in settings.penalties]
    for seed in settings.seeds:
        plan.append(("run", None, 0.0, seed, 0.0, None, settings.eval_every))
        for sparsity in sorted(settings.sparsities, reverse=True):
            plan += [("run", method, sparsity, seed, None, None, None) for method in settings.methods]

    def key(method, sparsity, seed, penalty, steps):
        return _run_key(method, sparsity if method is not None else 0.0, seed, penalty if method == "soft" else 0.0,
                        steps or settings.steps)

    def chosen_penalty(wait: bool):
        while True:
            found = {**logged(), **done}
            search = [found.get(key("soft", settings.penalty_sparsity, first, lam, None)) for lam in settings.penalties]
            if all(search):
                return max(search, key=lambda r: (r["val"], -r["penalty"]))["penalty"], search  # ties: smaller lambda
            if not wait:
                raise RuntimeError("the lambda search is not finished")
            time.sleep(poll_s)

    for index, (kind, method, sparsity, seed, penalty, steps, eval_every) in enumerate(plan):
        if index % workers != worker:
            continue
        if penalty is None:
            penalty = chosen_penalty(wait=True)[0] if method == "soft" else 0.0
        k = key(method, sparsity, seed, penalty, steps)
        if k not in done:
            done.update(logged())  # another worker may have run it meanwhile (the lambda search's grid cell)
        if k in done:
            continue
        rec = run_one(task, settings, method, sparsity, seed, penalty, steps, eval_every)
        done[k] = rec
        if own_log is not None:
            append_jsonl(own_log, rec)
        if progress:
            progress(f"{k}: sparsity {rec['sparsity']:.4f} val {rec['val']:.3f} test {rec['test']:.3f} "
                     f"({rec['wall_s']:.0f} s wall, {rec['cpu_s']:.0f} s CPU)")
    if workers > 1:
        return {}
    out = {"dense_long": None, "penalty_search": [], "runs": [], "penalty": None}
    if "soft" in settings.methods:
        out["penalty"], out["penalty_search"] = chosen_penalty(wait=False)
    for kind, method, sparsity, seed, penalty, steps, _ in plan:
        if kind == "search":
            continue
        if penalty is None:
            penalty = out["penalty"] if method == "soft" else 0.0
        rec = done[key(method, sparsity, seed, penalty, steps)]
        if kind == "dense_long":
            out["dense_long"] = rec
        else:
            out["runs"].append(rec)
    return out


def grid_summaries(runs: Sequence[dict], metric: str = "test") -> dict[str, dict[float, object]]:
    """{method: {target sparsity: chapter11.stats.Summary of `metric` over seeds}} from `run_grid`'s runs.

    >>> rs = [{"method": "hard", "target": 0.9, "test": v} for v in (0.5, 0.6, 0.7)]
    >>> f"{grid_summaries(rs)['hard'][0.9]:.2f}"
    '0.60 ± 0.10'
    """
    from ..stats import summarize

    values: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        values.setdefault(r["method"], {}).setdefault(float(r["target"]), []).append(float(r[metric]))
    return {m: {s: summarize(v) for s, v in sorted(by.items())} for m, by in values.items()}


FULL_RUN_NAME = "03_movement_vs_magnitude"


def grid_log_path(settings: GridSettings = GridSettings()):
    """build/03_movement_vs_magnitude.<hash of the settings>.runs.jsonl: one log per setting, never mixed."""
    import hashlib
    import json

    from ..report import FULL_RUNS

    digest = hashlib.sha1(json.dumps(settings.as_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return FULL_RUNS.parent.parent / "build" / f"{FULL_RUN_NAME}.{digest}.runs.jsonl"


def full_run(settings: GridSettings | None = None, command: str = "python -m chapter11.experiments.exp03_movement", log_path=None) -> dict:
    """Run the whole grid and record it with `chapter11.report.save_full_run` (benchmarks/full/03_movement_vs_magnitude.json).

    `settings` defaults to `chosen_grid()`: the regime the recorded ablation
    chose on validation. The recorded `seconds` cover only this call;
    `wall_s_all_runs` and `cpu_s_all_runs` add up every run, also those
    found in the log.
    """
    import time

    from ..report import load_full_run, save_full_run

    if settings is None:
        settings = chosen_grid()
    if log_path is None:
        log_path = grid_log_path(settings)
    start = time.perf_counter()
    results = run_grid(settings, log_path=log_path)
    cpu = sum(r["cpu_s"] for r in [results["dense_long"], *results["penalty_search"], *results["runs"]] if r)
    results["cpu_s_all_runs"] = round(cpu, 1)
    results["wall_s_all_runs"] = round(sum(r["wall_s"] for r in [results["dense_long"], *results["penalty_search"], *results["runs"]] if r), 1)
    save_full_run(FULL_RUN_NAME, results, settings.as_dict(), command, time.perf_counter() - start)
    return load_full_run(FULL_RUN_NAME)



MORE_SEEDS_NAME = "03_more_seeds_97"


def more_seeds_settings() -> GridSettings:
    """The short regime's settings (`GridSettings()`, 150 steps) for three more seeds (3, 4, 5), at 97% only,
    magnitude and soft movement.

    Soft movement's lambda is fixed at 1, the value the 150-step grid chose
    on validation before the grid moved to the regime of `chosen_grid()`
    (its only candidate here, so the "search" is the seed-3 run).
    """
    return GridSettings(seeds=(3, 4, 5), sparsities=(0.97,), methods=("magnitude", "soft"), penalties=(1.0,),
                        dense_long_steps=0)


def more_seeds_run(worker: int = 0, workers: int = 1,
                   command: str = "python -m chapter11.experiments.exp03_movement more-seeds") -> dict | None:
    """Run `more_seeds_settings()` (resumable log under build/); the last call (workers=1) records
    benchmarks/full/03_more_seeds_97.json. Does soft movement's lead at 97% survive three more seeds?"""
    import time

    from ..report import load_full_run, save_full_run

    settings = more_seeds_settings()
    start = time.perf_counter()
    results = run_grid(settings, log_path=grid_log_path(settings), worker=worker, workers=workers)
    if workers > 1:
        return None
    results["cpu_s_all_runs"] = round(sum(r["cpu_s"] for r in [*results["penalty_search"], *results["runs"]]), 1)
    save_full_run(MORE_SEEDS_NAME, results, settings.as_dict(), command, time.perf_counter() - start)
    return load_full_run(MORE_SEEDS_NAME)


# ---------------------------------------------------------------------------
# Why movement collapses at 90%: one factor at a time
# ---------------------------------------------------------------------------

ABLATION_NAME = "03_movement_ablation"
ABLATION_SPARSITY = 0.9
ABLATION_METHODS = ("magnitude", "hard")
ABLATION_SEEDS = (0, 1, 2)


def ablation_variants(base: GridSettings = GridSettings()) -> dict[str, dict]:
    """The grid's regime and five changes to it, one factor each: {name: changes}.

    Warm-up moves the first cut later; the ramp shrinks with it, so that
    every variant holds the final sparsity for the same last fraction of
    its steps (recovery time is not a second factor). "450 steps" triples
    the run and keeps the fractions. `score_init` and `score_lr` act only on
    the learned scores, so magnitude pruning is the same run as the
    baseline there and is not repeated.

    >>> v = ablation_variants()
    >>> list(v)
    ['baseline', 'warm-up 30%', 'warm-up 50%', '450 steps', 'scores start at |W|', 'score lr 1e-3']
    >>> v["warm-up 50%"]
    {'warmup_frac': 0.5, 'ramp_frac': 0.2}
    """
    hold = round(1.0 - base.warmup_frac - base.ramp_frac, 6)
    return {
        "baseline": {},
        "warm-up 30%": {"warmup_frac": 0.3, "ramp_frac": round(1.0 - 0.3 - hold, 6)},
        "warm-up 50%": {"warmup_frac": 0.5, "ramp_frac": round(1.0 - 0.5 - hold, 6)},
        "450 steps": {"steps": 3 * base.steps},
        "scores start at |W|": {"score_init": "magnitude"},
        "score lr 1e-3": {"score_lr": 1e-3},
    }


SCORE_ONLY = ("score_init", "score_lr")  # changes that leave magnitude pruning untouched


def ablation_plan(methods: Sequence[str] = ABLATION_METHODS, seeds: Sequence[int] = ABLATION_SEEDS) -> list[tuple[str, str, int]]:
    """Every (variant, method, seed) the ablation runs, in order; magnitude only where a variant changes it.

    >>> len(ablation_plan()), len(ablation_plan(methods=("hard",)))
    (30, 18)
    """
    plan = []
    for name, changes in ablation_variants().items():
        for method in methods:
            if method == "magnitude" and changes and set(changes) <= set(SCORE_ONLY):
                continue
            plan += [(name, method, seed) for seed in seeds]
    return plan


def ablation_run(worker: int = 0, workers: int = 1, methods: Sequence[str] = ABLATION_METHODS, seeds: Sequence[int] = ABLATION_SEEDS,
                 command: str = "python -m chapter11.experiments.exp03_movement ablation", progress=print) -> dict | None:
    """Run `ablation_plan` at `ABLATION_SPARSITY` (resumable log under build/); the last call (workers=1)
    records benchmarks/full/03_movement_ablation.json with every run's validation and test accuracy.

    `workers > 1`: process `worker` runs every `workers`-th run of the plan
    into its own log; a final call with `workers=1` finds them and records.
    """
    import dataclasses
    import hashlib
    import json
    import time

    from ..models import load_minilm
    from ..report import FULL_RUNS, load_full_run, save_full_run

    base = GridSettings()
    variants = ablation_variants(base)
    settings = {"grid": base.as_dict(), "sparsity": ABLATION_SPARSITY, "variants": variants, "methods": list(methods), "seeds": list(seeds)}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]  # one log per setting, never mixed
    log_path = FULL_RUNS.parent.parent / "build" / f"{ABLATION_NAME}.{digest}.runs.jsonl"
    own_log = worker_log(log_path, worker, workers)
    done = {(r["variant"], r["method"], r["seed"]): r for r in read_logs(log_path)}
    plan = ablation_plan(methods, seeds)
    _, tokenizer = load_minilm()
    task = docstring_task(tokenizer, max_length=base.max_length, max_per_class=base.max_per_class,
                          test_per_class=base.test_per_class, val_per_class=base.val_per_class)
    start = time.perf_counter()
    for index, (name, method, seed) in enumerate(plan):
        if index % workers != worker or (name, method, seed) in done:
            continue
        changes = dict(variants[name])
        score_init = changes.pop("score_init", None)
        settings = dataclasses.replace(base, **changes)
        rec = run_one(task, settings, method, ABLATION_SPARSITY, seed, score_init=score_init)
        rec.update(variant=name, key=f"{name}|{rec['key']}", torch_threads=torch.get_num_threads())
        done[name, method, seed] = rec
        append_jsonl(own_log, rec)
        if progress:
            progress(f"{name:20s} {method:9s} seed {seed}: sparsity {rec['sparsity']:.4f} val {rec['val']:.3f} test {rec['test']:.3f} "
                     f"({rec['wall_s']:.0f} s wall)")
    if workers > 1:
        return None
    missing = [p for p in plan if p not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} runs of the ablation are not in the logs yet, e.g. {missing[0]}")
    runs = [done[p] for p in plan]
    results = {"runs": runs, "cpu_s_all_runs": round(sum(r["cpu_s"] for r in runs), 1)}
    save_full_run(ABLATION_NAME, results, settings, command, time.perf_counter() - start)
    return load_full_run(ABLATION_NAME)


def chosen_grid(ablation: dict | None = None, method: str = "hard") -> GridSettings:
    """The grid's settings in the regime the ablation chose on validation.

    The chosen variant is the one whose mean validation accuracy of `method`
    at `ABLATION_SPARSITY` is highest (ties go to the grid's own regime);
    its changes are applied to `GridSettings()`, and a longer run also
    lengthens the dense plateau check (`dense_long_steps`) in proportion.
    `ablation` is the ablation's record (loaded from benchmarks/full/ when None).

    >>> runs = [{"variant": v, "method": "hard", "seed": 0, "val": a} for v, a in (("baseline", 0.11), ("450 steps", 0.54))]
    >>> rec = {"results": {"runs": runs}, "settings": {"grid": GridSettings().as_dict(), "variants": {"baseline": {}, "450 steps": {"steps": 450}}}}
    >>> g = chosen_grid(rec)
    >>> g.steps, g.dense_long_steps, g.warmup_frac
    (450, 600, 0.1)
    """
    import dataclasses

    from ..report import load_full_run

    ablation = ablation if ablation is not None else load_full_run(ABLATION_NAME)
    base = GridSettings()
    if ablation["settings"]["grid"] != base.as_dict():
        raise ValueError("the ablation record was made with other grid settings than GridSettings(); record it again")
    name = chosen_variant(ablation, method)
    changes = dict(ablation["settings"]["variants"][name])
    unknown = set(changes) - {f.name for f in dataclasses.fields(GridSettings)}
    if unknown:
        raise ValueError(f"the chosen variant {name!r} changes {sorted(unknown)}, which the grid's settings do not hold")
    if "steps" in changes:
        changes["dense_long_steps"] = round(base.dense_long_steps * changes["steps"] / base.steps)
    return dataclasses.replace(base, **changes)


def chosen_variant(ablation: dict | None = None, method: str = "hard") -> str:
    """The ablation's variant with the best mean validation accuracy of `method` (ties go to "baseline").

    `ablation` is the ablation's record (loaded from benchmarks/full/ when None).

    >>> runs = [{"variant": v, "method": m, "seed": 0, "val": a} for v, m, a in
    ...         (("baseline", "hard", 0.11), ("450 steps", "hard", 0.54), ("baseline", "magnitude", 0.7), ("450 steps", "magnitude", 0.6))]
    >>> rec = {"results": {"runs": runs}, "settings": {"variants": {"baseline": {}, "450 steps": {"steps": 450}}}}
    >>> chosen_variant(rec), chosen_variant(rec, "magnitude")
    ('450 steps', 'baseline')
    """
    from ..report import load_full_run

    table = ablation_table(ablation if ablation is not None else load_full_run(ABLATION_NAME))
    if any(method not in row for row in table.values()):
        raise ValueError(f"method={method!r}: not run under every variant of the ablation")
    return max(table, key=lambda v: (table[v][method].mean, v == "baseline"))


def ablation_table(record: dict, metric: str = "val") -> dict[str, dict[str, object]]:
    """{variant: {method: Summary of `metric` over seeds}} from the ablation record; magnitude
    appears under every variant (the baseline's runs where the variant changes only the scores).

    >>> runs = [{"variant": "baseline", "method": m, "seed": s, "val": v} for m, vals in (("magnitude", (0.6, 0.7)), ("hard", (0.1, 0.2)))
    ...         for s, v in enumerate(vals)] + [{"variant": "score lr 1e-3", "method": "hard", "seed": s, "val": v} for s, v in enumerate((0.3, 0.5))]
    >>> t = ablation_table({"results": {"runs": runs}, "settings": {"variants": {"baseline": {}, "score lr 1e-3": {"score_lr": 0.001}}}})
    >>> f"{t['score lr 1e-3']['hard']:.2f}", f"{t['score lr 1e-3']['magnitude']:.2f}"
    ('0.40 ± 0.14', '0.65 ± 0.07')
    """
    from ..stats import summarize

    values: dict[str, dict[str, list[float]]] = {}
    for r in record["results"]["runs"]:
        values.setdefault(r["variant"], {}).setdefault(r["method"], []).append(float(r[metric]))
    table = {}
    for name, changes in record["settings"]["variants"].items():
        row = {m: summarize(v) for m, v in values.get(name, {}).items()}
        if "magnitude" not in row and "magnitude" in values.get("baseline", {}) and set(changes) <= set(SCORE_ONLY):
            row = {"magnitude": summarize(values["baseline"]["magnitude"]), **row}
        table[name] = row
    return table


# ---------------------------------------------------------------------------
# Why movement breaks the network where pruning starts: the first cut, scored four ways
# ---------------------------------------------------------------------------


@torch.no_grad()
def _val_loss_accuracy(model: nn.Module, dataset) -> tuple[float, float]:
    model.eval()
    device = next(model.parameters()).device
    ids, attn, y = (t.to(device) for t in dataset.tensors)
    logits = _classifier_logits(model, ids, attn)  # (N, classes)
    return F.cross_entropy(logits, y).item(), float((logits.argmax(-1) == y).float().mean())


def first_cut(task: DocstringTask, settings: GridSettings, seed: int = 0, warmup_steps: int | None = None,
              sparsities: Sequence[float] = (0.01, 0.03, 0.1)) -> dict:
    """Validation loss and accuracy after the first cut, with the weights chosen four ways.

    Fine-tunes a hard-movement model for the schedule's warm-up (nothing
    pruned yet; scores learn as in `fine_prune`) while also summing Sanh et
    al.'s eq. 4 exactly, S = -sum_t G * W. Then, with no further training,
    prunes each layer to each sparsity by: the learned scores ("movement"),
    the exact sums ("movement_eq4"), |W| ("magnitude") and a random order
    ("random"). Returns {"dense": (loss, acc), "movement": {s: (loss, acc)}, ...,
    "removed_abs_w": {kind: {s: mean |W| of the removed weights / mean |W| of all}}}.
    """
    config = settings.config(seed)
    steps = int(config.warmup_frac * config.steps) if warmup_steps is None else warmup_steps
    model = minilm_classifier(len(task.class_names), layers=settings.layers, seed=seed)
    wrap_linears(model, "hard")
    layers = masked_layers(model)
    scores = [layer.scores for layer in layers.values()]
    score_ids = {id(s) for s in scores}
    head, body = [], []
    for name, p in model.named_parameters():
        if id(p) not in score_ids and p.requires_grad:
            (head if name.startswith(("classifier", "bert.pooler")) else body).append(p)
    optimizer = _optimizer(model, [{"params": body, "lr": config.lr}, {"params": head, "lr": config.head_lr},
                                   {"params": scores, "lr": config.score_lr}])
    loader = torch.utils.data.DataLoader(task.train, batch_size=config.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed), drop_last=True)
    eq4 = {name: torch.zeros_like(layer.weight) for name, layer in layers.items()}
    set_sparsity(model, 0.0)
    step = 0
    while step < steps:
        for ids, attn, y in loader:
            model.train()
            loss = F.cross_entropy(_classifier_logits(model, ids, attn), y)
            optimizer.zero_grad()
            loss.backward()
            for name, layer in layers.items():
                eq4[name] -= layer.weight.grad * layer.weight.detach()  # S = -sum_t G * W
            optimizer.step()
            step += 1
            if step >= steps:
                break
    learned = {name: layer.scores.detach().clone() for name, layer in layers.items()}
    g = torch.Generator().manual_seed(seed)
    orders = {"movement": learned, "movement_eq4": eq4,
              "magnitude": {name: layer.weight.detach().abs() for name, layer in layers.items()},
              "random": {name: torch.rand(layer.weight.shape, generator=g) for name, layer in layers.items()}}
    out = {"steps": steps, "dense": _val_loss_accuracy(model, task.val), "removed_abs_w": {}}
    mean_abs = (sum(float(layer.weight.detach().abs().sum()) for layer in layers.values())
                / sum(layer.weight.numel() for layer in layers.values()))
    for kind, ranking in orders.items():
        out[kind], out["removed_abs_w"][kind] = {}, {}
        for name, layer in layers.items():
            layer.scores.data.copy_(ranking[name])
        for s in sparsities:
            set_sparsity(model, s)
            out[kind][s] = _val_loss_accuracy(model, task.val)
            removed = [(layer.weight.detach().abs() * (1 - layer.mask())).sum() for layer in layers.values()]
            count = sum(int((layer.mask() == 0).sum()) for layer in layers.values())
            out["removed_abs_w"][kind][s] = float(sum(removed)) / max(count, 1) / mean_abs  # mean |W| removed / mean |W|
    return out


FIRST_CUT_NAME = "03_first_cut"


def first_cut_run(settings: GridSettings = GridSettings(), command: str = "python -m chapter11.experiments.exp03_movement first-cut",
                  sparsities: Sequence[float] = (0.01, 0.03, 0.1)) -> dict:
    """`first_cut` for every seed of `settings`, recorded in benchmarks/full/03_first_cut.json."""
    import time

    from ..models import load_minilm
    from ..report import load_full_run, save_full_run

    start = time.perf_counter()
    _, tokenizer = load_minilm()
    task = docstring_task(tokenizer, max_length=settings.max_length, max_per_class=settings.max_per_class,
                          test_per_class=settings.test_per_class, val_per_class=settings.val_per_class)
    results = {}
    for seed in settings.seeds:
        r = first_cut(task, settings, seed, sparsities=sparsities)
        removed = r.pop("removed_abs_w")
        results[str(seed)] = {k: ({str(s): list(v) for s, v in r[k].items()} if isinstance(r[k], dict) else r[k]) for k in r}
        results[str(seed)]["removed_abs_w"] = {k: {str(s): v for s, v in by.items()} for k, by in removed.items()}
    save_full_run(FIRST_CUT_NAME, results, {**settings.as_dict(), "first_cut_sparsities": list(sparsities)}, command,
                  time.perf_counter() - start)
    return load_full_run(FIRST_CUT_NAME)


# ---------------------------------------------------------------------------
# Movement pruning during domain adaptation of an LLM: frozen lower blocks, cached
# ---------------------------------------------------------------------------


SOURCE_PARTS = ("adapt", "heldout")


def stdlib_source_files(part: str) -> dict[str, str]:
    """{file name: source} of the standard library's top-level modules, split by file into two halves.

    Files `<stdlib>/*.py` sorted by name; even positions form `"adapt"`, odd
    positions `"heldout"`, so no file is in both. Packages (folders, which
    hold `pydoc_data`'s help topics) are left out. On Python 3.11 that is 84
    files in each half.

    >>> list(stdlib_source_files("adapt"))[:2], list(stdlib_source_files("heldout"))[:2]
    (['__future__.py', '_aix_support.py'], ['__hello__.py', '_bootsubprocess.py'])
    """
    import sysconfig

    if part not in SOURCE_PARTS:
        raise ValueError(f"part must be one of {SOURCE_PARTS}, got {part!r}")
    from pathlib import Path

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    chosen = files[SOURCE_PARTS.index(part)::2]
    return {p.name: p.read_text(encoding="utf-8", errors="replace") for p in chosen}


def stdlib_source(part: str, max_chars: int | None = None) -> str:
    """`stdlib_source_files(part)` joined by blank lines; `max_chars` keeps the first that many characters.

    >>> stdlib_source("adapt", max_chars=29)[3:]
    'Record of phased-in incomp'
    """
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be None or a positive int, got {max_chars!r}")
    text = "\n\n".join(stdlib_source_files(part).values())
    return text if max_chars is None else text[:max_chars]


def spread_windows(tokenizer, texts: Sequence[str], n: int, block_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` windows (x, y) of `block_size` tokens spread over many texts: one per text, round robin, seeded.

    Texts are shuffled (seeded), those shorter than 8 * block_size characters
    skipped; window i comes from text i mod (number of texts), at a seeded
    random character offset. Spreading windows over files measures how well
    a model does on Python in general, not on one file.
    """
    from ..data import text_tokens

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    span = 8 * block_size  # characters read per window: code runs about 3 characters per token
    usable = [t for t in texts if len(t) >= span]
    if not usable:
        raise ValueError(f"texts: none has the {span} characters a window of {block_size} tokens needs")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(usable), generator=g).tolist()
    rows = []
    for i in range(n):
        text = usable[order[i % len(usable)]]
        start = int(torch.randint(0, len(text) - span + 1, (1,), generator=g))
        ids = text_tokens(tokenizer, text[start:start + span])  # (m,)
        if len(ids) < block_size + 1:
            raise ValueError(f"a window of {span} characters gave {len(ids)} tokens, fewer than block_size + 1 = {block_size + 1}")
        rows.append(ids[: block_size + 1])
    windows = torch.stack(rows)  # (n, T + 1)
    return windows[:, :-1], windows[:, 1:]


def lm_windows(tokens: torch.Tensor, block_size: int, max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive windows (x, y) of a 1-D token tensor, y = x shifted by one, as `chapter11.train.perplexity` cuts them.

    >>> x, y = lm_windows(torch.arange(10), 4)
    >>> x.tolist(), y.tolist()
    ([[0, 1, 2, 3], [4, 5, 6, 7]], [[1, 2, 3, 4], [5, 6, 7, 8]])
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor, got {type(tokens).__name__}")
    n = (len(tokens) - 1) // block_size
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"tokens: need more than block_size + 1 = {block_size + 1} tokens, got {len(tokens)}")
    x = tokens[: n * block_size].view(n, block_size)  # (n, T)
    y = tokens[1 : n * block_size + 1].view(n, block_size)  # (n, T)
    return x, y


def _decoder(model: nn.Module):
    base = getattr(model, "model", None)
    if base is None or not isinstance(getattr(base, "layers", None), nn.ModuleList) or not hasattr(base, "rotary_emb"):
        raise TypeError(f"model must be a LLaMA-style causal LM (model.model.layers, model.model.rotary_emb), got {type(model).__name__}")
    return base


def _run_blocks(layers: Iterable[nn.Module], h: torch.Tensor, rotary: nn.Module) -> torch.Tensor:
    """Run decoder blocks on hidden states h (B, T, H) with causal attention, as LlamaModel does."""
    B, T, _ = h.shape
    position_ids = torch.arange(T, device=h.device).unsqueeze(0)  # (1, T)
    cos_sin = rotary(h, position_ids)  # ((1, T, head_dim), (1, T, head_dim))
    causal = torch.full((T, T), torch.finfo(h.dtype).min, device=h.device, dtype=h.dtype).triu(1)  # (T, T)
    mask = causal[None, None]  # (1, 1, T, T): 0 on and below the diagonal
    for layer in layers:
        out = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=cos_sin)
        h = out[0] if isinstance(out, tuple) else out  # (B, T, H)
    return h


@torch.no_grad()
def lower_hidden(model: nn.Module, ids: torch.Tensor, first_trainable: int, batch_size: int = 8) -> torch.Tensor:
    """Hidden states after the frozen blocks 0 .. first_trainable - 1: (N, T, hidden), computed once.

    Adapting only the blocks above them, these are the same at every step,
    so a run pays for the lower blocks once instead of at every step.
    """
    base = _decoder(model)
    if isinstance(first_trainable, bool) or not isinstance(first_trainable, int) or not 0 <= first_trainable < len(base.layers):
        raise ValueError(f"first_trainable must be an int in [0, {len(base.layers) - 1}], got {first_trainable!r}")
    model.eval()
    device = base.embed_tokens.weight.device
    out = []
    for i in range(0, len(ids), batch_size):
        h = base.embed_tokens(ids[i:i + batch_size].to(device))  # (b, T, H)
        out.append(_run_blocks(base.layers[:first_trainable], h, base.rotary_emb))
    return torch.cat(out)  # (N, T, H)


class TopBlocks(nn.Module):
    """The top blocks of a LLaMA-style LM as a model of their own: hidden states in, logits out.

    `layers` is a trainable copy of blocks first_trainable .. L-1; the final
    norm is a frozen copy; the output projection is the original model's
    (tied to the embeddings), frozen and shared, not copied.
    `TopBlocks(model, k)(lower_hidden(model, ids, k))` gives model(ids).logits.
    """

    def __init__(self, model: nn.Module, first_trainable: int):
        import copy

        super().__init__()
        base = _decoder(model)
        if isinstance(first_trainable, bool) or not isinstance(first_trainable, int) or not 0 <= first_trainable < len(base.layers):
            raise ValueError(f"first_trainable must be an int in [0, {len(base.layers) - 1}], got {first_trainable!r}")
        self.first_trainable = first_trainable
        self.layers = copy.deepcopy(base.layers[first_trainable:])
        self.norm = copy.deepcopy(base.norm).requires_grad_(False)
        self.rotary = base.rotary_emb  # buffers only
        self.register_buffer("head_weight", model.get_output_embeddings().weight.detach(), persistent=False)  # (V, H), shared

    def mlp_linear_names(self) -> list[str]:
        """The MLP projections of every block here: gate_proj, up_proj and down_proj."""
        return [f"layers.{i}.mlp.{p}" for i in range(len(self.layers)) for p in ("gate_proj", "up_proj", "down_proj")]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = _run_blocks(self.layers, h, self.rotary)  # (B, T, H)
        return F.linear(self.norm(h), self.head_weight)  # (B, T, V)


@torch.no_grad()
def hidden_perplexity(top: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token loss) of `top` on cached hidden states (N, T, H) and their targets (N, T)."""
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} must share (N, T)")
    top.eval()
    device = top.head_weight.device if hasattr(top, "head_weight") else next(top.parameters()).device
    total = 0.0
    for i in range(0, len(hidden), batch_size):
        logits = top(hidden[i:i + batch_size].to(device))  # (b, T, V)
        y = targets[i:i + batch_size].flatten().to(device)  # (b * T,)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y, reduction="sum").item()
    return math.exp(total / targets.numel())


@dataclass
class AdaptResult:
    method: str
    target_sparsity: float | None
    sparsity: float  # achieved over the pruned MLP projections
    losses: list[float] = field(default_factory=list)
    step_wall_s: list[float] = field(default_factory=list)  # per optimizer step
    step_cpu_s: list[float] = field(default_factory=list)


def adapt_top_blocks(top: TopBlocks, hidden: torch.Tensor, targets: torch.Tensor, method: str | None,
                     final_sparsity: float = 0.0, config: FinePruneConfig = FinePruneConfig()) -> AdaptResult:
    """Adapt `top` to new text with the causal-LM loss while pruning its MLP projections.

    `hidden` (N, T, H) are `lower_hidden` outputs, `targets` (N, T) the next
    tokens. Each step draws `config.batch_size` windows (seeded). The same
    schedule and optimizer settings as `fine_prune` (`config.head_lr` is not
    used); `method=None` adapts dense. `top` is wrapped in place (call
    `finalize` afterwards) and left in eval mode.
    """
    import time

    final = check_sparsity(final_sparsity, "final_sparsity")
    if method is not None and method not in METHODS:
        raise ValueError(f"method must be None (dense) or one of {METHODS}, got {method!r}")
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} must share (N, T)")
    if method is not None and not masked_layers(top):
        wrap_linears(top, method, names=top.mlp_linear_names())
    layers = _check_method(top, method, config)
    scores = [layer.scores for layer in layers.values() if layer.scores is not None]
    score_ids = {id(s) for s in scores}
    body = [p for p in top.parameters() if p.requires_grad and id(p) not in score_ids]
    optimizer = _optimizer(top, [{"params": body, "lr": config.lr}, {"params": scores, "lr": config.score_lr}])
    g = torch.Generator().manual_seed(config.seed)
    device = top.head_weight.device
    result = AdaptResult(method or "dense", final if method is not None else None, 0.0)
    for step in range(config.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        top.train()
        if method is not None:
            set_sparsity(top, config.schedule(step, final))
        idx = torch.randint(0, len(hidden), (config.batch_size,), generator=g)  # (B,)
        logits = top(hidden[idx].to(device))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets[idx].flatten().to(device))
        result.losses.append(loss.item())
        if method == "soft":
            loss = loss + config.penalty_at(step) * soft_penalty(scores)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        result.step_wall_s.append(time.perf_counter() - wall)
        result.step_cpu_s.append(time.process_time() - cpu)
    if method is not None:
        set_sparsity(top, config.schedule(config.steps, final))
    top.eval()
    result.sparsity = masked_sparsity(top) if layers else 0.0
    return result


@dataclass(frozen=True)
class LMSettings:
    """Everything that defines the LLM part of Experiment 3 (`run_lm_grid`); the recorded JSON stores it."""

    first_trainable: int = 28  # SmolLM2-135M has 30 blocks: adapt (and prune) blocks 28 and 29
    block_size: int = 64  # tokens per window
    train_windows: int = 64  # from the "adapt" half of the stdlib source, minus its validation files
    val_windows: int = 16  # from every 5th file of the "adapt" half, for every choice
    eval_windows: int = 16  # held-out source ("heldout" half) and general text, reported once
    steps: int = 60
    batch_size: int = 4
    lrs: tuple[float, ...] = (1e-4, 3e-4)  # chosen on validation, dense, first seed
    score_lr: float = 1e-2
    warmup_frac: float = 0.1
    ramp_frac: float = 0.6
    sparsities: tuple[float, ...] = (0.5, 0.8)
    methods: tuple[str, ...] = ("magnitude", "hard")
    seeds: tuple[int, ...] = (0, 1, 2)

    def config(self, seed: int, lr: float) -> FinePruneConfig:
        return FinePruneConfig(steps=self.steps, batch_size=self.batch_size, lr=lr, score_lr=self.score_lr,
                               warmup_frac=self.warmup_frac, ramp_frac=self.ramp_frac, seed=seed)

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class LMData:
    """Token windows (x, y) of each text and the frozen lower blocks' outputs for them."""

    x: dict[str, torch.Tensor]  # name -> (N, T) input ids
    y: dict[str, torch.Tensor]  # name -> (N, T) next tokens
    hidden: dict[str, torch.Tensor]  # name -> (N, T, H) after blocks 0 .. first_trainable - 1
    cache_cpu_s: float = 0.0


LM_TEXTS = ("train", "val", "python", "general")


def lm_texts() -> dict[str, list[str]]:
    """The four text sources of the LLM part, as lists of documents (files or help topics).

    - "train": `stdlib_source_files("adapt")` except every 5th file;
    - "val": every 5th file of the "adapt" half (files the adaptation never sees);
    - "python": `stdlib_source_files("heldout")`, the other half of the files;
    - "general": `chapter11.data.pydoc_topics("evaluation")`, English prose
      about Python from its help pages (not code, and in no source file).
    """
    from ..data import pydoc_topics

    adapt = list(stdlib_source_files("adapt").values())
    return {"train": [t for i, t in enumerate(adapt) if i % 5 != 4], "val": adapt[4::5],
            "python": list(stdlib_source_files("heldout").values()), "general": pydoc_topics("evaluation")}


def lm_data(model: nn.Module, tokenizer, settings: LMSettings = LMSettings()) -> LMData:
    """Windows of the four texts of `lm_texts` and their cached lower-block outputs."""
    import time

    counts = {"train": settings.train_windows, "val": settings.val_windows,
              "python": settings.eval_windows, "general": settings.eval_windows}
    x, y = {}, {}
    for i, (name, texts) in enumerate(lm_texts().items()):
        x[name], y[name] = spread_windows(tokenizer, texts, counts[name], settings.block_size, seed=i)
    cpu = time.process_time()
    hidden = {name: lower_hidden(model, x[name], settings.first_trainable) for name in LM_TEXTS}
    return LMData(x, y, hidden, time.process_time() - cpu)


def lm_perplexities(top: nn.Module, data: LMData, names: Sequence[str] = ("val", "python", "general")) -> dict[str, float]:
    return {name: hidden_perplexity(top, data.hidden[name], data.y[name]) for name in names}


def run_lm_one(model: nn.Module, data: LMData, settings: LMSettings, method: str | None, sparsity: float,
               seed: int, lr: float) -> dict:
    """Adapt a fresh copy of the top blocks (pruning their MLPs with `method`) and measure perplexities."""
    import statistics

    top = TopBlocks(model, settings.first_trainable)
    r = adapt_top_blocks(top, data.hidden["train"], data.y["train"], method, sparsity if method else 0.0,
                         settings.config(seed, lr))
    ppl = lm_perplexities(top, data)
    return {"method": r.method, "target": sparsity if method else 0.0, "seed": seed, "lr": lr, "sparsity": r.sparsity,
            "val": ppl["val"], "python": ppl["python"], "general": ppl["general"],
            "first_loss": r.losses[0], "final_loss": sum(r.losses[-5:]) / len(r.losses[-5:]),
            "step_cpu_s": statistics.median(r.step_cpu_s), "step_wall_s": statistics.median(r.step_wall_s)}


def step_times(model: nn.Module, data: LMData, settings: LMSettings, repeats: int = 3) -> dict:
    """Seconds per training step (forward + backward of a batch) with and without the cache, interleaved.

    "cached": the top blocks on stored lower-block outputs; "uncached": the
    frozen lower blocks recomputed first (what every step would cost without
    the cache). Medians from `chapter11.bench.compare`; ratio = uncached / cached.
    """
    from ..bench import compare

    top = TopBlocks(model, settings.first_trainable)
    top.train()
    device = top.head_weight.device
    ids, y = data.x["train"][: settings.batch_size], data.y["train"][: settings.batch_size].to(device)
    h = data.hidden["train"][: settings.batch_size].to(device)

    def step(hidden):
        top.zero_grad(set_to_none=True)
        F.cross_entropy(top(hidden).flatten(0, 1), y.flatten()).backward()

    timing = compare({"cached": lambda: step(h),
                      "uncached": lambda: step(lower_hidden(model, ids, settings.first_trainable))},
                     repeats=repeats, warmup=1)
    return {"cached_s": timing["median_s"]["cached"], "uncached_s": timing["median_s"]["uncached"],
            "ratio": timing["ratio"]["uncached"]}


def run_lm_grid(settings: LMSettings = LMSettings(), progress=print) -> dict:
    """The LLM part: pretrained perplexities, the learning rate chosen on validation, then every method x sparsity x seed."""
    from ..models import load_smollm
    from ..train import default_device

    model, tokenizer = load_smollm()
    model.to(default_device())
    data = lm_data(model, tokenizer, settings)
    out = {"pretrained": lm_perplexities(TopBlocks(model, settings.first_trainable), data),
           "cache_cpu_s": round(data.cache_cpu_s, 1), "windows": {k: list(v.shape) for k, v in data.x.items()}}
    out["step_times"] = step_times(model, data, settings)
    first = settings.seeds[0]
    search = []
    for lr in settings.lrs:
        search.append(run_lm_one(model, data, settings, None, 0.0, first, lr))
        if progress:
            progress(f"dense lr {lr:g}: val ppl {search[-1]['val']:.3f}")
    out["lr_search"] = search
    out["lr"] = min(search, key=lambda r: r["val"])["lr"]
    runs = []
    for seed in settings.seeds:
        for sparsity in (0.0, *settings.sparsities):
            for method in ((None,) if sparsity == 0.0 else settings.methods):
                if method is None and seed == first:
                    rec = next(r for r in search if r["lr"] == out["lr"])
                else:
                    rec = run_lm_one(model, data, settings, method, sparsity, seed, out["lr"])
                runs.append(rec)
                if progress:
                    progress(f"{rec['method']} {sparsity:g} seed {seed}: ppl python {rec['python']:.3f} general {rec['general']:.3f}")
    out["runs"] = runs
    return out


LM_FULL_RUN_NAME = "03_llm_adaptation"


def lm_full_run(settings: LMSettings = LMSettings(), command: str = "python -m chapter11.experiments.exp03_movement lm") -> dict:
    """Run the LLM grid and record it (benchmarks/full/03_llm_adaptation.json)."""
    import time

    from ..report import load_full_run, save_full_run

    start = time.perf_counter()
    results = run_lm_grid(settings)
    save_full_run(LM_FULL_RUN_NAME, results, settings.as_dict(), command, time.perf_counter() - start)
    return load_full_run(LM_FULL_RUN_NAME)


def _worker(argv: Sequence[str]) -> tuple[int, int]:
    """`worker I/N` (this driver's spelling, as in its recorded commands) or `--worker I/N`: (I, N); (0, 1) without either.

    >>> _worker(["worker", "1/2"]), _worker(["--worker", "0/2"]), _worker([])
    ((1, 2), (0, 2), (0, 1))
    """
    from . import parse_worker

    return parse_worker(["--worker", *argv[1:]] if argv[:1] == ["worker"] else argv)


if __name__ == "__main__":  # python -m chapter11.experiments.exp03_movement [lm | worker I/N]: the recorded full runs of Experiment 3
    import sys

    torch.set_num_threads(2)
    args = sys.argv[1:]
    if args == ["lm"]:
        lm_full_run()
    elif args == ["first-cut"]:
        first_cut_run()
    elif args[:1] in (["ablation"], ["more-seeds"]):  # ablation|more-seeds [worker I/N]
        i, n = _worker(args[1:])
        if n > 1 and args[0] == "ablation":
            torch.set_num_threads(1)  # one process per core; each run records its thread count
        (ablation_run if args[0] == "ablation" else more_seeds_run)(worker=i, workers=n)
    elif args[:1] == ["worker"]:  # worker I/N: one of N processes sharing the grid's log
        i, n = _worker(args)
        torch.set_num_threads(1)  # one process per core
        grid = chosen_grid()
        run_grid(grid, worker=i, workers=n, log_path=grid_log_path(grid))
    elif args:
        raise SystemExit("usage: python -m chapter11.experiments.exp03_movement [lm | first-cut | ablation [worker I/N] | more-seeds [worker I/N] | worker I/N]")
    else:
        full_run()
