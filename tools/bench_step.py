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
cuda`` both sides compute in bf16. ``--prompts 8 --samples 8 --new-tokens 256``
is the larger batch for GPUs. Every process prints its steps, peak RSS (and
peak device memory), the device's name, the load average and npu-rft's stages;
the summary gives medians with min and max over the processes.
``--trl-python`` runs TRL's workers with another Python than the venv's
(tools/gpu_step_bench.sh uses it on a GPU machine without network).

    python tools/bench_step.py --shape qwen2.5-0.5b --steps 1 --warmup 1 --threads 1 --profile prof
    python tools/bench_step.py --shape qwen2.5-0.5b --decode-packing --repeats 3 --threads 1

``--profile DIR`` runs npu-rft alone and profiles the step after the warm-up
with torch.profiler (stages, the rollout's prefill / decode / token sampling,
operators by self CPU time). ``--decode-packing`` times the decoder's linears
on the decode batch with ``F.linear`` and packed for oneDNN, then alternates
rollouts with and without the CPU's packed decoder in one process.
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
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRL_VENV = REPO / ".dev" / "trl-venv"
TRL_VERSION = "1.16.0"

SETTINGS = dict(prompts=2, samples=4, new_tokens=64, beta=0.04, lr=1e-5, lora_r=8, lora_alpha=16,
                targets=["q_proj", "k_proj", "v_proj", "o_proj"])
# --prompts, --samples and --new-tokens override the first three.


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
                device: str = "cpu", settings: dict = SETTINGS, profile: Optional[Path] = None) -> dict:
    from npu_rft.config import TrainConfig
    from npu_rft.config_base import from_dict
    from npu_rft.graders.base import GRADERS, Grade
    from npu_rft.trainer import fit

    GRADERS.add("bench_digits", lambda completion, example: Grade(digit_fraction(completion)))
    prompts = json.loads((model_dir / "prompts.json").read_text())
    data = out_dir / "train.jsonl"
    data.write_text("".join(json.dumps({"context": p, "target": "x"}) + "\n" for p in prompts))
    s = settings
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
    cpu_s = fit_measured(cfg, warmup, profile)
    records = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = records[warmup:]
    stages = {k: statistics.median(r[k] for r in timed) for k in timed[0] if k.startswith("timing_s/")}
    peak = {"peak_device_gb": max(r["memory/peak_gb"] for r in records)} if device != "cpu" else {}
    return {"step_s": [r["timing_s/step"] for r in timed], "cpu_step_s": cpu_s[warmup:], "stages": stages,
            "peak_rss": _peak_rss(), "device_name": device_name(device), **peak}


def fit_measured(cfg, warmup: int, profile: Optional[Path] = None) -> list:
    """``fit(cfg)``, returning each step's CPU seconds (the process's own time:
    other work on a shared machine stretches wall time, much less this). With
    ``profile``, ``torch.profiler`` records the step after the ``warmup`` steps and
    ``stages.txt`` (the trainer's stages and the rollout's prefill, decode and
    token sampling, from their ``record_function`` names) and ``ops.txt``
    (operators by self CPU time) are written there."""
    import torch

    from npu_rft import trainer

    original, cpu_s = trainer.Trainer.step, []
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None

    def step(self, carried):
        start = time.process_time()
        try:
            if prof is not None and len(cpu_s) == warmup:
                with prof:
                    return original(self, carried)
            return original(self, carried)
        finally:
            cpu_s.append(time.process_time() - start)

    trainer.Trainer.step = step
    try:
        trainer.fit(cfg)
    finally:
        trainer.Trainer.step = original
    if prof is not None:
        profile.mkdir(parents=True, exist_ok=True)
        events = prof.key_averages()
        scopes = sorted((e for e in events if e.key.startswith(("stage/", "rollout/"))), key=lambda e: e.key)
        (profile / "stages.txt").write_text("".join(f"{e.key:<28} {e.count:>6} calls {e.cpu_time_total / 1e6:>9.3f} s\n"
                                                    for e in scopes))
        (profile / "ops.txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=30,
                                                      max_name_column_width=40))
    return cpu_s


