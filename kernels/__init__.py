"""Triton kernels for the deploy form, registered as ``torch.ops.adagrow.*`` custom ops.

- ``w4a16_matmul(x, qweight, scales, zeros, group_size)``: GEMV / split-K / tiled GEMM by M;
  ``w4a16_matmul_sz(x, qweight, sz, group_size)`` takes the scales and zeros prepacked as the
  kernels' (s, z) pairs (``adagrow.packed.pack_scale_zero``; what ``QuantLinear`` keeps).
- ``fused_conv2d(...)``: NHWC implicit-GEMM conv (and a direct depthwise kernel) with fused
  bias, activation and residual; fp16/bf16 or W4A16-packed weights.

Each op has a pure-PyTorch reference (used on CPU and by the tests) and a fake implementation
for torch.compile / CUDA graphs. On CPU the kernels run only under ``TRITON_INTERPRET=1``.
"""
if __name__ != "adagrow.kernels":  # found as a top-level name from a checkout: see adagrow.checkout
    from adagrow.checkout import become_stand_in
    become_stand_in(globals())
else:
    from .conv import fused_conv2d, fused_conv2d_ref
    from .convert import to_kernels
    from .modules import FusedConv2d
    from .w4a16 import load_tuning, lookup_config, save_tuning, tune, w4a16_matmul, w4a16_matmul_ref, w4a16_matmul_sz

    __all__ = ["w4a16_matmul", "w4a16_matmul_sz", "w4a16_matmul_ref", "fused_conv2d", "fused_conv2d_ref", "FusedConv2d",
               "to_kernels", "tune", "save_tuning", "load_tuning", "lookup_config"]
