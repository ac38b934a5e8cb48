"""Distillation loss (loop vs vectorised vs torch.distributions) and the recovery fine-tune."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from chapter11.distill import distill, distillation_loss, distillation_loss_loop, lm_distillation_loss
from chapter11.masks import apply_masks
from chapter11.models import LeNet300100, tiny_llama
from chapter11.train import History, train_lm

torch.set_num_threads(2)


@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 7)])
@pytest.mark.parametrize(
    "temperature,alpha,with_labels", [(1.0, 0.5, True), (2.0, 0.9, True), (4.0, 0.0, True), (0.5, 1.0, True), (2.0, 1.0, False)]
)
def test_loop_equals_vectorised(shape, temperature, alpha, with_labels):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(*shape, generator=g) * 3, torch.randn(*shape, generator=g) * 3
    y = torch.randint(0, shape[-1], shape[:-1], generator=g) if with_labels else None
    fast = distillation_loss(s, t, y, temperature, alpha)
    slow = distillation_loss_loop(s, t, y, temperature, alpha)
    torch.testing.assert_close(fast, slow.float(), atol=1e-5, rtol=1e-5)


def test_against_torch_distributions():
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)
    T, alpha = 3.0, 0.7
    Cat = torch.distributions.Categorical
    kl = torch.distributions.kl_divergence(Cat(logits=t / T), Cat(logits=s / T)).mean()
    ce = -Cat(logits=s).log_prob(y).mean()
    torch.testing.assert_close(distillation_loss(s, t, y, T, alpha), alpha * T**2 * kl + (1 - alpha) * ce)


def test_alpha_zero_is_cross_entropy_and_match_is_zero():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(distillation_loss(s, t, y, 5.0, 0.0), torch.nn.functional.cross_entropy(s, y))
    s = s.clone().requires_grad_(True)
    loss = distillation_loss(s, s.detach().clone(), temperature=2.0, alpha=1.0)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and s.grad.abs().max() < 1e-6


def test_gradient_flows_to_student_only():
    s, t = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    distillation_loss(s, t, torch.tensor([0, 1, 2])).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_errors():
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="teacher_logits"):
        distillation_loss(s, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, s, torch.tensor([0, 1]), temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss_loop(s, s, torch.tensor([0, 1]), alpha=1.5)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(s, s, None, alpha=0.5)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(s, s, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="student itself"):
        model = LeNet300100(in_features=4)
        distill(model, model, [])


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 8, generator=g)
    y = (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0).long()  # 4 classes
    return DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)), X


def test_distill_moves_student_towards_teacher_and_keeps_masks():
    torch.manual_seed(0)
    loader, X = _data()
    teacher = LeNet300100(in_features=8, num_classes=4, hidden=(32, 16))
    # an untrained teacher is fine: the student must learn to match it
    student = LeNet300100(in_features=8, num_classes=4, hidden=(32, 16))
    apply_masks(student, {"fc1.weight": (torch.rand(32, 8) > 0.5).float()})
    before_teacher = copy.deepcopy(teacher.state_dict())

    def gap():
        with torch.no_grad():
            return distillation_loss(student(X), teacher(X), temperature=2.0, alpha=1.0).item()

    start = gap()
    history = distill(student, teacher, loader, epochs=3, lr=1e-2, alpha=1.0, eval_loader=loader)
    assert isinstance(history, History) and len(history.losses) == 3 * len(loader) and len(history.test_accuracy) == 3
    assert gap() < 0.5 * start
    assert all(torch.equal(v, before_teacher[k]) for k, v in teacher.state_dict().items())
    assert (student.fc1.weight[student.fc1.weight_mask == 0] == 0).all()


def test_lm_distillation_with_train_lm():
    teacher = tiny_llama(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32, seed=1)
    student = tiny_llama(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32, seed=2)
    tokens = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0))
    losses = train_lm(student, tokens, steps=20, block_size=16, batch_size=8, teacher=teacher,
                      loss_fn=lm_distillation_loss(temperature=1.0, alpha=1.0), progress_bar=False)
    assert losses[-1] < 0.5 * losses[0]


def test_distill_lm_trains_only_the_named_blocks():
    from chapter11.distill import distill_lm

    teacher = tiny_llama(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=32, seed=1)
    student = tiny_llama(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=32, seed=2)
    student.model.embed_tokens.weight.requires_grad_(False)  # a flag the run must give back as it was
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    tokens = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0))
    losses = distill_lm(student, teacher, tokens, steps=15, trainable=["model.layers.1", "model.layers.2.mlp"],
                        block_size=16, batch_size=8, lr=3e-3, progress_bar=False)
    assert len(losses) == 15 and losses[-1] < losses[0]
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("model.layers.1.", "model.layers.2.mlp.")) for n in changed)
    assert any(n.startswith("model.layers.2.mlp.") for n in changed) and any(n.startswith("model.layers.1.self_attn.") for n in changed)
    assert not student.model.embed_tokens.weight.requires_grad and student.model.layers[0].mlp.up_proj.weight.requires_grad
    assert not teacher.training


def test_distill_lm_errors():
    from chapter11.distill import distill_lm

    model = tiny_llama(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16)
    tokens = torch.randint(0, 256, (200,))
    with pytest.raises(ValueError, match="unknown module names"):
        distill_lm(model, tiny_llama(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16), tokens, 1, trainable=["model.layers.7"])
    with pytest.raises(TypeError, match="list of module names"):
        distill_lm(model, tiny_llama(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16), tokens, 1, trainable="model")
    with pytest.raises(ValueError, match="student itself"):
        distill_lm(model, model, tokens, 1)
