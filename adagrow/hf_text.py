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
  tokens) on everyday topics, for scoring language models by perplexity on coherent text;
- :func:`python_docs`: text no one at adagrow wrote, chose or tuned on: the prose paragraphs of the
  Python language reference that every CPython ships (``pydoc_data.topics``), technical English
  unlike both calibration texts.

The held-out texts share no sentence with the calibration list (the held-out prose not even a 6-word
sequence), nor an 8-word sequence with the calibration prose, and cover their topics in different
proportions (the calibration prose avoids the held-out paragraphs' subjects), so held-out scores are
not measured on calibration text.
"""
from __future__ import annotations

import re
from importlib.resources import files

# a prose paragraph of the Python reference: 300-900 characters, >= 93% letters and spaces (no code
# listings or grammar rules), starting with a capital letter and ending with a full stop
_DOCS_CHARS = (300, 900)
_DOCS_LETTERS = 0.93


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


def python_docs() -> list[str]:
    """The prose paragraphs of the Python language reference bundled with the interpreter
    (``pydoc_data.topics``, the text of ``help()``), whitespace collapsed, in topic order, each once: 134
    paragraphs (about 9,400 words) on CPython 3.11. Held-out text for encoders that neither the
    calibration texts nor any choice in adagrow was made on. ``RuntimeError`` when the interpreter
    was built without ``pydoc_data`` (some minimal distribution builds)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:
        raise RuntimeError("this Python has no pydoc_data (the help() topics): install the full standard "
                           "library (e.g. Debian's libpython3-stdlib) to score on the Python docs text") from err
    out, seen = [], set()  # several topics repeat a paragraph: each is kept once
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(block.split())
            if (text not in seen and _DOCS_CHARS[0] <= len(text) <= _DOCS_CHARS[1] and text[0].isupper()
                    and text.endswith(".") and sum(c.isalpha() or c == " " for c in text) >= _DOCS_LETTERS * len(text)):
                seen.add(text)
                out.append(text)
    return out


__all__ = ["CALIBRATION", "CALIBRATION_PROSE", "CALIBRATION_TEXTS", "HELD_OUT", "HELD_OUT_PROSE", "calibration_text",
           "python_docs", "split_sentences"]
