"""rre_jax.evaluate: rollout store, monotonicity statistics (vs SciPy), hacking flag, report and plots."""
import json
import math

import numpy as np
import pytest
from scipy import stats

import generated_prompts as gen
from rre_jax import evaluate
from rre_jax.evaluate import monotonicity as mono
from rre_jax.evaluate import store

QTYPES = ("OPENENDED", "CONSTRAINED")


def _rows_with_means(rng, means_C, n):
    """``[C, N]`` noisy values whose row means are exactly ``means_C`` (noise is centred per row)."""
    noise = rng.normal(size=(len(means_C), n))
    return np.asarray(means_C, float)[:, None] + noise - noise.mean(-1, keepdims=True)


def make_steps(steps, gold_C, proxy_means, feature_means=None, n=24, seed=0, train_proxy="li", **kw):
    """`StepRollouts` per step whose per-checkpoint means are exactly the given series."""
    rng = np.random.default_rng(seed)
    gold = _rows_with_means(rng, gold_C, n)
    proxies = {k: _rows_with_means(rng, v, n) for k, v in proxy_means.items()}
    features = {k: _rows_with_means(rng, v, n) for k, v in (feature_means or {}).items()}
    out = []
    for c, step in enumerate(steps):
        out.append(store.StepRollouts(
            step=step, instruction=[f"Instruction {i}: é “quoted” 猫" for i in range(n)],
            response=[" ".join(["word"] * (5 + i + 3 * c)) for i in range(n)],
            qtype=[QTYPES[i % 2] for i in range(n)], proxies={k: v[c] for k, v in proxies.items()},
            gold=gold[c], features={k: v[c] for k, v in features.items()}, n_tokens=np.arange(n) + 10 * c,
            dataset=["helpful_base"] * n, train_proxy=train_proxy, gold_rm=kw.get("gold_rm", "tiny-gold"),
            gold_rm_random=kw.get("gold_rm_random", False), sampling={"temperature": 0.7, "top_p": 1.0,
                                                                      "max_new_tokens": 512}))
    return out


def write_all(root, steps):
    for s in steps:
        store.write_step(root, s)
    return root


# ---------------------------------------------------------------- store

def test_store_round_trip_keeps_every_field(tmp_path):
    (s,) = make_steps([500], [0.0], {"li": [1.0], "rer": [2.0]}, {"li": [1.0], "rp": [0.9]})
    gold = s.gold.copy()
    gold[3] = np.nan  # a prompt the gold RM could not score
    s = store.StepRollouts(**{**s.__dict__, "gold": gold, "extra": {"run": "x"}})
    path = store.write_step(tmp_path, s)
    assert path == tmp_path / "step_500"
    back = store.load_step(tmp_path, 500)
    assert back.instruction == s.instruction and back.response == s.response and back.qtype == s.qtype
    assert back.dataset == s.dataset and back.train_proxy == "li" and back.extra == {"run": "x"}
    np.testing.assert_array_equal(back.gold, gold)  # NaN -> null -> NaN
    for name in ("li", "rer"):
        np.testing.assert_array_equal(back.proxies[name], s.proxies[name])
    for name in ("li", "rp"):
        np.testing.assert_array_equal(back.features[name], s.features[name])
    np.testing.assert_array_equal(back.n_tokens, s.n_tokens)
    assert (back.gold_rm, back.gold_rm_random, back.sampling["temperature"]) == ("tiny-gold", False, 0.7)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["gold_rm"] == {"name": "tiny-gold", "random": False} and meta["n_items"] == len(s)
    row = json.loads((path / "rollouts.jsonl").read_text(encoding="utf-8").splitlines()[3])
    assert row["gold"] is None and set(row["proxy"]) == {"li", "rer"} and row["qtype"] == "CONSTRAINED"


def test_alpaca_eval_outputs_have_the_fields_alpaca_eval_reads(tmp_path):
    (s,) = make_steps([7], [0.0], {"li": [1.0]})
    outputs = json.loads((store.write_step(tmp_path, s) / "model_outputs.json").read_text(encoding="utf-8"))
    assert isinstance(outputs, list) and len(outputs) == len(s)
    for item, instruction, response in zip(outputs, s.instruction, s.response):
        assert item == {"instruction": instruction, "output": response, "generator": "rre_jax-step_7",
                        "dataset": "helpful_base"}


