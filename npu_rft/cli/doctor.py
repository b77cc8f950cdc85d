"""``npu-rft doctor [--json [PATH]] [--full [--device D]] [--verbose]``: check the environment;
with ``--full``, also run the on-device acceptance suite (``npu_rft.acceptance``).
Exit 1 when a check is an error or an acceptance line failed.

``npu-rft doctor --plan --config C --nproc N [--device-gb G]``: instead, the
per-device memory estimate of config C on N ranks (``npu_rft.memory_plan``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import click

DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")


@click.command("doctor")
@click.option("--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="[PATH]",
              help="The report as JSON: on stdout (`--json`), or written to PATH (`--json PATH`).")
@click.option("--full", is_flag=True,
              help="Also run the acceptance suite on the device: kernels, fused ops, GRPO/DPO runs of a tiny model, "
                   "checkpoint resume, 2 ranks, throughput (a few minutes at most).")
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True,
              help="The device the acceptance suite runs on (with --full).")
@click.option("--verbose", is_flag=True,
              help="Show the full exception chain behind an error (for example why `import torch` fails).")
@click.option("--plan", is_flag=True,
              help="Print the per-device memory estimate of --config on --nproc ranks instead of checking.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The training config to plan (with --plan).")
@click.option("--nproc", type=int, default=1, show_default=True, help="Ranks (devices) the run uses (with --plan).")
@click.option("--device-gb", type=float, default=64.0, show_default=True,
              help="One device's memory in GB, to say whether the plan fits (with --plan; 64: an Ascend 910B).")
def command(json_out: Optional[str], full: bool, device: str, verbose: bool, plan: bool,
            config_path: Optional[str], nproc: int, device_gb: float) -> None:
    """Check python, torch, torch_npu, CANN, triton, devices, HCCL and the kernels; say how to fix problems.
    With --full, also verify training on the device. With --plan, estimate a config's memory per device."""
    if plan:
        _plan(config_path, nproc, device_gb)
        return
    from npu_rft.doctor import run_doctor  # imports torch only if `import torch` works

    report = run_doctor()
    to_stdout = json_out == "-"
    if not full:
        _emit(report.to_dict(), report.format_text(verbose=verbose), json_out)
        if not report.ok:
            raise click.exceptions.Exit(1)
        return

    # --full: the doctor's report first, then the suite, with progress on stderr
    click.echo(report.format_text(verbose=verbose), err=to_stdout)
    torch_ok = any(c.name == "torch import" and c.status == "ok" for c in report.checks)
    acceptance: Dict[str, Any]
    if not torch_ok:
        text = "acceptance suite: not run, because `import torch` fails (see above)"
        acceptance = {"ok": False, "not_run": text}
    else:
        from npu_rft.acceptance import run_acceptance
        from npu_rft.device import DeviceError

        click.echo(f"\nacceptance suite on device {device!r}:", err=True)
        try:
            suite = run_acceptance(device, progress=lambda line: click.echo(f"  {line}", err=True),
                                   progress_bar=sys.stderr.isatty())
        except (DeviceError, ValueError) as exc:  # the device asked for is absent
            text = f"acceptance suite: not run: {exc}"
            acceptance = {"ok": False, "not_run": text}
        else:
            text = suite.format_table()
            acceptance = suite.to_dict()
    ok = report.ok and acceptance["ok"]
    click.echo("\n" + text, err=to_stdout)
    if json_out is not None:
        combined = {"ok": ok, "doctor": report.to_dict(), "acceptance": acceptance}
        _emit(combined, None, json_out)
    if not ok:
        raise click.exceptions.Exit(1)


def _plan(config_path: Optional[str], nproc: int, device_gb: float) -> None:
    from npu_rft.config import load_train_config
    from npu_rft.memory_plan import plan_for_config

    if config_path is None:
        raise click.UsageError("--plan needs --config CONFIG.yaml (and --nproc N)")
    config = load_train_config(config_path)
    click.echo(f"memory per device: {config_path}, {config.model.finetune} fine-tuning, "
               f"parallel.strategy={config.parallel.strategy}"
               f"{' with cpu_offload' if config.parallel.cpu_offload else ''}, {nproc} rank(s)")
    click.echo(plan_for_config(config, nproc, device_gb).format_text())


def _emit(data: Dict[str, Any], text: Optional[str], json_out: Optional[str]) -> None:
    """``text`` on stdout, or ``data`` as JSON on stdout (``-``) or in a file."""
    if json_out is None:
        click.echo(text)
    elif json_out == "-":
        click.echo(json.dumps(data, indent=2))
    else:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        if text is not None:
            click.echo(text)
        click.echo(f"JSON report written to {path}", err=True)
