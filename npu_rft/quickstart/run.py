"""``npu-rft quickstart``: watch a tiny model learn to rank from a rule-based reward.

The story: a model that already "knows the medicine" but ranks no better than
chance learns to rank from a few hundred cases and the inverse-rank grader
(with, for GRPO, a small bonus for ending the answer). ``run_quickstart(options)``
does, in ``options.out_dir``:

1. ``data/``: seeded DxBench-format cases (``sample_data``), converted by
   ``convert-data``'s library function with a short English template
   (``TEMPLATE``) into ``train.jsonl`` and ``eval.jsonl``; the fact corpus
   (``facts.jsonl``, plain-text rows) and the JSON-format warm-up rows
   (``format.jsonl``: one case's symptoms, another case's candidates, the
   candidates in a random order as the target).
2. A tiny Qwen2 chat model (``tiny_model``, cached).
3. ``warmup/``: SFT in the training loop (full fine-tuning), format rows mixed
   with the fact corpus, standing in for pretraining + instruction tuning;
   redone with the rows in another order when it has not learned the facts
   (``probe.fact_recall`` below ``warmup_min_recall``). The warmed-up model is
   cached too, keyed by everything it depends on.
4. Evaluation of the warmed-up base with the baselines: it should rank at about
   chance, with parseable JSON, and recall the facts (``probe.fact_recall``).
5. The RL arm(s), ``options.algorithm``: ``grpo/``, GRPO with ``inverse_rank``
   and a ``clean_end`` bonus as the reward (full fine-tuning, beta 0), and/or
   ``dpo/``, iterative DPO on the same kind of samples (best vs worst of each prompt's K, the
   reference refreshed every iteration); with ``both``, both from the same
   warmed-up model. Each evaluates Top@1 on the eval split periodically.
6. Evaluation of each arm; ``report.md``/``metrics.json`` (before, after each
   arm, baselines, wall time per arm), ``predictions-*.jsonl``,
   ``<arm>/curves.png``, and with both arms ``curves.png`` (the two on one plot).

``QuickstartOptions.smoke()`` shrinks every size for a test run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from npu_rft.quickstart import sample_data
from npu_rft.quickstart.tiny_model import TinyModelSpec, build_tiny_model, cache_root

logger = logging.getLogger(__name__)

MARKER = "quickstart.json"
ATTEMPTS_FILE = "warmup_attempts.json"  # in a cached warm-up: the fact recall of each attempt
SYSTEM = "You are an experienced physician."
# The candidates come last, next to the answer: a tiny model learns to copy them
# from nearby far sooner than from across the whole prompt.
TEMPLATE = (
    "Rank the candidate diseases from most to least likely. "
    'Answer in JSON: {{"possible_diseases": [...]}}\n'
    "Explicit symptoms: {explicit_symptoms}\n"
    "Implicit symptoms: {implicit_symptoms}\n"
    "Candidate diseases: {candidates}"
)
# The RL arms, in the order they run and are reported; --algorithm takes one of them or "both".
ARMS = ("grpo", "dpo")
ALGORITHM_CHOICES = ARMS + ("both",)
ARM_LABELS = {"grpo": "GRPO", "dpo": "iterative DPO"}
# Bump when the warm-up recipe changes in a way its options and data do not show.
WARMUP_VERSION = 2


@dataclasses.dataclass(frozen=True)
class QuickstartOptions:
    """Sizes and settings; the defaults are the full quickstart."""

    out_dir: str = "runs/quickstart"
    seed: int = 0
    device: str = "auto"
    cache_dir: Optional[str] = None  # None: cache_root()
    # data
    train_cases: int = 480
    eval_cases: int = 100
    # Format warm-up rows; None: warmup_steps * warmup_rows_per_step, so that every
    # row the warm-up draws is a fresh one (a few hundred rows seen over and over are
    # memorised instead of teaching the model to copy the candidates).
    format_rows: Optional[int] = None
    # warm-up (SFT)
    warmup_steps: int = 900
    warmup_lr: float = 5e-3
    warmup_rows_per_step: int = 16  # format rows per step; fact sentences are mixed in beside them
    # Share of each warm-up step's rows that are fact sentences (sft.text_fraction): 0.75 is
    # 3 fact sentences per format row. At 0.5 the warm-up of some seeds never learned the
    # facts (seed 3: symptom -> disease at chance), and RL cannot rank without them.
    warmup_text_fraction: float = 0.75
    # The warm-up must teach the facts (probe.fact_recall), or RL has nothing to rank with. Whether
    # its loss leaves the plateau where the facts are unlearned depends on the seed and on the CPU's
    # floating-point rounding: on one machine every seed's warm-up recalled 0.80 or more, on
    # another seed 3's recalled 0.10 (docs/quickstart.md). A warm-up that recalls less than
    # warmup_min_recall is redone from the tiny model with its rows drawn in another order
    # (run.seed + 1000 x the attempt), at most warmup_retries times, and the best is kept.
    warmup_min_recall: float = 0.75
    warmup_retries: int = 2
    # the RL arm(s): "grpo", "dpo" (iterative DPO) or "both", each from the same warm-up
    algorithm: str = "grpo"
    # shared by both arms: prompts per rollout batch, samples per prompt, completion length
    prompts_per_step: int = 16
    num_samples: int = 8
    max_new_tokens: int = 28
    temperature: float = 1.0  # sampling temperature of the rollouts (evaluation is greedy)
    # GRPO
    grpo_steps: int = 250
    lr: float = 1e-3
    # Weight of the clean_end grader beside inverse_rank (weight 1) in GRPO's reward: a bonus for
    # ending the answer after its JSON. inverse_rank ignores text after the ranking, so GRPO's
    # answers ran on to the token limit, and on one machine a run-on broke every sample's JSON
    # (seed 1: Top@1 0.64 -> 0.00). 0: inverse_rank alone. The evaluation grades inverse_rank only.
    grpo_clean_end_weight: float = 0.25
    eval_every: int = 25
    # iterative DPO: an iteration rolls out dpo_batches_per_iteration prompt batches,
    # pairs each prompt's best and worst sample, and trains dpo_epochs passes over
    # the pairs (one update per batch) against the policy as the iteration began
    dpo_steps: int = 750
    dpo_lr: float = 2.5e-4
    dpo_beta: float = 0.1
    dpo_loss_type: str = "sigmoid"  # dpo.loss_type: sigmoid (DPO), ipo, hinge
    # dpo.nll_weight: the chosen answer's per-token NLL beside each pair's DPO loss (RPO). Without it
    # DPO lowered chosen and rejected answers together on some seeds, until no answer parsed (seed 1).
    dpo_nll_weight: float = 1.0
    # dpo.tie_break: among equally good samples the shortest is chosen, among equally bad the longest
    # rejected. inverse_rank ignores text after the answer, so without it answers ran on to the token
    # limit, and a run-on that wrote the key again was unparseable (seed 4: 1 answer in 100).
    dpo_tie_break: str = "length"
    dpo_batches_per_iteration: int = 4
    dpo_epochs: int = 2
    dpo_eval_every: int = 50
    # torch intra-op threads for the run. The model is tiny, so one thread is the fastest
    # (several only wait on each other, badly so on a busy machine), and it fixes the
    # order of floating-point reductions, so a rerun on the same machine gives the same
    # figures bit for bit. Another CPU model can round differently (torch's math libraries
    # pick their kernels by CPU), and its figures differ (docs/quickstart.md: two machines).
    threads: int = 1
    model: TinyModelSpec = TinyModelSpec()

    def __post_init__(self) -> None:
        for name in ("train_cases", "eval_cases", "format_rows", "warmup_steps", "grpo_steps", "eval_every",
                     "prompts_per_step", "warmup_rows_per_step", "max_new_tokens", "threads", "dpo_steps",
                     "dpo_batches_per_iteration", "dpo_epochs", "dpo_eval_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"quickstart {name}={getattr(self, name)}: must be >= 1")
        if self.algorithm not in ALGORITHM_CHOICES:
            raise ValueError(f"quickstart algorithm={self.algorithm!r}: choose one of {', '.join(ALGORITHM_CHOICES)}")
        if self.num_samples < 2:
            raise ValueError(f"quickstart num_samples={self.num_samples}: GRPO and DPO need >= 2 samples per prompt")
        for name in ("lr", "dpo_lr", "dpo_beta", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"quickstart {name}={getattr(self, name)}: must be > 0")
        if self.dpo_nll_weight < 0:
            raise ValueError(f"quickstart dpo_nll_weight={self.dpo_nll_weight}: must be >= 0 (0 = plain DPO)")
        if self.dpo_tie_break not in ("first", "length"):
            raise ValueError(f"quickstart dpo_tie_break={self.dpo_tie_break!r}: choose first or length")
        if self.grpo_clean_end_weight < 0:
            raise ValueError(f"quickstart grpo_clean_end_weight={self.grpo_clean_end_weight}: must be >= 0 "
                             "(0 = inverse_rank alone)")
        if self.warmup_retries < 0:
            raise ValueError(f"quickstart warmup_retries={self.warmup_retries}: must be >= 0")
        if not 0.0 <= self.warmup_min_recall <= 1.0:
            raise ValueError(f"quickstart warmup_min_recall={self.warmup_min_recall}: must be in [0, 1]")
        if not 0.0 <= self.warmup_text_fraction < 1.0:
            raise ValueError(f"quickstart warmup_text_fraction={self.warmup_text_fraction}: must be in [0, 1)")

    @property
    def arms(self) -> Tuple[str, ...]:
        """The RL arms to run, in order: ("grpo",), ("dpo",) or ("grpo", "dpo")."""
        return ARMS if self.algorithm == "both" else (self.algorithm,)

    @property
    def num_format_rows(self) -> int:
        """``format_rows``, or one row per warm-up draw when it is None."""
        return self.format_rows if self.format_rows is not None else self.warmup_steps * self.warmup_rows_per_step

    @classmethod
    def smoke(cls, **overrides: Any) -> "QuickstartOptions":
        """A run of a few seconds that goes through every stage (for tests)."""
        small = dict(train_cases=32, eval_cases=8, format_rows=32, warmup_steps=4, warmup_rows_per_step=8,
                     grpo_steps=2, prompts_per_step=4, num_samples=2, max_new_tokens=12, eval_every=2,
                     dpo_steps=4, dpo_batches_per_iteration=1, dpo_epochs=2, dpo_eval_every=2,
                     warmup_retries=1,
                     model=TinyModelSpec(bpe_vocab_size=400, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1))
        return cls(**{**small, **overrides})


@dataclasses.dataclass
class QuickstartResult:
    out_dir: Path
    before: Dict[str, float]  # the warmed-up base's eval metrics
    fact_recall: float  # what the warm-up learned of the facts (npu_rft.quickstart.probe)
    after: Dict[str, Dict[str, float]]  # per arm run ("grpo", "dpo"): its eval metrics at the end
    baselines: Dict[str, Dict[str, float]]
    timings_s: Dict[str, float]  # per stage (one per arm: "grpo", "dpo"), and "total"
    report: str  # the Markdown table
    curves: Dict[str, Path]  # per arm its curves.png; with both arms also "both" (the two on one plot)


def _prepare_out_dir(out: Path) -> None:
    """An empty ``out``; a previous quickstart's output (it holds ``MARKER``) is replaced."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(f"{out} exists and is not a quickstart output; pass another --out or empty it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def make_data(options: QuickstartOptions, data_dir: Path) -> Dict[str, Path]:
    """Write the quickstart's data files (step 1 of the module docstring); return their paths."""
    from npu_rft.data.convert import ConvertOptions, convert
    from npu_rft.data.schema import read_examples, write_jsonl_atomic

    data_dir.mkdir(parents=True, exist_ok=True)
    template = data_dir / "template_en.txt"
    template.write_text(TEMPLATE, encoding="utf-8")
    convert_options = dict(format="dxbench", lang="en", template=str(template), system=SYSTEM, seed=options.seed)

    cases = sample_data.generate_cases(options.train_cases + options.eval_cases, seed=options.seed)
    raw = data_dir / "cases.json"
    raw.write_text(json.dumps(cases, indent=1), encoding="utf-8")
    convert(raw, out_dir=data_dir, options=ConvertOptions(train_size=options.train_cases, **convert_options))

    mismatched = sample_data.mismatched_cases(options.num_format_rows, seed=options.seed + 1)
    raw_format = data_dir / "format_cases.json"
    raw_format.write_text(json.dumps(mismatched, indent=1), encoding="utf-8")
    converted = data_dir / "format_converted.jsonl"
    convert(raw_format, output=converted, options=ConvertOptions(**convert_options))
    rows = [ex.to_row() for ex in read_examples(converted)]
    converted.unlink()
    paths = {"train": data_dir / "train.jsonl", "eval": data_dir / "eval.jsonl",
             "format": data_dir / "format.jsonl", "facts": data_dir / "facts.jsonl"}
    write_jsonl_atomic(paths["format"], sample_data.format_warmup_rows(rows, seed=options.seed))
    write_jsonl_atomic(paths["facts"], ({"text": line} for line in sample_data.fact_corpus(seed=options.seed)))
    return paths


