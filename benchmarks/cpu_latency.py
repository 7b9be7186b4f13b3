"""Batch-1 PyTorch CPU latency of W4 models against their float originals (the CPU fast path).

Three models, each float and W4 (RTN; latency does not depend on the method), float32 and
bfloat16 activations:

- ``minilm``: all-MiniLM-L6-v2 (the bundled sentence encoder), one sequence of ``--seq`` tokens;
- ``decoder-linears``: the Linears of ``--layers`` SmolLM2-135M decoder layers (hidden 576,
  intermediate 1536, 9 query / 3 key-value heads of 64: q/o 576x576, k/v 576x192, gate/up
  576x1536, down 1536x576) applied to one token, i.e. the Linear work of one decode step;
- ``conv-cnn``: a fused RepCNN (5x5 deploy kernels, widths 32/64) on one 16x16 image, W4
  per-channel, with the dequantized-weight cache on (the default) and off.

Every variant of a model is timed with :func:`adagrow.bench.measure` (warm-up, median of
``--runs`` calls, ``--threads`` threads) in ``--rounds`` interleaved rounds (float, W4, float, W4,
...) so load from other processes hits all variants alike; the figures are the median and the
minimum over rounds (on a shared machine the minimum is the less disturbed one).

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
from adagrow.bench import measure
from adagrow.compress import QuantConfig, quantize
from adagrow.files import write_json
from adagrow.grow.nets import RepCNN
from adagrow.grow.reparam import reparameterize

W4 = QuantConfig(bits=4, method="rtn", group_size=-1, linear_group_size=128)


def decoder_linears(layers: int) -> nn.Module:
    """The Linears of ``layers`` SmolLM2-135M decoder layers, applied in sequence to ``[1, 576]``
    (each output is projected back to 576 so the chain stays well defined)."""
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]

    class Step(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.ModuleList(nn.Linear(k, n, bias=False) for _ in range(layers) for k, n in shapes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for i in range(0, len(self.lin), len(shapes)):
                q, k, v, o, gate, up, down = self.lin[i:i + len(shapes)]
                h = x + o(q(x)) + (k(x).sum() + v(x).sum()) * 0  # q/k/v/o work of one token
                x = h + down(nn.functional.silu(gate(h)) * up(h))
            return x

    return Step().eval()


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


def four_ways(model: nn.Module, qmodel: nn.Module, call: Callable[[nn.Module, torch.dtype], object],
              rounds: int, runs: int, threads: int) -> dict:
    """Float and W4, float32 and bfloat16, interleaved; ratios against the float32 float model."""
    fb, qb = bf16(model), bf16(qmodel)
    f32, b16 = torch.float32, torch.bfloat16
    return timed_rounds({"float fp32": lambda: call(model, f32), "W4 fp32 (reference path)": lambda: call(qmodel, f32),
                         "float bf16": lambda: call(fb, b16), "W4 bf16 (int4 kernel)": lambda: call(qb, b16)},
                        rounds, runs, threads)


def minilm(seq: int, rounds: int, runs: int, threads: int) -> dict:
    from adagrow.hf import load_hf
    from adagrow.models import minilm_path
    model, _ = load_hf(minilm_path())
    ids = torch.randint(1000, 20000, (1, seq))
    calib = [{"input_ids": torch.randint(1000, 20000, (4, seq)),
              "attention_mask": torch.ones(4, seq, dtype=torch.long)}]
    qmodel = quantize(model, calib, W4, progress=False)
    return four_ways(model, qmodel, lambda m, _dtype: m(input_ids=ids), rounds, runs, threads)


def decoder(layers: int, rounds: int, runs: int, threads: int) -> dict:
    torch.manual_seed(0)
    model = decoder_linears(layers)
    qmodel = quantize(model, [torch.randn(16, 576)], W4, progress=False)
    x = torch.randn(1, 576)
    return four_ways(model, qmodel, lambda m, dtype: m(x.to(dtype)), rounds, runs, threads)


def conv_cnn(rounds: int, runs: int, threads: int) -> dict:
    torch.manual_seed(0)
    deploy = reparameterize(RepCNN().eval())
    x = torch.randn(1, 1, 16, 16)
    qmodel = quantize(deploy, [torch.randn(64, 1, 16, 16)], W4, progress=False)
    uncached = copy.deepcopy(qmodel)
    for m in uncached.modules():
        if hasattr(m, "cache_dequantized"):
            m.cache_dequantized = False
    return timed_rounds({"float fp32": lambda: deploy(x), "W4 fp32 (cached dequantized weight)": lambda: qmodel(x),
                         "W4 fp32 (no cache: reference path)": lambda: uncached(x)}, rounds, runs, threads)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seq", type=int, default=128, help="MiniLM sequence length")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (SmolLM2-135M has 30; the ratio does not depend on it)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_latency.json"))
    args = ap.parse_args(argv)
    cases = {"minilm": lambda: minilm(args.seq, args.rounds, args.runs, args.threads),
             "decoder-linears": lambda: decoder(args.layers, args.rounds, args.runs, args.threads),
             "conv-cnn": lambda: conv_cnn(args.rounds, args.runs, args.threads)}
    results = {}
    for name, run in cases.items():
        results[name] = run()
        for variant, r in results[name].items():
            print(f"{name:<16} {variant:<36} median {r['median_ms']:9.3f} ms  x{r['vs_first']:.2f}   "
                  f"min {r['min_ms']:9.3f} ms  x{r['min_vs_first']:.2f}", flush=True)
    result = {"benchmark": "cpu_latency", "date": dt.date.today().isoformat(),
              "command": "python benchmarks/cpu_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                          "adagrow": __version__, "load": "shared with other processes; variants interleaved"},
              "settings": vars(args) | {"w4": "RTN, Linear g128, conv per-channel", "batch": 1},
              "results": results}
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
