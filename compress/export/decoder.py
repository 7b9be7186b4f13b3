"""``export_decoder_onnx``: a Hugging Face causal LM to one ONNX graph with a KV cache, serving
both prefill (past length 0) and decode steps (docs/llm.md, "ONNX with a KV cache").

Graph inputs (the naming of Optimum and ONNX Runtime GenAI): ``input_ids`` ``[B, S]``,
``attention_mask`` ``[B, P + S]`` (covers the past and the new tokens; 0 marks left padding),
``position_ids`` ``[B, S]``, ``past_key_values.{i}.key`` / ``.value`` ``[B, H_kv, P, D]``;
outputs ``logits`` ``[B, S, V]`` and ``present.{i}.key`` / ``.value`` ``[B, H_kv, P + S, D]``.
Batch, sequence and past lengths are dynamic.

The graph is traced by PyTorch's TorchScript exporter through the model's own forward with a
transformers ``DynamicCache`` built from the past inputs (eager attention: the mask and the
cache concatenation become ONNX ops). It is traced with a non-empty past, so the cache length is
read from the tensors' shapes, never frozen. Before the file is written, ONNX Runtime is checked
against the PyTorch model (the quantized one for W4, the float one for INT8) on held-out prefills (with left padding, at
another batch size) and on decode steps fed the PyTorch model's cache.
"""
from __future__ import annotations

import copy
import inspect
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from adagrow.files import atomic_write

from ..model import QuantConfig, quantize
from ..qmodules import QuantLayer
from .nbits import ACCURACY_LEVELS
from .onnx_export import ExportReport, match_initializers, w4_graph, w4_quantized
from .qdq import NBitsWeight, int8_codes, int8_matmul_weights, quantizable_nodes, quantize_weights_int8, \
    rewrite_nbits
from .tied import share_tied_embedding
from .verify import CHECKS, THRESHOLDS, enforce, verify

PRECISIONS = ("fp32", "int8", "w4")
# model_type values whose forward is a plain decoder stack on a DynamicCache (RoPE, GQA, RMSNorm);
# sliding-window layers are refused separately (the graph would not truncate the cache)
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
INT8_BLOCK = 32  # MatMulNBits block of an int8 weight: per-channel scales repeat over blocks (exact)
MAX_PROTO_BYTES = 2**31 - 2**26  # one ONNX file (protobuf) holds < 2 GiB, with room for the graph
LEVEL4_HINT = ("accuracy_level=4 quantizes every MatMulNBits input to int8 per block (about 1% error per "
               "layer on SmolLM2-135M); single tokens of a decoder can flip under any perturbation of that size "
               "(docs/export.md, 'Accuracy level 4 on decoders'); accuracy_level=0 computes the model's own "
               "arithmetic")


def past_names(n_layers: int) -> list[str]:
    """``past_key_values.{i}.key`` / ``.value`` for every layer, in graph-input order."""
    return [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    """``present.{i}.key`` / ``.value`` for every layer, in graph-output order."""
    return [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def position_ids(attention_mask: np.ndarray | torch.Tensor, new: int) -> np.ndarray:
    """Positions of the last ``new`` tokens as transformers' ``generate()`` computes them: the
    count of unmasked tokens before each one (left padding does not shift positions); masked
    slots get 1."""
    mask = np.asarray(attention_mask, np.int64)
    pos = np.cumsum(mask, -1) - 1
    pos[mask == 0] = 1
    return pos[:, mask.shape[1] - new:]


def cache_argument(model: nn.Module) -> str:
    """The forward's cache keyword: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def check_decoder(model: nn.Module) -> None:
    """Refuse, with the reason, what :func:`export_decoder_onnx` cannot export: anything but a
    transformers ``*ForCausalLM`` of a supported architecture with full-attention layers only."""
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None or not hasattr(config, "model_type"):
        raise TypeError(f"export_decoder_onnx needs a Hugging Face causal LM (a transformers *ForCausalLM), got "
                        f"{type(model).__name__}")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    causal = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ([v] if isinstance(v, str) else v)}
    name = type(model).__name__
    if name not in causal and not name.endswith("ForCausalLM"):
        raise ValueError(f"{name} is not a causal LM (no LM head): the KV-cache export needs the LM head; "
                         "load the model with transformers.AutoModelForCausalLM")
    if config.model_type not in SUPPORTED_ARCHS:
        raise ValueError(f"{name} (model_type {config.model_type!r}) is not supported by the KV-cache export; "
                         f"supported: {', '.join(SUPPORTED_ARCHS)}")
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    sliding = [i for i, layer in enumerate(DynamicCache(config=config).layers) if type(layer) is not DynamicLayer]
    if sliding:
        raise ValueError(f"{name}: layers {sliding[:5]} use sliding-window attention, which the KV-cache export does "
                         "not truncate; disable it in the config (use_sliding_window=False / sliding_window=None)")


class KVForward(nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``: the causal LM's
    forward on a ``DynamicCache`` holding the past keys and values; what the exporter traces and
    what the export is verified against."""

    config: Any

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config
        self.n_layers, self.cache_argument = int(self.config.num_hidden_layers), cache_argument(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)], config=self.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_argument: cache})
        cache = out[self.cache_argument]
        return (out["logits"], *(t for layer in cache.layers for t in (layer.keys, layer.values)))


