"""``npu-rft rollout-server``: vLLM behind HTTP, for ``rollout.engine: vllm_server`` (docs/rollout.md)."""
from __future__ import annotations

from typing import Optional

import click


@click.command("rollout-server")
@click.option("--model", required=True, help="The policy's model directory or hub name (its architecture; the "
                                               "trainer pushes the weights every step).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8011, show_default=True, type=int, help="Port to listen on (0: any free port).")
@click.option("--dtype", default="bfloat16", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16"]), help="vLLM's weight dtype; match the trainer's.")
@click.option("--gpu-memory-utilization", default=0.9, show_default=True, type=float,
              help="Share of the device's memory vLLM may take (ignored on CPU).")
@click.option("--kv-cache-gib", default=None, type=float, help="KV cache size in GiB (default: vLLM's).")
@click.option("--enable-sleep-mode", is_flag=True, help="Allow vLLM's sleep mode (CUDA, NPU).")
def command(model: str, host: str, port: int, dtype: str, gpu_memory_utilization: float,
            kv_cache_gib: Optional[float], enable_sleep_mode: bool) -> None:
    """Serve vLLM on MODEL for a trainer with rollout.engine: vllm_server (runs until stopped)."""
    from npu_rft.engines.base import VllmConfig
    from npu_rft.engines.server import serve

    try:
        config = VllmConfig(gpu_memory_utilization=gpu_memory_utilization, kv_cache_gib=kv_cache_gib,
                            enable_sleep_mode=enable_sleep_mode)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    serve(model, host=host, port=port, dtype=dtype, config=config)
