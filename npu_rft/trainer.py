"""The training loop: one ``fit()`` for every algorithm, run by ``Trainer``.

``fit(config, resume=None)`` builds a :class:`Trainer` and runs it. Its
``step`` reads top to bottom as one step's named stages, each timed as
``timing_s/<stage>``:

    rollout, grade, advantage   inside ``algorithm.make_batches(ctx)``, through ``ctx``
    loss                        forward + backward of every micro-batch
    update                      unscale, clip, optimizer step (or skip if non-finite)
    eval                        periodic evaluation on the eval split (rank 0)
    log                         metrics.jsonl, TensorBoard, progress bar
    checkpoint                  atomic checkpoint directory, retention

(``log`` and ``checkpoint`` are timed after the step's record is written, so
their times appear in the next step's record.)

The loop owns the device, model, reference, optimizer and schedule, gradient
accumulation with a global loss normaliser, DDP or FSDP2 (``parallel.strategy``,
through ``npu_rft.sharding``), non-finite-loss skipping,
logging, evaluation, checkpoints, SIGTERM and resume; the algorithm owns its
batches and loss (``npu_rft/algorithms/base.py`` describes the seam).

Distributed (torchrun): every rank draws a disjoint shard of each step's
prompts, samples and grades them; the loss normaliser is summed over ranks,
and since DDP averages gradients, each rank's loss is multiplied by
``world_size`` so that the synchronised gradient is the one-big-batch
gradient. Ranks may hold different numbers of micro-batches: they agree on
the largest count, and a rank that runs out does zero-loss passes, so DDP's
synchronising backward (the last one; the others run under ``no_sync``)
happens on every rank together.

Under fsdp2 every forward is a collective: sampling, evaluation and the
no-grad log-prob passes run inside ``parallel.gathered()`` (the whole model
gathered once, every rank together), the training forward is the root shard
unit's, and checkpoints are written by every rank (its shards) before rank 0
completes the directory.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from npu_rft import checkpoint as ckpt
from npu_rft import sharding
from npu_rft.algorithms.base import Grades, MicroBatch, Prompt, StepPlan
from npu_rft.config import TrainConfig
from npu_rft.config_base import to_dict
from npu_rft.metrics import METRICS_FILE, SAMPLES_FILE, MetricsWriter, StageTimer, truncate_jsonl

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many non-finite losses in a row)."""


@dataclass
class FitResult:
    run_dir: Path
    step: int  # steps completed
    status: str  # "completed" | "sigterm"
    metrics: Dict[str, float]  # the last step's record
    checkpoint: Optional[Path]  # the last checkpoint written


# ----------------------------------------------------------------------------- data


class DataStream:
    """Each step's training rows: the global order is a per-epoch permutation
    (seeded by the run seed and the epoch; the file order when not shuffled),
    consumed ``per_step`` rows at a time across epoch boundaries; rank ``r``
    takes rows ``r, r + world, ...`` of each step's slice. The cursor
    ``{"epoch", "index"}`` is checkpointed."""

    def __init__(self, rows: Sequence[Any], *, per_step: int, seed: int, shuffle: bool, rank: int, world_size: int) -> None:
        if not rows:
            raise ValueError("data.train has no usable rows; check the file (and the prompt-length policy)")
        if per_step % world_size:
            raise ValueError(f"batch.prompts_per_step={per_step} is not divisible by the {world_size} ranks; "
                             f"use a multiple of {world_size}")
        self.rows, self.per_step, self.seed, self.shuffle = list(rows), per_step, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()  # host: a CPU generator's permutation

    def next(self) -> List[Any]:
        taken: List[int] = []
        while len(taken) < self.per_step:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            n = min(self.per_step - len(taken), len(self._order) - self.index)
            taken.extend(self._order[self.index:self.index + n])
            self.index += n
        return [self.rows[i] for i in taken[self.rank::self.world_size]]

    def state(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, cursor: Dict[str, int]) -> None:
        self.epoch, self.index = int(cursor["epoch"]), int(cursor["index"])
        self._order = self._permutation(self.epoch)


