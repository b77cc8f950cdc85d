"""Rows -> chat messages -> prompt token ids, through the tokenizer's own chat template."""
from __future__ import annotations

from typing import Any, Dict, List

from npu_rft.data.schema import Example


def build_messages(example: Example) -> List[Dict[str, str]]:
    """``[{"role": "system", ...}]`` (when the system prompt is not empty) + ``[{"role": "user", "content": context}]``."""
    if example.text is not None:
        raise ValueError(f"{example.location}: a plain-text row has no chat messages; it is for SFT on raw text")
    messages = [{"role": "system", "content": example.system}] if example.system else []
    messages.append({"role": "user", "content": example.context})
    return messages


def encode_prompt(tokenizer: Any, example: Example) -> List[int]:
    """The prompt's token ids: the chat template with the generation prompt (the assistant turn's opening).

    The template is rendered to text and then tokenised without extra special
    tokens, since chat templates write their own (a BOS token, for example).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '')!r}) has no chat template; "
            "use an instruct/chat model's tokenizer, or set tokenizer.chat_template to a Jinja template"
        )
    text = tokenizer.apply_chat_template(build_messages(example), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
