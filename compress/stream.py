"""Writing one safetensors file from tensors in memory and byte ranges of other safetensors
files, without holding them all: the header is built from shapes and dtypes, then each tensor's
bytes are written (or copied from its source file in chunks) in header order."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO

import torch

from adagrow.checks import check_finite
from adagrow.files import atomic_write
from adagrow.stored import DTYPES

SAFETENSORS_DTYPES = {dtype: name for name, dtype in DTYPES.items()}  # torch dtype -> safetensors name
CHUNK = 16 * 2**20  # bytes copied at a time from a source file

# a tensor to write: in memory, or (file, dtype, shape, first byte, end byte) of a stored one
Source = torch.Tensor | tuple[Path, torch.dtype, tuple[int, ...], int, int]


def _describe(src: Source) -> tuple[torch.dtype, tuple[int, ...], int]:
    if isinstance(src, torch.Tensor):
        return src.dtype, tuple(src.shape), src.numel() * src.element_size()
    _, dtype, shape, begin, end = src
    return dtype, shape, end - begin


def _write_one(fh: BinaryIO, key: str, src: Source) -> None:
    if isinstance(src, torch.Tensor):
        t = src.detach().cpu().contiguous()
        check_finite({key: t}, "stream_safetensors")
        if t.numel():
            fh.write(t.view(-1).view(torch.uint8).numpy().tobytes())
        return
    path, dtype, shape, begin, end = src
    with open(path, "rb") as inp:
        inp.seek(begin)
        left = end - begin
        while left:
            chunk = inp.read(min(CHUNK, left))
            if not chunk:
                raise ValueError(f"{path}: tensor {key!r} is truncated")
            if dtype.is_floating_point:
                check_finite({key: torch.frombuffer(bytearray(chunk), dtype=dtype)}, "stream_safetensors")
            fh.write(chunk)
            left -= len(chunk)


def stream_safetensors(path: str | os.PathLike, tensors: dict[str, Source], metadata: dict[str, str],
                       overwrite: bool = False) -> Path:
    """Write ``tensors`` (keys sorted) as a safetensors file with ``metadata``, atomically
    (:func:`adagrow.files.atomic_write`); refuses NaN / inf in floating-point tensors."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    keys = sorted(tensors)
    for key in keys:
        dtype, shape, nbytes = _describe(tensors[key])
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {dtype}, not storable in safetensors here")
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for key in keys:
                _write_one(fh, key, tensors[key])

    return atomic_write(path, write, overwrite)


__all__ = ["stream_safetensors", "SAFETENSORS_DTYPES"]
