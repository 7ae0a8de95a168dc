"""Every jitted program of a run, built in one place with explicit shardings and donation.

A builder takes the mesh, the logical rules and the static shapes of a run and returns a ``Program``: the
``jax.jit``-ed function with its ``in_shardings`` / ``out_shardings`` (from the models' logical axis names through
``rre_jax.mesh``'s rules), the arguments it donates, and ``args``: the abstract arguments
(``jax.ShapeDtypeStruct`` with their shardings) it is compiled for. The same builders serve training
(``RunPrograms``), evaluation, the benchmarks and ahead-of-time compilation for a TPU topology
(``rre_jax.aot``): nothing here reads a weight or allocates an array.

Programs: ``init`` (the train state, created sharded), ``sampler`` (prefill + decode loop; the KV cache comes in
donated, created sharded by ``cache``), ``experience`` (old/reference log-probs and values), ``update``
(advantages, PPO epochs, KL controller; donates the train state), ``relevance`` (the BERT encoder forward) and
``gold`` (gold-RM scoring).

Shapes: ``B`` rollout rows, ``T`` prompt bucket, ``N`` new tokens, ``S = T + N``, ``R`` relevance rows of ``L``
tokens, ``G`` gold-RM rows of ``Lg`` tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rre_jax import advantages, backend, compiled, grpo, mesh as mesh_lib, policy, ppo, rollout, sampling
from rre_jax.models import bert, llama, lora as lora_lib


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted program, what it was built with, and the abstract arguments it compiles for."""

    name: str
    jitted: Any
    args: tuple
    in_shardings: tuple
    out_shardings: Any
    donate: tuple[int, ...] = ()

    def compile(self):
        """The executable for ``args`` (no array is allocated)."""
        return self.jitted.lower(*self.args).compile()