def worker_trl(model_dir: Path, steps: int, warmup: int, out_dir: Path, checkpointing: bool,
               device: str = "cpu", settings: dict = SETTINGS, profile: Optional[Path] = None) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    s = settings
    prompts = json.loads((model_dir / "prompts.json").read_text())
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])

    def reward(completions, **kwargs):
        return [digit_fraction(c[0]["content"]) for c in completions]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.cpu_times, self._start = [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start[0])
            self.cpu_times.append(time.process_time() - self._start[1])

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
    return {"step_s": timer.times[warmup:], "cpu_step_s": timer.cpu_times[warmup:], "stages": {},
            "peak_rss": _peak_rss(), "device_name": device_name(device), **peak}


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


def worker_decode_packing(model_dir: Path, repeats: int, settings: dict = SETTINGS) -> dict:
    """Rollout time (LoRA policy, the benchmark's batch) with the CPU's packed
    decoder linears and without (``npu_rft.cpu.PACK_DECODER_MAX_BYTES`` = 0),
    alternated in one process after one warm-up rollout of each."""
    import torch

    from npu_rft import cpu
    from npu_rft.config import LoraConfig, ModelConfig
    from npu_rft.device import get_device
    from npu_rft.model import load_policy
    from npu_rft.rollout import SamplingParams, make_sampler

    device = get_device("cpu")
    s = settings
    cfg = ModelConfig(name_or_path=str(model_dir), finetune="lora",
                      lora=LoraConfig(r=s["lora_r"], alpha=s["lora_alpha"], target_modules=s["targets"]))
    policy = load_policy(cfg, device, need_reference=False)
    tok = policy.tokenizer
    sampler = make_sampler(policy.model, tok, device, "loop")
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in json.loads((model_dir / "prompts.json").read_text())[:s["prompts"]]]
    prompts = [tok(t)["input_ids"] for t in texts]
    params = SamplingParams(max_new_tokens=s["new_tokens"], num_samples=s["samples"], temperature=1.0)
    gemms = decode_gemm_times(sampler.decoder, s["prompts"] * s["samples"], repeats=7)
    budget, times = cpu.PACK_DECODER_MAX_BYTES, {"packed decoder": [], "plain decoder": []}
    policy.model.eval()
    for r in range(repeats + 1):
        for name, limit in (("packed decoder", budget), ("plain decoder", 0)):
            cpu.PACK_DECODER_MAX_BYTES = limit
            start = time.perf_counter()
            sampler.sample(prompts, params, torch.Generator().manual_seed(r))
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {"rollout_s": times, "gemm_ms": gemms}


def decode_gemm_times(decoder, rows: int, repeats: int) -> dict:
    """Per weight shape of the decoder's linears: the median ms of ``F.linear`` and
    of oneDNN's packed linear on ``rows`` rows, each summed over the layers that
    have the shape (so the weights come from memory, as in a decode step), alternated."""
    import torch
    import torch.nn.functional as F
    from npu_rft_kernels.logprob.shifted import onednn_linear, onednn_pack

    by_shape = {}
    for name, m in decoder.named_modules():  # plain linears, and the base linear of each LoRA layer
        if hasattr(m, "base_layer") or (type(m) is torch.nn.Linear and ".lora_" not in name
                                        and not name.endswith("base_layer")):
            weight = (m.base_layer if hasattr(m, "base_layer") else m).weight.detach()
            by_shape.setdefault((name.rsplit(".", 1)[-1], tuple(weight.shape)), []).append(weight)
    out = {}
    with torch.no_grad():
        for (name, shape), weights in by_shape.items():
            packed = [onednn_pack(w, rows) for w in weights]
            x = torch.randn(rows, shape[1])
            runs = {"F.linear": [], "packed": []}
            for _ in range(repeats):
                for kind in runs:
                    start = time.perf_counter()
                    for w, pw in zip(weights, packed):
                        F.linear(x, w) if kind == "F.linear" else onednn_linear(x, pw)
                    runs[kind].append((time.perf_counter() - start) * 1e3)
            out[f"{name} {shape[1]}->{shape[0]} x{len(weights)}"] = {k: statistics.median(v) for k, v in runs.items()}
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


