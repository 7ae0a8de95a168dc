"""Generated prompt files for the tests: AlpacaFarm- and AlpacaEval-style records, built here, deterministically.

The paper's prompt files (AlpacaFarm / AlpacaEval, CC BY-NC) stay outside the repository: benchmarks may read
them, tests do not. These records are of the same kinds (docs/design.md 4.1): an AlpacaFarm row is
``{"input", "output", "qtype"}`` with any context inline in ``input`` as ``"...\\n\\n### Input:\\n{context}"``;
an AlpacaEval row is ``{"instruction", "output", "qtype", "dataset", "generator"}``; ``output`` is the
reference answer.

What the texts cover, so the tests that read them exercise it:

* answers (``output``): plain prose; Unicode (accents, precomposed and combining, CJK, emoji with ZWJ
  sequences, skin tones and flags, em / en dashes, curly quotes, zero-width characters, right-to-left scripts
  and marks, exotic spaces); repetition (repeated words, trigrams, sentences, lines); each of the five stop
  strings at the start, in the middle, and ``"\\n"`` runs of 4 and more (with near misses that are not stop
  strings); over-long answers (beyond a 512-token encoder window); empty and whitespace-only answers; code
  blocks; numbered and bulleted lists; numbers.
* prompts (``input`` / ``instruction``): plain instructions; inline contexts of every kind above but the stop
  strings (role markers inside an instruction change the reference's query recovery, tested on its own); the
  query-cleaning quirks (``" : "`` inside, a trailing ``":"``, ``"\\n "`` indentation); prompts far beyond 512
  tokens.
* both query types, and every AlpacaEval dataset name.

Every block of ``len(ANSWER_KINDS)`` consecutive items holds each answer kind once (and likewise for prompt
kinds), so a test that reads only the first few dozen items still meets each kind; the first ``k`` rows are the
same whatever ``n`` is asked for. Texts stay under 5,000 UTF-8 bytes, so every answer fits the feature tests'
largest static shape.
"""
from __future__ import annotations

import bisect
import itertools
import random

STOP_STRINGS = ("### Instruction:", "### Response:", "\n\n\n\n", "\n\n--", "\n\n____")  # docs/design.md 4.2
NEAR_MISSES = ("### Response", "### Instruction", "\n\n-", "\n\n___", "\n\n\n", "# Response:")
QTYPES = ("OPENENDED", "CONSTRAINED")
DATASETS = ("helpful_base", "koala", "oasst", "selfinstruct", "vicuna")
GENERATOR = "text_davinci_003"

FUNCTION_WORDS = (
    "the a an of to and in is it you that was for on are with as be this have from or by not but what all were "
    "when we there can which their if do will each about how up out them then she many some so these would other "
    "into has more her two like him see time could no make than first been its who now people my made over did "
    "down only way find use may water long little very after words called just where most know").split()

