"""The story of a run: ``run(config, workdir)``, read top to bottom.

    validate (before anything is written) -> parse the prompt files -> assemble the run (``assemble``: mesh,
    models, programs, reward engine) -> restore the latest checkpoint, or initialise -> loop:
        rollout + reward (``assemble.sample_and_score``) -> experience (jit) -> the algorithm's update (jit)
        -> metrics -> every save_freq: dev eval + checkpoint
    -> export the final policy.

No maths lives here: it is in ``rollout``, ``features``, ``reward``, the algorithms (``rre_jax.algorithms``) and
``policy``; no set-up either: ``assemble`` builds everything a step uses.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from rre_jax import assemble, checkpoint, evaluate, host_arrays, metrics as metrics_lib, policy, preemption
from rre_jax import tracking, workdir_lock
from rre_jax.assemble import Run
from rre_jax.data import batching, templates
from rre_jax.models import llama
from rre_jax.run_spec import EVAL_PROXY, RunSpec, validate

log = logging.getLogger(__name__)


# ======================================================================================= the run

@workdir_lock.holding("rre-train")  # one workdir, one run (nests under rre-train's own lock)
def run(config, workdir: str, *, spec: RunSpec | None = None,
        sources: assemble.PromptSources | None = None) -> dict:
    """Train (or resume) a run in ``workdir``; returns the last step's metrics. ``spec`` / ``sources``: the
    config already validated / its prompt files already parsed (by the command), else done here, before anything
    is written. A resume reads the newest intact checkpoint straight into the sharded state (nothing is
    initialised first; damaged newer steps are moved aside to ``checkpoints/damaged/``). On SIGTERM (spot /
    preemptible VMs) every host saves at one common step and returns early
    (``preemption``); rerunning resumes there."""
    spec = spec or validate(config)
    sources = sources or assemble.load_prompt_sources(spec)
    ckpt = checkpoint.CheckpointManager(workdir, max_to_keep=spec.train.max_to_keep or None)
    saved = ckpt.newest_meta()  # (step, meta) of the newest step whose meta reads
    r = assemble.for_training(config, spec, workdir, sources,
                              None if saved is None else (saved[1], f"{ckpt.directory}/{saved[0]}"))
    writer = metrics_lib.MetricWriter(workdir, tracker=tracking.open_run(config, workdir))  # W&B when asked
    if saved is None:
        state = assemble.init_state(r, jax.random.key(spec.seed))
    else:
        state = _resume(r, ckpt, saved, writer)
    state, last = _loop(r, state, ckpt, writer)
    if spec.train.export_final and int(state["step"]) == spec.train.steps:  # not after a preemption
        export(r, state, os.path.join(workdir, "export"))
    writer.close()
    ckpt.close()
    return last


def _resume(r: Run, ckpt: checkpoint.CheckpointManager, saved: tuple, writer: metrics_lib.MetricWriter):
    """The newest intact checkpoint, read into the state's shardings; the prompt iterator follows it when a
    damaged newer step was moved aside; metrics logged after it are dropped."""
    latest, state, meta = ckpt.restore_newest_intact(r.programs.state.target())
    if latest != saved[0]:
        r.iterator = assemble.prompt_iterator(r.train_set.prompts, r.train_set.batching,
                                              (meta, f"{ckpt.directory}/{latest}"))
    writer.truncate_after(latest)
    log.info("resumed from step %d in %s", latest, ckpt.directory)
    return state


def _loop(r: Run, state, ckpt: checkpoint.CheckpointManager, writer: metrics_lib.MetricWriter):
    """Steps until ``spec.train.steps``, or a preemption; every ``save_freq``: dev eval, then checkpoint."""
    total, save_freq = r.spec.train.steps, r.spec.train.save_freq
    bar = tqdm(total=total, initial=int(state["step"]), desc=r.spec.name, unit="step",
               disable=jax.process_index() != 0)
    last: dict = {}
    with preemption.Watch() as watch:
        while int(state["step"]) < total:
            state, last = train_step(r, state, next(r.iterator))
            step = int(state["step"])
            writer.write(step, last)
            bar.update(1)
            shown = {"proxy": last.get("reward/proxy"), "kl": last.get("objective/kl")}  # no KL when beta = 0
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None and math.isfinite(v)})
            preempted = watch.reached(step)  # every host, every step: True on all hosts at the same step
            if step % save_freq == 0 or step == total:
                # Dev eval first: a run killed after the save must not resume without this step's eval.
                writer.write(step, dev_eval(r, state, step))
                writer.report(os.path.join(r.workdir, "dev_eval"), step, "dev_eval")  # to W&B, when it is on
                ckpt.save(step, state, checkpoint_meta(r, state))
                log.info("saved checkpoint for step %d", step)
            elif preempted:  # no dev eval: the VM's notice is short, and this step is not on the eval schedule
                ckpt.save(step, state, checkpoint_meta(r, state))
            if preempted:
                log.warning("preempted: saved step %d in %s; the same rre-train command resumes from it", step,
                            ckpt.directory)
                break
    bar.close()
    return state, last


def checkpoint_meta(r: Run, state) -> dict:
    """What a checkpoint's meta holds beside the state: step, data position, config, model paths."""
    return {"step": int(state["step"]), "data": dataclasses.asdict(r.iterator.state),
            "config": json.loads(r.config.to_json_best_effort()), "policy": r.paths["policy"],
            "gold_rm": r.paths["gold_rm"], "gold_rm_random": bool(r.paths["gold_rm_random"])}


