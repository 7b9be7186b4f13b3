"""Static (no-GPU) comparison of GemLite's W4A16 Triton kernels with ours on H100 (sm_90).

For N = K = 8192, group 128, fp16 activations, 4-bit weights and M = 1, 16, 128 this compiles the
kernel GemLite dispatches (``core.get_matmul_type``: M=1 -> GEMV_REVSPLITK, 2..4 -> GEMV_REVSPLITK,
5..63 -> GEMM_SPLITK, >=64 -> GEMM) with the same inspector as ours
(``adagrow.kernels.static.inspect_spec``, sm_90) and compares its best static estimate per shape
with the best of ours in ``benchmarks/results/kernels_static_sm90.json``. Estimates, not measurements.

GemLite's operands are set up as ``A16W4_HQQ_INT.from_weights`` packs them: 32-bit packing over K
(``W_q`` int32 of shape (K/8, N), contiguous), fp16 scales and fma-mode zeros (``-z*s``, shape (K/G, N),
``W_group_mode=4``), fp32 accumulation, ``data_contiguous=True``, ``type_id=104``.

Configs: GemLite's shipped H100 cache (``gemlite/configs/h100.json``) has no entry for 8192x8192, so
on an H100 GemLite would autotune over its "fast" config list (its default ``AUTOTUNE`` setting).
We inspect every config GemLite's own pruner (``kernel_config_pruner``, H100 shared memory
232448 B) yields from that list, plus the cached H100 configs of the nearest cached shapes
(4096x4096, 3072x8192, 4096x14336, 14336x4096 at the same M bucket), and take the best estimate
per shape, as ``benchmarks/kernels_static.py`` does for ours. GemLite is imported without its
package ``__init__`` (which needs a CUDA device): ``torch.cuda`` queries are answered as an H100 while
its kernel modules import. Configs that fail to compile are recorded with the reason.

The file's ``sensitivity`` section re-estimates both sides with each model constant varied
(``SENSITIVITY``): GemLite's calibration error and our best speedup per M.

Usage: ``python benchmarks/gemlite_static.py --out benchmarks/results/gemlite_static_sm90.json``;
``--refresh-ours`` recomputes only our side (and the sensitivity) of that file after our records changed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import sys
import sysconfig
import types
from pathlib import Path
from unittest import mock

import triton

from adagrow.files import write_json
from adagrow.kernels import static

ARCH, N, K, G, MS = 90, 8192, 8192, 128, (1, 16, 128)
NEAR_SHAPES = ((4096, 4096), (3072, 8192), (4096, 14336), (14336, 4096))
OURS = Path(__file__).parent / "results" / "kernels_static_sm90.json"
SASS_FACTS = ("regs", "spill_bytes", "smem_bytes", "blocks_per_sm", "has_loop", "global_load_bytes_per_iter",
              "unique_bytes_per_iter", "load_ratio", "i2f_in_main_loop", "tensor_core_ops",
              "tensor_core_ops_in_main_loop", "loop_instructions", "iters_per_program", "n_programs",
              "dependent_round_trips", "round_trip_distances", "int_alu_in_main_loop", "smem_bytes_per_iter",
              "bar_sync_in_main_loop", "waited_wgmma_groups", "waited_wgmma_flops", "conversions_in_main_loop",
              "estimate_mem_us", "estimate_sm_us", "estimate_chain_us_per_iter", "estimate_bound", "estimate_us")
# GemLite's published H100 speedups over fp16 (torch.matmul) at 8192 x 8192, 4-bit, group 128: the
# calibration anchors of the static model (GemLite README benchmark plots, A16W4 HQQ on H100 SXM).
PUBLISHED_SPEEDUP = {1: 1.78, 16: 1.29, 128: 0.54}
CALIBRATION_TOLERANCE = 0.15


def import_gemlite():
    """GemLite's three kernel modules, without running ``gemlite/__init__`` (it needs a CUDA device)."""
    root = Path(sysconfig.get_paths()["purelib"]) / "gemlite"
    for name, path in (("gemlite", root), ("gemlite.triton_kernels", root / "triton_kernels")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod
    core = types.ModuleType("gemlite.core")
    core.GEMLITE_TRITON_CONFIG_CACHE = {}  # no cache hit: the pruners then walk the autotune list
    sys.modules["gemlite.core"] = core

    class _H100Driver:
        def get_current_target(self):
            from triton.backends.compiler import GPUTarget
            return GPUTarget("cuda", ARCH, 32)

    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=132)
    with mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)), \
            mock.patch("torch.cuda.get_device_properties", return_value=props), \
            mock.patch("torch.cuda.device_count", return_value=1), \
            mock.patch.object(type(triton.runtime.driver), "active", _H100Driver(), create=True):
        from gemlite.triton_kernels import gemm_kernels, gemm_splitK_kernels, gemv_revsplitK_kernels
    for m in (gemm_kernels, gemm_splitK_kernels, gemv_revsplitK_kernels):
        m.get_gpu_shared_memory = lambda: static.ARCH[ARCH]["smem_limit"]
    from importlib.metadata import version
    return {"GEMV_REVSPLITK": gemv_revsplitK_kernels, "GEMM_SPLITK": gemm_splitK_kernels, "GEMM": gemm_kernels,
            "root": root, "version": version("gemlite")}


