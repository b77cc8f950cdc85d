"""``npu-rft train`` with fixed rollouts, for the multi-process tests.

Run as a script, by torchrun or plainly::

    torchrun --standalone --nproc-per-node 2 tests/npu_rft/fixed_rollout_train.py train --config ...

It replaces the sampler with :class:`FixedSampler`, whose completions depend
only on the prompt's token ids (not on the policy, the seed, the step or the
rank), makes ``tests/helpers.py`` importable as ``helpers`` (for the
``helpers:digit_reward`` grader), and runs the CLI. A run of 1 process and a
run of 2 processes with the same global batch then see the same completions
and rewards, so their updates can be compared with sampling out of the way.

After the run each rank writes ``fixed-rollout rank R process-groups-alive N``
to stderr (N = 1 while a process group is left initialised, else 0), and
``fixed-rollout rank R from-pretrained N``, the number of models it read
from a checkpoint (``AutoModelForCausalLM.from_pretrained`` calls).

With ``NPU_RFT_TEST_KILL_AT_CHECKPOINT=N`` rank 0 kills itself with SIGKILL
when it is about to finish the checkpoint of step N: under fsdp2 every rank
has then written its shards into the staging directory, which stays torn.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional, Sequence

HELPERS = Path(__file__).resolve().parents[1] / "helpers.py"
# Completions are strings of these characters: digit_reward scores the digits.
ALPHABET = "0123456789abcdefghij"


class FixedSampler:
    """Sample ``k`` of a prompt with token ids ``p`` (``h = sum(p)``) has
    ``1 + (h + 3k) mod max_new_tokens`` tokens, token ``j`` being character
    ``(7h + 5k + 3j) mod 20`` of ``ALPHABET`` (single-character tokens).

    Given the ``model``, it also runs the forwards a sampler with early exit
    would: one per token of each prompt's longest sample, so ranks holding
    different prompts run different numbers of forwards (the count goes to
    stderr as ``fixed-rollout rank R forwards N``)."""

    def __init__(self, tokenizer, model=None) -> None:
        self.model = model
        self.pool = [tokenizer.convert_tokens_to_ids(ch) for ch in ALPHABET]
        unknown = [ch for ch, i in zip(ALPHABET, self.pool) if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise ValueError(f"FixedSampler: the tokenizer has no single token for {unknown}")

    def sample(self, prompt_ids: Sequence[Sequence[int]], params, generator: Optional[object] = None):
        from npu_rft.rollout import Samples

        index: List[int] = []
        completions: List[List[int]] = []
        truncated: List[bool] = []
        for p, ids in enumerate(prompt_ids):
            h = sum(ids)
            for k in range(params.num_samples):
                n = 1 + (h + 3 * k) % params.max_new_tokens
                completions.append([self.pool[(7 * h + 5 * k + 3 * j) % len(self.pool)] for j in range(n)])
                index.append(p)
                truncated.append(n == params.max_new_tokens)
        if self.model is not None:
            self._decode_forwards(prompt_ids, index, completions)
        return Samples(prompt_index=index, completion_ids=completions, truncated=truncated)

    def _decode_forwards(self, prompt_ids, index, completions) -> None:
        import torch

        device = next(self.model.parameters()).device
        forwards = 0
        with torch.no_grad():
            for p, ids in enumerate(prompt_ids):
                longest = max((c for i, c in zip(index, completions) if i == p), key=len)
                for j in range(len(longest)):
                    self.model(input_ids=torch.tensor([list(ids) + longest[:j]], device=device))
                    forwards += 1
        sys.stderr.write(f"fixed-rollout rank {os.environ.get('RANK', '0')} forwards {forwards}\n")  # one write


READS: List[object] = []  # the models read with from_pretrained in this process


def install() -> None:
    """Register ``helpers`` and route ``make_sampler`` to ``FixedSampler``."""
    if "helpers" not in sys.modules:
        spec = importlib.util.spec_from_file_location("helpers", HELPERS)
        module = importlib.util.module_from_spec(spec)
        sys.modules["helpers"] = module
        spec.loader.exec_module(module)
    import npu_rft.rollout

    import npu_rft.trainer

    npu_rft.rollout.make_sampler = lambda model, tokenizer, *args, **kwargs: FixedSampler(tokenizer, model)
    accumulate = npu_rft.trainer.Trainer.accumulate

    def accumulate_and_count(self, micro_batches):
        sys.stderr.write(f"fixed-rollout rank {self.dist.rank} micro-batches {len(micro_batches)}\n")
        return accumulate(self, micro_batches)

    npu_rft.trainer.Trainer.accumulate = accumulate_and_count
    from transformers import AutoModelForCausalLM

    read = AutoModelForCausalLM.from_pretrained.__func__

    def read_and_count(cls, *args, **kwargs):
        READS.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return read(cls, *args, **kwargs)

    AutoModelForCausalLM.from_pretrained = classmethod(read_and_count)
    kill_at = os.environ.get("NPU_RFT_TEST_KILL_AT_CHECKPOINT")
    if kill_at:
        import npu_rft.checkpoint

        save = npu_rft.checkpoint.save_checkpoint

        def save_or_die(run_dir, **kwargs):
            if kwargs["state"].step == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
            return save(run_dir, **kwargs)

        npu_rft.checkpoint.save_checkpoint = save_or_die


if __name__ == "__main__":
    install()
    import torch.distributed

    from npu_rft.cli import main

    code = main(sys.argv[1:])
    alive = int(torch.distributed.is_initialized())  # the run destroys the group it made
    rank = os.environ.get("RANK", "0")
    sys.stderr.write(f"fixed-rollout rank {rank} process-groups-alive {alive}\n"
                     f"fixed-rollout rank {rank} from-pretrained {len(READS)}\n")
    sys.exit(code)
