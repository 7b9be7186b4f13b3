"""Static verification of the W4A16 kernels for sm_90 / sm_80 (no GPU): compile with Triton for
the target, read the SASS, check the targets of docs/design.md §6 on live compiles and on the committed
``benchmarks/results/kernels_static_sm*.json`` (which must match what the kernels compile to now)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adagrow.kernels import static
from adagrow.kernels import w4a16 as w4

ROOT = Path(__file__).resolve().parents[1]
RESULTS = {arch: ROOT / "benchmarks" / "results" / f"kernels_static_sm{arch}.json" for arch in (90, 80)}
needs_toolchain = pytest.mark.skipif(static.unavailable_reason() is not None,
                                     reason=f"static inspection unavailable: {static.unavailable_reason()}")

SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   I2FP.F32.U32 R3, R2 ;
        /*0030*/               @P0 LDG.E.EF.128 R8, desc[UR4][R6.64] ;
        /*0040*/                   LDG.E.U16 R9, desc[UR4][R6.64] ;
        /*0050*/                   LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R6.64] ;
        /*0060*/                   HMMA.16816.F32 R12, R8, R10, R12 ;
        /*0070*/                   I2F.F16 R3, R2 ;
        /*0078*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0080*/               @P1 BRA 0x30 ;
        /*0090*/                   STL [R1], R3 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0 ;
"""


def test_sass_analysis_counts_the_main_loop() -> None:
    facts = static.analyze_sass(SASS, threads=128)
    assert facts["instructions"] == 13 and facts["loop_instructions"] == 7  # 0x30..0x80
    assert facts["i2f_in_main_loop"] == 1 and facts["i2f_total"] == 2
    assert facts["global_loads_in_main_loop"] == 3
    assert facts["global_load_bytes_per_iter"] == (16 + 2 + 16) * 128
    assert facts["tensor_core_ops"] == 1 and facts["local_mem_ops"] == 1
    assert facts["cp_async_in_main_loop"] == 1 and facts["wgmma_in_flight"] == 1
    assert static.load_bytes("LDG.E.64.CONSTANT") == 8 and static.load_bytes("LDG.E") == 4


def test_runtime_signature_specializes_like_triton() -> None:
    sig, consts, aligned = static.runtime_signature({"x": "*fp16", "n": 8192, "k": 100, "one": 1}, {"B": 64})
    assert sig == {"x": "*fp16", "n": "i32", "k": "i32", "one": "constexpr", "B": "constexpr"}
    assert consts == {"B": 64, "one": 1} and aligned == ("n",)


def test_occupancy_and_estimate() -> None:
    assert static.occupancy(regs=64, smem=0, num_warps=4, arch=90) == 8  # 65536 / (64 * 128)
    assert static.occupancy(regs=32, smem=100_000, num_warps=4, arch=90) == 2  # smem bound
    rec = {"global_load_bytes_per_iter": 1000, "iters_per_program": 10, "extra_bytes": 0, "n_programs": 335,
           "blocks_per_sm": 4, "num_warps": 4, "loop_instructions": 100, "dependent_round_trips": 1}
    est = static.estimate_us(rec, 90)
    a = static.ARCH[90]
    assert est["estimate_mem_us"] == pytest.approx(3.35e6 / (static.DRAM_EFFICIENCY * a["hbm"]) * 1e6)
    # 335 programs on 132 SMs: 3 per SM, all resident, one wave; each round is one program's
    # chain (a round trip consumed right away + 100 instructions at WARP_IPC per warp), 10
    # rounds, + 2 round trips per wave + launch
    own = 100 / static.WARP_IPC / a["clock"]
    chain = static.HBM_LATENCY_S + own
    assert est["estimate_waves"] == 1 and est["estimate_bound"] == "sm"
    assert est["estimate_us"] == pytest.approx((10 * chain + 2 * static.HBM_LATENCY_S + static.LAUNCH_S) * 1e6)
    prefetched = static.estimate_us({**rec, "dependent_round_trips": 0, "global_loads_in_main_loop": 2}, 90)
    assert prefetched["estimate_chain_us_per_iter"] == pytest.approx(static.HBM_LATENCY_S * 1e6)  # latency > work
    # a consumer 80 instructions after its load: 80 / WARP_IPC cycles of the latency are hidden
    late = static.estimate_us({**rec, "round_trip_distances": [80]}, 90)
    hidden = 80 / static.WARP_IPC / a["clock"]
    assert late["estimate_chain_us_per_iter"] == pytest.approx((chain - hidden) * 1e6)
    far = static.estimate_us({**rec, "round_trip_distances": [10_000]}, 90)  # fully hidden: the work alone
    assert far["estimate_chain_us_per_iter"] == pytest.approx(own * 1e6)
    one_per_sm = static.estimate_us({**rec, "blocks_per_sm": 1}, 90)  # 3 waves of 1 instead of 1 wave of 3
    assert one_per_sm["estimate_waves"] == 3 and one_per_sm["estimate_us"] > 2.5 * est["estimate_us"] - 5
    # shared resources: 3 programs x 4 warps x 100 instructions on 4 schedulers, or the integer
    # pipe (64 lanes / clock), shared memory (128 B / clock), tensor cores at TC_EFFICIENCY
    busy = {**rec, "round_trip_distances": [10_000], "int_alu_in_main_loop": 100, "smem_bytes_per_iter": 64_000}
    est_busy = static.estimate_us(busy, 90)
    per_round = max(own, 3 * 100 * 4 * 32 / static.INT_LANES_PER_CLOCK / a["clock"],
                    3 * 64_000 / static.SMEM_BYTES_PER_CLOCK / a["clock"])
    assert est_busy["estimate_sm_us"] == pytest.approx((10 * per_round + 2 * static.HBM_LATENCY_S) * 1e6)


