"""Every jitted program of a run, built in one place with explicit shardings and donation.

A builder takes the mesh, the logical rules and the static shapes of a run and returns a ``Program``: the
``jax.jit``-ed function with its ``in_shardings`` / ``out_shardings`` (from the models' logical axis names through
``rre_jax.mesh``'s rules), the arguments it donates, and ``args``: the abstract arguments
(``jax.ShapeDtypeStruct`` with their shardings) it is compiled for. The same builders serve training
(``RunPrograms``), evaluation, the benchmarks and ahead-of-time compilation for a TPU topology
(``rre_jax.aot``): nothing here reads a weight or allocates an array.

Programs: ``init`` (the train state, created sharded), ``sampler`` (prefill + decode loop; the KV cache comes in
donated, created sharded by ``cache``), ``experience`` (the frozen passes the algorithm uses: log-probs, values,
reference log-probs), ``update`` (the algorithm's advantages, loss passes and closing step, ``rre_jax.algorithms``;
donates the train state), ``relevance`` (the BERT encoder forward) and ``gold`` (gold-RM scoring).

Shapes: ``B`` rollout rows, ``T`` prompt bucket, ``N`` new tokens, ``S = T + N``, ``R`` relevance rows of ``L``
tokens, ``G`` gold-RM rows of ``Lg`` tokens.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rre_jax import algorithms, features, mesh as mesh_lib, policy, ppo, rollout, sampled_kl, sampling
from rre_jax import backend
from rre_jax.backend import release_host_memory
from rre_jax.models import bert, llama, lora as lora_lib, sequence_scores


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

    @property
    def batch_shards(self) -> int:
        """Devices the ``batch`` axis is split over: a batch holds a multiple of this many rows."""
        axes = self.batch(1).spec[0]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        return math.prod(self.mesh.shape[a] for a in axes)


# =================================================================================== shapes and logical specs

def llama_params(cfg: llama.LlamaConfig, head: str = "lm", layout: str = "stacked"):
    """``(abstract params, logical specs)`` of a Llama (``jax.eval_shape`` of its init) in layer ``layout``
    (``'per_layer'``: one array per layer, the generation layout of ``models.from_pretrained``)."""
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


def _init_state_fn(pspec: policy.PolicySpec, algo: algorithms.Algorithm, pcfg: ppo.PPOConfig):
    """The train state: trainable leaves, Adam's state, the algorithm's own entries, the run's key, the step."""
    def init(frozen, rng):
        trainable = policy.init_trainable(pspec, frozen, rng)
        return {"trainable": trainable, "opt_state": ppo.make_optimizer(pcfg).init(trainable),
                **algo.init_state(), "rng": jax.random.key_data(rng), "step": jnp.zeros((), jnp.int32)}
    return init


def state_layout(lay: Layout, pspec: policy.PolicySpec, algo: algorithms.Algorithm, pcfg: ppo.PPOConfig, frozen,
                 layout: str = "stacked") -> StateLayout:
    """Shardings of the train state: trainable leaves by their logical specs, Adam moments like the leaf they
    track (``optax.tree_map_params``), scalars (step count, the algorithm's entries, rng) replicated."""
    _, base_specs = llama_params(pspec.cfg, layout=layout)
    abstract = jax.eval_shape(_init_state_fn(pspec, algo, pcfg), frozen, _key())
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


def build_init(lay: Layout, pspec, algo: algorithms.Algorithm, pcfg, frozen) -> Program:
    """``(frozen, rng) -> state``, written straight into the state's shardings (never on one device)."""
    st = state_layout(lay, pspec, algo, pcfg, frozen)
    frozen_sh = lay.tree(llama_params(pspec.cfg)[1])
    in_sh = (frozen_sh, lay.replicated)
    fn = jax.jit(_init_state_fn(pspec, algo, pcfg), in_shardings=in_sh, out_shardings=st.shardings)
    return Program("init", fn, (_abstract(frozen, frozen_sh), _abstract(_key(), lay.replicated)), in_sh,
                   st.shardings)


# =================================================================================== rollout

def build_cache(lay: Layout, cfg: llama.LlamaConfig, B: int, length: int) -> Program:
    """``() -> empty KV cache`` of ``B`` rows and ``length`` slots, created in its shardings."""
    out_sh = lay.tree(cache_specs(cfg))
    return Program("cache", jax.jit(lambda: llama.init_cache(cfg, B, length), out_shardings=out_sh), (), (), out_sh)


