"""Build, and cache, a tiny Qwen2-architecture chat model for the quickstart.

``build_tiny_model(texts, names)`` returns a directory that the ordinary loading
code reads (``AutoTokenizer.from_pretrained(dir)``,
``AutoModelForCausalLM.from_pretrained(dir)``):

- a byte-level BPE tokenizer trained locally (``tokenizers``) on ``texts``,
  with every string of ``names`` (disease and symptom names) added as one
  token, and ChatML special tokens ``<|im_start|>``, ``<|im_end|>`` (the EOS)
  and ``<|endoftext|>`` (padding);
- a ChatML chat template (``<|im_start|>role\\ncontent<|im_end|>\\n`` per
  message; the generation prompt is ``<|im_start|>assistant\\n``);
- a randomly initialised ``Qwen2ForCausalLM`` of about half a million
  parameters (``TinyModelSpec``), saved with ``save_pretrained``.

The directory lives in the user's cache (``cache_root()``), under a name that
is a hash of the recipe: ``RECIPE_VERSION``, the spec, ``names`` and
``texts``. A second call with the same inputs returns it without building.
It is built in a temporary sibling directory and renamed into place, so a
crash or a concurrent build never leaves a half-written model behind.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from npu_rft.config_base import to_dict

logger = logging.getLogger(__name__)

# Bump when the build code changes in a way that changes its output.
RECIPE_VERSION = 1

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", EOS_TOKEN)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2's pre-tokenizer split. transformers 5 loads any Qwen2 model directory
# with its Qwen2 tokenizer class, which rebuilds the pipeline (NFC, this split,
# byte-level) around the saved vocabulary and merges; training the BPE with the
# same pipeline makes the loaded tokenizer encode exactly as the trained one.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of the tiny model; the defaults give about 0.5M parameters."""

    bpe_vocab_size: int = 1024     # the BPE's own vocabulary; names are added on top
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bpe_vocab_size < 300:
            raise ValueError(
                f"bpe_vocab_size={self.bpe_vocab_size} is below 256 bytes + specials + merges; use >= 300"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                f"{self.num_attention_heads}; pick sizes that divide"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; pick sizes that divide"
            )


def cache_root() -> Path:
    """``$NPU_RFT_CACHE``, else ``$XDG_CACHE_HOME/npu-rft``, else ``~/.cache/npu-rft``."""
    if os.environ.get("NPU_RFT_CACHE"):
        return Path(os.environ["NPU_RFT_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "npu-rft"
    return Path.home() / ".cache" / "npu-rft"


def recipe_hash(texts: Sequence[str], names: Sequence[str], spec: TinyModelSpec) -> str:
    """A hex digest of everything the built directory depends on."""
    recipe = {"version": RECIPE_VERSION, "spec": to_dict(spec), "names": list(names), "texts": list(texts)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def build_tokenizer(texts: Iterable[str], names: Sequence[str], bpe_vocab_size: int):
    """A ``PreTrainedTokenizerFast``: byte-level BPE (Qwen2's normaliser and
    pre-tokenizer) trained on ``texts``, each of ``names`` one added token,
    ChatML specials and chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(n, normalized=False) for n in names])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_model(tokenizer, spec: TinyModelSpec):
    """A randomly initialised ``Qwen2ForCausalLM`` sized by ``spec`` (seeded, without
    touching the global RNG)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny_model(
    texts: Sequence[str],
    names: Sequence[str],
    *,
    spec: TinyModelSpec = TinyModelSpec(),
    cache_dir: str | Path | None = None,
) -> Path:
    """The cached model directory for this recipe, built first if absent.

    ``texts``: the tokenizer's training text; ``names``: strings that must each
    be one token; ``cache_dir``: defaults to ``cache_root()``.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / "tiny-models" / f"qwen2-tiny-{recipe_hash(texts, names, spec)}"
    if target.is_dir():
        logger.info("tiny model: cached at %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = build_tokenizer(texts, names, spec.bpe_vocab_size)
        model = build_model(tokenizer, spec)
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a concurrent build that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("tiny model: built %s (%d parameters, vocabulary %d)", target, n_params, len(tokenizer))
    return target
