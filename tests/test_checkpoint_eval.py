"""rre-eval / rre-alignment-tax end to end on the tiny config: a 10-step run with 5 checkpoints, evaluated on 16
prompts; the report against SciPy, the AlpacaEval outputs, rescoring the store, dev-eval metrics, bad input."""
import hashlib
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
from scipy import stats

from rre_jax import alignment_tax as at, checkpoint_eval, metrics, programs, rollout, text_scoring, train
from rre_jax.cli import alignment_tax as tax_cmd, common as cli_common, eval as eval_cmd
from rre_jax.data import load_prompts

from test_train import tiny_cfg

DATA = pathlib.Path(__file__).parent / "data"
EVAL_SET = DATA / "eval_prompts.json"
TASKS = DATA / "natural_instructions"
STEPS = [2, 4, 6, 8, 10]
EVAL_ARGS = ["--max-new-tokens", "16", "--batch-size", "8", "--n-boot", "200"]


@pytest.fixture(scope="module")
def workdir(assets, tmp_path_factory):  # noqa: F811
    """rre-train's run (tiny, 10 steps, a checkpoint + dev eval every 2), then rre-eval over its 5 checkpoints."""
    wd = tmp_path_factory.mktemp("e2e")
    cfg = tiny_cfg(assets, **{"train.steps": 10, "train.save_freq": 2, "train.dev_size": 4,
                              "sampling.max_new_tokens": 16, "ppo.ppo_epochs": 1,
                              "mesh.shape": (1, 1, 1), "mesh.num_devices": 1})
    train.run(cfg, str(wd))
    assert eval_cmd.main(["--workdir", str(wd), "--eval-set", str(EVAL_SET)] + EVAL_ARGS) == 0
    return wd


