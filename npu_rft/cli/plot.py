"""``npu-rft plot RUN_DIR``: training curves as a PNG."""
from __future__ import annotations

from typing import Optional

import click


@click.command("plot")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="PNG to write (default: RUN_DIR/curves.png).")
def command(run_dir: str, out: Optional[str]) -> None:
    """Plot reward, loss, KL and eval Top@1 over steps from RUN_DIR/metrics.jsonl."""
    from npu_rft.data.schema import DataError
    from npu_rft.plot import plot_run

    try:
        path = plot_run(run_dir, out)
    except DataError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(str(path))