def encode_prompts(rows: Sequence[Any], tokenizer: Any, max_length: int, policy: str) -> tuple[List[Prompt], int]:
    """Chat-template every prompt row once. Returns the kept rows with their
    token ids (``Prompt`` pairs) and how many were dropped for being longer
    than ``max_length`` (``policy="drop"``; ``"truncate_left"`` keeps the last
    ``max_length`` tokens). Plain-text rows pass through with no ids."""
    from npu_rft.data.prompts import encode_prompt

    kept, dropped = [], []
    for row in rows:
        if row.text is not None:
            kept.append(Prompt(row, None))
            continue
        tokens = encode_prompt(tokenizer, row)
        if len(tokens) > max_length:
            if policy == "drop":
                dropped.append(row.id)
                continue
            tokens = tokens[-max_length:]
        kept.append(Prompt(row, tokens))
    if dropped:
        logger.warning("data: dropped %d of %d prompts longer than data.max_prompt_length=%d (first: %s); "
                       "raise the limit or set data.long_prompts: truncate_left",
                       len(dropped), len(rows), max_length, ", ".join(dropped[:5]))
    return kept, len(dropped)


# ----------------------------------------------------------------------------- schedule


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """``optim.name``'s optimizer over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; check model.finetune and model.lora.target_modules")
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, cfg) -> float:
    """Multiplier of ``optim.lr`` for the step that has ``step`` steps before it:
    linear warm-up ``(step + 1) / warmup_steps``, then 1 (constant) or
    ``min + (1 - min) * (1 + cos(pi * progress)) / 2`` (cosine), where
    progress goes from 0 after warm-up to 1 at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, total_steps: int, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


def step_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of (run seed, step, rank): a resumed step samples as the original did."""
    return (seed * 1_000_003 + step * 7_919 + rank) % (2**63 - 1)


# ----------------------------------------------------------------------------- services


class Context:
    """The loop's services to the algorithm (``StepContext`` in base.py)."""

    def __init__(self, *, config: TrainConfig, device, dist, policy, parallel, engine, reward,
                 data: DataStream) -> None:
        self.config, self.device, self.policy, self.engine, self.reward = config, device, policy, engine, reward
        self.parallel = parallel  # npu_rft.sharding: Replicated (ddp) or Sharded (fsdp2)
        self.data = data
        self.rank, self.world_size = dist.rank, dist.world_size
        self.tokenizer = policy.tokenizer
        self.pad_token_id = policy.tokenizer.pad_token_id
        self.step = 0
        self.timed = StageTimer()

    def begin(self, step: int, timer: StageTimer) -> None:
        self.step, self.timed = step, timer

    def next_prompts(self) -> List[Prompt]:
        return self.data.next()

    def rollout(self, prompt_ids, params):
        from npu_rft.engines import rollout

        seed = step_seed(self.config.run.seed, self.step, self.rank)
        # fsdp2: the whole model gathered once, so that each rank's early exit changes no collective
        with self.timed("rollout"), self.parallel.gathered(), _eval_mode(self.policy.model):
            return rollout(self.engine, self.policy.model, prompt_ids, params, seed)

    def grade(self, examples, completions) -> Grades:
        with self.timed("grade"):
            results = [self.reward(text, ex) for ex, text in zip(examples, completions)]
            names = list(self.reward.graders)
            return Grades(
                rewards=torch.tensor([r.total for r in results], dtype=torch.float32),
                scores={n: [r.grades[n].score for r in results] for n in names},
                failures={n: [r.grades[n].reason is not None for r in results] for n in names},
            )

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def logprobs(self, batches: Sequence[MicroBatch], *, reference: bool = False, temperature: float = 1.0):
        from npu_rft_kernels import fused_logprob

        from npu_rft.model import completion_hidden, lm_head_weight

        out = []
        mode = self.policy.reference_mode() if reference else contextlib.nullcontext(self.policy.model)
        with (self.timed("reference" if reference else "old_logprobs"), self.parallel.gathered(reference),
              mode as model, _eval_mode(model)):
            for mb in batches:
                mb = mb.to(self.device.torch_device)
                with self.device.autocast():
                    hidden = completion_hidden(model, mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask)
                targets = mb.completion_ids.masked_fill(~mb.completion_mask, -100)
                out.append(fused_logprob(hidden, lm_head_weight(model).to(hidden.dtype), targets,
                                         temperature=temperature, backend=self.config.kernels.backend,
                                         tile_bytes=self.config.kernels.tile_bytes))
        return out

    def all_gather(self, obj):
        from npu_rft.distributed import all_gather_object

        return all_gather_object(obj)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Dropout off for sampling and no-grad log-prob passes; the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class StopRequest:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopRequest":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        logger.warning("SIGTERM: finishing this step, writing a checkpoint, then exiting")
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------- the loop