def _abstract(tree, shardings):
    """``tree`` of shaped values -> ShapeDtypeStructs carrying ``shardings``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Layout:
    """The mesh and its logical rules: logical specs -> ``NamedSharding``s (never replicated by omission)."""

    def __init__(self, mesh, rules):
        self.mesh, self.rules = mesh, tuple(rules)

    def sharding(self, *logical) -> NamedSharding:
        return NamedSharding(self.mesh, mesh_lib.logical_to_mesh_spec(logical, self.rules))

    def tree(self, logical_specs):
        return mesh_lib.logical_shardings(logical_specs, self.mesh, self.rules)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def batch(self, ndim: int) -> NamedSharding:
        return self.sharding("batch", *(None,) * (ndim - 1))


# =================================================================================== shapes and logical specs

def llama_params(cfg: llama.LlamaConfig, head: str = "lm", layout: str = "stacked"):
    """``(abstract params, logical specs)`` of a Llama (``jax.eval_shape`` of its init) in layer ``layout``
    (``'per_layer'`` unrolls the layers: loop-free programs for ``rre_jax.aot``'s cost analysis)."""
    return mesh_lib.abstract_params(llama.abstract_init_fn(cfg, head=head, layer_layout=layout))


def value_specs() -> dict:
    """Logical specs of ``policy.init_value_head`` (as the Llama module's own value head)."""
    return {"value_head": P("embed", "classes"), "value_bias": P("classes")}


def trainable_specs(pspec: policy.PolicySpec, base_specs) -> dict:
    """Logical specs of ``policy.init_trainable``'s tree, mode by mode."""
    if pspec.mode == "lora":
        return {"lora": lora_lib.logical_specs(pspec.cfg, pspec.lora_cfg), "value": value_specs()}
    if pspec.critic == "shared":
        return {"policy": base_specs, "value": value_specs()}
    return {"policy": base_specs, "critic": {**base_specs, **value_specs()}}


def cache_specs(cfg: llama.LlamaConfig) -> dict:
    """Logical specs of ``llama.init_cache``: rows over ``cache_batch``, kv heads over ``cache_heads``."""
    kv = P("cache_batch", "cache_heads", "cache_length", None)
    L = cfg.num_hidden_layers
    return {"k": (kv,) * L, "v": (kv,) * L, "mask": P("cache_batch", "cache_length"), "index": P(),
            "pos": P("cache_batch")}


def _key():
    return jax.eval_shape(lambda: jax.random.key(0))


def _ints(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


# =================================================================================== the train state

@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Abstract train state and its shardings: what ``init`` creates, ``update`` donates, a restore targets."""

    abstract: dict
    shardings: dict

    def target(self) -> dict:
        return _abstract(self.abstract, self.shardings)


def _init_state_fn(pspec: policy.PolicySpec, pcfg: ppo.PPOConfig):
    def init(frozen, rng):
        trainable = policy.init_trainable(pspec, frozen, rng)
        return {"trainable": trainable, "opt_state": ppo.make_optimizer(pcfg).init(trainable),
                "moments": advantages.init_moments(), "kl": advantages.init_kl(pcfg.init_kl_coef),
                "rng": jax.random.key_data(rng), "step": jnp.zeros((), jnp.int32)}
    return init


def state_layout(lay: Layout, pspec: policy.PolicySpec, pcfg: ppo.PPOConfig, frozen,
                 layout: str = "stacked") -> StateLayout:
    """Shardings of the train state: trainable leaves by their logical specs, Adam moments like the leaf they
    track (``optax.tree_map_params``), scalars (step count, score moments, KL coefficient, rng) replicated."""
    _, base_specs = llama_params(pspec.cfg, layout=layout)
    abstract = jax.eval_shape(_init_state_fn(pspec, pcfg), frozen, _key())
    train_sh = lay.tree(trainable_specs(pspec, base_specs))
    opt_sh = optax.tree_map_params(ppo.make_optimizer(pcfg), lambda _, s: s, abstract["opt_state"], train_sh,
                                   transform_non_params=lambda _: lay.replicated,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    rest = {k: jax.tree.map(lambda _: lay.replicated, v) for k, v in abstract.items()
            if k not in ("trainable", "opt_state")}
    return StateLayout(abstract, {"trainable": train_sh, "opt_state": opt_sh, **rest})


def _weights(lay: Layout, cfg: llama.LlamaConfig, layout: str, head: str = "lm"):
    """``(abstract weights with their shardings, shardings)`` of a Llama in layer ``layout``."""
    abstract, specs = llama_params(cfg, head=head, layout=layout)
    shardings = lay.tree(specs)
    return _abstract(abstract, shardings), shardings


def _adapters(lay: Layout, cfg: llama.LlamaConfig, lora_cfg):
    """``(abstract LoRA adapters with their shardings, shardings)``; ``(None, None)`` without LoRA."""
    if lora_cfg is None:
        return None, None
    shardings = lay.tree(lora_lib.logical_specs(cfg, lora_cfg))
    abstract = jax.eval_shape(lambda r: lora_lib.init(cfg, lora_cfg, r, cfg.param_dtype), jax.random.key(0))
    return _abstract(abstract, shardings), shardings


def _ids_and_mask(lay: Layout, B: int, T: int) -> tuple:
    """Abstract int32 ``(ids_BxT, mask_BxT)``, batch-sharded."""
    return _abstract(_ints(B, T), lay.batch(2)), _abstract(_ints(B, T), lay.batch(2))


def build_prefill(lay: Layout, cfg: llama.LlamaConfig, lora_cfg, B: int, T: int, N: int,
                  layout: str = "stacked") -> Program:
    """``(params, ids_BxT, mask_BxT, lora) -> (logits_BxV, cache)``: the sampler's prefill alone (for costs)."""
    params, params_sh = _weights(lay, cfg, layout)
    lora, lora_sh = _adapters(lay, cfg, lora_cfg)
    in_sh = (params_sh, lay.batch(2), lay.batch(2), lora_sh)
    out_sh = (lay.sharding("batch", "vocab"), lay.tree(cache_specs(cfg)))

    def fn(params, ids, mask, lora):
        return llama.prefill(cfg, params, ids, mask, T + N, lora=lora, lora_cfg=lora_cfg, mesh=lay.mesh,
                             rules=lay.rules)
    args = (params, *_ids_and_mask(lay, B, T), lora)
    return Program("prefill", jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh), args, in_sh, out_sh)


def build_init(lay: Layout, pspec, pcfg, frozen) -> Program:
    """``(frozen, rng) -> state``, written straight into the state's shardings (never on one device)."""
    st = state_layout(lay, pspec, pcfg, frozen)
    frozen_sh = lay.tree(llama_params(pspec.cfg)[1])
    in_sh = (frozen_sh, lay.replicated)
    fn = jax.jit(_init_state_fn(pspec, pcfg), in_shardings=in_sh, out_shardings=st.shardings)
    return Program("init", fn, (_abstract(frozen, frozen_sh), _abstract(_key(), lay.replicated)), in_sh,
                   st.shardings)


# =================================================================================== rollout

def build_cache(lay: Layout, cfg: llama.LlamaConfig, B: int, length: int) -> Program:
    """``() -> empty KV cache`` of ``B`` rows and ``length`` slots, created in its shardings."""
    out_sh = lay.tree(cache_specs(cfg))
    return Program("cache", jax.jit(lambda: llama.init_cache(cfg, B, length), out_shardings=out_sh), (), (), out_sh)


def build_sampler(lay: Layout, cfg: llama.LlamaConfig, scfg: sampling.SamplingConfig, eos_id: int, pad_id: int,
                  lora_cfg: lora_lib.LoraConfig | None, B: int, T: int, layout: str = "stacked",
                  group: int = 1) -> Program:
    """``(params, ids_BxT, mask_BxT, rng, lora, cache) -> (Rollout, cache)``: the cache is donated and returned,
    so XLA decodes in the argument's buffer (the caller drops the returned cache). ``group``: rows come in groups
    of that many copies of one prompt, prefilled once (`rollout.sample`)."""
    params, params_sh = _weights(lay, cfg, layout)
    lora, lora_sh = _adapters(lay, cfg, lora_cfg)
    cache_sh = lay.tree(cache_specs(cfg))
    in_sh = (params_sh, lay.batch(2), lay.batch(2), lay.replicated, lora_sh, cache_sh)
    out_sh = (rollout.Rollout(lay.batch(2), lay.batch(2), lay.batch(2), lay.batch(1), lay.replicated), cache_sh)

    late = not backend.on_xla_cpu(lay.mesh.devices.flat[0].platform)  # the cache's writes: see llama.Llama

    def fn(params, ids_BxT, mask_BxT, rng, lora, cache):
        return rollout.sample(cfg, params, ids_BxT, mask_BxT, rng, scfg, eos_id=eos_id, pad_id=pad_id, lora=lora,
                              lora_cfg=lora_cfg, cache=cache, mesh=lay.mesh, rules=lay.rules, return_cache=True,
                              group=group, write_cache_last=late)
    cache = jax.eval_shape(lambda: llama.init_cache(cfg, B, T + scfg.max_new_tokens))
    args = (params, *_ids_and_mask(lay, B, T), _abstract(_key(), lay.replicated), lora, _abstract(cache, cache_sh))
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=(5,))
    return Program("sampler", jitted, args, in_sh, out_sh, (5,))


