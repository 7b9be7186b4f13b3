"""ONNX Runtime CPU sessions, built one way for every caller (export checks, calibration, the
latency suite, growth under a latency budget)."""
from __future__ import annotations

import os

import onnx
import onnxruntime as ort


def cpu_session(model: str | os.PathLike | onnx.ModelProto, threads: int | None = None, *, optimize: bool = True,
                spinning: bool = True, optimized_path: str | None = None,
                config: dict[str, str] | None = None) -> ort.InferenceSession:
    """A CPU ONNX Runtime session on the graph at ``model`` (a path, or an in-memory ModelProto).

    ``threads``: intra-op threads (inter-op 1); None leaves ONNX Runtime's default (all cores).
    ``optimize=False`` disables every graph optimisation, which keeps every tensor name (for
    sessions that read intermediate outputs). ``spinning=False`` stops idle worker threads from
    spinning, so sessions timed side by side do not steal each other's cores. ``optimized_path``
    saves the optimised graph; ``config`` adds session config entries (name -> value).
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
