"""The seam between the training loop and an algorithm.

The loop (``npu_rft/trainer.py``) owns the device, the model and its reference,
the optimizer and schedule, gradient accumulation, distributed training,
non-finite-loss handling, logging, evaluation and checkpoints. An algorithm
owns how a step's batches are made and how a micro-batch becomes a loss, plus
any state of its own that a checkpoint must hold.

One training step, as the loop runs it::

    plan = algorithm.make_batches(ctx)            # may call ctx.rollout / ctx.grade
    for _ in range(plan.num_updates):             # GRPO: num_iterations
        N = sum over ranks and micro-batches of algorithm.normalizer(mb)
        for mb in plan.micro_batches:             # gradient accumulation
            hidden, weight = policy(mb)           # final hidden states, LM head
            loss, metrics = algorithm.loss(hidden, weight, mb, N)
            backward(loss)
        optimizer step

Because every micro-batch's loss is divided by the same global ``N``, the sum
of the micro-batch gradients is the gradient of the whole batch's loss: the
update does not depend on how the batch is split into micro-batches or ranks.

Sequence layout of a ``MicroBatch`` (shared by every algorithm): each row is a
left-padded prompt followed by a right-padded completion::

    prompt_ids      [b, P]   pad ... pad p0 p1 p2
    completion_ids  [b, C]   c0 c1 c2 pad ... pad

so every completion starts at column ``P``, and the hidden states that predict
the completion tokens are positions ``P-1 .. P+C-2`` of the concatenation: the
policy returns exactly those, ``hidden [b, C, H]``, aligned with
``completion_ids``. The loss never builds ``[tokens x vocab]`` logits: it gets
the LM head weight ``[V, H]`` and calls the fused kernels.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import (
    Any,
    ClassVar,
    ContextManager,
    Dict,
    List,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

import torch

from npu_rft.registry import Registry


@dataclasses.dataclass
class MicroBatch:
    """One forward/backward unit: ``b`` rows of prompt + completion.

    ``completion_mask`` marks real completion tokens (they are attended to);
    ``loss_mask`` marks the tokens that count in the loss (for example, a
    truncated completion may be attended to but masked out of the loss).
    ``data`` holds the algorithm's own per-row ``[b]`` or per-token ``[b, C]``
    tensors (advantages, old or reference log-probs, ...).
    """

    prompt_ids: torch.Tensor  # [b, P] long, left-padded
    prompt_mask: torch.Tensor  # [b, P] bool
    completion_ids: torch.Tensor  # [b, C] long, right-padded
    completion_mask: torch.Tensor  # [b, C] bool
    loss_mask: torch.Tensor  # [b, C] bool, subset of completion_mask
    data: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # (loss tokens, rows with a loss token), counted on the host by ``to()`` so
    # that the algorithms' normalisers read nothing back from a device.
    host_counts: Optional[Tuple[int, int]] = None

    @property
    def rows(self) -> int:
        return int(self.prompt_ids.shape[0])

    def _counts(self) -> Tuple[int, int]:
        if self.host_counts is not None:  # a moved batch: counted on the host before the move
            return self.host_counts
        return int(self.loss_mask.sum()), int(self.loss_mask.any(dim=1).sum())

    @property
    def loss_tokens(self) -> int:
        """Tokens in the loss (on a device: as counted when the batch was moved there)."""
        return self._counts()[0]

    @property
    def loss_sequences(self) -> int:
        """Rows with at least one loss token."""
        return self._counts()[1]

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(
            prompt_ids=self.prompt_ids.to(device),
            prompt_mask=self.prompt_mask.to(device),
            completion_ids=self.completion_ids.to(device),
            completion_mask=self.completion_mask.to(device),
            loss_mask=self.loss_mask.to(device),
            data={k: v.to(device) for k, v in self.data.items()},
            host_counts=self._counts(),
        )

    def select(self, rows: slice | Sequence[int] | torch.Tensor) -> "MicroBatch":
        """The given rows, with all-padding columns trimmed (prompt left, completion right)."""
        if not isinstance(rows, slice):
            rows = torch.as_tensor(rows, dtype=torch.long)
        prompt_mask = self.prompt_mask[rows]
        completion_mask = self.completion_mask[rows]
        p_keep = _first_used_column(prompt_mask)
        c_keep = _last_used_column(completion_mask)
        return MicroBatch(
            prompt_ids=self.prompt_ids[rows][:, p_keep:],
            prompt_mask=prompt_mask[:, p_keep:],
            completion_ids=self.completion_ids[rows][:, :c_keep],
            completion_mask=completion_mask[:, :c_keep],
            loss_mask=self.loss_mask[rows][:, :c_keep],
            data={k: (v[rows][:, :c_keep] if v.dim() >= 2 else v[rows]) for k, v in self.data.items()},
        )

    def split(self, micro_batch_size: int) -> List["MicroBatch"]:
        """Consecutive chunks of at most ``micro_batch_size`` rows, each trimmed."""
        return [
            self.select(slice(i, i + micro_batch_size)) for i in range(0, self.rows, micro_batch_size)
        ]


def _first_used_column(mask: torch.Tensor) -> int:
    used = mask.any(dim=0).nonzero()
    return int(used[0]) if used.numel() else mask.shape[1]


def _last_used_column(mask: torch.Tensor) -> int:
    used = mask.any(dim=0).nonzero()
    return int(used[-1]) + 1 if used.numel() else 0


def collate(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_token_id: int,
    loss_rows: Optional[Sequence[bool]] = None,
) -> MicroBatch:
    """Pad token-id lists into the shared layout (prompts left, completions right).

    ``loss_rows[i] = False`` keeps row ``i`` in the batch but masks all of its
    tokens out of the loss.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"collate: {len(prompts)} prompts but {len(completions)} completions; pass one each per row")
    b = len(prompts)
    p_len = max((len(p) for p in prompts), default=0)
    c_len = max((len(c) for c in completions), default=0)
    prompt_ids = torch.full((b, p_len), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((b, p_len), dtype=torch.bool)
    completion_ids = torch.full((b, c_len), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((b, c_len), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if p:
            prompt_ids[i, p_len - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            prompt_mask[i, p_len - len(p):] = True
        if c:
            completion_ids[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long)
            completion_mask[i, : len(c)] = True
    loss_mask = completion_mask.clone()
    if loss_rows is not None:
        loss_mask &= torch.as_tensor(list(loss_rows), dtype=torch.bool)[:, None]
    return MicroBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, loss_mask)


@dataclasses.dataclass
class StepPlan:
    """What ``make_batches`` returns for one step.

    ``micro_batches`` are this rank's; they may be empty (nothing to learn from
    this step on this rank), and ranks may hold different numbers of them: the
    loop balances the gradient synchronisation itself.
    ``num_updates`` optimizer updates are taken over the same micro-batches.
    ``metrics`` are already global (gathered over ranks by the algorithm with
    ``ctx.all_gather``) and are logged as they are.
    ``samples`` are a few rows ({"prompt", "completion", "reward", ...}) the
    loop writes to ``samples.jsonl`` every ``run.log_samples_every`` steps.
    """

    micro_batches: List[MicroBatch]
    num_updates: int = 1
    metrics: Dict[str, float] = dataclasses.field(default_factory=dict)
    samples: List[Dict[str, Any]] = dataclasses.field(default_factory=list)


class LossOutput(NamedTuple):
    """``loss`` is this micro-batch's share of the batch loss (already divided by
    the global normaliser). ``metrics`` are additive in the same way: the loop
    sums them over micro-batches and ranks and logs the sums (so a mean metric
    must be returned as ``sum over this micro-batch / normaliser``)."""

    loss: torch.Tensor
    metrics: Dict[str, Union[float, torch.Tensor]]  # 0-dim tensors stay on the device until the step's one read


class AlgorithmState(NamedTuple):
    """An algorithm's checkpointed state: tensors go to safetensors, ``meta``
    (JSON-serialisable) to JSON."""

    tensors: Dict[str, torch.Tensor]
    meta: Dict[str, Any]


class Grades(NamedTuple):
    """Rewards for ``M`` completions, as ``ctx.grade`` returns them (this rank's).

    ``rewards[m]`` is the weighted sum of the grader scores; ``scores[name][m]``
    is grader ``name``'s score in [0, 1]; ``failures[name][m]`` is True when
    that grader could not parse the completion (a format failure).
    """

    rewards: torch.Tensor  # [M] float32
    scores: Dict[str, List[float]]
    failures: Dict[str, List[bool]]


class Prompt(NamedTuple):
    """A training row and its prompt's token ids, which travel together."""

    example: Any  # npu_rft.data.schema.Example
    ids: Optional[List[int]]  # the chat template with the generation prompt; None for a plain-text row


class StepContext(Protocol):
    """The loop's services to an algorithm during ``make_batches``.

    Implemented by the trainer; tests may pass a small fake.
    """

    step: int  # index of the step being prepared, from 0
    device: Any  # npu_rft.device.Device
    world_size: int
    rank: int
    tokenizer: Any
    pad_token_id: int

    def timed(self, stage: str) -> ContextManager[None]:
        """Adds the block's wall time to ``timing_s/<stage>``."""

    def next_prompts(self) -> List["Prompt"]:
        """This rank's disjoint shard of the next ``batch.prompts_per_step``
        training rows, each with its chat-template token ids (encoded once when
        the data is loaded, under the ``data.max_prompt_length`` policy: too-long
        prompts were dropped and counted, or left-truncated, as configured);
        advances the data cursor, which the loop checkpoints. Epochs reshuffle
        with the run seed."""

    def rollout(self, prompt_ids: Sequence[Sequence[int]], params: Any) -> Any:
        """Sample with the current policy (``npu_rft.rollout.Samples``); timed
        as ``rollout``; seeded from (run seed, step, rank), so resumable."""

    def grade(self, examples: Sequence[Any], completions: Sequence[str]) -> Grades:
        """Grade one completion per example with the configured graders;
        timed as ``grade``."""

    def decode(self, ids: Sequence[int]) -> str:
        """Completion text (special tokens skipped)."""

    def logprobs(
        self, batches: Sequence[MicroBatch], *, reference: bool = False, temperature: float = 1.0
    ) -> List[torch.Tensor]:
        """Per-token log-probs ``[b, C]`` (fp32, 0 where ``completion_mask`` is
        off; on the batch's device) of each micro-batch's completion, from
        ``logits / temperature``, under the current policy or under the
        reference model (``reference=True``; requires
        ``Algorithm.needs_reference``), without gradients and with dropout off.
        A collective: every rank calls it at the same point of the step, with
        an empty ``batches`` when it has none (under ``parallel.strategy:
        fsdp2`` each call gathers the whole model first)."""

    def all_gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order (one element on one process)."""


class Algorithm(abc.ABC):
    """How batches are made and turned into a loss. Subclasses register in
    ``ALGORITHMS`` under ``name``; their config dataclass ``config_class`` is
    the ``TrainConfig`` section of the same name."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    uses_graders: ClassVar[bool] = True  # graders are required in the config
    accepts_text_rows: ClassVar[bool] = False  # {"text": ...} rows allowed in data.train

    def __init__(self, config: Any, train_config: Any) -> None:
        self.config = config
        self.train_config = train_config
        self.entropy_sample_tokens: Optional[int] = None  # set from Device.hardware by use_hardware

    def use_hardware(self, hardware: Any) -> None:
        """Take the device's choices that shape the loss (``npu_rft.hardware``)."""
        self.entropy_sample_tokens = hardware.entropy_sample_tokens

    def require_groups(self, why: str) -> None:
        """Check that the rollout samples a group of different completions per
        prompt (``num_samples >= 2``, ``temperature > 0``); ``why`` completes
        "<algorithm> ..." in the error, e.g. "compares samples within a group"."""
        rollout = self.train_config.rollout
        if rollout.num_samples < 2:
            raise ValueError(f"rollout.num_samples={rollout.num_samples}: {self.name.upper()} {why}; use >= 2")
        if rollout.temperature == 0:
            raise ValueError(f"rollout.temperature=0 (greedy) makes every sample of a prompt the same; "
                             f"{self.name.upper()} needs > 0")

    @property
    def needs_reference(self) -> bool:
        """Whether the loop must keep a reference model for ``ctx.logprobs(reference=True)``."""
        return False

    @abc.abstractmethod
    def make_batches(self, ctx: StepContext) -> StepPlan:
        """Build this step's micro-batches (this rank's share)."""

    @abc.abstractmethod
    def normalizer(self, batch: MicroBatch) -> float:
        """This micro-batch's share of the loss normaliser; the loop sums the
        shares over micro-batches and ranks and passes the total to ``loss``."""

    @abc.abstractmethod
    def loss(self, hidden: torch.Tensor, weight: torch.Tensor, batch: MicroBatch, normalizer: float) -> LossOutput:
        """``hidden [b, C, H]`` predicts ``batch.completion_ids``; ``weight [V, H]``
        is the LM head. Return this micro-batch's share of the batch loss."""

    def total_steps(self, num_examples: int, epochs: float) -> int:
        """Steps that make ``epochs`` passes over ``num_examples`` training rows."""
        per_step = self.train_config.batch.prompts_per_step
        return max(1, -(-int(round(epochs * num_examples)) // per_step))

    def state_dict(self) -> AlgorithmState:
        """State to checkpoint (none by default)."""
        return AlgorithmState({}, {})

    def load_state_dict(self, state: AlgorithmState) -> None:
        if state.tensors or state.meta:
            raise ValueError(f"algorithm {self.name!r} keeps no state, but the checkpoint holds some; "
                             "resume with the algorithm the checkpoint was written by")


ALGORITHMS: Registry[type] = Registry("algorithm")


def gathered(ctx: StepContext, values: Sequence[Any]) -> List[Any]:
    """Concatenate a per-rank list over all ranks."""
    return [v for part in ctx.all_gather(list(values)) for v in part]


# ----------------------------------------------------------------------------- sampling and grading


@dataclasses.dataclass
class Sampled:
    """One prompt batch, rolled out and graded: this rank's share."""

    examples: List[Any]  # the kept examples, one per prompt
    prompts: List[List[int]]  # their token ids
    samples: Any  # npu_rft.rollout.Samples: K completions per prompt, prompt-major
    texts: List[str]  # the decoded completions
    grades: Grades

    def rewards(self, k: int) -> torch.Tensor:
        """``[prompts, k]`` rewards."""
        return self.grades.rewards.reshape(len(self.prompts), k)


def sample_and_grade(ctx: StepContext, params: Any) -> Sampled:
    """The next prompt batch: encode, roll out (timed ``rollout``), decode and grade (timed ``grade``)."""
    from npu_rft.rollout import Samples

    drawn = ctx.next_prompts()
    examples, prompts = [p.example for p in drawn], [p.ids for p in drawn]
    samples = ctx.rollout(prompts, params) if prompts else Samples([], [], [])
    texts = [ctx.decode(ids) for ids in samples.completion_ids]
    grades = ctx.grade([examples[i] for i in samples.prompt_index], texts)
    return Sampled(list(examples), list(prompts), samples, texts, grades)


class RewardStats:
    """Per-sample figures of one or more graded batches (this rank's):
    rewards, completion lengths and truncation, each grader's score and format
    failures. ``gather`` collects them, and any extra per-rank lists, from every
    rank in one collective; ``reward_metrics`` turns them into the step's
    ``reward/*``, ``completion/*`` and ``grader/*`` metrics."""

    def __init__(self) -> None:
        self.columns: Dict[str, List[Any]] = {"reward": [], "length": [], "truncated": []}

    def add(self, sampled: Sampled) -> None:
        self.columns["reward"] += sampled.grades.rewards.tolist()  # host: grader rewards, CPU
        self.columns["length"] += [len(c) for c in sampled.samples.completion_ids]
        self.columns["truncated"] += list(sampled.samples.truncated)
        for name, scores in sampled.grades.scores.items():
            self.columns.setdefault(f"score/{name}", []).extend(scores)
            self.columns.setdefault(f"failure/{name}", []).extend(sampled.grades.failures[name])

    def gather(self, ctx: StepContext, **extra: Sequence[Any]) -> Dict[str, List[Any]]:
        local = {**self.columns, **{key: list(values) for key, values in extra.items()}}
        parts = ctx.all_gather(local)
        return {key: [v for part in parts for v in part[key]] for key in local}


def reward_metrics(columns: Dict[str, List[Any]]) -> Dict[str, float]:
    """``reward/mean``, ``reward/std`` (float64, Bessel), ``completion/length_mean``,
    ``completion/truncated_frac`` and per grader ``grader/<name>/mean`` and
    ``grader/<name>/format_failure``, from ``RewardStats.gather``'s columns."""
    rewards = torch.tensor(columns["reward"], dtype=torch.float64)
    metrics = {
        "reward/mean": float(rewards.mean()) if rewards.numel() else 0.0,  # host: CPU
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,  # host: CPU
        "completion/length_mean": mean(columns["length"]),
        "completion/truncated_frac": mean(columns["truncated"]),
    }
    for key in sorted(columns):
        kind, _, name = key.partition("/")
        if kind == "score":
            metrics[f"grader/{name}/mean"] = mean(columns[key])
        elif kind == "failure":
            metrics[f"grader/{name}/format_failure"] = mean(columns[key])
    return metrics


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "AlgorithmState",
    "Grades",
    "LossOutput",
    "MicroBatch",
    "Prompt",
    "StepContext",
    "StepPlan",
    "RewardStats",
    "Sampled",
    "collate",
    "gathered",
    "mean",
    "reward_metrics",
    "sample_and_grade",
]
