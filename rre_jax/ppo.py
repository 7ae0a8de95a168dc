"""PPO: the clipped policy and value losses and the jitted update over epochs, minibatches and micro-batches.

Semantics are those of trl 0.7.4's ``PPOTrainer.step`` / ``loss`` (docs/design.md section 4.4), checked against the
NumPy / torch port in ``tests/trl_reference.py``. Shape letters: ``B`` rollout batch, ``T`` response positions,
``E`` PPO epochs, ``N`` optimizer steps per epoch (``B / (M*G)``), ``G`` gradient-accumulation micro-batches,
``M`` mini-batch size.

Losses, with ``m`` the mask, ``<x>`` the masked mean, ``rho = exp(logp - logp_old)``, ``eps = cliprange``,
``eps_v = cliprange_value``::

    pg   = < max(-A rho, -A clip(rho, 1-eps, 1+eps)) >
    V_c  = clip(V, V_old - eps_v, V_old + eps_v)
    vf   = 0.5 < max((V - R)^2, (V_c - R)^2) >
    loss = pg + vf_coef * vf,  multiplied by 0 when <rho> > ratio_threshold (the minibatch is skipped)

Stats (trl's names): ``policy/approxkl = 0.5 <(logp - logp_old)^2>``, ``policy/policykl = <logp_old - logp>``,
``policy/clipfrac = <[pg2 > pg1]>``, ``val/clipfrac = <[vf2 > vf1]>``, ``policy/entropy = <H>``,
``val/var_explained = 1 - mean(val/error) / mean(returns/var)`` over the minibatches of a step.

The frozen-old rule: ``logp_old``, ``V_old``, ``A`` and ``R`` are computed ONCE per rollout batch (by the caller,
then ``prepare_batch``) and stay fixed through every epoch and minibatch. One public JAX port recomputes the old
log-probs from the current parameters inside each minibatch, which makes ``rho == 1`` everywhere, so the clip
never acts and PPO degenerates into a plain policy gradient. ``update`` never calls the model except on the
minibatch being trained; tests/test_ppo.py fails if old values are recomputed.

The update follows trl with accelerate: each optimizer step sees ``G`` micro-batches of ``M`` sequences whose
gradients are averaged (accelerate divides each loss by ``G``), then clipped by global norm and applied with
Adam; each epoch reshuffles the batch. Differences from trl 0.7.4, on purpose:

* trl keeps its trainable parameters in a one-shot ``filter`` object, so ``clip_grad_norm_`` clips only the first
  optimizer step of a run and nothing after; here ``max_grad_norm`` clips every step (optax's
  ``clip_by_global_norm``, whose scale ``max_norm / norm`` omits torch's ``+1e-6``).
* a micro-batch whose loss or gradients are not finite contributes nothing and is counted
  (``ppo/skipped_nonfinite``); an optimizer step whose averaged gradient is not finite, or whose micro-batches
  were all skipped, leaves parameters and optimizer state unchanged (``ppo/skipped_steps``).
* trl runs its training forward passes with dropout off (``batched_forward_pass`` calls ``model.eval()``); the
  ``rng`` handed to ``forward_fn`` lets the caller choose, and the Llama trainer passes deterministic=True.

The value head starts as trl's does (``policy.init_value_head``: torch ``nn.Linear``'s default, weight and bias
uniform in +-1/sqrt(D)), drawn from JAX's RNG, so the distribution matches and the draw does not;
``init='normal'`` gives the N(0, 0.02), zero-bias start rre_jax used before.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from rre_jax import advantages as adv

BATCH_KEYS = ("old_logp", "old_values", "advantages", "returns", "mask")
UPDATE_KL_PENALTIES = ("kl", "abs", "mse")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO settings; defaults are the paper's run (docs/design.md 4.4). Validates itself on construction."""

    batch_size: int = 16
    mini_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    ppo_epochs: int = 4
    learning_rate: float = 1e-5
    max_grad_norm: float | None = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 1.0
    ratio_threshold: float = 10.0
    adaptive_kl: bool = True
    init_kl_coef: float = 0.2
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    kl_penalty: str = "kl"
    use_score_scaling: bool = True
    use_score_norm: bool = True
    score_clip: float | None = 10.0
    whiten_rewards: bool = False

    def __post_init__(self):
        def bad(field, why, fix):
            raise ValueError(f"ppo.{field}={getattr(self, field)!r}: {why}; {fix}")

        for f in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                bad(f, "must be a positive integer", "set it to 1 or more")
        if self.batch_size % self.backward_batch_size:
            bad("batch_size", f"is not a multiple of mini_batch_size * gradient_accumulation_steps = "
                f"{self.backward_batch_size}", "change one of the three so the backward batch divides the batch")
        for f in ("learning_rate", "cliprange", "cliprange_value", "ratio_threshold", "kl_target", "kl_horizon"):
            if not getattr(self, f) > 0:
                bad(f, "must be > 0", "use a positive value")
        for f in ("vf_coef", "init_kl_coef"):
            if not getattr(self, f) >= 0:
                bad(f, "must be >= 0", "use a non-negative value")
        if not 0 < self.gamma <= 1:
            bad("gamma", "must be in (0, 1]", "the paper uses 1.0")
        if not 0 <= self.lam <= 1:
            bad("lam", "must be in [0, 1]", "the paper uses 0.95")
        for f in ("max_grad_norm", "score_clip"):
            if getattr(self, f) is not None and not getattr(self, f) > 0:
                bad(f, "must be > 0 or None", "use None to switch it off")
        if self.kl_penalty not in UPDATE_KL_PENALTIES:
            bad("kl_penalty", f"must be one of {UPDATE_KL_PENALTIES} ('full' needs full-vocabulary log-probs, "
                "which the rollout does not keep)", "use 'kl' (trl's default)")
        if self.use_score_norm and not self.use_score_scaling:
            bad("use_score_norm", "only applies with use_score_scaling=True", "turn use_score_scaling on")

    @property
    def backward_batch_size(self) -> int:
        return self.mini_batch_size * self.gradient_accumulation_steps

    @property
    def steps_per_epoch(self) -> int:
        return self.batch_size // self.backward_batch_size

    @classmethod
    def from_config(cls, section) -> "PPOConfig":
        """From an ml-collections section (or any mapping) holding a subset of the fields."""
        items = dict(section.items()) if hasattr(section, "items") else dict(section)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - names)
        if unknown:
            raise ValueError(f"ppo config: unknown field(s) {unknown}; known fields are {sorted(names)}")
        return cls(**items)


