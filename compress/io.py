"""Quantized checkpoints: one safetensors file whose header carries JSON metadata
(format version, config, per-layer shapes/bits/groups, and how to rebuild the architecture)."""
from __future__ import annotations

import copy
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from adagrow import __version__
from adagrow.files import save_state

from .layer import geometry, set_module
from .qmodules import _QuantLayer, quant_layer_from_meta

FORMAT = "adagrow-quantized"
FORMAT_VERSION = 1


def save_quantized(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a quantized model atomically (temp file + rename). Refuses to replace an existing
    file unless ``overwrite=True``. Returns the path written."""
    path = Path(path)
    layers = {n: m.meta for n, m in model.named_modules() if isinstance(m, _QuantLayer)}
    if not layers:
        raise ValueError("save_quantized: the model has no quantized layers; run quantize() first")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    arch = model.adagrow_arch() if hasattr(model, "adagrow_arch") else None
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "adagrow_version": __version__,
            "config": getattr(model, "adagrow_quant", {}).get("config"), "layers": layers,
            "report": getattr(model, "adagrow_quant", {}).get("layers", {}),
            "arch": arch, "deploy": bool(getattr(model, "adagrow_deploy", False))}
    return save_state(path, model.state_dict(), meta)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The adagrow metadata of a quantized checkpoint, with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quantized checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # safetensors raises several types for damaged headers
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt): {exc}") from exc
    if "adagrow" not in header:
        raise ValueError(f"{path}: safetensors file without adagrow metadata (not saved by save_quantized)")
    try:
        meta = json.loads(header["adagrow"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: adagrow metadata is not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {meta['format_version']} is newer than this adagrow "
                         f"supports ({FORMAT_VERSION}); upgrade adagrow")
    return meta


def _build_arch(arch: dict[str, Any] | None, deploy: bool, path: Path) -> nn.Module:
    if not arch:
        raise ValueError(f"{path}: the checkpoint records no architecture (the model has no "
                         "adagrow_arch()); pass model= with a float model of the same architecture")
    builder = arch.get("builder", "")
    if not builder.startswith("adagrow.") or ":" not in builder:
        raise ValueError(f"{path}: architecture builder {builder!r} is not an adagrow builder")
    mod_name, _, attr = builder.partition(":")
    model = getattr(importlib.import_module(mod_name), attr)(**arch.get("kwargs", {})).eval()
    if deploy:
        from adagrow.grow.reparam import reparameterize
        model = reparameterize(model)
    return model


def load_quantized(path: str | os.PathLike, model: nn.Module | None = None,
                   map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a quantized model saved by :func:`save_quantized`.

    ``model`` (optional) is a float model of the same architecture; its quantized layers are
    replaced. Without it, the architecture recorded in the file is rebuilt.
    """
    path = Path(path)
    meta = read_metadata(path)
    qmodel = copy.deepcopy(model).eval() if model is not None else _build_arch(meta.get("arch"), meta.get("deploy", False), path)
    for name, lmeta in meta["layers"].items():
        try:
            layer = qmodel.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{path}: quantized layer {name!r} does not exist in the model") from exc
        if not isinstance(layer, _QuantLayer):
            geo = geometry(layer, name)
            if geo.kind != lmeta["kind"] or geo.out_features != lmeta["out_features"] or geo.k != lmeta["k"]:
                raise ValueError(f"{path}: layer {name!r} is {geo.kind} {geo.out_features}x{geo.k} in the "
                                 f"model but {lmeta['kind']} {lmeta['out_features']}x{lmeta['k']} in the file")
        set_module(qmodel, name, quant_layer_from_meta(lmeta))
    try:
        tensors = load_file(str(path), device=str(map_location))
    except Exception as exc:
        raise ValueError(f"{path}: tensor data is unreadable (truncated or corrupt): {exc}") from exc
    try:
        qmodel.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: tensors do not match the model: {exc}") from exc
    qmodel.adagrow_quant = {"config": meta.get("config"), "layers": meta.get("report", {})}
    return qmodel.to(map_location)
