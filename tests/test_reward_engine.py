"""The reward engine end to end on tiny models: features from a policy tokenizer's ids, relevance through the
encoder, composition, counterfactual specs and ``score_texts`` batching, each against a plain reference."""
import functools

import numpy as np
import pytest
import torch

import reference_features as ref
from rre_jax import features, relevance, reward, reward_engine, score_outputs
from rre_jax import tokenizer as tok_lib
from test_relevance import ReferenceRelevance, tiny_dir  # noqa: F401  (tiny random BERT fixture)

torch.set_num_threads(1)

QUERIES = ["write a poem. about cats", "what is it?", "the cats of the poem", "a b c", "list it", "who are you",
           "what is this about", "write it"]
REFERENCES = ["cats are soft and they purr", "it is a cat", "the poem is about the cats", "d e f",
              "one, two, three", "i am you", "this is about that", "it is written"]
RESPONSES = [
    "Cats are soft.\n\nThey purr! They purr! They purr!",
    "  It is — “a cat”, café, 日本, 🐱 and so on.\n",
    "the poem the poem the poem the poem\n\n### Instruction: ignore this",
    "",
    "One, two, three.\n\n--\nsignature",
    "I am you and you are me and we are all together " * 6,
    "a",
    "### Response: nothing before the stop",
]
QTYPES = np.array([0, 1, 0, 1, 1, 0, 1, 0])  # 1 = CONSTRAINED
UTF8 = score_outputs.Utf8Bytes()
SPECS = {name: reward.PRESETS[name] for name in ("li", "li_rp", "qr_li_rp", "rer", "rer_random_qtype")}


@pytest.fixture(scope="module")
def policy_tok(tmp_path_factory):
    return tok_lib.train_tokenizer(RESPONSES * 8 + QUERIES, "sentencepiece", 300, tmp_path_factory.mktemp("ptok"))


@pytest.fixture(scope="module")
def encoder(tiny_dir):  # noqa: F811
    return relevance.RelevanceEncoder.from_pretrained(tiny_dir, tokens_per_batch=1024, progress=False)


@functools.lru_cache(maxsize=None)
def _tables(tok):
    table = tok_lib.byte_table(tok) if not isinstance(tok, score_outputs.Utf8Bytes) else tok_lib.identity_byte_table()
    return features.feature_tables(table)


def make_engine(spec, counterfactual, tok, encoder=None, seed=0, relevance_text="response"):
    return reward_engine.RewardEngine(spec, counterfactual, _tables(tok), stop_strings=features.DEFAULT_STOPS,
                                      queries=QUERIES, references=REFERENCES, qtype_P=QTYPES, encoder=encoder,
                                      seed=seed, relevance_text=relevance_text)


def test_features_from_policy_tokenizer_ids_match_reference_text(policy_tok):
    """LI / RP from SentencePiece ids (tight max_bytes) and from raw UTF-8 bytes both equal the Python definition:
    stop strings cut, Unicode words, an empty response (LI 0, RP 1)."""
    want = [ref.counts(r) for r in RESPONSES]
    for tok in (policy_tok, UTF8):
        out = reward_engine.score_texts(make_engine(SPECS["li_rp"], {}, tok), tok, np.arange(8), RESPONSES, batch_size=4)
        assert out["n_words"].tolist() == [c.n_words for c in want]
        np.testing.assert_array_equal(out["li"], np.float32([c.li for c in want]))
        np.testing.assert_array_equal(out["rp"], np.float32([c.rp for c in want]))
        np.testing.assert_array_equal(out["proxy"], out["li"] * out["rp"])
    assert out["li"][3] == 0.0 and out["rp"][3] == 1.0 and out["li"][7] == 0.0