UNICODE = {
    "accents": ("café", "naïve", "Zürich", "façade", "Ångström", "résumé", "jalapeño", "São Paulo", "Dvořák",
                "smørrebrød", "İstanbul", "ß", "Œuvre"),
    "combining": ("cafe\u0301", "n\u0303o", "a\u0308\u0304", "Zu\u0308rich", "e\u0301e\u0301", "\u20dd"),
    "cjk": ("日本語", "中文字符", "東京タワー", "한국어", "漢字かな交じり", "ｶﾀｶﾅ", "你好，世界。"),
    "emoji": ("😀", "👍🏽", "❤️", "👨\u200d👩\u200d👧\u200d👦", "🇫🇷", "🎉", "1️⃣", "🐱", "👩🏻\u200d💻"),
    "punct": ("—", "–", "“", "”", "‘", "’", "…", "«", "»", "•", "°", "²", "½", "≥", "×", "€", "£", "™", "→"),
    "zero_width": ("\u200b", "\u200c", "\u200d", "\ufeff", "\u2060"),
    "rtl": ("مرحبا بالعالم", "שלום עולם", "\u200fעברית\u200f", "السَّلَامُ عَلَيْكُمْ", "٣٤٥", "\u202bابجد\u202c"),
    "spaces": ("\u00a0", "\u3000", "\u2009", "\u202f", "\t"),
}
WHITESPACE_ONLY = (" ", "\n", "\n\n  \n", " \t ", "\u00a0", "\u3000 ", "   \n\n\n\n   ", "\r\n")
CODE = (
    "def double(x):\n    \"\"\"Twice x.\"\"\"\n    return x * 2\n\nprint(double(21))  # 42",
    "for (int i = 0; i < n; ++i) {\n  total += a[i];\n}\nreturn total;",
    "SELECT name, COUNT(*) AS n\nFROM orders\nWHERE price >= 10.5\nGROUP BY name;",
    "class Node:\n    def __init__(self, value, next=None):\n        self.value, self.next = value, next",
    "const sum = (xs) => xs.reduce((a, b) => a + b, 0);\nconsole.log(sum([1, 2, 3]));",
    "#!/bin/bash\nfor f in *.txt; do\n  wc -l \"$f\"\ndone",
)
NUMBERS = ("42", "3.14159", "1,000,000", "-7 °C", "50%", "$19.99", "2 + 2 = 4", "10^6", "1/3", "2023-05-17",
           "0.5", "1e-9", "12:30", "+44 20 7946 0958", "IV", "100 km/h", "x² + y² = r²", "½ cup")

_ONSETS = ("b", "br", "c", "ch", "d", "dr", "f", "fl", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "pl", "pr",
           "qu", "r", "s", "sh", "sl", "st", "t", "th", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "oo", "y")
