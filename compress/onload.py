"""Quantizing a Hugging Face checkpoint without holding its float weights: the model is built on
the meta device (accelerate's ``init_empty_weights``), the weights outside the repeated blocks
(embeddings, norms, heads) are loaded once, and each block's weights are read from the
safetensors files (read into new tensors, not memory-mapped) only when the block is needed, then dropped once a later block
is loaded (while probing) or replaced by its packed quantized layers (while quantizing).

Peak memory is the weights outside the blocks, the packed blocks already quantized, one or two
float blocks (the block being quantized and its float copy for ``float_target``), and the
calibration activations of one block boundary (``docs/scale.md`` has measured figures).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .blocks import candidates
from .io import save_quantized
from .model import QuantConfig, quant_targets, quantize_model
from .qmodules import QuantLayer


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header


class Checkpoint:
    """Tensor names of a safetensors checkpoint folder (one file or an index of shards), each
    tensor read from its file only when asked for, straight into a new tensor with ``read``
    (no memory map: mapped file pages would count in the process's RSS and address space)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")
        self._table: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for f in files:
            self._table.update(_header(self.folder / f))
        self.where = {key: entry[0].name for key, entry in self._table.items()}

    def get(self, key: str) -> torch.Tensor:
        path, dtype, shape, begin, end = self._table[key]
        out = torch.empty(shape, dtype=dtype)
        if end > begin:
            with open(path, "rb") as fh:
                fh.seek(begin)
                got = fh.readinto(out.view(-1).view(torch.uint8).numpy())
            if got != end - begin:
                raise ValueError(f"{path}: tensor {key!r} is truncated ({got} of {end - begin} bytes)")
        return out


def _header(path: Path) -> dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]]:
    """``name -> (file, dtype, shape, first byte, end byte)`` from a safetensors file's header,
    each entry checked against the file's size and the tensor's byte count."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable safetensors header: {exc}") from exc
    table = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = _DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"]), \
                info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: tensor {key!r} has an unsupported or malformed entry {info!r}") from exc
        numel = 1
        for d in shape:
            numel *= d
        begin, end = 8 + n + int(begin), 8 + n + int(end)
        if min(shape, default=0) < 0 or end - begin != numel * dtype.itemsize or begin < 8 + n or end > size:
            raise ValueError(f"{path}: tensor {key!r} ({info['dtype']} {list(shape)}) does not fit its byte range")
        table[key] = (path, dtype, shape, begin, end)
    return table


def _names(model: nn.Module, ckpt: Checkpoint) -> dict[str, str]:
    """Model state name -> checkpoint name (with or without the base-model prefix, as
    ``from_pretrained`` accepts)."""
    prefix = getattr(model, "base_model_prefix", "")
    out = {}
    for name in model.state_dict(keep_vars=True):
        cands = [name, f"{prefix}.{name}"]
        if prefix and name.startswith(prefix + "."):
            cands.append(name[len(prefix) + 1:])
        hit = next((c for c in cands if c in ckpt.where), None)
        if hit is not None:
            out[name] = hit
    return out


class BlockLoader:
    """Loads a block's parameters from the checkpoint on demand (a forward pre-hook, or
    :meth:`load`), keeping at most one unquantized float block besides the one in use."""

    def __init__(self, model: nn.Module, ckpt: Checkpoint, names: dict[str, str], blocks: list[str],
                 dtype: torch.dtype):
        self.model, self.ckpt, self.names, self.blocks, self.dtype = model, ckpt, names, blocks, dtype
        self.resident: list[str] = []
        self.loads = 0
        self._handles = [model.get_submodule(b).register_forward_pre_hook(lambda mod, args, b=b: self.load(b))
                         for b in blocks]

    def _tensors(self, block: str) -> list[tuple[str, str]]:
        mod = self.model.get_submodule(block)
        return [(f"{block}.{n}", self.names[f"{block}.{n}"])
                for n, p in list(mod.named_parameters()) + list(mod.named_buffers())
                if p.device.type == "meta" and f"{block}.{n}" in self.names]

    def load(self, block: str) -> None:
        """Materialize ``block`` (a no-op when resident) and drop the float blocks before it."""
        from accelerate.utils import set_module_tensor_to_device
        if block in self.resident:
            return
        for old in [b for b in self.resident if not self._quantized(b)]:
            self._drop(old)
        for name, key in self._tensors(block):
            set_module_tensor_to_device(self.model, name, "cpu", value=self.ckpt.get(key), dtype=self.dtype)
        meta = [n for n, p in self.model.get_submodule(block).named_parameters(prefix=block) if p.is_meta]
        if meta:
            raise ValueError(f"{self.ckpt.folder}: the checkpoint has no tensor for {meta[:5]}")
        self.resident.append(block)
        self.loads += 1

    def _quantized(self, block: str) -> bool:
        return any(isinstance(m, QuantLayer) for m in self.model.get_submodule(block).modules())

    def _drop(self, block: str) -> None:
        from accelerate.utils import set_module_tensor_to_device
        for name, _ in self.model.get_submodule(block).named_parameters(prefix=block):
            set_module_tensor_to_device(self.model, name, "meta")
        self.resident.remove(block)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def empty_model(folder: str | os.PathLike, model_class: Any = None) -> nn.Module:
    """The checkpoint's model built on the meta device (buffers real), from its ``config.json``:
    ``model_class`` or the first of ``config.architectures``, else ``AutoModel``."""
    import transformers
    from accelerate import init_empty_weights
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, archs[0], None) if archs else None
        model_class = model_class or transformers.AutoModel
    with init_empty_weights():
        if hasattr(model_class, "from_config"):
            return model_class.from_config(config)
        return model_class(config)


@torch.no_grad()
def quantize_pretrained(src: str | os.PathLike, calib: Iterable | Callable[[nn.Module], Any],
                        config: QuantConfig | None = None, dst: str | os.PathLike | None = None,
                        dtype: torch.dtype = torch.float32, model_class: Any = None,
                        progress: bool = True) -> nn.Module:
    """Quantize the Hugging Face checkpoint folder ``src`` (safetensors) block by block without
    loading all its float weights: the same result as ``quantize(from_pretrained(src), calib,
    config)``, with peak memory bounded by the weights outside the blocks, the packed model and
    one or two float blocks.

    Args:
        src: folder with ``config.json`` and ``model.safetensors`` (or a sharded index).
        calib: calibration batches as for :func:`adagrow.compress.quantize`.
        dst: if given, the quantized checkpoint is written there (:func:`save_quantized`).
        dtype: compute dtype of the float weights (float32: the checkpoint's bf16/fp16 is upcast
            one block at a time).
        model_class: transformers class to build (default: ``config.architectures[0]``).

    Returns the quantized model (``adagrow_quant`` also records ``"block_loads"``).
    """
    config = (config or QuantConfig()).validate()
    ckpt = Checkpoint(src)
    model = empty_model(src, model_class)
    names = _names(model, ckpt)
    lists = candidates(model, list(quant_targets(model, config)[0]))
    if not lists:
        raise ValueError(f"{src}: the model has no list of repeated blocks to load one at a time")
    blocks = lists[0]
    from accelerate.utils import set_module_tensor_to_device
    inside = lambda n: any(n == b or n.startswith(b + ".") for b in blocks)  # noqa: E731
    for name, key in names.items():
        if not inside(name):
            set_module_tensor_to_device(model, name, "cpu", value=ckpt.get(key), dtype=dtype)
    model.tie_weights()
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta" and not inside(n)]
    if meta:
        raise ValueError(f"{src}: the checkpoint has no tensor for {meta[:5]}")
    loader = BlockLoader(model, ckpt, names, blocks, dtype)
    try:
        qmodel = quantize_model(model, calib, config, progress, before_block=loader.load)
    finally:
        loader.remove()
    qmodel.adagrow_quant["block_loads"] = loader.loads
    if dst is not None:
        save_quantized(qmodel, Path(dst) / "model.adagrow.safetensors")
    return qmodel


__all__ = ["Checkpoint", "BlockLoader", "empty_model", "quantize_pretrained"]
