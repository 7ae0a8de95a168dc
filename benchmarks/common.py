"""Shared definitions of the PPO-iteration benchmark (issue 4): workload, prompts, tokenizer, reward stand-in,
FLOP model, and the call into the reference process.

Both halves use this module: ``ppo_reference.py`` (trl 0.7.4 / torch, runs in the reference virtualenv) and the
rre_jax half (``ppo_iteration.py``, which gets the reference's figures through ``run_reference``). It imports neither jax nor torch, only NumPy and the standard library (``tokenizers`` lazily), so it
runs unchanged in both environments.

Shape letters: B = batch (16 prompts), P = prompt length (64), R = response length (128), T = P + R (192).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import subprocess

import numpy as np

# ------------------------------------------------------------------------------------------------- workload

# The "mid" random Llama of docs/design.md section 6 (58.5M parameters, untied embeddings, fp32).
MID_MODEL = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

# Special ids of the locally trained tokenizer (its first four vocabulary entries).
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One PPO iteration as the paper runs it (docs/design.md 4.4), at benchmark lengths."""

    batch: int = 16
    prompt_len: int = 64
    new_tokens: int = 128
    mini_batch: int = 2
    grad_accum: int = 4
    ppo_epochs: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.batch % (self.mini_batch * self.grad_accum):
            raise ValueError(
                f"Workload.batch={self.batch} must be a multiple of mini_batch*grad_accum="
                f"{self.mini_batch * self.grad_accum}; change batch, mini_batch or grad_accum."
            )

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.new_tokens

    @property
    def optimizer_steps(self) -> int:
        return self.ppo_epochs * self.batch // (self.mini_batch * self.grad_accum)


def prompt_ids(work: Workload, vocab_size: int) -> np.ndarray:
    """The B x P prompt token ids both halves feed: seeded uniform draws over the non-special ids.

    Random ids keep the two halves byte-identical without sharing a tokenizer; the model is random anyway.
    """
    rng = np.random.default_rng(work.seed)
    return rng.integers(len(SPECIAL_TOKENS), vocab_size, size=(work.batch, work.prompt_len), dtype=np.int64)


def ids_digest(ids_BxP: np.ndarray) -> str:
    """sha256 of the prompt ids (int64, C order): lets the two halves check they fed the same prompts."""
    return hashlib.sha256(np.ascontiguousarray(ids_BxP, dtype=np.int64).tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ tokenizer

def _synthetic_corpus(seed: int, n_words: int = 60000) -> list[str]:
    """Deterministic pseudo-words (syllable strings) in 20-word sentences: enough types for a 32k BPE in ~5 s."""
    rng = np.random.default_rng(seed)
    onsets = list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "qu", "st", "tr", "pl"]
    nuclei = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
    syllables = [c + v for c in onsets for v in nuclei]
    lengths = rng.integers(1, 5, n_words)
    picks = rng.integers(0, len(syllables), int(lengths.sum()))
    words, pos = [], 0
    for n in lengths:
        words.append("".join(syllables[j] for j in picks[pos:pos + n]))
        pos += n
    return [" ".join(words[i:i + 20]) + "." for i in range(0, n_words, 20)]


def train_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE ``tokenizers.Tokenizer`` with exactly ``vocab_size`` entries, trained here (no hub).

    Ids 0..3 are <pad>, <s>, </s>, <unk>; every id decodes (byte-level), so sampled ids always map to text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_synthetic_corpus(seed), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"trained tokenizer has {tok.get_vocab_size()} ids, wanted {vocab_size}: enlarge the corpus")
    return tok


# ------------------------------------------------------------------------------------------ reward stand-in

STOP_STRINGS = ("### Instruction:", "### Response:", "\n\n\n\n", "\n\n--", "\n\n____")
_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")  # nltk.wordpunct_tokenize


def clean(response: str) -> str:
    """docs/design.md 4.2 ``clean``: strip, cut at the first stop string, strip again."""
    text = response.strip("\n ")
    cut = min((i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0), default=len(text))
    return text[:cut].strip("\n ")