# =================================================================================== experience and update

def _experience_program(name: str, fn, out_sh, lay: Layout, pspec: policy.PolicySpec, st: StateLayout, B: int,
                        T: int, N: int, layout: str) -> Program:
    """``fn(trainable, frozen, ids_BxS, mask_BxS)``, jitted with the trainable leaves and frozen weights in their
    shardings, the sequences batch-sharded and the outputs in ``out_sh``."""
    frozen, frozen_sh = _weights(lay, pspec.cfg, layout)
    in_sh = (st.shardings["trainable"], frozen_sh, lay.batch(2), lay.batch(2))
    args = (st.target()["trainable"], frozen, *_ids_and_mask(lay, B, T + N))
    return Program(name, jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh), args, in_sh, out_sh)


def build_experience(lay: Layout, pspec: policy.PolicySpec, st: StateLayout, B: int, T: int, N: int,
                     rows: int | None, layout: str = "stacked") -> Program:
    """``(trainable, frozen, ids_BxS, mask_BxS) -> (logp_BxN, values_BxN, ref_logp_BxN)`` over groups of ``rows``."""
    def fn(trainable, frozen, ids_BxS, mask_BxS):
        return policy.experience(pspec, trainable, frozen, ids_BxS, mask_BxS, T, rows)
    return _experience_program("experience", fn, (lay.batch(2),) * 3, lay, pspec, st, B, T, N, layout)


