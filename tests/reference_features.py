"""Plain-Python reference of the white-box features, docs/design.md 4.2 (test-side; the package never imports it).

Written from the definition, the way the paper's reference computes it (``get_length_incentive``): strip,
cut at the leftmost stop string, strip, ``nltk.wordpunct_tokenize``, LI = len / 100, RP = distinct trigrams /
trigrams (1.0 below 3 words).
"""
from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import nltk

STOPS = ("### Instruction:", "### Response:", "\n\n\n\n", "\n\n--", "\n\n____")


class Counts(NamedTuple):
    n_words: int
    n_trigrams: int
    n_distinct: int

    @property
    def li(self) -> float:
        return self.n_words / 100

    @property
    def rp(self) -> float:
        return self.n_distinct / self.n_trigrams if self.n_trigrams else 1.0


def _first_stop(text: str, stops: Sequence[str]):
    return re.search("|".join(map(re.escape, stops)), text) if stops else None


def clean(r: str, stops: Sequence[str] = STOPS) -> str:
    """``r.strip("\\n ")``, cut at the leftmost occurrence of any stop string, ``.strip("\\n ")``."""
    r = r.strip("\n ")
    m = _first_stop(r, stops)
    return (r[: m.start()] if m else r).strip("\n ")


def cut(r: str, stops: Sequence[str] = STOPS) -> str:
    """``r`` up to the leftmost stop string found in ``r.strip("\\n ")`` (clean before its strips), else ``r``."""
    lead = len(r) - len(r.lstrip("\n "))
    m = _first_stop(r.strip("\n "), stops)
    return r[:lead + m.start()] if m else r


def words(r: str, stops: Sequence[str] = STOPS, tokenize=nltk.wordpunct_tokenize) -> list[str]:
    """W(r) = nltk.wordpunct_tokenize(clean(r)) (``tokenize`` swaps the tokenizer, e.g. a stdlib-re one)."""
    return tokenize(clean(r, stops))


def re_wordpunct(text: str) -> list[str]:
    """``\\w+|[^\\w\\s]+`` with the stdlib ``re`` engine (what older nltk releases ran)."""
    return re.findall(r"\w+|[^\w\s]+", text)


def counts(r: str, stops: Sequence[str] = STOPS, tokenize=nltk.wordpunct_tokenize) -> Counts:
    """(#words, #trigrams, #distinct trigrams) of W(r); trigrams joined with spaces as the paper's code does."""
    w = words(r, stops, tokenize)
    trigrams = [" ".join(t) for t in nltk.ngrams(w, 3)]
    return Counts(len(w), len(trigrams), len(set(trigrams)))


def li(r: str, stops: Sequence[str] = STOPS) -> float:
    return counts(r, stops).li


def rp(r: str, stops: Sequence[str] = STOPS) -> float:
    return counts(r, stops).rp


def cut_token(token_bytes: Sequence[bytes], stops: Sequence[str] = STOPS) -> int:
    """Index of the token holding the first byte of the stop string that clean() cuts at, else #tokens.

    ``token_bytes``: each response token's bytes. The cut is located in the text (``errors='replace'``
    decoding of all bytes) and mapped back to a byte offset through the character-by-character decoding.
    """
    data = b"".join(token_bytes)
    text = data.decode("utf-8", errors="replace")
    lead = len(text) - len(text.lstrip("\n "))
    m = _first_stop(text.strip("\n "), stops)
    if m is None:
        return len(token_bytes)
    char_at = lead + m.start()
    offset = _byte_offset(data, char_at)
    end = 0
    for t, tb in enumerate(token_bytes):
        end += len(tb)
        if end > offset:
            return t
    raise AssertionError("stop string past the end of the bytes")


def _byte_offset(data: bytes, char_index: int) -> int:
    """Byte offset that splits ``data`` where its ``errors='replace'`` decoding has ``char_index`` characters."""
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" not in text:  # valid UTF-8
        return len(text[:char_index].encode("utf-8"))
    for hi in range(len(data) + 1):  # brute force: the split whose two halves decode to the two text halves
        if (data[:hi].decode("utf-8", errors="replace") == text[:char_index]
                and data[hi:].decode("utf-8", errors="replace") == text[char_index:]):
            return hi
    raise AssertionError(f"no byte split of {data!r} at character {char_index}")