SASS_LAT = """
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E R8, desc[UR4][R2.64+0x10] ;
        /*0020*/                   FFMA R10, R5, R5, R10 ;
        /*0030*/                   LDG.E.U16 R12, desc[UR4][R2.64+0x20] ;
        /*0040*/                   HADD2.F32 R13, -RZ, R12.H0_H0 ;
        /*0050*/                   HGMMA.64x16x16.F32 R16, R4, gdesc[UR8], R16 ;
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0070*/                   STG.E desc[UR4][R2.64], R8 ;
        /*0080*/                   MEMBAR.ALL.GPU ;
"""


def test_latency_facts_from_sass() -> None:
    """Two round trips (R5 waits for the first loads, 2 instructions after the first of them;
    the U16 load is waited for by HADD2 right after it), the waited HGMMA's tensor-core time at
    the attained rate, integer-pipe ops, shared-memory bytes, MEMBAR counts."""
    instrs = static.parse_sass(SASS_LAT)
    assert static.dependent_round_trips(instrs) == 2 and static.round_trip_distances(instrs) == [2, 1]
    assert static.dependent_round_trips(instrs[:2] + instrs[3:4]) == 0  # loads never consumed: prefetch
    assert static.mma_flops("HGMMA.64x16x16.F32", 8) == 2 * 64 * 16 * 16 * 2
    assert static.mma_flops("HMMA.16816.F32", 4) == 2 * 16 * 8 * 16 * 4 and static.mma_flops("FFMA", 4) == 0
    a = static.ARCH[90]
    per_clock = static.TC_EFFICIENCY * a["tc_flops"] / a["sms"] / a["clock"]
    assert static.waited_wgmma(instrs, 4) == (1, 2 * 64 * 16 * 16)
    assert static.exposed_wgmma_cycles(1, 2 * 64 * 16 * 16, 90) == pytest.approx(static.WGMMA_LATENCY_CYCLES
                                                                                + 2 * 64 * 16 * 16 / per_clock)
    facts = static.analyze_sass(SASS_LAT, threads=128)
    assert facts["membar_gpu_total"] == 1 and facts["wgmma_in_flight"] == 0
    smem = static.parse_sass("""
        /*0000*/                   LDS.128 R4, [R2] ;
        /*0010*/                   LDS RZ, [RZ] ;
        /*0020*/                   STS.64 [R2], R4 ;
        /*0030*/                   LDSM.16.M88.4 R8, [R3] ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R6.64] ;
        /*0050*/                   LOP3.LUT R1, R2, 0xf, RZ, 0xc0, !PT ;
        /*0060*/                   SHF.R.U32.HI R1, RZ, 0x4, R2 ;
        /*0070*/                   IMAD R1, R2, R3, R4 ;
""")
    assert static.smem_bytes(smem, 4) == (16 + 8) * 128 + 512 * 4  # no dummy LDS, no cp.async fill
    facts = static.analyze_sass("\n".join(f"/*{a:04x}*/ {op} {args} ;" for a, op, args in smem), threads=128)
    assert facts["int_alu_in_main_loop"] == 2 and facts["smem_bytes_per_iter"] == (16 + 8) * 128 + 512 * 4


