"""``adagrow demo``: grow a CNN on the bundled digits, reparameterize, quantize (RTN vs OBS vs
OBS with overlap-aware order and groups, at W8, W4 and W3), export ONNX (fp32, INT8 Q/DQ, W4), time
everything on the backends this machine has, and write a table, JSON, markdown and a plot."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adagrow.bench import CPU_REFERENCE_NOTE, SUITE_DEFAULTS, markdown, run_suite
from adagrow.compress import QuantConfig, quantize, save_quantized
from adagrow.compress.export import export_onnx, ort_session
from adagrow.data import digits, train_val_split
from adagrow.files import write_json, write_text
from adagrow.grow import GrowingCNN, GrowthConfig, grow, reparameterize, save_grown
from adagrow.grow.train import accuracy
from adagrow.timing import measure

METHODS = [  # (method label, precision, config)
    ("RTN per-channel", "W8", QuantConfig(bits=8, method="rtn", group_size=-1, linear_group_size=-1)),
    ("OBS act-order per-channel", "W8", QuantConfig(bits=8, order="act", group_size=-1, linear_group_size=-1)),
    ("RTN per-channel", "W4", QuantConfig(bits=4, method="rtn", group_size=-1, linear_group_size=-1)),
    ("OBS act-order g128", "W4", QuantConfig(bits=4, order="act", group_size=128, linear_group_size=-1)),
    ("OBS overlap-aware (reparam order, tier groups)", "W4",
     QuantConfig(bits=4, order="reparam", group_size="tier", linear_group_size=-1)),
    ("RTN per-channel", "W3", QuantConfig(bits=3, method="rtn", group_size=-1, linear_group_size=-1)),
    ("OBS overlap-aware (reparam order, tier groups)", "W3",
     QuantConfig(bits=3, order="reparam", group_size="tier", linear_group_size=-1)),
]


def growth_config() -> GrowthConfig:
    """Every growth setting spelled out, so the demo does not move when grow()'s defaults do.

    A growth step every 8 optimizer steps (about half an epoch on the digits) with every conv
    gaining a branch at each width step (``width_fraction=1``, ``max_kernel=5``: branches may widen
    the 3x3 deploy kernels to 5x5), function-preserving (``preserve``: a new VGG layer starts as the
    identity, a Dirac kernel), one cosine learning-rate schedule over the run, and automatic
    stopping only once validation accuracy has fallen three times (``auto_rule="gain"``, ``auto_threshold=0``,
    ``auto_tolerance=2``). The grown model's fused kernels keep one dominant centre tap per output
    channel (the identity init, ``bn`` and 1x1 branches), which is what round-to-nearest loses and
    OBS keeps (docs/demo.md)."""
    return GrowthConfig(stop="auto", budget=None, interval=8, grow_fraction=0.75, location="greedy", probe_steps=None,
                        lr_after_growth="continue", branch_sampling="with", width_fraction=1.0, max_kernel=5,
                        preserve=True, widen_dim=True, retrain=False, auto_rule="gain", auto_threshold=0.0, auto_tolerance=2,
                        ema=0.5, seed=0)


def _latency(fn, x: torch.Tensor, timing: dict[str, int]) -> float:
    """Median ms of ``fn(x)`` by :func:`adagrow.timing.measure`, the suite's timing method."""
    device = "cuda" if x.is_cuda else "cpu"
    return measure(lambda: fn(x), timing["warmup"], timing["runs"], timing["threads"], device)["median_ms"]


def _torch_row(model: torch.nn.Module, x1: torch.Tensor, timing: dict[str, int],
               cpu: bool = True) -> tuple[float | None, float | None]:
    """(CPU fp32 latency or None when not ``cpu``, GPU fp16 latency or None) at batch 1, in ms."""
    cpu_ms = _latency(torch.no_grad()(model), x1, timing) if cpu else None
    gpu = None
    if torch.cuda.is_available():  # fp16 activations: fused convs / W4A16 Triton kernels
        gpu = _latency(torch.no_grad()(copy.deepcopy(model).cuda().half()), x1.cuda().half(), timing)
    return cpu_ms, gpu