def build_sampler(lay: Layout, cfg: llama.LlamaConfig, scfg: sampling.SamplingConfig, eos_id: int, pad_id: int,
                  lora_cfg: lora_lib.LoraConfig | None, B: int, T: int, layout: str = "stacked",
                  group: int = 1, name: str = "sampler") -> Program:
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
    return Program(name, jitted, args, in_sh, out_sh, (5,))


# =================================================================================== experience and update

def _experience_shardings(lay: Layout, algo: algorithms.Algorithm) -> policy.Experience:
    """Batch-sharded float32 ``[B, N]`` for each pass the algorithm uses, None for the others."""
    b2 = lay.batch(2)
    return policy.Experience(b2, b2 if algo.uses_values else None, b2 if algo.uses_reference else None)


def build_experience(lay: Layout, pspec: policy.PolicySpec, algo: algorithms.Algorithm, st: StateLayout, B: int,
                     T: int, N: int, rows: int | None, layout: str = "stacked") -> Program:
    """``(trainable, frozen, ids_BxS, mask_BxS) -> policy.Experience`` over groups of ``rows``: the passes
    ``algo`` uses (log-probs; values; reference log-probs), frozen for the whole update."""
    def fn(trainable, frozen, ids_BxS, mask_BxS):
        return policy.experience(pspec, trainable, frozen, ids_BxS, mask_BxS, T, rows, values=algo.uses_values,
                                 reference=algo.uses_reference)
    frozen, frozen_sh = _weights(lay, pspec.cfg, layout)
    in_sh = (st.shardings["trainable"], frozen_sh, lay.batch(2), lay.batch(2))
    out_sh = _experience_shardings(lay, algo)
    args = (st.target()["trainable"], frozen, *_ids_and_mask(lay, B, T + N))
    return Program("experience", jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh), args, in_sh, out_sh)


def _update_fn(pspec: policy.PolicySpec, algo: algorithms.Algorithm, T: int):
    """The algorithm's once-per-batch maths on the frozen experience, its update, then its closing step."""
    def forward(trainable, mb, rng, frozen):
        return policy.policy_outputs(pspec, trainable, frozen, mb["ids"], mb["attn"], T, rng)
    update = algo.make_update(forward)

    def fn(state, frozen, exp, score_B, ids_BxS, attn_BxS, mask_BxN, rng):
        batch, entries, pre = algo.prepare(exp, score_B, mask_BxN, state)
        batch = {**batch, "ids": ids_BxS, "attn": attn_BxS}
        trainable, opt_state, stats = update(state["trainable"], state["opt_state"], batch, rng, frozen)
        new = {**state, **entries, "trainable": trainable, "opt_state": opt_state, "step": state["step"] + 1}
        return {**new, **algo.finish(new, pre)}, {**pre, **stats}
    return fn


def build_update(lay: Layout, pspec: policy.PolicySpec, algo: algorithms.Algorithm, st: StateLayout, B: int,
                 T: int, N: int, layout: str = "stacked") -> Program:
    """``(state, frozen, exp, score_B, ids_BxS, attn_BxS, mask_BxN, rng) -> (state, stats)``: the algorithm's
    update of one rollout batch; donates the state, returns the stats replicated."""
    fn = _update_fn(pspec, algo, T)
    frozen, frozen_sh = _weights(lay, pspec.cfg, layout)
    b1, b2 = lay.batch(1), lay.batch(2)
    exp_sh = _experience_shardings(lay, algo)
    exp = jax.tree.map(lambda s: jax.ShapeDtypeStruct((B, N), jnp.float32, sharding=s), exp_sh)
    in_sh = (st.shardings, frozen_sh, exp_sh, b1, b2, b2, b2, lay.replicated)
    args = (st.target(), frozen, exp, jax.ShapeDtypeStruct((B,), jnp.float32, sharding=b1),
            *_ids_and_mask(lay, B, T + N), _abstract(_ints(B, N), b2), _abstract(_key(), lay.replicated))
    stats = jax.eval_shape(fn, *args)[1]
    out_sh = (st.shardings, jax.tree.map(lambda _: lay.replicated, stats))
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=(0,))
    return Program("update", jitted, args, in_sh, out_sh, (0,))


# =================================================================================== reward models

