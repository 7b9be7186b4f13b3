"""Architecture records are data: a registered name plus arguments checked against a schema.

A checkpoint records ``{"name": "vgg", "args": {...}}``. Loading looks the name up in
:data:`ARCHITECTURES` (a static table written in code; nothing read from a file can add to it or
name a module/function), checks every argument's type and range, and only then calls the
builder. Builders import their model code lazily, so ``adagrow.compress`` imports alone.

To support a new architecture, add an :class:`Architecture` entry to :data:`ARCHITECTURES`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .schema import MODULE_PATH, check, int_list, integer, record

MAX_CHANNELS = 8192
MAX_CLASSES = 1_000_000
MAX_DEPTH = 256
_CH = integer(1, MAX_CHANNELS)
_ODD_KERNEL = {**integer(1, 31), "not": {"multipleOf": 2}}
_BRANCH = {"type": "string", "maxLength": 32,
           "pattern": r"^(bn|(conv|avg)[1-9][0-9]?x[1-9][0-9]?|conv1x1-conv[1-9][0-9]?x[1-9][0-9]?)$"}
_BRANCHES = {"type": "array", "items": _BRANCH, "minItems": 1, "maxItems": 64}


@dataclass(frozen=True)
class Architecture:
    """A buildable architecture: ``build(args) -> nn.Module`` and the JSON schema of ``args``."""

    build: Callable[[dict[str, Any]], nn.Module]
    schema: dict[str, Any]
    doc: str


def _repcnn(args: dict[str, Any]) -> nn.Module:
    from adagrow.grow.nets import RepCNN
    return RepCNN(**{**args, "widths": tuple(args["widths"]), "branches": tuple(args["branches"])})


def _tinyvit(args: dict[str, Any]) -> nn.Module:
    from adagrow.grow.nets import TinyViT
    return TinyViT(**args)


def _grown_cnn(family: str) -> Callable[[dict[str, Any]], nn.Module]:
    def build(args: dict[str, Any]) -> nn.Module:
        from adagrow.grow.checkpoint import build_from_arch
        return build_from_arch({"type": "cnn", "family": family, **args})
    return build


# Hugging Face transformers models: a built-in model_type, a task naming one of transformers' own
# auto classes (a fixed table here), and the config's fields as data. trust_remote_code is never
# passed, and keys that would reach remote code or nested quantization are refused.
HF_TASKS = ("base", "causal-lm", "masked-lm", "sequence-classification")
HF_MAX_PARAMS = 20_000_000_000
_HF_DROP = ("model_type", "transformers_version", "quantization_config", "_name_or_path")
_HF = record({"model_type": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_-]{0,63}$"},
              "task": {"enum": list(HF_TASKS)},
              "config": {"type": "object", "maxProperties": 1000,
                         "propertyNames": {"pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
                                           "not": {"enum": ["auto_map", "trust_remote_code", *_HF_DROP]}}}})


def _hf_auto(task: str) -> Any:
    import transformers
    return {"base": transformers.AutoModel, "causal-lm": transformers.AutoModelForCausalLM,
            "masked-lm": transformers.AutoModelForMaskedLM,
            "sequence-classification": transformers.AutoModelForSequenceClassification}[task]


def _hf(args: dict[str, Any]) -> nn.Module:
    import torch
    import transformers
    config = transformers.AutoConfig.for_model(args["model_type"], **args["config"])
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


def _transformer(args: dict[str, Any]) -> nn.Module:
    from adagrow.grow.checkpoint import build_from_arch
    return build_from_arch({"type": "transformer", **args})


_REPCNN = record({"in_channels": _CH, "num_classes": integer(1, MAX_CLASSES),
                  "widths": int_list(1, MAX_CHANNELS, 1, 8), "depth": integer(0, MAX_DEPTH),
                  "kernel_size": _ODD_KERNEL, "stem_width": _CH, "branches": _BRANCHES})
_TINYVIT = record({"img_size": integer(1, 4096), "patch": integer(1, 256), "in_channels": _CH,
                   "num_classes": integer(1, MAX_CLASSES), "dim": _CH, "depth": integer(0, MAX_DEPTH),
                   "heads": integer(1, 1024), "mlp_ratio": integer(1, 64)})
# grow/cnn.py GrowingCNN.arch() without "type"/"family" (the family is the record's name)
_GROWN_CNN = record({
    "widths": int_list(1, MAX_CHANNELS, 3, 4), "in_channels": _CH, "num_classes": integer(1, MAX_CLASSES),
    "depths": int_list(0, MAX_DEPTH, 3, 4),
    "convs": {"type": "object", "maxProperties": 100_000, "propertyNames": {"pattern": MODULE_PATH},
              "additionalProperties": record({"kernel_size": {"type": "array", "items": _ODD_KERNEL,
                                                              "minItems": 2, "maxItems": 2},
                                              "branches": _BRANCHES})}})
# grow/transformer.py GrowingTransformer.arch() without "type"; depth and heads are the starting
# values (the built model has one layer per layer_heads entry)
_TRANSFORMER = record({
    "kind": {"enum": ["vit", "bert"]}, "dim": _CH, "head_dim": integer(1, 1024), "heads": integer(1, 1024),
    "depth": integer(1, MAX_DEPTH), "mlp_per_head": integer(1, 65536), "num_classes": integer(1, MAX_CLASSES),
    "img_size": integer(1, 4096), "patch": integer(1, 256), "in_channels": _CH,
    "vocab_size": integer(1, 10_000_000), "max_len": integer(1, 1 << 20),
    "layer_heads": int_list(1, 1024, 1, MAX_DEPTH)})

ARCHITECTURES: dict[str, Architecture] = {
    "repcnn": Architecture(_repcnn, _REPCNN, "adagrow.grow.nets.RepCNN"),
    "tinyvit": Architecture(_tinyvit, _TINYVIT, "adagrow.grow.nets.TinyViT"),
    **{family: Architecture(_grown_cnn(family), _GROWN_CNN, f"adagrow.grow.cnn.GrowingCNN({family!r})")
       for family in ("vgg", "resnet", "bottleneck", "mobilenetv3")},
    "transformer": Architecture(_transformer, _TRANSFORMER, "adagrow.grow.transformer.GrowingTransformer"),
    "hf": Architecture(_hf, _HF, "transformers AutoConfig.for_model(model_type, **config) + Auto<task>.from_config"),
}


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
    check(arch, record({"name": {"enum": sorted(ARCHITECTURES)}, "args": {"type": "object"}}), where, root)
    name = arch["name"]
    check(arch["args"], ARCHITECTURES[name].schema, where, args_root or f"{root}.args")
    return name, arch["args"]


def build_arch(arch: Any, where: str, root: str = "arch", args_root: str | None = None) -> nn.Module:
    """The freshly initialised model an architecture record describes (see :func:`validate_arch`)."""
    name, args = validate_arch(arch, where, root, args_root)
    try:
        return ARCHITECTURES[name].build(args)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise ValueError(f"{where}: field {args_root or root + '.args'}: architecture {name!r} cannot be built from "
                         f"these arguments: {exc}") from exc


__all__ = ["Architecture", "ARCHITECTURES", "validate_arch", "build_arch", "grown_record", "hf_record"]
