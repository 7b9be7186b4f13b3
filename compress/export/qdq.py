"""ONNX-level rewrites that insert quantization: activation Q/DQ pairs, int8 per-channel weights,
int32 biases (ONNX Runtime flavour), 4- and 8-bit weights as MatMulNBits or DequantizeLinear (opset 21
for blocks), and int8 MatMul weights that ONNX Runtime turns into float ones at session load."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .nbits import MS_DOMAIN, matmul_nbits_node, nbits_block

QUANT_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class ActQuant:
    """Per-tensor activation grid: ``x = (q - zero) * scale`` in int8 or uint8."""

    scale: float
    zero: int
    dtype: int  # TensorProto.INT8 or TensorProto.UINT8


def _maps(graph: onnx.GraphProto) -> tuple[dict, dict, dict]:
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return inits, producer, consumers


def _attr(node: onnx.NodeProto, name: str, default: int | float) -> int | float:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def quantizable_nodes(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, int]]:
    """(node, output-channel axis of its weight) for Conv / Gemm / MatMul with constant weights."""
    inits, _, _ = _maps(graph)
    out = []
    for node in graph.node:
        if node.op_type not in QUANT_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0):
                continue
            axis = 0 if _attr(node, "transB", 0) else 1
        else:
            axis = 0 if node.op_type == "Conv" else 1
        out.append((node, axis))
    return out


def quant_units(graph: onnx.GraphProto, target: str) -> dict[str, list[str]]:
    """Each node that can run quantized (by node name) -> the tensors it needs a Q/DQ pair on.

    Units: every Conv / Gemm / MatMul with a constant weight (its activation input) and every
    MatMul between activations (attention; both inputs). ``onnxruntime``: a Conv also quantizes
    its output (or its single Relu consumer's output, so ORT drops the Relu), which is what lets
    ORT fuse QLinearConv. Gemm / MatMul outputs stay float: ORT fuses them into QGemm /
    MatMulIntegerToFloat with float outputs, which spares Transformers a requantization of every
    projection (MiniLM cosine 0.81 -> 0.91 before mixed precision).
    """
    inits, _, consumers = _maps(graph)

    def output(node: onnx.NodeProto) -> list[str]:
        if target != "onnxruntime" or node.op_type != "Conv":
            return []
        users = consumers.get(node.output[0], [])
        return [users[0].output[0] if len(users) == 1 and users[0].op_type == "Relu" else node.output[0]]

    units = {node.name: [node.input[0], *output(node)] for node, _ in quantizable_nodes(graph)}
    for node in graph.node:  # activation x activation MatMuls (attention scores, att @ v)
        if node.op_type == "MatMul" and not any(i in inits for i in node.input):
            units[node.name] = [node.input[0], node.input[1], *output(node)]
    return units


def activation_tensors(graph: onnx.GraphProto, target: str, keep_float: frozenset[str] = frozenset()) -> list[str]:
    """Tensors that get a Q/DQ pair: those of every unit not in ``keep_float`` (node names) and,
    for ``tensorrt``, both inputs of residual Adds."""
    inits, _, _ = _maps(graph)
    names: list[str] = []
    for unit, tensors in quant_units(graph, target).items():
        if unit not in keep_float:
            names += [t for t in tensors if t not in names and t not in inits]
    if target == "tensorrt":
        for node in graph.node:
            if node.op_type == "Add" and len(node.input) == 2 and not any(i in inits for i in node.input):
                names += [t for t in node.input if t not in names]
    return names


def act_quant(threshold: float, minimum: float, target: str) -> ActQuant:
    """Symmetric per-tensor grid: int8 zero 0 (TensorRT); uint8 zero 0 for non-negative tensors or
    zero 128 otherwise (ONNX Runtime: the same symmetric grid, on its faster u8s8 kernels)."""
    t = max(threshold, 1e-8)
    if target == "tensorrt":
        return ActQuant(t / 127.0, 0, TensorProto.INT8)
    if minimum >= 0:
        return ActQuant(t / 255.0, 0, TensorProto.UINT8)
    return ActQuant(t / 127.0, 128, TensorProto.UINT8)


def insert_act_qdq(model: onnx.ModelProto, plan: dict[str, ActQuant]) -> int:
    """Put ``Q -> DQ`` on every planned tensor; consumers and graph outputs keep their names."""
    graph = model.graph
    graph_inputs = {i.name for i in graph.input}
    rename: dict[str, str] = {}
    head: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []

    def pair(src: str, dst: str, name: str, aq: ActQuant) -> list[onnx.NodeProto]:
        s, z = f"{name}_qscale", f"{name}_qzero"
        new_inits.append(numpy_helper.from_array(np.array(aq.scale, dtype=np.float32), s))
        zdt = np.int8 if aq.dtype == TensorProto.INT8 else np.uint8
        new_inits.append(numpy_helper.from_array(np.array(aq.zero, dtype=zdt), z))
        return [helper.make_node("QuantizeLinear", [src, s, z], [f"{name}_q"], name=f"{name}_Q"),
                helper.make_node("DequantizeLinear", [f"{name}_q", s, z], [dst], name=f"{name}_DQ")]

    for t, aq in plan.items():
        if t in graph_inputs:
            rename[t] = f"{t}_dq"
            head += pair(t, f"{t}_dq", t, aq)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        for j, i in enumerate(node.input):
            node.input[j] = rename.get(i, i)
        tail = []
        for j, o in enumerate(node.output):
            if o in plan and o not in graph_inputs:
                node.output[j] = f"{o}_prequant"
                tail += pair(f"{o}_prequant", o, o, plan[o])
        nodes += [node, *tail]
    del graph.node[:]
    graph.node.extend(head + nodes)
    graph.initializer.extend(new_inits)
    return len(plan)


def weight_scales(w: np.ndarray, axis: int, levels: int = 127) -> np.ndarray:
    """Per-channel symmetric scales ``max|w| / levels`` along ``axis`` (1 for all-zero channels)."""
    red = tuple(d for d in range(w.ndim) if d != axis)
    amax = np.abs(w).max(axis=red)
    return np.where(amax > 0, amax / levels, 1.0).astype(np.float32)


def _bshape(axis: int, ndim: int) -> list[int]:
    return [-1 if d == axis else 1 for d in range(ndim)]


def int8_codes(w: np.ndarray, scales: np.ndarray | None, axis: int, levels: int = 127
               ) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes in ``[-levels, levels]``, float32 per-channel scales along ``axis``) of ``w``:
    symmetric, zero point 0; ``scales`` default to ``max|w| / levels``."""
    s = weight_scales(w, axis, levels) if scales is None else scales.astype(np.float32)
    return np.clip(np.round(w / s.reshape(_bshape(axis, w.ndim))), -levels, levels).astype(np.int8), s


def quantize_weights_int8(model: onnx.ModelProto, weights: dict[str, tuple[np.ndarray, np.ndarray]],
                          plan: dict[str, ActQuant], int32_bias: bool, levels: int = 127,
                          keep_float: frozenset[str] = frozenset()) -> int:
    """Replace each quantizable node's float weight by an int8 initializer + DequantizeLinear.

    ``weights`` may give an initializer's quantized values and per-channel scales (from the OBS
    quantizer, ONNX layout); others are rounded with ``max|w| / levels``. Codes are clipped to
    ``[-levels, levels]``. Nodes named in ``keep_float`` keep float weights. With ``int32_bias``
    the bias becomes int32 with scale ``s_x * s_w`` (ORT's QDQ rule); otherwise it stays float
    (TensorRT's rule). Returns the number of weights quantized.
    """
    graph = model.graph
    inits, _, _ = _maps(graph)
    head: list[onnx.NodeProto] = []
    done: dict[str, np.ndarray] = {}
    for node, axis in quantizable_nodes(graph):
        wname = node.input[1]
        if node.name in keep_float:
            continue
        if wname not in done:
            q, s = int8_codes(*weights.get(wname, (numpy_helper.to_array(inits[wname]).astype(np.float32), None)),
                              axis, levels)
            graph.initializer.remove(inits[wname])
            graph.initializer.extend([numpy_helper.from_array(q, f"{wname}_int8"),
                                      numpy_helper.from_array(s, f"{wname}_wscale"),
                                      numpy_helper.from_array(np.zeros_like(q, shape=s.shape), f"{wname}_wzero")])
            head.append(helper.make_node("DequantizeLinear", [f"{wname}_int8", f"{wname}_wscale", f"{wname}_wzero"],
                                         [wname], name=f"{wname}_DQ", axis=axis))
            done[wname] = s
        s = done[wname]
        if int32_bias and len(node.input) > 2 and node.input[2] in inits and node.input[0] in plan:
            bname = node.input[2]
            b = numpy_helper.to_array(inits[bname]).astype(np.float64)
            bs = (plan[node.input[0]].scale * s.astype(np.float64)).astype(np.float32)
            if b.shape == bs.shape:  # per node: a simplifier may share one bias between nodes
                tag = f"{bname}__{node.name or node.output[0]}"
                bq = np.clip(np.round(b / bs), -2**31, 2**31 - 1).astype(np.int32)
                graph.initializer.extend([numpy_helper.from_array(bq, f"{tag}_int32"),
                                          numpy_helper.from_array(bs, f"{tag}_bscale"),
                                          numpy_helper.from_array(np.zeros_like(bq), f"{tag}_bzero")])
                head.append(helper.make_node("DequantizeLinear", [f"{tag}_int32", f"{tag}_bscale", f"{tag}_bzero"],
                                             [f"{tag}_deq"], name=f"{tag}_DQ", axis=0))
                node.input[2] = f"{tag}_deq"
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(head + nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name in inits and t.name not in used]:
        graph.initializer.remove(t)  # float biases replaced above
    return len(done)


@dataclass
class NBitsWeight:
    """``bits``-bit codes of one layer in ONNX layout, with their grid: ``w = (codes - zeros) * scales``."""

    codes: np.ndarray    # uint8 values 0..2^bits - 1, the ONNX weight's shape
    scales: np.ndarray   # float32, blocked/per-axis shape
    zeros: np.ndarray    # uint8 values 0..2^bits - 1, same shape as scales
    axis: int
    block_size: int      # 0 for per-axis


def _gemm_as_matmul(node: onnx.NodeProto) -> None:
    if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0 or not _attr(node, "transB", 0):
        raise ValueError(f"low-bit export: Gemm {node.name} with alpha/beta != 1 or transB=0 is not supported")


def _nbits_form(node: onnx.NodeProto, ww: NBitsWeight) -> int:
    """MatMulNBits block size for a Linear weight ``[K, N]`` (0 when it cannot be one)."""
    if node.op_type not in ("MatMul", "Gemm") or ww.codes.ndim != 2:
        return 0
    if ww.block_size == 0:
        return nbits_block(ww.codes.shape[0], 0) if ww.axis == 1 else 0
    return nbits_block(ww.codes.shape[0], ww.block_size) if ww.axis == 0 else 0


def _dq_initializers(wname: str, ww: NBitsWeight, bits: int) -> list[TensorProto]:
    """Codes, scales and zero points of a ``DequantizeLinear`` weight: uint4 or uint8."""
    if bits == 8:
        return [numpy_helper.from_array(ww.codes.astype(np.uint8), f"{wname}_uint8"),
                numpy_helper.from_array(ww.scales.astype(np.float32), f"{wname}_w8scale"),
                numpy_helper.from_array(ww.zeros.astype(np.uint8), f"{wname}_w8zero")]
    return [helper.make_tensor(f"{wname}_uint4", TensorProto.UINT4, ww.codes.shape, ww.codes.flatten().tolist()),
            numpy_helper.from_array(ww.scales.astype(np.float32), f"{wname}_w4scale"),
            helper.make_tensor(f"{wname}_w4zero", TensorProto.UINT4, ww.zeros.shape, ww.zeros.flatten().tolist())]


def rewrite_nbits(model: onnx.ModelProto, weights: dict[str, NBitsWeight], accuracy_level: int | None = None,
                  bits: int = 4) -> tuple[int, list[str]]:
    """Replace float weights by ``bits``-bit ones (4 or 8). Returns (weights rewritten, names of
    those left on ``DequantizeLinear`` + float op).

    With ``accuracy_level`` a Linear weight (``MatMul`` / ``Gemm`` on ``[K, N]``, groups a power
    of two >= 16 along K, or per column) becomes ONNX Runtime's ``MatMulNBits`` at that
    accuracy level. Others get uint4 / uint8 initializers + ``DequantizeLinear`` (opset 21 for
    ``block_size``); there a ``Gemm`` becomes ``MatMul`` (+ ``Add`` for its bias) on ``[K, N]``,
    which ORT fuses into MatMulNBits at its session's accuracy level; a Conv runs in float on the
    dequantized weight.
    """
    if bits not in (4, 8):
        raise ValueError(f"low-bit weights here are 4- or 8-bit, got bits={bits}")
    graph = model.graph
    inits, _, _ = _maps(graph)
    head, nodes, on_dq = [], [], []
    done = 0
    for node in graph.node:
        wname = node.input[1] if len(node.input) > 1 else None
        if wname not in weights or wname not in inits:
            nodes.append(node)
            continue
        ww = weights[wname]
        done += 1
        if node.op_type == "Gemm":
            _gemm_as_matmul(node)
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        out = node.output[0]
        mm_out = f"{out}_matmul" if has_bias else out
        block = _nbits_form(node, ww) if accuracy_level is not None else 0
        graph.initializer.remove(inits[wname])
        if block:
            sc = ww.scales.reshape(-1, ww.codes.shape[1])
            zc = ww.zeros.reshape(-1, ww.codes.shape[1])
            mm, new = matmul_nbits_node(node.input[0], mm_out, wname, ww.codes, sc, zc, block, accuracy_level,
                                        f"{node.name}_MatMulNBits", bits=bits)
            graph.initializer.extend(new)
            nodes.append(mm)
        else:
            on_dq.append(node.name)
            new = _dq_initializers(wname, ww, bits)
            graph.initializer.extend(new)
            kw = {"axis": ww.axis} | ({"block_size": ww.block_size} if ww.block_size else {})
            head.append(helper.make_node("DequantizeLinear", [t.name for t in new], [wname], name=f"{wname}_DQ{bits}",
                                         **kw))
            if node.op_type == "Gemm":
                nodes.append(helper.make_node("MatMul", [node.input[0], wname], [mm_out], name=f"{node.name}_MatMul"))
            else:
                nodes.append(node)
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [out], name=f"{node.name}_Bias"))
    del graph.node[:]
    graph.node.extend(head + nodes)
    if accuracy_level is not None and len(on_dq) < done:
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return done, on_dq


