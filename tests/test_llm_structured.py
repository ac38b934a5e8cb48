"""MLP-neuron and whole-block pruning of LLaMA decoders, and the cost helpers (chapter11.structured.llm)."""

import copy
import json

import pytest
import torch

from chapter11.masks import apply_masks, masks_of
from chapter11.models import tiny_llama
from chapter11.structured.heads import attention_layers, forward_macs, kept_heads, remove_heads
from chapter11.structured.checkpoint import load_pruned, save_pruned
from chapter11.structured.llm import (
    PARTS,
    block_influence,
    cosine_influence,
    cosine_influence_loop,
    decoder_layers,
    macs_by_part,
    macs_per_token,
    mask_neurons,
    mlp_widths,
    neuron_importance,
    neuron_scores,
    neuron_scores_loop,
    parameter_count,
    remove_blocks,
    remove_neurons,
)
from chapter11.experiments.exp04_heads import CUTS, MATCHED_CUTS, measure_speed, structured_cut, time_by_part

torch.set_num_threads(2)


def _model(layers=3, attn="eager", seed=0):
    model = tiny_llama(hidden_size=48, num_layers=layers, num_heads=6, num_kv_heads=2, intermediate_size=40,
                       max_position_embeddings=64, seed=seed)
    model.config._attn_implementation = attn
    return model.eval()


def _ids(b=2, t=9, seed=0):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


# --------------------------------------------------------------------------- neurons


def test_neuron_scores_loop_equals_vectorised():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 5, 7, generator=g), torch.randn(4, 7, generator=g)
    torch.testing.assert_close(neuron_scores(h, w), neuron_scores_loop(h, w), atol=1e-6, rtol=1e-5)


def test_neuron_importance_is_the_formula_on_the_mlp_input():
    model = _model()
    x = _ids()
    captured = {}
    mlp = model.model.layers[1].mlp
    handle = mlp.register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0]))
    model(x)
    handle.remove()
    with torch.no_grad():
        h = torch.nn.functional.silu(mlp.gate_proj(captured["x"])) * mlp.up_proj(captured["x"])  # (B, T, F)
    expected = h.abs().mean((0, 1)) * mlp.down_proj.weight.norm(dim=0)
    scores = neuron_importance(model, [x])
    assert sorted(scores) == [0, 1, 2] and scores[1].shape == (40,)
    torch.testing.assert_close(scores[1], expected, atol=1e-6, rtol=1e-5)
    split = neuron_importance(model, [x[:1], (x[1:], None)])  # token-weighted: batching does not matter
    torch.testing.assert_close(split[1], scores[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_removed_neurons_equal_masked(attn):
    model, x = _model(attn=attn), _ids()
    plan = {0: [0, 5, 39], 2: list(range(10, 30))}
    masked = _logits(mask_neurons(copy.deepcopy(model), plan), x)
    pruned = remove_neurons(copy.deepcopy(model), plan)
    assert not torch.allclose(masked, _logits(model, x), atol=1e-4)
    torch.testing.assert_close(_logits(pruned, x), masked, atol=2e-5, rtol=1e-4)
    assert mlp_widths(pruned) == [37, 40, 20]
    assert pruned.config.intermediate_size == 40  # uneven: the config keeps its value
    remove_neurons(pruned, {0: [0, 1, 2], 1: list(range(20))})
    assert mlp_widths(pruned) == [34, 20, 20] and pruned.config.intermediate_size == 40
    remove_neurons(pruned, {0: list(range(14))})
    assert mlp_widths(pruned) == [20, 20, 20] and pruned.config.intermediate_size == 20


def test_remove_neurons_slices_masks():
    model = _model(layers=1)
    mlp = model.model.layers[0].mlp
    masks = {f"model.layers.0.mlp.{n}.weight": (torch.rand(getattr(mlp, n).weight.shape) > 0.5).float()
             for n in ("gate_proj", "up_proj", "down_proj")}
    apply_masks(model, masks)
    remove_neurons(model, {0: [1, 3]})
    keep = [j for j in range(40) if j not in (1, 3)]
    after = masks_of(model)
    assert sorted(after) == sorted(masks)
    torch.testing.assert_close(after["model.layers.0.mlp.gate_proj.weight"], masks["model.layers.0.mlp.gate_proj.weight"][keep])
    torch.testing.assert_close(after["model.layers.0.mlp.down_proj.weight"], masks["model.layers.0.mlp.down_proj.weight"][:, keep])


def test_uniform_widths_and_blocks_reload_with_from_pretrained(tmp_path):
    model = remove_blocks(remove_neurons(_model(layers=4), {i: [i, 7, 20] for i in range(4)}), [1])
    assert mlp_widths(model) == [37, 37, 37] and model.config.intermediate_size == 37 and model.config.num_hidden_layers == 3
    model.save_pretrained(tmp_path / "plain")
    reloaded = type(model).from_pretrained(tmp_path / "plain", local_files_only=True).eval()
    x = _ids()
    torch.testing.assert_close(_logits(reloaded, x), _logits(model, x))


def test_uneven_widths_heads_and_depth_survive_save_pruned(tmp_path):
    model = _model(layers=4, attn="sdpa")
    remove_blocks(model, [2])
    remove_neurons(model, {0: [1, 2], 2: list(range(30))})
    remove_heads(model, {0: [1, 4], 1: [3, 4, 5]})
    loaded = load_pruned(save_pruned(model, tmp_path / "all"))
    assert mlp_widths(loaded) == [38, 40, 10] and kept_heads(loaded) == kept_heads(model)
    x = _ids()
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x))
    plan = json.loads((tmp_path / "all" / "pruning_plan.json").read_text())
    assert plan["mlp_widths"] == [38, 40, 10]


