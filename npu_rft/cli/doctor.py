"""``npu-rft doctor [--json]``: check the environment; exit 1 only when a check is an error."""
from __future__ import annotations

import click


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(as_json: bool) -> None:
    """Check python, torch, torch_npu, CANN, triton, devices, HCCL and the kernels; say how to fix problems."""
    from npu_rft.doctor import run_doctor  # imports torch only if `import torch` works

    report = run_doctor()
    click.echo(report.to_json() if as_json else report.format_text())
    if not report.ok:
        raise click.exceptions.Exit(1)
