"""Issue 2: prefill and decode tokens/s of rre_jax's jitted cached greedy decoder vs transformers' PyTorch
``generate``, on the "mid" Llama (8 layers, d_model 512, 8 heads, ffn 1408, vocab 32000, fp32), batch 16,
prompt 64 (rows left-padded by 0..15), 128 new tokens, 2 threads.

Fair setup: one random checkpoint is built once by transformers (``LlamaForCausalLM`` after
``torch.manual_seed(0)``, ``save_pretrained`` as safetensors) in its own subprocess; each side then loads
it the way a user would (``from_pretrained`` on both sides; ours with ``layer_layout='per_layer'``, the
generation layout) in its own subprocess, so its peak RSS (``ru_maxrss``, taken right after the timed
generation) is its own; ours runs with ``MALLOC_MMAP_THRESHOLD_=131072``, torch with glibc's defaults (its
faster setting; see ``_run``). Both sides
decode greedily; the table says for how many steps their tokens agree.

The floor: a decode step must stream every weight matrix once (168 MB in fp32), so each side also times
its own weight matmuls alone -- one [16, 512] activation through the model's own 8 x 7 layer matrices and
the LM head, nothing else -- in the same process. That, not the 2048^3 FLOP rate, is what a step can
approach on a CPU, and it bounds the reachable speed-up over ``generate``.
Not a test: ``python benchmarks/bench_decode.py`` (``--layout stacked`` times the stacked-params path).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's rre_jax

B, T, N, THREADS = 16, 64, 128, 2
MID = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
           num_attention_heads=8, num_key_value_heads=8)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _prompts(vocab):
    import numpy as np
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, (B, T))
    mask = np.ones((B, T), np.int64)
    for b in range(B):  # left padding as in the rollout: 0..15 pads
        mask[b, :b], ids[b, :b] = 0, 0
    return ids, mask


def _best(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _maxrss_kib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker_build(path):
    """The shared checkpoint: transformers' own random init of the mid Llama, saved as safetensors."""
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**MID, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(path, safe_serialization=True)
    return {}


def _matmul_chain():
    """Per layer: q, k, v, gate, up from h; o from q; down from gate*up; then the LM head -- the weight
    matmuls of one decode step and nothing else (the ops between them are tiny elementwise ones)."""
    def step(mm, h, layers, head):
        for w in layers:
            q, k, v = mm(h, w["q_proj"]), mm(h, w["k_proj"]), mm(h, w["v_proj"])
            m = mm(h, w["gate_proj"]) * mm(h, w["up_proj"])
            h = h + 1e-3 * (mm(q + k + v, w["o_proj"]) + mm(m, w["down_proj"]))
        return mm(h, head)
    return step


def worker_ours(path, layout):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from rre_jax import models, rollout
    from rre_jax.models import llama
    kw = {} if layout == "stacked" else {"layer_layout": layout}
    loaded = models.from_pretrained(path, **kw)
    cfg, params = loaded.config, loaded.params
    ids, mask = (jnp.asarray(x, jnp.int32) for x in _prompts(cfg.vocab_size))
    pre = lambda: jax.block_until_ready(llama.prefill(cfg, params, ids, mask, T + N))
    gen = lambda: jax.block_until_ready(rollout.greedy(cfg, params, ids, mask, N))
    pre()
    tokens = np.asarray(gen())  # compile
    t_pre, t_all = _best(pre, 5), _best(gen, 3)
    rss = _maxrss_kib()

    # Weight matmuls alone, on the loaded (distinct, per-layer) buffers.
    layers = ([llama.unstack_layers(params)[f"layers_{i}"] for i in range(cfg.num_hidden_layers)]
              if layout == "stacked" else [params[f"layers_{i}"] for i in range(cfg.num_hidden_layers)])
    layers = [{p: lw[p]["kernel"] for p in PROJ} for lw in layers]
    chain = jax.jit(lambda h, ls, head: _matmul_chain()(jnp.dot, h, ls, head))
    h = jnp.ones((B, cfg.hidden_size), jnp.float32)
    run = lambda: jax.block_until_ready(chain(h, layers, params["lm_head"]))
    run()
    t_mm = _best(run, 20)
    sweep = jax.jit(lambda ws: sum(jnp.sum(w) for w in ws))  # one streaming read of the same bytes
    ws = jax.tree.leaves(layers) + [params["lm_head"]]
    jax.block_until_ready(sweep(ws))
    t_sweep = _best(lambda: jax.block_until_ready(sweep(ws)), 20)
    mm = jax.jit(lambda a, b: a @ b)
    a = jnp.ones((2048, 2048), jnp.float32)
    jax.block_until_ready(mm(a, a))
    t_big = _best(lambda: jax.block_until_ready(mm(a, a)), 5)
    return {"prefill_s": t_pre, "total_s": t_all, "maxrss_kib": rss, "tokens": tokens.tolist(),
            "matmul_step_s": t_mm, "sweep_s": t_sweep, "weight_bytes": int(sum(w.nbytes for w in ws)),
            "matmul_gflops": 2 * 2048 ** 3 / t_big / 1e9}


def worker_hf(path):
    import numpy as np
    import torch
    import transformers
    torch.set_num_threads(THREADS)
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask = (torch.tensor(x) for x in _prompts(model.config.vocab_size))
    pos = torch.tensor(np.maximum(np.cumsum(mask.numpy(), -1) - 1, 0))

    def pre():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)

    def gen():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N,
                                  do_sample=False, pad_token_id=0)
    pre()
    tokens = gen()[:, T:].numpy()
    t_pre, t_all = _best(pre, 5), _best(gen, 2)
    rss = _maxrss_kib()

    layers = [{p: getattr(getattr(lyr, "self_attn" if p in PROJ[:4] else "mlp"), p).weight for p in PROJ}
              for lyr in model.model.layers]
    step = _matmul_chain()
    h = torch.ones((B, model.config.hidden_size))

    def run():
        with torch.no_grad():
            step(torch.nn.functional.linear, h, layers, model.lm_head.weight)
    run()
    return {"prefill_s": t_pre, "total_s": t_all, "maxrss_kib": rss, "tokens": tokens.tolist(),
            "matmul_step_s": _best(run, 10)}


