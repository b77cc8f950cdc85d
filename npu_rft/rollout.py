"""Sampling completions from the policy: K per prompt.

``CachedSampler`` is our decode loop around the HF model's own decoder and KV
cache. Per batch of prompts it

1. left-pads the prompts and prefills them ONCE through the decoder, with
   logits for the last position only;
2. repeats each prompt's cache K times (``Cache.batch_repeat_interleave``): the
   K samples share the prefill instead of recomputing it;
3. decodes one token per step for all live rows; on CPU a row leaves the
   batch (and its cache) as soon as it emits an end-of-sequence token.

Three things make a decode step cheaper than the model's own forward:

- the logits come from the decoder's last hidden state and the LM head weight,
  through the product the device's hardware profile gives
  (``Device.hardware.decode_head``: ``(W @ h^T)^T`` on accelerators, oneDNN's
  linear with packed weights on CPU, see ``npu_rft.cpu``);
- under LoRA, sampling runs with merged weights (``npu_rft.hf.merged_lora``): one
  GEMM per adapted layer and no adapter work per step, the frozen base weights
  untouched;
- host reads follow ``Device.hardware.decode_sync_every``: on CPU the loop
  reads its finished flags every token and drops finished rows from the batch
  (and its cache) at once; on NPU and CUDA, where every host read stalls the
  device, lengths and finished flags stay on the device, finished rows keep
  decoding padding, and completion is checked every 32 tokens. Every host
  read goes through ``Device.to_host``, which counts them.

Token choice per step (``sample_tokens``): greedy is an argmax; otherwise one
fused ``softmax(logits / T)``, a cumulative sum and one uniform number per row
(inverse-CDF sampling): no per-element random numbers over the vocabulary and
no ``torch.multinomial``, which is several times slower than the softmax on
CPU at V = 151,936. ``top_p < 1`` adds a sort (nucleus sampling).

``GenerateSampler`` calls ``model.generate`` (which copies each prompt K times);
it is the fallback for models whose forward our loop cannot drive, or whose
logits are not a plain linear head of the decoder's hidden state.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Protocol, Sequence

import torch
from torch import nn

from npu_rft.hf import base_model, cache_kwarg, head_problem, lm_head_weight, merged_lora

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    num_samples: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise ValueError(f"SamplingParams: max_new_tokens={self.max_new_tokens} and num_samples={self.num_samples} must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: temperature={self.temperature} must be >= 0 and top_p={self.top_p} in (0, 1]")


@dataclass
class Samples:
    prompt_index: List[int]  # M = P * num_samples, prompt-major
    completion_ids: List[List[int]]  # unpadded; EOS kept when produced
    truncated: List[bool]  # stopped by max_new_tokens, not EOS
    # the engine's log-prob of each completion token (after temperature), or None (the native engine)
    logprobs: Optional[List[List[float]]] = None


class Sampler(Protocol):
    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        generator: Optional[torch.Generator] = None,
    ) -> Samples: ...


@torch.profiler.record_function("rollout/sample_tokens")
def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """One token per row of ``logits [M, V]`` (fp32; may be overwritten).

    Greedy (``temperature == 0``): ``argmax``. Otherwise ``p = softmax(logits / T)``,
    restricted with ``top_p < 1`` to the smallest set of most likely tokens
    whose mass reaches ``top_p``; the token is the first index whose cumulative
    probability exceeds ``u * total`` with ``u ~ U[0, 1)`` (exact up to fp32
    rounding of the cumulative sum, ~1e-7).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits.div_(temperature)
    probs = torch.softmax(logits, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        mass_before = probs.cumsum(dim=-1) - probs
        probs.masked_fill_(mass_before >= top_p, 0.0)
    cdf = probs.cumsum_(dim=-1)  # in place: one [M, V] buffer fewer per token
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
    if order is not None:
        index = order.gather(1, index)
    return index.squeeze(1)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [P, L], mask [P, L])`` with each prompt right-aligned."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (the chat template's)")
        ids[i, length - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, length - len(p):] = 1
    return ids.to(device), mask.to(device)


def _chunks(n: int, size: Optional[int]) -> Iterable[range]:
    size = size or n
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


