"""Ascend-only code, reached through :class:`npu_rft.device.Device` once it has
found an NPU (``Device.npu_module()``). Importing this package does not import
torch_npu."""
