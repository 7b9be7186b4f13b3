"""Grown models vs fixed-size baselines on the bundled digits (CPU).

Each CNN family (VGG, ResNet basic, ResNet bottleneck, MobileNetV3-style) and a ViT is grown
from its "empty" start with automatic stopping, and fixed-size models of the same family are
trained from scratch with the same epoch budget and optimizer. Reported per model: test
accuracy, deploy parameters (RepConv2d fused), MACs at batch 1, CPU latency at batch 1 (eager
PyTorch on the deploy form, median of many runs) and training time.

Usage: ``python benchmarks/grow.py [--epochs 30] [--families vgg resnet ...]``
-> ``benchmarks/results/grow_cpu.json``
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import torch

from adagrow.data import digits
from adagrow.files import write_json
from adagrow.grow import FAMILIES, GrowingCNN, GrowingTransformer, GrowthConfig, grow, reparameterize
from adagrow.grow.cnn import flops
from adagrow.grow.train import accuracy

BASELINES = {"cnn": [(1, 1, 1), (2, 2, 2)], "vit": [(2, 2), (4, 4)]}  # depths / (depth, heads)


def latency_ms(model: torch.nn.Module, x: torch.Tensor, runs: int = 200) -> float:
    with torch.no_grad():
        for _ in range(20):
            model(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def measure(name: str, kind: str, model: torch.nn.Module, train_s: float, data, spec: str) -> dict:
    _, _, x_te, y_te = data
    deploy = reparameterize(model.eval())
    row = {"name": name, "kind": kind, "spec": spec, "accuracy": accuracy(deploy, x_te, y_te),
           "deploy_params": sum(p.numel() for p in deploy.parameters()), "macs_b1": flops(deploy, x_te[:1]),
           "latency_b1_ms": latency_ms(deploy, x_te[:1]), "train_s": train_s}
    print(f"  {name:<28} {spec:<22} acc {row['accuracy']:.4f} params {row['deploy_params']:>8} "
          f"MACs {row['macs_b1'] / 1e6:7.2f}M lat {row['latency_b1_ms']:6.3f} ms train {train_s:6.1f}s", flush=True)
    return row


def run(kind: str, make, baselines, epochs: int, data, lr: float | None) -> list[dict]:
    x_tr, y_tr, x_te, y_te = data
    rows = []
    torch.manual_seed(0)
    t0 = time.perf_counter()
    res = grow(make(None), (x_tr, y_tr), (x_te, y_te), epochs, GrowthConfig(stop="auto"), lr=lr, progress=False)
    row = measure("grown", kind, res.model, time.perf_counter() - t0, data, res.model.spec())
    row["growth_events"] = [{"epoch": h["epoch"], **h["growth"]} for h in res.history if "growth" in h]
    rows.append(row)
    for arch in baselines:
        torch.manual_seed(0)
        model = make(arch)
        t0 = time.perf_counter()
        # no growth: a spec equal to the model stops growth at once and the loop is plain training
        res = grow(model, (x_tr, y_tr), (x_te, y_te), epochs, GrowthConfig(stop=model.spec()), lr=lr, progress=False)
        rows.append(measure("fixed", kind, res.model, time.perf_counter() - t0, data, res.model.spec()))
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--families", nargs="+", default=[*FAMILIES, "vit"])
    ap.add_argument("--size", type=int, default=16, help="digits upsampled to size x size")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "grow_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    data = digits(size=args.size)
    rows = []
    for fam in args.families:
        print(f"{fam}:")
        if fam == "vit":
            def make(arch, fam=fam):
                d, h = arch or (1, 2)
                return GrowingTransformer("vit", dim=64, head_dim=16, heads=h, depth=d, mlp_per_head=64,
                                          img_size=args.size, patch=4)
            rows += run(fam, make, BASELINES["vit"], args.epochs, data, None)
        else:
            def make(arch, fam=fam):
                return GrowingCNN(fam, depths=arch)
            rows += run(fam, make, BASELINES["cnn"], args.epochs, data, 0.05)
    targets = []
    for fam in args.families:
        grown = next(r for r in rows if r["kind"] == fam and r["name"] == "grown")
        best = max((r for r in rows if r["kind"] == fam and r["name"] == "fixed"), key=lambda r: r["accuracy"])
        met = (grown["accuracy"] >= best["accuracy"] and grown["deploy_params"] * 3 <= best["deploy_params"]
               and grown["latency_b1_ms"] < best["latency_b1_ms"])
        targets.append({"family": fam, "grown": grown["spec"], "best_fixed": best["spec"],
                        "accuracy_delta": grown["accuracy"] - best["accuracy"],
                        "params_ratio": grown["deploy_params"] / best["deploy_params"],
                        "latency_ratio": grown["latency_b1_ms"] / best["latency_b1_ms"], "met": met})
    print("\nTarget: grown >= best fixed accuracy with <= 1/3 of its params and lower latency")
    for t in targets:
        print(f"  {t['family']:<12} {t['grown']:<20} vs {t['best_fixed']:<20} acc {t['accuracy_delta']:+.4f} "
              f"params x{t['params_ratio']:.2f} latency x{t['latency_ratio']:.2f}: {'met' if t['met'] else 'NOT met'}")
    result = {"benchmark": "grow", "date": dt.date.today().isoformat(),
              "command": "python benchmarks/grow.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
              "epochs": args.epochs, "input_size": args.size, "rows": rows, "targets": targets}
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
