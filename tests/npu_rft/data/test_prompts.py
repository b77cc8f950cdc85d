import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from npu_rft.data.prompts import build_messages, encode_prompt
from npu_rft.data.schema import Example

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(chat_template=CHAT_TEMPLATE):
    """A word-level tokenizer trained here on a few words (nothing is downloaded)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = ["<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok.train_from_iterator(["be brief rank these diseases"], trainers.WordLevelTrainer(special_tokens=special))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.chat_template = chat_template
    return fast


def test_build_messages():
    assert build_messages(Example("rank these", "x", system="be brief")) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "rank these"},
    ]
    assert build_messages(Example("rank these", "x", system="")) == [{"role": "user", "content": "rank these"}]
    with pytest.raises(ValueError, match="plain-text row"):
        build_messages(Example("", "", text="raw", location="d.jsonl:3"))


def test_encode_prompt_uses_the_chat_template_with_generation_prompt():
    tokenizer = tiny_tokenizer()
    ids = encode_prompt(tokenizer, Example("rank these diseases", "x", system="be brief"))
    expected = "<|system|> be brief <|end|> <|user|> rank these diseases <|end|> <|assistant|>"
    assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[-1] == "<|assistant|>"
    assert tokenizer.unk_token_id not in ids


def test_encode_prompt_without_chat_template_says_how_to_fix():
    with pytest.raises(ValueError, match="has no chat template; use an instruct/chat model's tokenizer"):
        encode_prompt(tiny_tokenizer(chat_template=None), Example("rank these", "x"))
