"""White-box text features (docs/design.md 4.2) as pure jittable functions of the policy's token ids.

    clean(r) = r.strip("\\n "), cut at the first occurrence of any stop string, .strip("\\n ") again
    W(r)     = nltk.wordpunct_tokenize(clean(r))  -- the regex \\w+|[^\\w\\s]+ (Python's ``re`` classes)
    LI       = len(W) / 100                       RP = #distinct word trigrams / #trigrams  (1.0 if < 3 words)

Nothing crosses to the host: ids -> bytes (per-tokenizer table) -> code points (UTF-8 decoding) -> classes
(bitsets of ``\\w`` / ``\\s`` taken from Python's ``re`` itself) -> words -> trigram hashes -> hash table -> counts.

Letters: B batch, T response tokens, V vocabulary, L longest token in bytes, N bytes per response (static
``max_bytes``), P packed-stream length (static ``total_bytes``), W word slots (= P), K = 2 independent
hashes, C = 0x110000 / 32 words of a class bitset.

Work happens at *byte positions* of one packed stream (the batch's responses back to back): every byte of a
UTF-8 unit carries that unit's code point and class, and ``start_P`` marks the first byte of each decoded
character. Word runs are maximal runs of one class (word or other) between spaces, so they can be found by
comparing neighbouring byte positions; each word then gets one slot of a compacted word array (``Words``), where
trigrams are three neighbouring slots of one row.

Invalid UTF-8 is decoded exactly like Python's ``bytes.decode('utf-8', errors='replace')``: each maximal
subpart of an ill-formed sequence (a valid lead byte plus the valid continuation bytes that follow it, or a
single stray byte) becomes one U+FFFD, which is neither ``\\w`` nor ``\\s``.

Words are identified by two independent 32-bit hashes of their code points and trigrams by two 32-bit
hashes of their words; distinct trigrams are counted with a hash table (``first_occurrences``;
``trigram_counts`` states the collision bound). Counts are exact integers; LI and RP equal ``np.float32`` of the Python values.

``cut_token_B`` serves rollout post-processing (docs/design.md 4.2): tokens from that index on leave the
response mask (``mask & (arange(T) < cut_token[:, None])``).

Bytes past ``max_bytes`` are dropped (``Features.truncated_B`` says when); choose ``max_bytes`` >= the
response's byte length (the default, T * L, can never truncate) for exact results. Cost is linear in
B * max_bytes, so a tight ``max_bytes`` matters more than anything else for speed.
"""
from __future__ import annotations

import functools
import re
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rre_jax import backend
from rre_jax.tokenizer import ByteTable

DEFAULT_STOPS: tuple[str, ...] = ("### Instruction:", "### Response:", "\n\n\n\n", "\n\n--", "\n\n____")
N_CODE_POINTS = 0x110000
SPACE, WORD, OTHER = 0, 1, 2  # character classes; outside the cleaned span everything is SPACE
_STRIP = (0x0A, 0x20)  # "\n", " "


def scored_text(text: str, stop_strings: Sequence[str] = DEFAULT_STOPS) -> str:
    """``text`` up to the first stop string found inside ``text.strip("\\n ")``, else ``text`` itself (no strip).
    This is clean(r) before its strips, the cut ``text_features`` makes on device (``cut_token_B``), as a string:
    LI and RP of ``scored_text(r)`` equal those of ``r``. Relevance embeds ``r`` itself, as the paper does, unless
    a run asks for ``relevance_text='cut'`` (``reward_engine``). Idempotent: the cut text holds no stop string
    inside its strip."""
    lo = len(text) - len(text.lstrip("\n "))
    hi = len(text.rstrip("\n "))
    found = [i for i in (text.find(s, lo, hi) for s in stop_strings) if i >= 0]
    return text[:min(found)] if found else text


