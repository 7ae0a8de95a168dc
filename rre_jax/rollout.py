"""Rollouts: ``(params, prompts, rng) -> Rollout``, one jitted program -- the one decode loop of rre_jax.

Shapes: ``B`` rows, ``T`` (bucketed, left-padded) prompt length, ``N`` = max new tokens, ``V`` vocab.

A jitted prefill fills the KV cache for the whole prompt bucket, then a ``lax.while_loop`` decodes one token
per step and exits as soon as every row has emitted EOS (or after ``N`` steps). Rows that have ended emit
``pad_id``. The response mask covers the sampled tokens up to and including the first EOS, as trl 0.7.4's
``generate(remove_padding=True)`` keeps them. Per-token log-probabilities are those of the untempered,
unfiltered policy (``log_softmax(logits)`` at the chosen token), i.e. what the PPO forward pass computes
when ``temperature == 1``; they are reported, not trained on. Greedy decoding (``greedy``, rre-eval's alignment
tax, the decode benchmark) is this sampler with ``SamplingConfig(greedy=True)``: argmax at every step.

Groups: best-of-n (``rre-bon``) and the group methods (GRPO, RLOO) sample each prompt several times, on
consecutive rows. ``group = G`` says so: rows ``p * G`` .. ``p * G + G - 1`` hold one prompt, which is prefilled
once, and its KV cache and last logits are repeated onto the G rows before the decode loop. The samples are
those of the ungrouped call (same rows, same random draws); the prefill costs 1 / G (it is most of a best-of-n
call's FLOPs when prompts are longer than responses). transformers' ``generate(num_return_sequences=G)``
expands the prompts before its prefill and pays it G times.

Weights: a stacked weight sliced inside the ``while_loop`` would be copied at every step, so the loop runs on
per-layer weights: ``llama.unstack_layers`` once per call (a second copy of the layer weights for the call), or
none at all for params loaded with ``layer_layout='per_layer'`` (generation-only use: no second copy ever).

Members (a sweep, ``rre_jax.sweep``): ``members = K`` samples the same prompts once per member, each with its own
LoRA adapters and key (``lora`` and ``rng`` stacked on a leading ``K`` axis); every array of the rollout gains that
leading axis. The loop is shared: one counter and one cache index for every member (so the cache is written in
place, never scattered), and the prefill, the decode step and the draw are ``vmap``-ed over the members inside it.
The trunk is not mapped, so each decode step's matmuls read its weights once for all ``K x B`` rows, and the
adapters' become batched einsums over the member axis. A member's rows are those of its run alone (same draws,
same arithmetic per row); its ``steps`` are its own (the loop may run on for others, whose rows are done: pad).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rre_jax import backend, mesh as mesh_lib, sampling
from rre_jax.models import llama


class Rollout(NamedTuple):
    tokens_BxN: jax.Array  # int32 sampled tokens, pad after EOS
    mask_BxN: jax.Array  # int32 1 on response tokens (EOS included)
    logp_BxN: jax.Array  # f32 log-prob of each token under the policy (0 where masked)
    length_B: jax.Array  # int32 number of response tokens
    steps: jax.Array  # int32 decode steps actually run (early exit)


def sample(cfg: llama.LlamaConfig, params, ids_BxT, mask_BxT, rng, scfg: sampling.SamplingConfig, *,
           eos_id: int | None, pad_id: int, lora=None, lora_cfg=None, cache=None, mesh=None, rules=None,
           return_cache: bool = False, group: int = 1, members: int = 0, write_cache_last: bool = False) -> Rollout:
    """Sample up to ``scfg.max_new_tokens`` tokens per row of a left-padded prompt batch (``eos_id=None``: rows
    never end early). ``params`` / ``lora`` may be stacked or per-layer (``llama.layer_layout``).

    ``cache``: an empty KV cache of ``T + N`` slots to decode into (``llama.init_cache``, or `member_cache` with
    ``members``; default: a fresh one); ``return_cache`` returns ``(rollout, final cache)``, so that a donated
    ``cache`` is decoded in place; ``mesh`` / ``rules``: activation sharding constraints (``rre_jax.programs``
    passes the run's); ``group``: rows come in groups of ``group`` copies of one prompt; ``members``: K members'
    adapters and keys (see the module docstring); ``write_cache_last``: each decode step writes its keys into the
    cache after every layer has read it (on an accelerator; XLA:CPU wants the writes first: ``llama.Llama``)."""
    B, T = ids_BxT.shape
    N = scfg.max_new_tokens
    con = {} if mesh is None else {"mesh": mesh, "rules": rules}
    # weight-stationary decode: one token per row moves activations over fsdp, never the weights
    dcon = {"write_cache_last": write_cache_last,
            **(con if mesh is None else {"mesh": mesh, "rules": mesh_lib.decode_rules(rules)})}
    prefill, decoder, draw = _steps(cfg, params, ids_BxT, mask_BxT, rng, scfg, lora, lora_cfg, group, members, con,
                                    dcon)
    if members and cache is None:
        cache = member_cache(cfg, members, B, T + N)
    logits_BxV, cache = prefill(cache)
    decode = decoder()  # the layers unstacked once, here: no per-step weight slices
    lead = (members, B) if members else (B,)  # leading dims of every per-row array

    def cond(state):
        i, _, _, _, _, done_B = state
        return (i < N) & ~jnp.all(done_B)

    def body(state):
        i, logits_BxV, cache, toks_BxN, logp_BxN, done_B = state
        tok_B = jnp.where(done_B, pad_id, draw(i, logits_BxV))
        lp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV.astype(jnp.float32)), tok_B[..., None], -1)[..., 0]
        at = (0,) * len(lead) + (i,)
        toks_BxN = lax.dynamic_update_slice(toks_BxN, tok_B[..., None], at)
        logp_BxN = lax.dynamic_update_slice(logp_BxN, jnp.where(done_B, 0.0, lp_B)[..., None], at)
        done_B = done_B if eos_id is None else done_B | (tok_B == eos_id)
        logits_BxV, cache = decode(tok_B, cache)
        return i + 1, logits_BxV, cache, toks_BxN, logp_BxN, done_B

    init = (jnp.zeros((), jnp.int32), logits_BxV, cache, jnp.full((*lead, N), pad_id, jnp.int32),
            jnp.zeros((*lead, N), jnp.float32), jnp.zeros(lead, bool))
    steps, _, cache, toks_BxN, logp_BxN, _ = lax.while_loop(cond, body, init)
    mask_BxN = response_mask(toks_BxN, steps, eos_id)
    length_B = mask_BxN.sum(-1)
    if members:  # each member's own loop count: it ran until its longest row ended (all its rows done: pad)
        steps = jnp.minimum(steps, length_B.max(-1))
    out = Rollout(toks_BxN, mask_BxN, logp_BxN * mask_BxN, length_B, steps)
    return (out, cache) if return_cache else out


# The vmap axes of a member cache (`member_cache`): every buffer per member, one write index for all.
CACHE_AXES = {"k": 0, "v": 0, "mask": 0, "index": None, "pos": 0}


def member_cache(cfg: llama.LlamaConfig, members: int, batch: int, length: int):
    """An empty KV cache of ``members`` x ``batch`` rows and ``length`` slots: ``llama.init_cache``'s buffers with
    a leading member axis, one shared write index (``CACHE_AXES``)."""
    one = llama.init_cache(cfg, batch, length)
    return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.broadcast_to(x, (members, *x.shape)), one)


def _steps(cfg, params, ids_BxT, mask_BxT, rng, scfg, lora, lora_cfg, group: int, members: int, con, dcon):
    """``(prefill(cache), decoder() -> decode(tok, cache), draw(i, logits))`` of `sample`: a run's, or ``vmap``-ed
    over ``members`` (adapters, keys and cache buffers mapped; the trunk, the prompts and the cache index shared).
    ``decoder`` unstacks the layers (`llama.unstack_layers`), once, when called."""
    T = ids_BxT.shape[1]
    length = T + scfg.max_new_tokens
    if members and lora is None:
        raise ValueError("rollout.sample: members sample with their own LoRA adapters; none were given")

    def prefill_one(lora, cache):
        return prefill_groups(cfg, params, ids_BxT, mask_BxT, length, group, lora=lora, lora_cfg=lora_cfg,
                              cache=cache, **con)

    def decoder():
        per_layer = llama.unstack_layers(params)
        lora_pl = jax.vmap(llama.unstack_layers)(lora) if members else llama.unstack_layers(lora)

        def decode_one(lora, tok_B, cache):
            return llama.decode_step(cfg, per_layer, tok_B, cache, lora=lora, lora_cfg=lora_cfg, **dcon)
        if not members:
            return lambda tok, cache: decode_one(lora_pl, tok, cache)
        return lambda tok, cache: _over_members(decode_one, (0, 0, CACHE_AXES))(lora_pl, tok, cache)

    def draw_one(key, i, logits_BxV):
        return sampling.sample(jax.random.fold_in(key, i), logits_BxV, scfg)

    if not members:
        return lambda cache: prefill_one(lora, cache), decoder, lambda i, logits: draw_one(rng, i, logits)
    return (lambda cache: _over_members(prefill_one, (0, CACHE_AXES))(lora, cache), decoder,
            lambda i, logits: jax.vmap(draw_one, in_axes=(0, None, 0))(rng, i, logits))


def _over_members(f, in_axes):
    """``f -> (logits, cache)`` mapped over a leading member axis (``CACHE_AXES`` for the cache it returns)."""
    return jax.vmap(f, in_axes=in_axes, out_axes=(0, CACHE_AXES))


def prefill_groups(cfg: llama.LlamaConfig, params, ids_BxT, mask_BxT, cache_len: int, group: int, *, cache=None,
                   **kw):
    """`llama.prefill` of the first row of each group of ``group`` rows, its logits and KV cache repeated onto the
    group's rows; written into ``cache`` (the caller's empty ``B``-row cache, e.g. donated) when given.
    ``group = 1`` is `llama.prefill` itself."""
    if group == 1:
        return llama.prefill(cfg, params, ids_BxT, mask_BxT, cache_len, cache=cache, **kw)
    B = ids_BxT.shape[0]
    if B % group:
        raise ValueError(f"{B} rows do not split into groups of {group} copies of a prompt")
    logits_PxV, cache_P = llama.prefill(cfg, params, ids_BxT[::group], mask_BxT[::group], cache_len, **kw)
    rep = lambda x: x if x.ndim == 0 else jnp.repeat(x, group, axis=0)  # noqa: E731
    full = jax.tree.map(rep, cache_P)
    if cache is not None:  # the caller's buffers (same shapes and dtypes), so a donated cache is reused
        full = jax.tree.map(lambda c, x: x.astype(c.dtype), cache, full)
    return rep(logits_PxV), full


def response_mask(tokens_BxN, steps, eos_id: int | None):
    """1 on tokens up to and including each row's first EOS, and only on the ``steps`` decoded (any leading
    dims before ``N``)."""
    N = tokens_BxN.shape[-1]
    is_eos = jnp.zeros(tokens_BxN.shape, bool) if eos_id is None else tokens_BxN == eos_id
    eos_before = jnp.cumsum(is_eos, axis=-1) - is_eos  # EOS strictly before this position
    return ((eos_before == 0) & (jnp.arange(N) < steps)).astype(jnp.int32)


def cut_mask(mask_BxN, cut_B):
    """Drop tokens from each row's cut index on (the stop-string cut of the reward features; any leading dims)."""
    return mask_BxN * (jnp.arange(mask_BxN.shape[-1]) < cut_B[..., None]).astype(mask_BxN.dtype)