def _check_record(r: dict) -> None:
    where = f"{r['kernel']} {r['config']} {r['shape']} sm_{r['arch']}"
    assert r["spill_bytes"] == 0 and r["local_mem_ops"] == 0, f"spills: {where}"
    assert r["smem_bytes"] <= r["smem_limit"], f"shared memory over the limit: {where}"
    assert r["i2f_in_main_loop"] == 0 and r["has_loop"], f"I2F in the main loop: {where}"
    if r["path"] in ("gemv", "splitk"):
        assert r["global_load_bytes_per_iter"] <= 1.25 * r["unique_bytes_per_iter"], f"replicated loads: {where}"
    if r["path"] in ("splitk", "gemm"):
        assert r["tensor_core_ops_in_main_loop"] > 0, f"no tensor-core ops: {where}"
        assert r["cp_async_in_main_loop"] == r["global_loads_in_main_loop"] > 0, \
            f"a global load of the loop is not staged by cp.async: {where}"
        assert r["dependent_round_trips"] == 0, f"a load is waited for in the iteration that issues it: {where}"
    if r["path"] in ("gemv", "splitk", "gemm"):  # the tile counter is the only atomic, its release the only fence
        assert r["atomics_total"] <= 1 and r["membar_gpu_total"] <= 1, f"data atomics / GPU fences: {where}"


def _records(doc_or_arch) -> dict:
    doc = json.loads(RESULTS[doc_or_arch].read_text()) if isinstance(doc_or_arch, int) else doc_or_arch
    return {(r["kernel"], json.dumps(r["config"]), json.dumps(r["shape"])): r for r in doc["records"]}


def _run_script(tmp_path: Path, arch: int) -> dict:
    """benchmarks/kernels_static.py on each path's default row (first config) at both shapes,
    in a subprocess without TRITON_INTERPRET (which the test session sets for the CPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / f"s{arch}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernels_static.py"), "--arch", str(arch), "--max-configs", "1",
           "--paths", "gemv", "splitk", "gemm", "--out", str(out), "--sass-dir", str(tmp_path / "sass")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@needs_toolchain
@pytest.mark.parametrize("arch", [90, 80])
def test_default_rows_compile_to_target_and_match_committed_json(arch: int, tmp_path) -> None:
    """Live compile of each path's default row: targets hold, the SASS files are written, and
    the committed JSON records the same registers / shared memory / main loop (not stale)."""
    doc = _run_script(tmp_path, arch)
    assert doc["command"].startswith("python benchmarks/kernels_static.py --arch")
    assert all("estimate" in e["label"] for e in doc["estimates"])
    committed = _records(arch)
    live = _records(doc)
    assert {r["path"] for r in live.values()} == {"gemv", "splitk", "gemm"}
    for key, rec in live.items():
        rows = [c for c in w4.CONFIGS[rec["path"]] if arch in w4.ARCH_ONLY.get(c, (arch,))]
        assert tuple(rec["config"].values()) == rows[0]
        assert (tmp_path / "sass" / rec["sass"]).read_text().count("LDG") > 0
        _check_record(rec)
        for field in ("regs", "smem_bytes", "loop_instructions", "global_load_bytes_per_iter", "tensor_core_ops"):
            assert rec[field] == committed[key][field], \
                f"{RESULTS[arch].name} is stale ({field}); rerun benchmarks/kernels_static.py"
        assert rec["estimate_us"] == pytest.approx(committed[key]["estimate_us"], rel=1e-6), \
            f"{RESULTS[arch].name} is stale (estimate_us); rerun benchmarks/kernels_static.py"


@pytest.mark.parametrize("arch", [90, 80])
def test_committed_json_covers_every_table_config(arch: int) -> None:
    records = _records(arch)
    for n, k in w4.STATIC_SHAPES:
        for m in w4.STATIC_MS:
            path = w4.path_for(m)
            for cfg in w4.CONFIGS[path]:
                if arch not in w4.ARCH_ONLY.get(cfg, (arch,)):
                    continue
                key = (w4._kernel_for(path).__name__, json.dumps(dict(zip(w4.CONFIG_FIELDS, cfg))),
                       json.dumps({"M": m, "N": n, "K": k, "G": 128}))
                assert key in records, f"{RESULTS[arch].name} lacks {key}"
                _check_record(records[key])


def test_shipped_tensor_core_rows_keep_a_wgmma_group_in_flight() -> None:
    """Every shipped sm_90 split-K / GEMM row waits with ``WARPGROUP.DEPBAR.LE gsb0, 0x1`` or
    more: the next tile's dequant overlaps a wgmma group."""
    shipped = [r for r in _records(90).values() if r.get("table_default") and r["path"] in ("splitk", "gemm")]
    assert len(shipped) == 2 * len(w4.STATIC_SHAPES)
    for r in shipped:
        assert r["wgmma_in_flight"] >= 1, (r["config"], r["shape"])