def _update_fn(pspec: policy.PolicySpec, pcfg: ppo.PPOConfig, T: int):
    """Advantages (trl's pre-epoch maths), the PPO epochs, and the KL controller."""
    def forward(trainable, mb, rng, frozen):
        return policy.policy_outputs(pspec, trainable, frozen, mb["ids"], mb["attn"], T, rng)
    update = ppo.make_update_step(forward, ppo.make_optimizer(pcfg), pcfg)

    def fn(state, frozen, exp, score_B, ids_BxS, attn_BxS, mask_BxN, rng):
        old_logp, values, ref_logp = exp
        batch, moments, pre = ppo.prepare_batch(old_logp, ref_logp, values, score_B, mask_BxN, state["moments"],
                                                state["kl"], pcfg)
        batch = {**batch, "ids": ids_BxS, "attn": attn_BxS}
        trainable, opt_state, stats = update(state["trainable"], state["opt_state"], batch, rng, frozen)
        kl = ppo.update_kl_coef(state["kl"], pre["objective/kl"], pcfg)
        new = {**state, "trainable": trainable, "opt_state": opt_state, "moments": moments, "kl": kl,
               "step": state["step"] + 1}
        return new, {**pre, **stats}
    return fn


def _update_program(name: str, fn, takes: tuple[bool, ...], lay: Layout, pspec: policy.PolicySpec,
                    st: StateLayout, B: int, T: int, N: int, layout: str) -> Program:
    """``fn(state, frozen, exp, score_B, ids_BxS, attn_BxS, mask_BxN, rng) -> (state, stats)``, jitted with the
    state donated and the stats replicated. ``exp`` holds a batch-sharded float32 ``[B, N]`` array where
    ``takes`` is True and None where it is False (an experience array the method does not compute)."""
    frozen, frozen_sh = _weights(lay, pspec.cfg, layout)
    b1, b2 = lay.batch(1), lay.batch(2)
    exp_sh = tuple(b2 if t else None for t in takes)
    exp = tuple(jax.ShapeDtypeStruct((B, N), jnp.float32, sharding=b2) if t else None for t in takes)
    in_sh = (st.shardings, frozen_sh, exp_sh, b1, b2, b2, b2, lay.replicated)
    args = (st.target(), frozen, exp, jax.ShapeDtypeStruct((B,), jnp.float32, sharding=b1),
            *_ids_and_mask(lay, B, T + N), _abstract(_ints(B, N), b2), _abstract(_key(), lay.replicated))
    stats = jax.eval_shape(fn, *args)[1]
    out_sh = (st.shardings, jax.tree.map(lambda _: lay.replicated, stats))
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=(0,))
    return Program(name, jitted, args, in_sh, out_sh, (0,))


def build_update(lay: Layout, pspec: policy.PolicySpec, pcfg: ppo.PPOConfig, st: StateLayout, T: int,
                 N: int, layout: str = "stacked") -> Program:
    """``(state, frozen, exp, score_B, ids_BxS, attn_BxS, mask_BxN, rng) -> (state, stats)``; donates the state."""
    return _update_program("update", _update_fn(pspec, pcfg, T), (True, True, True), lay, pspec, st,
                           pcfg.batch_size, T, N, layout)


