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

But: logits only (no hidden-state or attention matching as in TinyBERT or
DistilBERT's cosine loss), and the teacher is frozen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from .train import History, train

__all__ = ["distillation_loss_loop", "distillation_loss", "lm_distillation_loss", "distill"]


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
