"""ONNX export (fp32 / fp16 / INT8 Q/DQ / W4), calibration, TensorRT and Triton repository."""
import importlib.util
import re
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from adagrow.compress import QuantConfig, quantize
from adagrow.compress.export import (build_engine, export_onnx, export_triton_repository, fused_node_counts,
                                     profile_shapes)
from adagrow.compress.export.calibrate import TensorStats, threshold
from adagrow.compress.export.saturation import emulate_avx2, saturation_check, u8s8_accumulate
from adagrow.grow.nets import RepCNN, TinyViT
from adagrow.grow.reparam import reparameterize

has_trt = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def _cnn():
    torch.manual_seed(0)
    model = RepCNN(widths=(8, 16), depth=1, stem_width=8, branches=("conv5x5", "conv3x3", "conv1x3", "avg3x3"))
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return reparameterize(model.eval()), torch.randn(4, 1, 12, 12), [torch.randn(16, 1, 12, 12) for _ in range(3)]


def _vit():
    torch.manual_seed(0)
    return TinyViT(img_size=8, patch=4, dim=32, depth=1, heads=2).eval(), torch.randn(3, 1, 8, 8), \
        [torch.randn(16, 1, 8, 8) for _ in range(2)]


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return torch.relu(self.b(y) + y).mean((2, 3))


