"""The story of a sweep (``config.sweep``, ``rre_jax.sweep``): ``run(config, workdir)``, read top to bottom.

    validate (every member's config, before anything is written) -> parse the prompt files -> assemble the sweep
    (one mesh, one frozen trunk, one relevance encoder and gold RM, the sweep's programs, one reward engine holding
    every member's reward specs) -> resume every member at the newest step all of them saved, or initialise -> loop:
        rollout of every member's K x B rows + reward (features and relevance over all rows, each member's own
        presets) -> experience (jit) -> every member's update (jit) -> each member's metrics in its workdir
        -> every save_freq: dev eval of every member (gold over all rows) + a checkpoint per member
    -> export every member's policy.

Member ``<preset>-s<seed>`` keeps the workdir of the run it stands for in ``<workdir>/<preset>-s<seed>/``
(``metrics.jsonl``, ``tensorboard/``, ``checkpoints/`` holding a run's state with the member's own config,
``dev_eval/``, ``export/``), so ``rre-eval``, ``rre-bon`` and TensorBoard read it as that run; TensorBoard pointed at
``<workdir>`` overlays the members. ``<workdir>/sweep.json`` lists the members, ``<workdir>/metrics.jsonl`` holds the
sweep's own timings and program counts. No maths here and no program: ``sweep_programs`` builds them, and a
member's metrics, dev eval, checkpoint meta and export are the run's own (``train``), applied to the member's
view of the sweep (`Sweep.view`).

Shapes: ``K`` members, ``B`` rows of one member's batch (``Bl``: this host's share), ``T``, ``N`` as in ``train``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from rre_jax import assemble, checkpoint, host_arrays, metrics as metrics_lib, preemption, rollout, sweep as sweep_lib
from rre_jax import sweep_programs, train, workdir_lock
from rre_jax.data import batching, templates
from rre_jax.errors import UserError
from rre_jax.run_spec import RunSpec, validate

log = logging.getLogger(__name__)


# ======================================================================================= what a sweep holds

@dataclasses.dataclass(frozen=True)
class MemberRun:
    """A member: the run it stands for (its config, validated spec and workdir)."""

    member: sweep_lib.Member
    config: object
    spec: RunSpec
    workdir: str

    @property
    def name(self) -> str:
        return self.member.name


@dataclasses.dataclass
class Sweep:
    """The parts the members share (``run``: mesh, tokenizer, frozen trunk, prompts, reward engine, gold RM), the
    members and the sweep's programs."""

    name: str
    run: assemble.Run
    members: tuple[MemberRun, ...]
    programs: sweep_programs.SweepPrograms

    @property
    def K(self) -> int:
        return len(self.members)

    def view(self, k: int) -> assemble.Run:
        """Member ``k`` as the run it stands for: its config, spec and workdir over the shared parts."""
        m = self.members[k]
        return dataclasses.replace(self.run, config=m.config, spec=m.spec, workdir=m.workdir, programs=self.programs)

    def spec_key(self, k: int, name: str) -> str:
        """The reward engine's name of member ``k``'s spec ``name`` (``proxy`` or ``cf/<preset>``)."""
        return f"{self.members[k].name}/{name}"

    def to_global(self, x):
        """This host's rows ``[K, Bl, ...]`` -> the global member array (each member's rows over the batch axes)."""
        return jax.make_array_from_process_local_data(self._sharding(np.ndim(x)), np.asarray(x))

    def to_local(self, x) -> np.ndarray:
        """A global member array ``[K, B, ...]`` -> this host's rows ``[K, Bl, ...]``, as NumPy."""
        return np.asarray(multihost_utils.global_array_to_host_local_array(x, self.run.mesh, self._spec(x.ndim)))

    def _spec(self, ndim: int):
        return P(None, *host_arrays.batch_spec(self.run.spec.mesh.rules, ndim - 1))

    def _sharding(self, ndim: int):
        return NamedSharding(self.run.mesh, self._spec(ndim))


def members_of(config, spec: RunSpec, workdir: str) -> tuple[MemberRun, ...]:
    """The sweep's members, each with the config and validated spec of the run it stands for."""
    out = []
    for m in spec.sweep.members:
        cfg = sweep_lib.member_config(config, m)
        out.append(MemberRun(m, cfg, validate(cfg, files=False), os.path.join(workdir, m.name)))
    return tuple(out)