def fit(config: TrainConfig, resume: Optional[str] = None) -> FitResult:
    """Train as ``config`` says. ``resume``: None, ``"latest"`` (the newest
    checkpoint of ``run.output_dir``) or a checkpoint/run directory."""
    with contextlib.ExitStack() as cleanup:
        return Trainer(config, resume, cleanup).run()


class Trainer:
    """One training run. ``__init__`` sets everything up (device, process
    group, run directory, model, data, optimizer, and the checkpoint to resume
    from); ``run`` loops over ``step``, which reads top to bottom:

        make_batches (rollout, grade, advantage) -> train_on (accumulate, update)
        -> schedule -> evaluate; then log and, when due, save.
    """

    def __init__(self, config: TrainConfig, resume: Optional[str], cleanup: contextlib.ExitStack) -> None:
        from npu_rft.data.schema import read_examples
        from npu_rft.device import get_device
        from npu_rft.distributed import init_distributed
        from npu_rft.graders import GraderSpec, Reward
        from npu_rft.engines import make_engine
        from npu_rft.model import load_policy

        self.config = config
        if config.run.threads is not None:  # restored when fit returns
            cleanup.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(config.run.threads)
        self.device = device = get_device(config.run.device)
        self.dist = dist = init_distributed(device, single_process_group=config.parallel.strategy == "fsdp2")
        if dist.owns_group:  # torchrun's, or the one-process group made for FSDP2; never a caller's own
            from npu_rft.distributed import destroy

            cleanup.callback(destroy)  # when fit returns or raises
        self.run_dir = Path(config.run.output_dir)
        resume_from = ckpt.resolve_resume(self.run_dir, resume)
        _prepare_run_dir(self.run_dir, config, device, dist, resuming=resume_from is not None, cleanup=cleanup)
        device.seed_everything(config.run.seed)

        self.algorithm = config.algorithm_class(config.algorithm_config, config)
        self.algorithm.use_hardware(device.hardware)
        fsdp2 = config.parallel.strategy == "fsdp2"  # moves only shards to the device, read by rank 0 alone
        self.policy = load_policy(config.model, device, need_reference=self.algorithm.needs_reference,
                                  on_device=not fsdp2, read_weights=not fsdp2 or dist.rank == 0)
        self.parallel = sharding.build(config.parallel, self.policy, device, dist.world_size)
        reward = Reward([GraderSpec(g.name, g.weight) for g in config.graders]) if config.graders else None
        rows = read_examples(config.data.train, allow_text=self.algorithm.accepts_text_rows)
        if reward is not None:
            reward.validate(rows)
        prompts, _ = encode_prompts(rows, self.policy.tokenizer, config.data.max_prompt_length,
                                    config.data.long_prompts)
        self.eval_rows = _eval_rows(config)
        self.data = DataStream(prompts, per_step=config.batch.prompts_per_step, seed=config.run.seed,
                               shuffle=config.data.shuffle, rank=dist.rank, world_size=dist.world_size)
        self.total_steps = config.schedule.steps or self.algorithm.total_steps(len(prompts), config.schedule.epochs)

        self.optimizer = build_optimizer(self.policy.model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, config.schedule)
        self.scaler = device.grad_scaler()
        self.state = ckpt.TrainerState()
        if resume_from is not None:
            self.restore(resume_from)

        engine = make_engine(config.rollout, self.policy.model, self.policy.tokenizer, device)
        self.ctx = Context(config=config, device=device, dist=dist, policy=self.policy, parallel=self.parallel,
                           engine=engine, reward=reward, data=self.data)
        self.policy.model.train()

    # ------------------------------------------------------------------ the loop

    def run(self) -> FitResult:
        from npu_rft.distributed import all_reduce_count

        config, state = self.config, self.state
        record: Dict[str, float] = {}
        last_checkpoint: Optional[Path] = None
        carried: Dict[str, float] = {}  # log/checkpoint times of the previous step
        status = "completed"
        with MetricsWriter(self.run_dir, enabled=self.dist.is_main, total_steps=self.total_steps,
                           start_step=state.step, tensorboard=config.run.tensorboard,
                           progress_bar=config.run.progress_bar) as writer, StopRequest() as stop:
            while state.step < self.total_steps:
                plan, record, is_best = self.step(carried)
                timer = StageTimer(self.device.synchronize)
                with timer("log"):
                    if state.step % config.run.log_every == 0 or state.step == self.total_steps:
                        writer.log(state.step, record)
                    if config.run.log_samples_every and state.step % config.run.log_samples_every == 0:
                        writer.log_samples(state.step, plan.samples)
                stopping = all_reduce_count(int(stop.requested)) > 0
                if (stopping or is_best or state.step == self.total_steps
                        or _due(state.step, config.checkpoint.every_steps, 0)):
                    with timer("checkpoint"):
                        last_checkpoint = self.save()
                carried = timer.metrics()
                if stopping:
                    status = "sigterm"
                    break
        logger.info("%s at step %d of %d; run directory %s", status, state.step, self.total_steps, self.run_dir)
        return FitResult(run_dir=self.run_dir, step=state.step, status=status, metrics=record,
                         checkpoint=last_checkpoint)

    def step(self, carried: Dict[str, float]) -> tuple[StepPlan, Dict[str, float], bool]:
        """One step: the algorithm's batches, the updates, the schedule and a due
        evaluation. Returns the plan, the step's record and whether it is the best so far."""
        timer = StageTimer(self.device.synchronize)
        self.ctx.begin(self.state.step, timer)
        with timer("step"):
            plan = self.algorithm.make_batches(self.ctx)  # rollout, grade, advantage
            train_metrics = self.train_on(plan, timer)  # loss, update
            lr = self.optimizer.param_groups[0]["lr"]  # this step's
            self.scheduler.step()
            self.state.step += 1
            eval_metrics = {}
            if _due(self.state.step, self.config.eval.every_steps, self.total_steps) and self.eval_rows:
                with timer("eval"):
                    eval_metrics = self.evaluate()
        is_best = _update_best(self.state, eval_metrics, self.config.checkpoint.keep_best)
        record = {**plan.metrics, **train_metrics, **eval_metrics, **timer.metrics(), **carried,
                  "lr": lr, "epoch": self.data.epoch + self.data.index / len(self.data.rows),
                  "memory/peak_gb": self.device.memory_stats()["peak_allocated"] / 2**30,
                  "memory/gathered_bytes": self.parallel.gathered_bytes}
        return plan, record, is_best

    # ------------------------------------------------------------------ one step's training

    def train_on(self, plan: StepPlan, timer: StageTimer) -> Dict[str, float]:
        """``plan.num_updates`` optimizer updates over the plan's micro-batches."""
        totals: Dict[str, float] = {}
        for _ in range(plan.num_updates):
            with timer("loss"):
                loss, metrics = self.accumulate(plan.micro_batches)
            with timer("update"):
                metrics.update(self.update(loss))
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v / plan.num_updates
        return totals

    def accumulate(self, micro_batches: List[MicroBatch]) -> tuple[float, Dict[str, float]]:
        """Backward of every micro-batch with the global normaliser; returns the
        global loss and the summed metrics. Losses and metrics stay on the
        device until one read after the last micro-batch."""
        from npu_rft.distributed import all_gather_object, all_reduce_count

        device, dist, scaler, parallel = self.device, self.dist, self.scaler, self.parallel
        # every algorithm's normaliser is a count (tokens, sequences or pairs): exact in int64
        normalizer = all_reduce_count(sum(self.algorithm.normalizer(mb) for mb in micro_batches))
        passes = max(all_gather_object(len(micro_batches)))
        if normalizer <= 0 or passes == 0:
            return 0.0, {"train/empty_update": 1.0}
        loss_sum, metric_sums = torch.zeros((), device=device.torch_device), {}
        for i in range(passes):
            with parallel.accumulating(last=i == passes - 1):
                if i < len(micro_batches):
                    mb = micro_batches[i].to(device.torch_device)
                    with device.autocast():
                        hidden = parallel.forward(mb.prompt_ids, mb.prompt_mask, mb.completion_ids,
                                                  mb.completion_mask)
                    weight = parallel.head_weight()  # after the forward: fsdp2 has gathered it there
                    loss, metrics = self.algorithm.loss(hidden, weight.to(hidden.dtype), mb, normalizer)
                    loss_sum = loss_sum + loss.detach().float()
                    for k, v in metrics.items():
                        metric_sums[k] = metric_sums.get(k, 0.0) + v
                else:  # this rank ran out: a zero-loss pass keeps DDP's and FSDP2's collectives in step
                    loss = zero_loss_pass(parallel, device, self.ctx.pad_token_id)
                loss = loss * dist.world_size
                (scaler.scale(loss) if scaler is not None else loss).backward()
        names = sorted(metric_sums)
        values = device.to_host(torch.stack([loss_sum] + [torch.as_tensor(metric_sums[k], dtype=torch.float32,
                                                                          device=device.torch_device).reshape(())
                                                         for k in names]))
        gathered = all_gather_object((values[0], dict(zip(names, values[1:]))))
        total_metrics: Dict[str, float] = {}
        for _, part in gathered:
            for k, v in part.items():
                total_metrics[k] = total_metrics.get(k, 0.0) + v
        return sum(part[0] for part in gathered), total_metrics

    def update(self, loss: float) -> Dict[str, float]:
        """Clip and step, or skip (on every rank alike) if the loss or the gradient norm is not finite."""
        optimizer, scaler, state, cfg = self.optimizer, self.scaler, self.state, self.config.optim
        params = [p for p in self.policy.model.parameters() if p.requires_grad]
        if scaler is not None:
            scaler.unscale_(optimizer)
        max_norm = cfg.max_grad_norm or float("inf")
        grad_norm = self.device.to_host(sharding.full_value(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        finite = math.isfinite(loss) and (scaler is not None or math.isfinite(grad_norm))
        grad_bytes = sharding.local_bytes(p.grad for p in params if p.grad is not None)
        if finite:
            if scaler is not None:
                scaler.step(optimizer)
            else:
                optimizer.step()
            state.nonfinite_in_row = 0
        else:
            state.nonfinite_in_row += 1
            logger.warning("step %d: non-finite loss %s / grad norm %s; update skipped (%d in a row, stop at %d)",
                           state.step + 1, loss, grad_norm, state.nonfinite_in_row, cfg.max_nonfinite_in_row)
        if scaler is not None:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if state.nonfinite_in_row >= cfg.max_nonfinite_in_row:
            raise TrainingStopped(f"{state.nonfinite_in_row} non-finite losses in a row; lower optim.lr, "
                                  "check the data, or raise optim.max_nonfinite_in_row")
        return {"grad_norm": grad_norm, "train/skipped": 0.0 if finite else 1.0,
                # this rank's own bytes (under fsdp2 its shards; sizes, not reads): docs/distributed.md
                "memory/param_bytes": sharding.local_bytes(params), "memory/grad_bytes": grad_bytes,
                "memory/optimizer_bytes": sharding.local_bytes(
                    v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))}

    def evaluate(self) -> Dict[str, float]:
        """Rank 0 evaluates; every rank gets its figures. Under fsdp2 every rank
        gathers the whole model first, so rank 0's forwards are no collectives."""
        from npu_rft.distributed import all_gather_object

        with self.parallel.gathered():
            metrics = run_eval(self.config, self.policy, self.device, self.eval_rows) if self.dist.is_main else {}
        return all_gather_object(metrics)[0]

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        from npu_rft.distributed import all_gather_object, barrier

        self.state.cursor = self.data.state()
        # every rank's own RNG and algorithm state (DPO: the pairs of its prompts); rank 0 writes them all
        (rng_state, algorithm_state), *other_ranks = all_gather_object((self.device.rng_state(),
                                                                        self.algorithm.state_dict()))
        path, staging = None, None
        if self.parallel.strategy == "fsdp2":  # every rank writes its shards into rank 0's staging directory
            made = ckpt.staging_dir(self.run_dir, self.state.step) if self.dist.is_main else None
            staging = Path(all_gather_object(made)[0])
            self.parallel.save(staging / ckpt.SHARDED, self.optimizer)
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.run_dir, policy=self.policy,
                                        optimizer=None if staging else self.optimizer, scheduler=self.scheduler,
                                        grad_scaler=self.scaler, rng_state=rng_state, state=self.state,
                                        algorithm_state=algorithm_state, config=to_dict(self.config),
                                        keep_last=self.config.checkpoint.keep_last, other_ranks=other_ranks,
                                        staging=staging)
        barrier()
        return path or ckpt.checkpoint_dir(self.run_dir, self.state.step)

    def restore(self, path: Path) -> None:
        strategy = self.parallel.strategy
        loaded = ckpt.load_checkpoint(path, policy=self.policy, optimizer=self.optimizer, scheduler=self.scheduler,
                                      grad_scaler=self.scaler, rank=self.dist.rank, world_size=self.dist.world_size,
                                      strategy=strategy)
        if strategy == "fsdp2":
            self.parallel.load(path / ckpt.SHARDED, self.optimizer)
        self.state = loaded.state
        self.data.restore(self.state.cursor)
        self.algorithm.load_state_dict(loaded.algorithm_state)
        self.device.set_rng_state(loaded.rng_state)
        if self.dist.is_main:
            for name in (METRICS_FILE, SAMPLES_FILE):
                truncate_jsonl(self.run_dir / name, self.state.step)


