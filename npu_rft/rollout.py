"""Sampling completions from the policy: K per prompt.

``CachedSampler`` is our decode loop around the HF model's own decoder and KV
cache. Per batch of prompts it

1. left-pads the prompts and prefills them ONCE through the decoder, with
   logits for the last position only;
2. repeats each prompt's cache K times (``Cache.batch_repeat_interleave``): the
   K samples share the prefill instead of recomputing it;
3. decodes one token per step for all live rows, and drops a row from the
   batch (and its cache) as soon as it emits an end-of-sequence token, so
   finished rows cost nothing.

Three things make a decode step cheaper than the model's own forward:

- the logits come from the decoder's last hidden state and the LM head weight
  (``head_logits``), as ``(W @ h^T)^T``: the same product as ``h @ W^T``, but
  BLAS on CPU runs the skinny ``[V, H] x [H, rows]`` form about twice as fast as
  the ``[rows, H] x [H, V]`` one that ``nn.Linear`` uses (19 vs 36-53 ms at
  V = 151,936 with 8 rows, 1 thread, see docs/performance.md);
- under LoRA, sampling runs with merged weights (``npu_rft.model.merged_lora``): one
  GEMM per adapted layer and no adapter work per step, the frozen base weights
  untouched;
- on CPU in fp32 (``head_product``, ``packed_linears``), the head and the
  decoder's linears run oneDNN's linear with their weights packed once per
  rollout: with the few rows of a decode step it ran 25-40% faster than
  ``F.linear`` (MLP projections) and 3x faster than ``(W @ h^T)^T`` (a head of
  8,000 x 256), see docs/performance.md. The packed copies live for the
  rollout, so they share a budget of ``PACK_MAX_BYTES`` (64 MiB): the head
  first, then the decoder's linears in order while the budget lasts, so a
  bigger model packs only part of its decoder instead of doubling its weights'
  memory during sampling. A head over the budget keeps ``(W @ h^T)^T``, and
  then nothing is packed: its GEMM dominates each decode step, and at
  V = 151,936 packing the decoder beside it saved 2% of the rollout (1.96
  against 2.01 s) for 13 MB more peak RSS.

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

import contextlib
import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Protocol, Sequence

import torch
from torch import nn

from npu_rft.model import base_model, head_problem, lm_head_weight, merged_lora

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


class Sampler(Protocol):
    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        generator: Optional[torch.Generator] = None,
    ) -> Samples: ...


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


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits ``hidden @ weight^T`` as a contiguous fp32 ``[rows, V]`` tensor,
    computed as ``(weight @ hidden^T)^T`` (see the module docstring: the form
    BLAS runs fastest for a few rows; the transpose back is one copy)."""
    return torch.mm(weight, hidden.t()).t().contiguous().float()


# The packed weight copies of a rollout (head and decoder together) live that
# long; they stay within this many bytes.
PACK_MAX_BYTES = 64 * 2**20


@contextlib.contextmanager
def packed_linears(module: nn.Module, budget_bytes: int = PACK_MAX_BYTES) -> Iterator[int]:
    """A no-grad context in which the ``nn.Linear`` modules of ``module`` on CPU in
    fp32 run oneDNN's linear with their weight packed once on entry (see the
    module docstring), in module order while their weights fit in
    ``budget_bytes``; elsewhere, or without oneDNN, nothing changes. It yields
    how many were packed; the modules' own ``forward`` is back on exit."""
    from npu_rft_kernels.logprob.shifted import onednn_linear, onednn_pack

    patched = []
    try:
        for m in module.modules():
            if type(m) is not nn.Linear or m.weight.nbytes > budget_bytes:
                continue
            packed = onednn_pack(m.weight, 8)
            if packed is None:
                continue
            budget_bytes -= m.weight.nbytes
            bias = None if m.bias is None else m.bias.detach()
            patched.append((m, m.__dict__.get("forward")))
            m.forward = functools.partial(onednn_linear, packed=packed, bias=bias)
        yield len(patched)
    finally:
        for m, previous in patched:
            if previous is None:
                del m.forward
            else:
                m.forward = previous


