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

from rre_jax import alignment_tax as at, assemble, checkpoint_eval, metrics, programs, rollout, run_spec
from rre_jax import reward_engine, train
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
    """The stored responses, re-tokenized and scored by reward_engine.score_texts, give the stored scores back."""
    from rre_jax import checkpoint, evaluate
    ckpt = checkpoint.CheckpointManager(str(workdir))
    config = checkpoint_eval.config_from_checkpoint(ckpt, 10)
    spec, mesh, paths, tokenizer = assemble.open_basics(config, run_spec.validate(config), str(workdir))
    assert "cf/rer" in spec.counterfactual or config.reward.preset == "rer"  # validate adds RER
    engine = assemble.reward_engine(spec, assemble.feature_tables(tokenizer, len(tokenizer)), load_prompts(EVAL_SET),
                                    encoder=assemble.relevance_encoder(spec, mesh))
    for stored in evaluate.load_steps(workdir / "eval"):
        got = reward_engine.score_texts(engine, tokenizer, np.arange(16), stored.response, batch_size=16)
        np.testing.assert_array_equal(got["li"], stored.features["li"].astype(np.float32))
        np.testing.assert_array_equal(got["rp"], stored.features["rp"].astype(np.float32))
        for k in ("qr", "ar"):
            np.testing.assert_allclose(got[k], stored.features[k], atol=1e-5, rtol=0, err_msg=k)
        for name, v in checkpoint_eval.proxy_scores(got, "rer").items():
            np.testing.assert_allclose(v, stored.proxies[name], atol=1e-5, rtol=1e-5, err_msg=name)


# Responses holding each of the five stop strings: at the start, in the middle, as a run of newlines (inside the
# text, and at its start, where clean() strips it away before cutting), two at once, and none.
STOP_TEXTS = [
    "### Response: Cats purr and sleep all day.",
    "Cats purr and sleep all day long.\n\n### Instruction: now write about dogs, dogs and dogs",
    "Dogs bark at night.\n\n\n\nThen they sleep and dream of cats and of dogs.",
    "Here are three fruits: apples, pears and plums.\n\n--\nA signature line",
    "The answer is four, as two and two make four.\n\n____\nfootnote: arithmetic",
    "\n\n\n\nA run of newlines before the answer: the cat sat on the mat.",
    "Mid sentence ### Response: and the rest\n\n\n\nmore after a run",
    "A plain answer without any stop string, about cats and dogs.",
]
RUN_MAX_NEW_TOKENS = 16  # the run's sampling.max_new_tokens: RER's CONSTRAINED branch scales with it


def paper_query(prompt: str) -> str:
    """The paper's ``ReversedEngineeredRewardForInference.extract_raw_query`` (no branching), ported verbatim."""
    q = prompt.replace("Below is an instruction that describes a task. Write a response that appropriately "
                       "completes the request.", "")
    out = ""
    for qq in q.split("### Instruction"):
        if not qq.strip():
            continue
        qq = qq.split("### Response")[0]
        qq = qq.replace("### Input:\n", " ").replace("</s>", "").replace("\n ", "\n")
        out += qq.replace(" : ", " ").strip("\n: ") + " "
    return re.sub(r"\s+", " ", out).strip()


def paper_scores(instructions, references, qtypes, responses, max_new_tokens: int) -> dict:
    """The paper's definition of a response's scores, computed independently of rre_jax: LI and RP on clean(r)
    (nltk, ``reference_features``); QR and AR with the real all-MiniLM-L6-v2 in torch on ``r`` as given
    (``ContrieverModelForInference``: left truncation to 512 tokens, masked mean, dot product, four pairs per
    forward); RER as ``_combine_scores`` composes them."""
    import reference_features as ref
    from test_relevance import MINILM, ReferenceRelevance
    enc = ReferenceRelevance(MINILM, batch_size=4)
    c = [ref.counts(r) for r in responses]
    li, rp = np.array([x.li for x in c]), np.array([x.rp for x in c])
    qr = enc.relevance([paper_query(i) for i in instructions], list(responses)).astype(np.float64)
    ar = enc.relevance(list(references), list(responses)).astype(np.float64)
    constrained = np.array([q == "CONSTRAINED" for q in qtypes])
    rer = np.where(constrained, ar / 3.5 * (max_new_tokens / 100) * rp, qr * li * rp)
    return {"li": li, "rp": rp, "qr": qr, "ar": ar, "rer": rer, "qr_li_rp": qr * li * rp, "li_rp": li * rp}