def _kv_shape(config: Any) -> tuple[int, int]:
    """(key/value heads, head dimension) of the cache."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    return kv, int(getattr(config, "head_dim", None) or config.hidden_size // heads)


def _feed(ids: torch.Tensor, mask: torch.Tensor, past: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    names = past_names(len(past) // 2)
    return {"input_ids": ids, "attention_mask": mask,
            "position_ids": torch.from_numpy(position_ids(mask.numpy(), ids.shape[1])), **dict(zip(names, past))}


@torch.no_grad()
def verification_feeds(fwd: KVForward, vocab: int, seed: int) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Prefills from an empty cache (a left-padded batch of 2, an unpadded batch of 1), then one
    and three new tokens on the cache PyTorch returned for the padded prefill: ``(label, feed)`` pairs,
    the inputs the export check compares on (``benchmarks/llm_level4.py`` replays them)."""
    g = torch.Generator().manual_seed(seed)
    kv, d = _kv_shape(fwd.config)
    empty = lambda b: [torch.zeros(b, kv, 0, d) for _ in range(2 * fwd.n_layers)]  # noqa: E731
    prompt = torch.randint(0, vocab, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    prefill = _feed(prompt, mask, empty(2))
    past = list(fwd(*prefill.values())[1:])
    feeds = [("prefill, batch 2, row 1 left-padded by 3", prefill),
             ("prefill, batch 1", _feed(prompt[:1, :5], torch.ones(1, 5, dtype=torch.long), empty(1)))]
    for n in (1, 3):
        new = torch.randint(0, vocab, (2, n), generator=g)
        longer = torch.cat([mask, torch.ones(2, n, dtype=torch.long)], 1)
        feeds.append((f"{n} new token(s) after a past of 9", _feed(new, longer, past)))
    return feeds


def _export_graph(fwd: KVForward, opset: int, report: ExportReport) -> onnx.ModelProto:
    """Trace ``fwd`` on a batch of 2, 3 new tokens and a past of 4 (all axes dynamic)."""
    n, (kv, d) = fwd.n_layers, _kv_shape(fwd.config)
    past_in, present = past_names(n), present_names(n)
    example = _feed(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 7, dtype=torch.long),
                    [torch.zeros(2, kv, 4, d) for _ in range(2 * n)])
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
            **{p: {0: "batch", 2: "past_sequence"} for p in past_in},
            **{p: {0: "batch", 2: "total_sequence"} for p in present}}
    with tempfile.TemporaryDirectory() as tmp:
        f = os.path.join(tmp, "decoder.onnx")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                torch.onnx.export(fwd, tuple(example.values()), f, dynamo=False, opset_version=opset,
                                  input_names=list(example), output_names=["logits", *present], dynamic_axes=axes,
                                  do_constant_folding=True)
            except Exception as exc:  # the exporter's errors name the op without an ONNX rule
                raise ValueError(f"{type(fwd.model).__name__} has a layer without an ONNX export rule: {exc}") from exc
        for c in caught:
            msg = f"{Path(c.filename).name}:{c.lineno}: {str(c.message).split('. ')[0]}"
            if issubclass(c.category, torch.jit.TracerWarning) and msg not in report.tracer_warnings:
                report.tracer_warnings.append(msg)
        return onnx.load(f)