def int8_matmul_weights(model: onnx.ModelProto, names: set[str], levels: int = 127) -> int:
    """Store each ``MatMul`` weight ``W [K, N]`` named in ``names`` as int8 per output column
    (symmetric, ``|q| <= levels``, scales ``max|w| / levels``): a ``Cast`` to float reads the
    codes and a ``Mul`` applies the column scales to the product, ``x @ W ~ (x @ float(q)) * s``.

    The ``Cast`` reads a constant only, so ONNX Runtime's constant folding (any optimisation level
    above none) turns it into a float weight once, at session load: fp32 compute at the float
    graph's speed, the file int8, no integer kernel. The scales act after the ``MatMul`` (N
    products per row) rather than on the weight, where ORT 1.32 would keep the folded ``Cast``
    output in memory beside the folded weight. Returns the number of weights stored."""
    graph = model.graph
    inits, _, _ = _maps(graph)
    nodes, done = [], set()
    for node in graph.node:
        wname = node.input[1] if node.op_type == "MatMul" else None
        if wname not in names:
            nodes.append(node)
            continue
        if wname not in done:
            q, scale = int8_codes(numpy_helper.to_array(inits[wname]).astype(np.float32), None, axis=1, levels=levels)
            graph.initializer.remove(inits[wname])
            graph.initializer.extend([numpy_helper.from_array(q, f"{wname}_int8"),
                                      numpy_helper.from_array(scale, f"{wname}_wscale")])
            nodes.append(helper.make_node("Cast", [f"{wname}_int8"], [wname], name=f"{wname}_Cast",
                                          to=TensorProto.FLOAT))
            done.add(wname)
        out = node.output[0]
        node.output[0] = f"{out}_unscaled"
        nodes += [node, helper.make_node("Mul", [node.output[0], f"{wname}_wscale"], [out], name=f"{node.name}_Scale")]
    if done != names:
        raise ValueError(f"int8 weights {sorted(names - done)[:5]} feed no MatMul as its second input")
    del graph.node[:]
    graph.node.extend(nodes)
    return len(done)
