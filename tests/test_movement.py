"""Tests for chapter11.movement: scores and their sign, masks, STE, MaskedLinear, finalize."""

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from chapter11 import movement as mv
from chapter11.experiments import exp03_movement as ex3


def _history(T=3, shape=(3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(T)], [torch.randn(shape, generator=g) for _ in range(T)]


# --- movement scores --------------------------------------------------------


@pytest.mark.parametrize("T,shape", [(1, (5,)), (3, (3, 4)), (4, (2, 2, 3))])
def test_movement_scores_loop_matches_vectorised(T, shape):
    W, G = _history(T, shape)
    assert torch.allclose(mv.movement_scores_loop(W, G), mv.movement_scores(W, G), atol=1e-5)


def test_movement_scores_hand_computed():
    W = [torch.tensor([2.0, -1.0]), torch.tensor([1.5, -1.5])]
    G = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])]
    # -(1*2 + 1*1.5) = -3.5 ; -(1*-1 + 1*-1.5) = 2.5
    assert mv.movement_scores(W, G).tolist() == [-3.5, 2.5]


def test_weight_moving_toward_zero_scores_lower_and_is_pruned():
    ex = ex3.sign_example(lr=0.1, steps=3)
    w_final = ex["weights"][-1]
    assert w_final[0] < 1.0 < w_final[1]  # w1 shrinks toward 0, w2 grows away
    S = ex["sanh"]
    assert S[0] < 0 < S[1]
    assert torch.allclose(S, ex["chapter_update"])  # chapter's g = update direction: same scores
    assert torch.allclose(ex["chapter_raw_gradient"], -S)  # raw gradient: flipped
    assert mv.topk_mask(S, 0.5).tolist() == [0.0, 1.0]  # prunes the one moving toward zero
    # hand value: weights 1, 0.95, 0.90 with gradient +0.5 -> -(0.5 * 2.85)
    assert math.isclose(float(S[0]), -1.425, rel_tol=1e-6)


def test_negative_weight_moving_toward_zero_also_scores_lower():
    # w = -1 with dL/dw = -0.5: SGD adds 0.05, toward zero; w = -1 with dL/dw = +0.5 moves away
    W = [torch.tensor([-1.0, -1.0])]
    G = [torch.tensor([-0.5, 0.5])]
    S = mv.movement_scores(W, G)
    assert S[0] < S[1]


def test_movement_scores_bad_input():
    with pytest.raises(ValueError, match="one entry per step"):
        mv.movement_scores([torch.ones(2)], [])
    with pytest.raises(TypeError, match="sequences of tensors"):
        mv.movement_scores(torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="shape"):
        mv.movement_scores([torch.ones(2)], [torch.ones(3)])


# --- masks ------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9, 0.97])
def test_topk_mask_loop_matches_vectorised_and_torch_prune(sparsity):
    scores = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    loop, fast = mv.topk_mask_loop(scores, sparsity), mv.topk_mask(scores, sparsity)
    assert torch.equal(loop, fast)
    assert int((fast == 0).sum()) == round(sparsity * scores.numel())
    # trusted: l1_unstructured on positive scores prunes the same smallest entries
    lin = nn.Linear(7, 6, bias=False)
    with torch.no_grad():
        lin.weight.copy_(scores.exp())
    prune.l1_unstructured(lin, "weight", amount=sparsity)
    assert torch.equal(lin.weight_mask, fast)