def int8_linear_weights(graph: onnx.ModelProto, model: nn.Module, accuracy_level: int | None) -> int:
    """Store, in place, every Linear weight of ``model`` but the LM head as int8 (per output channel,
    symmetric, |q| <= 127); the head stays float, as in ``w4``, and a tied embedding keeps sharing it.

    ``accuracy_level`` 0: int8 initializers read through a ``Cast`` that ONNX Runtime folds at
    session load, the scales applied to the product (:func:`~.qdq.int8_matmul_weights`): fp32
    weights in memory and fp32 compute, the fp32 graph's speed, the same on every CPU. 1-4: ONNX Runtime's 8-bit
    ``MatMulNBits`` at that level (codes ``q + 128``, zero point 128, the channel's scale on every
    block of ``INT8_BLOCK``; 1 dequantizes on every call, 4 quantizes activations to int8). ``None``
    writes int8 ``DequantizeLinear`` + ``MatMul``, which ORT fuses into ``MatMulNBits`` at its
    session option ``session.qdq_matmulnbits_accuracy_level`` (4 by default in ORT 1.32). Returns
    the number of weights quantized."""
    head = model.get_output_embeddings()
    dense = {f"{n}.weight": m.weight.detach().numpy() for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and m is not head}
    linear = {init for init, _ in match_initializers(graph.graph, dense).values()}
    if len(linear) != len(dense):
        raise ValueError(f"int8 export: {len(dense) - len(linear)} of {len(dense)} Linear weights were not found "
                         "among the ONNX initializers")
    if accuracy_level == 0:
        return int8_matmul_weights(graph, linear)
    if accuracy_level is None:
        keep = frozenset(n.name for n, _ in quantizable_nodes(graph.graph) if n.input[1] not in linear)
        return quantize_weights_int8(graph, {}, {}, int32_bias=False, levels=127, keep_float=keep)
    inits = {t.name: t for t in graph.graph.initializer}
    weights = {}
    for name in linear:
        q, s = int8_codes(numpy_helper.to_array(inits[name]).astype(np.float32), None, axis=1)  # [K, N]
        weights[name] = NBitsWeight((q.astype(np.int16) + 128).astype(np.uint8), s[None],
                                    np.full((1, q.shape[1]), 128, np.uint8), axis=0, block_size=INT8_BLOCK)
    done, on_dq = rewrite_nbits(graph, weights, accuracy_level, bits=8)
    if on_dq:
        raise ValueError(f"int8 export: weights {on_dq} do not feed a MatMul on [K, N]")
    return done


