"""On-device LI / RP / cut index against the plain-Python reference (issue 3, item 1): exact parity.

Every comparison is on integers (word, trigram and distinct-trigram counts, cut token index) and on the f32
LI / RP values, which must equal ``np.float32`` of the reference's Python floats. Inputs run three ways: raw
bytes through the identity table (V = 256), and token ids of a SentencePiece-style and a byte-level BPE
tokenizer trained here on generated prompt files (tests/generated_prompts.py), compared with the reference on
``decode`` of the same ids.
Batches are bucketed to a few static shapes so each file compiles a handful of programs.
"""
import jax
import jax.numpy as jnp
import nltk
import numpy as np
import pytest

import generated_prompts as gen
import reference_features as ref
from rre_jax import features as F
from rre_jax import tokenizer as tk

FAMILIES = ("identity", "sentencepiece", "bytelevel")
BATCH = 64
_features = jax.jit(F.text_features, static_argnames=("stop_strings", "max_bytes", "total_bytes"))


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def farm():
    return gen.alpacafarm_records()


@pytest.fixture(scope="module")
def answers(farm):
    """Every reference answer (``output``) of a generated AlpacaFarm and AlpacaEval file: prose, Unicode,
    repetition, each stop string at the start / in the middle / as newline runs, over-long, empty and
    whitespace-only answers, code, lists, numbers."""
    return [x["output"] for x in farm + gen.alpaca_eval_records()]


@pytest.fixture(scope="module")
def families(farm, answers, tmp_path_factory):
    """family -> (tokenizer or None, ByteTable, FeatureTables)."""
    corpus = [x["input"] for x in farm] + answers
    root = tmp_path_factory.mktemp("tok")
    out = {"identity": (None, tk.identity_byte_table())}
    for kind in tk.KINDS:
        tok = tk.train_tokenizer(corpus, kind, 2000, root / kind)
        out[kind] = (tok, tk.byte_table(tok))
    return {k: (tok, table, F.feature_tables(table)) for k, (tok, table) in out.items()}


# ------------------------------------------------------------------------------------------- helpers


def _bucket(n_tokens: int, n_bytes: int, identity: bool) -> tuple[int, int]:
    """Two static shapes per table (each costs a compile): (T, N) = (2048, 2048) | (8192, 8192) for raw
    bytes, (512, 2048) | (2048, 8192) for token ids."""
    for t, n in ((2048, 2048), (8192, 8192)) if identity else ((512, 2048), (2048, 8192)):
        if n_tokens <= t and n_bytes <= n:
            return t, n
    raise ValueError(f"test response too long for the buckets: {n_tokens} tokens, {n_bytes} bytes")


def device_features(seqs, fam, stop_strings=F.DEFAULT_STOPS, max_bytes=None) -> dict:
    """Run ``text_features`` on id lists in padded batches of BATCH rows; fields as numpy, input order."""
    _, table, tables = fam
    lengths = [int(table.len_V[s].sum()) if len(s) else 0 for s in seqs]
    keys = [_bucket(len(s), n, table.family == "identity") for s, n in zip(seqs, lengths)]
    if max_bytes is not None:
        keys = [(t, max_bytes) for t, _ in keys]
    out = {}
    for key in sorted(set(keys)):
        rows = [i for i, k in enumerate(keys) if k == key]
        for chunk in (rows[i:i + BATCH] for i in range(0, len(rows), BATCH)):
            ids = np.zeros((BATCH, key[0]), np.int32)
            mask = np.zeros((BATCH, key[0]), bool)
            for r, i in enumerate(chunk):
                ids[r, :len(seqs[i])], mask[r, :len(seqs[i])] = seqs[i], True
            got = _features(jnp.asarray(ids), jnp.asarray(mask), tables, stop_strings=tuple(stop_strings),
                            max_bytes=key[1])
            for f, v in got._asdict().items():
                out.setdefault(f, np.zeros(len(seqs), v.dtype))[chunk] = np.asarray(v)[: len(chunk)]
    return out


