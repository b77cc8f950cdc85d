"""Tests for the tiny model builder: the cache, the tokenizer (names are single
tokens, the loaded tokenizer encodes as the trained one), the chat template and
the model, all read back with the ordinary transformers loaders."""
from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from npu_rft.quickstart import sample_data as sd
from npu_rft.quickstart import tiny_model as tm

TEXTS = sd.fact_corpus()[:200] + ["Explicit symptoms: [['fever', 'True'], ['cough', 'False']]"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, tm.build_tiny_model(TEXTS, sd.vocabulary(), cache_dir=cache)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NPU_RFT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert tm.cache_root() == tmp_path / "a"
    monkeypatch.delenv("NPU_RFT_CACHE")
    assert tm.cache_root() == tmp_path / "x" / "npu-rft"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tm.cache_root() == tmp_path / "home" / ".cache" / "npu-rft"


def test_built_once_then_served_from_the_cache(built, monkeypatch):
    cache, path = built
    assert path.parent == cache / "tiny-models"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary directory left
    monkeypatch.setattr(tm, "build_tokenizer", lambda *a, **k: pytest.fail("rebuilt a cached model"))
    assert tm.build_tiny_model(TEXTS, sd.vocabulary(), cache_dir=cache) == path


def test_the_key_changes_with_every_input():
    spec = tm.TinyModelSpec()
    key = tm.recipe_hash(TEXTS, ["a"], spec)
    assert key == tm.recipe_hash(list(TEXTS), ["a"], tm.TinyModelSpec())
    assert key != tm.recipe_hash(TEXTS + ["x"], ["a"], spec)
    assert key != tm.recipe_hash(TEXTS, ["b"], spec)
    assert key != tm.recipe_hash(TEXTS, ["a"], tm.TinyModelSpec(seed=1))


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tm, "build_model", boom)
    with pytest.raises(RuntimeError, match="boom"):
        tm.build_tiny_model(TEXTS, ["fever"], cache_dir=tmp_path)
    assert list((tmp_path / "tiny-models").iterdir()) == []


def test_tokenizer_loads_back_and_keeps_names_whole(built):
    _, path = built
    tok = AutoTokenizer.from_pretrained(path)
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    for name in sd.vocabulary():
        assert len(tok(name, add_special_tokens=False)["input_ids"]) == 1, name
    for text in TEXTS[:50] + ['{"possible_diseases": ["gout", "asthma"]}', "it's 2024\n\n x"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_model_is_a_half_million_parameter_qwen2(built):
    _, path = built
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    assert 300_000 < sum(p.numel() for p in model.parameters()) < 700_000


def test_spec_rejects_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="num_attention_heads"):
        tm.TinyModelSpec(hidden_size=90, num_attention_heads=4)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tm.TinyModelSpec(num_attention_heads=4, num_key_value_heads=3)
