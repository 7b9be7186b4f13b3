"""Automatic mixed precision for INT8 graphs: keep the most sensitive units float.

A unit is one quantizable node with its Q/DQ pairs (a Linear / Conv with its weight, or an
activation x activation MatMul). Sensitivity is measured on the calibration set with ONNX
Runtime: ``1 - cosine`` of the whole model's outputs to the float graph when only that unit is
quantized (errors of several bad units do not hide each other, as they do when one unit at a
time is left float). Units are then returned to float, most sensitive first, until the target
cosine is met.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from tqdm.auto import tqdm

from adagrow.onnxrt import cpu_session

from .verify import cosine


@dataclass
class FloatUnit:
    """A unit kept in float and why."""

    node: str
    cosine_all_int8: float    # calibration cosine with every unit quantized
    cosine_only_this: float   # ... with only this unit int8
    cosine_after: float       # ... with this and every earlier kept unit in float

    def reason(self) -> str:
        return (f"{self.node}: kept float (calibration cosine {self.cosine_all_int8:.5f} with all units int8, "
                f"{self.cosine_only_this:.5f} with only this one int8; {self.cosine_after:.5f} after keeping it float)")


def _outputs(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    sess = cpu_session(model)
    return np.concatenate([o.astype(np.float64).ravel() for f in feeds for o in sess.run(None, f)])


def keep_float_units(float_graph: onnx.ModelProto, build: Callable[[frozenset[str]], onnx.ModelProto],
                     units: list[str], feeds: list[dict[str, np.ndarray]], target: float,
                     progress: bool = True) -> tuple[float, list[FloatUnit]]:
    """(calibration cosine with every unit quantized, units to keep float in order).

    ``build(keep_float)`` makes the quantized graph with the named units left in float. Nothing
    is kept float when the fully quantized graph already reaches ``target``.
    """
    ref = _outputs(float_graph, feeds)

    def score(keep: frozenset[str]) -> float:
        c = cosine(_outputs(build(keep), feeds), ref)
        return -1.0 if np.isnan(c) else c

    base = score(frozenset())
    if base >= target:
        return base, []
    single = {u: score(frozenset(units) - {u}) for u in tqdm(units, desc="int8 sensitivity", disable=not progress)}
    kept: list[FloatUnit] = []
    for u in sorted(units, key=lambda u: single[u]):
        after = score(frozenset([k.node for k in kept] + [u]))
        kept.append(FloatUnit(u, base, single[u], after))
        if after >= target:
            break
    return base, kept
