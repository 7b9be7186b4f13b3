"""Fused NHWC convolution for the deploy form (docs/design.md §6).

``fused_conv2d`` computes ``act(conv(x) + bias + residual)`` on NHWC activations. The weight is a
``[K, C_out]`` matrix in canonical ``(ky, kx, cin)`` K order, either fp16/bf16 or W4A16-packed
(int32 ``[K_pad/8, C_out]`` with ``scales``/``zeros`` ``[n_groups, C_out]``; groups per channel
(``group_size=-1``), contiguous (``group_size=G``) or by kernel position through
``position_group: int32[kh*kw]`` (position / tier groups)).

Kernels:
- implicit GEMM (any groups), channel path: one loop over (kernel position, C_in block) with
  ``BLOCK_C`` a compile-time divisor of C_in/g, so each activation row is a contiguous, aligned
  NHWC run (vectorised 16-byte loads, no per-element div/mod); the W4 tile is ``BLOCK_C/8``
  packed words per column, each loaded once and unpacked in registers by the W4A16 matmul's tile
  dequant (the nibble moved under the exponent of 1.0 reads as ``1 + q/16``: no I2F; the zero
  folded into one FMA); scales/zeros are loaded once per program (per channel) or once per K
  block (a block never straddles a kernel position or a group); ``tl.dot`` on tensor cores.
- implicit GEMM, flat-K path: layers whose C_in/g has no power-of-two divisor >= 16 (the RGB stem,
  tiny groups) walk K linearly with per-element index math by the compile-time C_in/g (they are
  a few percent of the work); W4 codes dequantized as ``(q | 0x4B000000)`` read as fp32, which is
  ``2^23 + q`` (no I2F), minus 2^23, then one FMA with the folded zero.
- depthwise (groups == C_in == C_out): a loop over kernel rows, the row's taps unrolled,
  channels vectorised (16-byte loads); fp32 FMAs on CUDA cores.
The residual is added before the activation (ResNet style); pass ``act="none"`` for a linear
bottleneck. Configs that need more shared memory than the device has are skipped (the compiled
kernel's own ``metadata.shared`` is checked before launch) and the reason is recorded.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from adagrow.packed import dequantize_packed

from ._triton import HAS_TRITON, interpreting, smem_limit, tl, triton
from .static import StaticSpec, runtime_signature
from .w4a16 import use_triton

if HAS_TRITON:
    from .w4a16 import dequant_tile  # packed words -> dequantized tile, shared with the W4A16 matmul

ACTS = {"none": 0, "relu": 1, "silu": 2, "hardswish": 3, "gelu": 4}
# Implicit GEMM: (BLOCK_M output pixels, BLOCK_N output channels, BLOCK_C input channels per K
# block, num_warps, num_stages), largest tile first. A launch takes the first row whose BLOCK_M
# still gives every SM a program (else the last row), BLOCK_N 32 when C_out/g <= 32, and
# BLOCK_C lowered to the largest power of two dividing C_in/g (and the contiguous group size).
CONV_CONFIGS: list[tuple[int, int, int, int, int]] = [
    (128, 64, 64, 4, 3),
    (64, 64, 64, 4, 3),
    (32, 64, 64, 4, 3),
    (16, 64, 64, 4, 2),
]
# Depthwise: (BLOCK_P output pixels, BLOCK_C channels, num_warps).
DW_CONFIGS: list[tuple[int, int, int]] = [(64, 64, 4), (32, 64, 4), (16, 64, 2)]
MIN_DOT_K = 16  # tl.dot needs K blocks of at least 16


def apply_act(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return F.relu(y)
    if act == "silu":
        return F.silu(y)
    if act == "hardswish":
        return F.hardswish(y)
    if act == "gelu":
        return F.gelu(y)
    return y


def conv_weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``[C_out, C_in/g, kh, kw]`` conv weight -> ``[K, C_out]`` in (ky, kx, cin) order."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()


def _dense_weight(weight: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None,
                  position_group: torch.Tensor | None, group_size: int, k: int, cin_g: int) -> torch.Tensor:
    """Float32 ``[K, C_out]`` weight from either form."""
    if weight.dtype == torch.int32:
        return dequantize_packed(weight, scales, zeros, 4, k, "position" if position_group is not None
                                 else group_size, cin_g, position_group).t()
    return weight.float()


def fused_conv2d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     scales: torch.Tensor | None, zeros: torch.Tensor | None,
                     position_group: torch.Tensor | None, residual: torch.Tensor | None,
                     kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                     groups: int, group_size: int, act: str) -> torch.Tensor:
    """Pure-PyTorch reference in float32 (NHWC in, NHWC out in x's dtype)."""
    kh, kw = kernel_size
    cin_g = x.shape[-1] // groups
    w = _dense_weight(weight, scales, zeros, position_group, group_size, kh * kw * cin_g, cin_g)
    w = w.reshape(kh, kw, cin_g, -1).permute(3, 2, 0, 1)
    y = F.conv2d(x.permute(0, 3, 1, 2).float(), w, None if bias is None else bias.float(),
                 stride, padding, dilation, groups).permute(0, 2, 3, 1)
    if residual is not None:
        y = y + residual.float()
    return apply_act(y, act).to(x.dtype)


def conv_error_bound(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, bias: torch.Tensor | None,
                     residual: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                     groups: int, slope: float = 1.5) -> torch.Tensor:
    """Elementwise bound (NCHW, float32) on ``|kernel - reference|`` of ``act(conv(x) + b + r)``.

    ``x`` NCHW fp16/bf16, ``w`` the float32 (dequantized) weight ``[C_out, C_in/g, kh, kw]``, ``s``
    the scale of each weight (same shape; None for float weights). Weight and output rounded to
    x's dtype (unit roundoff eps), fp32 accumulation over K = C_in/g*kh*kw and the fp32 dequant
    ``fma(q, s, -z s)``: ``slope * (2 eps (|x| * |w| + |b| + |r|) + K 2^-24 |x| * (|w| + 32 s))``
    plus fp16's subnormal spacing; ``slope`` bounds the activation's derivative (1.5 covers
    ReLU, SiLU, Hardswish, GELU)."""
    eps = 2.0**-11 if x.dtype == torch.float16 else 2.0**-8
    xa, wa = x.float().abs(), w.float().abs()
    geo = (stride, padding, dilation, groups)
    mag = F.conv2d(xa, wa, None, *geo)
    mag = mag + (0 if bias is None else bias.float().abs()[None, :, None, None]) \
        + (0 if residual is None else residual.float().abs())
    acc = F.conv2d(xa, wa + (0 if s is None else 32 * s.float()), None, *geo)
    return slope * (2 * eps * mag + w[0].numel() * 2.0**-24 * acc) + 2.0**-24


def out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def check_conv_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    scales: torch.Tensor | None, zeros: torch.Tensor | None,
                    position_group: torch.Tensor | None, residual: torch.Tensor | None,
                    kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                    groups: int, group_size: int, act: str) -> tuple[int, int, int, int]:
    """Validate; return (OH, OW, C_out, K)."""
    if x.dim() != 4:
        raise ValueError(f"fused_conv2d: x must be NHWC [B, H, W, C], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"fused_conv2d: x must be float16, bfloat16 or float32, got {x.dtype}")
    if act not in ACTS:
        raise ValueError(f"fused_conv2d: act must be one of {tuple(ACTS)}, got {act!r}")
    b, h, w, c = x.shape
    kh, kw = kernel_size
    if groups < 1 or c % groups:
        raise ValueError(f"fused_conv2d: {c} input channels are not divisible by groups={groups}")
    k = kh * kw * (c // groups)
    if weight.dtype == torch.int32:
        if scales is None or zeros is None:
            raise ValueError("fused_conv2d: a packed int32 weight needs scales and zeros")
        k_pad, cout = weight.shape[0] * 8, weight.shape[1]
        step = group_size if group_size > 0 and position_group is None else 8
        if not (k <= k_pad < k + step):
            raise ValueError(f"fused_conv2d: packed weight holds K_pad={k_pad}, expected K={k} "
                             f"(kh*kw*C_in/g) padded to a multiple of {step}")
        if position_group is not None:  # rows come from the table (values unchecked: fake-safe)
            if position_group.dtype != torch.int32 or position_group.numel() != kh * kw:
                raise ValueError(f"fused_conv2d: position_group must be int32 [{kh * kw}]")
            n_groups = scales.shape[0]
        else:
            n_groups = 1 if group_size == -1 else k_pad // group_size
        if tuple(scales.shape) != (n_groups, cout) or tuple(zeros.shape) != (n_groups, cout):
            raise ValueError(f"fused_conv2d: scales/zeros must be [{n_groups}, {cout}] for group_size="
                             f"{group_size}, got {tuple(scales.shape)} / {tuple(zeros.shape)}")
    elif weight.dtype in (torch.float16, torch.bfloat16, torch.float32):
        if weight.dim() != 2 or weight.shape[0] != k:
            raise ValueError(f"fused_conv2d: weight must be [K={k}, C_out] in (ky, kx, cin) order, "
                             f"got {tuple(weight.shape)}")
        cout = weight.shape[1]
    else:
        raise TypeError(f"fused_conv2d: weight must be float or packed int32, got {weight.dtype}")
    if cout % groups:
        raise ValueError(f"fused_conv2d: C_out={cout} is not divisible by groups={groups}")
    oh, ow = (out_size(s, kk, st, p, d) for s, kk, st, p, d in zip((h, w), kernel_size, stride, padding, dilation))
    if oh < 1 or ow < 1:
        raise ValueError(f"fused_conv2d: input {h}x{w} is too small for kernel {kh}x{kw}")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"fused_conv2d: bias must be [{cout}], got {tuple(bias.shape)}")
    if residual is not None and tuple(residual.shape) != (b, oh, ow, cout):
        raise ValueError(f"fused_conv2d: residual must be NHWC {(b, oh, ow, cout)}, got {tuple(residual.shape)}")
    devices = {t.device for t in (x, weight, bias, scales, zeros, position_group, residual) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"fused_conv2d: tensors are on different devices: {sorted(map(str, devices))}")
    return oh, ow, cout, k


if HAS_TRITON:
    @triton.jit
    def _act(y, ACT: tl.constexpr):
        if ACT == 1:
            y = tl.maximum(y, 0.0)
        elif ACT == 2:
            y = y * tl.sigmoid(y)
        elif ACT == 3:
            y = y * tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0
        elif ACT == 4:
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        return y

    @triton.jit
    def _dequant(q, s, zs):
        """``q * s + zs`` in fp32 from int32 4-bit codes without I2F: ``q | 0x4B000000`` read as
        fp32 is exactly ``2^23 + q``; ``zs = -z * s`` folds the zero into the FMA."""
        qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        return qf * s + zs

    @triton.jit
    def _scale_zero(s_ptr, z_ptr, row, cout, nmask, COUT):
        """Scale row ``row`` for the columns ``cout`` and the folded zero ``-z * s`` (fp32)."""
        s = tl.load(s_ptr + row * COUT + cout, mask=nmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + row * COUT + cout, mask=nmask, other=0.0).to(tl.float32)
        return s, -z * s

    @triton.jit
    def _epilogue(acc, rm, mmask, cout, nmask, b_ptr, r_ptr, y_ptr, COUT, HAS_BIAS: tl.constexpr,
                  HAS_RES: tl.constexpr, ACT: tl.constexpr):
        """``act(acc + bias + residual)`` stored to the NHWC output rows ``rm``, channels ``cout``."""
        if HAS_BIAS:
            acc += tl.load(b_ptr + cout, mask=nmask, other=0.0).to(tl.float32)[None, :]
        omask = mmask[:, None] & nmask[None, :]
        optr = rm[:, None] * COUT + cout[None, :]
        if HAS_RES:
            acc += tl.load(r_ptr + optr, mask=omask, other=0.0).to(tl.float32)
        acc = _act(acc, ACT)
        tl.store(y_ptr + optr, acc.to(y_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _conv_igemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, pg_ptr, b_ptr, r_ptr, y_ptr,
                           M, H, W, OH, OW, COUT, NG, K, KP, SH, SW, PH, PW, DH, DW, sxb, sxh, sxw,
                           CG: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, W4: tl.constexpr,
                           GROUP_MODE: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                           HAS_RES: tl.constexpr, ACT: tl.constexpr, CHANNEL_LOOP: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """Implicit GEMM: a BLOCK_M x BLOCK_N tile of (output pixels, output channels of group
        ``program_id(2)``). ``K``: real K, ``KP``: K rows the weight holds (padded for W4).
        ``CG`` (C_in/g) is a compile-time constant: index math by it needs no division."""
        pid_m, pid_n, pid_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = rm < M
        ox = rm % OW
        oy = (rm // OW) % OH
        iy0 = oy * SH - PH
        ix0 = ox * SW - PW
        xrow = (rm // (OW * OH)) * sxb + pid_g * CG
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < NG
        cout = pid_g * NG + rn
        rc = tl.arange(0, BLOCK_C)
        if W4 and GROUP_MODE == 0:  # one scale row for the whole K walk
            s, zs = _scale_zero(s_ptr, z_ptr, 0, cout, nmask, COUT)
            s16 = 16.0 * s[None, :]  # the tile dequant's form: (1 + q/16) * 16 s - (16 s - zs)
            c = s16 - zs[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if CHANNEL_LOOP:  # CG % BLOCK_C == 0: a K block is BLOCK_C channels of one kernel position
            NCB: tl.constexpr = CG // BLOCK_C
            for i in range(0, K // BLOCK_C):  # one pipelined loop over (kernel position, C_in block);
                # the runtime trip count (K = KH*KW*CG) keeps the compiler from unrolling it fully
                t = i // NCB  # constant divisors: multiply-shift, no I2F
                c0 = (i % NCB) * BLOCK_C
                ky = t // KW
                iy = iy0 + ky * DH
                ix = ix0 + (t - ky * KW) * DW
                inb = mmask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                x = tl.load(x_ptr + (xrow + iy * sxh + ix * sxw + c0)[:, None] + rc[None, :],
                            mask=inb[:, None], other=0.0)
                k0 = t * CG + c0
                if W4:
                    rw = k0 // 8 + tl.arange(0, BLOCK_C // 8)  # each packed word loaded once
                    qw = tl.load(w_ptr + rw[:, None] * COUT + cout[None, :], mask=nmask[None, :], other=0)
                    if GROUP_MODE != 0:  # the block lies in one kernel position / one group: one row
                        if GROUP_MODE == 2:
                            s, zs = _scale_zero(s_ptr, z_ptr, tl.load(pg_ptr + t), cout, nmask, COUT)
                        else:
                            s, zs = _scale_zero(s_ptr, z_ptr, k0 // GROUP, cout, nmask, COUT)
                        s16 = 16.0 * s[None, :]
                        c = s16 - zs[None, :]
                    w = dequant_tile(qw, s16, c, x.dtype)
                else:
                    w = tl.load(w_ptr + (k0 + rc)[:, None] * COUT + cout[None, :], mask=nmask[None, :], other=0.0)
                acc = tl.dot(x, w.to(x.dtype), acc)
        else:  # flat K with per-element index math (C_in/g without a power-of-two divisor >= 16)
            for k0 in range(0, KP, BLOCK_C):
                rk = k0 + rc
                t = rk // CG
                ky = t // KW
                iy = iy0[:, None] + (ky * DH)[None, :]
                ix = ix0[:, None] + ((t - ky * KW) * DW)[None, :]
                xmask = mmask[:, None] & (rk < K)[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                x = tl.load(x_ptr + xrow[:, None] + iy * sxh + ix * sxw + (rk - t * CG)[None, :],
                            mask=xmask, other=0.0)
                kmask = (rk < KP)[:, None] & nmask[None, :]
                if W4:
                    qw = tl.load(w_ptr + (rk // 8)[:, None] * COUT + cout[None, :], mask=kmask, other=0)
                    q = (qw >> ((rk % 8) * 4)[:, None]) & 0xF
                    if GROUP_MODE == 0:
                        w = _dequant(q, s[None, :], zs[None, :])
                    else:
                        if GROUP_MODE == 2:
                            row = tl.load(pg_ptr + tl.minimum(t, KH * KW - 1))
                        else:
                            row = rk // GROUP
                        sk = tl.load(s_ptr + row[:, None] * COUT + cout[None, :], mask=kmask, other=0.0)
                        zk = tl.load(z_ptr + row[:, None] * COUT + cout[None, :], mask=kmask, other=0.0)
                        w = _dequant(q, sk.to(tl.float32), -zk.to(tl.float32) * sk.to(tl.float32))
                else:
                    w = tl.load(w_ptr + rk[:, None] * COUT + cout[None, :], mask=kmask, other=0.0)
                acc = tl.dot(x, w.to(x.dtype), acc)
        _epilogue(acc, rm, mmask, cout, nmask, b_ptr, r_ptr, y_ptr, COUT, HAS_BIAS, HAS_RES, ACT)

    @triton.jit
    def _conv_depthwise_kernel(x_ptr, w_ptr, s_ptr, z_ptr, pg_ptr, b_ptr, r_ptr, y_ptr,
                               P, H, W, OH, OW, C, SH, SW, PH, PW, DH, DW, sxb, sxh, sxw,
                               KH: tl.constexpr, KW: tl.constexpr, W4: tl.constexpr,
                               GROUP_MODE: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                               HAS_RES: tl.constexpr, ACT: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Depthwise: a BLOCK_P x BLOCK_C tile of (output pixels, channels)."""
        pid_p, pid_c = tl.program_id(0), tl.program_id(1)
        rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        pmask, cmask = rp < P, rc < C
        ox = rp % OW
        oy = (rp // OW) % OH
        iy0 = oy * SH - PH
        ix0 = ox * SW - PW
        xrow = (rp // (OW * OH)) * sxb
        if W4 and GROUP_MODE == 0:
            s, zs = _scale_zero(s_ptr, z_ptr, 0, rc, cmask, C)
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for ky in range(0, KH):  # kernel rows in a loop, the taps of a row unrolled
            iy = iy0 + ky * DH
            rmask = pmask & (iy >= 0) & (iy < H)
            for kx in tl.static_range(KW):
                t = ky * KW + kx
                ix = ix0 + kx * DW
                inb = rmask & (ix >= 0) & (ix < W)
                x = tl.load(x_ptr + (xrow + iy * sxh + ix * sxw)[:, None] + rc[None, :],
                            mask=inb[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                if W4:  # one packed word holds 8 taps of a channel (cache hits after the first)
                    q = (tl.load(w_ptr + (t // 8) * C + rc, mask=cmask, other=0) >> ((t % 8) * 4)) & 0xF
                    if GROUP_MODE == 2:
                        s, zs = _scale_zero(s_ptr, z_ptr, tl.load(pg_ptr + t), rc, cmask, C)
                    elif GROUP_MODE == 1:
                        s, zs = _scale_zero(s_ptr, z_ptr, t // GROUP, rc, cmask, C)
                    w = _dequant(q, s, zs)
                else:
                    w = tl.load(w_ptr + t * C + rc, mask=cmask, other=0.0).to(tl.float32)
                acc += x * w[None, :]
        _epilogue(acc, rp, pmask, rc, cmask, b_ptr, r_ptr, y_ptr, C, HAS_BIAS, HAS_RES, ACT)


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n."""
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def igemm_plan(cfg: tuple[int, int, int, int, int], ng: int, cg: int, group_size: int, w4: bool,
               k_rows: int) -> tuple[int, int, int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, BLOCK_C, warps, stages, channel_loop) a table row becomes for one layer."""
    bm, bn, bc, warps, stages = cfg
    bn = min(bn, max(16, triton.next_power_of_2(ng))) if HAS_TRITON else bn
    div = _pow2_divisor(cg, bc)
    if w4 and group_size > 0:
        div = min(div, _pow2_divisor(group_size, bc))
    if div >= MIN_DOT_K:
        return bm, bn, div, warps, stages, True
    flat = max(MIN_DOT_K, min(bc, triton.next_power_of_2(k_rows)))
    return bm, bn, flat, warps, stages, False


def igemm_candidates(m: int, ng: int, groups: int, device: torch.device) -> list[tuple[int, ...]]:
    """Table rows in launch preference: the largest BLOCK_M that still fills every SM first."""
    n_sm = _sm_count(device)
    bn = 32 if ng <= 32 else 64
    first = next((i for i, c in enumerate(CONV_CONFIGS)
                  if triton.cdiv(m, c[0]) * triton.cdiv(ng, bn) * groups >= n_sm), len(CONV_CONFIGS) - 1)
    rows = CONV_CONFIGS[first:] + CONV_CONFIGS[:first][::-1]
    return [(bm, min(bn, b), bc, wp, st) for bm, b, bc, wp, st in rows]


def dw_candidates(p: int, c: int, device: torch.device) -> list[tuple[int, int, int]]:
    n_sm = _sm_count(device)
    first = next((i for i, (bp, bc, _) in enumerate(DW_CONFIGS)
                  if triton.cdiv(p, bp) * triton.cdiv(c, bc) >= n_sm), len(DW_CONFIGS) - 1)
    return DW_CONFIGS[first:] + DW_CONFIGS[:first][::-1]


_FITS: dict[tuple, str | None] = {}  # (kernel, meta, device, int args) -> why it cannot launch, or None


def skipped_configs() -> list[str]:
    """Configs this process compiled but never launched, each with the reason."""
    return [f"{name} {dict(meta)} on {dev}: {why}" for (name, meta, dev, _), why in _FITS.items() if why]


def _misfit(kernel, args: tuple, meta: dict, device: torch.device) -> str | None:
    """Why this launch cannot run (None if it can): compiles without launching and compares the
    kernel's own ``metadata.shared`` with the device's limit (see :func:`skipped_configs`). The
    interpreter has no shared memory: always None there."""
    if interpreting() or device.type != "cuda":
        return None
    key = (kernel.fn.__name__, tuple(sorted(meta.items())), str(device), args[8:])  # ints specialize too
    if key not in _FITS:
        need, limit = kernel.warmup(*args, grid=(1,), **meta).metadata.shared, smem_limit(device)
        _FITS[key] = None if need <= limit else f"needs {need} B of shared memory, the device allows {limit} B"
    return _FITS[key]


def fused_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        scales: torch.Tensor | None, zeros: torch.Tensor | None,
                        position_group: torch.Tensor | None, residual: torch.Tensor | None,
                        kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                        groups: int, group_size: int, act: str, config: tuple[int, ...] | None = None,
                        depthwise_kernel: bool = True) -> torch.Tensor:
    """Launch the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1); arguments as the op.

    ``config``: one row of CONV_CONFIGS (or DW_CONFIGS for the depthwise kernel) instead of the
    table's choice; ``depthwise_kernel=False`` sends depthwise layers through the implicit GEMM.
    """
    if not HAS_TRITON:
        raise RuntimeError("fused_conv2d_triton needs the 'triton' package (pip install triton)")
    oh, ow, cout, k = check_conv_args(x, weight, bias, scales, zeros, position_group, residual, kernel_size,
                                      stride, padding, dilation, groups, group_size, act)
    if x.dtype == torch.float32:
        raise TypeError("fused_conv2d_triton: x must be float16 or bfloat16 (float32 runs the reference)")
    x = x.contiguous()
    b, h, w_, c = x.shape
    if max(x.numel(), b * oh * ow * cout) >= 2**31:
        raise ValueError("fused_conv2d_triton: tensors of 2^31 elements or more need int64 indexing; "
                         "split the batch")
    kh, kw = kernel_size
    y = torch.empty(b, oh, ow, cout, device=x.device, dtype=x.dtype)
    w4 = weight.dtype == torch.int32
    mode = 2 if position_group is not None else (1 if group_size > 0 else 0)
    weight = weight.contiguous()
    dummy = weight  # stands in for absent optional pointers (never dereferenced)
    res = residual.contiguous() if residual is not None else None
    ptrs = (x, weight, scales.contiguous() if w4 else dummy, zeros.contiguous() if w4 else dummy,
            position_group if position_group is not None else dummy,
            bias if bias is not None else dummy, res if res is not None else dummy, y)
    flags = dict(KH=kh, KW=kw, W4=w4, GROUP_MODE=mode, GROUP=max(group_size, 1), HAS_BIAS=bias is not None,
                 HAS_RES=res is not None, ACT=ACTS[act])
    geom = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            x.stride(0), x.stride(1), x.stride(2))
    dw = depthwise_kernel and groups == c == cout
    m = b * oh * ow
    k_rows = weight.shape[0] * 8 if w4 else k
    if dw:
        args = (*ptrs, m, h, w_, oh, ow, c, *geom)
    else:
        args = (*ptrs, m, h, w_, oh, ow, cout, cout // groups, k, k_rows, *geom)
    key = (dw, args[8:], tuple(flags.items()), group_size, groups, config, x.dtype, weight.dtype, str(x.device))
    if key not in _PLANS:  # the table choice and the shared-memory check run once per layer shape
        _PLANS[key] = _plan(dw, args, flags, m, c, cout, groups, group_size, w4, k_rows, config, x.device)
    kernel, grid, meta = _PLANS[key]
    kernel[grid](*args, **meta)
    return y


_PLANS: dict[tuple, tuple] = {}


def _plan(dw: bool, args: tuple, flags: dict, m: int, c: int, cout: int, groups: int, group_size: int, w4: bool,
          k_rows: int, config: tuple[int, ...] | None, device: torch.device) -> tuple[Any, tuple[int, ...], dict]:
    """(kernel, grid, launch meta) of the first table row (or ``config``) that fits the device."""
    reasons = []
    if dw:
        for bp, bc, warps in [config] if config else dw_candidates(m, c, device):
            meta = dict(flags, BLOCK_P=bp, BLOCK_C=bc, num_warps=warps)
            why = _misfit(_conv_depthwise_kernel, args, meta, device)
            if why is None:
                return _conv_depthwise_kernel, (triton.cdiv(m, bp), triton.cdiv(c, bc)), meta
            reasons.append(f"{(bp, bc, warps)}: {why}")
    else:
        ng, cg = cout // groups, c // groups
        for cfg in [config] if config else igemm_candidates(m, ng, groups, device):
            bm, bn, bc, warps, stages, chan = igemm_plan(cfg, ng, cg, group_size, w4, k_rows)
            meta = dict(flags, CG=cg, CHANNEL_LOOP=chan, BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc, num_warps=warps,
                        num_stages=stages)
            why = _misfit(_conv_igemm_kernel, args, meta, device)
            if why is None:
                return _conv_igemm_kernel, (triton.cdiv(m, bm), triton.cdiv(ng, bn), groups), meta
            reasons.append(f"{cfg}: {why}")
    raise RuntimeError("fused_conv2d_triton: no config fits this device: " + "; ".join(reasons))


@torch.library.custom_op("adagrow::fused_conv2d", mutates_args=())
def fused_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 scales: torch.Tensor | None, zeros: torch.Tensor | None,
                 position_group: torch.Tensor | None, residual: torch.Tensor | None,
                 kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                 groups: int, group_size: int, act: str) -> torch.Tensor:
    """``act(conv(x) + bias + residual)`` on NHWC ``x``; weight ``[K, C_out]`` float or W4-packed."""
    if use_triton(x) and x.dtype != torch.float32:
        return fused_conv2d_triton(x, weight, bias, scales, zeros, position_group, residual, kernel_size,
                                   stride, padding, dilation, groups, group_size, act)
    check_conv_args(x, weight, bias, scales, zeros, position_group, residual, kernel_size, stride, padding,
                    dilation, groups, group_size, act)
    return fused_conv2d_ref(x, weight, bias, scales, zeros, position_group, residual, kernel_size, stride,
                            padding, dilation, groups, group_size, act)


@fused_conv2d.register_fake
def _(x, weight, bias, scales, zeros, position_group, residual, kernel_size, stride, padding, dilation,
      groups, group_size, act):
    oh, ow, cout, _ = check_conv_args(x, weight, bias, scales, zeros, position_group, residual, kernel_size,
                                      stride, padding, dilation, groups, group_size, act)
    return x.new_empty(x.shape[0], oh, ow, cout)


# ----------------------------------------------------------------------------- static inspection
# The convs of benchmarks/kernel_speed.py at batch 1 (32x32 input): a grown VGG-1-2-2 (64/96/128, fused
# 3x3 and 5x5 layers) and the depthwise 3x3 layers of a grown MobileNetV3 (1-1-1, 32/64/96).
# (C_in, C_out, kernel, stride, input H = W, groups); the benchmark asserts it runs these shapes.
BENCH_CONV_SHAPES: list[tuple[int, int, int, int, int, int]] = [
    (3, 64, 3, 1, 32, 1), (64, 64, 5, 1, 32, 1), (64, 96, 3, 2, 32, 1), (96, 96, 5, 1, 16, 1),
    (96, 96, 3, 1, 16, 1), (96, 128, 5, 2, 16, 1), (128, 128, 3, 1, 8, 1), (128, 128, 5, 1, 8, 1),
]
BENCH_DW_SHAPES: list[tuple[int, int, int, int, int, int]] = [
    (128, 128, 3, 1, 32, 128), (256, 256, 3, 1, 16, 256), (384, 384, 3, 1, 8, 384),
]


def _shape_args(cin: int, cout: int, k: int, stride: int, hw: int, batch: int, w4: bool) -> dict:
    pad = k // 2
    oh = out_size(hw, k, stride, pad, 1)
    wt = "*i32" if w4 else "*fp16"
    ptrs = {"x_ptr": "*fp16", "w_ptr": wt, "s_ptr": "*fp16" if w4 else wt, "z_ptr": "*fp16" if w4 else wt,
            "pg_ptr": "*i32", "b_ptr": "*fp16", "r_ptr": wt, "y_ptr": "*fp16"}
    geom = {"SH": stride, "SW": stride, "PH": pad, "PW": pad, "DH": 1, "DW": 1,
            "sxb": hw * hw * cin, "sxh": hw * cin, "sxw": cin}
    return {"ptrs": ptrs, "geom": geom, "oh": oh, "m": batch * oh * oh}


def static_specs(arch: int, batch: int = 1) -> list[StaticSpec]:
    """One StaticSpec per (table row, benchmark conv shape, fp16 / W4 position-group weight):
    paths ``conv`` (implicit GEMM) and ``dwconv`` (depthwise). ``arch`` does not change the
    tables (kept for the common interface)."""
    del arch
    specs = []
    for w4 in (False, True):
        flags = {"W4": w4, "GROUP_MODE": 2 if w4 else 0, "GROUP": 1, "HAS_BIAS": True, "HAS_RES": False,
                 "ACT": ACTS["relu"]}
        wbytes = 0.5 if w4 else 2
        for cin, cout, k, stride, hw, groups in BENCH_CONV_SHAPES:
            a = _shape_args(cin, cout, k, stride, hw, batch, w4)
            k_rows = (k * k * cin + 7) // 8 * 8 if w4 else k * k * cin
            ints = {"M": a["m"], "H": hw, "W": hw, "OH": a["oh"], "OW": a["oh"], "COUT": cout, "NG": cout,
                    "K": k * k * cin, "KP": k_rows, **a["geom"]}
            shape = {"B": batch, "Cin": cin, "Cout": cout, "k": k, "s": stride, "H": hw}
            for cfg in CONV_CONFIGS:
                bm, bn, bc, warps, stages, chan = igemm_plan((cfg[0], 32 if cout <= 32 else cfg[1], *cfg[2:]),
                                                             cout, cin, -1, w4, k_rows)
                consts = dict(flags, CG=cin, KH=k, KW=k, CHANNEL_LOOP=chan, BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc)
                sig, consts, aligned = runtime_signature({**a["ptrs"], **ints}, consts)
                iters = k * k * cin // bc if chan else -(-k_rows // bc)
                uniq = bm * bc * 2 + int(bc * bn * wbytes) + (2 * bn * 2 if w4 else 0)
                specs.append(StaticSpec(
                    kernel="_conv_igemm_kernel", path="conv", fn=_conv_igemm_kernel, signature=sig,
                    constexprs=consts, num_warps=warps, num_stages=stages,
                    config={"BLOCK_M": cfg[0], "BLOCK_N": cfg[1], "BLOCK_C": cfg[2], "warps": warps,
                            "stages": stages},
                    shape={**shape, "W4": int(w4)}, unique_bytes_per_iter=uniq, iters_per_program=iters,
                    n_programs=triton.cdiv(a["m"], bm) * triton.cdiv(cout, bn), w4=w4,
                    extra={"channel_loop": chan, "block_c": bc}, aligned=aligned,
                    extra_bytes=bm * bn * 2 + bn * 2))
        for cin, _, k, stride, hw, _ in BENCH_DW_SHAPES:
            a = _shape_args(cin, cin, k, stride, hw, batch, w4)
            ints = {"P": a["m"], "H": hw, "W": hw, "OH": a["oh"], "OW": a["oh"], "C": cin, **a["geom"]}
            shape = {"B": batch, "C": cin, "k": k, "s": stride, "H": hw, "W4": int(w4)}
            for bp, bc, warps in DW_CONFIGS:
                consts = dict(flags, KH=k, KW=k, BLOCK_P=bp, BLOCK_C=bc)
                sig, consts, aligned = runtime_signature({**a["ptrs"], **ints}, consts)
                uniq = k * (bp * bc * 2 + int(bc * wbytes) + (2 * bc * 2 if w4 else 0))  # a kernel row: k taps
                specs.append(StaticSpec(
                    kernel="_conv_depthwise_kernel", path="dwconv", fn=_conv_depthwise_kernel, signature=sig,
                    constexprs=consts, num_warps=warps, num_stages=1,
                    config={"BLOCK_P": bp, "BLOCK_C": bc, "warps": warps}, shape=shape,
                    unique_bytes_per_iter=uniq, iters_per_program=k,
                    n_programs=triton.cdiv(a["m"], bp) * triton.cdiv(cin, bc), w4=w4, aligned=aligned,
                    extra_bytes=bp * bc * 2 + bc * 2))
    return specs
