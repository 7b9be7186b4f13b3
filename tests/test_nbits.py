"""Low-bit ONNX weights: ONNX Runtime's MatMulNBits on signed-grid (negative) scales, the 4/8-bit
rewrite shared by the W4 and INT8 exports, int8 MatMul weights turned float at session load, and
what a failed verification reports."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from adagrow.compress.export.nbits import matmul_nbits_node
from adagrow.compress.export.qdq import NBitsWeight, int8_matmul_weights, rewrite_nbits
from adagrow.compress.export.verify import ExportCheckError, Verification, enforce, row_cosines, shapes_text
from adagrow.onnxrt import cpu_session

RNG = np.random.default_rng(0)


def _model(nodes: list, inits: list, opset: int = 21, rank: int = 2) -> onnx.ModelProto:
    dims = [f"d{i}" for i in range(rank)]  # dynamic axes of a known rank
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, dims)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _signed_grid(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """4-bit signed grid along K of ``w [K, N]``: each group's largest-magnitude weight on code 0,
    scale = that weight / -8 (negative when it is positive), zero point 8."""
    k, n = w.shape
    g = w.reshape(k // group, group, n)
    idx = np.abs(g).argmax(1)
    extreme = np.take_along_axis(g, idx[:, None], 1)[:, 0]   # [groups, N], sign kept
    scales = (extreme / -8).astype(np.float32)
    codes = np.clip(np.round(g / scales[:, None]) + 8, 0, 15).astype(np.uint8).reshape(k, n)
    return codes, scales


def test_negative_scales_compute_as_the_mirrored_positive_grid_at_levels_0_and_4() -> None:
    """A signed-grid layer (negative scales) and the same weights stored with positive scales
    (codes 15 - q, zero point 7: (q - 8) s = (15 - q - 7) |s|) give the same outputs (to float
    rounding) at accuracy level 0 and at level 4: ORT's int8 path does not depend on the scale's sign. Level 4's int8
    activations move the output by ~1% (what a decoder's check can trip on), level 0 is exact."""
    k, n, group = 256, 48, 32
    w = RNG.standard_normal((k, n)).astype(np.float32)
    codes, scales = _signed_grid(w, group)
    assert (scales < 0).any() and (scales > 0).any() and codes.min() == 0
    neg = np.repeat(scales < 0, group, 0)
    mirrored = np.where(neg, 15 - codes, codes).astype(np.uint8)
    zeros, mzeros = np.full(scales.shape, 8, np.uint8), np.where(scales < 0, 7, 8).astype(np.uint8)
    deq = (codes.astype(np.float32) - 8) * np.repeat(scales, group, 0)
    np.testing.assert_array_equal((mirrored.astype(np.float32) - np.repeat(mzeros, group, 0))
                                  * np.repeat(np.abs(scales), group, 0), deq)
    a = RNG.standard_normal((18, k)).astype(np.float32)
    a[3, 5] = 40.0  # an outlier in one block, as in SmolLM2's down_proj inputs
    want = a.astype(np.float64) @ deq
    for level in (0, 4):
        outs = []
        for c, s, z in ((codes, scales, zeros), (mirrored, np.abs(scales), mzeros)):
            node, inits = matmul_nbits_node("A", "Y", "W", c, s, z, group, level, "mm")
            outs.append(cpu_session(_model([node], inits)).run(None, {"A": a})[0])
        np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-5 * np.abs(want).max())  # rounding only
        err = np.linalg.norm(outs[0] - want) / np.linalg.norm(want)
        assert err < 1e-5 if level == 0 else 1e-3 < err < 0.03


