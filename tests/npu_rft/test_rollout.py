"""The decode loop: token choice, cache sharing and row dropping, EOS and
truncation, and agreement with HF ``generate`` on a real (tiny) model."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

import npu_rft.cpu as rollout  # the CPU's packed decode GEMMs (their budgets) live in npu_rft.cpu
from npu_rft.cpu import head_product, packed_linears
from npu_rft.device import get_device
from npu_rft.hardware import head_logits
from npu_rft.rollout import (
    CachedSampler,
    GenerateSampler,
    SamplingParams,
    left_pad,
    make_sampler,
    sample_tokens,
)

CPU = get_device("cpu")


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample_tokens(logits.clone(), 0.0, 1.0).tolist() == [1, 0]


def test_sampling_follows_the_tempered_softmax():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    g = torch.Generator().manual_seed(0)
    draws = sample_tokens(logits.repeat(40000, 1), 0.5, 1.0, g)
    freq = torch.bincount(draws, minlength=4).double() / 40000
    expected = torch.softmax(logits.double() / 0.5, dim=0)  # p^2 / sum p^2 = [1, 4, 9, 16] / 30
    assert torch.allclose(expected, torch.tensor([1, 4, 9, 16], dtype=torch.float64) / 30)
    assert (freq - expected).abs().max() < 0.01


def test_top_p_keeps_the_smallest_nucleus():
    # probs 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8), renormalised 5/8, 3/8
    logits = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3]))
    g = torch.Generator().manual_seed(1)
    draws = sample_tokens(logits.repeat(20000, 1), 1.0, 0.7, g)
    freq = torch.bincount(draws, minlength=4).double() / 20000
    assert freq[0] == 0 and freq[2] == 0
    assert abs(freq[1] - 5 / 8) < 0.015 and abs(freq[3] - 3 / 8) < 0.015


def test_head_logits_are_the_linear_head():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(8, 32, 16, generator=g)[:, -1], torch.randn(50, 16, generator=g)
    logits = head_logits(hidden, weight)
    assert logits.is_contiguous() and logits.dtype == torch.float32
    assert torch.allclose(logits, hidden @ weight.T, atol=1e-5)


def _onednn_or_skip():
    from npu_rft_kernels.logprob.shifted import onednn_pack

    if onednn_pack(torch.ones(2, 2), 8) is None:
        pytest.skip("this torch has no oneDNN linear")


def test_packed_linears_stay_within_their_budget_and_compute_the_same():
    _onednn_or_skip()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.Linear(16, 8))
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = net(x)
        # 2048, 2048 and 512 bytes of weights: a 2560-byte budget takes the first and the last
        with packed_linears(net, 2560) as count:
            assert count == 2
            assert [("forward" in m.__dict__) for m in (net[0], net[2], net[3])] == [True, False, True]
            assert torch.allclose(net(x), expected, atol=1e-5)
        with packed_linears(net, 0) as count:
            assert count == 0
    assert not any("forward" in m.__dict__ for m in net)  # the modules' own forward is back


def test_head_product_packs_a_head_within_the_budget_only():
    _onednn_or_skip()
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 16, generator=g), torch.randn(50, 16, generator=g)
    packed, nbytes = head_product(weight, 50 * 16 * 4)
    assert nbytes == 50 * 16 * 4
    assert torch.allclose(packed(hidden), hidden @ weight.T, atol=1e-5)
    plain, nbytes = head_product(weight, 50 * 16 * 4 - 1)
    assert nbytes == 0 and plain.func is head_logits


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# A stand-in LM whose next token is a function of the whole row so far, so
# that any mix-up of cache rows, positions or padding changes the output.
V, EOS, PAD = 50, 7, 0


class RowCache:
    def __init__(self, rows):
        self.rows = rows  # list of token lists (real tokens only)

    def batch_repeat_interleave(self, k):
        self.rows = [list(r) for r in self.rows for _ in range(k)]

    def batch_select_indices(self, idx):
        self.rows = [self.rows[int(i)] for i in idx]


class CountingDecoder(torch.nn.Module):
    """next token = (3 * sum(row) + 5 * len(row)) % V, with the row read from the cache;
    the last hidden state is 10 x that token's one-hot; position ids must count real tokens."""

    def __init__(self):
        super().__init__()
        self.forward_rows = []

    def forward(self, input_ids, attention_mask, position_ids, use_cache, cache=None):
        assert use_cache
        if cache is None:
            rows = [[t for t, m in zip(ids, ms) if m] for ids, ms in zip(input_ids.tolist(), attention_mask.tolist())]
            cache = RowCache(rows)
            for row, pos, ms in zip(rows, position_ids.tolist(), attention_mask.tolist()):
                assert pos[-1] == len(row) - 1 and sum(ms) == len(row)
        else:
            for row, tok, pos in zip(cache.rows, input_ids[:, 0].tolist(), position_ids[:, 0].tolist()):
                assert pos == len(row)  # the new token's position
                row.append(tok)
        self.forward_rows.append(len(cache.rows))
        nxt = torch.tensor([(3 * sum(r) + 5 * len(r)) % V for r in cache.rows])
        hidden = torch.nn.functional.one_hot(nxt, V).float()[:, None, :] * 10
        return SimpleNamespace(last_hidden_state=hidden, cache=cache)


