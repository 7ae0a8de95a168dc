"""rre-score: AlpacaEval outputs -> per-item proxy scores and a summary, bad input caught before any compute,
and the RER must-show: the command's numbers against a plain-Python + PyTorch port of the reference's eval."""
import json
import os
import re

import numpy as np
import pytest
import torch

import generated_prompts as gen
import reference_features as ref
from rre_jax import score_outputs
from rre_jax.cli import score as score_cmd
from rre_jax import tokenizer as tok_lib
from rre_jax.data import PromptFileError
from test_relevance import MINILM, ReferenceRelevance

torch.set_num_threads(1)

EVAL = [
    {"instruction": "Name three primary colours.", "output": "Red, yellow and blue.", "qtype": "CONSTRAINED"},
    {"instruction": "Write a poem.\n\n### Input:\nabout cats", "output": "Cats purr.", "qtype": "OPENENDED"},
    {"instruction": "Say something about café culture in Zürich — briefly.", "output": "It is cosy."},  # no qtype
    {"instruction": "What is 2 + 2?", "output": "4", "qtype": "CONSTRAINED"},
    {"instruction": "Tell me a story.", "output": "Once upon a time.", "qtype": "OPENENDED"},
]
RESPONSES = [
    "Red, yellow and blue. Red, yellow and blue.",
    "  Cats are soft,\nthey purr — “always”.\n\n### Instruction: write more",
    "Café culture in Zürich is cosy: 日本 visitors love it 🐱.",
    "",
    "Once upon a time there was a cat. The cat sat. The cat sat. The cat sat.\n\n--\nsig",
]


def write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, indent=1))
    return str(path)


@pytest.fixture
def files(tmp_path):
    outputs = [{"instruction": e["instruction"], "output": r, "generator": "m"} for e, r in zip(EVAL, RESPONSES)]
    return {"eval": write(tmp_path / "eval.json", EVAL), "outputs": write(tmp_path / "outputs.json", outputs),
            "out": str(tmp_path / "scores.json"), "dir": tmp_path}


def argv(files, reward="li_rp", *extra):
    return ["--eval-set", files["eval"], "--outputs", files["outputs"], "--reward", reward, "--out", files["out"],
            "--quiet", *extra]


def test_li_rp_scores_summary_and_files(files, capsys):
    summary = score_cmd.run(argv(files))
    assert "1 of 5 eval items have no qtype; scored as OPENENDED" in capsys.readouterr().err
    rows = json.loads(open(files["out"]).read())
    assert [r["instruction"] for r in rows] == [e["instruction"] for e in EVAL]
    assert [r["qtype"] for r in rows] == ["CONSTRAINED", "OPENENDED", "OPENENDED", "CONSTRAINED", "OPENENDED"]
    want = [ref.counts(r) for r in RESPONSES]
    assert [r["n_words"] for r in rows] == [c.n_words for c in want]
    assert [r["li"] for r in rows] == [float(np.float32(c.li)) for c in want]
    assert [r["rp"] for r in rows] == [float(np.float32(c.rp)) for c in want]
    assert rows[3]["li"] == 0.0 and rows[3]["rp"] == 1.0  # the empty response
    for r in rows:
        assert r["proxy"] == pytest.approx(r["li"] * r["rp"], rel=1e-6)
        assert r["presets"] == {"li_rp": r["proxy"]}  # what --reward composes; --counterfactual adds the others
        assert r["qr"] is r["ar"] is r["relevance"] is r["gold"] is None
    assert summary == json.loads(open(files["out"][:-5] + ".summary.json").read())
    assert summary["missing_qtype"] == {"count": 1, "filled_as": "OPENENDED"}
    assert summary["qtype_counts"] == {"OPENENDED": 3, "CONSTRAINED": 2} and summary["empty_responses"] == 1
    assert summary["features_tokenizer"] == "utf-8 bytes (identity table)"
    assert set(summary["skipped_presets"]) == {"li", "qr_li_rp", "rer", "rer_random_qtype", "rer_predicted_qtype"}
    assert summary["skipped_presets"]["li"].startswith("not requested") and summary["counterfactual"] is False
    for group, keep in (("all", rows), ("OPENENDED", [1, 2, 4]), ("CONSTRAINED", [0, 3])):
        sel = rows if group == "all" else [rows[i] for i in keep]
        means = summary["means"][group]
        assert means["n"] == len(sel) and means["relevance"] is None
        for k in ("li", "rp", "proxy", "n_words"):
            assert means[k] == pytest.approx(np.mean([r[k] for r in sel]), rel=1e-9)
        assert means["presets/li_rp"] == pytest.approx(means["proxy"], rel=1e-9)
    os.remove(files["out"])
    os.remove(files["out"][:-5] + ".summary.json")
    summary = score_cmd.run(argv(files, "li_rp", "--counterfactual"))
    with_cf = json.loads(open(files["out"]).read())
    assert [r["presets"] for r in with_cf] == [{"li": r["li"], "li_rp": r["proxy"]} for r in rows]
    assert [r["proxy"] for r in with_cf] == [r["proxy"] for r in rows]
    assert set(summary["skipped_presets"]) == {"qr_li_rp", "rer", "rer_random_qtype", "rer_predicted_qtype"}


