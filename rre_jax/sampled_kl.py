"""Sampled KL(pi || pi_ref) of a policy's sampling distribution, the RL axis of the overoptimization curves.

Shapes: ``B`` rows, ``T`` prompt bucket (left padded), ``N`` response length, ``S = T + N``, ``V`` vocab.

What distribution. A response is drawn token by token from ``filter(logits / temperature)`` (``sampling``:
temperature, then top-k / top-p) until EOS or ``max_new_tokens``. The KL measured here is between the two
distributions over such responses -- the policy's and the reference's under the **same** sampling settings::

    KL(pi_s || ref_s) = E_{y ~ pi_s} [ sum_t log pi_s(y_t | x, y_<t) - log ref_s(y_t | x, y_<t) ]

and the estimate is the mean over the sampled responses of that summed per-token log-ratio of the sampled
tokens (every sampled token up to and including EOS: the KL of the full sampled response; cutting at stop
strings is a function of it and can only lower the KL). It is unbiased; its standard error is the sample
standard deviation over ``sqrt(B)``. With temperature 1 and no filters it is the KL of the models themselves
(the one PPO penalises). Top-k / top-p filters make ``ref_s`` zero outside the reference's own nucleus, so a
token the policy samples outside it gives an infinite log-ratio: the KL really is infinite then.

The reference: LoRA mode -- the same network with adapters off; full mode -- the initial weights (``frozen``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rre_jax import policy, sampling
from rre_jax.models import llama


def token_logp(logits_BxNxV, tokens_BxN, scfg: sampling.SamplingConfig):
    """``f32[B, N]``: log-prob of each token under the sampling distribution ``filter(logits / temperature)``."""
    B, N, V = logits_BxNxV.shape
    flat = sampling.filter_logits(logits_BxNxV.reshape(B * N, V), scfg)
    logp = jnp.take_along_axis(jax.nn.log_softmax(flat), tokens_BxN.reshape(B * N, 1), -1)
    return logp.reshape(B, N)


def _response_logits(cfg, params, ids_BxS, mask_BxS, T: int, lora=None, lora_cfg=None):
    out = llama.forward(cfg, params, ids_BxS, mask_BxS, lora=lora, lora_cfg=lora_cfg if lora is not None else None)
    return out["logits"][:, T - 1:-1].astype(jnp.float32)


def sequence_logps(spec: policy.PolicySpec, trainable, frozen, ids_BxS, mask_BxS, T: int,
                   scfg: sampling.SamplingConfig):
    """``(logp_pi_B, logp_ref_B)``: summed sampling-distribution log-probs of each row's response tokens
    (``mask_BxS[:, T:]``) under the policy and under the reference."""
    tokens_BxN, resp_BxN = ids_BxS[:, T:], mask_BxS[:, T:].astype(jnp.float32)
    params, lora = policy.sampling_params(spec, trainable, frozen)
    logp_pi = token_logp(_response_logits(spec.cfg, params, ids_BxS, mask_BxS, T, lora, spec.lora_cfg),
                         tokens_BxN, scfg)
    logp_ref = token_logp(_response_logits(spec.cfg, frozen, ids_BxS, mask_BxS, T), tokens_BxN, scfg)
    # where(): a filtered (-inf) token outside the response must not turn 0 * -inf into NaN
    total = lambda lp: jnp.sum(jnp.where(resp_BxN > 0, lp, 0.0), axis=-1)  # noqa: E731
    return total(logp_pi), total(logp_ref)


def log_ratio(spec: policy.PolicySpec, trainable, frozen, ids_BxS, mask_BxS, T: int, scfg: sampling.SamplingConfig):
    """``f32[B]``: each row's summed ``log pi_s - log ref_s`` of its response tokens (jittable with ``spec``, ``T``
    and ``scfg`` static; ``programs.build_log_ratio`` is the run's program)."""
    logp_pi, logp_ref = sequence_logps(spec, trainable, frozen, ids_BxS, mask_BxS, T, scfg)
    return logp_pi - logp_ref


def estimate(log_ratio_B) -> dict:
    """``{"kl", "stderr", "n"}``: the mean of the per-response log-ratios and its standard error (nats)."""
    x = np.asarray(log_ratio_B, np.float64)
    n = int(x.size)
    stderr = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"kl": float(x.mean()) if n else math.nan, "stderr": stderr, "n": n}
