"""Quantized checkpoints: one safetensors file whose header carries JSON metadata (format
version, config, per-layer geometry/bits/groups, and the architecture record).

Everything read from a file is data: the architecture is a registered name with checked
arguments (:mod:`.archs`), each quantized layer's metadata is checked against the rebuilt model's
layer and against the tensors in the file, and tensors must be finite. Every problem raises a
``ValueError`` naming the file and the field or tensor.
"""
from __future__ import annotations

import copy
import re
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from adagrow import __version__
from adagrow.archs import build_arch, hf_record
from adagrow.checks import check_finite
from adagrow.files import save_state
from adagrow.packed import codes_per_word, padded_k
from adagrow.schema import MODULE_PATH, check, field_name, input_shape, int_list, integer, record
from adagrow.stored import StoredTensor, check_against_header, on_meta, parse_json, read_header

from .groups import GROUP_MODES
from .layer import geometry, set_module
from .order import ORDERS
from .qmodules import SCALE_DTYPES, QuantLayer, quant_layer_from_meta
from .server_formats import guard_save_pretrained, shared_aliases

FORMAT = "adagrow-quantized"
_MODULE_PATH = re.compile(MODULE_PATH)
FORMAT_VERSION = 2  # 2: the architecture is {"name", "args"} (version 1 named a builder function)

_BIG = 1 << 24
_CONV_FIELDS = ("groups", "in_channels", "kernel_size", "stride", "padding", "dilation")
_LAYER = {
    **record({"kind": {"enum": ["linear", "conv"]}, "out_features": integer(1, _BIG), "k": integer(1, _BIG),
              "bits": integer(2, 8),
              "group_size": {"anyOf": [{"type": "integer", "const": -1},
                                       {"type": "integer", "minimum": 8, "maximum": _BIG, "multipleOf": 8},
                                       {"enum": list(GROUP_MODES)}]},
              "sym": {"type": "boolean"}, "order": {"enum": list(ORDERS)}, "n_groups": integer(1, _BIG),
              "scale_dtype": {"enum": list(SCALE_DTYPES)}, "bias": {"type": "boolean"},
              "groups": integer(1, _BIG), "in_channels": integer(1, _BIG), "kernel_size": int_list(1, 1024, 2, 2),
              "stride": int_list(1, 1024, 2, 2), "padding": int_list(0, 1024, 2, 2),
              "dilation": int_list(1, 1024, 2, 2)}, optional=_CONV_FIELDS),
    "if": {"properties": {"kind": {"const": "conv"}}},
    "then": {"required": list(_CONV_FIELDS)},
}
_META = record({"format": {"const": FORMAT}, "format_version": integer(1, FORMAT_VERSION),
                "adagrow_version": {"type": "string"}, "config": {"type": ["object", "null"]},
                "layers": {"type": "object", "minProperties": 1, "maxProperties": 100_000},  # records: _assemble
                "report": {"type": "object"}, "arch": {"type": ["object", "null"]}, "deploy": {"type": "boolean"},
                "input_shape": input_shape()},
               optional=("adagrow_version", "config", "report", "input_shape"))


