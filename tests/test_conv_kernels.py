"""Fused convs: Triton kernels (interpreter on CPU) against the float32 PyTorch reference, the
model-path conversion ``to_kernels`` and the sm_90 SASS of the benchmark's conv configs.

Tolerance: ``adagrow.kernels.conv.conv_error_bound``, elementwise: the kernels round the
(dequantized) weight and the output to fp16/bf16 (unit roundoff eps = 2^-11 / 2^-8) and
accumulate in fp32, so ``|y - ref| <= 1.5 (2 eps (|x| conv |W| + |b| + |r|) + K 2^-24 |x| conv
(|W| + 32 S))`` (S: each weight's scale; 1.5 bounds the activations' slopes). An indexing or
packing bug gives errors the size of ``y`` itself.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adagrow.compress import QuantConfig, quantize, rtn_quantize
from adagrow.grow import GrowingCNN
from adagrow.grow.reparam import reparameterize
from adagrow.kernels import FusedConv2d, fused_conv2d, fused_conv2d_ref, static, to_kernels
from adagrow.kernels.conv import conv_error_bound, conv_weight_matrix, fused_conv2d_triton, igemm_plan
from adagrow.kernels.conv import static_specs as conv_static_specs
from adagrow.packed import column_groups, dequantize_packed

ROOT = Path(__file__).resolve().parents[1]
EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
bf16_dot = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="Triton's interpreter mis-computes bfloat16 tl.dot; runs on CUDA")


def _conv_case(cin, cout, k, stride, dil, groups, hw, mode, act, residual, dtype=torch.float16, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, padding=(k[0] // 2 * dil, k[1] // 2 * dil), dilation=dil, groups=groups)
    if mode == "tier":
        kh, kw = k
        ov = torch.ones(kh, kw, dtype=torch.int64)
        ov[kh // 2, :] += 1
        ov[kh // 2, kw // 2] += 2
        conv.register_buffer("reparam_overlap", ov)
    x = torch.randn(2, *hw, cin, dtype=dtype)
    geo = (list(k), [stride, stride], list(conv.padding), [dil, dil], groups)
    kk = k[0] * k[1] * cin // groups
    if mode == "fp":
        wmat, smat = conv_weight_matrix(conv.weight.detach()), None
        wargs = (wmat.to(dtype), conv.bias.detach().to(dtype), None, None, None)
        gs = -1
    else:
        res = rtn_quantize(conv, bits=4, group_size=mode)
        gs = mode if isinstance(mode, int) else -1
        wargs = (res.qweight, conv.bias.detach().to(dtype), res.scales, res.zeros, res.position_group)
        k_pad = res.qweight.shape[0] * 8
        wmat = dequantize_packed(res.qweight, res.scales, res.zeros, 4, k_pad, mode, cin // groups,
                                 res.position_group)[:, :kk].t()
        smat = res.scales.float().t()[:, column_groups(k_pad, mode, cin // groups, res.position_group)][:, :kk].t()
    as_conv = lambda m: None if m is None else m.float().reshape(*k, cin // groups, cout).permute(3, 2, 0, 1)  # noqa: E731
    w4d = as_conv(wmat)
    out_hw = F.conv2d(x.permute(0, 3, 1, 2).float(), w4d, None, geo[1], geo[2], geo[3], groups).shape[-2:]
    r = torch.randn(2, *out_hw, cout, dtype=dtype) if residual else None
    return x, wargs, r, geo, gs, (w4d, as_conv(smat))


CONV_CASES = [  # cin, cout, kernel, stride, dilation, groups, input, weight mode, act, residual
    # flat-K path (C_in/g without a power-of-two divisor >= 16)
    (8, 24, (3, 3), 1, 1, 1, (7, 9), "fp", "relu", True),
    (8, 24, (1, 1), 2, 1, 1, (7, 9), -1, "none", False),
    (6, 40, (5, 5), 1, 1, 1, (9, 9), 32, "silu", True),
    (8, 16, (1, 3), 2, 2, 2, (7, 9), "position", "hardswish", False),
    (6, 16, (5, 5), 2, 1, 1, (9, 9), "tier", "gelu", True),
    (12, 24, (3, 3), 1, 2, 3, (9, 9), "fp", "gelu", False),
    # channel path (kernel position outer, C_in blocks of BLOCK_C inner)
    (32, 40, (3, 3), 1, 1, 1, (5, 7), "fp", "relu", True),
    (32, 48, (3, 3), 2, 1, 1, (5, 7), "position", "silu", False),
    (48, 24, (3, 3), 1, 2, 1, (5, 7), 16, "hardswish", True),   # 3 channel blocks per position
    (64, 24, (5, 3), 1, 1, 2, (5, 7), -1, "gelu", False),       # 2 conv groups of 32 channels
    (32, 32, (3, 3), 1, 1, 1, (5, 7), "tier", "none", True),
    # depthwise (also run through the implicit GEMM)
    (16, 16, (3, 3), 1, 2, 16, (9, 9), 8, "relu", True),
    (16, 16, (5, 5), 2, 1, 16, (7, 9), "fp", "silu", False),
    (24, 24, (5, 5), 1, 1, 24, (7, 9), "tier", "none", True),
    (16, 16, (1, 3), 1, 1, 16, (7, 9), -1, "hardswish", False),
]

def _reference(x, wargs, r, geo, gs, act):
    return fused_conv2d_ref(x.float(), wargs[0], wargs[1].float(), *wargs[2:], None if r is None else r.float(),
                            *geo, gs, act)


def _assert_within_rounding(y, x, wargs, r, geo, ws, ref, what="") -> None:
    """``|y - ref| <= conv_error_bound(...)`` elementwise (fp16/bf16 rounding, see its docstring)."""
    assert y.shape == ref.shape and y.dtype == x.dtype
    nchw = lambda t: None if t is None else t.permute(0, 3, 1, 2)  # noqa: E731
    bound = conv_error_bound(nchw(x), *ws, wargs[1], nchw(r), *geo[1:]).permute(0, 2, 3, 1)
    err = (y.float() - ref).abs()
    assert torch.all(err <= bound), f"{what}: max err {err.max():.3e}, bound there {bound.flatten()[err.argmax()]:.3e}"


@pytest.mark.parametrize("case", CONV_CASES,
                         ids=lambda c: f"{c[0]}-{c[1]}-k{c[2][0]}x{c[2][1]}-s{c[3]}-d{c[4]}-g{c[5]}-{c[7]}-{c[8]}")
def test_fused_conv_matches_reference(case) -> None:
    x, wargs, r, geo, gs, ws = _conv_case(*case)
    ref = _reference(x, wargs, r, geo, gs, case[8])
    kernels = [True, False] if geo[4] == x.shape[-1] == wargs[0].shape[1] else [False]
    for depthwise in kernels:  # depthwise layers also go through the implicit GEMM
        y = fused_conv2d_triton(x, *wargs, r, *geo, gs, case[8], depthwise_kernel=depthwise)
        _assert_within_rounding(y, x, wargs, r, geo, ws, ref, f"depthwise kernel={depthwise}")


def test_fused_conv_op_and_opcheck() -> None:
    x, wargs, r, geo, gs, ws = _conv_case(32, 24, (3, 3), 2, 1, 1, (7, 9), 32, "relu", True)
    y = torch.ops.adagrow.fused_conv2d(x, *wargs, r, *geo, gs, "relu")
    _assert_within_rounding(y, x, wargs, r, geo, ws, _reference(x, wargs, r, geo, gs, "relu"), "op")
    torch.library.opcheck(torch.ops.adagrow.fused_conv2d.default, (x, *wargs, r, *geo, gs, "relu"))


def test_fused_conv_bf16_depthwise() -> None:
    x, wargs, r, geo, gs, ws = _conv_case(16, 16, (3, 3), 1, 1, 16, (7, 9), "tier", "silu", True,
                                           dtype=torch.bfloat16)
    y = fused_conv2d_triton(x, *wargs, r, *geo, gs, "silu")
    _assert_within_rounding(y, x, wargs, r, geo, ws, _reference(x, wargs, r, geo, gs, "silu"), "bf16 dw")


@bf16_dot
def test_fused_conv_bf16_implicit_gemm() -> None:
    x, wargs, r, geo, gs, ws = _conv_case(32, 24, (3, 3), 2, 1, 1, (7, 9), 32, "relu", True, dtype=torch.bfloat16)
    args = [None if t is None else t.cuda() for t in (x, *wargs, r)]
    y = torch.ops.adagrow.fused_conv2d(*args, *geo, gs, "relu").cpu()
    _assert_within_rounding(y, x, wargs, r, geo, ws, _reference(x, wargs, r, geo, gs, "relu"), "bf16 gemm")


def test_fused_conv_errors() -> None:
    x, wargs, r, geo, gs, _ = _conv_case(6, 16, (5, 5), 1, 1, 1, (7, 9), 32, "relu", True)
    with pytest.raises(ValueError, match="NHWC"):
        fused_conv2d(x[0], *wargs, r, *geo, gs, "relu")
    with pytest.raises(ValueError, match="act must be one of"):
        fused_conv2d(x, *wargs, r, *geo, gs, "tanh")
    with pytest.raises(ValueError, match="scales/zeros must be"):
        fused_conv2d(x, *wargs, r, *geo, 64, "relu")
    with pytest.raises(ValueError, match="K_pad"):
        fused_conv2d(x, *wargs, r, [3, 3], *geo[1:], gs, "relu")
    with pytest.raises(ValueError, match="residual must be NHWC"):
        fused_conv2d(x, *wargs, r[:, :-1], *geo, gs, "relu")
    with pytest.raises(ValueError, match="needs scales and zeros"):
        fused_conv2d(x, wargs[0], wargs[1], None, None, None, r, *geo, gs, "relu")
    with pytest.raises(ValueError, match="bias must be"):
        fused_conv2d(x, wargs[0], wargs[1][:3], *wargs[2:], r, *geo, gs, "relu")



def test_fused_conv2d_module() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, groups=2)
    mod = FusedConv2d(conv, act="silu")
    x = torch.randn(2, 6, 9, 7)
    res = torch.randn(2, 10, 5, 4)
    expected = F.silu(conv(x) + res)
    assert torch.allclose(mod(x, res), expected, atol=1e-6)
    y = mod.half()(x.half(), res.half())
    assert (y.float() - expected).abs().max() < 1e-2 * expected.abs().max()
    with pytest.raises(ValueError, match="act must be one of"):
        FusedConv2d(conv, act="tanh")




def test_igemm_plan_picks_channel_path() -> None:
    # (BLOCK_M, BLOCK_N, BLOCK_C, warps, stages, channel_loop) for C_out/g, C_in/g, group size, W4, K rows
    assert igemm_plan((64, 64, 64, 4, 3), 96, 96, -1, True, 864) == (64, 64, 32, 4, 3, True)
    assert igemm_plan((64, 64, 64, 4, 3), 64, 128, 32, True, 1152) == (64, 64, 32, 4, 3, True)
    assert igemm_plan((64, 64, 64, 4, 3), 64, 3, -1, False, 27) == (64, 64, 32, 4, 3, False)
    assert igemm_plan((64, 64, 64, 4, 3), 24, 40, -1, False, 360) == (64, 32, 64, 4, 3, False)  # 40 = 8 * 5


# ----------------------------------------------------------------------------- model path
def _grown_deploy(family: str, depths: tuple[int, ...]) -> nn.Module:
    """A small grown CNN (channel widths that take the channel path), branches fused."""
    torch.manual_seed(0)
    model = GrowingCNN(family, widths=(16, 32, 32), in_channels=3, depths=depths)
    for i, conv in enumerate(model.rep_convs().values()):
        if conv.kernel_size != (1, 1) and conv.groups == 1:
            conv.add_branch("conv5x5" if i % 2 else "conv1x3", grow_kernel=True)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # non-trivial fused weights
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    return reparameterize(model.eval())


def _fused(model: nn.Module) -> list[FusedConv2d]:
    return [m for m in model.modules() if isinstance(m, FusedConv2d)]


def test_to_kernels_mobilenet_structure_and_float_path() -> None:
    deploy = _grown_deploy("mobilenetv3", (1, 0, 0))
    x = torch.randn(2, 3, 8, 8)
    swapped = to_kernels(deploy, x)
    convs = [m for m in deploy.modules() if isinstance(m, nn.Conv2d)]
    fused = _fused(swapped)
    assert len(fused) == len(convs) and not any(isinstance(m, nn.Conv2d) for m in swapped.modules())
    # stem, expand, dw: SiLU; SE fc1: ReLU; SE fc2 (sigmoid follows) and project (+ residual): none
    assert [f.act for f in fused[:6]] == ["silu", "silu", "silu", "relu", "none", "none"]
    code = swapped.code
    assert "fused_stages_0_0_project(mul, fused_stem_0)" in code, code  # the residual went into the kernel
    assert torch.allclose(swapped(x), deploy(x), atol=1e-6)  # float32: the PyTorch path, same function


def test_to_kernels_resnet_fp16_kernels_match_float_model() -> None:
    deploy = _grown_deploy("resnet", (1, 0, 0))
    x = torch.randn(2, 3, 8, 8)
    swapped = to_kernels(deploy, x)
    assert [f.act for f in _fused(swapped)] == ["relu"] * 5  # conv2 + residual + ReLU in one kernel
    assert "torch.relu" not in swapped.code and " + " not in swapped.code
    ref = deploy(x)
    assert torch.allclose(swapped(x), ref, atol=1e-6)
    y = swapped.half()(x.half())  # Triton kernels (interpreter on CPU), NHWC end to end
    eager = deploy.half()(x.half())  # PyTorch's own fp16 path, for the error scale of fp16 itself
    err, err_eager = (y.float() - ref).abs().max(), (eager.float() - ref).abs().max()
    assert err <= 2 * err_eager + EPS[torch.float16] * ref.abs().max(), (err, err_eager)


def test_to_kernels_w4_convs_fuse_activation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(),
                          nn.Flatten(), nn.Linear(32 * 25, 10)).eval()
    x = torch.randn(2, 3, 5, 5)
    qmodel = quantize(model, [x], QuantConfig(bits=4, group_size="position", linear_group_size=32), progress=False)
    swapped = to_kernels(qmodel, x)
    fused = _fused(swapped)
    assert [(f.act, f.weight is None) for f in fused] == [("relu", True), ("silu", True)]
    assert type(swapped.get_submodule("5")).__name__ == "QuantLinear"  # stays on its own Triton path
    ref = qmodel(x)  # float32: dequantize reference
    assert torch.allclose(swapped(x), ref, atol=1e-5)
    y = swapped.half()(x.half())
    eager = qmodel.half()(x.half())  # the unfused quantized layers, also on the kernels
    err, err_eager = (y.float() - ref).abs().max(), (eager.float() - ref).abs().max()
    assert err <= 2 * err_eager + EPS[torch.float16] * ref.abs().max(), (err, err_eager)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else x  # data-dependent: fx cannot trace it


def test_to_kernels_explains_untraceable_models() -> None:
    with pytest.raises(ValueError, match="cannot trace _Branchy"):
        to_kernels(_Branchy())


# ----------------------------------------------------------------------------- sm_90 SASS
# adagrow.kernels.static in a subprocess without TRITON_INTERPRET (the test session sets it, and
# interpreted kernels do not compile): one record per picked spec of conv.static_specs(90), plus
# the opcodes of its main loop.
_INSPECT = """
import json, sys, tempfile
from pathlib import Path
from adagrow.kernels import static
from adagrow.kernels.conv import static_specs
out, sass_dir = [], Path(tempfile.mkdtemp())
for want in json.loads(sys.argv[1]):
    spec = next(s for s in static_specs(90) if s.path == want["path"] and all(
        s.shape.get(k) == v or s.config.get(k) == v for k, v in want.items() if k != "path"))
    rec = static.inspect_spec(spec, 90, sass_dir)
    loop = static.main_loop(static.parse_sass((sass_dir / rec["sass"]).read_text()))
    out.append({"want": want, "loop_ops": [op for _, op, _ in loop], **rec})
