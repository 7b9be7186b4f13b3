"""Deploy-form modules that call the Triton ops on CUDA tensors and the references elsewhere."""
from __future__ import annotations

import torch
from torch import nn

from .conv import ACTS, _torch_act, conv_weight_matrix, fused_conv2d
from .w4a16 import use_triton


class FusedConv2d(nn.Module):
    """``act(conv(x) + bias [+ residual])`` with the weight stored as ``[K, C_out]`` (ky, kx, cin).

    Takes and returns NCHW tensors (channels-last memory avoids copies); on CUDA with fp16/bf16
    input it runs the fused Triton kernel, elsewhere F.conv2d followed by the activation.
    """

    def __init__(self, conv: nn.Conv2d, act: str = "none"):
        super().__init__()
        if act not in ACTS:
            raise ValueError(f"act must be one of {tuple(ACTS)}, got {act!r}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("FusedConv2d needs integer zero padding")
        self.act = act
        self.kernel_size, self.stride = list(conv.kernel_size), list(conv.stride)
        self.padding, self.dilation, self.groups = list(conv.padding), list(conv.dilation), conv.groups
        self.register_buffer("weight", conv_weight_matrix(conv.weight.detach()))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def conv_weight(self) -> torch.Tensor:
        """The weight back in ``[C_out, C_in/g, kh, kw]`` layout."""
        kh, kw = self.kernel_size
        return self.weight.reshape(kh, kw, -1, self.weight.shape[1]).permute(3, 2, 0, 1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if use_triton(x) and x.dtype in (torch.float16, torch.bfloat16):
            res = None if residual is None else residual.permute(0, 2, 3, 1)
            y = fused_conv2d(x.permute(0, 2, 3, 1), self.weight.to(x.dtype),
                             None if self.bias is None else self.bias.to(x.dtype), None, None, None, res,
                             self.kernel_size, self.stride, self.padding, self.dilation, self.groups, -1, self.act)
            return y.permute(0, 3, 1, 2)
        y = nn.functional.conv2d(x, self.conv_weight().to(x.dtype),
                                 None if self.bias is None else self.bias.to(x.dtype),
                                 self.stride, self.padding, self.dilation, self.groups)
        return _torch_act(y if residual is None else y + residual, self.act)
