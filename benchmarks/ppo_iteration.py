"""One PPO iteration, rre_jax vs the reference's trl 0.7.4 stack, side by side (issue 4).

    python benchmarks/ppo_iteration.py [--modes full,lora] [--threads 2] [--no-reference] [--critic shared]

Workload (benchmarks/README.md): the random "mid" Llama (58.5M params, fp32), 16 seeded prompts x 64 tokens,
128 sampled tokens per row (no early stop), a host reward (LI*RP of the decoded text), then a PPO step of
4 epochs x mini-batch 2 x gradient accumulation 4. Each mode of each stack runs in its own process, so peak RSS
is per mode. The rre_jax half runs one untimed warm-up iteration (compilation) and then times one iteration
per phase with ``block_until_ready``; the update's GFLOP/s uses the same FLOP model as the reference
(``common.update_flops``) and is compared with this CPU's fp32 matmul roofline measured in the same process.
Differences in the rre_jax half: EOS is not suppressed but ignored (rows never stop early), so every row
samples exactly 128 tokens as on the reference side; the LoRA dropout is off (trl's eval-mode PPO passes).
Full mode puts the value head on the policy trunk (``--critic shared``, as trl 0.7.4's
``AutoModelForCausalLMWithValueHead``); ``--critic separate`` trains rre_jax's default separate critic instead
(twice the trainable weights and update work). Each table names the critic it ran. ``RRE_BENCH_TRACE=1`` prints
the child's RSS after each stage as it goes (the JSON holds the same trace).
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


def _roofline(reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(reps))
    return common.matmul_roofline_flops() / best / 1e9


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in pathlib.Path("/proc/self/status").read_text().splitlines()
                  if line.startswith(("VmRSS", "VmHWM")))
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


RSS_TRACE: list = []


def mark(label: str) -> None:
    """Record the RSS (current, peak so far) after ``label``; the child's JSON carries the trace."""
    rss, peak = _rss_mb()
    RSS_TRACE.append({"after": label, "rss_mb": round(rss), "peak_mb": round(peak)})
    if os.environ.get("RRE_BENCH_TRACE"):
        print(f"# rss after {label:<28} {rss:8.0f} MB  (peak {peak:.0f})", file=sys.stderr, flush=True)


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def mid_model_state(work, mode: str, critic: str, remat: str, algo_of=None):
    """``(llama config, base params, policy spec, PPO config, the run's programs, train state)`` of the mid model
    for ``work`` on one device: the trainer's own program builders (``rre_jax.programs.RunPrograms``) for PPO,
    or for the algorithm ``algo_of(ppo config)`` returns (``rre_jax.algorithms``)."""
    import jax
    from rre_jax import assemble, mesh as mesh_lib, policy, ppo, programs
    from rre_jax.models import llama, lora as lora_lib
    cfg = llama.LlamaConfig(**{k: v for k, v in common.MID_MODEL.items()}, rms_norm_eps=1e-6)
    base = llama.init_params(cfg, jax.random.key(work.seed))
    mark("init base params")
    pspec = policy.PolicySpec(cfg, mode, lora_lib.LoraConfig(rank=8, alpha=16.0, dropout=0.0), critic, remat)
    pcfg = ppo.PPOConfig(batch_size=work.batch, mini_batch_size=work.mini_batch,
                         gradient_accumulation_steps=work.grad_accum, ppo_epochs=work.ppo_epochs)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(1, 1, 1)), jax.devices()[:1])
    algo = ppo.PPO(pcfg) if algo_of is None else algo_of(pcfg)
    progs = programs.RunPrograms(mesh, mesh_lib.DEFAULT_RULES, pspec, algo, pcfg, base, eos_id=-1,
                                 pad_id=common.PAD_ID, experience_rows=assemble.experience_rows(pcfg))
    state = progs.init_state(base, jax.random.key(1))
    mark("init trainable + optimizer")
    return cfg, base, pspec, pcfg, progs, state