def test_store_refuses_to_overwrite_unless_asked(tmp_path):
    first, second = make_steps([100, 100], [0.0, 1.0], {"li": [1.0, 5.0]})
    store.write_step(tmp_path, first)
    with pytest.raises(FileExistsError, match=r"step_100.*overwrite=True \(--overwrite\)"):
        store.write_step(tmp_path, second)
    np.testing.assert_array_equal(store.load_step(tmp_path, 100).proxies["li"], first.proxies["li"])
    store.write_step(tmp_path, second, overwrite=True)
    np.testing.assert_array_equal(store.load_step(tmp_path, 100).proxies["li"], second.proxies["li"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_100"]  # no temporary debris


def test_failed_write_leaves_no_step(tmp_path, monkeypatch):
    (s,) = make_steps([3], [0.0], {"li": [1.0]})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(store, "_meta", boom)
    with pytest.raises(OSError, match="disk full"):
        store.write_step(tmp_path, s)
    assert list(tmp_path.iterdir()) == [] and store.list_steps(tmp_path) == []


def test_list_steps_is_numeric_and_ignores_partial_dirs(tmp_path):
    write_all(tmp_path, make_steps([10, 9, 1000], [0.0, 1.0, 2.0], {"li": [1.0, 2.0, 3.0]}))
    (tmp_path / ".step_11.tmp-abc").mkdir()
    (tmp_path / "step_12").mkdir()  # no meta.json: not a complete step
    assert store.list_steps(tmp_path) == [9, 10, 1000]
    assert store.list_steps(tmp_path / "absent") == []
    with pytest.raises(FileNotFoundError, match=r"step 12.*stored steps: \[9, 10, 1000\]"):
        store.load_step(tmp_path, 12)


def test_bad_rollouts_name_the_field():
    (s,) = make_steps([1], [0.0], {"li": [1.0]})
    with pytest.raises(store.StoreError, match=r"proxies\['li'\] has shape \(3,\), expected \(24,\)"):
        store.StepRollouts(**{**s.__dict__, "proxies": {"li": [1.0, 2.0, 3.0]}})
    with pytest.raises(store.StoreError, match="response has 2 items but instruction has 24"):
        store.StepRollouts(**{**s.__dict__, "response": ["a", "b"]})
    with pytest.raises(store.StoreError, match="train_proxy='rer' is not among proxies"):
        store.StepRollouts(**{**s.__dict__, "train_proxy": "rer"})


# ---------------------------------------------------------------- statistics

def test_rank_correlation_equals_scipy():
    rng = np.random.default_rng(1)
    for c in (3, 5, 10):
        x, y = rng.normal(size=c), rng.normal(size=c)
        y[0] = y[1]  # a tie
        got = mono.rank_correlation(x, y)
        rho, tau = stats.spearmanr(x, y), stats.kendalltau(x, y)
        assert (got.spearman, got.spearman_p) == (rho.statistic, rho.pvalue)
        assert (got.kendall, got.kendall_p) == (tau.statistic, tau.pvalue)


def test_vectorised_rank_statistics_equal_scipy_row_by_row():
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 4, size=(50, 7)).astype(float), rng.normal(size=(50, 7))  # many ties in x
    rho, tau = mono.spearman_rows(x, y), mono.kendall_rows(x, y)
    for b in range(50):
        np.testing.assert_allclose(rho[b], stats.spearmanr(x[b], y[b]).statistic, rtol=0, atol=1e-12)
        np.testing.assert_allclose(tau[b], stats.kendalltau(x[b], y[b]).statistic, rtol=0, atol=1e-12)
    assert np.isnan(mono.spearman_rows(np.ones((1, 7)), y[:1])).all()
    assert np.isnan(mono.kendall_rows(np.ones((1, 7)), y[:1])).all()


@pytest.mark.parametrize("x, y, reason", [
    ([1.0], [2.0], "fewer than 2 checkpoints"),
    ([], [], "fewer than 2 checkpoints"),
    ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], "proxy means are constant"),
    ([1.0, 2.0, 3.0], [5.0, 5.0, 5.0], "gold means are constant"),
    ([1.0, 2.0, 3.0], [1.0, np.nan, 3.0], "gold means are not all finite"),
])
def test_degenerate_series_give_nan_with_a_reason(x, y, reason):
    c = mono.rank_correlation(x, y)
    assert math.isnan(c.spearman) and math.isnan(c.kendall) and reason in c.reason
    boot = mono.correlate(np.array(x)[:, None] * np.ones((1, 4)), np.array(y)[:, None] * np.ones((1, 4)))
    assert math.isnan(boot.spearman) and math.isnan(boot.spearman_ci[0]) and reason in boot.reason


