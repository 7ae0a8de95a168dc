"""The black-box gold reward model: loading, tokenising and placement of a sequence scorer.

``GoldRM`` scores (prompt, response) pairs with its own tokenizer and its own input string; it never drives
gradients, it judges dev and eval rollouts. Shapes: ``B`` rows of a batch (``batch_size``), ``T`` tokens
(a power-of-two bucket up to ``max_length``), ``N`` scored pairs.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from rre_jax.data import batching


class GoldRM:
    """A black-box gold reward model: own tokenizer, own input string, scores only.

    Both layouts take the Starling input string ``starling_input(starling_query(prompt), response)``,
    tokenized without special tokens, truncated on the left to ``max_length`` and right padded with the
    pad id (0 for Starling, whose score sits before the first PAD); ``seq_cls`` checkpoints score at the
    last real token. Batches are padded to length buckets so scoring compiles once per bucket.
    ``placement='host'`` keeps the weights in host memory and brings them onto the mesh for each ``score``.
    """

    def __init__(self, path: str, *, tokenizer_path: str = "", max_length: int = 2048, batch_size: int = 4,
                 layout: str = "auto", mesh=None, rules=None, is_random: bool = False, placement: str = "device"):
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
        self.is_random = is_random or marked_random(path)
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
        params = self._device_params()  # host placement: freed when this call returns
        texts = self.inputs(prompts, responses)
        rows = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"]
        out = np.zeros(len(rows), np.float32)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            T = batching.pow2_bucket(max(len(r) for r in chunk), 16, self.max_length)
            ids_BxT, mask_BxT = batching.pad_right(chunk, T, self.batch_size, self.pad_id)
            out[start:start + len(chunk)] = np.asarray(self._score(params, ids_BxT, mask_BxT))[:len(chunk)]
        return out


def marked_random(path: str) -> bool:
    """True for checkpoints written by ``rre_jax.tiny`` as random stand-ins (``rre_tiny.json``)."""
    marker = os.path.join(path, "rre_tiny.json")
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        return bool(json.load(f).get("random", False))
