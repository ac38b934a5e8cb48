"""N:M masks: hand-computed cases, loop == vectorised, invariants, bad input; LLM shapes,
crossover in tokens, the explicit prefill, the 2:4 checks; GPU paths (skipped without a GPU)."""

import json
import math
import random

import pytest
import torch
from torch import nn

from chapter11.masks import apply_masks
from chapter11.models import tiny_llama
from chapter11.nm import (
    LLAMA_WIDTHS,
    check_2to4_linears,
    crossover_tokens,
    crossover_tokens_loop,
    crossovers,
    decoder_linears,
    gpu_skip_reason,
    is_nm,
    linear_shapes,
    llm_shapes,
    nm_mask,
    nm_mask_loop,
    nm_masks,
    prefill_logits,
    to_semi_structured,
)
from chapter11.experiments.exp08_kernels import (
    semi_main,
    cuda_csr_benchmark,
    random_llama_2to4,
    recorded_gpu_results,
    semi_structured_benchmark,
    semi_structured_llm_benchmark,
)

cuda = pytest.mark.skipif(gpu_skip_reason() is not None, reason=f"GPU test skipped: {gpu_skip_reason()}")


def test_two_four_hand_computed():
    W = torch.tensor([[0.1, -3.0, 2.0, 0.5, 7.0, 0.0, 0.0, -1.0]])
    want = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]])
    assert torch.equal(nm_mask(W), want)
    assert torch.equal(nm_mask_loop(W), want)


def test_ties_keep_the_earlier_position():
    W = torch.ones(2, 4)
    assert nm_mask(W).tolist() == [[1.0, 1.0, 0.0, 0.0]] * 2
    assert torch.equal(nm_mask(W), nm_mask_loop(W))


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (1, 2), (4, 8), (3, 3), (4, 4)])
@pytest.mark.parametrize("shape", [(8, 16), (3, 24), (2, 3, 24)])
def test_loop_and_vectorised_agree_and_invariants(n, m, shape):
    if shape[-1] % m:
        pytest.skip("shape not divisible by m")
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(n * 10 + m))
    W[..., 1::4] = W[..., 0::4]  # some ties
    mask = nm_mask(W, n, m)
    assert torch.equal(mask, nm_mask_loop(W, n, m))
    groups = mask.reshape(-1, m).bool()
    assert (groups.sum(dim=1) == n).all()  # exactly n kept per group
    assert abs((1 - mask.mean().item()) - (1 - n / m)) < 1e-6  # sparsity 1 - n/m
    mags = W.abs().reshape(-1, m)
    min_kept = torch.where(groups, mags, torch.inf).min(dim=1).values
    max_dropped = torch.where(groups, -torch.inf, mags).max(dim=1).values
    assert (min_kept >= max_dropped).all()  # every kept weight outweighs every dropped one
    assert is_nm(W * mask, n, m)


def test_is_nm():
    assert is_nm(torch.tensor([[0.0, 1.0, 0.0, 2.0]]))
    assert not is_nm(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert is_nm(torch.zeros(2, 8))


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.ones(2, 4), 5, 4), ValueError, "n must be at most m"),
        ((torch.ones(2, 6), 2, 4), ValueError, "multiple of m=4"),
        ((torch.ones(2, 4), 0, 4), ValueError, "n must be a positive int"),
        ((torch.ones(2, 4), 2, 2.0), ValueError, "m must be a positive int"),
        ((torch.tensor([[1.0, float("nan"), 0.0, 1.0]]), 2, 4), ValueError, "NaN"),
        ((torch.ones(2, 4, dtype=torch.int64), 2, 4), TypeError, "floats"),
        (([[1.0, 2.0, 3.0, 4.0]], 2, 4), TypeError, "torch.Tensor"),
        ((torch.tensor(1.0), 1, 1), ValueError, "last dimension"),
    ],
)
def test_bad_input(args, error, match):
    for fn in (nm_mask, nm_mask_loop, is_nm):
        with pytest.raises(error, match=match):
            fn(*args)


