"""Checks tests/trl_grpo_reference.py against trl 1.16.0's own code in float64 (not a pytest module).

trl's GRPO / RLOO maths live inside trainer methods, so this script calls the real code as directly as it can:

* the losses: ``GRPOTrainer._compute_loss`` and ``RLOOTrainer._compute_loss`` called unbound on a minimal
  stand-in trainer (attributes of a one-process run; its ``_get_per_token_logps_and_entropies`` returns given
  float64 log-probs), for every ``loss_type``, with and without the KL term and with asymmetric clipping;
* the advantages: the blocks of ``_generate_and_score_completions`` from ``rewards_per_func`` to
  ``nan_to_num``, cut from trl's source with ``inspect`` and executed on float64 tensors, for every
  ``scale_rewards`` (GRPO) and for RLOO's KL folding, leave-one-out baseline and ``normalize_advantages``.

Run it in a virtualenv with trl and torch (not the project's: trl is no dependency of rre_jax)::

    python3 -m venv /tmp/trl && /tmp/trl/bin/pip install trl==1.16.0 torch==2.13.0 numpy pytest
    PYTHONPATH=tests /tmp/trl/bin/python tests/trl_grpo_check.py

It prints the largest difference of each comparison and exits non-zero if any exceeds 1e-12 (both sides are
float64 and perform the same operations; differences are rounding in reordered sums).
"""
from __future__ import annotations

import collections
import inspect
import sys
import textwrap
import types

import numpy as np
import torch

import trl_grpo_reference as ref

torch.set_default_dtype(torch.float64)
B, N, G = 16, 7, 4
WORST: dict = {}


def close(name, got, want):
    diff = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    WORST[name] = diff
    print(f"{name:58s} max |trl - port| = {diff:.2e}")


class _Accelerator:
    num_processes, process_index, sync_gradients = 1, 0, True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _stub(trainer_cls, logps, **attrs):
    """A stand-in ``self`` for ``trainer_cls._compute_loss`` of a one-process, single-reward, text-only run."""
    s = types.SimpleNamespace(
        accelerator=_Accelerator(), model=types.SimpleNamespace(training=True), aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        use_vllm=False, vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=attrs.pop("ga", 1),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}, **attrs)
    s._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    return s


def _inputs(seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, N))
    for b in range(B):
        mask[b, :int(rng.integers(2, N + 1))] = 1.0
    old = -rng.gamma(2.0, 1.0, (B, N))
    new = old + rng.normal(0, 0.3, (B, N))
    ref_logp = old + rng.normal(0, 0.3, (B, N))
    adv = rng.normal(0, 1.0, B)
    return new, old, ref_logp, adv, mask


def check_grpo_loss():
    from trl import GRPOTrainer
    new, old, ref_logp, adv, mask = _inputs(0)
    t = lambda x: torch.tensor(x)  # noqa: E731
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for beta, eps_low, eps_high in ((0.0, 0.2, 0.2), (0.04, 0.2, 0.28)):
            n_items = 3.7 * mask.sum()
            args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=4)
            s = _stub(GRPOTrainer, t(new), beta=beta, loss_type=loss_type, epsilon_low=eps_low,
                      epsilon_high=eps_high, max_completion_length=N, args=args, ga=2)
            inputs = {"prompt_ids": torch.zeros((B, 1), dtype=torch.long), "prompt_mask": torch.ones((B, 1)),
                      "completion_ids": torch.zeros((B, N), dtype=torch.long), "completion_mask": t(mask),
                      "advantages": t(adv), "old_per_token_logps": t(old), "num_items_in_batch": t(n_items)}
            if beta:
                inputs["ref_per_token_logps"] = t(ref_logp)
            got = GRPOTrainer._compute_loss(s, None, inputs)
            want = ref.grpo_loss(new, old, adv, mask, loss_type=loss_type, epsilon_low=eps_low,
                                 epsilon_high=eps_high, beta=beta, ref_per_token_logps=ref_logp,
                                 max_completion_length=N, num_items_in_batch=n_items,
                                 gradient_accumulation_steps=2, steps_per_generation=4)
            close(f"GRPOTrainer._compute_loss {loss_type} beta={beta} eps=({eps_low},{eps_high})", got.item(), want)


