"""``npu-rft sft``: supervised fine-tuning in the training loop (algorithm ``sft``)."""
from __future__ import annotations

from typing import Optional, Tuple

import click


@click.command("sft")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The run's YAML config; `algorithm` defaults to sft (see configs/tiny/sft_lora_cpu.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set sft.text_fraction=0.5 (repeatable).")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[PATH]",
              help="Continue from the run's latest checkpoint, or from PATH (a checkpoint or run directory).")
def command(config_path: str, overrides: Tuple[str, ...], resume: Optional[str]) -> None:
    """Supervised warm start on {system, context, target} rows (loss on the target) and/or
    {"text": ...} rows (loss on the whole text); LoRA or full fine-tuning."""
    from npu_rft.config import TrainConfig
    from npu_rft.config_base import ConfigError, apply_overrides, from_dict, load_yaml

    try:
        data = apply_overrides(load_yaml(config_path), overrides)
        algorithm = data.setdefault("algorithm", "sft")
        if algorithm != "sft":
            raise ConfigError([f"algorithm: {algorithm!r}; npu-rft sft runs sft (use npu-rft train for {algorithm})"],
                              config_path)
        config = from_dict(TrainConfig, data, config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None

    from npu_rft.cli.train import fit_or_exit

    result = fit_or_exit(config, resume)
    if result.checkpoint is not None:
        if config.model.finetune == "lora":
            click.echo(f"adapter: {result.checkpoint / 'adapter'} (start GRPO/DPO from it with "
                       f"--set model.init_adapter={result.checkpoint / 'adapter'})")
        else:
            click.echo(f"model: {result.checkpoint / 'model'} (start GRPO/DPO from it with "
                       f"--set model.name_or_path={result.checkpoint / 'model'})")