# --------------------------------------------------------------------------- blocks


def test_cosine_influence_loop_equals_vectorised():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    assert abs(cosine_influence(a, b) - cosine_influence_loop(a, b)) < 1e-6
    assert abs(cosine_influence(a, 2 * a)) < 1e-7 and abs(cosine_influence(a, -a) - 2) < 1e-7


def _identity_block(model, i):
    """Zero block i's two residual branches (o_proj and down_proj), so it passes its input through."""
    block = decoder_layers(model)[i]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    return model


def test_block_influence_matches_hidden_states_and_finds_identity():
    model = _identity_block(_model(layers=4), 2)
    x = _ids()
    bi = block_influence(model, [x])
    assert bi.shape == (4,) and abs(bi[2].item()) < 1e-6 and (bi[[0, 1, 3]] > 1e-3).all()
    with torch.no_grad():
        states = model(x, output_hidden_states=True).hidden_states  # embeddings, then each block's output
    for l in range(3):  # the last entry may be normalised; the first three are plain block outputs
        assert abs(bi[l].item() - cosine_influence(states[l], states[l + 1])) < 1e-5


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_remove_blocks_equals_identity_block_and_generates(attn):
    model = _model(layers=4, attn=attn)
    reference = _identity_block(copy.deepcopy(model), 1)
    pruned = remove_blocks(copy.deepcopy(model), [1])
    x = _ids()
    torch.testing.assert_close(_logits(pruned, x), _logits(reference, x), atol=2e-5, rtol=1e-4)
    assert len(decoder_layers(pruned)) == 3 and len(attention_layers(pruned)) == 3
    prompt = torch.tensor([[3, 14, 15, 92]])
    out = pruned.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = reference.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_remove_blocks_errors():
    model = _model(layers=2)
    with pytest.raises(ValueError, match="blocks 0..1"):
        remove_blocks(model, [2])
    with pytest.raises(ValueError, match="keep at least one"):
        remove_blocks(model, [0, 1])
    with pytest.raises(ValueError, match="twice"):
        remove_blocks(model, [0, 0])
    with pytest.raises(TypeError, match="integer"):
        remove_blocks(model, [0.5])
    with pytest.raises(TypeError, match="no LLaMA-style"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_neuron_plan_errors():
    model = _model(layers=1)
    with pytest.raises(ValueError, match="keep at least one"):
        remove_neurons(model, {0: range(40)})
    with pytest.raises(ValueError, match="unknown block 3"):
        remove_neurons(model, {3: [0]})
    with pytest.raises(ValueError, match="neurons 0..39"):
        mask_neurons(model, {0: [40]})
    with pytest.raises(TypeError, match="integer"):
        remove_neurons(model, {0: [True]})
    with pytest.raises(TypeError, match="iterable of"):
        neuron_importance(model, _ids())
    assert mlp_widths(model) == [40]


# --------------------------------------------------------------------------- cost


def test_macs_by_part_and_per_token_agree_with_forward_macs():
    model = remove_neurons(remove_heads(_model(), {0: [1, 4], 2: [0, 1, 2]}), {1: list(range(15))})
    T = 9
    x = _ids(b=1, t=T)
    parts = macs_by_part(model, x)
    assert set(parts) == set(PARTS) and sum(parts.values()) == forward_macs(model, x)
    assert forward_macs(model, x) == T * macs_per_token(model, T)
    d, V = 48, 256
    assert parts["lm_head"] == T * d * V and parts["embedding"] == 0
    assert parts["MLP"] == T * 3 * d * (40 + 25 + 40)
    heads = [4, 6, 3]
    kv = [2, 2, 1]
    assert parts["attention projections"] == T * sum(2 * d * h * 8 + 2 * d * k * 8 for h, k in zip(heads, kv))
    assert parts["attention products"] == sum(2 * h * T * T * 8 for h in heads)
    step = macs_by_part(model, x[:, :1], context=30)  # one decoding step over 30 cached positions
    assert sum(step.values()) == macs_per_token(model, 30) and step["MLP"] == parts["MLP"] // T


def test_parameter_count_counts_tied_once_and_shrinks():
    model = _model()
    assert parameter_count(model) == sum(p.numel() for p in set(model.parameters()))
    before = parameter_count(model)
    remove_blocks(model, [0])
    per_block = 4 * 0 + (48 * 48 + 48 * 16 * 2 + 48 * 48) + 3 * 48 * 40 + 2 * 48
    assert before - parameter_count(model) == per_block


def test_time_by_part_and_measure_speed():
    model = _model()
    x = _ids(b=1, t=12)
    seconds = time_by_part(model, lambda: model(x), repeats=2)
    assert set(seconds) == set(PARTS) | {"total"}
    assert all(v >= 0 for v in seconds.values()) and seconds["MLP"] > 0 and seconds["attention projections"] > 0
    assert sum(v for k, v in seconds.items() if k != "total") == pytest.approx(seconds["total"], rel=1e-6)
    small = remove_blocks(copy.deepcopy(model), [0, 1])
    speed = measure_speed({"dense": model, "small": small}, x, x[:, :4], new_tokens=5, repeats=2, warmup=0)
    assert speed["prefill_speedup"]["dense"] == 1.0 and speed["decode_speedup"]["dense"] == 1.0
    assert len(speed["decode"]["times"]["small"]) == 2
    assert set(speed["decode_tokens_per_s"]) == {"dense", "small"}
    assert speed["prefill_rounds"]["dense"] == [1.0, 1.0] and len(speed["decode_rounds"]["small"]) == 2
    threads = torch.get_num_threads()
    cpu = measure_speed({"dense": model, "small": small}, x, x[:, :4], new_tokens=3, repeats=3, warmup=0, clock="cpu", threads=1)
    assert torch.get_num_threads() == threads  # restored
    assert len(cpu["prefill_rounds"]["small"]) == 3 and all(r > 0 for r in cpu["decode_rounds"]["small"])
    assert cpu["prefill_speedup"]["small"] == pytest.approx(
        sorted(cpu["prefill"]["times"]["dense"])[1] / sorted(cpu["prefill"]["times"]["small"])[1])
    batch = _ids(b=3, t=12)
    only = measure_speed({"dense": model, "small": small}, x, x[:, :4], repeats=2, warmup=0, batch_prompt=batch,
                         measures=("prefill_batch",))
    assert set(only) == {"prefill_batch", "prefill_batch_speedup", "prefill_batch_rounds"}  # decoding not timed
    assert only["prefill_batch_speedup"]["dense"] == 1.0 and len(only["prefill_batch"]["times"]["small"]) == 2
    with pytest.raises(ValueError, match="prompt"):
        measure_speed({"dense": model}, x[0], x)
    with pytest.raises(ValueError, match="batch_prompt"):
        measure_speed({"dense": model}, x, x, measures=("prefill_batch",))
    with pytest.raises(ValueError, match="measures"):
        measure_speed({"dense": model}, x, x, measures=("prefill", "latency"))
    with pytest.raises(ValueError, match="clock"):
        measure_speed({"dense": model}, x, x, clock="gpu")
    with pytest.raises(ValueError, match="threads"):
        measure_speed({"dense": model}, x, x, threads=0)


def test_structured_cut_refuses_other_models_and_names():
    model = _model()
    with pytest.raises(ValueError, match="model: the cuts of the recorded run are sized for SmolLM2-135M"):
        structured_cut(model, CUTS[0], {})
    model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads = 30, 9, 3
    model.config.intermediate_size = 1536
    with pytest.raises(ValueError, match="name: unknown cut"):
        structured_cut(model, "heads: all of them", {})
    assert set(MATCHED_CUTS) < set(CUTS) and len(set(CUTS)) == len(CUTS)
