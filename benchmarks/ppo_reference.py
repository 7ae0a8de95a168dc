"""The reference half of the PPO-iteration benchmark (issue 4): one trl 0.7.4 PPO iteration on CPU.

Runs INSIDE the reference virtualenv (``benchmarks/setup_reference_env.sh``: torch 2.13.0, transformers 4.37.2,
trl 0.7.4, peft 0.7.1), never in the rre_jax one. It builds the "mid" random fp32 Llama with a fixed seed, a
byte-level BPE tokenizer trained here, 16 seeded prompts of 64 tokens, and times one iteration of the paper's PPO
(docs/design.md 4.4) the way the reference drives trl:

  generate    ``PPOTrainer.generate`` (pure sampling: temperature 1, top_k 0, top_p 1; ``min_new_tokens`` =
              ``max_new_tokens`` = 128 so EOS is masked at every step and every row yields exactly 128 tokens)
  reward      decode + LI * RP on the host (``common.li_rp``), the stand-in for the proxy reward
  step        ``PPOTrainer.step`` (batch 16, mini-batch 2 x grad accumulation 4, 4 epochs, Adam), split by trl's
              own timers into experience (policy + reference forward passes) and update (the epoch loop)

Usage:  .bench_venv/bin/python benchmarks/ppo_reference.py --mode full --out /tmp/ref_full.json
The JSON schema is documented in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np
import torch

import common

# ------------------------------------------------------------------------------------------------ arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=("full", "lora"), required=True, help="full fine-tuning or LoRA r=8 q/v")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out", required=True, help="path of the JSON result")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    p.add_argument("--iterations", type=int, default=1, help="timed iterations; phases report the median")
    p.add_argument("--gen-batch-size", type=int, default=16, help="PPOTrainer.generate batch size (default 16)")
    p.add_argument("--roofline-reps", type=int, default=5, help="2048^3 matmuls timed before and after")
    p.add_argument("--tiny", action="store_true", help="smoke run: 2-layer d=64 model, batch 8, 8 new tokens")
    args = p.parse_args(argv)
    if args.threads < 1 or args.iterations < 1 or args.warmup < 0:
        p.error("--threads and --iterations must be >= 1 and --warmup >= 0")
    return args


def model_and_workload(args) -> tuple[dict, common.Workload]:
    if not args.tiny:
        return dict(common.MID_MODEL), common.Workload(seed=args.seed)
    cfg = dict(common.MID_MODEL, vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4)
    return cfg, common.Workload(batch=8, prompt_len=8, new_tokens=8, mini_batch=2, grad_accum=2, ppo_epochs=2,
                                seed=args.seed)


# ----------------------------------------------------------------------------------------------- the stack


def build_trainer(cfg: dict, work: common.Workload, mode: str, seed: int):
    """A trl 0.7.4 PPOTrainer over a seeded random Llama with a value head, as the reference's run_ppo.py sets it."""
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=common.train_tokenizer(cfg["vocab_size"], seed),
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(
        **cfg, pad_token_id=common.PAD_ID, bos_token_id=common.BOS_ID, eos_token_id=common.EOS_ID)).eval()
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none",
                      task_type="CAUSAL_LM") if mode == "lora" else None
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=lora, summary_dropout_prob=0.1)
    config = PPOConfig(
        batch_size=work.batch, mini_batch_size=work.mini_batch, gradient_accumulation_steps=work.grad_accum,
        ppo_epochs=work.ppo_epochs, learning_rate=1e-5, max_grad_norm=1.0, adap_kl_ctrl=True, init_kl_coef=0.2,
        target=6, horizon=10000, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=1.0,
        use_score_scaling=True, use_score_norm=True, score_clip=10.0, ratio_threshold=10.0, seed=seed,
    )
    # ref_model=None: trl deep-copies the policy in full mode, and disables the adapters in LoRA mode.
    return PPOTrainer(config=config, model=policy, ref_model=None, tokenizer=tokenizer), tokenizer


def param_counts(trainer) -> dict:
    params = list(trainer.model.parameters())
    return dict(params=sum(p.numel() for p in params),
                trainable_params=sum(p.numel() for p in params if p.requires_grad))


# ------------------------------------------------------------------------------------------------ the timing


def iteration(trainer, tokenizer, queries, work: common.Workload, gen_batch_size: int) -> dict:
    """One PPO iteration; returns its per-phase wall times in seconds."""
    gen_kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=work.new_tokens,
                      min_new_tokens=work.new_tokens, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    t0 = time.perf_counter()
    responses = trainer.generate(queries, batch_size=gen_batch_size, return_prompt=False, **gen_kwargs)
    t1 = time.perf_counter()
    lengths = {len(r) for r in responses}
    if lengths != {work.new_tokens}:
        raise RuntimeError(f"responses have lengths {sorted(lengths)}, expected all {work.new_tokens}")
    texts = tokenizer.batch_decode(responses)
    scores = [torch.tensor(common.li_rp(t)) for t in texts]
    t2 = time.perf_counter()
    stats = trainer.step(queries, responses, scores)
    t3 = time.perf_counter()
    return dict(generate_s=t1 - t0, reward_s=t2 - t1, experience_s=float(stats["time/ppo/forward_pass"]),
                update_s=float(stats["time/ppo/optimize_step"]), step_s=t3 - t2, iteration_s=t3 - t0)