class FeatureTables(NamedTuple):
    """Device-side lookup tables: the tokenizer's byte table and the ``\\w`` / ``\\s`` bitsets."""

    bytes_VxL: jax.Array  # uint8
    len_V: jax.Array  # int32
    word_C: jax.Array  # uint32, bit (cp & 31) of word cp >> 5 set iff \w matches chr(cp) (class_bitsets)
    space_C: jax.Array  # uint32, likewise for \s


class Features(NamedTuple):
    """Per-response features; every field is an array of shape [B]."""

    li_B: jax.Array  # f32 length incentive, n_words / 100
    rp_B: jax.Array  # f32 repetition penalty, n_distinct / n_trigrams (1.0 when n_trigrams == 0)
    n_words_B: jax.Array  # int32 len(W(r))
    n_trigrams_B: jax.Array  # int32 max(n_words - 2, 0)
    n_distinct_B: jax.Array  # int32 distinct word trigrams
    cut_token_B: jax.Array  # int32 index of the token holding the stop string's first byte, else #tokens
    n_bytes_B: jax.Array  # int32 bytes of the (uncut) response per the table
    truncated_B: jax.Array  # bool, n_bytes > max_bytes: the features saw only the first max_bytes bytes


def class_bitsets() -> tuple[np.ndarray, np.ndarray]:
    """(word_C, space_C): Python's ``\\w`` / ``\\s`` for every code point, 32 per uint32 (bit cp & 31 of
    word cp >> 5).

    They come from running the stdlib ``re`` engine itself over a string of all 0x110000 code points (once
    per process): ``\\w`` is ``str.isalnum()`` or '_', ``\\s`` is ``str.isspace()``. That is what
    ``nltk.wordpunct_tokenize`` matched with in the reference's environment and in the pinned nltk 3.9.2
    (nltk >= 3.10 compiles its patterns with the third-party ``regex`` module, whose classes differ on
    ~30k code points, e.g. combining marks and '²'; rre_jax follows docs/design.md 4.2: Python's classes).
    Memory: 2 x 34,816 uint32 = 272 KiB.
    """
    everything = "".join(map(chr, range(N_CODE_POINTS)))
    out = []
    for pattern in (r"\w+", r"\s+"):
        bits = np.zeros(N_CODE_POINTS, bool)
        for m in re.finditer(pattern, everything):
            bits[m.start():m.end()] = True
        out.append(np.packbits(bits, bitorder="little").view("<u4").astype(np.uint32))
    return out[0], out[1]


def table_shapes(vocab: int, token_bytes: int) -> FeatureTables:
    """The shapes and dtypes of ``feature_tables`` for a ``vocab`` x ``token_bytes`` byte table (nothing computed)."""
    C = N_CODE_POINTS // 32
    return FeatureTables(jax.ShapeDtypeStruct((vocab, token_bytes), jnp.uint8),
                         jax.ShapeDtypeStruct((vocab,), jnp.int32),
                         jax.ShapeDtypeStruct((C,), jnp.uint32), jax.ShapeDtypeStruct((C,), jnp.uint32))


def feature_tables(table: ByteTable) -> FeatureTables:
    """Device arrays for ``text_features`` (put them once; they are arguments, not jit constants)."""
    word_C, space_C = class_bitsets()
    return FeatureTables(jnp.asarray(table.bytes_VxL), jnp.asarray(table.len_V),
                         jnp.asarray(word_C), jnp.asarray(space_C))


# ----------------------------------------------------------------------------------------------- scans


def _shift(x_BxN: jax.Array, k: int, fill=0) -> jax.Array:
    """x[..., n + k] along the last axis (k > 0 looks ahead, k < 0 looks back), ``fill`` outside."""
    if k == 0:
        return x_BxN
    pad = [(0, 0)] * (x_BxN.ndim - 1) + [(0, k) if k > 0 else (-k, 0)]
    padded = jnp.pad(x_BxN, pad, constant_values=fill)
    return padded[..., k:] if k > 0 else padded[..., :k]


# ----------------------------------------------------------------------------------------------- bytes


