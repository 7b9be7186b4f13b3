"""GPU check of the W4A16 kernels, ready for the first H100 / H200 session: one command, one JSON.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check_<gpu>.json] [--budget-s 420]

The JSON (default ``benchmarks/results/gpu_check_<gpu name>.json``) records the command, the GPU,
the date, torch / triton versions, every row and check, and a summary against the targets.

What it runs (group 128, fp16 activations; every assertion is recorded, the run exits 1 if one
failed):

- **Rows**: every table row of the path at M = 1 / 16 / 128 on 8192x8192 and 4096x4096, plus the
  shipped row at the odd shapes (N=8200, K=8192 and N=8192, K=8164) with M in {1, 3, 17, 33, 200}.
  Each: the output against the dequantized reference within the fp16 bound
  (``w4a16.error_bound``) on 3 consecutive calls (the per-call split-K workspace must not leak
  state between them); kernel time from ``torch.profiler`` (device time of the kernel, L2
  flushed by a 256 MB write before each call); ``triton.testing.do_bench`` median; GB/s;
  cuBLAS fp16 (``x @ W``) on the same inputs; the shipped row vs the best row.
- **CUDA graph**: 8 layers of distinct weights at M = 1 captured in one graph, replayed and
  checked; per-layer time from the graph vs eager back-to-back time per call.
- **Hazards**: capture-then-grow (capture a split-K decode graph, run an eager prefill at a
  larger M, replay, check) and two streams running split-K launches concurrently (checked).
- **Convs**: batch-1 deploy convs, ours vs cuDNN (``benchmarks/kernel_speed.py``'s conv benchmark,
  without its torch.compile column, which would not fit the budget).

Stops starting new timed rows when ``--budget-s`` is spent (recorded as skipped), so it fits in
8 minutes. Without CUDA it exits 2 with a message and runs nothing.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from adagrow.files import write_json
from adagrow.kernels import w4a16 as w4

GROUP = 128
MAIN_SHAPES = [(8192, 8192), (4096, 4096)]  # (N, K)
MAIN_MS = [1, 16, 128]
ODD_SHAPES = [(8200, 8192), (8192, 8164)]
ODD_MS = [1, 3, 17, 33, 200]
TARGETS = {1: 2.5, 16: 2.2, 128: 1.0}  # 8192^2 speedup over cuBLAS fp16 (issue 20)
CALLS = 3
GRAPH_LAYERS = 8


@dataclass(frozen=True)
class Case:
    """One checked (and timed) launch: shape, M, path and config; ``shipped``: the row the
    table picks for this shape on this device."""
    n: int
    k: int
    m: int
    path: str
    config: tuple[int, ...]
    shipped: bool


def case_list(shipped_row: Callable[[int, int, int], tuple[int, ...]]) -> list[Case]:
    """Every case of the check: all rows of M's path at the main shapes, the shipped row at the
    odd shapes. ``shipped_row(m, n, k_pad)`` is the config the table picks."""
    cases = []
    for n, k in MAIN_SHAPES:
        for m in MAIN_MS:
            path, pick = w4.path_for(m), shipped_row(m, n, k_pad(k))
            cases += [Case(n, k, m, path, tuple(cfg), tuple(cfg) == tuple(pick)) for cfg in w4.CONFIGS[path]]
    for n, k in ODD_SHAPES:
        for m in ODD_MS:
            cases.append(Case(n, k, m, w4.path_for(m), tuple(shipped_row(m, n, k_pad(k))), True))
    return cases


def k_pad(k: int) -> int:
    """K padded to the group size (the packed weight's K_pad)."""
    return -(-k // GROUP) * GROUP


def summarize(rows: list[dict]) -> list[dict]:
    """Per (N, K, M): the shipped row's and the best row's kernel time and speedup over fp16,
    and the issue's target where one applies."""
    out = []
    keys = sorted({(r["N"], r["K"], r["M"]) for r in rows if r.get("kernel_us")})
    for n, k, m in keys:
        rs = [r for r in rows if (r["N"], r["K"], r["M"]) == (n, k, m) and r.get("kernel_us")]
        best = min(rs, key=lambda r: r["kernel_us"])
        shipped = next((r for r in rs if r["shipped"]), None)
        entry = {"N": n, "K": k, "M": m, "best_config": best["config"], "best_speedup": best["speedup_vs_fp16"],
                 "shipped_config": shipped["config"] if shipped else None,
                 "shipped_speedup": shipped["speedup_vs_fp16"] if shipped else None}
        if (n, k) == (8192, 8192) and m in TARGETS:
            entry["target"] = TARGETS[m]
            entry["target_met"] = bool(shipped and shipped["speedup_vs_fp16"] >= TARGETS[m])
        out.append(entry)
    return out


def write_report(path: Path, doc: dict) -> None:
    """Write the check's JSON (temp file + rename) with its summary and failure count."""
    doc = dict(doc)
    doc["summary"] = summarize(doc.get("rows", []))
    doc["failures"] = [f for f in doc.get("checks", []) if not f["ok"]] + \
        [r for r in doc.get("rows", []) if r.get("error")]
    write_json(path, doc)


# ----------------------------------------------------------------------------- GPU parts
def require_cuda() -> str | None:
    """Why this check cannot run here, or None."""
    if not torch.cuda.is_available():
        return "benchmarks/gpu_check.py needs a CUDA GPU (H100 / H200); torch.cuda.is_available() is False"
    if not w4.HAS_TRITON:
        return "benchmarks/gpu_check.py needs the 'triton' package"
    return None


class Layer:
    """Packed 4-bit weights of one random layer ``[K, N]`` built on ``device`` (random codes,
    scales and integer zeros, packed by :mod:`adagrow.packed`; no quantizer run, so building
    the check's ~20 layers takes no host time), as a layer serves them (words + the kernels'
    (s, z) pairs), with the dequantized reference, its fp16 copy for cuBLAS and the per-weight
    scales for the error bound."""

    def __init__(self, n: int, k: int, seed: int, device: str = "cuda") -> None:
        from adagrow.packed import column_groups, dequantize_packed, pack_codes, pack_scale_zero
        gen = torch.Generator(device=device).manual_seed(seed)
        kp = k_pad(k)
        codes = torch.randint(0, 16, (n, kp), generator=gen, device=device)
        scales = (torch.rand(kp // GROUP, n, generator=gen, device=device) * 0.02 + 0.005).half()
        zeros = torch.randint(0, 16, (kp // GROUP, n), generator=gen, device=device).half()
        self.qw, self.sz = pack_codes(codes, 4), pack_scale_zero(scales, zeros)
        self.wdq = dequantize_packed(self.qw, scales, zeros, 4, k, GROUP)  # [N, K] float32
        self.w16 = self.wdq.t().contiguous().half()
        self.sfull = scales.float().t()[:, column_groups(kp, GROUP).to(device)][:, :k]
        self.hbm_bytes = self.qw.numel() * 4 + self.sz.numel() * 2

    def err_ratio(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Largest |y - x W^T| / fp16 bound."""
        ref = x.float() @ self.wdq.t()
        return float(((y.float() - ref).abs() / w4.error_bound(x, self.wdq, self.sfull)).max())

    def run(self, x: torch.Tensor, path: str | None = None, cfg: tuple[int, ...] | None = None) -> torch.Tensor:
        return w4.w4a16_triton_sz(x, self.qw, self.sz, GROUP, path, cfg)


def kernel_us(fn: Callable[[], Any], reps: int = 10) -> float:
    """Median device time (µs) of all CUDA kernels ``fn`` launches (ours: the counter memset and
    the kernel), from one torch.profiler session over ``reps`` calls, each after an L2 flush
    (an elementwise add over 256 MB, whose kernel splits the trace into calls and is not
    counted)."""
    from torch.profiler import ProfilerActivity, profile
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.add_(1)
            fn()
        torch.cuda.synchronize()
    return split_calls([(e.time_range.start, e.name, e.device_time) for e in prof.events()
                        if e.device_type.name == "CUDA"])


def split_calls(events: list[tuple[float, str, float]]) -> float:
    """Median per-call device time from ``(start, kernel name, µs)`` events: the flush kernels
    (``elementwise`` in their name) start a new call and are not counted."""
    calls: list[float] = []
    for _, name, us in sorted(events):
        if "elementwise" in name:
            calls.append(0.0)
        elif calls:
            calls[-1] += us
    calls.sort()
    return calls[len(calls) // 2]


def do_bench_us(fn: Callable[[], Any]) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, rep=100, return_mode="median")) * 1e3


def check_row(case: Case, layers: dict, timed: bool, device: str = "cuda") -> dict:
    """Correctness on CALLS consecutive calls, then (if ``timed``, CUDA only) profiler /
    do_bench times. On the CPU (TRITON_INTERPRET=1, the tests) only the correctness part runs."""
    key = (case.n, case.k)
    if key not in layers:
        layers[key] = Layer(case.n, case.k, seed=case.n + case.k, device=device)
    layer = layers[key]
    row: dict[str, Any] = {"N": case.n, "K": case.k, "M": case.m, "path": case.path, "config": list(case.config),
                           "shipped": case.shipped}
    why = w4.config_problem(case.path, case.config, GROUP, torch.float16, torch.device(device))
    if why:
        row["skipped"] = why
        return row
    x = torch.randn(case.m, case.k, device=device, dtype=torch.float16)
    try:
        ratios = [layer.err_ratio(x, layer.run(x, case.path, case.config)) for _ in range(CALLS)]
    except Exception as exc:  # a launch failure is a failed row, recorded with its reason
        row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        return row
    row["err_over_bound"] = ratios
    row["correct"] = all(r <= 1.0 for r in ratios)
    if not row["correct"]:
        row["error"] = f"output exceeds the fp16 bound on some of {CALLS} calls: {ratios}"
    if not timed:
        row["timing_skipped"] = "time budget spent"
        return row
    ours = kernel_us(lambda: layer.run(x, case.path, case.config))
    fp16 = kernel_us(lambda: x @ layer.w16)
    nbytes = layer.hbm_bytes + x.numel() * 2 + case.m * case.n * 2
    row.update(kernel_us=ours, fp16_kernel_us=fp16, speedup_vs_fp16=fp16 / ours, GBps=nbytes / ours / 1e3,
               do_bench_us=do_bench_us(lambda: layer.run(x, case.path, case.config)),
               fp16_do_bench_us=do_bench_us(lambda: x @ layer.w16))
    return row


def check_graph(n: int, k: int) -> dict:
    """8 distinct layers at M = 1 in one CUDA graph: replay twice with new inputs, check each
    layer's output; per-layer time from the graph vs eager back-to-back per call."""
    layers = [Layer(n, k, seed=100 + i) for i in range(GRAPH_LAYERS)]
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    for lay in layers:  # warm-up (compile) outside capture
        lay.run(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = [lay.run(x) for lay in layers]
    ratios = []
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ratios.append(max(lay.err_ratio(x, y) for lay, y in zip(layers, ys)))
    graph_us = do_bench_us(graph.replay) / GRAPH_LAYERS
    eager_us = do_bench_us(lambda: [lay.run(x) for lay in layers]) / GRAPH_LAYERS
    return {"name": "cuda_graph_8_layers", "ok": all(r <= 1.0 for r in ratios), "err_over_bound": ratios,
            "per_layer_graph_us": graph_us, "per_layer_eager_us": eager_us, "N": n, "K": k}


def check_capture_then_grow(n: int, k: int) -> dict:
    """Capture a split-K decode graph (M = 1), run an eager prefill at M = 200 (larger
    workspace), then replay the graph: its output must still be right."""
    lay = Layer(n, k, seed=7)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    lay.run(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lay.run(x)
    big = torch.randn(200, k, device="cuda", dtype=torch.float16)
    r_big = lay.err_ratio(big, lay.run(big))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    r = lay.err_ratio(x, y)
    return {"name": "capture_then_grow", "ok": r <= 1.0 and r_big <= 1.0, "err_over_bound": [r, r_big]}


def check_two_streams(n: int, k: int, rounds: int = 20) -> dict:
    """Split-K launches on two streams at once (M = 16 and M = 1), many rounds: every output
    checked after the streams join."""
    lay = Layer(n, k, seed=11)
    xs = [torch.randn(16, k, device="cuda", dtype=torch.float16), torch.randn(1, k, device="cuda",
                                                                             dtype=torch.float16)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    outs: list[list[torch.Tensor]] = [[], []]
    for _ in range(rounds):
        for i, st in enumerate(streams):
            with torch.cuda.stream(st):
                outs[i].append(lay.run(xs[i]))
    torch.cuda.synchronize()
    worst = max(lay.err_ratio(xs[i], y) for i in range(2) for y in outs[i])
    return {"name": "two_streams", "ok": worst <= 1.0, "err_over_bound_max": worst, "rounds": rounds}


def batch1_convs() -> list[dict]:
    """benchmarks/kernel_speed.py's conv benchmark at batch 1 (ours vs cuDNN, outputs checked)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).parent / "kernel_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.bench_convs([1], lambda rows: None, compile_eager=False)


def run_check(out: Path, budget_s: float) -> int:
    """Run every part, writing the JSON after each; returns 0 if every assertion held."""
    t0 = time.perf_counter()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    doc: dict[str, Any] = {
        "benchmark": "gpu_check", "gpu": props.name, "device_key": w4.device_key(dev),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "triton": w4.triton.__version__, "machine": platform.node(),
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]), "rows": [], "checks": []}
    layers: dict = {}
    cases = case_list(lambda m, n, kp: w4.lookup_config(m, n, kp, GROUP, torch.float16, dev))
    for case in cases:
        timed = time.perf_counter() - t0 < 0.6 * budget_s
        doc["rows"].append(check_row(case, layers, timed))
        r = doc["rows"][-1]
        print(f"N={case.n} K={case.k} M={case.m:>3} {case.path:>6} {case.config}"
              + (" *" if case.shipped else "  ") + (f" {r['kernel_us']:.1f}us x{r['speedup_vs_fp16']:.2f}"
                                                   if r.get("kernel_us") else "")
              + (f" ERROR {r['error']}" if r.get("error") else ""), flush=True)
        write_report(out, doc)
    layers.clear()
    for part in (lambda: check_graph(8192, 8192), lambda: check_capture_then_grow(8192, 8192),
                 lambda: check_two_streams(8192, 8192)):
        try:
            doc["checks"].append(part())
        except Exception as exc:  # recorded as a failed check with its reason
            doc["checks"].append({"name": getattr(part, "__name__", "check"), "ok": False,
                                  "error": f"{type(exc).__name__}: {exc}"[:400]})
        print(doc["checks"][-1], flush=True)
        write_report(out, doc)
    if time.perf_counter() - t0 < budget_s:
        doc["convs_batch1"] = batch1_convs()
    else:
        doc["convs_batch1_skipped"] = "time budget spent"
    doc["wall_s"] = time.perf_counter() - t0
    write_report(out, doc)
    failures = len([f for f in doc["checks"] if not f["ok"]]) + len([r for r in doc["rows"] if r.get("error")])
    print(f"wrote {out}: {len(doc['rows'])} rows, {len(doc['checks'])} checks, {failures} failures, "
          f"{doc['wall_s']:.0f}s")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON to write (default benchmarks/results/gpu_check_<gpu name>.json)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop timing new rows after this many seconds")
    args = ap.parse_args(argv)
    why = require_cuda()
    if why:
        print(why, file=sys.stderr)
        return 2
    return run_check(args.out or default_out(torch.cuda.get_device_name()), args.budget_s)


def default_out(gpu_name: str) -> Path:
    """``benchmarks/results/gpu_check_<gpu name, lower case, non-alphanumerics as _>.json``."""
    slug = "".join(c if c.isalnum() else "_" for c in gpu_name.lower()).strip("_")
    return Path(__file__).parent / "results" / f"gpu_check_{slug}.json"


if __name__ == "__main__":
    raise SystemExit(main())