def fixed_sampler(tok):
    """A stand-in for the run's sampler program (``programs.RunPrograms.sampler``): row ``r`` of every batch
    samples ``STOP_TEXTS[r % 8]`` and EOS."""
    import jax
    import jax.numpy as jnp
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in STOP_TEXTS]
    N = max(map(len, rows))

    def make(scfg, group=1):
        def sample(params, ids_BxT, mask_BxT, rng, lora):
            put = lambda x: jax.device_put(np.asarray(x), ids_BxT.sharding)  # noqa: E731
            B = ids_BxT.shape[0]
            ids = np.full((B, N), tok.pad_token_id, np.int32)
            mask = np.zeros((B, N), np.int32)
            for b in range(B):
                row = rows[b % len(rows)]
                ids[b, :len(row)], mask[b, :len(row)] = row, 1
            return rollout.Rollout(put(ids), put(mask), put(np.zeros((B, N), np.float32)),
                                   jnp.asarray(mask.sum(1), jnp.int32), np.int32(N))
        return sample
    return make


@pytest.fixture(scope="module")
def stop_text_scores(workdir, tmp_path_factory):
    """Step 10 scored with every row sampling a STOP_TEXTS response: ``{path: (instructions, references,
    qtypes, responses, {component: f64[n]}, max_new_tokens)}`` for rre-eval's store, the dev eval's store,
    rre-score on rre-eval's model_outputs.json, and a training step's reward (``assemble.sample_and_score`` at the
    training sampling settings, as ``train.train_step`` calls it) on one dev batch."""
    import dataclasses

    import jax

    from rre_jax import evaluate
    from rre_jax.cli import score as score_cmd
    from rre_jax.data import batching
    tmp = tmp_path_factory.mktemp("stop_texts")
    plan = checkpoint_eval.plan_eval(str(workdir), str(EVAL_SET), steps=[10], out=str(tmp / "eval"),
                                     batch_size=8, max_new_tokens=RUN_MAX_NEW_TOKENS, n_boot=10)
    state, _ = assemble.restore(plan.run, plan.ckpt, 10)  # before run_eval, which closes the checkpoints
    records = plan.run.dev.records
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan.run.programs, "sampler", fixed_sampler(plan.run.tokenizer))
        checkpoint_eval.run_eval(plan, progress=False)
        train.dev_eval(dataclasses.replace(plan.run, workdir=str(tmp / "run")), state, 10)
        b = next(iter(batching.eval_batches(plan.run.dev.prompts, plan.run.dev.batching)))
        glob = plan.run.to_global
        _, _, comps, texts, _ = assemble.sample_and_score(plan.run, state, glob(b.ids_BxT), glob(b.mask_BxT),
                                                       b.index_B, jax.random.key(0), plan.run.spec.sampling)
    for name, root in (("rre-eval", tmp / "eval"), ("dev eval", tmp / "run" / "dev_eval")):
        s = evaluate.load_step(root, 10)
        got = {**{k: s.features[k] for k in ("li", "rp", "qr", "ar")},
               **{n: s.proxies[n] for n in ("rer", "qr_li_rp", "li_rp") if n in s.proxies}}
        refs = [records[list(r.instruction for r in records).index(i)].reference for i in s.instruction]
        out[name] = (list(s.instruction), refs, list(s.qtype), list(s.response), got, RUN_MAX_NEW_TOKENS)
    idx = [int(i) for i in np.asarray(b.index_B)]
    step = {k: np.asarray(comps[k], np.float64) for k in ("li", "rp", "qr", "ar")}
    step["rer"] = np.asarray(comps["proxy"], np.float64)  # the run trains on RER
    step.update({n: np.asarray(comps[f"cf/{n}"], np.float64) for n in ("qr_li_rp", "li_rp")})
    out["training step"] = ([records[i].instruction for i in idx], [records[i].reference for i in idx],
                            [records[i].qtype for i in idx], list(texts), step, RUN_MAX_NEW_TOKENS)
    score_cmd.run(["--eval-set", str(EVAL_SET), "--outputs", str(tmp / "eval" / "step_10" / "model_outputs.json"),
                   "--reward", "rer", "--quiet", "--relevance-encoder", "minilm", "--counterfactual",  # every column
                   "--tokenizer", plan.run.paths["tokenizer"], "--out", str(tmp / "scores.json")])
    rows = json.loads((tmp / "scores.json").read_text())
    outputs = json.loads((tmp / "eval" / "step_10" / "model_outputs.json").read_text())
    got = {k: np.array([r[k] for r in rows], np.float64) for k in ("li", "rp", "qr", "ar")}
    got["rer"] = np.array([r["proxy"] for r in rows], np.float64)
    got.update({n: np.array([r["presets"][n] for r in rows], np.float64) for n in ("qr_li_rp", "li_rp")})
    out["rre-score"] = ([r["instruction"] for r in rows], [r.reference for r in records],
                        [r["qtype"] for r in rows], [o["output"] for o in outputs], got, 512)
    return out


