"""A sweep's programs (``rre_jax.sweep``): the runs of K members as one set of jitted programs over one trunk.

Every member's train state -- LoRA adapters, value head, Adam state, the algorithm's entries (PPO: score moments,
KL controller), RNG key, step -- is the run's state (``programs.state_layout``) with a leading member axis ``K``:
each leaf's sharding is the run's with that axis prepended, unsplit (a member's adapters and optimizer state are
megabytes; every device holds every member's, as a run's devices hold its replicated leaves), and each member's
rows split over the batch axes as a run's batch is. Each program is the run's function (``rre_jax.programs``'
builders' functions) mapped over that axis, with the trunk, the prompts and the tables not mapped:

* ``init``        ``vmap`` of the run's init over the members' keys;
* ``cache``, ``sampler``  the K x B rows of every member decode in one loop (``rollout.sample(members=K)``): one
                  pass over the trunk's weights per decode step for all of them, the adapters' matmuls batched
                  einsums over the member axis (no gather, no sort);
* ``features``    LI, RP and the cut of every member's responses, one call;
* ``experience``  the members' log-probs and values and the reference pass (adapters off) over all K x B rows;
* ``update``      each member's own algorithm step (its score normalisation, KL controller, advantages, losses,
                  optimizer and RNG stream), ``update_chunk`` members per pass: ``lax.map`` over the members
                  (one after another, one member's activations alive at a time) or ``vmap`` over chunks of them;
                  a member whose batch is skipped (non-finite rewards) keeps its state and counts the step;
* ``split``, ``join``  the stacked state into the members' states (their checkpoints, which are runs' states)
                  and back (a resume).

``relevance`` and ``gold`` are the run's families: every member's texts are scored in the same calls.
``SweepPrograms`` lists them all the way ``programs.RunPrograms`` lists a run's -- the same names, so
``--compile_only`` (``SweepPrograms.catalogue``), the memory plan and the compile counts read a sweep alike.

Shapes: ``K`` members, ``B`` rows of one member's batch, ``T`` prompt bucket, ``N`` new tokens, ``S = T + N``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from rre_jax import algorithms, backend, features, policy, programs, rollout, sampling
from rre_jax.models import llama
from rre_jax.programs import Layout, Program, StateLayout


def stacked(sharding: NamedSharding) -> NamedSharding:
    """``sharding`` with a leading, unsplit member axis."""
    return NamedSharding(sharding.mesh, P(None, *sharding.spec))


def _stacked_abstract(tree, K: int, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct((K, *x.shape), x.dtype, sharding=s), tree, shardings)


def stacked_state(st: StateLayout, K: int) -> StateLayout:
    """The members' state: the run's ``st`` with a leading member axis on every leaf."""
    shardings = jax.tree.map(stacked, st.shardings)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct((K, *x.shape), x.dtype), st.abstract)
    return StateLayout(abstract, shardings)


def member_cache_specs(cfg: llama.LlamaConfig) -> dict:
    """Logical specs of ``rollout.member_cache``: the run's cache (``programs.cache_specs``) with a leading member
    axis on every buffer, one write index."""
    return {k: v if k == "index" else jax.tree.map(lambda s: P(None, *s), v,
                                                   is_leaf=lambda s: isinstance(s, P))
            for k, v in programs.cache_specs(cfg).items()}


def _keys(lay: Layout, K: int):
    return jax.ShapeDtypeStruct((K,), programs._key().dtype, sharding=lay.replicated)


# =================================================================================== builders

def build_init(lay: Layout, pspec, algo: algorithms.Algorithm, pcfg, frozen, K: int) -> Program:
    """``(frozen, keys_K) -> state``: every member's fresh state, each from its own key, created sharded."""
    st = stacked_state(programs.state_layout(lay, pspec, algo, pcfg, frozen), K)
    frozen_sh = lay.tree(programs.llama_params(pspec.cfg)[1])
    in_sh = (frozen_sh, lay.replicated)
    fn = jax.vmap(programs._init_state_fn(pspec, algo, pcfg), in_axes=(None, 0))
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=st.shardings)
    return Program("init", jitted, (programs._abstract(frozen, frozen_sh), _keys(lay, K)), in_sh, st.shardings)


def build_cache(lay: Layout, cfg: llama.LlamaConfig, K: int, B: int, length: int) -> Program:
    """``() -> empty member KV cache`` (K x B rows, ``length`` slots), created in its shardings."""
    out_sh = lay.tree(member_cache_specs(cfg))
    fn = jax.jit(lambda: rollout.member_cache(cfg, K, B, length), out_shardings=out_sh)
    return Program("cache", fn, (), (), out_sh)