def test_topk_mask_refuses_bad_sparsity():
    with pytest.raises(ValueError, match="sparsity"):
        mv.topk_mask(torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        mv.topk_mask(torch.ones(4), float("nan"))


def test_threshold_mask_loop_matches_vectorised():
    scores = torch.randn(5, 9, generator=torch.Generator().manual_seed(2))
    for tau in (0.1, 0.5, 0.9):
        assert torch.equal(mv.threshold_mask_loop(scores, tau), mv.threshold_mask(scores, tau))
    with pytest.raises(ValueError, match="threshold"):
        mv.threshold_mask(scores, 1.5)


def test_mixed_scores_loop_matches_vectorised_and_endpoints():
    W, S = torch.randn(4, 5), torch.randn(4, 5)
    for alpha in (0.0, 0.3, 1.0):
        assert torch.allclose(mv.mixed_scores_loop(W, S, alpha), mv.mixed_scores(W, S, alpha), atol=1e-5)
    # alpha = 1 ranks by |W| alone: same mask as magnitude
    assert torch.equal(mv.topk_mask(mv.mixed_scores(W, S, 1.0), 0.5), mv.topk_mask(W.abs(), 0.5))
    with pytest.raises(ValueError, match="alpha"):
        mv.mixed_scores(W, S, 2.0)


def test_soft_penalty_loop_matches_vectorised_and_has_gradient():
    S = [torch.randn(3, 4, requires_grad=True), torch.randn(7, requires_grad=True)]
    value = mv.soft_penalty(S)
    assert math.isclose(mv.soft_penalty_loop(S), float(value.detach()), rel_tol=1e-5)
    value.backward()
    assert (S[0].grad > 0).all()  # the penalty always pushes scores down


# --- straight-through estimator ---------------------------------------------


def test_hard_ste_gradient_is_grad_of_effective_weight_times_weight():
    torch.manual_seed(0)
    layer = mv.MaskedLinear.from_linear(nn.Linear(5, 3), method="hard", sparsity=0.6)
    with torch.no_grad():
        layer.scores.copy_(torch.randn(3, 5))
    x = torch.randn(8, 5)
    y = layer(x).pow(2).sum()
    y.backward()
    # by hand: W' = W * M, dL/dW' = dL/dout^T x, dL/dS = dL/dW' * W (mask passes straight through)
    M = mv.topk_mask(layer.scores, 0.6)
    Wp = (layer.weight * M).detach().requires_grad_(True)
    out = torch.nn.functional.linear(x, Wp, layer.bias.detach())
    (grad_Wp,) = torch.autograd.grad(out.pow(2).sum(), Wp)
    assert torch.allclose(layer.scores.grad, grad_Wp * layer.weight.detach(), atol=1e-5)
    # pruned weights get no weight gradient but do get a score gradient (they can come back)
    assert torch.all(layer.weight.grad[M == 0] == 0)
    assert layer.scores.grad[M == 0].abs().sum() > 0


def test_hard_scores_under_sgd_equal_accumulated_movement_scores():
    """With sparsity 0 and SGD, S_T - S_0 = score_lr * (-sum_t dL/dW * W)."""
    torch.manual_seed(0)
    layer = mv.MaskedLinear.from_linear(nn.Linear(4, 3), method="hard", sparsity=0.0)
    opt = torch.optim.SGD([{"params": [layer.weight, layer.bias], "lr": 0.05}, {"params": [layer.scores], "lr": 0.1}])
    X, Y = torch.randn(16, 4), torch.randn(16, 3)
    weights, grads = [], []
    for t in range(5):
        opt.zero_grad()
        ((layer(X[t:t + 8]) - Y[t:t + 8]) ** 2).mean().backward()
        weights.append(layer.weight.detach().clone())
        grads.append(layer.weight.grad.detach().clone())
        opt.step()
    assert torch.allclose(layer.scores.detach(), 0.1 * mv.movement_scores(weights, grads), atol=1e-6)


def test_soft_threshold_sparsity_and_penalty_lower_scores():
    layer = mv.MaskedLinear.from_linear(nn.Linear(10, 10), method="soft", threshold=0.5)
    with torch.no_grad():
        layer.scores.copy_(torch.linspace(-1, 1, 100).reshape(10, 10) + 1e-3)
    assert math.isclose(mv.masked_sparsity(nn.Sequential(layer)), 0.5)  # exactly the 50 negative scores
    # only the penalty: scores fall, sparsity grows
    opt = torch.optim.SGD([layer.scores], lr=50.0)
    for _ in range(20):
        opt.zero_grad()
        mv.soft_penalty([layer.scores]).backward()
        opt.step()
    assert mv.masked_sparsity(nn.Sequential(layer)) > 0.5
    # STE: mask gradient reaches the scores
    layer.scores.grad = None
    layer(torch.randn(3, 10)).sum().backward()
    assert layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0


def test_magnitude_layer_matches_magnitude_module():
    magnitude = pytest.importorskip("chapter11.magnitude")
    lin = nn.Linear(8, 6)
    layer = mv.MaskedLinear.from_linear(lin, method="magnitude", sparsity=0.75)
    expected = magnitude.smallest_mask(lin.weight.abs(), round(0.75 * 48))
    assert torch.equal(layer.mask(), expected)


def test_masked_linear_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        mv.MaskedLinear.from_linear(nn.Linear(2, 2), method="random")
    with pytest.raises(TypeError, match="linear"):
        mv.MaskedLinear.from_linear(nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="sparsity"):
        mv.MaskedLinear.from_linear(nn.Linear(2, 2), sparsity=1.2)


# --- whole models -------------------------------------------------------------


def _tiny_bert(num_labels=3):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=num_labels)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def test_wrap_encoder_linears_of_a_bert():
    model = _tiny_bert()
    names = mv.wrap_linears(model, "hard", sparsity=0.5)
    assert len(names) == 12  # 2 blocks x (q, k, v, attn out, ffn in, ffn out)
    assert all(".encoder." in f".{n}." for n in names)
    assert isinstance(model.classifier, nn.Linear) and isinstance(model.bert.pooler.dense, nn.Linear)
    with pytest.raises(ValueError, match="unknown layer"):
        mv.wrap_linears(_tiny_bert(), "hard", names=["bert.nope"])


