"""Best-of-n overoptimization curves of one policy (``rre-bon``): screen a proxy design in minutes, before RL.

For an eval set and a policy (the initial policy, or checkpoint ``step`` of a run), sample ``n`` responses per
prompt with the training sampler -- each prompt repeated ``n`` times in the batch, so batches hold prompts x
samples and are sharded like rollouts -- cut them at the stop strings, score each with every reward preset of the
config (the training proxy, its counterfactuals and RER) and the gold RM, and store them in the rollout store's
format. Then, for each k in ``ks``, the exact expected gold and proxy of the proxy-selected best of k
(`overoptimization.best_of_k`) under each preset, against d = sqrt(KL_bon(k)), with the fits, the flag and the
length diagnostics (`curves.bon_curves`). Layout of ``out`` (default ``<workdir>/bon/step_<S>``)::

    samples/step_<S>/   the P x n scored responses (rollout store: model_outputs.json, rollouts.jsonl, meta.json),
                        prompt-major (row p * n + j is sample j of prompt p)
    curves.json         every number of the curves; curves.png the figure; report.md tables and verdicts

Everything a user can get wrong -- n < 1, a k beyond n, a checkpoint that does not exist, an eval set that is
empty or lacks the reference answers a preset needs, outputs already there (without ``overwrite``) -- fails
before the models load and before anything is written. ``report`` rebuilds the curves from the stored samples.

Shapes: ``P`` prompts, ``N`` samples per prompt (``n``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from rre_jax import assemble, checkpoint_eval, run_spec, sampling
from rre_jax.data import prompts as prompts_lib, templates
from rre_jax.errors import UserError
from rre_jax.evaluate import overoptimization as oo, store
from rre_jax.evaluate.bon_report import CURVES_FILE, SAMPLES_DIR, report


@dataclasses.dataclass
class BonPlan:
    """Everything checked and loaded before the first sample (see `plan_best_of_n`)."""

    run: Any
    state: Any
    step: int
    n: int
    ks: list  # the k of the best-of-k curve, each <= n
    extra: dict  # run facts stored in the samples' meta
    out_dir: pathlib.Path
    overwrite: bool
    scfg: Any
    seed: int
    n_boot: int


def check_references(specs: dict, records) -> None:
    """A preset that branches on query type scores CONSTRAINED answers by their relevance to the reference
    answer: every prompt must carry one (a non-empty ``output``)."""
    needing = sorted(name for name, s in specs.items() if s.needs_answer_relevance)
    empty = [i for i, r in enumerate(records) if not r.reference.strip()]
    if needing and empty:
        raise UserError(f"reward presets {needing} score answer relevance against each prompt's reference answer, "
                        f"but eval-set item(s) {empty[:5]}{' ...' if len(empty) > 5 else ''} have an empty "
                        "'output': use an eval set with reference answers, or drop those presets "
                        "(--config.reward.counterfactual=\"('li', 'li_rp', 'qr_li_rp')\" and a non-branching "
                        "--config.reward.preset)")


def check_outputs(out_dir: pathlib.Path, step: int, overwrite: bool) -> None:
    held = [p for p in (out_dir / CURVES_FILE, store.step_dir(out_dir / SAMPLES_DIR, step)) if p.exists()]
    if held and not overwrite:
        raise UserError(f"{held[0]} already exists; pass --overwrite to replace it, or choose another --out")


def repeat_prompts(dev, n: int):
    """``dev`` (an `assemble.PromptSet`) with each tokenized prompt repeated ``n`` times in a row, prompt-major (row
    ``p * n + j`` is sample ``j`` of prompt ``p``); records and batching unchanged."""
    prompts = dev.prompts
    repeat = lambda x: np.repeat(np.asarray(x), n, axis=0)  # noqa: E731
    return dataclasses.replace(dev, prompts=dataclasses.replace(
        prompts, ids=tuple(a for a in prompts.ids for _ in range(n)), lengths=repeat(prompts.lengths),
        index=repeat(prompts.index), qtype=repeat(prompts.qtype)))


def plan_best_of_n(workdir: str, eval_set: str, *, n: int, ks: Sequence[int] | None = None, step: int | None = None,
                   config=None, overrides=(), out=None, overwrite: bool = False, temperature: float = 0.7,
                   top_p: float = 1.0, max_new_tokens: int = 512, batch_size: int | None = None,
                   seed: int | None = None, n_boot: int = 1000) -> BonPlan:
    """Check every input, then load the models; raises (naming the flag, file or item) before any sampling."""

    ks = oo.check_ks(ks or (oo.powers_of_two(n) if n >= 1 else [1]), n)
    ckpt = None
    if step is not None:
        ckpt = checkpoint_eval.open_checkpoints(workdir)
        step, = checkpoint_eval.resolve_steps(ckpt, [step])
    if config is None and not step:
        raise UserError("--config is needed for the initial policy (without --step there is no checkpoint to read "
                        "the run's config from)")
    if config is None:
        config = checkpoint_eval.config_from_checkpoint(ckpt, step)
    config = checkpoint_eval.apply_overrides(config, overrides)
    scfg = sampling.SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    records = prompts_lib.load_prompts(eval_set, missing_qtype=config.data.missing_qtype)
    if not records:
        raise UserError(f"eval set {eval_set!r} holds no prompts")
    spec = run_spec.validate(config)  # RER is always among its proxies
    check_references({config.reward.preset: spec.reward, **{k[3:]: v for k, v in spec.counterfactual.items()}},
                     records)
    step = int(step or 0)
    out_dir = pathlib.Path(out or os.path.join(workdir, "bon", f"step_{step}"))
    check_outputs(out_dir, step, overwrite)
    bcfg = checkpoint_eval.eval_batching(spec, batch_size)
    basics = assemble.open_basics(config, spec, workdir)  # the tiny config builds its assets here
    dev = assemble.prompt_set(records, basics.tokenizer, bcfg)
    gold = assemble.gold_rm(spec, basics.paths, basics.mesh)
    run = assemble.for_eval(config, basics, workdir, repeat_prompts(dev, n), gold=gold)
    if step:
        state = assemble.restore(run, ckpt, step)[0]
        ckpt.close()
    else:
        state = assemble.init_state(run, jax.random.key(int(config.seed)))
    extra = {"run": config.name, "split": "best_of_n", "eval_set": os.path.abspath(eval_set),
             "eval_set_sha256": checkpoint_eval.file_sha256(eval_set), "best_of_n": {"n": n, "ks": ks},
             "dropped_prompts": [int(i) for i in dev.prompts.dropped],
             "gold_rm_fingerprint": checkpoint_eval.gold_rm_fingerprint(basics.paths["gold_rm"])}
    return BonPlan(run, state, step, n, ks, extra, out_dir, overwrite, scfg, int(config.seed if seed is None else seed),
                   n_boot)


def run_best_of_n(plan: BonPlan, progress: bool = True) -> dict:
    """Sample, score and store the P x n responses, then write the curves (`report`); returns the curves."""

    records = plan.run.dev.records
    bar = tqdm(total=plan.run.dev.num_batches(), desc="rre-bon", unit="batch",
               disable=not progress or jax.process_index() != 0)
    # every batch holds whole runs of one prompt's samples, gcd(batch, n) long: each run's prompt is prefilled once
    group = math.gcd(plan.run.dev.batching.global_batch_size, plan.n)
    sampled = checkpoint_eval.sample_step(plan.run, plan.state, plan.step, plan.scfg, plan.seed, bar, kl=False,
                                          group=group)
    bar.close()
    gold = None
    if plan.run.gold is not None:
        gold = plan.run.gold.score([templates.alpaca_prompt(records[i].instruction) for i in sampled["index"]],
                                   sampled["texts"])
    rollouts = checkpoint_eval.step_rollouts(plan.run, plan.step, sampled, gold, plan.scfg, plan.seed, plan.extra)
    if jax.process_index() != 0:
        return {}
    store.write_step(plan.out_dir / SAMPLES_DIR, rollouts, overwrite=plan.overwrite)
    return report(plan.out_dir, plan.step, plan.ks, n_boot=plan.n_boot)
