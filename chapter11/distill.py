"""Knowledge distillation: a pruned student learns from its dense teacher.

Hinton et al. (2015) soften both output distributions with a temperature T
and mix the match to the teacher with the usual label loss:

    L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

The T^2 keeps the soft term's gradients on the same scale as the hard term's
when T changes. Without labels (`labels=None`) only the soft term is used,
still scaled by alpha * T^2.

- `distillation_loss_loop` / `distillation_loss`: the loss, for (N, C) logits
  or (B, T, V) language-model logits (every position is one example).
- `distill`: a recovery fine-tune of a classifier, returning a
  `chapter11.train.History`.
- `lm_distillation_loss`: the same loss shaped for
  `chapter11.train.train_lm(..., teacher=teacher, loss_fn=...)`.
- `distill_lm`: a recovery fine-tune of a pruned language model in which only
  the parts you name (e.g. the blocks that were pruned) learn, from the dense
  model's predictions on calibration text.

But: logits only (no hidden-state or attention matching as in TinyBERT or
DistilBERT's cosine loss), and the teacher is frozen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from .train import History, train, train_lm

__all__ = ["distillation_loss_loop", "distillation_loss", "lm_distillation_loss", "distill", "distill_lm"]


def _check(student_logits, teacher_logits, labels, temperature, alpha):
    if not isinstance(student_logits, torch.Tensor) or not isinstance(teacher_logits, torch.Tensor):
        raise TypeError("student_logits and teacher_logits must be tensors")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits: shape {tuple(teacher_logits.shape)} differs from student_logits {tuple(student_logits.shape)}"
        )
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits: need (N, C) or (B, T, V), got shape {tuple(student_logits.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if labels is None and alpha != 1:
        raise ValueError(f"labels: needed when alpha < 1 (got alpha={alpha}); pass labels or alpha=1.0")
    if labels is not None and labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(student_logits.shape[:-1])}, got {tuple(labels.shape)}")
    if labels is not None and labels.numel():
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels must hold class indices (integers), got {labels.dtype}")
        classes = student_logits.shape[-1]
        if int(labels.min()) < 0 or int(labels.max()) >= classes:
            raise ValueError(f"labels must be class indices in 0..{classes - 1}, got values from {int(labels.min())} to {int(labels.max())}")


def distillation_loss_loop(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(z_s, y), one example at a time.

    p = softmax(z / T); KL(p_t || p_s) = sum_c p_t[c] * (log p_t[c] - log p_s[c]),
    averaged over examples, as is the cross entropy.

    >>> s, t = torch.tensor([[1., 0.]]), torch.tensor([[0., 1.]])
    >>> round(distillation_loss_loop(s, t, torch.tensor([0]), temperature=1.0, alpha=0.5).item(), 4)
    0.3877
    >>> round(distillation_loss_loop(t, t, temperature=3.0, alpha=1.0).item(), 4)
    0.0
    """
    _check(student_logits, teacher_logits, labels, temperature, alpha)
    s_rows = student_logits.reshape(-1, student_logits.shape[-1]).tolist()  # (N, C)
    t_rows = teacher_logits.reshape(-1, teacher_logits.shape[-1]).tolist()  # (N, C)
    y = None if labels is None else labels.reshape(-1).tolist()

    def log_softmax(row, T):
        scaled = [z / T for z in row]
        top = max(scaled)
        log_norm = top + math.log(sum(math.exp(z - top) for z in scaled))
        return [z - log_norm for z in scaled]

    soft = hard = 0.0
    for i, (s_row, t_row) in enumerate(zip(s_rows, t_rows)):
        log_ps, log_pt = log_softmax(s_row, temperature), log_softmax(t_row, temperature)
        soft += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_pt, log_ps))
        if y is not None:
            hard += -log_softmax(s_row, 1.0)[y[i]]
    n = len(s_rows)
    loss = alpha * temperature**2 * soft / n + (0.0 if y is None else (1 - alpha) * hard / n)
    return torch.tensor(loss)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Vectorised `distillation_loss_loop`; differentiable in `student_logits`.

    >>> s, t = torch.tensor([[1., 0.]]), torch.tensor([[0., 1.]])
    >>> round(distillation_loss(s, t, torch.tensor([0]), temperature=1.0, alpha=0.5).item(), 4)
    0.3877
    """
    _check(student_logits, teacher_logits, labels, temperature, alpha)
    s = student_logits.reshape(-1, student_logits.shape[-1]).float()  # (N, C)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float().detach()  # (N, C)
    log_ps = F.log_softmax(s / temperature, dim=-1)  # (N, C)
    log_pt = F.log_softmax(t / temperature, dim=-1)  # (N, C)
    soft = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)  # KL(p_t || p_s), mean over N
    loss = alpha * temperature**2 * soft
    if labels is not None and alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(s, labels.reshape(-1))
    return loss


def lm_distillation_loss(temperature: float = 2.0, alpha: float = 0.5) -> Callable:
    """`loss_fn(student_logits, y, teacher_logits)` for `train_lm(..., teacher=...)`.

    >>> loss_fn = lm_distillation_loss(temperature=1.0, alpha=1.0)
    >>> z = torch.zeros(1, 2, 3)
    >>> loss_fn(z, torch.zeros(1, 2, dtype=torch.long), z).item()
    0.0
    """
    _check(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), temperature, alpha)

    def loss_fn(student_logits, y, teacher_logits):
        if teacher_logits is None:
            raise ValueError("teacher_logits: None; pass teacher=... to train_lm")
        return distillation_loss(student_logits, teacher_logits, y, temperature, alpha)

    return loss_fn


def distill(
    student: nn.Module,
    teacher: nn.Module,
    loader: Iterable,
    epochs: int = 1,
    lr: float = 1e-3,
    temperature: float = 2.0,
    alpha: float = 0.5,
    max_steps: int | None = None,
    eval_loader: Iterable | None = None,
    progress_bar: bool | None = None,
) -> History:
    """Fine-tune `student` on `loader` against a frozen `teacher`; returns a History.

    Runs `chapter11.train.train` with `distillation_loss` as the loss, so a
    student that carries masks keeps its zeros. The teacher runs in eval mode
    without gradients on the same batch the student sees; test metrics (with
    `eval_loader`) use plain cross entropy.
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError(f"student and teacher must be nn.Modules, got {type(student).__name__} and {type(teacher).__name__}")
    if student is teacher:
        raise ValueError("teacher: is the student itself; pass a separate (e.g. dense, deep-copied) model")
    _check(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), temperature, alpha)
    teacher_was_training = teacher.training
    teacher.eval()
    current = {}

    class _StudentWithTeacher(nn.Module):
        """Hands the student's logits on, after running the teacher on the same input."""

        def __init__(self):
            super().__init__()
            self.student = student

        def forward(self, x):
            if torch.is_grad_enabled():  # a training step, not evaluation
                with torch.no_grad():
                    current["teacher"] = teacher(x)
            return self.student(x)

    def loss_fn(logits, y):
        if logits.requires_grad and "teacher" in current:  # a training step
            return distillation_loss(logits, current.pop("teacher"), y, temperature, alpha)
        return F.cross_entropy(logits, y)

    try:
        history = train(
            _StudentWithTeacher(),
            loader,
            epochs=epochs,
            lr=lr,
            loss_fn=loss_fn,
            eval_loader=eval_loader,
            max_steps=max_steps,
            progress_bar=progress_bar,
            desc="distill",
        )
    finally:
        teacher.train(teacher_was_training)
    student.eval()
    return history


