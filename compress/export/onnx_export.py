"""``export_onnx``: deploy-form models to ONNX at fp32, fp16, INT8 (explicit Q/DQ) or W4 (docs/design.md §7).

The float graph is exported with PyTorch's TorchScript exporter (eval mode: BN folded into convs)
and simplified with onnxslim; quantization is then inserted at the ONNX level from our own scales,
so no exporter or simplifier can drop or alter a Q/DQ node. Models take one tensor (``input``) or
named inputs (Hugging Face ``input_ids`` / ``attention_mask`` / ``token_type_ids``), with batch
and sequence axes dynamic. Every export is checked with ``onnx.checker`` and run with ONNX
Runtime against the float PyTorch model on held-out inputs (and other sequence lengths) before
it is written; below its precision's cosine threshold it raises (see ``verify.py``).
"""
from __future__ import annotations

import copy
import os
import tempfile
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxslim
import torch
from onnx import TensorProto, numpy_helper, version_converter
from torch import nn

from adagrow.checks import check_int
from adagrow.files import atomic_write
from adagrow.packed import unpack_codes

from ..layer import set_module
from ..model import QuantConfig, quantize
from ..qmodules import QuantLinear, QuantLayer
from .calibrate import CALIB_METHODS, collect_stats, threshold
from .inputs import INPUT, OUTPUT, InputSpec, NamedForward, input_spec, named_inputs, resize_sequence, \
    stack_batches, to_numpy
from .mixed import FloatUnit, keep_float_units
from .nbits import ACCURACY_LEVELS
from .qdq import NBitsWeight, act_quant, activation_tensors, insert_act_qdq, quant_units, quantize_weights_int8, \
    rewrite_nbits
from .smooth import smooth_linears
from .verify import CHECKS, THRESHOLDS, ExportCheckError, enforce, ort_session, verify

PRECISIONS = ("fp32", "fp16", "int8", "w4")
# opsets of export_onnx's float / int8 graphs: per-channel Q/DQ needs 13, torch's TorchScript exporter stops at 20
MIN_OPSET, MAX_OPSET = 13, 20
TARGETS = ("onnxruntime", "tensorrt")
FP16_KEEP_FP32 = ["LayerNormalization", "Softmax"]
DEFAULT_CALIB = "mse"  # expected clipping + rounding error: no outlier blow-up, no KL heuristics
# int8 weight grids: "reduced" (7 bits, |q| <= 63) cannot saturate the int16 pair sums of u8 x s8
# kernels on x86 without VNNI (see saturation.py); "full" (|q| <= 127) is for VNNI / ARM / GPUs.
WEIGHT_RANGES = {"reduced": (7, 63), "full": (8, 127)}  # name -> (OBS bits, largest |code|)
DEFAULT_WEIGHT_RANGE = {"onnxruntime": "reduced", "tensorrt": "full"}
DEFAULT_TARGET_COSINE = 0.995  # int8 mixed precision: calibration cosine to reach before keeping units float


@dataclass
class ExportReport:
    """What an export wrote and how close ONNX Runtime's output is to the float PyTorch model."""

    path: str
    precision: str
    target: str | None
    opset: int
    max_abs_diff: float          # worst over the verification inputs
    cosine: float                # worst over the verification inputs (all outputs flattened)
    threshold: float = 0.0       # the precision's cosine threshold
    passed: bool = True          # cosine >= threshold and finite (False only with check="warn")
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    verification: list[dict] = field(default_factory=list)  # per verification input: shapes, cosine
    qdq_tensors: int = 0
    quantized_weights: int = 0
    weight_range: str | None = None  # int8 weight grid: "reduced" (|q| <= 63) or "full" (|q| <= 127)
    smoothed: dict[str, float] = field(default_factory=dict)  # Linear -> max/min smoothing factor
    calibration_cosine: float | None = None  # int8: all units quantized, on the calibration set
    kept_float: list[FloatUnit] = field(default_factory=list)  # int8 units left float, most sensitive first
    runs_float: list[str] = field(default_factory=list)  # w4: weights dequantized to run a float op
    notes: list[str] = field(default_factory=list)
    tracer_warnings: list[str] = field(default_factory=list)  # "file:line: message" of each TracerWarning
    clamped: list[str] = field(default_factory=list)  # fp16: constants the converter clamped to +-1e4


