"""The best-of-n curves of one policy's stored samples: ``curves.json``, ``curves.png`` and ``report.md`` rebuilt
from ``<out>/samples/step_<S>`` (the rollout store; ``rre_jax.best_of_n`` samples and stores them).

For each k, the exact expected gold and proxy of the proxy-selected best of k (`overoptimization.best_of_k`) under
each stored proxy, against d = sqrt(KL_bon(k)), with the fits, the flag and the length diagnostics
(`curves.bon_curves`). Plain arrays from the store in, numbers and figures out.
"""
from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np

from rre_jax.evaluate import curves, store
from rre_jax.evaluate.report import json_safe

SAMPLES_DIR = "samples"
CURVES_FILE = "curves.json"
PLOT_FILE = "curves.png"
REPORT_FILE = "report.md"


def report(out_dir, step: int, ks: Sequence[int] | None = None, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Rebuild ``curves.json``, ``curves.png`` and ``report.md`` from ``out_dir/samples/step_<step>``."""
    out_dir = pathlib.Path(out_dir)
    r = store.load_step(out_dir / SAMPLES_DIR, step)
    n = int(r.extra["best_of_n"]["n"])
    P = len(r) // n
    grid = lambda x: np.asarray(x, np.float64).reshape(P, n)  # noqa: E731
    if len(r) != P * n or any(r.instruction[p * n + j] != r.instruction[p * n] for p in range(P) for j in range(n)):
        raise store.StoreError(f"{out_dir / SAMPLES_DIR}: rows are not {n} samples of each prompt in turn")
    result = curves.bon_curves({k: grid(v) for k, v in r.proxies.items()}, grid(r.gold), grid(r.n_tokens),
                               ks or r.extra["best_of_n"]["ks"], n_boot=n_boot, seed=seed)
    result.update(step=step, gold_rm={"name": r.gold_rm, "random": r.gold_rm_random}, sampling=r.sampling,
                  train_proxy=r.train_proxy, relevance_text=r.relevance_text)
    curves.plot_curves(result, out_dir / PLOT_FILE, gold_random=r.gold_rm_random)
    store.write_atomic(out_dir / CURVES_FILE, json.dumps(json_safe(result), indent=1, allow_nan=False))
    head = [f"# rre_jax best-of-n report (step {step})", "",
            f"- policy: {'the initial policy' if step == 0 else f'checkpoint {step}'}; {P} prompts x {n} samples; "
            f"sampling {r.sampling}", f"- gold RM: `{r.gold_rm or '(none)'}`" + (" **(RANDOM)**" if r.gold_rm_random
                                                                                  else ""),
            f"- relevance (QR, AR) embedded: {store.RELEVANCE_TEXT_NAMES.get(r.relevance_text, r.relevance_text)}",
            ""]
    text = head + curves.curves_markdown(result, PLOT_FILE, gold_random=r.gold_rm_random)
    store.write_atomic(out_dir / REPORT_FILE, "\n".join(text))
    return result

