"""Critic-free group RL: GRPO and RLOO advantages, losses and the jitted update.

Semantics are those of trl 1.16.0's ``GRPOTrainer`` and ``RLOOTrainer`` (``_generate_and_score_completions``
for the advantages, ``_compute_loss`` for the losses), checked against the NumPy port in
``tests/trl_grpo_reference.py``, which was itself checked against trl 1.16.0's own code in float64. Each prompt is
sampled ``G`` times; the ``G`` responses of a prompt form a group and sit on consecutive rows (row ``b`` belongs
to group ``b // G``). Group statistics are taken over the whole global batch inside jit, so a group whose members
sit on different devices or hosts is still one group.

Shape letters: ``B`` responses (rows) of a batch, ``P = B / G`` prompts (groups), ``G`` responses per prompt
(``num_generations``), ``N`` response positions, ``S`` optimizer steps of one update, ``K`` micro-batches per
optimizer step (``gradient_accumulation_steps``), ``M`` micro-batch rows. ``m`` is the response mask,
``r_pg`` the reward of response ``g`` of prompt ``p``, ``mean_p`` / ``std_p`` the mean / standard deviation
(Bessel-corrected, as torch's) over the group.

GRPO advantages (``scale_rewards``)::

    A_pg = r_pg - mean_p                      'none'
    A_pg = (r_pg - mean_p) / (std_p + 1e-4)   'group' (trl's default)
    A_pg = (r_pg - mean_p) / (std_B + 1e-4)   'batch' (std over the whole batch)

GRPO per-token loss, with ``rho = exp(logp - logp_old)``, ``d = logp_ref - logp``::

    l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta (exp(d_t) - d_t - 1)

The KL term is the k3 estimator; with ``beta = 0`` it is absent and no reference pass runs at all. Aggregation of
one micro-batch (``loss_type``; ``L`` = ``max_completion_length``)::

    grpo:     mean_b [ sum_t l m / max(sum_t m, 1) ]
    bnpo:     sum l m / max(sum m, 1)            (tokens of the micro-batch)
    dr_grpo:  sum l m / (M L)
    dapo:     sum l m / (N_B M / B)              (trl's default; N_B = tokens of the whole batch)

Each optimizer step averages the gradients of its ``K`` micro-batches (``/ K``), so a dapo step whose micro-batches
cover the batch minimises ``sum l m / N_B``: the token mean over the global batch, as trl's
``num_items_in_batch`` normaliser gives. trl's bnpo normalises by the tokens of each process's micro-batch; here
the micro-batch is global (trl with one process).

RLOO (``RLOOTrainer``): the KL is folded into the reward with the first-order estimate summed over the sequence,
then each response is compared with the mean of the other ``G - 1`` of its group::

    r'_pg = r_pg - beta sum_t (logp_old - logp_ref) m
    A_pg  = r'_pg - (sum_h r'_ph - r'_pg) / (G - 1)
    A     = (A - mean_B A) / (std_B A + 1e-4)     (normalize_advantages only; off by default)

and the loss is a sequence-level clipped surrogate with ``rho = exp(sum_t logp m - sum_t logp_old m)``, averaged
over the micro-batch's rows: ``mean_b -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)``.

The update: ``logp_old`` (and ``logp_ref``, ``A``) are computed once per batch and frozen; the batch is shuffled
once (trl's ``shuffle_sequence_dict``) and ``num_iterations`` passes walk it in the same order, each pass
``B / (M K)`` optimizer steps. trl skips the old-log-prob pass when a batch gets exactly one optimizer step
(``rho = 1`` then, by definition); this port always computes it, which gives the same gradients (the ratio's
value is 1 up to rounding and its gradient is that of ``logp``). Not ported: trl's other loss types (cispo, sapo,
luspo, vespo), sequence-level importance sampling, ``delta``, ``top_entropy_quantile``,
``mask_truncated_completions``, vLLM corrections and reward clipping (all off in trl's defaults), and several
reward functions (the proxy is one reward).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from rre_jax import ppo
from rre_jax.errors import UserError

GROUP_ALGOS = ("grpo", "rloo")
SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
STD_EPS = 1e-4  # trl's ``std + 1e-4``


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    """GRPO / RLOO settings (``config.group``) plus the batch layout of ``config.ppo``; validates itself.

    ``batch_size`` counts responses (``batch_size / num_generations`` prompts per step); ``mini_batch_size`` and
    ``gradient_accumulation_steps`` cut it into micro-batches and optimizer steps as for PPO.
    """

    algo: str = "grpo"
    num_generations: int = 4
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    scale_rewards: str = "group"
    loss_type: str = "dapo"
    num_iterations: int = 1
    normalize_advantages: bool = False
    batch_size: int = 16
    mini_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    max_completion_length: int = 512

    def __post_init__(self):
        def bad(field, why, fix, section="group"):
            raise UserError(f"config.{section}.{field}={getattr(self, field)!r}: {why}; {fix}")

        if self.algo not in GROUP_ALGOS:
            bad("algo", f"is not a group method {GROUP_ALGOS}", "use PPOConfig for 'ppo'", section="")
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            bad("num_generations", "a group needs at least 2 responses per prompt", "set it to 2 or more")
        if self.batch_size % self.num_generations:
            raise UserError(f"config.ppo.batch_size={self.batch_size} (responses per step) is not divisible into "
                            f"groups of config.group.num_generations={self.num_generations}; make the batch a "
                            "multiple of num_generations")
        if not self.beta >= 0:
            bad("beta", "the KL coefficient must be >= 0", "use 0 (no reference pass) or a positive value")
        for f in ("epsilon_low", "epsilon_high"):
            if not getattr(self, f) >= 0:
                bad(f, "the clip range must be >= 0", "trl's default is 0.2")
        if self.scale_rewards not in SCALE_REWARDS:
            bad("scale_rewards", f"choose one of {SCALE_REWARDS}", "trl's default is 'group'")
        if self.loss_type not in LOSS_TYPES:
            bad("loss_type", f"choose one of {LOSS_TYPES}", "trl's default is 'dapo'")
        if not isinstance(self.num_iterations, int) or self.num_iterations < 1:
            bad("num_iterations", "must be a positive integer", "trl's default is 1")
        if self.batch_size % (self.mini_batch_size * self.gradient_accumulation_steps):
            raise UserError(f"config.ppo.batch_size={self.batch_size} is not a multiple of mini_batch_size * "
                            f"gradient_accumulation_steps = {self.mini_batch_size * self.gradient_accumulation_steps}")

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.num_generations

    @property
    def steps_per_iteration(self) -> int:
        return self.batch_size // (self.mini_batch_size * self.gradient_accumulation_steps)

    @property
    def needs_reference(self) -> bool:
        return self.beta != 0.0

    @classmethod
    def from_config(cls, section, algo: str, pcfg: ppo.PPOConfig, max_new_tokens: int) -> "GroupConfig":
        """From ``config.group`` (a mapping), ``config.algo``, the PPO section's layout and the response length."""
        items = dict(section.items()) if hasattr(section, "items") else dict(section)
        names = {f.name for f in dataclasses.fields(cls)} - {"algo", "batch_size", "mini_batch_size",
                                                             "gradient_accumulation_steps", "max_completion_length"}
        unknown = sorted(set(items) - names)
        if unknown:
            raise UserError(f"config.group: unknown field(s) {unknown}; known fields are {sorted(names)}")
        return cls(algo=algo, **items, batch_size=pcfg.batch_size, mini_batch_size=pcfg.mini_batch_size,
                   gradient_accumulation_steps=pcfg.gradient_accumulation_steps,
                   max_completion_length=int(max_new_tokens))


