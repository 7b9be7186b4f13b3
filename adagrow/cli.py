"""The ``adagrow`` command line: grow, reparam, quantize, export, bench, demo."""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adagrow import __version__

DEFAULT_CALIB = 512  # quantize --calib: images, or lines of a --calib-text FILE (the bundled text: all)
DATA_HELP = ("digits (bundled, default) | cluttered[:difficulty] (seeded, harder; difficulty in [0, 1], default 0.6) | "
             "cifar10:/path/to/cifar-10-batches-py | npz:/path/file.npz (arrays x, y)")


def _data(args: argparse.Namespace):
    from adagrow.data import load_dataset
    return load_dataset(args.data, args.size)


def _check_out(path: Path, overwrite: bool, folder: bool = False, source: str | None = None) -> None:
    """Refuse an output path before any work: existing without --overwrite, a folder where a file
    goes (or the reverse), under a file, or the command's own input ``source`` (even with --overwrite)."""
    if source is not None and path.exists() and Path(source).exists() and path.samefile(source):
        raise ValueError(f"--out {path} is the input {source}: write to another path (the input would be replaced)")
    if path.exists() and folder != path.is_dir():
        want, got = ("folder", "a file") if folder else ("file", "a directory")
        raise ValueError(f"{path} is {got}; give a {want} path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ValueError(f"{path}: {parent} is a file, not a folder")


def _check_input_shape(model, x, args: argparse.Namespace) -> None:
    """Data must have the input shape the checkpoint was grown on (e.g. --size)."""
    from adagrow.checks import input_shape_mismatch
    shape = input_shape_mismatch(model, x)
    if shape is not None:
        raise ValueError(f"{args.checkpoint} was grown on inputs {list(shape)}, but --data {args.data} --size "
                         f"{args.size} gives {list(x.shape[1:])}; pass --size {shape[-1]}")


def _positive(kind: type, zero: bool = False):
    """argparse type: a finite ``kind`` above 0 (at least 0 with ``zero``)."""
    what = f"{'non-negative' if zero else 'positive'} {kind.__name__}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what}, got {text!r}") from None
        if not ((value >= 0 if zero else value > 0) and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a {what}, got {text!r}")
        return value
    parse.__name__ = what
    return parse


def _obs_options(args: argparse.Namespace) -> dict[str, Any]:
    """The OBS refinements the command line sets (QuantConfig's defaults where it does not)."""
    opts: dict[str, Any] = {"bias_refit": args.bias_refit}
    if args.cd_passes is not None:
        opts["cd_passes"] = args.cd_passes
    return opts


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(v) for v in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) not in (3, 4) or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected 3 or 4 positive channel counts such as 64,96,128, got {text!r}")
    return widths


def _group_size(text: str) -> int | str:
    if text in ("tier", "position"):
        return text
    try:
        gs = int(text)
    except ValueError:
        gs = 0
    if gs != -1 and (gs <= 0 or gs % 8):
        raise argparse.ArgumentTypeError(f"expected -1, a positive multiple of 8, 'position' or 'tier', got {text!r}")
    return gs


def _folder_name(text: str) -> str:
    from adagrow.compress.export.triton_repo import SAFE_NAME
    if not SAFE_NAME.fullmatch(text) or text.startswith("."):
        raise argparse.ArgumentTypeError(f"expected a plain folder name (letters, digits, '_', '.', '-'), got {text!r}")
    return text