def for_training(config, spec: RunSpec, workdir: str, sources: assemble.PromptSources,
                 saved: tuple[dict, str] | None = None) -> Sweep:
    """The sweep's mesh, data, models, programs and reward engine (``assemble.for_training``'s parts, once for
    every member); ``saved``: ``(meta, where)`` of the checkpoint the members resume."""
    members = members_of(config, spec, workdir)
    first = members[0]
    basics = assemble.open_basics(first.config, first.spec, workdir)
    mesh, paths, tokenizer = basics.mesh, basics.paths, basics.tokenizer
    if spec.tiny:
        _share_assets(workdir, members)
    prompts = batching.tokenize_prompts(sources.train, tokenizer, max_prompt_length=spec.data.max_prompt_length)
    log.info("%d training prompts from %s (%d dropped as too long)", len(prompts), sources.train_path,
             len(prompts.dropped))
    train_set = assemble.PromptSet(sources.train, prompts,
                                   assemble.batching_config(spec.data, spec.algorithm.prompts_per_step))
    iterator = assemble.prompt_iterator(prompts, train_set.batching, saved)
    dev = assemble.prompt_set(sources.dev, tokenizer, assemble.batching_config(spec.data, spec.ppo.batch_size))
    gold = assemble.gold_rm(spec, paths, mesh)
    pspec, frozen = assemble.load_policy(config, first.spec, mesh, paths)
    specs = {f"{m.name}/{name}": s for m in members for name, s in
             {"proxy": m.spec.reward, **m.spec.counterfactual}.items()}
    scoring = dataclasses.replace(first.spec, counterfactual=specs)  # one engine: every member's specs
    encoder = assemble.relevance_encoder(scoring, mesh)
    tables = assemble.feature_tables(tokenizer, pspec.cfg.vocab_size)
    progs = assemble.run_programs(first.spec, mesh, pspec, frozen, tokenizer, tables=tables,
                                  stop_strings=spec.scoring.stop_strings, encoder=encoder, gold=gold)
    seeds = {k: m.member.seed for m in members for k in specs if k.startswith(f"{m.name}/")}
    engine = assemble.reward_engine(scoring, tables, sources.train + dev.records, encoder=encoder,
                                    programs=progs.features, seeds=seeds)
    run = assemble.Run(first.config, first.spec, workdir, mesh, tokenizer, dev, pspec, frozen, engine, gold, paths,
                       progs, train_set=train_set, iterator=iterator)
    return Sweep(str(config.name), run, members,
                 sweep_programs.SweepPrograms(progs, len(members), spec.sweep.update_chunk))


def _share_assets(workdir: str, members) -> None:
    """A tiny sweep's members see the assets the sweep built: ``<member>/assets`` links to ``../assets``, so a
    command on a member's workdir (``rre-eval``) loads the trunk the member was trained over instead of building
    its own (the tiny policy is built from ``config.seed``: a member of another seed would build another)."""
    if jax.process_index() != 0 or "://" in str(workdir):
        return
    for m in members:
        link = os.path.join(m.workdir, "assets")
        if not os.path.lexists(link):
            os.makedirs(m.workdir, exist_ok=True)
            os.symlink(os.path.join(os.pardir, "assets"), link)


def init_state(sw: Sweep):
    """Every member's fresh state, each from its own seed (as its run would start), in one program."""
    keys = jnp.stack([jax.random.key(m.member.seed) for m in sw.members])
    return sw.programs.init_state(sw.run.frozen, keys)


# ======================================================================================= the sweep

@workdir_lock.holding("rre-train")  # the sweep's workdir (nests under rre-train's own lock)
def run(config, workdir: str, *, spec: RunSpec | None = None,
        sources: assemble.PromptSources | None = None) -> list[dict]:
    """Train (or resume) a sweep in ``workdir``; returns each member's last metrics. Every member's workdir is
    locked as its run's would be (``workdir_lock``). A resume restores every member at the newest step all of
    them hold intact (`_resume`). SIGTERM: every member saves at one common step and the sweep returns early."""
    spec = spec or validate(config)
    if spec.sweep is None:
        raise ValueError("sweep_run.run: config.sweep.presets is empty; train a single run with train.run")
    sources = sources or assemble.load_prompt_sources(spec)
    members = members_of(config, spec, workdir)
    with contextlib.ExitStack() as held:
        for m in members:
            held.enter_context(workdir_lock.hold(m.workdir, "rre-train"))
        return _train(config, spec, workdir, sources, members)


