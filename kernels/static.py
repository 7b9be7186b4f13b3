"""Static (no-GPU) inspection of the Triton kernels: compile for an sm_XX target and read the SASS.

Each kernel module exposes ``static_specs(arch: int) -> list[StaticSpec]``: one entry per
(config of its table, benchmark shape). :func:`inspect_spec` compiles a spec with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``
(pointer and 16-divisible integer arguments get Triton's ``tt.divisibility=16`` hint, as the
runtime's specialization gives them), disassembles the cubin with the ``cuobjdump`` shipped in the
triton wheel and records registers, spills, shared memory, tensor-core ops, I2F in the main loop
and the global load widths. :func:`estimate_us` turns a record into a static time estimate.

The main loop is the backward branch (``BRA`` to a lower address) whose body holds the most
global loads; its instructions execute once per iteration of the kernel's K loop.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Opt-in shared memory per block (what Triton checks ``metadata.shared`` against), per SM,
# SM count, HBM bandwidth (bytes/s) and boost clock (Hz) of the reference GPU of each arch.
ARCH = {
    90: {"gpu": "H100 SXM5", "table_key": "H100", "smem_limit": 232448, "smem_per_sm": 233472, "sms": 132,
         "hbm": 3.35e12, "clock": 1.98e9},
    80: {"gpu": "A100 SXM4 80GB", "table_key": "A100", "smem_limit": 166912, "smem_per_sm": 167936, "sms": 108,
         "hbm": 2.039e12, "clock": 1.41e9},
}
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM, SCHEDULERS = 65536, 64, 32, 4
SMEM_RESERVED_PER_BLOCK = 1024  # the driver reserves 1 KiB of each block's shared memory (sm_80+)

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_TC_OPS = ("HMMA", "HGMMA", "IMMA", "QGMMA")


@dataclass
class StaticSpec:
    """One kernel launch to compile statically.

    ``unique_bytes_per_iter``: bytes of distinct data one program needs per main-loop iteration
    (the tile's packed weights + activations + scales/zeros). ``iters_per_program`` and
    ``n_programs`` give the work a launch does, for the static time estimate. ``aligned``:
    argument names that get Triton's 16-divisibility hint (pointers are always hinted).
    ``extra_bytes``: bytes read or written once per program outside the main loop (output
    tile, atomics), for the memory-time estimate.
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


def runtime_signature(args: dict[str, str | int], constexprs: dict[str, Any]
                      ) -> tuple[dict[str, str], dict[str, Any], tuple[str, ...]]:
    """Signature, constexprs and 16-aligned names as Triton's runtime specializes a launch.

    ``args``: every runtime argument in order, a pointer type string (``"*fp16"``) or an int
    value (ints equal to 1 become constexprs; multiples of 16 get the divisibility hint).
    """
    sig: dict[str, str] = {}
    consts = dict(constexprs)
    aligned = []
    for name, val in args.items():
        if isinstance(val, str):
            sig[name] = val
        elif val == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if val % 16 == 0:
                aligned.append(name)
    sig.update({name: "constexpr" for name in constexprs})
    return sig, consts, tuple(aligned)


def _bin(name: str) -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def unavailable_reason() -> str | None:
    """Why static inspection cannot run here (no triton / nvidia backend / cuobjdump), or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        return f"triton with the nvidia backend is not installed ({exc})"
    for tool in ("ptxas", "cuobjdump"):
        if not _bin(tool).is_file():
            return f"the triton wheel has no {tool} at {_bin(tool)}"
    return None


def compile_spec(spec: StaticSpec, arch: int):
    """``triton.compile`` the spec for sm_<arch>; returns the CompiledKernel (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(spec.signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in spec.signature.items()
             if t.startswith("*") or n in spec.aligned}
    if not hasattr(spec.fn, "cache_key"):
        raise RuntimeError(f"{spec.kernel} is not a compilable @triton.jit function (TRITON_INTERPRET=1 turns "
                           "kernels into interpreter functions): run static inspection without TRITON_INTERPRET")
    src = ASTSource(spec.fn, spec.signature, spec.constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(_bin("cuobjdump")), *flags, str(path)], capture_output=True, text=True,
                             check=True)
    return out.stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the cubin's kernel, from ``cuobjdump -res-usage``."""
    text = _cuobjdump(cubin, "-res-usage")
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """``(address, opcode, operands)`` for every instruction of a ``cuobjdump -sass`` listing."""
    return [(int(a, 16), op, args.strip()) for a, op, args in _LINE.findall(sass)]


def load_bytes(opcode: str) -> int:
    """Bytes per thread of a global load opcode (LDG / LDGSTS), from its width suffix."""
    parts = opcode.split(".")
    widths = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
    return next((widths[p] for p in parts[1:] if p in widths), 4)


def is_global_load(opcode: str) -> bool:
    return opcode.split(".")[0] in ("LDG", "LDGSTS")


def main_loop(instrs: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """Instructions of the main loop: the backward-branch body with the most global loads
    (the whole kernel when it has no loop)."""
    loops = []
    for addr, op, args in instrs:
        m = re.match(r"0x([0-9a-f]+)", args)
        if op.startswith("BRA") and m and int(m.group(1), 16) < addr:
            body = [i for i in instrs if int(m.group(1), 16) <= i[0] <= addr]
            loops.append((sum(is_global_load(i[1]) for i in body), len(body), body))
    return max(loops, key=lambda t: t[:2])[2] if loops else instrs


def analyze_sass(sass: str, threads: int) -> dict[str, Any]:
    """Counts from a SASS listing; per-iteration figures are for the whole program (all threads)."""
    instrs = parse_sass(sass)
    loop = main_loop(instrs)
    loads = [op for _, op, _ in loop if is_global_load(op)]
    return {
        "instructions": len(instrs),
        "loop_instructions": len(loop),
        "has_loop": loop is not instrs,
        "tensor_core_ops": sum(op.split(".")[0] in _TC_OPS for _, op, _ in instrs),
        "tensor_core_ops_in_main_loop": sum(op.split(".")[0] in _TC_OPS for _, op, _ in loop),
        "i2f_in_main_loop": sum(op.startswith("I2F") for _, op, _ in loop),
        "i2f_total": sum(op.startswith("I2F") for _, op, _ in instrs),
        "global_loads_in_main_loop": len(loads),
        "global_load_bytes_per_iter": sum(load_bytes(op) for op in loads) * threads,
        "local_mem_ops": sum(op.split(".")[0] in ("STL", "LDL") for _, op, _ in instrs),
        # software pipelining evidence: async global->shared copies, and wgmma groups left in
        # flight at the main loop's waits (WARPGROUP.DEPBAR.LE gsb0, N: max N; -1 without wgmma)
        "cp_async_in_main_loop": sum(op.startswith("LDGSTS") for _, op, _ in loop),
        "wgmma_in_flight": max((int(m.group(1), 16) for _, op, args in loop if op.startswith("WARPGROUP.DEPBAR")
                                for m in [re.search(r"0x([0-9a-f]+)", args)] if m), default=-1),
        "bar_sync_in_main_loop": sum(op.startswith("BAR") for _, op, _ in loop),
    }


def occupancy(regs: int, smem: int, num_warps: int, arch: int) -> int:
    """Resident blocks per SM from registers (256-register warp granules), shared memory and
    the warp / block limits."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = REGS_PER_SM // (per_warp * num_warps)
    by_smem = ARCH[arch]["smem_per_sm"] // (smem + SMEM_RESERVED_PER_BLOCK)
    return max(0, min(by_regs, by_smem, MAX_WARPS_PER_SM // num_warps, MAX_BLOCKS_PER_SM))


def inspect_spec(spec: StaticSpec, arch: int, sass_dir: Path | None = None) -> dict[str, Any]:
    """Compile ``spec`` for sm_<arch> and return its JSON record (writes the SASS to sass_dir)."""
    kern = compile_spec(spec, arch)
    cubin = kern.asm["cubin"]
    sass = _cuobjdump(cubin, "-sass")
    res = resource_usage(cubin)
    threads = spec.num_warps * 32
    facts = analyze_sass(sass, threads)
    shape = "x".join(f"{k}{v}" for k, v in spec.shape.items())
    cfg = "_".join(f"{k}{v}" for k, v in spec.config.items())
    name = f"sm{arch}_{spec.kernel}_{shape}_{cfg}.sass"
    if sass_dir is not None:
        sass_dir.mkdir(parents=True, exist_ok=True)
        (sass_dir / name).write_text(sass)
    smem = int(kern.metadata.shared)
    rec = {"kernel": spec.kernel, "path": spec.path, "config": spec.config, "shape": spec.shape, "arch": arch,
           "num_warps": spec.num_warps, "num_stages": spec.num_stages, "regs": res["REG"],
           "spill_bytes": res.get("STACK", 0) + res.get("LOCAL", 0), "smem_bytes": smem,
           "smem_limit": ARCH[arch]["smem_limit"], "fits": smem <= ARCH[arch]["smem_limit"], **facts,
           "unique_bytes_per_iter": spec.unique_bytes_per_iter, "iters_per_program": spec.iters_per_program,
           "n_programs": spec.n_programs, "w4": spec.w4, "extra_bytes": spec.extra_bytes,
           "blocks_per_sm": occupancy(res["REG"], smem, spec.num_warps, arch), "sass": name, **spec.extra}
    rec["load_ratio"] = rec["global_load_bytes_per_iter"] / max(spec.unique_bytes_per_iter, 1)
    rec.update(estimate_us(rec, arch))
    return rec


def estimate_us(rec: dict[str, Any], arch: int) -> dict[str, float]:
    """Static time ESTIMATE (microseconds) of one launch: the larger of

    - memory time: the global bytes the SASS loads (per-iteration load bytes x iterations x
      programs, plus each program's out-of-loop bytes) / the arch's HBM bandwidth, and
    - issue time: warp instructions of the main loop x iterations on the busiest SM / the SM's
      issue rate (4 schedulers x clock), scaled by min(1, resident warps per scheduler / 2)
      for latency that too few warps cannot hide.

    A model, not a measurement: it ignores L2 hits, DRAM efficiency, tails and launch overhead.
    """
    a = ARCH[arch]
    mem = (rec["global_load_bytes_per_iter"] * rec["iters_per_program"] + rec["extra_bytes"]) \
        * rec["n_programs"] / a["hbm"]
    per_sm = -(-rec["n_programs"] // a["sms"])  # programs on the busiest SM
    resident = min(max(rec["blocks_per_sm"], 1), per_sm)
    warp_instr = per_sm * rec["num_warps"] * rec["loop_instructions"] * rec["iters_per_program"]
    eff = min(1.0, resident * rec["num_warps"] / SCHEDULERS / 2)
    issue = warp_instr / (SCHEDULERS * a["clock"] * eff)
    return {"estimate_mem_us": mem * 1e6, "estimate_issue_us": issue * 1e6,
            "estimate_us": max(mem, issue) * 1e6}
