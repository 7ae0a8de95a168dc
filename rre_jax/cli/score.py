"""``rre-score``: score a model's AlpacaEval outputs with the white-box proxy reward (and, optionally, a gold RM),
item by item as the paper's eval does (``rre_jax.score_outputs``).

    rre-score --eval-set alpaca_eval.json --outputs model_outputs.json --reward rer \\
        --relevance-encoder minilm [--gold-rm DIR] [--tokenizer POLICY_TOKENIZER_DIR] --out scores.json
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from rre_jax import errors, reward_engine, score_outputs
from rre_jax.data.prompts import MISSING_QTYPE_POLICIES, PromptFileError

_EPILOG = """\
presets:
  li        LI                          (LI = #wordpunct words / 100, after cutting at stop strings)
  li_rp     LI * RP                     (RP = distinct word trigrams / trigrams)
  qr_li_rp  QR * LI * RP                (QR = E(query) . E(response), no branching)
  rer       OPENENDED: QR * LI * RP;  CONSTRAINED: AR / 3.5 * 5.12 * RP
                                        (AR = E(reference answer) . E(response))

query:    the eval item's raw instruction through relevance_query (what the reference's eval passes)
features: from the ids of --tokenizer; without it, from the raw UTF-8 bytes of each response
output:   OUT, one item per eval item: index, instruction, qtype, n_words, li, rp, qr, ar, relevance
          (AR for CONSTRAINED items when the reward branches, else QR), proxy, gold, presets {name: value};
          null = not computed.  OUT.summary.json (scores.json -> scores.summary.json): settings, qtype counts,
          missing-qtype count, means overall and per qtype.  Both are written atomically; existing files
          are kept unless --overwrite.

example:
  rre-score --eval-set alpaca_eval.json --outputs step_500/alpaca_eval_outputs.json --reward rer \\
      --relevance-encoder minilm --gold-rm starling_rm/ --out step_500/scores.json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rre-score", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a model's AlpacaEval outputs with the white-box proxy reward (LI, RP, relevance, "
                    "query-type branching) and optionally a gold reward model, as the paper's eval does.",
        epilog=_EPILOG)
    p.add_argument("--eval-set", required=True, metavar="EVAL.json",
                   help="AlpacaEval-style prompts: instruction, output (reference answer), qtype (.json or .jsonl)")
    p.add_argument("--outputs", required=True, metavar="OUTPUTS.json",
                   help="the model's outputs in AlpacaEval format (instruction, output), in eval-set order")
    p.add_argument("--reward", required=True, choices=score_outputs.reward_choices(),
                   help="the proxy stored as 'proxy'; every other computable preset is stored under 'presets'")
    p.add_argument("--out", required=True, metavar="SCORES.json", help="where to write the per-item scores")
    p.add_argument("--relevance-encoder", default="", metavar="DIR",
                   help="BERT-style encoder dir (e.g. facebook/contriever), or 'minilm' for the packaged "
                        "all-MiniLM-L6-v2; required by qr_li_rp and rer")
    p.add_argument("--gold-rm", default="", metavar="DIR",
                   help="gold reward model dir (LlamaForSequenceClassification or Starling-RM layout)")
    p.add_argument("--gold-rm-tokenizer", default="", metavar="DIR", help="gold RM tokenizer dir (default: --gold-rm)")
    p.add_argument("--tokenizer", default="", metavar="DIR",
                   help="policy tokenizer whose ids the features read (default: raw UTF-8 bytes of the text)")
    p.add_argument("--missing-qtype", default="OPENENDED", choices=MISSING_QTYPE_POLICIES,
                   help="qtype for eval items without one (default OPENENDED; 'error' rejects the file)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random-qtype preset (default 0)")
    p.add_argument("--batch-size", type=int, default=128, metavar="N",
                   help="responses per feature batch (default 128)")
    p.add_argument("--relevance-max-length", type=int, default=512, metavar="N",
                   help="relevance encoder tokens kept, left-truncated (default 512)")
    p.add_argument("--gold-rm-max-length", type=int, default=2048, metavar="N",
                   help="gold RM tokens kept, left-truncated (default 2048)")
    p.add_argument("--gold-rm-batch-size", type=int, default=4, metavar="N",
                   help="gold RM rows per forward (default 4)")
    p.add_argument("--relevance-text", default="response", choices=reward_engine.RELEVANCE_TEXTS,
                   help="what QR and AR embed: 'response' = the output as given (default; the paper's scoring "
                        "code); 'cut' = the output cut at its first stop string (LI and RP always clean it)")
    p.add_argument("--counterfactual", action="store_true",
                   help="also score every other preset (the counterfactual columns), with QR and AR for every item; "
                        "default: only what --reward composes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and its summary")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv``, then score and write (``score_outputs.run``); returns the summary."""
    args = build_parser().parse_args(argv)
    return score_outputs.run(score_outputs.ScoreRequest(**{f.name: getattr(args, f.name)
                                           for f in dataclasses.fields(score_outputs.ScoreRequest)}))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rre-score`` on ``argv``; 0 on success, 2 (and one line) on a user's mistake."""
    from rre_jax import compile_cache
    compile_cache.enable()
    try:
        summary = run(argv)
    except (errors.UserError, PromptFileError, FileNotFoundError) as e:
        return errors.report("rre-score", e)
    means = summary["means"]["all"]
    shown = ", ".join(f"{k} {means[k]:.4f}" for k in score_outputs.MEANS_OF if means.get(k) is not None)
    print(f"rre-score: {summary['n_items']} items, reward {summary['reward']}: {shown}")
    print(f"  scores   {summary['out']}\n  summary  {score_outputs.summary_path(summary['out'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
