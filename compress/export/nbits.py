"""ONNX Runtime's ``com.microsoft.MatMulNBits`` for 4-bit (and 8-bit) Linear weights.

Layout (ORT contrib op spec): ``B`` uint8 ``[N, n_blocks, block_size / 2]`` (two codes per
byte, low nibble first, K padded to whole blocks), ``scales`` float ``[N * n_blocks]``,
``zero_points`` uint8 ``[N * ceil(n_blocks / 2)]`` (packed the same way); at 8 bits one code
or zero point per byte, unpacked. ``accuracy_level``
picks the compute type of ORT's CPU kernel: 0 / 1 fp32 (dequantize, then float GEMM), 4 int8
(activations quantized per block to int8, integer dot products: the fast path on x86).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def _pack_nibbles(x: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 along the last axis (even length) -> bytes, low nibble first."""
    return (x[..., 0::2] | (x[..., 1::2] << 4)).astype(np.uint8)


def nbits_block(k: int, block_size: int) -> int:
    """MatMulNBits block for a ``[K, N]`` weight with groups of ``block_size`` along K (0: one
    group per column): a power of two >= 16, or 0 when the groups cannot be expressed."""
    if block_size == 0:
        return max(16, 1 << (k - 1).bit_length())
    return block_size if block_size >= 16 and block_size & (block_size - 1) == 0 else 0


def matmul_nbits_tensors(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block: int, bits: int = 4
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, scales, zero_points) from ``bits``-bit codes ``[K, N]`` and per-group ``scales`` /
    ``zeros`` ``[n_groups, N]`` (``n_groups = 1`` for per-column: repeated over every block)."""
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits weights here are 4- or 8-bit, got bits={bits}")
    k, n = codes.shape
    n_blocks = -(-k // block)
    if scales.shape[0] == 1:
        scales, zeros = np.repeat(scales, n_blocks, 0), np.repeat(zeros, n_blocks, 0)
    if scales.shape[0] != n_blocks:
        raise ValueError(f"{scales.shape[0]} groups do not match {n_blocks} blocks of {block} along K={k}")
    zpad = np.repeat(zeros, block, 0)[k:]  # padded rows hold the zero point: they dequantize to 0
    full = np.concatenate([codes, zpad], 0).astype(np.uint8).T  # [N, n_blocks * block]
    b = full.reshape(n, n_blocks, block)
    z = zeros.T.astype(np.uint8)  # [N, n_blocks]
    if bits == 8:
        return b, scales.T.astype(np.float32).reshape(-1), z.reshape(-1)
    b = _pack_nibbles(b)
    if n_blocks % 2:
        z = np.concatenate([z, np.zeros((n, 1), np.uint8)], 1)
    return b, scales.T.astype(np.float32).reshape(-1), _pack_nibbles(z).reshape(-1)


def matmul_nbits_node(a: str, out: str, wname: str, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                      block: int, accuracy_level: int, name: str, bits: int = 4
                      ) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A MatMulNBits node computing ``a @ W`` and its initializers."""
    b, s, z = matmul_nbits_tensors(codes, scales, zeros, block, bits)
    k, n = codes.shape
    inits = [numpy_helper.from_array(b, f"{wname}_nbits"), numpy_helper.from_array(s, f"{wname}_nbits_scale"),
             numpy_helper.from_array(z, f"{wname}_nbits_zero")]
    node = helper.make_node("MatMulNBits", [a, *(t.name for t in inits)], [out], name=name, domain=MS_DOMAIN,
                            K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level)
    return node, inits
