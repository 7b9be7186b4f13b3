"""TensorRT engines from our ONNX graphs (NVIDIA's documented Python API, TensorRT 10).

Strongly typed networks (precision comes from the graph: fp16 tensors, Q/DQ for INT8), one
optimisation profile for the dynamic batch, a persistent timing cache, a serialized plan.
``tensorrt`` is imported lazily: without it (or without a GPU) a clear error says so.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from adagrow.files import atomic_write

from .verify import read_onnx


def profile_shapes(onnx_path: str | os.PathLike, min_batch: int, opt_batch: int,
                   max_batch: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every graph input; the dynamic first dimension takes the batches."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    model = read_onnx(onnx_path, load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    shapes = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        rest = []
        for i, d in enumerate(dims[1:], 1):
            if not d.HasField("dim_value"):
                raise ValueError(f"{onnx_path}: input {inp.name!r} has a dynamic dimension {i} "
                                 f"({d.dim_param!r}); only the batch dimension may be dynamic")
            rest.append(d.dim_value)
        shapes[inp.name] = tuple((b, *rest) for b in (min_batch, opt_batch, max_batch))
    return shapes


def import_tensorrt():
    """The ``tensorrt`` module, or a RuntimeError naming what is missing (TensorRT, or a GPU)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeError("TensorRT is not installed: `pip install tensorrt` on a machine with an NVIDIA GPU "
                           "and driver (engines are built for the GPU they run on)") from exc
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs an NVIDIA GPU, and none is visible (torch.cuda.is_available() is False)")
    return trt


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, min_batch: int = 1,
                 opt_batch: int = 8, max_batch: int = 32, workspace_gib: float = 4.0,
                 timing_cache: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Build and serialize a TensorRT engine from an ONNX file written by ``export_onnx``.

    Returns the engine path. ``timing_cache`` (read if present, then updated) speeds up rebuilds.
    """
    engine_path = Path(engine_path)
    if engine_path.exists() and not overwrite:
        raise FileExistsError(f"{engine_path} exists; pass overwrite=True to replace it")
    shapes = profile_shapes(onnx_path, min_batch, opt_batch, max_batch)
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    atomic_write(engine_path, lambda tmp: Path(tmp).write_bytes(bytes(plan)))
    if cache_path:
        cache_bytes = bytes(config.get_timing_cache().serialize())
        atomic_write(cache_path, lambda tmp: Path(tmp).write_bytes(cache_bytes))
    return engine_path
