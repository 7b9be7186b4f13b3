"""W4A16 matmul ``y = x @ dequant(qweight)``: fp16/bf16 activations, 4-bit packed weights (docs/design.md §5).

``qweight`` int32 ``[K_pad/8, N]`` (8 nibbles along K, lowest nibble = lowest k), ``scales`` /
``zeros`` ``[K_pad/G, N]`` (``[1, N]`` per channel, ``group_size=-1``), read by the kernels as (s, z)
pairs ``[K_pad/G, N, 2]`` (:func:`adagrow.packed.pack_scale_zero`: one 4-byte load per group and
column), fp32 accumulation, output in x's dtype. Every packed word is loaded once (evict-first) and its 8 nibbles are unpacked in
registers; dequant uses no int->float conversion: nibble i is shifted under the exponent of 1.0
(``(w << (19 - 4i)) & 0x780000 | 0x3F800000`` = 1 + q/16 as fp32), so
``(q - z) s = fma(1 + q/16, 16 s, -(16 + z) s)`` is one FMA, exact before its rounding.

Paths by M (rows of x): a GEMV for M = 1 (per-element fp32 accumulator, one cross-thread
reduction after the K loop), a tensor-core kernel for small M ("splitk", BLOCK_M 16-32) and
large M ("gemm", BLOCK_M up to 128) that computes ``y^T = W^T x^T`` so the dequantized weight
tile is the MMA's first operand (async wgmma on Hopper), every global load staged by cp.async
(Triton's software pipeliner). SPLIT_K > 1 programs store fp32 partials into this call's
workspace; the last program of each output tile (tile counter) sums them in a fixed order and
writes y in its dtype.

Configs: :data:`CONFIGS` per path; a launch takes the user's tuning cache (:func:`tune`,
:func:`load_tuning`), then the shipped per-GPU table ``tables/w4a16.json`` keyed by
(N, K, M-bucket), then the path's first row (:func:`lookup_config`); nothing is tuned on the
request path. On CUDA a config whose compiled kernel needs more shared memory than the device
allows is skipped with its reason, never launched. :func:`static_specs` lists every table
config at the benchmark shapes for ``benchmarks/kernels_static.py``.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adagrow.packed import dequantize_packed, pack_scale_zero, unpack_scale_zero
from adagrow.files import write_json

from ._triton import HAS_TRITON, interpreting, smem_limit, tl, triton

# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) per path, default first. Every
# row compiles for sm_90 and sm_80 (ARCH_ONLY rows: for their archs) without spills and within
# shared memory, and the GEMV / split-K rows load at most 1.25x their tile's unique bytes
# (benchmarks/results/kernels_static_sm*.json).
CONFIGS: dict[str, list[tuple[int, int, int, int, int, int]]] = {
    "gemv": [(1, 128, 128, 8, 4, 3), (1, 128, 128, 16, 4, 3), (1, 128, 128, 4, 4, 3), (1, 256, 128, 4, 8, 4),
             (1, 256, 128, 8, 8, 3)],
    "splitk": [(16, 256, 64, 4, 8, 3), (16, 256, 128, 4, 8, 3), (16, 128, 128, 4, 4, 3), (16, 128, 128, 8, 4, 3),
               (32, 256, 64, 4, 8, 3), (16, 64, 128, 4, 4, 3)],
    "gemm": [(128, 128, 64, 2, 8, 4), (128, 128, 64, 4, 8, 4), (128, 128, 64, 1, 8, 3),
             (64, 128, 64, 2, 4, 3), (128, 64, 64, 2, 4, 3), (128, 64, 128, 2, 4, 3)],
}
# Rows checked (spill-free) only on some archs (compute capability as 10 * major + minor): the
# unsplit 128x128x64 GEMM row spills 8 bytes on sm_80 with every load staged by cp.async.
ARCH_ONLY: dict[tuple[int, ...], tuple[int, ...]] = {(128, 128, 64, 1, 8, 3): (90,)}
SPLITK_MAX_M = 32
PER_CHANNEL_GROUP = 1 << 30  # GROUP constexpr of group_size=-1: every K tile is in group 0
_TUNED: dict[str, tuple[int, ...]] = {}


# ----------------------------------------------------------------------------- reference
def w4a16_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """Pure-PyTorch reference: dequantize to float32, matmul, cast to x's dtype."""
    k = x.shape[-1]
    w = dequantize_packed(qweight, scales, zeros, 4, k, group_size).to(x.device)  # [N, K]
    return (x.float() @ w.t()).to(x.dtype)


