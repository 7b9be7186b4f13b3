"""Checkpoints that inference servers load (docs/design.md §7 "Server checkpoints"), for Linear-only
quantized Hugging Face models: a ``save_pretrained``-style folder (``config.json`` with a
``quantization_config``, ``model.safetensors``) in one of two layouts.

- ``"compressed-tensors"`` (``pack-quantized``, what vLLM loads natively and llm-compressor
  writes): per layer ``weight_packed`` int32 ``[N, ceil(K*bits/32)]`` (codes ``q`` of the
  ``[N, K]`` weight packed densely along K, element k at bit ``k*bits``), ``weight_scale``
  ``[N, n_groups]``, ``weight_shape`` ``[2]`` and, asymmetric only, ``weight_zero_point`` int32
  ``[ceil(N*bits/32), n_groups]`` (``z - 2^(bits-1)`` packed the same way along N). The weight is
  ``(q - z) * s`` exactly as ours (compressed-tensors keeps codes and zeros signed, offset by
  ``2^(bits-1)``, which cancels).
- ``"gptq"`` (GPTQ v1): ``qweight`` int32 ``[ceil(K*bits/32), N]`` (codes packed densely along K;
  for 4 and 8 bits bit-identical to our ``qweight``), ``qzeros`` int32 ``[n_groups, ceil(N*bits/32)]``
  (``z - 1`` packed along N, GPTQ v1's convention), ``scales`` fp16 ``[n_groups, N]``, ``g_idx``
  int32 ``[K]`` (``k // group_size``: static groups need no permutation), ``quantize_config.json``.

Conv layers with position / tier groups have no server-format equivalent: use
:func:`adagrow.compress.save_quantized` or the ONNX export for them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from adagrow.files import atomic_write, write_json
from adagrow.packed import unpack_codes

from .qmodules import QuantLinear, QuantLayer

FORMATS = ("compressed-tensors", "gptq")
WEIGHTS = "model.safetensors"


def pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[rows, cols]`` (values in ``[0, 2^bits)``) densely into int32 words
    along ``cols``: element j occupies bits ``j*bits ... j*bits+bits-1`` of the bit stream
    (lowest bit first; an element may straddle two words). Returns ``[rows, ceil(cols*bits/32)]``."""
    rows, cols = codes.shape
    words = -(-cols * bits // 32)
    out = torch.zeros(rows, words + 1, dtype=torch.int64)
    c = codes.to(torch.int64)
    if bool(((c < 0) | (c >= 2**bits)).any()):
        raise ValueError(f"codes outside [0, {2**bits}) cannot be packed in {bits} bits")
    start = torch.arange(cols) * bits
    word, shift = start // 32, start % 32
    for j in range(cols):  # scatter per column: ``cols`` is K or N, a few thousand at most
        out[:, word[j]] |= (c[:, j] << shift[j]) & 0xFFFFFFFF
        if shift[j] + bits > 32:
            out[:, word[j] + 1] |= c[:, j] >> (32 - shift[j])
    out = out[:, :words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_dense(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_dense`: int32 ``[rows, words]`` -> int64 codes ``[rows, cols]``."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=torch.int64)], 1)
    start = torch.arange(cols) * bits
    word, shift = start // 32, start % 32
    both = w[:, word] | (w[:, word + 1] << 32)  # 64-bit window holds any straddling element
    return (both >> shift) & (2**bits - 1)


POWERS_OF_TWO = (1024, 512, 256, 128, 64, 32, 16)


def whole_group_size(ks: Iterable[int], requested: int, fmt: str, explicit: bool = True) -> tuple[int, str | None]:
    """The group size to quantize with for ``fmt``, which needs whole groups along every K.

    ``requested`` is kept when it divides every K. Otherwise, when it was not given explicitly,
    the largest power of two below it that divides every K is chosen and a note says so; when it
    was (or nothing fits), ``ValueError`` lists the group sizes that would work. Call it before
    quantizing: the check needs only the layers' shapes.
    """
    ks = sorted(set(ks))
    bad = [k for k in ks if requested != -1 and k % requested]
    if not bad:
        return requested, None
    fits = [g for g in POWERS_OF_TWO if all(k % g == 0 for k in ks)]
    smaller = [g for g in fits if g < requested]
    if explicit or not smaller:
        raise ValueError(f"group size {requested} does not divide K={bad} of some layers, and {fmt} needs whole "
                         f"groups; group sizes that fit every layer: {fits + [-1]} (or adagrow's own format, "
                         "which pads the last group)")
    return smaller[0], (f"group size {smaller[0]}, not {requested}: {fmt} needs whole groups and K={bad} is not a "
                        f"multiple of {requested}")


def _linear_layers(qmodel: nn.Module, fmt: str) -> dict[str, QuantLinear]:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
    if not layers:
        raise ValueError("save_compressed: the model has no quantized layers; run quantize() first")
    convs = [n for n, m in layers.items() if not isinstance(m, QuantLinear)]
    if convs:
        raise ValueError(f"save_compressed({fmt!r}): quantized conv layers {convs[:3]} have no {fmt} layout "
                         "(server formats hold Linear layers only; position/tier conv groups exist only in "
                         "adagrow's format); use adagrow.compress.save_quantized(...) or export ONNX "
                         "(adagrow export --precision w4)")
    if not hasattr(qmodel, "config") or not hasattr(qmodel.config, "to_dict"):
        raise ValueError("save_compressed: the model has no Hugging Face config (model.config); server formats "
                         "are save_pretrained-style folders of transformers models. Use save_quantized for others")
    for gs in {m.group_size for m in layers.values()}:
        try:
            whole_group_size([m.geo.k for m in layers.values() if m.group_size == gs], gs, fmt)
        except ValueError as exc:
            raise ValueError(f"save_compressed: {exc}") from None
    return layers


def _codes(m: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``[N, K]`` int64, scales and integer zeros ``[n_groups, N]`` of a quantized Linear."""
    codes = unpack_codes(m.qweight.cpu(), m.bits)[:, : m.geo.k].to(torch.int64)
    return codes, m.scales.detach().cpu(), m.zeros.detach().cpu().round().to(torch.int64)


def _scheme(m: QuantLinear) -> tuple[int, int, bool]:
    return m.bits, m.group_size, bool(m.meta["sym"])


def _ct_tensors(name: str, m: QuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    codes, scales, zeros = _codes(m)
    half = 2 ** (m.bits - 1)
    out = {f"{name}.weight_packed": pack_dense(codes, m.bits),
           f"{name}.weight_scale": scales.t().to(dtype).contiguous(),
           f"{name}.weight_shape": torch.tensor([m.geo.out_features, m.geo.k])}
    if not m.meta["sym"]:  # compressed-tensors' signed zero point z - half, packed along N (offset by half)
        out[f"{name}.weight_zero_point"] = pack_dense(zeros, m.bits).t().contiguous()
    elif not bool((zeros == half).all()):
        raise ValueError(f"{name}: symmetric layer with zero points other than {half}")
    return out


def _gptq_tensors(name: str, m: QuantLinear) -> dict[str, torch.Tensor]:
    codes, scales, zeros = _codes(m)
    if bool((zeros == 0).any()):
        raise ValueError(f"save_compressed('gptq'): layer {name!r} has zero point 0, which GPTQ v1 (it stores "
                         "zero - 1) cannot hold; use format='compressed-tensors' or quantize with sym=True")
    fp16 = scales.to(torch.float16)
    if not torch.equal(fp16.to(scales.dtype), scales):
        raise ValueError(f"save_compressed('gptq'): layer {name!r} has {scales.dtype} scales that float16 (GPTQ's "
                         "scale dtype) cannot hold exactly; quantize with scale_dtype='float16'")
    gs = m.group_size if m.group_size != -1 else m.geo.k
    return {f"{name}.qweight": pack_dense(codes, m.bits).t().contiguous(),
            f"{name}.qzeros": pack_dense(zeros - 1, m.bits),
            f"{name}.scales": fp16.contiguous(),
            f"{name}.g_idx": (torch.arange(m.geo.k) // gs).to(torch.int32)}


def _ct_config(layers: dict[str, QuantLinear], floats: list[str]) -> dict[str, Any]:
    schemes: dict[tuple, list[str]] = {}
    for name, m in layers.items():
        schemes.setdefault(_scheme(m), []).append(name)
    groups = {}
    for i, ((bits, gs, sym), names) in enumerate(schemes.items()):
        targets = ["Linear"] if len(schemes) == 1 else [f"re:^{n.replace('.', '[.]')}$" for n in names]
        groups[f"group_{i}"] = {
            "targets": targets, "input_activations": None, "output_activations": None, "format": "pack-quantized",
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "group_size": None if gs == -1 else gs,
                        "strategy": "channel" if gs == -1 else "group", "dynamic": False, "actorder": None,
                        "observer": "minmax"}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": floats, "kv_cache_scheme": None, "global_compression_ratio": None}


def _gptq_config(layers: dict[str, QuantLinear], damp: float) -> dict[str, Any]:
    schemes = {_scheme(m) for m in layers.values()}
    if len(schemes) != 1:
        raise ValueError(f"save_compressed('gptq'): GPTQ v1 holds one (bits, group_size, sym) for the whole model, "
                         f"the model has {sorted(schemes, key=str)}; use format='compressed-tensors'")
    bits, gs, sym = schemes.pop()
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "group_size": gs, "sym": sym,
            "desc_act": False, "static_groups": False, "true_sequential": True, "damp_percent": damp}


def shared_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{key: earlier key}`` for tensors that share storage with an earlier one (tied weights,
    such as an LM head tied to the embedding): they are stored once and re-tied at load."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
        else:
            seen.setdefault(ident, key)
    return aliases


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied tensors (transformers re-ties them)."""
    aliases = shared_aliases(state)
    return {k: v for k, v in state.items() if k not in aliases}


def _tokenizer_files(tokenizer: Any, tmp: Path) -> list[str]:
    if tokenizer is None:
        return []
    tokenizer.save_pretrained(str(tmp))
    return sorted(p.name for p in tmp.iterdir() if p.is_file())


def save_compressed(qmodel: nn.Module, directory: str | os.PathLike, format: str = "compressed-tensors",
                    overwrite: bool = False, tokenizer: Any = None) -> Path:
    """Write a quantized Hugging Face model as a ``save_pretrained``-style folder servers load.

    Args:
        qmodel: a transformers model quantized by :func:`adagrow.compress.quantize` (Linear layers).
        directory: output folder (created). Each file is written atomically; existing files are
            refused unless ``overwrite=True``.
        format: ``"compressed-tensors"`` (pack-quantized; loads with ``AutoModel.from_pretrained``
            when compressed-tensors is installed, and in vLLM) or ``"gptq"`` (GPTQ v1).
        tokenizer: optional tokenizer saved alongside.

    Returns the folder.
    """
    from safetensors.torch import save_file
    layers = _linear_layers(qmodel, format)
    directory = Path(directory)
    floats = [n for n, m in qmodel.named_modules() if type(m) is nn.Linear]
    quant_cfg = getattr(qmodel, "adagrow_quant", {}).get("config") or {}
    state = dict(qmodel.state_dict())
    for name, m in layers.items():
        for key in ("qweight", "scales", "zeros"):
            del state[f"{name}.{key}"]
        dtype = m.bias.dtype if m.bias is not None else torch.float32
        state.update(_ct_tensors(name, m, dtype) if format == "compressed-tensors" else _gptq_tensors(name, m))
    state = {k: v.detach().cpu().contiguous() for k, v in _dedupe(state).items()}
    config = qmodel.config.to_dict()
    config.setdefault("architectures", None)
    config["architectures"] = config["architectures"] or [type(qmodel).__name__]
    if format == "compressed-tensors":
        config["quantization_config"] = _ct_config(layers, floats)
    else:
        config["quantization_config"] = _gptq_config(layers, float(quant_cfg.get("percdamp", 0.01)))
    with tempfile.TemporaryDirectory(dir=directory.parent if directory.parent.exists() else None) as tmp:
        tok = _tokenizer_files(tokenizer, Path(tmp))
        own = ["config.json", WEIGHTS] + (["quantize_config.json"] if format == "gptq" else [])
        clash = [n for n in own + tok if (directory / n).exists()]
        if clash and not overwrite:
            raise FileExistsError(f"{directory} already holds {clash}; pass overwrite=True to replace them")
        directory.mkdir(parents=True, exist_ok=True)
        for name in tok:
            atomic_write(directory / name, lambda t, n=name: shutil.copyfile(Path(tmp) / n, t))
    atomic_write(directory / WEIGHTS, lambda t: save_file({k: v.clone() for k, v in state.items()}, t,
                                                          metadata={"format": "pt"}))
    if format == "gptq":
        write_json(directory / "quantize_config.json", config["quantization_config"])
    write_json(directory / "config.json", config)
    return directory


def _save_pretrained(self: nn.Module, save_directory: str | os.PathLike, overwrite: bool = False,
                     safe_serialization: bool = True, **kwargs: Any) -> Path:
    """``save_pretrained`` of a model quantized by adagrow: a compressed-tensors folder (loadable
    with ``from_pretrained``), or an error; never a folder whose weights load as random."""
    if kwargs or not safe_serialization:
        unsupported = sorted(kwargs) + ([] if safe_serialization else ["safe_serialization=False"])
        raise TypeError(f"save_pretrained of an adagrow-quantized model writes compressed-tensors through "
                        f"adagrow.compress.save_compressed; unsupported arguments: {unsupported}")
    return save_compressed(self, save_directory, "compressed-tensors", overwrite=overwrite)


def guard_save_pretrained(qmodel: nn.Module) -> None:
    """Give a quantized transformers model a ``save_pretrained`` that writes compressed-tensors
    (the inherited one would save our packed buffers, which transformers cannot read back)."""
    if hasattr(qmodel, "save_pretrained") and hasattr(qmodel, "config"):
        qmodel.save_pretrained = _save_pretrained.__get__(qmodel)


__all__ = ["save_compressed", "guard_save_pretrained", "whole_group_size", "shared_aliases", "pack_dense",
           "unpack_dense", "FORMATS"]
