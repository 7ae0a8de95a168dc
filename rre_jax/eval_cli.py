"""``rre-eval`` and ``rre-alignment-tax``: score a run's saved checkpoints (DESIGN.md 4.5).

    rre-eval --workdir DIR --eval-set alpaca_eval.json [--steps 500,1000] [--config FILE[:arg]]
             [--set gold_rm.path=DIR ...] [--out DIR] [--overwrite | --skip-existing]
             [--temperature 0.7 --top-p 1 --max-new-tokens 512] [--batch-size N] [--seed S] [--n-boot 1000]

For every checkpoint step (default: all saved): restore the policy, sample each eval prompt once with the
training sampler at the eval settings (temperature 0.7, top_p 1, up to 512 new tokens), cut the response at the
stop strings as training does, and score the cut text -- the one stored and judged -- with the training proxy,
every counterfactual proxy of the config plus RER (always: the reference scores every checkpoint with it), every
feature (li, rp, qr, ar) and the gold RM. Each step goes to the rollout store (`rre_jax.evaluate.store`:
AlpacaEval ``model_outputs.json``, ``rollouts.jsonl``, ``meta.json``) under ``<workdir>/eval/step_<N>``, with the
gold RM's path, a fingerprint of its files and whether it is a random stand-in, the sampling settings, the eval
set and every reward spec. A new proxy is scored later without sampling again, from the stored texts:
``rre-score --eval-set EVAL.json --outputs <workdir>/eval/step_<N>/model_outputs.json ...`` or
``text_scoring.score_texts`` (which reproduce the stored li/rp exactly and relevance to float round-off, because
every score here is computed on the stored text, ``features.scored_text`` of the response). Then ``report.md``,
``summary.json`` and the plots are rebuilt from every stored step.

The config is, by default, the one the run saved in its checkpoint meta (``train._meta``); ``--config`` loads a
config file instead (``configs/x.py[:arg]`` or a ``.json`` dump) and ``--set a.b=v`` changes single fields (for
example a different gold RM). Everything a user can get wrong -- a missing step, an empty or unreadable eval set,
stored steps that hold other prompts, a step already stored (without ``--overwrite``), a gold RM without its
tokenizer -- fails before the first token is sampled, and nothing stored is replaced without ``--overwrite``.

    rre-alignment-tax --workdir DIR --step N --tasks-dir natural-instructions/ [--max-instances 100]

scores the policy of checkpoint ``N`` on SuperNI (`rre_jax.alignment_tax`): greedy, 128 new tokens, prompts
truncated to 512 tokens on the right (as the reference's tokenizer call does), answers not cut at stop strings;
predictions and metrics go to ``<workdir>/alignment_tax/step_<N>.jsonl`` (+ ``.metrics.json``).

Shapes: ``B`` rows of a batch, ``T`` prompt bucket, ``N`` new tokens.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import sys
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

EVAL_PROXY = "rer"  # always scored (summary.EVAL_PROXY): the reference scores every checkpoint with full RER
FEATURES = ("li", "rp", "qr", "ar")


# ======================================================================================= config

def load_config_file(arg: str):
    """An ml-collections config from ``path.py[:arg]`` (``get_config(arg)``) or a ``.json`` dump of one."""
    import importlib.util

    import ml_collections
    path, _, cfg_arg = arg.partition(":") if not os.path.exists(arg) else (arg, "", "")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--config {arg!r}: {path!r} does not exist")
    if path.endswith(".json"):
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    spec = importlib.util.spec_from_file_location("_rre_eval_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(cfg_arg) if cfg_arg else module.get_config()


def config_from_checkpoint(ckpt, step: int):
    """The config the run saved in the meta of checkpoint ``step`` (see ``train._meta``)."""
    import ml_collections
    meta = ckpt.restore_meta(step)
    if "config" not in meta:
        raise ValueError(f"checkpoint {step} in {ckpt.directory} saved no config in its meta; pass --config")
    return ml_collections.ConfigDict(meta["config"])


def apply_overrides(config, overrides: Sequence[str]):
    """``--set a.b=value``: the value is a Python literal (``3``, ``(2, 2, 2)``, ``True``) or else a string."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set gold_rm.path=/ckpt/starling")
        *parents, leaf = key.split(".")
        node = config
        for i, name in enumerate(parents + [leaf]):
            if name not in node:
                where = ".".join(["config"] + parents[:i])
                raise KeyError(f"--set {key}: {where} has no field {name!r}; its fields: {sorted(node.keys())}")
            if i < len(parents):
                node = node[name]
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if isinstance(node[leaf], str) and not isinstance(value, str):
            value = raw  # a path or name that happens to parse as a number
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(f"--set {key}={raw!r}: {e}") from None
    return config


