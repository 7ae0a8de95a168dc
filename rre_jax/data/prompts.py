"""Prompt files: AlpacaFarm / AlpacaEval JSON lists and JSONL, read into `PromptRecord`s.

Two row layouts are accepted (docs/design.md 4.1), in a JSON list (``.json``) or one object per line (``.jsonl``):

- AlpacaFarm: ``{"input", "output", "qtype"}``; an item's context is already inline in ``input`` as
  ``"...\\n\\n### Input:\\n{context}"``.
- AlpacaEval: ``{"instruction", "output", "qtype", "dataset", "generator"}`` (``dataset``/``generator`` optional).

``output`` is the reference answer. ``qtype`` is ``OPENENDED`` or ``CONSTRAINED``; an unknown value is an error.
A row without ``qtype`` follows the ``missing_qtype`` policy: ``"OPENENDED"`` (default) or ``"CONSTRAINED"``
fills it in and logs how many rows were filled; ``"error"`` rejects the file. Every error names the file, the
item index and, where known, the line (and column) so the row can be found and fixed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from rre_jax.errors import UserError

log = logging.getLogger(__name__)

QTYPES = ("OPENENDED", "CONSTRAINED")
QTYPE_IDS = {name: i for i, name in enumerate(QTYPES)}
MISSING_QTYPE_POLICIES = ("OPENENDED", "CONSTRAINED", "error")

_TEXT_KEYS = ("input", "instruction")  # AlpacaFarm, AlpacaEval
_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace


class PromptFileError(UserError):
    """A prompt file that cannot be read; the message names the file, line/item and field."""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt as in its file.

    instruction: the text as in the file (AlpacaFarm ``input`` or AlpacaEval ``instruction``), untemplated.
    reference: the reference answer (``output``). qtype: ``OPENENDED`` or ``CONSTRAINED``.
    dataset, generator: AlpacaEval metadata ("" when absent). index: position of the item in its file.
    """

    instruction: str
    reference: str
    qtype: str
    dataset: str = ""
    generator: str = ""
    index: int = 0

    @property
    def qtype_id(self) -> int:
        return QTYPE_IDS[self.qtype]


def load_prompts(path: str | os.PathLike, *, missing_qtype: str = "OPENENDED") -> list[PromptRecord]:
    """Reads a ``.json`` list or ``.jsonl`` prompt file into records (see module docstring)."""
    return records_from_rows(read_rows(path), source=os.fspath(path), missing_qtype=missing_qtype)


def read_rows(path: str | os.PathLike) -> list[tuple[Any, int]]:
    """Parses a prompt file into ``(row, line)`` pairs; syntax errors name the file, line and column."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {path!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text ({e})") from None
    if path.endswith(".jsonl"):
        return _jsonl_rows(text, path)
    return _json_list_rows(text, path)


def _jsonl_rows(text: str, path: str) -> list[tuple[Any, int]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((json.loads(line), lineno))
        except json.JSONDecodeError as e:
            raise PromptFileError(
                f"{path}:{lineno}:{e.colno}: malformed JSON record on line {lineno}, column {e.colno}: {e.msg}"
            ) from None
    return rows


def _json_list_rows(text: str, path: str) -> list[tuple[Any, int]]:
    """Decodes a top-level JSON list item by item so each row keeps the line it starts on."""
    decoder = json.JSONDecoder()

    def fail(pos: int, msg: str) -> PromptFileError:
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        hint = ("" if text.lstrip().startswith("[")
                else " (a .json prompt file is a list; use .jsonl for one object per line)")
        return PromptFileError(f"{path}:{line}:{col}: malformed JSON at line {line}, column {col}: {msg}{hint}")

    pos = _WS.match(text, 0).end()
    if not text.startswith("[", pos):
        raise fail(pos, "expected '[' starting a JSON list of prompt objects")
    pos = _WS.match(text, pos + 1).end()
    rows: list[tuple[Any, int]] = []
    line, counted = 1, 0  # line of `counted`, advanced incrementally (files can be megabytes)
    closed = text.startswith("]", pos)
    while not closed:
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        line, counted = line + text.count("\n", counted, pos), pos
        rows.append((row, line))
        pos = _WS.match(text, end).end()
        closed = text.startswith("]", pos)
        if not closed:
            if not text.startswith(",", pos):
                raise fail(pos, "expected ',' or ']' after a list item")
            pos = _WS.match(text, pos + 1).end()
    pos += 1
    pos = _WS.match(text, pos).end()
    if pos != len(text):
        raise fail(pos, "extra data after the closing ']'")
    return rows


def records_from_rows(
    rows: Iterable[tuple[Any, int | None]], *, source: str, missing_qtype: str = "OPENENDED"
) -> list[PromptRecord]:
    """Validates parsed rows (``(row, line or None)``) into records; errors name source, item, line and field."""
    if missing_qtype not in MISSING_QTYPE_POLICIES:
        raise ValueError(f"missing_qtype={missing_qtype!r}; expected one of {MISSING_QTYPE_POLICIES}")
    records, filled, text_key = [], [], None
    for index, (row, line) in enumerate(rows):
        where = f"{source}: item {index}" + (f" (line {line})" if line is not None else "")
        if not isinstance(row, Mapping):
            raise PromptFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
        keys = [k for k in _TEXT_KEYS if k in row]
        if len(keys) != 1:
            raise PromptFileError(
                f"{where}: needs exactly one of the fields 'input' (AlpacaFarm) or 'instruction' (AlpacaEval); "
                f"found fields {sorted(row)}"
            )
        text_key = text_key or keys[0]
        if keys[0] != text_key:
            raise PromptFileError(
                f"{where}: uses field {keys[0]!r} but earlier items use {text_key!r}; one layout per file")
        qtype = _field(row, "qtype", where, required=False)
        if qtype is None:
            if missing_qtype == "error":
                raise PromptFileError(f"{where}: missing field 'qtype' (expected one of {QTYPES}); "
                                      "label it, or load with missing_qtype='OPENENDED'")
            qtype = missing_qtype
            filled.append(index)
        elif qtype not in QTYPE_IDS:
            raise PromptFileError(f"{where}: unknown qtype {qtype!r}; expected one of {QTYPES}")
        records.append(PromptRecord(
            instruction=_field(row, text_key, where), reference=_field(row, "output", where), qtype=qtype,
            dataset=_field(row, "dataset", where, required=False) or "",
            generator=_field(row, "generator", where, required=False) or "", index=index))
    if filled:
        log.warning("%s: %d of %d items have no 'qtype'; set to %s (missing_qtype policy; first items %s)",
                    source, len(filled), len(records), missing_qtype, filled[:5])
    return records


def _field(row: Mapping, key: str, where: str, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            raise PromptFileError(f"{where}: missing field {key!r}")
        return None
    if not isinstance(value, str):
        raise PromptFileError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {value!r:.40}")
    return value


def qtype_counts(records: Sequence[PromptRecord]) -> dict[str, int]:
    """Number of records per qtype (every known qtype listed)."""
    return {q: sum(r.qtype == q for r in records) for q in QTYPES}
