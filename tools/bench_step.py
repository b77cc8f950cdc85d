"""Benchmark one GRPO step: npu-rft against TRL's GRPOTrainer, side by side.

Both run the same tiny Qwen2-architecture model: hidden 256, 4 layers, MLP
1024, 4 heads / 2 KV heads (head dim 64, as in Qwen2.5), embedding tied to the
LM head (as in the small Qwen2.5 models), and a byte-level BPE tokenizer of
8,000 tokens trained here (``--mlp/--heads/--kv-heads/--untied`` choose other
shapes). LoRA r=8 (alpha 16) on q/k/v/o, 2 prompts x 4
samples, 64 new tokens, temperature 1, beta 0.04, eps 0.2/0.28, token-mean
loss, AdamW, one micro-batch, fp32 on CPU, no gradient checkpointing on
either side (TRL's default is on; ``--gradient-checkpointing`` turns it on for
both). ``--vocab 151936`` pads the model's
vocabulary (embedding and LM head) to 151,936 rows, as Qwen pads it; the
tokenizer stays the same. The random model rarely emits EOS, so every
completion has 64 tokens on both sides.

Each measurement is a fresh process (so the peak RSS, ``ru_maxrss``, is the
framework's own): ``--warmup`` steps, then ``--steps`` timed steps; its figure
is the median step time. Frameworks are interleaved ``--repeats`` times and
the medians of the repeats are reported.

TRL runs in its own virtual environment (``--trl-venv``, default
``.dev/trl-venv``), never in the project's. ``--setup-trl`` creates it: a venv
that sees the project's packages (torch, transformers, peft) through a ``.pth``
file and gets ``trl`` (and what it needs beyond them) installed into itself.
Without that venv the TRL column is skipped.

    python tools/bench_step.py --setup-trl                  # once
    python tools/bench_step.py --vocab 8000 151936 --repeats 3
    python tools/bench_step.py --prefix-sharing             # what prefix sharing saves in rollout
    python tools/bench_step.py --shape qwen2.5-0.5b --repeats 3 # the real 0.5B shape (random weights) on CPU
    python tools/bench_step.py --shape qwen2.5-1.5b --device cuda   # on a GPU, bf16, with peak device memory

``--shape qwen2.5-0.5b | qwen2.5-1.5b`` builds random weights from the real
configs (layers, hidden, heads / KV heads, MLP, tied embeddings, vocabulary
151,936); nothing is downloaded. The settings stay as above; on ``--device
cuda`` both sides compute in bf16.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRL_VENV = REPO / ".dev" / "trl-venv"
TRL_VERSION = "1.16.0"

SETTINGS = dict(prompts=2, samples=4, new_tokens=64, beta=0.04, lr=1e-5, lora_r=8, lora_alpha=16,
                targets=["q_proj", "k_proj", "v_proj", "o_proj"])


# ----------------------------------------------------------------------------- shared set-up


def _words(rng: random.Random, n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(n)]


# Real model shapes (the published configs' sizes; weights random, nothing downloaded).
SHAPES = {
    "qwen2.5-0.5b": dict(hidden=896, layers=24, mlp=4864, heads=14, kv_heads=2, tied=True, vocab=151936),
    "qwen2.5-1.5b": dict(hidden=1536, layers=28, mlp=8960, heads=12, kv_heads=2, tied=True, vocab=151936),
}


def model_dir(args, vocab: int) -> Path:
    if args.shape != "tiny":
        s = SHAPES[args.shape]
        return build_model(args.cache_dir / f"{args.shape}-random", s["vocab"], mlp=s["mlp"], heads=s["heads"],
                           kv_heads=s["kv_heads"], tied=s["tied"], hidden=s["hidden"], layers=s["layers"])
    shape = f"m{args.mlp}-h{args.heads}-kv{args.kv_heads}" + ("-untied" if args.untied else "")
    return build_model(args.cache_dir / f"qwen2-tiny-v{vocab}-{shape}", vocab, mlp=args.mlp, heads=args.heads,
                       kv_heads=args.kv_heads, tied=not args.untied)


def build_model(out: Path, vocab: int, *, mlp: int, heads: int, kv_heads: int, tied: bool, hidden: int = 256,
                layers: int = 4) -> Path:
    """The benchmark model directory (built once): ``hidden`` x ``layers`` (256 x 4 for the tiny
    shape), ``vocab`` rows, random weights."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from npu_rft.quickstart.tiny_model import build_tokenizer

    rng = random.Random(0)
    lexicon = _words(rng, 20000)
    corpus = [" ".join(rng.choice(lexicon) for _ in range(50)) for _ in range(4000)]
    tokenizer = build_tokenizer(corpus, [], 8000)
    config = Qwen2Config(vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden, num_hidden_layers=layers,
                         intermediate_size=mlp, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=1024, tie_word_embeddings=tied, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    (out / "prompts.json").write_text(json.dumps(
        [" ".join(rng.choice(lexicon) for _ in range(rng.randint(15, 30))) for _ in range(64)]))
    return out


def digit_fraction(text: str) -> float:
    """The reward on both sides: the fraction of characters that are digits."""
    return sum(c.isdigit() for c in text) / len(text) if text else 0.0


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- workers (one process each)


def worker_ours(model_dir: Path, steps: int, warmup: int, out_dir: Path, checkpointing: bool,
                device: str = "cpu") -> dict:
    from npu_rft.config import TrainConfig
    from npu_rft.config_base import from_dict
    from npu_rft.graders.base import GRADERS, Grade
    from npu_rft.trainer import fit

    GRADERS.add("bench_digits", lambda completion, example: Grade(digit_fraction(completion)))
    prompts = json.loads((model_dir / "prompts.json").read_text())
    data = out_dir / "train.jsonl"
    data.write_text("".join(json.dumps({"context": p, "target": "x"}) + "\n" for p in prompts))
    s = SETTINGS
    cfg = from_dict(TrainConfig, {
        "run": {"output_dir": str(out_dir / "run"), "device": device, "tensorboard": False, "progress_bar": False,
                "log_samples_every": 0},
        "model": {"name_or_path": str(model_dir), "finetune": "lora", "gradient_checkpointing": checkpointing,
                  "lora": {"r": s["lora_r"], "alpha": s["lora_alpha"], "target_modules": s["targets"]}},
        "data": {"train": str(data), "shuffle": False},
        "rollout": {"num_samples": s["samples"], "max_new_tokens": s["new_tokens"], "temperature": 1.0},
        "graders": [{"name": "bench_digits"}],
        "grpo": {"beta": s["beta"], "eps_low": 0.2, "eps_high": 0.28, "aggregation": "token_mean"},
        "optim": {"lr": s["lr"]},
        "schedule": {"steps": warmup + steps},
        "batch": {"prompts_per_step": s["prompts"], "micro_batch_size": s["prompts"] * s["samples"]},
    })
    fit(cfg)
    records = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = records[warmup:]
    stages = {k: statistics.median(r[k] for r in timed) for k in timed[0] if k.startswith("timing_s/")}
    peak = {"peak_device_gb": max(r["memory/peak_gb"] for r in records)} if device != "cpu" else {}
    return {"step_s": [r["timing_s/step"] for r in timed], "stages": stages, "peak_rss": _peak_rss(), **peak}


def worker_trl(model_dir: Path, steps: int, warmup: int, out_dir: Path, checkpointing: bool,
               device: str = "cpu") -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    s = SETTINGS
    prompts = json.loads((model_dir / "prompts.json").read_text())
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])

    def reward(completions, **kwargs):
        return [digit_fraction(c[0]["content"]) for c in completions]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

    timer = StepTimer()
    args = GRPOConfig(
        output_dir=str(out_dir / "trl"), per_device_train_batch_size=s["prompts"] * s["samples"],
        num_generations=s["samples"], max_completion_length=s["new_tokens"], beta=s["beta"], epsilon=0.2,
        epsilon_high=0.28, loss_type="dapo", learning_rate=s["lr"], max_steps=warmup + steps,
        use_cpu=device == "cpu", bf16=device != "cpu",
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, shuffle_dataset=False,
        temperature=1.0, top_p=1.0, seed=0, dataloader_num_workers=0, gradient_checkpointing=checkpointing,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if device == "cpu" else torch.bfloat16),
        reward_funcs=reward, args=args, train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], target_modules=s["targets"],
                               task_type="CAUSAL_LM"),
        callbacks=[timer],
    )
    trainer.train()
    peak = {"peak_device_gb": torch.cuda.max_memory_allocated() / 2**30} if device != "cpu" else {}
    return {"step_s": timer.times[warmup:], "stages": {}, "peak_rss": _peak_rss(), **peak}


