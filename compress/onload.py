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

import ctypes
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adagrow.stored import read_header

from .blocks import candidates
from .io import quantized_meta, save_quantized
from .model import QuantConfig, quant_targets, quantize_model
from .qmodules import QuantLayer
from .server_formats import shared_aliases
from .stream import stream_safetensors

OUT_NAME = "model.adagrow.safetensors"  # the file quantize_pretrained(dst=) and quantize_to_disk write in dst


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

    def shape(self, key: str) -> tuple[int, ...]:
        return self._table[key][2]

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
    each entry checked against the file's size and the tensor's byte count
    (:func:`adagrow.stored.read_header`)."""
    table, _ = read_header(path)
    return {key: (path, t.dtype, t.shape, t.offset, t.offset + t.nbytes) for key, t in table.items()}


def _names(model: nn.Module, ckpt: Checkpoint) -> dict[str, str]:
    """Model state name -> checkpoint name (with or without the base-model prefix, as
    ``from_pretrained`` accepts)."""
    prefix = getattr(model, "base_model_prefix", "")
    out, wrong = {}, []
    for name, tensor in model.state_dict(keep_vars=True).items():
        cands = [name, f"{prefix}.{name}"]
        if prefix and name.startswith(prefix + "."):
            cands.append(name[len(prefix) + 1:])
        hit = next((c for c in cands if c in ckpt.where), None)
        if hit is not None:
            out[name] = hit
            stored = list(ckpt.shape(hit))
            if stored != list(tensor.shape):
                wrong.append(f"{hit} {stored} (config.json: {list(tensor.shape)})")
    if wrong:
        raise ValueError(f"{ckpt.folder}: checkpoint tensors do not match config.json: {wrong[:5]}"
                         + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""))
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


def return_large_frees() -> None:
    """glibc only (a no-op elsewhere): serve allocations of 1 MiB and more by ``mmap`` so that
    freeing them returns the memory to the system. By default glibc raises that threshold up to
    32 MiB as large blocks are freed, after which the OBS temporaries (K x K, N x K) come from the
    heap and the freed ones stay in the process's RSS (measured: +100-300 MB on a 1024-wide
    Llama). The setting stays for the rest of the process (mallopt ``M_MMAP_THRESHOLD``)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 2**20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _onloading(src: str | os.PathLike, config: QuantConfig, dtype: torch.dtype,
               model_class: Any) -> tuple[nn.Module, "BlockLoader"]:
    """The model on the meta device with its weights outside the blocks loaded, and the loader
    of its blocks."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, ...), "
                         f"got {dtype!r}")
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
    return model, BlockLoader(model, ckpt, names, blocks, dtype)


@torch.no_grad()
def quantize_pretrained(src: str | os.PathLike, calib: Iterable | Callable[[nn.Module], Any],
                        config: QuantConfig | None = None, dst: str | os.PathLike | None = None,
                        dtype: torch.dtype = torch.float32, model_class: Any = None,
                        progress: bool = True) -> nn.Module:
    """Quantize the Hugging Face checkpoint folder ``src`` (safetensors) block by block without
    loading all its float weights: the same result as ``quantize(from_pretrained(src), calib,
    config)``, with peak memory bounded by the weights outside the blocks, the packed model and
    one or two float blocks (:func:`quantize_to_disk` does not keep the packed model).

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
    out = None if dst is None else Path(dst) / OUT_NAME
    if out is not None and out.exists():  # refused before the work
        raise FileExistsError(f"{out} exists; remove it or give another dst")
    model, loader = _onloading(src, config, dtype, model_class)
    try:
        qmodel = quantize_model(model, calib, config, progress, before_block=loader.load)
    finally:
        loader.remove()
    qmodel.adagrow_quant["block_loads"] = loader.loads
    if out is not None:
        save_quantized(qmodel, out)
    return qmodel


@torch.no_grad()
def quantize_to_disk(src: str | os.PathLike, dst: str | os.PathLike, calib: Iterable | Callable[[nn.Module], Any],
                     config: QuantConfig | None = None, dtype: torch.dtype = torch.float32,
                     model_class: Any = None, progress: bool = True, overwrite: bool = False) -> Path:
    """:func:`quantize_pretrained` that keeps neither the float nor the packed model: each block's
    packed tensors are written to a part file in ``dst`` once it is quantized and dropped from
    memory, and ``dst/model.adagrow.safetensors`` (the file :func:`save_quantized` writes, byte
    for byte the same tensors and metadata) is assembled from the parts at the end, streamed
    (:func:`~adagrow.compress.stream.stream_safetensors`). Peak memory: the weights outside the
    blocks, one float block and its float copy, one block boundary of activations and the OBS
    working set of one group of layers (docs/scale.md); large allocations are returned to the
    system when freed (:func:`return_large_frees`). A layer after the chain of blocks that
    needs the blocks rerun (:mod:`.tail`) keeps the packed blocks in memory instead.

    Returns the path of the written file.
    """
    from safetensors.torch import save_file
    config = (config or QuantConfig()).validate()
    out = Path(dst) / OUT_NAME
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    return_large_frees()
    model, loader = _onloading(src, config, dtype, model_class)
    parts: dict[str, tuple] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".adagrow-parts-", dir=out.parent) as tmp:
        def offload(block: str) -> None:
            from accelerate.utils import set_module_tensor_to_device
            mod = model.get_submodule(block)
            for m in mod.modules():
                if isinstance(m, QuantLayer):
                    m.clear_cache()
            state = {f"{block}.{k}": v.contiguous() for k, v in mod.state_dict().items()}
            part = Path(tmp) / f"{len(parts)}.safetensors"
            save_file(state, str(part))
            parts.update(_header(part))
            for name in state:
                set_module_tensor_to_device(model, name, "meta")

        try:
            qmodel = quantize_model(model, calib, config, progress, before_block=loader.load, after_block=offload)
        finally:
            loader.remove()
        qmodel.adagrow_quant["block_loads"] = loader.loads
        state = qmodel.state_dict()
        resident = {k: v for k, v in state.items() if not v.is_meta}
        resident = {k: v for k, v in resident.items() if k not in shared_aliases(resident)}  # tied weights once
        missing = [k for k, v in state.items() if v.is_meta and k not in parts]
        if missing:
            raise RuntimeError(f"{src}: tensors neither in memory nor written out: {missing[:5]}")
        meta = {"adagrow": json.dumps(quantized_meta(qmodel))}
        return stream_safetensors(out, {**resident, **{k: parts[k] for k in state if k in parts}}, meta, overwrite)


__all__ = ["Checkpoint", "BlockLoader", "empty_model", "quantize_pretrained", "quantize_to_disk"]