def build_relevance(lay: Layout, cfg: bert.BertConfig, R: int, L: int, dtype=jnp.float32, precision=None,
                    looped: bool = False) -> Program:
    """``(params, ids_RxL, mask_RxL) -> f32[R, D]``: mean-pooled relevance embeddings of padded rows, rows split
    over the batch axes (``looped``: XLA:CPU's attention layout, ``bert.attention``)."""
    abstract, specs = mesh_lib.abstract_params(bert.init_fn(cfg, dtype))
    params_sh = lay.tree(specs)
    b2 = lay.batch(2)
    axes = b2.spec[0]

    def fn(params, ids, mask):
        return bert.embed(params, cfg, ids, mask, precision=precision, mesh=lay.mesh, batch_axes=axes,
                          looped_attention=looped)
    in_sh, out_sh = (params_sh, b2, b2), b2
    args = (_abstract(abstract, params_sh), _abstract(_ints(R, L), b2), _abstract(_ints(R, L), b2))
    return Program("relevance", jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh), args, in_sh, out_sh)


def build_relevance_packed(lay: Layout, cfg: bert.BertConfig, n: int, windows: tuple[int, ...], dtype=jnp.float32,
                           precision=None) -> Program:
    """``(params, ids_N, positions_N, segments_N, offsets_S, lengths_S, bounds) -> f32[S, D]``: the embeddings of
    texts packed one after another in a stream of ``n`` tokens (``bert.embed_packed``; one device: the layout
    XLA:CPU runs fastest), everything replicated on the layout's mesh."""
    abstract, specs = mesh_lib.abstract_params(bert.init_fn(cfg, dtype))
    params_sh = lay.tree(specs)
    rep = lay.replicated
    stream = tuple(_abstract(_ints(n), rep) for _ in range(5)) + (_abstract(_ints(len(windows) + 1), rep),)

    def fn(params, *arrays):
        return bert.embed_packed(params, cfg, *arrays, windows=windows, precision=precision)
    in_sh, out_sh = (params_sh,) + (rep,) * 6, rep
    args = (_abstract(abstract, params_sh),) + stream
    return Program("relevance", jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh), args, in_sh, out_sh)


def build_gold(lay: Layout, cfg: llama.LlamaConfig, pooling: str, G: int, L: int, layout: str = "stacked") -> Program:
    """``(params, ids_GxL, mask_GxL) -> f32[G]``: gold-RM scores (``models.sequence_scores``, first label,
    ``pooling``: its ``layout``, 'starling' or 'seq_cls')."""
    params, params_sh = _weights(lay, cfg, layout, head="score")
    b2 = lay.batch(2)
    in_sh, out_sh = (params_sh, b2, b2), lay.batch(1)

    def fn(params, ids, mask):
        return sequence_scores(cfg, params, ids, mask, layout=pooling)[:, 0]
    args = (params, *_ids_and_mask(lay, G, L))
    return Program("gold", jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh), args, in_sh, out_sh)


def build_features(lay: Layout, vocab: int, token_bytes: int, stop_strings: tuple[str, ...], B: int, N: int,
                   max_bytes: int | None = None, total_bytes: int | None = None) -> Program:
    """``(tables, ids_BxN, mask_BxN) -> features.Features``: LI, RP and the stop-string cut of ``B`` responses of
    ``N`` tokens (``features.text_features``: the responses are packed into one byte stream, so the rows meet
    on every device). Rows and results are batch-sharded when ``B`` splits over the batch shards (a rollout),
    replicated otherwise (a few stored texts). ``vocab`` x ``token_bytes``: the tokenizer's byte table."""
    rep = lay.replicated
    split = B % lay.batch_shards == 0
    b1, b2 = (lay.batch(1), lay.batch(2)) if split else (rep, rep)
    tables = features.table_shapes(vocab, token_bytes)
    tables_sh = jax.tree.map(lambda _: rep, tables)

    def fn(tables, ids_BxN, mask_BxN):
        return features.text_features(ids_BxN, mask_BxN, tables, stop_strings, max_bytes, total_bytes)
    in_sh = (tables_sh, b2, b2)
    out_sh = features.Features(*(b1,) * len(features.Features._fields))
    args = (_abstract(tables, tables_sh), _abstract(_ints(B, N), b2), _abstract(_ints(B, N), b2))
    return Program("features", jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh), args, in_sh, out_sh)