def worker_prefix_sharing(model_dir: Path, prompt_tokens: int, repeats: int) -> dict:
    """Rollout time of 2 prompts x 4 samples: shared prefill (our loop), each
    prompt prefilled 4 times (same loop, prompts repeated), and HF generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npu_rft.device import get_device
    from npu_rft.rollout import CachedSampler, GenerateSampler, SamplingParams, eos_token_ids

    device = get_device("cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, len(tok), (prompt_tokens,), generator=g).tolist() for _ in range(SETTINGS["prompts"])]
    kw = dict(eos_token_ids=eos_token_ids(model, tok), pad_token_id=tok.pad_token_id, device=device)
    k, n = SETTINGS["samples"], SETTINGS["new_tokens"]
    cases = {
        "shared prefill (ours)": (CachedSampler(model, **kw), prompts, k),
        "prefill per sample": (CachedSampler(model, **kw), [p for p in prompts for _ in range(k)], 1),
        "HF generate": (GenerateSampler(model, **kw), prompts, k),
    }
    out = {}
    for name, (sampler, batch, samples) in cases.items():
        params = SamplingParams(max_new_tokens=n, num_samples=samples, temperature=1.0)
        sampler.sample(batch, params, torch.Generator().manual_seed(1))  # warm-up
        times = []
        for r in range(repeats):
            start = time.perf_counter()
            with torch.no_grad():
                sampler.sample(batch, params, torch.Generator().manual_seed(r))
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


# ----------------------------------------------------------------------------- driver


def setup_trl(venv: Path) -> None:
    """A venv that sees the project's site-packages and has trl installed into itself."""
    import site

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    target = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    (Path(target) / "_npu_rft_base.pth").write_text(f"import site; site.addsitedir({site.getsitepackages()[0]!r})\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}"], check=True)


