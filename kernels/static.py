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

import math
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Reference GPU of each arch: opt-in shared memory per block (what Triton checks ``metadata.shared``
# against) and per SM, SM count, peak HBM bandwidth (bytes/s), boost clock (Hz), dense fp16
# tensor-core peak (FLOP/s), from the vendor data sheets.
ARCH = {
    90: {"gpu": "H100 SXM5", "table_key": "9.0/132", "smem_limit": 232448, "smem_per_sm": 233472, "sms": 132,
         "hbm": 3.35e12, "clock": 1.83e9, "tc_flops": 989.4e12},
    80: {"gpu": "A100 SXM4 80GB", "table_key": "8.0/108", "smem_limit": 166912, "smem_per_sm": 167936, "sms": 108,
         "hbm": 2.039e12, "clock": 1.41e9, "tc_flops": 312e12},
}
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM, SCHEDULERS = 65536, 64, 32, 4
SMEM_RESERVED_PER_BLOCK = 1024  # the driver reserves 1 KiB of each block's shared memory (sm_80+)

# Model constants (physical and global, never per point; docs/kernels.md "Static model" gives the
# source of each and the calibration's sensitivity to it):
HBM_LATENCY_S = 600e-9      # loaded DRAM round trip of one global load (published 450-800 ns, H100/A100)
DRAM_EFFICIENCY = 0.90      # fraction of peak HBM bandwidth a streaming read sustains (~3.0 of 3.35 TB/s)
L2_BANDWIDTH = {90: 7.0e12, 80: 4.5e12}  # L2 -> SM bytes/s for operands re-read from L2 (microbenchmarks)
CONVERT_LANES_PER_CLOCK = 16  # I2F / F2I / F2F results per clock per SM (CUDA guide throughput table)
INT_LANES_PER_CLOCK = 64    # 32-bit integer add / logic / shift / compare per clock per SM (CUDA guide, cc 8.x/9.0)
SMEM_BYTES_PER_CLOCK = 128  # shared-memory bandwidth per SM: 32 banks x 4 bytes per clock
WARP_IPC = 0.5              # instructions per cycle one warp sustains on its own (dependent-issue latency);
#                             the one calibrated constant (GemLite's published H100 figures), see the docs
TC_EFFICIENCY = 0.75        # attained fraction of the dense fp16 tensor peak (cuBLAS / CUTLASS large GEMMs)
BARRIER_CYCLES = 24         # one BAR.SYNC when the warps arrive together
WGMMA_LATENCY_CYCLES = 32   # fixed latency of a waited wgmma group, on top of its tensor-core time
LAUNCH_S = 2.0e-6           # kernel launch + ramp + drain seen by back-to-back launches

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
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
    hbm_bytes: int = 0               # unique bytes the launch moves to/from HBM (0: the SASS bytes)


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


_REG = re.compile(r"\bR(\d+)(\.64)?\b")
_HGMMA = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"^HMMA\.(\d\d)(\d)(\d+)")
_STORES = ("ST", "STG", "STS", "STL", "RED", "REDG", "ATOM", "ATOMG", "ATOMS")
# opcodes of the 32-bit integer pipe (half the FP32 pipe's lanes on sm_80 / sm_90); IMAD runs on the FMA pipe
INT_ALU = ("LOP3", "LOP", "SHF", "SHL", "SHR", "IADD3", "IADD", "ISETP", "SEL", "PRMT", "LEA", "IMNMX", "BFE", "BFI",
           "FLO", "POPC", "BMSK", "SGXT", "PLOP3", "VIADD", "VIMNMX")


def _regs(text: str) -> set[int]:
    out = set()
    for m in _REG.finditer(text):
        out.update((int(m.group(1)), int(m.group(1)) + 1) if m.group(2) else (int(m.group(1)),))
    return out