def open_checkpoints(workdir: str):
    """The run's `checkpoint.CheckpointManager`; a workdir without ``checkpoints/`` is an error (nothing created)."""
    from rre_jax import checkpoint
    if "://" not in str(workdir) and not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"--workdir {workdir!r} holds no checkpoints/ directory; is it a run's workdir?")
    return checkpoint.CheckpointManager(workdir)


def resolve_steps(ckpt, steps: Sequence[int] | None) -> list[int]:
    """The requested checkpoint steps (default: all saved), each checked to exist."""
    available = ckpt.all_steps()
    if not available:
        raise FileNotFoundError(f"no checkpoints in {ckpt.directory}; train first (rre-train --workdir ...)")
    if not steps:
        return available
    missing = sorted(set(steps) - set(available))
    if missing:
        raise FileNotFoundError(f"no checkpoint for step(s) {missing} in {ckpt.directory}; saved steps: {available}")
    return sorted(set(steps))


# ======================================================================================= set-up

def _open(config, workdir: str):
    """``(run spec, mesh, asset paths, policy tokenizer)``: cheap, nothing is loaded onto devices yet."""
    import jax

    from rre_jax import mesh as mesh_lib, tokenizer as tok_lib, train
    spec = train.validate(config)
    mesh = mesh_lib.make_mesh(spec.mesh, jax.devices()[:spec.mesh.num_devices or None])
    paths = train._paths(config, workdir)
    return spec, mesh, paths, tok_lib.load_tokenizer(paths["tokenizer"])


def _batching(config, spec, batch_size: int | None):
    from rre_jax.data import batching
    rows = spec.mesh.resolved_shape(spec.mesh.num_devices or _device_count())
    batch_size = int(batch_size or spec.ppo.batch_size)
    if batch_size <= 0 or batch_size % (rows[0] * rows[1]):
        raise ValueError(f"--batch-size {batch_size} must be a positive multiple of the mesh's data x fsdp = "
                         f"{rows[0] * rows[1]} devices")
    return batching.BatchingConfig(global_batch_size=batch_size, max_prompt_length=int(config.data.max_prompt_length),
                                   bucket_multiple=int(config.data.bucket), seed=int(config.data.shuffle_seed))


def _device_count() -> int:
    import jax
    return jax.device_count()


def _make_run(config, spec, mesh, paths, tokenizer, workdir, records, prompts, bcfg, *, gold=None, scoring=True):
    """A `train.Run` whose dev slot holds the eval prompts (no training data, no iterator)."""
    from rre_jax import train
    pspec, frozen = train.load_policy(config, spec, mesh, paths)
    engine = train.reward_engine(config, spec, mesh, tokenizer, pspec.cfg.vocab_size, records) if scoring else None
    return train.Run(config, spec, workdir, mesh, tokenizer, [], prompts, None, (records, prompts, bcfg), pspec,
                     frozen, engine, gold, paths)


def _with_eval_proxy(spec):
    """``spec`` with RER among the counterfactual proxies (scored at every checkpoint, as the reference does)."""
    from rre_jax import reward
    if spec.reward == reward.preset(EVAL_PROXY) or f"cf/{EVAL_PROXY}" in spec.counterfactual:
        return spec
    rer = dataclasses.replace(reward.preset(EVAL_PROXY), max_new_tokens=spec.reward.max_new_tokens)
    return dataclasses.replace(spec, counterfactual={**spec.counterfactual, f"cf/{EVAL_PROXY}": rer})


# ======================================================================================= checks

def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gold_rm_fingerprint(path: str) -> str:
    """A short identity of a gold RM checkpoint: SHA-256 of its config.json and its weight files' names and sizes."""
    if not path or not os.path.isdir(path):
        return ""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == "config.json":
            h.update(pathlib.Path(full).read_bytes())
        elif name.endswith((".safetensors", ".bin", ".index.json")):
            h.update(f"{name}:{os.path.getsize(full)};".encode())
    return h.hexdigest()[:16]


