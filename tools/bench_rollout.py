#!/usr/bin/env python
"""Benchmark rollout throughput: the native engine against the vllm engine, in one run.

One rollout is ``--prompts`` prompts of ``--prompt-tokens`` random token ids,
``--samples`` completions each, ``--max-new-tokens`` tokens, temperature 1,
through the engine protocol (``npu_rft.engines``): the native decode loop
(``CachedSampler``) on the model itself, and vLLM in this process
(``VllmEngine``) after a weight sync. The model has the real Qwen2.5 shape
(``--shape``; random weights from the config, nothing downloaded), so it
rarely emits EOS and every completion runs to the limit on both sides. Each
engine warms up once; then the engines alternate ``--repeats`` times, and
the figure is the median tokens/s (generated tokens over the generate call's
wall time), with the spread, plus vLLM's weight-sync time per step.

It needs vLLM: run it in .venv-vllm (``make test-vllm`` builds it) on CPU, or
in an environment with vLLM for your GPU (``--device cuda``, ``--dtype bfloat16``)::

    .venv-vllm/bin/python tools/bench_rollout.py --repeats 3 --json rollout.json
    python tools/bench_rollout.py --device cuda --dtype bfloat16 --gpu-memory-utilization 0.5
    python tools/bench_rollout.py --shape tiny --prompts 2 --samples 2 --max-new-tokens 8 --repeats 1   # smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import SHAPES  # noqa: E402  (the real Qwen2.5 shapes, shared with the step benchmark)

# A smoke-test shape: head size 32, the smallest vLLM's CPU attention takes.
TINY = dict(hidden=64, layers=2, mlp=128, heads=2, kv_heads=1, tied=True, vocab=512)


def build_model_dir(out: Path, shape: dict, dtype) -> Path:
    """A Qwen2 directory of ``shape`` with random weights (built once per shape and dtype)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         intermediate_size=shape["mlp"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], tie_word_embeddings=shape["tied"],
                         max_position_embeddings=2048, eos_token_id=0, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=[*SHAPES, "tiny"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "npu"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--cache-dir", type=Path, default=REPO / ".dev" / "bench-rollout")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)

    import torch

    from npu_rft.device import get_device
    from npu_rft.engines import VllmConfig, rollout
    from npu_rft.engines.native import NativeEngine
    from npu_rft.engines.vllm import VllmEngine
    from npu_rft.rollout import CachedSampler, SamplingParams

    dtype = getattr(torch, args.dtype)
    shape = TINY if args.shape == "tiny" else SHAPES[args.shape]
    path = build_model_dir(args.cache_dir / f"{args.shape}-{args.dtype}", shape, dtype)
    device = get_device(args.device)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device.torch_device).eval()
    eos = [0]
    engines = {
        "native": NativeEngine(CachedSampler(model, eos_token_ids=eos, pad_token_id=1, device=device), device),
        "vllm": VllmEngine(str(path), args.dtype, eos, VllmConfig(gpu_memory_utilization=args.gpu_memory_utilization,
                                                                  kv_cache_gib=args.kv_cache_gib)),
    }
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, shape["vocab"], (args.prompts, args.prompt_tokens), generator=g).tolist()
    params = SamplingParams(max_new_tokens=args.max_new_tokens, num_samples=args.samples, temperature=1.0)
    for name, engine in engines.items():  # warm-up: compilation, allocations
        rollout(engine, model, prompts[:1], SamplingParams(max_new_tokens=4, num_samples=2), seed=0)

    figures = {name: {"tokens_per_s": [], "tokens": []} for name in engines}
    figures["vllm"]["sync_s"] = []
    for repeat in range(args.repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.sync_weights(model)
            device.synchronize()
            synced = time.perf_counter()
            samples = engine.generate(prompts, params, seed=repeat)
            device.synchronize()
            seconds = time.perf_counter() - synced
            tokens = sum(len(c) for c in samples.completion_ids)
            figures[name]["tokens_per_s"].append(tokens / seconds)
            figures[name]["tokens"].append(tokens)
            if name == "vllm":
                figures[name]["sync_s"].append(synced - start)
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {tokens} tokens in {seconds:.2f} s "
                  f"= {tokens / seconds:.1f} tokens/s", flush=True)

    summary = {name: {"median_tokens_per_s": statistics.median(f["tokens_per_s"]),
                      "min_tokens_per_s": min(f["tokens_per_s"]), "max_tokens_per_s": max(f["tokens_per_s"]),
                      **({"median_sync_s": statistics.median(f["sync_s"])} if "sync_s" in f else {})}
               for name, f in figures.items()}
    ratio = summary["vllm"]["median_tokens_per_s"] / summary["native"]["median_tokens_per_s"]
    print(f"\n{args.shape} {args.dtype} on {args.device} ({torch.get_num_threads()} torch threads): {args.prompts} "
          f"prompts x {args.samples} samples x {args.max_new_tokens} tokens, {args.repeats} interleaved repeats")
    for name, s in summary.items():
        sync = f", weight sync {s['median_sync_s']:.2f} s" if "median_sync_s" in s else ""
        print(f"  {name:6s} median {s['median_tokens_per_s']:.1f} tokens/s "
              f"(min {s['min_tokens_per_s']:.1f}, max {s['max_tokens_per_s']:.1f}){sync}")
    print(f"  vllm / native: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "torch_threads": torch.get_num_threads(), "runs": figures,
                                         "summary": summary, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
