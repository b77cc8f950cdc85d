"""``npu-rft export``: a trained checkpoint as an adapter or a merged model directory."""
from __future__ import annotations

from typing import Optional

import click


@click.command("export")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False), help="A run directory: its latest checkpoint.")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), help="A checkpoint directory.")
@click.option("--merge", is_flag=True, help="Merge the LoRA adapter into the base weights (a full model directory).")
@click.option("--out", required=True, type=click.Path(), help="The directory to write (must not exist).")
def command(run_dir: Optional[str], checkpoint: Optional[str], merge: bool, out: str) -> None:
    """Write the adapter (PEFT format) or, with --merge, a model that plain transformers loads."""
    from npu_rft.export import export_checkpoint, resolve_checkpoint

    try:
        source = resolve_checkpoint(run_dir, checkpoint)
        path = export_checkpoint(source, out, merge=merge)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"exported {source} -> {path}")
