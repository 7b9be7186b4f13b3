"""The quantized layers' CPU fast path: PyTorch's int4 kernel for QuantLinear (bfloat16 inputs, and
float32 inputs rounded to bfloat16: calls of few rows by default), the cached dequantized weight
(prepacked for oneDNN for float32 Linears), all against the reference path (dequantize, then the
float op)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adagrow.compress import QuantConfig, QuantConv2d, QuantLinear, quantize, use_bf16_activations
from adagrow.compress import cpu_path
from adagrow.compress.cpu_path import INT4_MAX_ROWS, kernel_group


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch) -> None:
    """The suite runs Triton's CPU interpreter, which would take bfloat16 CPU calls first."""
    monkeypatch.setattr("adagrow.compress.qmodules.use_triton", lambda x: x.is_cuda)


def _quantized(layer: nn.Module, x: torch.Tensor, **cfg) -> nn.Module:
    model = quantize(nn.Sequential(layer), [x], QuantConfig(**{"method": "rtn", **cfg}), progress=False)
    return model[0]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest elementwise error relative to the largest output."""
    return float((got.float() - want).abs().max() / want.abs().max())


# float32 products in another summation order (oneDNN against F.linear): K * 2^-24 relative at
# worst, ~1e-6 in practice
FP32_TOL = 1e-5
# bfloat16 rounding of activations, scales and the output: ~2^-8 relative per element
BF16_TOL = 2e-2


@pytest.mark.parametrize("k,n,group,sym,expect", [
    (64, 32, 32, False, 32), (576, 64, 128, False, 64), (384, 48, -1, True, 128), (512, 16, 256, False, 256),
    (96, 32, 32, True, 32)])
def test_int4_kernel_matches_the_reference(k, n, group, sym, expect) -> None:
    torch.manual_seed(k + n)
    x = torch.randn(5, 3, k)        # 15 rows: more than INT4_MAX_ROWS
    few = x[:1, :INT4_MAX_ROWS]     # a decode-sized call
    layer = nn.Linear(k, n)
    q = _quantized(layer, x.reshape(-1, k), bits=4, linear_group_size=group, sym=sym)
    assert isinstance(q, QuantLinear) and kernel_group(k, n, 4, q.group_size) == expect
    with torch.no_grad():
        ref, ref_few = (F.linear(t, q.dequantize(), q.bias) for t in (x, few))  # float32 reference
        # by default: many rows on the float32 prepacked weight, few rows on the int4 kernel
        many32 = q(x)
        assert q.cached_kinds() == [("float", torch.float32)]
        few32 = q(few)
        assert q.cached_kinds() == [("float", torch.float32), ("int4", torch.bfloat16)]
        assert use_bf16_activations(nn.Sequential(q), False) == 1  # the reference's outputs, any rows
        pinned = q(few), q(x)
        assert q.cached_kinds() == [("dequantized", torch.float32)]
        assert use_bf16_activations(nn.Sequential(q)) == 1  # the int4 kernel for every float32 call
        fast32 = q(x)
        assert q.cached_kinds() == [("int4", torch.bfloat16)]
        xb = x.bfloat16()
        fast = q(xb)
        ref_bf16 = F.linear(xb.float(), q.dequantize(), q.bias)
    assert _rel(many32, ref) < FP32_TOL and torch.equal(pinned[0], ref_few) and torch.equal(pinned[1], ref)
    assert fast.dtype == torch.bfloat16 and fast.shape == ref.shape
    assert fast32.dtype == few32.dtype == torch.float32 and fast32.shape == ref.shape
    for got, want in ((fast, ref_bf16), (fast32, ref), (few32, ref_few)):
        assert _rel(got, want) < BF16_TOL
    # and well below the quantization error itself (the float layer's output against ref)
    with torch.no_grad():
        assert (fast32 - ref).norm() < 0.1 * (ref - layer(x)).norm()
        assert (few32 - ref_few).norm() < 0.1 * (ref_few - layer(few)).norm()


def test_float_path_is_float32_with_or_without_onednn(monkeypatch) -> None:
    """The large-call path is a float32 product either way; oneDNN only changes its speed."""
    torch.manual_seed(3)
    x = torch.randn(40, 256)
    q = _quantized(nn.Linear(256, 64), x, bits=4, linear_group_size=128)
    with torch.no_grad():
        ref = F.linear(x, q.dequantize(), q.bias)
        with_dnn = q(x)
        monkeypatch.setattr(cpu_path, "ONEDNN", False)
        q.clear_cache()
        plain = q(x)
    assert torch.equal(plain, ref) and _rel(with_dnn, ref) < FP32_TOL


def test_caches_are_not_copied_or_pickled() -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 128)
    q = _quantized(nn.Linear(128, 32), x, bits=4, linear_group_size=64)
    with torch.no_grad():
        q(torch.randn(20, 128))  # fills the float cache, then x (2 rows) the int4 one
        want = q(x)
        assert len(q.cached_kinds()) == 2
        for other in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
            assert other.cached_kinds() == [] and torch.equal(other(x), want)


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
    with torch.no_grad():  # falls back to the cached dequantized weight, in bfloat16 and float32
        assert torch.equal(q(x), F.linear(x, q.dequantize().bfloat16(), q.bias.bfloat16()))
        assert torch.equal(q(x.float()), F.linear(x.float(), q.dequantize(), q.bias))
        assert q.cached_kinds() == [("dequantized", torch.bfloat16), ("dequantized", torch.float32)]
        q.clear_cache()
        q.cache_dequantized = False  # or dequantizes on every call
        assert torch.equal(q(x), F.linear(x, q.dequantize().bfloat16(), q.bias.bfloat16()))
        assert torch.equal(q(x.float()), F.linear(x.float(), q.dequantize(), q.bias))
    assert q.cached_kinds() == []


@pytest.mark.parametrize("kernel,stride,groups,onednn", [(5, 1, 1, True), (5, 2, 1, True), (3, 1, 4, True),
                                                          (3, 2, 1, False), (1, 1, 1, False)])
def test_conv_prepacked_weight_is_a_float32_conv(kernel, stride, groups, onednn) -> None:
    torch.manual_seed(kernel + groups)
    x = torch.randn(1, 8, 11, 11)
    q = _quantized(nn.Conv2d(8, 16, kernel, stride, padding=kernel // 2, groups=groups), x, bits=4, group_size=-1)
    with torch.no_grad():
        ref = F.conv2d(x, q.dequantize(), q.bias, stride, kernel // 2, 1, groups)
        got = q(x)
        assert got.shape == ref.shape and _rel(got, ref) < FP32_TOL
        assert q.__dict__["_cpu_cache"][1][("float", torch.float32)].onednn == (onednn and cpu_path.ONEDNN)
        assert torch.equal(q(x.bfloat16()), F.conv2d(x.bfloat16(), q.dequantize().bfloat16(), q.bias.bfloat16(),
                                                     stride, kernel // 2, 1, groups))  # bfloat16: F.conv2d
        for other in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
            assert other.cached_kinds() == [] and torch.equal(other(x), got)


@pytest.mark.parametrize("kernel", [3, 5])
def test_conv_caches_its_dequantized_weight_and_can_opt_out(kernel) -> None:
    torch.manual_seed(kernel)
    x = torch.randn(2, 8, 9, 9)
    q = _quantized(nn.Conv2d(8, 16, kernel, padding=1), x, bits=4, group_size=-1)
    assert isinstance(q, QuantConv2d) and q.cache_dequantized

    def check(got: torch.Tensor) -> None:  # 3x3: F.conv2d on the plain weight; 5x5: oneDNN's conv
        ref = F.conv2d(x, q.dequantize(), q.bias, padding=1)
        assert torch.equal(got, ref) if kernel == 3 or not cpu_path.ONEDNN else _rel(got, ref) < FP32_TOL

    with torch.no_grad():
        check(q(x))
        cached = q.__dict__["_cpu_cache"][1][("float", torch.float32)]
        check(q(x))
        assert q.__dict__["_cpu_cache"][1][("float", torch.float32)] is cached  # built once
        q.qweight.copy_(torch.flip(q.qweight, [0]))  # new weights: cache rebuilt
        check(q(x))
        assert q.__dict__["_cpu_cache"][1][("float", torch.float32)] is not cached
        q.clear_cache()
        q.cache_dequantized = False  # the reference: dequantize and F.conv2d on every call, exactly
        assert torch.equal(q(x), F.conv2d(x, q.dequantize(), q.bias, padding=1))
    assert q.cached_kinds() == []
    q.train()  # with autograd the cache is bypassed (it is Python state, not part of the graph)
    y = q(x.requires_grad_())
    y.sum().backward()
    assert x.grad is not None