# ----------------------------------------------------------------------------------------------------------------
# Advantages (once per batch)
# ----------------------------------------------------------------------------------------------------------------

def _std(x, axis=None):
    """Standard deviation with Bessel's correction (torch's default, trl's ``nanstd`` without NaNs)."""
    return jnp.std(x, axis=axis, ddof=1, keepdims=axis is not None)


def grpo_advantages(reward_B, G: int, scale_rewards: str):
    """``(A_B, std_B)``: GRPO's group-relative advantages (module docstring) and the std used for scaling (the
    group std under 'none', as trl logs ``frac_reward_zero_std`` from it)."""
    r_PxG = reward_B.reshape(-1, G)
    centred_B = (r_PxG - r_PxG.mean(axis=1, keepdims=True)).reshape(-1)
    if scale_rewards == "batch":
        std_B = jnp.broadcast_to(_std(reward_B), reward_B.shape)
    else:
        std_B = jnp.broadcast_to(_std(r_PxG, axis=1), r_PxG.shape).reshape(-1)
    adv_B = centred_B if scale_rewards == "none" else centred_B / (std_B + STD_EPS)
    return adv_B, std_B


def rloo_advantages(reward_B, G: int, kl_B=None, beta: float = 0.0, normalize: bool = False):
    """``(A_B, shaped reward_B)``: RLOO's leave-one-out advantages after folding ``-beta kl_B`` into the reward
    (``kl_B`` = the summed first-order KL of each response; ignored when ``beta`` is 0)."""
    if beta != 0.0:
        reward_B = reward_B - beta * kl_B
    r_PxG = reward_B.reshape(-1, G)
    baseline_PxG = (r_PxG.sum(axis=1, keepdims=True) - r_PxG) / (G - 1)
    adv_B = (r_PxG - baseline_PxG).reshape(-1)
    if normalize:
        adv_B = (adv_B - adv_B.mean()) / (_std(adv_B) + STD_EPS)
    return adv_B, reward_B