def test_nm_masks_on_a_model_with_apply_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 3))
    with pytest.raises(ValueError, match="not a multiple of m=8"):
        nm_masks(model, n=2, m=8)
    masks = nm_masks(model, n=2, m=4)
    assert set(masks) == {"0.weight", "2.weight"}
    apply_masks(model, masks)
    assert is_nm(model[0].weight) and is_nm(model[2].weight)
    conv = nn.Conv1d(2, 3, kernel_size=2)  # (3, 2, 2): 4 inputs per output
    cmask = nm_masks(nn.Sequential(conv))["0.weight"]
    assert cmask.shape == conv.weight.shape and cmask.sum().item() == 3 * 2
    assert set(nm_masks(model, exclude=["2"])) == {"0.weight"}


# ------------------------------------------------------------ LLM shapes


@pytest.mark.parametrize("hidden, inter, heads, kv", [(64, 128, 4, 2), (96, 160, 3, 1), (64, 96, 4, 4)])
def test_linear_shapes_match_a_real_llama(hidden, inter, heads, kv):
    model = tiny_llama(vocab_size=32, hidden_size=hidden, num_layers=1, num_heads=heads, num_kv_heads=kv, intermediate_size=inter)
    want = {name.rsplit(".", 1)[-1]: tuple(m.weight.shape) for name, m in decoder_linears(model).items()}
    assert linear_shapes(hidden, inter, heads, kv) == want


def test_llm_shapes_known_widths_and_bad_input():
    smol = LLAMA_WIDTHS["smollm2-135m"]
    assert (smol["hidden_size"], smol["intermediate_size"]) == (576, 1536)
    assert llm_shapes("llama-7b") == [(4096, 4096), (11008, 4096), (4096, 11008)]  # no GQA: k, v are square too
    assert (5632, 2048) in llm_shapes(["llama-1b"]) and (256, 2048) in llm_shapes(["llama-1b"])  # 4 KV heads of 64
    assert len(llm_shapes()) == len(set(llm_shapes()))
    with pytest.raises(ValueError, match="unknown width 'gpt-2'"):
        llm_shapes(["gpt-2"])
    with pytest.raises(ValueError, match="multiple of num_heads"):
        linear_shapes(100, 200, 3)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        linear_shapes(64, 128, 4, 3)
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        linear_shapes(0, 128, 4)


# ------------------------------------------------------------ crossover

CROSSOVER = [crossover_tokens_loop, crossover_tokens]


@pytest.mark.parametrize("fn", CROSSOVER)
def test_crossover_hand_computed(fn):
    # loses at 256 and 1024, wins at 4096: between 1024 and 4096, at the geometric point where the line hits 1
    assert fn([256, 1024, 4096], [0.5, 0.8, 1.2]) == 2048
    assert fn([4096, 256, 1024], [1.2, 0.5, 0.8]) == 2048  # order does not matter
    assert fn([256, 1024], [1.0, 1.3]) == 256  # wins everywhere (1.0 counts as not losing)
    assert fn([256, 1024], [1.3, 0.9]) is None  # still loses at the largest count
    # a win followed by a loss does not count: the crossover is after the last loss
    assert fn([16, 256, 1024, 4096], [1.1, 0.7, 1.4, 2.0]) == round(math.exp(math.log(256) + 0.3 / 0.7 * math.log(4)))


def test_crossover_loop_and_vectorised_agree_on_random_curves():
    rng = random.Random(0)
    for _ in range(200):
        k = rng.randint(1, 6)
        tokens = rng.sample([16, 64, 256, 512, 1024, 2048, 4096, 16384], k)
        speedups = [rng.uniform(0.05, 2.0) for _ in range(k)]
        assert crossover_tokens_loop(tokens, speedups) == crossover_tokens(tokens, speedups), (tokens, speedups)


@pytest.mark.parametrize("fn", CROSSOVER)
@pytest.mark.parametrize("tokens, speedups, match", [
    ([], [], "non-empty"),
    ([16, 32], [1.0], "equal length"),
    ([16, 16], [1.0, 2.0], "distinct"),
    ([0, 16], [1.0, 2.0], "tokens must be a positive int"),
    ([16, 32], [1.0, float("nan")], "positive finite"),
    ([16, 32], [1.0, -1.0], "positive finite"),
])
def test_crossover_bad_input(fn, tokens, speedups, match):
    with pytest.raises(ValueError, match=match):
        fn(tokens, speedups)


