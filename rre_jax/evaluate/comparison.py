"""The comparison of a sweep's members: the paper's table and one figure, from each member's monotonicity summary.

``rre-eval --workdir <sweep workdir>`` evaluates every member as its own ``rre-eval`` would (its report in
``<workdir>/<member>/eval``), then `write` puts the members side by side in ``<workdir>/comparison/``::

    comparison.json   every number below (NaN as null)
    comparison.md     the table: one row per member, then one per preset across its seeds
    comparison.png    gold and RER means against the checkpoint step, one line per member

Per member (the numbers of its last evaluated checkpoint unless said otherwise): the training proxy and RER
(scored for every member, as the paper's evaluation does), gold, gold's gain over the first evaluated checkpoint,
Spearman between the per-checkpoint means of the training proxy (and of RER) and of gold across the checkpoints,
and the mean length in words. Per preset with two or more seeds: the mean over seeds and a 95% t-interval
(``mean +- t(0.975, n-1) s / sqrt(n)``, ``s`` the seeds' sample standard deviation) of each number.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from rre_jax.evaluate import plots, store
from rre_jax.evaluate.report import json_safe

COLUMNS = {"proxy": "training proxy", "rer": "RER", "gold": "gold", "gold_gain": "gold gain",
           "spearman_proxy": "Spearman (proxy, gold)", "spearman_rer": "Spearman (RER, gold)", "words": "words"}
LEVEL = 0.95


def _num(v) -> float:
    return math.nan if v is None else float(v)


def member_row(summary: Mapping) -> dict:
    """A member's numbers (`COLUMNS`) from its monotonicity summary (`rre_jax.evaluate.summary.summarize`)."""
    means, corr = summary["means"]["all"], summary["correlations"]["all"]
    train = f"proxy:{summary['train_proxy']}"
    rer = "proxy:rer"
    last = lambda name: _num(means[name][-1]) if name in means else math.nan  # noqa: E731
    return {"steps": list(summary["steps"]), "proxy": last(train), "rer": last(rer), "gold": last("gold"),
            "gold_gain": last("gold") - _num(means["gold"][0]),
            "spearman_proxy": _num(corr.get(train, {}).get("spearman")),
            "spearman_rer": _num(corr.get(rer, {}).get("spearman")),
            "words": _num(summary["lengths"]["words"]["mean"][-1]), "gold_random": summary["gold_rm"]["random"]}


def across_seeds(values: Sequence[float], level: float = LEVEL) -> dict:
    """``{mean, lo, hi, n}`` of one number over a preset's seeds: the mean and its t-interval (NaN below 2)."""
    v = np.asarray([x for x in values if math.isfinite(x)], np.float64)
    if len(v) < 2:
        return {"mean": float(v.mean()) if len(v) else math.nan, "lo": math.nan, "hi": math.nan, "n": len(v)}
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return {"mean": float(v.mean()), "lo": float(v.mean() - half), "hi": float(v.mean() + half), "n": len(v)}


def compare(members: Sequence[Mapping]) -> dict:
    """``members``: ``{name, preset, seed, summary}`` each, in the sweep's order -> the comparison (rows per
    member, and per preset across its seeds)."""
    rows = [{"member": m["name"], "preset": m["preset"], "seed": m["seed"], **member_row(m["summary"])}
            for m in members]
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    by_preset = {p: {c: across_seeds([r[c] for r in rows if r["preset"] == p]) for c in COLUMNS} for p in presets}
    return {"members": rows, "presets": by_preset, "level": LEVEL, "columns": COLUMNS,
            "gold_random": any(r["gold_random"] for r in rows)}


def _f(v, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def render_markdown(table: Mapping, png: str) -> str:
    """The comparison as Markdown: the members' table, the presets' table across seeds, the figure."""
    cols = list(COLUMNS)
    out = ["# Sweep comparison", ""]
    if table["gold_random"]:
        out += [f"**{plots.RANDOM_GOLD_BANNER}**", ""]
    out += ["Numbers of each member's last evaluated checkpoint; Spearman across its checkpoints (docs/design.md "
            "4.5).", "", "| member | checkpoints | " + " | ".join(COLUMNS[c] for c in cols) + " |",
            "|---|---|" + "---:|" * len(cols)]
    for r in table["members"]:
        out.append(f"| {r['member']} | {','.join(map(str, r['steps']))} | " + " | ".join(_f(r[c]) for c in cols) + " |")
    seeded = {p: v for p, v in table["presets"].items() if v["gold"]["n"] > 1}
    if seeded:
        out += ["", f"Across seeds: mean [{table['level']:.0%} t-interval].", "",
                "| preset | seeds | " + " | ".join(COLUMNS[c] for c in cols) + " |", "|---|---:|" + "---:|" * len(cols)]
        for p, v in seeded.items():
            cells = [f"{_f(v[c]['mean'])} [{_f(v[c]['lo'], 3)}, {_f(v[c]['hi'], 3)}]" for c in cols]
            out.append(f"| {p} | {v['gold']['n']} | " + " | ".join(cells) + " |")
    out += ["", f"![gold and RER against the step, one line per member]({png})", ""]
    return "\n".join(out)


def plot(members: Sequence[Mapping], path, gold_random: bool) -> pathlib.Path:
    """Gold (left) and RER (right) means against the checkpoint step, one line per member: a colour per preset,
    a line style per seed."""
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    presets = list(dict.fromkeys(m["preset"] for m in members))
    seeds = list(dict.fromkeys(m["seed"] for m in members))
    colors = dict(zip(presets, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"] * 4))
    styles = dict(zip(seeds, ["-", "--", ":", "-."] * 8))
    for ax, series, title in zip(axes, ("gold", "proxy:rer"), ("gold RM", "RER (every member scored with it)")):
        for m in members:
            s = m["summary"]
            y = [_num(v) for v in s["means"]["all"].get(series, [])]
            if y:
                ax.plot(s["steps"], y, styles[m["seed"]], marker="o", color=colors[m["preset"]], label=m["name"])
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel(f"mean {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if gold_random:
        fig.suptitle(plots.RANDOM_GOLD_BANNER, color="white", fontsize=12, fontweight="bold",
                     bbox={"facecolor": "red", "edgecolor": "red"})
    return plots.save_png(fig, pathlib.Path(path))


def write(out_dir: str | os.PathLike, members: Sequence[Mapping]) -> dict:
    """`compare` the ``members`` and write ``comparison.json``, ``comparison.md`` and ``comparison.png`` into
    ``out_dir``; returns the comparison."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = compare(members)
    plot(members, out_dir / "comparison.png", table["gold_random"])
    store.write_atomic(out_dir / "comparison.json", json.dumps(json_safe(table), indent=1, allow_nan=False))
    store.write_atomic(out_dir / "comparison.md", render_markdown(table, "comparison.png"))
    return table
