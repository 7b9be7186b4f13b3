"""Triton kernels against the float32 dequantized reference (interpreter mode on CPU).

W4A16 tolerance: :func:`adagrow.kernels.w4a16.error_bound`, the fp16/bf16 rounding bound
``2 eps (|x| @ |W|) + K 2^-24 (|x| @ (|W| + 32 S))`` elementwise (weight and output rounding,
fp32 accumulation and the GEMV's per-group cancellation). It grows with K; an indexing or
packing bug gives errors of the size of y itself.
"""
import pytest
import torch
from torch import nn

from adagrow.compress import QuantConfig, QuantConv2d, QuantLinear, quantize, rtn_quantize
from adagrow.compress.qmodules import from_result
from adagrow.packed import column_groups, dequantize_packed, pack_scale_zero, unpack_scale_zero
from adagrow.kernels import w4a16_matmul_ref
from adagrow.kernels import w4a16 as w4

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compile, CUDA graphs)")
# Triton's CPU interpreter computes tl.dot on bfloat16 operands wrongly (garbage ~1e10, checked
# with a 16x16 kernel of nothing but tl.dot); bf16 paths without tl.dot run in the interpreter.
bf16_dot = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="Triton's interpreter mis-computes bfloat16 tl.dot; runs on CUDA")
# small configs keep the interpreter fast: (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages)
SMALL = {"gemv": (1, 64, 32, 2, 4, 1), "splitk": (16, 64, 32, 3, 4, 1), "gemm": (16, 64, 64, 1, 4, 1)}


def _packed_linear(k: int, n: int, group_size: int, sym: bool, seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    return rtn_quantize(lin, bits=4, group_size=group_size, sym=sym)


def _scales(res, k: int, gs: int) -> torch.Tensor:
    """``[N, K]`` float32 scale of every weight."""
    return res.scales.float().t()[:, column_groups(res.qweight.shape[0] * 8, gs)][:, :k]


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, s: torch.Tensor) -> None:
    """``w``, ``s``: ``[N, K]`` float32 weight and scales; ref float32."""
    bound = w4.error_bound(x, w, s)
    err = (y.float() - ref).abs()
    assert torch.all(err <= bound), f"max err {err.max():.3e}, bound there {bound.flatten()[err.argmax()]:.3e}"


# m, k, n, group size, sym: odd shapes; group 40 / 24 / 8 tiles span several groups (scales per word row)
CASES = [(1, 72, 24, -1, False), (1, 584, 136, 128, True), (3, 200, 40, 64, False), (3, 72, 136, 32, True),
         (17, 584, 40, 40, False), (17, 200, 24, -1, True), (64, 200, 136, 24, False), (64, 72, 40, 8, True)]


@pytest.mark.parametrize("m,k,n,gs,sym", CASES)
def test_w4a16_every_path(m: int, k: int, n: int, gs: int, sym: bool) -> None:
    res = _packed_linear(k, n, gs, sym)
    x = torch.randn(m, k, dtype=torch.float16)
    w = dequantize_packed(res.qweight, res.scales, res.zeros, 4, k, gs)
    ref = x.float() @ w.t()
    assert torch.equal(w4a16_matmul_ref(x, res.qweight, res.scales, res.zeros, gs), ref.half())
    paths = ["gemv", "splitk"] if m == 1 else ["splitk", "gemm"]
    for path in paths:
        y = w4.w4a16_triton(x, res.qweight, res.scales, res.zeros, gs, path=path, config=SMALL[path])
        assert y.dtype == torch.float16 and y.shape == (m, n)
        _check(y, x, w, ref, _scales(res, k, gs))