def error_bound(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, weight_err: float = 0.0) -> torch.Tensor:
    """Elementwise bound ``[M, N]`` on ``|kernel(x) - x @ w.T|`` for x ``[M, K]`` fp16/bf16, w and
    s ``[N, K]`` float32 (dequantized weight and the scale of each weight).

    The tensor-core paths round the weight and the output to x's dtype (unit roundoff eps) with
    fp32 accumulation: ``2 eps |x| @ |w|``. The GEMV keeps weights in fp32 and forms
    ``16 s sum x (1 + q/16) - (16 + z) s sum x`` per group, whose fp32 cancellation error is at
    most ``K 2^-24 |x| @ (|w| + 32 s)``. ``weight_err``: extra per-weight error in units of
    ``eps * s`` (other kernels' dequant roundings)."""
    eps = 2.0**-11 if x.dtype == torch.float16 else 2.0**-8
    xa = x.float().abs()
    return 2 * eps * (xa @ w.abs().t()) + x.shape[-1] * 2.0**-24 * (xa @ (w.abs() + 32 * s).t()) \
        + eps * weight_err * (xa @ s.t())


def check_w4a16_args(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> tuple[int, int, int]:
    """Validate dtypes, devices and shapes; return (K, K_pad, N)."""
    if scales.dtype not in (torch.float16, torch.bfloat16) or zeros.dtype != scales.dtype:
        raise TypeError(f"w4a16_matmul: scales/zeros must share a float16/bfloat16 dtype, got {scales.dtype}/{zeros.dtype}")
    if tuple(scales.shape) != tuple(zeros.shape):
        raise ValueError(f"w4a16_matmul: scales/zeros shapes differ: {tuple(scales.shape)} / {tuple(zeros.shape)}")
    return _check(x, qweight, scales, group_size, (x, qweight, scales, zeros), "scales/zeros")


def check_w4a16_sz_args(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor,
                        group_size: int) -> tuple[int, int, int]:
    """:func:`check_w4a16_args` for the kernels' (s, z) pairs ``[n_groups, N, 2]``
    (:func:`adagrow.packed.pack_scale_zero`); returns (K, K_pad, N)."""
    if sz.dtype not in (torch.float16, torch.bfloat16) or sz.dim() != 3 or sz.shape[-1] != 2:
        raise TypeError(f"w4a16_matmul_sz: sz must be float16/bfloat16 (s, z) pairs [n_groups, N, 2], "
                        f"got {sz.dtype} {tuple(sz.shape)}")
    return _check(x, qweight, sz, group_size, (x, qweight, sz), "sz")


def _check(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, group_size: int,
           tensors: tuple[torch.Tensor, ...], what: str) -> tuple[int, int, int]:
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"w4a16_matmul: x must be float16 or bfloat16, got {x.dtype}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise TypeError(f"w4a16_matmul: qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"w4a16_matmul: tensors are on different devices: {sorted(map(str, devices))}")
    k, k_pad, n = x.shape[-1], qweight.shape[0] * 8, qweight.shape[1]
    if group_size != -1 and (group_size <= 0 or group_size % 8):
        raise ValueError(f"w4a16_matmul: group_size must be -1 or a positive multiple of 8, got {group_size}")
    step = group_size if group_size > 0 else 8
    if not (k <= k_pad < k + step) or k_pad % step:
        raise ValueError(f"w4a16_matmul: qweight holds K_pad={k_pad} rows of nibbles, which is not K={k} "
                         f"padded to a multiple of {step} (group_size={group_size}): the packed tensors "
                         "do not match x or the declared group size")
    n_groups = 1 if group_size == -1 else k_pad // group_size
    if tuple(sz.shape[:2]) != (n_groups, n):
        raise ValueError(f"w4a16_matmul: {what} must be [{n_groups}, {n}] for group_size={group_size}, "
                         f"got {tuple(sz.shape[:2])}")
    return k, k_pad, n