@pytest.mark.parametrize("method", mv.METHODS)
def test_finalize_gives_same_logits_and_round_trips(method, tmp_path):
    model = _tiny_bert()
    mv.wrap_linears(model, method, sparsity=0.7)
    for layer in mv.masked_layers(model).values():
        if layer.scores is not None:
            with torch.no_grad():
                layer.scores.copy_(torch.randn_like(layer.scores))
    ids = torch.randint(0, 50, (4, 10))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    achieved = mv.masked_sparsity(model)
    if method != "soft":
        assert abs(achieved - 0.7) < 1e-2
    masks = mv.finalize(model)
    assert not mv.masked_layers(model)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-6)
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in masks)
    total = sum(m.numel() for m in masks.values())
    assert abs(zeros / total - achieved) < 1e-9
    from chapter11.report import atomic_torch_save

    atomic_torch_save(model.state_dict(), tmp_path / "m.pt")
    fresh = _tiny_bert()
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"))
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, before, atol=1e-6)


def test_finalize_without_masked_layers_raises():
    with pytest.raises(ValueError, match="no MaskedLinear"):
        mv.finalize(nn.Sequential(nn.Linear(2, 2)))


def test_masked_linear_on_a_minilm_layer():
    models = pytest.importorskip("chapter11.models")
    try:
        model, _ = models.load_minilm(num_labels=2)
    except Exception as exc:  # package not installed
        pytest.skip(f"MiniLM not available: {exc}")
    model.eval()
    models_keep = ex3.keep_encoder_layers(model, 1)
    assert models_keep.config.num_hidden_layers == 1
    ids = torch.randint(1000, 2000, (2, 8))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    names = mv.wrap_linears(model, "magnitude", sparsity=0.0)
    assert len(names) == 6
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-5)  # sparsity 0 changes nothing
    mv.set_sparsity(model, 0.9)
    assert abs(mv.masked_sparsity(model) - 0.9) < 1e-3
    query = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, mv.MaskedLinear) and tuple(query.weight.shape) == (384, 384)
    kept = query.weight.abs()[query.mask() == 1].min()
    dropped = query.weight.abs()[query.mask() == 0].max()
    assert kept >= dropped  # magnitude: every kept weight at least as large as every pruned one


