"""Architecture records are data: a registered name plus arguments checked against a schema.

A checkpoint records ``{"name": "vgg", "args": {...}}``. Loading looks the name up in the
registry :data:`ARCHITECTURES`, checks every argument's type and range against the entry's JSON
schema, and only then calls the builder. Nothing read from a file can add an entry or name a
module or function.

This module is the core layer's meeting point (docs/design.md §1): model families register their
entries with :func:`register` from their own package (``adagrow.grow.archs`` registers the grown
CNN / Transformer families), and the loaders in ``adagrow.compress`` and ``adagrow.grow`` build
through it, so neither imports the other. The names a provider registers are listed in
:data:`PROVIDERS`, a fixed table in code; :func:`lookup` imports the provider of a name on first use.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .schema import check, record


@dataclass(frozen=True)
class Architecture:
    """A buildable architecture: ``build(args) -> nn.Module`` (the train-time form), the JSON
    schema of ``args``, and optionally ``deploy(model) -> nn.Module`` (the inference form, e.g.
    every re-parameterizable block fused)."""

    build: Callable[[dict[str, Any]], nn.Module]
    schema: dict[str, Any]
    doc: str
    deploy: Callable[[nn.Module], nn.Module] | None = None


ARCHITECTURES: dict[str, Architecture] = {}

# provider module -> the names it registers when imported (a fixed table: never read from a file)
PROVIDERS: dict[str, tuple[str, ...]] = {
    "adagrow.grow.archs": ("repcnn", "tinyvit", "vgg", "resnet", "bottleneck", "mobilenetv3", "transformer"),
}
_PROVIDER_OF = {name: module for module, names in PROVIDERS.items() for name in names}


def register(name: str, arch: Architecture) -> None:
    """Add ``arch`` under ``name``; a name is registered once (re-registering the same entry is a
    no-op, a different one is an error)."""
    if ARCHITECTURES.get(name, arch) != arch:
        raise ValueError(f"architecture {name!r} is already registered")
    ARCHITECTURES[name] = arch


def names() -> list[str]:
    """Every architecture name a record may use (registered or provided on first use)."""
    return sorted({*ARCHITECTURES, *_PROVIDER_OF})


def lookup(name: str) -> Architecture:
    """The entry of ``name``, importing its provider from :data:`PROVIDERS` if needed."""
    if name not in ARCHITECTURES and name in _PROVIDER_OF:
        importlib.import_module(_PROVIDER_OF[name])
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {names()}")
    return ARCHITECTURES[name]


# Hugging Face transformers models: a built-in model_type, a task naming one of transformers' own
# auto classes (a fixed table here), and the config's fields as data. trust_remote_code is never
# passed; auto_map (remote code) is dropped at save and ignored at load; trust_remote_code and
# nested quantization are refused; attn_implementation names a built-in kernel (HF_ATTENTION).
HF_TASKS = ("base", "causal-lm", "masked-lm", "sequence-classification")
HF_MAX_PARAMS = 20_000_000_000
_HF_DROP = ("model_type", "transformers_version", "quantization_config", "_name_or_path", "auto_map")
HF_ATTENTION = (None, "eager", "sdpa")  # attn_implementation: transformers' built-in kernels only (no Hub repos)
_HF = record({"model_type": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_-]{0,63}$"},
              "task": {"enum": list(HF_TASKS)},
              "config": {"type": "object", "maxProperties": 1000,
                         "properties": {"attn_implementation": {"enum": list(HF_ATTENTION)},
                                        "_attn_implementation": {"enum": list(HF_ATTENTION)}},
                         "propertyNames": {"pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
                                           "not": {"enum": ["trust_remote_code",
                                                            *(k for k in _HF_DROP if k != "auto_map")]}}}})


def _hf_auto(task: str) -> Any:
    import transformers
    return {"base": transformers.AutoModel, "causal-lm": transformers.AutoModelForCausalLM,
            "masked-lm": transformers.AutoModelForMaskedLM,
            "sequence-classification": transformers.AutoModelForSequenceClassification}[task]


def _hf(args: dict[str, Any]) -> nn.Module:
    import torch
    import transformers
    fields = {k: v for k, v in args["config"].items() if k != "auto_map"}  # remote code: dropped, as at save
    config = transformers.AutoConfig.for_model(args["model_type"], **fields)
    auto = _hf_auto(args["task"])
    with torch.device("meta"):  # size check before allocating anything
        n = sum(p.numel() for p in auto.from_config(config).parameters())
    if n > HF_MAX_PARAMS:
        raise ValueError(f"the config describes {n:,} parameters, more than {HF_MAX_PARAMS:,}")
    return auto.from_config(config)


def hf_record(model: nn.Module) -> dict[str, Any] | None:
    """The ``{"name": "hf", ...}`` record of a transformers model (None for any other model, or a
    transformers class no auto class of :data:`HF_TASKS` builds)."""
    if not type(model).__module__.startswith("transformers.") or not hasattr(model, "config"):
        return None
    from transformers.models.auto import modeling_auto as ma
    names = {"base": ma.MODEL_MAPPING_NAMES, "causal-lm": ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
             "masked-lm": ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
             "sequence-classification": ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES}
    model_type = model.config.model_type
    for task in HF_TASKS:
        if names[task].get(model_type) == type(model).__name__:
            config = {k: v for k, v in model.config.to_dict().items() if k not in _HF_DROP}
            return {"name": "hf", "args": {"model_type": model_type, "task": task, "config": config}}
    return None


register("hf", Architecture(_hf, _HF, "transformers AutoConfig.for_model(model_type, **config) + Auto<task>.from_config"))


def grown_record(arch: Any) -> Any:
    """The record of a grown checkpoint's ``arch`` (``GrowingCNN.arch()`` / ``GrowingTransformer.arch()``):
    CNNs are named by their family, transformers ``"transformer"``; anything else is returned
    unchanged for :func:`validate_arch` to refuse."""
    if isinstance(arch, dict) and arch.get("type") == "cnn" and isinstance(arch.get("family"), str):
        return {"name": arch["family"], "args": {k: v for k, v in arch.items() if k not in ("type", "family")}}
    if isinstance(arch, dict) and arch.get("type") == "transformer":
        return {"name": "transformer", "args": {k: v for k, v in arch.items() if k != "type"}}
    return arch


def validate_arch(arch: Any, where: str, root: str = "arch",
                  args_root: str | None = None) -> tuple[str, dict[str, Any]]:
    """Check an architecture record ``{"name": ..., "args": {...}}``; returns ``(name, args)``.

    Raises ``ValueError`` naming ``where`` (the file) and the field for an unknown name, any other
    key (such as an import path), a missing, extra or mistyped argument or a value out of range.
    Errors call the record ``root`` and its arguments ``args_root`` (default ``<root>.args``).
    """
    check(arch, record({"name": {"enum": names()}, "args": {"type": "object"}}), where, root)
    name = arch["name"]
    check(arch["args"], lookup(name).schema, where, args_root or f"{root}.args")
    return name, arch["args"]


def build_arch(arch: Any, where: str, root: str = "arch", args_root: str | None = None,
               deploy: bool = False) -> nn.Module:
    """The freshly initialised model an architecture record describes (see :func:`validate_arch`);
    with ``deploy=True`` its inference form (the entry's ``deploy``, e.g. branches fused)."""
    name, args = validate_arch(arch, where, root, args_root)
    entry = lookup(name)
    if deploy and entry.deploy is None:
        raise ValueError(f"{where}: field {root}: architecture {name!r} has no deploy form")
    try:
        model = entry.build(args)
        return entry.deploy(model.eval()) if deploy else model
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise ValueError(f"{where}: field {args_root or root + '.args'}: architecture {name!r} cannot be built from "
                         f"these arguments: {exc}") from exc


__all__ = ["Architecture", "ARCHITECTURES", "PROVIDERS", "register", "lookup", "names", "validate_arch", "build_arch", "grown_record", "hf_record"]
