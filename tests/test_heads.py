"""Attention-head importance, masking, physical removal and checkpoints."""

import copy

import pytest
import torch

from chapter11.models import TransformerClassifier, load_minilm, tiny_llama
from chapter11.structured.heads import (
    PLAN_FILE,
    attention_layers,
    forward_macs,
    head_gates,
    head_importance,
    head_importance_loop,
    kept_heads,
    load_pruned,
    mask_heads,
    plan_from_order,
    remove_heads,
    removal_order,
    save_pruned,
)

torch.set_num_threads(2)


def _ours():
    torch.manual_seed(0)
    return TransformerClassifier(patch_size=4, max_len=10, d_model=32, n_heads=4, n_layers=2, d_ff=64).eval()


def _llama(kv=None):
    return tiny_llama(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=kv, intermediate_size=48, max_position_embeddings=32)


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = load_minilm()
    enc = tokenizer(["prune the heads", "a slightly longer sentence about attention heads"], padding=True, return_tensors="pt")
    return model.eval(), dict(enc)


def _minilm_loss(model, batch):
    """Per-example loss for the bare encoder: mean squared output, padding ignored."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    h = model(**inputs).last_hidden_state  # (B, T, 384)
    m = inputs["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    return ((h**2) * m).sum((1, 2)) / m.sum((1, 2))


def _cases(minilm):
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, 256, (2, 12), generator=g)
    return {
        "ours": (_ours(), torch.randn(3, 40, generator=g), lambda m, x: m(x), {0: [1, 2], 1: [3]}),
        "llama": (_llama(), tok, lambda m, x: m(x).logits, {0: [0, 3], 1: [1, 2, 3]}),
        "llama_gqa": (_llama(kv=2), tok, lambda m, x: m(x).logits, {0: [2, 3]}),
        "minilm": (minilm[0], minilm[1], lambda m, x: m(**x).last_hidden_state, {0: [1, 5, 7], 2: list(range(11)), 5: [0]}),
    }


@pytest.mark.parametrize("name", ["ours", "llama", "llama_gqa", "minilm"])
def test_removed_equals_masked(name, minilm):
    model, x, call, plan = _cases(minilm)[name]
    with torch.no_grad():
        dense = call(model, x)
        masked = call(mask_heads(copy.deepcopy(model), plan), x)
        pruned_model = remove_heads(copy.deepcopy(model), plan)
        pruned = call(pruned_model, x)
    assert not torch.allclose(dense, masked, atol=1e-4)  # the plan changes the output
    torch.testing.assert_close(pruned, masked, atol=2e-5, rtol=1e-4)
    layers = attention_layers(pruned_model)
    for l, removed in plan.items():
        assert layers[l].n_heads == layers[l].kept.__len__() == len(attention_layers(model)[l].kept) - len(removed)
        assert layers[l].q.weight.shape[0] == layers[l].n_heads * layers[l].head_dim
        assert layers[l].o.weight.shape[1] == layers[l].n_heads * layers[l].head_dim


def test_zero_gate_equals_mask_heads():
    model, x = _ours(), torch.randn(2, 40)
    with torch.no_grad(), head_gates(model, [torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.ones(4)]):
        gated = model(x)
    masked = mask_heads(copy.deepcopy(model), torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]))(x).detach()
    torch.testing.assert_close(gated, masked, atol=1e-6, rtol=1e-5)


def test_mask_heads_zeroes_exactly_the_head():
    model = mask_heads(_ours(), {1: [2]})
    attn = model.blocks[1].attn  # head_dim 8: head 2 is rows/columns 16..23
    assert attn.q.weight[16:24].abs().sum() == 0 and attn.q.bias[16:24].abs().sum() == 0
    assert attn.o.weight[:, 16:24].abs().sum() == 0
    assert attn.q.weight[:16].ne(0).all() and attn.o.weight[:, 24:].ne(0).all()
    assert model.blocks[0].attn.o.weight.ne(0).all()


@pytest.mark.parametrize("name", ["ours", "llama", "llama_gqa", "minilm"])
def test_importance_loop_equals_vectorised(name, minilm):
    model, x, _, _ = _cases(minilm)[name]
    if name == "minilm":
        batches, loss_fn = [x], _minilm_loss
    elif name == "ours":
        batches, loss_fn = [(x, torch.tensor([0, 3, 9]))], None
    else:
        batches, loss_fn = [(x[:, :-1], x[:, 1:])], None
    fast = head_importance(model, batches, loss_fn=loss_fn)
    slow = head_importance_loop(model, batches, loss_fn=loss_fn)
    layers = attention_layers(model)
    assert fast.shape == (len(layers), layers[0].n_heads)
    assert (fast > 0).all()
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(head_importance(model, batches, loss_fn=loss_fn, normalize=True).norm(dim=1), torch.ones(len(layers)))


def test_importance_matches_finite_differences():
    """I_h against central differences of each example's loss in its gate."""
    model = _ours().double()
    x, y = torch.randn(2, 40, dtype=torch.double), torch.tensor([1, 4])
    scores = head_importance(model, [(x, y)])  # (2, 4)
    eps = 1e-5
    expected = torch.zeros(2, 4, dtype=torch.double)
    for l in range(2):
        for h in range(4):
            for i in range(2):
                losses = []
                for sign in (1, -1):
                    gates = [torch.ones(4, dtype=torch.double) for _ in range(2)]
                    gates[l][h] += sign * eps
                    with torch.no_grad(), head_gates(model, gates):
                        losses.append(torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).item())
                expected[l, h] += abs(losses[0] - losses[1]) / (2 * eps) / 2
    torch.testing.assert_close(scores.double(), expected, atol=1e-6, rtol=1e-4)


