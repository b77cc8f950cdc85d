"""Shared fixtures. ``tests/`` goes on ``sys.path`` so that tests import the
builders with ``from helpers import ...``."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from helpers import build_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 chat model directory (hidden 32, 2 layers), built once per session."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))
