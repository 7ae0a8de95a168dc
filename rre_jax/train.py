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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rre_jax import advantages, checkpoint, compiled, mesh as mesh_lib, metrics as metrics_lib, policy, ppo, reward
from rre_jax import features, gold_rm as gold_rm_lib, reward_engine as engine_lib, rollout, sampling
from rre_jax.data import batching, prompts as prompts_lib, templates, tiny_prompts_path
from rre_jax.models import llama, lora as lora_lib

log = logging.getLogger(__name__)


# ======================================================================================= configuration

@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Every config section in its validated, frozen form. Built before any model is loaded or compiled."""

    ppo: ppo.PPOConfig
    reward: reward.RewardSpec
    counterfactual: dict
    sampling: sampling.SamplingConfig
    mesh: mesh_lib.MeshConfig
    lora: lora_lib.LoraConfig
    mode: str
    critic: str
    remat: str
    dtype: Any
    param_dtype: Any


def validate(config) -> RunSpec:
    """Turn the ml-collections config into frozen dataclasses; every error names the field and the fix."""
    def dtype(field):
        name = config.model[field]
        if name not in ("float32", "bfloat16"):
            raise ValueError(f"config.model.{field}={name!r}: choose 'float32' or 'bfloat16'")
        return jnp.dtype(name)

    ppo_cfg = ppo.PPOConfig.from_config(config.ppo)
    spec = reward.preset(config.reward.preset)
    spec = dataclasses.replace(spec, max_new_tokens=int(config.sampling.max_new_tokens))
    cf = {f"cf/{n}": dataclasses.replace(reward.preset(n), max_new_tokens=spec.max_new_tokens)
          for n in config.reward.counterfactual}
    if config.model.train_mode not in policy.MODES:
        raise ValueError(f"config.model.train_mode={config.model.train_mode!r}; choose one of {policy.MODES}")
    critic = policy.check_critic(config.model.get("critic", "separate"))
    remat = llama.check_remat(config.model.get("remat", "dots"))
    mesh_cfg = mesh_lib.MeshConfig.from_config(config.mesh)
    n_dev = mesh_cfg.num_devices or jax.device_count()
    if n_dev > jax.device_count():
        raise ValueError(f"config.mesh.num_devices={n_dev} but only {jax.device_count()} devices exist")
    shape = mesh_cfg.resolved_shape(n_dev)  # raises with the fix when the mesh does not fit the devices
    rows = shape[0] * shape[1]
    if ppo_cfg.batch_size % rows:
        raise ValueError(f"config.ppo.batch_size={ppo_cfg.batch_size} must be a multiple of the mesh's "
                         f"data x fsdp = {rows} devices; change it or --config.mesh.shape")
    if config.train.save_freq <= 0 or config.train.steps <= 0:
        raise ValueError("config.train.steps and config.train.save_freq must be positive")
    _check_prompt_source(config.data)
    return RunSpec(ppo=ppo_cfg, reward=spec, counterfactual=cf,
                   sampling=sampling.SamplingConfig.from_config(config.sampling), mesh=mesh_cfg,
                   lora=lora_lib.LoraConfig.from_config(config.model.lora),
                   mode=config.model.train_mode, critic=critic, remat=remat, dtype=dtype("dtype"),
                   param_dtype=dtype("param_dtype"))


# ======================================================================================= set-up

@dataclasses.dataclass
class Run:
    """Everything a run holds after set-up (host objects, device arrays and compiled programs)."""

    config: Any
    spec: RunSpec
    workdir: str
    mesh: Any
    tokenizer: Any
    records: list
    prompts: batching.TokenizedPrompts
    iterator: batching.PromptIterator
    dev: tuple
    policy: policy.PolicySpec
    frozen: Any
    engine: engine_lib.RewardEngine
    gold: Any
    paths: dict


def _paths(config, workdir) -> dict:
    """Checkpoint directories; the tiny config builds its own in ``<workdir>/assets`` on first use."""
    if config.model.path:
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


def _check_prompt_source(data) -> None:
    """json: prompt files must exist. tfds: ``<field> = '<builder name>:<split>'`` in ``data.tfds_dir``."""
    if data.source not in ("json", "tfds"):
        raise ValueError(f"config.data.source={data.source!r}; choose 'json' (JSON / JSONL files) or 'tfds'")
    for field in ("train_file", "dev_file", "eval_file"):
        path = data[field]
        if path and data.source == "json" and not os.path.exists(path):
            raise FileNotFoundError(f"config.data.{field}={path!r} does not exist")
        if data.source == "tfds" and (path or field == "train_file") and not (":" in path and data.tfds_dir):
            raise ValueError(f"config.data.source='tfds': set config.data.{field}='<builder>:<split>' (e.g. "
                             "'alpaca_farm_prompts:alpacafarm_val') and config.data.tfds_dir to the prepared "
                             f"data_dir (rre_jax.data.tfds_builders.build); got {field}={path!r}, "
                             f"tfds_dir={data.tfds_dir!r}")


def _load_records(config, field: str):
    path = config.data[field]
    if not path and config.data.source == "json" and (not config.model.path or field == "train_file"):
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


def build(config, workdir: str) -> Run:
    spec = validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh_lib.make_mesh(spec.mesh, jax.devices()[:spec.mesh.num_devices or None])
    paths = _paths(config, workdir)
    from rre_jax import tokenizer as tok_lib
    tokenizer = tok_lib.load_tokenizer(paths["tokenizer"])
    records, train_path = _load_records(config, "train_file")
    prompts = batching.tokenize_prompts(records, tokenizer, max_prompt_length=int(config.data.max_prompt_length))
    log.info("%d training prompts from %s (%d dropped as too long)", len(prompts), train_path, len(prompts.dropped))
    bcfg = batching.BatchingConfig(global_batch_size=spec.ppo.batch_size,
                                   max_prompt_length=int(config.data.max_prompt_length),
                                   bucket_multiple=int(config.data.bucket), seed=int(config.data.shuffle_seed))
    iterator = batching.PromptIterator(prompts, bcfg, process_index=jax.process_index(),
                                       process_count=jax.process_count())
    dev_records, _ = _load_records(config, "dev_file")
    dev_records = dev_records[:int(config.train.dev_size)]
    max_len = int(config.data.max_prompt_length)
    dev_prompts = (batching.tokenize_prompts(dev_records, tokenizer, max_prompt_length=max_len)
                   if dev_records else None)  # no dev file: no dev eval

    pspec, frozen = load_policy(config, spec, mesh, paths)
    engine = reward_engine(config, spec, mesh, tokenizer, pspec.cfg.vocab_size, records + dev_records)
    gold = gold_rm(config, spec, paths, mesh)
    return Run(config, spec, workdir, mesh, tokenizer, records, prompts, iterator,
               (dev_records, dev_prompts, bcfg), pspec, frozen, engine, gold, paths)


def load_policy(config, spec: RunSpec, mesh, paths: dict):
    """``(policy spec, frozen base weights)`` of the causal LM at ``paths['policy']``."""
    from rre_jax.models import from_pretrained
    base = from_pretrained(paths["policy"], mesh=mesh, rules=spec.mesh.rules, dtype=spec.dtype,
                           param_dtype=spec.param_dtype)
    if base.kind != "causal_lm":
        raise ValueError(f"config.model.path={paths['policy']!r} is a {base.kind} checkpoint, not a causal LM")
    return policy.PolicySpec(base.config, spec.mode, spec.lora, spec.critic, spec.remat), base.params


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
                                   seed=int(config.seed))


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
    trainable = policy.init_trainable(run.policy, run.frozen, rng)
    opt_state = ppo.make_optimizer(run.spec.ppo).init(trainable)
    return {"trainable": trainable, "opt_state": opt_state, "moments": advantages.init_moments(),
            "kl": advantages.init_kl(run.spec.ppo.init_kl_coef), "rng": jax.random.key_data(rng),
            "step": jnp.zeros((), jnp.int32)}


def restore(run: Run, ckpt: checkpoint.CheckpointManager, step: int, state):
    """Checkpoint ``step`` in ``state``'s shapes; leaves not on the run's mesh come back replicated over it.

    ``init_state`` leaves most of the state on one device; restored as is, those arrays would be committed there
    and every jitted program would reject them beside the mesh-sharded weights (on any mesh of > 1 device).
    """
    replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())

    def target(x):
        on_mesh = isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == run.mesh
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if on_mesh else replicated)
    return ckpt.restore(step, jax.tree.map(target, state))


# ======================================================================================= jitted programs

_PROGRAMS: dict = {}  # (name, static args) -> AheadOfTime program; one executable per prompt bucket


def _program(name: str, build, *key):
    if (name, key) not in _PROGRAMS:
        _PROGRAMS[(name, key)] = compiled.AheadOfTime(build(*key))
    return _PROGRAMS[(name, key)]


def _experience_fn(pspec: policy.PolicySpec, T: int, rows: int | None = None):
    return _program("experience", _build_experience, pspec, T, rows)


def experience_rows(pcfg: ppo.PPOConfig, shards: int = 1) -> int:
    """Rows per group of the experience pass: the smallest multiple of the batch shards (so every group stays
    evenly sharded) that holds a PPO mini-batch and divides the batch; the whole batch if none does."""
    for rows in range(shards, pcfg.batch_size + 1, shards):
        if rows >= pcfg.mini_batch_size and pcfg.batch_size % rows == 0:
            return rows
    return pcfg.batch_size


def _update_fn(pspec: policy.PolicySpec, pcfg: ppo.PPOConfig, T: int):
    return _program("update", _build_update, pspec, pcfg, T)


def _build_experience(pspec: policy.PolicySpec, T: int, rows: int | None):
    """Program 2: old log-probs, values and reference log-probs of the response tokens (frozen per batch), over
    groups of ``rows`` rows."""
    def fn(trainable, frozen, ids_BxS, mask_BxS):
        return policy.experience(pspec, trainable, frozen, ids_BxS, mask_BxS, T, rows)
    return jax.jit(fn)


def _build_update(pspec: policy.PolicySpec, pcfg: ppo.PPOConfig, T: int):
    """Program 3: advantages (trl's pre-epoch maths), the PPO epochs, and the KL controller; donates state."""
    def forward(trainable, mb, rng, frozen):
        return policy.policy_outputs(pspec, trainable, frozen, mb["ids"], mb["attn"], T, rng)
    update = ppo.make_update_step(forward, ppo.make_optimizer(pcfg), pcfg)

    def fn(state, frozen, exp, score_B, ids_BxS, attn_BxS, mask_BxN, rng):
        old_logp, values, ref_logp = exp
        batch, moments, pre = ppo.prepare_batch(old_logp, ref_logp, values, score_B, mask_BxN, state["moments"],
                                                state["kl"], pcfg)
        batch = {**batch, "ids": ids_BxS, "attn": attn_BxS}
        trainable, opt_state, stats = update(state["trainable"], state["opt_state"], batch, rng, frozen)
        kl = ppo.update_kl_coef(state["kl"], pre["objective/kl"], pcfg)
        new = {**state, "trainable": trainable, "opt_state": opt_state, "moments": moments, "kl": kl,
               "step": state["step"] + 1}
        return new, {**pre, **stats}
    return jax.jit(fn, donate_argnums=(0,))


# ======================================================================================= one step

def _batch_spec(run: Run, ndim: int):
    return mesh_lib.logical_to_mesh_spec(("batch",) + (None,) * (ndim - 1), run.spec.mesh.rules)


def _global(run: Run, x):
    """A host-local batch share -> a global array sharded over the mesh's batch axes."""
    spec = _batch_spec(run, np.ndim(x))
    return jax.make_array_from_process_local_data(jax.sharding.NamedSharding(run.mesh, spec), np.asarray(x))


def _local(run: Run, x) -> np.ndarray:
    """The inverse of ``_global``: this host's rows of a global batch array, as NumPy (all rows on one host)."""
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, run.mesh, _batch_spec(run, x.ndim)))


