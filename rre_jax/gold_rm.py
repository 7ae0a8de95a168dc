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
from jax.experimental import multihost_utils

from rre_jax import mesh as mesh_lib, programs as programs_lib, tokenizer as tok_lib
from rre_jax.data import batching, templates
from rre_jax.models import from_pretrained, llama, Pretrained


class GoldRM:
    """A black-box gold reward model: own tokenizer, own input string, scores only.

    Both layouts take the Starling input string ``starling_input(starling_query(prompt), response)``,
    tokenized without special tokens, truncated on the left to ``max_length`` and right padded with the
    pad id (0 for Starling, whose score sits before the first PAD); ``seq_cls`` checkpoints score at the
    last real token. Batches are padded to length buckets so scoring compiles once per bucket.
    ``placement='host'`` keeps the weights in host memory and brings them onto the mesh for each ``score``.
    """

    def __init__(self, path: str, *, tokenizer_path: str = "", max_length: int = 2048, batch_size: int = 4,
                 layout: str = "auto", mesh=None, rules=None, is_random: bool = False, placement: str = "device",
                 programs=None):
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
        self.placement = placement
        if placement == "host":  # kept in host memory; brought onto the mesh for each score() call only
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
        if programs is None:
            if mesh is None:
                mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(1, 1, 1)), jax.local_devices()[:1])
            lay = programs_lib.Layout(mesh, rules if rules is not None else mesh_lib.DEFAULT_RULES)
            programs = programs_lib.GoldPrograms(lay, self.model.config, self.layout)
        self.programs = programs
        # rows of a scoring batch: batch_size, rounded up to a multiple of the devices the rows are split over
        self.rows = -(-batch_size // programs.layout.batch_shards) * programs.layout.batch_shards

    def inputs(self, prompts, responses) -> list[str]:
        return [templates.starling_input(templates.starling_query(p), r) for p, r in zip(prompts, responses)]

    def score(self, prompts, responses):
        """Gold scores ``f32[N]`` of (templated or raw) prompts and response texts; every host of a multi-host run
        calls it with the same texts. Host-placed weights are brought onto the mesh for the call (freed when it
        returns)."""
        texts = self.inputs(prompts, responses)
        rows = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"]
        out, params = np.zeros(len(rows), np.float32), None
        for start in range(0, len(rows), self.rows):
            chunk = rows[start:start + self.rows]
            T = batching.pow2_bucket(max(len(r) for r in chunk), 16, self.max_length)
            ids_BxT, mask_BxT = batching.pad_right(chunk, T, self.rows, self.pad_id)
            program = self.programs.score(self.rows, T)
            params_sh, rows_sh, _ = program.in_shardings
            if params is None:  # host placement: on the mesh for this call only
                params = self.model.params if self.placement == "device" else jax.device_put(self.model.params,
                                                                                            params_sh)
            scores = program(params, _global(ids_BxT, rows_sh), _global(mask_BxT, rows_sh))
            out[start:start + len(chunk)] = np.asarray(jax.device_get(_whole(scores)))[:len(chunk)]
        return out


def _global(x_BxT: np.ndarray, sharding):
    """A batch every host holds whole -> the global array in ``sharding`` (each host gives its devices' rows)."""
    return jax.make_array_from_callback(x_BxT.shape, sharding, lambda index: x_BxT[index])


def _whole(x):
    """A scores array spread over hosts -> the whole array on every host (a collective)."""
    if x.is_fully_addressable:
        return x
    return multihost_utils.process_allgather(x, tiled=True)


def marked_random(path: str) -> bool:
    """True for checkpoints written by ``rre_jax.tiny_assets`` as random stand-ins (``rre_tiny.json``)."""
    marker = os.path.join(path, "rre_tiny.json")
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        return bool(json.load(f).get("random", False))