def kernel_report(deploy: torch.nn.Module, rtn: torch.nn.Module) -> list[dict[str, Any]]:
    """Per fused conv of ``deploy``: its kernel, overlap map, the median over output channels of
    (largest |w|) / RMS of the channel's weights, the share of channels whose largest |w| is the
    centre tap, and the share of nonzero weights that ``rtn`` (the RTN W4 model) rounds to zero."""
    out = []
    for name, conv in deploy.named_modules():
        if not isinstance(conv, torch.nn.Conv2d):
            continue
        w = conv.weight.detach().flatten(1)
        peak = w.abs().amax(1)
        kh, kw = conv.kernel_size
        centre = conv.weight.detach()[:, :, kh // 2, kw // 2].abs().amax(1)
        wq = rtn.get_submodule(name).dequantize().flatten(1)
        overlap = getattr(conv, "reparam_overlap", None)
        out.append({"layer": name, "kernel": f"{kh}x{kw}", "overlap": None if overlap is None else overlap.tolist(),
                    "peak_to_rms": float((peak / w.pow(2).mean(1).sqrt()).median()),
                    "centre_is_peak": float((centre >= peak).float().mean()),
                    "rtn_w4_zeroed": float(((wq == 0) & (w != 0)).float().sum() / (w != 0).sum())})
    return out


SUITE_CASES = {("float (fused)", "FP32", "PyTorch eager"): ("eager", "fp32"),
               ("float (fused)", "FP32", "ONNX Runtime CPU"): ("ort-cpu", "fp32")}


def _from_suite(rows: list[dict[str, Any]], suite: dict[str, Any]) -> None:
    """Fill the CPU latency of the table rows the suite also measures (the float model on PyTorch
    eager and ONNX Runtime CPU, batch 1) from the suite's record: one measurement, one figure."""
    ok = {(r["backend"], r["precision"]): r for r in suite["rows"] if r["status"] == "ok" and r["batch"] == 1}
    for r in rows:
        case = SUITE_CASES.get((r["method"], r["precision"], r["backend"]))
        if case is not None:
            r["cpu_latency_ms"] = ok[case]["median_ms"]
            r["latency_from"] = f"suite {case[0]} {case[1]} b1"


def pareto(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both CPU latency (lower) and accuracy (higher), fastest first."""
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (r["cpu_latency_ms"], -r["accuracy"])):
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    return front


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    markers = {"PyTorch eager": "o", "ONNX Runtime CPU": "s"}
    front = pareto(rows)
    for i, r in enumerate(rows):
        on = any(r is f for f in front)
        ax.scatter(r["cpu_latency_ms"], 100 * r["accuracy"], s=70 if on else 35,
                   marker=markers.get(r["backend"], "^"), color=plt.cm.tab20(i % 20),
                   edgecolors="black" if on else "none", zorder=3)
        short = r["method"].split(" (")[0].replace("weights + calibrated activations", "").strip()
        ax.annotate(f"{i + 1}: {short} {r['precision']}", (r["cpu_latency_ms"], 100 * r["accuracy"]),
                    xytext=(5, 4 if i % 2 else -10), textcoords="offset points", fontsize=7)
    ax.plot([r["cpu_latency_ms"] for r in front], [100 * r["accuracy"] for r in front], "k--", lw=1,
            label="Pareto front (no point is both faster and more accurate)", zorder=2)
    for b, m in markers.items():
        ax.scatter([], [], marker=m, color="gray", label=b)
    ax.set_xscale("log")
    ax.set_xlabel("CPU latency, batch 1 (ms, median, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"adagrow demo: grown {rows[0]['model']} on digits")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run_demo(out: Path, fast: bool = False, overwrite: bool = False, progress: bool = True,
             threads: int = 1) -> dict[str, Any]:
    """Run the whole pipeline; every figure in the table is measured in this run.

    ``threads``: PyTorch / ONNX Runtime threads for every latency (table and suite). One by
    default: a batch-1 call on two threads of a two-core machine stalls whenever either thread is
    descheduled (the same float model read 2.0 and 6.7 ms in consecutive measurements, against
    2.49 and 2.38 ms on one thread)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; the demo writes a folder of results (choose --out)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace its files or choose --out")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    say = print if progress else (lambda *a, **k: None)
    timing = {"warmup": 5 if fast else 10, "runs": 20 if fast else 50, "threads": threads}  # table and suite
    x_tr, y_tr, x_te, y_te = digits(size=16)
    calib = list(x_tr[: 256 if fast else 512].split(128))
    x1 = x_te[:1]

    say("[1/5] growing a VGG-family CNN on the bundled digits")
    t0 = time.perf_counter()
    fit, val = train_val_split(x_tr, y_tr, 0.15, seed=0)  # growth decisions never read the test set
    res = grow(GrowingCNN("vgg", widths=(16, 24, 32) if fast else (32, 48, 64)), fit, val,
               epochs=8 if fast else 12, config=growth_config(), lr=0.05,
               progress=progress)
    grow_s = time.perf_counter() - t0
    save_grown(res.model, out / "grown.safetensors", overwrite=True)
    say(f"      grew to {res.model.spec()} in {grow_s:.1f}s")

    say("[2/5] reparameterizing (fusing every RepConv2d)")
    deploy = reparameterize(res.model)
    with torch.no_grad():
        fuse_diff = float((deploy(x_te) - res.model(x_te)).abs().max())
    float_acc = accuracy(deploy, x_te, y_te)
    rows: list[dict[str, Any]] = []
    cpu, gpu = _torch_row(deploy, x1, timing, cpu=False)  # CPU: the suite's eager fp32 b1 record
    rows.append({"model": res.model.spec(), "method": "float (fused)", "precision": "FP32", "backend": "PyTorch eager",
                 "cpu_latency_ms": cpu, "gpu_latency_ms": gpu, "accuracy": float_acc, "quantize_s": 0.0})

    say("[3/5] quantizing: RTN vs OBS vs overlap-aware OBS, W8, W4 and W3")
    overlap_w4 = rtn_w4 = None
    for label, prec, cfg in METHODS:
        t0 = time.perf_counter()
        qmodel = quantize(deploy, calib, cfg, progress=False)
        q_s = time.perf_counter() - t0
        cpu, gpu = _torch_row(qmodel, x1, timing)
        rows.append({"model": res.model.spec(), "method": label, "precision": prec, "backend": "PyTorch eager",
                     "cpu_latency_ms": cpu, "gpu_latency_ms": gpu, "accuracy": accuracy(qmodel, x_te, y_te),
                     "quantize_s": q_s})
        if "overlap" in label and prec == "W4":
            overlap_w4 = qmodel
        if label.startswith("RTN") and prec == "W4":
            rtn_w4 = qmodel
    save_quantized(overlap_w4, out / "digits_w4_overlap.safetensors", overwrite=True)
    kernels = kernel_report(deploy, rtn_w4)
    say("      fused convs (median peak/RMS per output channel; share of weights RTN W4 rounds to zero): "
        + ", ".join(f"{k['layer']} {k['kernel']} {k['peak_to_rms']:.1f} {100 * k['rtn_w4_zeroed']:.0f}%"
                    for k in kernels))

    say("[4/5] exporting ONNX (fp32, INT8 Q/DQ for ONNX Runtime, W4) and timing ONNX Runtime CPU")
    exports = [("float (fused)", "FP32", deploy, "fp32", "fp32.onnx"),
               ("OBS W8 weights + calibrated activations", "INT8 QDQ", deploy, "int8", "int8_ort.onnx"),
               ("OBS overlap-aware (reparam order, tier groups)", "W4", overlap_w4, "w4", "w4.onnx")]
    for label, prec, model, p, fname in exports:
        rep = export_onnx(model, x_te[:8], out / fname, p, calib=calib, overwrite=True, progress=False)
        sess = ort_session(rep.path, threads=threads)
        name = sess.get_inputs()[0].name
        acc = float((sess.run(None, {name: x_te.numpy()})[0].argmax(1) == y_te.numpy()).mean())
        cpu = (None if (label, prec, "ONNX Runtime CPU") in SUITE_CASES  # the suite's record
               else _latency(lambda x: sess.run(None, {name: x.numpy()}), x1, timing))
        rows.append({"model": res.model.spec(), "method": label, "precision": prec, "backend": "ONNX Runtime CPU",
                     "cpu_latency_ms": cpu, "gpu_latency_ms": None, "accuracy": acc, "quantize_s": None,
                     "onnx": fname, "onnx_cosine_vs_torch": rep.cosine})

    say("[5/5] latency suite over every backend (unavailable ones are reported as skipped)")
    suite = {**SUITE_DEFAULTS, "threads": threads, "runs": timing["runs"], "warmup": timing["warmup"],
             "batch_sizes": [1] if fast else [1, 32],
             "models": [{"name": res.model.spec(), "path": str(out / "grown.safetensors"),
                         "backends": ["eager", "compile", "ort-cpu", "ort-cuda", "tensorrt", "triton"],
                         "precisions": ["fp32", "fp16", "int8", "w4a16"]}]}
    if fast:  # torch.compile's first compilation alone takes longer than the fast demo
        suite["models"][0]["backends"].remove("compile")
    bench = run_suite(suite, progress=progress)
    _from_suite(rows, bench)
    front = pareto(rows)
    for r in rows:
        r["pareto"] = any(r is f for f in front)

    table = _table(rows) + "\n\n" + CPU_REFERENCE_NOTE
    say("\n" + table)
    skipped = [r for r in bench["rows"] if r["status"] == "skipped"]
    for r in {(r["backend"], r["precision"], r["reason"]) for r in skipped}:
        say(f"  skipped {r[0]} {r[1]}: {r[2]}")
    result = {"grown_spec": res.model.spec(), "grow_s": grow_s, "fuse_max_abs_diff": fuse_diff,
              "growth_events": [h["growth"] | {"epoch": h["epoch"]} for h in res.history if "growth" in h],
              "table": rows, "kernels": kernels, "timing": timing, "suite": bench, "fast": fast}
    write_json(out / "results.json", result)
    write_text(out / "results.md", "# adagrow demo\n\n" + table + "\n\n## Fused kernels\n\n" + _kernel_table(kernels)
               + "\n\n## Latency suite\n\n" + markdown(bench))
    _plot(rows, out / "accuracy_vs_latency.png")
    say(f"\nwrote {out}/: results.json, results.md, accuracy_vs_latency.png, grown.safetensors, "
        "digits_w4_overlap.safetensors, fp32.onnx, int8_ort.onnx, w4.onnx")
    return result


def _table(rows: list[dict]) -> str:
    lines = ["| model | method | precision | backend | CPU latency b1 (ms) | GPU latency b1 (ms) | accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        gpu = f"{r['gpu_latency_ms']:.3f}" if r["gpu_latency_ms"] is not None else "n/a (no GPU)"
        suite = " (suite)" if "latency_from" in r else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['precision']} | {r['backend']} | "
                     f"{r['cpu_latency_ms']:.3f}{suite} | {gpu} | {100 * r['accuracy']:.2f}% |")
    return "\n".join(lines)


def _kernel_table(kernels: list[dict[str, Any]]) -> str:
    lines = ["| layer | kernel | peak / RMS (median over channels) | centre tap is the peak | RTN W4 rounds to zero |",
             "|---|---|---|---|---|"]
    lines += [f"| {k['layer']} | {k['kernel']} | {k['peak_to_rms']:.1f} | {100 * k['centre_is_peak']:.0f}% | "
              f"{100 * k['rtn_w4_zeroed']:.0f}% |" for k in kernels]
    return "\n".join(lines)