def run_worker(python: str, kind: str, model_dir: Path, args, threads: int, profile: Optional[Path] = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [python, __file__, "--worker", kind, "--model-dir", str(model_dir), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--work-dir", tmp, "--device", args.device,
               "--prompts", str(args.prompts), "--samples", str(args.samples), "--new-tokens", str(args.new_tokens)]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        if profile is not None:
            cmd += ["--profile", str(profile)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stages_line(stages: dict) -> str:
    return ", ".join(f"{k[len('timing_s/'):]} {v:.3f}" for k, v in stages.items() if k != "timing_s/step")


def summarize(rs: list) -> dict:
    """Medians over the processes of one framework (each process's figure is its
    median step), with their min and max."""
    step = [statistics.median(r["step_s"]) for r in rs]
    cpu = [statistics.median(r["cpu_step_s"]) for r in rs]
    out = {"step_s": statistics.median(step), "step_s_min": min(step), "step_s_max": max(step),
           "per_process_step_s": step, "cpu_step_s": statistics.median(cpu), "cpu_step_s_min": min(cpu),
           "cpu_step_s_max": max(cpu), "per_process_cpu_step_s": cpu, "device_name": rs[0]["device_name"],
           "load_avg": [r["load_avg"] for r in rs],
           "stages": {k: statistics.median(r["stages"][k] for r in rs) for k in rs[0]["stages"]}}
    for key, values in (("peak_rss_gb", [r["peak_rss"] / 1e9 for r in rs]),
                        ("peak_device_gb", [r.get("peak_device_gb") for r in rs])):
        if values[0] is not None:
            out.update({key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)})
    return out


def device_name(device: str) -> str:
    """The card's name on CUDA; the CPU's model name and core count on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").is_file() else "CPU"
    return f"{model}, {os.cpu_count()} cores"


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
    p.add_argument("--trl-python", type=Path, help="the Python that runs TRL's workers (default: the --trl-venv's)")
    p.add_argument("--setup-trl", action="store_true", help="create the TRL venv and exit")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--prefix-sharing", action="store_true", help="measure rollout prefix sharing instead")
    p.add_argument("--decode-packing", action="store_true",
                   help="measure the rollout with and without the CPU's packed decoder linears instead")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[32, 512])
    p.add_argument("--mlp", type=int, default=1024, help="intermediate_size")
    p.add_argument("--heads", type=int, default=4, help="num_attention_heads")
    p.add_argument("--kv-heads", type=int, default=2, help="num_key_value_heads")
    p.add_argument("--untied", action="store_true", help="a separate LM head instead of the tied embedding")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "npu-rft-bench")
    p.add_argument("--prompts", type=int, default=SETTINGS["prompts"], help="prompts per step")
    p.add_argument("--samples", type=int, default=SETTINGS["samples"], help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=SETTINGS["new_tokens"], help="tokens per completion")
    p.add_argument("--profile", type=Path, help="profile one npu-rft step (after --warmup) with torch.profiler, "
                                                "write stages.txt and ops.txt here, and print them; no TRL")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    settings = {**SETTINGS, "prompts": args.prompts, "samples": args.samples, "new_tokens": args.new_tokens}
    if args.worker:
        fn = worker_ours if args.worker == "ours" else worker_trl
        print(json.dumps(fn(args.model_dir, args.steps, args.warmup, args.work_dir, args.gradient_checkpointing,
                            args.device, settings, args.profile)))
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
    elif args.decode_packing:
        import torch

        torch.set_num_threads(args.threads)
        res = worker_decode_packing(model_dir(args, args.vocab[0]), args.repeats, settings)
        results["decode_packing"] = res
        for name, ms in res["gemm_ms"].items():
            print(f"{args.shape}, {name} on {args.prompts * args.samples} rows: F.linear {ms['F.linear']:.1f} ms, "
                  f"packed {ms['packed']:.1f} ms")
        for name, times in res["rollout_s"].items():
            print(f"{args.shape}, rollout with {name}: {statistics.median(times):.3f} s "
                  f"[min {min(times):.3f}, max {max(times):.3f}] ({len(times)} rollouts)")
    elif args.profile:
        res = run_worker(sys.executable, "ours", model_dir(args, args.vocab[0]), args, args.threads, args.profile)
        print(f"npu-rft, shape {args.shape}, device {args.device} ({res['device_name']}), step after {args.warmup} "
              f"warm-up: {res['step_s'][0]:.3f} s ({res['cpu_step_s'][0]:.3f} s CPU); "
              f"stages (s): {stages_line(res['stages'])}")
        print((args.profile / "stages.txt").read_text() + (args.profile / "ops.txt").read_text())
        results["profile"] = res
    else:
        trl_python = args.trl_python or args.trl_venv / "bin" / "python"
        use_trl = not args.no_trl and (args.trl_python is not None or trl_python.is_file())
        if not use_trl and not args.no_trl:
            print(f"TRL venv not found at {args.trl_venv}: TRL skipped (create it with --setup-trl)")
        batch = f"{args.prompts} prompts x {args.samples} samples x {args.new_tokens} tokens"
        for vocab in args.vocab:
            path = model_dir(args, vocab)
            print(f"shape {args.shape} (vocabulary {vocab}), device {args.device}, {batch}, "
                  f"{args.threads} thread(s) per worker")
            runs = {"npu-rft": [], "trl": []}
            for _ in range(args.repeats):
                for name, python, kind in (("npu-rft", sys.executable, "ours"), ("trl", str(trl_python), "trl")):
                    if name == "trl" and not use_trl:
                        continue
                    load = os.getloadavg()[0]
                    r = run_worker(python, kind, path, args, args.threads)
                    r["load_avg"] = [load, os.getloadavg()[0]]
                    runs[name].append(r)
                    device_peak = f", peak device {r['peak_device_gb']:.2f} GiB" if "peak_device_gb" in r else ""
                    print(f"  {name:>7} on {r['device_name']}: {statistics.median(r['step_s']):.3f} s/step "
                          f"(steps {', '.join(f'{t:.3f}' for t in r['step_s'])}; CPU s/step "
                          f"{statistics.median(r['cpu_step_s']):.3f}), peak RSS "
                          f"{r['peak_rss'] / 1e9:.2f} GB{device_peak}, load {load:.2f}->{r['load_avg'][1]:.2f}"
                          + (f"; stages (s): {stages_line(r['stages'])}" if r["stages"] else ""), flush=True)
            summary = {name: summarize(rs) for name, rs in runs.items() if rs}
            results[str(vocab) if args.shape == "tiny" else args.shape] = summary
            for name, s in summary.items():
                device_peak = (f", peak device {s['peak_device_gb']:.2f} GiB [{s['peak_device_gb_min']:.2f}, "
                               f"{s['peak_device_gb_max']:.2f}]") if "peak_device_gb" in s else ""
                print(f"{name:>9}: {s['step_s']:.3f} s/step [min {s['step_s_min']:.3f}, max {s['step_s_max']:.3f}], "
                      f"CPU {s['cpu_step_s']:.3f} s/step [{s['cpu_step_s_min']:.3f}, {s['cpu_step_s_max']:.3f}], "
                      f"peak RSS {s['peak_rss_gb']:.2f} GB [{s['peak_rss_gb_min']:.2f}, {s['peak_rss_gb_max']:.2f}]"
                      f"{device_peak}" + (f"; stages (s): {stages_line(s['stages'])}" if s["stages"] else ""))
            if "trl" in summary:
                ours, trl = summary["npu-rft"], summary["trl"]
                device_ratio = (f", peak device {ours['peak_device_gb'] / trl['peak_device_gb']:.2f}"
                                if "peak_device_gb" in ours else "")
                print(f"    ratio: time {ours['step_s'] / trl['step_s']:.2f}, "
                      f"CPU time {ours['cpu_step_s'] / trl['cpu_step_s']:.2f}, "
                      f"peak RSS {ours['peak_rss_gb'] / trl['peak_rss_gb']:.2f}{device_ratio}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