def _gather(tree):
    """Host-local batch shares -> the global batch on every host (rows in process order, as ``_global`` lays
    them out). Metrics, skip decisions and dev-eval records then agree on every host."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def _gather_texts(texts: list[str]) -> list[str]:
    """``_gather`` for strings (UTF-8 bytes padded to the longest text on any host)."""
    data = [t.encode("utf-8") for t in texts]
    n_L = _gather(np.array([len(b) for b in data], np.int32))
    buf = np.zeros((len(data), max(int(n_L.max(initial=0)), 1)), np.uint8)
    for i, b in enumerate(data):
        buf[i, :len(b)] = np.frombuffer(b, np.uint8)
    return [bytes(row[:n]).decode("utf-8") for row, n in zip(_gather(buf), n_L)]


def sample_and_score(run: Run, state, ids_BxT, mask_BxT, index_B, rng, scfg: sampling.SamplingConfig, *,
                     relevance_on_cut: bool = False):
    """Rollout + reward of one batch: ``(rollout, response mask after the cut, components, texts, timings)``.

    ``texts`` are ``features.scored_text`` of the decoded responses: what evals store and judge. Relevance sees
    the uncut decoded text during training, as the reference's reward does; ``relevance_on_cut`` (dev eval,
    ``rre-eval``) scores ``texts``, so that rescoring stored responses (``rre-score``) reproduces every component.
    """
    t0 = time.perf_counter()
    params, adapters = policy.sampling_params(run.policy, state["trainable"], run.frozen)
    eos, pad = run.tokenizer.eos_token_id, run.tokenizer.pad_token_id
    sampler = rollout.jitted_sampler(run.policy.cfg, scfg, eos, pad, run.policy.lora_cfg if adapters is not None else None)
    roll = sampler(params, ids_BxT, mask_BxT, rng, adapters)
    feats = run.engine.features(roll.tokens_BxN, roll.mask_BxN)
    mask_BxN = rollout.cut_mask(roll.mask_BxN, feats.cut_token_B) if run.config.reward.cut_at_stop else roll.mask_BxN
    jax.block_until_ready(mask_BxN)
    t1 = time.perf_counter()
    tokens, raw_mask = _local(run, roll.tokens_BxN), _local(run, roll.mask_BxN)
    raw_texts = run.tokenizer.batch_decode([t[k == 1] for t, k in zip(tokens, raw_mask)], skip_special_tokens=True)
    texts = [features.scored_text(t, run.engine.stop_strings) for t in raw_texts]
    feats = type(feats)(*(_local(run, f) for f in feats))  # this host's share is scored on this host
    comps = run.engine.score(np.asarray(index_B), feats, texts if relevance_on_cut else raw_texts)
    t2 = time.perf_counter()
    return roll, mask_BxN, comps, texts, {"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1}


def train_step(run: Run, state, batch: batching.Batch):
    step = int(state["step"])
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    k_roll, k_update = jax.random.split(rng)
    ids_BxT, mask_BxT = _global(run, batch.ids_BxT), _global(run, batch.mask_BxT)
    T = batch.ids_BxT.shape[1]
    roll, mask_BxN, comps, texts, times = sample_and_score(run, state, ids_BxT, mask_BxT, batch.index_B, k_roll,
                                                           run.spec.sampling)
    t0 = time.perf_counter()
    ids_BxS = jnp.concatenate([ids_BxT, roll.tokens_BxN], axis=1)
    attn_BxS = jnp.concatenate([mask_BxT, mask_BxN], axis=1)
    rows = experience_rows(run.spec.ppo, run.mesh.shape["data"] * run.mesh.shape["fsdp"])
    exp = _experience_fn(run.policy, T, rows)(state["trainable"], run.frozen, ids_BxS, attn_BxS)
    jax.block_until_ready(exp)
    t1 = time.perf_counter()
    score_B = comps["proxy"] - float(run.config.reward.baseline)  # this host's share
    n_tok, n_raw = _local(run, mask_BxN).sum(1), _local(run, roll.mask_BxN).sum(1)
    every = _gather({**comps, "n_tok": n_tok, "n_raw": n_raw})  # the global batch, for metrics
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
    state, stats = _update_fn(run.policy, run.spec.ppo, T)(state, run.frozen, exp,
                                                           _global(run, score_B.astype(np.float32)),
                                                           ids_BxS, attn_BxS, mask_BxN, k_update)
    stats = jax.device_get(stats)
    t2 = time.perf_counter()
    scalars.update({k: float(np.mean(v)) for k, v in stats.items() if np.ndim(v) == 0 or np.size(v) == 1})
    new_tokens = float(every["n_raw"].sum())
    times.update({"time/experience_s": t1 - t0, "time/update_s": t2 - t1,
                  "time/rollout_tokens_per_s": new_tokens / max(times["time/rollout_s"], 1e-9),
                  "train/skipped_batch": 0.0, "objective/kl_coef_next": float(state["kl"].value)})
    scalars["compile/programs"] = float(_compiled_programs(run))
    return state, {**scalars, **times}


def _compiled_programs(run: Run) -> int:
    """How many executables the step's jitted programs hold (a rise after warm-up means a recompile)."""
    fns = list(_PROGRAMS.values()) + rollout.samplers() + [run.engine.features_fn]
    return sum(fn._cache_size() for fn in fns)


