"""Quantization quality on a fused re-parameterized CNN (bundled digits, CPU).

Trains RepCNN (5x5 RepConv2d blocks with 8 branch types) on scikit-learn's digits, fuses it,
then quantizes the fused 5x5 blocks with RTN and OBS (each order) under each group mode
(per-channel, g128, g32, position, tier) at W4, W3 and W2. The stem and the classifier stay
float (common practice; they are not fused multi-branch convs). Reports, per configuration:

- ``rel_err``: mean over the fused 5x5 convs of ``||conv(X, W - W_hat)|| / ||conv(X, W)||``, where
  X is each layer's input inside the quantized model on the test set (what OBS minimises);
- ``rel_mse``: the same with squared norms (relative MSE, ``rel_err**2`` per layer, then the mean);
- ``acc``: end-to-end test accuracy; ``time_s``: wall time of ``quantize()``;
- ``scales_per_1k``: scale rows stored per 1000 quantized weights.

OBS runs without the float target (``float_target=False``): ``rel_err`` is the layer objective
OBS minimises on the quantized prefix's inputs, which the float target deliberately trades for
the float model's outputs, so it would not compare orders and groups fairly.

Usage: ``python benchmarks/quant_quality.py [--bits 4 3 2] [--out PATH]``
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
import torch.nn.functional as F

from adagrow import __version__
from adagrow.files import write_json
from adagrow.compress import QuantConfig, QuantConv2d, quantize
from adagrow.data import digits
from adagrow.grow.nets import RepCNN
from adagrow.grow.reparam import reparameterize
from adagrow.grow.train import accuracy, fit

METHODS = [("rtn", "none"), ("obs", "none"), ("obs", "act"), ("obs", "reparam"), ("obs", "reparam-dynamic")]
GROUPS = [-1, 128, 32, "position", "tier"]


def layer_inputs(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of the named layers in one forward pass of ``model``."""
    got: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, i[0]))
             for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return got


@torch.no_grad()
def relative_errors(deploy: torch.nn.Module, qmodel: torch.nn.Module, names: list[str],
                    x: torch.Tensor) -> dict[str, float]:
    inputs = layer_inputs(qmodel, names, x)
    out = {}
    for n in names:
        conv, qconv = deploy.get_submodule(n), qmodel.get_submodule(n)
        kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
        ref = F.conv2d(inputs[n], conv.weight, **kw)
        err = F.conv2d(inputs[n], conv.weight - qconv.dequantize(), **kw)
        out[n] = float(err.norm() / ref.norm())
    return out


def scales_per_1k(qmodel: torch.nn.Module) -> float:
    mods = [m for m in qmodel.modules() if isinstance(m, QuantConv2d)]
    n_scales = sum(m.scales.numel() for m in mods)
    n_weights = sum(m.geo.out_features * m.geo.k for m in mods)
    return 1000.0 * n_scales / n_weights


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--calib", type=int, default=512, help="calibration images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quant_quality_cpu.json")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = digits(size=16, seed=args.seed)
    t0 = time.perf_counter()
    model = fit(RepCNN(), x_tr, y_tr, epochs=args.epochs, lr=0.05, seed=args.seed, progress=False)
    train_s = time.perf_counter() - t0
    deploy = reparameterize(model)
    names = [n for n, m in deploy.named_modules()
             if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (5, 5)]
    float_acc = accuracy(deploy, x_te, y_te)
    calib = x_tr[: args.calib].split(128)
    print(f"RepCNN trained in {train_s:.1f}s: float acc {float_acc:.4f}; fused 5x5 convs: {names}")
    print(f"overlap map of {names[-1]}:\n{deploy.get_submodule(names[-1]).reparam_overlap}")

    rows = []
    header = (f"{'bits':>4} {'method':<20} {'groups':>8} {'rel_err':>9} {'rel_mse':>9} {'acc':>7} {'time_s':>7} "
              f"{'scales/1k':>9}")
    print(header)
    for bits in args.bits:
        for method, order in METHODS:
            for gs in GROUPS:
                cfg = QuantConfig(bits=bits, group_size=gs, method=method, order=order, float_target=False,
                                  skip=("features.0", "fc"))
                t0 = time.perf_counter()
                qmodel = quantize(deploy, calib, cfg, progress=False)
                q_s = time.perf_counter() - t0
                errs = relative_errors(deploy, qmodel, names, x_te)
                row = {"bits": bits, "method": method if method == "rtn" else f"obs-{order}",
                       "group_size": gs, "rel_err": sum(errs.values()) / len(errs),
                       "rel_mse": sum(e * e for e in errs.values()) / len(errs), "rel_err_per_layer": errs,
                       "acc": accuracy(qmodel, x_te, y_te), "time_s": q_s, "scales_per_1k": scales_per_1k(qmodel)}
                rows.append(row)
                print(f"{bits:>4} {row['method']:<20} {str(gs):>8} {row['rel_err']:>9.5f} {row['rel_mse']:>9.6f} "
                      f"{row['acc']:>7.4f} "
                      f"{q_s:>7.2f} {row['scales_per_1k']:>9.2f}", flush=True)

    def find(bits: int, method: str, gs) -> dict:
        return next(r for r in rows if r["bits"] == bits and r["method"] == method and r["group_size"] == gs)

    targets = []
    for bits in [b for b in args.bits if b in (4, 3)]:
        base = find(bits, "obs-act", 128)
        for method in ("obs-act", "obs-reparam", "obs-reparam-dynamic"):
            r = find(bits, method, "tier")
            fewer = r["scales_per_1k"] <= base["scales_per_1k"]
            t = {"bits": bits, "method": method, "groups": "tier",
                 "scales_ratio_vs_g128": r["scales_per_1k"] / base["scales_per_1k"]}
            for metric in ("rel_err", "rel_mse"):
                t[f"{metric}_ratio_vs_act_g128"] = r[metric] / base[metric]
                t[f"met_{metric}"] = t[f"{metric}_ratio_vs_act_g128"] <= 0.35 and fewer
            targets.append(t)
    print("\nTarget: tier groups <= 0.35x the error of act-order g128, with no more scales")
    for t in targets:
        print(f"  W{t['bits']} {t['method']:<20} scales x{t['scales_ratio_vs_g128']:.2f}; "
              + "; ".join(f"{m} x{t[f'{m}_ratio_vs_act_g128']:.3f} {'met' if t[f'met_{m}'] else 'NOT met'}"
                          for m in ("rel_err", "rel_mse")))
    slowest = max(r["time_s"] for r in rows)
    print(f"Target: whole-model quantization <= 30 s on {os.cpu_count()} cores: slowest {slowest:.1f}s "
          f"({'met' if slowest <= 30 else 'NOT met'})")

    result = {
        "benchmark": "quant_quality", "date": dt.date.today().isoformat(),
        "command": "python benchmarks/quant_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": "cpu",
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "adagrow": __version__},
        "model": {"arch": model.adagrow_arch(), "float_acc": float_acc, "train_s": train_s, "fused_convs": names,
                  "skipped": ["features.0 (stem)", "fc (classifier)"], "calib_images": args.calib},
        "rows": rows, "targets": targets, "max_quantize_s": slowest,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
