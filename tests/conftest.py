"""Shared fixtures, and ``tests/helpers.py`` importable as ``helpers`` (and
``tests/torch_npu_stand_in.py`` as ``torch_npu_stand_in``).

``helpers`` is registered from its file rather than by putting ``tests/`` on
``sys.path``: that would make ``tests/npu_rft/`` shadow the real package.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent


def _register_helpers() -> None:
    for name in ("helpers", "torch_npu_stand_in"):
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, TESTS_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_register_helpers()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 chat model directory (hidden 32, 2 layers), built once per session."""
    from helpers import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


# ----------------------------------------------------------------- the pinned torch_npu wheel

TORCH_NPU_VERSION = "2.13.0"
# NPU_RFT_TEST_WHEELS_DIR: another folder, for the test of this fixture itself
WHEELS_DIR = Path(__import__("os").environ.get("NPU_RFT_TEST_WHEELS_DIR") or TESTS_DIR.parent / ".dev" / "wheels")


@pytest.fixture(scope="session")
def torch_npu_wheel() -> Path:
    """The pinned torch_npu wheel, unpacked (the folder holding ``torch_npu/``),
    for tests that read it as files. ``make torch-npu-wheel`` (a step of ``make
    test``) downloads it into .dev/wheels/; it is never installed. Missing: the
    test is skipped, or fails under CI=true."""
    import os
    import shutil
    import tempfile
    import zipfile

    wheels = sorted(WHEELS_DIR.glob(f"torch_npu-{TORCH_NPU_VERSION}-*.whl"))
    if not wheels:
        why = (f"the torch_npu {TORCH_NPU_VERSION} wheel is not in {WHEELS_DIR}: run `make torch-npu-wheel` "
               f"(pip download --no-deps torch-npu=={TORCH_NPU_VERSION}, about 44 MB; never installed)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {why}", pytrace=False)
        pytest.skip(why)
    wheel = wheels[0]
    unpacked = WHEELS_DIR / wheel.stem
    if not (unpacked / ".complete").is_file():
        scratch = Path(tempfile.mkdtemp(prefix=f".{wheel.stem}-", dir=WHEELS_DIR))
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(scratch)
        (scratch / ".complete").write_text(wheel.name + "\n")
        shutil.rmtree(unpacked, ignore_errors=True)
        try:
            scratch.rename(unpacked)
        except OSError:  # another session unpacked it meanwhile
            shutil.rmtree(scratch, ignore_errors=True)
    return unpacked