def test_masked_head_has_zero_importance_and_removed_is_nan():
    model = mask_heads(_ours(), {0: [1]})
    batch = (torch.randn(4, 40), torch.tensor([0, 1, 2, 3]))
    scores = head_importance(model, [batch])
    assert scores[0, 1] == 0 and (scores[0, [0, 2, 3]] > 0).all()
    scores = head_importance(remove_heads(model, {1: [0, 2]}), [batch])
    assert torch.isnan(scores[1, [0, 2]]).all() and not torch.isnan(scores[1, [1, 3]]).any()


def test_removal_composes_and_keeps_original_ids():
    x = torch.randn(2, 40)
    once = remove_heads(_ours(), {0: [1, 2]})
    twice = remove_heads(remove_heads(_ours(), {0: [2]}), {0: [1]})
    assert kept_heads(once) == kept_heads(twice) == {0: [0, 3], 1: [0, 1, 2, 3]}
    torch.testing.assert_close(once(x), twice(x))


def test_forward_macs_hand_count_and_removal():
    model, T = _llama(), 8
    x = torch.zeros(1, T, dtype=torch.long)
    d, ff, V, H, hd = 32, 48, 256, 4, 8
    per_token = 2 * (4 * d * d + 3 * d * ff) + d * V
    attention = 2 * (2 * H * T * T * hd)
    assert forward_macs(model, x) == T * per_token + attention
    pruned = remove_heads(model, {0: [0], 1: [1, 2]})
    removed_heads = 3
    saved = removed_heads * (T * 4 * d * hd + 2 * T * T * hd)  # q/k/v rows, o columns, QK^T and AV
    assert forward_macs(pruned, x) == T * per_token + attention - saved


def test_removal_order_and_plan():
    scores = torch.tensor([[0.1, 0.2, 0.9], [0.05, 0.3, 0.4]])
    order = removal_order(scores)
    assert order == [(1, 0), (0, 0), (0, 1), (1, 1)]  # never the last head of a layer
    assert plan_from_order(order[:3]) == {0: [0, 1], 1: [0]}
    scores[0, 0] = float("nan")  # already removed
    assert removal_order(scores, min_heads=2) == [(1, 0)]


def test_pruned_llama_generates():
    model = remove_heads(_llama(), {0: [1, 3], 1: [0]})
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("name", ["ours", "llama", "llama_gqa", "minilm"])
def test_save_load_round_trip_uneven(name, minilm, tmp_path):
    model, x, call, plan = _cases(minilm)[name]
    pruned = remove_heads(copy.deepcopy(model), plan)
    folder = save_pruned(pruned, tmp_path / name)
    assert (folder / PLAN_FILE).is_file() and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    loaded = load_pruned(folder)
    assert type(loaded) is type(model)
    assert kept_heads(loaded) == kept_heads(pruned)
    with torch.no_grad():
        torch.testing.assert_close(call(loaded, x), call(pruned, x))
    if name != "ours":  # uneven heads cannot come back through plain from_pretrained
        with pytest.raises(Exception):
            type(model).from_pretrained(folder, local_files_only=True)


def test_errors(tmp_path):
    model = _ours()
    with pytest.raises(ValueError, match="no heads"):
        remove_heads(model, {0: [0, 1, 2, 3]})
    with pytest.raises(ValueError, match="unknown layer index 5"):
        remove_heads(model, {5: [0]})
    with pytest.raises(ValueError, match="heads 0..3"):
        remove_heads(model, {0: [4]})
    with pytest.raises(ValueError, match="twice"):
        remove_heads(model, {0: [1, 1]})
    with pytest.raises(TypeError, match="dict"):
        remove_heads(model, torch.ones(2, 4))
    remove_heads(model, {0: [1]})
    with pytest.raises(ValueError, match="already removed"):
        remove_heads(model, {0: [1]})
    with pytest.raises(ValueError, match="no heads"):  # three left, all three asked for
        remove_heads(model, {0: [0, 2, 3]})
    with pytest.raises(ValueError, match="grouped-query"):
        remove_heads(_llama(kv=2), {1: [1]})
    with pytest.raises(ValueError, match="shape"):
        mask_heads(_ours(), torch.ones(3, 4))
    with pytest.raises(ValueError, match="0 \\(drop\\) and 1"):
        mask_heads(_ours(), torch.full((2, 4), 0.5))
    with pytest.raises(TypeError, match="no attention layers"):
        attention_layers(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="iterable of batches"):
        head_importance(_ours(), (torch.randn(2, 40), torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="empty"):
        head_importance(_ours(), [])
    with pytest.raises(FileNotFoundError, match=PLAN_FILE):
        load_pruned(tmp_path)
