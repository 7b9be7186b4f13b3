"""Language-model quality: perplexity on a text with strided windows (the method of Hugging Face's
perplexity guide): each window of ``window`` tokens scores only the tokens the previous window did
not, with up to ``window - stride`` tokens of context before them."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def token_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """``text`` as one row of token ids ``[1, T]`` (the tokenizer's special tokens included)."""
    return tokenizer(text, return_tensors="pt")["input_ids"]


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer_or_ids: Any, text: str | None = None, window: int = 512,
               stride: int = 256) -> float:
    """Perplexity of a causal LM on ``text`` (tokenized by ``tokenizer_or_ids``) or on the ids
    ``tokenizer_or_ids`` (``[1, T]`` or ``[T]``) when ``text`` is None.

    Windows of ``window`` tokens start every ``stride`` tokens; each scores the tokens past the
    previous window's end, so every token after the first is scored once, with at least
    ``window - stride`` tokens of context (all earlier tokens inside the first window).
    """
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    ids = tokenizer_or_ids if text is None else token_ids(tokenizer_or_ids, text)
    if not isinstance(ids, torch.Tensor):
        raise TypeError("pass a tokenizer and text, or a tensor of token ids")
    ids = ids.reshape(1, -1).long()
    n = ids.shape[1]
    if n < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n}")
    device = next(model.parameters()).device
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        chunk = ids[:, begin:end].to(device)
        labels = chunk.clone()
        labels[:, : max(prev_end - begin, 0)] = -100  # scored by the previous window
        scored = int((labels[:, 1:] != -100).sum())
        if scored:
            loss = model(input_ids=chunk, labels=labels, use_cache=False).loss
            nll, count = nll + float(loss) * scored, count + scored
        prev_end = end
        if end == n:
            break
    return math.exp(nll / count)


__all__ = ["perplexity", "token_ids"]
