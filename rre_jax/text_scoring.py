"""Scoring response *texts* (stored rollouts, AlpacaEval outputs) in batches planned for few compiles.

Shapes: ``B`` rows of a feature batch, ``N`` response tokens (a power-of-two bucket), ``P`` prompts of the
engine's prompt set.

Texts are re-tokenized with the policy's tokenizer, so LI and RP come from the same on-device features as a
rollout's (they cut at the stop strings themselves). Relevance sees ``features.scored_text`` of each text --
the response cut at its first stop string, what dev eval and ``rre-eval`` store and score -- or, with
``relevance_text='raw'``, the text as given (what the reference's scoring code passes its encoder).
"""
from __future__ import annotations

import numpy as np

from rre_jax import features
from rre_jax.data import batching
from rre_jax.reward_engine import RewardEngine

RELEVANCE_TEXTS = ("scored", "raw")


def packed_bucket(n: int, minimum: int = 1024) -> int:
    """``n`` rounded up to a multiple of 1/8 of its power of two (<= 12.5% padding, 8 shapes per octave):
    the features' packed stream length (``total_bytes``), which follows a batch's real bytes."""
    step = batching.pow2_bucket(n, minimum) // 8
    return max(minimum, -(-int(n) // step) * step)


def _feature_batch(engine: RewardEngine, tokenizer, texts, rows_per_batch: int):
    """Features (as NumPy, one row per text) of one batch padded to ``rows_per_batch`` rows and a power-of-two
    number of tokens and of bytes (``max_bytes``, from the byte table): one compile per bucket."""
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    N = batching.pow2_bucket(max([len(r) for r in rows] + [1]), 64)
    ids_BxN, mask_BxN = batching.pad_right(rows, N, rows_per_batch, tokenizer.pad_token_id or 0)
    n_bytes_B = (np.asarray(engine.tables.len_V)[ids_BxN] * mask_BxN).sum(axis=1)
    feats = engine.features(ids_BxN, mask_BxN, max_bytes=batching.pow2_bucket(int(n_bytes_B.max()), 64),
                            total_bytes=packed_bucket(int(n_bytes_B.sum()) + rows_per_batch))
    return type(feats)(*(np.asarray(f)[:len(texts)] for f in feats))


def score_texts(engine: RewardEngine, tokenizer, index_B, texts, batch_size: int = 64, progress: bool = False,
                relevance_text: str = "scored"):
    """``{component: f32[B]}`` like ``RewardEngine.score``, in the order of ``texts``; ``index_B`` indexes the
    engine's prompt set. ``relevance_text``: ``'scored'`` (``features.scored_text``, the default) or ``'raw'``.

    Texts are scored longest first; every batch has the same rows (``batch_size``, or the power of two covering
    fewer texts), so a whole eval set compiles the features a handful of times and no batch pays for another's
    longest response.
    """
    from tqdm.auto import tqdm
    index_B = np.asarray(index_B)
    if len(index_B) != len(texts):
        raise ValueError(f"score_texts: {len(index_B)} prompt indices for {len(texts)} texts")
    if relevance_text not in RELEVANCE_TEXTS:
        raise ValueError(f"score_texts: relevance_text={relevance_text!r}; choose one of {RELEVANCE_TEXTS}")
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i].encode("utf-8")))
    rows_per_batch = batching.pow2_bucket(len(texts), 1, batch_size)
    out: dict = {}
    for s in tqdm(range(0, len(texts), batch_size), desc="scoring", unit="batch", disable=not progress):
        rows = order[s:s + batch_size]
        chunk = [texts[i] for i in rows]
        feats = _feature_batch(engine, tokenizer, chunk, rows_per_batch)
        if relevance_text == "scored":
            chunk = [features.scored_text(t, engine.stop_strings) for t in chunk]
        for k, v in engine.score(index_B[rows], feats, chunk).items():
            out.setdefault(k, np.zeros(len(texts), np.asarray(v).dtype))[rows] = np.asarray(v)
    return out