# ----------------------------------------------------------------------------------------------------------------
# Experience -> update batch (everything trl's step does before its epoch loop)
# ----------------------------------------------------------------------------------------------------------------

def prepare_batch(old_logp_BxT, ref_logp_BxT, values_BxT, score_B, mask_BxT,
                  moments: adv.ScoreMoments, kl: adv.KLState, cfg: PPOConfig):
    """Scale scores, shape rewards with ``beta = kl.value``, run GAE and whiten, once per rollout batch.

    Returns ``(batch, moments, stats)``: ``batch`` holds ``BATCH_KEYS`` (frozen through the update), the
    moments have absorbed the raw scores, and ``stats`` carries trl's ``objective/*`` and score metrics. Feed
    ``stats['objective/kl']`` to ``update_kl_coef`` after the update. The maths runs in float32 whatever the
    model dtype (trl runs it in the model dtype and upcasts afterwards).
    """
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    old_logp_BxT, ref_logp_BxT, values_BxT, score_B = map(f32, (old_logp_BxT, ref_logp_BxT, values_BxT, score_B))
    moments, s_B = adv.scale_scores(moments, score_B, scaling=cfg.use_score_scaling, norm=cfg.use_score_norm,
                                    clip=cfg.score_clip)
    rewards_BxT, non_score_BxT = adv.shaped_rewards(old_logp_BxT, ref_logp_BxT, s_B, mask_BxT, kl.value,
                                                    cfg.kl_penalty)
    old_values_BxT, adv_BxT, returns_BxT = adv.compute_advantages(values_BxT, rewards_BxT, mask_BxT, cfg.gamma,
                                                                  cfg.lam, cfg.whiten_rewards)
    mask = mask_BxT.astype(old_logp_BxT.dtype)
    batch = dict(old_logp=old_logp_BxT, old_values=old_values_BxT, advantages=adv_BxT, returns=returns_BxT,
                 mask=mask)
    stats = {
        "objective/kl": adv.mean_sequence_kl(old_logp_BxT, ref_logp_BxT, mask),
        "objective/kl_coef": kl.value,
        "objective/entropy": (-old_logp_BxT * mask).sum(-1).mean(),
        "ppo/mean_non_score_reward": adv.masked_mean(non_score_BxT, mask),
        "ppo/mean_scores": s_B.mean(),
        "ppo/std_scores": jnp.std(s_B, ddof=1),
        "ppo/raw_scores_mean": score_B.mean(),
    }
    return batch, moments, stats


