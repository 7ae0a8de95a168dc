"""PNG plots of a monotonicity summary (see `rre_jax.evaluate.summary`), drawn with matplotlib's Agg canvas.

Figures are built with ``matplotlib.figure.Figure`` directly (no ``pyplot``), so nothing here changes the
caller's matplotlib backend or global state (safe inside Colab / notebooks) and no display is needed.

Shapes: ``C`` checkpoints; ``N`` prompts.
"""
from __future__ import annotations

import io
import math
import os
import pathlib
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from rre_jax.evaluate import store

GROUP_STYLE = {"all": ("black", "-", "all"), "OPENENDED": ("tab:blue", "--", "open-ended"),
               "CONSTRAINED": ("tab:orange", ":", "constrained")}
RANDOM_GOLD_BANNER = "GOLD RM IS RANDOM - gold scores are meaningless"


def save_png(fig: Figure, path: pathlib.Path) -> pathlib.Path:
    """Saves ``fig`` as PNG through a temporary file renamed over ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    store.write_atomic(path, buf.getvalue())
    return path


def _label(name: str) -> str:
    return f"proxy {name.split(':', 1)[1]}" if name.startswith("proxy:") else name


def _banner(fig: Figure, summary: Mapping) -> None:
    if summary["gold_rm"]["random"]:
        fig.suptitle(RANDOM_GOLD_BANNER, color="white", fontsize=12, fontweight="bold",
                     bbox={"facecolor": "red", "edgecolor": "red"})


def _minmax(v_C: Sequence[float]) -> np.ndarray:
    v_C = np.asarray(v_C, np.float64)
    lo, hi = np.nanmin(v_C), np.nanmax(v_C)
    return np.full_like(v_C, 0.5) if not hi > lo else (v_C - lo) / (hi - lo)


def plot_proxy_gold(summary: Mapping, path: str | os.PathLike) -> pathlib.Path:
    """Left: training proxy (and RER) vs gold on twin y-axes. Right: every proxy and gold, min-max normalised."""
    steps, means, corr = summary["steps"], summary["means"]["all"], summary["correlations"]["all"]
    proxies = [s for s in summary["series"] if s.startswith("proxy:")]
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    ax, ax_n = fig.subplots(1, 2)
    colors = dict(zip(proxies, ["tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
                                "tab:cyan", "tab:gray"] * 4))
    head = list(dict.fromkeys(p for p in (f"proxy:{summary['train_proxy']}", f"proxy:{summary['eval_proxy']}")
                              if p in means))
    for name in head:
        rho = corr[name]["spearman"]
        ax.plot(steps, means[name], "o-", color=colors[name], label=f"{_label(name)} (Spearman {rho:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("proxy reward (mean over prompts)")
    gold_ax = ax.twinx()
    gold_ax.plot(steps, means["gold"], "s-", color="tab:red", label="gold RM")
    gold_ax.set_ylabel("gold reward (mean over prompts)", color="tab:red")
    gold_ax.tick_params(axis="y", colors="tab:red")
    lines = ax.get_legend_handles_labels()[0] + gold_ax.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="best", fontsize=8)
    ax.set_title("training proxy / RER vs gold")
    for name in proxies:
        ax_n.plot(steps, _minmax(means[name]), "o-", color=colors[name], lw=1.2, ms=3,
                  label=f"{_label(name)} ({corr[name]['spearman']:.2f})")
    ax_n.plot(steps, _minmax(means["gold"]), "s-", color="tab:red", lw=2.5, label="gold RM")
    ax_n.set_xlabel("step")
    ax_n.set_ylabel("min-max normalised mean")
    ax_n.set_title("all proxies vs gold (Spearman in legend)")
    ax_n.legend(loc="best", fontsize=8)
    _banner(fig, summary)
    return save_png(fig, pathlib.Path(path))


def plot_series(summary: Mapping, path: str | os.PathLike) -> pathlib.Path:
    """One panel per series (features, proxies, gold): per-checkpoint mean per query-type group vs step."""
    names = summary["series"]
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(3.6 * ncols, 2.9 * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        for group, means in summary["means"].items():
            color, style, label = GROUP_STYLE.get(group, ("gray", "-.", group))
            ax.plot(summary["steps"], means[name], style, marker="o", ms=3, color=color, label=label)
        rho = summary["correlations"]["all"].get(name, {}).get("spearman")
        ax.set_title(_label(name) + ("" if rho is None else f"  (Spearman vs gold {rho:.2f})"), fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7, loc="best")
    _banner(fig, summary)
    return save_png(fig, pathlib.Path(path))


def plot_length_histograms(steps: Sequence[int], words_per_step: Sequence[Sequence[int]],
                           path: str | os.PathLike) -> pathlib.Path:
    """Small multiples: the response-length (words) histogram at each checkpoint, on shared bins and axes."""
    ncols = min(5, len(steps))
    nrows = math.ceil(len(steps) / ncols)
    fig = Figure(figsize=(3.0 * ncols, 2.3 * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)).ravel()
    every = np.concatenate([np.asarray(w, np.float64) for w in words_per_step] + [np.zeros(1)])
    top = max(float(np.percentile(every, 99.5)), 1.0)  # longer responses pile up in the last bin
    bins = np.linspace(0, top, 31)
    for ax, step, words in zip(axes, steps, words_per_step):
        words = np.asarray(words)
        ax.hist(np.minimum(words, top), bins=bins, color="tab:blue", alpha=0.8)
        if words.size:
            ax.axvline(words.mean(), color="black", lw=1)
            ax.axvline(np.median(words), color="tab:red", lw=1, ls="--")
        ax.set_title(f"step {step}  (mean {words.mean() if words.size else float('nan'):.0f})", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[len(steps):]:
        ax.set_visible(False)
    fig.supxlabel(f"response length in words (last bin: >= {top:.0f}; black = mean, red dashed = median)",
                  fontsize=9)
    fig.supylabel("prompts", fontsize=9)
    return save_png(fig, pathlib.Path(path))