# --- group methods (GRPO, RLOO): the same programs without values, and no reference pass at beta 0

def build_group_experience(lay: Layout, pspec: policy.PolicySpec, st: StateLayout, B: int, T: int, N: int,
                           rows: int | None, reference: bool, layout: str = "stacked") -> Program:
    """``(trainable, frozen, ids_BxS, mask_BxS) -> (logp_BxN, ref_logp_BxN or None)`` over groups of ``rows``."""
    def fn(trainable, frozen, ids_BxS, mask_BxS):
        return policy.group_experience(pspec, trainable, frozen, ids_BxS, mask_BxS, T, rows, reference)
    out_sh = (lay.batch(2), lay.batch(2) if reference else None)
    return _experience_program("group_experience", fn, out_sh, lay, pspec, st, B, T, N, layout)


def _group_update_fn(pspec: policy.PolicySpec, pcfg: ppo.PPOConfig, gcfg: grpo.GroupConfig, T: int):
    """Advantages over whole groups (the batch is global inside jit, so a group spread over devices or hosts is
    one group), then the GRPO / RLOO passes."""
    def forward(trainable, mb, rng, frozen):
        return policy.policy_outputs(pspec, trainable, frozen, mb["ids"], mb["attn"], T, rng)
    update = grpo.make_update_step(forward, ppo.make_optimizer(pcfg), gcfg)

    def fn(state, frozen, exp, score_B, ids_BxS, attn_BxS, mask_BxN, rng):
        old_logp, ref_logp = exp
        batch, pre = grpo.prepare_batch(old_logp, ref_logp, score_B, mask_BxN, gcfg)
        batch = {**batch, "ids": ids_BxS, "attn": attn_BxS}
        trainable, opt_state, stats = update(state["trainable"], state["opt_state"], batch, rng, frozen)
        new = {**state, "trainable": trainable, "opt_state": opt_state, "step": state["step"] + 1}
        return new, {**pre, **stats}
    return fn


def build_group_update(lay: Layout, pspec: policy.PolicySpec, pcfg: ppo.PPOConfig, gcfg: grpo.GroupConfig,
                       st: StateLayout, T: int, N: int, layout: str = "stacked") -> Program:
    """``(state, frozen, (logp, ref_logp or None), score_B, ids_BxS, attn_BxS, mask_BxN, rng) -> (state, stats)``;
    donates the state."""
    return _update_program("group_update", _group_update_fn(pspec, pcfg, gcfg, T), (True, gcfg.needs_reference),
                           lay, pspec, st, pcfg.batch_size, T, N, layout)


# =================================================================================== reward models

def build_relevance(lay: Layout, cfg: bert.BertConfig, R: int, L: int, dtype=jnp.float32, precision=None) -> Program:
    """``(params, ids_RxL, mask_RxL) -> f32[R, D]``: mean-pooled relevance embeddings of padded rows."""
    abstract, specs = mesh_lib.abstract_params(bert.init_fn(cfg, dtype))
    params_sh = lay.tree(specs)
    b2 = lay.batch(2)
    axes = b2.spec[0]

    def fn(params, ids, mask):
        return bert.embed(params, cfg, ids, mask, precision=precision, mesh=lay.mesh, batch_axes=axes)
    in_sh, out_sh = (params_sh, b2, b2), b2
    args = (_abstract(abstract, params_sh), _abstract(_ints(R, L), b2), _abstract(_ints(R, L), b2))
    return Program("relevance", jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh), args, in_sh, out_sh)


