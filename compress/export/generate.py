"""Greedy generation in ONNX Runtime on a KV-cache decoder export (:mod:`.decoder`): one prefill
run on the prompt with an empty cache, then one run per new token fed the previous ``present``
tensors as ``past_key_values``. Positions, padding and end-of-sequence handling follow
transformers' ``generate(do_sample=False)``, so the tokens can be compared one for one.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from .decoder import cache_argument, past_names, position_ids, present_names
from .verify import ort_session

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class Generation:
    """Tokens of a greedy generation and where the time went."""

    tokens: np.ndarray   # [B, prompt + new] int64: the prompt followed by the generated tokens
    new_tokens: int      # generated per row (fewer than asked when every row reached end-of-sequence)
    prefill_s: float     # the prompt's run (and its first token)
    decode_s: float      # the runs after it, one per further token

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens generated per second by the decode runs (all rows; the prefill's token excluded)."""
        steps = self.new_tokens - 1
        return self.tokens.shape[0] * steps / self.decode_s if steps and self.decode_s > 0 else float("nan")


def _cache_layout(sess: ort.InferenceSession) -> tuple[int, dict[str, tuple[int, int, Any]]]:
    """(layers, past input name -> (kv heads, head dim, dtype)) of a KV-cache decoder session."""
    inputs = {i.name: i for i in sess.get_inputs()}
    missing = [n for n in ("input_ids", "attention_mask", "position_ids", "past_key_values.0.key") if n not in inputs]
    if missing:
        raise ValueError(f"not a KV-cache decoder export: the graph has no input(s) {missing} (export it with "
                         "adagrow.compress.export.export_decoder_onnx)")
    n = sum(name.startswith("past_key_values.") for name in inputs) // 2
    layout = {}
    for name in past_names(n):
        shape, kind = inputs[name].shape, inputs[name].type
        if kind not in _ORT_FLOAT or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise ValueError(f"{name}: expected a float cache [batch, kv_heads, past, head_dim], got {kind} {shape}")
        layout[name] = (shape[1], shape[3], _ORT_FLOAT[kind])
    outputs = {o.name for o in sess.get_outputs()}
    if "logits" not in outputs or not set(present_names(n)) <= outputs:
        raise ValueError("not a KV-cache decoder export: outputs must be logits and present.{i}.key/value")
    return n, layout


def greedy_generate(model: str | os.PathLike | ort.InferenceSession, input_ids: np.ndarray, max_new_tokens: int, *,
                    attention_mask: np.ndarray | None = None, eos_token_id: int | Sequence[int] | None = None,
                    pad_token_id: int | None = None, threads: int | None = None) -> Generation:
    """Generate ``max_new_tokens`` greedily with the cache.

    Args:
        model: the ``.onnx`` file of :func:`export_decoder_onnx`, or a session on it.
        input_ids: prompt token ids ``[B, L]`` (left-padded when the rows differ in length).
        attention_mask: ``[B, L]``, 0 on left padding (default: all ones).
        eos_token_id: a row that produced one of these stops; later slots hold ``pad_token_id``
            (default: the first end-of-sequence id), and generation ends once every row stopped.
        threads: intra-op threads of the session built from a path (default: ONNX Runtime's).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sess = model if isinstance(model, ort.InferenceSession) else ort_session(model, threads)
    n_layers, layout = _cache_layout(sess)
    ids = np.asarray(input_ids, np.int64)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, length >= 1], got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {mask.shape} must have the shape of input_ids {ids.shape}")
    eos = np.asarray([] if eos_token_id is None else np.atleast_1d(eos_token_id), np.int64)
    pad = int(eos[0]) if pad_token_id is None and eos.size else pad_token_id
    batch = ids.shape[0]
    feed: dict[str, np.ndarray] = {name: np.zeros((batch, kv, 0, d), dtype) for name, (kv, d, dtype) in layout.items()}
    present, tokens, running = present_names(n_layers), [ids], np.ones(batch, bool)
    out_names = [o.name for o in sess.get_outputs()]
    step_ids, times = ids, []
    for _ in range(max_new_tokens):
        t0 = time.perf_counter()
        feed.update(input_ids=step_ids, attention_mask=mask, position_ids=position_ids(mask, step_ids.shape[1]))
        outs = dict(zip(out_names, sess.run(None, feed)))
        nxt = outs["logits"][:, -1].argmax(-1).astype(np.int64)
        times.append(time.perf_counter() - t0)
        if eos.size:
            nxt = np.where(running, nxt, pad)
            running &= ~np.isin(nxt, eos)
        tokens.append(nxt[:, None])
        if not running.any():
            break
        feed.update({p: outs[q] for p, q in zip(past_names(n_layers), present)})
        step_ids, mask = nxt[:, None], np.concatenate([mask, np.ones((batch, 1), np.int64)], 1)
    return Generation(np.concatenate(tokens, 1), len(times), times[0], float(sum(times[1:])))


@torch.no_grad()
def torch_greedy_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> Generation:
    """The PyTorch counterpart of :func:`greedy_generate` for one unpadded prompt ``[1, L]`` and no
    end-of-sequence: the cache loop ``generate(do_sample=False)`` runs, timed the same way."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one prompt [1, L], got shape {tuple(input_ids.shape)}")
    key, times, tokens = cache_argument(model), [], [input_ids]
    out: dict = {key: None}
    for _ in range(max_new_tokens):
        t0 = time.perf_counter()
        out = model(input_ids=tokens[-1], use_cache=True, **{key: out[key]})
        tokens.append(out["logits"][:, -1:].argmax(-1))
        times.append(time.perf_counter() - t0)
    return Generation(torch.cat(tokens, 1).numpy(), max_new_tokens, times[0], float(sum(times[1:])))


__all__ = ["greedy_generate", "torch_greedy_generate", "Generation"]
