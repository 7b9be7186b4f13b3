"""English sentences for calibrating and evaluating sentence encoders offline (written for
adagrow; no dataset download), one per line in ``adagrow/text/``:

- ``CALIBRATION``: 544 everyday sentences (news, weather, sport, cooking, travel, health, science,
  software, finance, law, family life, support questions, reviews, short queries), about 8,900
  MiniLM tokens;
- ``HELD_OUT``: 40 other sentences for scoring.

The two lists share no sentence and cover their topics in different proportions, so held-out
scores are not measured on calibration text.
"""
from __future__ import annotations

from importlib.resources import files


def _lines(name: str) -> list[str]:
    text = files("adagrow").joinpath("text", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


CALIBRATION: list[str] = _lines("calibration_en.txt")
HELD_OUT: list[str] = _lines("held_out_en.txt")

__all__ = ["CALIBRATION", "HELD_OUT"]
