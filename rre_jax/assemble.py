"""Assembling a run: what ``rre-train``, ``rre-eval``, ``rre-bon`` and ``rre-alignment-tax`` hold before their
first step, from a validated config (``run_spec.validate``, called once by the command).

    load_prompt_sources -> open_basics (mesh, assets, tokenizer) -> for_training / for_eval
        (policy on the mesh, relevance encoder, gold RM, the run's programs, reward engine) -> restore / init_state

Nothing here loops or decides: ``train`` runs the steps, ``checkpoint_eval`` / ``best_of_n`` sample checkpoints.
``sample_and_score`` is the rollout + reward of one batch that all of them share.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from rre_jax import checkpoint, features, gold_rm as gold_rm_lib, host_arrays, mesh as mesh_lib, policy, ppo
from rre_jax import programs as programs_lib, relevance, reward_engine as engine_lib, rollout, sampling, tiny_assets
from rre_jax import tokenizer as tok_lib
from rre_jax.data import batching, prompts as prompts_lib, templates, tfds_builders, tiny_prompts_path
from rre_jax.errors import UserError
from rre_jax.models import from_pretrained
from rre_jax.run_spec import DataSpec, RunSpec

log = logging.getLogger(__name__)


# ======================================================================================= what a run holds

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


@dataclasses.dataclass(frozen=True)
class PromptSources:
    """The prompt records of a run, each file parsed once (``load_prompt_sources``): the training prompts (and
    where they came from) and the dev prompts (``spec.train.dev_size`` of them)."""

    train: list
    train_path: str
    dev: list


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
    (``for_eval``) has neither and only samples ``dev``."""

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


# ======================================================================================= inputs

def load_prompt_sources(spec: RunSpec) -> PromptSources:
    """Every prompt file of the run, parsed once, before anything is written; a bad file is a `UserError`
    naming the field, the file, the line and the column."""
    train, train_path = _records(spec, "train_file")
    dev, _ = _records(spec, "dev_file")
    return PromptSources(train, train_path, dev[:spec.train.dev_size])  # no dev file: no dev eval


def _records(spec: RunSpec, field: str) -> tuple[list, str]:
    data = spec.data
    path = getattr(data, field)
    if not path and data.source == "json" and spec.tiny:
        path = str(tiny_prompts_path())
    if not path:
        return [], ""
    if data.source == "tfds":
        name, split = path.split(":", 1)
        return tfds_builders.load_tfds_prompts(name, split, data_dir=data.tfds_dir,
                                               missing_qtype=data.missing_qtype), path
    try:
        return prompts_lib.load_prompts(path, missing_qtype=data.missing_qtype), path
    except prompts_lib.PromptFileError as e:
        raise UserError(f"config.data.{field}: {e}") from None


def asset_paths(config, spec: RunSpec, workdir) -> dict:
    """Checkpoint directories (policy, tokenizer, gold RM); the tiny config builds its own in
    ``<workdir>/assets`` on first use (from the config's tiny-model settings)."""
    given = spec.gold_rm.path
    if not spec.tiny:
        return {"policy": spec.model_path, "tokenizer": spec.tokenizer_path, "gold_rm": given,
                "gold_rm_random": bool(given) and gold_rm_lib.marked_random(given)}
    if jax.process_index() == 0:  # one builder; the other hosts then find the finished directories
        built = tiny_assets.ensure_assets(config, workdir)
    multihost_utils.sync_global_devices("tiny assets")
    if jax.process_index() != 0:
        built = tiny_assets.ensure_assets(config, workdir)
    return {"policy": built["policy"], "tokenizer": built["tokenizer"], "gold_rm": given or built["gold_rm"],
            "gold_rm_random": not given or gold_rm_lib.marked_random(given)}


def open_basics(config, spec: RunSpec, workdir: str) -> RunBasics:
    """The mesh over the run's devices, the asset directories (the tiny config: built) and the policy's tokenizer
    of a validated ``spec``; nothing is loaded onto devices yet."""
    mesh = mesh_lib.make_mesh(spec.mesh, jax.devices()[:spec.mesh.num_devices or None])
    paths = asset_paths(config, spec, workdir)
    return RunBasics(spec, mesh, paths, tok_lib.load_tokenizer(paths["tokenizer"]))


def batching_config(data: DataSpec, global_batch_size: int) -> batching.BatchingConfig:
    """The batching of ``data`` (prompt length, bucket multiple, shuffle seed) at ``global_batch_size``."""
    return batching.BatchingConfig(global_batch_size=int(global_batch_size),
                                   max_prompt_length=data.max_prompt_length, bucket_multiple=data.bucket,
                                   seed=data.shuffle_seed)


