"""The repository root on ``sys.path`` shadows nothing.

``python -m pytest``, ``python -m npu_rft ...`` and ``python -c`` run from the
repository root put it first on ``sys.path``. The top-level ``kernels/`` folder
must then not hide Hugging Face's ``kernels`` package, which transformers
imports while loading a model (5.25 and later). These tests run real
subprocesses from the root, in whichever environment runs the suite: the newest
versions (``make test``, Hugging Face's ``kernels`` installed) and the floors
(``make test-floors``, where it may be absent).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import sys
from pathlib import Path

import yaml

from helpers import REPO_DIR, build_tiny_model_dir, example_rows, run_command, write_jsonl


def _run_from_root(args, *, timeout=300, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("PYTHONPATH", None)  # the root must come in as the working directory, as for a user
    return run_command([sys.executable, *args], cwd=REPO_DIR, env=env, timeout=timeout)


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


PROBE = """
import json, sys
try:
    import kernels
except ImportError as exc:
    print(json.dumps({"imported": False, "error": repr(exc)}))
else:
    import transformers.utils as tu
    check = getattr(tu, "is_kernels_available", None)
    print(json.dumps({
        "imported": True,
        "file": getattr(kernels, "__file__", None),
        "path": [str(p) for p in getattr(kernels, "__path__", [])],
        "transformers_sees_kernels": None if check is None else bool(check()),
    }))
"""


def test_import_kernels_from_the_root_is_never_ours():
    proc = _run_from_root(["-c", PROBE])
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = str(REPO_DIR / "kernels")
    if _hf_kernels_installed():
        assert got["imported"], got
        assert got["file"] is not None and not got["file"].startswith(ours + os.sep), got
        assert "site-packages" in got["file"] or "dist-packages" in got["file"], got
    elif got["imported"]:
        # No Hugging Face kernels: our plain folder is at most an empty namespace
        # package, and transformers must not take it for the real one.
        assert got["file"] is None, got
        assert got["path"] == [ours], got
        assert got["transformers_sees_kernels"] in (False, None), got


def test_the_kernels_folder_is_not_a_package():
    assert not (REPO_DIR / "kernels" / "__init__.py").exists()
    assert (REPO_DIR / "kernels" / "npu_rft_kernels" / "__init__.py").is_file()
    # Nothing of ours imports the bare name.
    bare = re.compile(r"^\s*(from\s+kernels[\s.]|import\s+kernels\b)", re.M)
    offenders = [
        str(p.relative_to(REPO_DIR))
        for top in ("npu_rft", "kernels", "tools", "tests")
        for p in (REPO_DIR / top).rglob("*.py")
        if bare.search(p.read_text(encoding="utf-8")) and p.name != Path(__file__).name
    ]
    assert offenders == []


def test_python_m_npu_rft_train_from_the_root(tmp_path):
    model = build_tiny_model_dir(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", example_rows(4))
    config = {
        "run": {"output_dir": str(tmp_path / "run"), "seed": 0, "device": "cpu", "progress_bar": False,
                "tensorboard": False},
        "model": {"name_or_path": str(model), "finetune": "lora",
                  "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"train": str(train), "max_prompt_length": 128},
        "rollout": {"num_samples": 2, "max_new_tokens": 4},
        "graders": [{"name": "exact_match"}],
        "algorithm": "grpo",
        "schedule": {"steps": 1},
        "batch": {"prompts_per_step": 2, "micro_batch_size": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = _run_from_root(["-m", "npu_rft", "train", "--config", str(path)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert all(isinstance(records[0][k], float) for k in ("loss", "reward/mean", "entropy/mean"))
    assert records[0]["completion/length_mean"] > 0  # the model was loaded and sampled


def test_pytest_collects_everything_from_the_root():
    proc = _run_from_root(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "error" not in proc.stdout.lower().splitlines()[-1], proc.stdout[-2000:]
    collected = int(re.search(r"(\d+) tests? collected", proc.stdout).group(1))
    assert collected > 100, proc.stdout[-2000:]


STANDALONE = """
import importlib.abc, sys

class NoNpuRft(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "npu_rft" or name.startswith("npu_rft."):
            raise ImportError(f"npu_rft is blocked in this test (asked for {name})")
        return None

sys.meta_path.insert(0, NoNpuRft())
import torch
import npu_rft_kernels
from npu_rft_kernels import bench, dispatch, losses
from npu_rft_kernels.logprob import naive, npu, shifted, tiling, torch_chunked
torch.manual_seed(0)
h = torch.randn(6, 8, dtype=torch.float32)
w = torch.randn(40, 8, dtype=torch.float32) * 0.1
t = torch.randint(0, 40, (6,))
got = npu_rft_kernels.fused_logprob(h, w, t, backend="torch")
ref = npu_rft_kernels.fused_logprob(h, w, t, backend="naive")
torch.testing.assert_close(got, ref)
results = bench.run_benchmark([(16, 8, 64)], impls=["torch"], device="cpu", repeats=1, memory=False,
                              modes=("frozen",))
assert {r.case.impl for r in results} == {"naive", "gemm", "torch"}, results
print("ok", sorted(m for m in sys.modules if m.startswith("npu_rft")))
"""


def test_the_kernels_package_imports_nothing_from_npu_rft():
    proc = _run_from_root(["-c", STANDALONE])
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("ok ")
    assert all(m.startswith("npu_rft_kernels") for m in eval(last[3:])), last


def test_the_blocker_would_catch_an_npu_rft_import():
    """The standalone check can fail: a kernels module that imports npu_rft dies under it."""
    probe = STANDALONE.split("import torch\n")[0] + "import npu_rft.registry\n"
    proc = _run_from_root(["-c", probe])
    assert proc.returncode != 0 and "npu_rft is blocked" in proc.stderr