def _selected(model: nn.Module, trainable) -> set[str]:
    """Names of the parameters under the module (or parameter) names in `trainable`; None = all."""
    names = [n for n, _ in model.named_parameters()]
    if trainable is None:
        return set(names)
    if isinstance(trainable, str) or not isinstance(trainable, Iterable):
        raise TypeError(f"trainable must be a list of module names (or None for all), got {trainable!r}")
    trainable = list(trainable)
    known = set(dict(model.named_modules())) | set(names)
    unknown = [t for t in trainable if not isinstance(t, str) or t not in known]
    if unknown or not trainable:
        raise ValueError(f"trainable: unknown module names {unknown} (or an empty list); e.g. {names[0].rsplit('.', 1)[0]!r}")
    return {n for n in names if any(n == t or n.startswith(t + ".") for t in trainable)}


def distill_lm(
    student: nn.Module,
    teacher: nn.Module,
    tokens: torch.Tensor,
    steps: int,
    trainable: Iterable[str] | None = None,
    block_size: int = 128,
    batch_size: int = 2,
    lr: float = 1e-4,
    temperature: float = 1.0,
    alpha: float = 1.0,
    seed: int = 0,
    progress_bar: bool | None = None,
) -> list[float]:
    """Recover a pruned language model: `steps` of AdamW on `tokens`, only `trainable` learns.

    `trainable` lists module names (e.g. `["model.layers.4", "model.layers.9.mlp"]`);
    every other parameter is frozen for the run (no gradient, no optimizer
    state) and its `requires_grad` flag is restored afterwards; None trains
    everything. The loss is `distillation_loss` against the frozen `teacher`
    (by default alpha=1: match the teacher's next-token distribution only).
    Returns the loss of every step, as `chapter11.train.train_lm` does;
    masks on the student stay enforced.
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError(f"student and teacher must be nn.Modules, got {type(student).__name__} and {type(teacher).__name__}")
    if student is teacher:
        raise ValueError("teacher: is the student itself; pass a separate (e.g. dense, deep-copied) model")
    loss_fn = lm_distillation_loss(temperature, alpha)
    selected = _selected(student, trainable)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    teacher_was_training = teacher.training
    teacher.eval()
    try:
        params = []
        for name, param in student.named_parameters():
            param.requires_grad_(name in selected)
            if name in selected:
                params.append(param)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        return train_lm(student, tokens, steps, block_size=block_size, batch_size=batch_size, optimizer=optimizer,
                        seed=seed, progress_bar=progress_bar, teacher=teacher, loss_fn=loss_fn)
    finally:
        for name, param in student.named_parameters():
            param.requires_grad_(flags[name])
        teacher.train(teacher_was_training)