class CountingLM(torch.nn.Module):
    """The counting decoder under an identity LM head: the argmax logit is the next token."""

    def __init__(self):
        super().__init__()
        self.decoder = CountingDecoder()
        self.head = torch.nn.Linear(V, V, bias=False)
        torch.nn.init.eye_(self.head.weight)
        self.config = SimpleNamespace()

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


def expected_greedy(prompt, max_new):
    row, out = list(prompt), []
    for _ in range(max_new):
        tok = (3 * sum(row) + 5 * len(row)) % V
        out.append(tok)
        row.append(tok)
        if tok == EOS:
            return out, False
    return out, True


def test_cached_loop_prefills_once_shares_the_cache_and_drops_finished_rows():
    lm = CountingLM()
    sampler = CachedSampler(lm, eos_token_ids=[EOS], pad_token_id=PAD, device=CPU)
    prompts = [[1, 2, 3], [4], [9, 9], [3, 1]]
    params = SamplingParams(max_new_tokens=12, num_samples=3, temperature=0.0)
    out = sampler.sample(prompts, params)
    assert out.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for i, p in enumerate(prompts):
        ids, truncated = expected_greedy(p, 12)
        for j in range(3):
            assert out.completion_ids[3 * i + j] == ids
            assert out.truncated[3 * i + j] == truncated
    assert lm.decoder.forward_rows[0] == 4  # one prefill row per prompt, not per sample
    finished_early = sum(not expected_greedy(p, 12)[1] for p in prompts)
    assert finished_early >= 1 and min(lm.decoder.forward_rows[1:]) < 12  # finished rows left the batch


def test_prompts_per_call_chunks_give_the_same_result():
    prompts = [[1, 2, 3], [4], [9, 9], [3, 1], [2]]
    params = SamplingParams(max_new_tokens=8, num_samples=2, temperature=0.0)
    whole = CachedSampler(CountingLM(), eos_token_ids=[EOS], pad_token_id=PAD, device=CPU)
    chunked = CachedSampler(CountingLM(), eos_token_ids=[EOS], pad_token_id=PAD, device=CPU, prompts_per_call=2)
    a, b = whole.sample(prompts, params), chunked.sample(prompts, params)
    assert a == b


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from npu_rft.config import ModelConfig
    from npu_rft.model import load_policy

    policy = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), finetune="full"), CPU, need_reference=False)
    policy.model.eval()
    return policy.model, policy.tokenizer


def _prompts(tokenizer):
    texts = ["fever and cough", "a rash", "the quick brown fox jumps over the lazy dog"]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
            for t in texts]


def _ids(x):
    return list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x)


def test_greedy_loop_matches_hf_generate_and_batching_does_not_change_it(tiny):
    model, tokenizer = tiny
    prompts = [_ids(p) for p in _prompts(tokenizer)]
    params = SamplingParams(max_new_tokens=10, num_samples=2, temperature=0.0)
    loop = make_sampler(model, tokenizer, CPU, "loop")
    gen = make_sampler(model, tokenizer, CPU, "generate")
    assert isinstance(loop, CachedSampler) and isinstance(gen, GenerateSampler)
    batched = loop.sample(prompts, params)
    assert batched == gen.sample(prompts, params)
    for i, p in enumerate(prompts):
        alone = loop.sample([p], SamplingParams(max_new_tokens=10, num_samples=1, temperature=0.0))
        assert alone.completion_ids[0] == batched.completion_ids[2 * i] == batched.completion_ids[2 * i + 1]
    assert all(len(c) == 10 for c, t in zip(batched.completion_ids, batched.truncated) if t)