def li_rp(response: str) -> float:
    """LI * RP of one response (docs/design.md 4.2), the host-side reward stand-in of the benchmark."""
    words = _WORDPUNCT.findall(clean(response))
    li = len(words) / 100
    trigrams = list(zip(words, words[1:], words[2:]))
    rp = len(set(trigrams)) / len(trigrams) if trigrams else 1.0
    return li * rp


# ---------------------------------------------------------------------------------------------- FLOP model

def matmul_params(cfg: dict) -> int:
    """Parameters that take part in a matmul per token: every Linear of the trunk, the LM head, the value head.

    Embedding lookups and RMSNorm scales are excluded (no matmul).
    """
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f  # q, o, k, v, gate/up/down
    return L * per_layer + d * cfg["vocab_size"] + d  # + lm_head + value head


def lora_params(cfg: dict, rank: int = 8, n_targets: int = 2) -> int:
    """LoRA A and B matrices on q_proj and v_proj (d x r + r x d each, square projections)."""
    return cfg["num_hidden_layers"] * n_targets * 2 * cfg["hidden_size"] * rank


def update_flops(cfg: dict, work: Workload, mode: str) -> dict:
    """Matmul FLOPs of the PPO update phase (all epochs, all minibatches), by an explicit model.

    Per token of a length-T sequence, with N = ``matmul_params`` and the attention scores counted over the full
    T x T as in PaLM's MFU accounting (a causal kernel may skip half of that term: ~2% of the total for mid):
      forward            2 N + 4 L d T           (QK^T and AV: 2 d T each per layer)
      full fine-tuning   x3 of forward: 6 N + 12 L d T   (activation and weight gradients)
      LoRA               4 N + 12 L d T + 6 N_lora (frozen weights still need activation gradients; an upper
                         bound by ~1% for mid: layer 0's q/k/v input gradients are never needed)
    Tokens = epochs * batch * T: trl runs every minibatch on the whole prompt+response and computes logits at
    every position. Elementwise work (softmax, log-softmax, norms, Adam) is left out.
    """
    if mode not in ("full", "lora"):
        raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")
    n = matmul_params(cfg)
    attn = 4 * cfg["num_hidden_layers"] * cfg["hidden_size"] * work.seq_len
    per_token = 6 * n + 3 * attn if mode == "full" else 4 * n + 3 * attn + 6 * lora_params(cfg)
    tokens = work.ppo_epochs * work.batch * work.seq_len
    return dict(per_token=per_token, tokens=tokens, total=per_token * tokens)


def experience_flops(cfg: dict, work: Workload) -> int:
    """Forward-only matmul FLOPs of the experience pass: policy (with values) and reference over B x T tokens."""
    per_token = 2 * matmul_params(cfg) + 4 * cfg["num_hidden_layers"] * cfg["hidden_size"] * work.seq_len
    return 2 * per_token * work.batch * work.seq_len


def matmul_roofline_flops(n: int = 2048) -> int:
    """FLOPs of one n x n x n matmul (2 n^3): the yardstick of this CPU's fp32 roofline."""
    return 2 * n ** 3


# ------------------------------------------------------------------------------------ the reference process

BENCH_DIR = pathlib.Path(__file__).resolve().parent


def reference_python() -> pathlib.Path:
    """The reference venv's python: ``$RRE_BENCH_VENV/bin/python``, else ``<repo>/.bench_venv/bin/python``."""
    venv = pathlib.Path(os.environ.get("RRE_BENCH_VENV", BENCH_DIR.parent / ".bench_venv"))
    python = venv / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(
            f"no reference venv at {venv}: run `bash benchmarks/setup_reference_env.sh` "
            "(or point RRE_BENCH_VENV at an existing one)"
        )
    return python


def run_reference(mode: str, out: str | os.PathLike, *extra: str, timeout: float | None = None) -> dict:
    """Runs ``ppo_reference.py --mode MODE --out OUT [extra...]`` in the reference venv; returns its JSON.

    stdout (the table) passes through; on failure the error carries the tail of stderr.
    """
    cmd = [str(reference_python()), str(BENCH_DIR / "ppo_reference.py"), "--mode", mode, "--out", str(out), *extra]
    proc = subprocess.run(cmd, stdout=None, stderr=subprocess.PIPE, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(pathlib.Path(out).read_text())
