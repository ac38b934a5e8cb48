"""The pretrained LLaMA (SmolLM2-135M) loader, its cache, and the calibration/evaluation text split."""

import pytest
import torch

from chapter11.data import LLM_PARTS, ByteTokenizer, Split, pydoc_topics, text_tokens, validation_loader, with_validation
from chapter11.models import cache_dir, load_smollm, smollm_path


def test_pydoc_halves_are_disjoint_and_cover_every_distinct_topic():
    from pydoc_data.topics import topics

    calibration, evaluation = (pydoc_topics(part) for part in LLM_PARTS)
    assert not set(calibration) & set(evaluation)
    assert set(calibration) | set(evaluation) == set(topics.values())
    assert abs(len(calibration) - len(evaluation)) <= 1
    assert not any(a in b or b in a for a in calibration[:5] for b in evaluation[:5])
    with pytest.raises(ValueError, match="part"):
        pydoc_topics("train")


def test_text_tokens_joins_and_truncates():
    ids = text_tokens(ByteTokenizer(), ["ab", "c"])
    assert ids.tolist() == list(b"ab\n\nc") and ids.dtype == torch.long
    assert text_tokens(ByteTokenizer(), "abc", max_tokens=2).tolist() == [97, 98]
    with pytest.raises(ValueError, match="texts"):
        text_tokens(ByteTokenizer(), [])
    with pytest.raises(ValueError, match="max_tokens"):
        text_tokens(ByteTokenizer(), "abc", max_tokens=0)


def test_with_validation_keeps_test_and_splits_train_without_overlap():
    X = torch.arange(20.0).unsqueeze(1)
    s = with_validation(Split(X, torch.arange(20), X[:5], torch.arange(5), 20), 0.25, seed=1)
    assert len(s.y_train) == 15 and len(s.y_val) == 5 and torch.equal(s.X_test, X[:5])
    assert sorted(s.y_train.tolist() + s.y_val.tolist()) == list(range(20))
    assert len(next(iter(validation_loader(s)))[0]) == 5
    with pytest.raises(ValueError, match="fraction"):
        with_validation(Split(X, torch.arange(20), X, torch.arange(20), 20), 1.5)
    with pytest.raises(ValueError, match="already"):
        with_validation(s)
    with pytest.raises(ValueError, match="validation"):
        validation_loader(Split(X, torch.arange(20), X, torch.arange(20), 20))


def test_load_smollm_refuses_missing_and_wrong_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        load_smollm(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match=".gguf"):
        load_smollm(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_smollm(tmp_path)
    with pytest.raises(TypeError, match="path"):
        load_smollm(3)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CH11_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("CH11_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "chapter11"


@pytest.mark.slow
def test_packaged_smollm_is_the_grouped_query_llama_and_cached_load_is_identical(tmp_path, monkeypatch):
    path = smollm_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50e6
    model, tokenizer = load_smollm()
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.intermediate_size) == (30, 9, 3, 576, 1536)
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(c, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    again, _ = load_smollm()  # from the cache
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    ids = text_tokens(tokenizer, pydoc_topics("evaluation"), max_tokens=65)
    with torch.no_grad():
        logits = model(ids[:64].unsqueeze(0)).logits  # (1, 64, vocab)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:64])
    assert 1.0 < loss.item() < 5.0, loss.item()  # a real language model: ppl well below the 49k vocabulary
    # the folder route: the cached checkpoint is a plain Hugging Face folder
    folder = next((cache_dir() / "gguf").glob(path.stem + "-*"))
    from_folder, _ = load_smollm(folder)
    assert torch.equal(from_folder.lm_head.weight, model.lm_head.weight)
