"""Assets of the tiny end-to-end config, built locally on first use (no hub download).

``ensure_assets(config, workdir)`` writes into ``<workdir>/assets`` (once; later runs and resumes reuse them):

* ``tokenizer/``: a SentencePiece-style BPE of ``config.model.tiny.vocab_size`` entries trained on the bundled
  tiny prompt set (``rre_jax.tokenizer``);
* ``policy/``: a tiny Llama (``config.model.tiny``), warm-started by a short SFT on the bundled reference
  answers so that it produces words rather than noise, saved as a real HF checkpoint;
* ``gold_rm/``: a tiny random ``LlamaForSequenceClassification``-layout scorer (reports call it random).

Each directory is written to a temporary path and renamed, so a killed bootstrap never leaves a half asset.
The run then loads all three through the ordinary HF loading code.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rre_jax import tokenizer as tok_lib
from rre_jax.data import prompts as prompts_lib, templates, tiny_prompts_path
from rre_jax.models import hf, llama

def _atomic_dir(path: str, build) -> str:
    if os.path.exists(os.path.join(path, ".complete")):
        return path
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    build(tmp)
    open(os.path.join(tmp, ".complete"), "w").close()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def _texts(records) -> list[str]:
    return [templates.alpaca_prompt(r.instruction) + " " + r.reference for r in records]


def _model_config(config, tokenizer) -> llama.LlamaConfig:
    t = config.model.tiny
    return llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=t.hidden_size,
                             intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                             num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                             max_position_embeddings=1024, tie_word_embeddings=False,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)


def _sft_batches(records, tokenizer, max_len: int, batch: int, rng: np.random.Generator):
    """(ids_BxL, mask_BxL, loss_mask_BxL) right-padded: the loss covers the answer and its EOS."""
    rows = []
    for r in records:
        p = tokenizer(templates.alpaca_prompt(r.instruction))["input_ids"]
        a = tokenizer(" " + r.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(((p + a)[:max_len], len(p)))
    while True:
        pick = rng.choice(len(rows), batch)
        ids, mask, lmask = (np.zeros((batch, max_len), np.int32) for _ in range(3))
        for i, j in enumerate(pick):
            seq, n_p = rows[j]
            ids[i, :len(seq)], mask[i, :len(seq)], lmask[i, n_p:len(seq)] = seq, 1, 1
        yield ids, mask, lmask


def sft(cfg: llama.LlamaConfig, params, records, tokenizer, steps: int, seed: int, lr: float = 3e-3):
    """A short supervised warm start (next-token cross-entropy on the reference answers)."""
    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state, ids, mask, lmask):
        def loss_fn(p):
            logits = llama.forward(cfg, p, ids, mask)["logits"][:, :-1]
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)[..., 0]
            return jnp.sum(nll * lmask[:, 1:]) / jnp.maximum(lmask[:, 1:].sum(), 1)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    batches = _sft_batches(records, tokenizer, 160, 16, np.random.default_rng(seed))
    loss = float("nan")
    for i in range(steps):
        params, state, loss = step(params, state, *next(batches))
        if i % 50 == 0 or i == steps - 1:
            logging.info("tiny SFT step %d/%d: loss %.3f", i + 1, steps, float(loss))
    return params, float(loss)


def ensure_assets(config, workdir: str) -> dict[str, str]:
    """Build (or reuse) the tiny tokenizer, policy and gold RM; returns their directories."""
    root = os.path.join(workdir, "assets")
    os.makedirs(root, exist_ok=True)
    records = prompts_lib.load_prompts(tiny_prompts_path())
    tok_dir = _atomic_dir(os.path.join(root, "tokenizer"),
                          lambda d: tok_lib.train_tokenizer(_texts(records), "sentencepiece",
                                                                    int(config.model.tiny.vocab_size), d))
    tokenizer = tok_lib.load_tokenizer(tok_dir)
    cfg = _model_config(config, tokenizer)

    def build_policy(d):
        params = llama.init_params(cfg, jax.random.key(config.seed))
        params, loss = sft(cfg, params, records, tokenizer, int(config.model.sft_steps), config.seed)
        llama.export_pretrained(d, cfg, params)
        tokenizer.save_pretrained(d)
        with open(os.path.join(d, "rre_tiny.json"), "w") as f:
            json.dump({"sft_steps": int(config.model.sft_steps), "sft_final_loss": loss}, f)

    def build_gold(d):
        gold_cfg = dataclasses.replace(cfg, num_labels=1)
        params = llama.init_params(gold_cfg, jax.random.key(config.seed + 1), head="score")
        tensors = hf.export_tensors(params, llama.weight_map(gold_cfg, "seq_cls"), np.float32)
        hf.save_safetensors(tensors, d)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({**gold_cfg.to_hf("LlamaForSequenceClassification"), "num_labels": 1}, f, indent=2)
        tokenizer.save_pretrained(d)
        with open(os.path.join(d, "rre_tiny.json"), "w") as f:
            json.dump({"random": True}, f)

    policy_dir = _atomic_dir(os.path.join(root, "policy"), build_policy)
    gold_dir = _atomic_dir(os.path.join(root, "gold_rm"), build_gold)
    return {"tokenizer": tok_dir, "policy": policy_dir, "gold_rm": gold_dir}
