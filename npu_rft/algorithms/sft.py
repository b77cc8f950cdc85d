"""Supervised fine-tuning (SFT) as an algorithm of the shared training loop.

Two kinds of rows, alone or mixed:

- **chat rows** ``{system, context, target}``: the prompt is the chat template
  with the generation prompt (encoded with the row, ``ctx.next_prompts``, under the
  ``data.max_prompt_length`` policy), the completion is the target's tokens
  followed by the tokenizer's EOS (the end of the assistant turn), and only the
  completion counts in the loss;
- **plain-text rows** ``{"text": ...}``: language-model loss on every token of
  the text. The first token is predicted from one start token (the tokenizer's
  BOS, or its EOS where it has none: the document boundary of pretraining).

Text rows may sit in ``data.train`` itself, or come from ``sft.text_data`` and
be mixed into every step in a set proportion: with ``text_fraction = f``, each
step adds ``round(prompts_per_step * f / (1 - f))`` text rows to its
``prompts_per_step`` rows of ``data.train`` (f = 0.5: as many text rows as
training rows), so text rows make up the fraction f of the step. Text rows are
drawn in a fresh seeded order every pass over ``text_data``, split over ranks,
and the position is checkpointed.

A completion longer than ``max_completion_length`` tokens is cut to that
length (counted in ``sft/truncated_rows``).

The loss is the mean negative log-likelihood per completion token over the
whole step (all micro-batches and ranks): ``-sum log p(token) / N``, ``N`` the
number of loss tokens, computed by ``npu_rft_kernels.fused_logprob`` from the
final hidden states and the LM head, so no ``[tokens x vocab]`` logits are
built. Under LoRA or full fine-tuning alike (``model.finetune``); the run's
output starts a GRPO or DPO run as ``model.init_adapter`` (LoRA) or, exported
as a full model directory, as ``model.name_or_path``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from npu_rft.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    AlgorithmState,
    LossOutput,
    MicroBatch,
    StepContext,
    StepPlan,
    collate,
)
from npu_rft.data.schema import DataError, Example, read_examples


@dataclass
class SFTConfig:
    text_data: Optional[str] = None  # JSONL of {"text": ...} rows mixed into every step
    text_fraction: float = 0.0  # share of each step's rows drawn from text_data, in [0, 1)
    max_completion_length: int = 1024  # tokens of a target (with its EOS) or a text row; longer ones are cut

    def __post_init__(self) -> None:
        if not 0.0 <= self.text_fraction < 1.0:
            raise ValueError(
                f"sft.text_fraction={self.text_fraction}: must be in [0, 1) "
                "(0.5 = as many text rows as data.train rows in each step)"
            )
        if (self.text_data is None) != (self.text_fraction == 0.0):
            raise ValueError(
                "sft.text_data and sft.text_fraction go together: set both (a JSONL of {\"text\": ...} rows and "
                "its share of each step, e.g. 0.5), or neither"
            )
        if self.max_completion_length < 1:
            raise ValueError(f"sft.max_completion_length={self.max_completion_length}: must be >= 1")


@ALGORITHMS.register("sft")
class SFT(Algorithm):
    name = "sft"
    config_class = SFTConfig
    uses_graders = False
    accepts_text_rows = True

    def __init__(self, config: SFTConfig, train_config) -> None:
        super().__init__(config, train_config)
        self.backend = train_config.kernels.backend
        self.tile_bytes = train_config.kernels.tile_bytes
        self.micro_batch_size = train_config.batch.micro_batch_size
        self.seed = train_config.run.seed
        self.text_rows: List[Example] = []
        if config.text_data is not None:
            self.text_rows = read_examples(config.text_data, allow_text=True)
            chat = [ex.location for ex in self.text_rows if ex.text is None]
            if chat:
                raise DataError([
                    f"{loc}: sft.text_data takes plain-text rows {{\"text\": ...}} only; put chat rows in data.train"
                    for loc in chat
                ])
        f = config.text_fraction
        self.text_per_step = round(train_config.batch.prompts_per_step * f / (1 - f)) if f else 0
        self.text_cursor = 0  # text rows drawn so far, over all ranks
        self._order: Tuple[int, List[int]] = (-1, [])  # (pass, permutation of text_rows)

    def _text_row(self, position: int) -> Example:
        """The text row at global draw ``position``: pass ``position // n`` walks a
        permutation seeded by (run seed, pass)."""
        n = len(self.text_rows)
        epoch, index = divmod(position, n)
        if self._order[0] != epoch:
            order = list(range(n))
            random.Random(f"{self.seed}:sft-text:{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self.text_rows[self._order[1][index]]

    def _next_text_rows(self, ctx: StepContext) -> List[Example]:
        """This rank's share of the step's ``text_per_step`` mixed-in text rows."""
        positions = range(self.text_cursor, self.text_cursor + self.text_per_step)
        self.text_cursor += self.text_per_step
        return [self._text_row(p) for p in positions[ctx.rank::ctx.world_size]]

    def make_batches(self, ctx: StepContext) -> StepPlan:
        tokenizer = ctx.tokenizer
        drawn = ctx.next_prompts()
        chat = [p for p in drawn if p.example.text is None]
        texts = [p.example for p in drawn if p.example.text is not None] + self._next_text_rows(ctx)
        limit = self.config.max_completion_length
        truncated = 0

        def cut(ids: List[int]) -> List[int]:
            nonlocal truncated
            truncated += len(ids) > limit
            return ids[:limit]

        micro_batches: List[MicroBatch] = []
        kept: Sequence[Example] = []
        if chat:
            kept, prompts = [p.example for p in chat], [p.ids for p in chat]
            completions = [cut(tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
                           for ex in kept]
            if kept:
                micro_batches += collate(prompts, completions, ctx.pad_token_id).split(self.micro_batch_size)
        if texts:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            completions = [cut(tokenizer(ex.text, add_special_tokens=False)["input_ids"]) for ex in texts]
            batch = collate([[start]] * len(texts), completions, ctx.pad_token_id)
            micro_batches += batch.split(self.micro_batch_size)

        counts = [len(kept), len(texts), truncated, sum(int(mb.loss_mask.sum()) for mb in micro_batches)]
        totals = [sum(col) for col in zip(*ctx.all_gather(counts))]
        metrics: Dict[str, float] = dict(zip(
            ("sft/chat_rows", "sft/text_rows", "sft/truncated_rows", "sft/tokens"), map(float, totals)
        ))
        return StepPlan(micro_batches=micro_batches, metrics=metrics)

    def normalizer(self, batch: MicroBatch) -> float:
        return batch.loss_tokens

    def loss(self, hidden: torch.Tensor, weight: torch.Tensor, batch: MicroBatch, normalizer: float) -> LossOutput:
        from npu_rft_kernels import fused_logprob

        targets = batch.completion_ids.masked_fill(~batch.loss_mask, -100)
        logp = fused_logprob(hidden, weight, targets, backend=self.backend, tile_bytes=self.tile_bytes)
        loss = -logp.sum() / normalizer
        return LossOutput(loss, {"loss": loss.detach()})

    def state_dict(self) -> AlgorithmState:
        return AlgorithmState({}, {"text_cursor": self.text_cursor})

    def load_state_dict(self, state: AlgorithmState) -> None:
        if state.tensors or set(state.meta) != {"text_cursor"}:
            raise ValueError(
                f"checkpoint state {sorted(state.meta)} is not SFT's (text_cursor); "
                "resume with the algorithm the checkpoint was written by"
            )
        self.text_cursor = int(state.meta["text_cursor"])


__all__ = ["SFT", "SFTConfig"]