def test_fine_prune_small_run_reaches_target():
    pytest.importorskip("chapter11.schedules")
    model = _tiny_bert(num_labels=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (64, 8), generator=g)
    y = (ids[:, 0] < 25).long()
    ds = torch.utils.data.TensorDataset(ids, torch.ones_like(ids), y)
    task = ex3.DocstringTask(ds, ds, ["a", "b"], [32, 32], [32, 32])
    mv.wrap_linears(model, "hard")
    result = ex3.fine_prune(model, task, "hard", 0.8, ex3.FinePruneConfig(steps=12, batch_size=16), trace_every=4)
    assert abs(result.sparsity - 0.8) < 1e-2
    assert result.sparsity_trace == sorted(result.sparsity_trace)  # the cubic schedule only grows
    with pytest.raises(ValueError, match="method"):
        ex3.fine_prune(model, task, "magnitude", 0.5)


# --- issue 13: nothing lost, exact masks, no NaN ranked ------------------------


@pytest.mark.parametrize("method", mv.METHODS)
def test_wrap_linears_keeps_earlier_magnitude_masks_through_training_and_finalize(method):
    from chapter11.magnitude import prune_magnitude
    from chapter11.masks import MaskedOptimizer, masks_of

    model = _tiny_bert(num_labels=2)
    prune_magnitude(model, 0.5, scope="layerwise")
    old = {n: m.clone() for n, m in masks_of(model).items()}
    names = mv.wrap_linears(model, method, sparsity=0.3)
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 50, (12, 8), generator=g), torch.randint(0, 2, (12,), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # plain AdamW: the forward mask alone must hold
    for step in range(12):
        mv.set_sparsity(model, 0.3)
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids[step:step + 4]).logits, y[step:step + 4])
        opt.zero_grad()
        loss.backward()
        opt.step()
    mv.set_sparsity(model, 0.3)
    wrapped = {name: model.get_submodule(name) for name in names}
    masks = mv.finalize(model)
    for name in names:
        key = f"{name}.weight"
        weight, before = model.get_parameter(key), old[key]
        assert int((weight[before == 0] != 0).sum()) == 0, key  # nothing that was pruned came back
        assert torch.equal(wrapped[name].fixed_mask, before)  # the earlier mask travelled into the wrapped layer
        assert torch.equal(model.get_submodule(name).weight_mask, masks[key])  # the mask is back on the layer
        assert torch.all(masks[key] <= before)
    # later training through MaskedOptimizer keeps them at zero
    opt = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model)
    for step in range(3):
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids[step:step + 4]).logits, y[step:step + 4])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name in names:
        key = f"{name}.weight"
        assert int((model.get_parameter(key)[old[key] == 0] != 0).sum()) == 0


def test_masked_linear_with_earlier_mask_counts_it_toward_the_target():
    lin = nn.Linear(10, 10)
    earlier = (torch.arange(100).reshape(10, 10) % 5 != 0).float()  # 20% pruned already
    layer = mv.MaskedLinear.from_linear(lin, "hard", sparsity=0.5, mask=earlier)
    with torch.no_grad():
        layer.scores.copy_(torch.randn(10, 10, generator=torch.Generator().manual_seed(0)))
    m = layer.mask()
    assert int((m == 0).sum()) == 50 and torch.all(m[earlier == 0] == 0)  # the earlier zeros are the first 20 of 50
    layer.sparsity = 0.1  # below the earlier mask: stays at 20%
    assert int((layer.mask() == 0).sum()) == 20
    with pytest.raises(ValueError, match="0 and 1"):
        mv.MaskedLinear.from_linear(nn.Linear(2, 2), "hard", mask=torch.full((2, 2), 0.5))