@pytest.mark.parametrize("bits, level", [(4, 0), (8, 0), (8, 4), (4, None), (8, None)])
def test_rewrite_nbits_4_and_8_bit(bits: int, level: int | None) -> None:
    """The one MatMul rewrite of the W4 and INT8 exports: MatMulNBits at ``level`` (or, with
    None, uint4 / uint8 DequantizeLinear + MatMul) computing ``A @ ((q - z) s)``."""
    k, n, group = 64, 24, 32
    hi = 2**bits - 1
    codes = RNG.integers(0, hi + 1, (k, n)).astype(np.uint8)
    scales = RNG.uniform(0.01, 0.1, (k // group, n)).astype(np.float32)
    zeros = RNG.integers(0, hi + 1, scales.shape).astype(np.uint8)
    deq = (codes.astype(np.float32) - np.repeat(zeros, group, 0)) * np.repeat(scales, group, 0)
    model = _model([helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")],
                   [numpy_helper.from_array(RNG.standard_normal((k, n)).astype(np.float32), "W")])
    done, on_dq = rewrite_nbits(model, {"W": NBitsWeight(codes, scales, zeros, axis=0, block_size=group)}, level, bits)
    ops = [nd.op_type for nd in model.graph.node]
    assert done == 1 and ops == (["MatMulNBits"] if level is not None else ["DequantizeLinear", "MatMul"])
    assert on_dq == ([] if level is not None else ["mm"])
    onnx.checker.check_model(model)
    a = RNG.standard_normal((5, k)).astype(np.float32)
    got = cpu_session(model, optimize=level is not None).run(None, {"A": a})[0]  # None: no fusion, exact
    want = a.astype(np.float64) @ deq
    np.testing.assert_allclose(got, want, rtol=0, atol=(1e-4 if level in (0, None) else 0.05) * np.abs(want).max())
    with pytest.raises(ValueError, match="4- or 8-bit"):
        rewrite_nbits(model, {}, level, 3)


def test_int8_matmul_weights_are_cast_at_load_and_scaled_after(tmp_path) -> None:
    """int8 MatMul weights: ``(x @ float(q)) * s`` computes ``x @ (q s)`` (to float rounding), the
    Cast is folded into a float weight when the session loads, and a weight that feeds no MatMul
    is refused."""
    k, n = 40, 12
    w = RNG.standard_normal((k, n)).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")], [numpy_helper.from_array(w, "W")])
    assert int8_matmul_weights(model, {"W"}) == 1
    assert [nd.op_type for nd in model.graph.node] == ["Cast", "MatMul", "Mul"]
    q = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W_int8"))
    s = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W_wscale"))
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and s.shape == (n,)
    onnx.checker.check_model(model)
    a = RNG.standard_normal((3, k)).astype(np.float32)
    want = a.astype(np.float64) @ (q.astype(np.float64) * s)
    np.testing.assert_allclose(w, q * s, rtol=0, atol=np.abs(w).max() / 254 + 1e-7)  # the int8 grid's rounding
    np.testing.assert_allclose(cpu_session(model, optimize=False).run(None, {"A": a})[0], want, rtol=0,
                               atol=1e-5 * np.abs(want).max())
    got = cpu_session(model, optimized_path=str(tmp_path / "opt.onnx")).run(None, {"A": a})[0]
    assert "Cast" not in {nd.op_type for nd in onnx.load(tmp_path / "opt.onnx").graph.node}  # folded at load
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    add = _model([helper.make_node("Add", ["A", "W"], ["Y"])], [numpy_helper.from_array(w[0], "W")])
    with pytest.raises(ValueError, match="feed no MatMul"):
        int8_matmul_weights(add, {"W"})


def test_failed_check_reports_the_diverging_rows_and_the_hint() -> None:
    """One flipped token among 18 fails the whole-output cosine; the message says so (worst row
    vs the median) and carries the caller's hint."""
    ref = RNG.standard_normal((2, 9, 50))
    got = ref + 0.01 * RNG.standard_normal(ref.shape)
    got[1, 5] = -ref[1, 5]
    rows = row_cosines(got, ref)
    assert rows["rows"] == 18 and rows["worst"] < -0.99 and rows["median"] > 0.999
    v = Verification(0.9, 1.0, [{"inputs": "prefill", "shape": {}, "cosine": 0.9, "max_abs_diff": 1.0,
                                 "norm_ratio": 1.0, "rows": rows}])
    with pytest.raises(ExportCheckError, match=r"worst cosine -[01]\.\d+, median 0\.99\d+ over 18; try level 0"):
        enforce(v, "w4", "raise", "x.onnx", [], hint="try level 0")
    notes: list[str] = []
    with pytest.warns(RuntimeWarning, match="FAILED"):
        assert not enforce(v, "w4", "warn", "x.onnx", notes)
    assert len(notes) == 1 and "hint" not in notes[0]
    assert row_cosines(np.ones(3), np.ones(3)) == {}


def test_failure_message_groups_the_cache_shapes() -> None:
    """A decoder's check message names its 60 cache inputs once, not 60 times; inputs with their
    own shape keep their names."""
    shape = {"input_ids": [2, 9], "attention_mask": [2, 9],
             **{f"past_key_values.{i}.{kv}": [2, 3, 0, 64] for i in range(30) for kv in ("key", "value")}}
    text = shapes_text(shape)
    assert text == ("input_ids [2, 9], attention_mask [2, 9], "
                    "60 inputs past_key_values.0.key .. past_key_values.29.value [2, 3, 0, 64]")
    v = Verification(0.5, 1.0, [{"inputs": "prefill", "shape": shape, "cosine": 0.5, "max_abs_diff": 1.0,
                                 "norm_ratio": 1.0, "rows": {}}])
    with pytest.raises(ExportCheckError) as err:
        enforce(v, "fp32", "raise", "x.onnx", [])
    assert str(err.value).count("past_key_values") == 2
