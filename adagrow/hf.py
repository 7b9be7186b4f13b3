"""Hugging Face models offline (sentence encoders, causal LMs): load a model folder, tokenize
calibration text, mean-pooled sentence embeddings (``pip install -e ".[hf]"``; the bundled all-MiniLM-L6-v2 is
located by :func:`adagrow.models.minilm_path`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

MAX_LENGTH = 128  # tokens per sentence (MiniLM was trained with 128)
# tokens per paragraph when scoring an encoder on prose: all-MiniLM-L6-v2's sentence-transformers
# max_seq_length, so the held-out paragraphs (136-157 MiniLM tokens) are embedded whole
PROSE_MAX_LENGTH = 256


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError('Hugging Face models need the hf extra: pip install -e ".[hf]"') from exc
    return transformers


def is_causal_lm(model_or_config: Any) -> bool:
    """Whether a transformers model (or its config) is a decoder LM (``*ForCausalLM``): the model's
    class, or the config's ``architectures`` (which a config read from a GGUF file leaves empty)."""
    if type(model_or_config).__name__.endswith("ForCausalLM"):
        return True
    config = getattr(model_or_config, "config", model_or_config)
    return any(a.endswith("ForCausalLM") for a in getattr(config, "architectures", None) or [])


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")


def load_hf(folder: str | os.PathLike, progress: bool = True) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local folder (or a ``.gguf`` file, dequantized by transformers),
    in eval mode, never running remote code. The auto class follows ``config.architectures``:
    ``AutoModelForCausalLM`` for a ``*ForCausalLM`` or a GGUF file (GGUF holds decoder LMs; its
    config names no architecture), else ``AutoModel``; ``progress=False`` hides transformers' loading
    bars. Refuses a folder without tokenizer files
    (``FileNotFoundError``) and weights that are missing, unexpected or mis-shaped for the
    config (``ValueError`` naming them): never a randomly initialised layer."""
    transformers = _transformers()
    folder = Path(folder)
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if folder.is_file() and folder.suffix == ".gguf":
        folder, kwargs["gguf_file"] = folder.parent, folder.name
    elif not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a Hugging Face model folder (no config.json) or .gguf file")
    config = transformers.AutoConfig.from_pretrained(folder, **kwargs)
    causal = "gguf_file" in kwargs or is_causal_lm(config)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    if "gguf_file" not in kwargs and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); without them "
                                "transformers falls back to a tokenizer that maps every word to [UNK]")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        model, info = auto.from_pretrained(folder, output_loading_info=True, **kwargs)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    bad = {k.replace("_keys", ""): sorted(map(str, info.get(k) or ()))
           for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        raise ValueError(f"{folder}: the weights do not match config.json ("
                         + "; ".join(f"{k} {v[:5]}{f' and {len(v) - 5} more' if len(v) > 5 else ''}"
                                     for k, v in bad.items() if v)
                         + "): transformers would initialise missing weights randomly and quantize them")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    return model.eval(), tokenizer


def read_sentences(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a UTF-8 text file (one sentence or passage per line)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read calibration text {path}: {exc}") from exc
    sentences = [s.strip() for s in lines if s.strip()]
    if not sentences:
        raise ValueError(f"{path} holds no text (one sentence per line expected)")
    return sentences


def tokenize(tokenizer: Any, sentences: list[str], batch_size: int = 16,
             max_length: int = MAX_LENGTH) -> list[dict[str, torch.Tensor]]:
    """Padded ``BatchEncoding`` batches (``input_ids``, ``attention_mask``, ...) of ``batch_size`` sentences."""
    return [tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt") for i in range(0, len(sentences), batch_size)]


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean-pooled sentence embeddings ``[n_sentences, hidden]`` (padding excluded), float32."""
    out = []
    for b in batches:
        hidden = model(**b).last_hidden_state.float()
        mask = b["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(out)


def lm_windows(tokenizer: Any, sentences: list[str], seq_len: int, max_windows: int | None = None,
               batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Calibration batches for a causal LM: ``sentences`` joined by newlines and cut into windows of
    ``seq_len`` tokens (at most ``max_windows``; one shorter window when the text is shorter than
    ``seq_len``), ``batch_size`` windows a batch of ``input_ids``."""
    ids = tokenizer("\n".join(sentences), return_tensors="pt")["input_ids"][0]
    n = max(ids.numel() // seq_len, 1) if max_windows is None else max(min(ids.numel() // seq_len, max_windows), 1)
    rows = ids[: n * seq_len].reshape(n, -1) if ids.numel() >= seq_len else ids[None]
    return [{"input_ids": rows[i:i + batch_size]} for i in range(0, rows.shape[0], batch_size)]


def server_group_size(model: nn.Module, config: Any, fmt: str, explicit: bool) -> tuple[int, str | None]:
    """The group size ``config`` can use in the server format ``fmt`` (whole groups along the K of
    every layer :func:`adagrow.compress.quant_targets` would quantize), and a note when it is not
    the one asked for; ``ValueError`` listing the sizes that fit when ``explicit`` and it does not
    fit. Needs only the layers' shapes: call it before quantizing."""
    from adagrow.compress.model import quant_targets
    from adagrow.compress.server_formats import whole_group_size
    ks = [m.in_features for m in quant_targets(model, config)[0].values() if isinstance(m, nn.Linear)]
    return whole_group_size(ks, config.group_size_for("linear"), fmt, explicit=explicit)


def held_out_batches(tokenizer: Any) -> dict[str, list[dict[str, torch.Tensor]]]:
    """The held-out English texts an encoder is scored on, tokenized, by the name of their score:
    ``"cosine"``, the ``HELD_OUT`` sentences (up to ``MAX_LENGTH`` tokens), ``"prose_cosine"``,
    the ``HELD_OUT_PROSE`` paragraphs embedded whole (up to ``PROSE_MAX_LENGTH``), and
    ``"docs_cosine"``, the :func:`adagrow.hf_text.python_docs` paragraphs (up to ``PROSE_MAX_LENGTH``)."""
    from adagrow.hf_text import HELD_OUT, HELD_OUT_PROSE, python_docs
    return {"cosine": tokenize(tokenizer, HELD_OUT),
            "prose_cosine": tokenize(tokenizer, HELD_OUT_PROSE, max_length=PROSE_MAX_LENGTH),
            "docs_cosine": tokenize(tokenizer, python_docs(), max_length=PROSE_MAX_LENGTH)}


def cosine_to(reference: torch.Tensor, emb: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows."""
    return float(torch.nn.functional.cosine_similarity(emb, reference, dim=-1).mean())


__all__ = ["load_hf", "is_causal_lm", "read_sentences", "tokenize", "lm_windows", "server_group_size", "embed",
           "cosine_to", "held_out_batches", "MAX_LENGTH", "PROSE_MAX_LENGTH"]