def build_log_ratio(lay: Layout, pspec: policy.PolicySpec, st: StateLayout, scfg: sampling.SamplingConfig, B: int,
                    T: int, N: int, layout: str = "stacked") -> Program:
    """``(trainable, frozen, ids_BxS, mask_BxS) -> f32[B]``: each response's summed log pi - log pi_ref under the
    sampling settings ``scfg`` (``sampled_kl``: the RL curves' distance, scored by ``rre-eval``)."""
    def fn(trainable, frozen, ids_BxS, mask_BxS):
        return sampled_kl.log_ratio(pspec, trainable, frozen, ids_BxS, mask_BxS, T, scfg)
    frozen, frozen_sh = _weights(lay, pspec.cfg, layout)
    in_sh = (st.shardings["trainable"], frozen_sh, lay.batch(2), lay.batch(2))
    args = (st.target()["trainable"], frozen, *_ids_and_mask(lay, B, T + N))
    out_sh = lay.batch(1)
    return Program("log_ratio", jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh), args, in_sh, out_sh)


# =================================================================================== compiled before the first call

# XLA's compiler (LLVM on CPU) allocates hundreds of MB while it builds a large program such as the PPO update,
# and glibc keeps those freed pages in its arenas. A plain ``jax.jit`` call compiles and then runs in one go, so
# the program's own buffers land on top of the compiler's leftovers and the process peaks at both together.
# ``AheadOfTime`` compiles a signature first (``lower(...).compile()``), calls ``backend.release_host_memory`` and
# only then runs it: the peak becomes the larger of the two, not their sum (figures: docs/benchmark_results.md).

def _signature(x):
    """What an executable is specialised on: shape, dtype, weak type and placement of a device array; shape
    and dtype (or only the type, for a Python scalar) of anything else."""
    if isinstance(x, jax.Array):
        return (x.shape, x.dtype, getattr(x, "weak_type", False), x.sharding)
    return (type(x), getattr(x, "shape", None), getattr(x, "dtype", None))


