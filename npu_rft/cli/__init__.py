"""The ``npu-rft`` command: one click group, one thin module per subcommand.

Subcommand modules are imported only when their command runs, and torch is
imported only inside the commands that need it, so ``npu-rft doctor`` still
works where ``import torch`` itself is broken (torch_npu without CANN).
"""
from __future__ import annotations

import importlib
import logging
import sys
from typing import List, Optional, Sequence

import click

# name -> module under npu_rft.cli; each module defines ``command``.
SUBCOMMANDS = {
    "convert-data": "convert_data",
    "doctor": "doctor",
    "grade": "grade",
    "train": "train",
    "sft": "sft",
    "evaluate": "evaluate",
    "export": "export",
    "plot": "plot",
    "bench-kernels": "bench_kernels",
    "quickstart": "quickstart",
    "rollout-server": "rollout_server",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted(n for n, m in SUBCOMMANDS.items() if _module_exists(m))

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        module = SUBCOMMANDS.get(name)
        if module is None or not _module_exists(module):
            return None
        return importlib.import_module(f"npu_rft.cli.{module}").command


def _module_exists(module: str) -> bool:
    return importlib.util.find_spec(f"npu_rft.cli.{module}") is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="npu-rft")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """npu-rft: reinforcement fine-tuning (GRPO, iterative DPO) on Ascend NPU, CUDA or CPU."""
    from npu_rft.logging_utils import setup_logging

    setup_logging(logging.DEBUG if verbose else logging.INFO)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; return the exit code instead of exiting (for tests and ``-m``)."""
    try:
        # with standalone_mode=False click returns the code of a `click.exceptions.Exit`
        # raised inside a command instead of raising it
        result = cli.main(args=list(argv) if argv is not None else None, prog_name="npu-rft", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 1
    return result if isinstance(result, int) else 0