def tokenizer_texts(paths: Dict[str, Path]) -> list:
    """What the tiny tokenizer is trained on: the facts and the training rows' text."""
    from npu_rft.data.schema import read_examples

    texts = [ex.text for ex in read_examples(paths["facts"], allow_text=True)]
    for ex in read_examples(paths["format"]):
        texts += [ex.system or "", ex.context, ex.target]
    return texts


def warmup_config(options: QuickstartOptions, model_dir: Path, paths: Dict[str, Path], run_dir: Path) -> Dict:
    """The SFT warm-up: format rows with fact sentences mixed in (3 to 1 by default), full
    fine-tuning. Both quickstart runs turn ``model.recompute_mlp`` off: the tiny
    model's activations are a few MB, so recomputing its MLPs would only cost time."""
    return {
        "run": {"output_dir": str(run_dir), "seed": options.seed, "device": options.device,
                "log_samples_every": 0, "tensorboard": False, "progress_bar": False},
        "model": {"name_or_path": str(model_dir), "finetune": "full", "recompute_mlp": False},
        "data": {"train": str(paths["format"])},
        "algorithm": "sft",
        "sft": {"text_data": str(paths["facts"]), "text_fraction": options.warmup_text_fraction},
        "optim": {"lr": options.warmup_lr, "weight_decay": 0.0},
        "schedule": {"steps": options.warmup_steps, "lr_schedule": "cosine",
                     "warmup_steps": max(1, options.warmup_steps // 20), "min_lr_ratio": 0.3},
        "batch": {"prompts_per_step": options.warmup_rows_per_step,
                  "micro_batch_size": 2 * options.warmup_rows_per_step},
        "checkpoint": {"keep_last": 1, "keep_best": False},
    }


def _rl_config(options: QuickstartOptions, model_dir: Path, paths: Dict[str, Path], run_dir: Path) -> Dict:
    """What both RL arms share: the warmed-up model, full fine-tuning, the train and
    eval splits, K samples per prompt at temperature 1, inverse_rank as the reward."""
    return {
        "run": {"output_dir": str(run_dir), "seed": options.seed, "device": options.device,
                "log_samples_every": 10, "tensorboard": False, "progress_bar": True},
        "model": {"name_or_path": str(model_dir), "finetune": "full", "recompute_mlp": False},
        "data": {"train": str(paths["train"]), "eval": str(paths["eval"])},
        "rollout": {"num_samples": options.num_samples, "max_new_tokens": options.max_new_tokens,
                    "temperature": options.temperature},
        "graders": [{"name": "inverse_rank"}],
        "checkpoint": {"keep_last": 1, "keep_best": False},
    }


def grpo_config(options: QuickstartOptions, model_dir: Path, paths: Dict[str, Path], run_dir: Path) -> Dict:
    """GRPO with inverse_rank and a clean_end bonus (``grpo_clean_end_weight``) as the
    reward; beta 0, full fine-tuning."""
    config = _rl_config(options, model_dir, paths, run_dir)
    if options.grpo_clean_end_weight > 0:
        config["graders"] = [{"name": "inverse_rank", "weight": 1.0},
                             {"name": "clean_end", "weight": options.grpo_clean_end_weight}]
    return {
        **config,
        "algorithm": "grpo",
        "grpo": {"beta": 0.0},
        "optim": {"lr": options.lr},
        "schedule": {"steps": options.grpo_steps},
        "batch": {"prompts_per_step": options.prompts_per_step,
                  "micro_batch_size": options.prompts_per_step * options.num_samples},
        "eval": {"every_steps": options.eval_every, "batch_size": 50},
    }


def dpo_config(options: QuickstartOptions, model_dir: Path, paths: Dict[str, Path], run_dir: Path) -> Dict:
    """Iterative DPO on the same samples: best against worst of each prompt's K,
    the reference refreshed to the policy at every iteration's start."""
    return {
        **_rl_config(options, model_dir, paths, run_dir),
        "algorithm": "dpo",
        "dpo": {"beta": options.dpo_beta, "loss_type": options.dpo_loss_type, "pairing": "best_vs_worst", "reference": "iteration_start",
                "epochs": options.dpo_epochs, "batches_per_iteration": options.dpo_batches_per_iteration,
                "nll_weight": options.dpo_nll_weight, "tie_break": options.dpo_tie_break},
        "optim": {"lr": options.dpo_lr},
        "schedule": {"steps": options.dpo_steps},
        # a micro-batch holds every pair of a prompt batch: a chosen and a rejected row per prompt
        "batch": {"prompts_per_step": options.prompts_per_step, "micro_batch_size": 2 * options.prompts_per_step},
        "eval": {"every_steps": options.dpo_eval_every, "batch_size": 50},
    }


ARM_CONFIGS = {"grpo": grpo_config, "dpo": dpo_config}


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def warm_up(options: QuickstartOptions, model_dir: Path, paths: Dict[str, Path], run_dir: Path) -> Path:
    """The warmed-up model directory, from the cache or trained now (and cached);
    redone with the rows in another order while it recalls too few facts
    (``QuickstartOptions.warmup_min_recall``, ``warmup_retries``)."""
    from npu_rft.config import TrainConfig
    from npu_rft.config_base import from_dict
    from npu_rft.trainer import fit

    # The key holds the data's bytes, not where the data and the model lie, so that a
    # run in another output directory finds the warm-up too.
    placeholders = {name: Path(name.upper()) for name in ("format", "facts")}
    recipe = warmup_config(options, Path(model_dir.name), placeholders, Path("RUN"))
    retries = (options.warmup_min_recall, options.warmup_retries)
    key = _digest(WARMUP_VERSION, model_dir.name, recipe, retries, paths["format"].read_bytes(),
                  paths["facts"].read_bytes())
    cached = (Path(options.cache_dir) if options.cache_dir else cache_root()) / "quickstart-warmup" / key
    if cached.is_dir():
        logger.info("warm-up: cached at %s", cached)
        return cached
    recalls, trained = [], []  # per attempt
    while True:
        attempt = len(recalls)
        config = warmup_config(options, model_dir, paths, run_dir if attempt == 0 else
                               run_dir.with_name(f"{run_dir.name}-retry-{attempt}"))
        config["run"]["seed"] = options.seed + 1000 * attempt
        trained.append(fit(from_dict(TrainConfig, config, "quickstart warm-up")).checkpoint / "model")
        recalls.append(_fact_recall_of(trained[-1], options.device))
        if recalls[-1] >= options.warmup_min_recall or attempt == options.warmup_retries:
            break
        logger.warning("quickstart: the warm-up recalls %.2f of the facts (below %.2f); redoing it with its rows "
                       "in another order (retry %d of at most %d)", recalls[-1], options.warmup_min_recall,
                       attempt + 1, options.warmup_retries)
    best = max(range(len(recalls)), key=recalls.__getitem__)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cached.parent))
    try:
        shutil.copytree(trained[best], tmp, dirs_exist_ok=True)
        (tmp / ATTEMPTS_FILE).write_text(json.dumps({"recall_of_each": recalls, "kept": best}), encoding="utf-8")
        tmp.rename(cached)
    except OSError:
        if not cached.is_dir():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return cached