def test_two_checkpoints_give_a_sign_but_say_p_is_undefined():
    c = mono.rank_correlation([1.0, 2.0], [3.0, 1.0])
    assert c.spearman == pytest.approx(-1.0, abs=1e-12) and c.kendall == -1.0
    assert "at least 3 checkpoints" in c.reason


def test_bootstrap_resamples_prompts_jointly_across_checkpoints():
    rng = np.random.default_rng(3)
    value = rng.normal(size=(4, 9))
    counts = mono.bootstrap_counts(9, 5, seed=0)
    assert counts.shape == (5, 9) and (counts.sum(-1) == 9).all()
    means = mono.bootstrap_resample_means(value, counts)
    for b in range(5):  # the same prompt multiset at every checkpoint
        idx = np.repeat(np.arange(9), counts[b])
        np.testing.assert_allclose(means[b], value[:, idx].mean(-1), rtol=1e-12)


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(4)
    trend = np.array([0.0, 0.1, 0.2, 0.15, 0.3, 0.25, 0.4])
    gold, proxy = trend[:, None] + rng.normal(size=(7, 60)), trend[:, None] + rng.normal(size=(7, 60))
    a = mono.correlate(proxy, gold, n_boot=400, seed=11)
    b = mono.correlate(proxy, gold, n_boot=400, seed=11)
    c = mono.correlate(proxy, gold, n_boot=400, seed=12)
    assert a == b and a.spearman_ci != c.spearman_ci
    assert a.spearman == stats.spearmanr(proxy.mean(-1), gold.mean(-1)).statistic
    assert a.spearman_ci[0] <= a.spearman <= a.spearman_ci[1] and a.spearman_ci[0] < a.spearman_ci[1]
    assert a.kendall_ci[0] <= a.kendall <= a.kendall_ci[1]
    assert a.n_boot_valid == 400


def test_checkpoint_means_with_mask():
    v = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 9.0]])
    np.testing.assert_array_equal(mono.checkpoint_means(v), [2.0, 6.0])
    np.testing.assert_array_equal(mono.checkpoint_means(v, np.array([True, False, True])), [2.0, 6.5])
    assert np.isnan(mono.checkpoint_means(v, np.zeros(3, bool))).all()


def test_hacking_flag_fires_on_designed_series_only():
    steps = [100, 200, 300, 400, 500]
    proxy = [1.0, 2.0, 3.0, 4.0, 5.0]
    hacked = mono.hacking_flag(steps, proxy, [0.0, 1.0, 2.0, 1.5, 1.0], k=3)
    assert hacked.flagged and hacked.window_steps == (300, 400, 500)
    assert hacked.proxy_change == 2.0 and hacked.gold_change == -1.0
    assert not mono.hacking_flag(steps, proxy, [0.0, 1.0, 2.0, 3.0, 4.0], k=3).flagged  # monotone
    assert not mono.hacking_flag(steps, proxy, [0.0, 1.0, 2.0, 1.5, 1.0], k=3, min_gold_drop=1.5).flagged
    assert not mono.hacking_flag(steps, proxy, [0.0, 1.0, 2.0, 1.0, 1.2], k=3).flagged  # gold bounced back
    assert not mono.hacking_flag(steps, proxy, [0.0, 1.0, 2.0, 1.5, 1.0], k=4).flagged  # gold rose in window
    few = mono.hacking_flag(steps[:2], proxy[:2], [1.0, 0.0], k=3)
    assert not few.flagged and "needs 3 checkpoints, have 2" in few.reason


