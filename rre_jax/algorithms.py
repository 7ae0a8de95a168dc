"""The RL algorithms by name, behind one interface: what each needs from a rollout batch and how it updates.

The trainer, the programs and the ahead-of-time compiler hold an ``Algorithm`` and never ask which one it is
(Tunix's ``algo_core`` pattern, with the registry written out below instead of filled by decorators). An
algorithm is a frozen object with:

* ``name``                 its ``config.algo`` name;
* ``samples_per_prompt``   ``G``: responses sampled per prompt, on consecutive rows (1 for PPO); a group's
                           prompt is prefilled once (``rollout.sample``);
* ``prompts_per_step``     prompts drawn per step (``config.ppo.batch_size / G``: the batch counts responses);
* ``uses_values``          the experience pass computes the critic's values;
* ``uses_reference``       the experience pass computes the reference policy's log-probs;
* ``init_state()``         its own train-state entries (PPO: the score moments and the KL controller), created
                           with the state and checkpointed with it;
* ``prepare(exp, score_B, mask_BxN, state) -> (batch, state entries, stats)``: the once-per-batch maths on the
                           frozen `policy.Experience` (advantages, returns, score normalisation), inside jit;
* ``make_update(forward_fn)``: the jittable ``update(params, opt_state, batch, rng, frozen)`` of its losses;
* ``finish(state, stats) -> state entries``: after the update (PPO: the adaptive KL controller's step);
* ``next_kl_coef(state)``  the KL coefficient the next step uses (logged);
* ``micro_steps``          micro-batch forward/backward passes of one update (the trip count of the update
                           program's micro-batch loop: ``benchmarks/tpu_account.py`` reads one trip's bytes).

Adding an algorithm (DAPO, Dr. GRPO as their own classes, ...) is one module defining such a class and one line
in ``ALGORITHMS``.
"""
from __future__ import annotations

from typing import Protocol

from rre_jax import errors, grpo, ppo


class Algorithm(Protocol):
    name: str
    samples_per_prompt: int
    prompts_per_step: int
    uses_values: bool
    uses_reference: bool

    def init_state(self) -> dict: ...

    def prepare(self, exp, score_B, mask_BxN, state): ...

    def make_update(self, forward_fn): ...

    def finish(self, state, stats) -> dict: ...

    def next_kl_coef(self, state) -> float: ...

    micro_steps: int


def _ppo(config, ppo_cfg: ppo.PPOConfig) -> Algorithm:
    return ppo.PPO(ppo_cfg)


def _group(config, ppo_cfg: ppo.PPOConfig) -> Algorithm:
    cfg = grpo.GroupConfig.from_config(config.group, str(config.algo), ppo_cfg, int(config.sampling.max_new_tokens))
    return grpo.GroupMethod(cfg, ppo_cfg)


# config.algo -> (what it is, its builder from the run config and the validated PPO section)
ALGORITHMS = {
    "ppo": ("the paper's PPO with a critic (trl 0.7.4)", _ppo),
    "grpo": ("critic-free group-relative PPO (trl 1.16.0's GRPOTrainer), settings in config.group", _group),
    "rloo": ("critic-free REINFORCE leave-one-out (trl 1.16.0's RLOOTrainer), settings in config.group", _group),
}


def check_name(name: str) -> str:
    """``name`` when it names an algorithm, else a `UserError` naming ``config.algo`` and the choices."""
    return errors.one_of("config.algo", name, tuple(ALGORITHMS),
                         "; ".join(f"'{n}': {what}" for n, (what, _) in ALGORITHMS.items()))


def from_config(config, ppo_cfg: ppo.PPOConfig) -> Algorithm:
    """The algorithm ``config.algo`` names, built from its config sections (validated; errors name the field)."""
    return ALGORITHMS[check_name(str(config.algo))][1](config, ppo_cfg)