def _fact_recall_of(model_dir: Path, device_name: str) -> float:
    from npu_rft.device import get_device
    from npu_rft.evaluate import load_for_eval
    from npu_rft.quickstart.probe import fact_recall, sentence_log_probs

    model, tokenizer = load_for_eval(str(model_dir), None, get_device(device_name))
    return fact_recall(sentence_log_probs(model, tokenizer))


def warmup_attempts(warm_dir: Path) -> Dict[str, Any]:
    """``{"recall_of_each": [...], "kept": i}`` of a cached warm-up: the fact recall of
    each attempt and the one kept (one attempt when the first was good enough)."""
    path = Path(warm_dir) / ATTEMPTS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"recall_of_each": [], "kept": 0}


def run_quickstart(options: QuickstartOptions = QuickstartOptions()) -> QuickstartResult:
    """Run every stage (see the module docstring) with ``options.threads`` torch
    threads, and return the figures."""
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        return _run_stages(options)
    finally:
        torch.set_num_threads(threads_before)


def _run_stages(options: QuickstartOptions) -> QuickstartResult:
    from npu_rft.config import TrainConfig
    from npu_rft.config_base import from_dict
    from npu_rft.data.schema import read_examples
    from npu_rft.device import get_device
    from npu_rft.evaluate import baselines, evaluate, load_for_eval, render_report, write_report
    from npu_rft.plot import plot_arms, plot_run
    from npu_rft.quickstart.probe import WEAK_RECALL, fact_recall, sentence_log_probs
    from npu_rft.trainer import fit

    out = Path(options.out_dir)
    _prepare_out_dir(out)
    (out / MARKER).write_text(json.dumps({"status": "running"}), encoding="utf-8")
    timings: Dict[str, float] = {}
    start = time.perf_counter()

    def lap(stage: str) -> None:
        timings[stage] = round(time.perf_counter() - start - sum(timings.values()), 2)
        logger.info("quickstart: %s done in %.1f s", stage, timings[stage])

    paths = make_data(options, out / "data")
    lap("data")
    model_dir = build_tiny_model(tokenizer_texts(paths), sample_data.vocabulary(), spec=options.model,
                                 cache_dir=options.cache_dir)
    lap("tiny_model")
    warm_dir = warm_up(options, model_dir, paths, out / "warmup")
    lap("warmup")

    device = get_device(options.device)
    eval_rows = read_examples(paths["eval"])
    eval_kwargs = dict(device=device, grader="inverse_rank", k=(1, 3), max_new_tokens=options.max_new_tokens,
                       batch_size=50, seed=options.seed, progress=False)
    model, tokenizer = load_for_eval(str(warm_dir), None, device)
    before = evaluate(model, tokenizer, eval_rows, **eval_kwargs)
    recall = fact_recall(sentence_log_probs(model, tokenizer))
    del model
    logger.info("quickstart: the warm-up recalls %.2f of the facts (chance %.2f)", recall, 1 / len(sample_data.DISEASES))
    if recall < WEAK_RECALL:
        logger.warning("quickstart: the warm-up recalls only %.2f of the facts (symptoms -> disease); RL can only "
                       "rank candidates the model tells apart, so expect little gain (docs/quickstart.md)", recall)
    lap("eval_before")

    systems = {"base (warm-up)": before}
    after: Dict[str, Dict[str, float]] = {}
    curves: Dict[str, Path] = {}
    for arm in options.arms:
        config = from_dict(TrainConfig, ARM_CONFIGS[arm](options, warm_dir, paths, out / arm), f"quickstart {arm}")
        trained = fit(config)
        lap(arm)
        model, tokenizer = load_for_eval(str(trained.checkpoint / "model"), None, device)
        result = evaluate(model, tokenizer, eval_rows, **eval_kwargs)
        del model
        systems[f"after {ARM_LABELS[arm]}"] = result
        after[arm] = result.metrics
        curves[arm] = plot_run(out / arm)
        lap(f"eval_{arm}")
    if len(options.arms) > 1:
        curves["both"] = plot_arms({ARM_LABELS[arm]: out / arm for arm in options.arms}, out / "curves.png",
                                   baseline=before.metrics["top1"])
    systems.update(baselines(eval_rows, train_examples=read_examples(paths["train"]), k=(1, 3), seed=options.seed))
    write_report(out, systems)
    attempts = warmup_attempts(warm_dir)
    report = render_report(systems) + _recall_line(recall, attempts) + _timing_table(options.arms, timings)
    (out / "report.md").write_text(report, encoding="utf-8")
    lap("report")
    timings["total"] = round(time.perf_counter() - start, 2)

    result = QuickstartResult(
        out_dir=out, before=before.metrics, fact_recall=recall, after=after,
        baselines={n: r.metrics for n, r in systems.items() if n != "base (warm-up)" and not n.startswith("after ")},
        timings_s=timings, report=report, curves=curves,
    )
    summary = {"status": "completed", "options": dataclasses.asdict(options), "timings_s": timings,
               "before": result.before, "fact_recall": recall, "warmup_attempts": attempts,
               "after": result.after,
               "baselines": result.baselines}
    (out / MARKER).write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    return result