# ----------------------------------------------------------------------------- Triton kernels
if HAS_TRITON:
    @triton.jit
    def _nibble(qw, I: tl.constexpr):
        """Nibble I of each int32 word as the fp32 value 1 + q/16, by moving it to mantissa bits
        19..22 under the exponent of 1.0 (shift, mask | 0x3F800000, bitcast): no I2F."""
        if I < 5:
            t = qw << (19 - 4 * I)
        else:
            t = qw >> (4 * I - 19)
        return ((t & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _split8(x):
        """``[R, 8] -> 8 x [R]`` columns 0..7 (register shuffles, no memory traffic)."""
        r: tl.constexpr = x.shape[0]
        even, odd = tl.split(tl.reshape(x, (r, 4, 2)))
        e0, e1 = tl.split(tl.reshape(even, (r, 2, 2)))
        o0, o1 = tl.split(tl.reshape(odd, (r, 2, 2)))
        x0, x4 = tl.split(e0)
        x2, x6 = tl.split(e1)
        x1, x5 = tl.split(o0)
        x3, x7 = tl.split(o1)
        return x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def _dequant_joined(qw, s16, c, dtype: tl.constexpr):
        """Packed words ``[BK/8, BN]`` -> the 8 dequantized nibble planes joined as ``[BK/8, BN, 8]``
        (last axis = nibble i of the word), built in registers:
        ``(q - z) * s = fma(1 + q/16, 16 s, -(16 + z) s)``, one FMA, exact before the rounding."""
        bk8: tl.constexpr = qw.shape[0]
        bn: tl.constexpr = qw.shape[1]
        w0 = (_nibble(qw, 0) * s16 - c).to(dtype)
        w1 = (_nibble(qw, 1) * s16 - c).to(dtype)
        w2 = (_nibble(qw, 2) * s16 - c).to(dtype)
        w3 = (_nibble(qw, 3) * s16 - c).to(dtype)
        w4 = (_nibble(qw, 4) * s16 - c).to(dtype)
        w5 = (_nibble(qw, 5) * s16 - c).to(dtype)
        w6 = (_nibble(qw, 6) * s16 - c).to(dtype)
        w7 = (_nibble(qw, 7) * s16 - c).to(dtype)
        t = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7)))
        return tl.reshape(t, (bk8, bn, 8))

    @triton.jit
    def dequant_tile(qw, s16, c, dtype: tl.constexpr):
        """Packed words ``[BK/8, BN]`` -> dequantized ``[BK, BN]`` (row 8*w + i is nibble i of word row w)."""
        bk8: tl.constexpr = qw.shape[0]
        bn: tl.constexpr = qw.shape[1]
        return tl.reshape(tl.permute(_dequant_joined(qw, s16, c, dtype), (0, 2, 1)), (bk8 * 8, bn))

    @triton.jit
    def _dequant_tile_t(qw, s16, c, dtype: tl.constexpr):
        """Packed words ``[BK/8, BN]`` -> the transposed dequantized tile ``[BN, BK]`` (column 8*w + i
        is nibble i of word row w)."""
        bk8: tl.constexpr = qw.shape[0]
        bn: tl.constexpr = qw.shape[1]
        return tl.reshape(tl.permute(_dequant_joined(qw, s16, c, dtype), (1, 0, 2)), (bn, bk8 * 8))

    @triton.jit
    def _group_pairs(sz_ptr, t, n_tiles, rw, rn, nmask, N, K_PAD, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                     ROW_GROUPS: tl.constexpr):
        """The (s, z) pairs of K tile t as raw int32 (one 4-byte load per group and column; a
        prefetch past the last tile reads in bounds, values unused): ``[1, BN]`` when the tile lies
        in one group (GROUP a multiple of BLOCK_K), else ``[BK/8, BN]``, one group per word row.
        Kept as integers until :func:`_unpair`, so a prefetched pair needs no conversion before use."""
        if ROW_GROUPS:
            kw = t * (BLOCK_K // 8) + rw
            offs = (kw * 8 // GROUP)[:, None] * N + rn[None, :]
            mask = (kw < K_PAD // 8)[:, None] & nmask[None, :]
            p = tl.load(sz_ptr + offs, mask=mask, other=0)
        else:  # 1-D loads: the [BN] vector, not a 2-D tile, gets converted to the weights' layout
            offs = (tl.minimum(t, n_tiles - 1) * BLOCK_K // GROUP) * N + rn  # past the end: the last group
            p = tl.load(sz_ptr + offs, mask=nmask, other=0)[None, :]
        return p

    @triton.jit
    def _unpair(p, SCALE_BF16: tl.constexpr):
        """``(16 s, (16 + z) s)`` in fp32 from (s, z) pairs (s in the low half): bf16 halves become
        fp32 by a shift / mask alone; fp16 halves by a bitcast and one conversion each."""
        if SCALE_BF16:
            s = (p << 16).to(tl.float32, bitcast=True)
            z = (p & -65536).to(tl.float32, bitcast=True)
        else:
            s = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            z = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return 16.0 * s, (16.0 + z) * s

    @triton.jit
    def _words(qw_ptr, t, rw, rn, nmask, N, K_PAD, BK8: tl.constexpr):
        """Packed words ``[BK/8, BN]`` of K tile t (evict-first; masked past K_PAD, so a prefetch
        beyond the last tile reads nothing)."""
        kw = t * BK8 + rw
        return tl.load(qw_ptr + kw[:, None] * N + rn[None, :], mask=(kw < K_PAD // 8)[:, None] & nmask[None, :],
                       other=0, eviction_policy="evict_first")

    @triton.jit
    def _finish(acc, y_ptrs, mask, ws_ptrs, ws_stride, cnt_ptr, pid_k, SPLIT_K: tl.constexpr):
        """Store a program's fp32 partial. Split-K: plain store into its own slice
        ``ws[pid_k]`` of this call's workspace, then the tile's counter (acq_rel atomic: releases
        the partial); the last of the SPLIT_K programs sums the slices in a fixed order (the result
        does not depend on which program finished last) and stores y in its dtype. No data
        atomics, nothing to re-zero: the workspace is the caller's, per call (docs/kernels.md)."""
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)
        else:
            tl.store(ws_ptrs + pid_k * ws_stride, acc, mask=mask)
            tl.debug_barrier()
            if tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == SPLIT_K - 1:
                total = tl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                for j in tl.static_range(1, SPLIT_K):
                    total += tl.load(ws_ptrs + j * ws_stride, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _w4a16_gemv_kernel(x_ptr, qw_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, K_PAD,
                           GROUP: tl.constexpr, ROW_GROUPS: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, WIDE: tl.constexpr,
                           SCALE_BF16: tl.constexpr):
        """M = 1. Each program streams [BLOCK_K/8, BLOCK_N] tiles of words over K tiles pid_k,
        pid_k + SPLIT_K, ...; the words, x and scales/zeros of the next tile are loaded one
        iteration ahead (register double buffer), so no load of an iteration is waited for in
        the same iteration. The per-element fp32 accumulator is reduced across threads once,
        after the loop. Per group: ``s * (sum x q - z sum x) = 16 s * sum x (1 + q/16) - (16 + z) s * sum x``."""
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        BK8: tl.constexpr = BLOCK_K // 8
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if WIDE:
            rn = rn.to(tl.int64)
        nmask = rn < N
        rw = tl.arange(0, BK8)
        n_tiles = tl.cdiv(K_PAD, BLOCK_K)
        acc = tl.zeros((BK8, BLOCK_N), dtype=tl.float32)
        xk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # 1-D: each x element loaded by one thread
        sz = _group_pairs(sz_ptr, pid_k, n_tiles, rw, rn, nmask, N, K_PAD, GROUP, BLOCK_K, ROW_GROUPS)
        qw = _words(qw_ptr, pid_k, rw, rn, nmask, N, K_PAD, BK8)
        xv = tl.load(x_ptr + xk, mask=xk < K, other=0.0)
        for t in range(pid_k, n_tiles, SPLIT_K):
            nt = t + SPLIT_K  # prefetch tile nt while tile t is computed
            sz_n = _group_pairs(sz_ptr, nt, n_tiles, rw, rn, nmask, N, K_PAD, GROUP, BLOCK_K, ROW_GROUPS)
            qw_n = _words(qw_ptr, nt, rw, rn, nmask, N, K_PAD, BK8)
            xk_n = nt * BLOCK_K + tl.arange(0, BLOCK_K)
            xv_n = tl.load(x_ptr + xk_n, mask=xk_n < K, other=0.0)
            x0, x1, x2, x3, x4, x5, x6, x7 = _split8(tl.reshape(xv.to(tl.float32), (BK8, 8)))
            inner = x0[:, None] * _nibble(qw, 0) + x1[:, None] * _nibble(qw, 1) + x2[:, None] * _nibble(qw, 2) \
                + x3[:, None] * _nibble(qw, 3) + x4[:, None] * _nibble(qw, 4) + x5[:, None] * _nibble(qw, 5) \
                + x6[:, None] * _nibble(qw, 6) + x7[:, None] * _nibble(qw, 7)
            xsum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
            s16, c = _unpair(sz, SCALE_BF16)
            acc += s16 * inner - c * xsum[:, None]
            sz, qw, xv = sz_n, qw_n, xv_n
        _finish(tl.sum(acc, axis=0), y_ptr + rn, nmask, ws_ptr + rn, N, cnt_ptr + pid_n, pid_k, SPLIT_K)

    @triton.jit
    def _w4a16_mma_kernel(x_ptr, qw_ptr, sz_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, K_PAD,
                          GROUP: tl.constexpr, ROW_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, WIDE: tl.constexpr,
                          SCALE_BF16: tl.constexpr):
        """Tensor-core path (split-K for small M, tiled GEMM), computed swapped:
        ``y^T tile [BLOCK_N, BLOCK_M] += W^T [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, BLOCK_M]``. Each
        program dequantizes its weight tile once per K step in registers (words loaded once,
        nibbles unpacked in registers), which feeds the MMA; the words, the (s, z) pairs (4 bytes,
        the smallest cp.async) and the activation tile are all loaded in the loop of the tile
        that uses them, so Triton's software pipeliner stages them by cp.async ``num_stages - 1``
        tiles ahead: no global load is waited for by the iteration that issued it."""
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        BK8: tl.constexpr = BLOCK_K // 8
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if WIDE:
            rm = rm.to(tl.int64)
            rn = rn.to(tl.int64)
        nmask = rn < N
        mmask = rm < M
        rw = tl.arange(0, BK8)
        rk = tl.arange(0, BLOCK_K)
        n_tiles = tl.cdiv(K_PAD, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for t in range(pid_k, n_tiles, SPLIT_K):
            sz = _group_pairs(sz_ptr, t, n_tiles, rw, rn, nmask, N, K_PAD, GROUP, BLOCK_K, ROW_GROUPS)
            qw = _words(qw_ptr, t, rw, rn, nmask, N, K_PAD, BK8)
            xk = t * BLOCK_K + rk
            xt = tl.load(x_ptr + rm[None, :] * K + xk[:, None], mask=mmask[None, :] & (xk < K)[:, None], other=0.0)
            s16, c = _unpair(sz, SCALE_BF16)
            acc = tl.dot(_dequant_tile_t(qw, s16, c, x_ptr.dtype.element_ty), xt, acc)
        tile = pid_m * tl.num_programs(1) + pid_n
        offs = rm[None, :] * N + rn[:, None]
        ws_stride = tl.cast(M, tl.int64) * N if WIDE else M * N
        _finish(acc, y_ptr + offs, mmask[None, :] & nmask[:, None], ws_ptr + offs, ws_stride, cnt_ptr + tile, pid_k,
                SPLIT_K)


# ----------------------------------------------------------------------------- dispatch
def path_for(m: int) -> str:
    """The kernel path for M rows: gemv (M = 1), splitk (M <= SPLITK_MAX_M) or gemm."""
    return "gemv" if m == 1 else "splitk" if m <= SPLITK_MAX_M else "gemm"


def m_bucket(m: int) -> int:
    """Tuning bucket of M: 1, then the next power of two, capped at 256."""
    return 1 if m == 1 else min(1 << (m - 1).bit_length(), 256)


def _kernel_for(path: str):
    return _w4a16_gemv_kernel if path == "gemv" else _w4a16_mma_kernel


def _grid(path: str, cfg: tuple[int, ...], m: int, n: int) -> tuple[int, ...]:
    bm, bn, _, split, _, _ = cfg
    return (triton.cdiv(n, bn), split) if path == "gemv" else (triton.cdiv(m, bm), triton.cdiv(n, bn), split)


INT32_LIMIT = 2**31


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch needs that depends only on (path, config, M, N, K_pad, group): the
    kernel's grid, constexprs and workspace size, computed once per layer shape and M
    (:func:`plan_for`), so a call does no grid or constexpr arithmetic on the host."""
    path: str
    config: tuple[int, ...]
    grid: tuple[int, ...]
    meta: dict
    ws_floats: int   # fp32 partials, SPLIT_K slices of M x N (0 without split-K)
    tiles: int       # counters: one per output tile (0 without split-K)

    @property
    def kernel(self):
        return _kernel_for(self.path)


_PLANS: dict[tuple, LaunchPlan] = {}


def plan_for(path: str, cfg: tuple[int, ...], m: int, n: int, k_pad: int, group_size: int,
             scale_dtype: torch.dtype = torch.float16) -> LaunchPlan:
    """The (memoised) :class:`LaunchPlan` of a launch. ``WIDE`` (int64 offsets) when an offset
    into x, y, the packed words or the workspace can reach 2^31."""
    key = (path, cfg, m, n, k_pad, group_size, scale_dtype)
    plan = _PLANS.get(key)
    if plan is None:
        bm, bn, bk, split, warps, stages = cfg
        grid = _grid(path, cfg, m, n)
        group = PER_CHANNEL_GROUP if group_size == -1 else group_size
        wide = max(m * k_pad, m * n * split, k_pad // 8 * n) >= INT32_LIMIT
        meta = {"GROUP": group, "ROW_GROUPS": group % bk != 0, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
                "WIDE": wide, "SCALE_BF16": scale_dtype == torch.bfloat16, "num_warps": warps, "num_stages": stages,
                "enable_fp_fusion": True}
        if path != "gemv":
            meta["BLOCK_M"] = bm
        tiles = grid[0] * (grid[1] if path != "gemv" else 1)
        plan = _PLANS[key] = LaunchPlan(path, cfg, grid, meta, m * n * split if split > 1 else 0,
                                        tiles if split > 1 else 0)
    return plan


def split_workspace(plan: LaunchPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This call's split-K workspace, from PyTorch's caching allocator on the current stream:
    fp32 partial slices (uninitialised: each program writes its slice before the tile's last
    program reads it) and zeroed int32 tile counters. Nothing is shared between calls, so
    concurrent streams and captured CUDA graphs (whose allocations come from the graph's
    private pool) never see another call's workspace, and a failed launch leaves nothing
    behind. Without split-K both are 1-element placeholders."""
    ws = torch.empty(max(plan.ws_floats, 1), device=device, dtype=torch.float32)
    cnt = torch.zeros(max(plan.tiles, 1), device=device, dtype=torch.int32)
    return ws, cnt


def _args(x2: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, plan: LaunchPlan, y: torch.Tensor) -> list:
    """Kernel arguments; the (s, z) pairs go in as one int32 per (group, column)."""
    m, k = x2.shape
    k_pad, n = qweight.shape[0] * 8, qweight.shape[1]
    ws, cnt = split_workspace(plan, x2.device)
    return [x2, qweight, sz.view(torch.int32), y, ws, cnt] + ([n] if plan.path == "gemv" else [m, n]) + [k, k_pad]


_SMEM: dict[tuple, int] = {}


def config_problem(path: str, cfg: tuple[int, ...], group_size: int, dtype: torch.dtype = torch.float16,
                   device: torch.device | None = None) -> str | None:
    """Why ``cfg`` cannot run ``path`` here (None if it can). On CUDA the compiled kernel's
    shared memory (``metadata.shared``, what Triton checks at launch) must fit the device's
    per-block limit; the compile is cached per (path, config, group, dtype, device). Every
    config handles every group size (tiles spanning groups load scales per word row)."""
    if device is None or device.type != "cuda" or not HAS_TRITON:
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if cfg in ARCH_ONLY and 10 * major + minor not in ARCH_ONLY[cfg]:
        return f"checked only for sm_{'/sm_'.join(map(str, ARCH_ONLY[cfg]))} (this device is sm_{major}{minor})"
    key = (path, cfg, group_size, dtype, device)
    if key not in _SMEM:
        m = 1 if path == "gemv" else cfg[0]
        x = torch.empty(m, 64 * 8, device=device, dtype=dtype)
        qw = torch.empty(64, 256, device=device, dtype=torch.int32)
        sz = torch.empty(64 * 8 // (group_size if group_size > 0 else 512), 256, 2, device=device, dtype=dtype)
        plan = plan_for(path, cfg, m, 256, 64 * 8, group_size, dtype)
        args = _args(x, qw, sz, plan, torch.empty(m, 256, device=device, dtype=dtype))
        _SMEM[key] = int(plan.kernel.warmup(*args, grid=plan.grid, **plan.meta).metadata.shared)
    if _SMEM[key] > smem_limit(device):
        return f"needs {_SMEM[key]} B of shared memory, the device allows {smem_limit(device)} B per block"
    return None


def valid_configs(path: str, group_size: int, dtype: torch.dtype = torch.float16,
                  device: torch.device | None = None) -> list[tuple[int, ...]]:
    """The table's configs for ``path`` that can run (see :func:`config_problem`); raises with
    every config's reason when none can."""
    problems = {cfg: config_problem(path, cfg, group_size, dtype, device) for cfg in CONFIGS[path]}
    out = [cfg for cfg, why in problems.items() if why is None]
    if not out:
        raise ValueError(f"no w4a16 {path} config can run here: "
                         + "; ".join(f"{c}: {w}" for c, w in problems.items()))
    return out


def _launch(x2: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, plan: LaunchPlan) -> torch.Tensor:
    y = torch.empty(x2.shape[0], qweight.shape[1], device=x2.device, dtype=x2.dtype)
    plan.kernel[plan.grid](*_args(x2, qweight, sz, plan, y), **plan.meta)
    return y


def w4a16_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, path: str | None = None, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """:func:`w4a16_triton_sz` from separate ``scales`` / ``zeros``: repacks them into (s, z)
    pairs (:func:`adagrow.packed.pack_scale_zero`, one small copy) on every call; layers keep
    the pairs instead (``QuantLinear``)."""
    check_w4a16_args(x, qweight, scales, zeros, group_size)
    return w4a16_triton_sz(x, qweight, pack_scale_zero(scales, zeros), group_size, path, config)


def w4a16_triton_sz(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, group_size: int,
                    path: str | None = None, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """Run the Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1) on (s, z) pairs
    ``sz [n_groups, N, 2]``.

    ``path`` / ``config`` force a kernel path and config (tests, tuning); by default the path
    follows M and the config comes from :func:`lookup_config` (nothing is tuned here).
    """
    if not HAS_TRITON:
        raise RuntimeError("w4a16_triton needs the 'triton' package (pip install triton)")
    _, k_pad, n = check_w4a16_sz_args(x, qweight, sz, group_size)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    path = path or path_for(m)
    if path == "gemv" and m != 1:
        raise ValueError(f"w4a16 gemv path computes one row; x has {m} rows")
    if config is None:
        config = lookup_config(m, n, k_pad, group_size, x.dtype, x.device)
    elif path != "gemv" and config[0] < 16:
        raise ValueError(f"w4a16 {path} config {config}: BLOCK_M must be >= 16 (tensor-core tiles)")
    plan = plan_for(path, tuple(config), m, n, k_pad, group_size, sz.dtype)
    return _launch(x2, qweight.contiguous(), sz.contiguous(), plan).reshape(*x.shape[:-1], n)


def kernel_supports(group_size: int) -> bool:
    """Whether the kernels handle this contiguous group size (-1 or a positive multiple of 8)."""
    return group_size == -1 or (group_size > 0 and group_size % 8 == 0)


def use_triton(x: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1."""
    return HAS_TRITON and (x.is_cuda or (interpreting() and x.device.type == "cpu"))


@torch.library.custom_op("adagrow::w4a16_matmul", mutates_args=())
def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """``x [..., K]`` (fp16/bf16) @ packed 4-bit weight ``[K, N]`` -> ``[..., N]`` in x's dtype.
    Repacks scales / zeros into the kernels' pairs per call; :func:`w4a16_matmul_sz` takes them
    prepacked."""
    if use_triton(x):
        return w4a16_triton(x, qweight, scales, zeros, group_size)
    check_w4a16_args(x, qweight, scales, zeros, group_size)
    return w4a16_matmul_ref(x, qweight, scales, zeros, group_size)


@w4a16_matmul.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
      group_size: int) -> torch.Tensor:
    _, _, n = check_w4a16_args(x, qweight, scales, zeros, group_size)
    return x.new_empty(*x.shape[:-1], n)


@torch.library.custom_op("adagrow::w4a16_matmul_sz", mutates_args=())
def w4a16_matmul_sz(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """:func:`w4a16_matmul` on (s, z) pairs ``sz [n_groups, N, 2]`` from
    :func:`adagrow.packed.pack_scale_zero` (the layout the kernels load: one 4-byte element per
    group and column)."""
    if use_triton(x):
        return w4a16_triton_sz(x, qweight, sz, group_size)
    check_w4a16_sz_args(x, qweight, sz, group_size)
    scales, zeros = unpack_scale_zero(sz)
    return w4a16_matmul_ref(x, qweight, scales, zeros, group_size)


@w4a16_matmul_sz.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    _, _, n = check_w4a16_sz_args(x, qweight, sz, group_size)
    return x.new_empty(*x.shape[:-1], n)


# ----------------------------------------------------------------------------- tuned configs
TABLE_FILE = Path(__file__).parent / "tables" / "w4a16.json"
_TABLE: dict[str, dict[str, list[int]]] | None = None
_LOOKUP: dict[tuple, tuple[int, ...]] = {}  # memo of lookup_config, cleared when _TUNED changes


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _key(path: str, m: int, n: int, k_pad: int, group_size: int, dtype: torch.dtype, device: torch.device) -> str:
    return f"{path}|{m_bucket(m)}|{n}|{k_pad}|{group_size}|{str(dtype).split('.')[-1]}|{_device_name(device)}"


def shipped_table() -> dict[str, dict[str, list[int]]]:
    """The package's table: ``{"<major>.<minor>/<SMs>": {"N,K,M-bucket": config}}``."""
    global _TABLE
    if _TABLE is None:
        data = json.loads(TABLE_FILE.read_text())
        _TABLE = {gpu: {key: list(cfg) for key, cfg in rows.items()} for gpu, rows in data["gpus"].items()}
    return _TABLE


def device_key(device: torch.device) -> str:
    """Table key of a device: compute capability and SM count (``"9.0/132"`` for H100 SXM, H200
    and GH200 alike), ``"cpu"`` off CUDA."""
    if device.type != "cuda":
        return "cpu"
    props = torch.cuda.get_device_properties(device)
    return f"{props.major}.{props.minor}/{props.multi_processor_count}"


def table_rows(key: str) -> dict[str, list[int]]:
    """The shipped rows for a device key: the exact (capability, SM count) entry, else the entry
    of the same capability with the nearest SM count, else none."""
    table = shipped_table()
    if key in table or "/" not in key:
        return table.get(key, {})
    cc, sms = key.split("/")
    same = [k for k in table if k.split("/")[0] == cc]
    return table[min(same, key=lambda k: abs(int(k.split("/")[1]) - int(sms)))] if same else {}


def lookup_config(m: int, n: int, k_pad: int, group_size: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[int, ...]:
    """Config for a launch, without tuning: the user's tuning cache (:func:`tune` /
    :func:`load_tuning`), then the shipped table of the device's (compute capability, SM count)
    (:func:`table_rows`) keyed by (N, K, M-bucket), then the
    first valid row of the path's table. Entries that cannot run here are passed over."""
    path = path_for(m)
    memo = (path, m_bucket(m), n, k_pad, group_size, dtype, device)
    if memo not in _LOOKUP:
        _LOOKUP[memo] = _resolve_config(path, m, n, k_pad, group_size, dtype, device)
    return _LOOKUP[memo]


def _resolve_config(path: str, m: int, n: int, k_pad: int, group_size: int, dtype: torch.dtype,
                    device: torch.device) -> tuple[int, ...]:
    candidates = [_TUNED.get(_key(path, m, n, k_pad, group_size, dtype, device))]
    candidates.append(table_rows(device_key(device)).get(f"{n},{k_pad},{m_bucket(m)}"))
    for cfg in candidates:
        if cfg is not None and tuple(cfg) in CONFIGS[path] and \
                config_problem(path, tuple(cfg), group_size, dtype, device) is None:
            return tuple(cfg)
    return valid_configs(path, group_size, dtype, device)[0]


def _time(fn, rep: int) -> float:
    if torch.cuda.is_available() and not interpreting():
        return float(triton.testing.do_bench(fn, rep=rep))
    fn()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t0) / 3


def tune(m: int, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
         dtype: torch.dtype = torch.float16, rep: int = 50) -> tuple[int, ...]:
    """Time every config of M's path that can run here (warm-up only, never on the request
    path); cache and return the best. Configs that cannot run are skipped with their reason
    printed; kernel errors propagate."""
    k_pad, n = qweight.shape[0] * 8, qweight.shape[1]
    x = torch.randn(m, k_pad, device=qweight.device, dtype=dtype)
    sz = pack_scale_zero(scales, zeros)  # once: the timed calls are what a layer's calls are
    path = path_for(m)
    times = {}
    for cfg in CONFIGS[path]:
        why = config_problem(path, cfg, group_size, dtype, qweight.device)
        if why:
            print(f"w4a16 tune: skipping {path} {cfg}: {why}")
            continue
        times[cfg] = _time(lambda cfg=cfg: w4a16_triton_sz(x, qweight, sz, group_size, path, cfg), rep)
    if not times:
        raise ValueError(f"w4a16 tune: no {path} config can run group_size={group_size} here")
    best = min(times, key=times.get)
    _TUNED[_key(path, m, n, k_pad, group_size, dtype, qweight.device)] = best
    _LOOKUP.clear()
    return best


def save_tuning(path: str | os.PathLike) -> None:
    """Write the tuned configs as JSON (temp file + rename)."""
    write_json(path, {k: list(v) for k, v in _TUNED.items()})


def load_tuning(path: str | os.PathLike) -> int:
    """Load configs saved by :func:`save_tuning`; returns how many were loaded."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read tuning cache {path}: {exc}") from exc
    for k, v in data.items():
        path_name = k.split("|")[0]
        if path_name not in CONFIGS or tuple(v) not in CONFIGS[path_name]:
            raise ValueError(f"tuning cache {path}: bad entry {k!r}: {v!r} (not a row of the {path_name!r} table)")
        _TUNED[k] = tuple(int(t) for t in v)
    _LOOKUP.clear()
    return len(data)


# ----------------------------------------------------------------------------- static inspection
STATIC_SHAPES = [(8192, 8192), (4096, 4096)]  # (N, K) of the benchmark, group 128
STATIC_MS = [1, 16, 128]
CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")


def static_specs(arch: int) -> list:
    """One :class:`~adagrow.kernels.static.StaticSpec` per (table config of M's path for this
    arch, benchmark shape), fp16 activations, group 128, for ``benchmarks/kernels_static.py``. The spec of the
    config :func:`lookup_config` would pick on the arch's reference GPU is marked
    ``table_default``."""
    from .static import ARCH, StaticSpec, runtime_signature
    g = 128
    gpu_rows = table_rows(ARCH[arch]["table_key"])
    specs = []
    for n, k in STATIC_SHAPES:
        for m in STATIC_MS:
            path = path_for(m)
            default = tuple(gpu_rows.get(f"{n},{k},{m_bucket(m)}", CONFIGS[path][0]))
            for cfg in CONFIGS[path]:
                if arch not in ARCH_ONLY.get(cfg, (arch,)):
                    continue
                bm, bn, bk, split, warps, stages = cfg
                ptrs = {"x_ptr": "*fp16", "qw_ptr": "*i32", "sz_ptr": "*i32", "y_ptr": "*fp16",
                        "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
                ints = {"N": n} if path == "gemv" else {"M": m, "N": n}
                consts = {"GROUP": g, "ROW_GROUPS": g % bk != 0, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
                          "WIDE": False, "SCALE_BF16": False}
                if path != "gemv":
                    consts["BLOCK_M"] = bm
                sig, consts, aligned = runtime_signature({**ptrs, **ints, "K": k, "K_PAD": k}, consts)
                grid = _grid(path, cfg, m, n)
                rows = min(bm, m)
                unique = bk // 8 * bn * 4 + rows * bk * 2 + 2 * bn * 2  # words + x + this group's s, z
                out = rows * bn * (2 if split == 1 else 4 + 4 + 2)  # store; or partial + 1/SPLIT_K of sum + y
                specs.append(StaticSpec(
                    kernel=_kernel_for(path).__name__, path=path, fn=_kernel_for(path), signature=sig,
                    constexprs=consts, num_warps=warps, num_stages=stages, config=dict(zip(CONFIG_FIELDS, cfg)),
                    shape={"M": m, "N": n, "K": k, "G": g}, unique_bytes_per_iter=unique,
                    iters_per_program=triton.cdiv(k, bk * split), n_programs=math.prod(grid), aligned=aligned,
                    extra_bytes=out, hbm_bytes=n * k // 2 + 2 * (k // g) * n * 2 + m * k * 2 + m * n * 2,
                    extra={"table_default": cfg == default}))
    return specs
