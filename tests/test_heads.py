"""Attention-head importance, masking, physical removal and checkpoints."""

import copy

import pytest
import torch

from chapter11.models import TransformerClassifier, load_minilm, tiny_llama
from chapter11.structured.checkpoint import PLAN_FILE, load_pruned, save_pruned
from chapter11.structured.heads import (
    attention_layers,
    forward_macs,
    head_gates,
    head_importance,
    head_importance_loop,
    kept_heads,
    mask_heads,
    plan_from_order,
    remove_heads,
    removal_order,
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


# --------------------------------------------------------------------------- grouped-query attention (issue 15)

import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

from chapter11.masks import MaskedOptimizer, apply_masks, masks_of  # noqa: E402
from chapter11.structured.heads import group_removal_order  # noqa: E402


def _gqa(attn="eager", layers=2, seed=0):
    """6 query heads sharing 2 key/value heads (groups {0,1,2} and {3,4,5}), head_dim 8."""
    model = tiny_llama(hidden_size=48, num_layers=layers, num_heads=6, num_kv_heads=2, intermediate_size=40,
                       max_position_embeddings=64, seed=seed)
    model.config._attn_implementation = attn
    return model.eval()


GQA_PLANS = {
    "one per group": {0: [1, 4], 1: [0, 5]},
    "two per group": {0: [0, 2, 3, 4]},
    "whole group": {0: [3, 4, 5], 1: [0, 1, 2]},
    "whole group and one per group left": {1: [0, 1, 2, 4]},
    "mixed layers": {0: [2, 5], 1: [3, 4, 5]},
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(GQA_PLANS))
def test_gqa_removed_equals_masked(name, attn):
    plan = GQA_PLANS[name]
    model = _gqa(attn)
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = model(x).logits
        masked = mask_heads(copy.deepcopy(model), plan)(x).logits
        pruned_model = remove_heads(copy.deepcopy(model), plan)
        pruned = pruned_model(x).logits
    assert not torch.allclose(dense, masked, atol=1e-4)
    torch.testing.assert_close(pruned, masked, atol=2e-5, rtol=1e-4)
    for l, layer in enumerate(attention_layers(pruned_model)):
        removed = plan.get(l, [])
        groups_left = len({h // 3 for h in range(6) if h not in removed})
        assert layer.n_heads == 6 - len(removed)
        assert layer.proj(1).out_features == layer.proj(2).out_features == groups_left * 8  # k/v only lose whole groups
        assert layer.attn.num_key_value_groups == layer.n_heads // groups_left


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gqa_generate_with_cache_matches_masked(attn):
    plan = {0: [1, 4], 1: [3, 4, 5]}
    model = _gqa(attn)
    prompt = torch.tensor([[5, 9, 200, 31]])
    masked = mask_heads(copy.deepcopy(model), plan)
    pruned = remove_heads(copy.deepcopy(model), plan)
    out_masked = masked.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    out_pruned = pruned.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out_masked, out_pruned) and out_pruned.shape == (1, 12)


@pytest.mark.parametrize("plan, layer, group", [({0: [0]}, 0, 0), ({1: [0, 1, 4]}, 1, 0), ({0: [3, 4]}, 0, 1), ({1: [5]}, 1, 1)])
def test_gqa_uneven_plan_names_layer_and_group(plan, layer, group):
    model = _gqa()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"layer {layer}, key/value group {group}"):
        remove_heads(model, plan)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed


def test_gqa_uneven_after_earlier_removal():
    model = remove_heads(_gqa(), {0: [1, 4]})  # groups keep {0, 2} and {3, 5}
    with pytest.raises(ValueError, match="layer 0, key/value group 0 would keep 1 query heads \\[2\\], but group 1 keeps 2"):
        remove_heads(model, {0: [0]})
    remove_heads(model, {0: [0, 3]})  # one more from each group: fine
    assert kept_heads(model)[0] == [2, 5] and attention_layers(model)[0].attn.num_key_value_groups == 1


def test_removal_order_gives_valid_grouped_plans():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 6, generator=g)
    order = removal_order(scores, group=3)
    assert len(order) == 4 and all(len(heads) == 2 for _, heads in order)  # two steps per layer, one head from each group
    for l, heads in order:
        assert sorted(h // 3 for h in heads) == [0, 1]
    for k in range(len(order) + 1):
        model = remove_heads(_gqa(), plan_from_order(order[:k]))
        assert sum(layer.n_heads for layer in attention_layers(model)) == 12 - 2 * k
    within = [heads for l, heads in order if l == 0]  # the least important head of each group goes first
    assert within[0] == tuple(sorted(min(range(gr * 3, gr * 3 + 3), key=lambda h: scores[0, h].item()) for gr in (0, 1)))
    assert removal_order(scores, group=3, min_heads=4) == [u for u in order if u in removal_order(scores, group=3, min_heads=4)]
    assert all(len([u for u in removal_order(scores, group=3, min_heads=4) if u[0] == l]) == 1 for l in (0, 1))
    group_order = group_removal_order(torch.rand(2, 2, generator=g), group=3)
    assert len(group_order) == 2
    for k in range(3):
        model = remove_heads(_gqa(), plan_from_order(group_order[:k]))
        assert [layer.proj(1).out_features for layer in attention_layers(model)].count(8) == k


def test_removal_order_after_removal_and_uneven_scores():
    model = remove_heads(_gqa(), {0: [1, 4]})
    scores = torch.rand(2, 6)
    scores[0, [1, 4]] = float("nan")
    order = removal_order(scores, group=3)
    assert [l for l, _ in order].count(0) == 1 and [l for l, _ in order].count(1) == 2
    remove_heads(model, plan_from_order(order))
    assert [layer.n_heads for layer in attention_layers(model)] == [2, 2]
    scores[0, 0] = float("nan")  # group 0 has one head left, group 1 two: not a state a model can be in
    with pytest.raises(ValueError, match="layer 0 has uneven groups"):
        removal_order(scores, group=3)
    kept = {0: [0, 2, 3, 5]}
    assert group_removal_order(torch.tensor([[0.1, 0.2]]), group=3, kept=kept) == [(0, (0, 2))]


@pytest.mark.parametrize("prune_first", [False, True])
def test_group_importance_loop_vectorised_and_group_gate(prune_first):
    model = _gqa()
    if prune_first:
        remove_heads(model, {0: [1, 4]})
    x = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(5))
    batch = (x[:, :-1], x[:, 1:])
    fast = head_importance(model, [batch], per="group")
    slow = head_importance_loop(model, [batch], per="group")
    assert fast.shape == (2, 2) and not torch.isnan(fast).any()
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-4)
    # against an independent gate: one scalar per example and group, expanded over the group's heads
    layers = attention_layers(model)
    expected = torch.zeros(2, 2)
    for i in range(3):
        group_gates = [torch.ones(layer.n_heads // layer.group, requires_grad=True) for layer in layers]  # (G,)
        head_level = [g.repeat_interleave(layer.group) for g, layer in zip(group_gates, layers)]  # (H,)
        with head_gates(model, head_level):
            loss = torch.nn.functional.cross_entropy(model(x[i : i + 1, :-1]).logits[0], x[i, 1:])
        grads = torch.autograd.grad(loss, group_gates)
        for l in range(2):
            expected[l] += grads[l].abs() / 3
    torch.testing.assert_close(fast, expected, atol=1e-6, rtol=1e-4)
    per_head = head_importance(model, [batch])
    assert per_head.shape == (2, 6)
    assert (fast <= per_head.nan_to_num(0).view(2, 2, 3).sum(2) + 1e-6).all()  # |sum| <= sum of |.|


def test_group_importance_marks_removed_group_nan():
    model = remove_heads(_gqa(), {1: [3, 4, 5]})
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(6))
    scores = head_importance(model, [(x[:, :-1], x[:, 1:])], per="group")
    assert torch.isnan(scores[1, 1]) and not torch.isnan(scores[0]).any() and not torch.isnan(scores[1, 0])
    with pytest.raises(ValueError, match="per must be"):
        head_importance(model, [(x[:, :-1], x[:, 1:])], per="kv")


# --------------------------------------------------------------------------- masks survive removal (issue 13, 2.2)


@pytest.mark.parametrize("kind", ["ours", "gqa"])
def test_remove_heads_slices_unstructured_masks(kind):
    model = _ours() if kind == "ours" else _gqa()
    plan = {0: [1, 2]} if kind == "ours" else {0: [1, 4], 1: [3, 4, 5]}
    layers = attention_layers(model)
    g = torch.Generator().manual_seed(0)
    names = {id(layer.proj(i)): n for n, m in model.named_modules() for layer in layers for i in range(4) if m is layer.proj(i)}
    masks = {f"{names[id(layer.proj(i))]}.weight": (torch.rand(layer.proj(i).weight.shape, generator=g) > 0.5).float()
             for layer in layers for i in range(4)}
    apply_masks(model, masks)
    dense_masks = {k: v.clone() for k, v in masks_of(model).items()}
    remove_heads(model, plan)
    after = masks_of(model)
    assert sorted(after) == sorted(dense_masks)  # no mask dropped
    for layer_name, mask in after.items():
        param = model.get_parameter(layer_name)
        assert mask.shape == param.shape
        assert (param[mask == 0] == 0).all()
    # the kept rows of a sliced q projection carry exactly their old mask rows
    q_name = next(k for k in after if k.startswith("blocks.0.attn.q.") or k.startswith("model.layers.0.self_attn.q_proj."))
    hd = layers[0].head_dim
    kept_rows = [h * hd + j for h in range(layers[0].n_heads + len(plan[0])) if h not in plan[0] for j in range(hd)]
    assert torch.equal(after[q_name], dense_masks[q_name][kept_rows])
    # and training keeps the pruned weights at zero
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    for _ in range(3):
        x = torch.randn(4, 40) if kind == "ours" else torch.randint(0, 256, (2, 8))
        out = model(x) if kind == "ours" else model(x).logits
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()
    for layer_name, mask in masks_of(model).items():
        assert (model.get_parameter(layer_name)[mask == 0] == 0).all()


# --------------------------------------------------------------------------- bad head indices (issue 13)


@pytest.mark.parametrize("bad", [1.5, True, np.True_, torch.tensor(True), "1", 2.0, torch.tensor(1.0)])
def test_remove_heads_refuses_non_integer_heads(bad):
    model = _ours()
    with pytest.raises(TypeError, match="integer"):
        remove_heads(model, {0: [bad]})
    assert kept_heads(model)[0] == [0, 1, 2, 3]
    with pytest.raises(TypeError, match="integer"):
        mask_heads(model, {0: [bad]})


def test_remove_heads_accepts_numpy_and_tensor_integers():
    model = remove_heads(_ours(), {np.int64(0): [np.int32(1), torch.tensor(3)]})
    assert kept_heads(model)[0] == [0, 2]
    with pytest.raises(TypeError, match="layer index"):
        remove_heads(_ours(), {True: [1]})
    with pytest.raises(TypeError, match="list of head indices"):
        remove_heads(_ours(), {0: 1})


# --------------------------------------------------------------------------- checkpoints: atomic, checked, from_pretrained


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


UNIFORM = {"one per group": {0: [0, 3], 1: [2, 5]}, "whole group": {0: [0, 1, 2], 1: [3, 4, 5]}}


@pytest.mark.parametrize("name", sorted(UNIFORM))
def test_uniform_plan_reloads_with_from_pretrained(name, tmp_path):
    pruned = remove_heads(_gqa(), UNIFORM[name])
    folder = save_pruned(pruned, tmp_path / "uniform")
    config = json.loads((folder / "config.json").read_text())
    n_q = 4 if name == "one per group" else 3
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (n_q, 2 if n_q == 4 else 1, 8)
    assert pruned.config.num_attention_heads == 6  # the live model's config is left as it was
    x = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    plain = type(pruned).from_pretrained(folder, local_files_only=True).eval()
    torch.testing.assert_close(_logits(plain, x), _logits(pruned, x))
    loaded = load_pruned(folder)
    assert kept_heads(loaded) == kept_heads(pruned)
    torch.testing.assert_close(_logits(loaded, x), _logits(pruned, x))


def test_gqa_uneven_layers_round_trip(tmp_path):
    pruned = remove_heads(_gqa("sdpa", layers=3), {0: [1, 4], 1: [3, 4, 5], 2: [0, 1, 3, 4]})
    folder = save_pruned(pruned, tmp_path / "uneven")
    loaded = load_pruned(folder)
    assert kept_heads(loaded) == {0: [0, 2, 3, 5], 1: [0, 1, 2], 2: [2, 5]}
    assert [layer.n_heads for layer in attention_layers(loaded)] == [4, 3, 2]
    assert loaded.config._attn_implementation == "sdpa"
    x = torch.randint(0, 256, (2, 7))
    torch.testing.assert_close(_logits(loaded, x), _logits(pruned, x))
    with pytest.raises(Exception):
        type(pruned).from_pretrained(folder, local_files_only=True)


def test_masks_survive_save_and_load(tmp_path):
    model = _gqa()
    q = model.model.layers[0].self_attn.q_proj
    apply_masks(model, {"model.layers.0.self_attn.q_proj.weight": (torch.rand(q.weight.shape) > 0.3).float()})
    remove_heads(model, {0: [1, 4]})
    loaded = load_pruned(save_pruned(model, tmp_path / "masked"))
    assert sorted(masks_of(loaded)) == ["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(masks_of(loaded)["model.layers.0.self_attn.q_proj.weight"], masks_of(model)["model.layers.0.self_attn.q_proj.weight"])


def test_interrupted_resave_keeps_the_previous_save(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    first = remove_heads(_gqa(), {0: [3, 4, 5]})
    save_pruned(first, folder)
    x = torch.randint(0, 256, (1, 6))
    second = remove_heads(_gqa(), {0: [0, 1, 2]})  # the same shapes: only the plan tells the heads apart

    calls = []
    real_replace = os.replace

    def crash_on_plan(src, dst):  # weights are written, the plan is not
        calls.append(dst)
        if str(dst).endswith("pruning_plan.json"):
            raise KeyboardInterrupt("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_plan)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(second, folder)
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls  # the crash did happen mid-save
    loaded = load_pruned(folder)
    assert kept_heads(loaded)[0] == [0, 1, 2]
    torch.testing.assert_close(_logits(loaded, x), _logits(first, x))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]  # nothing left beside it


def test_crash_between_renames_is_visible_and_recoverable(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    save_pruned(remove_heads(_gqa(), {0: [1, 4]}), folder)
    real_rename = os.rename
    count = [0]

    def crash_second(src, dst):
        count[0] += 1
        if count[0] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_second)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(remove_heads(_gqa(), {0: [2, 5]}), folder)
    monkeypatch.setattr(os, "rename", real_rename)
    with pytest.raises(FileNotFoundError, match=r"\.ckpt\.old-"):
        load_pruned(folder)
    save_pruned(remove_heads(_gqa(), {0: [0, 3]}), folder)  # the next save succeeds and cleans up
    assert kept_heads(load_pruned(folder))[0] == [1, 2, 4, 5]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]


def test_plan_from_another_save_is_refused(tmp_path):
    a = save_pruned(remove_heads(_gqa(), {0: [1, 4]}), tmp_path / "a")
    b = save_pruned(remove_heads(_gqa(seed=1), {0: [2, 5]}), tmp_path / "b")
    (b / PLAN_FILE).write_text((a / PLAN_FILE).read_text())  # same shapes, wrong heads
    with pytest.raises(ValueError, match="different saves"):
        load_pruned(b)


def _write_plan(folder, plan, reseal=True):
    from chapter11.structured.checkpoint import _plan_digest

    if reseal:  # a plan edited with its checksum recomputed: the deeper checks must still catch it
        plan["plan_sha256"] = _plan_digest(plan)
    (folder / PLAN_FILE).write_text(json.dumps(plan))


def test_mismatched_plan_gives_clear_error(tmp_path):
    folder = save_pruned(remove_heads(_gqa(), {0: [1, 4]}), tmp_path / "a")
    plan = json.loads((folder / PLAN_FILE).read_text())
    plan["kept_heads"]["0"] = [0, 1, 2, 3, 4, 5]  # claims layer 0 is whole
    _write_plan(folder, plan)
    with pytest.raises(ValueError, match=r"do not match .*_proj.weight is \(\d+, \d+\) in the checkpoint but \(48, 48\) under the plan"):
        load_pruned(folder)
    plan["kept_heads"]["0"] = [0, 1, 3]  # an uneven grouped plan
    _write_plan(folder, plan)
    with pytest.raises(ValueError, match="cannot be applied.*key/value group"):
        load_pruned(folder)
    for bad in ({"0": [0, 0, 1], "1": [0]}, {"0": [7]}, {"0": [1.5], "1": [0]}, {"0": [], "1": [0]}):
        plan["kept_heads"] = bad
        _write_plan(folder, plan)
        with pytest.raises(ValueError, match="pruning plan"):
            load_pruned(folder)
    plan["kept_heads"] = {"0": [0, 2, 3, 5], "1": list(range(6))}  # valid again, but:
    del plan["files"]  # a plan without checksums of the files is refused
    _write_plan(folder, plan)
    with pytest.raises(ValueError, match="'files' must map"):
        load_pruned(folder)


def test_relabelled_heads_are_caught_by_the_plan_checksum(tmp_path):
    folder = save_pruned(remove_heads(_gqa(), {0: [1, 4]}), tmp_path / "a")
    plan = json.loads((folder / PLAN_FILE).read_text())
    plan["kept_heads"]["0"] = [1, 2, 4, 5]  # same number of heads and groups, other ids: the shapes would still fit
    _write_plan(folder, plan, reseal=False)
    with pytest.raises(ValueError, match="does not match its own checksum"):
        load_pruned(folder)
    plan["format"] = "chapter11.heads/2"
    _write_plan(folder, plan)
    with pytest.raises(ValueError, match="save it again"):
        load_pruned(folder)


@pytest.mark.parametrize("path", [
    "transformers.dynamic_module_utils.get_class_from_dynamic_module",  # would import evil.py from the folder
    "chapter11.report.atomic_write_text",  # would write a file named by config.json
    "transformers.models.llama.modeling_llama.LlamaRMSNorm",  # a transformers class, but not a model
    "transformers.models.evil.modeling_evil.LlamaForCausalLM",  # an exported name under another module path
    "builtins.eval",
    "os.system",
])
def test_load_pruned_calls_nothing_the_checkpoint_names(tmp_path, path):
    folder = save_pruned(remove_heads(_gqa(), {0: [1, 4]}), tmp_path / "a")
    (folder / "evil.py").write_text("raise SystemExit('evil code ran')\n")
    plan = json.loads((folder / PLAN_FILE).read_text())
    plan["class"] = path
    _write_plan(folder, plan)
    with pytest.raises(ValueError, match="not a model load_pruned rebuilds"):
        load_pruned(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*plan["files"], PLAN_FILE, "evil.py"])  # nothing written
    (folder / PLAN_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pruned(folder)


def test_save_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="did not write"):
        save_pruned(_ours(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_plan_from_order_per_layer_gives_uniform_plans():
    scores = torch.rand(2, 2, generator=torch.Generator().manual_seed(4))
    order = group_removal_order(scores, group=3)
    plan = plan_from_order(order, per_layer=1)
    assert sorted(plan) == [0, 1] and all(len(heads) == 3 for heads in plan.values())
    for l, heads in plan.items():
        assert heads[0] // 3 == int(scores[l].argmin())
    model = remove_heads(_gqa(), plan)
    assert [layer.n_heads for layer in attention_layers(model)] == [3, 3]
    assert plan_from_order(removal_order(torch.rand(2, 6), group=3), per_layer=2).keys() == {0, 1}
    with pytest.raises(ValueError, match="per_layer"):
        plan_from_order(order, per_layer=-1)
