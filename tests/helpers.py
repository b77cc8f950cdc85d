"""Builders shared by the tests: a tiny chat model directory, example files,
and a learnable reward.

Import as ``from helpers import ...``: ``tests/conftest.py`` registers this file
as the module ``helpers`` (a subprocess calls ``register_as_helpers()`` first,
see ``SUBPROCESS_PRELUDE``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from npu_rft.quickstart.tiny_model import TinyModelSpec, build_model, build_tokenizer

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent

# Python source that makes ``helpers`` importable in a child process (``python -c``).
SUBPROCESS_PRELUDE = (
    "import importlib.util, sys\n"
    f"_spec = importlib.util.spec_from_file_location('helpers', {str(Path(__file__).resolve())!r})\n"
    "_mod = importlib.util.module_from_spec(_spec); sys.modules['helpers'] = _mod; _spec.loader.exec_module(_mod)\n"
)

WORDS = ["alpha", "beta", "gamma", "delta", "fever", "cough", "rash", "flu", "cold", "measles"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog 0123456789",
    "patients with fever and cough may have flu or a cold",
    "a rash with fever suggests measles; answer with a JSON list",
    "[\"flu\", \"cold\", \"measles\"] {\"answer\": 1}",
]


def build_tiny_model_dir(
    path: Path,
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 64,
    bpe_vocab_size: int = 320,
    names: Sequence[str] = WORDS,
    seed: int = 0,
) -> Path:
    """Save a byte-level-BPE tokenizer (trained here, ChatML template, EOS
    ``<|im_end|>``) and a random tiny ``Qwen2ForCausalLM`` to ``path``, to be
    loaded back with the ordinary loaders."""
    spec = TinyModelSpec(
        bpe_vocab_size=bpe_vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        seed=seed,
    )
    tokenizer = build_tokenizer(CORPUS, list(names), bpe_vocab_size)
    model = build_model(tokenizer, spec)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path


def example_rows(n: int, *, seed: int = 0) -> list[dict]:
    """``n`` {context, target, meta} rows (ranking-style, with candidates)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        cands = rng.sample(WORDS[4:], 3)
        rows.append({
            "system": "Rank the candidates.",
            "context": f"case {i}: symptoms {rng.choice(WORDS[:4])}; candidates {', '.join(cands)}",
            "target": cands[0],
            "meta": {"id": f"case-{i}", "candidates": cands},
        })
    return rows


def write_jsonl(path: Path, rows: Iterable[Mapping]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def digit_reward(completion: str, example) -> float:
    """A learnable reward for a random tiny model: the fraction of characters
    of the completion that are digits (0 for an empty completion)."""
    if not completion:
        return 0.0
    return sum(ch.isdigit() for ch in completion) / len(completion)


def tiny_train_config(
    model_dir: Path,
    train: Path,
    output_dir: Path,
    *,
    overrides: Optional[Mapping] = None,
) -> dict:
    """A small GRPO config dict (LoRA, CPU) for ``TrainConfig``; ``overrides``
    are merged section by section."""
    cfg = {
        "run": {"output_dir": str(output_dir), "seed": 0, "device": "cpu", "progress_bar": False,
                "tensorboard": False, "log_samples_every": 1, "num_log_samples": 2},
        "model": {"name_or_path": str(model_dir), "finetune": "lora",
                  "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"train": str(train), "max_prompt_length": 128},
        "rollout": {"num_samples": 4, "max_new_tokens": 6, "temperature": 1.0},
        "graders": [{"name": "helpers:digit_reward"}],
        "algorithm": "grpo",
        "grpo": {"beta": 0.04},
        "optim": {"lr": 1e-2},
        "schedule": {"steps": 2},
        "batch": {"prompts_per_step": 2, "micro_batch_size": 4},
    }
    for section, values in (overrides or {}).items():
        if isinstance(values, Mapping) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = values
    return cfg


def digit_reward_or_die(completion: str, example) -> float:
    """``digit_reward``, but the process kills itself with SIGKILL at the
    ``$NPU_RFT_TEST_KILL_AT``-th call (a crash at a known point of a run)."""
    import os
    import signal

    global _calls
    _calls += 1
    if _calls == int(os.environ.get("NPU_RFT_TEST_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    return digit_reward(completion, example)


_calls = 0


# Set in the environment of every process ``run_command`` starts; its descendants inherit it.
PROCESS_TREE_VARIABLE = "NPU_RFT_TEST_PROCESS_TREE"


def run_command(args: Sequence[str], *, timeout: float, env: Optional[Mapping[str, str]] = None,
                cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True)`` that leaves no process behind.

    The command starts in a session of its own. If it runs past ``timeout``
    seconds (or the test is interrupted), its process group is killed, and so is
    every process still carrying its mark in the environment: torchrun starts
    each worker in a session of its own, which the group kill misses. A timeout
    fails the test with the output captured so far."""
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env={**(os.environ if env is None else env), PROCESS_TREE_VARIABLE: mark},
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException as exc:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _kill_marked(mark)
        stdout, stderr = proc.communicate()
        if not isinstance(exc, subprocess.TimeoutExpired):
            raise
        import pytest

        pytest.fail(f"`{' '.join(map(str, args))}` ran past {timeout} s; it was killed with every process it "
                    f"started.\n--- stdout (end):\n{stdout[-3000:]}\n--- stderr (end):\n{stderr[-6000:]}",
                    pytrace=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _marked_processes(mark: str) -> list[int]:
    """The live processes (of this user) whose environment has ``PROCESS_TREE_VARIABLE=mark``
    (Linux: read from /proc; elsewhere none are found)."""
    if not Path("/proc").is_dir():
        return []
    needle = f"{PROCESS_TREE_VARIABLE}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone, or another user's
                pass
    return found


def _kill_marked(mark: str) -> None:
    for _ in range(100):  # until none is left: a process may start another while we look
        pids = _marked_processes(mark)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"processes {_marked_processes(mark)} survived SIGKILL")


def build_vllm_model_dir(path: Path) -> Path:
    """The tiny chat model with head size 32, the smallest vLLM's CPU attention takes."""
    return build_tiny_model_dir(path, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                                intermediate_size=128)


def start_rollout_server(python: str, model_dir: Path, log_path: Path, timeout: float = 240.0):
    """``npu-rft rollout-server`` on a free localhost port, run by ``python`` from the
    repository root (float32, a small KV cache); returns ``(process, url)`` once
    ``/health`` answers. The caller stops the process."""
    import os
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # the caller's, not the server's
        env.pop(key, None)
    with open(log_path, "w") as log:
        server = subprocess.Popen([python, "-m", "npu_rft", "rollout-server", "--model", str(model_dir),
                                   "--port", str(port), "--dtype", "float32", "--kv-cache-gib", "0.0625"],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_DIR)
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return server, url
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the rollout server did not start: {log_path.read_text()[-3000:]}") from None
            time.sleep(1)
