"""Scoring a run's saved checkpoints: the library behind ``rre-eval`` and ``rre-alignment-tax`` (rre_jax/cli/).

    rre-eval --workdir DIR --eval-set alpaca_eval.json [--steps 500,1000] [--config FILE[:arg]]
             [--config.gold_rm.path=DIR ...] [--out DIR] [--overwrite | --skip-existing]
             [--temperature 0.7 --top-p 1 --max-new-tokens 512] [--batch-size N] [--seed S] [--n-boot 1000]

For every checkpoint step (default: all saved): restore the policy, sample each eval prompt once with the
training sampler at the eval settings (temperature 0.7, top_p 1, up to 512 new tokens), and score the response as
sampled -- the text stored and judged -- as a training step's reward does (``reward_engine``: LI and RP on the
response cleaned at its stop strings, relevance on the response itself, as the paper's ``eval_monotonicity.py``)
with the training proxy, every counterfactual proxy of the config plus RER (always: the reference scores every
checkpoint with it), every feature (li, rp, qr, ar) and the gold RM. Each step goes to the rollout store (`rre_jax.evaluate.store`:
AlpacaEval ``model_outputs.json``, ``rollouts.jsonl``, ``meta.json``) under ``<workdir>/eval/step_<N>``, with the
gold RM's path, a fingerprint of its files and whether it is a random stand-in, the sampling settings, the eval
set and every reward spec. A new proxy is scored later without sampling again, from the stored texts:
``rre-score --eval-set EVAL.json --outputs <workdir>/eval/step_<N>/model_outputs.json ...`` or
``reward_engine.score_texts`` (which reproduce the stored li/rp exactly and relevance to float round-off, because
every score here is computed on the stored text; the step's meta records ``relevance_text``). Then ``report.md``,
``summary.json`` and the plots are rebuilt from every stored step.

Each step also records the sampled KL(pi || pi_ref) of its responses (`rre_jax.sampled_kl`: the mean over
responses of the summed per-token log-ratio of the sampled tokens under the eval sampling settings, with its
standard error) in its meta, and the report plots gold and every proxy against d = sqrt(KL) with the fitted
overoptimization curve (`rre_jax.evaluate.curves`). Step ``0`` is the initial policy (no checkpoint needed):
``--steps 0 --skip-existing`` adds the d = 0 anchor the curves are re-centred on.

The config is, by default, the one the run saved in its checkpoint meta; ``--config`` loads a
config file instead (``configs/x.py[:arg]`` or a ``.json`` dump) and ``--config.a.b=v`` changes single fields (for
example a different gold RM). Everything a user can get wrong -- a missing step, an empty or unreadable eval set,
stored steps that hold other prompts, a step already stored (without ``--overwrite``), a gold RM without its
tokenizer -- fails before the first token is sampled, and nothing stored is replaced without ``--overwrite``.

    rre-alignment-tax --workdir DIR --step N --tasks-dir natural-instructions/ [--max-instances 100]

scores the policy of checkpoint ``N`` on SuperNI (`rre_jax.alignment_tax`): greedy, 128 new tokens, prompts
truncated to 512 tokens on the right (as the reference's tokenizer call does), answers not cut at stop strings;
predictions and metrics go to ``<workdir>/alignment_tax/step_<N>.jsonl`` (+ ``.metrics.json``).

Shapes: ``B`` rows of a batch, ``T`` prompt bucket, ``N`` new tokens.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from rre_jax import alignment_tax as at, assemble, checkpoint, evaluate, host_arrays, policy, sampled_kl, sampling
from rre_jax import config_loader as loader
from rre_jax.data import batching, prompts as prompts_lib, templates
from rre_jax.run_spec import validate

log = logging.getLogger(__name__)

FEATURES = ("li", "rp", "qr", "ar")


# ======================================================================================= config

def config_from_checkpoint(ckpt, step: int):
    """The config ``rre-train`` saved in the meta of checkpoint ``step``."""
    try:
        meta = ckpt.restore_meta(step)
    except Exception as e:  # a damaged meta: the config of the newest step whose meta reads
        saved = ckpt.newest_meta() if checkpoint.damage_of(e, step, str(ckpt.directory / str(step))) else None
        if saved is None:
            raise
        meta = saved[1]
    if "config" not in meta:
        raise ValueError(f"checkpoint {step} in {ckpt.directory} saved no config in its meta; pass --config")
    return ml_collections.ConfigDict(meta["config"])


def apply_overrides(config, overrides: Sequence[tuple[str, str]]):
    """``config`` with each ``(field, text)`` override (``--config.a.b=v`` on the command line) applied."""
    for key, raw in overrides:
        loader.override(config, key, raw)
    return config


def open_checkpoints(workdir: str):
    """The run's `checkpoint.CheckpointManager`; a workdir without ``checkpoints/`` is an error (nothing created)."""
    if "://" not in str(workdir) and not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"--workdir {workdir!r} holds no checkpoints/ directory; is it a run's workdir?")
    return checkpoint.CheckpointManager(workdir)


