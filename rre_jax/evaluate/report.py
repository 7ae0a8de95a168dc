"""The monotonicity report: ``summary.json``, PNG plots and ``report.md``, rebuilt from the rollout store.

``refresh_report(root)`` is cheap enough to call after every checkpoint's eval during training: it reads every
stored step under ``root`` (see `rre_jax.evaluate.store`), recomputes the statistics
(`rre_jax.evaluate.summary.summarize`) and rewrites, each atomically::

    root/summary.json   every number of the report (NaN as null)
    root/report.md      tables + verdict, linking the plots below
    root/plots/proxy_vs_gold.png, root/plots/series.png, root/plots/length_hist.png
    root/rl_curves.json, root/plots/rl_curves.png   when the steps recorded their sampled KL (`curves`)
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Mapping

from rre_jax.evaluate import curves, plots, store
from rre_jax.evaluate.monotonicity import word_counts
from rre_jax.evaluate.summary import GOLD, summarize

REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"
RL_CURVES_FILE = "rl_curves.json"
PLOTS_DIR = "plots"


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _ci(c: Mapping, key: str) -> str:
    lo, hi = c[f"{key}_ci"]
    return "n/a" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{lo:.3f}, {hi:.3f}]"


def _means_table(summary: Mapping, group: str) -> list[str]:
    names = summary["series"]
    rows = [f"| step | {' | '.join(n.replace('proxy:', 'proxy ') for n in names)} |",
            "|---:|" + "---:|" * len(names)]
    for c, step in enumerate(summary["steps"]):
        rows.append(f"| {step} | " + " | ".join(_fmt(summary["means"][group][n][c]) for n in names) + " |")
    return rows


def _corr_table(summary: Mapping, group: str) -> list[str]:
    level = summary["bootstrap"]["level"]
    rows = [f"| series | Spearman | p | {level:.0%} CI | Kendall | p | {level:.0%} CI | note |",
            "|---|---:|---:|---|---:|---:|---|---|"]
    for name, c in summary["correlations"][group].items():
        rows.append(f"| {name.replace('proxy:', 'proxy ')} | {_fmt(c['spearman'])} | {_fmt(c['spearman_p'])} | "
                    f"{_ci(c, 'spearman')} | {_fmt(c['kendall'])} | {_fmt(c['kendall_p'])} | "
                    f"{_ci(c, 'kendall')} | {c['reason']} |")
    return rows


def _length_table(summary: Mapping) -> list[str]:
    kinds = list(summary["lengths"])
    head = " | ".join(f"{k} {s}" for k in kinds for s in ("mean", "median", "p90"))
    rows = [f"| step | {head} |", "|---:|" + "---:|" * (3 * len(kinds))]
    for c, step in enumerate(summary["steps"]):
        cells = [_fmt(summary["lengths"][k][s][c]) for k in kinds for s in ("mean", "median", "p90")]
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    return rows


def _headline(summary: Mapping) -> list[str]:
    corr = summary["correlations"]["all"]
    lines = []
    seen = set()
    for key, what in (("train_proxy", "training proxy"), ("eval_proxy", "RER (scored at every checkpoint)")):
        name = summary.get(key)
        if name and f"proxy:{name}" in corr and name not in seen:
            seen.add(name)
            c = corr[f"proxy:{name}"]
            lines.append(f"- **{what} `{name}` vs gold**: Spearman {_fmt(c['spearman'])} (p {_fmt(c['spearman_p'])}, "
                         f"CI {_ci(c, 'spearman')}), Kendall {_fmt(c['kendall'])} (p {_fmt(c['kendall_p'])})"
                         + (f" - {c['reason']}" if c["reason"] else ""))
    k = summary["hacking_settings"]["k"]
    for name, h in summary["hacking"].items():
        if h["flagged"]:
            window = ", ".join(map(str, h["window_steps"]))
            lines.append(f"- **REWARD HACKING FLAG** for {name.replace('proxy:', 'proxy ')}: over steps {window} "
                         f"the proxy rose by {h['proxy_change']:.4g} while gold fell by {-h['gold_change']:.4g}")
    if not any(h["flagged"] for h in summary["hacking"].values()):
        lines.append(f"- reward-hacking flag (proxy up, gold down over the last {k} checkpoints): not raised")
    return lines


def _relevance_text(summary: Mapping) -> str:
    value = summary.get("relevance_text", "")
    names = value if isinstance(value, list) else [value]
    return "; ".join(store.RELEVANCE_TEXT_NAMES.get(v, v) for v in names)


def render_markdown(summary: Mapping, plot_files: Mapping[str, str]) -> str:
    """The text of ``report.md`` for a `summarize` result; ``plot_files`` maps a title to a relative path."""
    gold = summary["gold_rm"]
    out = ["# rre_jax monotonicity report", ""]
    if gold["random"]:
        out += ["> **WARNING: THE GOLD RM IS A RANDOMLY INITIALISED STAND-IN.** Gold scores, and every correlation",
                "> with them below, are meaningless: this run only checks the plumbing.", ""]
    out += [f"> **{w}**" for w in summary["warnings"] if not w.startswith("THE GOLD RM IS A RANDOM")]
    out += [""] if summary["warnings"] and not gold["random"] else []
    out += [f"- checkpoints: {summary['steps']}", f"- prompts per checkpoint: {summary['n_items']} "
            f"({', '.join(f'{g}: {n}' for g, n in summary['counts'].items() if g != 'all')})",
            f"- gold RM: `{gold['name'] or '(unnamed)'}`" + (" **(RANDOM)**" if gold["random"] else ""),
            f"- training proxy: `{summary['train_proxy']}`; evaluation proxy: `{summary['eval_proxy']}`",
            f"- relevance (QR, AR) embedded: {_relevance_text(summary)}",
            f"- bootstrap: {summary['bootstrap']['n_boot']} prompt resamples, seed {summary['bootstrap']['seed']}, "
            "percentile intervals", "", "## Verdict", ""] + _headline(summary)
    out += ["", "## Plots", ""] + [f"![{title}]({rel})" for title, rel in plot_files.items()]
    for group in summary["means"]:
        out += ["", f"## Per-checkpoint means ({group}, {summary['counts'][group]} prompts)", ""]
        out += _means_table(summary, group)
        out += ["", f"### Correlation of each series with {GOLD} across checkpoints ({group})", ""]
        out += _corr_table(summary, group)
    out += ["", "## Response lengths", ""] + _length_table(summary)
    k = summary["hacking_settings"]
    out += ["", f"Reward-hacking flag: over the last {k['k']} checkpoints the proxy mean rises monotonically by more "
            f"than {k['min_proxy_rise']} while the gold mean falls monotonically by more than {k['min_gold_drop']}.",
            ""]
    return "\n".join(out)


def json_safe(obj):
    """``obj`` (nested dicts, lists, tuples) with every non-finite float as None, for strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def refresh_report(root: str | os.PathLike, *, k: int = 3, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95, min_proxy_rise: float = 0.0, min_gold_drop: float = 0.0) -> dict:
    """Rebuilds ``summary.json``, the plots and ``report.md`` under ``root`` from every stored step.

    Returns the summary dict. With no stored step it writes a report saying so. See `summarize` and
    `monotonicity.hacking_flag` for the parameters.
    """
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    steps = store.load_steps(root)
    if not steps:
        text = f"# rre_jax monotonicity report\n\nNo stored checkpoints under {root}.\n"
        store.write_atomic(root / REPORT_FILE, text)
        return summarize([])
    summary = summarize(steps, k=k, n_boot=n_boot, seed=seed, level=level, min_proxy_rise=min_proxy_rise,
                        min_gold_drop=min_gold_drop)
    (root / PLOTS_DIR).mkdir(exist_ok=True)
    files = {"proxy and gold vs step": plots.plot_proxy_gold(summary, root / PLOTS_DIR / "proxy_vs_gold.png"),
             "every series vs step": plots.plot_series(summary, root / PLOTS_DIR / "series.png"),
             "response-length histograms": plots.plot_length_histograms(
                 summary["steps"], [word_counts(s.response) for s in steps], root / PLOTS_DIR / "length_hist.png")}
    store.write_atomic(root / SUMMARY_FILE, json.dumps(json_safe(summary), indent=1, allow_nan=False))
    text = render_markdown(summary, {t: p.relative_to(root).as_posix() for t, p in files.items()})
    rl = curves.rl_curves(steps, n_boot=n_boot, seed=seed, level=level)
    if rl is not None:  # steps that recorded their sampled KL: the RL overoptimization curves
        if "d" in rl:
            curves.plot_curves(rl, root / PLOTS_DIR / "rl_curves.png", gold_random=summary["gold_rm"]["random"])
        store.write_atomic(root / RL_CURVES_FILE, json.dumps(json_safe(rl), indent=1, allow_nan=False))
        text += "\n" + "\n".join(curves.curves_markdown(rl, f"{PLOTS_DIR}/rl_curves.png",
                                                         gold_random=summary["gold_rm"]["random"]))
    store.write_atomic(root / REPORT_FILE, text)
    return summary