def update_kl_coef(kl: adv.KLState, objective_kl, cfg: PPOConfig) -> adv.KLState:
    """The controller step after an update; ``n`` = ``cfg.batch_size``, the global batch (trl: per-process batch
    x processes)."""
    return adv.update_kl(kl, objective_kl, cfg.batch_size, target=cfg.kl_target, horizon=cfg.kl_horizon,
                         adaptive=cfg.adaptive_kl)


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------

def ppo_losses(new_logp_BxT, new_values_BxT, old_logp_BxT, old_values_BxT, advantages_BxT, returns_BxT,
               mask_BxT, cfg: PPOConfig, entropy_BxT=None):
    """Clipped policy + value loss of one minibatch and trl's stats (equations in the module docstring).

    Returns ``(loss, stats)``; ``loss`` is 0 when the masked mean ratio exceeds ``cfg.ratio_threshold``
    (``stats['policy/skipped']`` = 1 then). ``entropy_BxT`` (per-token entropy of the new policy) is optional.
    Model outputs are upcast to float32 first.
    """
    new_logp_BxT, new_values_BxT = new_logp_BxT.astype(jnp.float32), new_values_BxT.astype(jnp.float32)
    m = mask_BxT.astype(jnp.float32)
    mean = lambda x: adv.masked_mean(x, m)  # noqa: E731
    v_clip = jnp.clip(new_values_BxT, old_values_BxT - cfg.cliprange_value, old_values_BxT + cfg.cliprange_value)
    vf1, vf2 = (new_values_BxT - returns_BxT) ** 2, (v_clip - returns_BxT) ** 2
    vf_loss = 0.5 * mean(jnp.maximum(vf1, vf2))
    ratio = jnp.exp(new_logp_BxT - old_logp_BxT)
    pg1 = -advantages_BxT * ratio
    pg2 = -advantages_BxT * jnp.clip(ratio, 1.0 - cfg.cliprange, 1.0 + cfg.cliprange)
    pg_loss = mean(jnp.maximum(pg1, pg2))
    avg_ratio = jax.lax.stop_gradient(mean(ratio))
    keep = 1.0 - (avg_ratio > cfg.ratio_threshold).astype(m.dtype)
    pg_loss, vf_loss = pg_loss * keep, vf_loss * keep
    loss = pg_loss + cfg.vf_coef * vf_loss
    sg = jax.lax.stop_gradient
    log_diff = sg(new_logp_BxT - old_logp_BxT)
    stats = {
        "loss/policy": sg(pg_loss), "loss/value": sg(vf_loss), "loss/total": sg(loss),
        "policy/entropy": mean(sg(entropy_BxT)) if entropy_BxT is not None else jnp.zeros((), m.dtype),
        "policy/approxkl": 0.5 * mean(log_diff**2), "policy/policykl": mean(-log_diff),
        "policy/clipfrac": mean(sg(pg2 > pg1).astype(m.dtype)), "policy/advantages_mean": mean(advantages_BxT),
        "policy/ratio_mean": avg_ratio, "policy/skipped": 1.0 - keep,
        "returns/mean": mean(returns_BxT), "returns/var": adv.masked_var(returns_BxT, m),
        "val/vpred": mean(sg(new_values_BxT)), "val/error": mean(sg(vf1)),
        "val/clipfrac": mean(sg(vf2 > vf1).astype(m.dtype)),
        "val/mean": mean(old_values_BxT), "val/var": adv.masked_var(old_values_BxT, m),
    }
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# Update step
# ----------------------------------------------------------------------------------------------------------------