def check_rloo_loss():
    from trl import RLOOTrainer
    new, old, _, adv, mask = _inputs(1)
    new = old + (new - old) * 0.3
    t = lambda x: torch.tensor(x)  # noqa: E731
    s = _stub(RLOOTrainer, t(new), epsilon_low=0.2, epsilon_high=0.3)
    old_logps = (old * mask).sum(1)
    inputs = {"prompt_ids": torch.zeros((B, 1), dtype=torch.long), "prompt_mask": torch.ones((B, 1)),
              "completion_ids": torch.zeros((B, N), dtype=torch.long), "completion_mask": t(mask),
              "advantages": t(adv), "old_logps": t(old_logps)}
    got = RLOOTrainer._compute_loss(s, None, inputs)
    close("RLOOTrainer._compute_loss", got.item(),
          ref.rloo_loss(new, old_logps, adv, mask, epsilon_low=0.2, epsilon_high=0.3))


def _block(trainer_cls, start: str, end: str) -> str:
    """The lines of ``_generate_and_score_completions`` from ``start`` through ``end``, dedented."""
    src = inspect.getsource(trainer_cls._generate_and_score_completions)
    i, j = src.index(start), src.index(end, src.index(start)) + len(end)
    i = src.rindex("\n", 0, i) + 1
    return textwrap.dedent(src[i:j])


def check_advantages():
    from trl import GRPOTrainer, RLOOTrainer
    from trl.trainer import utils as trl_utils
    rng = np.random.default_rng(2)
    rewards = rng.normal(1.0, 2.0, B)
    rewards[:G] = 0.5
    end = "advantages = torch.nan_to_num(advantages, nan=0.0)"
    grpo_src = _block(GRPOTrainer, "unscorable_mask = torch.isnan", end)
    for scale in ("group", "batch", "none"):
        ns = {"torch": torch, "nanstd": trl_utils.nanstd, "device": "cpu", "num_generations": G,
              "rewards_per_func": torch.tensor(rewards)[:, None],
              "self": types.SimpleNamespace(multi_objective_aggregation="sum_then_normalize", scale_rewards=scale,
                                            reward_weights=torch.ones(1), reward_funcs=[None])}
        exec(grpo_src, ns)
        want, want_std, _ = ref.grpo_advantages(rewards, G, scale)
        close(f"GRPO advantages scale_rewards={scale}", ns["advantages"].numpy(), want)
        close(f"GRPO std_rewards scale_rewards={scale}", ns["std_rewards"].numpy(), want_std)
    _, old, ref_logp, _, mask = _inputs(3)
    rloo_src = _block(RLOOTrainer, "unscorable_mask = torch.isnan", end)
    for beta, normalize in ((0.0, False), (0.05, False), (0.3, True)):
        ns = {"torch": torch, "nanstd": trl_utils.nanstd, "device": "cpu", "num_generations": G,
              "gather": lambda x: x, "rewards_per_func": torch.tensor(rewards)[:, None],
              "old_per_token_logps": torch.tensor(old), "ref_per_token_logps": torch.tensor(ref_logp),
              "completion_mask": torch.tensor(mask),
              "self": types.SimpleNamespace(beta=beta, normalize_advantages=normalize, reward_clip_range=None,
                                            reward_weights=torch.ones(1))}
        exec(rloo_src, ns)
        want, want_r = ref.rloo_advantages(rewards, G, old, ref_logp, mask, beta, normalize)
        close(f"RLOO advantages beta={beta} normalize={normalize}", ns["advantages"].numpy(), want)
        close(f"RLOO shaped rewards beta={beta}", ns["rewards"].numpy(), want_r)


if __name__ == "__main__":
    import trl
    print(f"trl {trl.__version__}, torch {torch.__version__}")
    assert trl.__version__ == "1.16.0", "the port follows trl 1.16.0"
    check_advantages()
    check_grpo_loss()
    check_rloo_loss()
    bad = {k: v for k, v in WORST.items() if not v <= 1e-12}
    print(f"{len(WORST)} comparisons, worst {max(WORST.values()):.2e}; {'FAILED: ' + str(bad) if bad else 'all agree'}")
    sys.exit(1 if bad else 0)