def per_sequence_kl(logp_BxN, ref_logp_BxN, mask_BxN):
    """RLOO's KL of each response: ``sum_t (logp - logp_ref) m`` (first order; may be negative)."""
    return ((logp_BxN - ref_logp_BxN) * mask_BxN).sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# Losses (one micro-batch)
# ----------------------------------------------------------------------------------------------------------------

def k3_kl(logp_BxN, ref_logp_BxN):
    """The k3 estimator of KL(policy || reference) per token: ``exp(d) - d - 1``, ``d = logp_ref - logp``."""
    d = ref_logp_BxN - logp_BxN
    return jnp.exp(d) - d - 1.0


def grpo_token_loss(logp_BxN, old_logp_BxN, adv_B, eps_low: float, eps_high: float, ref_logp_BxN=None,
                    beta: float = 0.0):
    """``(l_BxN, rho_BxN)``: GRPO's per-token loss (module docstring) and the ratio."""
    rho = jnp.exp(logp_BxN - old_logp_BxN)
    a = adv_B[:, None]
    loss = -jnp.minimum(rho * a, jnp.clip(rho, 1.0 - eps_low, 1.0 + eps_high) * a)
    if beta != 0.0:
        loss = loss + beta * k3_kl(logp_BxN, ref_logp_BxN)
    return loss, rho


def aggregate(loss_BxN, mask_BxN, loss_type: str, max_completion_length: int, dapo_tokens=None):
    """One micro-batch's loss from per-token losses by ``loss_type``; ``dapo_tokens`` = ``N_B M / B`` (dapo)."""
    total = (loss_BxN * mask_BxN).sum()
    if loss_type == "grpo":
        return ((loss_BxN * mask_BxN).sum(-1) / jnp.maximum(mask_BxN.sum(-1), 1.0)).mean()
    if loss_type == "bnpo":
        return total / jnp.maximum(mask_BxN.sum(), 1.0)
    if loss_type == "dr_grpo":
        return total / (loss_BxN.shape[0] * max_completion_length)
    if loss_type == "dapo":
        return total / dapo_tokens
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")


def rloo_sequence_loss(logp_BxN, old_logp_BxN, mask_BxN, adv_B, eps_low: float, eps_high: float):
    """``(loss, rho_B)``: RLOO's sequence-level clipped surrogate, averaged over rows (module docstring)."""
    rho = jnp.exp((logp_BxN * mask_BxN).sum(-1) - (old_logp_BxN * mask_BxN).sum(-1))
    loss_B = -jnp.minimum(rho * adv_B, jnp.clip(rho, 1.0 - eps_low, 1.0 + eps_high) * adv_B)
    return loss_B.mean(), rho


