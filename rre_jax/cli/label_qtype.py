"""``rre-label-qtype``: label prompts CONSTRAINED / OPENENDED with a zero-shot causal LM, or at random (the paper's
ablation), and report the agreement with the file's own labels (``rre_jax.qtype``).

    rre-label-qtype --prompts prompts.json --model /ckpt/llama --out labelled.json
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from rre_jax import errors, qtype


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rre-label-qtype`` on ``argv``; 0 on success, 2 (and one line) on a user's mistake."""
    parser = argparse.ArgumentParser(prog="rre-label-qtype", description="Label prompts CONSTRAINED / OPENENDED.")
    parser.add_argument("--prompts", required=True, help="AlpacaFarm / AlpacaEval prompt file (.json or .jsonl)")
    parser.add_argument("--out", required=True, help="labelled prompt file to write (.json or .jsonl)")
    parser.add_argument("--model", default="", help="causal LM checkpoint directory (zero-shot labeller)")
    parser.add_argument("--tokenizer", default="", help="tokenizer directory (default: --model)")
    parser.add_argument("--random", action="store_true", help="seeded random labels (the paper's ablation)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random (a run's config.seed)")
    parser.add_argument("--threshold", type=float, default=0.0, help="CONSTRAINED iff s(q) > threshold")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-query-chars", type=int, default=2000)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        report = qtype.label_file(args.prompts, args.out, model=args.model, tokenizer=args.tokenizer,
                            use_random=args.random, seed=args.seed, threshold=args.threshold,
                            batch_size=args.batch_size, max_query_chars=args.max_query_chars,
                            overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        return errors.report("rre-label-qtype", e)
    a = report["agreement"]
    print(f"rre-label-qtype: {report['n_prompts']} prompts -> {args.out}; agreement with the file's labels on "
          f"{a['n']}: accuracy {a['accuracy']:.3f}, Cohen's kappa {a['cohen_kappa']:.3f}", file=sys.stderr)
    print(json.dumps(report["agreement"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
