"""The paper's scoring path, as its ``eval_monotonicity.py`` runs it: one item per ``get_reward`` call.

Run by ``bench_score.py`` in a process of its own (its wall time, start-up included, is what it measures):

    python benchmarks/score_reference.py --repo PAPER_CHECKOUT --encoder ENCODER_DIR \\
        --eval-set alpaca_eval.json --outputs model_outputs.json --out reference_scores.json

``PAPER_CHECKOUT`` is a clone of naver-ai/rethinking-proxy-reward; its ``reward_model.py`` and
``conversation.py`` are imported unchanged. Two constructor arguments the released code hard-codes are
replaced, nothing else: the relevance encoder directory (``facebook/contriever`` from the hub -> ``ENCODER_DIR``)
and the device (``cuda`` -> ``cpu``). The full proxy (RER: LI, RP, relevance, branching, stop strings) is
built as ``eval_monotonicity.py`` builds it; the gold RM is not part of this path.
"""
from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="clone of naver-ai/rethinking-proxy-reward")
    p.add_argument("--encoder", required=True, help="BERT encoder directory (e.g. all-MiniLM-L6-v2)")
    p.add_argument("--eval-set", required=True)
    p.add_argument("--outputs", required=True)
    p.add_argument("--out", required=True, help="JSON list of the proxy score of each item")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    sys.path.insert(0, args.repo)
    import torch
    import reward_model
    from conversation import get_conv_template
    if args.threads:
        torch.set_num_threads(args.threads)
    released = reward_model.ContrieverModelForInference

    def local_encoder(model_name_or_path="facebook/contriever", batch_size=4, device="cuda"):
        return released(model_name_or_path=args.encoder, batch_size=batch_size, device="cpu")

    reward_model.ContrieverModelForInference = local_encoder
    with open(args.eval_set) as f:
        data = json.load(f)
    with open(args.outputs) as f:
        result = json.load(f)
    proxy_rm = reward_model.ReversedEngineeredRewardForInference(
        get_conv_template("alpaca"), length_incentive=True, repetition_penalty=True, relevance_scaling=True,
        reward_branching=True, do_strip=True)
    scores = []
    for d, o in zip(data, result):
        scores.append(proxy_rm.get_reward({"query": [d["instruction"]], "response": [o["output"]],
                                           "qtype": [d["qtype"]], "reference": [d["output"]]})[0])
    with open(args.out, "w") as f:
        json.dump(scores, f)


if __name__ == "__main__":
    main()