def save_quantized(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a quantized model atomically (temp file + rename). Refuses to replace an existing
    file unless ``overwrite=True``, and refuses a model with NaN/inf tensors. Returns the path."""
    path = Path(path)
    meta = quantized_meta(model)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    state = model.state_dict()
    state = {k: v for k, v in state.items() if k not in shared_aliases(state)}  # tied weights once
    check_finite(state, f"save_quantized({path})")
    return save_state(path, state, meta, overwrite)


def quantized_meta(model: nn.Module) -> dict[str, Any]:
    """The file metadata :func:`save_quantized` records (stored under the header key ``adagrow``)."""
    layers = {n: m.meta for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    if not layers:
        raise ValueError("save_quantized: the model has no quantized layers; run quantize() first")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "adagrow_version": __version__,
            "config": getattr(model, "adagrow_quant", {}).get("config"), "layers": layers,
            "report": getattr(model, "adagrow_quant", {}).get("layers", {}),
            "arch": model.adagrow_arch() if hasattr(model, "adagrow_arch") else hf_record(model),
            "deploy": bool(getattr(model, "adagrow_deploy", False)),
            "input_shape": getattr(model, "adagrow_input_shape", None)}


def _read(path: Path) -> tuple[dict[str, StoredTensor], dict[str, Any]]:
    """The tensor table and the adagrow metadata (format and version checked, fields not yet)."""
    if not path.is_file():
        raise FileNotFoundError(f"quantized checkpoint not found: {path}")
    table, header = read_header(path)
    if "adagrow" not in header:
        raise ValueError(f"{path}: safetensors file without adagrow metadata (not saved by save_quantized)")
    meta = parse_json(header["adagrow"], str(path), "adagrow metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: field format: unknown format {fmt!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ValueError(f"{path}: field format_version: {version} is newer than this adagrow supports "
                         f"({FORMAT_VERSION}); upgrade adagrow")
    check(meta, _META, str(path), "metadata")
    return table, meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The adagrow metadata of a quantized checkpoint, checked field by field (``ValueError``
    naming the file and the field for anything missing, mistyped or out of range). Reads the
    header only, bounded in size and nesting (:mod:`adagrow.stored`)."""
    path = Path(path)
    meta = _read(path)[1]
    for name, lmeta in meta["layers"].items():
        if not _MODULE_PATH.match(name):
            raise ValueError(f"{path}: field metadata.layers: {name!r} does not match {MODULE_PATH!r}")
        check(lmeta, _LAYER, str(path), field_name("layers", [name]))
    return meta


def _build_arch(arch: dict[str, Any] | None, deploy: bool, path: Path) -> nn.Module:
    if arch is None:
        raise ValueError(f"{path}: field arch: the checkpoint records no architecture (the model has no "
                         "adagrow_arch()); pass model= with a float model of the same architecture")
    return build_arch(arch, str(path), deploy=deploy).eval()


def _check_layer(path: Path, name: str, lmeta: dict[str, Any], layer: nn.Module) -> None:
    """The layer metadata must describe the model's layer exactly and a valid group layout."""
    field = field_name("layers", [name])
    try:
        geo = layer.geo if isinstance(layer, QuantLayer) else geometry(layer, name)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: field {field}: the model's layer cannot be quantized: {exc}") from exc
    expected = {**geo.meta(), "bias": layer.bias is not None}
    for key, value in expected.items():
        if lmeta.get(key) != value:
            raise ValueError(f"{path}: field {field}.{key}: {lmeta.get(key)!r} in the file, but the model's "
                             f"layer has {value!r} ({geo.kind} {geo.out_features}x{geo.k})")
    for key in _CONV_FIELDS:
        if key in lmeta and key not in expected:
            raise ValueError(f"{path}: field {field}.{key}: a {geo.kind} layer has no {key}")
    gs, kk = lmeta["group_size"], geo.kernel_size[0] * geo.kernel_size[1]
    if isinstance(gs, str) and geo.kind != "conv":
        raise ValueError(f"{path}: field {field}.group_size: {gs!r} groups kernel positions; a Linear layer "
                         "has none")
    if gs == "tier":  # one group per overlap tier: at most one per kernel position
        fits = lmeta["n_groups"] <= kk
    else:
        fits = lmeta["n_groups"] == (kk if gs == "position" else 1 if gs == -1 else padded_k(geo.k, gs) // gs)
    if not fits:
        raise ValueError(f"{path}: field {field}.n_groups: {lmeta['n_groups']} does not fit group_size {gs!r} "
                         f"of a layer with K={geo.k} and kernel {list(geo.kernel_size)}")


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], qlayers: dict[str, QuantLayer]) -> None:
    """Tensors (whose names, shapes and dtypes :func:`check_against_header` compared) are finite,
    and the group parameters are valid for their metadata."""
    check_finite(tensors, str(path))
    for name, q in qlayers.items():
        scales, zeros = tensors[f"{name}.scales"], tensors[f"{name}.zeros"]
        if not bool((scales != 0).all()):  # negative scales are valid (signed symmetric grids)
            raise ValueError(f"{path}: tensor {name + '.scales'!r} has zero scales")
        if not bool(((zeros >= 0) & (zeros <= 2**q.bits - 1) & (zeros == zeros.round())).all()):
            raise ValueError(f"{path}: tensor {name + '.zeros'!r} holds zero points that are not integers in "
                             f"0..{2**q.bits - 1} (bits={q.bits})")
        per = codes_per_word(q.bits)
        width = 32 // per
        high = sum(((1 << width) - (1 << q.bits)) << (i * width) for i in range(per))  # bits above a code
        if high and bool((tensors[f"{name}.qweight"] & torch.tensor(high - (1 << 32) if high >= 1 << 31 else high,
                                                                     dtype=torch.int32)).any()):
            raise ValueError(f"{path}: tensor {name + '.qweight'!r} holds codes outside 0..{2**q.bits - 1} "
                             f"(bits={q.bits})")
        pg = tensors.get(f"{name}.position_group")
        if pg is not None and not bool(((pg >= 0) & (pg < q.meta["n_groups"])).all()):
            raise ValueError(f"{path}: tensor {name + '.position_group'!r} points outside the "
                             f"{q.meta['n_groups']} scale rows")
        if pg is not None and q.group_size == "position" and not torch.equal(pg.cpu(), torch.arange(
                pg.numel(), dtype=torch.int32)):
            raise ValueError(f"{path}: tensor {name + '.position_group'!r} is not one group per position")


