"""GPU benchmark of the Triton kernels (needs CUDA): W4A16 matmul and fused deploy-form convs.

Matmul: N x K = 4096x4096, 8192x8192, 14336x4096 (K=4096 -> N=14336) and the grown CNN's deploy
layers' implicit-GEMM shapes, M in 1..256, group 128; against torch fp16 matmul (cuBLAS) and,
when importable, GemLite. Each shape is tuned once (warm-up, not timed), then timed with
``triton.testing.do_bench`` (L2 flushed before every call, median). Reports time, speedup over
fp16 and achieved bandwidth as a share of the GPU's peak. Before timing, the tuned config's
output (and GemLite's) is asserted against the dequantized reference within the fp16 rounding
bound (``adagrow.kernels.w4a16.error_bound``). The JSON is rewritten after every matmul shape.

Convs: the deploy layers of a grown-shaped CNN (VGG-1-2-2, branches fused, 3x3 and 5x5) on
32x32 inputs at batch 1, 8, 64:
eager (cuDNN conv, then bias, activation as separate ops), torch.compile of the same, our fused
fp16 conv and our W4 conv.

Usage: ``python benchmarks/kernel_speed.py [--quick] [--out DIR]`` -> ``DIR/kernels_<gpu>_<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adagrow.compress import rtn_quantize
from adagrow.files import write_json
from adagrow.packed import column_groups, dequantize_packed, unpack_codes
from adagrow.grow import GrowingCNN
from adagrow.grow.reparam import reparameterize
from adagrow.kernels import fused_conv2d, w4a16 as w4
from adagrow.kernels.conv import (BENCH_CONV_SHAPES, BENCH_DW_SHAPES, conv_error_bound, conv_weight_matrix,
                                  skipped_configs)

PEAK_GBPS = {"H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "H200": 4800,
             "A100-SXM4-80GB": 2039, "A100": 1555, "L40S": 864}
TARGETS = {1: 2.5, 16: 2.2, 128: 1.0}  # 8192x8192 g128 speedup over fp16 cuBLAS
MATMUL_SHAPES = [(4096, 4096), (8192, 8192), (14336, 4096)]  # (N, K)
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def peak_gbps(name: str) -> float | None:
    for key, val in PEAK_GBPS.items():
        if key in name:
            return val
    return None


def bench(fn, rep: int = 200) -> float:
    """Median milliseconds with the L2 cache flushed before every call."""
    import triton.testing
    return float(triton.testing.do_bench(fn, rep=rep, return_mode="median"))


def gemlite_layer(res, k: int, n: int, group: int):
    """A GemLite W4A16 layer built from the same codes/scales/zeros, or the reason there is none.

    GemLite's ``pack`` takes uint8 codes ``[N, K]`` and scales / zeros ``[N, K/G]``; errors from
    an installed GemLite propagate (no silent skip)."""
    try:
        from gemlite.core import DType, GemLiteLinearTriton
    except ImportError as exc:
        return None, f"gemlite not installed ({exc}); pip install 'adagrow[gemlite]'"
    codes = unpack_codes(res.qweight, 4)[:, :k].to(torch.uint8).cuda()
    layer = GemLiteLinearTriton(4, group_size=group, in_features=k, out_features=n,
                                input_dtype=DType.FP16, output_dtype=DType.FP16)
    layer.pack(codes, res.scales.t().contiguous().cuda().half(), res.zeros.t().contiguous().cuda().half(), bias=None)
    return layer, None


def assert_close(name: str, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
                 weight_err: float = 0.0) -> float:
    """Check ``y`` against ``x @ w.T`` within the fp16 rounding bound of
    :func:`adagrow.kernels.w4a16.error_bound`; returns the largest error / bound."""
    ref = x.float() @ w.t()
    ratio = float(((y.float() - ref).abs() / w4.error_bound(x, w, s, weight_err)).max())
    if not ratio <= 1.0:
        raise AssertionError(f"{name}: output exceeds the fp16 rounding bound ({ratio:.2f}x the bound)")
    return ratio


def bench_matmul(shapes, ms, group: int, peak: float | None, save) -> list[dict]:
    """Each shape: tune ours per M (warm-up), check the tuned config's and GemLite's outputs
    against the reference, then time; ``save(rows)`` runs after every shape."""
    rows = []
    for n, k in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(k, n, bias=False)
        res = rtn_quantize(lin, bits=4, group_size=group)
        qw, sc, zr = res.qweight.cuda(), res.scales.cuda(), res.zeros.cuda()
        w16 = lin.weight.detach().t().contiguous().half().cuda()  # [K, N]
        wdq = dequantize_packed(res.qweight, res.scales, res.zeros, 4, k, group).cuda()
        sfull = res.scales.float().t()[:, column_groups(qw.shape[0] * 8, group)][:, :k].cuda()
        glayer, gl_skip = gemlite_layer(res, k, n, group)
        if gl_skip:
            print(f"GemLite skipped: {gl_skip}")
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            cfg = w4.tune(m, qw, sc, zr, group)
            err = assert_close(f"w4a16 {cfg}", w4.w4a16_matmul(x, qw, sc, zr, group), x, wdq, sfull)
            t_ours = bench(lambda: w4.w4a16_matmul(x, qw, sc, zr, group))
            t_fp16 = bench(lambda: x @ w16)
            t_gl = gl_err = None
            if glayer is not None:  # GemLite rounds -z*s to fp16 in its fma-mode dequant
                gl_err = assert_close("gemlite", glayer(x), x, wdq, sfull, weight_err=32.0)
                t_gl = bench(lambda: glayer(x))
            nbytes = qw.numel() * 4 + sc.numel() * 2 * 2 + x.numel() * 2 + m * n * 2
            gbps = nbytes / t_ours / 1e6
            row = {"N": n, "K": k, "M": m, "group": group, "path": w4.path_for(m), "config": list(cfg),
                   "ms_w4a16": t_ours, "ms_fp16": t_fp16, "speedup_vs_fp16": t_fp16 / t_ours, "GBps": gbps,
                   "peak_share": gbps / peak if peak else None, "err_over_bound": err,
                   "ms_gemlite": t_gl, "speedup_gemlite_vs_fp16": t_fp16 / t_gl if t_gl else None,
                   "gemlite_err_over_bound": gl_err, "gemlite_skipped": gl_skip}
            rows.append(row)
            print(f"N={n:>6} K={k:>6} M={m:>4} {row['path']:>6} {cfg}: ours {t_ours * 1e3:8.1f}us fp16 "
                  f"{t_fp16 * 1e3:8.1f}us x{row['speedup_vs_fp16']:.2f} {gbps:7.0f} GB/s"
                  + (f" ({100 * gbps / peak:.0f}% peak)" if peak else "")
                  + (f" gemlite x{t_fp16 / t_gl:.2f}" if t_gl else "") + f" err/bound {err:.2f}", flush=True)
        save(rows)
    return rows


def deploy_convs() -> list[nn.Conv2d]:
    """Deploy convs of a grown-shaped CNN: VGG-1-2-2 at 64/96/128 whose convs gained branches
    (some grew to 5x5), fused."""
    torch.manual_seed(0)
    model = GrowingCNN("vgg", widths=(64, 96, 128), in_channels=3, depths=(1, 2, 2))
    for i, conv in enumerate(model.rep_convs().values()):
        for spec in (("conv1x1", "conv5x5") if i % 2 else ("conv1x3", "conv3x1")):
            conv.add_branch(spec, grow_kernel=True)
    deploy = reparameterize(model.eval())
    return [m for m in deploy.modules() if isinstance(m, nn.Conv2d)]


def deploy_depthwise_convs() -> list[nn.Conv2d]:
    """The depthwise 3x3 convs of a grown MobileNetV3-style CNN (1-1-1 at 32/64/96, expand 4x)."""
    torch.manual_seed(0)
    deploy = reparameterize(GrowingCNN("mobilenetv3", widths=(32, 64, 96), in_channels=3, depths=(1, 1, 1)).eval())
    return [m for m in deploy.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]


def conv_layers() -> list[tuple[nn.Conv2d, int]]:
    """(conv, input size) of every benchmarked conv, checked against the shapes that
    ``kernels/conv.py`` compiles statically (BENCH_CONV_SHAPES / BENCH_DW_SHAPES)."""
    layers, size = [], 32
    for conv in deploy_convs():
        layers.append((conv, size))
        size = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    layers += list(zip(deploy_depthwise_convs(), (32, 16, 8)))
    shapes = [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], hw, c.groups) for c, hw in layers]
    if shapes != BENCH_CONV_SHAPES + BENCH_DW_SHAPES:
        raise AssertionError(f"benchmark convs {shapes} differ from kernels/conv.py's static shapes")
    return layers


def bench_convs(batches, save, compile_eager: bool = True) -> list[dict]:
    """conv + bias + ReLU per layer and batch, all on the same channels_last fp16 input
    (``save(rows)`` after each row, so a run cut short keeps what it measured):

    - eager: ``relu(F.conv2d(x, w, b))`` (cuDNN, bias in the conv; channels_last is cuDNN's fast
      layout for fp16), 2 kernels;
    - compile (``compile_eager``): ``torch.compile`` of that function, a fresh compile per
      (layer, batch) after ``torch._dynamo.reset()`` (no recompile limit, no silent eager
      fallback); off, the compile columns are None (``benchmarks/gpu_check.py``'s time budget);
    - fused fp16 / fused W4 (position groups): our kernel; its NHWC view of the channels_last
      input is free and happens inside the timed call (the model path, ``to_kernels``, runs NHWC
      end to end the same way).
    Before timing, the fused outputs are asserted against the float32 reference within the fp16
    rounding bound ``adagrow.kernels.conv.conv_error_bound`` (W4 against its own dequantized weight).
    """
    rows = []
    for batch in batches:
        for i, (conv, size) in enumerate(conv_layers()):
            torch.manual_seed(i)
            res = rtn_quantize(conv.float(), bits=4, group_size="position")
            conv = conv.cuda().half()
            cl = torch.channels_last
            x = torch.randn(batch, conv.in_channels, size, size, device="cuda", dtype=torch.float16).to(memory_format=cl)
            w, b = conv.weight.detach().to(memory_format=cl), conv.bias.detach()
            geo = (list(conv.kernel_size), list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
            wmat = conv_weight_matrix(w).contiguous()
            qargs = (res.qweight.cuda(), b, res.scales.cuda(), res.zeros.cuda(), res.position_group.cuda())
            cin_g, k_pad = conv.in_channels // conv.groups, res.qweight.shape[0] * 8
            as_conv = lambda m: m.reshape(conv.out_channels, *conv.kernel_size, -1).permute(0, 3, 1, 2).cuda()  # noqa: E731
            wdq = as_conv(dequantize_packed(res.qweight, res.scales, res.zeros, 4, wmat.shape[0], "position", cin_g,
                                            res.position_group))
            sdq = as_conv(res.scales.float().t()[:, column_groups(k_pad, "position", cin_g, res.position_group)]
                          [:, :wmat.shape[0]])

            def eager(x=x, w=w, b=b, conv=conv):
                return F.relu(F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups))

            def ours(x=x, wmat=wmat, b=b, geo=geo):
                return fused_conv2d(x.permute(0, 2, 3, 1), wmat, b, None, None, None, None, *geo, -1,
                                    "relu").permute(0, 3, 1, 2)

            def ours_w4(x=x, qargs=qargs, geo=geo):
                return fused_conv2d(x.permute(0, 2, 3, 1), *qargs, None, *geo, -1, "relu").permute(0, 3, 1, 2)

            errs = {}
            for name, fn, wref, sref in (("fp16", ours, w, None), ("w4", ours_w4, wdq, sdq)):
                geo_nchw = (conv.stride, conv.padding, conv.dilation, conv.groups)
                ref = F.relu(F.conv2d(x.float(), wref.float(), b.float(), *geo_nchw))
                bound = conv_error_bound(x, wref, sref, b, None, *geo_nchw, slope=1.0)
                ratio = float(((fn().float() - ref).abs() / bound).max())
                if not ratio <= 1.0:
                    raise AssertionError(f"conv{i} b={batch} fused {name}: output exceeds the fp16 rounding "
                                         f"bound ({ratio:.2f}x the bound)")
                errs[name] = ratio
            t_c = None
            if compile_eager:
                torch._dynamo.reset()
                compiled = torch.compile(eager)
                compiled()
                t_c = bench(compiled)
            t_e, t_o, t_w = bench(eager), bench(ours), bench(ours_w4)
            row = {"layer": i, "batch": batch, "cin": conv.in_channels, "cout": conv.out_channels,
                   "groups": conv.groups, "kernel": list(conv.kernel_size), "stride": list(conv.stride),
                   "input": size, "layout": "channels_last", "ms_eager": t_e, "ms_compile": t_c,
                   "ms_fused_fp16": t_o, "ms_fused_w4": t_w, "speedup_vs_eager": t_e / t_o,
                   "speedup_vs_compile": t_c / t_o if t_c else None, "speedup_w4_vs_eager": t_e / t_w,
                   "err_over_bound_fp16": errs["fp16"], "err_over_bound_w4": errs["w4"],
                   "skipped_configs_so_far": skipped_configs()}
            rows.append(row)
            save(rows)
            print(f"conv{i} b={batch:>2} {conv.in_channels:>3}->{conv.out_channels:<3} g{conv.groups:<3} "
                  f"k{conv.kernel_size[0]} s{conv.stride[0]}: eager {t_e * 1e3:7.1f}us "
                  + (f"compile {t_c * 1e3:7.1f}us " if t_c else "")
                  + f"fused {t_o * 1e3:7.1f}us (x{t_e / t_o:.2f}) w4 {t_w * 1e3:7.1f}us "
                  f"err/bound {errs['fp16']:.2f}/{errs['w4']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="GPU benchmark of adagrow's Triton kernels")
    ap.add_argument("--quick", action="store_true", help="8192x8192 at M=1,16,128 and batch-1 convs only")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py needs a CUDA GPU; none is available here (the kernels' CPU "
              "correctness tests run under TRITON_INTERPRET=1 in the test suite).", file=sys.stderr)
        return 2
    import triton
    name = torch.cuda.get_device_name()
    peak = peak_gbps(name)
    print(f"{name}: peak {peak} GB/s; torch {torch.__version__}, triton {triton.__version__}")
    shapes = [(8192, 8192)] if args.quick else MATMUL_SHAPES + [(c.out_channels, c.weight[0].numel())
                                                              for c in deploy_convs()[1:]]
    ms = [1, 16, 128] if args.quick else MS
    date = dt.date.today().isoformat()
    result = {"benchmark": "kernels", "gpu": name, "date": date, "torch": torch.__version__,
              "triton": triton.__version__, "peak_GBps": peak,
              "command": "python benchmarks/kernel_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "matmul": [], "convs": [], "targets": [], "complete": False}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernels_{re.sub(r'[^A-Za-z0-9]+', '_', name)}_{date}.json"

    def saver(key: str):
        def save(rows: list[dict]) -> None:
            result[key] = rows
            write_json(path, result)
        return save

    matmul = bench_matmul(shapes, ms, args.group, peak, saver("matmul"))
    convs = bench_convs([1] if args.quick else [1, 8, 64], saver("convs"))
    targets = []
    for m, goal in TARGETS.items():
        r = next((r for r in matmul if (r["N"], r["K"], r["M"]) == (8192, 8192, m)), None)
        if r:
            targets.append({"target": f"8192x8192 g{args.group} M={m} speedup >= {goal}",
                            "measured": r["speedup_vs_fp16"], "met": r["speedup_vs_fp16"] >= goal})
            if r["ms_gemlite"]:
                targets.append({"target": f"8192x8192 g{args.group} M={m} ahead of GemLite",
                                "measured": r["ms_gemlite"] / r["ms_w4a16"], "met": r["ms_w4a16"] < r["ms_gemlite"]})
    b1 = [r["speedup_vs_eager"] for r in convs if r["batch"] == 1]
    targets.append({"target": "fused fp16 conv >= 1.5x eager at batch 1 (geometric mean over layers)",
                    "measured": float(torch.tensor(b1).log().mean().exp()), "met": None})
    targets[-1]["met"] = targets[-1]["measured"] >= 1.5
    for t in targets:
        print(f"{t['target']}: {t['measured']:.2f} ({'met' if t['met'] else 'NOT met'})")
    result.update(matmul=matmul, convs=convs, targets=targets, complete=True)
    write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
