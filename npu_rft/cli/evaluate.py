"""``npu-rft evaluate``: Top@k, mean score, format failures and baselines of one
model (or several, side by side) on a JSONL of rows."""
from __future__ import annotations

from typing import Optional, Tuple

import click


@click.command("evaluate")
@click.option("--model", "model", default=None,
              help="Model directory (or hub name when online); without it, only the baselines are computed.")
@click.option("--adapter", default=None, type=click.Path(exists=True, file_okay=False),
              help="PEFT adapter directory, merged into --model.")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Eval JSONL.")
@click.option("--train", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Training JSONL: adds the `prior` baseline.")
@click.option("--grader", default="inverse_rank", show_default=True,
              help="Registered grader, or package.module:function.")
@click.option("--k", "k", default="1", show_default=True, help="Top@k to report, comma-separated, e.g. 1,3.")
@click.option("--samples", default=1, show_default=True, type=click.IntRange(min=1),
              help="Completions per case: 1 = greedy; N > 1 samples and adds best-of-N Top@1.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0.0, min_open=True),
              help="Sampling temperature when --samples > 1.")
@click.option("--compare", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Another model directory, or an adapter for --model; repeat to add more.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Write report.md, metrics.json and predictions-*.jsonl here.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "npu", "cuda", "cpu"]), envvar="NPU_RFT_DEVICE",
              help="Device; $NPU_RFT_DEVICE fills it when the option is not given.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="Prompts per batch.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, help="Sampling and bootstrap seed.")
def command(model: Optional[str], adapter: Optional[str], data: str, train: Optional[str], grader: str, k: str,
            samples: int, temperature: float, compare: Tuple[str, ...], out_dir: Optional[str], device: str,
            batch_size: int, max_new_tokens: int, seed: int) -> None:
    """Evaluate --model (+ --adapter) and each --compare on --data, beside the baselines
    (keep_order, chance, and prior with --train); without --model, the baselines alone."""
    from npu_rft.data.schema import DataError
    from npu_rft.evaluate import evaluate_files, parse_k, render_report

    try:
        ks = parse_k(k)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--k") from None
    try:
        systems = evaluate_files(model=model, adapter=adapter, data=data, train=train, grader=grader, k=ks,
                                 samples=samples, temperature=temperature, compare=compare, out_dir=out_dir,
                                 device=device, batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed)
    except (DataError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(render_report(systems), nl=False)
    if out_dir:
        click.echo(f"report written to {out_dir}/report.md")