def head_product(weight: torch.Tensor, budget_bytes: int = PACK_MAX_BYTES) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """``hidden [rows, H] -> fp32 logits [rows, V]``, and the bytes it packed:
    oneDNN's linear with ``weight`` packed now, for a CPU fp32 head of at most
    ``budget_bytes``; else ``head_logits`` (0 bytes)."""
    from npu_rft_kernels.logprob.shifted import onednn_linear, onednn_pack

    packed = onednn_pack(weight, 8) if weight.nbytes <= budget_bytes else None
    if packed is None:
        return functools.partial(head_logits, weight=weight), 0
    return functools.partial(onednn_linear, packed=packed), weight.nbytes


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
        with merged_lora(self.model), contextlib.ExitStack() as packing:
            self._head, head_bytes = head_product(lm_head_weight(self.model), PACK_MAX_BYTES)
            packing.callback(setattr, self, "_head", None)  # the packed head lives for this rollout only
            if head_bytes:  # beside an unpacked head, packing the decoder buys nothing (module docstring)
                packing.enter_context(packed_linears(self.decoder, PACK_MAX_BYTES - head_bytes))
            for chunk in _chunks(len(prompt_ids), self.prompts_per_call):
                completions, truncated = self._sample_chunk([prompt_ids[i] for i in chunk], params, generator)
                out.prompt_index.extend(i for i in chunk for _ in range(params.num_samples))
                out.completion_ids.extend(completions)
                out.truncated.extend(truncated)
        return out

    def _forward(self, ids, mask, positions, cache):
        """Logits ``[rows, V]`` (fp32) at each row's last position, and the cache."""
        kwargs = {self.cache_kwarg: cache} if cache is not None else {}
        with self.device.autocast():
            out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
            logits = self._head(out.last_hidden_state[:, -1].contiguous())
        return logits, getattr(out, self.cache_kwarg)

    def _sample_chunk(self, prompts, params: SamplingParams, generator) -> tuple[List[List[int]], List[bool]]:
        k = params.num_samples
        ids, mask = left_pad(prompts, self.pad_token_id, self.device.torch_device)
        positions = (mask.cumsum(dim=1) - 1).clamp_(min=0)
        logits, cache = self._forward(ids, mask, positions, None)
        if k > 1:
            cache.batch_repeat_interleave(k)
            logits = logits.repeat_interleave(k, dim=0)
            mask = mask.repeat_interleave(k, dim=0)
        next_position = positions[:, -1].repeat_interleave(k) + 1
        rows = torch.arange(len(prompts) * k, device=ids.device)  # output row of each live batch row
        tokens = torch.full((len(rows), params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=ids.device)
        lengths = torch.zeros(len(rows), dtype=torch.long)
        finished = torch.zeros(len(rows), dtype=torch.bool)
        for t in range(params.max_new_tokens):
            token = sample_tokens(logits, params.temperature, params.top_p, generator)
            tokens[rows, t] = token
            lengths[rows.cpu()] = t + 1
            done = torch.isin(token, self.eos)
            if t == params.max_new_tokens - 1:
                finished[rows[done].cpu()] = True
                break
            if bool(done.any()):
                finished[rows[done].cpu()] = True
                live = (~done).nonzero().flatten()
                if live.numel() == 0:
                    break
                cache.batch_select_indices(live)
                rows, mask, next_position, token = rows[live], mask[live], next_position[live], token[live]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            logits, cache = self._forward(token[:, None], mask, next_position[:, None], cache)
            next_position = next_position + 1
        tokens = tokens.cpu()
        completions = [tokens[i, : int(lengths[i])].tolist() for i in range(len(lengths))]
        return completions, (~finished).tolist()


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
            for row, seq in enumerate(generated[:, ids.shape[1]:].tolist()):
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


def cache_kwarg(module: Any) -> str:
    """The name under which ``module.forward`` (a decoder) takes and returns its
    KV cache (``cache`` in recent transformers, ``past_key_values`` before)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


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
