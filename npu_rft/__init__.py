"""npu-rft: reinforcement fine-tuning of LLMs, Ascend NPU first.

Importing the package does not import torch: the CLI must run (for example
``npu-rft doctor``) even where ``import torch`` itself is broken.
"""

__version__ = "0.1.0"