def _stacked_adapters(lay: Layout, cfg, lora_cfg, K: int):
    lora, lora_sh = programs._adapters(lay, cfg, lora_cfg)
    sh = jax.tree.map(stacked, lora_sh)
    return _stacked_abstract(lora, K, sh), sh


def build_sampler(lay: Layout, cfg: llama.LlamaConfig, scfg: sampling.SamplingConfig, eos_id: int, pad_id: int,
                  lora_cfg, K: int, B: int, T: int, layout: str = "stacked", group: int = 1,
                  name: str = "sampler") -> Program:
    """``(params, ids_BxT, mask_BxT, keys_K, lora_K, cache) -> (Rollout [K, B, ...], cache)``: every member
    samples the prompts with its adapters and key (``rollout.sample(members=K)``); the cache is donated."""
    params, params_sh = programs._weights(lay, cfg, layout)
    lora, lora_sh = _stacked_adapters(lay, cfg, lora_cfg, K)
    cache_sh = lay.tree(member_cache_specs(cfg))
    kb2, kb1 = stacked(lay.batch(2)), stacked(lay.batch(1))
    in_sh = (params_sh, lay.batch(2), lay.batch(2), lay.replicated, lora_sh, cache_sh)
    out_sh = (rollout.Rollout(kb2, kb2, kb2, kb1, lay.replicated), cache_sh)
    late = not backend.on_xla_cpu(lay.mesh.devices.flat[0].platform)  # the cache's writes: see llama.Llama

    def fn(params, ids_BxT, mask_BxT, keys_K, lora, cache):
        return rollout.sample(cfg, params, ids_BxT, mask_BxT, keys_K, scfg, eos_id=eos_id, pad_id=pad_id, lora=lora,
                              lora_cfg=lora_cfg, cache=cache, mesh=lay.mesh, rules=lay.rules, return_cache=True,
                              group=group, members=K, write_cache_last=late)
    cache = jax.eval_shape(lambda: rollout.member_cache(cfg, K, B, T + scfg.max_new_tokens))
    args = (params, *programs._ids_and_mask(lay, B, T), _keys(lay, K), lora, programs._abstract(cache, cache_sh))
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=(5,))
    return Program(name, jitted, args, in_sh, out_sh, (5,))


def build_features(lay: Layout, vocab: int, token_bytes: int, stop_strings: tuple[str, ...], K: int, B: int,
                   N: int) -> Program:
    """``(tables, ids_KxBxN, mask_KxBxN) -> features.Features [K, B]``: LI, RP and the cut of every member's
    responses in one call (``features.text_features`` per member)."""
    rep = lay.replicated
    split = B % lay.batch_shards == 0
    b1, b2 = (stacked(lay.batch(1)), stacked(lay.batch(2))) if split else (rep, rep)
    tables = features.table_shapes(vocab, token_bytes)
    tables_sh = jax.tree.map(lambda _: rep, tables)

    def fn(tables, ids_KxBxN, mask_KxBxN):
        return jax.vmap(lambda i, m: features.text_features(i, m, tables, stop_strings))(ids_KxBxN, mask_KxBxN)
    in_sh = (tables_sh, b2, b2)
    out_sh = features.Features(*(b1,) * len(features.Features._fields))
    ints = lambda: jax.ShapeDtypeStruct((K, B, N), jnp.int32, sharding=b2)  # noqa: E731
    args = (programs._abstract(tables, tables_sh), ints(), ints())
    return Program("features", jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh), args, in_sh, out_sh)


def _member_rows(lay: Layout, K: int, B: int, S: int):
    """Abstract int32 ``(ids_KxBxS, mask_KxBxS)``, each member's rows batch-sharded."""
    kb2 = stacked(lay.batch(2))
    return tuple(jax.ShapeDtypeStruct((K, B, S), jnp.int32, sharding=kb2) for _ in range(2))


def _experience_shardings(lay: Layout, algo: algorithms.Algorithm) -> policy.Experience:
    return jax.tree.map(stacked, programs._experience_shardings(lay, algo))


def build_experience(lay: Layout, pspec: policy.PolicySpec, algo: algorithms.Algorithm, st: StateLayout, K: int,
                     B: int, T: int, N: int, rows: int | None, layout: str = "stacked") -> Program:
    """``(trainable_K, frozen, ids_KxBxS, mask_KxBxS) -> policy.Experience [K, B, N]``: each member's frozen
    passes; the reference pass (adapters off) runs once over all K x B rows."""
    def one(trainable, frozen, ids_BxS, mask_BxS):
        return policy.experience(pspec, trainable, frozen, ids_BxS, mask_BxS, T, rows, values=algo.uses_values,
                                 reference=algo.uses_reference)
    fn = jax.vmap(one, in_axes=(0, None, 0, 0))
    frozen, frozen_sh = programs._weights(lay, pspec.cfg, layout)
    kst = stacked_state(st, K)
    in_sh = (kst.shardings["trainable"], frozen_sh, stacked(lay.batch(2)), stacked(lay.batch(2)))
    out_sh = _experience_shardings(lay, algo)
    args = (kst.target()["trainable"], frozen, *_member_rows(lay, K, B, T + N))
    return Program("experience", jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh), args, in_sh, out_sh)


