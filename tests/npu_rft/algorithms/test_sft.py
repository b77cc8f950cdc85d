"""Tests for the SFT algorithm: config rules, the batches it builds (chat rows
with loss on the completion only, text rows with loss on the whole text, the
mixing proportion, the seeded text order over ranks and its checkpoint), and
the loss against a plain log-softmax."""
from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from npu_rft.algorithms import sft as sft_mod
from npu_rft.algorithms.base import Prompt, collate
from npu_rft.algorithms.sft import SFT, SFTConfig
from npu_rft.data.prompts import encode_prompt
from npu_rft.data.schema import DataError, Example

WORDS = ["gout", "asthma", "fever", "cough"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from npu_rft.quickstart import tiny_model as tm

    spec = tm.TinyModelSpec(bpe_vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    path = tm.build_tiny_model(["fever is a symptom of gout"], WORDS, spec=spec, cache_dir=tmp_path_factory.mktemp("c"))
    return AutoTokenizer.from_pretrained(path)


def train_config(prompts_per_step=2, micro_batch_size=8, seed=0):
    return SimpleNamespace(kernels=SimpleNamespace(backend="naive", tile_bytes=None), run=SimpleNamespace(seed=seed),
                           batch=SimpleNamespace(prompts_per_step=prompts_per_step, micro_batch_size=micro_batch_size))


class FakeContext:
    """The loop's services, enough for SFT: fixed examples, the chat template, one process."""

    def __init__(self, tokenizer, examples, rank=0, world_size=1):
        self.tokenizer, self.examples = tokenizer, examples
        self.rank, self.world_size, self.step = rank, world_size, 0
        self.pad_token_id = tokenizer.pad_token_id
        self.device = None

    def next_prompts(self):
        return [Prompt(ex, None if ex.text is not None else encode_prompt(self.tokenizer, ex)) for ex in self.examples]

    def all_gather(self, obj):
        return [obj] * self.world_size

    def timed(self, stage):
        return contextlib.nullcontext()


def write_texts(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_config_rules():
    assert SFTConfig().text_fraction == 0
    with pytest.raises(ValueError, match="go together"):
        SFTConfig(text_data="facts.jsonl")
    with pytest.raises(ValueError, match="go together"):
        SFTConfig(text_fraction=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SFTConfig(text_data="facts.jsonl", text_fraction=1.0)
    with pytest.raises(ValueError, match="max_completion_length"):
        SFTConfig(max_completion_length=0)
    assert SFT.uses_graders is False and SFT.accepts_text_rows is True


def test_chat_rows_train_on_target_and_eos_text_rows_on_all_text(tokenizer):
    chat = Example(context="fever and cough?", target='{"possible_diseases": ["gout"]}', system="sys")
    text = Example(context="", target="", text="fever is a symptom of gout.")
    algo = SFT(SFTConfig(), train_config())
    plan = algo.make_batches(FakeContext(tokenizer, [chat, text]))
    assert plan.num_updates == 1 and len(plan.micro_batches) == 2
    chat_mb, text_mb = plan.micro_batches
    target_ids = tokenizer(chat.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert chat_mb.prompt_ids[0].tolist() == encode_prompt(tokenizer, chat)
    assert chat_mb.completion_ids[0].tolist() == target_ids
    assert chat_mb.loss_mask.all()  # every completion token counts, no prompt token is in the completion
    text_ids = tokenizer(text.text, add_special_tokens=False)["input_ids"]
    assert text_mb.prompt_ids.tolist() == [[tokenizer.eos_token_id]]  # no BOS: EOS starts the document
    assert text_mb.completion_ids[0].tolist() == text_ids
    assert plan.metrics == {"sft/chat_rows": 1.0, "sft/text_rows": 1.0, "sft/truncated_rows": 0.0,
                            "sft/tokens": float(len(target_ids) + len(text_ids))}
    assert algo.normalizer(chat_mb) == len(target_ids)


def test_long_completions_are_cut_and_counted(tokenizer):
    text = Example(context="", target="", text="fever " * 20)
    plan = SFT(SFTConfig(max_completion_length=5), train_config()).make_batches(FakeContext(tokenizer, [text]))
    assert plan.micro_batches[0].completion_ids.shape == (1, 5)
    assert plan.metrics["sft/truncated_rows"] == 1.0


def test_text_data_is_mixed_in_the_set_proportion_in_a_seeded_order(tokenizer, tmp_path):
    path = write_texts(tmp_path / "facts.jsonl", [f"fact {i}" for i in range(5)])
    chat = [Example(context=f"q{i}", target="gout") for i in range(4)]
    cfg = SFTConfig(text_data=path, text_fraction=0.2)  # 4 chat rows * 0.2/0.8 = 1 text row per step
    assert SFT(cfg, train_config(prompts_per_step=4)).text_per_step == 1
    cfg = SFTConfig(text_data=path, text_fraction=0.5)
    algo = SFT(cfg, train_config(prompts_per_step=4))
    assert algo.text_per_step == 4

    def drawn(algorithm, ctx, steps):
        out = []
        for _ in range(steps):
            plan = algorithm.make_batches(ctx)
            text_mb = plan.micro_batches[-1]
            out += [tokenizer.decode(ids[mask]) for ids, mask in zip(text_mb.completion_ids, text_mb.completion_mask)]
            assert plan.metrics["sft/chat_rows"] == 4 * ctx.world_size
        return out

    first = drawn(algo, FakeContext(tokenizer, chat), 3)  # 12 rows: passes 0, 1 and 2 over 5 rows
    assert sorted(first[:5]) == sorted(first[5:10]) == [f"fact {i}" for i in range(5)]
    assert first[:5] != first[5:10]  # each pass its own order
    assert first == drawn(SFT(cfg, train_config(prompts_per_step=4)), FakeContext(tokenizer, chat), 3)
    assert first != drawn(SFT(cfg, train_config(prompts_per_step=4, seed=1)), FakeContext(tokenizer, chat), 3)

    # Resume: the cursor is the state.
    state = algo.state_dict()
    assert state.meta == {"text_cursor": 12}
    resumed = SFT(cfg, train_config(prompts_per_step=4))
    resumed.load_state_dict(state)
    assert drawn(resumed, FakeContext(tokenizer, chat), 1) == drawn(algo, FakeContext(tokenizer, chat), 1)

    # Two ranks share each step's text rows: rank r takes positions r, r + 2, ...
    ranks = [drawn(SFT(cfg, train_config(prompts_per_step=4)), FakeContext(tokenizer, chat, rank=r, world_size=2), 1)
             for r in (0, 1)]
    assert ranks[0] == first[0:4:2] and ranks[1] == first[1:4:2]


def test_text_data_must_hold_text_rows(tokenizer, tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"context": "c", "target": "t"}) + "\n")
    with pytest.raises(DataError, match=r"facts.jsonl:2: .*plain-text rows"):
        SFT(SFTConfig(text_data=str(path), text_fraction=0.5), train_config())


def test_loss_is_the_token_mean_nll_over_the_whole_step():
    torch.manual_seed(0)
    V, H = 11, 6
    weight = torch.randn(V, H)
    batch = collate([[1, 2], [3]], [[4, 5, 6], [7, 8]], pad_token_id=0)
    batch.loss_mask[0, 2] = False  # a token outside the loss
    hidden = torch.randn(2, 3, H, requires_grad=True)
    algo = SFT(SFTConfig(), train_config())
    n = algo.normalizer(batch)
    assert n == 4
    out = algo.loss(hidden, weight, batch, n)
    logp = torch.log_softmax(hidden @ weight.T, dim=-1)
    expected = -(logp[0, 0, 4] + logp[0, 1, 5] + logp[1, 0, 7] + logp[1, 1, 8]) / 4
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.metrics["loss"] == pytest.approx(expected.item(), rel=1e-6)
    # Split into micro-batches with the global normaliser: the same value and gradient.
    (grad_full,) = torch.autograd.grad(out.loss, hidden)
    parts = [algo.loss(hidden[i:i + 1, : int(batch.completion_mask[i].sum())], weight, batch.select([i]), n)
             for i in range(2)]
    total = parts[0].loss + parts[1].loss
    (grad_split,) = torch.autograd.grad(total, hidden)
    assert total.item() == pytest.approx(out.loss.item(), rel=1e-6)
    torch.testing.assert_close(grad_split, grad_full)


def test_sft_in_the_training_loop_learns_its_targets(tmp_path):
    """Full fine-tuning through ``fit``: the completion-only loss falls as the
    model memorises two answers, with text rows mixed in."""
    from npu_rft.config import TrainConfig
    from npu_rft.config_base import from_dict
    from npu_rft.quickstart import tiny_model as tm
    from npu_rft.trainer import fit

    spec = tm.TinyModelSpec(bpe_vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    model_dir = tm.build_tiny_model(["question gout asthma"], WORDS, spec=spec, cache_dir=tmp_path / "cache")
    rows = [{"context": f"question {i % 2}", "target": ["gout", "asthma"][i % 2]} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    facts = write_texts(tmp_path / "facts.jsonl", ["fever is a symptom of gout", "cough is a symptom of asthma"])
    config = from_dict(TrainConfig, {
        "run": {"output_dir": str(tmp_path / "run"), "device": "cpu", "tensorboard": False, "progress_bar": False},
        "model": {"name_or_path": str(model_dir), "finetune": "full"},
        "data": {"train": str(tmp_path / "train.jsonl")},
        "algorithm": "sft",
        "sft": {"text_data": facts, "text_fraction": 0.5},
        "optim": {"lr": 1e-2},
        "schedule": {"steps": 20},
        "batch": {"prompts_per_step": 4, "micro_batch_size": 4},
    })
    result = fit(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["sft/text_rows"] for r in records] == [4.0] * 20 and records[0]["sft/chat_rows"] == 4.0
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert (result.checkpoint / "model" / "config.json").is_file()  # a full model directory to start GRPO from
