"""The training loop: learning, gradient accumulation, data order, schedule,
non-finite losses, SIGTERM, the run directory, evaluation and best checkpoints."""
from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from helpers import example_rows, tiny_train_config, write_jsonl

from npu_rft import trainer
from npu_rft.algorithms.grpo import GRPO
from npu_rft.checkpoint import list_checkpoints
from npu_rft.config import ScheduleConfig, TrainConfig
from npu_rft.config_base import from_dict
from npu_rft.trainer import DataStream, TrainingStopped, fit, lr_factor


@pytest.fixture
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", example_rows(12))


def config(tiny_model_dir, train_file, out, **overrides) -> TrainConfig:
    return from_dict(TrainConfig, tiny_train_config(tiny_model_dir, train_file, out, overrides=overrides))


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_the_mean_reward_on_a_learnable_task(tiny_model_dir, train_file, tmp_path):
    # Reward: the fraction of digits in the completion; the random model starts near 0.02.
    cfg = config(tiny_model_dir, train_file, tmp_path / "run", model={"name_or_path": str(tiny_model_dir), "finetune": "full"},
                 rollout={"num_samples": 8, "max_new_tokens": 8}, grpo={"beta": 0.0}, optim={"lr": 1e-2},
                 schedule={"steps": 24}, batch={"prompts_per_step": 4, "micro_batch_size": 16})
    result = fit(cfg)
    rewards = [r["reward/mean"] for r in records(result.run_dir)]
    assert len(rewards) == 24
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert first < 0.1 and last > first + 0.3, rewards


def trained_weights(cfg) -> dict:
    fit(cfg)
    from safetensors.torch import load_file

    last = list_checkpoints(cfg.run.output_dir)[-1]
    return load_file(str(last / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_gradient_accumulation_gives_the_one_batch_update(aggregation, tiny_model_dir, train_file, tmp_path, monkeypatch):
    # Plain SGD, so that the update is the gradient itself (Adam's first step is
    # nearly sign(g) and would hide a wrongly scaled normaliser).
    common = dict(rollout={"num_samples": 4, "max_new_tokens": 6}, grpo={"beta": 0.04, "aggregation": aggregation},
                  optim={"name": "sgd", "lr": 50.0}, schedule={"steps": 2})
    one = trained_weights(config(tiny_model_dir, train_file, tmp_path / "one",
                                 batch={"prompts_per_step": 2, "micro_batch_size": 8}, **common))
    split = trained_weights(config(tiny_model_dir, train_file, tmp_path / "split",
                                   batch={"prompts_per_step": 2, "micro_batch_size": 3}, **common))
    assert one.keys() == split.keys()
    moved = 0
    for key in one:
        assert torch.allclose(one[key], split[key], rtol=1e-5, atol=1e-7), key
        moved += int(one[key].abs().sum() > 0)
    assert moved == len(one)  # every LoRA matrix was updated (B at step 1, A at step 2)


def test_data_stream_shards_steps_across_ranks_and_epochs():
    rows = list(range(6))
    ranks = [DataStream(rows, per_step=4, seed=3, shuffle=True, rank=r, world_size=2) for r in range(2)]
    step1 = [s.next() for s in ranks]
    assert len(step1[0]) == len(step1[1]) == 2 and not set(step1[0]) & set(step1[1])
    step2 = [s.next() for s in ranks]  # 2 rows left in epoch 0, then 2 of epoch 1
    epoch0 = set(step1[0] + step1[1]) | set(step2[0][:1] + step2[1][:1])
    assert epoch0 == set(rows)
    assert ranks[0].state() == {"epoch": 1, "index": 2}
    resumed = DataStream(rows, per_step=4, seed=3, shuffle=True, rank=0, world_size=2)
    resumed.restore(ranks[0].state())
    assert resumed.next() == ranks[0].next()
    plain = DataStream(rows, per_step=4, seed=3, shuffle=False, rank=0, world_size=1)
    assert plain.next() == [0, 1, 2, 3] and plain.next() == [4, 5, 0, 1]
    with pytest.raises(ValueError, match="not divisible by the 4 ranks"):
        DataStream(rows, per_step=6, seed=0, shuffle=False, rank=0, world_size=4)


def test_lr_schedules_by_hand():
    cosine = ScheduleConfig(steps=10, lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_factor(s, 10, cosine) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    # after warm-up, progress = (step - 2) / 7; halfway (step 5.5) would be 0.55
    assert lr_factor(9, 10, cosine) == pytest.approx(0.1)
    assert lr_factor(4, 10, cosine) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 7)))
    constant = ScheduleConfig(steps=10, warmup_steps=4)
    assert [lr_factor(s, 10, constant) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]