_sample_jit = jax.jit(sample, static_argnums=(0, 5),
                      static_argnames=("eos_id", "pad_id", "lora_cfg", "mesh", "rules", "return_cache", "group",
                                       "members", "write_cache_last"))


def jitted_sampler(cfg: llama.LlamaConfig, scfg: sampling.SamplingConfig, eos_id: int | None, pad_id: int,
                   lora_cfg=None, group: int = 1):
    """The jitted ``(params, ids, mask, rng, lora) -> Rollout`` for one model and sampling setting on the
    arguments' devices (``jax.jit``'s own cache keys the executables on those settings): the library form of the
    sampler; a run's sampler, with its shardings, is ``programs.build_sampler``. ``group``: rows come in groups of
    that many copies of one prompt (prefilled once)."""
    late = not backend.on_xla_cpu()  # the cache's writes (``llama.Llama``), for the default backend the sampler runs on

    def call(params, ids_BxT, mask_BxT, rng, lora):
        return _sample_jit(cfg, params, ids_BxT, mask_BxT, rng, scfg, eos_id=eos_id, pad_id=pad_id, lora=lora,
                           lora_cfg=lora_cfg, group=group, write_cache_last=late)
    return call


def greedy(cfg: llama.LlamaConfig, params, ids_BxT, mask_BxT, max_new_tokens: int, *, eos_id: int | None = None,
           pad_id: int = 0, lora=None, lora_cfg=None):
    """Greedy continuation ``int32[B, N]`` of a left-padded batch: the sampler with ``greedy=True`` (argmax at
    every step), pad after a row's EOS, as transformers' ``generate(do_sample=False)``."""
    scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=max_new_tokens)
    run = jitted_sampler(cfg, scfg, eos_id, pad_id, lora_cfg)
    return run(params, ids_BxT, mask_BxT, jax.random.key(0), lora).tokens_BxN
