"""One copy of a tied embedding / LM head in an exported graph.

``torch.onnx.export`` writes a tied ``nn.Embedding`` / ``nn.Linear`` pair as two initializers: the
embedding ``E [V, H]`` read by a ``Gather`` and, constant-folded, the head's ``E^T [H, V]`` read by
a ``MatMul`` (SmolLM2-135M: 113 MB each in fp32). :func:`share_tied_embedding` keeps only ``E^T``:
the ``Gather`` reads its columns (``axis=1``, giving ``[H, *ids]``) and a ``Transpose`` moves ``H``
last, so the graph computes the same numbers (a gather copies values) from one stored matrix,
and ONNX Runtime holds one copy in memory too.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _rank(graph: onnx.GraphProto, name: str) -> int | None:
    """Rank of graph input ``name`` when its shape is declared, else None."""
    for inp in graph.input:
        if inp.name == name and inp.type.tensor_type.HasField("shape"):
            return len(inp.type.tensor_type.shape.dim)
    return None


def share_tied_embedding(model: onnx.ModelProto) -> list[str]:
    """Rewrite, in place, every ``Gather`` (axis 0, indices a graph input of known rank) of an
    initializer ``E [V, H]`` whose transpose is also stored as a ``MatMul`` weight to read that
    transpose instead; drop ``E`` when nothing else reads it. Returns the names of the dropped
    initializers."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    matmul_b = {n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name in matmul_b:
        by_shape.setdefault(tuple(inits[name].dims), []).append(name)
    nodes: list[onnx.NodeProto] = []
    rewired: set[str] = set()
    for node in graph.node:
        emb = node.input[0] if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        rank = _rank(graph, node.input[1]) if emb in inits and axis == 0 else None
        if rank is None or len(inits[emb].dims) != 2:
            nodes.append(node)
            continue
        e = numpy_helper.to_array(inits[emb])
        twin = next((t for t in by_shape.get(e.shape[::-1], [])
                     if np.array_equal(numpy_helper.to_array(inits[t]), e.T)), None)
        if twin is None:
            nodes.append(node)
            continue
        cols = f"{node.output[0]}_columns"
        nodes.append(helper.make_node("Gather", [twin, node.input[1]], [cols], name=f"{node.name}_columns", axis=1))
        nodes.append(helper.make_node("Transpose", [cols], [node.output[0]], name=f"{node.name}_rows",
                                      perm=[*range(1, rank + 1), 0]))
        rewired.add(emb)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dropped = sorted(name for name in rewired if name not in used)
    for name in dropped:
        graph.initializer.remove(inits[name])
    return dropped


__all__ = ["share_tied_embedding"]
