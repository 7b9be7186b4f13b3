"""Put a deploy-form model on the fused kernels: ``to_kernels(model)``.

The model is traced with ``torch.fx``; every ``nn.Conv2d`` (integer zero padding) and every 4-bit
quantized conv (duck-typed, so ``adagrow.compress`` is never imported here) becomes a
:class:`FusedConv2d` that also absorbs what follows it in the graph:

- an activation it alone feeds (``nn.ReLU/SiLU/Hardswish/GELU`` modules, ``torch.relu``,
  ``F.relu/silu/hardswish/gelu``, ``.relu()``; exact GELU only), and
- a residual add it alone feeds (``y + r``, ``torch.add``), then that add's activation, when an
  ``example`` input shows that ``r`` has exactly the conv output's shape.

Other layers (``QuantLinear``, pooling, heads) stay as they are; quantized layers keep their own
Triton path. The fused convs emit channels-last outputs, so the conv stack runs NHWC end to end
(the first fused conv converts its input once).
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .modules import FusedConv2d, is_w4_conv

_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.GELU: "gelu"}
_ACT_FUNCTIONS = {torch.relu: "relu", F.relu: "relu", F.silu: "silu", F.hardswish: "hardswish",
                  F.gelu: "gelu"}
_ADDS = (operator.add, torch.add)


class _Tracer(fx.Tracer):
    """Keeps quantized layers and already fused convs as leaves (their forward branches on dtype)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, FusedConv2d) or hasattr(m, "qweight")
                or super().is_leaf_module(m, qualname))


def _fusable_conv(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    if is_w4_conv(mod):
        return mod
    if type(mod) is nn.Conv2d and mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
        return mod
    return None


def _activation(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The fused-kernel name of the activation ``node`` computes on its first input, or None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        act = _ACT_MODULES.get(type(mod))
        return None if act == "gelu" and mod.approximate != "none" else act
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        if node.kwargs.get("approximate", "none") != "none" or len(node.args) != 1:
            return None
        return _ACT_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target == "relu" and len(node.args) == 1:
        return "relu"
    return None


def _sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _residual(node: fx.Node, conv: fx.Node) -> fx.Node | None:
    """The other operand of ``conv + r`` if ``node`` is that add and ``r`` has the conv's shape."""
    if not ((node.op == "call_function" and node.target in _ADDS) or
            (node.op == "call_method" and node.target == "add")):
        return None
    if len(node.args) != 2 or node.kwargs:
        return None
    other = node.args[1] if node.args[0] is conv else node.args[0]
    if not isinstance(other, fx.Node) or other is conv:
        return None
    shape = _shape(conv)
    return other if shape is not None and _shape(other) == shape else None


def to_kernels(model: nn.Module, example: torch.Tensor | None = None) -> fx.GraphModule:
    """A copy of ``model`` (deploy form, eval) whose convs run as fused NHWC kernels.

    ``example``: one input batch; with it, residual adds are fused too (their operand shapes are
    checked on it). The returned GraphModule computes the same function; fp16/bf16 CUDA inputs
    run the Triton kernels, other inputs the PyTorch reference.
    """
    model = copy.deepcopy(model)
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # data-dependent control flow: say which model and why
        raise ValueError(f"to_kernels: cannot trace {type(model).__name__} with torch.fx ({exc}); "
                         "swap its convs for FusedConv2d by hand") from exc
    gm = fx.GraphModule(model, graph, type(model).__name__)
    if example is not None:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    for node in list(gm.graph.nodes):
        conv = _fusable_conv(gm, node)
        if conv is None or len(node.args) != 1 or node.kwargs:
            continue
        chain, act, residual = [node], "none", None
        nxt = _sole_user(node)
        if nxt is not None and (residual := _residual(nxt, node)) is not None:
            chain.append(nxt)
            nxt = _sole_user(nxt)
        if nxt is not None and nxt.args and nxt.args[0] is chain[-1] and (a := _activation(gm, nxt)):
            chain.append(nxt)
            act = a
        name = f"fused_{node.target.replace('.', '_')}"
        gm.add_submodule(name, FusedConv2d(conv, act))
        with gm.graph.inserting_after(chain[-1]):
            new = gm.graph.call_module(name, (node.args[0],) if residual is None else (node.args[0], residual))
        new.meta = dict(chain[-1].meta)  # shapes, for the residual check of later convs
        chain[-1].replace_all_uses_with(new)
        for old in reversed(chain):
            gm.graph.erase_node(old)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
