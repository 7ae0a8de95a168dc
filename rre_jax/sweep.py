"""A sweep: the paper's table as one program -- one run per reward preset and seed, trained as LoRA adapters over
one frozen trunk (``config.sweep``).

    rre-train --config configs/tiny.py:sweep --workdir /tmp/sweep
    rre-train --config configs/alpacafarm_rer.py:sweep,v5e-8 --workdir gs://b/sweep --config.sweep.seeds=0,1 ...

The members are ``sweep.presets x sweep.seeds``; member ``<preset>-s<seed>`` is the run ``rre-train`` would train
with ``--config.reward.preset=<preset> --config.seed=<seed>`` and every other field of the config, and it keeps
that run's workdir in ``<workdir>/<preset>-s<seed>/`` (``member_config`` is the config that run would have, and
what its checkpoints save). What the members share is what such runs share anyway: the frozen trunk (the reference
is the trunk with adapters off), the prompts in their order (``data.shuffle_seed``), the relevance encoder and the
gold RM. What each holds alone: its adapters, value head, optimizer state, the algorithm's own entries (PPO's score
moments and KL controller) and its RNG stream.

This module is the sweep's config, validated before anything is loaded or compiled (``SweepConfig.from_config``,
called by ``run_spec.validate``); ``sweep_programs`` holds its programs and ``sweep_run`` the story of a sweep.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from rre_jax import reward
from rre_jax.errors import UserError

# The variants of the paper's main table (docs/design.md 4.2), the members of ``configs/*.py:sweep``;
# rer_predicted_qtype needs a labelled prompt file (rre-label-qtype), so it joins a sweep by hand.
PAPER_PRESETS = ("li", "li_rp", "qr_li_rp", "rer", "rer_random_qtype")
SWEEP_FILE = "sweep.json"  # <workdir>/sweep.json: the members of a sweep workdir (rre-eval reads it)


@dataclasses.dataclass(frozen=True)
class Member:
    """One run of a sweep: a reward preset and a seed."""

    preset: str
    seed: int

    @property
    def name(self) -> str:
        """The member's directory under the sweep's workdir, e.g. ``li_rp-s0``."""
        return f"{self.preset}-s{self.seed}"


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The validated ``config.sweep``: its members in order (presets outer, seeds inner) and how the update takes
    them: ``update_members`` at a time (``0``: all together, one ``vmap``; ``1``: one after another; ``n``: ``n``
    at a time, ``lax.map`` in chunks: more members per pass, fewer passes and more activations alive at once)."""

    members: tuple[Member, ...]
    update_members: int = 1

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def update_chunk(self) -> int:
        """Members per pass of the update (``update_members``, 0 meaning all)."""
        return self.update_members or self.size

    @classmethod
    def from_config(cls, config) -> "SweepConfig | None":
        """The sweep of ``config`` (None when ``config.sweep.presets`` is empty: a single run); every mistake is
        a `UserError` naming the field and the fix."""
        section = config.get("sweep")
        presets = tuple(str(p) for p in (section.presets if section is not None else ()))
        seeds = tuple(section.seeds) if section is not None else ()
        if not presets:
            if seeds:
                raise UserError(f"config.sweep.seeds={seeds} but config.sweep.presets is empty: name the reward "
                                "presets of the sweep (--config.sweep.presets=li,li_rp,...) or drop the seeds")
            return None
        for p in presets:
            _check_preset(p)
        if len(set(presets)) != len(presets):
            raise UserError(f"config.sweep.presets={presets} names a preset twice; give each once (seeds repeat "
                            "a preset: --config.sweep.seeds=0,1)")
        seeds = _seeds(seeds, config)
        if config.model.train_mode != "lora":
            raise UserError(f"config.sweep: a sweep trains its members as LoRA adapters over one frozen trunk, but "
                            f"config.model.train_mode={config.model.train_mode!r} trains every weight (a trunk per "
                            "member); set --config.model.train_mode=lora, or train the members as separate runs "
                            "without config.sweep")
        logging_ = config.get("logging")
        if logging_ is not None and bool(logging_.get("wandb", False)):
            raise UserError("config.logging.wandb=True with config.sweep: a sweep's members log to their own "
                            "workdirs (metrics.jsonl, TensorBoard), not to W&B; set --config.logging.wandb=False, "
                            "or train the members as separate runs without config.sweep")
        members = tuple(Member(p, s) for p in presets for s in seeds)
        update = section.get("update_members", 1)
        if not isinstance(update, int) or isinstance(update, bool) or not 0 <= update <= len(members):
            raise UserError(f"config.sweep.update_members={update!r}: give how many members one pass of the update "
                            f"takes, 1 (one after another) to {len(members)} (all together), or 0 (all)")
        return cls(members, int(update))


def _check_preset(name: str) -> None:
    if name not in reward.PRESETS:
        raise UserError(f"config.sweep.presets: unknown reward preset {name!r}; choose from {sorted(reward.PRESETS)}")
    if reward.PRESETS[name].qtype_source == "predicted":
        raise UserError(f"config.sweep.presets: {name!r} needs predicted query types: label the prompt file with "
                        "rre-label-qtype, train on it with --config.data.train_file=<labelled file> and put 'rer' "
                        "in the sweep instead")


def _seeds(seeds: tuple, config) -> tuple[int, ...]:
    if not seeds:
        return (int(config.seed),)
    bad = [s for s in seeds if not isinstance(s, int) or isinstance(s, bool)]
    if bad:
        raise UserError(f"config.sweep.seeds={seeds}: seeds are integers, e.g. --config.sweep.seeds=0,1,2")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"config.sweep.seeds={seeds} names a seed twice; give each once")
    return tuple(int(s) for s in seeds)


def member_config(config, member: Member) -> ml_collections.ConfigDict:
    """The config of the run ``member`` stands for: ``config`` with its preset and seed and no sweep (what the
    member's checkpoints save, so ``rre-eval --workdir <workdir>/<member>`` sees a single run). Named
    ``<config.name>-<member>`` (its generator name in AlpacaEval outputs)."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.reward.preset = member.preset
    out.seed = member.seed
    out.sweep.presets = ()
    out.sweep.seeds = ()
    out.name = f"{config.name}-{member.name}"
    out.lock()
    return out