def test_wrap_refuses_torch_prune_reparametrisation():
    lin = nn.Linear(4, 4)
    prune.l1_unstructured(lin, "weight", amount=0.5)
    with pytest.raises(TypeError, match="from_torch_prune"):
        mv.MaskedLinear.from_linear(lin, "hard")


def test_mixed_mask_is_exactly_binary_and_finalize_never_scales_kept_weights():
    from chapter11.masks import apply_masks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    original = model[0].weight.detach().clone()
    mv.wrap_linears(model, "mixed", names=["0"], sparsity=0.5)
    with torch.no_grad():
        model[0].scores.copy_(torch.randn(8, 16) * 0.37)
    mask = model[0]._mask_with_grad()
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}  # exact, not 0.99999994
    x = torch.randn(3, 16)
    expected = torch.nn.functional.linear(x, torch.where(mask.detach().bool(), original, 0.0), model[0].bias)
    assert torch.equal(model(x), expected)
    # the straight-through gradient still reaches the scores
    model(x).sum().backward()
    assert model[0].scores.grad is not None and model[0].scores.grad.abs().sum() > 0
    masks = mv.finalize(model)
    kept = masks["0.weight"].bool()
    assert torch.equal(model[0].weight[kept], original[kept])  # bit for bit
    apply_masks(model, masks)  # accepted: exactly 0/1
    assert torch.equal(model[0].weight_mask, masks["0.weight"])


@pytest.mark.parametrize("fn", [mv.topk_mask, mv.topk_mask_loop])
def test_topk_mask_refuses_nan_scores(fn):
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.tensor([float("nan"), 1.0, 2.0, 0.5]), 0.5)
    with pytest.raises(TypeError, match="scores"):
        fn([1.0, 2.0], 0.5)


def test_nan_scores_refused_everywhere():
    bad = torch.tensor([float("nan"), 1.0])
    for call in (lambda: mv.threshold_mask(bad, 0.5), lambda: mv.threshold_mask_loop(bad, 0.5),
                 lambda: mv.global_threshold([bad], 0.5), lambda: mv.global_threshold_loop([bad], 0.5)):
        with pytest.raises(ValueError, match="NaN"):
            call()


# --- soft movement with a target: one global cut --------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.97])
def test_global_threshold_loop_matches_vectorised_and_prunes_exactly(sparsity):
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(4, 5, generator=g), torch.randn(7, generator=g) * 3]
    cut = mv.global_threshold(tensors, sparsity)
    assert cut == mv.global_threshold_loop(tensors, sparsity)
    pruned = sum(int((S <= cut).sum()) for S in tensors)
    assert pruned == round(sparsity * 27)
    # trusted: torch.nn.utils.prune.global_unstructured on exp(scores) prunes the same entries
    layers = [nn.Linear(5, 4, bias=False), nn.Linear(7, 1, bias=False)]
    with torch.no_grad():
        layers[0].weight.copy_(tensors[0].exp())
        layers[1].weight.copy_(tensors[1].exp().reshape(1, 7))
    prune.global_unstructured([(layers[0], "weight"), (layers[1], "weight")], pruning_method=prune.L1Unstructured,
                              amount=sparsity)
    assert torch.equal(layers[0].weight_mask, (tensors[0] > cut).float())
    assert torch.equal(layers[1].weight_mask.flatten(), (tensors[1] > cut).float())


def test_soft_set_sparsity_reaches_the_target_with_uneven_layers():
    model = _tiny_bert()
    mv.wrap_linears(model, "soft")
    g = torch.Generator().manual_seed(0)
    layers = mv.masked_layers(model)
    for i, layer in enumerate(layers.values()):
        with torch.no_grad():
            layer.scores.copy_(torch.randn(layer.scores.shape, generator=g) + 0.2 * i)  # later layers score higher
    for target in (0.5, 0.9, 0.97):
        mv.set_sparsity(model, target)
        total = sum(layer.weight.numel() for layer in layers.values())
        assert mv.masked_sparsity(model) == round(target * total) / total
    per_layer = [float((layer.mask() == 0).float().mean()) for layer in layers.values()]
    assert per_layer[0] > per_layer[-1]  # one global cut: layers end up with different sparsities