def export_decoder_onnx(model: nn.Module, path: str | os.PathLike, precision: str = "fp32", *,
                        quant_config: QuantConfig | None = None, calib: list | None = None,
                        accuracy_level: int | None = 0, check: str = "raise", opset: int = 17, seed: int = 0,
                        overwrite: bool = False, progress: bool = True) -> ExportReport:
    """Export a causal LM with KV-cache inputs and outputs, verify it with ONNX Runtime, write it.

    Args:
        model: a transformers ``*ForCausalLM`` (Llama, Mistral, Qwen2/3 style); for ``w4`` it may
            already be quantized by :func:`adagrow.compress.quantize` (4-bit).
        path: the ``.onnx`` file; an existing file is only replaced with ``overwrite=True``.
        precision: ``fp32`` | ``int8`` (int8 Linear weights per output channel, fp32 compute, the
            head float) | ``w4`` (4-bit Linear weights as ONNX Runtime ``MatMulNBits``; the
            head stays as the model has it, float unless quantized on purpose).
        quant_config: ``w4`` on a float model: quantizer settings (default OBS, g32 for Linear;
            OBS needs ``calib``, token windows ``{"input_ids": [B, L]}``).
        accuracy_level: ``MatMulNBits`` accuracy level. 0 (the default): fp32 compute on the 4-bit
            weights, the quantized PyTorch model's arithmetic, so greedy generation follows it
            token for token; 4: int8 activations, faster decoding (SmolLM2-135M: 1.3x) but greedy
            continuations drift from the PyTorch model's, and single tokens can flip under its
            ~1% error per layer, failing the check (docs/export.md). None writes blocked int4
            DequantizeLinear + MatMul instead. ``int8``: 0 (the default) stores int8 weights that
            ONNX Runtime dequantizes once at session load (fp32 compute and speed, int8 file);
            1-4 8-bit ``MatMulNBits`` at that level (4: int8 activations); None int8
            DequantizeLinear + MatMul (:func:`int8_linear_weights`).
        check: ``raise`` (default: ``ExportCheckError`` and nothing written when the logits and
            cache disagree with PyTorch beyond the precision's cosine threshold) or ``warn``.
        seed: seed of the held-out verification tokens.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS} or None, got {accuracy_level!r}")
    check_decoder(model)
    quantized = any(isinstance(m, QuantLayer) for m in model.modules())
    if quantized and precision != "w4":
        raise ValueError(f"the model holds quantized layers: export precision='w4', or export the float model for "
                         f"{precision!r}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    if precision == "fp32" and float_bytes > MAX_PROTO_BYTES:
        raise ValueError(f"{float_bytes / 2**30:.1f} GiB of fp32 weights do not fit one ONNX file (< 2 GiB); "
                         "export precision='w4'")
    model = copy.deepcopy(model).cpu().eval()
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        model = model.float()  # not otherwise: transformers refuses .float() on a model loaded from GGUF
    config: Any = model.config
    config._attn_implementation = "eager"  # traced into plain ONNX ops (MatMul, Softmax)
    n = int(config.num_hidden_layers)
    report = ExportReport(str(path), precision, None, opset, 0.0, 0.0, threshold=THRESHOLDS[precision],
                          inputs=["input_ids", "attention_mask", "position_ids", *past_names(n)],
                          outputs=["logits", *present_names(n)])
    if precision == "w4":
        model = w4_quantized(model, lambda cfg: quantize(model, calib, cfg, progress=progress), bool(calib),
                             quant_config, report.notes)
        if quantized:
            report.notes.append("the model was quantized before export: verified against it, not a float model")
        graph = w4_graph(model, lambda twin: _export_graph(KVForward(twin), 21, report), report, accuracy_level)
    else:
        graph = _export_graph(KVForward(model), opset, report)
    if precision == "int8":
        report.quantized_weights, report.weight_range = int8_linear_weights(graph, model, accuracy_level), \
            "full"
        if accuracy_level == 0:
            report.notes.append("int8 Linear weights are read through a Cast that ONNX Runtime folds at session "
                                "load (fp32 weights in memory, fp32 compute), their scales applied to the product")
    share_tied_embedding(graph)  # a tied embedding / head stored once
    report.dynamic_axes = {i.name: {d: s.dim_param for d, s in enumerate(i.type.tensor_type.shape.dim) if s.dim_param}
                           for i in [*graph.graph.input, *graph.graph.output]}
    onnx.checker.check_model(graph, full_check=True)
    reference = KVForward(model).eval()
    feeds = verification_feeds(reference, int(config.vocab_size), seed)

    def write_verified(tmp: str) -> None:
        onnx.save(graph, tmp)
        v = verify(tmp, reference, feeds)
        report.cosine, report.max_abs_diff, report.verification = v.cosine, v.max_abs_diff, v.cases
        report.passed = enforce(v, precision, check, path, report.notes, LEVEL4_HINT if accuracy_level == 4 else "")

    atomic_write(path, write_verified)
    return report


__all__ = ["export_decoder_onnx", "check_decoder", "KVForward", "cache_argument", "past_names", "present_names",
           "position_ids", "verification_feeds", "SUPPORTED_ARCHS"]