def _train(config, spec: RunSpec, workdir: str, sources: assemble.PromptSources, members) -> list[dict]:
    ckpts = [checkpoint.CheckpointManager(m.workdir, max_to_keep=spec.train.max_to_keep or None) for m in members]
    steps = _common_steps(ckpts)
    saved = _newest_meta(ckpts[0], steps)
    sw = for_training(config, spec, workdir, sources, saved)
    _write_sweep_file(config, workdir, members)
    writers = [metrics_lib.MetricWriter(m.workdir) for m in members]
    sweep_writer = metrics_lib.MetricWriter(workdir)
    state = init_state(sw) if not steps else _resume(sw, ckpts, steps, (*writers, sweep_writer))
    state, last = _loop(sw, state, ckpts, writers, sweep_writer)
    if spec.train.export_final and _step(state) == spec.train.steps:  # not after a preemption
        for k, member_state in enumerate(sw.programs.split(state)):
            train.export(sw.view(k), member_state, os.path.join(members[k].workdir, "export"))
    for w in (*writers, sweep_writer):
        w.close()
    for c in ckpts:
        c.close()
    return last


def _common_steps(ckpts) -> list[int]:
    """The steps every member saved, newest first; a member's steps beyond the newest of them (a save the sweep
    did not finish for every member) are removed."""
    have = [set(c.all_steps()) for c in ckpts]
    common = set.intersection(*have)
    for c, steps in zip(ckpts, have):
        for s in sorted(steps - common):
            if not common or s > max(common):
                log.warning("removing %s/%d: the other members did not save step %d", c.directory, s, s)
                c.remove(s)
    return sorted(common, reverse=True)


def _newest_meta(ckpt, steps: list[int]) -> tuple[dict, str] | None:
    """``(meta, where)`` of the newest of ``steps`` whose meta reads in ``ckpt`` (the first member's; every member
    saves the same data position), for the prompt iterator; None when there is none."""
    for step in steps:
        try:
            return ckpt.restore_meta(step), f"{ckpt.directory}/{step}"
        except Exception as e:
            if checkpoint.damage_of(e, step, f"{ckpt.directory}/{step}") is None:
                raise
    return None


def _resume(sw: Sweep, ckpts, steps: list[int], writers):
    """Every member's state at the newest of ``steps`` all of them restore intact, stacked (``join``): a damaged
    member's newer step is moved aside (``checkpoints/damaged/``), the others' newer steps are removed, the prompt
    iterator follows that step, and metrics logged after it are dropped."""
    target = sw.programs.member_state.target()
    for step in steps:
        got = [c.restore_checked(step, target) for c in ckpts]
        damaged = [(c, g) for c, g in zip(ckpts, got) if isinstance(g, checkpoint.Damage)]
        if not damaged:
            break
        for c, d in damaged:
            log.warning("%s; moved to %s", d.describe(), c.move_aside(d.step))
    else:
        raise UserError(f"no step that every member of the sweep in {sw.run.workdir} holds intact (the damaged "
                        "ones were moved to checkpoints/damaged/); restore the files from a copy, or start a new "
                        "--workdir")
    for c in ckpts:
        for newer in (s for s in c.all_steps() if s > step):
            c.remove(newer)
    r = sw.run
    r.iterator = assemble.prompt_iterator(r.train_set.prompts, r.train_set.batching,
                                          (got[0][1], f"{ckpts[0].directory}/{step}"))
    for w in writers:
        w.truncate_after(step)
    log.info("resumed %d members from step %d in %s", sw.K, step, sw.run.workdir)
    return sw.programs.join(*(state for state, _ in got))


def _write_sweep_file(config, workdir: str, members) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    payload = {"members": [{"name": m.name, "preset": m.member.preset, "seed": m.member.seed} for m in members],
               "config": json.loads(config.to_json_best_effort())}
    with open(os.path.join(workdir, sweep_lib.SWEEP_FILE), "w") as f:
        json.dump(payload, f, indent=1)


def _step(state) -> int:
    return int(np.asarray(state["step"])[0])  # every member is at the same step