def matmul_type(m: int) -> str:
    """``gemlite.core.get_matmul_type`` for 4-bit INT weights."""
    return "GEMM" if m >= 64 else "GEMM_SPLITK" if m > 4 else "GEMV_REVSPLITK"


def candidate_configs(gl, mtype: str, m: int) -> list[tuple[str, dict, int, int]]:
    """(source, kwargs, num_warps, num_stages) of GemLite's pruned fast-autotune list and of its
    H100 cache entries for the nearest cached shapes."""
    mod = gl[mtype]
    nargs = {"M": m, "N": N, "K": K, "group_size": G, "elements_per_sample": 8, "type_id": 104,
             "a_sizeof": 2, "b_sizeof": 4, "use_prehook": False}
    kw = {"load_scales_as_block": False, "channel_scale_mode": 0}
    out = [("fast_autotune", dict(c.kwargs), c.num_warps, c.num_stages)
           for c in mod.kernel_config_pruner(mod.get_autotune_config(), nargs, **kw)]
    cache = json.loads((gl["root"] / "configs" / "h100.json").read_text())[mtype]
    core = sys.modules["gemlite.core"]
    for n, k in NEAR_SHAPES:
        key = str((mod.get_closest_m(m), n, k, G, 8, 104))
        if key not in cache:
            continue
        core.GEMLITE_TRITON_CONFIG_CACHE = {mtype: {str((mod.get_closest_m(m), N, K, G, 8, 104)): cache[key]}}
        c = next(mod.kernel_config_pruner([], nargs, **kw))
        out.append((f"h100.json {key}", dict(c.kwargs), c.num_warps, c.num_stages))
    core.GEMLITE_TRITON_CONFIG_CACHE = {}
    seen, uniq = set(), []
    for src, cfg, w, s in out:
        key = (tuple(sorted(cfg.items())), w, s)
        if key not in seen:
            seen.add(key)
            uniq.append((src, cfg, w, s))
    return uniq