def _assemble(path: Path, meta: dict[str, Any], model: nn.Module | None,
              table: dict[str, StoredTensor]) -> tuple[nn.Module, dict[str, QuantLayer]]:
    """The quantized model the metadata describes (on the current default device), its layers
    checked against the model's and its state dict against the file's tensor table."""
    qmodel = copy.deepcopy(model).eval() if model is not None else _build_arch(meta["arch"], meta["deploy"], path)
    if model is None:  # a rebuilt model computes in the dtype of its stored float (unquantized) tensors
        kept = {t.dtype for k, t in table.items()
                if t.dtype.is_floating_point and k.rpartition(".")[0] not in meta["layers"]}
        if len(kept) == 1 and kept != {torch.float32}:
            qmodel = qmodel.to(kept.pop())
    modules = dict(qmodel.named_modules())
    for name in meta["layers"]:  # names first: thousands of bogus records cost one lookup each
        if not _MODULE_PATH.match(name):
            raise ValueError(f"{path}: field metadata.layers: {name!r} does not match {MODULE_PATH!r}")
        if name not in modules:
            raise ValueError(f"{path}: field {field_name('layers', [name])}: no such layer in the model")
    qlayers = {}
    for name, lmeta in meta["layers"].items():
        check(lmeta, _LAYER, str(path), field_name("layers", [name]))
        _check_layer(path, name, lmeta, modules[name])
        qlayers[name] = quant_layer_from_meta(lmeta)
        set_module(qmodel, name, qlayers[name])
    check_against_header(path, table, qmodel)
    return qmodel, qlayers


def _device(path: Path, map_location: str | torch.device) -> torch.device:
    """``map_location`` as a device this machine has (``ValueError`` naming it otherwise)."""
    try:
        device = torch.device(map_location)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError) as exc:
        raise ValueError(f"{path}: map_location={str(map_location)!r} is not available on this machine: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return device


def load_quantized(path: str | os.PathLike, model: nn.Module | None = None,
                   map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a quantized model saved by :func:`save_quantized`.

    ``model`` (optional) is a float model of the same architecture; its quantized layers are
    replaced. Without it, the registered architecture recorded in the file is rebuilt: first on
    the ``meta`` device, compared with the file's tensor table (so a record describing more than
    the file stores is refused before anything is allocated), then for real.
    """
    path = Path(path)
    table, meta = _read(path)
    device = _device(path, map_location)
    if model is None:
        with on_meta(table):
            _assemble(path, meta, None, table)
    qmodel, qlayers = _assemble(path, meta, model, table)
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as exc:
        raise ValueError(f"{path}: tensor data is unreadable (truncated or corrupt): {exc}") from exc
    for key, src in shared_aliases(qmodel.state_dict()).items():  # tied weights are stored once
        if key not in tensors and src in tensors:
            tensors[key] = tensors[src]
    _check_tensors(path, tensors, qlayers)
    qmodel.load_state_dict(tensors, strict=True)
    qmodel.adagrow_quant = {"config": meta.get("config"), "layers": meta.get("report", {})}
    qmodel.adagrow_input_shape = meta.get("input_shape")
    guard_save_pretrained(qmodel)
    return qmodel.to(device)


__all__ = ["save_quantized", "quantized_meta", "load_quantized", "read_metadata", "FORMAT", "FORMAT_VERSION"]