def matmul_roofline(reps: int, n: int = 2048) -> list[float]:
    """GFLOP/s of each of ``reps`` fp32 n^3 matmuls (after two warm-up calls)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    for _ in range(2):
        torch.mm(a, b)
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        rates.append(common.matmul_roofline_flops(n) / (time.perf_counter() - t) / 1e9)
    return rates


def versions() -> dict:
    import accelerate
    import peft
    import tokenizers
    import transformers
    import trl

    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                trl=trl.__version__, peft=peft.__version__, accelerate=accelerate.__version__,
                tokenizers=tokenizers.__version__, numpy=np.__version__, cpu=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count())


# ------------------------------------------------------------------------------------------------ reporting


def summarise(args, cfg, work, counts, runs, roofline, digest) -> dict:
    phases = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    update = common.update_flops(cfg, work, args.mode)
    roof = max(roofline)
    update_gflops = update["total"] / phases["update_s"] / 1e9
    tokens = work.batch * work.new_tokens
    return dict(
        mode=args.mode, threads=args.threads, stack="trl", seed=args.seed,
        model=dict(name="tiny" if args.tiny else "mid", dtype="float32", config=cfg, **counts,
                   matmul_params=common.matmul_params(cfg), lora_params=common.lora_params(cfg)),
        workload=dict(batch=work.batch, prompt_len=work.prompt_len, new_tokens=work.new_tokens,
                      mini_batch=work.mini_batch, grad_accum=work.grad_accum, ppo_epochs=work.ppo_epochs,
                      optimizer_steps=work.optimizer_steps, gen_batch_size=args.gen_batch_size,
                      prompt_sha256=digest),
        phases=phases, iterations=runs, warmup=args.warmup,
        tokens_generated=tokens, generate_tokens_per_s=tokens / phases["generate_s"],
        update_flops=update["total"], update_flops_per_token=update["per_token"], update_tokens=update["tokens"],
        update_gflops=update_gflops, update_roofline_frac=update_gflops / roof,
        experience_gflops=common.experience_flops(cfg, work) / phases["experience_s"] / 1e9,
        roofline_gflops=roof, roofline_samples_gflops=roofline,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        versions=versions(),
    )


def print_table(res: dict) -> None:
    ph = res["phases"]
    rows = [("generate", ph["generate_s"], f"{res['generate_tokens_per_s']:.0f} tok/s"),
            ("reward (host LI*RP)", ph["reward_s"], ""),
            ("  experience fwd", ph["experience_s"], f"{res['experience_gflops']:.0f} GFLOP/s"),
            ("  update (epochs)", ph["update_s"],
             f"{res['update_gflops']:.0f} GFLOP/s = {100 * res['update_roofline_frac']:.0f}% of roofline"),
            ("step (trl)", ph["step_s"], ""),
            ("iteration", ph["iteration_s"], "")]
    print(f"trl {res['versions']['trl']} PPO iteration, mode={res['mode']}, threads={res['threads']}, "
          f"model={res['model']['name']} ({res['model']['params'] / 1e6:.1f}M params, "
          f"{res['model']['trainable_params'] / 1e6:.2f}M trainable)")
    for name, secs, note in rows:
        print(f"  {name:<22}{secs:9.3f} s   {note}")
    print(f"  fp32 matmul roofline  {res['roofline_gflops']:.0f} GFLOP/s (2048^3, best of "
          f"{len(res['roofline_samples_gflops'])}); peak RSS {res['peak_rss_mb']:.0f} MB")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, work = model_and_workload(args)
    roofline = matmul_roofline(args.roofline_reps)
    trainer, tokenizer = build_trainer(cfg, work, args.mode, args.seed)
    ids_BxP = common.prompt_ids(work, cfg["vocab_size"])
    queries = [torch.from_numpy(row.copy()) for row in ids_BxP]
    runs = []
    for i in range(args.warmup + args.iterations):
        run = iteration(trainer, tokenizer, queries, work, args.gen_batch_size)
        print(f"# iteration {i} ({'warm-up' if i < args.warmup else 'timed'}): "
              + ", ".join(f"{k}={v:.2f}" for k, v in run.items()), file=sys.stderr, flush=True)
        if i >= args.warmup:
            runs.append(run)
    roofline += matmul_roofline(args.roofline_reps)
    res = summarise(args, cfg, work, param_counts(trainer), runs, roofline, common.ids_digest(ids_BxP))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
