"""Deploy-form modules that call the Triton ops on CUDA tensors and the references elsewhere."""
from __future__ import annotations

import torch
from torch import nn

from .conv import ACTS, apply_act, conv_weight_matrix, fused_conv2d
from .w4a16 import use_triton


def is_w4_conv(module: nn.Module) -> bool:
    """Duck-typed check for a 4-bit quantized conv (``adagrow.compress.QuantConv2d``): packed
    ``qweight``/``scales``/``zeros``, ``bits == 4`` and a conv geometry (no import of compress)."""
    geo = getattr(module, "geo", None)
    return (getattr(module, "bits", None) == 4 and isinstance(getattr(module, "qweight", None), torch.Tensor)
            and getattr(geo, "kind", None) == "conv")


class FusedConv2d(nn.Module):
    """``act(conv(x) + bias [+ residual])`` with the weight stored as ``[K, C_out]`` (ky, kx, cin),
    either float (from an ``nn.Conv2d``) or W4A16-packed (from a 4-bit quantized conv).

    Takes and returns NCHW tensors; the kernel works in NHWC, so channels-last memory avoids
    copies (the output is channels-last, so a chain of these runs NHWC end to end). On CUDA with
    fp16/bf16 input it runs the fused Triton kernel, elsewhere the PyTorch reference.
    """

    def __init__(self, conv: nn.Module, act: str = "none"):
        super().__init__()
        if act not in ACTS:
            raise ValueError(f"act must be one of {tuple(ACTS)}, got {act!r}")
        self.act = act
        if is_w4_conv(conv):
            g = conv.geo
            self.kernel_size, self.stride = list(g.kernel_size), list(g.stride)
            self.padding, self.dilation, self.groups = list(g.padding), list(g.dilation), g.groups
            self.group_size = conv.group_size if isinstance(conv.group_size, int) else -1
            for name in ("qweight", "scales", "zeros", "position_group"):
                t = getattr(conv, name)
                self.register_buffer(name, None if t is None else t.detach().clone())
            self.register_buffer("weight", None)
        elif isinstance(conv, nn.Conv2d):
            if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
                raise ValueError("FusedConv2d needs integer zero padding")
            self.kernel_size, self.stride = list(conv.kernel_size), list(conv.stride)
            self.padding, self.dilation, self.groups = list(conv.padding), list(conv.dilation), conv.groups
            self.group_size = -1
            self.register_buffer("weight", conv_weight_matrix(conv.weight.detach()))
            for name in ("qweight", "scales", "zeros", "position_group"):
                self.register_buffer(name, None)
        else:
            raise TypeError(f"FusedConv2d takes an nn.Conv2d or a 4-bit quantized conv, got {type(conv).__name__}")
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def conv_weight(self) -> torch.Tensor:
        """The float weight back in ``[C_out, C_in/g, kh, kw]`` layout (float modules only)."""
        kh, kw = self.kernel_size
        return self.weight.reshape(kh, kw, -1, self.weight.shape[1]).permute(3, 2, 0, 1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.weight is not None and not (use_triton(x) and x.dtype in (torch.float16, torch.bfloat16)):
            y = nn.functional.conv2d(x, self.conv_weight().to(x.dtype), bias, self.stride, self.padding,
                                     self.dilation, self.groups)
            return apply_act(y if residual is None else y + residual, self.act)
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # NHWC from here on
        res = None if residual is None else residual.permute(0, 2, 3, 1)
        if self.weight is not None:
            w = (self.weight.to(x.dtype), bias, None, None, None)
        else:
            w = (self.qweight, bias, self.scales, self.zeros, self.position_group)
        y = fused_conv2d(x.permute(0, 2, 3, 1), *w, res, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.group_size, self.act)
        return y.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        kind = "w4" if self.weight is None else "float"
        return (f"{kind}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"groups={self.groups}, act={self.act}")