@pytest.mark.parametrize("sdt", [torch.float16, torch.bfloat16])
def test_w4a16_scale_zero_pairs_exact_in_both_scale_dtypes(sdt: torch.dtype) -> None:
    """The kernels' (s, z) pairs are a lossless repack (one 4-byte element: s in the low half),
    and the kernels unpack fp16 and bf16 scales alike: GEMV and split-K with bf16 scales under
    fp16 activations match the reference within the fp16 bound."""
    res = _packed_linear(200, 40, 64, False, seed=3)
    s, z = res.scales.to(sdt), res.zeros.to(sdt)
    sz = pack_scale_zero(s, z)
    assert sz.shape == (*s.shape, 2) and sz.dtype == sdt
    assert all(torch.equal(a, b) for a, b in zip(unpack_scale_zero(sz), (s, z)))
    low = sz.view(torch.int32).squeeze(-1) & 0xFFFF  # little-endian: s is the low half of the int32
    assert torch.equal(low, s.view(torch.int16).to(torch.int32) & 0xFFFF)
    w = dequantize_packed(res.qweight, s, z, 4, 200, 64)
    for m, path in ((1, "gemv"), (3, "splitk")):
        x = torch.randn(m, 200, dtype=torch.float16)
        y = w4.w4a16_triton_sz(x, res.qweight, sz, 64, path=path, config=SMALL[path])
        _check(y, x, w, x.float() @ w.t(), s.float().t()[:, column_groups(res.qweight.shape[0] * 8, 64)][:, :200])
    with pytest.raises(TypeError, match="share a float16/bfloat16 dtype"):
        pack_scale_zero(s, z.float())
    with pytest.raises(TypeError, match=r"\[n_groups, N, 2\]"):
        w4.w4a16_matmul_sz(torch.randn(1, 200, dtype=torch.float16), res.qweight, s, 64)


def test_w4a16_default_gemv_row_long_k() -> None:
    """The shipped default GEMV row at M = 1 with K long enough that each of its SPLIT_K
    programs loops several times (the prefetch runs past the last tile), twice in a row."""
    cfg = w4.CONFIGS["gemv"][0]
    k = cfg[2] * cfg[3] * 3 - 72  # 3 iterations per program, the last K tile partly masked
    res = _packed_linear(k, 40, 128, False)
    x = torch.randn(1, k, dtype=torch.float16)
    w = dequantize_packed(res.qweight, res.scales, res.zeros, 4, k, 128)
    assert w4.lookup_config(1, 40, res.qweight.shape[0] * 8, 128, x.dtype, x.device) == cfg
    for _ in range(2):
        y = w4.w4a16_matmul(x, res.qweight, res.scales, res.zeros, 128)
        _check(y, x, w, x.float() @ w.t(), _scales(res, k, 128))


def test_w4a16_split_workspace_per_call_interleaved(monkeypatch) -> None:
    """Interleaved shapes and paths: every split-K call gets its own workspace from the
    allocator (never one another call saw), each tile counter ends at SPLIT_K (every program
    of the tile arrived once, the last one wrote y) and every result matches the reference."""
    seen: list[tuple[w4.LaunchPlan, torch.Tensor, torch.Tensor]] = []
    real = w4.split_workspace

    def spy(plan, device):
        ws, cnt = real(plan, device)
        assert not cnt.any(), "counters must start at zero"
        assert all(ws.data_ptr() != old.data_ptr() for _, old, _ in seen), "workspace shared with an earlier call"
        seen.append((plan, ws, cnt))
        return ws, cnt

    monkeypatch.setattr(w4, "split_workspace", spy)
    layers = {(k, n, gs): _packed_linear(k, n, gs, False, seed=k + n) for k, n, gs in
              [(200, 40, 64), (584, 136, 128), (72, 24, -1)]}
    calls = [(1, 200, 40, 64, "gemv"), (17, 584, 136, 128, "splitk"), (1, 72, 24, -1, "gemv"),
             (3, 200, 40, 64, "splitk"), (1, 584, 136, 128, "gemv"), (17, 200, 40, 64, "splitk")]
    for m, k, n, gs, path in calls:
        res = layers[(k, n, gs)]
        x = torch.randn(m, k, dtype=torch.float16)
        w = dequantize_packed(res.qweight, res.scales, res.zeros, 4, k, gs)
        y = w4.w4a16_triton(x, res.qweight, res.scales, res.zeros, gs, path=path, config=SMALL[path])
        _check(y, x, w, x.float() @ w.t(), _scales(res, k, gs))
        plan, ws, cnt = seen[-1]
        split = plan.config[3]
        assert plan.tiles == cnt.numel() and plan.ws_floats == ws.numel() == split * m * n
        assert torch.equal(cnt, torch.full_like(cnt, split)), f"tile counters {cnt.tolist()} != {split}"
    assert len(seen) == len(calls)
    assert not hasattr(w4, "_WORKSPACE"), "no workspace may outlive a call"


def test_w4a16_int64_offsets_when_needed() -> None:
    """Offsets past 2^31 switch the kernel to int64 indexing (a 128k-vocab head at M >= 16.4k)."""
    assert not w4.plan_for("gemm", w4.CONFIGS["gemm"][0], 4096, 8192, 8192, 128).meta["WIDE"]
    assert w4.plan_for("gemm", w4.CONFIGS["gemm"][0], 16_400, 131_072, 4096, 128).meta["WIDE"]
    assert w4.plan_for("splitk", (16, 256, 64, 4, 8, 3), 32, 8192, 8192, 128).meta["enable_fp_fusion"] is True