def make_optimizer(cfg: PPOConfig) -> optax.GradientTransformation:
    """Adam (torch defaults: b1 0.9, b2 0.999, eps 1e-8, no schedule) after clipping by global norm."""
    adam = optax.adam(cfg.learning_rate, b1=0.9, b2=0.999, eps=1e-8)
    if cfg.max_grad_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adam)


def minibatch_indices(rng, cfg: PPOConfig):
    """Row indices ``ExNxGxM``: one fresh permutation of the batch per epoch, cut into steps and micro-batches."""
    keys = jax.random.split(rng, cfg.ppo_epochs)
    perms = jax.vmap(lambda k: jax.random.permutation(k, cfg.batch_size))(keys)
    return perms.reshape(cfg.ppo_epochs, cfg.steps_per_epoch, cfg.gradient_accumulation_steps,
                         cfg.mini_batch_size)


def _all_finite(tree):
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


def _check_batch(batch, cfg: PPOConfig):
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"ppo update batch lacks {missing}; build it with ppo.prepare_batch and add the model inputs")
    for path, x in jax.tree_util.tree_leaves_with_path(batch):
        if x.ndim == 0 or x.shape[0] != cfg.batch_size:
            raise ValueError(f"ppo update batch{jax.tree_util.keystr(path)} has shape {x.shape}; every entry needs "
                             f"leading dimension ppo.batch_size={cfg.batch_size}")


def summarise(stats, finite_NxG, ok_N, prefix: str = "ppo"):
    """Mean of every minibatch stat over the finite minibatches (trl averages over all), plus skip counts."""
    w = finite_NxG.astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    out = {f"{prefix}/{k}": jnp.where(finite_NxG, v, 0.0).sum() / n for k, v in stats.items()}
    if "val/error" in stats:
        out[f"{prefix}/val/var_explained"] = 1.0 - out[f"{prefix}/val/error"] / out[f"{prefix}/returns/var"]
    if "policy/skipped" in stats:
        out[f"{prefix}/skipped_ratio"] = jnp.where(finite_NxG, stats["policy/skipped"], 0.0).sum()
    out[f"{prefix}/skipped_nonfinite"] = (1.0 - w).sum()
    out[f"{prefix}/skipped_steps"] = (~ok_N).astype(jnp.float32).sum()
    return out


def optimizer_steps(grad_fn, optimizer: optax.GradientTransformation, params, opt_state, batch, idx_SxGxM,
                    keys_SxG, frozen=None):
    """``S`` optimizer steps (one ``lax.scan``), each a ``lax.scan`` over ``G`` micro-batches of rows
    ``idx_SxGxM`` of ``batch`` accumulating ``grad / G``; returns ``(params, opt_state, stats_SxG, finite_SxG,
    ok_S)``. ``grad_fn(params, minibatch, key, frozen) -> ((loss, stats), grads)``. A micro-batch whose loss or
    gradients are not finite contributes nothing; a step whose averaged gradient is not finite (or whose
    micro-batches were all skipped) leaves parameters and optimizer state unchanged."""
    G = idx_SxGxM.shape[1]

    def micro(carry, xs):
        params, acc = carry
        idx_M, key = xs
        (loss, stats), grads = grad_fn(params, jax.tree.map(lambda x: x[idx_M], batch), key, frozen)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        acc = jax.tree.map(lambda a, g: a + jnp.where(finite, g / G, 0.0).astype(a.dtype), acc, grads)
        return (params, acc), (stats, finite)

    def opt_step(carry, xs):
        params, opt_state = carry
        zeros = jax.tree.map(jnp.zeros_like, params)
        (_, grads), (stats, finite_G) = jax.lax.scan(micro, (params, zeros), xs)
        # Decided from the gradient, before the update: a finiteness test on the updates made XLA keep
        # all of them (and more) alive at once (update temporaries 724 -> 678 MiB, full mid model).
        ok = finite_G.any() & _all_finite(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        params, opt_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), (new_params, new_opt_state),
                                         (params, opt_state))
        return (params, opt_state), (stats, finite_G, ok)

    (params, opt_state), (stats, finite, ok) = jax.lax.scan(opt_step, (params, opt_state), (idx_SxGxM, keys_SxG))
    return params, opt_state, stats, finite, ok