def test_too_long_prompts_are_dropped_or_left_truncated(tiny_model_dir, tmp_path):
    from npu_rft.data.schema import read_examples
    from npu_rft.model import load_tokenizer

    rows = example_rows(3)
    rows[1]["context"] = "fever " * 200
    examples = read_examples(write_jsonl(tmp_path / "t.jsonl", rows))
    tok = load_tokenizer(str(tiny_model_dir))
    limit = max(len(trainer.encode_prompts([ex], tok, 10_000, "drop")[0][0].ids) for ex in (examples[0], examples[2]))
    kept, dropped = trainer.encode_prompts(examples, tok, limit, "drop")
    assert dropped == 1 and [p.example.id for p in kept] == ["case-0", "case-2"]
    kept, dropped = trainer.encode_prompts(examples, tok, limit, "truncate_left")
    assert dropped == 0 and len(kept[1].ids) == limit and kept[1].example is examples[1]
    assert kept[1].ids[-3:] == kept[0].ids[-3:]  # the end, with the generation prompt, is kept


def test_run_directory_contents_and_no_silent_reuse(tiny_model_dir, train_file, tmp_path):
    run = tmp_path / "run"
    result = fit(config(tiny_model_dir, train_file, run, run={"output_dir": str(run), "device": "cpu", "tensorboard": True,
                                                              "progress_bar": True, "log_samples_every": 1}))
    assert result.status == "completed" and result.step == 2
    assert {"config.yaml", "environment.json", "train.log", "metrics.jsonl", "samples.jsonl", "tensorboard",
            "checkpoints"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "environment.json").read_text())["device"]["type"] == "cpu"
    rec = records(run)[-1]
    for key in ("reward/mean", "loss", "kl/mean", "entropy/mean", "grad_norm", "lr", "advantage/zero_std_frac",
                "grader/helpers:digit_reward/format_failure", "timing_s/rollout", "timing_s/grade",
                "timing_s/advantage", "timing_s/reference", "timing_s/loss", "timing_s/update", "timing_s/log"):
        assert key in rec, key
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"prompt", "completion", "reward", "step"} <= set(samples[0])
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    with pytest.raises(FileExistsError, match="already holds a run"):
        fit(config(tiny_model_dir, train_file, run))


def test_non_finite_losses_skip_the_update_and_stop_the_run(tiny_model_dir, train_file, tmp_path, monkeypatch):
    real_loss = GRPO.loss

    def nan_loss(self, *args, **kwargs):
        loss, metrics = real_loss(self, *args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(GRPO, "loss", nan_loss)
    cfg = config(tiny_model_dir, train_file, tmp_path / "run", optim={"lr": 1e-2, "max_nonfinite_in_row": 2},
                 schedule={"steps": 5}, run={"output_dir": str(tmp_path / "run"), "device": "cpu",
                                             "progress_bar": False, "tensorboard": False, "log_every": 1})
    with pytest.raises(TrainingStopped, match="2 non-finite losses in a row"):
        fit(cfg)
    rec = records(tmp_path / "run")
    assert [r["train/skipped"] for r in rec] == [1.0]  # the 2nd step raised before its record
    assert not list_checkpoints(tmp_path / "run")


def test_sigterm_writes_a_checkpoint_and_exits(tiny_model_dir, train_file, tmp_path, monkeypatch):
    calls = []
    real = trainer.Context.grade

    def grade_then_sigterm(self, examples, completions):
        calls.append(self.step)
        if self.step == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, examples, completions)

    monkeypatch.setattr(trainer.Context, "grade", grade_then_sigterm)
    result = fit(config(tiny_model_dir, train_file, tmp_path / "run", schedule={"steps": 10}))
    assert result.status == "sigterm" and result.step == 2
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]


