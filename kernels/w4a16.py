"""W4A16 matmul ``y = x @ dequant(qweight)``: fp16/bf16 activations, 4-bit packed weights (DESIGN §5).

``qweight`` int32 ``[K_pad/8, N]`` (8 nibbles along K, lowest nibble = lowest k), ``scales`` /
``zeros`` ``[K_pad/G, N]`` (``[1, N]`` per channel, ``group_size=-1``), fp32 accumulation, output
in x's dtype. Three paths, chosen by M (rows of x): a GEMV for M = 1, split-K for small M
(atomic fp32 reduction over K slices), a tiled GEMM otherwise. Each path has a small table of
configs below; :func:`tune` times them on the GPU once (a warm-up, never on the serving path) and
caches the winner per (path, bucketed M, N, K, G, dtype, device), which :func:`save_tuning` /
:func:`load_tuning` persist. Untuned shapes use the first valid config of the table.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from adagrow.packed import dequantize_packed
from adagrow.files import write_json

from ._triton import HAS_TRITON, interpreting, smem_limit, tl, triton

# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) per path, best-guess first.
CONFIGS: dict[str, list[tuple[int, int, int, int, int, int]]] = {
    "gemv": [(1, 128, 128, 4, 4, 3), (1, 64, 256, 4, 4, 3), (1, 256, 128, 2, 4, 3), (1, 128, 64, 8, 4, 4),
             (1, 64, 128, 16, 2, 4), (1, 128, 32, 8, 4, 4)],
    "splitk": [(16, 64, 128, 4, 4, 3), (16, 128, 64, 4, 4, 3), (16, 64, 64, 8, 4, 4), (32, 64, 128, 4, 4, 3),
               (16, 128, 128, 2, 4, 3), (16, 64, 32, 8, 4, 4)],
    "gemm": [(64, 128, 64, 1, 4, 3), (128, 128, 64, 1, 8, 3), (128, 256, 64, 1, 8, 3), (64, 64, 128, 1, 4, 4),
             (32, 128, 128, 1, 4, 4), (64, 64, 32, 1, 4, 4)],
}
SPLITK_MAX_M = 32
MIN_GROUP = 32  # smallest BLOCK_K in the tables: contiguous groups must be multiples of it
_TUNED: dict[str, tuple[int, ...]] = {}


# ----------------------------------------------------------------------------- reference
def w4a16_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """Pure-PyTorch reference: dequantize to float32, matmul, cast to x's dtype."""
    k = x.shape[-1]
    w = dequantize_packed(qweight, scales, zeros, 4, k, group_size).to(x.device)  # [N, K]
    return (x.float() @ w.t()).to(x.dtype)


