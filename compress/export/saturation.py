"""What an x86 CPU without VNNI computes for a u8 x s8 Q/DQ graph (ONNX Runtime's U8S8 kernels).

AVX2 has no 8-bit dot product: ``vpmaddubsw`` multiplies unsigned activation bytes by signed
weight bytes and adds each adjacent pair of products into an int16 **with saturation**; the
pair sums are then widened and accumulated in int32. With full-range int8 weights (|w| <= 127)
and uint8 activations (up to 255) a pair can reach 64770 and is clipped to 32767, so the result
depends on the CPU. A 7-bit weight range (|w| <= 63) bounds every pair by 2 * 255 * 63 = 32130.

:func:`saturation_check` runs a Q/DQ graph on given inputs, takes the exact uint8 activations and
int8 weights of every u8 x s8 product node and compares the saturating pair sums with exact int32
accumulation. :func:`emulate_avx2` runs the whole graph (ONNX reference evaluator) with the
saturated accumulations, i.e. what such a CPU would output. Pairs are adjacent along K in the
order ONNX Runtime packs it: MatMul/Gemm rows of ``K``; Conv im2col columns ``(ky, kx, c)``
(channels innermost, its NHWC layout).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from adagrow.onnxrt import cpu_session

from .verify import read_onnx

INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1
SAFE_WEIGHT_MAX = INT16_MAX // (2 * 255)  # 64: |w| below this cannot saturate a u8 x s8 pair
EMU_DOMAIN = "adagrow.avx2"
REF_OPSET = 19
CHUNK_ELEMS = 1 << 23  # int32 pair products held at once by u8s8_accumulate


def u8s8_accumulate(a: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(saturating, exact)`` int64 ``[M, N]`` sums of ``a`` uint8 ``[M, K]`` times ``w`` int8 ``[K, N]``.

    Saturating: products of K-pairs ``(2i, 2i+1)`` summed and clipped to int16 first (vpmaddubsw).
    """
    if a.dtype != np.uint8 or w.dtype != np.int8:
        raise TypeError(f"u8s8_accumulate needs uint8 activations and int8 weights, got {a.dtype} x {w.dtype}")
    m, k = a.shape
    if k % 2:
        a, w = np.pad(a, ((0, 0), (0, 1))), np.pad(w, ((0, 1), (0, 0)))
    a32, w32 = a.astype(np.int32), w.astype(np.int32)
    sat, exact = np.empty((m, w.shape[1]), np.int64), np.empty((m, w.shape[1]), np.int64)
    rows = max(1, CHUNK_ELEMS // max(1, (a.shape[1] // 2) * w.shape[1]))
    for r in range(0, m, rows):
        ar = a32[r:r + rows]
        pairs = ar[:, 0::2, None] * w32[None, 0::2] + ar[:, 1::2, None] * w32[None, 1::2]  # [m, K/2, N]
        exact[r:r + rows] = pairs.sum(1, dtype=np.int64)
        sat[r:r + rows] = np.clip(pairs, INT16_MIN, INT16_MAX).sum(1, dtype=np.int64)
    return sat, exact


@dataclass
class U8S8Node:
    """A Conv / MatMul / Gemm whose input is a uint8 Q/DQ tensor and whose weight is int8."""

    node: onnx.NodeProto
    act_q: str            # the uint8 tensor (QuantizeLinear output) feeding the node
    weight: np.ndarray    # int8, the node's weight layout
    scale_name: str       # weight scale initializer (per output channel or scalar)
    act_scale: str
    act_zero: str


def u8s8_nodes(model: onnx.ModelProto) -> list[U8S8Node]:
    """Every node ONNX Runtime runs on its u8 x s8 kernels."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    out = []
    for node in g.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        xdq, wdq = producer.get(node.input[0]), producer.get(node.input[1])
        if not (xdq and wdq and xdq.op_type == wdq.op_type == "DequantizeLinear"):
            continue
        if wdq.input[0] not in inits or xdq.input[0] in inits or xdq.input[2] not in inits:
            continue
        w = numpy_helper.to_array(inits[wdq.input[0]])
        if w.dtype != np.int8 or numpy_helper.to_array(inits[xdq.input[2]]).dtype != np.uint8:
            continue
        out.append(U8S8Node(node, xdq.input[0], w, wdq.input[1], xdq.input[1], xdq.input[2]))
    return out


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _im2col(x: np.ndarray, kernel: tuple[int, int], strides, pads, dilations,
            groups: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``x`` uint8 ``[B, C, H, W]`` -> (``[groups, B * Ho * Wo, kh * kw * C/g]`` channels innermost,
    ``(B, Ho, Wo)``).

    Padding uses 0, which is what the Q/DQ graph pads the *dequantized* input with; for a zero
    point z != 0 ONNX Runtime pads the uint8 input with z: both are exact in the int32 sum, and
    padding cannot create saturation that real data would not (|x - z| <= 255 either way).
    """
    b, c, h, w = x.shape
    kh, kw = kernel
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = (xp.shape[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    wo = (xp.shape[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    cols = np.empty((b, ho, wo, kh, kw, c), x.dtype)
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dilations[0], kx * dilations[1]
            patch = xp[:, :, y0:y0 + strides[0] * (ho - 1) + 1:strides[0], x0:x0 + strides[1] * (wo - 1) + 1:strides[1]]
            cols[:, :, :, ky, kx, :] = patch.transpose(0, 2, 3, 1)
    cg = c // groups
    cols = cols.reshape(b * ho * wo, kh, kw, groups, cg).transpose(3, 0, 1, 2, 4)
    return cols.reshape(groups, b * ho * wo, kh * kw * cg), (b, ho, wo)


def accumulations(op: str, xq: np.ndarray, w: np.ndarray, attrs: dict) -> tuple[np.ndarray, np.ndarray]:
    """(saturating, exact) int64 accumulations of one node, shaped like the node's output
    (Conv ``[B, N, Ho, Wo]``; MatMul / Gemm ``[..., N]``) before scales, zero points and bias."""
    if op == "Conv":
        kh, kw = w.shape[2:]
        groups = attrs.get("group", 1)
        cols, (b, ho, wo) = _im2col(xq, (kh, kw), attrs.get("strides", [1, 1]), attrs.get("pads", [0, 0, 0, 0]),
                                    attrs.get("dilations", [1, 1]), groups)
        n = w.shape[0]
        wg = w.reshape(groups, n // groups, -1, kh, kw).transpose(0, 3, 4, 2, 1)  # [g, kh, kw, C/g, N/g]
        wg = wg.reshape(groups, kh * kw * w.shape[1], n // groups)
        parts = [u8s8_accumulate(cols[gi], wg[gi]) for gi in range(groups)]
        sat, exact = (np.concatenate([p[i] for p in parts], 1).reshape(b, ho, wo, n).transpose(0, 3, 1, 2)
                      for i in (0, 1))
        return sat, exact
    if op == "Gemm" and attrs.get("transB", 0):
        w = w.T
    flat = xq.reshape(-1, xq.shape[-1])
    sat, exact = u8s8_accumulate(flat, np.ascontiguousarray(w))
    shape = (*xq.shape[:-1], w.shape[1])
    return sat.reshape(shape), exact.reshape(shape)


@dataclass
class SaturationStats:
    """Saturation of one u8 x s8 node over the inputs checked."""

    node: str
    max_abs_weight: int
    outputs: int             # accumulations checked
    outputs_differing: int   # accumulations where saturation changed the int32 result
    max_abs_error: int       # largest |saturating - exact| (integer units)


def _node_attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def saturation_check(path: str | os.PathLike, feeds: list[dict[str, np.ndarray]]) -> list[SaturationStats]:
    """Per u8 x s8 node of the Q/DQ graph at ``path``: how saturating pair sums differ from exact
    int32 accumulation on ``feeds`` (the uint8 activations are those the graph itself produces)."""
    model = read_onnx(path)
    nodes = u8s8_nodes(model)
    present = {o.name for o in model.graph.output}
    for u in nodes:
        if u.act_q not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=u.act_q))
            present.add(u.act_q)
    sess = cpu_session(model, optimize=False)  # keeps the Q outputs
    names = [u.act_q for u in nodes]
    stats = {u.node.name or u.node.output[0]: SaturationStats(u.node.name or u.node.output[0],
                                                              int(np.abs(u.weight.astype(np.int32)).max()), 0, 0, 0)
             for u in nodes}
    for feed in feeds:
        acts = dict(zip(names, sess.run(names, feed)))
        for u in nodes:
            sat, exact = accumulations(u.node.op_type, acts[u.act_q], u.weight, _node_attrs(u.node))
            s = stats[u.node.name or u.node.output[0]]
            diff = np.abs(sat - exact)
            s.outputs += diff.size
            s.outputs_differing += int((diff > 0).sum())
            s.max_abs_error = max(s.max_abs_error, int(diff.max(initial=0)))
    return list(stats.values())


class SatCorrection(OpRun):
    """``(saturating - exact) * s_x * s_w`` for one node: what the CPU adds to the exact result."""

    op_domain = EMU_DOMAIN

    def _run(self, xq, w, x_scale, w_scale, op=None, transB=None, group=None, strides=None, pads=None,
             dilations=None):
        attrs = {k: v for k, v in dict(transB=transB, group=group, strides=strides, pads=pads,
                                       dilations=dilations).items() if v is not None}
        op = op.decode() if isinstance(op, bytes) else op
        sat, exact = accumulations(op, xq, w, attrs)
        ws = np.asarray(w_scale, np.float64)
        if op == "Conv" and ws.ndim == 1:
            ws = ws.reshape(1, -1, 1, 1)
        return (((sat - exact) * float(x_scale) * ws).astype(np.float32),)


def emulate_avx2(path: str | os.PathLike, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Outputs of the Q/DQ graph at ``path`` for each feed as a CPU with AVX2 and no VNNI computes
    them (saturating u8 x s8 pair sums), run with ONNX's reference evaluator (slow: small inputs)."""
    model = read_onnx(path)
    if model.opset_import[0].version < REF_OPSET:  # the reference evaluator implements DQ from opset 19
        model = version_converter.convert_version(model, REF_OPSET)
    g = model.graph
    extra = []
    for u in u8s8_nodes(model):
        wname = f"{u.node.name or u.node.output[0]}__emu_w"
        g.initializer.append(numpy_helper.from_array(u.weight, wname))
        attrs = {k: v for k, v in _node_attrs(u.node).items() if k in ("transB", "group", "strides", "pads", "dilations")}
        y = u.node.output[0]
        u.node.output[0] = f"{y}__exact"
        extra.append((u.node, [helper.make_node("SatCorrection", [u.act_q, wname, u.act_scale, u.scale_name],
                                                [f"{y}__corr"], domain=EMU_DOMAIN, op=u.node.op_type, **attrs),
                               helper.make_node("Add", [f"{y}__exact", f"{y}__corr"], [y])]))
    after = {n.output[0]: new for n, new in extra}
    nodes = []
    for n in g.node:
        nodes += [n, *after.get(n.output[0], [])]
    del g.node[:]
    g.node.extend(nodes)
    model.opset_import.append(helper.make_opsetid(EMU_DOMAIN, 1))
    ev = ReferenceEvaluator(model, new_ops=[SatCorrection])
    return [ev.run(None, feed) for feed in feeds]