def check_store(out_dir, steps: Sequence[int], instructions: Sequence[str], *, overwrite: bool,
                skip_existing: bool) -> list[int]:
    """The steps to sample. Stored steps are kept unless ``overwrite``; every stored step that stays must hold the
    same prompts in the same order as ``instructions`` (else its means are not comparable)."""
    from rre_jax import evaluate
    stored = evaluate.list_steps(out_dir)
    existing = [s for s in steps if s in stored]
    if existing and not (overwrite or skip_existing):
        raise FileExistsError(f"{out_dir} already holds the eval of step(s) {existing}; pass --overwrite to "
                              "replace them, --skip-existing to keep them, or --steps without them")
    todo = [s for s in steps if s not in stored or overwrite]
    for s in stored:
        if s in todo:
            continue
        held = evaluate.load_step(out_dir, s).instruction
        if list(held) != list(instructions):
            raise ValueError(f"{evaluate.store.step_dir(out_dir, s)} holds {len(held)} outputs of other prompts than "
                             f"the {len(instructions)} of this eval set (the report compares checkpoints on the "
                             "same prompts): use another --out, or re-run every stored step with --overwrite")
    return todo


# ======================================================================================= sampling

def sample_step(run, state, step: int, scfg, seed: int, bar=None) -> dict:
    """Sample and score every eval prompt once: ``{"index": i64[N], "texts": [N], "n_tokens": i64[N],
    "comps": {component: f32[N]}}`` over the kept prompts, in order."""
    import jax

    from rre_jax import train
    from rre_jax.data import batching
    records, prompts, bcfg = run.dev
    index, texts, n_tokens, comps = [], [], [], {}
    key = jax.random.fold_in(jax.random.key(seed), step)
    for i, b in enumerate(batching.eval_batches(prompts, bcfg, process_index=jax.process_index(),
                                                process_count=jax.process_count())):
        _, mask_BxN, c, t, _ = train.sample_and_score(
            run, state, train._global(run, b.ids_BxT), train._global(run, b.mask_BxT), b.index_B,
            jax.random.fold_in(key, i), scfg, relevance_on_cut=True)
        keep = np.asarray(b.valid_B)
        index += list(np.asarray(b.index_B)[keep])
        texts += [x for x, k in zip(t, keep) if k]
        n_tokens += list(np.asarray(jax.device_get(mask_BxN)).sum(1)[keep])
        for k, v in c.items():
            comps.setdefault(k, []).extend(np.asarray(v)[keep].tolist())
        if bar is not None:
            bar.update(1)
    return {"index": np.asarray(index, np.int64), "texts": texts, "n_tokens": np.asarray(n_tokens, np.int64),
            "comps": {k: np.asarray(v, np.float64) for k, v in comps.items()}}


def proxy_scores(comps: dict, train_proxy: str) -> dict:
    """``{spec name: f64[N]}``: the training proxy under its preset name and each counterfactual under its own."""
    out = {k[3:]: v for k, v in comps.items() if k.startswith("cf/")}
    out[train_proxy] = comps["proxy"]
    return out


def step_rollouts(run, step: int, sampled: dict, gold, scfg, seed: int, extra: dict):
    """The `evaluate.StepRollouts` of one checkpoint from `sample_step`'s output and the gold scores."""
    from rre_jax import evaluate
    records = run.dev[0]
    recs = [records[i] for i in sampled["index"]]
    comps = sampled["comps"]
    return evaluate.StepRollouts(
        step=step, instruction=[r.instruction for r in recs], response=sampled["texts"], qtype=[r.qtype for r in recs],
        dataset=[r.dataset for r in recs], proxies=proxy_scores(comps, run.config.reward.preset),
        gold=np.asarray(gold if gold is not None else np.full(len(recs), np.nan)),
        features={k: comps[k] for k in FEATURES if k in comps}, n_tokens=sampled["n_tokens"],
        train_proxy=run.config.reward.preset, gold_rm=run.paths["gold_rm"] or "",
        gold_rm_random=bool(run.paths["gold_rm_random"]), generator=f"{run.config.name}-step_{step}",
        sampling={**dataclasses.asdict(scfg), "seed": seed}, extra=extra)