def zero_loss_pass(parallel, device, pad_token_id: int) -> torch.Tensor:
    """A one-token forward whose loss is 0 but touches every trainable weight."""
    one = torch.full((1, 1), pad_token_id, dtype=torch.long, device=device.torch_device)
    mask = torch.ones((1, 1), dtype=torch.bool, device=device.torch_device)
    with device.autocast():
        hidden = parallel.forward(one, mask, one, mask)
    return hidden.float().sum() * 0.0 + parallel.head_weight().float().sum() * 0.0


def run_eval(config: TrainConfig, policy, device, rows) -> Dict[str, float]:
    """Greedy evaluation of the current policy (``npu_rft.evaluate.evaluate``)."""
    from npu_rft.evaluate import evaluate

    result = evaluate(policy.model, policy.tokenizer, rows, device=device, grader=config.eval.grader,
                      max_new_tokens=config.eval.max_new_tokens or config.rollout.max_new_tokens,
                      batch_size=config.eval.batch_size, seed=config.run.seed, progress=False)
    return {f"eval/{k}": float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}  # host: Python numbers


def _eval_rows(config: TrainConfig) -> list:
    if not config.data.eval or not config.eval.every_steps:
        return []
    from npu_rft.data.schema import read_examples

    rows = read_examples(config.data.eval)
    return rows[: config.eval.max_examples] if config.eval.max_examples else rows


