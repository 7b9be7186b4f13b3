"""Triton Inference Server model repositories: ``<repo>/<name>/config.pbtxt`` and
``<repo>/<name>/1/model.onnx`` (``onnxruntime_onnx``) or ``model.plan`` (``tensorrt_plan``)."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from onnx import TensorProto

from adagrow.checks import check_int
from adagrow.files import atomic_directory

from .verify import read_onnx

SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")  # model names; tensor names may also hold ':' and '/'
TRITON_TYPES = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.BFLOAT16: "TYPE_BF16",
                TensorProto.INT64: "TYPE_INT64", TensorProto.INT32: "TYPE_INT32", TensorProto.INT8: "TYPE_INT8",
                TensorProto.UINT8: "TYPE_UINT8", TensorProto.BOOL: "TYPE_BOOL", TensorProto.DOUBLE: "TYPE_FP64"}


def _io(values, inits: set[str], path) -> list[tuple[str, str, list[int]]]:
    out = []
    for v in values:
        if v.name in inits:
            continue
        if not re.fullmatch(r"[A-Za-z0-9_.:/-]{1,255}", v.name):
            raise ValueError(f"{path}: tensor name {v.name!r} cannot be written into config.pbtxt (letters, digits, "
                             "'_', '.', '-', ':' and '/' only)")
        t = v.type.tensor_type
        if t.elem_type not in TRITON_TYPES:
            raise ValueError(f"{path}: tensor {v.name!r} has an element type Triton does not map ({t.elem_type})")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if not dims or dims[0] != -1:
            raise ValueError(f"{path}: tensor {v.name!r} needs a dynamic batch dimension first (got {dims})")
        out.append((v.name, TRITON_TYPES[t.elem_type], dims[1:]))
    return out


def config_pbtxt(name: str, platform: str, inputs, outputs, max_batch_size: int, preferred: list[int],
                 max_queue_delay_us: int, instances: int, kind: str) -> str:
    def block(items) -> str:
        return ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {", ".join(map(str, d))} ]\n  }}'
                          for n, t, d in items)
    return (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch_size}\n'
            f"input [\n{block(inputs)}\n]\noutput [\n{block(outputs)}\n]\n"
            f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
            f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
            f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n")


def export_triton_repository(repo: str | os.PathLike, name: str, onnx_path: str | os.PathLike,
                             engine_path: str | os.PathLike | None = None, *, max_batch_size: int = 32,
                             preferred_batch_sizes: tuple[int, ...] = (8, 32), max_queue_delay_us: int = 100,
                             instances: int = 1, kind: str = "KIND_CPU", overwrite: bool = False) -> Path:
    """Write a model folder for Triton Inference Server; returns ``<repo>/<name>``.

    Input/output names, dtypes and dims come from the ONNX graph (the batch dimension is Triton's).
    With ``engine_path`` the model is the TensorRT plan (``tensorrt_plan``; use ``kind="KIND_GPU"``),
    otherwise the ONNX file (``onnxruntime_onnx``).
    """
    if not SAFE_NAME.fullmatch(name) or name.startswith("."):
        raise ValueError(f"model name {name!r} must be a plain folder name of letters, digits, '_', '.' and '-' "
                         "(it is written into config.pbtxt)")
    if kind not in ("KIND_CPU", "KIND_GPU"):
        raise ValueError(f"kind must be KIND_CPU or KIND_GPU, got {kind!r}")
    if engine_path is not None and kind != "KIND_GPU":
        raise ValueError("a TensorRT plan runs on the GPU: pass kind='KIND_GPU' with engine_path")
    check_int(instances, "instances", 1)
    check_int(max_queue_delay_us, "max_queue_delay_us", 0)
    if max_batch_size < 1 or any(not 1 <= b <= max_batch_size for b in preferred_batch_sizes):
        raise ValueError("preferred batch sizes must lie in 1..max_batch_size")
    model = read_onnx(onnx_path, load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    inputs, outputs = _io(model.graph.input, inits, onnx_path), _io(model.graph.output, set(), onnx_path)
    dest = Path(repo) / name
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True to replace it")
    platform, src, fname = (("tensorrt_plan", Path(engine_path), "model.plan") if engine_path
                            else ("onnxruntime_onnx", Path(onnx_path), "model.onnx"))

    def fill(staging: Path) -> None:
        (staging / "1").mkdir()
        shutil.copyfile(src, staging / "1" / fname)
        (staging / "config.pbtxt").write_text(config_pbtxt(name, platform, inputs, outputs, max_batch_size,
                                                           list(preferred_batch_sizes), max_queue_delay_us,
                                                           instances, kind))

    atomic_directory(dest, fill, overwrite)  # umask permissions (0755 / 0644), fsynced, one rename
    return dest
