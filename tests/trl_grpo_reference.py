"""A port of trl 1.16.0's GRPO and RLOO maths (``trl/trainer/grpo_trainer.py``, ``rloo_trainer.py``, ``utils.py``).

Test-side only: the yardstick for ``rre_jax.grpo``. The advantage blocks of ``_generate_and_score_completions``
and the loss of ``_compute_loss`` follow trl line by line in NumPy; ``update`` is in torch because the
full-update reference needs autograd, ``torch.optim.Adam`` and ``clip_grad_norm_`` as trl's Trainer drives them:
the generation batch is shuffled once and cut into ``steps_per_generation`` slices, each ``training_step`` takes
one slice, every ``gradient_accumulation_steps`` slices make an optimizer step, and the whole is repeated
``num_iterations`` times with the old log-probs frozen. GRPO scales its loss for accumulation itself
(``loss_is_scaled_for_ga = True``); RLOO returns it unscaled and the Trainer divides by the accumulation steps.

This port was checked against trl 1.16.0's own code in float64 by ``tests/trl_grpo_check.py`` (run it in a
virtualenv with ``trl==1.16.0`` and ``torch==2.13.0``; it calls ``GRPOTrainer._compute_loss`` and
``RLOOTrainer._compute_loss`` unbound on a minimal stand-in trainer, and executes the advantage blocks cut from
the source of ``_generate_and_score_completions``).
"""
from __future__ import annotations

import numpy as np
import torch


# --------------------------------------------------------------------------------------- trl/trainer/utils.py

def nanstd(x, axis=None, keepdims=False):
    """``trl.trainer.utils.nanstd``: Bessel-corrected std ignoring NaNs (NaN for a single value)."""
    mean = np.nanmean(x, axis=axis, keepdims=True)
    var = np.nanmean((x - mean) ** 2, axis=axis, keepdims=True)
    count = np.sum(~np.isnan(x), axis=axis, keepdims=True)
    var = var * np.where(count > 1, count / np.maximum(count - 1, 1), np.nan)
    std = np.sqrt(var)
    return std if keepdims else (std.squeeze() if axis is None else std.squeeze(axis))


# ----------------------------------------------------------------------------- _generate_and_score_completions

def grpo_advantages(rewards, num_generations, scale_rewards):
    """GRPO's ``sum_then_normalize`` block for one reward function: ``(advantages, std_rewards, is_std_zero)``."""
    mean_grouped = np.nanmean(rewards.reshape(-1, num_generations), axis=1).repeat(num_generations)
    if scale_rewards in ("group", "none"):
        std = nanstd(rewards.reshape(-1, num_generations), axis=1).repeat(num_generations)
    elif scale_rewards == "batch":
        std = np.broadcast_to(nanstd(rewards), rewards.shape)
    else:
        raise ValueError(scale_rewards)
    advantages = rewards - mean_grouped
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    is_std_zero = np.isclose(std, 0.0, rtol=1e-5, atol=1e-8)
    return np.nan_to_num(advantages, nan=0.0), std, is_std_zero


