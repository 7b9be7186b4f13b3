"""Export verification: ONNX Runtime (CPU) against the float PyTorch model on held-out inputs,
with a per-precision cosine threshold that fails loudly.

Thresholds (cosine of all outputs, flattened, worst case over the checked inputs): fp32 0.9999
and fp16 0.999 (rounding only); int8 0.99 and w4 0.98 (a quantized model is off by its grid's
error; below these a classifier's accuracy typically drops by points, cf. the CLI's digits CNN
at 0.99x and the issue's broken INT8 exports at 0.70-0.98).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch

from adagrow.onnxrt import cpu_session

from .inputs import to_numpy

THRESHOLDS = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99, "w4": 0.98}
# int8 also covers export_decoder_onnx's int8 (per-channel int8 Linear weights, float activations):
# its logits are further from the float model's than fp16's are (tiny Llama 0.9998), closer than a
# 4-bit grid's; 0.99 is the encoders' INT8 bound, which also quantizes activations.
# Cosine ignores scale: the output norm of ONNX Runtime over PyTorch's must also lie within
# 1 +- SCALE_TOLERANCE (rounding moves it by ~1e-6 in fp32, ~1e-3 in fp16; a quantized grid by
# a few percent). A constant clamped by the fp16 converter or a wrong branch moves it by 10x.
SCALE_TOLERANCE = {"fp32": 0.001, "fp16": 0.01, "int8": 0.1, "w4": 0.1}
CHECKS = ("raise", "warn")


class ExportCheckError(RuntimeError):
    """The exported model does not reproduce the float model within its precision's threshold."""


def read_onnx(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """``onnx.load`` with the errors of a missing or unreadable file naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends name no file
        raise ValueError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from err


def weight_only(path: str | os.PathLike) -> bool:
    """True for a W4 graph whose ``DequantizeLinear`` weights feed only non-MatMul ops (convs) and
    that quantizes no activation (no ``QuantizeLinear``): ORT may then fold them at load without
    losing a fusion (DQ + MatMul would become ``MatMulNBits``)."""
    graph = read_onnx(path, load_external_data=False).graph
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    if not dq or any(n.op_type == "QuantizeLinear" for n in graph.node):
        return False
    return not any(n.op_type in ("MatMul", "Gemm") and dq & set(n.input) for n in graph.node)


def ort_session(path: str | os.PathLike, threads: int | None = None, optimized_path: str | None = None,
                spinning: bool = True) -> ort.InferenceSession:
    """A CPU ONNX Runtime session (full graph optimisation), optionally saving the optimised graph.

    ``spinning=False`` stops idle worker threads from spinning, which keeps sessions that are timed
    side by side from stealing each other's cores. W4 graphs whose dequantized weights feed only
    convs (:func:`weight_only`) run with ``session.disable_quant_qdq=1``: ORT's constant folding
    then dequantizes those 4-bit weights once at load (fp32 in memory, 4-bit on disk) instead of on
    every call; they hold no activation Q/DQ pairs to fuse, and ``MatMulNBits`` is not Q/DQ.
    """
    config = {"session.disable_quant_qdq": "1"} if weight_only(path) else None
    return cpu_session(path, threads, spinning=spinning, optimized_path=optimized_path, config=config)


def run_session(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run with float inputs cast to the graph's input precision (fp16 graphs keep fp16 I/O)."""
    feeds = {}
    for i in sess.get_inputs():
        x = feed[i.name]
        feeds[i.name] = x.astype(np.float16) if i.type == "tensor(float16)" else x
    return sess.run(None, feeds)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flattened arrays (float64); nan if either is not finite."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def row_cosines(got: np.ndarray, ref: np.ndarray) -> dict[str, float | int]:
    """Cosine of each row (every index but the last axis: a sample, or a token of ``[B, S, V]``
    logits) of one output: ``worst`` and ``median``, and ``rows``. A whole-output cosine below the
    threshold with a high median means a few rows diverge (a token whose prediction flipped),
    not all of them."""
    if got.ndim < 2 or got.shape != ref.shape or not got.size:
        return {}
    g, r = got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])
    cos = [cosine(a, b) for a, b in zip(g, r)]
    return {"worst": float(np.nanmin(cos)) if np.isfinite(cos).any() else float("nan"),
            "median": float(np.median(cos)), "rows": len(cos)}