def test_rer_encodes_only_what_it_composes_unless_counterfactual(files, monkeypatch):
    """RER without --counterfactual embeds two texts per item (the response; the query of an open-ended item, the
    reference answer of a constrained one), as the paper's scoring does; with it, three (QR and AR for all, and
    every other preset). What both compute is the same number."""
    from rre_jax import relevance
    embedded = []
    real = relevance.RelevanceEncoder.embed_texts
    monkeypatch.setattr(relevance.RelevanceEncoder, "embed_texts",
                        lambda self, texts: embedded.extend(texts) or real(self, texts))
    score_cmd.run(argv(files, "rer", "--relevance-encoder", "minilm"))
    only, n_only = json.loads(open(files["out"]).read()), len(embedded)
    embedded.clear()
    score_cmd.run(argv(files, "rer", "--relevance-encoder", "minilm", "--counterfactual", "--overwrite"))
    full, n_full = json.loads(open(files["out"]).read()), len(embedded)
    assert (n_only, n_full) == (2 * len(EVAL), 3 * len(EVAL))
    constrained = [r["qtype"] == "CONSTRAINED" for r in only]
    for a, b, c in zip(only, full, constrained):
        assert (a["qr"] is None, a["ar"] is None) == (c, not c)  # the one relevance RER reads for this item
        assert b["qr"] is not None and b["ar"] is not None
        for key in ("li", "rp", "relevance", "proxy", "n_words"):
            assert a[key] == b[key], key  # the same number, bit for bit
        assert a[("ar" if c else "qr")] == b[("ar" if c else "qr")]
        assert set(a["presets"]) == {"rer"} and set(b["presets"]) == {"li", "li_rp", "qr_li_rp", "rer",
                                                                      "rer_random_qtype"}


def test_existing_output_is_kept_without_overwrite(files):
    score_cmd.run(argv(files))
    before = open(files["out"]).read()
    write(files["dir"] / "outputs.json", [{"instruction": e["instruction"], "output": "x"} for e in EVAL])
    with pytest.raises(score_outputs.ScoreError, match=r"scores.json exists; pass --overwrite"):
        score_cmd.run(argv(files))
    assert open(files["out"]).read() == before
    os.remove(files["out"])  # a stale summary alone also blocks: both files belong to one run
    with pytest.raises(score_outputs.ScoreError, match=r"scores.summary.json exists"):
        score_cmd.run(argv(files))
    score_cmd.run(argv(files, "li_rp", "--overwrite"))
    assert [r["n_words"] for r in json.loads(open(files["out"]).read())] == [1] * 5
    assert not [p for p in os.listdir(files["dir"]) if p.endswith(".tmp")]


def test_policy_tokenizer_ids_give_the_same_features(files, tmp_path):
    """--tokenizer: features read that tokenizer's ids (SentencePiece, byte fallback) -- same LI/RP as the text."""
    tok_dir = tmp_path / "tok"
    tok_lib.train_tokenizer(RESPONSES * 4, "sentencepiece", 300, tok_dir)
    summary = score_cmd.run(argv(files, "li_rp", "--tokenizer", str(tok_dir), "--batch-size", "2"))
    rows = json.loads(open(files["out"]).read())
    assert summary["features_tokenizer"] == str(tok_dir)
    assert [(r["li"], r["rp"]) for r in rows] == [(float(np.float32(c.li)), float(np.float32(c.rp)))
                                                  for c in map(ref.counts, RESPONSES)]


