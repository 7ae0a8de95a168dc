"""Seeded tiny runs of the critic-free methods: GRPO and RLOO against the ``li`` and ``rer`` proxies.

    python scripts/group_learning_curves.py [--steps 40] [--workdir /tmp/rre_group_curves] [--png FILE]

Builds the tiny assets once (``rre_jax.tiny_assets``), trains ``configs/tiny.py:<preset>,<algo>`` for each of the four
combinations (seed 0, the tiny config as shipped), prints the mean proxy of the first and last 10 steps of each
run, and draws the four proxy curves into one PNG (default ``docs/tiny_group_learning_curves.png``). Not a test (minutes on 2 CPU cores); the CI tests run the same
configs for a step or two.
"""
from __future__ import annotations

import argparse
import ast
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's rre_jax


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workdir", default="/tmp/rre_group_curves")
    p.add_argument("--png", default=str(REPO / "docs" / "tiny_group_learning_curves.png"))
    p.add_argument("--runs", default="li,grpo;rer,grpo;li,rloo;rer,rloo")
    p.add_argument("--plot-only", action="store_true", help="draw the finished runs in --workdir, train nothing")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field of every run (value parsed as a Python literal)")
    a = p.parse_args()
    import numpy as np
    from matplotlib.figure import Figure

    from rre_jax import metrics, tiny_assets, train
    from rre_jax.configs import tiny as tiny_config
    from rre_jax.data import tiny_prompts_path

    assets = (tiny_assets.ensure_assets(tiny_config.get_config(), os.path.join(a.workdir, "assets")) if not a.plot_only
              else {"policy": "", "tokenizer": "", "gold_rm": ""})
    curves = {}
    for arg in a.runs.split(";"):
        cfg = tiny_config.get_config(arg)
        cfg.model.path, cfg.tokenizer.path, cfg.gold_rm.path = assets["policy"], assets["tokenizer"], assets["gold_rm"]
        cfg.data.train_file = cfg.data.dev_file = str(tiny_prompts_path())
        cfg.train.steps, cfg.train.save_freq, cfg.train.dev_size = a.steps, a.steps, 4
        cfg.train.export_final = False
        for item in a.set:
            key, value = item.split("=", 1)
            section, field = key.split(".")
            cfg[section][field] = ast.literal_eval(value)
        workdir = os.path.join(a.workdir, arg.replace(",", "_"))
        if not a.plot_only:
            train.run(cfg, workdir)
        rows = {}
        for row in metrics.read_metrics(workdir):
            rows.setdefault(row["step"], {}).update(row)
        curves[arg] = np.array([rows[s]["reward/proxy"] for s in range(1, a.steps + 1)])
        first, last = curves[arg][:10].mean(), curves[arg][-10:].mean()
        print(f"{arg:10s} proxy: first 10 steps {first:.4f}  last 10 steps {last:.4f}  ratio {last / first:.2f}",
              flush=True)
    fig = Figure(figsize=(9, 3.6))
    for i, preset in enumerate(("li", "rer")):
        ax = fig.add_subplot(1, 2, i + 1)
        for arg, proxy in curves.items():
            if arg.startswith(preset + ","):
                steps, color = np.arange(1, len(proxy) + 1), "C1" if arg.endswith("rloo") else "C0"
                smooth = np.convolve(proxy, np.ones(5) / 5, mode="valid")  # 5-step running mean
                ax.plot(steps, proxy, color=color, alpha=0.3, lw=1)
                ax.plot(steps[4:], smooth, color=color, lw=2, label=f"{arg.split(',')[1].upper()} (5-step mean)")
        ax.set_title(f"tiny config, proxy '{preset}' (seed 0)")
        ax.set_xlabel("step")
        ax.set_ylabel("mean proxy reward of the batch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(a.png, dpi=100)
    print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