def resolve_steps(ckpt, steps: Sequence[int] | None) -> list[int]:
    """The requested checkpoint steps (default: all saved), each checked to exist."""
    available = ckpt.all_steps()
    if not available:
        raise FileNotFoundError(f"no checkpoints in {ckpt.directory}; train first (rre-train --workdir ...)")
    if not steps:
        return available
    missing = sorted(set(steps) - set(available) - {0})  # step 0: the initial policy, never a checkpoint
    if missing:
        raise FileNotFoundError(f"no checkpoint for step(s) {missing} in {ckpt.directory}; saved steps: {available}")
    return sorted(set(steps))


# ======================================================================================= set-up

def eval_batching(spec, batch_size: int | None):
    """The `batching.BatchingConfig` of an eval at global batch ``batch_size`` (``--batch-size``; default
    ``config.ppo.batch_size``), which must split evenly over the mesh's data x fsdp devices."""
    rows = spec.mesh.resolved_shape(spec.mesh.num_devices or jax.device_count())
    batch_size = int(batch_size or spec.ppo.batch_size)
    if batch_size <= 0 or batch_size % (rows[0] * rows[1]):
        raise ValueError(f"--batch-size {batch_size} must be a positive multiple of the mesh's data x fsdp = "
                         f"{rows[0] * rows[1]} devices")
    return assemble.batching_config(spec.data, batch_size)


# ======================================================================================= checks

def file_sha256(path) -> str:
    """SHA-256 (hex) of a file's bytes: the identity of an eval set stored in each step's meta."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gold_rm_fingerprint(path: str) -> str:
    """A short identity of a gold RM checkpoint: SHA-256 of its config.json and its weight files' names and sizes."""
    if not path or not os.path.isdir(path):
        return ""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == "config.json":
            h.update(pathlib.Path(full).read_bytes())
        elif name.endswith((".safetensors", ".bin", ".index.json")):
            h.update(f"{name}:{os.path.getsize(full)};".encode())
    return h.hexdigest()[:16]


def check_store(out_dir, steps: Sequence[int], instructions: Sequence[str], *, overwrite: bool,
                skip_existing: bool) -> list[int]:
    """The steps to sample. Stored steps are kept unless ``overwrite``; every stored step that stays must hold the
    same prompts in the same order as ``instructions`` (else its means are not comparable)."""
    stored = evaluate.list_steps(out_dir)
    existing = [s for s in steps if s in stored]
    if existing and not (overwrite or skip_existing):
        raise FileExistsError(f"{out_dir} already holds the eval of step(s) {existing}; pass --overwrite to "
                              "replace them, --skip-existing to keep them, or --steps without them")
    todo = [s for s in steps if s not in stored or overwrite]
    for s in stored:
        if s in todo:
            continue
        held = evaluate.load_step(out_dir, s).instruction
        if list(held) != list(instructions):
            raise ValueError(f"{evaluate.store.step_dir(out_dir, s)} holds {len(held)} outputs of other prompts than "
                             f"the {len(instructions)} of this eval set (the report compares checkpoints on the "
                             "same prompts): use another --out, or re-run every stored step with --overwrite")
    return todo


# ======================================================================================= sampling