def cmd_grow(args: argparse.Namespace) -> dict[str, Any]:
    from adagrow.data import train_val_split
    from adagrow.grow import DeployBudget, GrowingCNN, GrowingTransformer, GrowthConfig, grow, save_grown
    out = Path(args.out)
    _check_out(out, args.overwrite)
    x_tr, y_tr, _, _ = _data(args)  # growth decisions read a validation split of the training data
    fit, val = train_val_split(x_tr, y_tr, args.val_fraction, args.seed)
    if args.family == "vit":
        if args.widths:
            raise ValueError("--widths applies to the CNN families (a ViT grows heads and layers)")
        model = GrowingTransformer("vit", img_size=x_tr.shape[-1], in_channels=x_tr.shape[1],
                                   num_classes=int(y_tr.max()) + 1, patch=4)
    else:
        model = GrowingCNN(args.family, widths=args.widths, in_channels=x_tr.shape[1],
                           num_classes=int(y_tr.max()) + 1)
    stop = int(args.stop) if args.stop.isdigit() else args.stop
    limits = {"params": args.budget_params, "macs": args.budget_macs, "latency_ms": args.budget_latency_ms}
    budget = DeployBudget(**limits, backend=args.backend) if any(v is not None for v in limits.values()) else None
    config = GrowthConfig(stop=stop, budget=budget, preserve=args.preserve, retrain=args.retrain,
                          seed=args.seed, interval=args.interval)
    res = grow(model, fit, val, args.epochs, config, lr=args.lr, progress=not args.quiet)
    spec = res.model.spec()
    reached = not isinstance(stop, str) or stop in ("auto", "budget", spec)
    if not reached:
        msg = (f"--stop {stop} not reached in {args.epochs} epochs: the model grew to {spec}; "
               "train longer with --epochs")
        if args.strict:
            raise RuntimeError(msg + "; nothing written (--strict)")
        print(f"adagrow grow: warning: {msg}", file=sys.stderr)
    save_grown(res.model, out, overwrite=args.overwrite)
    deploy, train = res.model.param_counts()
    return {"spec": spec, "stop_reached": reached, "val_acc": res.history[-1]["val_acc"], "deploy_params": deploy,
            "train_params": train, "out": str(out), "retrained": args.retrain,
            "growth": [h["growth"] | {"epoch": h["epoch"], "step": h["step"]} for h in res.history if "growth" in h]}