def export(r: Run, state, out: str) -> None:
    """The policy (LoRA merged) as a Hugging Face directory with its tokenizer; every host joins the gather of
    arrays spread over hosts, process 0 writes."""
    params, adapters = policy.export_params(r.policy, state["trainable"], r.frozen)

    def whole(x):  # an array spread over hosts -> the whole array, on every host (a collective)
        return x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)
    params, adapters = jax.tree.map(whole, (params, adapters))
    if jax.process_index() == 0:
        llama.export_pretrained(out, r.policy.cfg, params, lora=adapters,
                                lora_cfg=r.policy.lora_cfg if adapters is not None else None)
        r.tokenizer.save_pretrained(out)


# ======================================================================================= one step

def train_step(r: Run, state, batch: batching.Batch):
    """Rollout + reward, the frozen experience passes and the algorithm's update of one batch: ``(state,
    metrics)``. A batch whose rewards are not all finite is skipped (no update; counted)."""
    step = int(state["step"])
    k_roll, k_update = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step))
    algo = r.spec.algorithm
    G = algo.samples_per_prompt  # each prompt sampled G times, a group on consecutive rows, prefilled once
    batch = batching.repeat_prompts(batch, G)
    ids_BxT, mask_BxT = r.to_global(batch.ids_BxT), r.to_global(batch.mask_BxT)
    roll, mask_BxN, comps, _, times = assemble.sample_and_score(r, state, ids_BxT, mask_BxT, batch.index_B, k_roll,
                                                                r.spec.sampling, group=G)
    t0 = time.perf_counter()
    (T, N), ids_BxS = (ids_BxT.shape[1], roll.tokens_BxN.shape[1]), jnp.concatenate([ids_BxT, roll.tokens_BxN], 1)
    attn_BxS = jnp.concatenate([mask_BxT, mask_BxN], axis=1)
    exp = jax.block_until_ready(r.programs.experience(T, N)(state["trainable"], r.frozen, ids_BxS, attn_BxS))
    t1 = time.perf_counter()
    score_B = comps["proxy"] - r.spec.scoring.baseline  # this host's share
    scalars = reward_metrics(r, comps, mask_BxN, roll)
    if not scalars.pop("finite"):  # global: every host decides alike
        log.warning("step %d: non-finite rewards; batch skipped", step)
        return {**state, "step": state["step"] + 1}, {**scalars, **times, "train/skipped_batch": 1.0}
    state, stats = r.programs.update(T, N)(state, r.frozen, exp, r.to_global(score_B.astype(np.float32)), ids_BxS,
                                           attn_BxS, mask_BxN, k_update)
    stats = jax.device_get(stats)
    t2 = time.perf_counter()
    scalars.update({k: float(np.mean(v)) for k, v in stats.items() if np.ndim(v) == 0 or np.size(v) == 1})
    times.update({"time/experience_s": t1 - t0, "time/update_s": t2 - t1, "train/skipped_batch": 0.0,
                  "time/rollout_tokens_per_s": scalars.pop("new_tokens") / max(times["time/rollout_s"], 1e-9),
                  "objective/kl_coef_next": algo.next_kl_coef(state), "rollout/prompt_bucket": float(T)})
    return state, {**scalars, **times, **_compile_metrics(r)}


def reward_metrics(r: Run, comps: dict, mask_BxN, roll) -> dict:
    """Means over the global batch of every reward component and the response lengths; ``finite``: whether every
    reward is (the same answer on every host); ``new_tokens``: tokens sampled."""
    return batch_metrics(comps, r.to_local(mask_BxN).sum(1), r.to_local(roll.mask_BxN).sum(1), roll.steps,
                         r.spec.scoring.baseline)


def batch_metrics(comps: dict, n_tok, n_raw, steps, baseline: float) -> dict:
    """`reward_metrics` from this host's arrays: ``comps`` and the tokens kept (``n_tok``) and sampled (``n_raw``)
    of its rows, and the rollout's decode ``steps``; gathered over the hosts."""
    every = host_arrays.gather({**comps, "n_tok": n_tok, "n_raw": n_raw})  # the global batch, for metrics
    out = {f"reward/{k}": float(np.mean(v)) for k, v in every.items() if k in comps}
    out.update({"response/tokens_mean": float(every["n_tok"].mean()),
                "response/tokens_max": float(every["n_tok"].max()),
                "response/words_mean": float(every["n_words"].mean()),
                "response/cut_frac": float(np.mean(every["n_tok"] < every["n_raw"])),
                "rollout/decode_steps": float(steps), "new_tokens": float(every["n_raw"].sum()),
                "finite": bool(np.all(np.isfinite(every["proxy"] - baseline)))})
    return out