# ======================================================================================= dev eval

def dev_eval(run: Run, state, step: int) -> dict:
    """Sample the dev prompts with the training sampler; proxy (every component) and gold, logged and stored."""
    records, prompts, bcfg = run.dev
    if prompts is None or not len(prompts):
        return {}
    out = {k: [] for k in ("index", "texts")}
    comps_all: dict = {}
    for i, b in enumerate(batching.eval_batches(prompts, bcfg, process_index=jax.process_index(),
                                                process_count=jax.process_count())):
        rng = jax.random.fold_in(jax.random.key(int(run.config.seed) + 7), step * 1000 + i)
        _, _, comps, texts, _ = sample_and_score(run, state, _global(run, b.ids_BxT), _global(run, b.mask_BxT),
                                                 b.index_B + len(run.records), rng, run.spec.sampling,
                                                 relevance_on_cut=True)
        # every host gathers the whole batch, so the gold RM sees the same inputs everywhere
        every = _gather({**comps, "index": np.asarray(b.index_B), "valid": np.asarray(b.valid_B)})
        keep = every["valid"]
        out["index"] += list(every["index"][keep])
        out["texts"] += [t for t, k in zip(_gather_texts(texts), keep) if k]
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
        if "rer" not in proxies:
            proxies["rer"] = proxies["train"]
        roll = evaluate.StepRollouts(
            step=step, instruction=instr, response=out["texts"], qtype=[records[i].qtype for i in out["index"]],
            dataset=[records[i].dataset or "" for i in out["index"]], proxies=proxies,
            gold=np.asarray(gold if gold is not None else np.full(len(instr), np.nan)),
            features={k: np.asarray(v) for k, v in comps_all.items() if k in ("li", "rp", "qr", "ar")},
            train_proxy="train", gold_rm=run.paths["gold_rm"] or "", gold_rm_random=bool(run.paths["gold_rm_random"]),
            sampling=dataclasses.asdict(run.spec.sampling), extra={"run": run.config.name, "split": "dev"})
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


