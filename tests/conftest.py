"""Shared fixtures, and ``tests/helpers.py`` importable as ``helpers``.

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
    if "helpers" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("helpers", TESTS_DIR / "helpers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["helpers"] = module
    spec.loader.exec_module(module)


_register_helpers()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 chat model directory (hidden 32, 2 layers), built once per session."""
    from helpers import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))
