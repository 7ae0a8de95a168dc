"""rre-bon end to end on the tiny policy (n = 4 samples of 8 prompts, 8 devices): the stored samples, the curves
recomputed from them with the public estimator, the report; and every bad input failing before any sampling."""
import hashlib
import json
import math
import pathlib
import re

import numpy as np
import pytest

from rre_jax.cli import bon
from rre_jax.evaluate import overoptimization as oo, store

from test_train import tiny_cfg

EVAL_SET = pathlib.Path(__file__).parent / "data" / "eval_prompts.json"
N, P = 4, 8
ARGS = ["--n", str(N), "--max-new-tokens", "16", "--batch-size", "16", "--n-boot", "100"]


def snapshot(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("bon")
    config = root / "tiny.json"
    config.write_text(tiny_cfg(assets).to_json())
    eval_set = root / "eval8.json"
    eval_set.write_text(json.dumps(json.loads(EVAL_SET.read_text())[:P]))
    return root, ["--workdir", str(root / "wd"), "--config", str(config), "--eval-set", str(eval_set)]


@pytest.fixture(scope="module")
def out(setup):
    root, common = setup
    assert bon.main(common + ARGS) == 0
    return root / "wd" / "bon" / "step_0"


def test_samples_stored_and_curves_recomputed_from_them(out):
    r = store.load_step(out / "samples", 0)
    assert len(r) == P * N and r.gold_rm_random and r.extra["best_of_n"] == {"n": N, "ks": [1, 2, 4]}
    assert all(r.instruction[p * N + j] == r.instruction[p * N] for p in range(P) for j in range(N))
    curves = json.loads((out / "curves.json").read_text())
    assert set(curves["variants"]) >= {"rer", "li", "li_rp", "qr_li_rp"} and curves["ks"] == [1, 2, 4]
    np.testing.assert_allclose(curves["d"], np.sqrt(oo.kl_bon([1, 2, 4])), rtol=1e-15)
    gold = r.gold.reshape(P, N)
    assert np.all(np.isfinite(gold)) and gold.std() > 0
    for name, v in curves["variants"].items():
        proxy = r.proxies[name].reshape(P, N)
        for j, k in enumerate(curves["ks"]):  # per prompt with the public one-prompt estimator, then the mean
            want_gold = np.mean([oo.best_of_k(proxy[p], gold[p], k) - gold[p].mean() for p in range(P)])
            want_proxy = np.mean([oo.best_of_k(proxy[p], proxy[p], k) - proxy[p].mean() for p in range(P)])
            assert abs(v["gold"]["mean"][j] - want_gold) < 1e-9 and abs(v["proxy"]["mean"][j] - want_proxy) < 1e-9
        assert v["proxy"]["mean"][0] == 0 and v["proxy"]["mean"][-1] >= v["proxy"]["mean"][1] >= 0
        fit = v["proxy"]["fit"]
        assert set(fit["ci"]) == {"alpha", "beta", "d_star", "r_star"} and math.isfinite(fit["alpha"])
        assert math.isclose(sum(b["weight_new"] for b in v["length"]["gold"]["buckets"]), 1.0)
    report = (out / "report.md").read_text()
    assert "THE GOLD RM IS A RANDOMLY INITIALISED STAND-IN" in report and "](curves.png)" in report
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_overwritten_without_overwrite(setup, out, capsys):
    root, common = setup
    before = snapshot(out)
    assert bon.main(common + ARGS) == 2 and "--overwrite" in capsys.readouterr().err
    assert snapshot(out) == before


@pytest.mark.parametrize("extra,message", [
    (["--n", "0"], "n >= 1"),
    (["--n", "4", "--k", "1,8"], r"\[8\]: every k must be in 1..n=4"),
    (["--n", "4", "--step", "7"], "holds no checkpoints/ directory"),
])
def test_bad_input_fails_before_sampling(setup, tmp_path, capsys, extra, message):
    root, common = setup
    common = [a if a != str(root / "wd") else str(tmp_path / "wd") for a in common]
    assert bon.main(common + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("rre-bon: error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not (tmp_path / "wd" / "bon").exists()


def test_preset_needing_references_on_eval_set_without_them(setup, tmp_path, capsys):
    root, common = setup
    rows = json.loads(EVAL_SET.read_text())[:4]
    rows[2]["output"] = ""
    bad = tmp_path / "no_refs.json"
    bad.write_text(json.dumps(rows))
    common = common[:-1] + [str(bad)]
    common[1] = str(tmp_path / "wd")
    assert bon.main(common + ["--n", "2"]) == 2
    err = capsys.readouterr().err
    assert "item(s) [2] have an empty 'output'" in err and "'rer'" in err
    assert not (tmp_path / "wd").exists()


def test_missing_checkpoint(setup, tmp_path, capsys):
    root, common = setup
    (tmp_path / "wd" / "checkpoints").mkdir(parents=True)
    common[1] = str(tmp_path / "wd")
    assert bon.main(common + ["--n", "2", "--step", "5"]) == 2
    assert "no checkpoints in" in capsys.readouterr().err
