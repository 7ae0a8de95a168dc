"""Query types for unlabelled prompts: a zero-shot causal-LM labeller, agreement, and seeded random labels.

RER branches on the query type (docs/design.md 4.2): CONSTRAINED queries (one right answer, or a narrow set of them)
are paid by answer relevance, OPENENDED ones by query relevance x length x repetition. The paper's labels come
from GPT-4; prompts without labels get them here.

Zero-shot rule. The query ``q`` (the prompt's instruction cleaned as the reward sees it,
`templates.relevance_query` of the Alpaca prompt, cut to ``max_query_chars``) is put into the fixed instruction
`PROMPT`, and a causal LM scores the two label words that may follow it::

    s(q) = log p(" constrained" | PROMPT(q)) - log p(" open" | PROMPT(q))      (each a sum over the word's tokens)
    label = CONSTRAINED if s(q) > threshold else OPENENDED                      (threshold 0 by default)

A word's tokens are those of ``tokenize(PROMPT(q) + word)`` after the longest common prefix with
``tokenize(PROMPT(q))`` (so a tokenizer that merges across the boundary is still scored on the full word).
``s`` is written beside each label, so a threshold can be re-chosen without running the model again.

Random labels (the paper's ablation) are those of ``reward.qtype_labels`` with the ``random`` source: the same
seed gives the same labels a run with ``reward.preset=rer_random_qtype`` and that ``seed`` draws for the file.

    rre-label-qtype --prompts FILE --model DIR --out FILE [--tokenizer DIR] [--threshold 0] [--batch-size 8]
    rre-label-qtype --prompts FILE --random --seed 0 --out FILE

writes the prompt file again (``.json`` list or ``.jsonl``, by ``--out``) with ``qtype`` = the new label,
``qtype_given`` = the file's own label (when it had one) and ``qtype_score`` = ``s(q)``; when the file had labels
it reports the agreement (accuracy, Cohen's kappa, confusion) on stdout and in ``<out>.agreement.json``.

Shapes: ``Q`` queries, ``R = 2Q`` scored rows (query x label word), ``B`` rows per batch, ``T`` padded length.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rre_jax import reward, tokenizer as tok_lib
from rre_jax.data import batching, prompts as prompts_lib, templates
from rre_jax.models import causal_lm_logits, from_pretrained

PROMPT = (
    "Decide whether a request to an AI assistant is constrained or open.\n"
    "constrained: the request has one correct answer or a narrow set of acceptable answers (a fact, a calculation, "
    "a translation, a classification, a rewrite or extraction of given text, code with a specified behaviour).\n"
    "open: many different responses could be good (creative writing, advice, opinions, brainstorming, open-ended "
    "explanations, conversation).\n\n"
    "Request: {query}\n"
    "Answer with one word, constrained or open.\n"
    "Type:")
LABEL_WORDS = {"CONSTRAINED": " constrained", "OPENENDED": " open"}


def query_text(instruction: str, max_chars: int = 2000) -> str:
    """The query the labeller sees: the reward's cleaned query of the Alpaca prompt, cut to ``max_chars``."""
    return templates.relevance_query(templates.alpaca_prompt(instruction))[:max_chars]


def label_rows(tokenizer, queries: Sequence[str]) -> list[tuple[list[int], int]]:
    """``R`` rows ``(token ids, index of the first label-word token)``: query ``i`` with each label word, in the
    order of `LABEL_WORDS` (row ``2i`` CONSTRAINED, ``2i + 1`` OPENENDED)."""
    rows = []
    for q in queries:
        prompt = PROMPT.format(query=q)
        head = _ids(tokenizer, prompt)
        for word in LABEL_WORDS.values():
            ids = _ids(tokenizer, prompt + word)
            start = next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), min(len(head), len(ids)))
            if start >= len(ids):
                raise ValueError(f"label word {word!r} adds no token after the prompt; check the tokenizer")
            rows.append((ids, max(start, 1)))
    return rows


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids with the tokenizer's leading special tokens (BOS) but no trailing EOS."""
    ids = tokenizer(text)["input_ids"]
    return ids[:-1] if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id else ids


