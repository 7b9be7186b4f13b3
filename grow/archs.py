"""The grown model families' architecture records (docs/design.md §1): schemas and builders of
``RepCNN``, ``TinyViT``, the grown CNN families and the grown Transformer, registered into the
core registry :mod:`adagrow.archs` so that loaders build them without importing this package."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from adagrow.archs import Architecture, register
from adagrow.schema import MODULE_PATH, int_list, integer, record

from .checkpoint import build_from_arch
from .nets import RepCNN, TinyViT
from .reparam import reparameterize

MAX_CHANNELS = 8192
MAX_CLASSES = 1_000_000
MAX_DEPTH = 256
_CH = integer(1, MAX_CHANNELS)
_ODD_KERNEL = {**integer(1, 31), "not": {"multipleOf": 2}}
_BRANCH = {"type": "string", "maxLength": 32,
           "pattern": r"^(bn|(conv|avg)[1-9][0-9]?x[1-9][0-9]?|conv1x1-conv[1-9][0-9]?x[1-9][0-9]?)$"}
_BRANCHES = {"type": "array", "items": _BRANCH, "minItems": 1, "maxItems": 64}


def _repcnn(args: dict[str, Any]) -> nn.Module:
    return RepCNN(**{**args, "widths": tuple(args["widths"]), "branches": tuple(args["branches"])})


def _tinyvit(args: dict[str, Any]) -> nn.Module:
    return TinyViT(**args)


def _grown_cnn(family: str) -> Callable[[dict[str, Any]], nn.Module]:
    def build(args: dict[str, Any]) -> nn.Module:
        return build_from_arch({"type": "cnn", "family": family, **args})
    return build


def _transformer(args: dict[str, Any]) -> nn.Module:
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


def _entry(build: Callable[[dict[str, Any]], nn.Module], schema: dict[str, Any], doc: str) -> Architecture:
    return Architecture(build, schema, doc, deploy=reparameterize)


register("repcnn", _entry(_repcnn, _REPCNN, "adagrow.grow.nets.RepCNN"))
register("tinyvit", _entry(_tinyvit, _TINYVIT, "adagrow.grow.nets.TinyViT"))
for _family in ("vgg", "resnet", "bottleneck", "mobilenetv3"):
    register(_family, _entry(_grown_cnn(_family), _GROWN_CNN, f"adagrow.grow.cnn.GrowingCNN({_family!r})"))
register("transformer", _entry(_transformer, _TRANSFORMER, "adagrow.grow.transformer.GrowingTransformer"))
