"""``npu-rft bench-kernels``: time and memory of the fused log-prob against
naive and the bare GEMMs (library: ``npu_rft_kernels.bench``)."""
from __future__ import annotations

import json
from typing import Optional, Tuple

import click


def _shape(value: str) -> Tuple[int, int, int]:
    try:
        n, h, v = (int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not N,H,V (three integers, e.g. 1024,896,151936)") from None
    return n, h, v


@click.command("bench-kernels")
@click.option("--quick", is_flag=True, help="Small shapes that run in seconds (N,H,V = 64,32,2000).")
@click.option("--shape", "shapes", multiple=True, metavar="N,H,V", help="Shape to run; repeatable. "
              "Default: the Qwen2.5 head, H=896 V=151936, N in {1024, 4096}.")
@click.option("--backends", default="torch", show_default=True,
              help="Comma-separated backends to compare with naive and the bare GEMMs (torch, triton, npu, liger).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "npu"]), default="auto", show_default=True, envvar="NPU_RFT_DEVICE",
              help="Device; $NPU_RFT_DEVICE fills it when the option is not given.")
@click.option("--mode", "modes", type=click.Choice(["frozen", "trainable"]), multiple=True,
              help="Head mode; repeatable. Default: both.")
@click.option("--entropy", type=click.Choice(["off", "on", "both"]), default="off", show_default=True,
              help="Also return (and backpropagate through) the entropy.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed repeats per case.")
@click.option("--no-memory", is_flag=True, help="Skip the per-case memory subprocesses.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results here as JSON.")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False),
              help="Write one profiler trace per case here (the NPU profiler on Ascend).")
def command(quick: bool, shapes: Tuple[str, ...], backends: str, dtype: str, device: str, modes: Tuple[str, ...],
            entropy: str, repeats: int, no_memory: bool, json_path: Optional[str], profile_dir: Optional[str]) -> None:
    """Compare the fused log-prob backends with naive and the bare GEMMs: median
    fwd and fwd+bwd time, GFLOP/s and incremental peak memory (fresh process per case)."""
    from npu_rft.device import get_device
    from npu_rft_kernels.bench import QUICK_SHAPES, QWEN_SHAPES, format_table, run_benchmark

    parsed = [_shape(s) for s in shapes] or list(QUICK_SHAPES if quick else QWEN_SHAPES)
    results = run_benchmark(
        parsed,
        impls=[b.strip() for b in backends.split(",") if b.strip()],
        dtype=dtype,
        device=get_device(device),
        modes=modes or ("frozen", "trainable"),
        entropy={"off": (False,), "on": (True,), "both": (False, True)}[entropy],
        repeats=repeats,
        memory=not no_memory,
        profile_dir=profile_dir,
        log=lambda msg: click.echo(msg, err=True),
    )
    click.echo(format_table(results))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump([r.to_dict() for r in results], f, indent=2)
        click.echo(f"wrote {json_path}")