def prompt_set(records, tokenizer, bcfg: batching.BatchingConfig) -> PromptSet:
    """``records`` tokenized for sampling in order with ``bcfg`` (no records: no prompts)."""
    prompts = (batching.tokenize_prompts(records, tokenizer, max_prompt_length=bcfg.max_prompt_length)
               if records else None)
    return PromptSet(list(records), prompts, bcfg)


# ======================================================================================= a run

def for_training(config, spec: RunSpec, workdir: str, sources: PromptSources,
                 saved: tuple[dict, str] | None = None) -> Run:
    """The run's mesh, data, models, programs and reward engine; ``saved``: ``(meta, where)`` of the checkpoint it
    resumes, whose data position is range-checked against the prompts before any model loads."""
    basics = open_basics(config, spec, workdir)
    tokenizer = basics.tokenizer
    prompts = batching.tokenize_prompts(sources.train, tokenizer, max_prompt_length=spec.data.max_prompt_length)
    log.info("%d training prompts from %s (%d dropped as too long)", len(prompts), sources.train_path,
             len(prompts.dropped))
    train_set = PromptSet(sources.train, prompts, batching_config(spec.data, spec.algorithm.prompts_per_step))
    iterator = prompt_iterator(prompts, train_set.batching, saved)
    dev = prompt_set(sources.dev, tokenizer, batching_config(spec.data, spec.ppo.batch_size))
    gold = gold_rm(spec, basics.paths, basics.mesh)
    return _assemble(config, basics, workdir, dev, gold, sources.train + dev.records, train_set=train_set,
                     iterator=iterator)


def for_eval(config, basics: RunBasics, workdir: str, dev: PromptSet, *, gold=None, scoring: bool = True) -> Run:
    """A run that only samples ``dev`` (``rre-eval``, ``rre-bon``, ``rre-alignment-tax``): the policy, the reward
    engine over ``dev.records`` (none unless ``scoring``), the gold RM ``gold`` (see `gold_rm`) and the programs;
    no training prompts and no iterator."""
    return _assemble(config, basics, workdir, dev, gold, dev.records if scoring else None)


def _assemble(config, basics: RunBasics, workdir: str, dev: PromptSet, gold, engine_records, *,
              train_set: PromptSet | None = None, iterator: batching.PromptIterator | None = None) -> Run:
    """Load the policy onto the mesh and the relevance encoder, list the run's programs (``programs.RunPrograms``:
    the policy's, the features', the encoder's and the gold RM's), build the reward engine over
    ``engine_records`` (None: no engine), and hold them with the parts already set up as one `Run`."""
    spec, mesh, paths, tokenizer = basics
    pspec, frozen = load_policy(config, spec, mesh, paths)
    encoder = relevance_encoder(spec, mesh) if engine_records is not None else None
    tables = feature_tables(tokenizer, pspec.cfg.vocab_size)
    progs = run_programs(spec, mesh, pspec, frozen, tokenizer, tables=tables,
                         stop_strings=spec.scoring.stop_strings, encoder=encoder, gold=gold)
    engine = (None if engine_records is None else
              reward_engine(spec, tables, engine_records, encoder=encoder, programs=progs.features))
    return Run(config, spec, workdir, mesh, tokenizer, dev, pspec, frozen, engine, gold, paths, progs,
               train_set=train_set, iterator=iterator)


def load_policy(config, spec: RunSpec, mesh, paths: dict):
    """``(policy spec, frozen base weights)`` of the causal LM at ``paths['policy']``."""
    base = from_pretrained(paths["policy"], mesh=mesh, rules=spec.mesh.rules, dtype=spec.dtype,
                           param_dtype=spec.param_dtype)
    if base.kind != "causal_lm":
        raise ValueError(f"config.model.path={paths['policy']!r} is a {base.kind} checkpoint, not a causal LM")
    return policy.PolicySpec(base.config, spec.mode, spec.lora, spec.critic, spec.remat, mesh=mesh,
                             rules=spec.mesh.rules), base.params