def timed_iteration(state, it, pspec, base, sampler, ids, mask, tok, experience, update):
    """One iteration of the trainer's programs, timed per phase: ``(state, times, tokens generated)``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from rre_jax import policy
    times = {}
    t = time.perf_counter()
    params, adapters = policy.sampling_params(pspec, state["trainable"], base)
    roll = sampler(params, ids, mask, jax.random.key(10 + it), adapters)
    roll.tokens_BxN.block_until_ready()
    times["generate_s"] = time.perf_counter() - t
    mark(f"generate [{it}]")
    t = time.perf_counter()
    texts = tok.decode_batch(np.asarray(roll.tokens_BxN).tolist())
    score = np.array([common.li_rp(x) for x in texts], np.float32)
    times["reward_s"] = time.perf_counter() - t
    t = time.perf_counter()
    full = jnp.concatenate([ids, roll.tokens_BxN], 1)
    attn = jnp.concatenate([mask, roll.mask_BxN], 1)
    exp = jax.block_until_ready(experience(state["trainable"], base, full, attn))
    times["experience_s"] = time.perf_counter() - t
    mark(f"experience [{it}]")
    t = time.perf_counter()
    state, stats = update(state, base, exp, jnp.asarray(score), full, attn, roll.mask_BxN, jax.random.key(it))
    jax.block_until_ready(state)
    times["update_s"] = time.perf_counter() - t
    mark(f"update [{it}]")
    times["step_s"] = times["experience_s"] + times["update_s"]
    times["iteration_s"] = times["generate_s"] + times["reward_s"] + times["step_s"]
    return state, times, int(np.asarray(roll.mask_BxN).sum())


def child(mode: str, out: str, critic: str, remat: str) -> None:
    """The rre_jax half for one mode; writes the same JSON schema as ppo_reference.py."""
    import jax
    import jax.numpy as jnp
    from rre_jax import sampling
    mark("imports")

    work = common.Workload()
    cfg, base, pspec, pcfg, progs, state = mid_model_state(work, mode, critic, remat)
    tok = common.train_tokenizer(cfg.vocab_size, work.seed)
    prompts = common.prompt_ids(work, cfg.vocab_size)
    ids = jnp.asarray(prompts, jnp.int32)
    mask = jnp.ones_like(ids)
    scfg = sampling.SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=work.new_tokens)
    sampler = progs.sampler(scfg)
    experience = progs.experience(work.prompt_len, work.new_tokens)
    update = progs.update(work.prompt_len, work.new_tokens)

    def iteration(state, it):
        return timed_iteration(state, it, pspec, base, sampler, ids, mask, tok, experience, update)

    t = time.perf_counter()
    state, _, _ = iteration(state, 0)  # warm-up: compiles the three programs
    compile_s = time.perf_counter() - t
    state, times, n_tok = iteration(state, 1)
    roof = _roofline()
    flops = common.update_flops(common.MID_MODEL, work, mode)["total"]
    result = {"stack": "rre_jax", "mode": mode, "critic": "shared" if mode == "lora" else critic, "remat": remat,
              "threads": os.environ.get("RRE_THREADS", ""),
              "phases": times, "warmup_s": compile_s, "tokens_generated": n_tok,
              "generate_tokens_per_s": n_tok / times["generate_s"],
              "update_gflops": flops / times["update_s"] / 1e9, "roofline_gflops": roof,
              "update_roofline_frac": flops / times["update_s"] / 1e9 / roof,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "rss_trace": RSS_TRACE, "workload": {"prompt_sha256": common.ids_digest(prompts)},
              "versions": {"jax": jax.__version__}}
    pathlib.Path(out).write_text(json.dumps(result, indent=2))


def _run_child(mode: str, out: str, threads: int, critic: str, remat: str) -> dict:
    # XLA's CPU client sizes its thread pool to the machine (2 cores here); torch gets --threads.
    env = {**os.environ, "RRE_THREADS": str(threads), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    subprocess.run([sys.executable, __file__, "--child", mode, "--out", out, "--critic", critic, "--remat", remat], env=env,
                   check=True)
    return json.loads(pathlib.Path(out).read_text())


def _row(name, ours, ref, fmt="{:.2f}", higher_is_better=False):
    ratio = f"{(ours / ref if higher_is_better else ref / ours):>8.2f}x" if ours and ref else f"{'-':>9}"
    return f"  {name:<26} {fmt.format(ours):>12} {fmt.format(ref) if ref is not None else '-':>12} {ratio}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-reference", action="store_true", help="run only the rre_jax half")
    p.add_argument("--critic", default="shared", choices=("shared", "separate"),
                   help="full mode's value head: on the policy trunk as trl 0.7.4 (default) or a separate critic")
    p.add_argument("--remat", default=None, choices=("none", "dots", "full"),
                   help="what the update's backward keeps of each layer (default: rre-train's config.model.remat)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.remat is None:
        from rre_jax.configs import defaults
        a.remat = defaults.base_config().model.remat
    if a.child:
        return child(a.child, a.out, a.critic, a.remat)
    tmp = tempfile.mkdtemp(prefix="rre_bench_")
    for mode in a.modes.split(","):
        ours = _run_child(mode, os.path.join(tmp, f"rre_{mode}.json"), a.threads, a.critic, a.remat)
        ref = None if a.no_reference else common.run_reference(mode, os.path.join(tmp, f"ref_{mode}.json"),
                                                                "--threads", str(a.threads))
        if ref and ref["workload"]["prompt_sha256"] != ours["workload"]["prompt_sha256"]:
            raise SystemExit("the two halves fed different prompts")
        g = lambda d, *k: None if d is None else (d[k[0]] if len(k) == 1 else d[k[0]][k[1]])  # noqa: E731
        print(f"\nPPO iteration, mode={mode}, critic={ours['critic']} (trl 0.7.4: shared), remat={a.remat}, "
              f"{a.threads} threads  "
              "(ratio = trl / rre_jax time, or rre_jax / trl rate)")
        print(f"  {'':<26} {'rre_jax':>12} {'trl 0.7.4':>12} {'ratio':>9}")
        for ph in ("generate_s", "reward_s", "experience_s", "update_s", "step_s", "iteration_s"):
            print(_row(ph, ours["phases"][ph], g(ref, "phases", ph)))
        print(_row("generate tokens/s", ours["generate_tokens_per_s"], g(ref, "generate_tokens_per_s"),
                   "{:.1f}", True))
        print(_row("update GFLOP/s", ours["update_gflops"], g(ref, "update_gflops"), "{:.1f}", True))
        print(_row("roofline GFLOP/s", ours["roofline_gflops"], g(ref, "roofline_gflops"), "{:.1f}", True))
        print(f"  update share of roofline   {ours['update_roofline_frac']:>11.1%} "
              f"{'-' if ref is None else format(ref['update_roofline_frac'], '.1%'):>12}")
        if ref:  # each stack measures its own matmul; the CPU's roofline is the faster of the two
            best = max(ours["roofline_gflops"], ref["roofline_gflops"])
            print(f"  share of CPU roofline      {ours['update_gflops'] / best:>11.1%} "
                  f"{ref['update_gflops'] / best:>12.1%}   (vs the faster stack's matmul, {best:.0f} GFLOP/s)")
        print(_row("peak RSS MB", ours["peak_rss_mb"], g(ref, "peak_rss_mb"), "{:.0f}"))
        print(f"  rre_jax warm-up (compile) {ours['warmup_s']:.1f} s")


if __name__ == "__main__":
    main()
