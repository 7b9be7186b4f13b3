"""Reading safetensors files adagrow did not necessarily write, without trusting their size claims.

A safetensors file is an 8-byte header length, a JSON header (tensor table + string metadata) and
the tensor bytes. :func:`read_header` parses the header alone, bounded in size and nesting depth,
so a crafted header cannot exhaust memory or recursion. :func:`check_against_header` compares a
model built on PyTorch's ``meta`` device (no storage) with the tensor table, so a record that
describes a model larger than the file's tensors is refused before anything is allocated
(docs/trust.md).
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

MAX_HEADER_BYTES = 16 << 20  # 16 MiB of JSON: ~50,000 layer records; adagrow's own headers are < 1 MiB
MAX_NESTING = 64  # JSON nesting depth of the header and of the metadata strings in it
SLACK_BYTES = 64 << 20  # non-persistent buffers (position ids, rotary tables) a model may hold beyond its file

DTYPES = {  # safetensors dtype name -> torch dtype
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool}
_CORRUPT = "not a readable safetensors file (truncated or corrupt)"


@dataclass(frozen=True)
class StoredTensor:
    """One entry of a safetensors tensor table."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # first byte in the file (after the 8-byte length and the header)


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (level by level, no recursion; stops past :data:`MAX_NESTING`)."""
    depth, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level and depth <= MAX_NESTING:
        depth += 1
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, (dict, list))]
    return depth


def parse_json(text: str | bytes, where: str, what: str) -> Any:
    """JSON with at most :data:`MAX_NESTING` levels; ``ValueError`` naming ``where`` and ``what`` otherwise."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"{where}: {what} is nested more than {MAX_NESTING} levels deep") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: {what} is not valid JSON: {exc}") from exc
    if _depth(value) > MAX_NESTING:
        raise ValueError(f"{where}: {what} is nested more than {MAX_NESTING} levels deep")
    return value


def read_header(path: str | os.PathLike) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """``(tensor table, string metadata)`` of a safetensors file, reading only its header.

    Raises ``ValueError`` naming the file for a header longer than :data:`MAX_HEADER_BYTES` or
    than the file, nested too deeply, or with tensor entries whose shapes, dtypes or byte ranges
    are inconsistent or point outside the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {_CORRUPT}: shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise ValueError(f"{path}: " + (f"{_CORRUPT}: a header of {n:,} bytes in a file of {size:,}" if n > size - 8
                                            else f"the safetensors header of {n:,} bytes is longer than the "
                                                 f"{MAX_HEADER_BYTES:,}-byte limit"))
        header = parse_json(f.read(n), str(path), f"the safetensors header ({_CORRUPT})")
    if not isinstance(header, dict):
        raise ValueError(f"{path}: {_CORRUPT}: the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{path}: safetensors __metadata__ is not a table of strings")
    table, data = {}, size - 8 - n
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
            ok = all(type(d) is int and d >= 0 for d in (*shape, start, end)) and start <= end <= data
            numel = 1
            for d in shape:
                numel *= d
            ok = ok and end - start == numel * dtype.itemsize
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{path}: {_CORRUPT}: tensor {name!r} has an invalid entry {str(entry)[:200]}: an unknown "
                             f"dtype, a malformed shape or a tensor that does not fit its byte range ({data:,} bytes "
                             "of tensor data)")
        table[name] = StoredTensor(dtype, shape, end - start, 8 + n + start)
    return table, meta


_RANDOM_INIT = frozenset({"normal_", "uniform_", "erfinv_", "random_", "bernoulli_", "exponential_", "log_normal_",
                          "cauchy_", "geometric_"})
_FACTORIES = frozenset({"empty", "zeros", "ones", "full", "randn", "rand", "arange", "eye", "tensor", "empty_strided",
                        "empty_like", "zeros_like", "ones_like", "full_like", "randn_like", "rand_like",
                        "new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"})


class TooLarge(ValueError):
    """A model under construction asked for more bytes than its file can fill."""


class _MetaBuild(TorchFunctionMode):
    """Counts the bytes that tensor factories create while a model is built on the ``meta``
    device and raises :class:`TooLarge` past ``limit``, so a record asking for terabytes stops
    at its first big tensor, before any meta arithmetic (whose first use imports torch._dynamo:
    seconds and ~50-150 MB). Random in-place initialisation of a meta tensor is skipped for the
    same reason."""

    def __init__(self, stored: int, limit: int):
        super().__init__()
        self.stored, self.limit, self.total = stored, limit, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _RANDOM_INIT:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        out = func(*args, **kwargs)
        if name in _FACTORIES and isinstance(out, torch.Tensor) and out.is_meta:
            self.total += out.numel() * out.element_size()
            if self.total > self.limit:
                raise TooLarge(f"the recorded architecture asks for more than {self.total / 2**20:,.0f} MiB of "
                               f"tensors, but the file stores {self.stored / 2**20:,.0f} MiB")
        return out


@contextlib.contextmanager
def on_meta(table: dict[str, StoredTensor]) -> Iterator[None]:
    """Build modules on the ``meta`` device (shapes and dtypes only, no storage, no random init),
    refusing (:class:`TooLarge`) once tensor factories have asked for more than 128 times the
    file's tensor bytes plus :data:`SLACK_BYTES` (the train form of a deploy checkpoint holds
    up to 64 branches per fused conv; :func:`check_against_header` then compares exactly)."""
    stored = sum(t.nbytes for t in table.values())
    with torch.device("meta"), _MetaBuild(stored, 128 * stored + SLACK_BYTES):
        yield


def module_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (persistent or not) of a model, shared tensors once;
    works on ``meta``-device models, where nothing is allocated."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def check_against_header(path: str | os.PathLike, table: dict[str, StoredTensor], model: nn.Module) -> None:
    """The model may hold at most :data:`SLACK_BYTES` more than the file's tensors, and these
    must be exactly its state dict (names, dtypes, shapes; a tied tensor may be stored once). ``model`` is typically built on the
    ``meta`` device, so a crafted record asking for terabytes costs nothing. ``ValueError`` naming
    the file and the first mismatching tensor otherwise."""
    expected = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    tied = {k for k, t in expected.items() if first.setdefault(id(t), k) != k}  # stored once, re-tied at load
    stored, needed = sum(t.nbytes for t in table.values()), module_bytes(model)
    if needed > stored + SLACK_BYTES:
        raise ValueError(f"{path}: the recorded architecture needs {needed / 2**20:,.0f} MiB of parameters and "
                         f"buffers, but the file stores {stored / 2**20:,.0f} MiB of tensors")
    missing, extra = sorted(expected.keys() - table.keys() - tied), sorted(table.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"{path}: tensors do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, ref in expected.items():
        if key not in table:
            continue
        t = table[key]
        if t.dtype != ref.dtype or t.shape != tuple(ref.shape):
            raise ValueError(f"{path}: tensor {key!r} is {str(t.dtype)[6:]} {list(t.shape)} in the file; the "
                             f"metadata and model expect {str(ref.dtype)[6:]} {list(ref.shape)}")


__all__ = ["read_header", "on_meta", "TooLarge", "parse_json", "check_against_header", "module_bytes", "StoredTensor",
           "MAX_HEADER_BYTES", "MAX_NESTING", "SLACK_BYTES"]