def _replace(files, name, obj):
    write(files["dir"] / name, obj)


BAD = {
    "unknown qtype": ("eval.json", [{**EVAL[0], "qtype": "OPEN"}] + EVAL[1:], PromptFileError,
                      r"eval.json: item 0 \(line 2\): unknown qtype 'OPEN'; expected one of"),
    "malformed eval": ("eval.json", '[\n {"instruction": "a", "output": "b",}\n]', PromptFileError,
                       r"eval.json:2:\d+: malformed JSON at line 2"),
    "malformed outputs": ("outputs.json", '[\n {"instruction": "a"\n "output": "b"}\n]', PromptFileError,
                          r"outputs.json:3:\d+: malformed JSON at line 3"),
    "misaligned": ("outputs.json", [{"instruction": e["instruction"] if i != 2 else "Say something else " * 9,
                                     "output": "r"} for i, e in enumerate(EVAL)], score_outputs.ScoreError,
                   r"not aligned with .*eval.json: first mismatch at index 2: eval instruction 'Say something about "
                   r"café culture in Zürich — briefly.' vs outputs instruction 'Say something else Say something "
                   r"else Say something else Say something else Say \.\.\.'"),  # the first 80 characters
    "fewer outputs": ("outputs.json", [{"instruction": e["instruction"], "output": "r"} for e in EVAL[:3]],
                      score_outputs.ScoreError, r"outputs.json has 3 items but .*eval.json has 5 \(the first 3 agree\)"),
    "no output field": ("outputs.json", [{"instruction": e["instruction"]} for e in EVAL], score_outputs.ScoreError,
                        r"outputs.json: item 0 \(line 2\): field 'output' is missing"),
    "non-string output": ("outputs.json", [{"instruction": e["instruction"], "output": 3} for e in EVAL],
                          score_outputs.ScoreError, r"item 0 \(line 2\): field 'output' is a int"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_named(files, case):
    name, content, error, message = BAD[case]
    _replace(files, name, content)
    with pytest.raises(error, match=message):
        score_cmd.run(argv(files))
    assert not os.path.exists(files["out"])


def test_empty_eval_set(files):
    _replace(files, "eval.json", [])
    with pytest.raises(score_outputs.ScoreError, match="eval.json holds no items"):
        score_cmd.run(argv(files))


def test_missing_qtype_policy_error_and_relevance_without_encoder(files, tmp_path):
    with pytest.raises(PromptFileError, match=r"item 2 \(line \d+\): missing field 'qtype'"):
        score_cmd.run(argv(files, "li", "--missing-qtype", "error"))
    # checked before any file is read or model loaded: the eval set here does not even exist
    for reward in ("qr_li_rp", "rer"):
        with pytest.raises(score_outputs.ScoreError, match=f"--reward {reward} uses relevance .* no --relevance-encoder"):
            score_cmd.run(["--eval-set", str(tmp_path / "nope.json"), "--outputs", files["outputs"], "--reward", reward,
                       "--out", files["out"]])
    with pytest.raises(score_outputs.ScoreError, match="--relevance-encoder '.*no_such_dir' is not a directory"):
        score_cmd.run(argv(files, "rer", "--relevance-encoder", str(tmp_path / "no_such_dir")))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(score_outputs.ScoreError, match="empty_dir': cannot load a BERT encoder there .*no tokenizer files"):
        score_cmd.run(argv(files, "rer", "--relevance-encoder", str(tmp_path / "empty_dir")))


def test_main_exit_status_and_help(files, capsys):
    _replace(files, "eval.json", [{**EVAL[0], "qtype": "OPEN"}])
    assert score_cmd.main(argv(files)) == 2 and "rre-score: error: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        score_cmd.main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--eval-set", "--outputs", "--reward", "--relevance-encoder", "--gold-rm", "--gold-rm-tokenizer",
                 "--tokenizer", "--out", "--overwrite", "--counterfactual", "minilm", "{li,li_rp,qr_li_rp,rer,rer_random_qtype}", "summary.json"):
        assert flag in text, flag


# ------------------------------------------------------------------------------- must-show: RER end to end

ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.")


def reference_query(instruction: str) -> str:
    """The reference proxy's query recovery (docs/design.md 4.2), spelled out independently of rre_jax."""
    parts = []
    for part in instruction.replace(ALPACA_SYSTEM, "").split("### Instruction"):
        if part.strip():
            part = part.split("### Response")[0].replace("### Input:\n", " ").replace("</s>", "").replace("\n ", "\n")
            parts.append(part.replace(" : ", " ").strip("\n: ") + " ")
    return re.sub(r"\s+", " ", "".join(parts)).strip()


@pytest.mark.slow
def test_rer_end_to_end_matches_reference_on_alpaca_eval(tmp_path):
    """200 generated AlpacaEval items (Unicode, repetition, each stop string at the start, in the middle and as
    newline runs, code, lists, numbers, answers past the 512-token window, empty and whitespace-only answers),
    their reference answers as responses, real all-MiniLM-L6-v2: every value of rre-score (LI, RP, QR, AR, RER
    and the counterfactual presets) against the reference's eval, item by item (eval_monotonicity.py: raw
    instruction as query; LI/RP in plain Python on the cleaned response; relevance in torch on the response as
    given, one item per forward; _combine_scores composition)."""
    items = gen.alpaca_eval_records(210)
    torch_rel = ReferenceRelevance(MINILM, batch_size=1)
    qr = torch_rel.relevance([reference_query(x["instruction"]) for x in items], [x["output"] for x in items])
    # A relative tolerance needs reference values away from zero: where QR cancels to |QR| < 0.01 (one empty
    # response here: 0.006) 1e-4 of it is below float32 rounding of the 384-term dot product (~1e-6), so such
    # items are not compared; the rule reads the reference values only.
    keep = [i for i in range(len(items)) if abs(qr[i]) >= 0.01][:200]
    items, qr = [items[i] for i in keep], qr[keep]
    n = len(items)
    assert n == 200
    files = {"eval": write(tmp_path / "eval.json", items), "out": str(tmp_path / "scores.json"),
             "outputs": write(tmp_path / "outputs.json", [{"instruction": x["instruction"], "output": x["output"]}
                                                          for x in items])}
    summary = score_cmd.run(argv(files, "rer", "--relevance-encoder", "minilm", "--counterfactual"))
    rows = json.loads(open(files["out"]).read())
    c = [ref.counts(x["output"]) for x in items]
    constrained = [i for i, x in enumerate(items) if x["qtype"] == "CONSTRAINED"]
    # AR: reference answer vs response, here the same text (the reference's [y, y] batch has no padding)
    ar = {i: float(e @ e) for i in constrained for e in torch_rel.embed([items[i]["output"]])}
    want_rer = [ar[i] / 3.5 * (512 / 100) * c[i].rp if i in ar else c[i].li * qr[i] * c[i].rp for i in range(n)]
    want_oe = [c[i].li * qr[i] * c[i].rp for i in range(n)]

    def rel_err(got, want):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        zero = want == 0  # LI = 0 (nothing left after cleaning): the product is exactly 0
        assert (got[zero] == 0).all(), np.flatnonzero(got[zero] != 0)
        return float(np.max(np.abs(got[~zero] - want[~zero]) / np.abs(want[~zero])))

    assert [r["li"] for r in rows] == [float(np.float32(x.li)) for x in c]
    assert [r["rp"] for r in rows] == [float(np.float32(x.rp)) for x in c]
    errors = {"qr": rel_err([r["qr"] for r in rows], qr),
              "ar": rel_err([rows[i]["ar"] for i in constrained], [ar[i] for i in constrained]),
              "relevance": rel_err([r["relevance"] for r in rows], [ar.get(i, qr[i]) for i in range(n)]),
              "rer": rel_err([r["proxy"] for r in rows], want_rer),
              "qr_li_rp": rel_err([r["presets"]["qr_li_rp"] for r in rows], want_oe)}
    print("max relative error vs reference:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-4, errors
    assert summary["means"]["all"]["proxy"] == pytest.approx(np.mean(want_rer), rel=1e-4)
    assert summary["qtype_counts"]["CONSTRAINED"] == len(constrained) and 0 < len(constrained) < n
    # the items reach every branch: words cut away to nothing (LI = 0), repetition (RP < 1), long responses, and
    # responses a stop string cuts (relevance embeds them uncut, LI and RP count the cleaned text)
    assert sum(x.li == 0 for x in c) > 10 and sum(x.rp < 1 for x in c) > 10 and max(x.n_words for x in c) > 500
    assert sum(ref.cut(x["output"]) != x["output"] for x in items) > 20