def _loop(sw: Sweep, state, ckpts, writers, sweep_writer):
    """Steps until ``spec.train.steps`` or a preemption; every ``save_freq``: every member's dev eval, then its
    checkpoint. One progress bar for the sweep, each member's proxy beside it."""
    total, save_freq = sw.run.spec.train.steps, sw.run.spec.train.save_freq
    bar = tqdm(total=total, initial=_step(state), desc=f"{sw.name} ({sw.K} members)",
               unit="step", disable=jax.process_index() != 0)
    last: list = [{} for _ in sw.members]
    with preemption.Watch() as watch:
        while _step(state) < total:
            state, last, timing = train_step(sw, state, next(sw.run.iterator))
            step = _step(state)
            for w, row in zip(writers, last):
                w.write(step, row)
            sweep_writer.write(step, timing)
            bar.update(1)
            bar.set_postfix({m.name: f"{row.get('reward/proxy', math.nan):.3f}" for m, row in zip(sw.members, last)})
            preempted = watch.reached(step)  # every host, every step: True on all hosts at the same step
            if step % save_freq == 0 or step == total:
                # Dev eval first: a sweep killed after the saves must not resume without this step's eval.
                for w, row in zip(writers, dev_eval(sw, state, step)):
                    w.write(step, row)
                _save(sw, state, ckpts, step)
            elif preempted:
                _save(sw, state, ckpts, step)
            if preempted:
                log.warning("preempted: saved step %d of every member in %s; the same rre-train command resumes "
                            "from it", step, sw.run.workdir)
                break
    bar.close()
    return state, last


def _save(sw: Sweep, state, ckpts, step: int) -> None:
    """One checkpoint per member: a run's state (``split``) and the meta of the run it stands for."""
    for k, (ckpt, member_state) in enumerate(zip(ckpts, sw.programs.split(state))):
        meta = train.checkpoint_meta(sw.view(k), member_state)
        ckpt.save(step, member_state, {**meta, "sweep": {"member": sw.members[k].name, "workdir": sw.run.workdir}})
    log.info("saved checkpoints for step %d (%d members)", step, sw.K)


# ======================================================================================= one step

def train_step(sw: Sweep, state, batch: batching.Batch):
    """Every member's rollout, reward, frozen passes and update of one batch of prompts: ``(state, [metrics of
    each member], the sweep's timings)``. A member whose rewards are not all finite skips its update (counted),
    the others train."""
    r, sp, K = sw.run, sw.programs, sw.K
    step = _step(state)
    keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, step)))(jax.random.wrap_key_data(state["rng"]))
    algo = r.spec.algorithm
    G = algo.samples_per_prompt  # each prompt sampled G times by every member, a group on consecutive rows
    batch = batching.repeat_prompts(batch, G)
    ids_BxT, mask_BxT = r.to_global(batch.ids_BxT), r.to_global(batch.mask_BxT)
    roll, mask_KxBxN, comps, _, times = sample_and_score(sw, state, ids_BxT, mask_BxT, batch.index_B, keys[:, 0],
                                                         r.spec.sampling, group=G)
    t0 = time.perf_counter()
    (T, N), shared = (ids_BxT.shape[1], roll.tokens_BxN.shape[-1]), (K, *ids_BxT.shape)
    ids_KxBxS = jnp.concatenate([jnp.broadcast_to(ids_BxT, shared), roll.tokens_BxN], -1)
    attn_KxBxS = jnp.concatenate([jnp.broadcast_to(mask_BxT, shared), mask_KxBxN], -1)
    exp = jax.block_until_ready(sp.experience(T, N)(state["trainable"], r.frozen, ids_KxBxS, attn_KxBxS))
    t1 = time.perf_counter()
    scalars = _reward_metrics(sw, comps, mask_KxBxN, roll)
    live = np.array([s.pop("finite") for s in scalars])  # global: every host decides alike
    baseline = r.spec.scoring.baseline
    score_KxB = np.stack([np.where(live[k], comps[k]["proxy"] - baseline, 0.0) for k in range(K)]).astype(np.float32)
    state, stats = sp.update(T, N)(state, r.frozen, exp, sw.to_global(score_KxB), ids_KxBxS, attn_KxBxS, mask_KxBxN,
                                   keys[:, 1], live)
    stats = jax.device_get(stats)
    t2 = time.perf_counter()
    tokens = sum(s["new_tokens"] for s in scalars)
    timing = {**times, "time/experience_s": t1 - t0, "time/update_s": t2 - t1,
              "time/rollout_tokens_per_s": tokens / max(times["time/rollout_s"], 1e-9), **_compile_metrics(sw)}
    return state, [_member_row(sw, state, k, scalars[k], stats, timing, live[k], T) for k in range(K)], timing