def build_spec(gl, mtype: str, m: int, cfg: dict, warps: int, stages: int) -> static.StaticSpec:
    """The StaticSpec of GemLite's launch (``*_forward``) of ``mtype`` at M x N x K with ``cfg``."""
    import triton.language as tl
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    mod = gl[mtype]
    tuner = {"GEMV_REVSPLITK": mod.__dict__.get("gemv_INT_revsplitK_kernel"),
             "GEMM_SPLITK": mod.__dict__.get("gemm_splitK_INT_kernel"),
             "GEMM": mod.__dict__.get("gemm_INT_kernel")}[mtype]
    fn = tuner
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn  # Autotuner -> Heuristics -> JITFunction
    ptrs = {"a_ptr": "*fp16", "b_ptr": "*i32", "c_ptr": "*fp16", "scales_ptr": "*fp16", "zeros_ptr": "*fp16"}
    vals = {"scales_a_ptr": None, "M": m, "N": N, "K": K, "W_nbits": 4, "group_size": G, "unpack_mask": 15,
            "elements_per_sample": 8, "type_id": 104, "stride_am": K, "stride_ak": 1, "stride_bk": N,
            "stride_bn": 1, "stride_cm": N, "stride_cn": 1, "stride_meta_a_m": None, "stride_meta_a_g": None,
            "stride_meta_g": N, "stride_meta_n": 1, "input_dtype": tl.float16, "output_dtype": tl.float16,
            "acc_dtype": tl.float32, "meta_dtype": tl.float16, "channel_scale_mode": 0, "W_group_mode": 4,
            "zero_is_scalar": False, "data_contiguous": True, **cfg}
    bm, bn, bk = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
    split = cfg.get("SPLIT_K", 1)
    if mtype == "GEMV_REVSPLITK":
        vals.update(use_prehook=False, dump_b_val=0)
        vals["stride_meta_a_m"] = vals["stride_meta_a_g"] = 0
    else:
        vals.update(M_CLOSEST=mod.get_closest_m(m), a_sizeof=2, b_sizeof=4, load_scales_as_block=False,
                    meta_scale_norm_ptr=0.0, use_tma=False, use_5d_scales=False, warp_specialize=False,
                    EVEN_M=m % bm == 0, EVEN_N=N % bn == 0, EVEN_K=K % (bk * split) == 0)
    sig, consts, aligned = {}, {}, []
    for p in fn.params:
        name = p.name
        if name in ptrs:
            sig[name] = ptrs[name]
            continue
        val = vals[name] if name in vals else inspect.signature(fn.fn).parameters[name].default
        if p.is_constexpr:
            sig[name], consts[name] = "constexpr", val
            continue
        ty, key = native_specialize_impl(CUDABackend, val, False, True, True)
        sig[name] = ty
        if ty == "constexpr":
            consts[name] = key
        elif key == "D":
            aligned.append(name)
    rows = min(bm, m)
    hbm = N * K // 2 + 2 * (K // G) * N * 2 + m * K * 2 + m * N * 2  # words, s and -z*s, x, y
    if mtype == "GEMV_REVSPLITK":  # no K loop: one program = two BLOCK_K chunks + one group's s, z
        unique = 2 * (bk // 8 * bn * 4 + bk * 2) + 2 * bn * 2
        iters, programs = 1, triton.cdiv(N, bn) * triton.cdiv(K, 2 * bk)
        out = bn * 4  # fp16 atomic add: read + write
    else:
        unique = bk // 8 * bn * 4 + rows * bk * 2 + 2 * bn * 2  # words + x + this group's s, z
        iters = triton.cdiv(K, bk * split)
        programs = triton.cdiv(m, bm) * triton.cdiv(N, bn) * split
        out = rows * bn * (2 if split == 1 else 4)  # store, or fp16 atomic add (read + write)
    config = {**{k: v for k, v in cfg.items() if not k.startswith("EVEN")}, "num_warps": warps,
              "num_stages": stages}
    return static.StaticSpec(
        kernel=fn.__name__, path=mtype.lower(), fn=fn, signature=sig, constexprs=consts, num_warps=warps,
        num_stages=stages, config=config, shape={"M": m, "N": N, "K": K, "G": G},
        unique_bytes_per_iter=unique, iters_per_program=iters, n_programs=programs, aligned=tuple(aligned),
        extra_bytes=out, hbm_bytes=hbm)


def whole_kernel_facts(rec: dict, sass_dir: Path, spec: static.StaticSpec) -> None:
    """GEMV_REVSPLITK has no K loop (each program does two BLOCK_K chunks); its only backward branch
    is the CAS retry loop of the fp16 ``tl.atomic_add``, which ``static.main_loop`` would take as the
    main loop. Count the whole kernel as the one "iteration" instead and redo the estimate."""
    instrs = static.parse_sass((sass_dir / rec["sass"]).read_text())
    loop = static.main_loop(instrs)
    rec["main_loop_picked_by_inspector"] = {"instructions": len(loop),
                                            "global_loads": sum(static.is_global_load(op) for _, op, _ in loop),
                                            "cas_atomics": sum(op.startswith("ATOMG.E.CAS") for _, op, _ in loop)}
    loads = [op for _, op, _ in instrs if static.is_global_load(op)]
    rec.update(static.whole_kernel_latency_facts(instrs, spec.num_warps))
    rec.update(has_loop=False, loop_instructions=len(instrs), global_loads_in_main_loop=len(loads),
               global_load_bytes_per_iter=sum(static.load_bytes(op) for op in loads) * spec.num_warps * 32,
               i2f_in_main_loop=rec["i2f_total"], tensor_core_ops_in_main_loop=rec["tensor_core_ops"],
               cas_atomics=sum(op.startswith("ATOMG.E.CAS") for _, op, _ in instrs),
               note="no K loop: whole kernel counted as one iteration (the inspector's main loop was the "
                    "fp16 atomic_add CAS retry loop)")
    rec["load_ratio"] = rec["global_load_bytes_per_iter"] / max(spec.unique_bytes_per_iter, 1)
    rec.update(static.estimate_us(rec, ARCH))


def ours_best(m: int) -> dict:
    """Best static estimate among our records at M x 8192 x 8192, G 128."""
    recs = [r for r in json.loads(OURS.read_text())["records"]
            if r["shape"] == {"M": m, "N": N, "K": K, "G": G} and r["fits"] and not r["spill_bytes"]]
    best = min(recs, key=lambda r: r["estimate_us"])
    return {"kernel": best["kernel"], "path": best["path"], "config": best["config"], "sass": best["sass"],
            **{k: best[k] for k in SASS_FACTS}}


def refresh_ours(doc: dict) -> None:
    """Recompute the "ours" side of every shape row (best of our committed records), the ratio
    and our speedup estimate, keeping GemLite's records (after our kernels or table changed)."""
    for row in doc["shapes"]:
        m = row["shape"]["M"]
        row["ours"] = ours_best(m)
        if row.get("gemlite"):
            row["gemlite_over_ours"] = row["gemlite"]["estimate_us"] / row["ours"]["estimate_us"]
            row["calibration"]["ours_speedup_estimate"] = row["calibration"]["fp16_model_us"] / row["ours"]["estimate_us"]


# The model's constants varied one at a time around their values (docs/kernels.md "Static model")
SENSITIVITY = {"WARP_IPC": (0.35, 0.4, 0.5, 0.6, 1.0), "TC_EFFICIENCY": (0.65, 0.75, 0.85, 1.0),
               "HBM_LATENCY_S": (450e-9, 600e-9, 800e-9), "INT_LANES_PER_CLOCK": (64, 128),
               "SMEM_BYTES_PER_CLOCK": (64, 128, 256)}


def sensitivity(doc: dict) -> list[dict]:
    """Re-estimate every GemLite record and every committed record of ours (the model is a pure
    function of a record's SASS facts) with one model constant changed at a time: GemLite's
    calibration error and our best estimated speedup per M, per value."""
    ours = [r for r in json.loads(OURS.read_text())["records"] if r["fits"] and not r["spill_bytes"]]
    theirs = [r for r in doc["records"] if r["fits"] and not r["spill_bytes"]]
    rows = []
    for name, values in SENSITIVITY.items():
        for value in values:
            with mock.patch.object(static, name, value):
                row: dict = {"constant": name, "value": value, "gemlite_error": {}, "ours_speedup": {}}
                for m in MS:
                    fp16 = static.fp16_matmul_us(m, N, K, ARCH)
                    shape = {"M": m, "N": N, "K": K, "G": G}
                    best = {side: min(static.estimate_us(r, ARCH)["estimate_us"] for r in recs if r["shape"] == shape)
                            for side, recs in (("gemlite", theirs), ("ours", ours))}
                    row["gemlite_error"][m] = fp16 / best["gemlite"] / PUBLISHED_SPEEDUP[m] - 1
                    row["ours_speedup"][m] = fp16 / best["ours"]
            rows.append(row)
    return rows


def print_sensitivity(rows: list[dict]) -> None:
    for row in rows:
        print(f"{row['constant']}={row['value']:g}: GemLite error "
              + " / ".join(f"{100 * e:+.1f}%" for e in row["gemlite_error"].values())
              + ", ours x" + " / x".join(f"{v:.2f}" for v in row["ours_speedup"].values()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sass-dir", type=Path, default=Path("/tmp/gemlite_work/sass"))
    ap.add_argument("--refresh-ours", action="store_true",
                    help="only recompute our side of the existing --out file from our committed records")
    args = ap.parse_args(argv)
    if args.refresh_ours:
        doc = json.loads(args.out.read_text())
        refresh_ours(doc)
        doc["sensitivity"] = sensitivity(doc)
        doc["ours_refreshed"] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                 "command": "python benchmarks/gemlite_static.py " + " ".join(argv or sys.argv[1:])}
        write_json(args.out, doc)
        for row in doc["shapes"]:
            print(f"M={row['shape']['M']:>3} ours {row['ours']['config']} {row['ours']['estimate_us']:.2f}us, "
                  f"GemLite/ours x{row.get('gemlite_over_ours', float('nan')):.2f}")
        return 0
    reason = static.unavailable_reason()
    if reason:
        raise SystemExit(f"static inspection unavailable: {reason}")
    gl = import_gemlite()
    records, failures, shapes = [], [], []
    for m in MS:
        mtype = matmul_type(m)
        recs = []
        for src, cfg, warps, stages in candidate_configs(gl, mtype, m):
            try:
                spec = build_spec(gl, mtype, m, cfg, warps, stages)
                rec = static.inspect_spec(spec, ARCH, args.sass_dir)
            except Exception as exc:  # keep the reason, do not drop the config
                failures.append({"matmul_type": mtype, "M": m, "config": {**cfg, "num_warps": warps,
                                 "num_stages": stages}, "source": src, "error": f"{type(exc).__name__}: {exc}"[:500]})
                print(f"M={m} {mtype} {cfg}: FAILED {failures[-1]['error'][:200]}", file=sys.stderr)
                continue
            if mtype == "GEMV_REVSPLITK":
                whole_kernel_facts(rec, args.sass_dir, spec)
            rec.update(matmul_type=mtype, config_source=src)
            recs.append(rec)
            print(f"M={m} {mtype} {rec['config']}: {rec['estimate_us']:.2f}us", file=sys.stderr)
        records += recs
        ok = [r for r in recs if r["fits"] and not r["spill_bytes"]]
        ours = ours_best(m)
        row = {"label": "static estimate (not a measurement)", "shape": {"M": m, "N": N, "K": K, "G": G},
               "gemlite_matmul_type": mtype, "ours": ours}
        if ok:
            best = min(ok, key=lambda r: r["estimate_us"])
            row["gemlite"] = {"kernel": best["kernel"], "config": best["config"], "config_source": best["config_source"],
                              "sass": best["sass"], **{k: best[k] for k in SASS_FACTS}}
            row["gemlite_over_ours"] = best["estimate_us"] / ours["estimate_us"]
            fp16 = static.fp16_matmul_us(m, N, K, ARCH)
            row["calibration"] = {"fp16_model_us": fp16, "gemlite_speedup_estimate": fp16 / best["estimate_us"],
                                  "published_speedup": PUBLISHED_SPEEDUP[m],
                                  "relative_error": fp16 / best["estimate_us"] / PUBLISHED_SPEEDUP[m] - 1,
                                  "ours_speedup_estimate": fp16 / ours["estimate_us"]}
        else:
            row["gemlite"] = None
            row["note"] = "no GemLite config compiled without spills within the shared-memory limit"
        shapes.append(row)
    doc = {"benchmark": "gemlite_static", "arch": ARCH, "reference_gpu": static.ARCH[ARCH]["gpu"],
           "gemlite": gl["version"], "triton": triton.__version__,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/gemlite_static.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "ours_source": str(OURS.relative_to(Path(__file__).parent.parent)),
           "operands": "A16W4_HQQ_INT packing: W_q int32 (K/8, N) packed over K, fp16 scales + fma zeros (K/G, N), "
                       "W_group_mode 4, fp32 acc, data_contiguous, type_id 104",
           "shapes": shapes, "records": records, "failures": failures}
    doc["sensitivity"] = sensitivity(doc)
    write_json(args.out, doc)
    print_sensitivity(doc["sensitivity"])
    for s in shapes:
        g, o = s["gemlite"], s["ours"]
        print(f"M={s['shape']['M']:>3} GemLite {s['gemlite_matmul_type']} "
              + (f"{g['estimate_us']:.2f}us {g['config']}" if g else "n/a")
              + f" | ours {o['path']} {o['estimate_us']:.2f}us" + (f" | x{s['gemlite_over_ours']:.2f}" if g else ""))
        if g:
            c = s["calibration"]
            print(f"      GemLite vs fp16: estimate x{c['gemlite_speedup_estimate']:.2f}, published "
                  f"x{c['published_speedup']:.2f} ({100 * c['relative_error']:+.1f}%); ours x{c['ours_speedup_estimate']:.2f}")
    print(f"wrote {args.out}: {len(records)} records, {len(failures)} failures")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
