"""``npu-rft grade``: score a file of completions against a data file."""
from __future__ import annotations

from typing import Tuple

import click


@click.command("grade")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Rows (JSONL) from convert-data.")
@click.option(
    "--completions",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help='JSONL of {"completion": ..., "id": ...}; without ids, line i goes with data row i.',
)
@click.option(
    "--grader",
    "graders",
    multiple=True,
    default=("inverse_rank",),
    show_default=True,
    metavar="NAME[=WEIGHT]",
    help="A registered grader or package.module:function; repeat to combine (weighted mean).",
)
def command(data: str, completions: str, graders: Tuple[str, ...]) -> None:
    """Print the mean score and the format-failure rate of each grader."""
    from npu_rft.data.schema import DataError, read_completions, read_examples
    from npu_rft.graders import GraderSpec, Reward
    from npu_rft.graders.reward import summarize_rewards

    try:
        reward = Reward([GraderSpec.parse(g) for g in graders])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--grader") from None
    try:
        examples = read_examples(data)
        reward.validate(examples)
        summary = summarize_rewards(reward, read_completions(completions, examples))
    except DataError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"completions: {summary.count}")
    for name in reward.graders:
        click.echo(
            f"{name}: mean {summary.mean_scores[name]:.4f}, format failures {summary.failure_rates[name]:.2%}"
        )
    if len(reward.graders) > 1:
        click.echo(f"reward (weighted mean): {summary.mean_total:.4f}")