def packed_bytes(ids_BxT, mask_BxT, bytes_VxL, len_V, max_bytes: int, total_bytes: int):
    """Gather every response's bytes into one stream of ``total_bytes`` (P) positions, rows back to back.

    Row b keeps its first min(n_bytes, max_bytes) bytes and is followed by one space, which ends any word or
    UTF-8 sequence there. Returns (bytes_P int32, seg_P: the row of each position (B past the last row),
    tok_P: flat token index b * T + t of each byte, n_bytes_B (uncut total), kept_B, off_B (row starts)).
    Byte p belongs to flat token #{(b, t) : off_b + end_bt <= p}: a scatter-add of token ends, a prefix sum.
    A token ending at the row's last kept byte is counted one position later, after the separator, so the
    separator still belongs to its row's last token and the row of every position is that count // T.
    """
    b, t = ids_BxT.shape
    len_BxT = jnp.where(mask_BxT, len_V[ids_BxT], 0)
    end_BxT = jnp.cumsum(len_BxT, axis=1)
    n_bytes_B = end_BxT[:, -1]
    kept_B = jnp.minimum(n_bytes_B, max_bytes)
    off_B = jnp.cumsum(kept_B + 1) - (kept_B + 1)
    end_kept = jnp.minimum(end_BxT, max_bytes)
    marks = off_B[:, None] + end_kept + (end_kept == kept_B[:, None])
    count_P = backend.cumsum(jnp.zeros(total_bytes, jnp.int32).at[marks.ravel()].add(1, mode="drop"))
    seg_P = jnp.minimum(count_P // t, b)
    tok_P = jnp.minimum(count_P, b * t - 1)
    off_Bp, kept_Bp = (jnp.concatenate([x, jnp.zeros(1, x.dtype)]) for x in (off_B, kept_B))
    local_P = jnp.arange(total_bytes) - off_Bp[seg_P]
    start_P = (end_BxT - len_BxT).ravel()[tok_P]
    col_P = jnp.clip(local_P - start_P, 0, bytes_VxL.shape[1] - 1)
    byte_P = bytes_VxL[ids_BxT.ravel()[tok_P], col_P].astype(jnp.int32)
    bytes_P = jnp.where(local_P < kept_Bp[seg_P], byte_P, _STRIP[1])
    return bytes_P, seg_P, tok_P, n_bytes_B, kept_B, off_B


def utf8_decode(bytes_BxN: jax.Array):
    """UTF-8 -> code points, Python ``errors='replace'`` semantics (module docstring).

    Returns (cp_BxN: code point of the unit each byte belongs to, start_BxN: first byte of a unit).
    A byte outside 0x80..0xBF always starts a unit; a continuation byte is consumed iff one of the three
    bytes before it is a lead whose run of valid continuations reaches it.
    """
    b0, b1, b2, b3 = (_shift(bytes_BxN, k) for k in range(4))
    cont = lambda x: (x & 0xC0) == 0x80  # noqa: E731
    need = 1 + ((b0 >= 0xC2) & (b0 <= 0xDF)) + 2 * ((b0 >= 0xE0) & (b0 <= 0xEF)) + 3 * ((b0 >= 0xF0) & (b0 <= 0xF4))
    lo1 = jnp.where(b0 == 0xE0, 0xA0, jnp.where(b0 == 0xF0, 0x90, 0x80))
    hi1 = jnp.where(b0 == 0xED, 0x9F, jnp.where(b0 == 0xF4, 0x8F, 0xBF))
    ok1 = (need >= 2) & (b1 >= lo1) & (b1 <= hi1)
    ok2 = ok1 & (need >= 3) & cont(b2)
    ok3 = ok2 & (need >= 4) & cont(b3)
    ulen = 1 + ok1.astype(jnp.int32) + ok2 + ok3
    c1, c2, c3 = (b1 & 0x3F, b2 & 0x3F, b3 & 0x3F)
    cp = jnp.select(
        [b0 < 0x80, (need == 1) | (ulen != need), need == 2, need == 3],
        [b0, 0xFFFD, ((b0 & 0x1F) << 6) | c1, ((b0 & 0x0F) << 12) | (c1 << 6) | c2],
        ((b0 & 0x07) << 18) | (c1 << 12) | (c2 << 6) | c3)
    by = [_shift(ulen, -k, 1) > k for k in (1, 2, 3)]  # consumed by the lead k bytes back
    cp_BxN = jnp.where(by[0], _shift(cp, -1), jnp.where(by[1], _shift(cp, -2), jnp.where(by[2], _shift(cp, -3), cp)))
    return cp_BxN.astype(jnp.int32), ~(by[0] | by[1] | by[2])


def char_class(cp_BxN, word_C, space_C):
    """WORD if ``\\w`` matches the code point, SPACE if ``\\s`` does, else OTHER."""
    bit = lambda table: (table[cp_BxN >> 5] >> (cp_BxN & 31).astype(jnp.uint32)) & 1  # noqa: E731
    return jnp.where(bit(word_C) == 1, WORD, jnp.where(bit(space_C) == 1, SPACE, OTHER)).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------- cleaning


def _occurrences(bytes_BxN, stop_strings: Sequence[str]):
    """hit_SxBxN: stop string s starts at byte n.

    The stream is read four bytes at a time (w[n] = bytes n..n+3 as one uint32, little end first), so a
    pattern of length l costs ceil(l / 4) masked word compares instead of l byte compares. Bytes past the
    stream read as 0, so a hit there may be spurious: callers keep only matches wholly inside the stream.
    """
    pad = lambda x, k: jnp.pad(x, ((0, 0), (0, k)), constant_values=0)[:, k:] if k else x  # noqa: E731
    b = bytes_BxN.astype(jnp.uint32)
    word = b | pad(b, 1) << 8 | pad(b, 2) << 16 | pad(b, 3) << 24
    hits = []
    for s in stop_strings:
        pattern = s.encode("utf-8")
        hit = jnp.ones(bytes_BxN.shape, bool)
        for j in range(0, len(pattern), 4):
            chunk = pattern[j:j + 4]
            want = int.from_bytes(chunk, "little")
            mask = (1 << (8 * len(chunk))) - 1
            w = pad(word, j)
            hit &= (w & jnp.uint32(mask)) == jnp.uint32(want)
        hits.append(hit)
    return jnp.stack(hits)


def clean_span(bytes_P, seg_P, real_P, n_rows: int, stop_strings: Sequence[str]):
    """Per-row byte span [lo, hi) of clean(r) in the packed stream, and the stream index of the cut (P if
    none). ``real_P``: the position holds a response byte (not a separator or padding).

    Stripping works on bytes because "\\n" and " " are ASCII, and ASCII bytes are always whole characters
    in UTF-8 (valid or not). A stop string counts only when it lies wholly inside the first strip, and the
    leftmost one wins, as in the reference's ``re.sub('(s1|s2|...)', STOP, r.strip("\\n "))``.
    """
    p = bytes_P.shape[0]
    pos_P = jnp.arange(p)
    seg_min = functools.partial(jax.ops.segment_min, segment_ids=seg_P, num_segments=n_rows + 1)
    seg_max = functools.partial(jax.ops.segment_max, segment_ids=seg_P, num_segments=n_rows + 1)
    keep = real_P & (bytes_P != _STRIP[0]) & (bytes_P != _STRIP[1])
    lo_R = jnp.minimum(seg_min(jnp.where(keep, pos_P, p)), p)
    cut_R = jnp.full_like(lo_R, p)
    if stop_strings:
        hi_R = jnp.maximum(seg_max(jnp.where(keep, pos_P + 1, 0)), lo_R)
        hit_SxP = _occurrences(bytes_P[None], stop_strings)[:, 0]
        size_S = jnp.asarray([len(s.encode("utf-8")) for s in stop_strings])[:, None]
        hit_SxP &= (pos_P >= lo_R[seg_P]) & (pos_P + size_S <= hi_R[seg_P])
        cut_R = jnp.minimum(seg_min(jnp.where(hit_SxP.any(0), pos_P, p)), p)
    hi_R = jnp.maximum(seg_max(jnp.where(keep & (pos_P < cut_R[seg_P]), pos_P + 1, 0)), lo_R)
    return lo_R, hi_R, cut_R


# ----------------------------------------------------------------------------------------------- words


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


# One row of seeds per independent hash (K = 2): word-character, word-length, trigram, trigram-final.
_SEEDS_Kx4 = np.array([[0x3C6EF372, 0x1B873593, 0x27D4EB2F, 0x165667B1],
                       [0x6A09E667, 0xBB67AE85, 0x510E527F, 0x9B05688C]], np.uint32)


_PACK_BITS = 31  # a word slot's (characters before it, row) share one int32 scatter when they fit in this


class Words(NamedTuple):
    """The words of a packed stream, compacted: word i of the stream (rows in order) sits in slot i."""

    hash_KxW: jax.Array  # uint32, K independent hashes of each word's code points
    row_W: jax.Array  # int32, the word's row; ``n_rows`` in the slots past the last word
    n_words_R: jax.Array  # int32 words per row


def word_hashes(cp_P, start_P, class_P, seg_P, last_R) -> Words:
    """K independent 32-bit hashes of every word of a packed stream, one slot per word (``Words``).

    A word is a maximal run of WORD or of OTHER characters (rows are separated by a space, so no word spans
    two rows). h = fmix(sum_k g(cp_k, k) ^ seed) with g(cp, k) = fmix(cp * phi ^ fmix(k + seed')), k the
    1-based index of the character in its word: two different words differ in at least one (cp, k) pair, so
    their sums differ by a non-empty signed sum of independent random values. The per-word sums are one
    scatter-add into the word slots (uint32 wraps), so no per-byte hash is ever gathered or recomputed.
    ``seg_P``: the row of each position; ``last_R``: each row's last position (rows are contiguous, in order).
    """
    p, n_rows = cp_P.shape[0], last_R.shape[0]
    in_word = class_P != SPACE
    word_start = in_word & (class_P != _shift(class_P, -1, SPACE))
    wid_P = backend.cumsum(word_start.astype(jnp.int32)) - 1  # index of the word each byte is in (or follows)
    chars_P = backend.cumsum(start_P.astype(jnp.int32))  # characters so far, inclusive
    at_start = jnp.where(word_start, wid_P, p)  # slot of the word a byte starts (p: none, dropped)
    bits = max(p - 1, 1).bit_length()
    if bits + n_rows.bit_length() <= _PACK_BITS:  # one scatter: characters before the word | row << bits
        packed_W = jnp.full(p, n_rows << bits, jnp.int32).at[at_start].set(chars_P - 1 | seg_P << bits,
                                                                          mode="drop")
        before_W, row_W = packed_W & ((1 << bits) - 1), packed_W >> bits
    else:
        before_W = jnp.zeros(p, jnp.int32).at[at_start].set(chars_P - 1, mode="drop")  # characters before it
        row_W = jnp.full(p, n_rows, jnp.int32).at[at_start].set(seg_P, mode="drop")
    k_u32 = (chars_P - before_W[jnp.maximum(wid_P, 0)]).astype(jnp.uint32)[None]  # 1-based, in words
    seeds = jnp.asarray(_SEEDS_Kx4)[:, :, None]  # K x 4 x 1
    g = _fmix32(cp_P.astype(jnp.uint32)[None] * jnp.uint32(0x9E3779B1) ^ _fmix32(k_u32 + seeds[:, 0]))
    at_char = jnp.where(start_P & in_word, wid_P, p)
    sum_KxW = jnp.zeros((g.shape[0], p), jnp.uint32).at[:, at_char].add(g, mode="drop")
    started_R = wid_P[jnp.minimum(last_R, p - 1)] + 1  # words started up to each row's last position
    n_words_R = started_R - jnp.concatenate([jnp.zeros(1, started_R.dtype), started_R[:-1]])
    return Words(_fmix32(sum_KxW ^ seeds[:, 1]), row_W, n_words_R)


def first_occurrences(keys: Sequence[jax.Array], active_N, n_slots: int | None = None):
    """first_N: position n is active and no active position before it has the same key tuple (exact).

    ``keys``: arrays [N] (any 32-bit integer dtype); a group is a tuple of equal keys. A hash table replaces a
    sort (on XLA:CPU a sort of the stream dominated the features' time, docs/benchmark_results.md): each round, every
    unresolved position scatters its index into slot ``h_r(keys) mod n_slots`` with ``min``, so a slot holds
    the lowest unresolved index that hashed there. That index is the first of its group (a group's positions
    are resolved together and share every slot), so every position whose keys equal the slot winner's is
    resolved, first iff it is the winner. Positions that lost their slot to another group try again with the
    next round's hash; each round resolves at least one group per occupied slot, so the loop ends. With
    ``n_slots`` >= 2N (the default), a round leaves a fraction ~N/2n_slots of the active positions behind.
    """
    n = active_N.shape[0]
    m = n_slots or 1 << max(int(2 * n - 1).bit_length(), 4)
    if m & (m - 1):
        raise ValueError(f"first_occurrences: n_slots must be a power of two, got {m}")
    keys = [k.astype(jnp.uint32) for k in keys]
    pos_N = jnp.arange(n, dtype=jnp.int32)

    def round_(state):
        r, todo_N, first_N = state
        h = _fmix32(r.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15))
        for k in keys:
            h = _fmix32(h ^ k) * jnp.uint32(0x85EBCA6B)
        slot_N = (_fmix32(h) & jnp.uint32(m - 1)).astype(jnp.int32)
        table_M = jnp.full((m,), n, jnp.int32).at[jnp.where(todo_N, slot_N, m)].min(pos_N, mode="drop")
        win_N = jnp.minimum(table_M[slot_N], n - 1)
        same_N = todo_N
        for k in keys:
            same_N &= k[win_N] == k
        return r + 1, todo_N & ~same_N, first_N | (same_N & (win_N == pos_N))

    init = (jnp.zeros((), jnp.int32), active_N.astype(bool), jnp.zeros((n,), bool))
    return jax.lax.while_loop(lambda s: s[1].any(), round_, init)[2]


