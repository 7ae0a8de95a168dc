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
``compose`` is a pure jittable function of a *static* spec; ``qtype_labels`` draws the CONSTRAINED flags of a
prompt set under a spec's ``qtype_source``. The host side lives elsewhere: ``reward_engine`` (features, relevance
and composition of rollouts), ``gold_rm`` (the black-box judge) and ``reward_engine.score_texts`` (batches of texts).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np

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


def qtype_labels(spec: RewardSpec, labels_P, seed: int):
    """CONSTRAINED flags ``bool[P]`` for every prompt under ``spec.qtype_source`` (random: seeded per prompt)."""
    if spec.qtype_source == "label":
        return np.asarray(labels_P) == 1
    if spec.qtype_source == "random":
        return np.random.default_rng([seed, 0x9E37]).integers(0, 2, len(labels_P)).astype(bool)
    raise ValueError("reward.qtype_source='predicted' needs predicted labels: label the prompt file with "
                     "rre-label-qtype and train with --config.data.train_file=<labelled file> and a 'label' preset")