def test_w4a16_int64_offsets_compute_the_same(monkeypatch) -> None:
    """The int64-offset variant (``WIDE``) of every path, forced on small shapes by lowering the
    limit, matches the reference like the int32 one."""
    monkeypatch.setattr(w4, "INT32_LIMIT", 1000)
    monkeypatch.setattr(w4, "_PLANS", {})
    res = _packed_linear(200, 40, 64, False, seed=5)
    w = dequantize_packed(res.qweight, res.scales, res.zeros, 4, 200, 64)
    for m, path in ((1, "gemv"), (17, "splitk"), (33, "gemm")):
        x = torch.randn(m, 200, dtype=torch.float16)
        assert w4.plan_for(path, SMALL[path], m, 40, 256, 64).meta["WIDE"]
        y = w4.w4a16_triton(x, res.qweight, res.scales, res.zeros, 64, path=path, config=SMALL[path])
        _check(y, x, w, x.float() @ w.t(), _scales(res, 200, 64))


def test_w4a16_table_keyed_by_capability_and_sm_count(monkeypatch) -> None:
    """An "NVIDIA H200" (9.0, 132 SMs) selects the Hopper rows whatever its name; an H100 PCIe
    (9.0, 114 SMs) takes the nearest Hopper entry; an unknown capability gets none."""
    import types
    props = {"NVIDIA H200": (9, 0, 132), "NVIDIA H100 PCIe": (9, 0, 114), "NVIDIA GH200 480GB": (9, 0, 132),
             "NVIDIA L4": (8, 9, 58)}
    for name, (major, minor, sms) in props.items():
        fake = types.SimpleNamespace(name=name, major=major, minor=minor, multi_processor_count=sms)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None, f=fake: f)
        key = w4.device_key(torch.device("cuda", 0))
        rows = w4.table_rows(key)
        if major == 9:
            assert rows is w4.shipped_table()["9.0/132"], name
        else:
            assert rows == {}, name
    assert w4.device_key(torch.device("cpu")) == "cpu"


def _run_op(m: int, dtype: torch.dtype) -> None:
    res = _packed_linear(200, 40, 64, False, seed=m)
    x = torch.randn(2, m, 200, dtype=dtype)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args = [t.to(dev) for t in (x, res.qweight, res.scales, res.zeros)]
    w = dequantize_packed(res.qweight, res.scales, res.zeros, 4, 200, 64)
    y = torch.ops.adagrow.w4a16_matmul(*args, 64).cpu()
    assert y.shape == (2, m, 40) and y.dtype == dtype
    _check(y.reshape(-1, 40), x.reshape(-1, 200), w, x.reshape(-1, 200).float() @ w.t(), _scales(res, 200, 64))


@pytest.mark.parametrize("m", [1, 5, 40])
def test_w4a16_op_default_dispatch_with_batch_dims(m: int) -> None:
    _run_op(m, torch.float16)  # M = 2, 10, 80 rows: split-K and GEMM with the table's default rows


def test_w4a16_bf16_gemv() -> None:
    res = _packed_linear(200, 40, 64, True)
    x = torch.randn(1, 200, dtype=torch.bfloat16)
    w = dequantize_packed(res.qweight, res.scales, res.zeros, 4, 200, 64)
    y = w4.w4a16_triton(x, res.qweight, res.scales, res.zeros, 64, path="gemv", config=SMALL["gemv"])
    _check(y, x, w, x.float() @ w.t(), _scales(res, 200, 64))


@bf16_dot
@pytest.mark.parametrize("m", [5, 40])
def test_w4a16_bf16_dot_paths(m: int) -> None:
    _run_op(m, torch.bfloat16)


