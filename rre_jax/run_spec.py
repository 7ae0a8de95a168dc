"""A run config, validated: ``validate(config) -> RunSpec`` turns the ml-collections config into frozen
dataclasses, one per section, before anything is loaded, written or compiled.

Every error is a ``UserError`` that names the config field and the fix. With ``files`` the inputs a run reads are
checked too: the policy source (a checkpoint directory, or the tiny built-in model of configs that ask for it),
the prompt source (its records are checked where they are parsed, once: ``assemble.load_prompt_sources``) and
the relevance encoder.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from rre_jax import algorithms, mesh as mesh_lib, policy, ppo, relevance, reward, reward_engine, sampling, sweep
from rre_jax import tracking
from rre_jax.errors import UserError
from rre_jax.models import llama, lora as lora_lib


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """``config.data``: where the prompts come from, their length limit and bucketing, the shuffle seed."""

    source: str
    train_file: str
    dev_file: str
    tfds_dir: str
    max_prompt_length: int
    bucket: int
    missing_qtype: str
    shuffle_seed: int

    @property
    def largest_bucket(self) -> int:
        """``max_prompt_length`` rounded up to a multiple of ``bucket``: the longest prompt bucket."""
        return -(-self.max_prompt_length // self.bucket) * self.bucket


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """``config.train``: steps, checkpoint cadence and retention, dev-set size, the final export."""

    steps: int
    save_freq: int
    max_to_keep: int
    dev_size: int
    export_final: bool


@dataclasses.dataclass(frozen=True)
class GoldRMSpec:
    """``config.gold_rm``: the gold RM's checkpoint, tokenizer, layout, scoring batch and placement."""

    path: str
    tokenizer: str
    layout: str
    max_length: int
    batch_size: int
    placement: str


@dataclasses.dataclass(frozen=True)
class RelevanceSpec:
    """``config.relevance``: the relevance encoder and the tokens it keeps per text."""

    path: str
    max_length: int


@dataclasses.dataclass(frozen=True)
class ScoringSpec:
    """The rest of ``config.reward``: the training preset's name, the stop strings, the cut of the rollouts,
    the reward baseline and what relevance embeds (``reward_engine.RELEVANCE_TEXTS``)."""

    preset: str
    stop_strings: tuple
    cut_at_stop: bool
    baseline: float
    relevance_text: str = "response"


_CASTS = {"int": int, "str": str, "bool": bool, "float": float, "tuple": tuple}