class CachedSampler:
    """Prefill once per prompt, share the KV cache across its K samples, decode in a batch."""

    def __init__(
        self,
        model: Any,
        *,
        eos_token_ids: Iterable[int],
        pad_token_id: int,
        device: Any,
        prompts_per_call: Optional[int] = None,
    ) -> None:
        self.model = model
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device.torch_device)
        if self.eos.numel() == 0:
            raise ValueError("CachedSampler needs at least one end-of-sequence token id; the tokenizer has none")
        self.pad_token_id = pad_token_id
        self.device = device
        self.prompts_per_call = prompts_per_call
        self.decoder = base_model(model).get_decoder()
        self.cache_kwarg = cache_kwarg(self.decoder)

    @torch.inference_mode()
    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        generator: Optional[torch.Generator] = None,
    ) -> Samples:
        out = Samples([], [], [])
        hardware = self.device.hardware
        with merged_lora(self.model), hardware.decode_head(lm_head_weight(self.model), self.decoder) as head:
            for chunk in _chunks(len(prompt_ids), self.prompts_per_call):
                prompts = [prompt_ids[i] for i in chunk]
                if hardware.decode_sync_every is None:
                    completions, truncated = self._sample_dropping_rows(head, prompts, params, generator)
                else:
                    completions, truncated = self._sample_on_device(head, prompts, params, generator,
                                                                    hardware.decode_sync_every)
                out.prompt_index.extend(i for i in chunk for _ in range(params.num_samples))
                out.completion_ids.extend(completions)
                out.truncated.extend(truncated)
        return out

    def _forward(self, head, ids, mask, positions, cache):
        """Logits ``[rows, V]`` (fp32) at each row's last position, and the cache."""
        kwargs = {self.cache_kwarg: cache} if cache is not None else {}
        with self.device.autocast(), torch.profiler.record_function("rollout/prefill" if cache is None else "rollout/decode"):
            out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
            logits = head(out.last_hidden_state[:, -1].contiguous())
        return logits, getattr(out, self.cache_kwarg)

    def _prefill(self, head, prompts, k: int):
        """Prefill once per prompt, then repeat each prompt's cache, logits and mask ``k`` times."""
        ids, mask = left_pad(prompts, self.pad_token_id, self.device.torch_device)
        positions = (mask.cumsum(dim=1) - 1).clamp_(min=0)
        logits, cache = self._forward(head, ids, mask, positions, None)
        if k > 1:
            cache.batch_repeat_interleave(k)
            logits = logits.repeat_interleave(k, dim=0)
            mask = mask.repeat_interleave(k, dim=0)
        return logits, cache, mask, positions[:, -1].repeat_interleave(k) + 1

    def _sample_dropping_rows(self, head, prompts, params: SamplingParams, generator) -> tuple[List[List[int]], List[bool]]:
        """CPU: read the finished flags every token and drop finished rows at once."""
        logits, cache, mask, next_position = self._prefill(head, prompts, params.num_samples)
        rows = torch.arange(mask.shape[0], device=mask.device)  # output row of each live batch row
        tokens = torch.full((len(rows), params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=mask.device)
        lengths = torch.zeros(len(rows), dtype=torch.long, device=mask.device)
        finished = torch.zeros(len(rows), dtype=torch.bool, device=mask.device)
        for t in range(params.max_new_tokens):
            token = sample_tokens(logits, params.temperature, params.top_p, generator)
            tokens[rows, t] = token
            lengths[rows] = t + 1
            done = torch.isin(token, self.eos)
            if t == params.max_new_tokens - 1:
                finished[rows[done]] = True
                break
            if self.device.to_host(done.any()):
                finished[rows[done]] = True
                live = (~done).nonzero().flatten()
                if live.numel() == 0:
                    break
                cache.batch_select_indices(live)
                rows, mask, next_position, token = rows[live], mask[live], next_position[live], token[live]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            logits, cache = self._forward(head, token[:, None], mask, next_position[:, None], cache)
            next_position = next_position + 1
        return self._completions(tokens, lengths, finished)

    def _sample_on_device(self, head, prompts, params: SamplingParams, generator,
                          check_every: int) -> tuple[List[List[int]], List[bool]]:
        """NPU/CUDA: lengths and finished flags stay on the device; finished rows
        decode padding; completion is read on the host every ``check_every`` tokens."""
        logits, cache, mask, next_position = self._prefill(head, prompts, params.num_samples)
        rows = mask.shape[0]
        tokens = torch.full((rows, params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=mask.device)
        lengths = torch.zeros(rows, dtype=torch.long, device=mask.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=mask.device)
        pad = torch.full_like(lengths, self.pad_token_id)
        for t in range(params.max_new_tokens):
            token = torch.where(finished, pad, sample_tokens(logits, params.temperature, params.top_p, generator))
            tokens[:, t] = token
            lengths += (~finished).long()
            finished |= torch.isin(token, self.eos)
            last = t == params.max_new_tokens - 1
            if last or ((t + 1) % check_every == 0 and self.device.to_host(finished.all())):
                break
            mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
            logits, cache = self._forward(head, token[:, None], mask, next_position[:, None], cache)
            next_position = next_position + 1
        return self._completions(tokens, lengths, finished)

    def _completions(self, tokens, lengths, finished) -> tuple[List[List[int]], List[bool]]:
        tokens, lengths, finished = self.device.to_host(tokens, lengths, finished)
        return [row[:n] for row, n in zip(tokens, lengths)], [not f for f in finished]


class GenerateSampler:
    """``model.generate`` with ``num_return_sequences = K`` (under LoRA with
    merged weights, as in the loop); samples from torch's global RNG
    (``generate`` takes no generator), so seed it for reproducibility.
    Greedy decoding runs once per prompt and repeats the result K times."""

    def __init__(self, model: Any, *, eos_token_ids: Iterable[int], pad_token_id: int, device: Any,
                 prompts_per_call: Optional[int] = None) -> None:
        self.model = model
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.pad_token_id = pad_token_id
        self.device = device
        self.prompts_per_call = prompts_per_call

    @torch.no_grad()
    def sample(self, prompt_ids, params: SamplingParams, generator: Optional[torch.Generator] = None) -> Samples:
        out = Samples([], [], [])
        greedy = params.temperature == 0
        for chunk in _chunks(len(prompt_ids), self.prompts_per_call):
            ids, mask = left_pad([prompt_ids[i] for i in chunk], self.pad_token_id, self.device.torch_device)
            with self.device.autocast(), merged_lora(self.model):
                generated = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=params.max_new_tokens,
                    do_sample=not greedy,
                    temperature=None if greedy else params.temperature,
                    top_p=None if greedy else params.top_p,
                    top_k=None,
                    num_return_sequences=1 if greedy else params.num_samples,
                    eos_token_id=self.eos_token_ids,
                    pad_token_id=self.pad_token_id,
                )
            if greedy:
                generated = generated.repeat_interleave(params.num_samples, dim=0)
            for row, seq in enumerate(self.device.to_host(generated[:, ids.shape[1]:])):
                completion, stopped = [], False
                for token in seq:
                    completion.append(token)
                    if token in self.eos_token_ids:
                        stopped = True
                        break
                out.prompt_index.append(chunk[row // params.num_samples])
                out.completion_ids.append(completion)
                out.truncated.append(not stopped)
        return out


def loop_problem(model: Any) -> Optional[str]:
    """Why ``CachedSampler`` cannot drive the model, or None when it can: it
    needs the model's decoder (``get_decoder()``) with a forward that takes a KV
    cache and ``position_ids``, and logits that are the LM head weight times the
    decoder's last hidden state (``model.head_problem``)."""
    inner = base_model(model)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if decoder is None or decoder is inner:
        return f"{type(inner).__name__} has no separate decoder (get_decoder())"
    params = inspect.signature(decoder.forward).parameters
    if "position_ids" not in params or not ("cache" in params or "past_key_values" in params):
        return f"{type(decoder).__name__}.forward takes no KV cache or position_ids"
    return head_problem(model)


def eos_token_ids(model: Any, tokenizer: Any) -> List[int]:
    """End-of-sequence ids: the tokenizer's, plus the generation config's (an int or a list)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    if not ids:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token and the model's generation config "
            "names none; set tokenizer.eos_token (for chat models, the end-of-turn token)"
        )
    return sorted(ids)


def make_sampler(model: Any, tokenizer: Any, device: Any, kind: str = "auto",
                 prompts_per_call: Optional[int] = None) -> Sampler:
    """``kind``: ``loop`` (``CachedSampler``), ``generate`` (``GenerateSampler``),
    or ``auto`` (the loop when the model supports it)."""
    if kind not in ("auto", "loop", "generate"):
        raise ValueError(f"sampler kind {kind!r}: must be auto, loop or generate")
    problem = loop_problem(model) if kind in ("auto", "loop") else None
    if kind == "loop" and problem is not None:
        raise ValueError(f"{problem}, so the decode loop cannot drive it; set rollout.sampler: generate")
    if kind == "auto":
        kind = "loop" if problem is None else "generate"
        if problem is not None:
            logger.info("rollout: %s; using model.generate", problem)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cls = CachedSampler if kind == "loop" else GenerateSampler
    return cls(model, eos_token_ids=eos_token_ids(model, tokenizer), pad_token_id=pad, device=device,
               prompts_per_call=prompts_per_call)