def sample_step(run, state, step: int, scfg, seed: int, bar=None, kl: bool = True, group: int = 1) -> dict:
    """Sample and score every eval prompt once: ``{"index": i64[N], "texts": [N], "n_tokens": i64[N],
    "comps": {component: f32[N]}}`` over the kept prompts, in order; with ``kl`` also ``"log_ratio": f64[N]``,
    each response's summed log pi - log pi_ref under the sampling settings (`rre_jax.sampled_kl`). ``group``: the
    rows of every batch come in groups of that many copies of one prompt (``rre-bon``), each prefilled once."""

    index, texts, n_tokens, comps = [], [], [], {}
    key = jax.random.fold_in(jax.random.key(seed), step)
    for i, b in enumerate(run.dev.batches()):
        ids_BxT, mask_BxT = run.to_global(b.ids_BxT), run.to_global(b.mask_BxT)
        roll, mask_BxN, c, t, _ = assemble.sample_and_score(run, state, ids_BxT, mask_BxT, b.index_B,
                                                         jax.random.fold_in(key, i), scfg, group=group)
        if kl:  # every sampled token (the raw mask): the KL of the sampled responses, before the stop-string cut
            (B, T), N = ids_BxT.shape, roll.tokens_BxN.shape[1]
            ratio = run.programs.log_ratio(scfg, B, T, N)(
                state["trainable"], run.frozen, jnp.concatenate([ids_BxT, roll.tokens_BxN], 1),
                jnp.concatenate([mask_BxT, roll.mask_BxN], 1))
            c = {**c, "log_ratio": run.to_local(ratio)}
        # every host gathers every host's rows (process order, as the global batch lays them out)
        every = host_arrays.gather({**c, "index": np.asarray(b.index_B), "valid": np.asarray(b.valid_B),
                               "n_tokens": run.to_local(mask_BxN).sum(1)})
        keep = every["valid"]
        index += list(every["index"][keep])
        texts += [x for x, k in zip(host_arrays.gather_texts(t), keep) if k]
        n_tokens += list(every["n_tokens"][keep])
        for k in c:
            comps.setdefault(k, []).extend(np.asarray(every[k])[keep].tolist())
        if bar is not None:
            bar.update(1)
    return {"index": np.asarray(index, np.int64), "texts": texts, "n_tokens": np.asarray(n_tokens, np.int64),
            "comps": {k: np.asarray(v, np.float64) for k, v in comps.items()}}


def proxy_scores(comps: dict, train_proxy: str) -> dict:
    """``{spec name: f64[N]}``: the training proxy under its preset name and each counterfactual under its own."""
    out = {k[3:]: v for k, v in comps.items() if k.startswith("cf/")}
    out[train_proxy] = comps["proxy"]
    return out


def step_rollouts(run, step: int, sampled: dict, gold, scfg, seed: int, extra: dict):
    """The `evaluate.StepRollouts` of one checkpoint from `sample_step`'s output and the gold scores."""
    recs = [run.dev.records[i] for i in sampled["index"]]
    comps = sampled["comps"]
    if "log_ratio" in comps and not np.all(np.isfinite(comps["log_ratio"])):
        log.warning("step %d: the sampled KL is infinite (top-k / top-p: the reference gives a sampled token zero "
                    "probability); it is not recorded and the step stays off the RL curves", step)
    elif "log_ratio" in comps:  # the RL curves' distance (`evaluate.curves.rl_curves`)
        extra = {**extra, "kl": {**sampled_kl.estimate(comps["log_ratio"]),
                                 "log_ratio": comps["log_ratio"].tolist()}}
    return evaluate.StepRollouts(
        step=step, instruction=[r.instruction for r in recs], response=sampled["texts"], qtype=[r.qtype for r in recs],
        dataset=[r.dataset for r in recs], proxies=proxy_scores(comps, run.config.reward.preset),
        gold=np.asarray(gold if gold is not None else np.full(len(recs), np.nan)),
        features={k: comps[k] for k in FEATURES if k in comps}, n_tokens=sampled["n_tokens"],
        train_proxy=run.config.reward.preset, gold_rm=run.paths["gold_rm"] or "",
        gold_rm_random=bool(run.paths["gold_rm_random"]), generator=f"{run.config.name}-step_{step}",
        sampling={**dataclasses.asdict(scfg), "seed": seed}, relevance_text=run.engine.relevance_text, extra=extra)


# ======================================================================================= rre-eval

@dataclasses.dataclass
class EvalPlan:
    """Everything checked and loaded before the first sample (see `plan_eval`)."""

    run: Any
    ckpt: Any
    steps: list
    out_dir: pathlib.Path
    scfg: Any
    seed: int
    overwrite: bool
    n_boot: int
    extra: dict


