"""Evaluation across checkpoints: rollout store, proxy-vs-gold monotonicity statistics, report and plots.

The paper's verdict on a proxy is whether it moves with the gold RM as training goes on: for each saved
checkpoint, sample the AlpacaEval prompts, score every response with the proxy (every component) and the gold
RM, average per checkpoint, and rank-correlate the per-checkpoint proxy means with the gold means
(docs/design.md 4.5). This package holds the model-independent half of that:

* `store`: one directory per checkpoint (AlpacaEval outputs, scored rollouts, meta) - `write_step`,
  `load_step`, `list_steps`;
* `monotonicity`: per-checkpoint means, Spearman / Kendall with SciPy p-values, prompt-bootstrap intervals,
  the reward-hacking flag, length statistics;
* `summary`: stored checkpoints -> every number of the report;
* `plots` and `report`: PNGs and ``report.md``; `refresh_report` rebuilds them from the store;
* `overoptimization` and `curves`: gold and proxy against d = sqrt(KL) (Gao et al. 2022) for best-of-n
  (`bon_report`, the curves of ``rre-bon``'s stored samples) and for RL checkpoints (the report's RL section),
  with the fits.

Sampling the checkpoints and scoring them live one layer up (``rre_jax.checkpoint_eval``, ``rre_jax.best_of_n``,
``rre_jax.score_outputs``), and call down here; everything here takes plain arrays, lists and dicts::

    rollouts = evaluate.StepRollouts(
        step=step, instruction=[r.instruction for r in records], response=texts, qtype=[r.qtype for r in records],
        dataset=[r.dataset for r in records],
        proxies={name: reward.compose(spec, li, rp, qr, ar, constrained) for name, spec in specs.items()},
        gold=gold_B, features={"li": li, "rp": rp, "qr": qr, "ar": ar}, n_tokens=mask.sum(-1),
        train_proxy=config.reward.preset, gold_rm=config.gold_rm.path, gold_rm_random=not config.gold_rm.path,
        sampling={"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 512, "seed": seed})
    evaluate.write_step(f"{workdir}/eval", rollouts, overwrite=flags.overwrite)   # process 0 only
    evaluate.refresh_report(f"{workdir}/eval")                                  # report.md, plots, summary.json
"""
from rre_jax.evaluate.monotonicity import (Correlation, HackingFlag, checkpoint_means, correlate, hacking_flag,
                                           length_stats, rank_correlation)
from rre_jax.evaluate.report import refresh_report, render_markdown
from rre_jax.evaluate.store import StepRollouts, StoreError, list_steps, load_step, load_steps, write_step
from rre_jax.evaluate.summary import summarize