def make_update_step(forward_fn: Callable[[Any, dict, jax.Array], tuple], optimizer: optax.GradientTransformation,
                     cfg: PPOConfig):
    """Build ``update(params, opt_state, batch, rng[, frozen]) -> (params, opt_state, stats)`` (jittable).

    ``forward_fn(params, minibatch, rng[, frozen]) -> (logp_MxT, values_MxT, entropy_MxT)`` evaluates the policy
    and value head on a minibatch (a dict sliced from ``batch`` along its first axis). ``batch`` holds
    ``BATCH_KEYS`` from ``prepare_batch`` plus whatever model inputs ``forward_fn`` reads, all with leading
    dimension ``cfg.batch_size``. The loop is ``E*N`` optimizer steps (one ``lax.scan``), each a ``lax.scan``
    over ``G`` micro-batches accumulating ``grad(loss)/G``. ``frozen`` (e.g. the base weights under LoRA)
    is passed through to ``forward_fn`` as a jit argument, never differentiated.
    """
    G = cfg.gradient_accumulation_steps

    def loss_fn(params, mb, rng, frozen):
        logp, values, entropy = forward_fn(params, mb, rng) if frozen is None else forward_fn(params, mb, rng, frozen)
        return ppo_losses(logp, values, mb["old_logp"], mb["old_values"], mb["advantages"], mb["returns"],
                          mb["mask"], cfg, entropy_BxT=entropy)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(params, opt_state, batch, rng, frozen=None):
        _check_batch(batch, cfg)
        shuffle_rng, forward_rng = jax.random.split(rng)
        idx_SxGxM = minibatch_indices(shuffle_rng, cfg).reshape(-1, G, cfg.mini_batch_size)
        keys_SxG = jax.random.split(forward_rng, idx_SxGxM.shape[:2])
        params, opt_state, stats, finite, ok = optimizer_steps(grad_fn, optimizer, params, opt_state, batch,
                                                               idx_SxGxM, keys_SxG, frozen)
        return params, opt_state, summarise(stats, finite, ok)

    return update


# ----------------------------------------------------------------------------------------------------------------
# The algorithm (rre_jax.algorithms' interface)
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PPO:
    """trl 0.7.4's PPO behind the interface of ``rre_jax.algorithms``: one response per prompt, a critic and a
    reference pass; its own train-state entries are the running score moments and the adaptive KL controller."""

    cfg: PPOConfig
    name = "ppo"
    samples_per_prompt = 1
    uses_values = True
    uses_reference = True

    @property
    def prompts_per_step(self) -> int:
        return self.cfg.batch_size

    def init_state(self) -> dict:
        return {"moments": adv.init_moments(), "kl": adv.init_kl(self.cfg.init_kl_coef)}

    def prepare(self, exp, score_B, mask_BxN, state):
        """``(batch, state entries, stats)``: trl's pre-epoch maths on the frozen experience."""
        batch, moments, stats = prepare_batch(exp.logp_BxN, exp.ref_logp_BxN, exp.values_BxN, score_B, mask_BxN,
                                              state["moments"], state["kl"], self.cfg)
        return batch, {"moments": moments}, stats

    def make_update(self, forward_fn):
        return make_update_step(forward_fn, make_optimizer(self.cfg), self.cfg)

    def finish(self, state, stats) -> dict:
        """The KL controller's step after the update."""
        return {"kl": update_kl_coef(state["kl"], stats["objective/kl"], self.cfg)}

    def next_kl_coef(self, state) -> float:
        return float(state["kl"].value)

    @property
    def micro_steps(self) -> int:
        """Micro-batch forward/backward passes of one update: epochs x batch / mini-batch."""
        return self.cfg.ppo_epochs * self.cfg.batch_size // self.cfg.mini_batch_size