def _member_row(sw: Sweep, state, k: int, scalars: dict, stats: dict, timing: dict, live: bool, T: int) -> dict:
    """Member ``k``'s metrics of a step, keyed as its run logs them (the timings are the sweep's)."""
    if not live:
        log.warning("step %d: non-finite rewards of %s; its batch skipped", _step(state), sw.members[k].name)
        return {**scalars, **{t: timing[t] for t in ("time/rollout_s", "time/reward_s")}, "train/skipped_batch": 1.0}
    algo = sw.run.spec.algorithm
    entries = {name: jax.tree.map(lambda x: np.asarray(x)[k], state[name]) for name in algo.init_state()}
    scalars = {**scalars, **{name: float(v[k]) for name, v in stats.items() if np.ndim(v[k]) == 0}}
    scalars.pop("new_tokens")
    return {**scalars, **timing, "train/skipped_batch": 0.0, "objective/kl_coef_next": algo.next_kl_coef(entries),
            "rollout/prompt_bucket": float(T)}


def _reward_metrics(sw: Sweep, comps: list, mask_KxBxN, roll) -> list[dict]:
    """Each member's `train.batch_metrics` (means over its global batch, ``finite``, ``new_tokens``)."""
    n_tok, n_raw = sw.to_local(mask_KxBxN).sum(-1), sw.to_local(roll.mask_BxN).sum(-1)
    steps = np.asarray(roll.steps)
    baseline = sw.run.spec.scoring.baseline
    return [train.batch_metrics(comps[k], n_tok[k], n_raw[k], steps[k], baseline) for k in range(sw.K)]


def _compile_metrics(sw: Sweep) -> dict:
    counts = sw.programs.compiled_counts()
    return {"compile/programs": float(sum(n for k, n in counts.items() if k not in ("relevance", "gold"))),
            **{f"compile/{k}": float(n) for k, n in counts.items()}}