def plan_eval(workdir: str, eval_set: str, *, steps=None, config=None, overrides=(), out=None,
              overwrite: bool = False, skip_existing: bool = False, temperature: float = 0.7, top_p: float = 1.0,
              max_new_tokens: int = 512, batch_size: int | None = None, seed: int | None = None,
              n_boot: int = 1000) -> EvalPlan:
    """Check every input and load the models; raises (naming the file, step or field) before any sampling."""
    ckpt = open_checkpoints(workdir)
    steps = resolve_steps(ckpt, steps)
    latest = steps[-1] or ckpt.all_steps()[-1]  # step 0 (the initial policy) has no checkpoint meta
    config = apply_overrides(config if config is not None else config_from_checkpoint(ckpt, latest), overrides)
    scfg = sampling.SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    records = prompts_lib.load_prompts(eval_set, missing_qtype=config.data.missing_qtype)
    if not records:
        raise ValueError(f"eval set {eval_set!r} holds no prompts")
    basics = assemble.open_basics(config, validate(config), workdir)
    spec, mesh, paths, tokenizer = basics
    dev = assemble.prompt_set(records, tokenizer, eval_batching(spec, batch_size))
    out_dir = pathlib.Path(out or os.path.join(workdir, "eval"))
    todo = check_store(out_dir, steps, [records[i].instruction for i in dev.prompts.index], overwrite=overwrite,
                       skip_existing=skip_existing)
    run = None
    if todo:
        gold = assemble.gold_rm(spec, paths, mesh)  # checks the gold tokenizer before the policy loads
        if gold is None:
            log.warning("the run has no gold RM (config.gold_rm.path is empty): gold scores are stored as NaN")
        run = assemble.for_eval(config, basics, workdir, dev, gold=gold)
    seed = int(config.seed if seed is None else seed)
    extra = {"run": config.name, "split": "eval", "eval_set": os.path.abspath(eval_set),
             "eval_set_sha256": file_sha256(eval_set), "checkpoints": str(ckpt.directory),
             "dropped_prompts": [int(i) for i in dev.prompts.dropped],
             "gold_rm_fingerprint": gold_rm_fingerprint(paths["gold_rm"]),
             "reward_specs": {proxy: dataclasses.asdict(s) for proxy, s in
                              proxy_scores({"proxy": spec.reward, **spec.counterfactual}, config.reward.preset).items()},
             "config": json.loads(config.to_json_best_effort())}
    return EvalPlan(run, ckpt, todo, out_dir, scfg, seed, overwrite, n_boot, extra)


def run_eval(plan: EvalPlan, progress: bool = True) -> dict:
    """Sample, score and store every planned step, then rebuild the report; returns the report's summary. A
    damaged checkpoint is skipped (with a warning) and listed under ``damaged_steps``, not fatal to the eval."""
    damaged: list[int] = []
    if plan.steps:
        bar = tqdm(total=len(plan.steps) * plan.run.dev.num_batches(), desc="rre-eval", unit="batch",
                   disable=not progress or jax.process_index() != 0)
        for step in plan.steps:
            bar.set_postfix(step=step)
            if not _eval_step(plan, step, bar):
                damaged.append(step)
        bar.close()
    summary = evaluate.refresh_report(plan.out_dir, n_boot=plan.n_boot) if jax.process_index() == 0 else {}
    plan.ckpt.close()
    return {**summary, "damaged_steps": damaged} if damaged else summary


def _eval_step(plan: EvalPlan, step: int, bar) -> bool:
    """Sample, score and store one checkpoint (step 0: the initial policy); False when its checkpoint is damaged."""
    try:
        state = (assemble.restore(plan.run, plan.ckpt, step)[0] if step
                 else assemble.init_state(plan.run, jax.random.key(plan.run.spec.seed)))
    except checkpoint.DamagedCheckpoint as e:
        log.warning("%s; skipped", e.damage.describe())
        bar.update(plan.run.dev.num_batches())
        return False
    records = plan.run.dev.records
    sampled = sample_step(plan.run, state, step, plan.scfg, plan.seed, bar)
    gold = None
    if plan.run.gold is not None:
        gold = plan.run.gold.score([templates.alpaca_prompt(records[i].instruction) for i in sampled["index"]],
                                   sampled["texts"])
    rollouts = step_rollouts(plan.run, step, sampled, gold, plan.scfg, plan.seed, plan.extra)
    if jax.process_index() == 0:
        evaluate.write_step(plan.out_dir, rollouts, overwrite=plan.overwrite)
    return True