def test_static_estimates_are_the_model_of_the_records() -> None:
    """Each committed estimate row is the model applied to its record, against the fp16 model."""
    doc = json.loads(RESULTS[90].read_text())
    recs = _records(90)
    for e in doc["estimates"]:
        if e["path"] not in ("gemv", "splitk", "gemm"):
            continue
        d = e["default"]
        rec = next(r for r in recs.values() if r["config"] == d["config"] and r["shape"] == e["shape"])
        assert static.estimate_us(rec, 90)["estimate_us"] == pytest.approx(d["estimate_us"], rel=1e-9)
        s = e["shape"]
        assert e["fp16_us"] == pytest.approx(static.fp16_matmul_us(s["M"], s["N"], s["K"], 90))
        assert d["speedup_vs_fp16_estimate"] == pytest.approx(e["fp16_us"] / d["estimate_us"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_gpu_benchmark_imports_and_explains_without_cuda(capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernel_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gemlite_comparison_is_current_and_consistent() -> None:
    """benchmarks/results/gemlite_static_sm90.json: its "ours" side is the best of our committed
    sm_90 records (not stale), each side's figure is the best of its own records, and the stated
    ratio is what the records give."""
    doc = json.loads((ROOT / "benchmarks" / "results" / "gemlite_static_sm90.json").read_text())
    ours = json.loads(RESULTS[90].read_text())["records"]
    assert [s["shape"]["M"] for s in doc["shapes"]] == [1, 16, 128] and not doc["failures"]
    for s in doc["shapes"]:
        mine = [r for r in ours if r["shape"] == s["shape"] and r["fits"] and not r["spill_bytes"]]
        theirs = [r for r in doc["records"] if r["shape"] == s["shape"] and r["fits"] and not r["spill_bytes"]]
        assert s["ours"]["estimate_us"] == pytest.approx(min(r["estimate_us"] for r in mine), rel=1e-9)
        assert s["gemlite"]["estimate_us"] == pytest.approx(min(r["estimate_us"] for r in theirs), rel=1e-9)
        assert s["gemlite_over_ours"] == pytest.approx(s["gemlite"]["estimate_us"] / s["ours"]["estimate_us"])
        assert s["ours"]["i2f_in_main_loop"] == 0
        c = s["calibration"]  # the model's calibration on GemLite's published H100 figures
        assert c["relative_error"] == pytest.approx(c["gemlite_speedup_estimate"] / c["published_speedup"] - 1)
        assert abs(c["relative_error"]) <= 0.15, f"M={s['shape']['M']}: calibration error {c['relative_error']:+.1%}"
        # the sensitivity row at the model's current constants reproduces the calibration
        for row in doc["sensitivity"]:
            if row["value"] == getattr(static, row["constant"]):
                m = str(s["shape"]["M"])
                assert row["gemlite_error"][m] == pytest.approx(c["relative_error"], rel=1e-9)
                assert row["ours_speedup"][m] == pytest.approx(c["ours_speedup_estimate"], rel=1e-9)
