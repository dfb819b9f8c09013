"""Map a model's text answer to a class: exact, then normalised match; the five-stage tags.

A reasoning chain is five tagged stages, ``<SUMMARY>…</SUMMARY> <CAPTION>…</CAPTION>
<REASONING>…</REASONING> <REFLECTION>…</REFLECTION> <CONCLUSION>…</CONCLUSION>``; its answer is
the text of the CONCLUSION. :func:`parse_class` turns an answer into a class index:

1. exact: the stripped answer equals a class name;
2. normalised: equal after lower-casing, mapping ``_``/``-`` to spaces, dropping punctuation, a
   leading article and repeated spaces ("The Alarm_Clock." == "alarm clock");
3. normalised mention: exactly one class name occurs as whole words in the normalised answer
   ("the class of this image is dog"); a name inside a longer matched name does not count
   ("red circle" wins over "circle"); two different classes make the answer ambiguous.

Anything else is unparsable: ``None``, which evaluation counts as wrong and logs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

TAGS: tuple[str, ...] = ("SUMMARY", "CAPTION", "REASONING", "REFLECTION", "CONCLUSION")
"""The five stages of a chain, in the order they must appear."""

_ARTICLES = ("a ", "an ", "the ")
_PUNCTUATION = re.compile(r"[^\w\s]|_")


def normalise(text: str) -> str:
    """Lower case, ``_``/``-``/punctuation to spaces, no leading article, single spaces."""
    text = _PUNCTUATION.sub(" ", text.lower())
    text = " ".join(text.split())
    for article in _ARTICLES:
        if text.startswith(article):
            return text[len(article) :]
    return text


def parse_class(answer: str | None, class_names: Sequence[str]) -> int | None:
    """Index of the class ``answer`` names (rules in the module docstring), or None."""
    if answer is None:
        return None
    stripped = answer.strip()
    for index, name in enumerate(class_names):
        if stripped == name:
            return index
    wanted = normalise(stripped)
    if not wanted:
        return None
    names = [normalise(n) for n in class_names]
    for index, name in enumerate(names):
        if wanted == name:
            return index
    padded = f" {wanted} "
    spans: list[tuple[int, int, int]] = []  # (start, end, class index) of each whole-word hit
    for index, name in enumerate(names):
        if not name:
            continue
        start = padded.find(f" {name} ")
        while start >= 0:
            spans.append((start, start + len(name) + 2, index))
            start = padded.find(f" {name} ", start + 1)
    outer = {
        index
        for start, end, index in spans
        if not any(s <= start and end <= e and (e - s) > (end - start) for s, e, _ in spans)
    }
    return outer.pop() if len(outer) == 1 else None


def stage_text(chain: str, tag: str) -> str | None:
    """The text inside the last ``<tag>…</tag>`` of ``chain``, stripped; None if absent.

    For CONCLUSION a missing closing tag is tolerated (a generation cut at the token limit
    still has an answer): the text runs to the end.
    """
    opening = f"<{tag}>"
    start = chain.rfind(opening)
    if start < 0:
        return None
    start += len(opening)
    end = chain.find(f"</{tag}>", start)
    if end < 0:
        if tag != "CONCLUSION":
            return None
        end = len(chain)
    return chain[start:end].strip()


def conclusion_text(chain: str) -> str | None:
    """The CONCLUSION of ``chain`` (see :func:`stage_text`), or None when it has none."""
    return stage_text(chain, "CONCLUSION")


def missing_tags(chain: str) -> list[str]:
    """Stages of :data:`TAGS` that ``chain`` lacks as a ``<TAG>…</TAG>`` pair in order.

    A stage whose pair is present but starts before the previous stage's closing tag counts as
    missing too (out of order): the result is empty exactly for a well-formed chain.
    """
    missing: list[str] = []
    position = 0
    for tag in TAGS:
        start = chain.find(f"<{tag}>", position)
        end = chain.find(f"</{tag}>", start + 1) if start >= 0 else -1
        if start < 0 or end < 0:
            missing.append(tag)
            continue
        position = end + len(tag) + 3
    return missing