def test_periodic_eval_and_the_best_checkpoint_is_kept(tiny_model_dir, train_file, tmp_path, monkeypatch):
    scores = iter([0.2, 0.5, 0.3, 0.4])
    monkeypatch.setattr(trainer, "run_eval", lambda *a, **k: {"eval/top1": next(scores), "eval/mean_score": 0.1})
    eval_file = write_jsonl(tmp_path / "eval.jsonl", example_rows(3, seed=1))
    cfg = config(tiny_model_dir, train_file, tmp_path / "run", data={"train": str(train_file), "eval": str(eval_file)},
                 eval={"every_steps": 1}, checkpoint={"every_steps": 1, "keep_last": 1}, schedule={"steps": 4})
    fit(cfg)
    assert [r["eval/top1"] for r in records(tmp_path / "run")] == [0.2, 0.5, 0.3, 0.4]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002", "step_00000004"]
    state = json.loads((tmp_path / "run/checkpoints/step_00000004/trainer_state.json").read_text())
    assert state["best_step"] == 2 and state["best_score"] == 0.5


def test_fit_destroys_the_process_group_it_made_and_no_other(tiny_model_dir, tmp_path):
    """On error too: a missing data file fails after the model was sharded in the group."""
    import torch.distributed as dist

    from npu_rft.data.schema import DataError
    from npu_rft.distributed import destroy

    missing = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        fit(config(tiny_model_dir, missing, tmp_path / "made", parallel={"strategy": "fsdp2"}))
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # the caller's own
    try:
        with pytest.raises(DataError, match="missing.jsonl: file not found"):
            fit(config(tiny_model_dir, missing, tmp_path / "callers", parallel={"strategy": "fsdp2"}))
        assert dist.is_initialized()
    finally:
        destroy()


def test_run_threads_sets_torch_threads_for_the_run(tiny_model_dir, train_file, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    seen_in_run = []
    monkeypatch.setattr(GRPO, "make_batches", _recording(GRPO.make_batches, seen_in_run))
    run = tmp_path / "run"
    fit(config(tiny_model_dir, train_file, run, run={"output_dir": str(run), "device": "cpu", "threads": target}))
    assert seen_in_run and set(seen_in_run) == {target}
    assert torch.get_num_threads() == before  # restored
    with pytest.raises(ValueError, match="run.threads=0"):
        config(tiny_model_dir, train_file, run, run={"threads": 0})


def _recording(method, log):
    def wrapper(self, *args, **kwargs):
        log.append(torch.get_num_threads())
        return method(self, *args, **kwargs)

    return wrapper


@pytest.mark.parametrize("algorithm", ["grpo", "dpo", "sft"])
def test_kernels_tile_bytes_reaches_the_kernels(algorithm, tiny_model_dir, train_file, tmp_path, monkeypatch):
    import npu_rft_kernels.logprob as logprob

    seen = []
    real = logprob.fused_logprob
    # rewards that vary between samples, so DPO has pairs to train on
    monkeypatch.setattr("helpers.digit_reward", lambda completion, example: sum(map(ord, completion)) % 7 / 6)
    for module in ("npu_rft_kernels.losses", "npu_rft_kernels"):
        monkeypatch.setattr(f"{module}.fused_logprob",
                            lambda *a, **k: (seen.append(k.get("tile_bytes")), real(*a, **k))[1])
    sections = {"kernels": {"tile_bytes": 123456}, "algorithm": algorithm, "schedule": {"steps": 2},
                "rollout": {"num_samples": 4, "max_new_tokens": 6, "temperature": 1.0}}
    cfg = tiny_train_config(tiny_model_dir, train_file, tmp_path / "run", overrides=sections)
    if algorithm != "grpo":
        del cfg["grpo"]
    if algorithm == "sft":
        del cfg["graders"]
    fit(from_dict(TrainConfig, cfg))
    assert seen and set(seen) == {123456}


def test_optimizer_from_the_config():
    from npu_rft.config import OptimConfig

    model = torch.nn.Linear(3, 2)
    sgd = trainer.build_optimizer(model, OptimConfig(name="sgd", lr=0.1, momentum=0.9))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    adamw = trainer.build_optimizer(model, OptimConfig(lr=0.1, betas=[0.8, 0.9]))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.9)
    with pytest.raises(ValueError, match="optim.betas and optim.eps are AdamW's"):
        OptimConfig(name="sgd", betas=[0.8, 0.9])
    with pytest.raises(ValueError, match="optim.momentum is SGD's"):
        OptimConfig(momentum=0.9)