def _update_fn(pspec: policy.PolicySpec, algo: algorithms.Algorithm, T: int, chunk: int):
    """The run's update (``programs._update_fn``) of every member, ``chunk`` at a time; ``live_K``: members whose
    batch is trained (the others keep their state and count the step, as a run that skips a batch)."""
    one = programs._update_fn(pspec, algo, T)

    def member(frozen, xs):
        state, exp, score_B, ids_BxS, attn_BxS, mask_BxN, rng, live = xs
        new, stats = one(state, frozen, exp, score_B, ids_BxS, attn_BxS, mask_BxN, rng)
        new = jax.tree.map(lambda n, o: jnp.where(live, n, o), new, state)
        return {**new, "step": state["step"] + 1}, stats

    def fn(state, frozen, exp, score_KxB, ids_KxBxS, attn_KxBxS, mask_KxBxN, rng_K, live_K):
        xs = (state, exp, score_KxB, ids_KxBxS, attn_KxBxS, mask_KxBxN, rng_K, live_K)
        if chunk == 1:  # one member after another: the run's own program, once per member
            return jax.lax.map(lambda x: member(frozen, x), xs)
        return jax.lax.map(lambda x: member(frozen, x), xs, batch_size=chunk)
    return fn


def build_update(lay: Layout, pspec: policy.PolicySpec, algo: algorithms.Algorithm, st: StateLayout, K: int, B: int,
                 T: int, N: int, chunk: int, layout: str = "stacked") -> Program:
    """``(state, frozen, exp, score_KxB, ids_KxBxS, attn_KxBxS, mask_KxBxN, keys_K, live_K) -> (state, stats
    [K])``: every member's update; donates the state."""
    fn = _update_fn(pspec, algo, T, chunk)
    kst = stacked_state(st, K)
    frozen, frozen_sh = programs._weights(lay, pspec.cfg, layout)
    kb1, kb2 = stacked(lay.batch(1)), stacked(lay.batch(2))
    exp_sh = _experience_shardings(lay, algo)
    exp = jax.tree.map(lambda s: jax.ShapeDtypeStruct((K, B, N), jnp.float32, sharding=s), exp_sh)
    in_sh = (kst.shardings, frozen_sh, exp_sh, kb1, kb2, kb2, kb2, lay.replicated, lay.replicated)
    args = (kst.target(), frozen, exp, jax.ShapeDtypeStruct((K, B), jnp.float32, sharding=kb1),
            *_member_rows(lay, K, B, T + N), jax.ShapeDtypeStruct((K, B, N), jnp.int32, sharding=kb2),
            _keys(lay, K), jax.ShapeDtypeStruct((K,), jnp.bool_, sharding=lay.replicated))
    stats = jax.eval_shape(fn, *args)[1]
    out_sh = (kst.shardings, jax.tree.map(lambda _: lay.replicated, stats))
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=(0,))
    return Program("update", jitted, args, in_sh, out_sh, (0,))


def build_split(st: StateLayout, K: int) -> Program:
    """``state -> (member state,) * K``: the members' states in a run's shardings (what each checkpoint holds)."""
    kst = stacked_state(st, K)
    out_sh = (st.shardings,) * K
    fn = jax.jit(lambda s: tuple(jax.tree.map(lambda x, k=k: x[k], s) for k in range(K)),
                 in_shardings=(kst.shardings,), out_shardings=out_sh)
    return Program("split", fn, (kst.target(),), (kst.shardings,), out_sh)


def build_join(st: StateLayout, K: int) -> Program:
    """``*member states -> state``: the members' states (restored runs' states) stacked again."""
    kst = stacked_state(st, K)
    in_sh = (st.shardings,) * K
    fn = jax.jit(lambda *s: jax.tree.map(lambda *x: jnp.stack(x), *s), in_shardings=in_sh,
                 out_shardings=kst.shardings)
    return Program("join", fn, (st.target(),) * K, in_sh, kst.shardings)


# =================================================================================== a sweep's programs

