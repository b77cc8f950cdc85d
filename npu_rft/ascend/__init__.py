"""Ascend-only code, reached through :class:`npu_rft.device.Device` once it has
found an NPU (``Device.npu_module()``, which returns
``npu_rft_kernels.torch_npu_api``, the one module that calls torch_npu).
Importing this package does not import torch_npu."""