def test_length_stats_match_numpy():
    lengths = np.array([[1, 2, 3, 4, 100], [10, 10, 10, 10, 10]])
    got = mono.length_stats(lengths)
    assert got["mean"] == [22.0, 10.0] and got["median"] == [3.0, 10.0]
    assert got["p90"] == pytest.approx([np.percentile(lengths[0], 90), 10.0])
    assert mono.word_counts(["a b  c\n d", "", "  x "]).tolist() == [4, 0, 1]


# ---------------------------------------------------------------- summary and report

STEPS = [500, 1000, 1500, 2000, 2500, 3000]
GOLD = [-1.0, -0.5, 0.2, 0.4, 1.3, 2.0]


def test_designed_checkpoints_give_plus_and_minus_one(tmp_path):
    write_all(tmp_path, make_steps(
        STEPS, GOLD, {"li": [1, 2, 3, 4, 5, 6], "rer": [6, 5, 4, 3, 2, 1]},
        {"li": [1, 2, 3, 4, 5, 6], "rp": [0.9] * 6}, n=40))
    summary = evaluate.refresh_report(tmp_path, n_boot=200)
    corr = summary["correlations"]["all"]
    for name, sign in (("proxy:li", 1.0), ("proxy:rer", -1.0), ("li", 1.0)):  # +-1 up to float rounding
        assert corr[name]["spearman"] == pytest.approx(sign, abs=1e-12)
        assert corr[name]["kendall"] == pytest.approx(sign, abs=1e-12)
        lo, hi = corr[name]["spearman_ci"]
        assert lo - 1e-12 <= sign <= hi + 1e-12
    assert math.isnan(corr["rp"]["spearman"]) and "rp means are constant" in corr["rp"]["reason"]
    assert summary["series"] == ["proxy:li", "proxy:rer", "li", "rp", "gold"]  # train proxy, RER, features, gold
    assert not any(h["flagged"] for h in summary["hacking"].values())


