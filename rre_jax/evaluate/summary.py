"""From stored checkpoints to the numbers of a monotonicity report (a JSON-able dict).

Shapes: ``C`` checkpoints (ascending steps), ``N`` prompts aligned by index across checkpoints.

Series names: ``"proxy:<spec>"`` for the proxy under each reward spec, the feature names (``li``, ``rp``,
``qr``, ``ar``, ...) as stored, and ``"gold"``. Groups: ``"all"`` plus one per query type present.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rre_jax.evaluate import monotonicity as mono
from rre_jax.evaluate.store import StepRollouts

EVAL_PROXY = "rer"  # the reference scores every checkpoint with full RER, whatever proxy trained it
GOLD = "gold"
FEATURE_ORDER = ("li", "rp", "qr", "ar")


def _common(names_per_step: Sequence[Sequence[str]]) -> list[str]:
    common = set(names_per_step[0]).intersection(*map(set, names_per_step[1:]))
    return sorted(common)


def stack(steps: Sequence[StepRollouts]) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """``({series: f64[C, N]}, qtype_N, warnings)`` for steps holding the same prompts in the same order.

    Proxies/features missing at some step are dropped (with a warning). Different prompt sets across steps
    are an error: per-checkpoint means over different prompts are not comparable.
    """
    first = steps[0]
    for s in steps[1:]:
        if s.instruction != first.instruction:
            raise ValueError(f"step {s.step} holds different eval prompts from step {first.step} "
                             f"({len(s)} vs {len(first)} items, or different order); re-run the eval of one "
                             "of them on the same prompt file (--overwrite)")
    warnings = []
    proxies = _common([s.proxies for s in steps])
    features = _common([s.features for s in steps])
    for kind, kept, per_step in (("proxy", proxies, [s.proxies for s in steps]),
                                 ("feature", features, [s.features for s in steps])):
        dropped = sorted(set().union(*map(set, per_step)) - set(kept))
        if dropped:
            warnings.append(f"{kind} scores {dropped} are missing at some checkpoints and are left out")
    series = {f"proxy:{p}": np.stack([s.proxies[p] for s in steps]) for p in proxies}
    series.update({f: np.stack([s.features[f] for s in steps]) for f in features})
    series[GOLD] = np.stack([s.gold for s in steps])
    return series, list(first.qtype), warnings


def _proxy_order(series: Sequence[str], train_proxy: str) -> list[str]:
    """Training proxy first, then RER, then the other proxies alphabetically."""
    first = [f"proxy:{train_proxy}", f"proxy:{EVAL_PROXY}"]
    head = [p for i, p in enumerate(first) if p in series and p not in first[:i]]
    return head + sorted(s for s in series if s.startswith("proxy:") and s not in head)


def _feature_order(series: Sequence[str]) -> list[str]:
    """The paper's features in its order (li, rp, qr, ar), then any others alphabetically."""
    features = [s for s in series if not s.startswith("proxy:") and s != GOLD]
    return [f for f in FEATURE_ORDER if f in features] + sorted(set(features) - set(FEATURE_ORDER))


def _gold_rm(steps: Sequence[StepRollouts], warnings: list[str]) -> dict:
    ids = {(s.gold_rm, s.gold_rm_random) for s in steps}
    if len(ids) > 1:
        warnings.append(f"GOLD RM DIFFERS ACROSS CHECKPOINTS: {sorted(ids)}; the gold series is not comparable")
    random = any(s.gold_rm_random for s in steps)
    if random:
        warnings.append("THE GOLD RM IS A RANDOMLY INITIALISED STAND-IN: gold scores and every correlation "
                        "with them are meaningless (plumbing check only)")
    return {"name": steps[-1].gold_rm, "random": random}


def summarize(steps: Sequence[StepRollouts], *, k: int = 3, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95, min_proxy_rise: float = 0.0, min_gold_drop: float = 0.0) -> dict:
    """Every statistic of the monotonicity report for ``steps`` (ascending), as a JSON-able dict.

    Keys: steps, n_items, train_proxy, eval_proxy, gold_rm, relevance_text (what QR / AR embedded; a list when
    the steps differ, with a warning), series (proxies first, then features, then gold),
    counts / means / correlations per group (correlation of each series' per-checkpoint means with gold's,
    with a bootstrap CI; see `monotonicity.correlate`), hacking (per proxy, `monotonicity.hacking_flag`),
    lengths (words, and tokens when stored), bootstrap settings, warnings.
    """
    steps = sorted(steps, key=lambda s: s.step)
    if not steps:
        return {"steps": [], "n_items": 0, "series": [], "warnings": ["no stored checkpoints"]}
    series, qtype_N, warnings = stack(steps)
    train_proxy = steps[-1].train_proxy
    if len({s.train_proxy for s in steps}) > 1:
        warnings.append(f"training proxy differs across checkpoints: {sorted({s.train_proxy for s in steps})}")
    gold_rm = _gold_rm(steps, warnings)
    relevance_texts = sorted({s.relevance_text for s in steps})
    if len(relevance_texts) > 1:
        warnings.append(f"RELEVANCE WAS SCORED ON DIFFERENT TEXTS ACROSS CHECKPOINTS: {relevance_texts} "
                        "(store.RELEVANCE_TEXT_NAMES); the qr, ar and relevance-using proxy series are not "
                        "comparable: re-run those steps with --overwrite")
    order = _proxy_order(series, train_proxy) + _feature_order(series) + [GOLD]
    qtype_N = np.asarray(qtype_N)
    groups = {"all": np.ones(len(qtype_N), bool)} | {q: qtype_N == q for q in sorted(set(qtype_N.tolist()))}
    step_list = [s.step for s in steps]
    out = {"steps": step_list, "n_items": len(qtype_N), "train_proxy": train_proxy,
           "eval_proxy": EVAL_PROXY if f"proxy:{EVAL_PROXY}" in series else None, "gold_rm": gold_rm,
           "relevance_text": relevance_texts[0] if len(relevance_texts) == 1 else relevance_texts,
           "series": order, "counts": {g: int(m.sum()) for g, m in groups.items()}, "means": {},
           "correlations": {}, "bootstrap": {"n_boot": n_boot, "seed": seed, "level": level}}
    for g, mask in groups.items():
        out["means"][g] = {name: mono.checkpoint_means(series[name][:, mask]).tolist() for name in order}
        counts = mono.bootstrap_counts(int(mask.sum()), n_boot, seed) if n_boot > 0 and mask.any() else None
        out["correlations"][g] = {
            name: dataclasses.asdict(mono.correlate(series[name][:, mask], series[GOLD][:, mask], n_boot=n_boot,
                                                    level=level, x_name=name, y_name=GOLD, counts_BxN=counts))
            for name in order if name != GOLD}
    out["hacking"] = {name: dataclasses.asdict(mono.hacking_flag(
        step_list, out["means"]["all"][name], out["means"]["all"][GOLD], k=k, min_proxy_rise=min_proxy_rise,
        min_gold_drop=min_gold_drop)) for name in order if name.startswith("proxy:")}
    out["hacking_settings"] = {"k": k, "min_proxy_rise": min_proxy_rise, "min_gold_drop": min_gold_drop}
    out["lengths"] = {"words": mono.length_stats(np.stack([mono.word_counts(s.response) for s in steps]))}
    if all(s.n_tokens is not None for s in steps):
        out["lengths"]["tokens"] = mono.length_stats(np.stack([s.n_tokens for s in steps]))
    out["warnings"] = warnings
    return out
