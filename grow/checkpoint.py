"""Grown-model checkpoints: safetensors + the architecture record, rebuilt without training code."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from adagrow.archs import build_arch, grown_record
from adagrow.checks import check_finite
from adagrow.files import save_state
from adagrow.schema import check, input_shape
from adagrow.stored import check_against_header, on_meta, parse_json, read_header

from .cnn import GrowingCNN
from .reparam import RepConv2d, reparameterize
from .transformer import GrowingTransformer

FORMAT = "adagrow-grown"
VERSION = 1  # the grown-checkpoint layout this adagrow writes and reads


def build_from_arch(arch: dict[str, Any]) -> nn.Module:
    """A freshly initialised model with exactly the recorded structure."""
    if arch.get("type") == "cnn":
        model = GrowingCNN(arch["family"], tuple(arch["widths"]), arch["in_channels"], arch["num_classes"],
                           tuple(arch["depths"]))
        for name, rec in arch["convs"].items():
            old = model.get_submodule(name)
            if not isinstance(old, RepConv2d):
                raise ValueError(f"architecture record names {name!r}, which is not a RepConv2d")
            new = RepConv2d(old.in_channels, old.out_channels, tuple(rec["kernel_size"]), old.stride, old.groups,
                            branches=rec["branches"])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        return model
    if arch.get("type") == "transformer":
        kw = {k: v for k, v in arch.items() if k not in ("type", "layer_heads")}
        kw["depth"] = len(arch["layer_heads"])
        return GrowingTransformer(**kw, layer_heads=arch["layer_heads"])
    raise ValueError(f"unknown architecture record type {arch.get('type')!r}")


def save_grown(model: GrowingCNN | GrowingTransformer, path: str | os.PathLike, overwrite: bool = False,
               deploy: bool = False) -> Path:
    """Write weights and architecture atomically; refuses to replace a file without ``overwrite``.

    ``deploy=True`` stores the reparameterized (fused) weights; :func:`load_grown` then returns
    the deploy form directly.
    """
    if not callable(getattr(model, "arch", None)) or not callable(getattr(model, "spec", None)):
        raise TypeError(f"save_grown() takes a grown model (GrowingCNN / GrowingTransformer), got "
                        f"{type(model).__name__}; save other models with save_quantized or torch.save")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    meta = {"format": FORMAT, "version": VERSION, "arch": model.arch(), "spec": model.spec(), "deploy": deploy,
            "input_shape": getattr(model, "adagrow_input_shape", None)}
    return save_state(path, (reparameterize(model.eval()) if deploy else model).state_dict(), meta, overwrite)


def load_grown(path: str | os.PathLike) -> nn.Module:
    """Rebuild a grown model (eval mode; the deploy form if it was saved so) from :func:`save_grown`.

    The header alone is read first (bounded, :mod:`adagrow.stored`); the recorded architecture is
    built on the ``meta`` device and compared with the file's tensor table, so a record describing
    more than the file stores is refused before anything is allocated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found (a grown or deploy model from adagrow grow / reparam): {path}")
    table, header = read_header(path)
    meta = parse_json(header.get("adagrow", "{}"), str(path), "adagrow metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a grown-model checkpoint (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("version")
    if type(version) is not int or not 1 <= version <= VERSION:
        raise ValueError(f"{path}: field version: {version!r} is not a grown-checkpoint version this adagrow "
                         f"reads (1..{VERSION})" + ("; upgrade adagrow" if type(version) is int and version > VERSION
                                                    else ""))
    check(meta.get("input_shape"), input_shape(), str(path), "input_shape")

    def build() -> nn.Module:
        model = build_arch(grown_record(meta.get("arch")), str(path), args_root="arch")
        return reparameterize(model.eval()) if meta.get("deploy") else model

    with on_meta(table):
        check_against_header(path, table, build())
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a readable grown checkpoint (truncated or corrupt): {exc}") from exc
    check_finite(tensors, str(path))
    model = build()
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match the recorded architecture: {exc}") from exc
    model.adagrow_input_shape = meta.get("input_shape")  # [C, H, W] it was trained on, or None
    return model.eval()


def load_deploy(path: str | os.PathLike) -> nn.Module:
    """The deploy form (every RepConv2d fused) of a grown checkpoint, whichever form it holds."""
    model = load_grown(path)
    return model if getattr(model, "adagrow_deploy", False) else reparameterize(model)
