"""Query-type labelling: label log-probs against transformers, the rre-label-qtype file round trip and its
agreement report, Cohen's kappa by hand, and random labels equal to the reward's 'random' source."""
import json
import pathlib

import numpy as np
import pytest

import generated_prompts as gen
from rre_jax import qtype, reward
from rre_jax.cli import label_qtype
from rre_jax.data import load_prompts

EVAL_SET = pathlib.Path(__file__).parent / "data" / "eval_prompts.json"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random Llama (no SFT: the labeller's maths does not need a trained LM) and its tokenizer."""
    from rre_jax import tiny_assets
    from rre_jax.configs import tiny as tiny_config
    cfg = tiny_config.get_config()
    cfg.model.sft_steps = 0
    return tiny_assets.ensure_assets(cfg, str(tmp_path_factory.mktemp("qtype_assets")))


@pytest.fixture(scope="module")
def labeller(assets):
    return qtype.ZeroShotLabeller(assets["policy"], batch_size=4)


def test_label_tokens_spell_the_label_words(labeller):
    queries = [qtype.query_text(r.instruction) for r in load_prompts(EVAL_SET)[:3]]
    rows = qtype.label_rows(labeller.tokenizer, queries)
    assert len(rows) == 6
    for (ids, start), word in zip(rows, list(qtype.LABEL_WORDS.values()) * 3):
        assert labeller.tokenizer.decode(ids[start:]).strip() == word.strip()
        assert labeller.tokenizer.decode(ids[:start], skip_special_tokens=True).endswith("Type:")


def test_label_logprobs_match_transformers(labeller, assets):
    """Summed label-word log-probs (JAX, bucketed batches) = transformers LlamaForCausalLM on each row alone."""
    import torch
    import transformers
    torch.set_num_threads(1)
    queries = [qtype.query_text(r.instruction) for r in load_prompts(EVAL_SET)[:5]]
    rows = qtype.label_rows(labeller.tokenizer, queries)
    got = labeller.row_logprobs(rows)
    model = transformers.LlamaForCausalLM.from_pretrained(assets["policy"], torch_dtype=torch.float32).eval()
    want = []
    for ids, start in rows:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        want.append(sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids))))
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)  # measured: 1.7e-6
    np.testing.assert_allclose(labeller.scores(queries), np.array(want[0::2]) - np.array(want[1::2]), atol=1e-4)


def test_cohen_kappa_by_hand():
    # given CONSTRAINED: 20 predicted CONSTRAINED, 5 OPENENDED; given OPENENDED: 10 CONSTRAINED, 15 OPENENDED
    given = ["CONSTRAINED"] * 25 + ["OPENENDED"] * 25
    pred = ["CONSTRAINED"] * 20 + ["OPENENDED"] * 5 + ["CONSTRAINED"] * 10 + ["OPENENDED"] * 15
    a = qtype.agreement(pred, given)
    assert a["accuracy"] == pytest.approx(0.7)  # p_o = 35/50
    assert a["cohen_kappa"] == pytest.approx((0.7 - 0.5) / 0.5)  # p_e = 0.6*0.5 + 0.4*0.5 = 0.5
    assert a["confusion"] == {"CONSTRAINED": {"CONSTRAINED": 20, "OPENENDED": 5},
                              "OPENENDED": {"CONSTRAINED": 10, "OPENENDED": 15}}


def test_cli_labels_a_file_and_reports_agreement(assets, tmp_path, capsys):
    out = tmp_path / "labelled.jsonl"
    assert label_qtype.main(["--prompts", str(EVAL_SET), "--model", assets["policy"], "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    given = [r.qtype for r in load_prompts(EVAL_SET)]
    relabelled = load_prompts(out, missing_qtype="error")  # a prompt file the trainer reads
    assert [r.instruction for r in relabelled] == [r.instruction for r in load_prompts(EVAL_SET)]
    assert [r["qtype_given"] for r in rows] == given
    assert [r.qtype for r in relabelled] == ["CONSTRAINED" if r["qtype_score"] > 0 else "OPENENDED" for r in rows]
    report = json.loads((tmp_path / "labelled.agreement.json").read_text())
    agree = report["agreement"]
    pred = [r.qtype for r in relabelled]
    assert agree["n"] == 16 and agree["accuracy"] == pytest.approx(np.mean(np.array(pred) == np.array(given)))
    assert sum(sum(row.values()) for row in agree["confusion"].values()) == 16
    assert report["prompt"] == qtype.PROMPT
    assert json.loads(capsys.readouterr().out) == agree


def test_agreement_with_given_labels_on_alpacafarm_prompts(assets, tmp_path):
    """24 generated AlpacaFarm prompts (inline contexts, Unicode, code, an over-long context) with given labels:
    the tiny LM labels every one, and the agreement with the given labels is computed and reported."""
    rows = gen.alpacafarm_records(24)
    src = tmp_path / "val24.json"
    src.write_text(json.dumps(rows))
    out = tmp_path / "val24_labelled.json"
    # the tiny tokenizer holds under 2 characters a token: the over-long context, cut at the default 2,000
    # characters, would pass the labeller's 1,024 tokens (a one-line error naming --max-query-chars)
    report = qtype.label_file(str(src), str(out), model=assets["policy"], max_query_chars=1000)
    a = report["agreement"]
    labelled = load_prompts(out, missing_qtype="error")
    pred = [r.qtype for r in labelled]
    assert [r.instruction for r in labelled] == [r["input"] for r in rows]
    assert a["n"] == 24 and a["accuracy"] == pytest.approx(np.mean([p == r["qtype"] for p, r in zip(pred, rows)]))
    assert np.isfinite(a["given_constrained"]) and len({r["qtype"] for r in rows}) == 2


def test_random_labels_are_the_reward_random_source(tmp_path):
    out = tmp_path / "random.json"
    assert label_qtype.main(["--prompts", str(EVAL_SET), "--random", "--seed", "3", "--out", str(out)]) == 0
    labels = [r.qtype for r in load_prompts(out)]
    engine_flags = reward.qtype_labels(reward.preset("rer_random_qtype"), np.zeros(16), 3)  # RewardEngine's draw
    assert labels == ["CONSTRAINED" if f else "OPENENDED" for f in engine_flags]
    assert set(labels) == {"CONSTRAINED", "OPENENDED"}
    assert qtype.random_labels(16, 3) == labels and qtype.random_labels(16, 4) != labels


def test_bad_input(assets, tmp_path, capsys):
    def fails(args, match):
        assert label_qtype.main(["--prompts", str(EVAL_SET)] + args) == 2
        assert match in capsys.readouterr().err
    fails(["--out", str(tmp_path / "a.json")], "exactly one of --model")
    fails(["--out", str(tmp_path / "a.json"), "--random", "--model", assets["policy"]], "exactly one of --model")
    fails(["--out", str(tmp_path / "a.json"), "--model", assets["gold_rm"]], "not a causal LM")
    (tmp_path / "taken.json").write_text("[]")
    fails(["--out", str(tmp_path / "taken.json"), "--random"], "pass --overwrite")
    assert (tmp_path / "taken.json").read_text() == "[]"