def test_w4a16_dispatch_and_group_support() -> None:
    assert [w4.path_for(m) for m in (1, 2, 32, 33, 256)] == ["gemv", "splitk", "splitk", "gemm", "gemm"]
    assert [w4.m_bucket(m) for m in (1, 2, 16, 17, 1000)] == [1, 2, 16, 32, 256]
    assert all(w4.kernel_supports(g) for g in (-1, 8, 24, 128)) and not any(map(w4.kernel_supports, (0, 12, -2)))
    for path in w4.CONFIGS:  # off CUDA every row can run every group size
        assert w4.valid_configs(path, 24) == w4.CONFIGS[path]
    res = _packed_linear(72, 24, 8, False)
    with pytest.raises(ValueError, match="gemv path computes one row"):
        w4.w4a16_triton(torch.randn(2, 72, dtype=torch.float16), res.qweight, res.scales, res.zeros, 8, path="gemv")
    with pytest.raises(ValueError, match="BLOCK_M must be >= 16"):
        w4.w4a16_triton(torch.randn(2, 72, dtype=torch.float16), res.qweight, res.scales, res.zeros, 8,
                        path="splitk", config=(8, 64, 32, 1, 4, 1))


def test_w4a16_configs_that_do_not_fit_are_skipped_with_reason(monkeypatch) -> None:
    """CUDA launch-time check (faked here): the compiled kernel's shared memory against the
    device limit, and rows restricted to other archs; nothing that fails is returned."""
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(w4, "smem_limit", lambda device: 100_000)
    sm90_row = w4.CONFIGS["gemm"][-1]
    monkeypatch.setattr(w4, "ARCH_ONLY", {sm90_row: (90,)})
    assert "only for sm_90" in w4.config_problem("gemm", sm90_row, 128, torch.float16, dev)
    rows = [c for c in w4.CONFIGS["gemm"] if c not in w4.ARCH_ONLY]
    smem = {("gemm", c, 128, torch.float16, dev): 120_000 if i == 0 else 50_000 for i, c in enumerate(rows)}
    monkeypatch.setattr(w4, "_SMEM", smem)
    assert "needs 120000 B of shared memory" in w4.config_problem("gemm", rows[0], 128, torch.float16, dev)
    assert w4.valid_configs("gemm", 128, torch.float16, dev) == rows[1:]
    monkeypatch.setattr(w4, "_SMEM", {k: 120_000 for k in smem})
    with pytest.raises(ValueError, match="no w4a16 gemm config can run here"):
        w4.valid_configs("gemm", 128, torch.float16, dev)


def test_w4a16_config_lookup_order(monkeypatch) -> None:
    """User tuning cache, then the shipped per-GPU table (rows not in CONFIGS ignored), then the
    table's default row; the shipped file's rows are all table configs."""
    for rows in w4.shipped_table().values():
        for key, cfg in rows.items():
            m = int(key.split(",")[2])
            assert tuple(cfg) in w4.CONFIGS[w4.path_for(m)], (key, cfg)
    dev, dt = torch.device("cpu"), torch.float16
    monkeypatch.setattr(w4, "_TABLE", {"cpu": {"40,256,1": list(w4.CONFIGS["gemv"][2]), "40,256,16": [1, 2, 3]}})
    monkeypatch.setattr(w4, "_TUNED", {})
    monkeypatch.setattr(w4, "_LOOKUP", {})
    assert w4.lookup_config(1, 40, 256, 128, dt, dev) == w4.CONFIGS["gemv"][2]
    assert w4.lookup_config(9, 40, 256, 128, dt, dev) == w4.CONFIGS["splitk"][0]
    w4._TUNED[w4._key("gemv", 1, 40, 256, 128, dt, dev)] = w4.CONFIGS["gemv"][1]
    w4._LOOKUP.clear()
    assert w4.lookup_config(1, 40, 256, 128, dt, dev) == w4.CONFIGS["gemv"][1]


def test_w4a16_errors() -> None:
    res = _packed_linear(72, 24, 32, False)
    args = (res.qweight, res.scales, res.zeros)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        w4.w4a16_matmul(torch.randn(2, 72), *args, 32)
    with pytest.raises(ValueError, match="K_pad=96"):
        w4.w4a16_matmul(torch.randn(2, 100, dtype=torch.float16), *args, 32)
    with pytest.raises(ValueError, match="group_size=64"):
        w4.w4a16_matmul(torch.randn(2, 72, dtype=torch.float16), *args, 64)
    with pytest.raises(ValueError, match=r"scales/zeros must be \[3, 24\]"):
        w4.w4a16_matmul(torch.randn(2, 72, dtype=torch.float16), res.qweight, res.scales[:2], res.zeros[:2], 32)
    with pytest.raises(TypeError, match="int32"):
        w4.w4a16_matmul(torch.randn(2, 72, dtype=torch.float16), res.qweight.long(), res.scales, res.zeros, 32)
    with pytest.raises(ValueError, match="different devices"):
        w4.w4a16_matmul(torch.randn(2, 72, dtype=torch.float16, device="meta"), *args, 32)


