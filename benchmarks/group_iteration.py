"""One GRPO / RLOO iteration beside one PPO iteration on the same number of responses, in one run.

    python benchmarks/group_iteration.py [--algos ppo,grpo,rloo] [--mode lora] [--group-iterations 1]

Workload: the random "mid" Llama (58.5M params, fp32, LoRA rank 8 on q/v: ``common.MID_MODEL``), 16 responses of
128 sampled tokens (no early stop) after 64-token prompts, a host reward (LI*RP of the decoded text), then the
update with the paper's layout (mini-batch 2 x gradient accumulation 4). PPO samples 16 seeded prompts once and
runs 4 epochs with its critic (8 optimizer steps); GRPO / RLOO sample 4 of those prompts 4 times each
(``num_generations`` = 4) and run trl 1.16.0's defaults: ``num_iterations`` = 1 pass (2 optimizer steps), GRPO
with ``beta`` = 0 (no reference pass), RLOO with ``beta`` = 0.05 (a reference pass). Each algorithm runs in its
own process (peak RSS per algorithm) with one untimed warm-up iteration (compilation), then one timed iteration
per phase with ``block_until_ready``. The programs are the trainer's own (``rre_jax.train``).
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

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # this checkout's rre_jax, not whichever one the venv has installed
import common  # noqa: E402
from ppo_iteration import RSS_TRACE, mark, mid_model_state, timed_iteration  # noqa: E402

G = 4  # responses per prompt of the group methods


def _algorithm(algo: str, work, group_iterations: int):
    """``None`` (PPO) or the group method ``algo`` at the benchmark's shapes, for ``mid_model_state``."""
    from rre_jax import grpo
    if algo == "ppo":
        return None

    def of(pcfg):
        group_cfg = grpo.GroupConfig(algo=algo, num_generations=G, beta=0.05 if algo == "rloo" else 0.0,
                                num_iterations=group_iterations, batch_size=work.batch,
                                mini_batch_size=work.mini_batch, gradient_accumulation_steps=work.grad_accum,
                                max_completion_length=work.new_tokens)
        return grpo.GroupMethod(group_cfg, pcfg)
    return of


def child(algo: str, mode: str, out: str, group_iterations: int) -> None:
    import jax.numpy as jnp
    from rre_jax import sampling
    from rre_jax.configs import defaults
    mark("imports")
    work = common.Workload()
    cfg, base, pspec, pcfg, progs, state = mid_model_state(work, mode, "shared", defaults.base_config().model.remat,
                                                           _algorithm(algo, work, group_iterations))
    T, N = work.prompt_len, work.new_tokens  # the trainer's programs at the benchmark's shapes
    experience, update = progs.experience(T, N), progs.update(T, N)
    G_ = progs.algo.samples_per_prompt
    rows = [p for p in range(work.batch // G_) for _ in range(G_)]
    mark("init")
    tok = common.train_tokenizer(cfg.vocab_size, work.seed)
    prompts = common.prompt_ids(work, cfg.vocab_size)[rows]  # group methods: each of 4 prompts 4 times
    ids = jnp.asarray(prompts, jnp.int32)
    mask = jnp.ones_like(ids)
    scfg = sampling.SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=work.new_tokens)
    sampler = progs.sampler(scfg, 1 if algo == "ppo" else G)  # as train_step: a group's prompt prefilled once

    def iteration(state, it):
        state, times, _ = timed_iteration(state, it, pspec, base, sampler, ids, mask, tok, experience, update)
        return state, times

    t = time.perf_counter()
    state, _ = iteration(state, 0)  # warm-up: compiles the programs
    warmup = time.perf_counter() - t
    state, times = iteration(state, 1)
    result = {"algo": algo, "mode": mode, "phases": times, "warmup_s": warmup, "rss_trace": RSS_TRACE,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "prompts": len(set(rows)), "responses": len(rows)}
    pathlib.Path(out).write_text(json.dumps(result, indent=2))


def _cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", default="ppo,grpo,rloo")
    p.add_argument("--mode", default="lora", choices=("lora", "full"))
    p.add_argument("--group-iterations", type=int, default=1, help="GRPO/RLOO num_iterations (trl default 1)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.mode, a.out, a.group_iterations)
    tmp = tempfile.mkdtemp(prefix="rre_group_bench_")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    res = {}
    for algo in a.algos.split(","):
        out = os.path.join(tmp, f"{algo}.json")
        subprocess.run([sys.executable, __file__, "--child", algo, "--out", out, "--mode", a.mode,
                        "--group-iterations", str(a.group_iterations)], env=env, check=True)
        res[algo] = json.loads(pathlib.Path(out).read_text())
    algos = list(res)
    print(f"\nOne iteration, 16 responses x 128 new tokens, mid model, {a.mode}; CPU: {_cpu_model()}, "
          f"{os.cpu_count()} cores  (ratio = ppo / algo)")
    print(f"  {'':<16}" + "".join(f"{x:>12}" for x in algos) + "".join(f"{'ppo/' + x:>12}" for x in algos[1:]))
    for ph in ("generate_s", "reward_s", "experience_s", "update_s", "step_s", "iteration_s"):
        vals = [res[x]["phases"][ph] for x in algos]
        print(f"  {ph:<16}" + "".join(f"{v:>12.2f}" for v in vals)
              + "".join(f"{vals[0] / v:>11.2f}x" for v in vals[1:]))
    for key, fmt in (("peak_rss_mb", "{:>12.0f}"), ("warmup_s", "{:>12.1f}"), ("prompts", "{:>12d}")):
        print(f"  {key:<16}" + "".join(fmt.format(res[x][key]) for x in algos))


if __name__ == "__main__":
    main()
