"""The host reward engine: features of rollouts on device, relevance through the encoder, every spec composed.

Shapes: ``B`` responses of a batch, ``N`` response tokens, ``P`` prompts of the engine's prompt set, ``D``
encoder width.

One definition of a response's scores, the paper's (docs/design.md 4.2), for every path -- a PPO step's reward,
the dev eval, ``rre-eval``, ``rre-bon`` and ``rre-score``: every caller hands ``RewardEngine.score`` the response
as sampled (decoded) or as given, and

* LI and RP are computed on ``clean(r)``: the on-device features strip the response and cut it at its first
  stop string themselves (``features.text_features``);
* QR and AR embed ``r`` itself. The paper's ``ReversedEngineeredRewardForInference`` cleans the response for
  its length and repetition terms only; its relevance encoder (``ContrieverModelForInference.get_reward``) gets
  ``batch["response"]``, the text as generated, in training and in ``eval_monotonicity.py`` alike.

``relevance_text='cut'`` (``config.reward.relevance_text``, ``rre-score --relevance-text cut``) is the one
variant, off by default: relevance embeds ``features.scored_text(r)``, the response cut at its first stop string.
Stores and reports record which one scored them.

``only_composed=True`` (``rre-score`` without ``--counterfactual``) embeds only the relevance texts some spec
composes: under a branching spec (RER) the query of an open-ended prompt and the reference answer of a
constrained one, as the paper's scoring does (two texts per item, not three); the components no spec reads are
NaN. What is computed is the same number either way: a text's embedding does not depend on what else is embedded.
"""
from __future__ import annotations

import jax
import numpy as np
from tqdm.auto import tqdm

from rre_jax import features, mesh as mesh_lib, programs as programs_lib, relevance
from rre_jax.data import batching
from rre_jax.reward import RewardSpec, compose, qtype_labels

# What the relevance encoder embeds: the response as sampled or given (the paper's), or cut at its first stop string.
RELEVANCE_TEXTS = ("response", "cut")


def check_relevance_text(value: str, field: str = "relevance_text") -> str:
    """``value`` when it is one of ``RELEVANCE_TEXTS``, else a ValueError naming ``field`` and the choices."""
    if value not in RELEVANCE_TEXTS:
        raise ValueError(f"{field}={value!r}: choose 'response' (relevance on the response as sampled or given, the "
                         "paper's) or 'cut' (on the response cut at its first stop string)")
    return value


def feature_programs(tables: features.FeatureTables, stop_strings, *, mesh=None, rules=None
                     ) -> programs_lib.FeaturePrograms:
    """The features' programs for ``tables`` (its byte table's shape) and ``stop_strings``, on ``mesh`` (default:
    one local device)."""
    if mesh is None:
        mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(1, 1, 1)), jax.local_devices()[:1])
    vocab, width = tables.bytes_VxL.shape
    return programs_lib.FeaturePrograms(programs_lib.Layout(mesh, rules if rules is not None else
                                                            mesh_lib.DEFAULT_RULES), vocab, width, tuple(stop_strings))


