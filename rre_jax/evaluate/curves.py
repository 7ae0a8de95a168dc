"""Overoptimization curves of stored rollouts: best-of-n (`bon_curves`) and RL checkpoints (`rl_curves`), each as
a JSON-able dict, a PNG (`plot_curves`) and a ``report.md`` section (`curves_markdown`).

Shapes: ``P`` prompts, ``N`` samples per prompt, ``K`` values of k, ``C`` checkpoints.

Scores are re-centred so the initial policy scores 0: best-of-n subtracts each prompt's mean over its n samples
(the k = 1 point); RL subtracts the step-0 (initial policy) score of the same prompt. Tables and fits are in the
scores' own units; plots divide each score by its standard deviation over the initial policy's responses (gold
"scaled to unit variance"), which leaves every fitted d* unchanged. Every proxy preset scored on the responses is
a variant: best-of-n selects by each variant in turn (its own curve), RL reads every variant on the one trained
policy. See `overoptimization` for the estimator, the fitted forms and the flag.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from rre_jax.evaluate import overoptimization as oo, plots

GOLD = "gold"


def _fit_dict(f: oo.Fit) -> dict:
    return {k: v for k, v in dataclasses.asdict(f).items()}


def _scale(x) -> float:
    s = float(np.nanstd(np.asarray(x, np.float64)))
    return s if s > 0 else 1.0


def bon_curves(proxies: Mapping[str, np.ndarray], gold_PxN, n_tokens_PxN, ks: Sequence[int], *, n_boot: int = 1000,
               seed: int = 0, level: float = 0.95) -> dict:
    """Best-of-k gold and proxy for every variant in ``proxies`` (``{name: f64[P, N]}``), fits, flag, lengths."""
    gold_PxN = np.asarray(gold_PxN, np.float64)
    P, N = gold_PxN.shape
    ks = oo.check_ks(ks, N)
    d_K = np.sqrt(oo.kl_bon(np.asarray(ks)))
    lengths = np.asarray(n_tokens_PxN, np.float64).ravel()
    out = {"kind": "best_of_n", "n": N, "n_prompts": P, "ks": ks, "kl": (d_K ** 2).tolist(), "d": d_K.tolist(),
           "scale": {GOLD: _scale(gold_PxN)}, "variants": {}}
    for name, proxy_PxN in proxies.items():
        proxy_PxN = np.asarray(proxy_PxN, np.float64)
        out["scale"][name] = _scale(proxy_PxN)
        series = {}
        for label, score in ((name, proxy_PxN), (GOLD, gold_PxN)):
            r_PxK = oo.best_of_k_curve(proxy_PxN, score, ks) - score.mean(1, keepdims=True)
            fit = oo.bootstrap_fit("bon", lambda idx: (d_K, r_PxK[idx].mean(0)), P, n_boot=n_boot, seed=seed,
                                   level=level)
            series[label] = {"mean": r_PxK.mean(0).tolist(), "fit": _fit_dict(fit)}
        w = oo.best_of_k_weights(proxy_PxN, N).ravel()
        out["variants"][name] = {
            "proxy": series[name], GOLD: series[GOLD],
            "overoptimized": oo.overoptimized(oo.Fit(**{**series[GOLD]["fit"], "ci": {}}), d_K, series[name]["mean"]),
            "length": {label: oo.length_bucket_gains(lengths, s.ravel(), lengths, s.ravel(), w)
                       for label, s in (("proxy", proxy_PxN), (GOLD, gold_PxN))}}
    return out


def rl_curves(steps: Sequence, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict | None:
    """Gold and every proxy against the sampled d of each stored checkpoint (`store.StepRollouts` with
    ``extra["kl"]``), re-centred on step 0 (the initial policy). ``None`` when no step records a KL."""
    steps = [s for s in steps if "kl" in s.extra]
    if not steps:
        return None
    steps = sorted(steps, key=lambda s: s.step)
    out = {"kind": "rl", "steps": [s.step for s in steps], "n_prompts": len(steps[0]),
           "kl": [s.extra["kl"]["kl"] for s in steps], "kl_stderr": [s.extra["kl"]["stderr"] for s in steps],
           "sampling": dict(steps[0].sampling), "train_proxy": steps[0].train_proxy, "variants": {}}
    if steps[0].step != 0:
        out["missing_initial"] = True  # no d = 0 anchor: nothing is re-centred or fitted
        return out
    lr_CxP = np.array([s.extra["kl"]["log_ratio"] for s in steps], np.float64)
    series = {GOLD: np.array([s.gold for s in steps])}
    series.update({name: np.array([s.proxies[name] for s in steps]) for name in steps[0].proxies})
    out["scale"] = {k: _scale(v[0]) for k, v in series.items()}

    def points(v_CxP):
        return lambda idx: (np.sqrt(np.maximum(lr_CxP[:, idx].mean(1), 0.0)), (v_CxP[:, idx] - v_CxP[0, idx]).mean(1))
    d_C = points(series[GOLD])(np.arange(lr_CxP.shape[1]))[0]
    out["d"] = d_C.tolist()
    for name, v_CxP in series.items():
        fit = oo.bootstrap_fit("rl", points(v_CxP), v_CxP.shape[1], n_boot=n_boot, seed=seed, level=level)
        out["variants"][name] = {"mean": (v_CxP - v_CxP[0]).mean(1).tolist(), "fit": _fit_dict(fit)}
    gold_fit = oo.Fit(**{**out["variants"][GOLD]["fit"], "ci": {}})
    out["overoptimized"] = {name: oo.overoptimized(gold_fit, d_C, v["mean"])
                            for name, v in out["variants"].items() if name != GOLD}
    n0, n1 = steps[0].n_tokens, steps[-1].n_tokens
    if n0 is not None and n1 is not None:
        out["length"] = {name: oo.length_bucket_gains(n0, v[0], n1, v[-1]) for name, v in series.items()}
    return out


# ======================================================================================= report

def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"


def _ci(fit: Mapping, key: str) -> str:
    lo, hi = fit.get("ci", {}).get(key, (math.nan, math.nan))
    return "n/a" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{lo:.3g}, {hi:.3g}]"


def _fit_row(name: str, fit: Mapping) -> str:
    return (f"| {name} | {_f(fit['alpha'])} {_ci(fit, 'alpha')} | {_f(fit['beta'])} {_ci(fit, 'beta')} | "
            f"{_f(fit['d_star'])} {_ci(fit, 'd_star')} | {_f(fit['r_star'])} | {_f(fit['r2'])} |")


FIT_HEAD = ["| series | alpha (CI) | beta (CI) | d* (CI) | R* | R^2 |", "|---|---|---|---|---:|---:|"]


def _length_rows(name: str, gains: Mapping) -> str:
    return (f"| {name} | {_f(gains['overall'])} | {_f(gains['within'])} | {_f(gains['length_share'])} | "
            + " / ".join(_f(b["gain"]) for b in gains["buckets"]) + " |")


LENGTH_HEAD = ["| score | gain | within length buckets | share from length | gain per bucket (short to long) |",
               "|---|---:|---:|---:|---|"]


def curves_markdown(curves: Mapping, png: str, *, gold_random: bool) -> list[str]:
    """The ``report.md`` section of `bon_curves` or `rl_curves` output, linking the plot ``png``."""
    rl = curves["kind"] == "rl"
    out = ["## Overoptimization curves (" + ("RL checkpoints" if rl else f"best-of-n, n = {curves['n']}") + ")", ""]
    if gold_random:
        out += ["> **WARNING: THE GOLD RM IS A RANDOMLY INITIALISED STAND-IN**: the gold curves below only check "
                "the plumbing.", ""]
    if rl and curves.get("missing_initial"):
        return out + ["No eval of the initial policy is stored, so there is no d = 0 anchor to re-centre on: add it "
                      "with `rre-eval --steps 0 --skip-existing` (step 0 = the initial policy).", ""]
    out += ["Gold and proxy against d = sqrt(KL) (nats), re-centred so the initial policy scores 0; fitted "
            + ("R_RL(d) = d (alpha - beta log d)" if rl else "R_bon(d) = d (alpha - beta d)")
            + f"; intervals: prompt bootstrap ({curves['n_prompts']} prompts).", "", f"![overoptimization]({png})", ""]
    if rl:
        names = list(curves["variants"])
        out += ["| step | KL (SE) | d | " + " | ".join(names) + " |", "|---:|---|---:|" + "---:|" * len(names)]
        for c, step in enumerate(curves["steps"]):
            out.append(f"| {step} | {_f(curves['kl'][c])} ({_f(curves['kl_stderr'][c], 2)}) | {_f(curves['d'][c])} | "
                       + " | ".join(_f(curves["variants"][n]["mean"][c]) for n in names) + " |")
        out += ["", *FIT_HEAD] + [_fit_row(n, v["fit"]) for n, v in curves["variants"].items()]
        out += [""] + [f"- **OVEROPTIMIZATION**: d passed the fitted gold peak while proxy `{n}` still rises"
                       for n, flag in curves["overoptimized"].items() if flag]
        if "length" in curves:
            out += ["", f"Length diagnostics: step {curves['steps'][-1]} against the initial policy, buckets of "
                    "response tokens", "", *LENGTH_HEAD] + [_length_rows(n, g) for n, g in curves["length"].items()]
        return out + [""]
    names = list(curves["variants"])
    out += ["| k | KL | d | " + " | ".join(f"{n}: proxy / gold" for n in names) + " |",
            "|---:|---:|---:|" + "---|" * len(names)]
    for j, k in enumerate(curves["ks"]):
        out.append(f"| {k} | {_f(curves['kl'][j])} | {_f(curves['d'][j])} | " + " | ".join(
            f"{_f(v['proxy']['mean'][j])} / {_f(v[GOLD]['mean'][j])}" for v in curves["variants"].values()) + " |")
    out += ["", *FIT_HEAD]
    for n, v in curves["variants"].items():
        out += [_fit_row(f"{n}: proxy", v["proxy"]["fit"]), _fit_row(f"{n}: gold", v[GOLD]["fit"])]
    out += [""] + [f"- **OVEROPTIMIZATION** under `{n}`: d passed the fitted gold peak while the proxy still rises"
                   for n, v in curves["variants"].items() if v["overoptimized"]]
    out += ["", f"Length diagnostics: best of {curves['n']} against all samples, buckets of response tokens", "",
            *LENGTH_HEAD]
    for n, v in curves["variants"].items():
        out += [_length_rows(f"{n}: {label}", g) for label, g in v["length"].items()]
    return out + [""]


# ======================================================================================= plot

def _draw(ax, form: str, d, mean, fit: Mapping, scale: float, label: str, color: str) -> None:
    ax.plot(d, np.asarray(mean) / scale, "o", color=color, label=label)
    if math.isfinite(fit["alpha"]):
        grid = np.linspace(0.0, max(max(d), 1e-6) * 1.15, 200)
        ax.plot(grid, oo.predict(form, fit["alpha"], fit["beta"], grid) / scale, "-", color=color, alpha=0.7)


def plot_curves(curves: Mapping, path, *, gold_random: bool):
    """Best-of-n: one panel per variant (its proxy and the gold of its selections). RL: one panel, every series.
    Scores in units of their standard deviation over the initial policy's responses."""
    rl = curves["kind"] == "rl"
    names = [GOLD] if rl else list(curves["variants"])
    fig = Figure(figsize=(4.2 * len(names) + 1, 4.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names), sharey=True))
    colors = ["tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"] * 3
    for ax, name in zip(axes, names):
        if rl:
            for c, (series, v) in enumerate(curves["variants"].items()):
                _draw(ax, "rl", curves["d"], v["mean"], v["fit"], curves["scale"][series], series,
                      "black" if series == GOLD else colors[c])
            ax.set_title(f"RL checkpoints (trained on {curves['train_proxy']})")
        else:
            v = curves["variants"][name]
            _draw(ax, "bon", curves["d"], v["proxy"]["mean"], v["proxy"]["fit"], curves["scale"][name],
                  f"proxy {name}", "tab:blue")
            _draw(ax, "bon", curves["d"], v[GOLD]["mean"], v[GOLD]["fit"], curves["scale"][GOLD], GOLD, "black")
            ax.set_title(f"best-of-{curves['n']} by {name}" + (" (OVEROPTIMIZED)" if v["overoptimized"] else ""))
        ax.axhline(0.0, color="gray", lw=0.5)
        ax.set_xlabel("d = sqrt(KL) [sqrt(nats)]")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("score gain / std at the initial policy")
    if gold_random:
        fig.suptitle(plots.RANDOM_GOLD_BANNER, color="white", fontsize=12, fontweight="bold",
                     bbox={"facecolor": "red", "edgecolor": "red"})
    return plots.save_png(fig, path)