def run_worker(python: str, kind: str, model_dir: Path, args, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [python, __file__, "--worker", kind, "--model-dir", str(model_dir), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--work-dir", tmp, "--device", args.device]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", *SHAPES], default="tiny",
                   help="tiny: hidden 256 x 4 layers (--vocab, --mlp, ... shape it); the Qwen2.5 shapes use their "
                        "real sizes and vocabulary 151,936, with random weights")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="fp32 on cpu; bf16 compute on cuda, where peak device memory is reported too")
    p.add_argument("--vocab", type=int, nargs="+", default=None, help="tiny shape only (default: 8000 151936)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per process")
    p.add_argument("--repeats", type=int, default=3, help="interleaved processes per framework")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the workers")
    p.add_argument("--trl-venv", type=Path, default=DEFAULT_TRL_VENV)
    p.add_argument("--setup-trl", action="store_true", help="create the TRL venv and exit")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--prefix-sharing", action="store_true", help="measure rollout prefix sharing instead")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[32, 512])
    p.add_argument("--mlp", type=int, default=1024, help="intermediate_size")
    p.add_argument("--heads", type=int, default=4, help="num_attention_heads")
    p.add_argument("--kv-heads", type=int, default=2, help="num_key_value_heads")
    p.add_argument("--untied", action="store_true", help="a separate LM head instead of the tied embedding")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "npu-rft-bench")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        fn = worker_ours if args.worker == "ours" else worker_trl
        print(json.dumps(fn(args.model_dir, args.steps, args.warmup, args.work_dir, args.gradient_checkpointing,
                            args.device)))
        return 0
    if args.shape != "tiny":
        if args.vocab not in (None, [SHAPES[args.shape]["vocab"]]):
            p.error(f"--shape {args.shape} has vocabulary {SHAPES[args.shape]['vocab']}; drop --vocab")
        args.vocab = [SHAPES[args.shape]["vocab"]]
    elif args.vocab is None:
        args.vocab = [8000, 151936]
    if args.setup_trl:
        setup_trl(args.trl_venv)
        print(f"TRL {TRL_VERSION} installed in {args.trl_venv}")
        return 0

    results = {}
    if args.prefix_sharing:
        for vocab in args.vocab:
            for tokens in args.prompt_tokens:
                res = worker_prefix_sharing(model_dir(args, vocab), tokens, args.repeats)
                results[f"v{vocab}_p{tokens}"] = res
                print(f"vocab {vocab}, prompt {tokens} tokens: " +
                      ", ".join(f"{k} {v:.3f} s" for k, v in res.items()))
    else:
        trl_python = args.trl_venv / "bin" / "python"
        use_trl = not args.no_trl and trl_python.is_file()
        if not use_trl and not args.no_trl:
            print(f"TRL venv not found at {args.trl_venv}: TRL skipped (create it with --setup-trl)")
        header = f"{'vocab':>7} {'framework':>9} {'s/step':>8} {'peak RSS GB':>12}"
        for vocab in args.vocab:
            path = model_dir(args, vocab)
            runs = {"npu-rft": [], "trl": []}
            for _ in range(args.repeats):
                runs["npu-rft"].append(run_worker(sys.executable, "ours", path, args, args.threads))
                if use_trl:
                    runs["trl"].append(run_worker(str(trl_python), "trl", path, args, args.threads))
            summary = {}
            for name, rs in runs.items():
                if rs:
                    summary[name] = {
                        "step_s": statistics.median(statistics.median(r["step_s"]) for r in rs),
                        "peak_rss_gb": statistics.median(r["peak_rss"] for r in rs) / 1e9,
                        "per_process_step_s": [statistics.median(r["step_s"]) for r in rs],
                        "stages": {k: statistics.median(r["stages"][k] for r in rs) for k in rs[0]["stages"]},
                    }
                    if "peak_device_gb" in rs[0]:
                        summary[name]["peak_device_gb"] = statistics.median(r["peak_device_gb"] for r in rs)
            results[str(vocab) if args.shape == "tiny" else args.shape] = summary
            print(f"shape {args.shape}, device {args.device}")
            print(header + ("  peak device GB" if args.device != "cpu" else ""))
            for name, s in summary.items():
                device_peak = f"  {s['peak_device_gb']:>14.2f}" if "peak_device_gb" in s else ""
                print(f"{vocab:>7} {name:>9} {s['step_s']:>8.3f} {s['peak_rss_gb']:>12.2f}{device_peak}")
            if "trl" in summary:
                ours, trl = summary["npu-rft"], summary["trl"]
                print(f"{vocab:>7} {'ratio':>9} {ours['step_s'] / trl['step_s']:>8.2f} "
                      f"{ours['peak_rss_gb'] / trl['peak_rss_gb']:>12.2f}")
            print("npu-rft stages (median s): " +
                  ", ".join(f"{k[9:]} {v:.3f}" for k, v in summary["npu-rft"]["stages"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