def sample_and_score(sw: Sweep, state, ids_BxT, mask_BxT, index_B, keys_K, scfg, *, group: int = 1):
    """Every member's rollout of one batch and its reward: ``(rollout [K, B, ...], response masks after the cut,
    [components of each member: this host's rows], texts of this host's rows in member order, timings)``. The
    features and the relevance encoder see every member's rows in one call; each member's proxy and
    counterfactuals are its run's (``RewardEngine.score`` of the engine built with every member's specs)."""
    r, K = sw.run, sw.K
    t0 = time.perf_counter()
    roll = sw.programs.sampler(scfg, group)(r.frozen, ids_BxT, mask_BxT, keys_K, state["trainable"]["lora"])
    feats = sw.programs.text_features(r.engine.tables, roll.tokens_BxN, roll.mask_BxN)
    mask_KxBxN = rollout.cut_mask(roll.mask_BxN, feats.cut_token_B) if r.spec.scoring.cut_at_stop else roll.mask_BxN
    jax.block_until_ready(mask_KxBxN)
    t1 = time.perf_counter()
    tokens, raw = sw.to_local(roll.tokens_BxN), sw.to_local(roll.mask_BxN)
    N = tokens.shape[-1]
    texts = r.tokenizer.batch_decode([t[k == 1] for t, k in zip(tokens.reshape(-1, N), raw.reshape(-1, N))],
                                     skip_special_tokens=True)
    local = type(feats)(*(sw.to_local(f).reshape(-1) for f in feats))  # [K * Bl], member-major
    out = r.engine.score(np.tile(np.asarray(index_B), K), local, texts)
    comps = [_member_components(sw, out, k) for k in range(K)]
    t2 = time.perf_counter()
    return roll, mask_KxBxN, comps, texts, {"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1}


def _member_components(sw: Sweep, out: dict, k: int) -> dict:
    """Member ``k``'s rows of the engine's output, keyed as its run's engine keys them (features it uses, its
    proxy, its counterfactuals)."""
    m = sw.members[k]
    rows = slice(k * len(out["li"]) // sw.K, (k + 1) * len(out["li"]) // sw.K)
    specs = {"proxy": m.spec.reward, **m.spec.counterfactual}
    keep = ["li", "rp", "n_words"] + (["qr"] if any(s.needs_relevance for s in specs.values()) else []) + (
        ["ar"] if any(s.needs_answer_relevance for s in specs.values()) else [])
    return {**{c: out[c][rows] for c in keep}, **{name: out[sw.spec_key(k, name)][rows] for name in specs}}


# ======================================================================================= dev eval

def dev_eval(sw: Sweep, state, step: int) -> list[dict]:
    """Every member's dev eval (``train.dev_eval``'s records and scalars, in its own workdir): the dev prompts
    sampled by every member in one call per batch, the gold RM scoring every member's responses in one call."""
    r = sw.run
    if not len(r.dev):
        return [{} for _ in sw.members]
    index, texts, comps = _dev_rollouts(sw, state, step)
    gold = [None] * sw.K
    if r.gold is not None:
        prompts = [templates.alpaca_prompt(r.dev.records[i].instruction) for i in index]
        gold = np.split(np.asarray(r.gold.score(prompts * sw.K, [t for member in texts for t in member])), sw.K)
    return [train.record_dev_eval(sw.view(k), step, index, texts[k], comps[k], gold[k]) for k in range(sw.K)]


def _dev_rollouts(sw: Sweep, state, step: int):
    """``(dev indices, [texts of each member], [{component: values} of each member])`` of every dev prompt,
    gathered on every host, padding rows dropped; member ``k`` samples with its run's dev keys."""
    r, K = sw.run, sw.K
    index, texts, comps = [], [[] for _ in range(K)], [{} for _ in range(K)]
    offset = len(r.train_set.records)  # the engine's prompt table: the training prompts, then the dev prompts
    for i, b in enumerate(r.dev.batches()):
        keys = jnp.stack([jax.random.fold_in(jax.random.key(m.member.seed + 7), step * 1000 + i) for m in sw.members])
        _, _, c, t, _ = sample_and_score(sw, state, r.to_global(b.ids_BxT), r.to_global(b.mask_BxT),
                                         b.index_B + offset, keys, r.spec.sampling)
        every = host_arrays.gather({"index": np.asarray(b.index_B), "valid": np.asarray(b.valid_B),
                                    **{f"{k}|{name}": v for k in range(K) for name, v in c[k].items()}})
        Bl = len(b.index_B)
        by_row = [t[k * Bl + j] for j in range(Bl) for k in range(K)]  # rows in host order, members inside
        gathered = host_arrays.gather_texts(by_row)
        keep = every["valid"]
        index += list(every["index"][keep])
        for k in range(K):
            texts[k] += [x for x, kept in zip(gathered[k::K], keep) if kept]
            for name in c[k]:
                comps[k].setdefault(name, []).extend(every[f"{k}|{name}"][keep].tolist())
    return index, texts, comps


# ======================================================================================= the closing summary

def summary(workdir: str, *, command: str = "rre-train") -> str:
    """The closing table of a sweep: per member, steps, proxy and gold first -> last, where its outputs are."""
    with open(os.path.join(workdir, sweep_lib.SWEEP_FILE)) as f:
        names = [m["name"] for m in json.load(f)["members"]]
    head = f"{'member':<24}{'steps':>6}{'proxy (train)':>22}{'proxy (dev)':>22}{'gold (dev)':>22}  checkpoints"
    lines = [f"{command}: sweep of {len(names)} members in {workdir}", head]
    for name in names:
        rows = metrics_lib.read_metrics(os.path.join(workdir, name))
        steps = [r["step"] for r in rows if r.get("reward/proxy") is not None]
        ckpt_dir = os.path.join(workdir, name, "checkpoints")
        saves = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []
        cells = [_first_last(rows, k) for k in ("reward/proxy", "eval/proxy", "eval/gold")]
        lines.append(f"{name:<24}{(steps[-1] if steps else 0):>6}" + "".join(f"{c:>22}" for c in cells)
                     + f"  {','.join(map(str, saves)) or '-'}")
    lines.append(f"each member is a run: rre-eval --workdir {workdir}/<member> --eval-set EVAL.json; "
                 f"rre-eval --workdir {workdir} --eval-set EVAL.json compares them all")
    return "\n".join(lines)


def _first_last(rows: list[dict], key: str) -> str:
    seen = [r[key] for r in rows if r.get(key) is not None]
    return f"{seen[0]:.4f} -> {seen[-1]:.4f}" if seen else "-"
