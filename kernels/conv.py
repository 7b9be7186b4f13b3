"""Fused NHWC convolution for the deploy form (DESIGN §6).

``fused_conv2d`` computes ``act(conv(x) + bias + residual)`` on NHWC activations. The weight is a
``[K, C_out]`` matrix in canonical ``(ky, kx, cin)`` K order, either fp16/bf16 or W4A16-packed
(int32 ``[K_pad/8, C_out]`` with ``scales``/``zeros`` ``[n_groups, C_out]``; groups per channel
(``group_size=-1``), contiguous (``group_size=G``) or by kernel position through
``position_group: int32[kh*kw]`` (position / tier groups)).

Two kernels: an implicit GEMM (any groups; each program owns a tile of output pixels x output
channels of one conv group and walks K), and a direct depthwise kernel (groups == C_in == C_out)
that loops over the kh*kw taps with channels vectorised. The residual is added before the
activation (ResNet style); pass ``act="none"`` for a linear bottleneck.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from adagrow.packed import dequantize_packed

from ._triton import HAS_TRITON, tl, triton
from .w4a16 import use_triton

ACTS = {"none": 0, "relu": 1, "silu": 2, "hardswish": 3, "gelu": 4}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the implicit GEMM, chosen by C_out/g.
CONV_CONFIGS = {"narrow": (64, 32, 32, 4, 3), "wide": (64, 64, 32, 4, 3)}
# (BLOCK_P, BLOCK_C, num_warps) for the depthwise kernel.
DW_CONFIG = (32, 64, 4)


def _torch_act(y: torch.Tensor, act: str) -> torch.Tensor:
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
    return _torch_act(y, act).to(x.dtype)


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
    def _scale_rows(rk, pg_ptr, CG, KK, GROUP_MODE: tl.constexpr, GROUP: tl.constexpr):
        """Scale row of every K index: 0 per channel, k // G contiguous, table by kernel position."""
        if GROUP_MODE == 2:
            return tl.load(pg_ptr + tl.minimum(rk // CG, KK - 1))
        elif GROUP_MODE == 1:
            return rk // GROUP
        else:
            return rk * 0

    @triton.jit
    def _conv_igemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, pg_ptr, b_ptr, r_ptr, y_ptr,
                           M, H, W, OH, OW, COUT, CG, NG, K, K_PAD, KK,
                           SH, SW, PH, PW, DH, DW, sxb, sxh, sxw, swk, swn, ssg, ssn,
                           KW: tl.constexpr, W4: tl.constexpr, GROUP_MODE: tl.constexpr, GROUP: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n, pid_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        b = rm // (OH * OW)
        oy = (rm // OW) % OH
        ox = rm % OW
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < NG
        cout = pid_g * NG + rn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_PAD, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            ky = rk // (KW * CG)
            kx = (rk // CG) % KW
            c = pid_g * CG + rk % CG
            iy = oy[:, None] * SH - PH + ky[None, :] * DH
            ix = ox[:, None] * SW - PW + kx[None, :] * DW
            xmask = (rm[:, None] < M) & (rk[None, :] < K) & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            x = tl.load(x_ptr + b[:, None] * sxb + iy * sxh + ix * sxw + c[None, :], mask=xmask, other=0.0)
            if W4:
                qw = tl.load(w_ptr + (rk // 8)[:, None] * swk + cout[None, :] * swn,
                             mask=(rk[:, None] < K_PAD) & nmask[None, :], other=0)
                q = ((qw >> ((rk % 8) * 4)[:, None]) & 0xF).to(tl.float32)
                row = _scale_rows(rk, pg_ptr, CG, KK, GROUP_MODE, GROUP)
                smask = (rk[:, None] < K_PAD) & nmask[None, :]
                z = tl.load(z_ptr + row[:, None] * ssg + cout[None, :] * ssn, mask=smask, other=0.0).to(tl.float32)
                if GROUP_MODE == 0:
                    w = q - z
                else:
                    s = tl.load(s_ptr + row[:, None] * ssg + cout[None, :] * ssn, mask=smask, other=0.0)
                    w = (q - z) * s.to(tl.float32)
            else:
                w = tl.load(w_ptr + rk[:, None] * swk + cout[None, :] * swn,
                            mask=(rk[:, None] < K) & nmask[None, :], other=0.0)
            acc += tl.dot(x, w.to(x.dtype))
        if W4 and GROUP_MODE == 0:
            acc = acc * tl.load(s_ptr + cout * ssn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + cout, mask=nmask, other=0.0).to(tl.float32)[None, :]
        omask = (rm[:, None] < M) & nmask[None, :]
        optr = rm[:, None] * COUT + cout[None, :]
        if HAS_RES:
            acc += tl.load(r_ptr + optr, mask=omask, other=0.0).to(tl.float32)
        acc = _act(acc, ACT)
        tl.store(y_ptr + optr, acc.to(y_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _conv_depthwise_kernel(x_ptr, w_ptr, s_ptr, z_ptr, pg_ptr, b_ptr, r_ptr, y_ptr,
                               P, H, W, OH, OW, C, SH, SW, PH, PW, DH, DW, sxb, sxh, sxw, swk, swn, ssg, ssn,
                               KH: tl.constexpr, KW: tl.constexpr, W4: tl.constexpr,
                               GROUP_MODE: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                               HAS_RES: tl.constexpr, ACT: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_p, pid_c = tl.program_id(0), tl.program_id(1)
        rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        pmask, cmask = rp < P, rc < C
        b = rp // (OH * OW)
        oy = (rp // OW) % OH
        ox = rp % OW
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for t in tl.static_range(KH * KW):
            iy = oy * SH - PH + (t // KW) * DH
            ix = ox * SW - PW + (t % KW) * DW
            inb = pmask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            x = tl.load(x_ptr + (b * sxb + iy * sxh + ix * sxw)[:, None] + rc[None, :],
                        mask=inb[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            if W4:
                qw = tl.load(w_ptr + (t // 8) * swk + rc * swn, mask=cmask, other=0)
                q = ((qw >> ((t % 8) * 4)) & 0xF).to(tl.float32)
                if GROUP_MODE == 2:
                    row = tl.load(pg_ptr + t)
                elif GROUP_MODE == 1:
                    row = t // GROUP
                else:
                    row = 0
                s = tl.load(s_ptr + row * ssg + rc * ssn, mask=cmask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + row * ssg + rc * ssn, mask=cmask, other=0.0).to(tl.float32)
                w = (q - z) * s
            else:
                w = tl.load(w_ptr + t * swk + rc * swn, mask=cmask, other=0.0).to(tl.float32)
            acc += x * w[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rc, mask=cmask, other=0.0).to(tl.float32)[None, :]
        omask = pmask[:, None] & cmask[None, :]
        optr = rp[:, None] * C + rc[None, :]
        if HAS_RES:
            acc += tl.load(r_ptr + optr, mask=omask, other=0.0).to(tl.float32)
        acc = _act(acc, ACT)
        tl.store(y_ptr + optr, acc.to(y_ptr.dtype.element_ty), mask=omask)


def fused_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        scales: torch.Tensor | None, zeros: torch.Tensor | None,
                        position_group: torch.Tensor | None, residual: torch.Tensor | None,
                        kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                        groups: int, group_size: int, act: str, config: tuple[int, ...] | None = None,
                        depthwise_kernel: bool = True) -> torch.Tensor:
    """Launch the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1); arguments as the op."""
    if not HAS_TRITON:
        raise RuntimeError("fused_conv2d_triton needs the 'triton' package (pip install triton)")
    oh, ow, cout, k = check_conv_args(x, weight, bias, scales, zeros, position_group, residual, kernel_size,
                                      stride, padding, dilation, groups, group_size, act)
    if x.dtype == torch.float32:
        raise TypeError("fused_conv2d_triton: x must be float16 or bfloat16 (float32 runs the reference)")
    x = x.contiguous()
    b, h, w_, c = x.shape
    kh, kw = kernel_size
    y = torch.empty(b, oh, ow, cout, device=x.device, dtype=x.dtype)
    w4 = weight.dtype == torch.int32
    mode = 2 if position_group is not None else (1 if group_size > 0 else 0)
    dummy = weight  # stands in for absent optional pointers (never dereferenced)
    res = residual.contiguous() if residual is not None else None
    ptrs = (weight, scales if w4 else dummy, zeros if w4 else dummy,
            position_group if position_group is not None else dummy,
            bias if bias is not None else dummy, res if res is not None else dummy, y)
    ss = (scales.stride(0), scales.stride(1)) if w4 else (0, 0)
    flags = dict(W4=w4, GROUP_MODE=mode, GROUP=max(group_size, 1), HAS_BIAS=bias is not None,
                 HAS_RES=res is not None, ACT=ACTS[act])
    geom = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), *ss)
    if depthwise_kernel and groups == c == cout:
        bp, bc, warps = config or DW_CONFIG
        p = b * oh * ow
        grid = (triton.cdiv(p, bp), triton.cdiv(c, bc))
        _conv_depthwise_kernel[grid](x, *ptrs, p, h, w_, oh, ow, c, *geom, KH=kh, KW=kw, BLOCK_P=bp,
                                     BLOCK_C=bc, num_warps=warps, **flags)
    else:
        ng, cg = cout // groups, c // groups
        bm, bn, bk, warps, stages = config or CONV_CONFIGS["wide" if ng > 32 else "narrow"]
        m = b * oh * ow
        k_pad = weight.shape[0] * 8 if w4 else k
        grid = (triton.cdiv(m, bm), triton.cdiv(ng, bn), groups)
        _conv_igemm_kernel[grid](x, *ptrs, m, h, w_, oh, ow, cout, cg, ng, k, k_pad, kh * kw, *geom,
                                 KW=kw, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                                 num_stages=stages, **flags)
    return y


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