def _due(step: int, every: int, last: int) -> bool:
    """Every ``every`` steps (0 = never), and at step ``last``."""
    return (every > 0 and step % every == 0) or step == last


def _update_best(state: ckpt.TrainerState, eval_metrics: Dict[str, float], keep_best: bool) -> bool:
    score = eval_metrics.get("eval/top1")
    if not keep_best or score is None or (state.best_score is not None and score <= state.best_score):
        return False
    state.best_score, state.best_step = score, state.step
    return True


def _prepare_run_dir(run_dir: Path, config: TrainConfig, device, dist, resuming: bool,
                     cleanup: contextlib.ExitStack) -> None:
    """Rank 0 writes the resolved config, the environment report and a log file,
    and deletes the checkpoint staging directories a killed run left."""
    import yaml

    if not dist.is_main:
        return
    if not resuming and ((run_dir / METRICS_FILE).exists() or ckpt.list_checkpoints(run_dir)):
        raise FileExistsError(f"run.output_dir={run_dir} already holds a run; resume it with --resume, "
                              "or choose another run.output_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
    report = {**environment_report(device, dist), "config_sources": config.sources}
    (run_dir / "environment.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("npu_rft")
    root.addHandler(handler)
    cleanup.callback(handler.close)
    cleanup.callback(root.removeHandler, handler)
    # before any save of this run: no rank writes into a staging directory until rank 0 hands it one
    ckpt.remove_torn_staging(run_dir)
    for key, source in sorted(config.sources.items()):
        if source.startswith("$"):
            logger.info("config %s = %r, from %s (the config leaves it unset)", key, _get_dotted(config, key), source)


def _get_dotted(config: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        config = getattr(config, key)
    return config


def environment_report(device, dist) -> Dict[str, Any]:
    import platform

    import peft
    import transformers

    return {
        "device": device.describe(),
        "world_size": dist.world_size,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
