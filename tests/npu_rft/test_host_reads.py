"""Host reads in the step: bounded, and all through ``Device.to_host``.

On an NPU or a GPU every read of a device tensor on the host waits for the
device queue to drain. The rollout, the trainer and the algorithms read
through ``Device.to_host``, which counts the calls (``HOST_READS``); a source
check keeps direct reads out of those modules, and a GRPO and a DPO run with
the accelerators' decode policy hold the count per step to a bound.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import example_rows, tiny_train_config, write_jsonl
from npu_rft import device as device_module
from npu_rft.config import TrainConfig
from npu_rft.config_base import from_dict
from npu_rft.hardware import ACCELERATOR_DECODE_SYNC_EVERY, Hardware

PACKAGE = Path(device_module.__file__).resolve().parent
STEP_MODULES = [PACKAGE / "rollout.py", PACKAGE / "trainer.py", *sorted((PACKAGE / "algorithms").glob("*.py"))]
FORBIDDEN_METHODS = {"item", "tolist", "cpu", "numpy"}
EXEMPT = "# host:"  # a line that reads a CPU tensor or a Python value says so


def direct_host_reads(source: str) -> list[tuple[int, str]]:
    """``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``float(x)`` and ``bool(x)``
    calls on lines without the ``# host:`` note."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f, what = node.func, None
        if isinstance(f, ast.Attribute) and f.attr in FORBIDDEN_METHODS and not node.args:
            what = f".{f.attr}()"
        elif isinstance(f, ast.Name) and f.id in ("float", "bool") and len(node.args) == 1 \
                and not isinstance(node.args[0], ast.Constant):
            what = f"{f.id}(...)"
        if what and EXEMPT not in lines[node.lineno - 1]:
            found.append((node.lineno, what))
    return found


@pytest.mark.parametrize("path", STEP_MODULES, ids=lambda p: p.name)
def test_step_modules_read_the_host_only_through_to_host(path):
    assert direct_host_reads(path.read_text(encoding="utf-8")) == []


def test_the_source_check_finds_each_kind_of_read():
    source = "a = t.item()\nb = t.tolist()\nc = t.cpu()\nd = float(t.sum())\ne = bool(t.any())\n" \
             "f = t.tolist()  # host: a CPU tensor\ng = float('inf')\n"
    assert direct_host_reads(source) == [(1, ".item()"), (2, ".tolist()"), (3, ".cpu()"), (4, "float(...)"),
                                         (5, "bool(...)")]


MAX_NEW = 40


@pytest.mark.parametrize("algorithm", ["grpo", "dpo"])
def test_host_reads_per_step_are_bounded_under_the_accelerator_policy(algorithm, tiny_model_dir, tmp_path,
                                                                       monkeypatch):
    from npu_rft.trainer import fit

    # The accelerators' policy, run on CPU: flags on the device, a completion check every 32 tokens.
    monkeypatch.setattr(type(device_module.get_device("cpu")), "hardware", property(lambda self: Hardware()))
    monkeypatch.setattr("helpers.digit_reward", lambda completion, example: sum(map(ord, completion)) % 7 / 6)
    train = write_jsonl(tmp_path / "train.jsonl", example_rows(12))
    steps = 3
    sections = {"algorithm": algorithm, "schedule": {"steps": steps},
                "rollout": {"num_samples": 4, "max_new_tokens": MAX_NEW, "temperature": 1.0},
                "batch": {"prompts_per_step": 4, "micro_batch_size": 2}}  # several micro-batches a step
    if algorithm == "dpo":
        sections["dpo"] = {"batches_per_iteration": 1, "epochs": 1}
    else:
        sections["grpo"] = {"beta": 0.04}  # a reference pass too
    cfg = tiny_train_config(tiny_model_dir, train, tmp_path / "run", overrides=sections)
    if algorithm == "dpo":
        del cfg["grpo"]
    before = device_module.HOST_READS["cpu"]
    fit(from_dict(TrainConfig, cfg))
    per_step = (device_module.HOST_READS["cpu"] - before) / steps
    # rollout: the completion checks and one read of the results; training: one read of the
    # losses and metrics and one of the gradient norm; DPO: one read of the reference sums
    bound = -(-MAX_NEW // ACCELERATOR_DECODE_SYNC_EVERY) + 1 + 2 + (1 if algorithm == "dpo" else 0)
    assert 0 < per_step <= bound


GENERIC_MODULES = [PACKAGE / "rollout.py", PACKAGE / "model.py", PACKAGE / "trainer.py",
                   *sorted((PACKAGE / "algorithms").glob("*.py"))]


@pytest.mark.parametrize("path", GENERIC_MODULES, ids=lambda p: p.name)
def test_generic_modules_do_not_branch_on_the_device_type(path):
    """Device-type choices live in npu_rft/hardware.py (and npu_rft/cpu.py, npu_rft/ascend/)."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    compares = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Compare)
                and any(isinstance(c, ast.Constant) and c.value in ("cpu", "cuda", "npu") for c in n.comparators)]
    imports = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
               and (n.module.startswith("npu_rft.ascend") or n.module == "npu_rft.cpu" or "torch_npu" in n.module)]
    assert compares == [] and imports == []


def _imports(path: Path) -> set:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    found |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return found


def test_loading_and_sampling_share_plumbing_below_both():
    """No import cycle: model.py knows nothing of sampling, rollout.py nothing of loading."""
    assert "npu_rft.rollout" not in _imports(PACKAGE / "model.py")
    assert "npu_rft.model" not in _imports(PACKAGE / "rollout.py")
    assert not {"npu_rft.model", "npu_rft.rollout"} & _imports(PACKAGE / "hf.py")