# ======================================================================================= rre-eval

@dataclasses.dataclass
class EvalPlan:
    """Everything checked and loaded before the first sample (see `plan_eval`)."""

    run: Any
    ckpt: Any
    steps: list
    out_dir: pathlib.Path
    scfg: Any
    seed: int
    overwrite: bool
    n_boot: int
    extra: dict
    state: Any = None  # a train state of the run's shapes and shardings, restored into at each step


def plan_eval(workdir: str, eval_set: str, *, steps=None, config=None, overrides=(), out=None,
              overwrite: bool = False, skip_existing: bool = False, temperature: float = 0.7, top_p: float = 1.0,
              max_new_tokens: int = 512, batch_size: int | None = None, seed: int | None = None,
              n_boot: int = 1000) -> EvalPlan:
    """Check every input and load the models; raises (naming the file, step or field) before any sampling."""
    from rre_jax import sampling
    from rre_jax.data import batching, prompts as prompts_lib
    ckpt = open_checkpoints(workdir)
    steps = resolve_steps(ckpt, steps)
    config = apply_overrides(config if config is not None else config_from_checkpoint(ckpt, steps[-1]), overrides)
    scfg = sampling.SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    records = prompts_lib.load_prompts(eval_set, missing_qtype=config.data.missing_qtype)
    if not records:
        raise ValueError(f"eval set {eval_set!r} holds no prompts")
    spec, mesh, paths, tokenizer = _open(config, workdir)
    spec = _with_eval_proxy(spec)
    bcfg = _batching(config, spec, batch_size)
    prompts = batching.tokenize_prompts(records, tokenizer, max_prompt_length=bcfg.max_prompt_length)
    out_dir = pathlib.Path(out or os.path.join(workdir, "eval"))
    todo = check_store(out_dir, steps, [records[i].instruction for i in prompts.index], overwrite=overwrite,
                       skip_existing=skip_existing)
    run = state = None
    if todo:
        import jax

        from rre_jax import train
        gold = train.gold_rm(config, spec, paths, mesh)  # checks the gold tokenizer before the policy loads
        if gold is None:
            log.warning("the run has no gold RM (config.gold_rm.path is empty): gold scores are stored as NaN")
        run = _make_run(config, spec, mesh, paths, tokenizer, workdir, records, prompts, bcfg, gold=gold)
        state = train.init_state(run, jax.random.key(int(config.seed)))
    seed = int(config.seed if seed is None else seed)
    extra = {"run": config.name, "split": "eval", "eval_set": os.path.abspath(eval_set),
             "eval_set_sha256": _file_sha256(eval_set), "checkpoints": str(ckpt.directory),
             "dropped_prompts": [int(i) for i in prompts.dropped],
             "gold_rm_fingerprint": gold_rm_fingerprint(paths["gold_rm"]),
             "reward_specs": {proxy: dataclasses.asdict(s) for proxy, s in
                              proxy_scores({"proxy": spec.reward, **spec.counterfactual}, config.reward.preset).items()},
             "config": json.loads(config.to_json_best_effort())}
    return EvalPlan(run, ckpt, todo, out_dir, scfg, seed, overwrite, n_boot, extra, state)


