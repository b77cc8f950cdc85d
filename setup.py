"""Packaging for npu-rft.

``kernels/`` is a plain folder (no ``__init__.py``) holding the package
``npu_rft_kernels``: the PyPI package ``kernels`` owns the bare name and
transformers imports it, so nothing of ours may be importable as ``kernels``.
"""
from setuptools import find_packages, setup

setup(
    name="npu-rft",
    version="0.1.0",
    description="Ascend-NPU-first reinforcement fine-tuning (GRPO, iterative DPO) for LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # Only the Python CI runs (3.11, both suites): see README.md, "Development".
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["npu_rft", "npu_rft.*"]) + find_packages("kernels"),
    package_dir={"npu_rft_kernels": "kernels/npu_rft_kernels"},
    package_data={"npu_rft": ["assets/*", "assets/**/*", "data/templates/*"]},
    include_package_data=True,
    # Each ">=" is a floor that `make test-floors` installs exactly (through
    # tools/floor_constraints.py) and tests; `make test` tests the newest
    # versions the ranges allow. Raise a floor rather than declare one CI does not run.
    install_requires=[
        # The CPU build of torch must be installed first on machines without
        # an accelerator (see the Makefile); a bare requirement pulls CUDA.
        # 2.10: vllm-ascend's torch / torch_npu (docs/ascend.md).
        "torch>=2.10",
        # 4.56.2: from_pretrained(dtype=) (4.56; with 4.55.4 the model's __init__
        # gets `dtype` and raises TypeError) and a Qwen2ForCausalLM.get_decoder()
        # that is not None (4.56.0-4.56.1 return None there; rollout and trainer tests failed).
        "transformers>=4.56.2,<6",
        # 0.16: LoraLayer.lora_variant, read by model._plain_lora_linears.
        "peft>=0.16,<0.22",
        "datasets>=3.0,<6",
        "safetensors>=0.4.3",  # transformers 4.56's own floor
        # 8.2: CliRunner's result.stdout without stderr mixed in, which the CLI
        # tests parse (8.1.8 failed test_doctor's --json check).
        "click>=8.2",
        "pyyaml>=6.0",
        "tqdm>=4.66.3",  # datasets 3.0's own floor
        "psutil>=5.9",
        # 3.8.4: the first release built against numpy 2 (3.7 installs beside
        # numpy 2 and fails to import; 3.8.0-3.8.3 cap numpy below 2).
        "matplotlib>=3.8.4",
        "tensorboard>=2.14",
    ],
    extras_require={
        # torch_npu must match torch's base version (torch-npu 2.13.0 <-> torch 2.13.0)
        # and needs CANN installed first: see docs/ascend.md.
        "npu": ["torch-npu"],
        # 3.6: the triton torch 2.10 pins, which the floors run tests.
        "triton": ["triton>=3.6"],
        # pytest 9.1: its caplog sees npu_rft's records after setup_logging made that
        # logger non-propagating (with 9.0.3 five log tests of test_fused_ops failed
        # after test_bench had run the CLI).
        # pytest-timeout 2.3.0 was never released: 2.3.1 is the lowest 2.3.
        "test": ["pytest>=9.1", "pytest-timeout>=2.3.1"],
        "dev": ["pytest>=9.1", "pytest-timeout>=2.3.1", "triton>=3.6"],
    },
    entry_points={"console_scripts": ["npu-rft=npu_rft.cli:main"]},
)
