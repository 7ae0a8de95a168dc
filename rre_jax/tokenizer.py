"""Tokenizers: load a local Hugging Face tokenizer, train a small real one, and the id -> UTF-8 bytes table.

The on-device features (``rre_jax.features``) never see text: they read the policy's token ids and turn them
into the UTF-8 bytes of the response with a per-tokenizer table built here once, on the host.

Letters: V vocabulary size (``len(tokenizer)``, added tokens included), L longest token in bytes.

Leading-space convention (SentencePiece family). A SentencePiece/Llama tokenizer marks a word boundary with
``▁`` glued to the *front* of the next piece, and the tokenizer's decoder (``Strip(' ', 1, 0)`` or
``Metaspace``) drops the one space this produces at the very start of the decoded string. The table does not:
every ``▁`` is a ``b' '``, the first token's included. So for any ids::

    table_bytes(ids) == decode(ids).encode()                  # byte-level BPE, identity table
    table_bytes(ids) == b' ' * k + decode(ids).encode()       # SentencePiece family, k in {0, 1}

with k = 1 exactly when ``table_bytes(ids)`` starts with a space. The white-box features strip leading
spaces before anything else (``clean(r)`` starts with ``r.strip("\\n ")``), so the convention never changes
LI or RP; it is also what a response *inside* a longer sequence contributes, so cut positions stay right.

Invalid UTF-8. The table holds raw bytes; token sequences can spell invalid UTF-8 (byte-fallback tokens or
byte-level pieces cut mid-character). ``features`` decodes them like Python's
``bytes.decode('utf-8', errors='replace')`` (each maximal invalid subpart -> U+FFFD). Hugging Face's
``ByteLevel`` decoder does the same (Rust ``from_utf8_lossy``). Its ``ByteFallback`` decoder does not: a run
of consecutive ``<0xNN>`` tokens that is not valid UTF-8 as a whole becomes one U+FFFD *per byte of the
run* (valid bytes in it included), so for such (rare, invalid) sequences the SentencePiece family's
``decode`` differs from ``ByteTable.text``; the features follow ``ByteTable.text``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Iterable, Sequence

import numpy as np
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SP_SPACE = "\u2581"  # '▁', SentencePiece's word-boundary mark
KINDS = ("sentencepiece", "bytelevel")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclasses.dataclass(frozen=True)
class ByteTable:
    """UTF-8 bytes each token id adds to the text: ``bytes_VxL[i, :len_V[i]]`` (zero padded).

    ``family`` is 'sentencepiece', 'bytelevel' or 'identity'; ``strips_leading_space`` says whether the
    tokenizer's own decode drops one leading space that the table keeps (module docstring).
    """

    bytes_VxL: np.ndarray
    len_V: np.ndarray
    family: str
    strips_leading_space: bool = False

    def __post_init__(self):
        b, n = self.bytes_VxL, self.len_V
        if b.dtype != np.uint8 or b.ndim != 2:
            raise ValueError(f"ByteTable.bytes_VxL must be uint8[V, L], got {b.dtype}{list(b.shape)}")
        if n.dtype != np.int32 or n.shape != b.shape[:1]:
            raise ValueError(f"ByteTable.len_V must be int32[{b.shape[0]}], got {n.dtype}{list(n.shape)}")
        if n.size and (n.min() < 0 or n.max() > b.shape[1]):
            raise ValueError(f"ByteTable.len_V must lie in [0, L={b.shape[1]}], got [{n.min()}, {n.max()}]")

    @property
    def vocab_size(self) -> int:
        return int(self.bytes_VxL.shape[0])

    def token_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated table bytes of ``ids`` (host-side; the reference for the device path)."""
        return b"".join(self.bytes_VxL[i, : self.len_V[i]].tobytes() for i in ids)

    def text(self, ids: Iterable[int]) -> str:
        """``token_bytes(ids).decode('utf-8', errors='replace')``: the text the features see."""
        return self.token_bytes(ids).decode("utf-8", errors="replace")


def _pack(pieces: Sequence[bytes], family: str, strips: bool = False) -> ByteTable:
    width = max(1, max((len(p) for p in pieces), default=1))
    bytes_VxL = np.zeros((len(pieces), width), np.uint8)
    for i, p in enumerate(pieces):
        bytes_VxL[i, : len(p)] = np.frombuffer(p, np.uint8)
    len_V = np.array([len(p) for p in pieces], np.int32)
    return ByteTable(bytes_VxL, len_V, family, strips)


def identity_byte_table() -> ByteTable:
    """V = 256, token id i is the single byte i: runs the features on raw UTF-8 (or invalid) bytes."""
    return _pack([bytes([i]) for i in range(256)], "identity")


# ----------------------------------------------------------------------------------------------- loading