def run(config, workdir: str) -> dict:
    """Train (or resume) a run in ``workdir``; returns the last step's metrics."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    r = build(config, workdir)
    state = init_state(r, jax.random.key(int(config.seed)))
    ckpt = checkpoint.CheckpointManager(workdir, max_to_keep=int(config.train.max_to_keep) or None)
    writer = metrics_lib.MetricWriter(workdir)
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = restore(r, ckpt, latest, state)
        r.iterator.state = batching.IteratorState(**meta["data"])
        writer.truncate_after(latest)
        log.info("resumed from step %d in %s", latest, ckpt.directory)
    from tqdm.auto import tqdm
    total = int(config.train.steps)
    bar = tqdm(total=total, initial=int(state["step"]), desc=config.name, unit="step",
               disable=jax.process_index() != 0)
    last: dict = {}
    while int(state["step"]) < total:
        batch = next(r.iterator)
        state, last = train_step(r, state, batch)
        step = int(state["step"])
        writer.write(step, last)
        bar.update(1)
        bar.set_postfix(proxy=f"{last.get('reward/proxy', math.nan):.3f}", kl=f"{last.get('objective/kl', math.nan):.3f}")
        if step % int(config.train.save_freq) == 0 or step == total:
            # Dev eval first: a run killed after the save must not resume without this step's eval.
            writer.write(step, dev_eval(r, state, step))
            ckpt.save(step, state, _meta(r, state, r.iterator.state))
            log.info("saved checkpoint for step %d", step)
    bar.close()
    if config.train.export_final:
        params, adapters = policy.export_params(r.policy, state["trainable"], r.frozen)
        def whole(x):  # an array spread over hosts -> the whole array, on every host (a collective)
            return x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)
        params, adapters = jax.tree.map(whole, (params, adapters))
    if config.train.export_final and jax.process_index() == 0:
        out = os.path.join(workdir, "export")
        llama.export_pretrained(out, r.policy.cfg, params, lora=adapters,
                                lora_cfg=r.policy.lora_cfg if adapters is not None else None)
        r.tokenizer.save_pretrained(out)
    writer.close()
    ckpt.close()
    return last