def _check_exportable(model: nn.Module) -> None:
    from adagrow.grow.reparam import RepConv2d
    train_time = [n for n, m in model.named_modules() if isinstance(m, RepConv2d)]
    if train_time:
        raise ValueError(f"model is in train-time form (RepConv2d at {train_time[:3]}); export the deploy "
                         "form: adagrow.grow.reparam.reparameterize(model.eval())")


def _float_twin(qmodel: nn.Module) -> tuple[nn.Module, dict[str, QuantLayer]]:
    """Replace quantized layers by float layers holding the dequantized weights."""
    model = copy.deepcopy(qmodel)
    qlayers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
    for name, q in qlayers.items():
        g = q.geo
        if isinstance(q, QuantLinear):
            layer = nn.Linear(g.k, g.out_features, bias=q.bias is not None)
        else:
            layer = nn.Conv2d(g.in_channels, g.out_features, g.kernel_size, g.stride, g.padding, g.dilation,
                              g.groups, bias=q.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(q.dequantize())
            if q.bias is not None:
                layer.bias.copy_(q.bias.float())
        set_module(model, name, layer)
    return model, qlayers


def _w4_weight(q: QuantLayer) -> NBitsWeight | None:
    """The ONNX DequantizeLinear form of a 4-bit layer, or None when its groups have none."""
    g, gs = q.geo, q.group_size
    codes = unpack_codes(q.qweight.cpu(), 4)[:, : g.k].numpy().astype(np.uint8)  # [N, K] canonical
    scales, zeros = q.scales.float().cpu().numpy(), q.zeros.float().cpu().numpy().round().astype(np.uint8)
    if isinstance(q, QuantLinear):  # MatMul weight [K, N]: blocks along K (axis 0)
        if gs == -1:
            return NBitsWeight(codes.T.copy(), scales[0], zeros[0], axis=1, block_size=0)
        return NBitsWeight(codes.T.copy(), scales, zeros, axis=0, block_size=gs)
    kh, kw = g.kernel_size
    cg = g.cin_per_group
    w = codes.reshape(g.out_features, kh, kw, cg).transpose(0, 3, 1, 2)  # ONNX conv layout
    if gs == -1:
        return NBitsWeight(w.copy(), scales[0], zeros[0], axis=0, block_size=0)
    if isinstance(gs, str):  # one scale per (out, ky, kx): blocks of all C_in/g along axis 1
        row = q.position_group.cpu().numpy().astype(np.int64).reshape(kh, kw)
        s = scales[row].transpose(2, 0, 1)[:, None]  # [N, 1, kh, kw]
        z = zeros[row].transpose(2, 0, 1)[:, None]
        return NBitsWeight(w.copy(), s.astype(np.float32), z, axis=1, block_size=cg)
    if cg % gs:
        return None
    # contiguous K groups inside one kernel position: blocks of gs input channels along axis 1
    k_idx = (np.arange(kh)[:, None, None] * kw + np.arange(kw)[None, :, None]) * cg + np.arange(0, cg, gs)[None, None]
    s = scales[k_idx // gs].transpose(3, 2, 0, 1)  # [N, cg/gs, kh, kw]
    z = zeros[k_idx // gs].transpose(3, 2, 0, 1)
    return NBitsWeight(w.copy(), s.astype(np.float32), z, axis=1, block_size=gs)


def match_initializers(graph: onnx.GraphProto, weights: dict[str, np.ndarray]) -> dict[str, tuple[str, bool]]:
    """Map each layer weight (key ``"<layer>.weight"``, PyTorch layout) to the ONNX initializer that
    holds it and whether it is transposed there: by name, else by exact content, as is or
    transposed (Linear on 3-D input exports as MatMul on a folded ``[K, N]`` constant)."""
    names = {t.name for t in graph.initializer}
    by_content = {}
    for t in graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(t)
            by_content.setdefault((arr.shape, arr.tobytes()), t.name)
    out = {}
    for key, w in weights.items():
        if key in names:
            out[key] = (key, False)
            continue
        for transposed, cand in enumerate([w, w.T] if w.ndim == 2 else [w]):
            hit = by_content.get((cand.shape, np.ascontiguousarray(cand).tobytes()))
            if hit:
                out[key] = (hit, bool(transposed))
                break
    return out


def _export_float(model: nn.Module, spec: InputSpec, opset: int, report: ExportReport | None = None) -> onnx.ModelProto:
    """The float ONNX graph (TorchScript exporter). Its tracer warnings are not suppressed:
    each is recorded in ``report.tracer_warnings`` (a data-dependent branch adds verification
    inputs, :func:`_branch_feeds`)."""
    single = spec.names == [INPUT] and spec.output_names == [OUTPUT]
    traced = model if single else NamedForward(model, spec.names).eval()  # plain models keep their names
    with tempfile.TemporaryDirectory() as tmp:
        f = os.path.join(tmp, "float.onnx")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                torch.onnx.export(traced, spec.args(), f, dynamo=False, opset_version=opset,
                                  input_names=spec.names, output_names=spec.output_names, do_constant_folding=True,
                                  dynamic_axes=spec.dynamic_axes)
            except Exception as exc:  # the exporter's errors name the op without an ONNX rule
                raise ValueError(f"a layer of {type(model).__name__} has no ONNX export rule: {exc}") from exc
        for c in caught:
            msg = f"{Path(c.filename).name}:{c.lineno}: {str(c.message).split('. ')[0]}"
            if report is not None and issubclass(c.category, torch.jit.TracerWarning) \
                    and msg not in report.tracer_warnings:
                report.tracer_warnings.append(msg)
        graph = onnxslim.slim(onnx.load(f))
    for i, node in enumerate(graph.graph.node):  # units are addressed by node name
        node.name = node.name or f"{node.op_type}_{i}"
    return graph


_CLAMPED = re.compile(r"will be truncated to -?10000(\.0)?$")
_DATA_DEPENDENT = ("Converting a tensor to a Python",)  # bool / number / index: a value became a constant


def _fail(report: ExportReport, check: str, msg: str) -> None:
    """A failed export check: :class:`ExportCheckError` with ``check="raise"``, else a warning,
    a note and ``report.passed = False``."""
    if check == "raise":
        raise ExportCheckError(msg + "; pass check='warn' to keep the file anyway")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    report.notes.append(msg)
    report.passed = False


def _branch_feeds(report: ExportReport, held: list[dict[str, torch.Tensor]]) -> list[tuple[str, dict]]:
    """When tracing turned a tensor value into a Python constant (``if x.sum() > 0``), the graph
    holds the branch the example took: verify also on the held-out float inputs negated and
    scaled by 4, which take other branches of such tests. Token ids are left as they are."""
    if not any(w.split(": ", 1)[-1].startswith(_DATA_DEPENDENT) for w in report.tracer_warnings):
        return []
    report.notes.append("tracing turned tensor values into constants (" + "; ".join(report.tracer_warnings[:3])
                        + "): verified also on the inputs negated and scaled by 4")
    out = []
    for i, b in enumerate(held):
        if any(x.is_floating_point() for x in b.values()):
            for label, f in (("negated", -1.0), ("scaled by 4", 4.0)):
                out.append((f"held-out batch {i} {label}",
                            {n: x * f if x.is_floating_point() else x for n, x in b.items()}))
    return out


def _quantize(model: nn.Module, spec: InputSpec, batches: list[dict[str, torch.Tensor]], cfg: QuantConfig,
              progress: bool) -> nn.Module:
    """:func:`quantize` on named calibration batches (passed as keyword arguments, so an
    ``attention_mask`` keeps padded tokens out of the Hessians); the quantized copy of ``model``."""
    if spec.names == [INPUT]:
        return quantize(model, [b[INPUT] for b in batches] or None, cfg, progress=progress)
    return quantize(model, [{n: b[n] for n in spec.names} for b in batches] or None, cfg, progress=progress)


def _check_calibration(batches: list[dict[str, torch.Tensor]]) -> None:
    floats = [x for b in batches for x in b.values() if x.is_floating_point()]
    if floats and not any(bool(x.any()) for x in floats):
        raise ValueError("the calibration batches are all zero: activation ranges and OBS Hessians would be "
                         "empty; calibrate with representative inputs")


def _verification_feeds(spec: InputSpec, held: list[dict[str, torch.Tensor]], lengths: Iterable[int] | None,
                        calib: list[dict[str, torch.Tensor]], notes: list[str]) -> list[tuple[str, dict]]:
    seen = {tuple(x[r].numpy().tobytes() for x in b.values()) for b in calib for r in range(len(next(iter(b.values()))))}
    overlap = sum(tuple(x[r].numpy().tobytes() for x in b.values()) in seen
                  for b in held for r in range(len(next(iter(b.values())))))
    if overlap:
        msg = (f"{overlap} verification sample(s) also appear in the calibration batches: the check is not "
               "held-out; pass verify_inputs= with other data")
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
    feeds = [(f"held-out batch {i}", b) for i, b in enumerate(held)]
    if spec.sequence:
        seq = spec.example[spec.names[0]].shape[1]
        lengths = sorted({max(1, seq // 2), max(1, seq - 1)} - {seq}) if lengths is None else list(lengths)
        if any(int(n) < 1 for n in lengths):
            raise ValueError(f"verify_lengths must be positive, got {lengths}")
        feeds += [(f"held-out batch {i} at sequence length {n}", resize_sequence(b, int(n)))
                  for n in lengths for i, b in enumerate(held)]
    elif lengths:
        raise ValueError("verify_lengths needs a model with a dynamic sequence axis (named inputs, or sequence=True)")
    return feeds


def _int8(model: nn.Module, spec: InputSpec, batches: list[dict[str, torch.Tensor]], report: ExportReport, *,
          opset: int, target: str, weights: str, levels: int, wbits: int, calib_method: str, percentile: float,
          smooth: float | None, target_cosine: float | None, progress: bool) -> onnx.ModelProto:
    """The INT8 Q/DQ graph: smoothing, OBS weights, activation ranges, mixed precision."""
    work = copy.deepcopy(model)
    if smooth is not None:
        fwd = NamedForward(work, spec.names)
        report.smoothed = smooth_linears(work, lambda: [fwd(*spec.args(b)) for b in batches], smooth)
    graph = _export_float(work, spec, opset, report)
    qweights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if weights == "obs":
        # Q/DQ int8 weights stay in +-levels; only the weights replace the graph's initializers, so
        # OBS keeps the float biases (no bias refit)
        cfg = QuantConfig(bits=wbits, sym=True, sym_grid="restricted", group_size=-1, linear_group_size=-1,
                          order="act", bias_refit=False)
        qmodel = _quantize(work, spec, batches, cfg, progress)
        qlayers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}
        dense = {f"{n}.weight": work.get_submodule(n).weight.detach().numpy() for n in qlayers}
        match = match_initializers(graph.graph, dense)
        missing = [k for k in dense if k not in match]
        if missing:
            report.notes.append(f"OBS weights not matched to ONNX weights (rounded instead): {missing}")
        for key, (init, transposed) in match.items():
            q = qlayers[key[: -len(".weight")]]
            w_hat = q.dequantize().float().numpy()
            qweights[init] = (w_hat.T if transposed else w_hat, q.scales[0].float().numpy())
    feeds = [to_numpy(b) for b in batches]
    units = quant_units(graph.graph, target)
    names = activation_tensors(graph.graph, target)
    stats = collect_stats(graph, names, feeds, progress=progress)
    dead = [n for n in names if stats[n].amax == 0]
    if dead:
        msg = f"activations {dead[:5]} are zero on every calibration batch: their int8 grid holds only 0"
        warnings.warn(msg, stacklevel=3)
        report.notes.append(msg)
    plan_all = {}
    for n in names:
        aq = act_quant(0.0, stats[n].minimum, target)
        steps = 255 if aq.zero == 0 and aq.dtype == TensorProto.UINT8 else 127
        plan_all[n] = act_quant(threshold(stats[n], calib_method, steps, percentile), stats[n].minimum, target)

    def build(keep_float: frozenset[str]) -> onnx.ModelProto:
        g = onnx.ModelProto()
        g.CopyFrom(graph)
        plan = {n: plan_all[n] for n in activation_tensors(g.graph, target, keep_float)}
        report.quantized_weights = quantize_weights_int8(g, qweights, plan, int32_bias=target == "onnxruntime",
                                                         levels=levels, keep_float=keep_float)
        report.qdq_tensors = insert_act_qdq(g, plan)
        return g

    keep: list[FloatUnit] = []
    if target_cosine is not None:
        report.calibration_cosine, keep = keep_float_units(graph, build, list(units), feeds, target_cosine, progress)
    report.kept_float = keep
    report.notes += [k.reason() for k in keep]
    return build(frozenset(k.node for k in keep))


def w4_quantized(model: nn.Module, quantize_fn: Callable[[QuantConfig], nn.Module], has_calib: bool,
                 quant_config: QuantConfig | None, notes: list[str]) -> nn.Module:
    """``model`` if it already holds quantized layers, else ``quantize_fn(config)`` with
    ``quant_config`` (default: OBS, tier groups for convs, g32 for Linear, added to ``notes``);
    then every quantized layer must be 4-bit."""
    if not any(isinstance(m, QuantLayer) for m in model.modules()):
        cfg = quant_config or QuantConfig(bits=4, group_size="tier", linear_group_size=32)
        if cfg.bits != 4:
            raise ValueError(f"w4 export needs bits=4, quant_config has bits={cfg.bits}")
        if cfg.method == "obs" and not has_calib:
            raise ValueError("w4 export with OBS needs calibration batches (calib=...), or use method='rtn'")
        if quant_config is None:
            notes.append(f"a float model: quantized for this export at the defaults ({cfg.method.upper()} W4, group "
                         f"size {cfg.group_size} for convs, {cfg.group_size_for('linear')} for Linear layers); pass "
                         "quant_config or quantize it first (adagrow quantize / quantize()) to choose")
        model = quantize_fn(cfg)
    bad = [n for n, m in model.named_modules() if isinstance(m, QuantLayer) and m.bits != 4]
    if bad:
        raise ValueError(f"w4 export: layers {bad} are not 4-bit")
    return model


def w4_graph(qmodel: nn.Module, export_float: Callable[[nn.Module], onnx.ModelProto], report: ExportReport,
             accuracy_level: int | None) -> onnx.ModelProto:
    """The W4 graph of a 4-bit model: its float twin (dequantized weights) exported by
    ``export_float``, then MatMulNBits for Linear weights, blocked int4 DequantizeLinear otherwise
    (opset 21). Fills ``report.opset``, ``quantized_weights``, ``runs_float`` and notes."""
    twin, qlayers = _float_twin(qmodel)
    dense = {f"{n}.weight": twin.get_submodule(n).weight.detach().numpy() for n in qlayers}
    w4: dict[str, NBitsWeight] = {}
    for n, q in qlayers.items():
        ww = _w4_weight(q)
        if ww is None:
            report.notes.append(f"{n}: group size {q.group_size} does not divide C_in/g; weight kept as "
                                "exact dequantized float")
        else:
            w4[f"{n}.weight"] = ww
    graph = version_converter.convert_version(export_float(twin), 21)
    report.opset = 21
    match = match_initializers(graph.graph, dense)
    missing = [k for k in w4 if k not in match]
    if missing:
        report.notes.append(f"4-bit weights not matched to ONNX initializers (kept as float): {missing}")
    report.quantized_weights, report.runs_float = rewrite_nbits(
        graph, {match[k][0]: v for k, v in w4.items() if k in match}, accuracy_level)
    if report.runs_float:
        report.notes.append(f"on ONNX Runtime CPU these run a float op on 4-bit weights dequantized by "
                            f"DequantizeLinear (no 4-bit kernel for them): once at load with the session option "
                            f"session.disable_quant_qdq=1 (as ort_session sets it; fp32 weights in memory), else on "
                            f"every call: {report.runs_float}")
    return graph


def _w4(model: nn.Module, spec: InputSpec, batches: list[dict[str, torch.Tensor]], report: ExportReport, *,
        quant_config: QuantConfig | None, accuracy_level: int | None, progress: bool) -> onnx.ModelProto:
    """The W4 graph: MatMulNBits for Linear weights, blocked int4 DequantizeLinear otherwise."""
    qmodel = w4_quantized(model, lambda cfg: _quantize(model, spec, batches, cfg, progress), bool(batches),
                          quant_config, report.notes)
    return w4_graph(qmodel, lambda twin: _export_float(twin, spec, 21, report), report, accuracy_level)


def export_onnx(model: nn.Module, example_input: torch.Tensor | Mapping[str, torch.Tensor], path: str | os.PathLike,
                precision: str = "fp32", *, calib: Iterable | None = None, calib_method: str = DEFAULT_CALIB,
                percentile: float = 99.99, target: str = "onnxruntime", weights: str = "obs",
                weight_range: str | None = None, smooth: float | None = None,
                target_cosine: float | None = DEFAULT_TARGET_COSINE, quant_config: QuantConfig | None = None,
                accuracy_level: int | None = 4, verify_inputs: Iterable | None = None,
                verify_lengths: Iterable[int] | None = None, sequence: bool | None = None, check: str = "raise",
                opset: int = 17, overwrite: bool = False, progress: bool = True) -> ExportReport:
    """Export a deploy-form model to ONNX, verify it with ONNX Runtime, then write it.

    Args:
        model: deploy form (RepConv2d fused), or any module (e.g. a Hugging Face model); for ``w4``
            it may already be quantized (4-bit).
        example_input: ``[B, ...]`` tensor (graph input ``input``), or a mapping of names to
            ``[B, L]`` tensors passed as keyword arguments (``input_ids``, ``attention_mask``,
            ``token_type_ids``; a ``BatchEncoding`` works). Batch (and, for named inputs,
            sequence) axes are dynamic. Outputs are named after ``ModelOutput`` fields.
        path: the ``.onnx`` file; an existing file is only replaced with ``overwrite=True``.
        precision: ``fp32`` | ``fp16`` (LayerNorm/Softmax kept fp32) | ``int8`` | ``w4``.
        calib: batches (tensors, (x, y) pairs or mappings like the example) for INT8 activation
            ranges, smoothing and OBS weights.
        calib_method: ``mse`` (default) | ``minmax`` | ``percentile`` | ``entropy``.
        target: INT8 flavour: ``onnxruntime`` (Q/DQ placed so ORT fuses QLinearConv / QGemm /
            MatMulIntegerToFloat,
            int32 biases) or ``tensorrt`` (int8 zero points 0, float biases, Q/DQ on residual adds).
        weights: INT8 weights from ``obs`` (error-compensated at the weight range) or ``rtn``.
        weight_range: INT8 weight grid: ``reduced`` (7-bit, |q| <= 63; default for ``onnxruntime``:
            exact on every x86 CPU, since u8 x s8 kernels without VNNI saturate int16 pair sums of
            full-range weights) or ``full`` (|q| <= 127; default for ``tensorrt``, or for ORT on
            CPUs with VNNI / ARM dot products only).
        smooth: INT8: SmoothQuant migration strength alpha in [0, 1] for every Linear (None: off).
        target_cosine: INT8 mixed precision: while the calibration-set cosine of the quantized
            graph to the float graph is below this, the most sensitive units stay float (None: off).
        quant_config: W4 quantizer settings (default: OBS, tier groups for convs, g32 for Linear).
        accuracy_level: W4 Linear layers as ORT ``MatMulNBits`` at this accuracy level (4: int8
            compute, the fast CPU path; 0: fp32); None writes blocked int4 DequantizeLinear.
        verify_inputs: held-out batches for the check (default: ``example_input``); the export is
            compared with the float model on each, and for sequence models also at
            ``verify_lengths`` (default: two shorter lengths).
        sequence: force (True) or forbid (False) a dynamic sequence axis; None: named inputs only.
        check: ``raise`` (default: :class:`ExportCheckError` and nothing written when the cosine is
            below ``THRESHOLDS[precision]`` or not finite) or ``warn`` (write, warn, record in notes).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    check_int(opset, "opset", MIN_OPSET, MAX_OPSET)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if calib_method not in CALIB_METHODS:
        raise ValueError(f"calib_method must be one of {CALIB_METHODS}, got {calib_method!r}")
    if weights not in ("obs", "rtn"):
        raise ValueError(f"weights must be 'obs' or 'rtn', got {weights!r}")
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS} or None, got {accuracy_level!r}")
    if target_cosine is not None and not 0 < target_cosine <= 1:
        raise ValueError(f"target_cosine must be in (0, 1], got {target_cosine}")
    weight_range = weight_range or DEFAULT_WEIGHT_RANGE[target]
    if weight_range not in WEIGHT_RANGES:
        raise ValueError(f"weight_range must be one of {tuple(WEIGHT_RANGES)}, got {weight_range!r}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    _check_exportable(model)
    model = copy.deepcopy(model).cpu().float().eval()
    has_quant = any(isinstance(m, QuantLayer) for m in model.modules())
    if has_quant and precision != "w4":
        raise ValueError(f"the model holds quantized layers: export precision='w4', or export the float "
                         f"deploy model for {precision!r}")
    spec = input_spec(model, named_inputs(example_input), sequence)
    batches = stack_batches(calib, spec)
    if precision == "int8" and not batches:
        raise ValueError("INT8 export needs calibration batches (calib=...) for activation ranges")
    _check_calibration(batches)
    report = ExportReport(str(path), precision, target if precision == "int8" else None, opset, 0.0, 0.0,
                          threshold=THRESHOLDS[precision], inputs=spec.names, outputs=spec.output_names,
                          dynamic_axes=spec.dynamic_axes)
    held = stack_batches(verify_inputs, spec, "verification input") if verify_inputs is not None else [spec.example]
    feeds = _verification_feeds(spec, held, verify_lengths, batches, report.notes)
    reference = NamedForward(model, spec.names).eval()
    if precision == "int8":
        wbits, levels = WEIGHT_RANGES[weight_range]
        report.weight_range = weight_range
        graph = _int8(model, spec, batches, report, opset=opset, target=target, weights=weights, levels=levels,
                      wbits=wbits, calib_method=calib_method, percentile=percentile, smooth=smooth,
                      target_cosine=target_cosine, progress=progress)
    elif precision == "w4":
        if has_quant:
            report.notes.append("the model was quantized before export: verified against it, not a float model")
        graph = _w4(model, spec, batches, report, quant_config=quant_config, accuracy_level=accuracy_level,
                    progress=progress)
    else:
        graph = _export_float(model, spec, opset, report)
        if precision == "fp16":
            from onnxconverter_common import float16
            with warnings.catch_warnings(record=True) as caught:  # one warning per clamped constant
                warnings.simplefilter("always", UserWarning)
                graph = float16.convert_float_to_float16(
                    graph, keep_io_types=True, op_block_list=float16.DEFAULT_OP_BLOCK_LIST + FP16_KEEP_FP32)
            # tiny weights rounded up to fp16's smallest normal are harmless; large ones clamped to
            # +-1e4 change the model's scale (a x1e5 constant becomes x1e4)
            report.clamped = sorted({str(c.message) for c in caught if _CLAMPED.search(str(c.message))})
            if report.clamped:
                _fail(report, check, f"{path}: fp16 export FAILED: the converter clamped constants beyond fp16's "
                     f"range to +-1e4 ({'; '.join(report.clamped[:3])}); export fp32, or rescale the model")
    onnx.checker.check_model(graph, full_check=True)
    feeds += _branch_feeds(report, held)

    def write_verified(tmp: str) -> None:
        onnx.save(graph, tmp)
        v = verify(tmp, reference, feeds)
        report.cosine, report.max_abs_diff, report.verification = v.cosine, v.max_abs_diff, v.cases
        report.passed = enforce(v, precision, check, path, report.notes) and report.passed

    atomic_write(path, write_verified)
    return report


def fused_node_counts(path: str | os.PathLike) -> dict[str, int]:
    """Op counts in ONNX Runtime's optimised CPU graph (e.g. QLinearConv, QGemm, MatMulNBits)."""
    with tempfile.TemporaryDirectory() as tmp:
        opt = os.path.join(tmp, "optimized.onnx")
        ort_session(path, optimized_path=opt)
        counts: dict[str, int] = {}
        for node in onnx.load(opt).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
