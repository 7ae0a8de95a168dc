"""Host data pipeline: tokenize templated prompts, drop over-long ones, and yield left-padded bucketed batches.

Shapes (NumPy, host side): N = number of kept prompts, G = global batch size, B = this host's share
(G / process_count), T = the bucketed prompt length of a batch (the smallest bucket holding the longest prompt of
the *global* batch, so every host builds the same T and the jitted steps see a handful of shapes only).

The shuffling iterator is a pure function of its position: batch ``(epoch, step)`` comes from a permutation
seeded by ``(seed, epoch)``. The position ``IteratorState(epoch, step, seed)`` is three integers; saving it with
the model and restoring it gives the same subsequent batches. Host ``p`` of ``P`` takes rows ``[p*B, (p+1)*B)``
of each global batch: shares are disjoint and their union is the global batch (the layout
``jax.make_array_from_process_local_data`` expects for a batch axis sharded over processes in order).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterator, Sequence

import numpy as np

from rre_jax.data.prompts import PromptRecord
from rre_jax.data.templates import alpaca_prompt

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizedPrompts:
    """Prompts that fit, as ragged token ids; `index` = position in the record list given to `tokenize_prompts`."""

    ids: tuple[np.ndarray, ...]  # int32 each
    lengths: np.ndarray  # int32 [N]
    index: np.ndarray  # int64 [N]
    qtype: np.ndarray  # int32 [N], QTYPE_IDS
    pad_id: int
    dropped: tuple[int, ...]  # positions of prompts with >= max_prompt_length tokens

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_prompts(
    records: Sequence[PromptRecord],
    tokenizer,
    *,
    max_prompt_length: int = 512,
    template: Callable[[str], str] = alpaca_prompt,
    pad_id: int | None = None,
) -> TokenizedPrompts:
    """Templates and tokenizes each record with the tokenizer's own special tokens (e.g. LLaMA's BOS).

    Prompts with ``>= max_prompt_length`` tokens are dropped (as the reference filters ``len < 512``) and the
    count is logged with the first few positions. ``pad_id`` defaults to ``tokenizer.pad_token_id``.
    """
    pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    if pad_id is None:
        raise ValueError("tokenizer has no pad_token_id; set tokenizer.pad_token (e.g. to its unk or eos token) "
                         "or pass pad_id=")
    encoded = tokenizer([template(r.instruction) for r in records], add_special_tokens=True)["input_ids"]
    keep = [i for i, ids in enumerate(encoded) if len(ids) < max_prompt_length]
    dropped = tuple(i for i, ids in enumerate(encoded) if len(ids) >= max_prompt_length)
    if dropped:
        log.warning("dropped %d of %d prompts with >= %d tokens (positions %s%s)", len(dropped), len(records),
                    max_prompt_length, list(dropped[:5]), " ..." if len(dropped) > 5 else "")
    if not keep:
        raise ValueError(f"all {len(records)} prompts have >= max_prompt_length={max_prompt_length} tokens")
    return TokenizedPrompts(
        ids=tuple(np.asarray(encoded[i], np.int32) for i in keep),
        lengths=np.asarray([len(encoded[i]) for i in keep], np.int32),
        index=np.asarray(keep, np.int64),
        qtype=np.asarray([records[i].qtype_id for i in keep], np.int32),
        pad_id=int(pad_id), dropped=dropped)


def bucket_lengths(max_prompt_length: int, *, multiple: int | None = 64, min_length: int = 16) -> tuple[int, ...]:
    """Allowed padded lengths: multiples of ``multiple`` below ``max_prompt_length`` (powers of two from
    ``min_length`` when ``multiple`` is None), then ``max_prompt_length`` itself, which holds every kept prompt."""
    if multiple is not None and multiple < 1 or min_length < 1:
        raise ValueError(f"bucket multiple and min_length must be >= 1, got {multiple}, {min_length}")
    if multiple is not None:
        sizes = list(range(multiple, max_prompt_length, multiple))
    else:
        sizes = [min_length << k for k in range(max_prompt_length.bit_length()) if min_length << k < max_prompt_length]
    return tuple(sizes) + (max_prompt_length,)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One host's share of a global batch. ``ids_BxT`` is left-padded with ``pad_id``; ``mask_BxT`` is 1 on
    prompt tokens. ``index_B`` = positions in the record list given to `tokenize_prompts` (= `PromptRecord.index`
    for a whole file), ``qtype_B`` = QTYPE_IDS, ``valid_B`` False on filler rows of a final partial eval batch."""

    ids_BxT: np.ndarray  # int32
    mask_BxT: np.ndarray  # int32
    index_B: np.ndarray  # int64
    qtype_B: np.ndarray  # int32
    length_B: np.ndarray  # int32
    valid_B: np.ndarray  # bool
    epoch: int
    step: int