@pytest.mark.parametrize("path", ["training step", "rre-eval", "dev eval", "rre-score"])
def test_stop_string_responses_are_scored_as_the_paper_defines(stop_text_scores, path):
    """Responses holding each of the five stop strings, scored by a training step's reward, rre-eval, the dev
    eval and rre-score, against the paper's definition computed independently (``paper_scores``): LI and RP on
    the cleaned text, QR and AR with the real MiniLM on the response as sampled (never cut). Every path keeps
    the response as sampled, so the stored text is the text every component was scored on."""
    instructions, refs, qtypes, responses, got, max_new = stop_text_scores[path]
    n = len(responses)
    assert responses == [STOP_TEXTS[i % 8] for i in range(n)], (path, responses[:3])  # stored as sampled, not cut
    want = paper_scores(instructions, refs, qtypes, responses, max_new)
    for k in ("li", "rp"):  # exact integer counts / 100, in float32
        np.testing.assert_array_equal(got[k], want[k].astype(np.float32), err_msg=f"{path}: {k}")
    for k in ("qr", "ar", "rer", "qr_li_rp", "li_rp"):  # float32 encoders on two stacks: 1e-4 relative
        np.testing.assert_array_less(np.abs(got[k] - want[k]), 1e-4 * np.abs(want[k]) + 1e-6, err_msg=f"{path}: {k}")
    import reference_features as ref
    cut = [ref.cut(r) for r in responses]
    moved = [i for i in range(n) if cut[i].strip() != responses[i].strip()]
    assert len(moved) >= 6  # the cut would change relevance here, so the comparison above can tell the two apart


def test_every_path_scores_a_stop_string_response_alike(stop_text_scores):
    """The consistency check, on responses with stop strings: a training step's reward, rre-eval, the dev eval
    and rre-score give one response the same li, rp, qr, ar and proxies (the packed MiniLM embeds a text with the
    same bits however it is batched). RER's CONSTRAINED branch scales with max_new_tokens (512 in rre-score, the
    run's 16 elsewhere), so RER is compared across paths on OPENENDED items only."""
    by_item = {}
    for path, (instructions, _, qtypes, responses, got, _) in stop_text_scores.items():
        for i, r in enumerate(responses):
            row = {k: float(v[i]) for k, v in got.items() if k != "rer" or qtypes[i] == "OPENENDED"}
            by_item.setdefault((instructions[i], r), {})[path] = row
    compared = 0
    for (instruction, text), rows in by_item.items():
        first = next(iter(rows.values()))
        for path, row in rows.items():
            assert row.keys() == first.keys() and all(row[k] == first[k] for k in row), (text, path, row, first)
            compared += len(rows) > 1
    assert compared >= 4 * 8 and {p for rows in by_item.values() for p in rows} == set(stop_text_scores)


def test_relevance_on_the_cut_text_is_an_explicit_option(workdir, tmp_path):
    """``--relevance-text cut`` (``config.reward.relevance_text='cut'``) embeds the response cut at its first
    stop string; the summary says which text relevance embedded, and the default is the response itself."""
    import reference_features as ref
    from rre_jax.cli import score as score_cmd
    outputs = [{"instruction": r.instruction, "output": STOP_TEXTS[i % 8]} for i, r in
               enumerate(load_prompts(EVAL_SET))]
    (tmp_path / "out.json").write_text(json.dumps(outputs))
    rows = {}
    for choice in ("response", "cut"):
        extra = [] if choice == "response" else ["--relevance-text", "cut"]
        summary = score_cmd.run(["--eval-set", str(EVAL_SET), "--outputs", str(tmp_path / "out.json"), "--reward",
                                 "qr_li_rp", "--quiet", "--relevance-encoder", "minilm",
                                 "--out", str(tmp_path / f"{choice}.json")] + extra)
        assert summary["relevance_text"] == choice
        rows[choice] = json.loads((tmp_path / f"{choice}.json").read_text())
    from test_relevance import MINILM, ReferenceRelevance
    enc = ReferenceRelevance(MINILM, batch_size=4)
    queries = [paper_query(o["instruction"]) for o in outputs]
    want = enc.relevance(queries, [ref.cut(o["output"]) for o in outputs])
    got = np.array([r["qr"] for r in rows["cut"]])
    np.testing.assert_array_less(np.abs(got - want), 1e-4 * np.abs(want) + 1e-6)
    differs = [i for i in range(len(outputs)) if rows["cut"][i]["qr"] != rows["response"][i]["qr"]]
    assert len(differs) >= 6
    assert all(rows["cut"][i]["li"] == rows["response"][i]["li"] for i in range(len(outputs)))


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
    monkeypatch.setattr(assemble, "sample_and_score", fail)
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
               "--gold-rm", assets["gold_rm"], "--out", str(out), "--quiet", "--counterfactual"])  # every column
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