def test_global_topk_masks_match_topk_on_the_concatenation_even_with_ties():
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randint(0, 4, (3, 5), generator=g).float(), torch.randint(0, 4, (11,), generator=g).float()]
    for sparsity in (0.0, 0.2, 0.5, 0.9):
        masks = mv.global_topk_masks(tensors, sparsity)
        flat = torch.cat([t.flatten() for t in tensors])
        expected = mv.topk_mask_loop(flat, sparsity)  # ties keep the lower index
        assert torch.equal(torch.cat([m.flatten() for m in masks]), expected)


# --- LLM domain adaptation: cached lower blocks, pruned top-block MLPs -------------


def _tiny_lm(layers=3, tie=False):
    from chapter11.models import tiny_llama

    model = tiny_llama(num_layers=layers, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=48, seed=0)
    if tie:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("first", [0, 1, 2])
def test_top_blocks_on_cached_hidden_states_give_the_model_logits(first):
    model = _tiny_lm()
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits  # (3, 12, 256)
    h = ex3.lower_hidden(model, ids, first, batch_size=2)
    top = ex3.TopBlocks(model, first)
    with torch.no_grad():
        assert torch.allclose(top(h), expected, atol=1e-5)
    assert len(top.layers) == 3 - first
    assert top.mlp_linear_names()[:3] == ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match="first_trainable"):
        ex3.TopBlocks(model, 3)
    with pytest.raises(TypeError, match="LLaMA-style"):
        ex3.lower_hidden(nn.Linear(2, 2), ids, 1)


def test_top_blocks_with_sdpa_and_tied_embeddings_match_and_share_the_head():
    model = _tiny_lm(tie=True)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    top = ex3.TopBlocks(model, 2)
    with torch.no_grad():
        assert torch.allclose(top(ex3.lower_hidden(model, ids, 2)), expected, atol=1e-5)
    assert top.head_weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # shared, not copied
    assert "head_weight" not in top.state_dict()


def test_hidden_perplexity_matches_train_perplexity_on_the_same_windows():
    from chapter11.train import perplexity

    model = _tiny_lm()
    tokens = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(2))
    x, y = ex3.lm_windows(tokens, 16)
    assert x.shape == (6, 16) and torch.equal(x[:, 1:], y[:, :-1])
    expected = perplexity(model, tokens, block_size=16, batch_size=4)
    got = ex3.hidden_perplexity(ex3.TopBlocks(model, 1), ex3.lower_hidden(model, x, 1), y, batch_size=4)
    assert math.isclose(got, expected, rel_tol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "hard", "soft", "mixed"])
def test_adapt_top_blocks_prunes_only_the_top_mlps_and_leaves_the_model_alone(method):
    model = _tiny_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(3))
    h, y = ex3.lower_hidden(model, ids[:, :-1], 2), ids[:, 1:]
    top = ex3.TopBlocks(model, 2)
    attn_before = top.layers[0].self_attn.q_proj.weight.detach().clone()
    cfg = ex3.FinePruneConfig(steps=10, batch_size=4, lr=1e-2, penalty=1.0 if method == "soft" else 0.0)
    r = ex3.adapt_top_blocks(top, h, y, method, 0.8, cfg)
    assert r.sparsity == pytest.approx(0.8, abs=1e-3) and len(r.step_cpu_s) == 10
    assert sorted(mv.masked_layers(top)) == sorted(top.mlp_linear_names())
    assert not torch.equal(top.layers[0].self_attn.q_proj.weight, attn_before)  # attention adapts, unpruned
    for k, v in model.state_dict().items():  # the pretrained model is untouched
        assert torch.equal(v, before[k]), k
    masks = mv.finalize(top)
    zeros = sum(int((top.get_parameter(n) == 0).sum()) for n in masks)
    assert zeros >= round(0.8 * sum(m.numel() for m in masks.values())) - len(masks)  # soft: one global cut