def check_w4a16_args(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> tuple[int, int, int]:
    """Validate dtypes, devices and shapes; return (K, K_pad, N)."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"w4a16_matmul: x must be float16 or bfloat16, got {x.dtype}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise TypeError(f"w4a16_matmul: qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    if scales.dtype not in (torch.float16, torch.bfloat16) or zeros.dtype != scales.dtype:
        raise TypeError(f"w4a16_matmul: scales/zeros must share a float16/bfloat16 dtype, got {scales.dtype}/{zeros.dtype}")
    devices = {t.device for t in (x, qweight, scales, zeros)}
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
    if tuple(scales.shape) != (n_groups, n) or tuple(zeros.shape) != (n_groups, n):
        raise ValueError(f"w4a16_matmul: scales/zeros must be [{n_groups}, {n}] for group_size={group_size}, "
                         f"got {tuple(scales.shape)} / {tuple(zeros.shape)}")
    return k, k_pad, n


# ----------------------------------------------------------------------------- Triton kernels
if HAS_TRITON:
    @triton.jit
    def _w4a16_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, K_PAD,
                           sxm, sxk, sqk, sqn, ssg, ssn, sym, syn,
                           GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s = tl.load(s_ptr + rn * ssn, mask=nmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn * ssn, mask=nmask, other=0.0).to(tl.float32)
        for k0 in range(pid_k * BLOCK_K, K_PAD, BLOCK_K * SPLIT_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk,
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            qw = tl.load(qw_ptr + (rk // 8)[:, None] * sqk + rn[None, :] * sqn,
                         mask=(rk[:, None] < K_PAD) & nmask[None, :], other=0)
            q = ((qw >> ((rk % 8) * 4)[:, None]) & 0xF).to(tl.float32)
            if PER_CHANNEL:  # integer-valued (q - z) is exact in fp16/bf16; scale after the dot
                w = q - z[None, :]
            else:  # BLOCK_K divides GROUP: one scale row per tile
                g = k0 // GROUP
                s = tl.load(s_ptr + g * ssg + rn * ssn, mask=nmask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g * ssg + rn * ssn, mask=nmask, other=0.0).to(tl.float32)
                w = (q - z[None, :]) * s[None, :]
            acc += tl.dot(x, w.to(x.dtype))
        if PER_CHANNEL:
            acc = acc * s[None, :]
        ptrs = y_ptr + rm[:, None] * sym + rn[None, :] * syn
        mask = (rm[:, None] < M) & nmask[None, :]
        if SPLIT_K > 1:
            tl.atomic_add(ptrs, acc, mask=mask)
        else:
            tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _w4a16_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, K_PAD, sxk, sqk, sqn, ssg, ssn, syn,
                           GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        s = tl.load(s_ptr + rn * ssn, mask=nmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn * ssn, mask=nmask, other=0.0).to(tl.float32)
        for k0 in range(pid_k * BLOCK_K, K_PAD, BLOCK_K * SPLIT_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rk * sxk, mask=rk < K, other=0.0).to(tl.float32)
            qw = tl.load(qw_ptr + (rk // 8)[:, None] * sqk + rn[None, :] * sqn,
                         mask=(rk[:, None] < K_PAD) & nmask[None, :], other=0)
            q = ((qw >> ((rk % 8) * 4)[:, None]) & 0xF).to(tl.float32)
            if PER_CHANNEL:
                acc += tl.sum(x[:, None] * (q - z[None, :]), axis=0)
            else:
                g = k0 // GROUP
                s = tl.load(s_ptr + g * ssg + rn * ssn, mask=nmask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g * ssg + rn * ssn, mask=nmask, other=0.0).to(tl.float32)
                acc += tl.sum(x[:, None] * ((q - z[None, :]) * s[None, :]), axis=0)
        if PER_CHANNEL:
            acc = acc * s
        if SPLIT_K > 1:
            tl.atomic_add(y_ptr + rn * syn, acc, mask=nmask)
        else:
            tl.store(y_ptr + rn * syn, acc.to(y_ptr.dtype.element_ty), mask=nmask)


# ----------------------------------------------------------------------------- dispatch
def path_for(m: int) -> str:
    """The kernel path for M rows: gemv (M = 1), splitk (M <= 32) or gemm."""
    return "gemv" if m == 1 else "splitk" if m <= SPLITK_MAX_M else "gemm"


def valid_configs(path: str, group_size: int, dtype: torch.dtype = torch.float16,
                  device: torch.device | None = None) -> list[tuple[int, ...]]:
    """The table's configs for ``path`` that respect the group size and shared memory."""
    limit = smem_limit(device)
    elt = torch.finfo(dtype).bits // 8
    out = []
    for cfg in CONFIGS[path]:
        bm, bn, bk, _, _, stages = cfg
        if group_size != -1 and (bk > group_size or group_size % bk):
            continue
        if path != "gemv" and stages * (bm * bk + bk * bn) * elt > limit:
            continue
        out.append(cfg)
    if not out:
        raise ValueError(f"w4a16 kernels support group_size -1 or a multiple of {MIN_GROUP}; "
                         f"no {path} config fits group_size={group_size}")
    return out


def _key(path: str, m: int, n: int, k_pad: int, group_size: int, dtype: torch.dtype, device: torch.device) -> str:
    bucket = 1 if m == 1 else min(1 << (m - 1).bit_length(), 256)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{path}|{bucket}|{n}|{k_pad}|{group_size}|{str(dtype).split('.')[-1]}|{name}"


def _launch(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            group_size: int, path: str, cfg: tuple[int, ...]) -> torch.Tensor:
    m, k = x2.shape
    k_pad, n = qweight.shape[0] * 8, qweight.shape[1]
    bm, bn, bk, split, warps, stages = cfg
    per_channel = group_size == -1
    group = k_pad if per_channel else group_size
    y = torch.zeros(m, n, device=x2.device, dtype=torch.float32) if split > 1 else \
        torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    if path == "gemv":
        grid = (triton.cdiv(n, bn), split)
        _w4a16_gemv_kernel[grid](x2, qweight, scales, zeros, y, n, k, k_pad, x2.stride(1),
                                 qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
                                 y.stride(1), GROUP=group, PER_CHANNEL=per_channel, BLOCK_N=bn, BLOCK_K=bk,
                                 SPLIT_K=split, num_warps=warps, num_stages=stages)
    else:
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
        _w4a16_gemm_kernel[grid](x2, qweight, scales, zeros, y, m, n, k, k_pad, x2.stride(0), x2.stride(1),
                                 qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
                                 y.stride(0), y.stride(1), GROUP=group, PER_CHANNEL=per_channel,
                                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
                                 num_warps=warps, num_stages=stages)
    return y.to(x2.dtype)


def w4a16_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, path: str | None = None, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """Run the Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1).

    ``path`` / ``config`` force a kernel path and config (tests, tuning); by default the path
    follows M and the config comes from the tuning cache or the table.
    """
    if not HAS_TRITON:
        raise RuntimeError("w4a16_triton needs the 'triton' package (pip install triton)")
    _, k_pad, n = check_w4a16_args(x, qweight, scales, zeros, group_size)
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    path = path or path_for(m)
    if config is None:
        config = _TUNED.get(_key(path, m, n, k_pad, group_size, x.dtype, x.device)) or \
            valid_configs(path, group_size, x.dtype, x.device)[0]
    return _launch(x2, qweight, scales, zeros, group_size, path, config).reshape(*x.shape[:-1], n)


def kernel_supports(group_size: int) -> bool:
    """Whether the kernels handle this contiguous group size (-1 or a multiple of MIN_GROUP)."""
    return group_size == -1 or group_size % MIN_GROUP == 0


def use_triton(x: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1."""
    return HAS_TRITON and (x.is_cuda or (interpreting() and x.device.type == "cpu"))


@torch.library.custom_op("adagrow::w4a16_matmul", mutates_args=())
def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """``x [..., K]`` (fp16/bf16) @ packed 4-bit weight ``[K, N]`` -> ``[..., N]`` in x's dtype."""
    if use_triton(x):
        return w4a16_triton(x, qweight, scales, zeros, group_size)
    check_w4a16_args(x, qweight, scales, zeros, group_size)
    return w4a16_matmul_ref(x, qweight, scales, zeros, group_size)


@w4a16_matmul.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
      group_size: int) -> torch.Tensor:
    _, _, n = check_w4a16_args(x, qweight, scales, zeros, group_size)
    return x.new_empty(*x.shape[:-1], n)


# ----------------------------------------------------------------------------- tuning
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
    """Time every valid config of M's path on random activations; cache and return the best."""
    k_pad, n = qweight.shape[0] * 8, qweight.shape[1]
    x = torch.randn(m, k_pad, device=qweight.device, dtype=dtype)
    path = path_for(m)
    times = {cfg: _time(lambda cfg=cfg: w4a16_triton(x, qweight, scales, zeros, group_size, path, cfg), rep)
             for cfg in valid_configs(path, group_size, dtype, qweight.device)}
    best = min(times, key=times.get)
    _TUNED[_key(path, m, n, k_pad, group_size, dtype, qweight.device)] = best
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
        if k.split("|")[0] not in CONFIGS or len(v) != 6:
            raise ValueError(f"tuning cache {path}: bad entry {k!r}: {v!r}")
        _TUNED[k] = tuple(int(t) for t in v)
    return len(data)


# ----------------------------------------------------------------------------- static inspection
STATIC_SHAPES = [(8192, 8192), (4096, 4096)]  # (N, K) of the benchmark, group 128
STATIC_MS = [1, 16, 128]


def static_specs(arch: int) -> list:
    """One :class:`~adagrow.kernels.static.StaticSpec` per (table config, benchmark shape) of
    M's path, fp16 activations, group 128 (see benchmarks/kernels_static.py)."""
    from .static import StaticSpec, runtime_signature
    specs = []
    g = 128
    for n, k in STATIC_SHAPES:
        for m in STATIC_MS:
            path = path_for(m)
            for cfg in CONFIGS[path]:
                bm, bn, bk, split, warps, stages = cfg
                consts = {"GROUP": g, "PER_CHANNEL": False, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}
                ydt = "*fp32" if split > 1 else "*fp16"
                if path == "gemv":
                    fn, name = _w4a16_gemv_kernel, "_w4a16_gemv_kernel"
                    args = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": ydt,
                            "N": n, "K": k, "K_PAD": k, "sxk": 1, "sqk": n, "sqn": 1, "ssg": n, "ssn": 1, "syn": 1}
                    grid = triton.cdiv(n, bn) * split
                else:
                    fn, name = _w4a16_gemm_kernel, "_w4a16_gemm_kernel"
                    consts["BLOCK_M"] = bm
                    args = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": ydt,
                            "M": m, "N": n, "K": k, "K_PAD": k, "sxm": k, "sxk": 1, "sqk": n, "sqn": 1,
                            "ssg": n, "ssn": 1, "sym": n, "syn": 1}
                    grid = triton.cdiv(m, bm) * triton.cdiv(n, bn) * split
                sig, consts, aligned = runtime_signature(args, consts)
                rows = min(bm, m)
                unique = bk // 8 * bn * 4 + rows * bk * 2 + 2 * bn * 2 * bk // g
                out_bytes = rows * bn * (4 if split > 1 else 2)
                specs.append(StaticSpec(
                    kernel=name, path=path, fn=fn, signature=sig, constexprs=consts, num_warps=warps,
                    num_stages=stages, config=dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps",
                                                        "num_stages"), cfg)),
                    shape={"M": m, "N": n, "K": k, "G": g}, unique_bytes_per_iter=unique,
                    iters_per_program=triton.cdiv(k, bk * split), n_programs=grid, aligned=aligned,
                    extra_bytes=out_bytes))
    return specs
