"""The full fine-tuning memory table of docs/distributed.md: Qwen2.5 1.5B to
32B on 8 devices of 64 GB, under ddp, fsdp2 and fsdp2 with CPU offload
(``npu_rft.memory_plan``; shapes from the models' config.json, no weights).

    python tools/memory_table.py [--nproc 8] [--device-gb 64]
"""
import argparse

from npu_rft.memory_plan import GB, ModelShape, plan_memory

# The workload of the table: GRPO with a reference (beta > 0), AdamW, bf16 compute; each rank
# rolls out 4 prompts x 8 samples of 1,024 + 512 tokens at a time and trains micro-batches of
# 4 sequences with gradient checkpointing.
ROLLOUT_TOKENS = 4 * 8 * (1024 + 512)
MICRO_BATCH_TOKENS = 4 * (1024 + 512)
SETUPS = (("ddp", "ddp", False), ("fsdp2", "fsdp2", False), ("fsdp2 + offload", "fsdp2", True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=8)
    parser.add_argument("--device-gb", type=float, default=64.0)
    args = parser.parse_args()
    print("| model | setup | params | grads | Adam | reference | rollout gather | KV cache "
          "| peak before activations | activations | fits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in ("1.5B", "7B", "14B", "32B"):
        shape = ModelShape.qwen25(size)
        for label, strategy, offload in SETUPS:
            plan = plan_memory(shape, strategy=strategy, nproc=args.nproc, cpu_offload=offload, reference=True,
                               rollout_tokens=ROLLOUT_TOKENS, micro_batch_tokens=MICRO_BATCH_TOKENS,
                               gradient_checkpointing=True, device_bytes=args.device_gb * GB)

            def cell(name: str) -> str:
                rows = [(b, where) for n, b, where in plan.rows if n == name]
                if not rows:
                    return "-"
                b, where = rows[0]
                return f"{b / GB:.1f}" + (" (host)" if where == "host" else "")

            grads = cell("gradients")
            if plan.get("DDP gradient buckets"):
                grads += f" + {plan.get('DDP gradient buckets') / GB:.1f}"
            peak = plan.total()
            fits = "yes" if peak + plan.activations <= args.device_gb * GB else "no"
            print(f"| {size} ({shape.params / 1e9:.2f} B) | {label} | {cell('parameters')} | {grads} "
                  f"| {cell('optimizer state')} | {cell('reference copy')} | {cell('rollout gather')} "
                  f"| {cell('KV cache')} | {peak / GB:.1f} | {plan.activations / GB:.1f} | {fits} |")


if __name__ == "__main__":
    main()