def build_gold(lay: Layout, cfg: llama.LlamaConfig, pooling: str, G: int, L: int, layout: str = "stacked") -> Program:
    """``(params, ids_GxL, mask_GxL) -> f32[G]``: gold-RM scores (``models.sequence_scores``, first label,
    ``pooling``: its ``layout``, 'starling' or 'seq_cls')."""
    from rre_jax.models import sequence_scores
    params, params_sh = _weights(lay, cfg, layout, head="score")
    b2 = lay.batch(2)
    in_sh, out_sh = (params_sh, b2, b2), lay.batch(1)

    def fn(params, ids, mask):
        return sequence_scores(cfg, params, ids, mask, layout=pooling)[:, 0]
    args = (params, *_ids_and_mask(lay, G, L))
    return Program("gold", jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh), args, in_sh, out_sh)


# =================================================================================== a run's programs

class RunPrograms:
    """The programs a training run calls, built on first use and compiled ahead of their first call
    (``compiled.AheadOfTime``): one executable per program and prompt bucket ``T``.

    Inputs are brought to each program's input shardings before the call (a no-op when they already are), so an
    array laid out differently by an earlier op never costs a recompilation.
    """

    def __init__(self, mesh, rules, pspec: policy.PolicySpec, pcfg: ppo.PPOConfig, frozen, *, eos_id: int,
                 pad_id: int, experience_rows: int | None = None):
        self.layout = Layout(mesh, rules)
        self.pspec, self.pcfg, self.rows = pspec, pcfg, experience_rows
        self.eos_id, self.pad_id = eos_id, pad_id
        self.frozen_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
        self.state = state_layout(self.layout, pspec, pcfg, self.frozen_abstract)
        self._programs: dict = {}

    def _get(self, key, build: Callable[[], Program]):
        if key not in self._programs:
            prog = build()
            self._programs[key] = compiled.AheadOfTime(prog.jitted, prog.in_shardings)
        return self._programs[key]

    def init_state(self, frozen, rng):
        return self._get(("init",), lambda: build_init(self.layout, self.pspec, self.pcfg,
                                                       self.frozen_abstract))(frozen, rng)

    def sampler(self, scfg: sampling.SamplingConfig, group: int = 1) -> Callable:
        """``(params, ids_BxT, mask_BxT, rng, lora) -> Rollout`` with a fresh sharded KV cache per call; ``group``:
        rows come in groups of that many copies of one prompt (prefilled once)."""
        lora_cfg = self.pspec.lora_cfg if self.pspec.mode == "lora" else None

        def call(params, ids_BxT, mask_BxT, rng, lora):
            B, T = ids_BxT.shape
            cache = self._get(("cache", B, T + scfg.max_new_tokens), lambda: build_cache(
                self.layout, self.pspec.cfg, B, T + scfg.max_new_tokens))()
            exe = self._get(("sampler", scfg, group), lambda: build_sampler(
                self.layout, self.pspec.cfg, scfg, self.eos_id, self.pad_id, lora_cfg, B, T, group=group))
            return exe(params, ids_BxT, mask_BxT, rng, lora, cache)[0]
        return call

    def experience(self, T: int, N: int):
        return self._get(("experience", T), lambda: build_experience(self.layout, self.pspec, self.state,
                                                                     self.pcfg.batch_size, T, N, self.rows))

    def update(self, T: int, N: int):
        return self._get(("update", T), lambda: build_update(self.layout, self.pspec, self.pcfg, self.state, T, N))

    def group_experience(self, T: int, N: int, reference: bool):
        return self._get(("group_experience", T, reference), lambda: build_group_experience(
            self.layout, self.pspec, self.state, self.pcfg.batch_size, T, N, self.rows, reference))

    def group_update(self, T: int, N: int, gcfg: grpo.GroupConfig):
        return self._get(("group_update", T, gcfg), lambda: build_group_update(
            self.layout, self.pspec, self.pcfg, gcfg, self.state, T, N))

    def compiled_counts(self) -> dict:
        """Executables per program (a rise after warm-up means a recompilation)."""
        out: dict = {}
        for key, prog in self._programs.items():
            out[key[0]] = out.get(key[0], 0) + prog._cache_size()
        return out