_CODAS = ("", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck", "ng")


class _Text:
    """Seeded text pieces: a fixed lexicon of pseudo-words (Zipf-sampled, so some words recur often and many are
    rare, as in real text) mixed with English function words."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        lex = set()
        while len(lex) < 12000:
            n = self.rng.randrange(1, 4)
            lex.add("".join(_ONSETS[self.rng.randrange(len(_ONSETS))] + _VOWELS[self.rng.randrange(len(_VOWELS))]
                            + _CODAS[self.rng.randrange(len(_CODAS))] for _ in range(n)))
        self.lexicon = sorted(lex)
        self.rng.shuffle(self.lexicon)
        self.cdf = list(itertools.accumulate(1.0 / i for i in range(1, len(self.lexicon) + 1)))

    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def word(self) -> str:
        if self.rng.random() < 0.45:
            return self.pick(FUNCTION_WORDS)
        at = bisect.bisect(self.cdf, self.rng.random() * self.cdf[-1])
        return self.lexicon[min(at, len(self.lexicon) - 1)]

    def topic(self) -> list[str]:
        """A few content words an instruction and its answer share (so relevance is not noise)."""
        return [self.lexicon[i] for i in self.rng.sample(range(400), 3)]

    def sentence(self, topic, n=None, unicode=False) -> str:
        n = n or self.rng.randrange(4, 18)
        words = [self.pick(topic) if self.rng.random() < 0.2 else self.word() for _ in range(n)]
        if unicode:
            for _ in range(self.rng.randrange(1, 4)):
                words.insert(self.rng.randrange(len(words) + 1), self.unicode_piece())
        words[0] = words[0][:1].upper() + words[0][1:]
        for _ in range(self.rng.randrange(0, 3)):
            i = self.rng.randrange(len(words))
            words[i] += self.pick((",", ";", " —", ":", " (" + self.pick(NUMBERS) + ")"))
        return " ".join(words) + self.pick((".", ".", ".", "!", "?", "…"))

    def prose(self, topic, n_sentences=None, unicode=False) -> str:
        n = n_sentences or self.rng.randrange(1, 7)
        return " ".join(self.sentence(topic, unicode=unicode) for _ in range(n))

    def unicode_piece(self) -> str:
        kind = self.pick(sorted(UNICODE))
        piece = self.pick(UNICODE[kind])
        if kind == "punct" and piece in "“‘«":
            piece = piece + self.word() + {"“": "”", "‘": "’", "«": "»"}[piece]
        if kind in ("zero_width", "spaces"):  # inside or between words, as they occur in pasted text
            piece = self.word() + piece + self.word()
        return piece

    def listing(self, topic) -> str:
        style = self.pick(("{i}. ", "- ", "• ", "* ", "{i}) "))
        n = self.rng.randrange(2, 8)
        items = [style.format(i=i + 1) + self.sentence(topic, n=self.rng.randrange(2, 9)) for i in range(n)]
        return self.pick(("", self.sentence(topic) + "\n\n")) + "\n".join(items)

    def code(self, topic) -> str:
        lang = self.pick(("python", "", "c", "sql", "js", "bash"))
        return f"{self.sentence(topic)}\n\n```{lang}\n{self.pick(CODE)}\n```\n\n{self.sentence(topic)}"

    def numbers(self, topic) -> str:
        nums = [self.pick(NUMBERS) for _ in range(self.rng.randrange(2, 6))]
        return " ".join(f"{self.sentence(topic, n=self.rng.randrange(3, 7))[:-1]} {x}." for x in nums)

    def long(self, topic, n_bytes) -> str:
        """Paragraphs of prose (a little Unicode) up to about ``n_bytes`` UTF-8 bytes."""
        paras, size = [], 0
        while size < n_bytes:
            paras.append(self.prose(topic, self.rng.randrange(3, 8), unicode=self.rng.random() < 0.3))
            size += len(paras[-1].encode()) + 2
        return "\n\n".join(paras)


# ----------------------------------------------------------------------------------------------- answers


def _answer(t: _Text, kind: str, topic, k: int) -> str:
    """An answer of ``kind``; ``k`` counts the items of that kind so far (rotates the stop strings)."""
    if kind == "prose":
        return t.prose(topic)
    if kind == "unicode":
        return t.prose(topic, unicode=True)
    if kind == "repetition":
        s = t.sentence(topic, n=t.rng.randrange(3, 8))
        return t.pick((
            (s + " ") * t.rng.randrange(2, 12),
            " ".join([t.pick(topic)] * t.rng.randrange(3, 40)),
            t.prose(topic, 2) + " " + " ".join([s] * t.rng.randrange(2, 5)),
            ("Sure! " * t.rng.randrange(2, 6)) + s,
            "\n".join([s] * t.rng.randrange(2, 9)),
            " ".join(t.pick(("a", "b", "a b")) for _ in range(t.rng.randrange(3, 60))),
        )).rstrip(" ")
    if kind == "stop_start":
        stop = STOP_STRINGS[k % len(STOP_STRINGS)]
        return t.pick(("", " ", "\n")) + stop + t.pick((" ", "\n", "")) + t.prose(topic)
    if kind == "stop_middle":
        stop = STOP_STRINGS[k % len(STOP_STRINGS)]
        return t.prose(topic) + t.pick(("", " ", "\n")) + stop + t.pick((" ", "\n", "")) + t.prose(topic)
    if kind == "newline_run":
        run = "\n" * t.rng.randrange(4, 9)
        near = t.pick(NEAR_MISSES)
        return t.prose(topic) + near + t.prose(topic) + run + t.pick(("", "\n\n--\nSignature", t.prose(topic)))
    if kind == "long":
        return t.long(topic, t.rng.randrange(3000, 4400))
    if kind == "empty":
        return ""
    if kind == "whitespace":
        return t.pick(WHITESPACE_ONLY)
    if kind == "code":
        return t.code(topic)
    if kind == "list":
        return t.listing(topic)
    if kind == "numbers":
        return t.numbers(topic)
    raise ValueError(kind)


ANSWER_KINDS = ("prose", "unicode", "repetition", "stop_start", "stop_middle", "newline_run", "long", "empty",
                "whitespace", "code", "list", "numbers")


# ----------------------------------------------------------------------------------------------- prompts


def _instruction(t: _Text, topic) -> str:
    verb = t.pick(("Explain", "Describe", "Summarize", "Write", "List", "Translate", "Classify", "Rewrite",
                   "Name", "Compare", "Give", "Tell me"))
    return f"{verb} {' '.join(t.word() for _ in range(t.rng.randrange(1, 5)))} {' '.join(topic)}" + t.pick(
        (".", ".", "?", "!", " in one sentence.", " — briefly."))


def _context(t: _Text, kind: str, topic) -> str:
    if kind == "context":
        return t.prose(topic, t.rng.randrange(1, 3))
    if kind == "unicode_context":
        return t.prose(topic, t.rng.randrange(1, 3), unicode=True)
    if kind == "code_context":
        code = t.pick(CODE)
        return code if t.rng.random() < 0.5 else "\n ".join(code.split("\n"))  # "\n " indentation
    if kind == "list_context":
        return t.listing(topic)
    if kind == "numbers_context":
        return t.numbers(topic)
    if kind == "long_context":
        return t.long(topic, t.rng.randrange(2500, 4500))
    if kind == "colon_label":
        return f"{t.pick(topic).capitalize()} : {t.word()} {t.pick(NUMBERS)}"
    raise ValueError(kind)


PROMPT_KINDS = ("plain", "context", "unicode_context", "code_context", "list_context", "numbers_context",
                "long_context", "colon_label", "trailing_colon", "multiline")


def _prompt(t: _Text, kind: str, topic, inline_context: bool) -> str:
    """An instruction of ``kind``; AlpacaFarm rows put a context after the header, AlpacaEval rows inline."""
    head = _instruction(t, topic)
    if kind == "plain":
        return head
    if kind == "trailing_colon":
        return head.rstrip(".?!") + " in the following sentence" + t.pick((":", ":", ": ", ":\n"))
    if kind == "multiline":
        return head + "\n\n" + t.prose(topic, 2, unicode=t.rng.random() < 0.5) + "\n" + t.sentence(topic)
    ctx = _context(t, kind, topic)
    if inline_context:
        return head + "\n\n### Input:\n" + ctx
    return head + t.pick(("\n\n", "\n", " ")) + ctx


# ----------------------------------------------------------------------------------------------- records


def _kinds(seed: int, kinds):
    """Endless kinds: each block of ``len(kinds)`` items is a fresh permutation of all of them (their own
    stream, so the first items of a file do not depend on how many are asked for)."""
    rng = random.Random(seed)
    while True:
        yield from rng.sample(kinds, len(kinds))


def _rows(n: int, seed: int, inline_context: bool) -> list[tuple[str, str, str]]:
    t = _Text(seed)
    answer_kinds, prompt_kinds = _kinds(1000 * seed + 1, ANSWER_KINDS), _kinds(1000 * seed + 2, PROMPT_KINDS)
    seen = dict.fromkeys(ANSWER_KINDS, 0)
    rows = []
    for _, a_kind, p_kind in zip(range(n), answer_kinds, prompt_kinds):
        topic = t.topic()
        prompt = _prompt(t, p_kind, topic, inline_context)
        answer = _answer(t, a_kind, topic, seen[a_kind])
        seen[a_kind] += 1
        qtype = QTYPES[int(t.rng.random() < 0.55)]
        rows.append((prompt, answer, qtype))
    return rows


def alpacafarm_records(n: int = 400, seed: int = 0) -> list[dict]:
    """``n`` AlpacaFarm-style rows ``{"input", "output", "qtype"}``."""
    return [{"input": p, "output": a, "qtype": q} for p, a, q in _rows(n, seed, inline_context=True)]


def alpaca_eval_records(n: int = 805, seed: int = 1) -> list[dict]:
    """``n`` AlpacaEval-style rows ``{"instruction", "output", "qtype", "dataset", "generator"}``."""
    return [{"instruction": p, "output": a, "qtype": q, "dataset": DATASETS[i % len(DATASETS)],
             "generator": GENERATOR} for i, (p, a, q) in enumerate(_rows(n, seed, inline_context=False))]


def has_stop(text: str) -> bool:
    return any(s in text for s in STOP_STRINGS)