def _compile_metrics(r: Run) -> dict:
    """Executables per program, and how many the step's programs hold (a rise after warm-up means a recompile;
    the relevance encoder and the gold RM compile one per batch shape they meet, a bounded set, counted apart)."""
    counts = r.programs.compiled_counts()
    return {"compile/programs": float(sum(n for k, n in counts.items() if k not in ("relevance", "gold"))),
            **{f"compile/{k}": float(n) for k, n in counts.items()}}


# ======================================================================================= dev eval

def dev_eval(r: Run, state, step: int) -> dict:
    """Sample the dev prompts with the training sampler; proxy (every component) and gold, logged and stored in
    ``<workdir>/dev_eval`` (process 0) with the monotonicity report so far."""
    if not len(r.dev):
        return {}
    index, texts, comps = _dev_rollouts(r, state, step)
    gold = None
    if r.gold is not None:
        gold = r.gold.score([templates.alpaca_prompt(r.dev.records[i].instruction) for i in index], texts)
    return record_dev_eval(r, step, index, texts, comps, gold)


def record_dev_eval(r: Run, step: int, index, texts, comps: dict, gold) -> dict:
    """The dev eval's scalars of sampled ``texts`` (dev prompts ``index``, reward ``comps``, ``gold`` scores or
    None), stored in ``<workdir>/dev_eval`` (process 0) with the monotonicity report so far."""
    scalars = {f"eval/{k}": float(np.mean(v)) for k, v in comps.items()}
    if gold is not None:
        scalars["eval/gold"] = float(np.mean(gold))
    if jax.process_index() == 0:
        root = os.path.join(r.workdir, "dev_eval")
        evaluate.write_step(root, _dev_step(r, step, index, texts, comps, gold), overwrite=True)
        try:
            summary = evaluate.refresh_report(root, n_boot=200)
            for name in ("train", "rer"):  # monotonicity so far: proxy means vs gold means across saves
                corr = summary.get("correlations", {}).get("all", {}).get(f"proxy:{name}", {})
                scalars.update({f"eval/monotonicity_{stat}_{name}": float(corr[stat])
                                for stat in ("spearman", "kendall") if stat in corr})
        except Exception as e:  # a report problem must never stop training
            log.warning("dev-eval report refresh failed: %s", e)
    return scalars


def _dev_rollouts(r: Run, state, step: int) -> tuple[list, list, dict]:
    """``(dev indices, texts, {component: values})`` of every dev prompt, gathered on every host (so the gold
    RM sees the same inputs everywhere), padding rows dropped."""
    index, texts, comps = [], [], {}
    # the engine's prompt table: the training prompts (none in a run built for evaluation), then the dev prompts
    offset = 0 if r.train_set is None else len(r.train_set.records)
    for i, b in enumerate(r.dev.batches()):
        rng = jax.random.fold_in(jax.random.key(r.spec.seed + 7), step * 1000 + i)
        _, _, c, t, _ = assemble.sample_and_score(r, state, r.to_global(b.ids_BxT), r.to_global(b.mask_BxT),
                                                  b.index_B + offset, rng, r.spec.sampling)
        every = host_arrays.gather({**c, "index": np.asarray(b.index_B), "valid": np.asarray(b.valid_B)})
        keep = every["valid"]
        index += list(every["index"][keep])
        texts += [x for x, k in zip(host_arrays.gather_texts(t), keep) if k]
        for k in c:
            comps.setdefault(k, []).extend(every[k][keep].tolist())
    return index, texts, comps


def _dev_step(r: Run, step: int, index, texts, comps: dict, gold) -> evaluate.StepRollouts:
    """One dev eval as a stored step: the training proxy under ``train``, every counterfactual, always RER."""
    records = [r.dev.records[i] for i in index]
    proxies = {("train" if k == "proxy" else k[3:]): np.asarray(v) for k, v in comps.items()
               if k == "proxy" or k.startswith("cf/")}
    proxies.setdefault(EVAL_PROXY, proxies["train"])  # validate adds cf/rer unless the training proxy is RER
    return evaluate.StepRollouts(
        step=step, instruction=[x.instruction for x in records], response=texts, qtype=[x.qtype for x in records],
        dataset=[x.dataset or "" for x in records], proxies=proxies,
        gold=np.asarray(gold if gold is not None else np.full(len(records), np.nan)),
        features={k: np.asarray(v) for k, v in comps.items() if k in ("li", "rp", "qr", "ar")}, train_proxy="train",
        gold_rm=r.paths["gold_rm"] or "", gold_rm_random=bool(r.paths["gold_rm_random"]),
        sampling=dataclasses.asdict(r.spec.sampling), relevance_text=r.engine.relevance_text,
        extra={"run": r.spec.name, "split": "dev"})
