"""English sentences for calibrating and evaluating sentence encoders offline (written for
adagrow; no dataset download), one per line in ``adagrow/text/``:

- ``CALIBRATION``: 544 everyday sentences (news, weather, sport, cooking, travel, health, science,
  software, finance, law, family life, support questions, reviews, short queries), about 8,900
  MiniLM tokens;
- ``CALIBRATION_PROSE``: 256 paragraphs of running English prose (60-120 words each, about 23,300
  words, 28,500 SmolLM2 tokens) in many registers: news reports, fiction and dialogue, science
  explainers, history, how-to instructions, product reviews, letters and emails, opinion, travel,
  cooking, sport, law, medicine, technology, nature, money;
- ``HELD_OUT``: 40 other sentences for scoring;
- ``HELD_OUT_PROSE``: 20 paragraphs of running English prose (about 2,500 words, 3,000 SmolLM2
  tokens) on everyday topics, for scoring language models by perplexity on coherent text.

The held-out texts share no sentence with the calibration list (the held-out prose not even a 6-word
sequence), nor an 8-word sequence with the calibration prose, and cover their topics in different
proportions (the calibration prose avoids the held-out paragraphs' subjects), so held-out scores are
not measured on calibration text.
"""
from __future__ import annotations

from importlib.resources import files


def _lines(name: str) -> list[str]:
    text = files("adagrow").joinpath("text", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


CALIBRATION: list[str] = _lines("calibration_en.txt")
CALIBRATION_PROSE: list[str] = _lines("calibration_prose_en.txt")
HELD_OUT: list[str] = _lines("held_out_en.txt")
HELD_OUT_PROSE: list[str] = _lines("held_out_prose_en.txt")
CALIBRATION_TEXTS = ("sentences", "prose", "both")


def calibration_text(which: str, held_back: int = 0) -> list[str]:
    """The bundled calibration items ``which`` names: ``"sentences"`` (``CALIBRATION`` less its last
    ``held_back`` sentences, kept apart for validation), ``"prose"`` (``CALIBRATION_PROSE``) or
    ``"both"`` (those sentences, then the paragraphs); ``ValueError`` for another name."""
    if which not in CALIBRATION_TEXTS:
        raise ValueError(f"calibration text {which!r}: expected one of {CALIBRATION_TEXTS}")
    if not 0 <= held_back < len(CALIBRATION):
        raise ValueError(f"held_back={held_back}: expected 0 <= held_back < {len(CALIBRATION)}")
    sentences = CALIBRATION[:len(CALIBRATION) - held_back]
    return {"sentences": sentences, "prose": CALIBRATION_PROSE, "both": sentences + CALIBRATION_PROSE}[which]


__all__ = ["CALIBRATION", "CALIBRATION_PROSE", "CALIBRATION_TEXTS", "HELD_OUT", "HELD_OUT_PROSE", "calibration_text"]
