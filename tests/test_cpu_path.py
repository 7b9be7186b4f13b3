"""The quantized layers' CPU fast path: PyTorch's int4 kernel for QuantLinear (bfloat16 inputs, and
float32 inputs rounded to bfloat16) and the cached dequantized weight, both against the reference
path (dequantize, then the float op)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adagrow.compress import QuantConfig, QuantConv2d, QuantLinear, quantize, use_bf16_activations
from adagrow.compress.cpu_path import kernel_group


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch) -> None:
    """The suite runs Triton's CPU interpreter, which would take bfloat16 CPU calls first."""
    monkeypatch.setattr("adagrow.compress.qmodules.use_triton", lambda x: x.is_cuda)


def _quantized(layer: nn.Module, x: torch.Tensor, **cfg) -> nn.Module:
    model = quantize(nn.Sequential(layer), [x], QuantConfig(**{"method": "rtn", **cfg}), progress=False)
    return model[0]


@pytest.mark.parametrize("k,n,group,sym,expect", [
    (64, 32, 32, False, 32), (576, 64, 128, False, 64), (384, 48, -1, True, 128), (512, 16, 256, False, 256),
    (96, 32, 32, True, 32)])
def test_int4_kernel_matches_the_reference(k, n, group, sym, expect) -> None:
    torch.manual_seed(k + n)
    x = torch.randn(5, 3, k)
    layer = nn.Linear(k, n)
    q = _quantized(layer, x.reshape(-1, k), bits=4, linear_group_size=group, sym=sym)
    assert isinstance(q, QuantLinear) and kernel_group(k, n, 4, q.group_size) == expect
    with torch.no_grad():
        ref = F.linear(x, q.dequantize(), q.bias)  # float32 reference
        # float32 inputs by default: float32 numerics, the cached dequantized weight
        assert torch.equal(q(x), ref) and q.__dict__["_cpu_cache"][0][:2] == ("dequantized", torch.float32)
        assert use_bf16_activations(nn.Sequential(q)) == 1  # then: the int4 kernel, activations in bfloat16
        fast32 = q(x)
        assert q.__dict__["_cpu_cache"][0][:2] == ("int4", torch.bfloat16)
        xb = x.bfloat16()
        fast = q(xb)
        ref_bf16 = F.linear(xb.float(), q.dequantize(), q.bias)
    assert fast.dtype == torch.bfloat16 and fast.shape == ref.shape
    assert fast32.dtype == torch.float32 and fast32.shape == ref.shape
    # bfloat16 rounding of activations, scales and the output: ~2^-8 relative per element
    for got, want in ((fast, ref_bf16), (fast32, ref)):
        err = (got.float() - want).abs().max() / want.abs().max()
        assert err < 2e-2, err
    # and well below the quantization error itself (the float layer's output against ref)
    with torch.no_grad():
        assert (fast32 - ref).norm() < 0.1 * (ref - layer(x)).norm()


def test_int4_cache_follows_the_weights() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 128)
    q = _quantized(nn.Linear(128, 32), x, bits=4, linear_group_size=64)
    with torch.no_grad():
        first = q(x.bfloat16())
        q.scales.mul_(2)  # in place: the repacked weights must follow
        second = q(x.bfloat16())
        bias = q.bias.bfloat16()
    assert torch.allclose((second - bias).float(), 2 * (first - bias).float(), rtol=2e-2, atol=2e-2)


def test_kernel_does_not_apply_outside_its_constraints() -> None:
    assert kernel_group(64, 10, 4, 32) is None     # N not a multiple of 16
    assert kernel_group(64, 32, 8, -1) is None     # 8-bit
    assert kernel_group(72, 32, 4, -1) is None     # no kernel group divides K=72 and per-channel
    assert kernel_group(64, 32, 4, "tier") is None
    torch.manual_seed(1)
    x = torch.randn(3, 72).bfloat16()
    q = _quantized(nn.Linear(72, 32), x.float(), bits=4, linear_group_size=-1)
    with torch.no_grad():  # falls back to the cached dequantized weight, in bfloat16
        assert torch.equal(q(x), F.linear(x, q.dequantize().bfloat16(), q.bias.bfloat16()))
        assert q.__dict__["_cpu_cache"][0][:2] == ("dequantized", torch.bfloat16)
        q.clear_cache()
        q.cache_dequantized = False  # or dequantizes on every call
        assert torch.equal(q(x), F.linear(x, q.dequantize().bfloat16(), q.bias.bfloat16()))
    assert "_cpu_cache" not in q.__dict__


@pytest.mark.parametrize("groups", [1, 4])
def test_conv_caches_its_dequantized_weight_and_can_opt_out(groups) -> None:
    torch.manual_seed(groups)
    x = torch.randn(2, 8, 9, 9)
    q = _quantized(nn.Conv2d(8, 16, 3, padding=1, groups=groups), x, bits=4, group_size=-1)
    assert isinstance(q, QuantConv2d) and q.cache_dequantized
    with torch.no_grad():
        ref = F.conv2d(x, q.dequantize(), q.bias, padding=1, groups=groups)
        assert torch.equal(q(x), ref)
        cached = q.__dict__["_cpu_cache"][1]
        assert torch.equal(q(x), ref) and q.__dict__["_cpu_cache"][1] is cached  # built once
        q.qweight.copy_(torch.flip(q.qweight, [0]))  # new weights: cache rebuilt
        assert torch.equal(q(x), F.conv2d(x, q.dequantize(), q.bias, padding=1, groups=groups))
        q.clear_cache()
        q.cache_dequantized = False
        assert torch.equal(q(x), F.conv2d(x, q.dequantize(), q.bias, padding=1, groups=groups))
    assert "_cpu_cache" not in q.__dict__
    q.train()  # with autograd the cache is bypassed (it is Python state, not part of the graph)
    y = q(x.requires_grad_())
    y.sum().backward()
    assert x.grad is not None