def _section(cls, section, **extra):
    """``cls`` from the config section of the same fields (each cast to its annotated type)."""
    values = {f.name: _CASTS[f.type](section[f.name]) for f in dataclasses.fields(cls) if f.name not in extra}
    return cls(**values, **extra)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Every config section a run reads, in its validated, frozen form. Built before any model is loaded or
    compiled; what flows after ``validate`` (the raw config is kept only to be saved with each checkpoint)."""

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
    algorithm: algorithms.Algorithm  # config.algo with its settings (rre_jax.algorithms)
    scoring: ScoringSpec
    data: DataSpec
    train: TrainSpec
    gold_rm: GoldRMSpec
    relevance: RelevanceSpec
    name: str
    seed: int
    model_path: str  # the policy's checkpoint directory ('' : the tiny built-in policy)
    tokenizer_path: str  # default: model_path
    tiny: bool  # the tiny built-in policy, tokenizer and prompts (``uses_tiny``)
    sweep: sweep.SweepConfig | None = None  # config.sweep's members (rre_jax.sweep); None: a single run


EVAL_PROXY = "rer"  # scored at every dev eval and checkpoint eval: the reference judges every run with full RER


def validate(config, num_devices: int | None = None, *, files: bool = True) -> RunSpec:
    """Turn the ml-collections config into frozen dataclasses; every error names the field and the fix.

    ``num_devices``: the devices the run is for (default: every device here; a TPU topology's when compiling
    ahead of time). With ``files`` (the default) the inputs a run reads are checked too, before anything is
    written: the policy source, the prompt source and the relevance encoder.
    """
    def dtype(field):
        name = config.model[field]
        if name not in ("float32", "bfloat16"):
            raise UserError(f"config.model.{field}={name!r}: choose 'float32' or 'bfloat16'")
        return jnp.dtype(name)

    ppo_cfg = ppo.PPOConfig.from_config(config.ppo)
    algorithm = algorithms.from_config(config, ppo_cfg)  # PPO (default) or a critic-free group method
    spec = reward.preset(config.reward.preset)
    spec = dataclasses.replace(spec, max_new_tokens=int(config.sampling.max_new_tokens))
    cf = {f"cf/{n}": dataclasses.replace(reward.preset(n), max_new_tokens=spec.max_new_tokens)
          for n in config.reward.counterfactual}
    rer = dataclasses.replace(reward.preset(EVAL_PROXY), max_new_tokens=spec.max_new_tokens)
    if spec != rer:  # the eval columns always hold RER, scored for real
        cf.setdefault(f"cf/{EVAL_PROXY}", rer)
    try:
        relevance_text = reward_engine.check_relevance_text(config.reward.get("relevance_text", "response"),
                                                            "config.reward.relevance_text")
    except ValueError as e:
        raise UserError(str(e)) from None
    if config.model.train_mode not in policy.MODES:
        raise UserError(f"config.model.train_mode={config.model.train_mode!r}; choose one of {policy.MODES}")
    critic = policy.check_critic(config.model.get("critic", "separate"))
    remat = llama.check_remat(config.model.get("remat", "dots"))
    mesh_cfg = mesh_lib.MeshConfig.from_config(config.mesh)
    available = num_devices or jax.device_count()
    n_dev = mesh_cfg.num_devices or available
    if n_dev > available:
        raise UserError(f"config.mesh.num_devices={n_dev} but only {available} devices exist")
    shape = mesh_cfg.resolved_shape(n_dev)  # raises with the fix when the mesh does not fit the devices
    rows = shape[0] * shape[1]
    if ppo_cfg.batch_size % rows:
        raise UserError(f"config.ppo.batch_size={ppo_cfg.batch_size} must be a multiple of the mesh's "
                        f"data x fsdp = {rows} devices; change it or --config.mesh.shape")
    if config.train.save_freq <= 0 or config.train.steps <= 0:
        raise UserError("config.train.steps and config.train.save_freq must be positive")
    tracking.WandbConfig.from_config(config)  # config.logging (W&B): its fields, and the package when it is on
    members = sweep.SweepConfig.from_config(config)  # LoRA only; presets and seeds checked
    if files:
        _check_model_source(config)
        _check_prompt_source(config)
        if spec.needs_relevance or any(s.needs_relevance for s in cf.values()):
            _check_relevance(config)
    return RunSpec(ppo=ppo_cfg, reward=spec, counterfactual=cf,
                   sampling=sampling.SamplingConfig.from_config(config.sampling), mesh=mesh_cfg,
                   lora=lora_lib.LoraConfig.from_config(config.model.lora),
                   mode=config.model.train_mode, critic=critic, remat=remat, dtype=dtype("dtype"),
                   param_dtype=dtype("param_dtype"), algorithm=algorithm,
                   scoring=_section(ScoringSpec, config.reward, relevance_text=relevance_text),
                   data=_section(DataSpec, config.data), train=_section(TrainSpec, config.train),
                   gold_rm=_section(GoldRMSpec, config.gold_rm), relevance=_section(RelevanceSpec, config.relevance),
                   name=str(config.name), seed=int(config.seed), model_path=str(config.model.path),
                   tokenizer_path=str(config.tokenizer.path or config.model.path), tiny=uses_tiny(config),
                   sweep=members)


def uses_tiny(config) -> bool:
    """Whether the run builds the tiny built-in policy: only a config that asks (``model.build_tiny``, as
    configs/tiny.py does) and leaves ``model.path`` empty."""
    return not config.model.path and bool(config.model.get("build_tiny", False))


def _check_model_source(config) -> None:
    if not config.model.path and not uses_tiny(config):
        raise UserError("config.model.path is empty: set --config.model.path=DIR, the policy's Hugging Face "
                        "checkpoint directory (e.g. the AlpacaFarm SFT10k LLaMA-7B); only configs that set "
                        "config.model.build_tiny=True (configs/tiny.py) build a tiny model instead")
    for field in ("model.path", "tokenizer.path", "gold_rm.path"):
        section, name = field.split(".")
        path = config[section][name]
        if path and "://" not in path and not os.path.isdir(path):
            raise UserError(f"config.{field}={path!r} is not a directory; pass a Hugging Face checkpoint directory")


def _check_relevance(config) -> None:
    try:
        relevance.encoder_path(config.relevance.path, "config.relevance.path")
    except ValueError as e:
        raise UserError(f"{e} (the reward presets {config.reward.preset!r} + counterfactuals "
                        f"{tuple(config.reward.counterfactual)} + {EVAL_PROXY!r} at every eval use relevance)") from None


def _check_prompt_source(config) -> None:
    """The prompt source a run reads, named right (json: the files exist; tfds: ``'<builder name>:<split>'`` in
    ``data.tfds_dir``). Their records are read and checked record by record where they are loaded, once
    (``assemble.load_prompt_sources``), before anything is written."""
    data = config.data
    if data.source not in ("json", "tfds"):
        raise UserError(f"config.data.source={data.source!r}; choose 'json' (JSON / JSONL files) or 'tfds'")
    if data.source == "json" and not data.train_file and not uses_tiny(config):
        raise UserError("config.data.train_file is empty: set --config.data.train_file=FILE, a JSON / JSONL prompt "
                        "file (e.g. the AlpacaFarm unlabeled split with qtype); the bundled toy prompts serve only "
                        "the tiny built-in model (configs/tiny.py)")
    for field in ("train_file", "dev_file"):
        path = data[field]
        if path and data.source == "json" and not os.path.exists(path):
            raise UserError(f"config.data.{field}={path!r} does not exist")
        if data.source == "tfds" and (path or field == "train_file") and not (":" in path and data.tfds_dir):
            raise UserError(f"config.data.source='tfds': set config.data.{field}='<builder>:<split>' (e.g. "
                            "'alpaca_farm_prompts:alpacafarm_val') and config.data.tfds_dir to the prepared "
                            f"data_dir (rre_jax.data.tfds_builders.build); got {field}={path!r}, "
                            f"tfds_dir={data.tfds_dir!r}")
