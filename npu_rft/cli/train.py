"""``npu-rft train``: reinforcement fine-tuning from a YAML config."""
from __future__ import annotations

from typing import Optional, Tuple

import click


@click.command("train")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The run's YAML config (see configs/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set optim.lr=1e-5 (repeatable).")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[PATH]",
              help="Continue from the run's latest checkpoint, or from PATH (a checkpoint or run directory).")
def command(config_path: str, overrides: Tuple[str, ...], resume: Optional[str]) -> None:
    """Train as the config says; the run directory is run.output_dir."""
    from npu_rft.config import load_train_config
    from npu_rft.config_base import ConfigError

    try:
        config = load_train_config(config_path, overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None

    result = fit_or_exit(config, resume)
    if result.checkpoint is not None:
        click.echo(f"checkpoint: {result.checkpoint}")


def fit_or_exit(config, resume: Optional[str]):
    """``trainer.fit``, with the run's own stopping errors turned into a CLI error; prints the outcome."""
    from npu_rft.trainer import TrainingStopped, fit

    try:
        result = fit(config, resume=resume)
    except (TrainingStopped, FileExistsError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{result.status}: {result.step} steps; run directory {result.run_dir}")
    return result