def run_eval(plan: EvalPlan, progress: bool = True) -> dict:
    """Sample, score and store every planned step, then rebuild the report; returns the report's summary."""
    import jax
    from tqdm.auto import tqdm

    from rre_jax import evaluate, train
    from rre_jax.data import templates
    if plan.steps:
        records, prompts, bcfg = plan.run.dev
        n_batches = -(-len(prompts) // bcfg.global_batch_size)
        bar = tqdm(total=len(plan.steps) * n_batches, desc="rre-eval", unit="batch",
                   disable=not progress or jax.process_index() != 0)
        for step in plan.steps:
            bar.set_postfix(step=step)
            state, _ = train.restore(plan.run, plan.ckpt, step, plan.state)
            sampled = sample_step(plan.run, state, step, plan.scfg, plan.seed, bar)
            gold = None
            if plan.run.gold is not None:
                gold = plan.run.gold.score([templates.alpaca_prompt(records[i].instruction) for i in sampled["index"]],
                                           sampled["texts"])
            rollouts = step_rollouts(plan.run, step, sampled, gold, plan.scfg, plan.seed, plan.extra)
            if jax.process_index() == 0:
                evaluate.write_step(plan.out_dir, rollouts, overwrite=plan.overwrite)
        bar.close()
    summary = evaluate.refresh_report(plan.out_dir, n_boot=plan.n_boot) if jax.process_index() == 0 else {}
    plan.ckpt.close()
    return summary


def evaluate_checkpoints(workdir: str, eval_set: str, progress: bool = True, **kwargs) -> dict:
    """`plan_eval` then `run_eval` (the Python form of ``rre-eval``)."""
    return run_eval(plan_eval(workdir, eval_set, **kwargs), progress=progress)


# ======================================================================================= rre-alignment-tax

def greedy_generate(run, state, texts: Sequence[str], *, max_new_tokens: int, max_prompt_length: int,
                    batch_size: int) -> list[str]:
    """Greedy continuations (new text only, special tokens skipped, not cut) of already-templated prompts."""
    import jax

    from rre_jax import policy, rollout, sampling, train
    from rre_jax.data import batching
    tok = run.tokenizer
    scfg = sampling.SamplingConfig(greedy=True, max_new_tokens=max_new_tokens)
    params, adapters = policy.sampling_params(run.policy, state["trainable"], run.frozen)
    sampler = rollout.jitted_sampler(run.policy.cfg, scfg, tok.eos_token_id, tok.pad_token_id,
                                     run.policy.lora_cfg if adapters is not None else None)
    buckets = batching.bucket_lengths(max_prompt_length, multiple=int(run.config.data.bucket))
    rows = tok(list(texts), add_special_tokens=True, truncation=True, max_length=max_prompt_length)["input_ids"]
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        T = next(b for b in buckets if b >= max(len(r) for r in chunk))
        ids_BxT = np.full((batch_size, T), tok.pad_token_id, np.int32)
        mask_BxT = np.zeros((batch_size, T), np.int32)
        for i, r in enumerate(chunk + [chunk[0]] * (batch_size - len(chunk))):  # filler rows keep one shape
            ids_BxT[i, T - len(r):], mask_BxT[i, T - len(r):] = r, 1
        roll = sampler(params, train._global(run, ids_BxT), train._global(run, mask_BxT), jax.random.key(0), adapters)
        toks, mask = np.asarray(jax.device_get(roll.tokens_BxN)), np.asarray(jax.device_get(roll.mask_BxN))
        out += tok.batch_decode([t[m == 1] for t, m in zip(toks[:len(chunk)], mask)], skip_special_tokens=True)
    return out


@dataclasses.dataclass
class TaxPlan:
    """A checked alignment-tax job (see `plan_alignment_tax`)."""

    run: Any
    state: Any
    step: int
    instances: list
    out: pathlib.Path
    max_new_tokens: int
    max_prompt_length: int


def plan_alignment_tax(workdir: str, step: int, tasks_dir: str, *, config=None, overrides=(),
                       max_instances: int = 100, max_new_tokens: int = 128, max_prompt_length: int = 512,
                       batch_size: int | None = None, out: str | None = None, overwrite: bool = False) -> TaxPlan:
    """Check the step, the task files and the output path, then restore the policy (nothing generated yet)."""
    import jax

    from rre_jax import alignment_tax as at, train
    ckpt = open_checkpoints(workdir)
    step, = resolve_steps(ckpt, [step])
    config = apply_overrides(config if config is not None else config_from_checkpoint(ckpt, step), overrides)
    instances = at.load_tasks(tasks_dir, max_instances_per_task=max_instances)
    if not instances:
        raise ValueError(f"{tasks_dir}: the test split lists no task with instances")
    out = pathlib.Path(out or os.path.join(workdir, "alignment_tax", f"step_{step}.jsonl"))
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already holds alignment-tax predictions; pass --overwrite to replace them")
    spec, mesh, paths, tokenizer = _open(config, workdir)
    bcfg = _batching(config, spec, batch_size)
    run = _make_run(config, spec, mesh, paths, tokenizer, workdir, [], None, bcfg, scoring=False)
    state, _ = train.restore(run, ckpt, step, train.init_state(run, jax.random.key(int(config.seed))))
    ckpt.close()
    return TaxPlan(run, state, step, instances, out, max_new_tokens, max_prompt_length)


def run_alignment_tax(plan: TaxPlan) -> dict:
    """Generate, score (`alignment_tax.run`) and write predictions + metrics; returns the metrics."""
    import jax

    from rre_jax import alignment_tax as at
    batch = plan.run.dev[2].global_batch_size
    generate = lambda prompts: greedy_generate(plan.run, plan.state, prompts,  # noqa: E731
                                               max_new_tokens=plan.max_new_tokens,
                                               max_prompt_length=plan.max_prompt_length, batch_size=batch)
    result, predictions = at.run(plan.instances, generate, batch_size=batch)
    result = {**result, "step": plan.step, "max_new_tokens": plan.max_new_tokens,
              "max_prompt_length": plan.max_prompt_length}
    if jax.process_index() == 0:
        at.write_predictions(plan.out, plan.instances, predictions, result)
    return result


# ======================================================================================= command lines

_USER_ERRORS = (OSError, ValueError, KeyError)


def _steps_arg(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps {text!r}: expected comma-separated integers, e.g. 500,1000")


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="run directory (holds checkpoints/)")
    parser.add_argument("--config", default=None,
                        help="config file path.py[:arg] or .json (default: the config saved in the checkpoint)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change one config field, e.g. --set gold_rm.path=/ckpt/starling (repeatable)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: config.ppo.batch_size)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs already written")


def _logging() -> None:
    """rre_jax's own INFO lines; libraries (absl, orbax, jax) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("rre_jax").setLevel(logging.INFO)


def _config(args):
    return load_config_file(args.config) if args.config else None


def main(argv: Sequence[str] | None = None) -> int:
    """``rre-eval`` (see the module docstring); exits with status 2 and a message on bad input."""
    parser = argparse.ArgumentParser(prog="rre-eval", description=__doc__.split("\n\n")[0])
    _common_args(parser)
    parser.add_argument("--eval-set", required=True, help="AlpacaEval/AlpacaFarm prompt file (.json or .jsonl)")
    parser.add_argument("--steps", type=_steps_arg, default=None, help="e.g. 500,1000 (default: every checkpoint)")
    parser.add_argument("--out", default=None, help="rollout store and report directory (default: WORKDIR/eval)")
    parser.add_argument("--skip-existing", action="store_true", help="keep steps already stored, sample the rest")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: config.seed)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the report's intervals")
    args = parser.parse_args(argv)
    _logging()
    try:
        plan = plan_eval(args.workdir, args.eval_set, steps=args.steps, config=_config(args),
                         overrides=args.overrides, out=args.out, overwrite=args.overwrite,
                         skip_existing=args.skip_existing, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                         n_boot=args.n_boot)
    except _USER_ERRORS as e:
        parser.exit(2, f"rre-eval: error: {e}\n")
    summary = run_eval(plan)
    print(f"rre-eval: report {plan.out_dir / 'report.md'} (checkpoints {summary.get('steps')})", file=sys.stderr)
    return 0


def alignment_tax_main(argv: Sequence[str] | None = None) -> int:
    """``rre-alignment-tax`` (see the module docstring); exits with status 2 and a message on bad input."""
    parser = argparse.ArgumentParser(prog="rre-alignment-tax",
                                     description="SuperNI ROUGE-L of a checkpoint's greedy answers (alignment tax).")
    _common_args(parser)
    parser.add_argument("--step", type=int, required=True, help="checkpoint step")
    parser.add_argument("--tasks-dir", required=True, help="natural-instructions root (splits/ and tasks/)")
    parser.add_argument("--max-instances", type=int, default=100, help="first instances of each test task")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--out", default=None, help="predictions JSONL (default: WORKDIR/alignment_tax/step_N.jsonl)")
    args = parser.parse_args(argv)
    _logging()
    try:
        plan = plan_alignment_tax(args.workdir, args.step, args.tasks_dir, config=_config(args),
                                  overrides=args.overrides, max_instances=args.max_instances,
                                  max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length,
                                  batch_size=args.batch_size, out=args.out, overwrite=args.overwrite)
    except _USER_ERRORS as e:
        parser.exit(2, f"rre-alignment-tax: error: {e}\n")
    result = run_alignment_tax(plan)
    print(f"rre-alignment-tax: step {result['step']}: ROUGE-L {result['rougeL']:.2f} over "
          f"{result['n_instances']} instances of {result['n_tasks']} tasks", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