def _run(*args):
    # rre_jax's worker runs with a fixed glibc mmap threshold (the setting launch/ and the README recommend for
    # CPU runs): freed large XLA buffers go back to the OS instead of fragmenting the heap, which ru_maxrss
    # would otherwise measure. torch runs with glibc's defaults: with the fixed threshold its decode step is
    # ~2x slower (every large temporary becomes a fresh mmap), so the default is its best setting.
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS=str(THREADS))
    if args[0] == "ours":
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    out = subprocess.run([sys.executable, __file__, "--worker", *args], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"worker {args[0]} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _decode_flops_per_token():
    D, F, L, V = MID["hidden_size"], MID["intermediate_size"], MID["num_hidden_layers"], MID["vocab_size"]
    per_layer = 4 * D * D + 3 * D * F
    attn = 2 * 2 * (T + N / 2) * D  # q.k and p.v over the average cache length
    return 2 * (L * per_layer + D * V) + L * attn


def _agreement(a, b):
    """(steps where every row agrees, rows equal over all N steps)."""
    import numpy as np
    a, b = np.asarray(a), np.asarray(b)
    same = a == b
    all_rows = np.flatnonzero(~same.all(0))
    return (int(all_rows[0]) if all_rows.size else a.shape[1]), int(same.all(1).sum())


def report(ours, hf, layout):
    print(f"mid Llama fp32, batch {B}, prompt {T}, {N} new tokens, {THREADS} threads, one run; "
          f"same transformers-built checkpoint on both sides (ours: layer_layout={layout!r})")
    print(f"{'':26s}{'ours (JAX)':>12s}{'HF generate':>13s}{'ratio':>8s}")
    for r in (ours, hf):
        dec = r["total_s"] - r["prefill_s"]
        r.update(prefill_tps=B * T / r["prefill_s"], decode_tps=B * N / dec, step_ms=1e3 * dec / N,
                 mm_ms=1e3 * r["matmul_step_s"])
    rows = [("prefill tokens/s", "prefill_tps", False), ("decode tokens/s", "decode_tps", False),
            ("decode ms/step", "step_ms", True), ("weight matmuls ms/step", "mm_ms", True)]
    for label, key, inverse in rows:
        ratio = hf[key] / ours[key] if inverse else ours[key] / hf[key]
        print(f"{label:26s}{ours[key]:12.1f}{hf[key]:13.1f}{ratio:7.2f}x")
    print(f"{'peak RSS MiB':26s}{ours['maxrss_kib'] / 1024:12.0f}{hf['maxrss_kib'] / 1024:13.0f}"
          f"{ours['maxrss_kib'] / hf['maxrss_kib']:7.2f}x")
    steps, rows_eq = _agreement(ours["tokens"], hf["tokens"])
    print(f"greedy tokens: all {B} rows agree for the first {steps} of {N} steps; {rows_eq}/{B} rows agree on all")

    wb, gbs = ours["weight_bytes"], lambda s: ours["weight_bytes"] / s / 1e9
    print(f"\nroofline (this CPU, this run): a decode step streams {wb / 1e6:.0f} MB of weight matrices")
    print(f"  streaming read of those bytes (jnp.sum): {1e3 * ours['sweep_s']:.1f} ms = {gbs(ours['sweep_s']):.1f} GB/s")
    print(f"  weight matmuls alone: ours {ours['mm_ms']:.1f} ms = {gbs(ours['matmul_step_s']):.1f} GB/s, "
          f"HF {hf['mm_ms']:.1f} ms = {gbs(hf['matmul_step_s']):.1f} GB/s")
    print(f"  our decode step {ours['step_ms']:.1f} ms: weight matmuls are {100 * ours['mm_ms'] / ours['step_ms']:.0f}% "
          f"of it; the rest (attention over the cache, norms, argmax, loop) {ours['step_ms'] - ours['mm_ms']:.1f} ms")
    gflops = _decode_flops_per_token() * ours["decode_tps"] / 1e9
    print(f"  2048^3 fp32 matmul: {ours['matmul_gflops']:.0f} GFLOP/s; our decode: {gflops:.1f} GFLOP/s = "
          f"{100 * gflops / ours['matmul_gflops']:.1f}% of it (bandwidth-bound: {2 * B} FLOP per 4-byte weight)")
    print(f"  5x HF generate = {hf['step_ms'] / 5:.1f} ms/step; our weight matmuls alone take {ours['mm_ms']:.1f} ms, "
          f"so at most {hf['step_ms'] / ours['mm_ms']:.1f}x (a step of matmuls only), "
          f"{hf['step_ms'] / (1e3 * ours['sweep_s']):.1f}x at this CPU's streaming read rate")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layout", default="per_layer", choices=("per_layer", "stacked"),
                    help="our params' layer layout (stacked: split once per decode call)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as path:
        _run("build", path)
        ours, hf = _run("ours", path, args.layout), _run("hf", path)
    report(ours, hf, args.layout)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        which, rest = sys.argv[2], sys.argv[3:]
        res = {"build": worker_build, "ours": worker_ours, "hf": worker_hf}[which](*rest)
        print(json.dumps(res))
    else:
        main()