def round_trip_distances(loop: list[tuple[int, str, str]]) -> list[int]:
    """The global round trips one iteration waits for in series, as instruction distances: each
    time an instruction consumes a register loaded by an LDG of the same iteration (and not yet
    waited for), one round trip is exposed, issued ``d`` instructions before its first consumer
    (``d`` from the earliest outstanding load). Loads consumed only in a later iteration (prefetch)
    and cp.async (LDGSTS, staged over ``num_stages``) expose none: ``[]`` means every load is
    prefetched."""
    out, outstanding, first = [], set(), None
    for i, (_, op, args) in enumerate(loop):
        base = op.split(".")[0]
        parts = args.split(",")
        reads = _regs(args) if base in _STORES else _regs(",".join(parts[1:]))
        if outstanding & reads:
            out.append(i - first)
            outstanding, first = set(), None
        if base == "LDG":
            reg = _REG.search(parts[0])
            if reg:
                outstanding.update(range(int(reg.group(1)), int(reg.group(1)) + max(1, load_bytes(op) // 4)))
                first = i if first is None else first
    return out


def dependent_round_trips(loop: list[tuple[int, str, str]]) -> int:
    """How many global round trips one iteration waits for (:func:`round_trip_distances`)."""
    return len(round_trip_distances(loop))


def smem_bytes(loop: list[tuple[int, str, str]], num_warps: int) -> int:
    """Shared-memory bytes one iteration moves through the load/store units for the whole
    program: LDS / STS widths x threads and ``LDSM`` / ``STSM`` (``.4``: four 8x8 16-bit matrices
    per warp, 512 B). Not counted: cp.async fills (LDGSTS; they arrive over the pipeline's stages
    and are bounded by the L2 / HBM terms) and wgmma's own operand reads (part of the attained
    tensor-core rate ``TC_EFFICIENCY``); dummy ``LDS RZ`` loads."""
    threads, total = num_warps * 32, 0
    for _, op, args in loop:
        base, dest = op.split(".")[0], args.split(",")[0].strip()
        if base in ("LDS", "STS") and not (base == "LDS" and dest == "RZ"):
            total += load_bytes(op) * threads
        elif base in ("LDSM", "STSM"):
            total += (4 if ".4" in op else 2 if ".2" in op else 1) * 128 * num_warps
    return total


def mma_flops(op: str, num_warps: int) -> int:
    """FLOPs one tensor-core instruction does for the whole program (``HGMMA.64x128x16`` per
    warpgroup, ``HMMA.16816`` = m16 n8 k16 per warp); 0 for other opcodes."""
    m = _HGMMA.match(op)
    if m:
        return 2 * math.prod(map(int, m.groups())) * max(1, num_warps // 4)
    m = _HMMA.match(op)
    return 2 * math.prod(map(int, m.groups())) * num_warps if m else 0


def waited_wgmma(loop: list[tuple[int, str, str]], num_warps: int) -> tuple[int, int]:
    """``(groups, FLOPs)`` one iteration waits for of its own wgmma: at each
    ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` the groups issued since the last wait must finish before
    any further instruction (one waited group, their FLOPs); waits that leave groups in flight
    (``0x1``...) expose nothing. :func:`estimate_us` charges each waited group a fixed latency
    plus its FLOPs at the attained tensor-core rate."""
    groups, flops, pending = 0, 0, 0
    for _, op, args in loop:
        pending += mma_flops(op, num_warps) if op.startswith("HGMMA") else 0
        if op.startswith("WARPGROUP.DEPBAR"):
            m = re.search(r"0x([0-9a-f]+)", args)
            if m and int(m.group(1), 16) == 0 and pending:
                groups, flops, pending = groups + 1, flops + pending, 0
    return groups, flops


def exposed_wgmma_cycles(groups: int, flops: int, arch: int) -> float:
    """Cycles of waited wgmma (:func:`waited_wgmma`): a fixed latency per waited group plus the
    FLOPs at ``TC_EFFICIENCY`` of the SM's tensor-core peak."""
    per_clock = TC_EFFICIENCY * ARCH[arch]["tc_flops"] / ARCH[arch]["sms"] / ARCH[arch]["clock"]
    return groups * WGMMA_LATENCY_CYCLES + flops / per_clock


def whole_kernel_latency_facts(instrs: list[tuple[int, str, str]], num_warps: int) -> dict[str, Any]:
    """The latency facts of :func:`analyze_sass` over a whole kernel taken as one iteration
    (kernels without a K loop)."""
    return {"dependent_round_trips": dependent_round_trips(instrs),
            "round_trip_distances": round_trip_distances(instrs),
            "int_alu_in_main_loop": sum(op.split(".")[0] in INT_ALU for _, op, _ in instrs),
            "smem_bytes_per_iter": smem_bytes(instrs, num_warps),
            **dict(zip(("waited_wgmma_groups", "waited_wgmma_flops"), waited_wgmma(instrs, num_warps))),
            "mma_flops_per_iter": sum(mma_flops(op, num_warps) for _, op, _ in instrs),
            "conversions_in_main_loop": sum(op.split(".")[0] in ("I2F", "F2I", "F2F") for _, op, _ in instrs),
            "bar_sync_in_main_loop": sum(op.startswith("BAR") for _, op, _ in instrs)}


def analyze_sass(sass: str, threads: int) -> dict[str, Any]:
    """Counts from a SASS listing; per-iteration figures are for the whole program (all threads)."""
    instrs = parse_sass(sass)
    loop = main_loop(instrs)
    loads = [op for _, op, _ in loop if is_global_load(op)]
    warps = max(1, threads // 32)
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
        # latency facts of the model (estimate_us)
        "dependent_round_trips": dependent_round_trips(loop),
        "round_trip_distances": round_trip_distances(loop),
        "int_alu_in_main_loop": sum(op.split(".")[0] in INT_ALU for _, op, _ in loop),
        "smem_bytes_per_iter": smem_bytes(loop, warps),
        "wgmma_waits_in_main_loop": sum(op.startswith("WARPGROUP.DEPBAR") for _, op, _ in loop),
        **dict(zip(("waited_wgmma_groups", "waited_wgmma_flops"), waited_wgmma(loop, warps))),
        "mma_flops_per_iter": sum(mma_flops(op, warps) for _, op, _ in loop),
        "conversions_in_main_loop": sum(op.split(".")[0] in ("I2F", "F2I", "F2F") for _, op, _ in loop),
        "membar_total": sum(op.startswith("MEMBAR") for _, op, _ in instrs),
        "membar_gpu_total": sum(op.startswith("MEMBAR") and ".GPU" in op or op == "MEMBAR.SC.GPU"
                                for _, op, _ in instrs),
        "depbar_in_main_loop": sum(op.startswith("DEPBAR") for _, op, _ in loop),
        "atomics_total": sum(op.split(".")[0] in ("ATOMG", "REDG", "ATOM", "RED") for _, op, _ in instrs),
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
           "hbm_bytes": spec.hbm_bytes,
           "blocks_per_sm": occupancy(res["REG"], smem, spec.num_warps, arch), "sass": name, **spec.extra}
    rec["load_ratio"] = rec["global_load_bytes_per_iter"] / max(spec.unique_bytes_per_iter, 1)
    rec.update(estimate_us(rec, arch))
    return rec


def estimate_us(rec: dict[str, Any], arch: int) -> dict[str, float]:
    """Static time ESTIMATE (microseconds) of one launch from its SASS facts (a model, not a
    measurement; docs/kernels.md "Static model").

    Programs run in waves of ``r`` resident programs per SM (occupancy, capped by the busiest
    SM's share of the grid); each wave runs ``iters`` main-loop rounds. One round is the slowest of

    - the latency chain of one program: its own work (the loop's instructions, each warp
      issuing at most ``WARP_IPC`` per cycle and sharing a scheduler with its program's other
      warps; or its integer-pipe, conversion-pipe or shared-memory work; + barriers + waited
      wgmma groups) plus the exposed part of each same-iteration round trip (HBM latency minus the time
      the warp spends issuing the ``d`` instructions between the load and its first consumer);
      when every load is prefetched, the larger of that work and the HBM latency divided by the
      prefetch distance;
    - the SM's schedulers, integer pipe, conversion pipe, shared-memory bandwidth and tensor
      cores (at ``TC_EFFICIENCY`` of the peak) shared by the ``r`` programs.

    Each wave adds two round trips (first loads, output store / counter). The launch is the
    larger of the busiest SM's time, unique HBM bytes / (DRAM efficiency x peak bandwidth) and
    the SASS load bytes / L2 bandwidth, plus the launch overhead. Bytes in flight per SM
    (``r`` x load bytes per iteration) therefore bound the bandwidth by Little's law.
    """
    a = ARCH[arch]
    clock, sms, warps = a["clock"], a["sms"], rec["num_warps"]
    per_sm = -(-rec["n_programs"] // sms)
    r_max = min(max(rec["blocks_per_sm"], 1), per_sm)
    instr, conv = rec["loop_instructions"], rec.get("conversions_in_main_loop", 0)
    cpi = max(warps / SCHEDULERS, 1.0 / WARP_IPC)  # cycles per instruction of one warp, its program alone
    int_prog = rec.get("int_alu_in_main_loop", 0) * warps * 32 / INT_LANES_PER_CLOCK
    conv_prog = conv * warps * 32 / CONVERT_LANES_PER_CLOCK
    smem_prog = rec.get("smem_bytes_per_iter", 0) / SMEM_BYTES_PER_CLOCK
    own = (max(instr * cpi, int_prog, conv_prog, smem_prog) + rec.get("bar_sync_in_main_loop", 0) * BARRIER_CYCLES
           + exposed_wgmma_cycles(rec.get("waited_wgmma_groups", 0), rec.get("waited_wgmma_flops", 0), arch)) / clock
    distances = rec.get("round_trip_distances", [0] * rec.get("dependent_round_trips", 1))
    if distances:  # the iteration waits for its own loads: the unhidden latency adds to the work
        chain = own + sum(max(0.0, HBM_LATENCY_S - d * cpi / clock) for d in distances)
    else:  # loads issued one iteration (LDG) or num_stages - 1 iterations (cp.async) ahead
        ahead = 1 if rec.get("global_loads_in_main_loop", 0) > rec.get("cp_async_in_main_loop", 0) \
            else max(1, rec.get("num_stages", 2) - 1)
        chain = max(HBM_LATENCY_S / ahead, own)
    tc_per_sm = TC_EFFICIENCY * a["tc_flops"] / sms

    def round_s(r: int) -> float:
        return max(chain, r * warps * instr / SCHEDULERS / clock, r * int_prog / clock, r * conv_prog / clock,
                   r * smem_prog / clock, r * rec.get("mma_flops_per_iter", 0) / tc_per_sm)

    waves = [r_max] * (per_sm // r_max) + ([per_sm % r_max] if per_sm % r_max else [])
    sm_time = sum(rec["iters_per_program"] * round_s(r) + 2 * HBM_LATENCY_S for r in waves)
    sass_bytes = (rec["global_load_bytes_per_iter"] * rec["iters_per_program"] + rec["extra_bytes"]) \
        * rec["n_programs"]
    hbm_time = (rec.get("hbm_bytes") or sass_bytes) / (DRAM_EFFICIENCY * a["hbm"])
    l2_time = sass_bytes / L2_BANDWIDTH[arch]
    total = max(sm_time, hbm_time, l2_time) + LAUNCH_S
    bound = max((("sm", sm_time), ("hbm", hbm_time), ("l2", l2_time)), key=lambda t: t[1])[0]
    return {"estimate_us": total * 1e6, "estimate_sm_us": sm_time * 1e6, "estimate_mem_us": hbm_time * 1e6,
            "estimate_l2_us": l2_time * 1e6, "estimate_chain_us_per_iter": chain * 1e6,
            "estimate_waves": len(waves), "estimate_bound": bound,
            "bytes_in_flight_per_sm": r_max * rec["global_load_bytes_per_iter"]}


def fp16_matmul_us(m: int, n: int, k: int, arch: int) -> float:
    """The fp16 baseline under the same constants: fp16 weights + activations + output at the
    sustained HBM bandwidth, or the attained tensor-core rate, plus the launch overhead (microseconds)."""
    a = ARCH[arch]
    mem = (n * k + m * k + m * n) * 2 / (DRAM_EFFICIENCY * a["hbm"])
    return (max(mem, 2 * m * n * k / (TC_EFFICIENCY * a["tc_flops"])) + LAUNCH_S) * 1e6
