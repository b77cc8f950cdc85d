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
    python_requires=">=3.10",
    packages=find_packages(include=["npu_rft", "npu_rft.*"]) + find_packages("kernels"),
    package_dir={"npu_rft_kernels": "kernels/npu_rft_kernels"},
    package_data={"npu_rft": ["assets/*", "assets/**/*", "data/templates/*"]},
    include_package_data=True,
    install_requires=[
        # The CPU build of torch must be installed first on machines without
        # an accelerator (see the Makefile); a bare requirement pulls CUDA.
        "torch>=2.4",
        "transformers>=4.51,<6",
        "peft>=0.15,<0.22",
        "datasets>=3.0,<6",
        "safetensors>=0.4",
        "click>=8.1",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "psutil>=5.9",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
    ],
    extras_require={
        # torch_npu must match torch's base version (torch-npu 2.13.0 <-> torch 2.13.0)
        # and needs CANN installed first: see docs/ascend.md.
        "npu": ["torch-npu"],
        "triton": ["triton>=3.1"],
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "triton>=3.1"],
    },
    entry_points={"console_scripts": ["npu-rft=npu_rft.cli:main"]},
)
