"""Composition of white-box features into a proxy reward (docs/design.md 4.2).

Shapes: ``B`` responses. Inputs are per-response features, all ``f32[B]``:

* ``li_B``  length incentive  = #wordpunct tokens / 100
* ``rp_B``  repetition        = #distinct word trigrams / #trigrams (1 when < 3 tokens)
* ``qr_B``  query relevance   = E(q) . E(r)   (dot product of mean-pooled encoder states)
* ``ar_B``  answer relevance  = E(y) . E(r)   with y the reference answer
* ``constrained_B`` bool: the query type is CONSTRAINED

The proxy, with switches exactly as the reference's ``_combine_scores``::

    F(v)     = v / ar_divisor * (max_new_tokens / 100)            # 0..3.5 -> 0..5.12, unclipped
    branch   = relevance and branching and constrained
    proxy    = branch ? F(AR)               * (RP if repetition else 1)
                      : (QR if relevance else 1) * (LI if length else 1) * (RP if repetition else 1)

``RewardSpec`` is a frozen, self-validating description; ``PRESETS`` holds the variants the paper compares.
``compose`` is a pure jittable function of a *static* spec, and ``compose_many`` scores the same features
under several specs at once (counterfactual logging: what each variant would have paid for one batch).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp

QTYPE_SOURCES = ("label", "random", "predicted")


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """Which white-box features make up the proxy, and how they are combined.

    Attributes:
      length / repetition / relevance / branching: the reference's four switches.
      qtype_source: where CONSTRAINED/OPENENDED labels come from: the dataset ``label``, ``random`` (the
        paper's ablation, seeded per prompt) or ``predicted`` (a zero-shot labeller).
      ar_divisor, max_new_tokens: constants of the range map F.
    """

    length: bool = True
    repetition: bool = False
    relevance: bool = False
    branching: bool = False
    qtype_source: str = "label"
    ar_divisor: float = 3.5
    max_new_tokens: int = 512

    def __post_init__(self):
        if self.qtype_source not in QTYPE_SOURCES:
            raise ValueError(f"reward.qtype_source={self.qtype_source!r}; choose one of {QTYPE_SOURCES}")
        if self.ar_divisor <= 0 or self.max_new_tokens <= 0:
            raise ValueError("reward.ar_divisor and reward.max_new_tokens must be positive")

    @property
    def needs_relevance(self) -> bool:
        return self.relevance

    @property
    def needs_answer_relevance(self) -> bool:
        return self.relevance and self.branching


PRESETS: Mapping[str, RewardSpec] = {
    "li": RewardSpec(length=True),
    "li_rp": RewardSpec(length=True, repetition=True),
    "qr_li_rp": RewardSpec(length=True, repetition=True, relevance=True),  # "R3_OE": no branching
    "rer": RewardSpec(length=True, repetition=True, relevance=True, branching=True),
    "rer_random_qtype": RewardSpec(length=True, repetition=True, relevance=True, branching=True,
                                   qtype_source="random"),
    "rer_predicted_qtype": RewardSpec(length=True, repetition=True, relevance=True, branching=True,
                                      qtype_source="predicted"),
}


def preset(name: str) -> RewardSpec:
    if name not in PRESETS:
        raise KeyError(f"unknown reward preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def range_map(v_B, spec: RewardSpec):
    """F: answer relevance on [0, ar_divisor] -> [0, max_new_tokens / 100], linear and unclipped."""
    return v_B / spec.ar_divisor * (spec.max_new_tokens / 100.0)


def compose(spec: RewardSpec, li_B, rp_B, qr_B=None, ar_B=None, constrained_B=None):
    """Proxy reward ``f32[B]`` of one spec (see module docstring); unused inputs may be None."""
    ones = jnp.ones_like(li_B)
    rep = rp_B if spec.repetition else ones
    rel = qr_B if spec.relevance else ones
    if spec.relevance and qr_B is None:
        raise ValueError("this reward uses query relevance but no relevance scores were given")
    open_ended = rel * (li_B if spec.length else ones) * rep
    if not spec.needs_answer_relevance:
        return open_ended
    if ar_B is None or constrained_B is None:
        raise ValueError("this reward branches on query type: answer relevance and qtypes are required")
    return jnp.where(constrained_B, range_map(ar_B, spec) * rep, open_ended)


def compose_many(specs: Mapping[str, RewardSpec], li_B, rp_B, qr_B=None, ar_B=None, constrained_B=None):
    """``{name: proxy_B}`` for several specs on the same features (counterfactual scoring)."""
    return {name: compose(s, li_B, rp_B, qr_B, ar_B, constrained_B) for name, s in specs.items()}


# ------------------------------------------------------------------------------------------------------------
# The reward engine: features on device, relevance via the encoder, composition, counterfactuals.
# ------------------------------------------------------------------------------------------------------------

def qtype_labels(spec: RewardSpec, labels_P, seed: int):
    """CONSTRAINED flags ``bool[P]`` for every prompt under ``spec.qtype_source`` (random: seeded per prompt)."""
    import numpy as np
    if spec.qtype_source == "label":
        return np.asarray(labels_P) == 1
    if spec.qtype_source == "random":
        return np.random.default_rng([seed, 0x9E37]).integers(0, 2, len(labels_P)).astype(bool)
    raise ValueError("reward.qtype_source='predicted' needs predicted labels: label the prompt file with "
                     "rre-label-qtype and train with --config.data.train_file=<labelled file> and a 'label' preset")


@functools.lru_cache(maxsize=None)
def _features_program(stop_strings: tuple[str, ...]):
    """The jitted features for one set of stop strings, shared by every engine in the process (so a second
    engine -- a counterfactual run, a notebook re-run -- reuses the compiled shapes)."""
    from rre_jax import features
    return jax.jit(lambda t, ids, m, max_bytes=None, total_bytes=None: features.text_features(
        ids, m, t, stop_strings, max_bytes, total_bytes), static_argnames=("max_bytes", "total_bytes"))


class RewardEngine:
    """Scores rollouts of one prompt set under a training spec and counterfactual specs.

    ``features`` is jitted (token ids -> LI, RP, cut index, on device). ``score`` adds relevance (response
    text re-tokenized on the host for the encoder; query and reference embeddings are computed once per
    prompt set and cached) and composes every spec. Every component is returned as its own array.
    """

    def __init__(self, spec: RewardSpec, counterfactual, tables, *, stop_strings, queries, references,
                 qtype_P, encoder=None, seed: int = 0):
        import numpy as np
        self.spec, self.specs = spec, {"proxy": spec, **dict(counterfactual)}
        self.needs_relevance = any(s.needs_relevance for s in self.specs.values())
        self.needs_answer = any(s.needs_answer_relevance for s in self.specs.values())
        if self.needs_relevance and encoder is None:
            names = sorted(n for n, s in self.specs.items() if s.needs_relevance)
            raise ValueError(f"reward specs {names} use relevance but no relevance encoder is configured; set "
                             "--config.relevance.path=<BERT checkpoint dir> (or 'minilm'), or pick 'li'/'li_rp'")
        self.encoder, self.tables = encoder, tables
        self.constrained = {n: qtype_labels(s, qtype_P, seed) for n, s in self.specs.items()}
        self.features_fn = _features_program(tuple(stop_strings))
        self._q_PxD = encoder.embed_texts(list(queries)) if self.needs_relevance else None
        self._y_PxD = encoder.embed_texts(list(references)) if self.needs_answer else None
        self._np = np

    def features(self, tokens_BxN, mask_BxN, max_bytes: int | None = None, total_bytes: int | None = None):
        """LI, RP, cut index (``features.Features``) on device. ``max_bytes`` (static; default N * L, which never
        truncates) bounds each response's bytes and ``total_bytes`` (static; default B * (max_bytes + 1)) the
        packed stream of all of them: the batch's real byte total, bucketed, is the main lever on the cost."""
        return self.features_fn(self.tables, tokens_BxN, mask_BxN, max_bytes=max_bytes, total_bytes=total_bytes)

    def score(self, index_B, feats, response_texts):
        """``{component: f32[B]}``: li, rp, n_words, qr, ar (when used), and one entry per spec."""
        np = self._np
        out = {"li": np.asarray(feats.li_B), "rp": np.asarray(feats.rp_B),
               "n_words": np.asarray(feats.n_words_B).astype(np.float32)}
        qr = ar = None
        if self.needs_relevance:
            r_BxD = self.encoder.embed_texts(list(response_texts)).astype(np.float64)
            qr = np.einsum("bd,bd->b", self._q_PxD[index_B].astype(np.float64), r_BxD).astype(np.float32)
            out["qr"] = qr
            if self.needs_answer:
                ar = np.einsum("bd,bd->b", self._y_PxD[index_B].astype(np.float64), r_BxD).astype(np.float32)
                out["ar"] = ar
        for name, s in self.specs.items():
            out[name] = np.asarray(compose(s, out["li"], out["rp"], qr, ar, self.constrained[name][index_B]))
        return out


class GoldRM:
    """A black-box gold reward model (docs/design.md 4.3): own tokenizer, own input string, scores only.

    Both layouts take the Starling input string ``starling_input(starling_query(prompt), response)``,
    tokenized without special tokens, truncated on the left to ``max_length`` and right padded with the
    pad id (0 for Starling, whose score sits before the first PAD); ``seq_cls`` checkpoints score at the
    last real token. Batches are padded to length buckets so scoring compiles once per bucket.
    """

    def __init__(self, path: str, *, tokenizer_path: str = "", max_length: int = 2048, batch_size: int = 4,
                 layout: str = "auto", mesh=None, rules=None, is_random: bool = False, placement: str = "device"):
        import os
        from rre_jax import tokenizer as tok_lib
        from rre_jax.models import from_pretrained, sequence_scores
        tok_dir = tokenizer_path or path
        if not os.path.exists(os.path.join(tok_dir, "tokenizer_config.json")) and not os.path.exists(
                os.path.join(tok_dir, "tokenizer.json")):
            raise FileNotFoundError(f"gold RM tokenizer not found in {tok_dir!r} (no tokenizer.json or "
                                    "tokenizer_config.json); set --config.gold_rm.tokenizer=<dir>")
        self.tokenizer = tok_lib.load_tokenizer(tok_dir)
        self.tokenizer.truncation_side = "left"
        kw = {} if rules is None else {"rules": rules}
        if placement not in ("device", "host"):
            raise ValueError(f"gold_rm.placement={placement!r}; choose 'device' or 'host'")
        self.placement, self._mesh, self._rules = placement, mesh, rules
        if placement == "host":  # kept in host memory; brought onto the mesh for each score() call only
            from rre_jax.models import Pretrained, llama
            kind, cfg, params = llama.load_pretrained(path, device=jax.devices("cpu")[0])
            self.model = Pretrained(kind, cfg, params)
        else:
            self.model = from_pretrained(path, mesh=mesh, **kw)
        if self.model.kind not in ("seq_cls", "starling"):
            raise ValueError(f"gold RM {path!r} is a {self.model.kind} checkpoint; expected a sequence scorer "
                             "(LlamaForSequenceClassification 'score' or Starling 'v_head')")
        self.layout = self.model.kind if layout == "auto" else {"hf_score": "seq_cls"}.get(layout, layout)
        self.pad_id = 0 if self.layout == "starling" else (self.tokenizer.pad_token_id or 0)
        self.max_length, self.batch_size, self.path = max_length, batch_size, path
        self.is_random = is_random or _marked_random(path)
        self._score = jax.jit(lambda p, ids, m: sequence_scores(self.model, p, ids, m, layout=self.layout)[:, 0])

    def inputs(self, prompts, responses) -> list[str]:
        from rre_jax.data import templates
        return [templates.starling_input(templates.starling_query(p), r) for p, r in zip(prompts, responses)]

    def _device_params(self):
        """The params on the mesh: as loaded (``device``), or brought in from host memory (``host``)."""
        if self.placement == "device" or self._mesh is None:
            return self.model.params
        from rre_jax import mesh as mesh_lib
        from rre_jax.models import llama
        _, specs = mesh_lib.abstract_params(llama.abstract_init_fn(self.model.config, head="score"))
        rules = self._rules if self._rules is not None else mesh_lib.DEFAULT_RULES
        return jax.device_put(self.model.params, mesh_lib.logical_shardings(specs, self._mesh, rules))

    def score(self, prompts, responses):
        """Gold scores ``f32[N]`` of (templated or raw) prompts and response texts."""
        import numpy as np
        params = self._device_params()  # host placement: freed when this call returns
        texts = self.inputs(prompts, responses)
        rows = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"]
        out = np.zeros(len(rows), np.float32)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            T = min(self.max_length, max(16, 1 << (max(len(r) for r in chunk) - 1).bit_length()))
            ids = np.full((self.batch_size, T), self.pad_id, np.int32)
            mask = np.zeros((self.batch_size, T), np.int32)
            for i, r in enumerate(chunk):
                ids[i, :len(r)], mask[i, :len(r)] = r, 1
            out[start:start + len(chunk)] = np.asarray(self._score(params, ids, mask))[:len(chunk)]
        return out


def _marked_random(path: str) -> bool:
    """True for checkpoints written by ``rre_jax.tiny`` as random stand-ins (``rre_tiny.json``)."""
    import json
    import os
    marker = os.path.join(path, "rre_tiny.json")
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        return bool(json.load(f).get("random", False))


def response_ids(tokenizer, texts, bucket: int = 64):
    """Policy-tokenizer ids of response texts (no special tokens), right padded to a multiple of ``bucket``:
    ``(ids_BxN int32, mask_BxN int32)`` for ``RewardEngine.features``."""
    import numpy as np
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    n = max([len(r) for r in rows] + [1])
    N = -(-n // bucket) * bucket
    ids = np.full((len(rows), N), tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((len(rows), N), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def _pow2_bucket(n: int, minimum: int = 64) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def packed_bucket(n: int, minimum: int = 1024) -> int:
    """``n`` rounded up to a multiple of 1/8 of its power of two (<= 12.5% padding, 8 shapes per octave):
    the features' packed stream length (``total_bytes``), which follows a batch's real bytes."""
    step = max(minimum, 1 << max(0, int(n) - 1).bit_length()) // 8
    return max(minimum, -(-int(n) // step) * step)


def score_texts(engine: RewardEngine, tokenizer, index_B, texts, batch_size: int = 64, progress: bool = False):
    """Score response *texts* (e.g. AlpacaEval outputs): tokenize with the policy's tokenizer, features on
    device, relevance on the raw text, every spec composed. ``index_B`` indexes the engine's prompt set.
    Returns ``{component: f32[B]}`` like ``RewardEngine.score``, in the order of ``texts``.

    Every batch has one shape (``batch_size`` rows, or the power of two covering fewer texts; the power-of-two
    tokens and bytes of the longest text; the packed length of the fullest batch), so a call compiles the
    features once: for a one-shot command a compile costs far more than the padding of the shorter batches.
    Texts are scored longest first.
    """
    import numpy as np
    from tqdm.auto import tqdm
    index_B = np.asarray(index_B)
    if len(index_B) != len(texts):
        raise ValueError(f"score_texts: {len(index_B)} prompt indices for {len(texts)} texts")
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i].encode("utf-8")))
    len_V = np.asarray(engine.tables.len_V)
    rows_per_batch = min(batch_size, _pow2_bucket(len(texts), 1))
    batches = []
    for s in range(0, len(texts), batch_size):
        rows = order[s:s + batch_size]
        ids, mask = response_ids(tokenizer, [texts[i] for i in rows])
        batches.append((rows, ids, mask, (len_V[ids] * mask).sum(axis=1)))
    T = _pow2_bucket(max([b[1].shape[1] for b in batches] + [1]))
    max_bytes = _pow2_bucket(max([int(b[3].max()) for b in batches if len(b[3])] + [1]))
    total_bytes = packed_bucket(max([int(b[3].sum()) for b in batches] + [0]) + rows_per_batch)
    out: dict = {}
    for rows, ids, mask, _ in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
        ids, mask = (np.pad(x, ((0, rows_per_batch - len(rows)), (0, T - x.shape[1]))) for x in (ids, mask))
        feats = engine.features(ids, mask, max_bytes=max_bytes, total_bytes=total_bytes)
        feats = type(feats)(*(np.asarray(f)[:len(rows)] for f in feats))
        for k, v in engine.score(index_B[rows], feats, [texts[i] for i in rows]).items():
            out.setdefault(k, np.zeros(len(texts), np.asarray(v).dtype))[rows] = np.asarray(v)
    return out