def rloo_advantages(rewards, num_generations, old_per_token_logps=None, ref_per_token_logps=None,
                    completion_mask=None, beta=0.0, normalize_advantages=False):
    """RLOO's block: KL folded into the reward, leave-one-out baseline: ``(advantages, rewards)``."""
    if beta != 0.0:
        per_token_kl = old_per_token_logps - ref_per_token_logps
        kl = (per_token_kl * completion_mask).sum(-1)
        rewards = rewards - beta * kl
    grouped = rewards.reshape(-1, num_generations)
    scorable_counts = (~np.isnan(grouped)).sum(axis=1, keepdims=True)
    grouped_sum = np.nansum(grouped, axis=1, keepdims=True)
    baselines = ((grouped_sum - grouped) / (scorable_counts - 1)).reshape(-1)
    advantages = rewards - baselines
    if normalize_advantages:
        advantages = (advantages - np.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return np.nan_to_num(advantages, nan=0.0), rewards


# ------------------------------------------------------------------------------------------------ _compute_loss

def grpo_loss(per_token_logps, old_per_token_logps, advantages, mask, *, loss_type, epsilon_low, epsilon_high,
              beta=0.0, ref_per_token_logps=None, max_completion_length=None, num_items_in_batch=None,
              num_processes=1, gradient_accumulation_steps=1, steps_per_generation=1, xp=np):
    """GRPO's ``_compute_loss`` after the forward pass (token-level importance sampling, no vLLM, no entropy
    mask, no ``delta``): the loss trl back-propagates (already divided for accumulation). ``xp`` is ``np`` or
    ``torch`` (the update reference needs autograd)."""
    advantages = advantages[:, None]
    coef_1 = xp.exp(per_token_logps - old_per_token_logps)
    if beta != 0.0:
        per_token_kl = xp.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_2 = xp.clip(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -xp.minimum(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    clamp1 = lambda x: xp.clip(x, 1.0, None) if xp is np else x.clamp(min=1.0)  # noqa: E731
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / clamp1(mask.sum(-1))).mean() / gradient_accumulation_steps
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / clamp1(mask.sum()) / gradient_accumulation_steps
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.shape[0] * max_completion_length)
        loss = loss / gradient_accumulation_steps
    elif loss_type == "dapo":
        normalizer = max(num_items_in_batch, 1.0) / num_processes
        normalizer = normalizer * gradient_accumulation_steps / steps_per_generation
        loss = (per_token_loss * mask).sum() / normalizer
    else:
        raise ValueError(loss_type)
    return loss


def rloo_loss(per_token_logps, old_logps, advantages, mask, *, epsilon_low, epsilon_high, xp=np):
    """RLOO's ``_compute_loss`` after the forward pass (unscaled: the Trainer divides by accumulation)."""
    logps = (per_token_logps * mask).sum(1)
    coef_1 = xp.exp(logps - old_logps)
    coef_2 = xp.clip(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    return (-xp.minimum(coef_1 * advantages, coef_2 * advantages)).mean()


# -------------------------------------------------------------------------------------- the Trainer's loop

def update(forward, params, batch, perm, cfg, learning_rate, max_grad_norm):
    """trl's optimisation of one generation batch: ``num_iterations`` passes over the batch in the order ``perm``
    (shuffled once), ``steps_per_generation = B / M`` slices, an optimizer step every ``K`` slices.

    ``forward(params, rows) -> per_token_logps`` in torch; ``params`` a dict of leaf tensors (updated in place);
    ``batch`` numpy arrays ``old_logp``, ``advantages``, ``mask``[, ``ref_logp``]; ``cfg`` a
    ``rre_jax.grpo.GroupConfig`` (field names as trl's, ``epsilon_low`` = trl's ``epsilon``); Adam with torch's
    defaults at ``learning_rate``, gradients clipped to ``max_grad_norm`` (None: off) before each step.
    """
    t = {k: torch.as_tensor(np.array(v)) for k, v in batch.items()}
    optimizer = torch.optim.Adam(list(params.values()), lr=learning_rate)
    K, M, B = cfg.gradient_accumulation_steps, cfg.mini_batch_size, cfg.batch_size
    num_items = float(batch["mask"].sum())
    micro = 0
    for _ in range(cfg.num_iterations):
        for start in range(0, B, M):
            rows = torch.as_tensor(np.array(perm[start:start + M]))
            mb = {k: v[rows] for k, v in t.items()}
            logp = forward(params, rows)
            if cfg.algo == "grpo":
                loss = grpo_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], loss_type=cfg.loss_type,
                                 epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                                 ref_per_token_logps=mb.get("ref_logp"),
                                 max_completion_length=cfg.max_completion_length, num_items_in_batch=num_items,
                                 gradient_accumulation_steps=K, steps_per_generation=B // M, xp=torch)
            else:
                old_logps = (mb["old_logp"] * mb["mask"]).sum(1)
                loss = rloo_loss(logp, old_logps, mb["advantages"], mb["mask"], epsilon_low=cfg.epsilon_low,
                                 epsilon_high=cfg.epsilon_high, xp=torch) / K
            loss.backward()
            micro += 1
            if micro % K == 0:
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()