def trigram_counts(words: Words, n_rows: int):
    """(n_trigrams_R, n_distinct_R) per row from the compacted words.

    Each trigram (three consecutive words of one row: slots i, i+1, i+2) gets K = 2 independent 32-bit
    identities t_k (fmix chain over the k-th hashes of its words); distinct (row, t_0, t_1) tuples are counted
    exactly by ``first_occurrences``. Hash collisions can only merge, and two different trigrams of one row
    merge only if both 32-bit identities collide: under the random-function model, with D distinct trigrams
    in a row, P(wrong) <= D^2 / 2^65, e.g. 7e-15 for D = 512.
    """
    h, row_W = words.hash_KxW, words.row_W
    is_tri = (row_W < n_rows) & (_shift(row_W, 2, n_rows) == row_W)
    seeds = jnp.asarray(_SEEDS_Kx4)[:, 2:, None]
    t = _fmix32(_fmix32(_fmix32(h ^ seeds[:, 0]) + _shift(h, 1) * jnp.uint32(0x9E3779B1)) ^ _shift(h, 2))
    t = _fmix32(t + seeds[:, 1])
    # Trigrams fill at most a fraction of the W slots (a word is ~4-6 bytes of text), so N slots keep the
    # table sparse: the first round settles nearly everything.
    first = first_occurrences([t[0], t[1], row_W], is_tri, 1 << max(row_W.shape[0] - 1, 15).bit_length())
    n_distinct_R = jax.ops.segment_sum(first.astype(jnp.int32), row_W, num_segments=n_rows + 1)[:n_rows]
    return jnp.maximum(words.n_words_R - 2, 0), n_distinct_R


