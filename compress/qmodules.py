"""Quantized layers holding packed weights (docs/design.md §5).

Forward paths, first that applies:

1. CUDA fp16/bf16 inputs, 4-bit: the Triton kernels.
2. CPU (see :mod:`.cpu_path` and docs/demo.md): a 4-bit ``QuantLinear`` the int4 weight-only
   kernel takes runs it (repacked once, at the first call) on bfloat16 inputs and on float32
   calls of at most ``INT4_MAX_ROWS`` rows, rounded to bfloat16 (``bf16_activations``, see
   QuantLinear); its larger float32 calls run the cached dequantized weight prepacked for
   oneDNN. Every other layer with ``cache_dequantized`` (the default) keeps its dequantized
   weight and runs the float op (float numerics, float memory). The caches are rebuilt when the
   packed tensors change (in place or by ``.to()``), skipped while tracing / compiling, and never
   copied or pickled.
3. The reference: dequantize, then ``F.linear`` / ``F.conv2d`` in the input's dtype.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from adagrow.kernels.conv import fused_conv2d
from adagrow.kernels.w4a16 import kernel_supports, use_triton, w4a16_matmul_sz
from adagrow.packed import codes_per_word, dequantize_packed, pack_scale_zero, padded_k

from .cpu_path import (INT4_DTYPES, INT4_MAX_ROWS, float_conv2d, float_linear, int4_linear, kernel_group, pack_conv,
                       pack_float, pack_int4)
from .layer import LayerGeometry, geometry, matrix_to_weight, reference_forward
from .obs import QuantResult

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class QuantLayer(nn.Module):
    """Shared body of QuantLinear / QuantConv2d, built from a metadata dict (see from_result).

    4-bit layers run the Triton kernels on CUDA fp16/bf16 inputs; on CPU see the module
    docstring; everything else runs the reference (dequantize, then F.linear / F.conv2d).
    ``cache_dequantized`` (a per-instance switch; class default) keeps the dequantized CPU weight
    of a layer that no CPU kernel runs: float speed for float memory. Set it False to dequantize
    on every call instead (exactly the same outputs, low-bit memory, slower).
    """

    cache_dequantized = True

    def __init__(self, meta: dict[str, Any]):
        super().__init__()
        self.meta = dict(meta)
        m = self.meta
        self.geo = LayerGeometry(m["kind"], m["out_features"], m["k"], m.get("groups", 1),
                                 m.get("in_channels", 0), tuple(m.get("kernel_size", (1, 1))),
                                 tuple(m.get("stride", (1, 1))), tuple(m.get("padding", (0, 0))),
                                 tuple(m.get("dilation", (1, 1))))
        self.bits, self.group_size = m["bits"], m["group_size"]
        n, k_pad = self.geo.out_features, padded_k(self.geo.k, self.group_size)
        sdt = SCALE_DTYPES[m["scale_dtype"]]
        self.register_buffer("qweight", torch.zeros(k_pad // codes_per_word(self.bits), n, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(m["n_groups"], n, dtype=sdt))
        self.register_buffer("zeros", torch.zeros(m["n_groups"], n, dtype=sdt))
        kk = self.geo.kernel_size[0] * self.geo.kernel_size[1]
        self.register_buffer("position_group", torch.zeros(kk, dtype=torch.int32)
                             if isinstance(self.group_size, str) else None)
        self.register_buffer("bias", torch.zeros(n) if m["bias"] else None)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight in the float layer's shape."""
        mat = dequantize_packed(self.qweight, self.scales, self.zeros, self.bits, self.geo.k,
                                self.group_size, self.geo.cin_per_group, self.position_group)
        return matrix_to_weight(mat, self.geo)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        gs = self.group_size
        return (self.bits == 4 and x.dtype in (torch.float16, torch.bfloat16) and use_triton(x)
                and (isinstance(gs, str) or self.geo.kind == "conv" or kernel_supports(gs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():  # the float layer refuses it too; the int4 / oneDNN paths would not
            raise TypeError(f"{type(self).__name__} takes a floating-point input, got {x.dtype}")
        bias = self._buffers["bias"]
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self._use_kernel(x):
            return self._kernel_forward(x, bias)
        if _cacheable(x):
            fast = self._cpu_forward(x, bias)
            if fast is not None:
                return fast
        return reference_forward(x, self.dequantize().to(x.dtype), bias, self.geo)

    def _cpu_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The cached-weight CPU path, or None when it does not apply."""
        if not self.cache_dequantized:
            return None
        weight = self._cached("dequantized", x.dtype, lambda: self.dequantize().to(x.dtype).contiguous())
        return reference_forward(x, weight, bias, self.geo)

    def _cached(self, what: str, dtype: torch.dtype, build: Callable[[], Any]) -> Any:
        """``build()``, kept per ``(what, dtype)`` until the packed tensors change (storage or
        in-place version); a change drops every entry."""
        b = self._buffers  # direct: nn.Module attribute lookup costs microseconds per call
        qw, sc, ze, pg = b["qweight"], b["scales"], b["zeros"], b["position_group"]
        version = (qw.data_ptr(), qw._version, sc.data_ptr(), sc._version, ze.data_ptr(), ze._version,
                   None if pg is None else (pg.data_ptr(), pg._version))
        cache = self.__dict__.get("_cpu_cache")
        if cache is None or cache[0] != version:
            cache = (version, {})
            self.__dict__["_cpu_cache"] = cache
        entries = cache[1]
        got = entries.get((what, dtype))
        if got is None:
            got = entries[(what, dtype)] = build()
        return got

    def cached_kinds(self) -> list[tuple[str, torch.dtype]]:
        """The CPU caches this layer holds now, as ``(kind, dtype)``: kind ``"int4"`` (repacked for
        the int4 kernel), ``"float"`` (a float32 weight, prepacked for oneDNN where it pays,
        :class:`.cpu_path.FloatPack`) or ``"dequantized"`` (the plain weight)."""
        cache = self.__dict__.get("_cpu_cache")
        return [] if cache is None else list(cache[1])

    def __getstate__(self) -> dict[str, Any]:
        """The module's state without the CPU caches (rebuilt on the next call; the prepacked
        oneDNN weight cannot be copied or pickled)."""
        state = super().__getstate__()
        state.pop("_cpu_cache", None)
        return state

    def clear_cache(self) -> None:
        """Drop the caches (the CPU repacked or dequantized weight, the kernels' (s, z) pairs)
        to free their memory."""
        self.__dict__.pop("_cpu_cache", None)
        self.__dict__.pop("_kernel_pairs", None)

    def extra_repr(self) -> str:
        return f"{self.geo.k}x{self.geo.out_features}, bits={self.bits}, group_size={self.group_size}"


class QuantLinear(QuantLayer):
    """Linear layer with packed low-bit weights.

    ``bf16_activations`` (a per-instance switch, :func:`use_bf16_activations`) picks the CPU path
    of float32 inputs for a 4-bit layer the int4 kernel takes (:func:`.cpu_path.kernel_group`):

    - ``None`` (default): a call of at most ``INT4_MAX_ROWS`` rows (a decode step) runs the kernel
      on activations rounded to bfloat16, the output cast back to float32: 4-bit weights
      streamed, faster than float there; outputs differ from the float32 reference by bfloat16
      rounding, ~1e-3 relative, at most ~1e-2 per element (docs/demo.md). Larger calls keep
      float32 numerics on the cached dequantized weight prepacked for oneDNN's matmul
      (``cache_dequantized``; else the reference).
    - ``True``: every float32 call on the kernel.
    - ``False``: none; the cached dequantized weight and ``F.linear`` (the reference's outputs
      exactly), or the reference.

    Other Linears (no int4 kernel) run the cached dequantized weight with ``F.linear``.
    """

    bf16_activations: bool | None = None

    def __init__(self, meta: dict[str, Any]):
        super().__init__(meta)
        self.int4_group = kernel_group(self.geo.k, self.geo.out_features, self.bits, self.group_size)

    def _cpu_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        group = self.int4_group
        if group is None:
            return super()._cpu_forward(x, bias)
        mode, dtype = self.bf16_activations, x.dtype
        if dtype == torch.float32 and (mode or (mode is None and x.numel() <= INT4_MAX_ROWS * self.geo.k)):
            dtype = torch.bfloat16
        if dtype in INT4_DTYPES:
            pack = self._cached("int4", dtype, lambda: pack_int4(self.qweight, self.scales, self.zeros, self.geo.k,
                                                                 self.group_size, group, dtype))
            y = int4_linear(x.to(dtype), pack, None).to(x.dtype)
            return y if bias is None else y + bias
        if dtype == torch.float32 and mode is None and self.cache_dequantized:  # a large call, by default
            return float_linear(x, self._cached("float", dtype, lambda: pack_float(self.dequantize())), bias)
        return super()._cpu_forward(x, bias)

    def _kernel_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = w4a16_matmul_sz(x, self.qweight, self.kernel_pairs(), self.group_size)
        return y if bias is None else y + bias

    def kernel_pairs(self) -> torch.Tensor:
        """The kernels' (s, z) pairs ``[n_groups, N, 2]`` (:func:`adagrow.packed.pack_scale_zero`),
        an in-memory repack of ``scales`` / ``zeros`` kept until either changes (storage or
        in-place version); rebuilt inline (not cached) while torch.compile traces."""
        if torch.compiler.is_compiling():
            return pack_scale_zero(self.scales, self.zeros)
        key = tuple((t.data_ptr(), t._version, t.device) for t in (self.scales, self.zeros))
        entry = self.__dict__.get("_kernel_pairs")
        if entry is None or entry[0] != key:
            entry = (key, pack_scale_zero(self.scales, self.zeros))
            self.__dict__["_kernel_pairs"] = entry
        return entry[1]


class QuantConv2d(QuantLayer):
    """Conv2d (grouped / depthwise too) with packed low-bit weights in (ky, kx, cin) K order.
    Keeps its dequantized CPU weight by default (``cache_dequantized``), as the ONNX Runtime
    export does: 4-bit on disk, float in memory; for float32 inputs, kernels larger than 3x3 and
    grouped convs keep it prepacked for oneDNN's convolution, for the input shape of the first call
    (:func:`.cpu_path.prepacks_conv`; float32 numerics, another summation order than ``F.conv2d``)."""

    def _cpu_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        if x.dtype != torch.float32 or not self.cache_dequantized:
            return super()._cpu_forward(x, bias)
        pack = self._cached("float", x.dtype, lambda: pack_conv(self.dequantize(), self.geo, tuple(x.shape)))
        return float_conv2d(x, pack, bias, self.geo)

    def _kernel_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        g = self.geo
        gs = self.group_size if isinstance(self.group_size, int) else -1
        y = fused_conv2d(x.permute(0, 2, 3, 1), self.qweight, bias, self.scales, self.zeros,
                         self.position_group, None, list(g.kernel_size), list(g.stride), list(g.padding),
                         list(g.dilation), g.groups, gs, "none")
        return y.permute(0, 3, 1, 2)


def _cacheable(x: torch.Tensor) -> bool:
    """A plain CPU call without autograd, tracing or compilation (the caches are Python state)."""
    # x.is_cpu, not x.device.type: building the device object costs ~3 us per call
    return (isinstance(x, torch.Tensor) and x.is_cpu and not x.requires_grad
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


def from_result(layer: nn.Module, res: QuantResult, name: str = "layer") -> QuantLayer:
    """A QuantLinear / QuantConv2d holding ``res``'s packed weights and the float layer's bias."""
    geo = geometry(layer, name)
    meta = {**geo.meta(), "bits": res.bits, "group_size": res.group_size, "sym": res.sym, "order": res.order,
            "n_groups": res.scales.shape[0], "scale_dtype": str(res.scales.dtype).split(".")[-1],
            "bias": layer.bias is not None}
    mod = (QuantConv2d if geo.kind == "conv" else QuantLinear)(meta)
    mod.qweight.copy_(res.qweight)
    mod.scales.copy_(res.scales)
    mod.zeros.copy_(res.zeros)
    if res.position_group is not None:
        mod.position_group.copy_(res.position_group)
    if layer.bias is not None:
        mod.bias.copy_(layer.bias.detach() if res.bias is None else res.bias)
    return mod.to(layer.weight.device)


def use_bf16_activations(model: nn.Module, enable: bool | None = True) -> int:
    """Set every :class:`QuantLinear` of ``model``'s ``bf16_activations``: ``True`` runs the int4
    kernel on bfloat16-rounded activations for every float32 CPU call, ``False`` for none (float32
    numerics), ``None`` restores the default (calls of at most ``INT4_MAX_ROWS`` rows). Drops their
    CPU caches. Returns how many layers were set."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.bf16_activations = enable
        m.clear_cache()
    return len(layers)


def quant_layer_from_meta(meta: dict[str, Any]) -> QuantLayer:
    """An empty quantized layer with the buffers a checkpoint's layer metadata describes."""
    return (QuantConv2d if meta["kind"] == "conv" else QuantLinear)(meta)


__all__ = ["QuantLinear", "QuantConv2d", "from_result", "quant_layer_from_meta", "use_bf16_activations"]