class RewardEngine:
    """Scores rollouts of one prompt set under a training spec and counterfactual specs.

    ``features`` runs a program of ``programs`` (token ids -> LI, RP, cut index, on device; default:
    `feature_programs` on one device). ``score`` adds relevance (response text re-tokenized on the host for the
    encoder; query and reference embeddings are computed once per prompt set and cached) and composes every
    spec. Every component is returned as its own array. ``seed`` draws the query types of a spec with random ones
    (``rer_random_qtype``); ``seeds`` gives some specs their own (a sweep's members: ``{spec name: seed}``).
    """

    def __init__(self, spec: RewardSpec, counterfactual, tables, *, stop_strings, queries, references,
                 qtype_P, encoder=None, seed: int = 0, relevance_text: str = "response", only_composed: bool = False,
                 programs: programs_lib.FeaturePrograms | None = None, seeds=None):
        self.relevance_text = check_relevance_text(relevance_text)
        self.spec, self.specs = spec, {"proxy": spec, **dict(counterfactual)}
        self.needs_relevance = any(s.needs_relevance for s in self.specs.values())
        self.needs_answer = any(s.needs_answer_relevance for s in self.specs.values())
        if self.needs_relevance and encoder is None:
            names = sorted(n for n, s in self.specs.items() if s.needs_relevance)
            raise ValueError(f"reward specs {names} use relevance but no relevance encoder is configured; set "
                             "--config.relevance.path=<BERT checkpoint dir> (or 'minilm'), or pick 'li'/'li_rp'")
        self.encoder, self.tables, self.stop_strings = encoder, tables, tuple(stop_strings)
        seeds = dict(seeds or {})
        self.constrained = {n: qtype_labels(s, qtype_P, seeds.get(n, seed)) for n, s in self.specs.items()}
        self.programs = programs or feature_programs(tables, self.stop_strings)
        if self.programs.stop_strings != self.stop_strings:
            raise ValueError(f"reward engine: stop strings {self.stop_strings} but its feature programs cut at "
                             f"{self.programs.stop_strings}")
        n_prompts = len(self.constrained["proxy"])
        q_P, y_P = np.full(n_prompts, self.needs_relevance), np.full(n_prompts, self.needs_answer)
        if only_composed:  # QR where a spec reads it (open-ended prompts under a branching spec), AR likewise
            q_P, y_P = np.zeros(n_prompts, bool), np.zeros(n_prompts, bool)
            for name, s in self.specs.items():
                if s.needs_relevance:
                    q_P |= ~self.constrained[name] if s.needs_answer_relevance else True
                    y_P |= self.constrained[name] if s.needs_answer_relevance else False
        self._q_PxD = self._embed_where(queries, q_P)
        self._y_PxD = self._embed_where(references, y_P)

    def _embed_where(self, texts, needed_P):
        """``f32[P, D]``: the embeddings of the texts where ``needed_P``, NaN rows elsewhere (None: none needed)."""
        if not needed_P.any():
            return None
        texts = list(texts)
        if needed_P.all():
            return self.encoder.embed_texts(texts)
        some_KxD = self.encoder.embed_texts([t for t, keep in zip(texts, needed_P) if keep])
        out_PxD = np.full((len(texts), some_KxD.shape[1]), np.nan, some_KxD.dtype)
        out_PxD[needed_P] = some_KxD
        return out_PxD

    def features(self, tokens_BxN, mask_BxN, max_bytes: int | None = None, total_bytes: int | None = None):
        """LI, RP, cut index (``features.Features``) on device. ``max_bytes`` (static; default N * L, which never
        truncates) bounds each response's bytes and ``total_bytes`` (static; default B * (max_bytes + 1)) the
        packed stream of all of them: the batch's real byte total, bucketed, is the main lever on the cost."""
        B, N = tokens_BxN.shape
        return self.programs.features(B, N, max_bytes, total_bytes)(self.tables, tokens_BxN, mask_BxN)

    def relevance_inputs(self, response_texts) -> list[str]:
        """The texts the relevance encoder embeds for ``response_texts``: themselves, or their cut."""
        if self.relevance_text == "cut":
            return [features.scored_text(t, self.stop_strings) for t in response_texts]
        return list(response_texts)

    def score(self, index_B, feats, response_texts):
        """``{component: f32[B]}``: li, rp, n_words, qr, ar (when used), and one entry per spec.
        ``response_texts``: the responses as sampled or given (never cut by the caller); ``feats`` their features."""
        out = {"li": np.asarray(feats.li_B), "rp": np.asarray(feats.rp_B),
               "n_words": np.asarray(feats.n_words_B).astype(np.float32)}
        qr = ar = None
        if self.needs_relevance:
            r_BxD = self.encoder.embed_texts(self.relevance_inputs(response_texts))
            qr = out["qr"] = relevance.pair_dot(self._q_PxD[index_B], r_BxD)
            if self.needs_answer:
                ar = out["ar"] = relevance.pair_dot(self._y_PxD[index_B], r_BxD)
            # NaN where only_composed left a component out; compose's branch never selects it there
        for name, s in self.specs.items():
            out[name] = np.asarray(compose(s, out["li"], out["rp"], qr, ar, self.constrained[name][index_B]))
        return out


# ======================================================================================= texts

# Scoring response *texts* (stored rollouts, AlpacaEval outputs) in batches planned for few compiles: texts are
# re-tokenized with the policy's tokenizer, so LI and RP come from the same on-device features as a rollout's
# (they cut at the stop strings themselves), and relevance embeds each text as given, or what the engine's
# ``relevance_text`` says. Shapes: ``B`` rows of a feature batch, ``N`` response tokens (a power-of-two bucket).

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