def test_crossovers_group_rows_and_skip_failures():
    rows = [{"out_features": 8, "in_features": 4, "mode": m, "tokens": t, "speedup": v, "error": None}
            for m, pts in (("eager", [(256, 0.2), (4096, 0.5)]), ("graph", [(256, 0.5), (4096, 1.5)])) for t, v in pts]
    rows.append({"out_features": 8, "in_features": 4, "mode": "compile", "tokens": 256, "speedup": None, "error": "RuntimeError: no"})
    assert crossovers(rows) == {(8, 4, "eager"): None, (8, 4, "graph"): 1024}


# ------------------------------------------------------------ the 2:4 LLM, CPU parts


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefill_logits_equal_the_model_forward(attn):
    model = tiny_llama(vocab_size=50, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    model.config._attn_implementation = attn
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits[:, -1]  # (3, vocab)
    got = prefill_logits(model, ids)
    assert got.shape == (3, 50)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the causal mask matters: changing a later token must not change an earlier prefix's logits
    with torch.no_grad():
        prefix = prefill_logits(model, ids[:, :6])
        ids2 = ids.clone()
        ids2[:, 6:] = (ids2[:, 6:] + 1) % 50
        torch.testing.assert_close(model(ids2).logits[:, 5], prefix, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input_ids must be a"):
        prefill_logits(model, ids[0])


def test_check_2to4_linears_names_what_is_not_2to4():
    model = tiny_llama(vocab_size=32, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    with pytest.raises(ValueError, match="not 2:4 sparse: model.layers.0.self_attn.q_proj"):
        check_2to4_linears(model)
    apply_masks(model, nm_masks(model, exclude=["lm_head"]))
    names = check_2to4_linears(model)
    assert len(names) == 2 * 7 and all("lm_head" not in n for n in names)
    assert set(decoder_linears(model, exclude=())) == set(names) | {"lm_head"}
    with pytest.raises(ValueError, match="no nn.Linear"):
        check_2to4_linears(nn.Sequential(nn.ReLU()))


def test_random_llama_2to4_has_the_width_and_the_pattern():
    model = random_llama_2to4("smollm2-135m", num_layers=1, vocab_size=64, device="cpu")
    shapes = {tuple(m.weight.shape) for m in decoder_linears(model).values()}
    assert shapes == set(llm_shapes("smollm2-135m"))
    assert len(check_2to4_linears(model)) == 7
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="width must be one of"):
        random_llama_2to4("llama-70b")


def test_gpu_paths_explain_themselves_without_a_gpu(tmp_path, capsys):
    reason = gpu_skip_reason()
    if reason is None:
        pytest.skip("a suitable GPU is present; the cuda tests cover it")
    assert isinstance(reason, str) and "\n" not in reason
    with pytest.raises(RuntimeError, match=reason[:20]):
        semi_structured_benchmark(shapes=[(128, 128)], tokens=(16,))
    model = tiny_llama(vocab_size=32, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128)
    with pytest.raises(RuntimeError, match=reason[:20]):
        to_semi_structured(model)
    apply_masks(model, nm_masks(model, exclude=["lm_head"]))
    with pytest.raises(RuntimeError, match=reason[:20]):
        semi_structured_llm_benchmark(model)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            cuda_csr_benchmark(size=64)
    # the command line says why in one line, still writes its JSON, and succeeds
    out = tmp_path / "semi.json"
    assert semi_main(["--json", str(out)]) == 0
    assert f"skipped the 2:4 GPU benchmark: {reason}" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["skip_reason"] == reason and "layers" not in data and data["machine"]["gpu"] == "none"


def test_bad_arguments_are_refused_before_looking_for_a_gpu():
    with pytest.raises(ValueError, match="modes must be"):
        semi_structured_benchmark(shapes=[(64, 64)], modes=("fast",))
    with pytest.raises(ValueError, match="shapes must hold"):
        semi_structured_benchmark(shapes=[(64, 64, 2)])
    with pytest.raises(ValueError, match="dtype must be"):
        semi_structured_benchmark(shapes=[(64, 64)], dtype=torch.float32)
    model = tiny_llama(vocab_size=32, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        semi_structured_llm_benchmark(model)
    with pytest.raises(ValueError, match="'eager' and 'graph' only"):
        semi_structured_llm_benchmark(model, modes=("compile",))


def test_recorded_gpu_results_carry_their_provenance():
    found = recorded_gpu_results()
    files = {r["file"] for r in found}
    assert {"benchmarks/h200_gpu_check.json", "benchmarks/h200_semi_structured_2to4.json"} <= files
    for r in found:
        assert r["date"] and r["by"] and r["device"]
    check = next(r for r in found if r["file"] == "benchmarks/h200_gpu_check.json")
    ok = [row for row in check["data"]["semi_structured"] if "error" not in row]
    assert ok and all(row["max_rel_err"] < 1e-2 and row["speedup"] > 0 for row in ok)  # checked before it was timed


def test_recorded_gpu_results_need_the_described_files(tmp_path):
    (tmp_path / "provenance.json").write_text(json.dumps({"missing.json": {"kind": "gpu", "date": "d", "by": "b", "device": "x", "what": "w"}}))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        recorded_gpu_results(tmp_path)
    with pytest.raises(FileNotFoundError, match="no benchmarks folder"):
        recorded_gpu_results(tmp_path / "nope")


# ------------------------------------------------------------ GPU (pytest -m cuda)


@pytest.mark.cuda
@cuda
def test_semi_structured_matches_dense_on_gpu():
    rows = semi_structured_benchmark(shapes=[(1024, 1024), (256, 512)], tokens=(64, 512), modes=("eager", "graph"), repeats=3, inner=2)
    assert len(rows) == 2 * 2 * 2
    for r in rows:
        assert r["error"] is None, r
        assert r["max_rel_err"] < 1e-2 and r["speedup"] > 0 and r["dense_s"] > 0
    assert all(r["backend"].startswith("SparseSemiStructured") for r in rows)
    (row,) = semi_structured_benchmark(shapes=[(512, 512)], tokens=(256,), modes=("compile",), repeats=3, inner=2)
    assert row["error"] or (row["max_rel_err"] < 1e-2 and row["speedup"] > 0)  # torch.compile may refuse the subclass; the row says why
    if torch.cuda.get_device_capability(0)[0] != 8:
        return  # torch's CUTLASS 2:4 kernels exist only for compute capability 8.x (A100-class); Hopper uses cuSPARSELt
    rows = semi_structured_benchmark(shapes=[(1024, 1024)], tokens=(256,), repeats=3, backend="cutlass")
    assert "CUTLASS" in rows[0]["backend"]


@pytest.mark.cuda
@cuda
def test_whole_llm_converted_to_2to4_matches_the_masked_model_on_gpu():
    model = tiny_llama(vocab_size=128, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512)
    model.config._attn_implementation = "sdpa"
    apply_masks(model, nm_masks(model, exclude=["lm_head"]))
    result = semi_structured_llm_benchmark(model, prompts=((1, 64), (2, 128)), repeats=2, inner=1, label="tiny", min_top1=0.9)
    assert result["linears"] == 14 and result["logits"]["rel_diff"] < 0.05
    assert {(r["tokens"], r["mode"]) for r in result["rows"]} == {(64, "eager"), (64, "graph"), (256, "eager"), (256, "graph")}
    assert all(r["error"] is None and r["speedup"] > 0 for r in result["rows"]), result["rows"]
    assert set(result["crossover"]) == {"eager", "graph"}
    fp16 = model.half().cuda()
    from chapter11.masks import remove_masks

    remove_masks(fp16)
    names = to_semi_structured(fp16)
    assert len(names) == 14 and type(fp16.model.layers[0].mlp.up_proj.weight).__name__.startswith("SparseSemiStructured")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_csr_matches_dense_on_gpu():
    rows = cuda_csr_benchmark(size=512, sparsities=(0.9,), batches=(1, 8), repeats=3)
    assert len(rows) == 2 and all(r["max_rel_err"] < 1e-4 for r in rows)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_nm_mask_on_gpu_matches_cpu():
    W = torch.randn(64, 128)
    assert torch.equal(nm_mask(W.cuda()).cpu(), nm_mask(W))
