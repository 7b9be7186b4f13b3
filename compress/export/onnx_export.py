"""``export_onnx``: deploy-form models to ONNX at fp32, fp16, INT8 (explicit Q/DQ) or W4 (DESIGN §7).

The float graph is exported with PyTorch's TorchScript exporter (eval mode: BN folded into convs,
constants folded) and simplified with onnxslim; quantization is then inserted at the ONNX level
from our own scales, so no exporter or simplifier can drop or alter a Q/DQ node. Every export is
checked with ``onnx.checker`` and run with ONNX Runtime (CPU) against PyTorch on the example input.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxslim
import torch
from onnx import TensorProto, numpy_helper, version_converter
from torch import nn

from adagrow.files import atomic_write

from ..layer import set_module
from ..model import QuantConfig, batch_inputs, quantize
from adagrow.packed import unpack_codes
from ..qmodules import QuantLinear, _QuantLayer
from .calibrate import CALIB_METHODS, collect_stats, threshold
from .qdq import W4Weight, act_quant, activation_tensors, insert_act_qdq, quantize_weights_int8, rewrite_w4

PRECISIONS = ("fp32", "fp16", "int8", "w4")
TARGETS = ("onnxruntime", "tensorrt")
FP16_KEEP_FP32 = ["LayerNormalization", "Softmax"]
INPUT, OUTPUT = "input", "output"
DEFAULT_CALIB = "mse"  # expected clipping + rounding error: no outlier blow-up, no KL heuristics
# int8 weight grids: "reduced" (7 bits, |q| <= 63) cannot saturate the int16 pair sums of u8 x s8
# kernels on x86 without VNNI (see saturation.py); "full" (|q| <= 127) is for VNNI / ARM / GPUs.
WEIGHT_RANGES = {"reduced": (7, 63), "full": (8, 127)}  # name -> (OBS bits, largest |code|)
DEFAULT_WEIGHT_RANGE = {"onnxruntime": "reduced", "tensorrt": "full"}


@dataclass
class ExportReport:
    """What an export wrote and how close ONNX Runtime's output is to PyTorch's."""

    path: str
    precision: str
    target: str | None
    opset: int
    max_abs_diff: float
    cosine: float
    qdq_tensors: int = 0
    quantized_weights: int = 0
    weight_range: str | None = None  # int8 weight grid: "reduced" (|q| <= 63) or "full" (|q| <= 127)
    notes: list[str] = field(default_factory=list)


def _check_exportable(model: nn.Module) -> None:
    from adagrow.grow.reparam import RepConv2d
    train_time = [n for n, m in model.named_modules() if isinstance(m, RepConv2d)]
    if train_time:
        raise ValueError(f"model is in train-time form (RepConv2d at {train_time[:3]}); export the deploy "
                         "form: adagrow.grow.reparam.reparameterize(model.eval())")


def _as_input(x: torch.Tensor) -> torch.Tensor:
    """CPU copy; float inputs as float32, token ids keep their integer dtype."""
    x = x.detach().cpu()
    return x.float() if x.is_floating_point() else x


def _batches(calib: Iterable | None, example: torch.Tensor) -> list[np.ndarray]:
    out = []
    for b in calib or []:
        x = batch_inputs(b)
        if tuple(x.shape[1:]) != tuple(example.shape[1:]):
            raise ValueError(f"calibration batch of shape {tuple(x.shape)} does not match the example input "
                             f"[B, {', '.join(map(str, example.shape[1:]))}]")
        out.append(_as_input(x).numpy())
    return out


def _float_twin(qmodel: nn.Module) -> tuple[nn.Module, dict[str, _QuantLayer]]:
    """Replace quantized layers by float layers holding the dequantized weights."""
    model = copy.deepcopy(qmodel)
    qlayers = {n: m for n, m in qmodel.named_modules() if isinstance(m, _QuantLayer)}
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


def _w4_weight(q: _QuantLayer) -> W4Weight | None:
    """The ONNX DequantizeLinear form of a 4-bit layer, or None when its groups have none."""
    g, gs = q.geo, q.group_size
    codes = unpack_codes(q.qweight.cpu(), 4)[:, : g.k].numpy().astype(np.uint8)  # [N, K] canonical
    scales, zeros = q.scales.float().cpu().numpy(), q.zeros.float().cpu().numpy().round().astype(np.uint8)
    if isinstance(q, QuantLinear):  # MatMul weight [K, N]: blocks along K (axis 0)
        if gs == -1:
            return W4Weight(codes.T.copy(), scales[0], zeros[0], axis=1, block_size=0)
        return W4Weight(codes.T.copy(), scales, zeros, axis=0, block_size=gs)
    kh, kw = g.kernel_size
    cg = g.cin_per_group
    w = codes.reshape(g.out_features, kh, kw, cg).transpose(0, 3, 1, 2)  # ONNX conv layout
    if gs == -1:
        return W4Weight(w.copy(), scales[0], zeros[0], axis=0, block_size=0)
    if isinstance(gs, str):  # one scale per (out, ky, kx): blocks of all C_in/g along axis 1
        row = q.position_group.cpu().numpy().astype(np.int64).reshape(kh, kw)
        s = scales[row].transpose(2, 0, 1)[:, None]  # [N, 1, kh, kw]
        z = zeros[row].transpose(2, 0, 1)[:, None]
        return W4Weight(w.copy(), s.astype(np.float32), z, axis=1, block_size=cg)
    if cg % gs:
        return None
    # contiguous K groups inside one kernel position: blocks of gs input channels along axis 1
    k_idx = (np.arange(kh)[:, None, None] * kw + np.arange(kw)[None, :, None]) * cg + np.arange(0, cg, gs)[None, None]
    s = scales[k_idx // gs].transpose(3, 2, 0, 1)  # [N, cg/gs, kh, kw]
    z = zeros[k_idx // gs].transpose(3, 2, 0, 1)
    return W4Weight(w.copy(), s.astype(np.float32), z, axis=1, block_size=gs)


def _match_initializers(graph: onnx.GraphProto, weights: dict[str, np.ndarray]) -> dict[str, str]:
    """Map each layer weight (key ``"<layer>.weight"``, PyTorch layout) to the ONNX initializer that
    holds it: by name, else by exact content, as is or transposed (Linear on 3-D input exports as
    MatMul on a folded ``[K, N]`` constant)."""
    names = {t.name for t in graph.initializer}
    by_content = {}
    for t in graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(t)
            by_content.setdefault((arr.shape, arr.tobytes()), t.name)
    out = {}
    for key, w in weights.items():
        if key in names:
            out[key] = key
            continue
        for cand in ([w, w.T] if w.ndim == 2 else [w]):
            hit = by_content.get((cand.shape, np.ascontiguousarray(cand).tobytes()))
            if hit:
                out[key] = hit
                break
    return out


def _export_float(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        f = os.path.join(tmp, "float.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(model, (example,), f, dynamo=False, opset_version=opset,
                                  input_names=[INPUT], output_names=[OUTPUT], do_constant_folding=True,
                                  dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
            except Exception as exc:  # the exporter's errors name the op without an ONNX rule
                raise ValueError(f"a layer of {type(model).__name__} has no ONNX export rule: {exc}") from exc
        return onnxslim.slim(onnx.load(f))


def ort_session(path: str | os.PathLike, threads: int | None = None, optimized_path: str | None = None,
                spinning: bool = True) -> ort.InferenceSession:
    """A CPU ONNX Runtime session (full graph optimisation), optionally saving the optimised graph.

    ``spinning=False`` stops idle worker threads from spinning, which keeps sessions that are timed
    side by side from stealing each other's cores.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare(path: Path, reference: nn.Module, example: torch.Tensor) -> tuple[float, float]:
    """(max |onnx - torch|, cosine similarity) on ``example``."""
    sess = ort_session(path)
    x = example.numpy()
    if sess.get_inputs()[0].type == "tensor(float16)":
        x = x.astype(np.float16)
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float64).ravel()
    with torch.no_grad():
        ref = reference(example).double().cpu().numpy().ravel()
    cos = float(got @ ref / max(np.linalg.norm(got) * np.linalg.norm(ref), 1e-30))
    return float(np.abs(got - ref).max()), cos


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, precision: str = "fp32",
                *, calib: Iterable | None = None, calib_method: str = DEFAULT_CALIB, percentile: float = 99.99,
                target: str = "onnxruntime", weights: str = "obs", quant_config: QuantConfig | None = None,
                weight_range: str | None = None, opset: int = 17, overwrite: bool = False,
                progress: bool = True) -> ExportReport:
    """Export a deploy-form model to ONNX and verify it with ONNX Runtime.

    Args:
        model: deploy form (RepConv2d fused); for ``w4`` it may already be quantized (4-bit).
        example_input: ``[B, ...]`` tensor; the batch dimension is dynamic in the graph.
        path: the ``.onnx`` file; an existing file is only replaced with ``overwrite=True``.
        precision: ``fp32`` | ``fp16`` (LayerNorm/Softmax kept fp32) | ``int8`` | ``w4``.
        calib: batches (tensors or (x, y)) for INT8 activation ranges and OBS weights.
        calib_method: ``mse`` (default) | ``minmax`` | ``percentile`` | ``entropy``.
        target: INT8 flavour: ``onnxruntime`` (Q/DQ placed so ORT fuses QLinearConv / QGemm,
            int32 biases) or ``tensorrt`` (int8 zero points 0, float biases, Q/DQ on residual adds).
        weights: INT8 weights from ``obs`` (error-compensated at the weight range) or ``rtn`` (rounding).
        weight_range: INT8 weight grid: ``reduced`` (7-bit, |q| <= 63; default for ``onnxruntime``:
            exact on every x86 CPU, since u8 x s8 kernels without VNNI saturate int16 pair sums of
            full-range weights) or ``full`` (|q| <= 127; default for ``tensorrt``, or for ORT on
            CPUs with VNNI / ARM dot products only).
        quant_config: W4 quantizer settings (default: OBS, tier groups for convs, g32 for Linear).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if calib_method not in CALIB_METHODS:
        raise ValueError(f"calib_method must be one of {CALIB_METHODS}, got {calib_method!r}")
    if weights not in ("obs", "rtn"):
        raise ValueError(f"weights must be 'obs' or 'rtn', got {weights!r}")
    weight_range = weight_range or DEFAULT_WEIGHT_RANGE[target]
    if weight_range not in WEIGHT_RANGES:
        raise ValueError(f"weight_range must be one of {tuple(WEIGHT_RANGES)}, got {weight_range!r}")
    wbits, wlevels = WEIGHT_RANGES[weight_range]
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    _check_exportable(model)
    example = _as_input(example_input)
    batches = _batches(calib, example)
    model = copy.deepcopy(model).cpu().float().eval()
    has_quant = any(isinstance(m, _QuantLayer) for m in model.modules())
    if has_quant and precision != "w4":
        raise ValueError(f"the model holds quantized layers: export precision='w4', or export the float "
                         f"deploy model for {precision!r}")
    if precision == "int8" and not batches:
        raise ValueError("INT8 export needs calibration batches (calib=...) for activation ranges")
    notes: list[str] = []
    reference = model
    scales: dict[str, np.ndarray] = {}
    dense: dict[str, np.ndarray] = {}
    w4: dict[str, W4Weight] = {}
    calib_t = [torch.from_numpy(b) for b in batches]
    if precision == "int8" and weights == "obs":
        cfg = QuantConfig(bits=wbits, sym=True, group_size=-1, linear_group_size=-1, order="act")
        qmodel = quantize(model, calib_t, cfg, progress=progress)
        model, qlayers = _float_twin(qmodel)
        scales = {f"{n}.weight": q.scales[0].float().numpy() for n, q in qlayers.items()}
        dense = {f"{n}.weight": model.get_submodule(n).weight.detach().numpy() for n in qlayers}
    elif precision == "w4":
        if not has_quant:
            cfg = quant_config or QuantConfig(bits=4, group_size="tier", linear_group_size=32)
            if cfg.bits != 4:
                raise ValueError(f"w4 export needs bits=4, quant_config has bits={cfg.bits}")
            if cfg.method == "obs" and not calib_t:
                raise ValueError("w4 export with OBS needs calibration batches (calib=...), or use method='rtn'")
            model = quantize(model, calib_t or None, cfg, progress=progress)
        reference = model
        bad = [n for n, m in model.named_modules() if isinstance(m, _QuantLayer) and m.bits != 4]
        if bad:
            raise ValueError(f"w4 export: layers {bad} are not 4-bit")
        model, qlayers = _float_twin(model)
        dense = {f"{n}.weight": model.get_submodule(n).weight.detach().numpy() for n in qlayers}
        for n, q in qlayers.items():
            ww = _w4_weight(q)
            if ww is None:
                notes.append(f"{n}: group size {q.group_size} does not divide C_in/g; weight kept as "
                             "exact dequantized float")
            else:
                w4[f"{n}.weight"] = ww
    graph = _export_float(model, example, opset)
    report = ExportReport(str(path), precision, target if precision == "int8" else None, opset, 0.0, 0.0)
    if precision == "fp16":
        from onnxconverter_common import float16
        with warnings.catch_warnings():  # it warns for every tiny weight it rounds into fp16 range
            warnings.simplefilter("ignore", UserWarning)
            graph = float16.convert_float_to_float16(graph, keep_io_types=True,
                                                     op_block_list=float16.DEFAULT_OP_BLOCK_LIST + FP16_KEEP_FP32)
    elif precision == "int8":
        names = activation_tensors(graph.graph, target)
        stats = collect_stats(graph, names, batches, progress=progress)
        plan = {}
        for n in names:
            aq = act_quant(0.0, stats[n].minimum, target)
            levels = 255 if aq.zero == 0 and aq.dtype == onnx.TensorProto.UINT8 else 127
            plan[n] = act_quant(threshold(stats[n], calib_method, levels, percentile), stats[n].minimum, target)
        match = _match_initializers(graph.graph, dense)
        missing = [k for k in scales if k not in match]
        if missing:
            notes.append(f"OBS scales not matched to ONNX weights (re-derived by rounding): {missing}")
        report.quantized_weights = quantize_weights_int8(graph, {match[k]: v for k, v in scales.items() if k in match},
                                                         plan, int32_bias=target == "onnxruntime", levels=wlevels)
        report.weight_range = weight_range
        report.qdq_tensors = insert_act_qdq(graph, plan)
    elif precision == "w4":
        graph = version_converter.convert_version(graph, 21)
        report.opset = 21
        match = _match_initializers(graph.graph, dense)
        missing = [k for k in w4 if k not in match]
        if missing:
            notes.append(f"4-bit weights not matched to ONNX initializers (kept as float): {missing}")
        report.quantized_weights = rewrite_w4(graph, {match[k]: v for k, v in w4.items() if k in match})
    onnx.checker.check_model(graph, full_check=True)
    atomic_write(path, lambda tmp: onnx.save(graph, tmp))
    report.max_abs_diff, report.cosine = compare(path, reference, example)
    report.notes = notes
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


