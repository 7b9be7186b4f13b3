"""English sentences for calibrating and evaluating sentence encoders offline (written for
adagrow; no dataset download), one per line in ``adagrow/text/``:

- ``CALIBRATION``: 544 everyday sentences (news, weather, sport, cooking, travel, health, science,
  software, finance, law, family life, support questions, reviews, short queries), about 8,900
  MiniLM tokens;
- ``HELD_OUT``: 40 other sentences for scoring;
- ``HELD_OUT_PROSE``: 20 paragraphs of running English prose (about 2,500 words, 3,000 SmolLM2
  tokens) on everyday topics, for scoring language models by perplexity on coherent text.

The held-out texts share no sentence with the calibration list (the prose not even a 6-word
sequence) and cover their topics in different proportions, so held-out scores are not measured on
calibration text.
"""
from __future__ import annotations

from importlib.resources import files


def _lines(name: str) -> list[str]:
    text = files("adagrow").joinpath("text", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


CALIBRATION: list[str] = _lines("calibration_en.txt")
HELD_OUT: list[str] = _lines("held_out_en.txt")
HELD_OUT_PROSE: list[str] = _lines("held_out_prose_en.txt")

__all__ = ["CALIBRATION", "HELD_OUT", "HELD_OUT_PROSE"]