@dataclass
class Verification:
    """Worst-case agreement of the ONNX model with the float model over the checked inputs."""

    cosine: float
    max_abs_diff: float
    cases: list[dict] = field(default_factory=list)  # one per input: label, shape, cosine, max_abs_diff


@torch.no_grad()
def verify(path: str | os.PathLike, reference: Callable[..., Sequence[torch.Tensor]],
           feeds: list[tuple[str, dict[str, torch.Tensor]]]) -> Verification:
    """Compare every output of the ONNX model with ``reference`` (a ``NamedForward``, or any
    module taking the feed's tensors in order and returning a tuple) on each ``(label, feed)``."""
    sess = ort_session(path)
    cases = []
    for label, feed in feeds:
        got_out = run_session(sess, to_numpy(feed))
        ref_out = [o.double().numpy() for o in reference(*feed.values())]
        got = np.concatenate([o.astype(np.float64).ravel() for o in got_out])
        ref = np.concatenate([o.ravel() for o in ref_out])
        diff = float(np.abs(got - ref).max()) if np.isfinite(got).all() else float("nan")
        ref_norm = float(np.linalg.norm(ref))
        ratio = float(np.linalg.norm(got)) / ref_norm if ref_norm > 0 else (1.0 if not got.any() else float("inf"))
        cases.append({"inputs": label, "shape": {n: list(x.shape) for n, x in feed.items()},
                      "cosine": cosine(got, ref), "max_abs_diff": diff, "norm_ratio": ratio,
                      "rows": row_cosines(got_out[0], ref_out[0])})
    worst = min(cases, key=lambda c: -np.inf if np.isnan(c["cosine"]) else c["cosine"])
    return Verification(worst["cosine"], max(c["max_abs_diff"] for c in cases), cases)


def shapes_text(shape: dict[str, list[int]]) -> str:
    """Input shapes for a message: names that share a shape are grouped when more than two do (a
    decoder's 60 cache tensors read ``60 inputs past_key_values.0.key .. past_key_values.29.value
    [2, 3, 0, 64]``, not 60 entries)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, dims in shape.items():
        groups.setdefault(tuple(dims), []).append(name)
    return ", ".join(f"{len(n)} inputs {n[0]} .. {n[-1]} {list(d)}" if len(n) > 2 else
                     ", ".join(f"{m} {list(d)}" for m in n) for d, n in groups.items())


def enforce(v: Verification, precision: str, check: str, path: str | os.PathLike, notes: list[str],
            hint: str = "") -> bool:
    """Raise :class:`ExportCheckError` (``check="raise"``) or warn and add a note (``"warn"``)
    when the worst cosine is below the precision's threshold or not finite, or an output's norm
    is off by more than :data:`SCALE_TOLERANCE`; the message gives the failing input's row
    cosines of the first output and ends with ``hint``. Returns whether it passed."""
    thr, tol = THRESHOLDS[precision], SCALE_TOLERANCE[precision]
    off_scale = [c for c in v.cases if not abs(c["norm_ratio"] - 1) <= tol]
    if np.isfinite(v.cosine) and v.cosine >= thr and not off_scale:
        return True
    worst = min(v.cases, key=lambda c: -np.inf if np.isnan(c["cosine"]) else c["cosine"])
    if np.isfinite(v.cosine) and v.cosine >= thr:
        worst = off_scale[0]
        msg = (f"{path}: {precision} export FAILED verification: the ONNX output's norm is "
               f"{worst['norm_ratio']:.4g}x the float model's (tolerance 1 +- {tol}) on held-out inputs "
               f"{worst['inputs']} ({shapes_text(worst['shape'])})")
    else:
        msg = (f"{path}: {precision} export FAILED verification: cosine to the float model {v.cosine:.6f} "
               f"(threshold {thr}) on held-out inputs {worst['inputs']} ({shapes_text(worst['shape'])})"
               + ("; the ONNX output is not finite" if not np.isfinite(v.cosine) else ""))
    rows = worst.get("rows") or {}
    if rows:
        msg += (f"; rows of the first output: worst cosine {rows['worst']:.4f}, median {rows['median']:.6f} "
                f"over {rows['rows']}")
    msg += f"; {hint}" if hint else ""
    if check == "raise":
        raise ExportCheckError(msg + "; pass check='warn' to keep the file anyway")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    notes.append(msg)
    return False