def evaluate_checkpoints(workdir: str, eval_set: str, progress: bool = True, **kwargs) -> dict:
    """`plan_eval` then `run_eval` (the Python form of ``rre-eval``)."""
    return run_eval(plan_eval(workdir, eval_set, **kwargs), progress=progress)


# ======================================================================================= rre-alignment-tax

def greedy_generate(run, state, texts: Sequence[str], *, max_new_tokens: int, max_prompt_length: int,
                    batch_size: int) -> list[str]:
    """Greedy continuations (new text only, special tokens skipped, not cut) of already-templated prompts."""

    tok = run.tokenizer
    scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=max_new_tokens)
    params, adapters = policy.sampling_params(run.policy, state["trainable"], run.frozen)
    sampler = run.programs.sampler(scfg)
    buckets = batching.bucket_lengths(max_prompt_length, multiple=int(run.config.data.bucket))
    rows = tok(list(texts), add_special_tokens=True, truncation=True, max_length=max_prompt_length)["input_ids"]
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        T = next(b for b in buckets if b >= max(len(r) for r in chunk))
        ids_BxT = np.full((batch_size, T), tok.pad_token_id, np.int32)
        mask_BxT = np.zeros((batch_size, T), np.int32)
        for i, r in enumerate(chunk + [chunk[0]] * (batch_size - len(chunk))):  # filler rows keep one shape
            ids_BxT[i, T - len(r):], mask_BxT[i, T - len(r):] = r, 1
        share = slice(jax.process_index() * batch_size // jax.process_count(),
                      (jax.process_index() + 1) * batch_size // jax.process_count())  # this host's rows
        roll = sampler(params, run.to_global(ids_BxT[share]), run.to_global(mask_BxT[share]),
                       jax.random.key(0), adapters)
        every = host_arrays.gather({"toks": run.to_local(roll.tokens_BxN), "mask": run.to_local(roll.mask_BxN)})
        toks, mask = every["toks"], every["mask"]
        out += tok.batch_decode([t[m == 1] for t, m in zip(toks[:len(chunk)], mask)], skip_special_tokens=True)
    return out


@dataclasses.dataclass
class TaxPlan:
    """A checked alignment-tax job (see `plan_alignment_tax`)."""

    run: Any
    state: Any
    step: int
    instances: list
    out: pathlib.Path
    max_new_tokens: int
    max_prompt_length: int


def plan_alignment_tax(workdir: str, step: int, tasks_dir: str, *, config=None, overrides=(),
                       max_instances: int = 100, max_new_tokens: int = 128, max_prompt_length: int = 512,
                       batch_size: int | None = None, out: str | None = None, overwrite: bool = False) -> TaxPlan:
    """Check the step, the task files and the output path, then restore the policy (nothing generated yet)."""
    ckpt = open_checkpoints(workdir)
    step, = resolve_steps(ckpt, [step])
    config = apply_overrides(config if config is not None else config_from_checkpoint(ckpt, step), overrides)
    instances = at.load_tasks(tasks_dir, max_instances_per_task=max_instances)
    if not instances:
        raise ValueError(f"{tasks_dir}: the test split lists no task with instances")
    out = pathlib.Path(out or os.path.join(workdir, "alignment_tax", f"step_{step}.jsonl"))
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already holds alignment-tax predictions; pass --overwrite to replace them")
    basics = assemble.open_basics(config, validate(config), workdir)
    no_prompts = assemble.PromptSet([], None, eval_batching(basics.spec, batch_size))  # batch size only
    run = assemble.for_eval(config, basics, workdir, no_prompts, scoring=False)
    state, _ = assemble.restore(run, ckpt, step)
    ckpt.close()
    return TaxPlan(run, state, step, instances, out, max_new_tokens, max_prompt_length)


def run_alignment_tax(plan: TaxPlan) -> dict:
    """Generate, score (`alignment_tax.run`) and write predictions + metrics; returns the metrics."""

    batch = plan.run.dev.batching.global_batch_size
    generate = lambda prompts: greedy_generate(plan.run, plan.state, prompts,  # noqa: E731
                                               max_new_tokens=plan.max_new_tokens,
                                               max_prompt_length=plan.max_prompt_length, batch_size=batch)
    result, predictions = at.run(plan.instances, generate, batch_size=batch)
    result = {**result, "step": plan.step, "max_new_tokens": plan.max_new_tokens,
              "max_prompt_length": plan.max_prompt_length}
    if jax.process_index() == 0:
        at.write_predictions(plan.out, plan.instances, predictions, result)
    return result