def test_report_statistics_equal_scipy_on_the_stored_means(tmp_path):
    rng = np.random.default_rng(5)
    write_all(tmp_path, make_steps(STEPS, GOLD, {"li": rng.normal(size=6), "rer": rng.normal(size=6) + GOLD},
                                   {"qr": rng.normal(size=6)}, n=30, train_proxy="li"))
    summary = evaluate.refresh_report(tmp_path, n_boot=100)
    loaded = store.load_steps(tmp_path)
    gold_C = np.array([s.gold.mean() for s in loaded])
    for name, values in (("proxy:li", [s.proxies["li"] for s in loaded]),
                         ("proxy:rer", [s.proxies["rer"] for s in loaded]),
                         ("qr", [s.features["qr"] for s in loaded])):
        means = np.array([v.mean() for v in values])
        assert summary["means"]["all"][name] == pytest.approx(means.tolist(), rel=1e-12)
        c = summary["correlations"]["all"][name]
        rho, tau = stats.spearmanr(means, gold_C), stats.kendalltau(means, gold_C)
        assert c["spearman"] == pytest.approx(rho.statistic, abs=1e-12)
        assert c["spearman_p"] == pytest.approx(rho.pvalue, rel=1e-9)
        assert c["kendall"] == pytest.approx(tau.statistic, abs=1e-12)
        assert c["kendall_p"] == pytest.approx(tau.pvalue, rel=1e-9)
    # per query type: means over that type's prompts only
    oe = np.array([s.qtype[i] == "OPENENDED" for s in loaded[:1] for i in range(len(s))])
    assert summary["means"]["OPENENDED"]["gold"] == pytest.approx([s.gold[oe].mean() for s in loaded])
    assert summary["counts"] == {"all": 30, "CONSTRAINED": 15, "OPENENDED": 15}
    assert summary["lengths"]["tokens"]["mean"] == pytest.approx([14.5 + 10 * c for c in range(6)])

    report = (tmp_path / "report.md").read_text()
    li = summary["correlations"]["all"]["proxy:li"]
    assert f"Spearman {li['spearman']:.4g}" in report and f"Kendall {li['kendall']:.4g}" in report
    assert "tiny-gold" in report and "RANDOM" not in report
    assert f"| 500 | {summary['means']['all']['proxy:li'][0]:.4g} |" in report
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["correlations"]["all"]["qr"]["spearman"] == pytest.approx(
        summary["correlations"]["all"]["qr"]["spearman"])
    for png in ("proxy_vs_gold.png", "series.png", "length_hist.png"):
        data = (tmp_path / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"plots/{png}" in report


def test_report_flags_hacking_and_random_gold_loudly(tmp_path):
    write_all(tmp_path, make_steps(STEPS, [0.0, 1.0, 2.0, 3.0, 2.5, 2.0], {"li": [1, 2, 3, 4, 5, 6]},
                                   gold_rm="random-llama", gold_rm_random=True))
    summary = evaluate.refresh_report(tmp_path, n_boot=50, k=3)
    assert summary["hacking"]["proxy:li"]["flagged"] and summary["gold_rm"]["random"]
    report = (tmp_path / "report.md").read_text()
    assert report.index("WARNING: THE GOLD RM IS A RANDOMLY INITIALISED STAND-IN") < report.index("## Verdict")
    assert "REWARD HACKING FLAG" in report and "steps 2000, 2500, 3000 the proxy rose by 2" in report


def test_report_with_one_or_no_checkpoint_does_not_crash(tmp_path):
    assert evaluate.refresh_report(tmp_path / "empty")["steps"] == []
    assert "No stored checkpoints" in (tmp_path / "empty" / "report.md").read_text()
    write_all(tmp_path / "one", make_steps([500], [1.0], {"li": [2.0]}))
    summary = evaluate.refresh_report(tmp_path / "one", n_boot=10)
    assert "fewer than 2 checkpoints" in summary["correlations"]["all"]["proxy:li"]["reason"]
    assert "n/a" in (tmp_path / "one" / "report.md").read_text()
    assert (tmp_path / "one" / "plots" / "proxy_vs_gold.png").is_file()


def test_steps_with_different_prompts_are_refused(tmp_path):
    a, = make_steps([1], [0.0], {"li": [1.0]}, n=5)
    b, = make_steps([2], [0.0], {"li": [1.0]}, n=6)
    write_all(tmp_path, [a, b])
    with pytest.raises(ValueError, match="step 2 holds different eval prompts from step 1"):
        evaluate.refresh_report(tmp_path)


def test_alpaca_eval_sized_prompts_round_trip(tmp_path):
    """805 generated AlpacaEval items (Unicode, code, stop strings, long, empty and whitespace-only texts) through
    the store and the report."""
    records = gen.alpaca_eval_records(805)
    n = len(records)
    counts = {q: sum(r["qtype"] == q for r in records) for q in QTYPES}
    rng = np.random.default_rng(0)
    for c, step in enumerate([500, 1000, 1500]):
        words = np.array([len(r["output"].split()) for r in records])
        store.write_step(tmp_path, store.StepRollouts(
            step=step, instruction=[r["instruction"] for r in records], response=[r["output"] for r in records],
            qtype=[r["qtype"] for r in records], dataset=[r["dataset"] for r in records],
            proxies={"rer": words / 100 + c}, features={"li": words / 100 + c}, gold=rng.normal(size=n) + c,
            train_proxy="rer", gold_rm="Nexusflow/Starling-RM-34B"))
    outputs = json.loads((tmp_path / "step_1000" / "model_outputs.json").read_text(encoding="utf-8"))
    assert [o["instruction"] for o in outputs] == [r["instruction"] for r in records]
    assert [o["output"] for o in outputs] == [r["output"] for r in records]
    assert store.load_step(tmp_path, 1500).response == tuple(r["output"] for r in records)
    summary = evaluate.refresh_report(tmp_path, n_boot=200)
    assert summary["counts"] == {"all": 805, **counts} and min(counts.values()) > 0
    assert summary["correlations"]["all"]["proxy:rer"]["spearman"] == pytest.approx(1.0, abs=1e-12)