class SweepPrograms(programs.RunPrograms):
    """The one list of a sweep's programs (see the module docstring), built on the members' run programs
    ``base`` (their layout, policy, algorithm, state layout, and the relevance and gold families)."""

    def __init__(self, base: programs.RunPrograms, K: int, update_chunk: int):
        programs.ProgramSet.__init__(self)
        if base.pspec.mode != "lora":
            raise ValueError("a sweep's members are LoRA adapters over one frozen trunk (config.model.train_mode)")
        self.base, self.K, self.chunk = base, int(K), int(update_chunk)
        self.layout, self.pspec, self.algo, self.pcfg, self.rows = base.layout, base.pspec, base.algo, base.pcfg, base.rows
        self.eos_id, self.pad_id, self.frozen_abstract = base.eos_id, base.pad_id, base.frozen_abstract
        self.member_state, self.state = base.state, stacked_state(base.state, K)
        f = base.features
        self.tables = (f.vocab, f.token_bytes, f.stop_strings)
        self.features, self.relevance, self.gold = None, base.relevance, base.gold  # families: scoring over all rows

    def init_state(self, frozen, keys_K):
        return self._get(("init",), lambda: build_init(self.layout, self.pspec, self.algo, self.pcfg,
                                                       self.frozen_abstract, self.K))(frozen, keys_K)

    def sampler(self, scfg: sampling.SamplingConfig, group: int = 1):
        """``(params, ids_BxT, mask_BxT, keys_K, lora_K) -> Rollout [K, B, ...]`` with a fresh member cache."""
        name = "sampler" if group == self.algo.samples_per_prompt else "eval_sampler"

        def call(params, ids_BxT, mask_BxT, keys_K, lora_K):
            B, T = ids_BxT.shape
            length = T + scfg.max_new_tokens
            cache = self._get(("cache", B, length), lambda: build_cache(self.layout, self.pspec.cfg, self.K, B,
                                                                        length))()
            exe = self._get((name, scfg, group, B, T), lambda: build_sampler(
                self.layout, self.pspec.cfg, scfg, self.eos_id, self.pad_id, self.pspec.lora_cfg, self.K, B, T,
                group=group, name=name))
            return exe(params, ids_BxT, mask_BxT, keys_K, lora_K, cache)[0]
        return call

    def text_features(self, tables, tokens_KxBxN, mask_KxBxN):
        K, B, N = tokens_KxBxN.shape
        return self._get(("features", B, N), lambda: build_features(self.layout, *self.tables, K, B, N))(
            tables, tokens_KxBxN, mask_KxBxN)

    def experience(self, T: int, N: int):
        return self._get(("experience", T, N), lambda: build_experience(
            self.layout, self.pspec, self.algo, self.member_state, self.K, self.pcfg.batch_size, T, N, self.rows))

    def update(self, T: int, N: int):
        return self._get(("update", T, N), lambda: build_update(
            self.layout, self.pspec, self.algo, self.member_state, self.K, self.pcfg.batch_size, T, N, self.chunk))

    def split(self, state):
        return self._get(("split",), lambda: build_split(self.member_state, self.K))(state)

    def join(self, *states):
        return self._get(("join",), lambda: build_join(self.member_state, self.K))(*states)

    def catalogue(self, T: int, N: int, scfg: sampling.SamplingConfig, *, dev_eval: bool = True,
                  relevance_shape=None, gold_shape=None) -> dict:
        """``{name: Program}``: every program of the sweep at prompt bucket ``T`` and ``N`` new tokens (what
        ``--compile_only`` compiles; see ``RunPrograms.catalogue``)."""
        B, lay, G, K = self.pcfg.batch_size, self.layout, self.algo.samples_per_prompt, self.K
        cfg, lora_cfg = self.pspec.cfg, self.pspec.lora_cfg
        sampler = lambda group, name: build_sampler(lay, cfg, scfg, self.eos_id, self.pad_id, lora_cfg, K, B, T,  # noqa: E731
                                                    group=group, name=name)
        out = {"init": build_init(lay, self.pspec, self.algo, self.pcfg, self.frozen_abstract, K),
               "cache": build_cache(lay, cfg, K, B, T + N), "sampler": sampler(G, "sampler"),
               **({"eval_sampler": sampler(1, "eval_sampler")} if dev_eval and G > 1 else {}),
               "features": build_features(lay, *self.tables, K, B, N),
               "experience": build_experience(lay, self.pspec, self.algo, self.member_state, K, B, T, N, self.rows),
               "update": build_update(lay, self.pspec, self.algo, self.member_state, K, B, T, N, self.chunk),
               "split": build_split(self.member_state, K), "join": build_join(self.member_state, K)}
        if self.relevance is not None:
            r = self.relevance
            out["relevance"] = (programs.build_relevance_packed(r.layout, r.cfg, relevance_shape, r.windows, r.dtype,
                                                                r.precision) if r.packed else
                                programs.build_relevance(r.layout, r.cfg, *relevance_shape, r.dtype, r.precision,
                                                         r.looped))
        if self.gold is not None:
            out["gold"] = programs.build_gold(self.gold.layout, self.gold.cfg, self.gold.pooling, *gold_shape)
        return out
