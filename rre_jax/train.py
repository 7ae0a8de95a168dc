"""The story of a run: ``run(config, workdir)``.

Read top to bottom: validate the config (before anything compiles), build the mesh, the data, the models
and the reward engine, restore the latest checkpoint if there is one, then loop

    rollout (jit) -> features + experience forward passes (jit) -> relevance + composition (host)
    -> advantages + PPO update + KL controller (jit) -> metrics -> every save_freq: checkpoint + dev eval.

No maths lives here: it is in ``rollout``, ``features``, ``reward``, ``advantages``, ``ppo`` and ``policy``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rre_jax import checkpoint, features, gold_rm as gold_rm_lib, host_arrays, mesh as mesh_lib, metrics as metrics_lib
from rre_jax import policy, ppo, preemption, programs as programs_lib, reward_engine as engine_lib, rollout, sampling
from rre_jax import tracking, workdir_lock
from rre_jax.data import batching, prompts as prompts_lib, templates, tiny_prompts_path
from rre_jax.errors import UserError
from rre_jax.models import llama
from rre_jax.run_spec import EVAL_PROXY, RunSpec, uses_tiny, validate

log = logging.getLogger(__name__)


# ======================================================================================= set-up

@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Prompts sampled in a fixed order, batch by batch: the dev set during training, the eval set of ``rre-eval``
    and ``rre-bon``. ``prompts`` are ``records`` tokenized (None when there are no records); ``batching`` lays out
    their eval batches (``batching.eval_batches``)."""

    records: list
    prompts: batching.TokenizedPrompts | None
    batching: batching.BatchingConfig

    def __len__(self) -> int:
        return 0 if self.prompts is None else len(self.prompts)

    def num_batches(self) -> int:
        """Global batches in one pass over the prompts."""
        return -(-len(self) // self.batching.global_batch_size)

    def batches(self):
        """This host's rows of each global eval batch, in order (``batching.eval_batches``)."""
        return batching.eval_batches(self.prompts, self.batching, process_index=jax.process_index(),
                                     process_count=jax.process_count())


class RunBasics(NamedTuple):
    """What every command opens before any weights load: the validated run spec, the device mesh, the asset
    directories (``asset_paths``) and the policy's tokenizer."""

    spec: RunSpec
    mesh: Any
    paths: dict
    tokenizer: Any


@dataclasses.dataclass
class Run:
    """Everything a run holds after set-up (host objects, device arrays and compiled programs). ``train_set`` and
    ``iterator`` are the training prompts and this host's position in them; a run built for evaluation
    (``build_for_eval``) has neither and only samples ``dev``."""

    config: Any
    spec: RunSpec
    workdir: str
    mesh: Any
    tokenizer: Any
    dev: PromptSet
    policy: policy.PolicySpec
    frozen: Any
    engine: engine_lib.RewardEngine | None
    gold: Any
    paths: dict
    programs: programs_lib.RunPrograms
    train_set: PromptSet | None = None
    iterator: batching.PromptIterator | None = None

    def to_global(self, x):
        """This host's rows of a batch -> the global array sharded over the mesh's batch axes."""
        return host_arrays.to_global(self.mesh, self.spec.mesh.rules, x)

    def to_local(self, x):
        """A global batch array -> this host's rows, as NumPy."""
        return host_arrays.to_local(self.mesh, self.spec.mesh.rules, x)


def asset_paths(config, workdir) -> dict:
    """Checkpoint directories (policy, tokenizer, gold RM); the tiny config builds its own in
    ``<workdir>/assets`` on first use."""
    if not uses_tiny(config):
        gold = config.gold_rm.path
        return {"policy": config.model.path, "tokenizer": config.tokenizer.path or config.model.path,
                "gold_rm": gold, "gold_rm_random": bool(gold) and gold_rm_lib.marked_random(gold)}
    from rre_jax import tiny
    if jax.process_index() == 0:  # one builder; the other hosts then find the finished directories
        built = tiny.ensure_assets(config, workdir)
    multihost_utils.sync_global_devices("tiny assets")
    if jax.process_index() != 0:
        built = tiny.ensure_assets(config, workdir)
    gold = config.gold_rm.path or built["gold_rm"]
    return {"policy": built["policy"], "tokenizer": built["tokenizer"], "gold_rm": gold,
            "gold_rm_random": not config.gold_rm.path or gold_rm_lib.marked_random(config.gold_rm.path)}


def _load_records(config, field: str):
    path = config.data[field]
    if not path and config.data.source == "json" and uses_tiny(config):
        path = str(tiny_prompts_path())
    if not path:
        return [], ""
    if config.data.source == "tfds":
        from rre_jax.data import tfds_builders
        name, split = path.split(":", 1)
        return tfds_builders.load_tfds_prompts(name, split, data_dir=config.data.tfds_dir,
                                               missing_qtype=config.data.missing_qtype), path
    return prompts_lib.load_prompts(path, missing_qtype=config.data.missing_qtype), path


def _relevance_encoder(config, mesh, needed: bool):
    if not needed:
        return None
    from rre_jax import relevance
    path = relevance.encoder_path(config.relevance.path, "--config.relevance.path")
    return relevance.RelevanceEncoder.from_pretrained(path, max_length=int(config.relevance.max_length),
                                                      progress=False)


def open_basics(config, workdir: str) -> RunBasics:
    """Validate ``config``, build the mesh over its devices, find (the tiny config: build) the asset directories
    and load the policy's tokenizer; nothing is loaded onto devices yet."""
    from rre_jax import tokenizer as tok_lib
    spec = validate(config)
    mesh = mesh_lib.make_mesh(spec.mesh, jax.devices()[:spec.mesh.num_devices or None])
    paths = asset_paths(config, workdir)
    return RunBasics(spec, mesh, paths, tok_lib.load_tokenizer(paths["tokenizer"]))


def batching_config(config, global_batch_size: int) -> batching.BatchingConfig:
    """The batching of ``config.data`` (prompt length, bucket multiple, shuffle seed) at ``global_batch_size``."""
    return batching.BatchingConfig(global_batch_size=int(global_batch_size),
                                   max_prompt_length=int(config.data.max_prompt_length),
                                   bucket_multiple=int(config.data.bucket), seed=int(config.data.shuffle_seed))


def prompt_set(records, tokenizer, bcfg: batching.BatchingConfig) -> PromptSet:
    """``records`` tokenized for sampling in order with ``bcfg`` (no records: no prompts)."""
    prompts = (batching.tokenize_prompts(records, tokenizer, max_prompt_length=bcfg.max_prompt_length)
               if records else None)
    return PromptSet(list(records), prompts, bcfg)


def build(config, workdir: str, saved: tuple[dict, str] | None = None) -> Run:
    """The run's mesh, data, models and reward engine; ``saved``: ``(meta, where)`` of the checkpoint it resumes,
    whose data position is range-checked against the prompts before any model loads."""
    basics = open_basics(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    spec, tokenizer = basics.spec, basics.tokenizer
    records, train_path = _load_records(config, "train_file")
    prompts = batching.tokenize_prompts(records, tokenizer, max_prompt_length=int(config.data.max_prompt_length))
    log.info("%d training prompts from %s (%d dropped as too long)", len(prompts), train_path, len(prompts.dropped))
    per_step = spec.group.prompts_per_step if spec.group else spec.ppo.batch_size  # group: B / G prompts
    train_set = PromptSet(records, prompts, batching_config(config, per_step))
    iterator = _prompt_iterator(prompts, train_set.batching, saved)
    dev_records, _ = _load_records(config, "dev_file")
    dev = prompt_set(dev_records[:int(config.train.dev_size)], tokenizer,
                     batching_config(config, spec.ppo.batch_size))  # no dev file: no dev eval
    gold = gold_rm(config, spec, basics.paths, basics.mesh)
    return _assemble(config, basics, workdir, dev, gold, records + dev.records, train_set=train_set,
                     iterator=iterator)


def build_for_eval(config, basics: RunBasics, workdir: str, dev: PromptSet, *, gold=None,
                   scoring: bool = True) -> Run:
    """A run that only samples ``dev`` (``rre-eval``, ``rre-bon``, ``rre-alignment-tax``): the policy, the reward
    engine over ``dev.records`` (none unless ``scoring``), the gold RM ``gold`` (see `gold_rm`) and the programs;
    no training prompts and no iterator."""
    return _assemble(config, basics, workdir, dev, gold, dev.records if scoring else None)


def _assemble(config, basics: RunBasics, workdir: str, dev: PromptSet, gold, engine_records, *,
              train_set: PromptSet | None = None, iterator: batching.PromptIterator | None = None) -> Run:
    """Load the policy onto the mesh, build the reward engine over ``engine_records`` (None: no engine) and the
    programs, and hold them with the parts already set up as one `Run`."""
    spec, mesh, paths, tokenizer = basics
    pspec, frozen = load_policy(config, spec, mesh, paths)
    engine = (None if engine_records is None
              else reward_engine(config, spec, mesh, tokenizer, pspec.cfg.vocab_size, engine_records))
    return Run(config, spec, workdir, mesh, tokenizer, dev, pspec, frozen, engine, gold, paths,
               run_programs(spec, mesh, pspec, frozen, tokenizer), train_set=train_set, iterator=iterator)


def load_policy(config, spec: RunSpec, mesh, paths: dict):
    """``(policy spec, frozen base weights)`` of the causal LM at ``paths['policy']``."""
    from rre_jax.models import from_pretrained
    base = from_pretrained(paths["policy"], mesh=mesh, rules=spec.mesh.rules, dtype=spec.dtype,
                           param_dtype=spec.param_dtype)
    if base.kind != "causal_lm":
        raise ValueError(f"config.model.path={paths['policy']!r} is a {base.kind} checkpoint, not a causal LM")
    return policy.PolicySpec(base.config, spec.mode, spec.lora, spec.critic, spec.remat, mesh=mesh,
                             rules=spec.mesh.rules), base.params


def run_programs(spec: RunSpec, mesh, pspec: policy.PolicySpec, frozen, tokenizer) -> programs_lib.RunPrograms:
    """The run's jitted programs (sampler, experience, update, train-state init) with their shardings."""
    rows = experience_rows(spec.ppo, mesh.shape["data"] * mesh.shape["fsdp"])
    return programs_lib.RunPrograms(mesh, spec.mesh.rules, pspec, spec.ppo, frozen, eos_id=tokenizer.eos_token_id,
                                    pad_id=tokenizer.pad_token_id, experience_rows=rows)


def reward_engine(config, spec: RunSpec, mesh, tokenizer, vocab_size: int, records) -> engine_lib.RewardEngine:
    """The reward engine of ``spec`` (training proxy + counterfactuals) over the prompt set ``records``."""
    from rre_jax import tokenizer as tok_lib
    needs_rel = spec.reward.needs_relevance or any(s.needs_relevance for s in spec.counterfactual.values())
    encoder = _relevance_encoder(config, mesh, needs_rel)
    tables = features.feature_tables(_pad_table(tok_lib.byte_table(tokenizer), vocab_size))
    queries = [templates.relevance_query(templates.alpaca_prompt(r.instruction)) for r in records]
    return engine_lib.RewardEngine(spec.reward, spec.counterfactual, tables,
                                   stop_strings=tuple(config.reward.stop_strings), queries=queries,
                                   references=[r.reference for r in records],
                                   qtype_P=np.array([r.qtype_id for r in records]), encoder=encoder,
                                   seed=int(config.seed), relevance_text=spec.relevance_text)


def gold_rm(config, spec: RunSpec, paths: dict, mesh):
    """The gold RM of ``paths['gold_rm']`` (None when the run has none); its tokenizer is checked first."""
    if not paths["gold_rm"]:
        return None
    return gold_rm_lib.GoldRM(paths["gold_rm"], tokenizer_path=config.gold_rm.tokenizer,
                              max_length=int(config.gold_rm.max_length), batch_size=int(config.gold_rm.batch_size),
                              layout=config.gold_rm.layout, mesh=mesh, rules=spec.mesh.rules,
                              is_random=paths["gold_rm_random"], placement=config.gold_rm.placement)


def _pad_table(table, vocab_size: int):
    """The byte table widened to the model's vocabulary (ids the tokenizer lacks contribute no bytes)."""
    from rre_jax import tokenizer as tok_lib
    if table.vocab_size >= vocab_size:
        return table
    extra = vocab_size - table.vocab_size
    return tok_lib.ByteTable(np.concatenate([table.bytes_VxL, np.zeros((extra, table.bytes_VxL.shape[1]), np.uint8)]),
                             np.concatenate([table.len_V, np.zeros(extra, np.int32)]), table.family,
                             table.strips_leading_space)


# ======================================================================================= train state

def init_state(run: Run, rng):
    """A fresh train state, written by one program straight into its shardings (``programs.build_init``)."""
    return run.programs.init_state(run.frozen, rng)


def restore(run: Run, ckpt: checkpoint.CheckpointManager, step: int):
    """Checkpoint ``step``, read straight into the train state's shardings (nothing is initialised first)."""
    return ckpt.restore(step, run.programs.state.target())


def experience_rows(pcfg: ppo.PPOConfig, shards: int = 1) -> int:
    """Rows per group of the experience pass: the smallest multiple of the batch shards (so every group stays
    evenly sharded) that holds a PPO mini-batch and divides the batch; the whole batch if none does."""
    for rows in range(shards, pcfg.batch_size + 1, shards):
        if rows >= pcfg.mini_batch_size and pcfg.batch_size % rows == 0:
            return rows
    return pcfg.batch_size


# ======================================================================================= one step

def sample_and_score(run: Run, state, ids_BxT, mask_BxT, index_B, rng, scfg: sampling.SamplingConfig, *,
                     group: int = 1):
    """Rollout + reward of one batch: ``(rollout, response mask after the cut, components, texts, timings)``.

    ``texts`` are the decoded responses as sampled: what every component is scored on (``reward_engine``: LI and
    RP clean them on device, relevance embeds them as they are), what evals store and judge, and so what a
    rescoring of the store (``rre-score``) gives every component back from. ``group``: rows come in groups of
    that many copies of one prompt, prefilled once (`rollout.sample`).
    """
    t0 = time.perf_counter()
    params, adapters = policy.sampling_params(run.policy, state["trainable"], run.frozen)
    roll = run.programs.sampler(scfg, group)(params, ids_BxT, mask_BxT, rng, adapters)
    feats = run.engine.features(roll.tokens_BxN, roll.mask_BxN)
    mask_BxN = rollout.cut_mask(roll.mask_BxN, feats.cut_token_B) if run.config.reward.cut_at_stop else roll.mask_BxN
    jax.block_until_ready(mask_BxN)
    t1 = time.perf_counter()
    tokens, raw_mask = run.to_local(roll.tokens_BxN), run.to_local(roll.mask_BxN)
    texts = run.tokenizer.batch_decode([t[k == 1] for t, k in zip(tokens, raw_mask)], skip_special_tokens=True)
    feats = type(feats)(*(run.to_local(f) for f in feats))  # this host's share is scored on this host
    comps = run.engine.score(np.asarray(index_B), feats, texts)
    t2 = time.perf_counter()
    return roll, mask_BxN, comps, texts, {"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1}


def train_step(run: Run, state, batch: batching.Batch):
    step = int(state["step"])
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    k_roll, k_update = jax.random.split(rng)
    gcfg = run.spec.group
    if gcfg is not None:  # a group method: each prompt sampled G times, a group on consecutive rows
        batch = batching.repeat_prompts(batch, gcfg.num_generations)
    ids_BxT, mask_BxT = run.to_global(batch.ids_BxT), run.to_global(batch.mask_BxT)
    T = batch.ids_BxT.shape[1]
    group = gcfg.num_generations if gcfg is not None else 1  # a group's prompt is prefilled once
    roll, mask_BxN, comps, texts, times = sample_and_score(run, state, ids_BxT, mask_BxT, batch.index_B, k_roll,
                                                           run.spec.sampling, group=group)
    t0 = time.perf_counter()
    ids_BxS = jnp.concatenate([ids_BxT, roll.tokens_BxN], axis=1)
    attn_BxS = jnp.concatenate([mask_BxT, mask_BxN], axis=1)
    N = roll.tokens_BxN.shape[1]
    experience = (run.programs.experience(T, N) if gcfg is None
                  else run.programs.group_experience(T, N, gcfg.needs_reference))
    exp = experience(state["trainable"], run.frozen, ids_BxS, attn_BxS)
    jax.block_until_ready(exp)
    t1 = time.perf_counter()
    score_B = comps["proxy"] - float(run.config.reward.baseline)  # this host's share
    n_tok, n_raw = run.to_local(mask_BxN).sum(1), run.to_local(roll.mask_BxN).sum(1)
    every = host_arrays.gather({**comps, "n_tok": n_tok, "n_raw": n_raw})  # the global batch, for metrics
    scalars = {f"reward/{k}": float(np.mean(v)) for k, v in every.items() if k in comps}
    scalars.update({"response/tokens_mean": float(every["n_tok"].mean()),
                    "response/tokens_max": float(every["n_tok"].max()),
                    "response/words_mean": float(every["n_words"].mean()),
                    "response/cut_frac": float(np.mean(every["n_tok"] < every["n_raw"])),
                    "rollout/decode_steps": float(roll.steps)})
    if not np.all(np.isfinite(every["proxy"] - float(run.config.reward.baseline))):  # global: all hosts agree
        log.warning("step %d: non-finite rewards %s; batch skipped", step, every["proxy"])
        state = {**state, "step": state["step"] + 1}
        return state, {**scalars, **times, "train/skipped_batch": 1.0}
    update = run.programs.update(T, N) if gcfg is None else run.programs.group_update(T, N, gcfg)
    state, stats = update(state, run.frozen, exp, run.to_global(score_B.astype(np.float32)), ids_BxS, attn_BxS,
                          mask_BxN, k_update)
    stats = jax.device_get(stats)
    t2 = time.perf_counter()
    scalars.update({k: float(np.mean(v)) for k, v in stats.items() if np.ndim(v) == 0 or np.size(v) == 1})
    new_tokens = float(every["n_raw"].sum())
    times.update({"time/experience_s": t1 - t0, "time/update_s": t2 - t1,
                  "time/rollout_tokens_per_s": new_tokens / max(times["time/rollout_s"], 1e-9),
                  "train/skipped_batch": 0.0,
                  "objective/kl_coef_next": float(state["kl"].value) if gcfg is None else gcfg.beta})
    scalars["compile/programs"] = float(_compiled_programs(run))
    scalars.update({f"compile/{k}": float(n) for k, n in run.programs.compiled_counts().items()})
    scalars["rollout/prompt_bucket"] = float(T)
    return state, {**scalars, **times}


def _compiled_programs(run: Run) -> int:
    """How many executables the step's jitted programs hold (a rise after warm-up means a recompile)."""
    return sum(run.programs.compiled_counts().values()) + run.engine.features_fn._cache_size()


# ======================================================================================= dev eval

def dev_eval(run: Run, state, step: int) -> dict:
    """Sample the dev prompts with the training sampler; proxy (every component) and gold, logged and stored."""
    records = run.dev.records
    if not len(run.dev):
        return {}
    out = {k: [] for k in ("index", "texts")}
    comps_all: dict = {}
    # the engine's prompt table: the training prompts (none in a run built for evaluation), then the dev prompts
    offset = 0 if run.train_set is None else len(run.train_set.records)
    for i, b in enumerate(run.dev.batches()):
        rng = jax.random.fold_in(jax.random.key(int(run.config.seed) + 7), step * 1000 + i)
        _, _, comps, texts, _ = sample_and_score(run, state, run.to_global(b.ids_BxT), run.to_global(b.mask_BxT),
                                                 b.index_B + offset, rng, run.spec.sampling)
        # every host gathers the whole batch, so the gold RM sees the same inputs everywhere
        every = host_arrays.gather({**comps, "index": np.asarray(b.index_B), "valid": np.asarray(b.valid_B)})
        keep = every["valid"]
        out["index"] += list(every["index"][keep])
        out["texts"] += [t for t, k in zip(host_arrays.gather_texts(texts), keep) if k]
        for k in comps:
            comps_all.setdefault(k, []).extend(every[k][keep].tolist())
    instr = [records[i].instruction for i in out["index"]]
    scalars = {f"eval/{k}": float(np.mean(v)) for k, v in comps_all.items()}
    gold = None
    if run.gold is not None:
        gold = run.gold.score([templates.alpaca_prompt(s) for s in instr], out["texts"])
        scalars["eval/gold"] = float(np.mean(gold))
    if jax.process_index() == 0:
        from rre_jax import evaluate
        proxies = {k: np.asarray(v) for k, v in comps_all.items() if k == "proxy" or k.startswith("cf/")}
        proxies = {("train" if k == "proxy" else k[3:]): v for k, v in proxies.items()}
        if EVAL_PROXY not in proxies:  # validate adds cf/rer unless the training proxy is RER itself
            proxies[EVAL_PROXY] = proxies["train"]
        roll = evaluate.StepRollouts(
            step=step, instruction=instr, response=out["texts"], qtype=[records[i].qtype for i in out["index"]],
            dataset=[records[i].dataset or "" for i in out["index"]], proxies=proxies,
            gold=np.asarray(gold if gold is not None else np.full(len(instr), np.nan)),
            features={k: np.asarray(v) for k, v in comps_all.items() if k in ("li", "rp", "qr", "ar")},
            train_proxy="train", gold_rm=run.paths["gold_rm"] or "", gold_rm_random=bool(run.paths["gold_rm_random"]),
            sampling=dataclasses.asdict(run.spec.sampling), relevance_text=run.engine.relevance_text,
            extra={"run": run.config.name, "split": "dev"})
        evaluate.write_step(os.path.join(run.workdir, "dev_eval"), roll, overwrite=True)
        try:
            summary = evaluate.refresh_report(os.path.join(run.workdir, "dev_eval"), n_boot=200)
            for name in ("train", "rer"):  # monotonicity so far: proxy means vs gold means across saves
                corr = summary.get("correlations", {}).get("all", {}).get(f"proxy:{name}", {})
                for stat in ("spearman", "kendall"):
                    if stat in corr:
                        scalars[f"eval/monotonicity_{stat}_{name}"] = float(corr[stat])
        except Exception as e:  # a report problem must never stop training
            log.warning("dev-eval report refresh failed: %s", e)
    return scalars


# ======================================================================================= the run

def _meta(run: Run, state, iterator_state) -> dict:
    return {"step": int(state["step"]), "data": dataclasses.asdict(iterator_state),
            "config": json.loads(run.config.to_json_best_effort()), "policy": run.paths["policy"],
            "gold_rm": run.paths["gold_rm"], "gold_rm_random": bool(run.paths["gold_rm_random"])}


def _prompt_iterator(prompts, bcfg, saved: tuple[dict, str] | None) -> batching.PromptIterator:
    """This host's prompt iterator, at a checkpoint's saved data position if ``saved`` (range-checked)."""
    kw = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    if saved is None:
        return batching.PromptIterator(prompts, bcfg, **kw)
    meta, where = saved
    try:
        return batching.PromptIterator(prompts, bcfg, state=batching.IteratorState(**meta["data"]), **kw)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint {where}: its data position {meta.get('data')} does not fit this run "
                        f"({len(prompts)} prompts, config.ppo.batch_size={bcfg.global_batch_size}): {e}; resume "
                        "with the config.data.train_file and config.ppo.batch_size it was saved with, or start a "
                        "new --workdir") from None


@workdir_lock.holding("rre-train")  # issue 23: one workdir, one run (nests under rre-train's own lock)
def run(config, workdir: str) -> dict:
    """Train (or resume) a run in ``workdir``; returns the last step's metrics. On SIGTERM (spot / preemptible
    VMs) every host saves at one common step and returns early (``preemption``); rerunning resumes there."""
    validate(config)  # before the checkpoint directory is created
    ckpt = checkpoint.CheckpointManager(workdir, max_to_keep=int(config.train.max_to_keep) or None)
    saved = ckpt.newest_meta()  # issue 23: (step, meta) of the newest step whose meta reads
    latest = None if saved is None else saved[0]
    r = build(config, workdir, None if saved is None else (saved[1], f"{ckpt.directory}/{latest}"))
    state = init_state(r, jax.random.key(int(config.seed)))
    writer = metrics_lib.MetricWriter(workdir, tracker=tracking.open_run(config, workdir))  # issue 23: W&B
    if latest is not None:
        # issue 23: damaged newer steps are moved aside (checkpoints/damaged/) and the newest intact one restored
        latest, state, meta = ckpt.restore_newest_intact(r.programs.state.target())
        if latest != saved[0]:
            r.iterator = _prompt_iterator(r.train_set.prompts, r.train_set.batching,
                                          (meta, f"{ckpt.directory}/{latest}"))
        writer.truncate_after(latest)
        log.info("resumed from step %d in %s", latest, ckpt.directory)
    from tqdm.auto import tqdm
    total = int(config.train.steps)
    bar = tqdm(total=total, initial=int(state["step"]), desc=config.name, unit="step",
               disable=jax.process_index() != 0)
    last: dict = {}
    with preemption.Watch() as watch:
        while int(state["step"]) < total:
            batch = next(r.iterator)
            state, last = train_step(r, state, batch)
            step = int(state["step"])
            writer.write(step, last)
            bar.update(1)
            shown = {"proxy": last.get("reward/proxy"), "kl": last.get("objective/kl")}  # no KL when beta = 0
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None and math.isfinite(v)})
            preempted = watch.reached(step)  # every host, every step: True on all hosts at the same step
            if step % int(config.train.save_freq) == 0 or step == total:
                # Dev eval first: a run killed after the save must not resume without this step's eval.
                writer.write(step, dev_eval(r, state, step))
                writer.report(os.path.join(workdir, "dev_eval"), step, "dev_eval")  # issue 23: to W&B, if on
                ckpt.save(step, state, _meta(r, state, r.iterator.state))
                log.info("saved checkpoint for step %d", step)
            elif preempted:  # no dev eval: the VM's notice is short, and this step is not on the eval schedule
                ckpt.save(step, state, _meta(r, state, r.iterator.state))
            if preempted:
                log.warning("preempted: saved step %d in %s; the same rre-train command resumes from it", step,
                            ckpt.directory)
                break
    bar.close()
    export = bool(config.train.export_final) and int(state["step"]) == total  # not after a preemption
    if export:
        params, adapters = policy.export_params(r.policy, state["trainable"], r.frozen)
        def whole(x):  # an array spread over hosts -> the whole array, on every host (a collective)
            return x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)
        params, adapters = jax.tree.map(whole, (params, adapters))
    if export and jax.process_index() == 0:
        out = os.path.join(workdir, "export")
        llama.export_pretrained(out, r.policy.cfg, params, lora=adapters,
                                lora_cfg=r.policy.lora_cfg if adapters is not None else None)
        r.tokenizer.save_pretrained(out)
    writer.close()
    ckpt.close()
    return last
