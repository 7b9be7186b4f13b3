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

import re
from importlib.resources import files


def _lines(name: str) -> list[str]:
    text = files("adagrow").joinpath("text", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


CALIBRATION: list[str] = _lines("calibration_en.txt")
CALIBRATION_PROSE: list[str] = _lines("calibration_prose_en.txt")
HELD_OUT: list[str] = _lines("held_out_en.txt")
HELD_OUT_PROSE: list[str] = _lines("held_out_prose_en.txt")
CALIBRATION_TEXTS = ("sentences", "prose", "both", "prose_sentences", "both_sentences")
# a sentence ends at ".", "!" or "?" (and the closing double quote right after it, if any) followed by
# white space and a capital letter or an opening double quote
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=["A-Z])|(?<=[.!?]")\s+(?=["A-Z])')


def split_sentences(paragraph: str) -> list[str]:
    """``paragraph`` cut into sentences by one rule: a sentence ends at ``.``, ``!`` or ``?`` (with
    the closing ``"`` right after it, if any) followed by white space and a capital letter or an
    opening ``"``. Abbreviations followed by a capital (``"7 a.m. The"``) are cut too; nothing in
    the bundled prose needs more (1,327 sentences from its 256 paragraphs)."""
    return [s for s in _SENTENCE_END.split(paragraph.strip()) if s]


def calibration_text(which: str, held_back: int = 0) -> list[str]:
    """The bundled calibration items ``which`` names: ``"sentences"`` (``CALIBRATION`` less its last
    ``held_back`` sentences, kept apart for validation), ``"prose"`` (the ``CALIBRATION_PROSE``
    paragraphs), ``"both"`` (those sentences, then the paragraphs), ``"prose_sentences"`` (the
    paragraphs cut into sentences by :func:`split_sentences`, in order) or ``"both_sentences"``
    (the sentences, then the prose's sentences); ``ValueError`` for another name."""
    if which not in CALIBRATION_TEXTS:
        raise ValueError(f"calibration text {which!r}: expected one of {CALIBRATION_TEXTS}")
    if not 0 <= held_back < len(CALIBRATION):
        raise ValueError(f"held_back={held_back}: expected 0 <= held_back < {len(CALIBRATION)}")
    sentences = CALIBRATION[:len(CALIBRATION) - held_back]
    split = [s for paragraph in CALIBRATION_PROSE for s in split_sentences(paragraph)]
    return {"sentences": sentences, "prose": CALIBRATION_PROSE, "both": sentences + CALIBRATION_PROSE,
            "prose_sentences": split, "both_sentences": sentences + split}[which]


__all__ = ["CALIBRATION", "CALIBRATION_PROSE", "CALIBRATION_TEXTS", "HELD_OUT", "HELD_OUT_PROSE", "calibration_text",
           "split_sentences"]