def test_sampling_is_reproducible_with_a_generator(tiny):
    model, tokenizer = tiny
    prompts = [_ids(p) for p in _prompts(tokenizer)]
    sampler = make_sampler(model, tokenizer, CPU)
    params = SamplingParams(max_new_tokens=8, num_samples=4, temperature=1.0)
    a = sampler.sample(prompts, params, torch.Generator().manual_seed(3))
    b = sampler.sample(prompts, params, torch.Generator().manual_seed(3))
    assert a == b
    assert len({tuple(c) for c in a.completion_ids[:4]}) > 1  # samples of one prompt differ


@pytest.mark.parametrize("head_fits", [True, False])
def test_the_decoder_and_head_are_packed_within_their_own_budgets_and_nothing_outlives_the_rollout(
        tiny, monkeypatch, head_fits):
    _onednn_or_skip()
    model, tokenizer = tiny
    head_bytes = model.get_output_embeddings().weight.numel() * 4
    monkeypatch.setattr(rollout, "PACK_HEAD_MAX_BYTES", head_bytes if head_fits else head_bytes - 1)
    monkeypatch.setattr(rollout, "PACK_DECODER_MAX_BYTES", 2**20)
    calls = {"linears": [], "head": []}
    real_linears, real_head = rollout.packed_linears, rollout.head_product

    @contextlib.contextmanager
    def spy_linears(module, budget):
        with real_linears(module, budget) as count:
            calls["linears"].append((budget, count))
            yield count

    def spy_head(weight, budget):
        product, nbytes = real_head(weight, budget)
        calls["head"].append(nbytes)
        return product, nbytes

    monkeypatch.setattr(rollout, "packed_linears", spy_linears)
    monkeypatch.setattr(rollout, "head_product", spy_head)
    sampler = make_sampler(model, tokenizer, CPU, "loop")
    prompts = [_ids(p) for p in _prompts(tokenizer)]
    params = SamplingParams(max_new_tokens=6, num_samples=2, temperature=0.0)
    forwards = {name: m.__dict__.get("forward") for name, m in model.named_modules()}  # load_policy patches the MLPs
    out = sampler.sample(prompts, params)
    linears = [m for m in sampler.decoder.modules() if type(m) is torch.nn.Linear]
    # beside a packed head every decoder linear is packed (the 1 MiB budget holds them all); beside an
    # unpacked head, only if they hold as many bytes as the head
    packs_decoder = head_fits or sum(m.weight.nbytes for m in linears) >= head_bytes
    assert sum(m.weight.nbytes for m in linears) <= 2**20
    assert calls == {"linears": [(2**20 if packs_decoder else 0, len(linears) if packs_decoder else 0)],
                     "head": [head_bytes if head_fits else 0]}
    assert not hasattr(sampler, "_head")  # the packed head lives in the rollout's context only
    assert {name: m.__dict__.get("forward") for name, m in model.named_modules()} == forwards
    monkeypatch.setattr(rollout, "PACK_DECODER_MAX_BYTES", 0)
    monkeypatch.setattr(rollout, "PACK_HEAD_MAX_BYTES", 0)
    assert sampler.sample(prompts, params) == out  # packing never changes the greedy tokens


# the decoder below holds 4 KiB of weights; a head of 64 x 16 as many
@pytest.mark.parametrize("head_rows, decoder_packed", [(8, True), (64, True), (65, False)])
def test_an_unpacked_head_leaves_the_decoder_plain_unless_the_decoder_holds_as_many_bytes(
        monkeypatch, head_rows, decoder_packed):
    _onednn_or_skip()
    monkeypatch.setattr(rollout, "PACK_HEAD_MAX_BYTES", 0)  # the head stays (W @ h^T)^T
    decoder = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16))
    with torch.no_grad(), rollout.packed_decode(torch.randn(head_rows, 16), decoder) as product:
        assert ["forward" in m.__dict__ for m in decoder] == [decoder_packed] * 2
        assert product.func is head_logits
    assert not any("forward" in m.__dict__ for m in decoder)


