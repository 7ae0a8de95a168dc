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
"""
from __future__ import annotations

import jax
import numpy as np

from rre_jax import features, mesh as mesh_lib, programs as programs_lib, relevance
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
                 qtype_P, encoder=None, seed: int = 0, relevance_text: str = "response",
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
        self._q_PxD = encoder.embed_texts(list(queries)) if self.needs_relevance else None
        self._y_PxD = encoder.embed_texts(list(references)) if self.needs_answer else None

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
        for name, s in self.specs.items():
            out[name] = np.asarray(compose(s, out["li"], out["rp"], qr, ar, self.constrained[name][index_B]))
        return out
