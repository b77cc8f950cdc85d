"""Evaluation of a model on ranking rows, and the baselines computed from the data alone.

``evaluate(model, tokenizer, examples, ...)`` decodes every example's prompt
(greedy with ``samples=1``; ``samples=N`` draws N completions per case at
``temperature``), grades each completion, and reports, from each ``Grade``'s
cleaned list (``Grade.parsed``; completions are never parsed twice):

- ``top{k}``: the fraction of completions whose cleaned list holds the target
  within its first k items (``topk_hit``), averaged over the N samples of a
  case and then over cases; with N > 1 also ``best_of_n_top1``, the fraction of
  cases where at least one sample puts the target first;
- ``top1_ci_low``/``top1_ci_high``: a 95% percentile bootstrap interval of
  ``top1`` (cases resampled with replacement, ``BOOTSTRAP_RESAMPLES`` times,
  seeded);
- ``mean_score``: the mean grader score; ``format_failure_rate``: the fraction
  of completions the grader could not parse (``Grade.reason`` set);
  ``mean_completion_tokens``: generated tokens per completion, a final EOS not
  counted;
- ``by_department``: ``num_cases``, ``top1`` and ``mean_score`` per
  ``meta.department``, when any row carries one; rows without one are counted
  in a last bucket, ``(none)``, so the buckets add up to every case.

``baselines(examples, train_examples=...)`` scores rankings that need no
model, each as a distribution of the target's 0-based position ``p`` in a
ranking of the ``n`` distinct candidates (``meta.candidates``):

- ``keep_order``: the prompt's own order, so ``p`` = the target's index;
- ``prior`` (with training rows): candidates ordered by how often each was the
  target in the training rows, ties in a uniformly random order: with ``a``
  candidates seen more often than the target and ``t`` as often (the target
  included), ``p`` is uniform on ``a .. a+t-1``, so the figures are
  expectations and do not depend on the listed order;
- ``chance``: a uniformly random ranking, ``p`` uniform on ``0 .. n-1``
  (``top1`` is the mean of 1/n).

From that, ``top{k}`` = P(p < k) and ``mean_score`` = E[1 - p/(n-1)] (1 when
n = 1), the inverse-rank score of the ranking (reported only for the
``inverse_rank`` grader). Candidates and targets are compared after
``normalize`` (NFKC, strip, casefold).

``write_report`` writes a comparison of several systems (models, adapters,
baselines) as Markdown and JSON, plus one predictions JSONL per model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from npu_rft.data.schema import DataError, Example, normalize, write_jsonl_atomic
from npu_rft.graders.base import candidates_of

logger = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 1000
BASELINE_NAMES = ("keep_order", "prior", "chance")
# The department breakdown's bucket for rows without meta.department.
NO_DEPARTMENT = "(none)"


@dataclasses.dataclass
class EvalResult:
    """``metrics``: the figures named in the module docstring, plus ``num_cases``
    and ``samples``; ``by_department``: department -> ``{num_cases, top1,
    mean_score}``; ``predictions``: one row per completion (``id``, ``sample``,
    ``completion``, ``parsed``, ``score``, ``reason``, ``target``; empty for a
    baseline)."""

    metrics: Dict[str, float]
    by_department: Dict[str, Dict[str, float]]
    predictions: List[Dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"metrics": self.metrics, "by_department": self.by_department}


def parse_k(k: Union[str, Sequence[int]]) -> Tuple[int, ...]:
    """``"1,3"`` or ``(1, 3)`` -> ``(1, 3)``: sorted, unique, each >= 1; 1 is always included."""
    if isinstance(k, str):
        try:
            values = [int(part) for part in k.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"k={k!r} is not a comma-separated list of integers; write e.g. 1,3") from None
    else:
        values = [int(v) for v in k]
    if any(v < 1 for v in values):
        raise ValueError(f"k={k!r}: every k must be >= 1; write e.g. 1,3")
    return tuple(sorted(set(values) | {1}))


def bootstrap_ci(values: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values``: the 2.5th and
    97.5th percentiles of the means of ``resamples`` resamples (with
    replacement, ``numpy.random.default_rng(seed)``)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return (float(low), float(high))


def _summarise(
    per_case: Dict[str, List[float]], departments: List[Optional[str]], seed: int
) -> Tuple[Dict[str, float], Dict[str, Dict[str, float]]]:
    """Means of per-case values, the Top@1 interval and the department breakdown."""
    metrics = {name: float(np.mean(values)) for name, values in per_case.items()}
    metrics["top1_ci_low"], metrics["top1_ci_high"] = bootstrap_ci(per_case["top1"], seed=seed)
    metrics["num_cases"] = len(departments)
    by_department: Dict[str, Dict[str, float]] = {}
    named = sorted({d for d in departments if d is not None})
    if not named:
        return metrics, by_department
    for dep in named + ([NO_DEPARTMENT] if None in departments else []):
        rows = [i for i, d in enumerate(departments) if (d if d is not None else NO_DEPARTMENT) == dep]
        entry = {"num_cases": len(rows), "top1": float(np.mean([per_case["top1"][i] for i in rows]))}
        if "mean_score" in per_case:
            entry["mean_score"] = float(np.mean([per_case["mean_score"][i] for i in rows]))
        by_department[dep] = entry
    return metrics, by_department


def _department(example: Example) -> Optional[str]:
    dep = example.meta.get("department")
    if dep is None:
        return None
    if str(dep) == NO_DEPARTMENT:
        raise DataError(
            f"{example.location or example.id}: meta.department is {NO_DEPARTMENT!r}, the name of the breakdown's "
            "bucket for rows without a department; rename the department"
        )
    return str(dep)


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    device: Any,
    grader: str = "inverse_rank",
    k: Union[str, Sequence[int]] = (1,),
    samples: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> EvalResult:
    """Decode, grade and score ``examples`` (see the module docstring).

    ``device``: the ``npu_rft.device.Device`` the model is on. ``samples=1``
    decodes greedily and ignores ``temperature``; ``samples > 1`` samples at
    ``temperature`` with a generator seeded by ``seed``, which also seeds the
    bootstrap. ``batch_size`` prompts are decoded together (each with all of
    its samples). The model is put in eval mode and returned to its previous
    mode afterwards.
    """
    import torch
    from tqdm import tqdm

    from npu_rft.data.prompts import encode_prompt
    from npu_rft.graders import get_grader, topk_hit, validate_examples
    from npu_rft.rollout import SamplingParams, eos_token_ids, make_sampler

    ks = parse_k(k)
    if samples < 1:
        raise ValueError(f"samples={samples}; ask for at least 1 completion per case")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; use at least 1")
    if not examples:
        raise ValueError("evaluate: no examples; pass the rows of an eval JSONL")
    grade_fn = get_grader(grader)
    validate_examples(grader, examples)
    departments = [_department(ex) for ex in examples]

    params = SamplingParams(
        max_new_tokens=max_new_tokens, num_samples=samples, temperature=0.0 if samples == 1 else temperature
    )
    prompts = [encode_prompt(tokenizer, ex) for ex in examples]
    # Longest first, so that each batch holds prompts of similar length.
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))
    generator = torch.Generator(device=device.torch_device).manual_seed(seed)
    eos = set(eos_token_ids(model, tokenizer))
    completions: List[List[List[int]]] = [[] for _ in examples]

    was_training = model.training
    model.eval()
    try:
        sampler = make_sampler(model, tokenizer, device)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        with torch.no_grad():
            for batch in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
                out = sampler.sample([prompts[i] for i in batch], params, generator=generator)
                for p, ids in zip(out.prompt_index, out.completion_ids):
                    completions[batch[p]].append(list(ids))
    finally:
        model.train(was_training)

    per_case: Dict[str, List[float]] = {f"top{kk}": [] for kk in ks}
    per_case.update(mean_score=[], format_failure_rate=[], mean_completion_tokens=[])
    if samples > 1:
        per_case["best_of_n_top1"] = []
    predictions: List[Dict[str, Any]] = []
    for ex, outs in zip(examples, completions):
        hits = {kk: [] for kk in ks}
        scores, failures, lengths = [], [], []
        for j, ids in enumerate(outs):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            grade = grade_fn(text, ex)
            parsed = grade.parsed if grade.reason is None else None
            for kk in ks:
                hits[kk].append(parsed is not None and topk_hit(parsed, ex.target, kk))
            scores.append(grade.score)
            failures.append(grade.reason is not None)
            lengths.append(len(ids) - (1 if ids and ids[-1] in eos else 0))
            predictions.append({
                "id": ex.id, "sample": j, "completion": text, "parsed": parsed,
                "score": grade.score, "reason": grade.reason, "target": ex.target,
            })
        for kk in ks:
            per_case[f"top{kk}"].append(float(np.mean(hits[kk])))
        per_case["mean_score"].append(float(np.mean(scores)))
        per_case["format_failure_rate"].append(float(np.mean(failures)))
        per_case["mean_completion_tokens"].append(float(np.mean(lengths)))
        if samples > 1:
            per_case["best_of_n_top1"].append(float(any(hits[1])))

    metrics, by_department = _summarise(per_case, departments, seed)
    metrics["samples"] = samples
    return EvalResult(metrics, by_department, predictions)


def _target_index(example: Example, cands: List[str]) -> int:
    target = normalize(example.target)
    if target not in cands:
        raise DataError(
            f"{example.location or example.id}: target {example.target!r} is not among meta.candidates; "
            "fix the row or its candidates"
        )
    return cands.index(target)


def baselines(
    examples: Sequence[Example],
    *,
    train_examples: Optional[Sequence[Example]] = None,
    k: Union[str, Sequence[int]] = (1,),
    grader: str = "inverse_rank",
    seed: int = 0,
) -> Dict[str, EvalResult]:
    """``keep_order``, ``chance`` and, given ``train_examples``, ``prior`` (see the
    module docstring); ``mean_score`` only when ``grader`` is ``inverse_rank``."""
    ks = parse_k(k)
    if not examples:
        raise ValueError("baselines: no examples; pass the rows of an eval JSONL")
    prior_counts = Counter(normalize(ex.target) for ex in train_examples) if train_examples else None
    # name -> per case, the set of equally likely target positions (a range) and n.
    positions: Dict[str, List[Tuple[range, int]]] = {"keep_order": [], "chance": []}
    if prior_counts is not None:
        positions["prior"] = []
    for ex in examples:
        cands = candidates_of(ex)
        n, index = len(cands), _target_index(ex, cands)
        positions["keep_order"].append((range(index, index + 1), n))
        positions["chance"].append((range(0, n), n))
        if prior_counts is not None:
            counts = [prior_counts[c] for c in cands]
            above = sum(c > counts[index] for c in counts)
            tied = sum(c == counts[index] for c in counts)
            positions["prior"].append((range(above, above + tied), n))

    departments = [_department(ex) for ex in examples]
    out: Dict[str, EvalResult] = {}
    for name in BASELINE_NAMES:
        if name not in positions:
            continue
        per_case: Dict[str, List[float]] = {f"top{kk}": [] for kk in ks}
        if grader == "inverse_rank":
            per_case["mean_score"] = []
        for span, n in positions[name]:
            for kk in ks:
                per_case[f"top{kk}"].append(sum(p < kk for p in span) / len(span))
            if grader == "inverse_rank":
                per_case["mean_score"].append(
                    1.0 if n == 1 else float(np.mean([1 - p / (n - 1) for p in span]))
                )
        metrics, by_department = _summarise(per_case, departments, seed)
        out[name] = EvalResult(metrics, by_department)
    return out


# ---------------------------------------------------------------- reports

_COLUMNS = (  # metric key, heading, format
    ("mean_score", "mean score", "{:.3f}"),
    ("format_failure_rate", "format failures", "{:.1%}"),
    ("mean_completion_tokens", "mean tokens", "{:.1f}"),
    ("num_cases", "cases", "{:d}"),
)


def markdown_table(systems: Mapping[str, EvalResult]) -> str:
    """One row per system: Top@1 with its 95% interval, the other Top@k, best-of-N
    Top@1 when any system sampled, and the ``_COLUMNS`` figures; "–" where a
    system has no such figure (a baseline has no format failures)."""
    ks = sorted({int(key[3:]) for r in systems.values() for key in r.metrics
                 if key.startswith("top") and key[3:].isdigit()})
    show_best = any("best_of_n_top1" in r.metrics for r in systems.values())
    headings = ["system", "Top@1 (95% CI)"] + [f"Top@{kk}" for kk in ks if kk != 1]
    headings += ["best-of-N Top@1"] if show_best else []
    headings += [h for _, h, _ in _COLUMNS]
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    for name, result in systems.items():
        m = result.metrics
        cells = [name, f"{m['top1']:.3f} [{m['top1_ci_low']:.3f}, {m['top1_ci_high']:.3f}]"]
        cells += [_cell(m, f"top{kk}", "{:.3f}") for kk in ks if kk != 1]
        cells += [_cell(m, "best_of_n_top1", "{:.3f}")] if show_best else []
        cells += [_cell(m, key, fmt) for key, _, fmt in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(metrics: Mapping[str, float], key: str, fmt: str) -> str:
    return fmt.format(metrics[key]) if key in metrics else "–"


def department_table(systems: Mapping[str, EvalResult]) -> str:
    """Top@1 per ``meta.department`` (rows) and system (columns), ``(none)``
    last; empty when no row has a department."""
    departments = sorted({d for r in systems.values() for d in r.by_department}, key=lambda d: (d == NO_DEPARTMENT, d))
    if not departments:
        return ""
    lines = ["| department | cases | " + " | ".join(systems) + " |", "|" + "---|" * (len(systems) + 2)]
    for dep in departments:
        n = next(r.by_department[dep]["num_cases"] for r in systems.values() if dep in r.by_department)
        cells = [f"{r.by_department[dep]['top1']:.3f}" if dep in r.by_department else "–" for r in systems.values()]
        lines.append(f"| {dep} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_report(systems: Mapping[str, EvalResult]) -> str:
    """The Markdown report: the comparison table, then the department table."""
    parts = [markdown_table(systems)]
    deps = department_table(systems)
    if deps:
        parts += ["", "Top@1 by department:", "", deps]
    return "\n".join(parts) + "\n"


def write_report(out_dir: Union[str, Path], systems: Mapping[str, EvalResult]) -> Dict[str, Path]:
    """Write ``report.md``, ``metrics.json`` ({system: {metrics, by_department}})
    and ``predictions-<system>.jsonl`` for each system with predictions into
    ``out_dir``; return the paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / "report.md", "metrics": out / "metrics.json"}
    _write_text_atomic(paths["report"], render_report(systems))
    _write_text_atomic(
        paths["metrics"], json.dumps({n: r.to_dict() for n, r in systems.items()}, indent=2, ensure_ascii=False) + "\n"
    )
    for name, result in systems.items():
        if result.predictions:
            path = out / f"predictions-{_safe_name(name)}.jsonl"
            write_jsonl_atomic(path, result.predictions)
            paths[f"predictions:{name}"] = path
    return paths


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------- from files (the CLI's entry)

def load_for_eval(model_path: str, adapter: Optional[str], device: Any) -> Tuple[Any, Any]:
    """(model, tokenizer) through the training loader: the base model with the
    PEFT ``adapter`` merged in when given, weights in the device's compute
    dtype, frozen and in eval mode."""
    import torch

    from npu_rft.config import ModelConfig
    from npu_rft.model import load_policy

    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[device.compute_dtype]
    cfg = ModelConfig(name_or_path=model_path, finetune="full", init_adapter=adapter, dtype=dtype)
    policy = load_policy(cfg, device, need_reference=False)
    return policy.model.requires_grad_(False).eval(), policy.tokenizer


def resolve_systems(model: str, adapter: Optional[str] = None, compare: Sequence[str] = ()) -> Dict[str, Tuple[str, Optional[str]]]:
    """Display name -> (model dir, adapter dir or None) for ``--model``/``--adapter``
    and each ``--compare`` entry. A ``--compare`` directory holding
    ``adapter_config.json`` is an adapter on ``model``; any other is a full
    model. Names are directory names, made unique with a ``#2``-style suffix."""
    specs = [(model, adapter)]
    for path in compare:
        is_adapter = (Path(path) / "adapter_config.json").is_file()
        specs.append((model, path) if is_adapter else (path, None))
    out: Dict[str, Tuple[str, Optional[str]]] = {}
    for base, adp in specs:
        name = Path(adp or base).name or str(adp or base)
        unique, n = name, 1
        while unique in out:
            n += 1
            unique = f"{name}#{n}"
        out[unique] = (base, adp)
    return out


def evaluate_files(
    *,
    model: Optional[str],
    data: Union[str, Path],
    adapter: Optional[str] = None,
    compare: Sequence[str] = (),
    train: Optional[Union[str, Path]] = None,
    grader: str = "inverse_rank",
    k: Union[str, Sequence[int]] = (1,),
    samples: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "auto",
    out_dir: Optional[Union[str, Path]] = None,
    progress: bool = True,
) -> Dict[str, EvalResult]:
    """Evaluate the model (and each ``compare`` entry, see ``resolve_systems``) on
    the rows of ``data``, add the baselines (``prior`` when ``train`` is given;
    baselines need ``meta.candidates``, so they are left out, with a log line,
    for rows without them), write the report to ``out_dir`` when given, and
    return every system's result, models first. ``model=None``: the baselines alone."""
    from npu_rft.data.schema import read_examples

    if model is None and (adapter or compare):
        raise ValueError("--adapter and --compare need --model (the base model they apply to or sit beside)")
    ks = parse_k(k)
    examples = read_examples(data)
    train_examples = read_examples(train) if train is not None else None
    specs = resolve_systems(model, adapter, compare) if model is not None else {}
    if specs:
        from npu_rft.device import get_device

        dev = get_device(device)
    systems: Dict[str, EvalResult] = {}
    for name, (base, adp) in specs.items():
        logger.info("evaluating %s (%s%s) on %d rows of %s", name, base, f" + {adp}" if adp else "", len(examples), data)
        net, tokenizer = load_for_eval(base, adp, dev)
        systems[name] = evaluate(net, tokenizer, examples, device=dev, grader=grader, k=ks, samples=samples,
                                 temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 seed=seed, progress=progress)
        del net
    if all("candidates" in ex.meta for ex in examples):
        systems.update(baselines(examples, train_examples=train_examples, k=ks, grader=grader, seed=seed))
    elif model is None:
        raise DataError(f"{data}: baselines need meta.candidates in every row; convert the data with candidates")
    else:
        logger.info("baselines skipped: some rows of %s have no meta.candidates", data)
    if out_dir is not None:
        write_report(out_dir, systems)
    return systems
