"""One-shot LLM pruning (chapter11/oneshot.py): twins, an explicit OBS reference, orderings, N:M, bad input, prune_llm."""

import copy
import math

import pytest
import torch

from chapter11.masks import MaskedOptimizer, load_masked, masks_of, save_masked
from chapter11.models import tiny_llama
from chapter11.nm import is_nm
from chapter11.experiments.exp09_oneshot import calibration_ablation, layer_means, prune_and_evaluate, prune_grid
from chapter11.oneshot import (
    METHODS,
    calibration_sequences,
    decoder_layers,
    mask_from_scores,
    mask_from_scores_loop,
    prune_llm,
    sparsegpt_prune,
    sparsegpt_prune_loop,
    statistics_bytes,
    wanda_mask,
    wanda_mask_loop,
    wanda_scores,
    wanda_scores_loop,
)

PATTERNS = [dict(sparsity=0.5), dict(sparsity=0.3), dict(n=2, m=4), dict(n=1, m=4), dict(n=4, m=8)]


def correlated_inputs(seed, tokens=512, d_in=64, outliers=4, scale=10.0, sample=0):
    """Correlated features (a random mixing fixed by `seed`) where a few input dimensions, spread over
    the N:M groups, are `scale` times larger, as in LLMs; `sample` draws another sample of the same distribution."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d_in, d_in, generator=g) / math.sqrt(d_in) + torch.eye(d_in)  # (d_in, d_in) mixing
    g = torch.Generator().manual_seed(10_000 * (sample + 1) + seed)
    X = torch.randn(tokens, d_in, generator=g, dtype=torch.float64) @ A.double()  # (tokens, d_in)
    X[:, torch.arange(outliers) * (d_in // outliers) + 1] *= scale
    return X


def random_layer(seed, d_out=32, d_in=64, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(d_out, d_in, generator=g, dtype=dtype)


# ------------------------------------------------------------------ twins


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wanda_scores_twins_agree(dtype):
    W, X = random_layer(0, 6, 8, dtype), correlated_inputs(0, 20, 8).to(dtype)
    expected = W.abs() * torch.sqrt((X ** 2).sum(0))  # the formula, written out
    torch.testing.assert_close(wanda_scores_loop(W, X).to(dtype), expected)
    torch.testing.assert_close(wanda_scores(W, X).to(dtype), expected)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("scope", ["row", "layer"])
def test_mask_from_scores_twins_agree_ties_included(pattern, scope):
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (5, 16), generator=g).float()  # many ties
    loop = mask_from_scores_loop(scores, scope=scope, **pattern)
    fast = mask_from_scores(scores, scope=scope, **pattern)
    assert torch.equal(loop, fast)
    if "sparsity" in pattern:
        pruned = (fast == 0).sum(dim=1) if scope == "row" else (fast == 0).sum()
        expected = round(pattern["sparsity"] * 16) if scope == "row" else round(pattern["sparsity"] * 80)
        assert torch.all(pruned == expected)
        kept_min = scores[fast == 1].min() if scope == "layer" else None
        if scope == "layer":  # every kept score is at least every pruned one
            assert kept_min >= scores[fast == 0].max()
    else:
        assert torch.all(fast.reshape(5, -1, pattern["m"]).sum(-1) == pattern["n"])


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_mask_from_scores_without_ties_at_the_threshold_matches_the_loop(scope):
    g = torch.Generator().manual_seed(4)
    real = torch.rand(6, 20, generator=g)  # no ties at all: the short path (S > k-th value)
    away = real.clone()
    away[:, :4] = away[:, 4:5] + 10.0  # ties, but among the kept scores only
    for scores in (real, away):
        assert torch.equal(mask_from_scores(scores, sparsity=0.5, scope=scope), mask_from_scores_loop(scores, sparsity=0.5, scope=scope))


def test_mask_from_scores_hand_made_cases():
    s = torch.tensor([[1.0, 1.0, 3.0, 0.5], [2.0, 0.0, 0.0, 9.0]])
    assert mask_from_scores(s, sparsity=0.5).tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]  # ties: earlier pruned first
    assert mask_from_scores(s, sparsity=0.5, scope="layer").tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]  # 0, 0, 0.5 and the first 1.0
    assert mask_from_scores(s, n=1, m=2).tolist() == [[1, 0, 1, 0], [1, 0, 0, 1]]  # ties: earlier kept


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_wanda_mask_twins_agree_and_keep_large_activation_inputs(pattern):
    W, X = random_layer(1, 12, 16), correlated_inputs(1, 40, 16, outliers=2, scale=50.0)
    mask = wanda_mask(W, X, **pattern)
    assert torch.equal(mask, wanda_mask_loop(W, X, **pattern))
    if "sparsity" in pattern:  # the two 50x input features (columns 1 and 9) keep their weights
        assert mask[:, [1, 9]].all()


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("block_size", [8, 128])
def test_sparsegpt_blocked_agrees_with_the_plain_per_column_loop(pattern, block_size):
    W, X = random_layer(2, 10, 24), correlated_inputs(2, 64, 24)
    if "m" in pattern and block_size % pattern["m"]:
        pytest.skip("block_size must be a multiple of m")
    W_fast, mask_fast = sparsegpt_prune(W, X, block_size=block_size, **pattern)
    W_loop, mask_loop = sparsegpt_prune_loop(W, X, block_size=block_size, **pattern)
    assert torch.equal(mask_fast, mask_loop)
    torch.testing.assert_close(W_fast, W_loop, rtol=1e-9, atol=1e-9)
    assert torch.all(W_fast[mask_fast == 0] == 0)


def explicit_obs(W, X, sparsity, block_size, damp=0.01):
    """SparseGPT written with explicit inverses of the remaining sub-Hessians (no Cholesky trick)."""
    W = W.clone().double()
    H = 2 * X.T.double() @ X.double() / X.shape[0]
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    d_out, d_in = W.shape
    mask = torch.ones_like(W)
    inverses = [torch.linalg.inv(H[j:, j:]) for j in range(d_in)]  # H_F^-1 for F = {j, ..., d_in - 1}
    for j in range(d_in):
        if j % block_size == 0:
            end = min(j + block_size, d_in)
            diag = torch.tensor([inverses[k][0, 0].item() for k in range(j, end)], dtype=W.dtype)
            mask[:, j:end] = mask_from_scores(W[:, j:end] ** 2 / diag, sparsity, scope="layer")  # w^2 / [H_F^-1]_jj
        Hinv = inverses[j]
        for i in range(d_out):
            if mask[i, j] == 0:
                W[i, j:] -= W[i, j] / Hinv[0, 0] * Hinv[0, :]  # OBS: delta = -w_q / [H^-1]_qq * H^-1[q, :]
    return W, mask


def test_sparsegpt_matches_the_explicit_optimal_brain_surgeon_update():
    W, X = random_layer(3, 6, 12), correlated_inputs(3, 50, 12)
    W_ref, mask_ref = explicit_obs(W, X, 0.5, block_size=4)
    W_new, mask = sparsegpt_prune(W, X, sparsity=0.5, block_size=4)
    assert torch.equal(mask, mask_ref)
    torch.testing.assert_close(W_new, W_ref, rtol=1e-8, atol=1e-8)


def test_sparsegpt_with_nothing_to_prune_keeps_w_and_a_dead_input_loses_its_weights():
    W, X = random_layer(4, 4, 8), correlated_inputs(4, 30, 8)
    W_new, mask = sparsegpt_prune(W, X, sparsity=0.0)
    assert mask.all() and torch.equal(W_new, W)
    X[:, 3] = 0.0  # an input that never fires
    W_new, mask = sparsegpt_prune(W, X, sparsity=0.25)
    assert torch.all(W_new[:, 3] == 0) and torch.isfinite(W_new).all()


# --------------------------------------------------------------- orderings


def output_error(X, W, W_new):
    return ((X @ (W - W_new).T).norm() / (X @ W.T).norm()).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(n=2, m=4)], ids=str)
def test_output_error_orders_sparsegpt_below_wanda_below_magnitude(seed, pattern):
    W = random_layer(seed)
    X, X_test = correlated_inputs(seed), correlated_inputs(seed, sample=1)  # calibrate on one sample, measure on another
    magnitude = W * mask_from_scores(W.abs(), scope="layer", **pattern)
    wanda = W * wanda_mask(W, X, **pattern)
    sparsegpt, _ = sparsegpt_prune(W, X, **pattern)
    errors = [output_error(X_test, W, w) for w in (sparsegpt, wanda, magnitude)]
    assert errors[0] < errors[1] < errors[2], errors


# ---------------------------------------------------------------- bad input


def test_bad_arguments_raise_and_name_the_argument():
    W, X = random_layer(0, 4, 8), correlated_inputs(0, 10, 8)
    for bad in (float("nan"), 1.0, -0.1):
        with pytest.raises(ValueError, match="sparsity"):
            wanda_mask(W, X, sparsity=bad)
        with pytest.raises(ValueError, match="sparsity"):
            sparsegpt_prune(W, X, sparsity=bad)
    with pytest.raises(ValueError, match="n must be at most m"):
        wanda_mask(W, X, n=4, m=2)
    with pytest.raises(ValueError, match="m must divide d_in"):
        sparsegpt_prune(W, X, n=1, m=3)
    with pytest.raises(ValueError, match="either sparsity or n and m"):
        wanda_mask(W, X, sparsity=0.5, n=2, m=4)
    with pytest.raises(ValueError, match="neither"):
        wanda_mask(W, X)
    with pytest.raises(ValueError, match="X must have d_in = 8"):
        wanda_scores(W, X[:, :6])
    with pytest.raises(ValueError, match="X holds no calibration tokens"):
        sparsegpt_prune(W, X[:0], sparsity=0.5)
    X_nan = X.clone()
    X_nan[3, 2] = float("nan")
    for fn in (wanda_scores, wanda_scores_loop):
        with pytest.raises(ValueError, match="X contains NaN"):
            fn(W, X_nan)
    with pytest.raises(ValueError, match="block_size must be a multiple of m"):
        sparsegpt_prune(W, X, n=2, m=8, block_size=4)
    with pytest.raises(ValueError, match="damp"):
        sparsegpt_prune(W, X, sparsity=0.5, damp=-1.0)
    with pytest.raises(ValueError, match="damp"):  # singular H without damping
        sparsegpt_prune(random_layer(0, 4, 20), correlated_inputs(0, 5, 20), sparsity=0.5, damp=0.0)
    with pytest.raises(TypeError, match="W must be a torch.Tensor"):
        wanda_scores([[1.0]], X)
    with pytest.raises(ValueError, match="method"):
        statistics_bytes(8, "obs")


def test_prune_llm_refuses_bad_models_and_calibration():
    model = tiny_llama(num_layers=1)
    cal = torch.randint(0, 256, (2, 16))
    with pytest.raises(ValueError, match="no decoder blocks"):
        prune_llm(torch.nn.Sequential(torch.nn.Linear(4, 4)), cal)
    with pytest.raises(ValueError, match="calibration must be a non-empty"):
        prune_llm(model, cal[:0])
    with pytest.raises(ValueError, match="calibration: wanda needs"):
        prune_llm(model, None)
    with pytest.raises(TypeError, match="calibration"):
        prune_llm(model, cal.float())
    with pytest.raises(ValueError, match="method"):
        prune_llm(model, cal, method="obd")
    with pytest.raises(ValueError, match="sparsity"):
        prune_llm(model, cal, sparsity=float("nan"))
    with pytest.raises(ValueError, match="does not match 1:4"):
        prune_llm(model, cal, n=1, m=4)  # sparsity=0.5 left at its default
    with pytest.raises(ValueError, match="m must divide d_in.*down_proj"):
        prune_llm(model, cal, sparsity=None, n=2, m=16)  # 344 MLP inputs
    with pytest.raises(ValueError, match="blocks"):
        prune_llm(model, cal, blocks=[3])
    assert not masks_of(model)  # nothing was touched by the refused calls
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prune_llm(model, torch.full((2, 16), 7))


# ----------------------------------------------------------------- prune_llm


@pytest.fixture(scope="module")
def calibration():
    return calibration_sequences(torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0)), 6, seq_len=32, seed=1)


def linear_weights(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("proj.weight")}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(sparsity=None, n=2, m=4)], ids=str)
def test_prune_llm_prunes_only_decoder_linears_on_a_gqa_llama(method, pattern, calibration):
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    dense = copy.deepcopy(model)
    result = prune_llm(model, calibration, method=method, batch_size=4, progress_bar=False, **pattern)
    weights = linear_weights(model)
    assert set(result.layers) == set(weights) == set(masks_of(model)) and len(weights) == 14
    assert result.method == method and result.pattern == ("2:4" if "n" in pattern else "50%")
    assert result.seconds > 0 and result.sparsity == pytest.approx(0.5, abs=1e-3)
    for name, p in weights.items():
        assert result.layers[name] == pytest.approx(0.5, abs=1e-3)
        if "n" in pattern:
            assert is_nm(p.detach(), 2, 4)
        assert result.statistics_bytes[name] == statistics_bytes(p.shape[1], method)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(model.get_parameter(name), dense.get_parameter(name))
    if method != "sparsegpt":  # kept weights are untouched; SparseGPT moves them
        for name, p in weights.items():
            kept = p != 0
            assert torch.equal(p[kept], dense.get_parameter(name)[kept])


def test_prune_llm_calibrates_each_block_on_the_already_pruned_blocks(calibration):
    model = tiny_llama(num_layers=2, num_kv_heads=2)
    twin = copy.deepcopy(model)
    prune_llm(model, calibration, method="wanda", batch_size=len(calibration), progress_bar=False)
    # by hand: prune block 0, then read block 1's Linear inputs from an ordinary forward pass
    prune_llm(twin, calibration, method="wanda", blocks=[0], batch_size=len(calibration), progress_bar=False)
    seen = {}
    hooks = [mod.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].reshape(-1, args[0].shape[-1])))
             for name, mod in decoder_layers(twin)[1].named_modules() if isinstance(mod, torch.nn.Linear)]
    with torch.no_grad():
        twin(calibration)
    for h in hooks:
        h.remove()
    assert len(seen) == 7 and "model.layers.1.mlp.down_proj.weight_mask" not in dict(twin.named_buffers())
    layer1 = decoder_layers(model)[1]
    for name, X in seen.items():
        lin = layer1.get_submodule(name)
        expected = wanda_mask(decoder_layers(twin)[1].get_submodule(name).weight, X, sparsity=0.5)
        agree = (lin.weight_mask == expected).float().mean().item()
        assert agree > 0.999, (name, agree)


def test_prune_llm_sparsegpt_block_zero_matches_sparsegpt_prune_and_beats_wanda(calibration):
    model = tiny_llama(num_layers=1, num_kv_heads=2)
    dense = copy.deepcopy(model)
    result = prune_llm(model, calibration, method="sparsegpt", measure_error=True, progress_bar=False)
    with torch.no_grad():
        X = dense.model.layers[0].input_layernorm(dense.model.embed_tokens(calibration)).reshape(-1, 128)  # (tokens, 128)
    W_new, mask = sparsegpt_prune(dense.model.layers[0].self_attn.q_proj.weight, X, sparsity=0.5)
    q = model.model.layers[0].self_attn.q_proj
    assert (q.weight_mask == mask).float().mean() > 0.999
    torch.testing.assert_close(q.weight, W_new, rtol=1e-3, atol=1e-4)
    wanda = prune_llm(copy.deepcopy(dense), calibration, method="wanda", measure_error=True, progress_bar=False)
    assert set(result.output_error) == set(result.layers)
    assert all(0 < e < 1 for e in result.output_error.values())
    assert sum(result.output_error.values()) < sum(wanda.output_error.values())


def test_prune_llm_magnitude_needs_no_calibration_and_blocks_limit_the_work():
    model = tiny_llama(num_layers=3)
    result = prune_llm(model, None, method="magnitude", sparsity=0.3, blocks=[1], progress_bar=False)
    assert sorted({name.split(".")[2] for name in result.layers}) == ["1"]
    assert all(v == pytest.approx(0.3, abs=2e-3) for v in result.layers.values())
    assert all(".layers.1." in name for name in masks_of(model))
    assert result.statistics_bytes and set(result.statistics_bytes.values()) == {0}


def test_prune_llm_magnitude_per_row_prunes_each_row_alike_and_differs_from_per_layer():
    by_layer, by_row = tiny_llama(num_layers=1), tiny_llama(num_layers=1)
    weights = {name: p.detach().clone() for name, p in linear_weights(by_row).items()}
    prune_llm(by_layer, None, method="magnitude", sparsity=0.5, progress_bar=False)
    prune_llm(by_row, None, method="magnitude", sparsity=0.5, progress_bar=False, magnitude_scope="row")
    for name, W in weights.items():
        kept = by_row.get_parameter(name) != 0
        assert torch.equal(kept, mask_from_scores(W.abs(), sparsity=0.5, scope="row").bool()), name
        assert set((~kept).sum(dim=1).tolist()) == {round(0.5 * W.shape[1])}, name
    assert any(not torch.equal(by_layer.get_parameter(n) != 0, by_row.get_parameter(n) != 0) for n in weights)
    with pytest.raises(ValueError, match="magnitude_scope"):
        prune_llm(tiny_llama(num_layers=1), None, method="magnitude", sparsity=0.5, magnitude_scope="column")


def test_pruned_llm_masks_survive_save_load_and_optimizer_steps(tmp_path, calibration):
    model = tiny_llama(num_layers=2, num_kv_heads=2)
    prune_llm(model, calibration, method="sparsegpt", sparsity=None, n=2, m=4, progress_bar=False)
    path = save_masked(model, tmp_path / "pruned.pt")
    fresh = load_masked(tiny_llama(num_layers=2, num_kv_heads=2, seed=5), path)
    for name, p in linear_weights(fresh).items():
        assert torch.equal(p, model.get_parameter(name)) and is_nm(p.detach(), 2, 4)
    opt = MaskedOptimizer(torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1), fresh)
    fresh.train()
    for _ in range(3):
        opt.zero_grad()
        fresh(calibration, labels=calibration).loss.backward()
        opt.step()
    for name, p in linear_weights(fresh).items():
        assert is_nm(p.detach(), 2, 4) and torch.equal(p == 0, masks_of(fresh)[name] == 0)
        assert not torch.equal(p, model.get_parameter(name))  # it did train


def test_prune_and_evaluate_prunes_a_copy_and_layer_means_group_names(calibration):
    from chapter11.train import perplexity

    model = tiny_llama(num_layers=2, num_kv_heads=2)
    tokens = torch.randint(0, 256, (257,), generator=torch.Generator().manual_seed(2))
    ppl, result = prune_and_evaluate(model, calibration, tokens, method="sparsegpt", seq_len=32, measure_error=True, progress_bar=False)
    assert not masks_of(model) and result.sparsity == pytest.approx(0.5, abs=1e-3)
    assert math.isfinite(ppl) and ppl != perplexity(model, tokens, block_size=32)
    by_projection, by_block = layer_means(result.output_error), layer_means(result.output_error, by="block")
    assert sorted(by_projection) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert sorted(by_block) == [0, 1]
    errors = list(result.output_error.values())
    assert sum(by_block.values()) / 2 == pytest.approx(sum(errors) / len(errors))  # 7 layers per block
    with pytest.raises(ValueError, match="by"):
        layer_means(result.output_error, by="head")


def test_prune_grid_runs_magnitude_once_and_calibrated_methods_per_seed():
    model = tiny_llama(num_layers=1)
    tokens = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(3))
    patterns = {"50%": dict(sparsity=0.5), "1:4": dict(sparsity=None, n=1, m=4)}
    runs = prune_grid(model, tokens, tokens[:129], patterns, seeds=(0, 1), methods=("magnitude", "wanda"),
                      num_sequences=2, seq_len=32, measure_error=("50%",), progress_bar=False)
    assert sorted(runs) == sorted([("magnitude", "50%", 0), ("magnitude", "1:4", 0)]
                                  + [("wanda", p, s) for p in patterns for s in (0, 1)])
    assert runs["wanda", "1:4", 1][1].sparsity == pytest.approx(0.75, abs=1e-3)
    assert runs["wanda", "50%", 0][1].output_error and not runs["wanda", "50%", 1][1].output_error
    assert runs["wanda", "50%", 0][0] != runs["wanda", "50%", 1][0]  # another calibration sample, another model
    assert not masks_of(model)
    with pytest.raises(ValueError, match="methods"):
        prune_grid(model, tokens, tokens, patterns, methods=("obs",))


def test_calibration_sequences_are_seeded_windows():
    tokens = torch.arange(100)
    a, b = calibration_sequences(tokens, 4, 10, seed=3), calibration_sequences(tokens, 4, 10, seed=3)
    assert torch.equal(a, b) and a.shape == (4, 10)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # consecutive tokens
    assert not torch.equal(a, calibration_sequences(tokens, 4, 10, seed=4))
    with pytest.raises(ValueError, match="seq_len"):
        calibration_sequences(tokens, 4, 200)


@pytest.mark.slow
def test_smollm_wanda_2_4_on_three_blocks_keeps_the_rest_dense():
    from chapter11.data import pydoc_topics, text_tokens
    from chapter11.models import load_smollm
    from chapter11.train import perplexity

    model, tokenizer = load_smollm()
    cal = calibration_sequences(text_tokens(tokenizer, pydoc_topics("calibration"), max_tokens=4000), 4, seq_len=64)
    ev = text_tokens(tokenizer, pydoc_topics("evaluation"), max_tokens=4 * 64 + 1)
    dense_ppl = perplexity(model, ev, block_size=64, batch_size=4)
    embed = model.model.embed_tokens.weight.clone()
    result = prune_llm(model, cal, method="wanda", sparsity=None, n=2, m=4, blocks=[0, 1, 2], progress_bar=False)
    assert len(result.layers) == 21 and all(".layers.0." in n or ".layers.1." in n or ".layers.2." in n for n in result.layers)
    for name in result.layers:
        assert is_nm(model.get_parameter(name).detach(), 2, 4)
    assert float((model.model.layers[3].mlp.down_proj.weight == 0).float().mean()) < 0.01
    assert torch.equal(model.model.embed_tokens.weight, embed)
    ppl = perplexity(model, ev, block_size=64, batch_size=4)
    assert dense_ppl < ppl < 3 * dense_ppl, (dense_ppl, ppl)


def test_calibration_ablation_matches_prune_grid_for_the_same_size_and_seed():
    model = tiny_llama(num_layers=1)
    tokens = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(3))
    ablation = calibration_ablation(model, tokens, tokens[:129], sizes=(1, 2), seeds=(0, 1), seq_len=32, progress_bar=False)
    assert sorted(ablation) == [1, 2] and all(len(v) == 2 for v in ablation.values())
    grid = prune_grid(model, tokens, tokens[:129], {"50%": dict(sparsity=0.5)}, seeds=(1,), methods=("wanda",),
                      num_sequences=2, seq_len=32, progress_bar=False)
    assert ablation[2][1] == pytest.approx(grid["wanda", "50%", 1][0], rel=1e-6)  # same sample, same model
    assert ablation[1][0] != ablation[2][0]
    assert not masks_of(model)
    with pytest.raises(ValueError, match="method"):
        calibration_ablation(model, tokens, tokens[:129], sizes=(1,), method="magnitude")
    with pytest.raises(ValueError, match="sizes"):
        calibration_ablation(model, tokens, tokens[:129], sizes=())


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    now = model.state_dict()
    return set(now) == set(state) and all(torch.equal(now[k].nan_to_num(7.0), v.nan_to_num(7.0)) for k, v in state.items())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_llm_refuses_a_broken_last_block_before_changing_anything(method):
    model = tiny_llama(num_layers=3, num_kv_heads=2)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    state = _state(model)
    calib = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="down_proj of block 2 holds NaN"):
        prune_llm(model, calib, method=method, sparsity=0.5, progress_bar=False)
    assert _same(model, state) and not masks_of(model)


def test_prune_llm_refuses_torch_prune_form_before_changing_anything():
    import torch.nn.utils.prune as torch_prune

    model = tiny_llama(num_layers=2, num_kv_heads=2)
    torch_prune.l1_unstructured(model.model.layers[1].self_attn.q_proj, "weight", amount=0.5)
    state = _state(model)
    with pytest.raises(TypeError, match="from_torch_prune"):
        prune_llm(model, None, method="magnitude", sparsity=0.5, progress_bar=False)
    assert _same(model, state)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_llm_failing_midway_puts_every_block_back(method, monkeypatch):
    # a failure in the last block, after blocks 0 and 1 were pruned (and SparseGPT rewrote their weights): all or nothing
    import chapter11.oneshot as oneshot

    model = tiny_llama(num_layers=3, num_kv_heads=2)
    apply_existing = {"model.layers.0.mlp.up_proj.weight": (torch.rand_like(model.model.layers[0].mlp.up_proj.weight) > 0.3).float()}
    from chapter11.masks import apply_masks

    apply_masks(model, apply_existing)  # an earlier mask must come back unchanged too
    state = _state(model)
    calls = {"n": 0}
    real = oneshot._select if method == "wanda" else oneshot._sparsegpt_blocked
    per_block = 7  # q, k, v, o, gate, up, down

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2 * per_block + 3:  # inside block 2
            raise RuntimeError("failed midway")
        return real(*args, **kwargs)

    monkeypatch.setattr(oneshot, "_select" if method == "wanda" else "_sparsegpt_blocked", failing)
    calib = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="failed midway"):
        prune_llm(model, calib, method=method, sparsity=0.5, progress_bar=False)
    assert calls["n"] > 2 * per_block  # blocks 0 and 1 were pruned before the failure
    assert _same(model, state) and set(masks_of(model)) == set(apply_existing)


# ---------------------------------------------------------------- one-shot edge cases (issue 25, item 6)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_nm_pattern_that_does_not_divide_the_width_names_the_width(method):
    model = tiny_llama(num_layers=1)  # hidden 128: 3 does not divide it
    calib = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="m must divide d_in"):
        prune_llm(model, calib, method=method, sparsity=None, n=2, m=3, progress_bar=False)
    with pytest.raises(ValueError, match="block_size must be a multiple of m"):  # SparseGPT's own constraint still says so
        prune_llm(model, calib, method="sparsegpt", sparsity=None, n=2, m=8, block_size=12, progress_bar=False)


def test_sparsegpt_refuses_a_layer_whose_inputs_never_fire():
    # an input that is 0 on every calibration token is "dead": zeroing all of them would overshoot the target
    model = tiny_llama(num_layers=2, num_kv_heads=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.zero_()  # down_proj of block 1 then sees only zeros
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="down_proj of block 1 were exactly 0 on every calibration token"):
        prune_llm(model, calib, method="sparsegpt", sparsity=0.5, progress_bar=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()) and not masks_of(model)
    prune_llm(model, calib, method="wanda", sparsity=0.5, progress_bar=False)  # Wanda has no such trap


def test_captured_inputs_keep_one_attention_mask_for_all_batches():
    from chapter11.oneshot import _capture_inputs, decoder_layers

    model = tiny_llama(num_layers=1)
    model.config._attn_implementation = "eager"  # eager attention gets a (B, 1, T, T) float mask
    batches = list(torch.randint(0, model.config.vocab_size, (12, 32), generator=torch.Generator().manual_seed(0)).split(4))
    inputs = _capture_inputs(model, decoder_layers(model)[0], batches)
    masks = [kw.get("attention_mask") for _, kw in inputs]
    tensors = [m for m in masks if isinstance(m, torch.Tensor)]
    assert len({id(m) for m in tensors}) <= 1  # one tensor, held once, not one per batch


def test_statistics_pass_stops_once_every_layer_has_its_input_and_loses_nothing():
    """The statistics need only each Linear's input: stopping before down_proj's product gives the same sums."""
    from chapter11.oneshot import _capture_inputs, _Statistics, _Stop

    model = tiny_llama(num_layers=1, num_kv_heads=2)
    layer = decoder_layers(model)[0]
    linears = {name: mod for name, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
    batches = list(torch.randint(0, model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0)).split(2))
    inputs = _capture_inputs(model, layer, batches)
    ran = []
    handle = linears["mlp.down_proj"].register_forward_hook(lambda *a: ran.append(1))
    collected = []
    with torch.no_grad():
        for stop in (False, True):
            stats = _Statistics(linears, squares=True, gram=True)
            stats.stop_when_done = stop
            for hidden, kwargs in inputs:
                try:
                    layer(hidden, **kwargs)
                except _Stop:
                    pass
                assert stats.calls == dict.fromkeys(linears, 1)  # LLaMA: each Linear once per pass
                stats.end_batch()
            stats.remove()
            collected.append({name: stats.of(name) for name in linears})
    handle.remove()
    assert len(ran) == len(inputs)  # down_proj's product ran in the full passes only
    for name in linears:
        (sq_a, g_a, n_a), (sq_b, g_b, n_b) = collected[0][name], collected[1][name]
        assert n_a == n_b and torch.equal(sq_a, sq_b) and torch.equal(g_a, g_b)


@pytest.mark.parametrize("twice", [False, True], ids=["llama", "a-layer-called-twice"])
def test_prune_llm_stops_statistics_passes_early_only_when_each_layer_runs_once(calibration, twice):
    """Counted by down_proj's runs: the first statistics pass is full, later ones stop before down_proj, unless a
    Linear runs twice per pass (stopping would lose its second call)."""
    model = tiny_llama(num_layers=2, num_kv_heads=2)
    runs = {0: 0, 1: 0}
    for b, layer in enumerate(decoder_layers(model)):
        mlp = layer.mlp
        layer.mlp.down_proj.register_forward_hook(lambda *a, b=b: runs.__setitem__(b, runs[b] + 1))
        if twice:  # up_proj a second time, after down_proj (its output unused)
            mlp.forward = (lambda mlp: lambda x: mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
                           + 0.0 * mlp.up_proj(2.0 * x)[..., : mlp.down_proj.out_features])(mlp)
    batches = math.ceil(len(calibration) / 2)
    assert batches >= 2
    prune_llm(model, calibration, method="wanda", batch_size=2, progress_bar=False)
    if twice:  # every statistics pass in full, plus block 0's output pass (the capture stops at block 0's input)
        assert runs == {0: 2 * batches, 1: batches}
    else:  # block 0's first statistics pass in full, then only its output pass; block 1 never reaches down_proj
        assert runs == {0: 1 + batches, 1: 0}


def test_wanda_on_a_masked_model_says_the_masks_add_up():
    model = tiny_llama(num_layers=1)
    calib = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    prune_llm(model, None, method="magnitude", sparsity=0.5, progress_bar=False)  # 50% per layer, not per row
    with pytest.warns(UserWarning, match="already held masks"):
        result = prune_llm(model, calib, method="wanda", sparsity=0.5, progress_bar=False)
    assert result.sparsity > 0.505


def test_bench_oneshot_writes_the_ratio_and_the_split(tmp_path):
    """`python -m chapter11 bench oneshot --tiny`: pruning time over a forward pass, and where it went."""
    import json

    from chapter11.experiments.exp09_oneshot import bench_main

    out = tmp_path / "oneshot.json"
    assert bench_main(["--tiny", "--sequences", "2", "--seq-len", "16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["forward_s"] > 0 and set(data["methods"]) == {"wanda", "sparsegpt"}
    for row in data["methods"].values():
        parts = row["seconds_by_part"]
        assert set(parts) == {"capture", "statistics_pass", "pruning", "output_pass", "other"}
        assert min(parts.values()) >= 0 and abs(sum(parts.values()) - row["seconds"]) < 1e-6 + 0.01 * row["seconds"]
        assert row["ratio"] == pytest.approx(row["seconds"] / data["forward_s"])