def test_w4a16_opcheck() -> None:
    res = _packed_linear(72, 40, 32, False)
    x = torch.randn(3, 72, dtype=torch.float16)
    torch.library.opcheck(torch.ops.adagrow.w4a16_matmul.default, (x, res.qweight, res.scales, res.zeros, 32))
    sz = pack_scale_zero(res.scales, res.zeros)
    torch.library.opcheck(torch.ops.adagrow.w4a16_matmul_sz.default, (x, res.qweight, sz, 32))
    assert torch.equal(torch.ops.adagrow.w4a16_matmul_sz(x, res.qweight, sz, 32),
                       torch.ops.adagrow.w4a16_matmul(x, res.qweight, res.scales, res.zeros, 32))


def test_tuning_cache_round_trip(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(w4, "_TUNED", {})
    monkeypatch.setattr(w4, "_LOOKUP", {})
    monkeypatch.setitem(w4.CONFIGS, "gemv", w4.CONFIGS["gemv"][:2])  # keep the interpreter quick
    res = _packed_linear(64, 32, 32, False)
    best = w4.tune(1, res.qweight, res.scales, res.zeros, 32, rep=1)
    assert best in w4.CONFIGS["gemv"]
    w4.save_tuning(tmp_path / "tune.json")
    saved = dict(w4._TUNED)
    w4._TUNED.clear()
    assert w4.load_tuning(tmp_path / "tune.json") == len(saved) and w4._TUNED == saved
    (tmp_path / "bad.json").write_text('{"gemv|1": [1, 2, 3, 4, 5, 6]}')
    with pytest.raises(ValueError, match="bad entry"):
        w4.load_tuning(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- modules
def test_quant_modules_use_kernels_and_match_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 25, 40)).eval()
    model[0].register_buffer("reparam_overlap", torch.tensor([[1, 2, 1], [2, 3, 2], [1, 2, 1]]))
    x = torch.randn(4, 3, 5, 5)
    qmodel = quantize(model, [x], QuantConfig(bits=4, group_size="tier", linear_group_size=32), progress=False)
    assert isinstance(qmodel[0], QuantConv2d) and isinstance(qmodel[3], QuantLinear)
    ref = qmodel(x)  # float32 input: the dequantize reference
    y = qmodel.half()(x.half())  # fp16 input: Triton kernels (interpreter here)
    assert qmodel[0]._use_kernel(x.half()) and qmodel[3]._use_kernel(x.half()[:, 0, 0])
    assert (y.float() - ref).abs().max() < 2e-2 * ref.abs().max()


def test_quant_linear_kernel_pairs_follow_the_scales() -> None:
    """QuantLinear keeps the kernels' (s, z) pairs until scales or zeros change: an in-place
    edit or a new tensor rebuilds them, and the kernel output follows."""
    res = _packed_linear(72, 40, 32, False)
    layer = from_result(nn.Linear(72, 40), res).half()
    x = torch.randn(3, 72, dtype=torch.float16)
    first = layer.kernel_pairs()
    assert layer.kernel_pairs() is first and torch.equal(first, pack_scale_zero(layer.scales, layer.zeros))
    y0 = layer(x)
    layer.scales.mul_(2)
    assert layer.kernel_pairs() is not first and torch.equal(layer.kernel_pairs()[..., 0], layer.scales)
    assert torch.allclose((layer(x) - layer.bias.half()).float(), 2 * (y0 - layer.bias.half()).float(),
                          rtol=1e-2, atol=1e-2)
    layer.clear_cache()
    assert "_kernel_pairs" not in layer.__dict__


@cuda
def test_compile_fullgraph_and_cuda_graphs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128)).eval()
    x = torch.randn(8, 256)
    qmodel = quantize(model, [x], QuantConfig(bits=4, linear_group_size=128), progress=False).cuda().half()
    xc = x.cuda().half()
    eager = qmodel(xc)
    compiled = torch.compile(qmodel, fullgraph=True)
    assert torch.allclose(compiled(xc), eager, atol=1e-2, rtol=1e-2)
    static_x = xc.clone()
    qmodel(static_x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = qmodel(static_x)
    static_x.copy_(xc * 0.5)
    graph.replay()
    assert torch.allclose(static_y, qmodel(xc * 0.5), atol=1e-2, rtol=1e-2)
