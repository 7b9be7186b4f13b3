"""The pure-Python parts of benchmarks/gpu_check.py (case list, summary, JSON writer) and its
refusal without CUDA; the GPU parts run on an H100 / H200 (docs/kernels.md)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from adagrow.kernels import w4a16 as w4

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[spec.name]


def test_case_list_covers_rows_and_odd_shapes(gc) -> None:
    picks = {}

    def shipped(m, n, kp):
        picks[(m, n, kp)] = w4.CONFIGS[w4.path_for(m)][1]
        return picks[(m, n, kp)]

    cases = gc.case_list(shipped)
    main = [c for c in cases if (c.n, c.k) in gc.MAIN_SHAPES]
    assert len(main) == sum(len(w4.CONFIGS[w4.path_for(m)]) for m in gc.MAIN_MS) * len(gc.MAIN_SHAPES)
    assert sum(c.shipped for c in main) == len(gc.MAIN_MS) * len(gc.MAIN_SHAPES)  # one shipped row each
    odd = [c for c in cases if (c.n, c.k) not in gc.MAIN_SHAPES]
    assert {(c.n, c.k, c.m) for c in odd} == {(n, k, m) for n, k in gc.ODD_SHAPES for m in gc.ODD_MS}
    assert all(c.shipped and c.path == w4.path_for(c.m) for c in odd)
    assert (1, 8192, 8192) in picks and gc.k_pad(8164) == 8192  # odd K is padded to the group


def test_report_summary_and_json(gc, tmp_path) -> None:
    rows = [{"N": 8192, "K": 8192, "M": 1, "config": [1], "shipped": True, "kernel_us": 20.0, "speedup_vs_fp16": 2.4},
            {"N": 8192, "K": 8192, "M": 1, "config": [2], "shipped": False, "kernel_us": 16.0,
             "speedup_vs_fp16": 3.0},
            {"N": 4096, "K": 4096, "M": 16, "config": [3], "shipped": True, "error": "output exceeds the bound"}]
    checks = [{"name": "two_streams", "ok": True}, {"name": "capture_then_grow", "ok": False}]
    gc.write_report(tmp_path / "r.json", {"rows": rows, "checks": checks})
    doc = json.loads((tmp_path / "r.json").read_text())
    (s,) = doc["summary"]
    assert s["best_config"] == [2] and s["shipped_config"] == [1] and s["target"] == 2.5
    assert s["target_met"] is False and s["shipped_speedup"] == 2.4
    assert [f.get("name", f.get("error")) for f in doc["failures"]] == ["capture_then_grow", "output exceeds the bound"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_cuda(gc, capsys, tmp_path) -> None:
    assert gc.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_row_check_runs_on_cpu_under_the_interpreter(gc) -> None:
    """The correctness half of a row (layer packing as served, 3 consecutive calls against the
    fp16 bound) at small shapes on the CPU (TRITON_INTERPRET=1); a wrong config is reported."""
    if not w4.use_triton(torch.zeros(1)):
        pytest.skip("Triton does not run here (no CUDA, no TRITON_INTERPRET=1)")
    layers: dict = {}
    for m, path, cfg in ((1, "gemv", (1, 64, 32, 2, 4, 1)), (3, "splitk", (16, 64, 32, 3, 4, 1)),
                         (40, "gemm", (16, 64, 64, 1, 4, 1))):
        row = gc.check_row(gc.Case(72, 256, m, path, cfg, True), layers, timed=False, device="cpu")
        assert row["correct"] and len(row["err_over_bound"]) == gc.CALLS and "error" not in row, row
        assert row["timing_skipped"] == "time budget spent"
    lay = layers[(72, 256)]
    assert lay.sz.shape == (2, 72, 2) and lay.hbm_bytes == 256 // 8 * 72 * 4 + 2 * 72 * 4
    x = torch.randn(2, 256, dtype=torch.float16)
    assert gc.Layer.err_ratio(lay, x, (x.float() @ lay.wdq.t() * 1.5).half()) > 1  # a 50% error is caught


def test_default_output_is_under_results(gc) -> None:
    out = gc.default_out("NVIDIA H200")
    assert out.parent == ROOT / "benchmarks" / "results" and out.name == "gpu_check_nvidia_h200.json"


def test_host_overhead_script_runs_with_launch_stubbed(tmp_path) -> None:
    """benchmarks/kernels_host.py: every entry point is timed per shape with the launch stubbed
    (one stubbed launch per kernel call, none left to the real kernel)."""
    spec = importlib.util.spec_from_file_location("kernels_host", ROOT / "benchmarks" / "kernels_host.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._NoLaunch.launches = 0
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--calls", "2", "--out", str(tmp_path / "h.json")]) == 0
    finally:
        torch.set_num_threads(threads)  # the script pins one thread for its timings
    rows = json.loads((tmp_path / "h.json").read_text())["rows"]
    assert [r["M"] for r in rows] == [m for m, _, _ in mod.SHAPES]
    for r in rows:
        assert all(r[f"{name}_host_us"] > 0 for name in ("w4a16_triton_sz", "op_sz", "op", "torch_empty"))
    assert mod._NoLaunch.launches == len(mod.SHAPES) * 3 * (1 + 5 * 2)  # 3 kernel entry points, warm-up + 5 rounds


def test_profiler_trace_split_into_calls(gc) -> None:
    """kernel_us's trace reading: the flush kernel starts a call, its own time is not counted,
    the median call is returned."""
    ev = [(0, "vectorized_elementwise_kernel<AddFunctor>", 90.0), (1, "Memset (Device)", 1.0),
          (2, "_w4a16_gemv_kernel", 10.0), (3, "vectorized_elementwise_kernel<AddFunctor>", 90.0),
          (4, "Memset (Device)", 1.0), (5, "_w4a16_gemv_kernel", 14.0), (6, "vectorized_elementwise_kernel", 90.0),
          (7, "Memset (Device)", 1.0), (8, "_w4a16_gemv_kernel", 12.0)]
    assert gc.split_calls(list(reversed(ev))) == 13.0