print(json.dumps(out))
"""


@pytest.mark.skipif(static.unavailable_reason() is not None,
                    reason=f"static inspection unavailable: {static.unavailable_reason()}")
def test_conv_sass_for_sm90() -> None:
    """Benchmark-shape specs compiled for sm_90: no spills, smem within the H100 limit, 16-byte
    (or 8-byte) activation loads and tensor-core ops in the main loop, no I2F there (W4 too)."""
    picks = [  # channel path fp16 / W4 (5x5, 64 -> 64), flat-K W4 stem (3 -> 64), depthwise W4
        {"path": "conv", "Cin": 64, "Cout": 64, "W4": 0, "BLOCK_M": 64},
        {"path": "conv", "Cin": 96, "Cout": 128, "W4": 1, "BLOCK_M": 128},
        {"path": "conv", "Cin": 3, "Cout": 64, "W4": 1, "BLOCK_M": 32},
        {"path": "dwconv", "C": 256, "W4": 1, "BLOCK_P": 32},
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _INSPECT, json.dumps(picks)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rec in json.loads(proc.stdout.strip().splitlines()[-1]):
        want, loop = rec["want"], rec["loop_ops"]
        assert rec["spill_bytes"] == 0 and rec["local_mem_ops"] == 0, f"spills: {want}"
        assert rec["smem_bytes"] <= rec["smem_limit"] and rec["has_loop"], want
        assert rec["i2f_in_main_loop"] == 0, f"I2F in the main loop: {want}"
        if want.get("Cin", want.get("C")) % 16 == 0:  # channel-contiguous activation rows
            assert any(static.is_global_load(op) and static.load_bytes(op) >= 8 for op in loop), want
        if want["path"] == "conv":
            assert rec["tensor_core_ops_in_main_loop"] > 0, f"no tensor-core op: {want}"


@pytest.mark.parametrize("arch", [90, 80])
def test_committed_conv_json_covers_every_spec(arch: int) -> None:
    """benchmarks/results/kernels_static_conv_sm<arch>.json has a record for every conv spec
    (every table row x benchmark shape x fp16/W4), each meeting the static targets."""
    doc = json.loads((ROOT / "benchmarks" / "results" / f"kernels_static_conv_sm{arch}.json").read_text())
    records = {(r["kernel"], json.dumps(r["config"]), json.dumps(r["shape"])): r for r in doc["records"]}
    specs = conv_static_specs(arch)
    assert len(records) == len(specs)
    for spec in specs:
        r = records[(spec.kernel, json.dumps(spec.config), json.dumps(spec.shape))]
        assert r["spill_bytes"] == 0 and r["fits"] and r["has_loop"] and r["i2f_in_main_loop"] == 0, r["sass"]
        assert spec.path == "dwconv" or r["tensor_core_ops_in_main_loop"] > 0, r["sass"]