def encode(fam, texts, eos: bool = True):
    """Token ids of ``texts`` (plus EOS, which adds no bytes) and the text the reference sees for them."""
    tok, table, _ = fam
    if tok is None:
        seqs = [list(t.encode("utf-8")) if isinstance(t, str) else list(t) for t in texts]
        return seqs, [table.text(s) for s in seqs]
    encoded = tok(list(texts), add_special_tokens=False)["input_ids"]
    seqs = [ids + ([tok.eos_token_id] if eos else []) for ids in encoded]
    return seqs, tok.batch_decode(seqs, skip_special_tokens=True)


_PIECES = {}


def _pieces(table: tk.ByteTable) -> list[bytes]:
    """Each token id's bytes, as Python bytes (cached per table)."""
    if id(table) not in _PIECES:
        _PIECES[id(table)] = [table.token_bytes([i]) for i in range(table.vocab_size)]
    return _PIECES[id(table)]


def assert_parity(fam, seqs, ref_texts, stop_strings=F.DEFAULT_STOPS, tokenize=nltk.wordpunct_tokenize, **kw):
    """Exact equality of every count, LI, RP (as f32) and the cut token with the reference."""
    got = device_features(seqs, fam, stop_strings, **kw)
    pieces = _pieces(fam[1])
    bad = []
    for i, (s, text) in enumerate(zip(seqs, ref_texts)):
        c = ref.counts(text, stop_strings, tokenize)
        want = dict(n_words_B=c.n_words, n_trigrams_B=c.n_trigrams, n_distinct_B=c.n_distinct,
                    li_B=np.float32(c.li), rp_B=np.float32(c.rp),
                    cut_token_B=ref.cut_token([pieces[t] for t in s], stop_strings))
        diff = {f: (got[f][i], w) for f, w in want.items() if got[f][i] != w}
        if diff:
            bad.append(f"#{i} {text[:60]!r}: (device, reference) {diff}")
    assert not bad, f"{len(bad)}/{len(seqs)} responses differ:\n" + "\n".join(bad[:5])
    assert not got["truncated_B"].any()
    return got


# ------------------------------------------------------------------------------------------- tables


def _classes_seen_by(tokenize, cps) -> tuple[np.ndarray, np.ndarray]:
    """Word / space class of each code point as ``tokenize`` reports it on 'a' + chr(cp) + ' '."""
    toks = tokenize("".join("a" + chr(c) + " " for c in cps))
    word, space = np.zeros(len(cps), bool), np.zeros(len(cps), bool)
    j = 0
    for i, c in enumerate(cps):
        if toks[j] == "a" + chr(c):
            word[i] = True
        elif toks[j + 1:j + 2] == [chr(c)]:  # 'a', chr(c): neither
            j += 1
        else:
            assert toks[j] == "a", (hex(c), toks[j:j + 3])
            space[i] = True
        j += 1
    assert j == len(toks)
    return word, space


def test_class_tables_match_the_tokenizer_on_every_code_point():
    tokenize = nltk.wordpunct_tokenize
    word_C, space_C = F.class_bitsets()
    unpack = lambda x: np.unpackbits(x.view(np.uint8), bitorder="little").astype(bool)  # noqa: E731
    word, space = unpack(word_C), unpack(space_C)
    for lo in range(0, F.N_CODE_POINTS, 1 << 16):
        cps = range(lo, min(lo + (1 << 16), F.N_CODE_POINTS))
        want_w, want_s = _classes_seen_by(tokenize, cps)
        np.testing.assert_array_equal(word[lo:lo + len(cps)], want_w, err_msg=f"\\w, block {lo:#x}")
        np.testing.assert_array_equal(space[lo:lo + len(cps)], want_s, err_msg=f"\\s, block {lo:#x}")