def test_adapt_top_blocks_dense_lowers_the_training_loss():
    model = _tiny_lm(layers=2)
    tokens = torch.arange(200) % 7  # a pattern the top block can learn
    x, y = ex3.lm_windows(tokens, 16)
    h = ex3.lower_hidden(model, x, 1)
    top = ex3.TopBlocks(model, 1)
    before = ex3.hidden_perplexity(top, h, y)
    r = ex3.adapt_top_blocks(top, h, y, None, config=ex3.FinePruneConfig(steps=30, batch_size=4, lr=1e-2))
    assert r.method == "dense" and r.sparsity == 0.0
    assert ex3.hidden_perplexity(top, h, y) < 0.7 * before  # the frozen random head limits how far it can go


def test_stdlib_source_halves_share_no_file_and_are_not_the_help_topics():
    from chapter11.data import pydoc_topics

    adapt, held = ex3.stdlib_source("adapt", max_chars=20_000), ex3.stdlib_source("heldout", max_chars=20_000)
    assert len(adapt) == len(held) == 20_000 and adapt[:200] != held[:200]
    assert "def " in adapt and "def " in held
    topic = pydoc_topics("evaluation")[0][:200]
    assert topic not in ex3.stdlib_source("adapt") and topic not in ex3.stdlib_source("heldout")
    with pytest.raises(ValueError, match="part"):
        ex3.stdlib_source("train")


# --- the grid helpers -------------------------------------------------------------


def test_schedule_is_the_same_cubic_for_every_method_and_penalty_ramps_with_it():
    from chapter11.schedules import cubic_sparsity

    cfg = ex3.FinePruneConfig(steps=100, penalty=10.0)
    for t in (0, 10, 11, 40, 69, 70, 100):
        assert cfg.schedule(t, 0.97) == cubic_sparsity(t, 0.97, t0=10, n=60)
    assert cfg.penalty_at(0) == 0.0 and cfg.penalty_at(70) == 10.0


def test_grid_settings_round_trip_and_summaries():
    s = ex3.GridSettings()
    d = s.as_dict()
    assert d["sparsities"] == [0.5, 0.9, 0.97] and d["methods"] == list(mv.METHODS) and len(d["seeds"]) >= 3
    assert ex3.GridSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}) == s
    runs = [{"method": m, "target": 0.9, "test": v} for m, v in [("hard", 0.5), ("hard", 0.7), ("magnitude", 0.2)]]
    sums = ex3.grid_summaries(runs)
    assert sums["hard"][0.9].mean == pytest.approx(0.6) and sums["magnitude"][0.9].n == 1


def test_docstring_task_validation_split_is_disjoint():
    class Tok:  # whitespace tokenizer, enough for the split
        def __call__(self, texts, padding, truncation, max_length, return_tensors):
            ids = torch.tensor([[hash(w) % 1000 for w in t.split()[:max_length]] + [0] * (max_length - len(t.split()[:max_length]))
                                for t in texts])
            return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    task = ex3.docstring_task(Tok(), max_length=8, max_per_class=60, test_per_class=20, val_per_class=10)
    assert task.test_counts == [20] * 9 and task.val_counts == [10] * 9 and task.train_counts == [30] * 9
    with pytest.raises(ValueError, match="val_per_class"):
        ex3.docstring_task(Tok(), max_per_class=30, test_per_class=20, val_per_class=10)


@pytest.mark.parametrize("q", [0.0001, 0.03, 0.5, 0.97, 0.9999])
def test_kth_smallest_matches_kthvalue_on_large_tensors(q):
    g = torch.Generator().manual_seed(7)
    flat = torch.cat([torch.randn(1_500_000, generator=g), torch.full((1000,), -math.inf), torch.zeros(5000)])
    k = max(1, round(q * flat.numel()))
    assert mv._kth_smallest(flat, k) == float(torch.kthvalue(flat, k).values)