def _placed(sharding, x):
    """``x`` (a leaf or a subtree) put on ``sharding``: a no-op where it already is. On a mesh that spans
    processes only global arrays are moved; a host value (a key or array every host made alike) goes in as is, and
    the executable places each host's copy on that host's devices, as ``jax.jit`` does."""
    if sharding is None:
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    def one(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and leaf.sharding != sharding:
            return jax.device_put(leaf, sharding)
        return leaf
    return jax.tree.map(one, x)


class AheadOfTime:
    """A ``jax.jit``-ed function, compiled once per input signature (tree, shapes, dtypes, shardings) before
    it runs; calls then go straight to the executable. ``_cache_size()`` counts the executables (as
    ``jax.jit``'s does), so a recompilation check reads the same.

    ``in_shardings`` (those the function was jitted with): arguments are first put there (``jax.device_put``,
    a no-op for an array already in place), so an input laid out otherwise by an earlier op is resharded
    instead of rejected by the executable, and never compiles a second executable."""

    def __init__(self, jitted, in_shardings=None):
        self.jitted = jitted
        self.in_shardings = in_shardings
        self._executables: dict = {}

    def __call__(self, *args):
        if self.in_shardings is not None:
            args = jax.tree.map(_placed, self.in_shardings, args,
                                is_leaf=lambda s: s is None or isinstance(s, jax.sharding.Sharding))
        leaves, tree = jax.tree.flatten(args)
        key = (tree, tuple(map(_signature, leaves)))
        exe = self._executables.get(key)
        if exe is None:
            exe = self._executables[key] = self.jitted.lower(*args).compile()
            release_host_memory()
        return exe(*args)

    def _cache_size(self) -> int:
        return len(self._executables)


# =================================================================================== a run's programs

class ProgramSet:
    """Executables of a family of programs: one per key, compiled ahead of its first call
    (``AheadOfTime``), each kept with the `Program` it was built from (``programs()``).

    Inputs are brought to each program's input shardings before the call (a no-op when they already are), so an
    array laid out differently by an earlier op never costs a recompilation."""

    def __init__(self):
        self._exes: dict = {}
        self._built: dict = {}

    def _get(self, key, build: Callable[[], Program]):
        if key not in self._exes:
            prog = build()
            self._built[key] = prog
            self._exes[key] = AheadOfTime(prog.jitted, prog.in_shardings)
        return self._exes[key]

    def programs(self) -> dict:
        """``{key: Program}`` of every program built so far."""
        return dict(self._built)

    def executables(self) -> dict:
        """``{key: AheadOfTime}`` of every program built so far."""
        return dict(self._exes)

    def compiled_counts(self) -> dict:
        """Executables per program name (a rise after warm-up means a recompilation)."""
        out: dict = {}
        for key, exe in self._exes.items():
            out[key[0]] = out.get(key[0], 0) + exe._cache_size()
        return out


class FeaturePrograms(ProgramSet):
    """The white-box features of one tokenizer's byte table (``vocab`` x ``token_bytes``) and stop strings."""

    def __init__(self, lay: Layout, vocab: int, token_bytes: int, stop_strings: tuple[str, ...]):
        super().__init__()
        self.layout, self.vocab, self.token_bytes, self.stop_strings = lay, vocab, token_bytes, tuple(stop_strings)

    def features(self, B: int, N: int, max_bytes: int | None = None, total_bytes: int | None = None):
        return self._get(("features", B, N, max_bytes, total_bytes), lambda: build_features(
            self.layout, self.vocab, self.token_bytes, self.stop_strings, B, N, max_bytes, total_bytes))


class RelevancePrograms(ProgramSet):
    """The relevance encoder's forward: ``packed`` streams on one device (XLA:CPU's fastest layout, a text's
    embedding the same bits whatever else is scored) or padded rows split over the layout's batch axes."""

    def __init__(self, lay: Layout, cfg: bert.BertConfig, *, packed: bool, windows: tuple[int, ...],
                 dtype=jnp.float32, precision=None, looped: bool = False):
        super().__init__()
        if packed and lay.mesh.size != 1:
            raise ValueError("relevance: packed streams run on one device; give a one-device layout or use padded "
                             "batches (packed=False)")
        self.layout, self.cfg, self.packed, self.windows = lay, cfg, packed, tuple(windows)
        self.dtype, self.precision, self.looped = dtype, precision, looped

    def stream(self, n: int):
        return self._get(("relevance", "packed", n), lambda: build_relevance_packed(
            self.layout, self.cfg, n, self.windows, self.dtype, self.precision))

    def padded(self, R: int, L: int):
        return self._get(("relevance", "padded", R, L), lambda: build_relevance(
            self.layout, self.cfg, R, L, self.dtype, self.precision, self.looped))


class GoldPrograms(ProgramSet):
    """The gold RM's scoring of ``G`` rows of ``L`` tokens, rows split over the batch axes."""

    def __init__(self, lay: Layout, cfg: llama.LlamaConfig, pooling: str):
        super().__init__()
        self.layout, self.cfg, self.pooling = lay, cfg, pooling

    def score(self, G: int, L: int):
        return self._get(("gold", G, L), lambda: build_gold(self.layout, self.cfg, self.pooling, G, L))


class RunPrograms(ProgramSet):
    """The one list of a run's programs: every program the trainer, the evaluation commands and
    ``--compile_only`` (``rre_jax.aot``) compile for a run comes from here, built from shapes with explicit
    shardings on first use (``catalogue`` builds them all at the run's largest shapes, for the compiler).

    ``init``, ``cache``, ``sampler``, ``experience``, ``update`` (the algorithm's, ``rre_jax.algorithms``) and
    ``log_ratio`` (``rre-eval``'s sampled KL) here; ``features``, ``relevance`` and ``gold`` in the families
    ``self.features``, ``self.relevance`` and ``self.gold`` the reward engine, the relevance encoder and the gold
    RM call (None when the run has no such model).
    """

    def __init__(self, mesh, rules, pspec: policy.PolicySpec, algo: algorithms.Algorithm, pcfg: ppo.PPOConfig,
                 frozen, *, eos_id: int, pad_id: int, experience_rows: int | None = None,
                 features: FeaturePrograms | None = None, relevance: RelevancePrograms | None = None,
                 gold: GoldPrograms | None = None):
        super().__init__()
        self.layout = Layout(mesh, rules)
        self.pspec, self.algo, self.pcfg, self.rows = pspec, algo, pcfg, experience_rows
        self.eos_id, self.pad_id = eos_id, pad_id
        self.frozen_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
        self.state = state_layout(self.layout, pspec, algo, pcfg, self.frozen_abstract)
        self.features, self.relevance, self.gold = features, relevance, gold

    @property
    def _lora_cfg(self):
        return self.pspec.lora_cfg if self.pspec.mode == "lora" else None

    def init_state(self, frozen, rng):
        return self._get(("init",), lambda: build_init(self.layout, self.pspec, self.algo, self.pcfg,
                                                       self.frozen_abstract))(frozen, rng)

    def sampler(self, scfg: sampling.SamplingConfig, group: int = 1) -> Callable:
        """``(params, ids_BxT, mask_BxT, rng, lora) -> Rollout`` with a fresh sharded KV cache per call; ``group``:
        rows come in groups of that many copies of one prompt (prefilled once). The training rollout's grouping
        is ``sampler``; another (a group method's dev eval, ``rre-bon``) is ``eval_sampler``."""
        name = "sampler" if group == self.algo.samples_per_prompt else "eval_sampler"

        def call(params, ids_BxT, mask_BxT, rng, lora):
            B, T = ids_BxT.shape
            cache = self._get(("cache", B, T + scfg.max_new_tokens), lambda: build_cache(
                self.layout, self.pspec.cfg, B, T + scfg.max_new_tokens))()
            exe = self._get((name, scfg, group, B, T), lambda: build_sampler(
                self.layout, self.pspec.cfg, scfg, self.eos_id, self.pad_id, self._lora_cfg, B, T, group=group,
                name=name))
            return exe(params, ids_BxT, mask_BxT, rng, lora, cache)[0]
        return call

    def experience(self, T: int, N: int):
        return self._get(("experience", T, N), lambda: build_experience(
            self.layout, self.pspec, self.algo, self.state, self.pcfg.batch_size, T, N, self.rows))

    def update(self, T: int, N: int):
        return self._get(("update", T, N), lambda: build_update(self.layout, self.pspec, self.algo, self.state,
                                                                self.pcfg.batch_size, T, N))

    def log_ratio(self, scfg: sampling.SamplingConfig, B: int, T: int, N: int):
        return self._get(("log_ratio", scfg, B, T, N), lambda: build_log_ratio(
            self.layout, self.pspec, self.state, scfg, B, T, N))

    def families(self) -> list[ProgramSet]:
        return [self] + [f for f in (self.features, self.relevance, self.gold) if f is not None]

    def programs(self) -> dict:
        """``{key: Program}`` of every program built so far, the families' included."""
        out: dict = {}
        for family in self.families():
            out.update(ProgramSet.programs(family))
        return out

    def executables(self) -> dict:
        """``{key: AheadOfTime}`` of every program built so far, the families' included."""
        out: dict = {}
        for family in self.families():
            out.update(ProgramSet.executables(family))
        return out

    def compiled_counts(self) -> dict:
        out: dict = {}
        for family in self.families():
            for name, n in ProgramSet.compiled_counts(family).items():
                out[name] = out.get(name, 0) + n
        return out

    def catalogue(self, T: int, N: int, scfg: sampling.SamplingConfig, *, dev_eval: bool = True,
                  relevance_shape=None, gold_shape=None) -> dict:
        """``{name: Program}``: every program of the run at prompt bucket ``T`` and ``N`` new tokens, built by
        the builders the run calls (nothing compiled, nothing allocated): what ``--compile_only`` compiles.
        ``dev_eval``: the run samples a dev set (a group method's dev eval then has an ``eval_sampler``: one
        response per prompt). ``relevance_shape`` / ``gold_shape``: the largest batch each scorer runs (a packed
        stream's tokens, or ``(rows, tokens)``)."""
        B, lay, G = self.pcfg.batch_size, self.layout, self.algo.samples_per_prompt
        sampler = lambda group, name: build_sampler(lay, self.pspec.cfg, scfg, self.eos_id, self.pad_id,  # noqa: E731
                                                    self._lora_cfg, B, T, group=group, name=name)
        out = {"init": build_init(lay, self.pspec, self.algo, self.pcfg, self.frozen_abstract),
               "cache": build_cache(lay, self.pspec.cfg, B, T + N), "sampler": sampler(G, "sampler"),
               **({"eval_sampler": sampler(1, "eval_sampler")} if dev_eval and G > 1 else {}),
               "experience": build_experience(lay, self.pspec, self.algo, self.state, B, T, N, self.rows),
               "update": build_update(lay, self.pspec, self.algo, self.state, B, T, N)}
        if self.features is not None:
            f = self.features
            out["features"] = build_features(f.layout, f.vocab, f.token_bytes, f.stop_strings, B, N)
        if self.relevance is not None:
            r = self.relevance
            out["relevance"] = (build_relevance_packed(r.layout, r.cfg, relevance_shape, r.windows, r.dtype,
                                                       r.precision) if r.packed else
                                build_relevance(r.layout, r.cfg, *relevance_shape, r.dtype, r.precision, r.looped))
        if self.gold is not None:
            out["gold"] = build_gold(self.gold.layout, self.gold.cfg, self.gold.pooling, *gold_shape)
        return out