def _recall_line(recall: float, attempts: Dict[str, Any]) -> str:
    from npu_rft.quickstart.probe import fact_probes

    line = (f"\nWarm-up fact recall: {recall:.2f} of {len(fact_probes())} probes "
            f"(\"{{a}} with {{b}} suggests {{disease}}.\", the true disease scored first of "
            f"{len(sample_data.DISEASES)}; chance {1 / len(sample_data.DISEASES):.2f})")
    tried = attempts["recall_of_each"]
    if len(tried) > 1:
        line += (f"; the warm-up was redone {len(tried) - 1} time(s) with its rows in another order "
                 f"(recall of each: {', '.join(f'{r:.2f}' for r in tried)}; kept: {attempts['kept'] + 1})")
    return line + ".\n"


def _timing_table(arms: Tuple[str, ...], timings: Dict[str, float]) -> str:
    """Wall time per arm (training, then its final evaluation), in Markdown."""
    lines = ["", "| arm | training (s) | final eval and curves (s) |", "|---|---|---|"]
    lines += [f"| {ARM_LABELS[arm]} | {timings[arm]:.0f} | {timings[f'eval_{arm}']:.0f} |" for arm in arms]
    lines.append(f"\nShared: data {timings['data']:.0f} s, tiny model {timings['tiny_model']:.0f} s, "
                 f"warm-up {timings['warmup']:.0f} s, base evaluation {timings['eval_before']:.0f} s.\n")
    return "\n".join(lines)