def test_make_sampler_rejects_unknown_kinds(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="auto, loop or generate"):
        make_sampler(model, tokenizer, CPU, "vllm")


def test_lora_loop_matches_generate_on_the_unmerged_adapter(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from npu_rft.model import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    prompts = [_ids(p) for p in _prompts(tokenizer)]
    params = SamplingParams(max_new_tokens=10, num_samples=2, temperature=0.0)
    weights = [p.detach().clone() for p in model.parameters()]
    loop = make_sampler(model, tokenizer, CPU)
    assert isinstance(loop, CachedSampler)
    out = loop.sample(prompts, params)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))  # the base is untouched
    eos = loop.eos.tolist()

    def generate():  # with the adapter layers as they are (no merging)
        with torch.no_grad():
            rows = [model.generate(input_ids=torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=eos,
                                   pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist() for p in prompts]
        return [r[: next((j + 1 for j, t in enumerate(r) if t in eos), len(r))] for r in rows]

    expected = generate()
    for i, e in enumerate(expected):
        assert out.completion_ids[2 * i] == out.completion_ids[2 * i + 1] == e
    assert make_sampler(model, tokenizer, CPU, "generate").sample(prompts, params) == out  # merged too
    with model.disable_adapter():  # the reference: the adapter changes the completions, and is off here
        base = generate()
        assert base != expected and loop.sample(prompts, params).completion_ids[::2] == base


def test_models_whose_logits_are_not_the_plain_head_fall_back_to_generate(tiny):
    from npu_rft.model import base_model

    model, tokenizer = tiny
    model.config.final_logit_softcapping = 30.0
    try:
        assert isinstance(make_sampler(model, tokenizer, CPU), GenerateSampler)
        with pytest.raises(ValueError, match="final_logit_softcapping.*set rollout.sampler: generate"):
            make_sampler(model, tokenizer, CPU, "loop")
    finally:
        model.config.final_logit_softcapping = None
    assert base_model(model) is model and isinstance(make_sampler(model, tokenizer, CPU), CachedSampler)


class _SyncEvery:
    """The accelerators' decode policy (lengths and finished flags on the device), run on CPU."""

    def __init__(self, every: int) -> None:
        from npu_rft.hardware import Hardware

        self.decode_sync_every = every
        self.decode_head = Hardware().decode_head


@pytest.mark.parametrize("every", [1, 4, 32])
def test_the_accelerator_decode_policy_gives_the_cpu_loops_tokens_with_few_host_reads(every, monkeypatch):
    from npu_rft import device as device_module

    prompts = [[1, 2, 3], [4], [9, 9], [3, 1], [2]]
    params = SamplingParams(max_new_tokens=40, num_samples=3, temperature=0.0)
    cpu_out = CachedSampler(CountingLM(), eos_token_ids=[EOS], pad_token_id=PAD, device=CPU).sample(prompts, params)
    monkeypatch.setattr(type(CPU), "hardware", property(lambda self: _SyncEvery(every)))
    before = device_module.HOST_READS["cpu"]
    lm = CountingLM()
    out = CachedSampler(lm, eos_token_ids=[EOS], pad_token_id=PAD, device=CPU).sample(prompts, params)
    reads = device_module.HOST_READS["cpu"] - before
    assert out == cpu_out
    assert reads <= -(-params.max_new_tokens // every) + 1  # completion checks, plus the one read of the results
    assert min(lm.decoder.forward_rows[1:]) == 15  # no row left the batch


def test_the_cpu_loop_reads_the_host_once_a_token_at_most(monkeypatch):
    from npu_rft import device as device_module

    before = device_module.HOST_READS["cpu"]
    params = SamplingParams(max_new_tokens=10, num_samples=2, temperature=0.0)
    CachedSampler(CountingLM(), eos_token_ids=[EOS], pad_token_id=PAD, device=CPU).sample([[1, 2], [4]], params)
    assert device_module.HOST_READS["cpu"] - before <= params.max_new_tokens + 1