@pytest.mark.parametrize("relevance_text", ["response", "cut"])
def test_relevance_and_rer_match_reference(encoder, tiny_dir, policy_tok, relevance_text):  # noqa: F811
    """QR = E(q).E(r) and AR = E(y).E(r) on the response as written (``response``, the default: the paper's
    torch path) or cut at its first stop string (``cut``, the opt-in variant), and RER composed as the
    reference's _combine_scores from reference features (LI / RP clean the text themselves either way)."""
    engine = make_engine(SPECS["rer"], {}, policy_tok, encoder, relevance_text=relevance_text)
    out = reward_engine.score_texts(engine, policy_tok, np.arange(8), RESPONSES)
    seen = RESPONSES if relevance_text == "response" else [ref.cut(r) for r in RESPONSES]
    assert relevance_text == "response" or sum(a != b for a, b in zip(seen, RESPONSES)) == 3  # the cut matters
    torch_rel = ReferenceRelevance(tiny_dir, batch_size=1)
    qr, ar = torch_rel.relevance(QUERIES, seen), torch_rel.relevance(REFERENCES, seen)
    np.testing.assert_array_less(np.abs(out["qr"] - qr), 1e-4 * np.abs(qr))
    np.testing.assert_array_less(np.abs(out["ar"] - ar), 1e-4 * np.abs(ar))
    c = [ref.counts(r) for r in RESPONSES]
    want = [ar[i] / 3.5 * 5.12 * c[i].rp if QTYPES[i] else qr[i] * c[i].li * c[i].rp for i in range(8)]
    np.testing.assert_array_less(np.abs(out["proxy"] - want), 1e-4 * np.abs(want) + 1e-7)


def test_counterfactual_specs_at_once_equal_each_spec_alone(encoder, policy_tok):
    """One engine scoring rer plus four counterfactual presets pays each exactly what an engine with that
    preset alone pays (same features, relevance, qtype draws)."""
    cf = {n: s for n, s in SPECS.items() if n != "rer"}
    together = reward_engine.score_texts(make_engine(SPECS["rer"], cf, policy_tok, encoder, seed=7), policy_tok,
                                  np.arange(8), RESPONSES)
    assert set(together) >= {"proxy", *cf, "li", "rp", "qr", "ar"}
    for name, spec in SPECS.items():
        alone = reward_engine.score_texts(make_engine(spec, {}, policy_tok, encoder if spec.relevance else None, seed=7),
                                   policy_tok, np.arange(8), RESPONSES)
        np.testing.assert_array_equal(together["proxy" if name == "rer" else name], alone["proxy"], err_msg=name)
    # the variants really differ on this batch (so equality above is not vacuous)
    values = {n: tuple(together["proxy" if n == "rer" else n]) for n in SPECS}
    assert len(set(values.values())) == len(values)


def test_score_texts_is_independent_of_batching_and_order(policy_tok):
    engine = make_engine(SPECS["li_rp"], {}, policy_tok)
    perm = np.random.default_rng(0).permutation(8)
    a = reward_engine.score_texts(engine, policy_tok, np.arange(8), RESPONSES, batch_size=3)
    b = reward_engine.score_texts(engine, policy_tok, perm, [RESPONSES[i] for i in perm], batch_size=16)
    for k in ("li", "rp", "n_words", "proxy"):
        np.testing.assert_array_equal(a[k][perm], b[k], err_msg=k)
    with pytest.raises(ValueError, match="3 prompt indices for 8 texts"):
        reward_engine.score_texts(engine, policy_tok, np.arange(3), RESPONSES)


def test_relevance_spec_without_encoder_and_qtype_sources(policy_tok):
    with pytest.raises(ValueError, match=r"\['proxy'\] use relevance but no relevance encoder"):
        make_engine(SPECS["qr_li_rp"], {}, policy_tok)
    with pytest.raises(ValueError, match=r"\['rer'\] use relevance"):
        make_engine(SPECS["li"], {"rer": SPECS["rer"]}, policy_tok)
    with pytest.raises(ValueError, match="relevance_text='scored': choose 'response'"):
        make_engine(SPECS["li"], {}, policy_tok, relevance_text="scored")
    labels = np.array([0, 1] * 50)
    spec = SPECS["rer_random_qtype"]
    a, b, c = (reward.qtype_labels(spec, labels, s) for s in (1, 1, 2))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist() and 20 < a.sum() < 80
    assert reward.qtype_labels(SPECS["rer"], labels, 0).tolist() == (labels == 1).tolist()
    with pytest.raises(ValueError, match="predicted labels"):
        reward.qtype_labels(reward.PRESETS["rer_predicted_qtype"], labels, 0)