def test_utf8_decoding_is_python_replace():
    """Exhaustive over 1- and 2-byte strings, all 3-byte strings over boundary bytes, random longer ones."""
    edge = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xEC,
            0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]
    rng = np.random.default_rng(1)
    cases = [bytes([a]) for a in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    cases += [bytes([a, b, c]) for a in edge for b in edge for c in edge]
    cases += [rng.choice(edge + [0xE2, 0x82, 0xAC, 0x9F, 0x98], size=12).astype(np.uint8).tobytes()
              for _ in range(20000)]
    width = 16
    arr = np.full((len(cases), width), 0x20, np.int32)  # a space after each case ends any open sequence
    for i, c in enumerate(cases):
        arr[i, :len(c)] = list(c)
    cp, start = map(np.asarray, jax.jit(F.utf8_decode)(jnp.asarray(arr)))
    for i, c in enumerate(cases):
        got = cp[i, :len(c)][start[i, :len(c)]]
        assert got.tolist() == [ord(ch) for ch in c.decode("utf-8", errors="replace")], c


# ------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_answers(families, answers, family):
    fam = families[family]
    seqs, texts = encode(fam, answers)
    got = assert_parity(fam, seqs, texts)
    n_tokens = np.array([len(s) for s in seqs]) - (fam[0] is not None)  # EOS adds no bytes
    # the data exercises every path: repeated trigrams, cuts at a stop string, nothing left to count (empty,
    # whitespace-only, a stop string first), responses past the first static shape
    assert (got["rp_B"] < 1).sum() > 100 and (got["cut_token_B"] < n_tokens).sum() > 100
    assert (got["n_words_B"] == 0).sum() > 100 and got["n_words_B"].max() > 500


def _insert_stops(texts, seed):
    """Each text with 1-2 stop strings (or near misses) inserted at random places, some at the ends."""
    rng = np.random.default_rng(seed)
    near = ["\n\n-", "### Response", "### Instruction", "\n\n___", "\n\n\n", "#\n\n--"]
    out = []
    for t in texts:
        for _ in range(rng.integers(1, 3)):
            piece = (F.DEFAULT_STOPS + tuple(near))[rng.integers(0, len(F.DEFAULT_STOPS) + len(near))]
            at = [0, len(t)][rng.integers(0, 2)] if rng.random() < 0.15 else rng.integers(0, len(t) + 1)
            pad = [" ", "\n", "", " \n "][rng.integers(0, 4)]
            t = t[:at] + pad + piece + pad + t[at:]
        out.append(t)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_strings_inserted(families, answers, family):
    fam = families[family]
    texts = _insert_stops(answers, seed=FAMILIES.index(family))
    seqs, ref_texts = encode(fam, texts)
    got = assert_parity(fam, seqs, ref_texts)
    lengths = np.array([len(s) for s in seqs])
    assert (got["cut_token_B"] < lengths - (fam[0] is not None)).sum() > len(texts) // 2  # most are cut


def test_scored_text_is_the_cut_the_features_make(answers):
    """``scored_text`` cuts where clean(r) cuts (the reference's regex on the stripped text), keeps text without a
    stop string as written, is idempotent, and leaves LI / RP unchanged: features of the cut text are those of r."""
    texts = _insert_stops(answers[:300], seed=7) + ["\n\n--x", "x\n\n\n\n", "  ### Response: y", "", "plain"]
    cut = [F.scored_text(t) for t in texts]
    assert cut == [ref.cut(t) for t in texts]
    assert sum(c != t for c, t in zip(cut, texts)) > 100 and cut[-5:] == ["\n\n--x", "x\n\n\n\n", "  ", "", "plain"]
    assert [F.scored_text(c) for c in cut] == cut
    assert [ref.counts(c) for c in cut] == [ref.counts(t) for t in texts]


def test_custom_stop_strings(families, answers):
    """Stop strings are a static argument: non-ASCII ones and responses that hold none of them."""
    fam = families["sentencepiece"]
    stops = ("\n", "é", "Paris")
    texts = answers[:58] + ["Café au lait\n", "aé", "to Paris.", "no stop at all", "", "Par is"]
    seqs, ref_texts = encode(fam, texts)
    got = assert_parity(fam, seqs, ref_texts, stop_strings=stops)
    assert (got["cut_token_B"][-3:] == [len(s) for s in seqs[-3:]]).all()  # none found: every token kept


POOL = (
    # punctuation and symbols
    "—", "–", "“", "”", "‘", "’", "…", "«", "»", "•", "·", "¿", "¡", "§", "©", "™", "€", "£", "°", "±", "×",
    "→", "≥", "√", "∞", "\ufffd", "\ue000", "\ufdd0", "\U0010ffff", "Ⓐ", "‿", "⁀",
    # spaces and controls: NBSP, U+2000..U+200A, ideographic, NEL, U+001C..U+001F, separators, zero widths
    "\u00a0", *map(chr, range(0x2000, 0x200B)), "\u3000", "\u0085", "\u001c", "\u001d", "\u001e", "\u001f",
    "\u2028", "\u2029", "\u202f", "\u205f", "\u1680", "\t", "\r", "\x0b", "\x0c", "\u200b", "\u200c",
    "\u200d", "\ufeff", "\u180e",
    # accents, combining marks, ligatures, casing oddities
    "café", "naïve", "Ångström", "e\u0301", "n\u0303o", "a\u0308\u0304", "\u0301", "\u20dd", "Zürich",
    "façade", "ﬁ", "ß", "İ", "ǅ",
    # scripts
    "日本語", "中文字符", "한국어", "ｶﾀｶﾅ", "漢字かな交じり", "مرحبا", "السَّلَامُ", "٣٤٥", "नमस्ते", "हिन्दी",
    "क्षत्रिय", "०१२", "Ελληνικά", "עִברִית", "ไทย", "ქართული", "ДЖЗ", "ᄀᄂ", "ꙮ",
    # emoji: ZWJ sequences, skin tones, variation selectors, flags, keycaps
    "👨‍👩‍👧‍👦", "👍🏽", "❤️", "🏳️‍🌈", "🇫🇷", "😀😃", "1️⃣", "👩🏻‍💻", "🦜",
    # underscores, digits, numbers of other kinds
    "snake_case", "__init__", "_", "123", "3.14", "1,000", "x²", "½", "Ⅻ", "①", "mixedΑlpha", "abc123_é",
)


def _unicode_texts(n, seed=0):
    rng = np.random.default_rng(seed)
    seps = [" ", "", "", "\n", "  ", "\u00a0", "\u3000", "\u001f", ", ", "—"]
    texts = list(POOL) + ["".join(POOL), " ".join(POOL)]
    for _ in range(n):
        parts = [POOL[i] for i in rng.integers(0, len(POOL), size=rng.integers(1, 40))]
        texts.append("".join(p + seps[rng.integers(0, len(seps))] for p in parts))
    return texts


@pytest.mark.parametrize("family", FAMILIES)
def test_unicode(families, family):
    fam = families[family]
    seqs, texts = encode(fam, _unicode_texts(600))
    assert_parity(fam, seqs, texts)


def test_pinned_nltk_uses_python_classes():
    """nltk 3.9.2 (pinned) tokenizes with Python's ``re``; nltk >= 3.10 switched to ``regex``, whose classes
    differ (docs/design.md 4.2 asks for Python's). Bumping nltk must fail here, not silently change LI and RP."""
    texts = _unicode_texts(300, seed=5) + ["x\u00b2 \u00bd a\u0301b \u200d"]
    assert all(nltk.wordpunct_tokenize(t) == ref.re_wordpunct(t) for t in texts)


REPETITIVE = [
    "the cat sat " * 40, "a " * 300, "a b " * 150, "a b c " * 100, "!!! " * 50, "ab c a bc " * 30,
    "a.a.a.a.a.a.a.a.a.a", "I think I think I think that I think.", "x" * 500, ("word " * 7 + "\n") * 20,
    "no no no no no yes no no no no no", "1 2 3 1 2 3 1 2 4 1 2 3", "— — — … … …", "é e\u0301 é e\u0301 é",
    "Sure! Sure! Sure! Here is the answer: Sure! Sure!", "ab ba ab ba ab ba", "abc abd abc abd abc",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_repetition_heavy(families, family):
    fam = families[family]
    rng = np.random.default_rng(3)
    vocab = ["the", "a", "cat", "dog", ",", ".", "sat", "on", "mat", "and", "!"]
    texts = REPETITIVE + [" ".join(rng.choice(vocab, size=rng.integers(1, 300))) for _ in range(100)]
    seqs, ref_texts = encode(fam, texts)
    got = assert_parity(fam, seqs, ref_texts)
    assert got["rp_B"].min() < 0.05


def test_empty_responses(families):
    tok, table, tables = fam = families["sentencepiece"]
    texts = ["", " ", "\n \n  ", "\n\n\n\n", "### Instruction: anything", "### Response: \n\n--tail",
             " \n### Instruction:"]
    seqs, ref_texts = encode(fam, texts)
    seqs, ref_texts = seqs + [[], [tok.bos_token_id, tok.eos_token_id]], ref_texts + ["", ""]
    got = assert_parity(fam, seqs, ref_texts)
    assert (got["n_words_B"] == 0).all() and (got["li_B"] == 0).all() and (got["rp_B"] == 1).all()
    assert got["cut_token_B"].tolist()[-2:] == [0, 2]


def _random_invalid(n, seed):
    rng = np.random.default_rng(seed)
    pool = np.array(list(b"abc .,\n") + list(range(0x80, 0xC0, 7)) + [0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xED,
                    0xEF, 0xF0, 0xF4, 0xF5, 0xFF, 0xA0, 0x90, 0x8F, 0x9F])
    valid = [c.encode() for c in "é€😀日"]
    out = [b"\xe2\x82", b"\xed\xa0\x80", b"\xf0\x80\x80\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xff\xfe",
           b"ok \xe2\x82 \xe2\x82 \xe2\x82 ok", b"\x80\x80\x80 \x80\x80\x80 \x80\x80\x80 \x80\x80\x80"]
    for _ in range(n):
        parts = [bytes([int(rng.choice(pool))]) if rng.random() < 0.8 else valid[rng.integers(0, 4)]
                 for _ in range(rng.integers(0, 40))]
        out.append(b"".join(parts))
    return out


def test_invalid_utf8_bytes(families):
    fam = families["identity"]
    data = _random_invalid(1500, seed=7)
    seqs, texts = encode(fam, data)
    assert sum("\ufffd" in t for t in texts) > 1000
    assert_parity(fam, seqs, texts)


@pytest.mark.parametrize("family", tk.KINDS)
def test_invalid_utf8_token_ids(families, family):
    """Random ids (byte-fallback / byte-level pieces cut mid-character): reference on the table's text."""
    tok, table, _ = fam = families[family]
    rng = np.random.default_rng(11)
    v = table.vocab_size
    seqs = []
    for _ in range(400):
        ids = rng.integers(0, v, size=rng.integers(0, 60))
        if family == "sentencepiece":  # favour <0xNN> byte tokens (ids 3..258)
            ids = np.where(rng.random(ids.shape) < 0.6, rng.integers(3, 259, size=ids.shape), ids)
        seqs.append(ids.tolist())
    texts = [table.text(s) for s in seqs]
    assert sum("\ufffd" in t for t in texts) > 100
    if family == "bytelevel":  # here the tokenizer's own decode is the same text
        assert texts == [tok.decode(s, skip_special_tokens=True) for s in seqs]
    assert_parity(fam, seqs, texts)


# ------------------------------------------------------------------------------------------- hashing


def test_word_hashes_have_no_collisions():
    """2^18 distinct words: every 64-bit (two-hash) identity distinct, 32-bit collisions at birthday rate."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_é"  # 64 word characters
    assert len(alphabet) == 64
    words = [a + b + c for a in alphabet for b in alphabet for c in alphabet]
    rows = [" ".join(words[i:i + 4096]) for i in range(0, len(words), 4096)]
    encoded = [r.encode() for r in rows]
    data = np.full((len(rows), max(map(len, encoded))), ord(" "), np.int32)
    for i, r in enumerate(encoded):
        data[i, :len(r)] = list(r)
    word_C, space_C = map(jnp.asarray, F.class_bitsets())

    @jax.jit
    def hashes(b, seg):  # the rows packed into one stream, as text_features does
        cp, start = F.utf8_decode(b[None])
        last = jnp.arange(1, len(rows) + 1) * data.shape[1] - 1  # each row's last position
        return F.word_hashes(cp[0], start[0], F.char_class(cp, word_C, space_C)[0], seg, last)

    seg = np.repeat(np.arange(len(rows), dtype=np.int32), data.shape[1])
    got = hashes(jnp.asarray(data.ravel()), jnp.asarray(seg))
    assert np.asarray(got.n_words_R).tolist() == [4096] * len(rows)
    row_W = np.asarray(got.row_W)
    np.testing.assert_array_equal(row_W[:len(words)], np.repeat(np.arange(len(rows)), 4096))
    assert (row_W[len(words):] == len(rows)).all()
    pairs = np.asarray(got.hash_KxW)[:, :len(words)]  # K x n_words, in order
    ids64 = pairs[0].astype(np.uint64) << np.uint64(32) | pairs[1].astype(np.uint64)
    assert len(np.unique(ids64)) == len(words)
    expected = len(words) ** 2 / 2 ** 33  # birthday: ~8 colliding pairs per 32-bit hash
    for k in range(2):
        collisions = len(words) - len(np.unique(pairs[k]))
        assert collisions <= 4 * expected + 10, (k, collisions, expected)


@pytest.mark.parametrize("n_slots", [4, 64, None])
def test_first_occurrences_is_exact_under_slot_collisions(n_slots):
    """The hash-table distinct count equals NumPy's first-occurrence set, even with 4 slots for 3,000
    positions (every round loses most slots to other groups, so the loop runs many rounds)."""
    rng = np.random.default_rng(3)
    n = 3000
    a = rng.integers(0, 40, n).astype(np.uint32)  # few values: many equal keys per column
    b = rng.integers(0, 3, n).astype(np.uint32)
    row = np.sort(rng.integers(0, 7, n)).astype(np.int32)
    active = rng.random(n) < 0.8
    got = np.asarray(jax.jit(F.first_occurrences, static_argnums=2)(
        [jnp.asarray(a), jnp.asarray(b), jnp.asarray(row)], jnp.asarray(active), n_slots))
    seen, want = set(), np.zeros(n, bool)
    for i in range(n):
        if active[i] and (a[i], b[i], row[i]) not in seen:
            seen.add((a[i], b[i], row[i]))
            want[i] = True
    assert want.sum() > 500 and (active & ~want).sum() > 500  # both firsts and repeats occur
    np.testing.assert_array_equal(got, want)


def test_many_distinct_trigrams(families):
    """Long responses with thousands of trigrams, mostly distinct: counts equal the reference's set size."""
    fam = families["identity"]
    rng = np.random.default_rng(5)
    vocab = [f"w{i}" for i in range(60)] + [",", ".", "é", "日本"]
    texts = [" ".join(rng.choice(vocab, size=n)) for n in (1100, 1100, 1000, 800, 600, 400, 200, 64)]
    seqs, ref_texts = encode(fam, texts)
    got = assert_parity(fam, seqs, ref_texts)
    assert got["n_distinct_B"].max() > 1000


def test_word_slots_without_packing_give_the_same_features(families, answers, monkeypatch):
    """Batches whose stream length x rows does not fit one int32 write a word slot's character offset and row
    with two scatters instead of one packed scatter; forcing that path changes nothing."""
    fam = families["sentencepiece"]
    seqs, _ = encode(fam, answers[:BATCH])
    ids = np.zeros((BATCH, 512), np.int32)
    mask = np.zeros((BATCH, 512), bool)
    for r, s in enumerate(seqs):
        ids[r, :len(s[:512])], mask[r, :len(s[:512])] = s[:512], True

    def run():  # a fresh function each time, so the module constant is read at trace time
        return jax.jit(lambda i, m: F.text_features(i, m, fam[2], max_bytes=4096))(ids, mask)

    packed = run()
    monkeypatch.setattr(F, "_PACK_BITS", 0)
    unpacked = run()
    assert int(np.asarray(packed.n_distinct_B).sum()) > 1000
    for f, v in packed._asdict().items():
        np.testing.assert_array_equal(np.asarray(unpacked._asdict()[f]), np.asarray(v), err_msg=f)


# ------------------------------------------------------------------------------------------- contract


def test_truncation_is_flagged_and_defined(families, answers):
    """Past max_bytes the features see the first max_bytes bytes, and say so."""
    fam = families["identity"]
    texts = [t for t in answers if len(t.encode()) > 300][:64]
    seqs = [list(t.encode())[:512] for t in texts]
    got = device_features(seqs, fam, max_bytes=256)
    assert got["truncated_B"].all()
    for i, s in enumerate(seqs):
        c = ref.counts(bytes(s[:256]).decode("utf-8", errors="replace"))
        assert (got["n_words_B"][i], got["n_distinct_B"][i]) == (c.n_words, c.n_distinct)


def test_cut_token_masks_from_the_stop_string(families):
    tok, table, _ = fam = families["sentencepiece"]
    text = "First line.\n\n--\nSignature and more text"
    ids = tok.encode(text, add_special_tokens=False)
    cut = int(device_features([ids], fam)["cut_token_B"][0])
    kept, first_dropped = table.token_bytes(ids[:cut]), table.token_bytes(ids[cut:cut + 1])
    at = table.token_bytes(ids).find(b"\n\n--")  # the stop string's first byte is in the first dropped token
    assert len(kept) <= at < len(kept) + len(first_dropped)
    assert kept.strip() and "First line.".startswith(kept.decode().strip())


def test_sharded_batch_matches(families, answers):
    """The entry point runs inside jit on a batch sharded over the 8-device mesh, with the same result (4,096
    bytes a row: the first 512 tokens of a long generated answer hold more than 2,048)."""
    tok, _, tables = families["sentencepiece"]
    ids = np.zeros((BATCH, 512), np.int32)
    mask = np.zeros((BATCH, 512), bool)
    for i, e in enumerate(tok(answers[:BATCH], add_special_tokens=False)["input_ids"]):
        ids[i, :len(e[:512])], mask[i, :len(e[:512])] = e[:512], True
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    got = _features(jax.device_put(ids, sharded), jax.device_put(mask, sharded), tables, max_bytes=4096)
    assert len(got.li_B.sharding.device_set) == len(jax.devices())
    texts = tok.batch_decode([row[m].tolist() for row, m in zip(ids, mask)], skip_special_tokens=True)
    want = [ref.counts(t) for t in texts]
    assert np.asarray(got.n_words_B).tolist() == [c.n_words for c in want]
    assert np.asarray(got.n_distinct_B).tolist() == [c.n_distinct for c in want]
    assert np.asarray(got.rp_B).tolist() == [np.float32(c.rp) for c in want]


def test_tight_packed_stream(families, answers):
    """With ``total_bytes`` = the batch's exact packed length (sum of n_bytes + 1) the features equal the
    reference; with half of it, the rows that fit are still exact and the rest are flagged truncated."""
    tok, table, tables = families["sentencepiece"]
    ids = np.zeros((BATCH, 512), np.int32)
    mask = np.zeros((BATCH, 512), bool)
    for i, e in enumerate(tok(answers[:BATCH], add_special_tokens=False)["input_ids"]):
        ids[i, :len(e[:512])], mask[i, :len(e[:512])] = e[:512], True
    texts = tok.batch_decode([row[m].tolist() for row, m in zip(ids, mask)], skip_special_tokens=True)
    want = [ref.counts(t) for t in texts]
    ends = np.cumsum([len(table.token_bytes(row[m].tolist())) + 1 for row, m in zip(ids, mask)])
    for total in (int(ends[-1]), int(ends[-1]) // 2):
        got = _features(jnp.asarray(ids), jnp.asarray(mask), tables, max_bytes=4096, total_bytes=total)
        fits = ends - 1 <= total
        assert np.asarray(got.truncated_B).tolist() == (~fits).tolist()
        for f, v in (("n_words_B", "n_words"), ("n_distinct_B", "n_distinct"), ("rp_B", "rp")):
            got_f = np.asarray(getattr(got, f))[fits].tolist()
            assert got_f == [np.float32(getattr(c, v)) if v == "rp" else getattr(c, v)
                             for c, ok in zip(want, fits) if ok], (f, total)


def test_bad_arguments(families):
    tables = families["identity"][2]
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="stop_strings"):
        F.text_features(ids, ids > 0, tables, stop_strings=("",))