def load_tokenizer(directory: str | os.PathLike):
    """``transformers.AutoTokenizer`` from a local directory (never the hub)."""
    path = pathlib.Path(directory)
    if not path.is_dir() or not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {str(path)!r}: expected one of {', '.join(_TOKENIZER_FILES)} there. Point the "
            "tokenizer path at a saved Hugging Face tokenizer directory (or build one with "
            "rre_jax.tokenizer.train_tokenizer).")

    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ----------------------------------------------------------------------------------------------- training


def _sentencepiece_style(texts: Sequence[str], vocab_size: int):
    """Llama-style BPE: specials, 256 ``<0xNN>`` byte-fallback tokens, then learnt pieces."""

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    n_learnt = vocab_size - len(specials) - len(byte_tokens)
    if n_learnt < 1:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for learnt pieces (sentencepiece needs > 259)")
    pre = pre_tokenizers.Metaspace(replacement=SP_SPACE, prepend_scheme="first", split=True)
    draft = Tokenizer(models.BPE())
    draft.pre_tokenizer = pre
    draft.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=n_learnt, limit_alphabet=150, show_progress=False))
    learnt = json.loads(draft.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + byte_tokens)}
    for token, _ in sorted(learnt["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([
        decoders.Replace(SP_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")


def _bytelevel(texts: Sequence[str], vocab_size: int):
    """GPT-2 / Llama-3 style byte-level BPE (no prefix space)."""

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok, dict(bos_token=specials[0], eos_token=specials[1], pad_token=specials[2])


def train_tokenizer(texts: Sequence[str], kind: str, vocab_size: int, out_dir: str | os.PathLike):
    """Train a real BPE tokenizer on ``texts`` and save it as a transformers-loadable directory.

    kind 'sentencepiece': Llama-style (``▁`` Metaspace, prepend 'first', byte fallback, ``<unk> <s> </s>``);
    kind 'bytelevel': GPT-2 / Llama-3 style byte-level BPE. Returns the tokenizer as ``load_tokenizer``
    reads it back from ``out_dir``.
    """
    if kind not in KINDS:
        raise ValueError(f"train_tokenizer: kind={kind!r}, expected one of {KINDS}")

    build = _sentencepiece_style if kind == "sentencepiece" else _bytelevel
    tok, special = build(list(texts), int(vocab_size))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special)
    wrapped.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


# ----------------------------------------------------------------------------------------------- tables


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _decoder_family(backend) -> tuple[str, bool]:
    """('bytelevel' | 'sentencepiece', strips one leading space) from the tokenizer.json decoder."""
    spec = json.loads(backend.to_str()).get("decoder") or {}
    parts = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
    types = [p.get("type") for p in parts]
    if "ByteLevel" in types:
        return "bytelevel", False
    replaces_mark = any(p.get("type") == "Replace" and p.get("content") == " "
                        and (p.get("pattern") or {}).get("String") == SP_SPACE for p in parts)
    if "Metaspace" in types or replaces_mark:
        strips = "Metaspace" in types and parts[types.index("Metaspace")].get("prepend_scheme", "always") != "never"
        strips |= any(p.get("type") == "Strip" and p.get("content") == " " and p.get("start", 0) >= 1
                      for p in parts)
        return "sentencepiece", strips
    raise ValueError(f"byte_table: unsupported tokenizer decoder {types}: expected a byte-level BPE (ByteLevel) "
                     "or SentencePiece-style (Metaspace / Replace('▁', ' ') + ByteFallback) decoder")


def _piece_bytes(token: str, family: str, byte_of_char: dict[str, int]) -> bytes:
    if family == "bytelevel":
        return b"".join(bytes([byte_of_char[c]]) if c in byte_of_char else c.encode() for c in token)
    m = _BYTE_TOKEN.fullmatch(token)
    return bytes([int(m.group(1), 16)]) if m else token.replace(SP_SPACE, " ").encode("utf-8")


def byte_table(tokenizer) -> ByteTable:
    """The id -> UTF-8 bytes table of a Hugging Face fast tokenizer (module docstring for conventions).

    SentencePiece family: ``▁`` -> b' ', ``<0xNN>`` -> that byte, other pieces -> their UTF-8. Byte-level
    BPE: each character through the inverse of GPT-2's ``bytes_to_unicode``. Special tokens (bos, eos, pad,
    unk and added special tokens) -> no bytes, as ``decode(..., skip_special_tokens=True)`` drops them.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"byte_table needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    family, strips = _decoder_family(backend)
    byte_of_char = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    vocab_size = len(tokenizer)
    pieces = []
    for i in range(vocab_size):
        token = tokenizer.convert_ids_to_tokens(i)
        pieces.append(b"" if i in special or token is None else _piece_bytes(token, family, byte_of_char))
    return _pack(pieces, family, strips)