def cmd_reparam(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from adagrow.grow import load_grown, reparameterize, save_grown
    out = Path(args.out)
    _check_out(out, args.overwrite, source=args.checkpoint)
    model = load_grown(args.checkpoint)
    if getattr(model, "adagrow_deploy", False):
        raise ValueError(f"{args.checkpoint} is already in deploy form")
    deploy = reparameterize(model)
    x = _data(args)[2][:64]
    _check_input_shape(model, x, args)
    with torch.no_grad():
        diff = float((deploy(x) - model(x)).abs().max())
    save_grown(model, out, overwrite=args.overwrite, deploy=True)
    return {"out": str(out), "max_abs_diff_vs_train_form": diff, "spec": model.spec()}


def cmd_quantize(args: argparse.Namespace) -> dict[str, Any]:
    import time
    from adagrow.compress import QuantConfig, quantize, save_quantized
    if args.hf:
        return _quantize_hf(args)
    if args.checkpoint is None:
        raise ValueError("give a grown/deploy CHECKPOINT, or --hf DIR for a Hugging Face model")
    if args.calib_text or args.format is not None:
        raise ValueError("--calib-text and --format apply to Hugging Face models (--hf DIR)")
    from adagrow.grow import load_deploy
    from adagrow.grow.train import accuracy
    out = Path(args.out)
    _check_out(out, args.overwrite, source=args.checkpoint)
    cfg = QuantConfig(bits=args.bits, group_size=args.group_size or "tier", order=args.order, method=args.method,
                      sym=bool(args.sym), mse=args.mse, float_target=args.float_target,
                      **_obs_options(args),
                      skip=tuple(args.skip)).validate()
    deploy = load_deploy(args.checkpoint)
    x_tr, _, x_te, y_te = _data(args)
    _check_input_shape(deploy, x_tr, args)
    t0 = time.perf_counter()
    qmodel = quantize(deploy, x_tr[: args.calib or DEFAULT_CALIB].split(128), cfg, progress=not args.quiet)
    q_s = time.perf_counter() - t0
    save_quantized(qmodel, out, overwrite=args.overwrite)
    return {"out": str(out), "float_acc": accuracy(deploy, x_te, y_te), "quant_acc": accuracy(qmodel, x_te, y_te),
            "quantize_s": q_s, "config": qmodel.adagrow_quant["config"]}


def _hf_format(args: argparse.Namespace) -> str:
    """``--format``, or by default: adagrow's file for an OUT ending in .safetensors, else a
    compressed-tensors folder (``from_pretrained`` loads it)."""
    if args.format is not None:
        return args.format
    return "adagrow" if str(args.out).endswith(".safetensors") else "compressed-tensors"


def _quantize_hf(args: argparse.Namespace) -> dict[str, Any]:
    """A Hugging Face model folder (or GGUF file), calibrated on a text file, written as
    compressed-tensors / GPTQ (a save_pretrained-style folder) or adagrow's own checkpoint (a
    .safetensors file). Server formats default to symmetric weights (transformers loads those;
    see docs/llm.md); causal LMs are scored by perplexity on held-out text."""
    import time
    from adagrow.compress import QuantConfig, quantize, save_compressed, save_quantized
    from adagrow.hf import is_causal_lm, lm_windows, load_hf, read_sentences, server_group_size
    if args.checkpoint is not None:
        raise ValueError("give either a CHECKPOINT or --hf DIR, not both")
    fmt = _hf_format(args)
    out = Path(args.out)
    _check_out(out, args.overwrite, folder=fmt != "adagrow", source=args.hf)
    sym = fmt != "adagrow" if args.sym is None else args.sym
    gs = 128 if args.group_size is None else args.group_size
    if isinstance(gs, str):
        raise ValueError(f"--group-size {gs} groups conv kernel positions; Hugging Face Linear layers take -1 or "
                         "a multiple of 8")
    cfg = QuantConfig(bits=args.bits, group_size=gs, order=args.order, method=args.method, sym=sym,
                      mse=args.mse, float_target=args.float_target, **_obs_options(args),
                      skip=tuple(args.skip)).validate()
    own_text = read_sentences(args.calib_text) if args.calib_text else None
    model, tokenizer = load_hf(args.hf, progress=not args.quiet)
    causal = is_causal_lm(model)
    if own_text is not None:
        sentences, source = own_text[: args.calib or DEFAULT_CALIB], str(args.calib_text)
    else:  # English models: the bundled text; other models want their own
        sentences, source = _bundled_calibration(causal, args.calib)
        if not args.quiet:
            print(f"calibrating on {source}: pass --calib-text FILE for text from your model's domain or language",
                  file=sys.stderr)
    note = None
    if fmt != "adagrow":  # server formats need whole groups: every quantized layer's K checked now, before any work
        cfg.group_size, note = server_group_size(model, cfg, fmt, explicit=args.group_size is not None)
    notes = [note] if note else []
    if fmt == "compressed-tensors" and not sym:
        notes.append("asymmetric compressed-tensors: vLLM and compressed-tensors' decompressor load it, "
                     "transformers' from_pretrained does not (it expects an unpacked zero point); omit --asym for a "
                     "folder transformers loads")
    if not args.quiet:
        for n in notes:
            print(f"adagrow quantize: note: {n}", file=sys.stderr)
    batches = lm_windows(tokenizer, sentences, args.seq_len) if causal else _sentence_batches(tokenizer, sentences)
    t0 = time.perf_counter()
    qmodel = quantize(model, batches, cfg, progress=not args.quiet)
    q_s = time.perf_counter() - t0
    if fmt == "adagrow":
        save_quantized(qmodel, out, overwrite=args.overwrite)
    else:
        save_compressed(qmodel, out, fmt, overwrite=args.overwrite, tokenizer=tokenizer)
    result = {"out": str(out), "format": fmt, "quantize_s": q_s, "calib_text": source,
              "calib_sentences": len(sentences),
              "calib_tokens": sum(int(b["attention_mask"].sum()) if "attention_mask" in b
                                 else b["input_ids"].numel() for b in batches),
              "notes": notes}
    result.update(_lm_quality(model, qmodel, tokenizer, args) if causal else _encoder_quality(model, qmodel, batches))
    result.update(quantized_layers=len(qmodel.adagrow_quant["layers"]), float_layers=qmodel.adagrow_quant["float"],
                  config=qmodel.adagrow_quant["config"])
    return result


def _bundled_calibration(causal: bool, n: int | None) -> tuple[list[str], str]:
    """The first ``n`` lines (``None``: all) of the bundled English calibration text and its name:
    for a causal LM the 256 paragraphs of ``CALIBRATION_PROSE`` (SmolLM2-135M W4 g128 at 21.5k of
    their tokens: held-out perplexity increase 0.184x RTN's, against 0.334x on 7,168 tokens of the
    sentences; docs/llm.md), for an encoder the 544 sentences of ``CALIBRATION`` then those
    paragraphs (all-MiniLM-L6-v2 W4 g128 asymmetric held-out cosine 0.9919 on sentences and 0.9918
    on prose, the CLI's symmetric default 0.99126 and 0.99078; calibrated on the sentences alone
    0.9921 and 0.966, on the paragraphs alone 0.9858 and 0.9907)."""
    from adagrow.hf_text import CALIBRATION, CALIBRATION_PROSE, calibration_text
    lines = CALIBRATION_PROSE if causal else calibration_text("both")
    name = (f"adagrow.hf_text.CALIBRATION_PROSE ({len(CALIBRATION_PROSE)} English paragraphs)" if causal else
            f"adagrow.hf_text.calibration_text('both') ({len(CALIBRATION)} English sentences, then "
            f"{len(CALIBRATION_PROSE)} paragraphs)")
    if n is not None and n < len(lines):
        name = f"the first {n} lines of {name}"
    return lines[:n], name


def _sentence_batches(tokenizer, sentences: list[str]) -> list:
    from adagrow.hf import tokenize
    return tokenize(tokenizer, sentences)


def _encoder_quality(model, qmodel, batches: list) -> dict[str, Any]:
    from adagrow.hf import cosine_to, embed
    return {"calib_embedding_cosine": cosine_to(embed(model, batches), embed(qmodel, batches))}


def _lm_quality(model, qmodel, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    """Perplexity of the float and quantized LM on adagrow's held-out English prose."""
    from adagrow.eval import perplexity
    from adagrow.hf_text import HELD_OUT_PROSE
    ids = tokenizer("\n".join(HELD_OUT_PROSE), return_tensors="pt")["input_ids"]
    ppl = {k: perplexity(m, ids, window=args.seq_len, stride=args.seq_len // 2) for k, m in
           (("float", model), ("quantized", qmodel))}
    return {"held_out": "adagrow.hf_text.HELD_OUT_PROSE", "held_out_tokens": ids.shape[1], "float_ppl": ppl["float"],
            "quant_ppl": ppl["quantized"]}


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    """Every output is checked before any work, and written only once every step has succeeded."""
    import tempfile
    from adagrow.bench import model_source
    from adagrow.compress import load_quantized
    from adagrow.compress.export import build_engine, export_onnx, export_triton_repository
    from adagrow.files import atomic_write
    from adagrow.grow import load_deploy
    from adagrow.hf import is_causal_lm
    out = Path(args.out)
    _check_out(out, args.overwrite)
    if args.hf:
        return _export_hf_lm(args)
    if args.checkpoint is None:
        raise ValueError("give a grown/deploy/quantized CHECKPOINT, or --hf DIR for a Hugging Face causal LM")
    if args.engine:
        from adagrow.compress.export.tensorrt import import_tensorrt
        _check_out(Path(args.engine), args.overwrite)
        import_tensorrt()  # TensorRT and a GPU, or a clear error now
    if args.triton_repo:
        _check_out(Path(args.triton_repo) / args.name, args.overwrite, folder=True)
    model = load_quantized(args.checkpoint) if model_source(args.checkpoint) == "quantized" else load_deploy(args.checkpoint)
    if is_causal_lm(model):
        return _export_lm(model, args)
    x_tr, _, x_te, _ = _data(args)
    _check_input_shape(model, x_te, args)
    result: dict[str, Any] = {"out": str(out)}
    with tempfile.TemporaryDirectory(prefix="adagrow-export-") as tmp:
        rep = export_onnx(model, x_te[:8], Path(tmp) / "model.onnx", args.precision,
                          calib=x_tr[: args.calib].split(64), target=args.target, calib_method=args.calib_method,
                          progress=not args.quiet)
        result.update(precision=rep.precision, max_abs_diff=rep.max_abs_diff, cosine=rep.cosine, notes=rep.notes)
        engine = build_engine(rep.path, Path(tmp) / "model.plan") if args.engine else None
        if args.triton_repo:
            result["triton_model"] = str(export_triton_repository(
                args.triton_repo, args.name, rep.path, engine, kind="KIND_GPU" if engine else "KIND_CPU",
                overwrite=args.overwrite))
        for src, dest in ((Path(rep.path), out), (engine, args.engine)):
            if src is not None:
                atomic_write(dest, lambda tmp_path, src=src: shutil.copyfile(src, tmp_path))
    if args.engine:
        result["engine"] = str(args.engine)
    return result


def _export_hf_lm(args: argparse.Namespace) -> dict[str, Any]:
    """``--hf DIR``: a float causal LM (folder or .gguf) at fp32, or a compressed-tensors folder
    written by ``adagrow quantize --hf`` at w4 (its 4-bit Linear layers repacked exactly)."""
    from adagrow.compress.hf_kernels import repack_compressed
    from adagrow.hf import is_causal_lm, load_hf
    if args.checkpoint is not None:
        raise ValueError("give either a CHECKPOINT or --hf DIR, not both")
    model, _ = load_hf(args.hf, progress=not args.quiet)
    if not is_causal_lm(model):
        raise ValueError(f"--hf {args.hf}: {type(model).__name__} is not a causal LM; export encoders with the Python "
                         "API (adagrow.compress.export.export_onnx)")
    repacked = repack_compressed(model)
    if args.precision == "w4" and not repacked:
        raise ValueError(f"--hf {args.hf} holds a float model: quantize it first (adagrow quantize --hf {args.hf} "
                         "--out q), then export the folder q with --precision w4")
    if repacked and args.precision != "w4":
        raise ValueError(f"--hf {args.hf} holds a 4-bit quantized model: export it with --precision w4")
    return _export_lm(model, args)


def _export_lm(model, args: argparse.Namespace, prompts: int = 3, new_tokens: int = 16) -> dict[str, Any]:
    """A causal LM: ONNX with a KV cache (docs/llm.md), then greedy tokens from ONNX Runtime compared
    with the PyTorch model's on ``prompts`` prompts of 8 random token ids (seed 0); PyTorch runs in
    float32 numerics (its CPU default rounds a W4 decode step's activations to bfloat16, which can
    change a greedy token on its own)."""
    import numpy as np
    import torch
    from adagrow.compress import use_bf16_activations
    from adagrow.compress.export import export_decoder_onnx, greedy_generate, torch_greedy_generate
    if args.engine or args.triton_repo:
        raise ValueError("--engine and --triton-repo take image models; a causal LM exports to ONNX (with a KV cache)")
    rep = export_decoder_onnx(model, args.out, args.precision, overwrite=args.overwrite, progress=not args.quiet)
    ids = torch.randint(0, int(model.config.vocab_size), (prompts, 8), generator=torch.Generator().manual_seed(0))
    quantized = use_bf16_activations(model, False)
    try:
        same = sum(np.array_equal(greedy_generate(rep.path, p[None].numpy(), new_tokens).tokens,
                                  torch_greedy_generate(model, p[None], new_tokens).tokens) for p in ids)
    finally:
        if quantized:
            use_bf16_activations(model, None)
    against = "the PyTorch model in float32 numerics" + (
        "; int8 weights against the float model: continuations may drift (docs/llm.md)"
        if rep.precision == "int8" else "")
    return {"out": rep.path, "precision": rep.precision, "kv_cache": True, "inputs": rep.inputs[:4] + ["..."],
            "outputs": rep.outputs[:2] + ["..."], "max_abs_diff": rep.max_abs_diff, "cosine": rep.cosine,
            "greedy_identical": f"{same}/{prompts} prompts of 8 random token ids, {new_tokens} new tokens, "
                                f"against {against}",
            "notes": rep.notes}


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from adagrow.bench import check_results, compare, load_suite, markdown, run_suite
    suite = load_suite(args.suite)
    old = None
    if args.compare:
        try:
            old = json.loads(Path(args.compare).read_text())
        except (OSError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"cannot read --compare file {args.compare}: {exc}") from exc
        check_results(old, f"--compare file {args.compare}")
    from adagrow.files import write_json, write_text
    for p in (args.out, args.markdown):
        if p:
            _check_out(Path(p), args.overwrite)
    result = run_suite(suite, progress=not args.quiet)
    if args.out:
        write_json(args.out, result)
    md = markdown(result)
    if args.markdown:
        write_text(args.markdown, md)
    if not args.json:
        print(md)
    if old is not None:
        result["compare"] = compare(result, old)
        if not args.json:
            print("\n".join(result["compare"]) or "no case in common with the --compare run")
    return result


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    _check_out(Path(args.out), True, folder=True)  # run_demo / run_minilm_demo refuse a non-empty folder
    if args.model == "minilm":
        from adagrow.demo_minilm import run_minilm_demo
        return run_minilm_demo(Path(args.out), fast=args.fast, overwrite=args.overwrite, progress=not args.quiet)
    if args.model == "smollm2":
        from adagrow.demo_llm import run_llm_demo
        return run_llm_demo(Path(args.out), fast=args.fast, overwrite=args.overwrite, progress=not args.quiet)
    from adagrow.demo import run_demo
    return run_demo(Path(args.out), fast=args.fast, overwrite=args.overwrite, progress=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress output")
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    common.add_argument("--overwrite", action="store_true", help="replace existing output files")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data", default="digits", help=DATA_HELP)
    data.add_argument("--size", type=_positive(int), default=16, help="resize images to size x size (default 16)")

    parser = argparse.ArgumentParser(prog="adagrow", description="Grow, reparameterize, quantize (OBS, "
                                     "overlap-aware) and deploy PyTorch models.")
    parser.add_argument("--version", action="version", version=f"adagrow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("grow", parents=[common, data], help="grow a model while training; writes a grown checkpoint",
                       description="Reads --data, grows a CNN family or a ViT from its empty start, writes OUT "
                       "(safetensors + architecture record).")
    p.add_argument("--family", default="vgg", choices=["vgg", "resnet", "bottleneck", "mobilenetv3", "vit"])
    p.add_argument("--widths", type=_widths, default=None, help="CNN channels per stage, e.g. 64,96,128 "
                   "(default: the family's)")
    p.add_argument("--epochs", type=_positive(int), default=15)
    p.add_argument("--stop", default="auto", help="auto | budget (grow until a --budget-* limit) | an "
                   "architecture spec (VGG-2-3-2, ViT-D4-H6) | a deploy-parameter budget (int)")
    p.add_argument("--interval", type=_positive(int), default=None,
                   help="optimizer steps between growth steps (default: 3 epochs for CNNs, 5 for Transformers)")
    p.add_argument("--lr", type=_positive(float), default=None)
    p.add_argument("--preserve", action="store_true", help="function-preserving growth (default: the "
                   "thesis' init for new layers, branches and heads)")
    p.add_argument("--val-fraction", type=float, default=0.15, help="validation split carved from the training "
                   "data for growth decisions (the test split is never read)")
    p.add_argument("--budget-params", type=_positive(int), help="stop before the deploy model exceeds this many "
                   "parameters")
    p.add_argument("--budget-macs", type=_positive(int), help="... this many multiply-accumulates at batch 1")
    p.add_argument("--budget-latency-ms", type=_positive(float), help="... this batch-1 latency on --backend "
                   "(1 thread)")
    p.add_argument("--backend", default="ort-cpu", choices=["ort-cpu", "torch"], help="latency budget backend: "
                   "ONNX Runtime CPU on the fp32 export, or the deploy PyTorch model")
    p.add_argument("--retrain", action="store_true", help="grow to find the architecture, then train it "
                   "from scratch for the same epochs")
    p.add_argument("--strict", action="store_true", help="fail (exit 2, write nothing) if --stop is not reached")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="grown checkpoint to write (.safetensors)")
    p.set_defaults(func=cmd_grow)

    p = sub.add_parser("reparam", parents=[common, data], help="fuse every RepConv2d; writes a deploy checkpoint",
                       description="Reads a grown checkpoint, fuses its re-parameterizable convs, checks the "
                       "outputs on --data, writes the deploy checkpoint OUT.")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_reparam)

    p = sub.add_parser("quantize", parents=[common, data], help="OBS/RTN quantization; writes a quantized checkpoint",
                       description="Reads a grown or deploy checkpoint and --data (calibration and accuracy), "
                       "writes the quantized checkpoint OUT.")
    p.add_argument("checkpoint", nargs="?", help="grown or deploy checkpoint (or use --hf)")
    p.add_argument("--hf", metavar="DIR", help="a Hugging Face model folder (or a .gguf file) instead of CHECKPOINT "
                   "(needs the hf extra)")
    p.add_argument("--calib-text", metavar="FILE", help="with --hf: calibration text, one sentence or passage per "
                   "line (default: adagrow's bundled English text: 256 paragraphs, ~28.4k SmolLM2 tokens, for a causal "
                   "LM; 544 sentences then those paragraphs for an encoder)")
    p.add_argument("--format", default=None, choices=["adagrow", "compressed-tensors", "gptq"],
                   help="with --hf: adagrow (OUT is a .safetensors file) or a server folder OUT (default: adagrow "
                        "when OUT ends in .safetensors, else compressed-tensors)")
    p.add_argument("--seq-len", type=_positive(int), default=256, help="with --hf on a causal LM: calibration "
                   "window and perplexity window (tokens)")
    p.add_argument("--bits", type=int, default=4, choices=range(2, 9), metavar="{2..8}")
    p.add_argument("--group-size", type=_group_size, default=None,
                   help="-1 | multiple of 8 | position | tier (default: tier; 128 with --hf)")
    p.add_argument("--order", default="reparam", choices=["none", "act", "reparam", "reparam-dynamic"])
    p.add_argument("--method", default="obs", choices=["obs", "rtn"])
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", action="store_true", default=None, help="symmetric weights (default with a server "
                     "--format: transformers loads those)")
    sym.add_argument("--asym", dest="sym", action="store_false", default=None,
                     help="asymmetric weights (default otherwise)")
    p.add_argument("--mse", action="store_true", help="search the clipping ratio")
    p.add_argument("--no-float-target", dest="float_target", action="store_false",
                   help="fit each layer to its own output on the quantized prefix's inputs, not to the float "
                        "model's (faster, less accurate)")
    p.add_argument("--no-bias-refit", dest="bias_refit", action="store_false",
                   help="keep each layer's float bias (default: OBS on the centred statistics, the bias refitted "
                        "to the float layer's mean output)")
    p.add_argument("--cd-passes", type=_positive(int, zero=True), default=None,
                   help="coordinate-descent sweeps after OBS (default 0: OBS alone; docs/llm.md)")
    p.add_argument("--skip", nargs="*", default=[], help="layer names / patterns kept in float")
    p.add_argument("--calib", type=_positive(int), default=None, help="calibration images, or with --hf lines of "
                   f"the calibration text (first N; default: {DEFAULT_CALIB} images or lines of --calib-text FILE, "
                   "all of the bundled text)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", parents=[common, data], help="export ONNX (and a TensorRT engine / Triton repo)",
                       description="Reads a grown/deploy checkpoint (fp32, fp16, int8) or a 4-bit quantized "
                       "checkpoint (w4), writes OUT (.onnx), optionally an engine and a Triton model folder. A causal "
                       "LM (--hf DIR, or a quantized LM checkpoint) exports with a KV cache (fp32, int8, w4).")
    p.add_argument("checkpoint", nargs="?", help="grown, deploy or quantized checkpoint (or use --hf)")
    p.add_argument("--hf", metavar="DIR", help="a Hugging Face causal LM instead of CHECKPOINT: a float folder or .gguf "
                   "file (fp32, int8), or a folder written by adagrow quantize --hf (w4); exported with past_key_values / "
                   "present (docs/llm.md)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "w4"])
    p.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    p.add_argument("--calib-method", default="mse", choices=["minmax", "percentile", "entropy", "mse"])
    p.add_argument("--calib", type=_positive(int), default=256, help="calibration images (first N)")
    p.add_argument("--out", required=True)
    p.add_argument("--engine", help="also build a TensorRT engine here (needs tensorrt and a GPU)")
    p.add_argument("--triton-repo", help="also write a Triton Inference Server model folder under this repo")
    p.add_argument("--name", type=_folder_name, default="model", help="model name in the Triton repository")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", parents=[common], help="run a latency suite (TOML); writes JSON and markdown",
                       description="Reads SUITE.toml (models, backends, precisions, batch sizes, warm-up, runs, "
                       "threads), prints a markdown table, writes --out JSON / --markdown; unavailable backends "
                       "are reported as skipped with the reason.")
    p.add_argument("suite")
    p.add_argument("--out", help="results JSON")
    p.add_argument("--markdown", help="results markdown table")
    p.add_argument("--compare", help="an earlier results JSON: print new/old ratios")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", parents=[common], help="the whole pipeline on the bundled digits (about 2 min on 2 CPU cores; "
                       "--fast under 1 min)",
                       description="Grows a CNN on the bundled digits, reparameterizes, quantizes (RTN vs OBS vs "
                       "overlap-aware OBS at W8/W4/W3), exports ONNX, times every available backend, writes OUT/.")
    p.add_argument("--model", default="cnn", choices=["cnn", "minilm", "smollm2"], help="cnn: grow on digits (default); "
                   "minilm: quantize the pretrained all-MiniLM-L6-v2 sentence encoder (needs the hf extra); smollm2: "
                   "quantize the SmolLM2-135M-Instruct decoder LLM at the defaults, perplexity and greedy samples of "
                   "float / RTN / adagrow (needs the llm extra)")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--fast", action="store_true", help="tiny settings (about a minute)")
    p.set_defaults(func=cmd_demo)
    return parser


# ValueError/TypeError: bad input; OSError: missing files, existing outputs, disk full, permissions;
# ImportError: an optional dependency; RuntimeError: torch / ONNX Runtime refusing a model;
# MemoryError; safetensors' SafetensorError (unreadable files, failed writes).
_LIBRARY_ERRORS = (ValueError, TypeError, OSError, ImportError, RuntimeError, MemoryError)


def _one_line(exc: BaseException) -> str:
    """The error's message on one line (its type when it has none)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, MemoryError) or not text:
        text = f"{type(exc).__name__}{': ' + text if text else ''}"
    return text if len(text) <= 2000 else text[:2000] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except Exception as exc:  # noqa: BLE001 - every library error is one line and exit 2, never a traceback
        from safetensors import SafetensorError
        if not isinstance(exc, (*_LIBRARY_ERRORS, SafetensorError)):
            raise
        print(f"adagrow {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    elif args.command == "demo" and args.quiet:  # the tables went unprinted with the progress
        name = {"cnn": "results", "minilm": "minilm", "smollm2": "llm"}[args.model]
        print(f"adagrow demo: results in {Path(args.out) / name}.md and {name}.json")
    elif args.command not in ("bench", "demo"):
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