def relevance_encoder(spec: RunSpec, mesh):
    """The relevance encoder of the run, or None when no reward spec uses relevance; placed where
    ``relevance.encoder_mesh`` says (one device on CPU hosts; the run's mesh on one host; one of this host's
    devices on several)."""
    if not any(s.needs_relevance for s in (spec.reward, *spec.counterfactual.values())):
        return None
    path = relevance.encoder_path(spec.relevance.path, "--config.relevance.path")
    where = relevance.encoder_mesh(mesh)
    return relevance.RelevanceEncoder.from_pretrained(path, max_length=spec.relevance.max_length,
                                                      progress=False, mesh=where,
                                                      rules=None if where is None else spec.mesh.rules)


def run_programs(spec: RunSpec, mesh, pspec: policy.PolicySpec, frozen, tokenizer, *, tables, stop_strings,
                 encoder=None, gold=None) -> programs_lib.RunPrograms:
    """The run's programs, with their shardings (``programs.RunPrograms``); token ids from the run's tokenizer."""
    rows = experience_rows(spec.ppo, mesh.shape["data"] * mesh.shape["fsdp"])
    feats = programs_lib.FeaturePrograms(programs_lib.Layout(mesh, spec.mesh.rules), *tables.bytes_VxL.shape,
                                         stop_strings)
    return programs_lib.RunPrograms(mesh, spec.mesh.rules, pspec, spec.algorithm, spec.ppo, frozen,
                                    eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, experience_rows=rows,
                                    features=feats, relevance=None if encoder is None else encoder.programs,
                                    gold=None if gold is None else gold.programs)


def feature_tables(tokenizer, vocab_size: int) -> features.FeatureTables:
    """The device tables of the white-box features: the tokenizer's byte table widened to the model's vocabulary."""
    return features.feature_tables(_pad_table(tok_lib.byte_table(tokenizer), vocab_size))


def reward_engine(spec: RunSpec, tables, records, *, encoder=None, programs=None,
                  seeds=None) -> engine_lib.RewardEngine:
    """The reward engine of ``spec`` (training proxy + counterfactuals) over the prompt set ``records``; ``seeds``:
    the random query types of some specs drawn with their own seed (a sweep's members), ``spec.seed`` else."""
    queries = [templates.relevance_query(templates.alpaca_prompt(r.instruction)) for r in records]
    return engine_lib.RewardEngine(spec.reward, spec.counterfactual, tables,
                                   stop_strings=spec.scoring.stop_strings, queries=queries,
                                   references=[r.reference for r in records],
                                   qtype_P=np.array([r.qtype_id for r in records]), encoder=encoder,
                                   seed=spec.seed, relevance_text=spec.scoring.relevance_text, programs=programs,
                                   seeds=seeds)


def gold_rm(spec: RunSpec, paths: dict, mesh):
    """The gold RM of ``paths['gold_rm']`` (None when the run has none); its tokenizer is checked first."""
    if not paths["gold_rm"]:
        return None
    g = spec.gold_rm
    return gold_rm_lib.GoldRM(paths["gold_rm"], tokenizer_path=g.tokenizer, max_length=g.max_length,
                              batch_size=g.batch_size, layout=g.layout, mesh=mesh, rules=spec.mesh.rules,
                              is_random=paths["gold_rm_random"], placement=g.placement)


def _pad_table(table, vocab_size: int):
    """The byte table widened to the model's vocabulary (ids the tokenizer lacks contribute no bytes)."""
    if table.vocab_size >= vocab_size:
        return table
    extra = vocab_size - table.vocab_size
    return tok_lib.ByteTable(np.concatenate([table.bytes_VxL, np.zeros((extra, table.bytes_VxL.shape[1]), np.uint8)]),
                             np.concatenate([table.len_V, np.zeros(extra, np.int32)]), table.family,
                             table.strips_leading_space)


# ======================================================================================= state and steps

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


def prompt_iterator(prompts, bcfg, saved: tuple[dict, str] | None) -> batching.PromptIterator:
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
    mask_BxN = rollout.cut_mask(roll.mask_BxN, feats.cut_token_B) if run.spec.scoring.cut_at_stop else roll.mask_BxN
    jax.block_until_ready(mask_BxN)
    t1 = time.perf_counter()
    tokens, raw_mask = run.to_local(roll.tokens_BxN), run.to_local(roll.mask_BxN)
    texts = run.tokenizer.batch_decode([t[k == 1] for t, k in zip(tokens, raw_mask)], skip_special_tokens=True)
    feats = type(feats)(*(run.to_local(f) for f in feats))  # this host's share is scored on this host
    comps = run.engine.score(np.asarray(index_B), feats, texts)
    t2 = time.perf_counter()
    return roll, mask_BxN, comps, texts, {"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1}
