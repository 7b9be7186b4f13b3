"""Static (no-GPU) inspection of the Triton kernels: compile for an sm_XX target and read the SASS.

Each kernel module exposes ``static_specs(arch: int) -> list[StaticSpec]``: one entry per
(config of its table, benchmark shape). ``benchmarks/kernels_static.py`` compiles every spec with
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))`` and
records registers, spills, shared memory, tensor-core ops, I2F in the main loop and load widths.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StaticSpec:
    """One kernel launch to compile statically.

    ``unique_bytes_per_iter``: bytes of distinct data one program needs per main-loop iteration
    (the tile's packed weights + activations + scales/zeros). ``iters_per_program`` and
    ``n_programs`` give the work a launch does, for the static time estimate.
    """
    kernel: str                      # kernel function name
    path: str                        # "gemv" | "splitk" | "gemm" | "conv" | "dwconv"
    fn: Any                          # the @triton.jit function
    signature: dict[str, str]        # ASTSource signature, e.g. {"x_ptr": "*fp16", "M": "i32"}
    constexprs: dict[str, Any]       # compile-time constants (block sizes, flags)
    num_warps: int
    num_stages: int
    config: dict[str, int]           # the table row, named
    shape: dict[str, int]            # e.g. {"M": 1, "N": 8192, "K": 8192, "G": 128}
    unique_bytes_per_iter: int
    iters_per_program: int
    n_programs: int
    w4: bool = True                  # W4 main loop: must contain no I2F
    extra: dict[str, Any] = field(default_factory=dict)
    aligned: tuple[str, ...] = ()
    extra_bytes: int = 0
