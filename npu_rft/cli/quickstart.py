"""``npu-rft quickstart``: sample data, tiny model, SFT warm-up, GRPO and/or iterative DPO, before/after table."""
from __future__ import annotations

from typing import Optional

import click


@click.command("quickstart")
@click.option("--out", "out_dir", default="runs/quickstart", show_default=True, type=click.Path(file_okay=False),
              help="Output directory (a previous quickstart's output there is replaced).")
@click.option("--seed", default=0, show_default=True, help="Seed of the data, the model and the runs.")
@click.option("--algorithm", default="grpo", show_default=True, type=click.Choice(["grpo", "dpo", "both"]),
              help="The RL arm: GRPO, iterative DPO, or both from the same warm-up, reported side by side.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "npu", "cuda", "cpu"]), envvar="NPU_RFT_DEVICE",
              help="Device; $NPU_RFT_DEVICE fills it when the option is not given.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Model cache (default: $NPU_RFT_CACHE, $XDG_CACHE_HOME/npu-rft or ~/.cache/npu-rft).")
@click.option("--grpo-steps", default=None, type=click.IntRange(min=1), help="GRPO steps (default: the recipe's).")
@click.option("--dpo-steps", default=None, type=click.IntRange(min=1),
              help="Iterative-DPO optimizer updates (default: the recipe's).")
@click.option("--smoke", is_flag=True, help="Tiny sizes: every stage in seconds, nothing learned (for tests).")
def command(out_dir: str, seed: int, algorithm: str, device: str, cache_dir: Optional[str],
            grpo_steps: Optional[int], dpo_steps: Optional[int], smoke: bool) -> None:
    """Watch a tiny model learn to rank diagnoses from a rule-based reward, on CPU in minutes."""
    from npu_rft.quickstart.run import ARM_LABELS, QuickstartOptions, run_quickstart

    settings = dict(out_dir=out_dir, seed=seed, algorithm=algorithm, device=device, cache_dir=cache_dir)
    if grpo_steps is not None:
        settings["grpo_steps"] = grpo_steps
    if dpo_steps is not None:
        settings["dpo_steps"] = dpo_steps
    options = QuickstartOptions.smoke(**settings) if smoke else QuickstartOptions(**settings)
    result = run_quickstart(options)
    click.echo("")
    click.echo(result.report, nl=False)
    t = result.timings_s
    click.echo("")
    for arm, after in result.after.items():
        click.echo(f"{ARM_LABELS[arm]}: Top@1 on the eval split {result.before['top1']:.2f} -> {after['top1']:.2f} "
                   f"(format failures {after['format_failure_rate']:.0%}); training {t[arm]:.0f} s")
    click.echo(f"{t['total']:.0f} s in all (warm-up {t['warmup']:.0f} s)")
    click.echo(f"report: {result.out_dir}/report.md   curves: {'  '.join(str(p) for p in result.curves.values())}")