def clip_fractions(rho, adv, eps_low: float, eps_high: float, mask):
    """trl's ``clip_ratio/*``: shares of (masked) tokens or rows whose ratio left the range on the clipped side."""
    low = ((rho < 1.0 - eps_low) & (adv < 0)).astype(jnp.float32)
    high = ((rho > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32)
    mean = lambda x: (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)  # noqa: E731
    return {"clip_ratio/low_mean": mean(low), "clip_ratio/high_mean": mean(high),
            "clip_ratio/region_mean": mean(jnp.maximum(low, high))}


def micro_loss(logp_BxN, entropy_BxN, mb: dict, cfg: GroupConfig, dapo_tokens):
    """``(loss, stats)`` of one micro-batch ``mb`` (``old_logp``, ``advantages``, ``mask``[, ``ref_logp``])."""
    logp_BxN = logp_BxN.astype(jnp.float32)
    m = mb["mask"].astype(jnp.float32)
    adv_B = mb["advantages"]
    sg = jax.lax.stop_gradient
    stats = {"entropy": (sg(entropy_BxN) * m).sum() / jnp.maximum(m.sum(), 1.0)}
    if cfg.algo == "rloo":
        loss, rho_B = rloo_sequence_loss(logp_BxN, mb["old_logp"], m, adv_B, cfg.epsilon_low, cfg.epsilon_high)
        stats.update(clip_fractions(sg(rho_B), adv_B, cfg.epsilon_low, cfg.epsilon_high, jnp.ones_like(adv_B)))
        return loss, {**stats, "loss": sg(loss)}
    beta = cfg.beta
    l_BxN, rho = grpo_token_loss(logp_BxN, mb["old_logp"], adv_B, cfg.epsilon_low, cfg.epsilon_high,
                                 mb.get("ref_logp"), beta)
    loss = aggregate(l_BxN, m, cfg.loss_type, cfg.max_completion_length, dapo_tokens)
    stats.update(clip_fractions(sg(rho), jnp.broadcast_to(adv_B[:, None], rho.shape), cfg.epsilon_low,
                                cfg.epsilon_high, m))
    if beta != 0.0:
        stats["kl"] = (sg(k3_kl(logp_BxN, mb["ref_logp"])) * m).sum() / jnp.maximum(m.sum(), 1.0)
    return loss, {**stats, "loss": sg(loss)}


# ----------------------------------------------------------------------------------------------------------------
# Experience -> update batch, and the update
# ----------------------------------------------------------------------------------------------------------------

def prepare_batch(old_logp_BxN, ref_logp_BxN, score_B, mask_BxN, cfg: GroupConfig):
    """``(batch, stats)``: the frozen update batch (``old_logp``, ``advantages``, ``mask``[, ``ref_logp``]) of
    one rollout batch and trl's reward / advantage metrics. ``ref_logp_BxN`` is None when ``beta`` is 0."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    old_logp_BxN, score_B, m = f32(old_logp_BxN), f32(score_B), f32(mask_BxN)
    G = cfg.num_generations
    batch = {"old_logp": old_logp_BxN, "mask": m}
    stats = {"reward": score_B.mean(), "reward_std": _std(score_B)}
    if cfg.algo == "grpo":
        adv_B, std_B = grpo_advantages(score_B, G, cfg.scale_rewards)
        stats["frac_reward_zero_std"] = (jnp.abs(std_B) <= 1e-8).astype(jnp.float32).mean()
        if cfg.needs_reference:
            batch["ref_logp"] = f32(ref_logp_BxN)
    else:
        kl_B = per_sequence_kl(old_logp_BxN, f32(ref_logp_BxN), m) if cfg.needs_reference else None
        adv_B, shaped_B = rloo_advantages(score_B, G, kl_B, cfg.beta, cfg.normalize_advantages)
        stats["shaped_reward"] = shaped_B.mean()
        if kl_B is not None:
            stats["objective/kl"] = kl_B.sum() / jnp.maximum(m.sum(), 1.0)
    batch["advantages"] = adv_B
    stats.update({"advantages_mean": adv_B.mean(), "advantages_std": _std(adv_B)})
    return batch, {f"{cfg.algo}/{k}" if "/" not in k else k: v for k, v in stats.items()}


def update_indices(rng, cfg: GroupConfig):
    """Row indices ``SxKxM``: one permutation of the batch, walked ``num_iterations`` times in the same order."""
    perm_B = jax.random.permutation(rng, cfg.batch_size)
    return jnp.tile(perm_B, cfg.num_iterations).reshape(-1, cfg.gradient_accumulation_steps, cfg.mini_batch_size)


def make_update_step(forward_fn: Callable[..., tuple], optimizer: optax.GradientTransformation, cfg: GroupConfig):
    """Build ``update(params, opt_state, batch, rng[, frozen]) -> (params, opt_state, stats)`` (jittable).

    ``forward_fn(params, minibatch, rng[, frozen]) -> (logp_MxN, values_MxN, entropy_MxN)`` is PPO's (values are
    not read, so XLA drops their computation). ``batch`` comes from ``prepare_batch`` plus the model inputs, all
    with leading dimension ``cfg.batch_size``. The loop is ``num_iterations * steps_per_iteration`` optimizer
    steps over ``K`` micro-batches each (``ppo.optimizer_steps``: the same accumulation, clipping and
    non-finite skipping as PPO).
    """
    M, B = cfg.mini_batch_size, cfg.batch_size

    def loss_fn(params, mb, rng, frozen, dapo_tokens):
        logp, _, entropy = forward_fn(params, mb, rng) if frozen is None else forward_fn(params, mb, rng, frozen)
        return micro_loss(logp, entropy, mb, cfg, dapo_tokens)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(params, opt_state, batch, rng, frozen=None):
        shuffle_rng, forward_rng = jax.random.split(rng)
        idx_SxKxM = update_indices(shuffle_rng, cfg)
        keys_SxK = jax.random.split(forward_rng, idx_SxKxM.shape[:2])
        dapo_tokens = jnp.maximum(batch["mask"].sum(), 1.0) * M / B  # trl: num_items_in_batch, clamped at 1
        step_grad = lambda p, mb, key, fz: grad_fn(p, mb, key, fz, dapo_tokens)  # noqa: E731
        params, opt_state, stats, finite, ok = ppo.optimizer_steps(step_grad, optimizer, params, opt_state, batch,
                                                                   idx_SxKxM, keys_SxK, frozen)
        return params, opt_state, ppo.summarise(stats, finite, ok, prefix=cfg.algo)

    return update


# ----------------------------------------------------------------------------------------------------------------
# The algorithms (rre_jax.algorithms' interface)
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GroupMethod:
    """GRPO or RLOO (``cfg.algo``) behind the interface of ``rre_jax.algorithms``: ``G`` responses per prompt on
    consecutive rows, no critic, a reference pass only when ``beta`` is not 0, no train-state entries of its own.
    The optimizer is PPO's (``ppo.make_optimizer``: Adam, learning rate and gradient clip of ``config.ppo``)."""

    cfg: GroupConfig
    optimizer_cfg: ppo.PPOConfig
    uses_values = False

    @property
    def name(self) -> str:
        return self.cfg.algo

    @property
    def samples_per_prompt(self) -> int:
        return self.cfg.num_generations

    @property
    def prompts_per_step(self) -> int:
        return self.cfg.prompts_per_step

    @property
    def uses_reference(self) -> bool:
        return self.cfg.needs_reference

    def init_state(self) -> dict:
        return {}

    def prepare(self, exp, score_B, mask_BxN, state):
        batch, stats = prepare_batch(exp.logp_BxN, exp.ref_logp_BxN, score_B, mask_BxN, self.cfg)
        return batch, {}, stats

    def make_update(self, forward_fn):
        return make_update_step(forward_fn, ppo.make_optimizer(self.optimizer_cfg), self.cfg)

    def finish(self, state, stats) -> dict:
        return {}

    def next_kl_coef(self, state) -> float:
        return float(self.cfg.beta)

    @property
    def micro_steps(self) -> int:
        """Micro-batch forward/backward passes of one update: iterations x batch / mini-batch."""
        return self.cfg.num_iterations * self.cfg.batch_size // self.cfg.mini_batch_size