def rollout_rows(wd, step):
    lines = (wd / "eval" / f"step_{step}" / "rollouts.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def snapshot(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(root).rglob("*")) if p.is_file()}


def test_report_and_plots(workdir):
    summary = json.loads((workdir / "eval" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["n_items"] == 16
    assert summary["train_proxy"] == "rer" and summary["gold_rm"]["random"] is True
    for name in ("proxy:rer", "proxy:li", "li", "rp", "qr", "ar", "gold"):
        assert name in summary["series"]
    report = (workdir / "eval" / "report.md").read_text()
    assert "THE GOLD RM IS A RANDOMLY INITIALISED STAND-IN" in report
    for png in re.findall(r"\]\((plots/[a-z_]+\.png)\)", report) or pytest.fail("report links no plot"):
        data = (workdir / "eval" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    meta = json.loads((workdir / "eval" / "step_10" / "meta.json").read_text())
    assert meta["sampling"] == {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "max_new_tokens": 16, "greedy": False,
                                "seed": 0}
    assert meta["gold_rm"]["random"] is True and meta["gold_rm"]["name"].endswith("gold_rm")
    assert len(meta["extra"]["gold_rm_fingerprint"]) == 16
    assert set(meta["extra"]["reward_specs"]) == set(meta["proxies"])


def test_report_numbers_equal_scipy_on_the_stored_rollouts(workdir):
    """Per-checkpoint means recomputed from rollouts.jsonl -> scipy.stats = summary.json = report.md's tables."""
    rows = {s: rollout_rows(workdir, s) for s in STEPS}
    summary = json.loads((workdir / "eval" / "summary.json").read_text())
    report = (workdir / "eval" / "report.md").read_text()
    qtypes = [r["qtype"] for r in rows[2]]
    groups = {"all": [True] * 16} | {q: [t == q for t in qtypes] for q in ("OPENENDED", "CONSTRAINED")}

    def value(row, name):
        return row["proxy"][name[6:]] if name.startswith("proxy:") else row[name]

    checked = 0
    for group, keep in groups.items():
        mean = {name: np.array([np.mean([value(r, name) for r, k in zip(rows[s], keep) if k]) for s in STEPS])
                for name in summary["series"]}
        section = report.split(f"### Correlation of each series with gold across checkpoints ({group})")[1]
        for name in summary["series"]:
            np.testing.assert_allclose(summary["means"][group][name], mean[name], rtol=1e-12, err_msg=name)
            if name == "gold" or np.ptp(mean[name]) == 0:
                continue
            got = summary["correlations"][group][name]
            rho, tau = stats.spearmanr(mean[name], mean["gold"]), stats.kendalltau(mean[name], mean["gold"])
            assert got["spearman"] == pytest.approx(rho.statistic, abs=1e-12), (group, name)
            assert got["spearman_p"] == pytest.approx(rho.pvalue, abs=1e-12), (group, name)
            assert got["kendall"] == pytest.approx(tau.statistic, abs=1e-12), (group, name)
            assert got["kendall_p"] == pytest.approx(tau.pvalue, abs=1e-12), (group, name)
            line = next(ln for ln in section.splitlines() if ln.startswith(f"| {name.replace('proxy:', 'proxy ')} |"))
            cells = [c.strip() for c in line.split("|")[1:-1]]
            assert cells[1:3] == [f"{rho.statistic:.4g}", f"{rho.pvalue:.4g}"], line
            assert cells[4:6] == [f"{tau.statistic:.4g}", f"{tau.pvalue:.4g}"], line
            checked += 1
    assert checked >= 10


def test_outputs_load_as_alpaca_eval_model_outputs(workdir):
    instructions = [r.instruction for r in load_prompts(EVAL_SET)]
    for step in STEPS:
        outputs = json.loads((workdir / "eval" / f"step_{step}" / "model_outputs.json").read_text())
        assert isinstance(outputs, list) and len(outputs) == 16
        assert all(set(o) == {"instruction", "output", "generator", "dataset"} for o in outputs)
        assert all(isinstance(o[k], str) for o in outputs for k in o)
        assert [o["instruction"] for o in outputs] == instructions
        assert {o["generator"] for o in outputs} == {f"tiny-step_{step}"}
        assert [o["output"] for o in outputs] == [r["response"] for r in rollout_rows(workdir, step)]
    assert any(o["output"] for o in outputs), "every response is empty"


def test_rescoring_the_store_reproduces_every_component(workdir):
    """The stored responses, re-tokenized and scored by text_scoring.score_texts, give the stored scores back."""
    from rre_jax import checkpoint, evaluate
    ckpt = checkpoint.CheckpointManager(str(workdir))
    config = checkpoint_eval.config_from_checkpoint(ckpt, 10)
    spec, mesh, paths, tokenizer = train.open_basics(config, str(workdir))
    assert "cf/rer" in spec.counterfactual or config.reward.preset == "rer"  # validate adds RER
    engine = train.reward_engine(config, spec, mesh, tokenizer, len(tokenizer), load_prompts(EVAL_SET))
    for stored in evaluate.load_steps(workdir / "eval"):
        got = text_scoring.score_texts(engine, tokenizer, np.arange(16), stored.response, batch_size=16)
        np.testing.assert_array_equal(got["li"], stored.features["li"].astype(np.float32))
        np.testing.assert_array_equal(got["rp"], stored.features["rp"].astype(np.float32))
        for k in ("qr", "ar"):
            np.testing.assert_allclose(got[k], stored.features[k], atol=1e-5, rtol=0, err_msg=k)
        for name, v in checkpoint_eval.proxy_scores(got, "rer").items():
            np.testing.assert_allclose(v, stored.proxies[name], atol=1e-5, rtol=1e-5, err_msg=name)


ONE_TEXT = "Cats purr and sleep all day long.\n\n### Instruction: now write about dogs, dogs and dogs"


def test_dev_eval_rre_eval_and_rre_score_score_one_text_alike(workdir, tmp_path, monkeypatch):
    """Every row samples ONE_TEXT (a response holding a stop string). Training's dev eval and rre-eval store its
    cut (``features.scored_text``), and they and rre-score on that stored text give the same li, rp, qr, ar and
    proxies. A PPO step's reward scores relevance on the uncut text, as the reference's training does."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from rre_jax import evaluate, features
    from rre_jax.cli import score as score_cmd
    from rre_jax.data import batching
    plan = checkpoint_eval.plan_eval(str(workdir), str(EVAL_SET), steps=[10], out=str(tmp_path / "eval"),
                                     batch_size=8, max_new_tokens=16, n_boot=10)
    state, _ = train.restore(plan.run, plan.ckpt, 10)  # before run_eval, which closes the checkpoints
    tok = plan.run.tokenizer
    row = tok(ONE_TEXT, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def fixed_sampler(scfg, group=1):  # stands in for the run's sampler program (programs.RunPrograms.sampler)
        def sample(params, ids_BxT, mask_BxT, rng, lora):
            put = lambda x: jax.device_put(np.asarray(x), ids_BxT.sharding)  # noqa: E731
            B = ids_BxT.shape[0]
            return rollout.Rollout(put(np.tile(np.int32(row), (B, 1))), put(np.ones((B, len(row)), np.int32)),
                                   put(np.zeros((B, len(row)), np.float32)), jnp.full(B, len(row), jnp.int32),
                                   np.int32(len(row)))
        return sample
    monkeypatch.setattr(plan.run.programs, "sampler", fixed_sampler)
    checkpoint_eval.run_eval(plan, progress=False)
    train.dev_eval(dataclasses.replace(plan.run, workdir=str(tmp_path / "run")), state, 10)
    stored = {"rre-eval": evaluate.load_step(tmp_path / "eval", 10),
              "dev eval": evaluate.load_step(tmp_path / "run" / "dev_eval", 10)}
    cut = features.scored_text(ONE_TEXT)
    assert cut == "Cats purr and sleep all day long.\n\n"
    for name, s in stored.items():
        assert list(s.response) == [cut] * 16, (name, len(s.response), s.response[:2])
    outputs = tmp_path / "eval" / "step_10" / "model_outputs.json"
    score_cmd.run(["--eval-set", str(EVAL_SET), "--outputs", str(outputs), "--reward", "rer", "--quiet",
               "--relevance-encoder", "minilm", "--tokenizer", plan.run.paths["tokenizer"],
               "--out", str(tmp_path / "scores.json")])
    rows = json.loads((tmp_path / "scores.json").read_text())
    got = {k: np.array([r[k] for r in rows], np.float32) for k in ("li", "rp", "qr", "ar")}
    got.update({f"proxy:{n}": np.array([r["presets"][n] for r in rows], np.float32) for n in ("li", "qr_li_rp")})
    open_ended = np.array([r["qtype"] == "OPENENDED" for r in rows])  # RER's AR branch scales with max_new_tokens:
    got["proxy:rer"] = np.array([r["proxy"] for r in rows], np.float32)[open_ended]  # 512 here, 16 in the run
    for name, s in stored.items():
        want = {**{k: s.features[k].astype(np.float32) for k in ("li", "rp", "qr", "ar")},
                **{f"proxy:{n}": s.proxies[n].astype(np.float32) for n in ("li", "qr_li_rp")},
                "proxy:rer": s.proxies["rer"].astype(np.float32)[open_ended]}
        for k, v in want.items():  # one encoder, one text: packed relevance is bit-identical however batched
            np.testing.assert_array_equal(got[k], v, err_msg=f"rre-score vs {name}: {k}")
    b = next(iter(batching.eval_batches(plan.run.dev.prompts, plan.run.dev.batching)))
    glob = plan.run.to_global
    _, _, comps, texts, _ = train.sample_and_score(plan.run, state, glob(b.ids_BxT), glob(b.mask_BxT), b.index_B,
                                                   jax.random.key(0), plan.scfg)
    assert texts == [cut] * 8
    rows_B = np.asarray(b.index_B)
    np.testing.assert_array_equal(comps["li"], got["li"][rows_B])
    assert np.all(comps["qr"] != got["qr"][rows_B])  # the PPO reward's relevance saw the uncut text


def test_training_logs_monotonicity_so_far(workdir):
    rows = {}
    for row in metrics.read_metrics(str(workdir)):
        rows.setdefault(row["step"], {}).update(row)
    summary = json.loads((workdir / "dev_eval" / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert rows[2]["eval/monotonicity_spearman_rer"] is None  # one checkpoint: undefined, logged as null
    for name in ("train", "rer"):
        for stat in ("spearman", "kendall"):
            want = summary["correlations"]["all"][f"proxy:{name}"][stat]
            assert rows[10][f"eval/monotonicity_{stat}_{name}"] == pytest.approx(want, abs=1e-12)
    assert (workdir / "dev_eval" / "report.md").exists()


@pytest.fixture
def no_sampling(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("sampled despite bad input")
    monkeypatch.setattr(train, "sample_and_score", fail)
    monkeypatch.setattr(programs.RunPrograms, "sampler", fail)


def _bad(workdir, capsys, extra, eval_set=EVAL_SET):
    before = snapshot(workdir / "eval")
    assert eval_cmd.main(["--workdir", str(workdir), "--eval-set", str(eval_set)] + EVAL_ARGS + extra) == 2
    assert snapshot(workdir / "eval") == before, "bad input changed the stored eval"
    return capsys.readouterr().err


def test_bad_input_fails_before_sampling_and_writes_nothing(workdir, tmp_path, capsys, assets, no_sampling):  # noqa: F811
    assert eval_cmd.main(["--workdir", str(tmp_path / "typo"), "--eval-set", str(EVAL_SET)]) == 2
    assert "holds no checkpoints/ directory" in capsys.readouterr().err and not (tmp_path / "typo").exists()
    err = _bad(workdir, capsys, ["--steps", "3,4"])
    assert "no checkpoint for step(s) [3]" in err and "saved steps: [2, 4, 6, 8, 10]" in err
    (tmp_path / "empty.json").write_text("[]")
    assert "holds no prompts" in _bad(workdir, capsys, ["--out", str(tmp_path / "o")], tmp_path / "empty.json")
    err = _bad(workdir, capsys, ["--steps", "10"])
    assert "already holds the eval of step(s) [10]" in err and "--overwrite" in err
    few = tmp_path / "eight.json"
    few.write_text(json.dumps(json.loads(EVAL_SET.read_text())[:8]))
    err = _bad(workdir, capsys, ["--steps", "2", "--overwrite"], few)
    assert "step_4 holds 16 outputs of other prompts than the 8 of this eval set" in err
    gold = tmp_path / "gold_no_tokenizer"
    gold.mkdir()
    for name in ("config.json", "model.safetensors", "rre_tiny.json"):
        shutil.copy(pathlib.Path(assets["gold_rm"]) / name, gold / name)
    err = _bad(workdir, capsys, ["--out", str(tmp_path / "g"), f"--config.gold_rm.path={gold}"])
    assert "gold RM tokenizer not found" in err and "gold_rm.tokenizer" in err
    assert not (tmp_path / "g").exists() or not list((tmp_path / "g").glob("step_*"))
    err = _bad(workdir, capsys, ["--out", str(tmp_path / "k"), "--config.gold_rm.pth=/x"])
    assert "no field 'pth'" in err and "'path'" in err


def test_rerun_with_overwrite_reproduces_the_step(workdir):
    """Same seed, same checkpoint, restored onto an 8-device mesh (trained and first evaluated on 1 device):
    --overwrite rewrites step 10 with the same responses and scores."""
    before = rollout_rows(workdir, 10)
    assert eval_cmd.main(["--workdir", str(workdir), "--eval-set", str(EVAL_SET), "--steps", "10", "--overwrite",
                          "--config.mesh.num_devices=0", "--config.mesh.shape=(-1, 1, 1)"] + EVAL_ARGS) == 0
    assert rollout_rows(workdir, 10) == before


def test_alignment_tax_is_greedy_superni_rouge_of_the_checkpoint(workdir, tmp_path):
    """Predictions equal transformers' greedy decode of the step-10 policy; metrics equal alignment_tax.evaluate."""
    import torch
    import transformers

    from rre_jax import policy
    from rre_jax.models import llama
    out = tmp_path / "tax.jsonl"
    plan = checkpoint_eval.plan_alignment_tax(str(workdir), 10, str(TASKS), max_instances=3, max_new_tokens=8,
                                       batch_size=8, out=str(out))
    result = checkpoint_eval.run_alignment_tax(plan)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    instances = at.load_tasks(TASKS, max_instances_per_task=3)
    assert [r["id"] for r in rows] == [i.id for i in instances]
    predictions = [r["prediction"] for r in rows]
    want = at.evaluate(instances, predictions)
    assert result["rougeL"] == pytest.approx(want["rougeL"], abs=1e-12)
    assert json.loads(out.with_suffix(".metrics.json").read_text())["rougeL"] == pytest.approx(want["rougeL"])

    params, adapters = policy.export_params(plan.run.policy, plan.state["trainable"], plan.run.frozen)
    llama.export_pretrained(str(tmp_path / "hf"), plan.run.policy.cfg, params, lora=adapters,
                            lora_cfg=plan.run.policy.lora_cfg)
    torch.set_num_threads(1)
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    tok = plan.run.tokenizer
    for prompt, got in zip(at.build_prompts(instances), predictions):
        ids = torch.tensor([tok(prompt, truncation=True, max_length=512)["input_ids"]])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert got == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)


def test_alignment_tax_bad_input(workdir, tmp_path, capsys, no_sampling):
    args = ["--workdir", str(workdir), "--tasks-dir", str(TASKS)]
    assert tax_cmd.main(args + ["--step", "5"]) == 2
    assert "no checkpoint for step(s) [5]" in capsys.readouterr().err
    assert tax_cmd.main(["--workdir", str(workdir), "--step", "10", "--tasks-dir", str(tmp_path)]) == 2
    assert "test_tasks.txt is missing" in capsys.readouterr().err
    (tmp_path / "taken.jsonl").write_text("{}\n")
    assert tax_cmd.main(args + ["--step", "10", "--out", str(tmp_path / "taken.jsonl")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "taken.jsonl").read_text() == "{}\n"


def test_config_file_and_overrides_on_the_command_line():
    parser = eval_cmd.build_parser()
    args, config, overrides = cli_common.parse(parser, [
        "--workdir", "w", "--eval-set", "e.json", "--config", str(pathlib.Path(__file__).parents[1] / "configs" /
                                                                  "tiny.py") + ":li",
        "--config.mesh.shape=(2, 2, 2)", "--config.gold_rm.path=123", "--config.train.dev_size", "4"])
    assert config.reward.preset == "li" and args.workdir == "w"
    checkpoint_eval.apply_overrides(config, overrides)
    assert tuple(config.mesh.shape) == (2, 2, 2) and config.gold_rm.path == "123" and config.train.dev_size == 4
    with pytest.raises(ValueError, match="--config.train.dev_size='many'"):
        checkpoint_eval.apply_overrides(config, [("train.dev_size", "many")])
    with pytest.raises(ValueError, match="config.gold_rm has no field 'pth'"):
        checkpoint_eval.apply_overrides(config, [("gold_rm.pth", "/x")])


def test_rre_score_on_the_written_outputs_reproduces_the_store(workdir, assets, tmp_path):  # noqa: F811
    """rre-score on step 10's model_outputs.json (policy tokenizer, MiniLM, the run's gold RM) gives the stored
    features, gold and length-only presets back. (RER's CONSTRAINED branch scales with max_new_tokens, which
    rre-score fixes at 512 and the run's spec takes from its training config, so RER is compared on OPENENDED.)"""
    from rre_jax import evaluate
    from rre_jax.cli import score as score_cmd
    stored = evaluate.load_step(workdir / "eval", 10)
    out = tmp_path / "scores.json"
    score_cmd.run(["--eval-set", str(EVAL_SET), "--outputs", str(workdir / "eval" / "step_10" / "model_outputs.json"),
               "--reward", "rer", "--relevance-encoder", "minilm", "--tokenizer", assets["tokenizer"],
               "--gold-rm", assets["gold_rm"], "--out", str(out), "--quiet"])
    rows = json.loads(out.read_text())
    col = lambda k: np.array([r[k] for r in rows], np.float64)  # noqa: E731
    np.testing.assert_array_equal(col("li"), stored.features["li"])
    np.testing.assert_array_equal(col("rp"), stored.features["rp"])
    for k in ("qr", "ar"):
        np.testing.assert_allclose(col(k), stored.features[k], atol=1e-5, rtol=0, err_msg=k)
    np.testing.assert_allclose(col("gold"), stored.gold, atol=1e-5, rtol=0)
    for name in ("li", "li_rp", "qr_li_rp"):
        np.testing.assert_allclose([r["presets"][name] for r in rows], stored.proxies[name], atol=1e-5, rtol=1e-5)
    open_ended = np.array([q == "OPENENDED" for q in stored.qtype])
    np.testing.assert_allclose(col("proxy")[open_ended], stored.proxies["rer"][open_ended], atol=1e-5, rtol=1e-5)


def test_sampled_kl_per_checkpoint_and_rl_curves(workdir, tmp_path):
    """Every step records its sampled KL with its standard error; step 0 (the initial policy, added with
    --steps 0 --skip-existing) anchors d = 0 and the report gains the RL overoptimization curves."""
    from rre_jax import sampled_kl
    out = tmp_path / "eval"
    shutil.copytree(workdir / "eval", out)
    report = (out / "report.md").read_text()
    assert "no d = 0 anchor" in report and "rre-eval --steps 0 --skip-existing" in report
    assert eval_cmd.main(["--workdir", str(workdir), "--eval-set", str(EVAL_SET), "--steps", "0",
                          "--skip-existing", "--out", str(out)] + EVAL_ARGS) == 0
    curves = json.loads((out / "rl_curves.json").read_text())
    assert curves["steps"] == [0] + STEPS and curves["sampling"]["temperature"] == 0.7
    for c, step in enumerate(curves["steps"]):
        kl = json.loads((out / f"step_{step}" / "meta.json").read_text())["extra"]["kl"]
        assert len(kl["log_ratio"]) == 16 and kl == {**sampled_kl.estimate(kl["log_ratio"]),
                                                     "log_ratio": kl["log_ratio"]}
        assert curves["kl"][c] == kl["kl"] and curves["kl_stderr"][c] == kl["stderr"]
    assert curves["kl"][0] == 0.0  # LoRA adapters start at B = 0: the initial policy is its reference, exactly
    assert all(k > 0 and s > 0 for k, s in zip(curves["kl"][1:], curves["kl_stderr"][1:]))
    np.testing.assert_allclose(curves["d"], np.sqrt(np.maximum(curves["kl"], 0)), rtol=1e-12)
    gold = [np.mean([r["gold"] for r in rollout_rows(tmp_path, s)]) for s in curves["steps"]]
    np.testing.assert_allclose(curves["variants"]["gold"]["mean"], np.subtract(gold, gold[0]), atol=1e-9)
    assert {"gold", "rer", "li"} <= set(curves["variants"]) and "overoptimized" in curves
    report = (out / "report.md").read_text()
    assert "## Overoptimization curves (RL checkpoints)" in report and "](plots/rl_curves.png)" in report
    assert (out / "plots" / "rl_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
