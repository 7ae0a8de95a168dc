"""Scoring response *texts* (stored rollouts, AlpacaEval outputs) in batches planned for few compiles.

Shapes: ``B`` rows of a feature batch, ``N`` response tokens (a power-of-two bucket), ``P`` prompts of the
engine's prompt set.

Texts are re-tokenized with the policy's tokenizer, so LI and RP come from the same on-device features as a
rollout's (they cut at the stop strings themselves); relevance embeds each text as given, or what the engine's
``relevance_text`` says (``reward_engine``: one definition of a response's scores for every path).
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from rre_jax.data import batching
from rre_jax.reward_engine import RewardEngine


def packed_bucket(n: int, minimum: int = 1024) -> int:
    """``n`` rounded up to a multiple of 1/8 of its power of two (<= 12.5% padding, 8 shapes per octave):
    the features' packed stream length (``total_bytes``), which follows a batch's real bytes."""
    step = batching.pow2_bucket(n, minimum) // 8
    return max(minimum, -(-int(n) // step) * step)


def _tokenized(engine: RewardEngine, tokenizer, texts):
    """``(token rows, bytes per text)`` of one batch of texts under the policy's tokenizer."""
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    len_V = np.asarray(engine.tables.len_V)
    return rows, np.array([int(len_V[r].sum()) if len(r) else 0 for r in rows], np.int64)


def _feature_batch(engine: RewardEngine, rows, n_texts: int, shape: tuple[int, int, int, int], pad_id: int):
    """Features (as NumPy, one row per text) of one tokenized batch padded to ``shape`` = (rows, tokens,
    max bytes per text, packed bytes): every batch of a call has the same shape, so the call compiles once."""
    B, N, max_bytes, total_bytes = shape
    ids_BxN, mask_BxN = batching.pad_right(rows, N, B, pad_id)
    feats = engine.features(ids_BxN, mask_BxN, max_bytes=max_bytes, total_bytes=total_bytes)
    return type(feats)(*(np.asarray(f)[:n_texts] for f in feats))


def score_texts(engine: RewardEngine, tokenizer, index_B, texts, batch_size: int = 64, progress: bool = False):
    """``{component: f32[B]}`` like ``RewardEngine.score``, in the order of ``texts`` (the responses as given);
    ``index_B`` indexes the engine's prompt set.

    Every batch has one shape (``batch_size`` rows, or the power of two covering fewer texts; the power-of-two
    tokens and bytes of the longest text; the packed length of the fullest batch), so a call compiles the
    features once: for a one-shot command a compile costs far more than the padding of the shorter batches.
    Texts are scored longest first.
    """
    index_B = np.asarray(index_B)
    if len(index_B) != len(texts):
        raise ValueError(f"score_texts: {len(index_B)} prompt indices for {len(texts)} texts")
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i].encode("utf-8")))
    B = batching.pow2_bucket(len(texts), 1, batch_size)
    batches = [(order[s:s + batch_size], *_tokenized(engine, tokenizer, [texts[i] for i in order[s:s + batch_size]]))
               for s in range(0, len(texts), batch_size)]
    N = batching.pow2_bucket(max([len(r) for _, rows, _ in batches for r in rows] + [1]), 64)
    max_bytes = batching.pow2_bucket(max([int(n.max()) for _, _, n in batches if len(n)] + [1]), 64)
    total_bytes = packed_bucket(max([int(n.sum()) for _, _, n in batches] + [0]) + B)
    out: dict = {}
    for idx, rows, _ in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
        feats = _feature_batch(engine, rows, len(idx), (B, N, max_bytes, total_bytes), tokenizer.pad_token_id or 0)
        for k, v in engine.score(index_B[idx], feats, [texts[i] for i in idx]).items():
            out.setdefault(k, np.zeros(len(texts), np.asarray(v).dtype))[idx] = np.asarray(v)
    return out
