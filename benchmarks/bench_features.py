"""Responses/s of the jitted on-device features vs the plain-Python reference (not a test).

    python benchmarks/bench_features.py [--data ../shared/data] [--n 256] [--max-tokens 512] [--repeats 7]

Workload: the first ``--n`` reference answers of ``alpacafarm_val.json``, tokenized (up to ``--max-tokens``)
with a SentencePiece-style tokenizer trained here on the data. Device path: ``text_features`` on the
[n, max_tokens] id batch (one jitted call, ``max_bytes`` = the batch's longest response rounded up to 256,
``total_bytes`` = the packed stream's length bucketed like ``reward_engine.score_texts`` does).
Python path: ``tokenizer.batch_decode`` of the same ids, then clean() + nltk.wordpunct_tokenize + LI + RP
(tests/reference_features.py); timed with and without the decode. Both run in one process: each repeat
times a block of ``--block`` consecutive calls of each path in turn (throughput, as when scoring an eval set
batch after batch), and the medians over repeats are printed with their ratio. ``--block 1`` times isolated
calls between the Python ones instead: there XLA's worker threads and caches start cold every call, which
costs the device path 15-25% on this 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's rre_jax, not an installed one

import reference_features as ref  # noqa: E402
from rre_jax import features as F  # noqa: E402
from rre_jax import tokenizer as tk  # noqa: E402
from rre_jax.reward_engine import packed_bucket  # noqa: E402


def _seconds_per_call(fn, block: int) -> float:
    t0 = time.perf_counter()
    for _ in range(block):
        fn()
    return (time.perf_counter() - t0) / block


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--block", type=int, default=8, help="consecutive calls per timed block")
    args = p.parse_args()
    data = pathlib.Path(args.data)
    if not (data / "alpacafarm_val.json").exists():
        sys.exit(f"no alpacafarm_val.json in {data}: pass --data pointing at the shared data folder")
    items = json.loads((data / "alpacafarm_val.json").read_text())
    answers = [x["output"] for x in items][: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        tok = tk.train_tokenizer([x["input"] for x in items] + [x["output"] for x in items],
                                 "sentencepiece", 2000, tmp)
    table = tk.byte_table(tok)
    seqs = [ids[: args.max_tokens] for ids in tok(answers, add_special_tokens=False)["input_ids"]]
    ids = np.zeros((len(seqs), args.max_tokens), np.int32)
    mask = np.zeros_like(ids, bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, True
    n_bytes = [len(table.token_bytes(s)) for s in seqs]
    max_bytes = -(-max(n_bytes) // 256) * 256
    total_bytes = packed_bucket(sum(min(b, max_bytes) + 1 for b in n_bytes))

    tables = F.feature_tables(table)
    run = jax.jit(F.text_features, static_argnames=("stop_strings", "max_bytes", "total_bytes"))
    ids_d, mask_d = jnp.asarray(ids), jnp.asarray(mask)
    device = lambda: jax.block_until_ready(run(ids_d, mask_d, tables, max_bytes=max_bytes,
                                                           total_bytes=total_bytes))  # noqa: E731
    texts = tok.batch_decode(seqs, skip_special_tokens=True)
    python_text = lambda: [ref.counts(t) for t in texts]  # noqa: E731
    python_ids = lambda: [ref.counts(t) for t in tok.batch_decode(seqs, skip_special_tokens=True)]  # noqa

    t0 = time.perf_counter()
    got = device()
    compile_s = time.perf_counter() - t0
    want = python_text()
    assert [int(x) for x in got.n_words_B] == [c.n_words for c in want], "device and reference disagree"
    assert [int(x) for x in got.n_distinct_B] == [c.n_distinct for c in want], "device and reference disagree"

    t_dev, t_txt, t_ids = [], [], []
    for _ in range(args.repeats):  # alternate, so both see the same machine load
        t_dev.append(_seconds_per_call(device, args.block))
        t_txt.append(_seconds_per_call(python_text, args.block))
        t_ids.append(_seconds_per_call(python_ids, args.block))
    n = len(seqs)
    dev, txt, pid = (n / statistics.median(t) for t in (t_dev, t_txt, t_ids))
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {n} responses, "
          f"{args.max_tokens} tokens max, bytes mean {np.mean(n_bytes):.0f} max {max(n_bytes)}, "
          f"max_bytes {max_bytes}, total_bytes {total_bytes}, compile {compile_s:.1f} s, "
          f"median of {args.repeats} blocks of {args.block} calls")
    print(f"jitted text_features (ids -> LI, RP, cut) : {dev:10.0f} responses/s")
    print(f"python reference, from text                : {txt:10.0f} responses/s   ratio device/python {dev / txt:.2f}")
    print(f"python reference, from ids (decode + text) : {pid:10.0f} responses/s   ratio device/python {dev / pid:.2f}")


if __name__ == "__main__":
    main()