def _run(path, x, optimize: bool = True):
    """ONNX Runtime output; ``optimize=False`` runs the graph's own op semantics (no fusions)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _init(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_fp32_dynamic_batch_and_names(tmp_path) -> None:
    model, x, _ = _cnn()
    rep = export_onnx(model, x, tmp_path / "m.onnx")
    assert rep.max_abs_diff < 1e-4 and rep.cosine > 0.99999
    g = onnx.load(rep.path)
    assert [i.name for i in g.graph.input] == ["input"] and [o.name for o in g.graph.output] == ["output"]
    assert g.opset_import[0].version >= 17
    assert not any(n.op_type == "BatchNormalization" for n in g.graph.node)
    for b in (1, 7):
        xb = torch.randn(b, 1, 12, 12)
        np.testing.assert_allclose(_run(rep.path, xb), model(xb).detach().numpy(), atol=1e-4)


def test_fp16_keeps_norms_and_softmax_in_fp32(tmp_path) -> None:
    model, x, _ = _vit()
    rep = export_onnx(model, x, tmp_path / "v16.onnx", "fp16")
    g = onnx.load(rep.path)
    assert sum(t.data_type == TensorProto.FLOAT16 for t in g.graph.initializer) >= 5
    kept = [n for n in g.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert kept
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(g).graph.value_info}
    for n in kept:
        assert types.get(n.output[0]) == TensorProto.FLOAT, n.op_type
    assert rep.cosine > 0.9999 and rep.max_abs_diff < 0.05


def test_int8_onnxruntime_flavour_fuses(tmp_path) -> None:
    model, x, calib = _cnn()
    rep = export_onnx(model, x, tmp_path / "q.onnx", "int8", calib=calib, target="onnxruntime", progress=False)
    counts = fused_node_counts(rep.path)
    assert counts.get("QLinearConv", 0) >= 3 and counts.get("QGemm", 0) == 1, counts  # fails if nothing fused
    g = onnx.load(rep.path)
    inits = {t.name: t for t in g.graph.initializer}
    weights = [t for t in g.graph.initializer if t.name.endswith("_int8")]
    assert len(weights) == rep.quantized_weights == 4 and all(t.data_type == TensorProto.INT8 for t in weights)
    assert all(inits[n.input[0]].data_type == TensorProto.INT32 for n in g.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0].endswith("_int32"))
    assert any(n.input[0].endswith("_int32") for n in g.graph.node if n.op_type == "DequantizeLinear")
    assert rep.cosine > 0.999 and rep.weight_range == "reduced"
    # what a CPU without VNNI computes (saturating u8 x s8 pair sums) is as close to PyTorch
    emulated = emulate_avx2(rep.path, [{"input": x.numpy()}])[0][0].ravel()
    assert _cos(emulated, model(x).detach().numpy().ravel()) > 0.999


def test_int8_tensorrt_flavour_rules(tmp_path) -> None:
    model = _Residual().eval()
    x = torch.randn(2, 3, 9, 9)
    calib = [torch.randn(8, 3, 9, 9)]
    rep = export_onnx(model, x, tmp_path / "t.onnx", "int8", calib=calib, target="tensorrt",
                      calib_method="entropy", progress=False)
    g = onnx.load(rep.path)
    inits = {t.name: t for t in g.graph.initializer}
    for n in g.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert n.input[1] in inits and n.input[2] in inits  # constant scales and zero points
            zp = numpy_helper.to_array(inits[n.input[2]])
            assert zp.dtype == np.int8 and not zp.any()
    conv_bias = [n.input[2] for n in g.graph.node if n.op_type == "Conv"]
    assert all(inits[b].data_type == TensorProto.FLOAT for b in conv_bias)  # float bias
    producers = {o: n for n in g.graph.node for o in n.output}
    add = next(n for n in g.graph.node if n.op_type == "Add")
    assert all(producers[i].op_type == "DequantizeLinear" for i in add.input)  # Q/DQ on the residual add
    assert rep.cosine > 0.999


def test_int8_uses_obs_weights(tmp_path) -> None:
    model, x, calib = _cnn()
    rep = export_onnx(model, x, tmp_path / "o.onnx", "int8", calib=calib, weights="obs", progress=False)
    # the default ORT weight range is 7-bit: OBS runs at 7 bits so its error compensation matches
    # (and on the restricted symmetric grid: int8 Q/DQ weights stay in +-63)
    cfg = QuantConfig(bits=7, sym=True, sym_grid="restricted", group_size=-1, linear_group_size=-1, order="act",
                      bias_refit=False)  # the graph keeps the float biases
    q = quantize(model, calib, cfg, progress=False)
    g = onnx.load(rep.path)
    w = _init(g, "features.2.weight_int8").astype(np.float32) * _init(g, "features.2.weight_wscale")[:, None, None, None]
    np.testing.assert_array_equal(w, q.features[2].dequantize().numpy())
    assert not rep.notes


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_calibration_thresholds(method: str) -> None:
    rng = np.random.default_rng(0)
    vals = np.abs(np.concatenate([rng.normal(size=200_000), [40.0]]))  # one far outlier
    relu = np.concatenate([np.zeros(400_000), vals])  # ReLU-like: many exact zeros
    for data in (vals, relu):
        hist = np.histogram(data, bins=2048, range=(0, data.max()))[0]
        stats = TensorStats(float(data.max()), 0.0, hist)
        t = threshold(stats, method, 127, percentile=99.9)
        if method == "minmax":
            assert t == pytest.approx(40.0)
        elif method == "mse":  # the smallest simulated quantization error among the candidates
            def err(th: float) -> float:
                s = th / 127
                return float(np.mean((np.clip(np.round(data / s), -127, 127) * s - data) ** 2))
            others = [threshold(stats, m, 127, percentile=99.9) for m in ("minmax", "percentile", "entropy")]
            assert t < 40 and err(t) <= 1.01 * min(err(o) for o in others)
        elif method == "percentile":  # the 99.9th percentile, to one histogram bin
            assert t == pytest.approx(np.percentile(data, 99.9), abs=data.max() / 2048), t
        else:  # the outlier is clipped, the bulk (|x| < 4) is kept
            assert 2.5 < t < 12, (method, t)
    with pytest.raises(ValueError, match="calibration method"):
        threshold(TensorStats(1.0, 0.0, hist), "kl", 127)


def test_w4_blocked_int4_dequantize(tmp_path) -> None:
    model, x, calib = _vit()
    cfg = QuantConfig(bits=4, group_size=-1, linear_group_size=16)
    rep = export_onnx(model, x, tmp_path / "w4.onnx", "w4", calib=calib, progress=False, quant_config=cfg,
                      accuracy_level=None)
    g = onnx.load(rep.path)
    assert rep.opset == 21 and g.opset_import[0].version == 21
    dq4 = [n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_uint4")]
    assert len(dq4) == rep.quantized_weights == len(rep.runs_float) >= 5
    assert any(a.name == "block_size" and a.i == 16 for n in dq4 for a in n.attribute)
    assert fused_node_counts(rep.path).get("MatMulNBits", 0) >= 4  # ORT fuses DQ + MatMul (fp32 compute)
    from adagrow.compress.export.verify import weight_only
    assert not weight_only(rep.path)  # so ort_session keeps that fusion (no load-time folding)
    assert rep.passed and rep.cosine > rep.threshold == 0.98  # against the float model
    # the plain DequantizeLinear semantics reproduce the quantized PyTorch model exactly
    qmodel = quantize(model, calib, cfg, progress=False)
    np.testing.assert_allclose(_run(rep.path, x, optimize=False), qmodel(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group", [16, -1])
def test_w4_matmulnbits(tmp_path, group) -> None:
    """Linear weights become MatMulNBits (packing checked exactly at fp32 compute); the patch conv
    runs float on its dequantized weight and the report says so."""
    model, x, calib = _vit()
    cfg = QuantConfig(bits=4, group_size=-1, linear_group_size=group)
    qmodel = quantize(model, calib, cfg, progress=False)
    want = qmodel(x).detach().numpy()
    exact = export_onnx(qmodel, x, tmp_path / "a0.onnx", "w4", accuracy_level=0)
    np.testing.assert_allclose(_run(exact.path, x), want, rtol=1e-4, atol=1e-4)
    rep = export_onnx(qmodel, x, tmp_path / "a4.onnx", "w4", accuracy_level=4)
    nodes = [n for n in onnx.load(rep.path).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == rep.quantized_weights - 1 == 5 and all(n.domain == "com.microsoft" for n in nodes)
    attrs = {a.name: a.i for a in nodes[0].attribute}
    assert attrs["accuracy_level"] == 4 and attrs["bits"] == 4 and attrs["block_size"] == (16 if group == 16 else 32)
    assert rep.runs_float == ["/embed/Conv"] and any("/embed/Conv" in n for n in rep.notes)
    assert _cos(_run(rep.path, x), want) > 0.999  # int8 compute inside MatMulNBits


def test_w4_conv_tier_groups_are_exact(tmp_path) -> None:
    model, x, calib = _cnn()
    qmodel = quantize(model, calib, QuantConfig(bits=4, group_size="tier", linear_group_size=-1), progress=False)
    rep = export_onnx(qmodel, x, tmp_path / "w4c.onnx", "w4", accuracy_level=None)
    assert rep.quantized_weights == 4  # 3 convs (tier -> position blocks) + classifier
    assert not [n for n in rep.notes if "kept as" in n or "not matched" in n]
    np.testing.assert_allclose(_run(rep.path, x, optimize=False), qmodel(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert rep.cosine > 0.9999  # a pre-quantized model is its own reference
    # the default export (Linear -> MatMulNBits, convs DQ + Conv): ort_session folds the conv
    # DequantizeLinear nodes once at load; same outputs, no DQ left in the optimised graph
    from adagrow.compress.export.verify import ort_session, weight_only
    assert not weight_only(rep.path)  # here the classifier's DQ feeds a MatMul (fused, not folded)
    qmodel = quantize(model, calib, QuantConfig(bits=4, group_size="tier", linear_group_size=16), progress=False)
    rep = export_onnx(qmodel, x, tmp_path / "w4d.onnx", "w4")
    assert weight_only(rep.path) and any("once at load" in n for n in rep.notes)
    opt = tmp_path / "opt.onnx"
    folded = ort_session(rep.path, optimized_path=str(opt)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(folded, _run(rep.path, x, optimize=False), rtol=1e-4, atol=1e-5)
    assert "DequantizeLinear" not in {n.op_type for n in onnx.load(opt).graph.node}


def test_export_errors(tmp_path) -> None:
    model, x, calib = _cnn()
    train_form = RepCNN(widths=(8,), depth=1, stem_width=4).eval()
    with pytest.raises(ValueError, match="train-time form"):
        export_onnx(train_form, x, tmp_path / "a.onnx")
    with pytest.raises(ValueError, match=r"the example input \{'input': \[4, 3, 12, 12\]\} does not fit the model"):
        export_onnx(model, x.repeat(1, 3, 1, 1), tmp_path / "a.onnx")
    for opset in (9, "17", 21):  # below per-channel Q/DQ, a string, above the TorchScript exporter
        with pytest.raises(ValueError, match=f"opset must be an integer in 13..20, got {opset!r}"):
            export_onnx(model, x, tmp_path / "a.onnx", opset=opset)
    assert not (tmp_path / "a.onnx").exists()
    (tmp_path / "b.onnx").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_onnx(model, x, tmp_path / "b.onnx")
    assert (tmp_path / "b.onnx").read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="does not match the example input"):
        export_onnx(model, x, tmp_path / "c.onnx", "int8", calib=[torch.randn(4, 3, 12, 12)])
    with pytest.raises(ValueError, match="needs calibration batches"):
        export_onnx(model, x, tmp_path / "d.onnx", "int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        export_onnx(model, x, tmp_path / "e.onnx", "int4")
    qmodel = quantize(model, calib, QuantConfig(bits=4), progress=False)
    with pytest.raises(ValueError, match="holds quantized layers"):
        export_onnx(qmodel, x, tmp_path / "f.onnx", "fp32")

    class NoRule(nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x.flatten(1)).S

    with pytest.raises(ValueError, match="no ONNX export rule"):
        export_onnx(NoRule(), x, tmp_path / "g.onnx")


def _parse_pbtxt(text: str) -> dict:
    def tensors(section):
        body = re.search(section + r" \[(.*?)\n\]", text, re.S).group(1)
        return [(re.search(r'name: "(.*?)"', b).group(1), re.search(r"data_type: (\w+)", b).group(1),
                 [int(d) for d in re.search(r"dims: \[ (.*?) \]", b).group(1).split(", ")])
                for b in body.split("},")]
    return {"name": re.search(r'^name: "(.*?)"', text, re.M).group(1),
            "platform": re.search(r'platform: "(.*?)"', text).group(1),
            "max_batch_size": int(re.search(r"max_batch_size: (\d+)", text).group(1)),
            "input": tensors("input"), "output": tensors("output"),
            "kind": re.search(r"kind: (\w+)", text).group(1)}


def test_triton_repository_matches_graph(tmp_path) -> None:
    model, x, _ = _cnn()
    rep = export_onnx(model, x, tmp_path / "m.onnx", "fp16")
    dest = export_triton_repository(tmp_path / "repo", "digits", rep.path, max_batch_size=16,
                                    preferred_batch_sizes=(4, 16))
    cfg = _parse_pbtxt((dest / "config.pbtxt").read_text())
    assert (dest / "1" / "model.onnx").read_bytes() == (tmp_path / "m.onnx").read_bytes()
    g = onnx.load(rep.path)
    assert cfg["name"] == "digits" and cfg["platform"] == "onnxruntime_onnx" and cfg["max_batch_size"] == 16
    for (name, dtype, dims), vi in zip(cfg["input"] + cfg["output"], list(g.graph.input) + list(g.graph.output)):
        t = vi.type.tensor_type
        assert name == vi.name and dtype == {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16"}[t.elem_type]
        assert dims == [d.dim_value for d in t.shape.dim[1:]]
    assert "dynamic_batching" in (dest / "config.pbtxt").read_text()
    with pytest.raises(FileExistsError):
        export_triton_repository(tmp_path / "repo", "digits", rep.path)
    (tmp_path / "e.plan").write_bytes(b"plan")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="junk.onnx: not a readable ONNX model"):
        export_triton_repository(tmp_path / "repo", "junk", tmp_path / "junk.onnx")
    for kwargs, match in [(dict(instances=0), "instances must be an integer >= 1"),
                          (dict(max_queue_delay_us=-1), "max_queue_delay_us must be an integer >= 0"),
                          (dict(engine_path=tmp_path / "e.plan"), "TensorRT plan runs on the GPU")]:
        with pytest.raises(ValueError, match=match):  # configs Triton would refuse are not written
            export_triton_repository(tmp_path / "repo", "bad", rep.path, **kwargs)
    dest = export_triton_repository(tmp_path / "repo", "digits_trt", rep.path, tmp_path / "e.plan", kind="KIND_GPU")
    cfg = _parse_pbtxt((dest / "config.pbtxt").read_text())
    assert cfg["platform"] == "tensorrt_plan" and cfg["kind"] == "KIND_GPU" and (dest / "1" / "model.plan").exists()
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["digits", "digits_trt"]  # no staging left


def test_tensorrt_profile_and_clear_error(tmp_path, monkeypatch) -> None:
    model, x, _ = _cnn()
    rep = export_onnx(model, x, tmp_path / "m.onnx")
    assert profile_shapes(rep.path, 1, 8, 32) == {"input": ((1, 1, 12, 12), (8, 1, 12, 12), (32, 1, 12, 12))}
    with pytest.raises(ValueError, match="min_batch"):
        profile_shapes(rep.path, 8, 4, 32)
    if not has_trt:
        monkeypatch.setitem(sys.modules, "tensorrt", None)
        with pytest.raises(RuntimeError, match="TensorRT is not installed"):
            build_engine(rep.path, tmp_path / "m.plan")
        assert not (tmp_path / "m.plan").exists()


@pytest.mark.skipif(not has_trt, reason="needs the tensorrt package and an NVIDIA GPU")
def test_tensorrt_builds_int8_engine(tmp_path) -> None:
    model, x, calib = _cnn()
    rep = export_onnx(model, x, tmp_path / "q.onnx", "int8", calib=calib, target="tensorrt", progress=False)
    plan = build_engine(rep.path, tmp_path / "q.plan", timing_cache=tmp_path / "cache.bin")
    assert plan.stat().st_size > 0 and (tmp_path / "cache.bin").exists()


def test_int8_with_initializers_shared_by_the_simplifier(tmp_path) -> None:
    """onnxslim merges identical initializers (here two all-zero biases); each conv must still get
    its own int32 bias (its scale depends on that conv's input and weight scales)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].bias.zero_()
        model[2].bias.zero_()
    x = torch.randn(2, 3, 9, 9)
    from adagrow.compress.export.inputs import input_spec, named_inputs
    from adagrow.compress.export.onnx_export import _export_float
    g = _export_float(model, input_spec(model, named_inputs(x), None), 17)
    biases = [n.input[2] for n in g.graph.node if n.op_type == "Conv"]
    assert len(set(biases)) == 1  # the situation under test: one shared bias initializer
    rep = export_onnx(model, x, tmp_path / "s.onnx", "int8", calib=[torch.randn(8, 3, 9, 9)], progress=False)
    assert fused_node_counts(rep.path).get("QLinearConv") == 2 and rep.cosine > 0.999


def test_bert_token_id_inputs_stay_integer(tmp_path) -> None:
    from adagrow.grow import GrowingTransformer
    torch.manual_seed(0)
    model = GrowingTransformer("bert", dim=16, head_dim=4, heads=2, depth=1, mlp_per_head=8, num_classes=3,
                               vocab_size=50, max_len=12).eval()
    ids = torch.randint(0, 50, (3, 12))
    rep = export_onnx(model, ids, tmp_path / "b.onnx", "int8", calib=[torch.randint(0, 50, (8, 12))], progress=False)
    g = onnx.load(rep.path)
    assert g.graph.input[0].type.tensor_type.elem_type == TensorProto.INT64
    assert rep.cosine > 0.999


def test_u8s8_pair_saturation_reference() -> None:
    """vpmaddubsw: adjacent u8 x s8 products summed and clipped to int16, then exact int32 sums."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    w = rng.integers(-127, 128, (7, 3), dtype=np.int8)
    a[0], w[:, 0] = 250, 120  # one row x column whose pairs overflow int16
    sat, exact = u8s8_accumulate(a, w)
    ref_exact = a.astype(np.int64) @ w.astype(np.int64)
    ref_sat = np.zeros_like(ref_exact)
    for m in range(5):
        for n in range(3):
            for k in range(0, 7, 2):
                pair = sum(int(a[m, j]) * int(w[j, n]) for j in (k, k + 1) if j < 7)
                ref_sat[m, n] += min(max(pair, -32768), 32767)
    np.testing.assert_array_equal(exact, ref_exact)
    np.testing.assert_array_equal(sat, ref_sat)
    assert sat[0, 0] == 3 * 32767 + 250 * 120 < exact[0, 0] == 7 * 250 * 120
    sat, exact = u8s8_accumulate(np.full((1, 2), 255, np.uint8), np.full((2, 1), 63, np.int8))
    assert sat[0, 0] == exact[0, 0] == 32130  # the largest 7-bit pair sum fits int16


@pytest.mark.parametrize("make", [_cnn, _vit])
def test_int8_for_onnxruntime_cannot_saturate(tmp_path, make) -> None:
    """The default ORT INT8 graph gives the same int32 accumulations on every x86 CPU: emulated
    saturating pair sums equal exact ones for the calibration inputs; full-range weights do not."""
    model, x, calib = make()
    feeds = [{"input": b.numpy()} for b in calib]
    rep = export_onnx(model, x, tmp_path / "r.onnx", "int8", calib=calib, progress=False)
    stats = saturation_check(rep.path, feeds)
    assert len(stats) == rep.quantized_weights and all(s.outputs > 0 for s in stats)
    assert all(s.max_abs_weight <= 63 for s in stats)
    assert [s.node for s in stats if s.outputs_differing] == []
    # full-range weights, every unit quantized (no mixed-precision search: that search runs on the
    # host's ONNX Runtime, whose result depends on the CPU; this test is about the weight range)
    full = export_onnx(model, x, tmp_path / "f.onnx", "int8", calib=calib, weight_range="full",
                       target_cosine=None, progress=False)
    assert full.weight_range == "full"
    stats = saturation_check(full.path, feeds)
    assert max(s.max_abs_weight for s in stats) == 127
    assert sum(s.outputs_differing for s in stats) > 0
    ref, feed = model(x).detach().numpy(), [{"input": x.numpy()}]
    assert _cos(_exact_int8(full.path, feed), ref) > 0.999  # what a VNNI CPU computes...
    assert _cos(emulate_avx2(full.path, feed)[0][0], ref) < 0.995  # ...and an AVX2-only one
    assert _cos(emulate_avx2(rep.path, feed)[0][0], ref) > 0.999  # the default is safe on both


def _exact_int8(path, feeds):
    """The Q/DQ graph with exact int32 accumulation (ONNX's reference evaluator: no saturation)."""
    from onnx.reference import ReferenceEvaluator
    from onnx import version_converter
    from adagrow.compress.export.saturation import REF_OPSET
    model = onnx.load(str(path))
    if model.opset_import[0].version < REF_OPSET:
        model = version_converter.convert_version(model, REF_OPSET)
    return ReferenceEvaluator(model).run(None, feeds[0])[0]


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64,
                                  initializer_range=0.2)  # branches as strong as the residual stream
    model = transformers.BertModel(cfg).eval()

    def batch(b: int, length: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(b, length, dtype=torch.int64)
        mask[0, length // 2:] = 0  # one padded sentence
        return {"input_ids": torch.randint(1, 100, (b, length), generator=g),
                "token_type_ids": torch.zeros(b, length, dtype=torch.int64), "attention_mask": mask}
    return model, batch


def test_hf_named_inputs_dynamic_sequence_and_triton(tmp_path) -> None:
    import onnxruntime as ort
    model, batch = _tiny_bert()
    rep = export_onnx(model, batch(2, 8, 0), tmp_path / "b.onnx", verify_lengths=[5, 13])
    assert rep.inputs == ["input_ids", "token_type_ids", "attention_mask"]
    assert rep.outputs == ["last_hidden_state", "pooler_output"]
    assert [c["shape"]["input_ids"] for c in rep.verification] == [[2, 8], [2, 5], [2, 13]]
    assert rep.passed and rep.cosine > 0.9999
    g = onnx.load(rep.path)
    for vi in g.graph.input:
        assert [d.dim_param for d in vi.type.tensor_type.shape.dim] == ["batch", "sequence"]
        assert vi.type.tensor_type.elem_type == TensorProto.INT64
    sess = ort.InferenceSession(rep.path, providers=["CPUExecutionProvider"])
    feed = batch(3, 21, 1)  # another batch size and length, with padding
    got = sess.run(None, {k: v.numpy() for k, v in feed.items()})
    with torch.no_grad():
        ref = model(**feed)
    np.testing.assert_allclose(got[0], ref.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(got[1], ref.pooler_output.numpy(), atol=1e-4)
    cfg = _parse_pbtxt((export_triton_repository(tmp_path / "repo", "bert", rep.path) / "config.pbtxt").read_text())
    assert cfg["input"] == [(n, "TYPE_INT64", [-1]) for n in rep.inputs]
    assert cfg["output"] == [("last_hidden_state", "TYPE_FP32", [-1, 32]), ("pooler_output", "TYPE_FP32", [32])]


def test_export_obs_calibration_skips_padding() -> None:
    """Export quantizes named-input models with the batches as keyword arguments, so the
    attention mask keeps padded tokens out of the Hessians: the same weights as quantize()."""
    from adagrow.compress.export.inputs import input_spec
    from adagrow.compress.export.onnx_export import _quantize
    model, batch = _tiny_bert()
    calib = [batch(4, 12, s) for s in range(2)]
    cfg = QuantConfig(bits=4, group_size=-1, linear_group_size=16)
    ours = _quantize(model, input_spec(model, calib[0], None), calib, cfg, progress=False)
    ref = quantize(model, calib, cfg, progress=False)
    name = "encoder.layer.1.output.dense"
    assert torch.equal(ours.get_submodule(name).dequantize(), ref.get_submodule(name).dequantize())


def test_smoothing_is_exact_and_shares_qkv_scales() -> None:
    from adagrow.compress.export.smooth import SmoothedLinear, smooth_linears
    model, batch = _tiny_bert()
    calib = [batch(4, 12, s) for s in range(2)]
    with torch.no_grad():
        model.encoder.layer[0].attention.output.LayerNorm.weight[3] = 20.0  # an outlier channel
        ref = [model(**b).last_hidden_state for b in calib]
    spread = smooth_linears(model, lambda: [model(**b) for b in calib], alpha=0.5)
    assert len(spread) == 13 and all(isinstance(m, SmoothedLinear) for n, m in model.named_modules()
                                     if n.endswith(("query", "key", "value", "dense")))
    att = model.encoder.layer[1].attention.self
    assert torch.equal(att.query.inv_scale, att.key.inv_scale) and torch.equal(att.key.inv_scale, att.value.inv_scale)
    assert spread["encoder.layer.0.intermediate.dense"] > 5  # the outlier channel is divided down
    with torch.no_grad():
        for b, r in zip(calib, ref):
            torch.testing.assert_close(model(**b).last_hidden_state, r, rtol=1e-4, atol=1e-5)


def test_int8_bert_smoothing_mixed_precision_and_saturation(tmp_path) -> None:
    model, batch = _tiny_bert()
    with torch.no_grad():
        model.encoder.layer[0].attention.output.LayerNorm.weight[3] = 30.0  # BERT-like activation outlier
    calib, held, x = [batch(8, 16, s) for s in range(2)], [batch(4, 16, 9)], batch(2, 16, 5)
    kw = dict(calib=calib, verify_inputs=held, progress=False)
    plain = export_onnx(model, x, tmp_path / "p.onnx", "int8", target_cosine=None, **kw)
    smooth = export_onnx(model, x, tmp_path / "s.onnx", "int8", target_cosine=None, smooth=0.5, **kw)
    assert 1 - smooth.cosine < 0.3 * (1 - plain.cosine)  # outlier migrated into the weights
    assert smooth.smoothed["encoder.layer.0.intermediate.dense"] > 5
    mixed = export_onnx(model, x, tmp_path / "m.onnx", "int8", target_cosine=0.9999, **kw)
    kept = mixed.kept_float
    assert mixed.calibration_cosine < 0.9999 <= kept[-1].cosine_after and len(kept) < 6  # float where needed
    assert kept[0].node == "/model/encoder/layer.0/intermediate/dense/MatMul"  # the layer fed by the outlier
    assert kept[0].node in {n.name for n in onnx.load(mixed.path).graph.node}  # still a float MatMul
    assert mixed.quantized_weights == plain.quantized_weights - sum("MatMul_" not in k.node for k in kept)
    assert [k.reason() for k in kept] == [n for n in mixed.notes if "kept float" in n]
    assert 1 - mixed.cosine < 0.5 * (1 - plain.cosine)
    feeds = [{k: v.numpy() for k, v in b.items()} for b in calib]
    assert not [s.node for s in saturation_check(smooth.path, feeds) if s.outputs_differing]


def test_verification_fails_loudly(tmp_path) -> None:
    from adagrow.compress.export import ExportCheckError
    model, x, calib = _cnn()
    tiny = [0.02 * b for b in calib]  # ranges far too small for the real inputs: clipped activations
    with pytest.raises(ExportCheckError, match="FAILED verification.*threshold 0.99"):
        export_onnx(model, x, tmp_path / "bad.onnx", "int8", calib=tiny, target_cosine=None, progress=False)
    assert not (tmp_path / "bad.onnx").exists() and not list(tmp_path.iterdir())  # nothing written
    with pytest.warns(RuntimeWarning, match="FAILED verification"):
        rep = export_onnx(model, x, tmp_path / "bad.onnx", "int8", calib=tiny, target_cosine=None, check="warn",
                          progress=False)
    assert not rep.passed and rep.cosine < 0.99 and (tmp_path / "bad.onnx").exists()
    assert any("FAILED verification" in n for n in rep.notes)
    x_nan = x.clone()
    x_nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="example_input contains NaN"):
        export_onnx(model, x_nan, tmp_path / "n.onnx")
    with pytest.raises(ValueError, match="calibration batches are all zero"):
        export_onnx(model, x, tmp_path / "z.onnx", "int8", calib=[torch.zeros_like(b) for b in calib])
    with pytest.warns(UserWarning, match="also appear in the calibration"):
        export_onnx(model, calib[0][:4], tmp_path / "o.onnx", "int8", calib=calib, progress=False)


def test_bench_suite_sequence_axis(tmp_path) -> None:
    """Bench suites time token-input ONNX models at every sequence length; image models stay per batch."""
    from adagrow.bench import SUITE_DEFAULTS, run_suite
    model, batch = _tiny_bert()
    rep = export_onnx(model, batch(2, 8, 0), tmp_path / "b.onnx")
    suite = {**SUITE_DEFAULTS, "warmup": 1, "runs": 2, "batch_sizes": [1, 3], "seq_lens": [5, 17],
             "models": [{"name": "bert", "path": rep.path, "backends": ["ort-cpu"], "precisions": ["fp32"]}]}
    rows = run_suite(suite, progress=False)["rows"]
    assert [(r["batch"], r["seq"], r["status"]) for r in rows] == [(1, 5, "ok"), (1, 17, "ok"), (3, 5, "ok"),
                                                                   (3, 17, "ok")]