def repeat_prompts(batch: Batch, times: int) -> Batch:
    """``batch`` with each prompt on ``times`` consecutive rows (a group of a group method: GRPO, RLOO).

    A host's share stays whole groups, so the rows of every group stay on one host, in order."""
    rep = lambda x: np.repeat(x, times, axis=0)  # noqa: E731
    return dataclasses.replace(batch, ids_BxT=rep(batch.ids_BxT), mask_BxT=rep(batch.mask_BxT),
                               index_B=rep(batch.index_B), qtype_B=rep(batch.qtype_B),
                               length_B=rep(batch.length_B), valid_B=rep(batch.valid_B))


def pad_left(prompts: TokenizedPrompts, rows: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads ``prompts.ids[rows]`` to ``length``: returns ``(ids_BxT int32, mask_BxT int32)``."""
    ids_BxT = np.full((len(rows), length), prompts.pad_id, np.int32)
    mask_BxT = np.zeros((len(rows), length), np.int32)
    for b, r in enumerate(rows):
        ids = prompts.ids[r]
        ids_BxT[b, length - len(ids):] = ids
        mask_BxT[b, length - len(ids):] = 1
    return ids_BxT, mask_BxT


def pad_right(rows: Sequence[Sequence[int]], length: int, n_rows: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows right-padded with ``pad_id`` to ``length`` tokens and ``n_rows`` rows (filler rows all padding):
    ``(ids_BxT int32, mask_BxT int32)``. Every host-side scorer (gold RM, relevance encoder, text features, query
    labeller) pads its batches this way to a bucketed shape, so its jitted forward compiles once per bucket."""
    if len(rows) > n_rows or any(len(r) > length for r in rows):
        raise ValueError(f"pad_right: {len(rows)} rows of up to {max(map(len, rows), default=0)} tokens do not fit "
                         f"{n_rows} x {length}")
    ids_BxT = np.full((n_rows, length), pad_id, np.int32)
    mask_BxT = np.zeros((n_rows, length), np.int32)
    for b, r in enumerate(rows):
        ids_BxT[b, :len(r)] = r
        mask_BxT[b, :len(r)] = 1
    return ids_BxT, mask_BxT


def pow2_bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """The smallest power of two >= ``n`` and >= ``minimum``, capped at ``maximum``: a padded size drawn from
    a handful of values, so the jitted program that takes it compiles a handful of times."""
    size = max(int(minimum), 1 << max(0, int(n) - 1).bit_length())
    return size if maximum is None else min(size, int(maximum))


def _check(prompts: TokenizedPrompts, config: "BatchingConfig", process_index: int, process_count: int) -> None:
    """Fails before any batch is built when hosts cannot share the batch or prompts outgrow the buckets."""
    g = config.global_batch_size
    if not 0 <= process_index < process_count or g % process_count:
        raise ValueError(f"global_batch_size={g} must split evenly over process_count={process_count}, "
                         f"and 0 <= process_index={process_index} < process_count")
    if len(prompts) and prompts.lengths.max() > config.buckets[-1]:
        raise ValueError(f"prompts of up to {prompts.lengths.max()} tokens exceed BatchingConfig.max_prompt_length="
                         f"{config.max_prompt_length}; tokenize with the same max_prompt_length")


def _make_batch(prompts, global_rows, valid_G, buckets, process_index, process_count, epoch, step) -> Batch:
    lengths_G = prompts.lengths[global_rows]
    length = next(b for b in buckets if b >= lengths_G.max())
    share = len(global_rows) // process_count
    rows = global_rows[process_index * share:(process_index + 1) * share]
    ids_BxT, mask_BxT = pad_left(prompts, rows, length)
    return Batch(ids_BxT=ids_BxT, mask_BxT=mask_BxT, index_B=prompts.index[rows], qtype_B=prompts.qtype[rows],
                 length_B=prompts.lengths[rows], valid_B=valid_G[process_index * share:(process_index + 1) * share],
                 epoch=epoch, step=step)


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    """Batching of one prompt set. ``global_batch_size`` counts prompts over all hosts; ``bucket_multiple`` =
    None pads to powers of two from ``min_bucket`` instead of multiples; ``seed`` seeds a fresh iterator."""

    global_batch_size: int
    max_prompt_length: int = 512
    bucket_multiple: int | None = 64
    min_bucket: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.global_batch_size < 1 or self.max_prompt_length < 2:
            raise ValueError(f"BatchingConfig: global_batch_size={self.global_batch_size} must be >= 1 and "
                             f"max_prompt_length={self.max_prompt_length} >= 2")
        bucket_lengths(self.max_prompt_length, multiple=self.bucket_multiple, min_length=self.min_bucket)

    @property
    def buckets(self) -> tuple[int, ...]:
        return bucket_lengths(self.max_prompt_length, multiple=self.bucket_multiple, min_length=self.min_bucket)


@dataclasses.dataclass(frozen=True)
class IteratorState:
    """Position of a `PromptIterator`: the next batch is ``(epoch, step)`` of the order seeded by ``seed``.
    Save ``dataclasses.asdict(state)`` with the checkpoint; ``IteratorState(**saved)`` restores it."""

    epoch: int = 0
    step: int = 0
    seed: int = 0


class PromptIterator:
    """Endless seeded epoch-shuffled batches of one host's share; see the module docstring.

    Each epoch visits ``steps_per_epoch = N // G`` full global batches of a fresh permutation (the remainder
    of that permutation waits for a later epoch, so every prompt is drawn equally often in expectation).
    """

    def __init__(self, prompts: TokenizedPrompts, config: BatchingConfig, *, process_index: int = 0,
                 process_count: int = 1, state: IteratorState | None = None):
        g = config.global_batch_size
        _check(prompts, config, process_index, process_count)
        if len(prompts) < g:
            raise ValueError(f"only {len(prompts)} prompts fit max_prompt_length={config.max_prompt_length}, "
                             f"fewer than global_batch_size={g}")
        self.prompts, self.config = prompts, config
        self.process_index, self.process_count = process_index, process_count
        self.steps_per_epoch = len(prompts) // g
        self.state = state or IteratorState(seed=config.seed)
        if not 0 <= self.state.step < self.steps_per_epoch or self.state.epoch < 0:
            raise ValueError(f"restored {self.state} is outside this prompt set ({self.steps_per_epoch} steps per "
                             "epoch); was it saved for a different prompt file or batch size?")

    def batch_at(self, epoch: int, step: int) -> Batch:
        """This host's share of global batch ``step`` of ``epoch`` (pure: depends only on the arguments)."""
        order = np.random.default_rng([self.state.seed, epoch]).permutation(len(self.prompts))
        g = self.config.global_batch_size
        rows = order[step * g:(step + 1) * g]
        return _make_batch(self.prompts, rows, np.ones(g, bool), self.config.buckets, self.process_index,
                           self.process_count, epoch, step)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        epoch, step = self.state.epoch, self.state.step
        batch = self.batch_at(epoch, step)
        step += 1
        if step == self.steps_per_epoch:
            epoch, step = epoch + 1, 0
        self.state = IteratorState(epoch=epoch, step=step, seed=self.state.seed)
        return batch


def eval_batches(prompts: TokenizedPrompts, config: BatchingConfig, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
    """Every prompt once, in order, in fixed-size global batches; the last batch is filled up with repeats of
    the first prompts marked ``valid_B = False`` so its shape matches the others. Checks run on the call."""
    _check(prompts, config, process_index, process_count)
    g, n = config.global_batch_size, len(prompts)
    return (_make_batch(prompts, np.arange(start, start + g) % n, np.arange(start, start + g) < n, config.buckets,
                        process_index, process_count, 0, step)
            for step, start in enumerate(range(0, n, g)))