# ----------------------------------------------------------------------------------------------- entry


def text_features(ids_BxT, mask_BxT, tables: FeatureTables, stop_strings: Sequence[str] = DEFAULT_STOPS,
                  max_bytes: int | None = None, total_bytes: int | None = None) -> Features:
    """LI, RP and the cut token of each response (docs/design.md 4.2), all on device; usable inside jit.

    ``ids_BxT``/``mask_BxT``: response tokens, right padded (masked tokens add no bytes). ``stop_strings``,
    ``max_bytes`` and ``total_bytes`` are static (Python values). The responses are packed into one stream
    of ``total_bytes`` positions (each row's min(n_bytes, max_bytes) bytes plus one separator; default
    B * (max_bytes + 1), which always fits), so the work follows the batch's real bytes: pass the batch's
    sum(min(n_bytes, max_bytes) + 1), bucketed, for speed. Rows that do not fit are flagged ``truncated_B``.
    ``cut_token_B``: index of the token holding the first byte of the first stop string (mask tokens from
    there on), or the number of response tokens if none.
    """
    stop_strings = tuple(stop_strings)
    if not all(isinstance(s, str) and s for s in stop_strings):
        raise ValueError(f"text_features: stop_strings must be non-empty strings, got {stop_strings!r}")
    mask_BxT = mask_BxT.astype(bool)
    b, t = ids_BxT.shape
    n = int(max_bytes or t * tables.bytes_VxL.shape[1])
    p = int(total_bytes or b * (n + 1))
    bytes_P, seg_P, tok_P, n_bytes_B, kept_B, off_B = packed_bytes(
        ids_BxT, mask_BxT, tables.bytes_VxL, tables.len_V, n, p)
    bytes_P = backend.materialize(bytes_P)
    cp_1xP, start_1xP = utf8_decode(bytes_P[None])
    real_P = jnp.arange(p) < jnp.concatenate([off_B + kept_B, jnp.zeros(1, off_B.dtype)])[seg_P]
    lo_R, hi_R, cut_R = clean_span(bytes_P, seg_P, real_P, b, stop_strings)
    pos_P = jnp.arange(p)
    in_span = (pos_P >= lo_R[seg_P]) & (pos_P < hi_R[seg_P])
    class_P = jnp.where(in_span, char_class(cp_1xP[0], tables.word_C, tables.space_C), SPACE)
    # One int32 per byte: code point (21 bits), unit start (bit 21), class (bits 22-23), written once.
    info_P = backend.materialize(cp_1xP[0] | start_1xP[0].astype(jnp.int32) << 21 | class_P << 22)
    cp_P, start_P, class_P = info_P & 0x1FFFFF, (info_P >> 21 & 1).astype(bool), info_P >> 22
    words = word_hashes(cp_P, start_P, class_P, seg_P, off_B + kept_B)  # each row's separator
    n_words = words.n_words_R
    n_tri, n_distinct = trigram_counts(words, b)
    cut_B = cut_R[:b]
    found = cut_B < p
    cut_token = jnp.where(found, tok_P[jnp.minimum(cut_B, p - 1)] - jnp.arange(b) * t,
                          mask_BxT.sum(1, dtype=jnp.int32))
    # n / 100 rounded once, as np.float32(n / 100): XLA turns x / 100 into x * 0.01 (an ulp off for about a
    # quarter of all n), so LI is read from a table. RP divides two runtime counts: IEEE on CPU and GPU.
    li = jnp.asarray(np.float32(np.arange(n + 1) / 100))[n_words]
    rp = jnp.where(n_tri > 0, n_distinct / jnp.maximum(n_tri, 1), 1.0).astype(jnp.float32)
    return Features(li_B=li, rp_B=rp, n_words_B=n_words, n_trigrams_B=n_tri,
                    n_distinct_B=n_distinct, cut_token_B=cut_token.astype(jnp.int32), n_bytes_B=n_bytes_B,
                    truncated_B=(n_bytes_B > n) | (off_B + kept_B > p))