class ZeroShotLabeller:
    """Scores `LABEL_WORDS` after `PROMPT` with a causal LM checkpoint (any Llama-family HF directory)."""

    def __init__(self, model_dir: str, tokenizer_dir: str = "", *, batch_size: int = 8, max_length: int = 1024):

        tok_dir = tokenizer_dir or model_dir
        if not any(os.path.exists(os.path.join(tok_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            raise FileNotFoundError(f"labeller tokenizer not found in {tok_dir!r}; pass --tokenizer DIR")
        self.tokenizer = tok_lib.load_tokenizer(tok_dir)
        self.model = from_pretrained(model_dir)
        if self.model.kind != "causal_lm":
            raise ValueError(f"--model {model_dir!r} is a {self.model.kind} checkpoint, not a causal LM")
        self.batch_size, self.max_length = batch_size, max_length

        def label_logp(params, ids_BxT, mask_BxT, target_BxT):
            logits = causal_lm_logits(self.model, params, ids_BxT, mask_BxT)[:, :-1].astype(jnp.float32)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), ids_BxT[:, 1:, None], -1)[..., 0]
            return jnp.sum(logp * target_BxT[:, 1:], axis=-1)
        self._label_logp = jax.jit(label_logp)

    def row_logprobs(self, rows: Sequence[tuple[list[int], int]]) -> np.ndarray:
        """``f64[R]``: summed log-probability of each row's tokens from its label start on."""
        out = np.zeros(len(rows))
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s:s + self.batch_size]
            n = max(len(ids) for ids, _ in chunk)
            if n > self.max_length:
                raise ValueError(f"a labelling prompt has {n} tokens > max_length={self.max_length}; "
                                 "lower --max-query-chars")
            T = batching.pow2_bucket(n, 16, self.max_length)  # pow2 buckets: few compiles
            ids, mask = batching.pad_right([r for r, _ in chunk], T, self.batch_size, 0)
            start_B = np.array([first for _, first in chunk] + [T] * (self.batch_size - len(chunk)))
            target = mask * (np.arange(T)[None] >= start_B[:, None])  # the label word's tokens
            out[s:s + len(chunk)] = np.asarray(self._label_logp(self.model.params, ids, mask, target))[:len(chunk)]
        return out

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """``f64[Q]``: ``s(q) = log p(constrained) - log p(open)`` (module docstring)."""
        logp = self.row_logprobs(label_rows(self.tokenizer, queries)).reshape(len(queries), len(LABEL_WORDS))
        return logp[:, 0] - logp[:, 1]


def labels_from_scores(scores_Q, threshold: float = 0.0) -> list[str]:
    return ["CONSTRAINED" if s > threshold else "OPENENDED" for s in np.asarray(scores_Q)]


def random_labels(n: int, seed: int) -> list[str]:
    """The ``random`` qtype source of `reward.qtype_labels` as label names (same seed, same labels)."""
    flags = reward.qtype_labels(reward.preset("rer_random_qtype"), np.zeros(n, np.int32), seed)
    return ["CONSTRAINED" if f else "OPENENDED" for f in flags]


def agreement(predicted: Sequence[str], given: Sequence[str]) -> dict:
    """Accuracy, Cohen's kappa and the confusion ``{given: {predicted: count}}`` of two label lists."""
    if len(predicted) != len(given):
        raise ValueError(f"{len(predicted)} predicted labels for {len(given)} given ones")
    pred, ref = np.asarray(predicted), np.asarray(given)
    n = len(pred)
    if n == 0:
        return {"n": 0, "accuracy": float("nan"), "cohen_kappa": float("nan"), "confusion": {}}
    acc = float(np.mean(pred == ref))
    chance = float(sum(np.mean(pred == q) * np.mean(ref == q) for q in prompts_lib.QTYPES))
    kappa = (acc - chance) / (1 - chance) if chance < 1 else float("nan")
    confusion = {g: {p: int(np.sum((ref == g) & (pred == p))) for p in prompts_lib.QTYPES} for g in prompts_lib.QTYPES}
    return {"n": n, "accuracy": acc, "cohen_kappa": float(kappa), "confusion": confusion,
            "predicted_constrained": float(np.mean(pred == "CONSTRAINED")),
            "given_constrained": float(np.mean(ref == "CONSTRAINED"))}


def _write_rows(path: str, rows: list[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            json.dump(rows, f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)


def label_file(prompts: str, out: str, *, model: str = "", tokenizer: str = "", use_random: bool = False,
               seed: int = 0, threshold: float = 0.0, batch_size: int = 8, max_query_chars: int = 2000,
               overwrite: bool = False) -> dict:
    """Label every row of ``prompts`` into ``out`` (module docstring); returns the agreement report."""
    if bool(model) == bool(use_random):
        raise ValueError("give exactly one of --model DIR (zero-shot labeller) or --random (seeded random labels)")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    raw = prompts_lib.read_rows(prompts)
    records = prompts_lib.records_from_rows(raw, source=prompts, missing_qtype="OPENENDED")
    if not records:
        raise ValueError(f"prompt file {prompts!r} holds no prompts")
    if use_random:
        labels, scores = random_labels(len(records), seed), None
    else:
        labeller = ZeroShotLabeller(model, tokenizer, batch_size=batch_size)
        scores = labeller.scores([query_text(r.instruction, max_query_chars) for r in records])
        labels = labels_from_scores(scores, threshold)
    given = [row.get("qtype") for row, _ in raw]
    rows = []
    for i, (row, _) in enumerate(raw):
        new = {**row, "qtype": labels[i]}
        if given[i] is not None:
            new["qtype_given"] = given[i]
        if scores is not None:
            new["qtype_score"] = float(scores[i])
        rows.append(new)
    _write_rows(out, rows)
    has = [i for i, g in enumerate(given) if g is not None]
    report = {"prompts": os.path.abspath(prompts), "out": os.path.abspath(out), "n_prompts": len(rows),
              "labeller": "random" if use_random else os.path.abspath(model),
              "seed": seed if use_random else None, "threshold": None if use_random else threshold,
              "prompt": None if use_random else PROMPT, "label_words": None if use_random else LABEL_WORDS,
              "agreement": agreement([labels[i] for i in has], [given[i] for i in has])}
    with open(f"{os.path.splitext(out)[0]}.agreement.json", "w") as f:
        json.dump(report, f, indent=1)
    return report