def test_more_seeds_settings_differ_from_the_grid_only_where_stated():
    grid, more = ex3.GridSettings().as_dict(), ex3.more_seeds_settings().as_dict()
    assert {k for k in grid if grid[k] != more[k]} == {"seeds", "sparsities", "methods", "penalties", "dense_long_steps"}
    assert set(more["seeds"]).isdisjoint(grid["seeds"]) and more["sparsities"] == [0.97]
    assert ex3.grid_log_path(ex3.more_seeds_settings()) != ex3.grid_log_path(ex3.GridSettings())  # separate logs



def test_grid_log_survives_a_torn_line(tmp_path):
    # a run killed mid-write leaves half a line: reading skips it with a warning, the next append cuts it off
    from chapter11.experiments import append_jsonl, read_jsonl

    log = tmp_path / "grid.runs.jsonl"
    append_jsonl(log, {"key": "a", "test": 0.5})
    with open(log, "a") as f:
        f.write('{"key": "b", "te')
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["key"] for r in read_jsonl(log)] == ["a"]
    with pytest.warns(UserWarning, match="cut off a torn last line"):
        append_jsonl(log, {"key": "c", "test": 0.7})
    assert [r["key"] for r in read_jsonl(log)] == ["a", "c"]
    assert log.read_text().count("\n") == 2
    (tmp_path / "only.jsonl").write_text('{"key": "x", "te')  # a log whose only line is torn
    with pytest.warns(UserWarning):
        append_jsonl(tmp_path / "only.jsonl", {"key": "y"})
    assert read_jsonl(tmp_path / "only.jsonl") == [{"key": "y"}]
    log.write_text('{"key": "a"}\nnot json\n{"key": "c"}\n')  # damage in the middle is not a torn write
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(log)
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_scores_can_start_at_the_weight_magnitudes_and_bad_starts_are_refused():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    layer = mv.MaskedLinear.from_linear(linear, method="hard", sparsity=0.5, score_init="magnitude")
    assert torch.equal(layer.scores.detach(), linear.weight.detach().abs())
    assert layer.scores.data_ptr() != linear.weight.data_ptr()  # a copy: learning the scores leaves W alone
    magnitude = mv.MaskedLinear.from_linear(linear, method="magnitude", sparsity=0.5)
    assert torch.equal(layer.mask(), magnitude.mask())  # before any step, hard movement ranks like magnitude
    for bad in ("abs", float("nan"), True):
        with pytest.raises(ValueError, match="score_init"):
            mv.MaskedLinear.from_linear(nn.Linear(6, 4), method="hard", score_init=bad)


def test_ablation_changes_one_factor_and_keeps_the_hold_at_the_final_sparsity():
    base = ex3.GridSettings()
    hold = 1 - base.warmup_frac - base.ramp_frac
    variants = ex3.ablation_variants(base)
    assert variants["baseline"] == {}
    for name, changes in variants.items():
        s = dataclasses.replace(base, **{k: v for k, v in changes.items() if k != "score_init"})
        assert 1 - s.warmup_frac - s.ramp_frac == pytest.approx(hold), name  # the same recovery fraction in every variant
        assert s.config(0).schedule(s.steps, 0.9) == pytest.approx(0.9), name  # every variant reaches 90%
        changed = {k for k, v in dataclasses.asdict(s).items() if v != getattr(base, k)} | ({"score_init"} & set(changes))
        assert changed == set(changes), name
    plan = ex3.ablation_plan()
    assert len(plan) == len(set(plan))
    assert {(v, m) for v, m, _ in plan if m == "magnitude"} == {(v, "magnitude") for v in ("baseline", "warm-up 30%", "warm-up 50%", "450 steps")}
    assert all(len([p for p in plan if p[:2] == (v, "hard")]) == len(ex3.ABLATION_SEEDS) for v in variants)
