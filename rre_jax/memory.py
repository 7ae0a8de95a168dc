"""Parameter bytes per device of a Llama-family model on a mesh, and the memory plan of a whole run config --
without allocating (the library behind ``rre-params``, ``rre_jax/cli/params.py``).

Shapes come from ``jax.eval_shape`` of the real init, shardings from the same logical rules the run
uses, and ``rre_jax.mesh.bytes_per_device`` counts one device's shard (uneven splits rounded up), so
the figure is what the training run will hold -- before any TPU is booked::

    rre-params --model llama-7b --lora --mesh 8,4,1      # LLaMA-7B + LoRA on 32 devices
    rre-params --model yi-34b --mesh 1,32,1              # Starling-RM-34B's trunk on 32 devices
    rre-params --config-json path/to/config.json --mesh 1,8,1
    rre-params --config configs/alpacafarm_rer.py:rer,v4-32   # the run's memory plan (see `plan`)

The memory plan of a run (`plan`) adds what the run holds besides parameters; the model of each line is in
`plan`'s docstring. Shapes: ``G`` global rollout batch, ``M`` update micro-batch, ``S`` = prompt + new tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.extend.core as jax_core
import numpy as np
from jax.sharding import PartitionSpec as P

from rre_jax import mesh as mesh_lib, policy, ppo, reward, sweep as sweep_lib, topology
from rre_jax.models import bert, llama, lora as lora_lib

PRESETS = {
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
    "yi-34b": dict(vocab_size=64000, hidden_size=7168, intermediate_size=20480, num_hidden_layers=60,
                   num_attention_heads=56, num_key_value_heads=8, rope_theta=5000000.0),
    "tiny": dict(vocab_size=768, hidden_size=64, intermediate_size=176, num_hidden_layers=2,  # configs/tiny.py
                 num_attention_heads=4, num_key_value_heads=2),
    "mid": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8),
}


@functools.lru_cache(maxsize=16)
def abstract_llama(cfg: llama.LlamaConfig, head: str = "lm", value_head: bool = False):
    """``(ShapeDtypeStruct tree, logical specs)`` of a Llama's parameters (``jax.eval_shape``; cached)."""
    return mesh_lib.abstract_params(llama.abstract_init_fn(cfg, head=head, value_head=value_head))


def param_report(cfg: llama.LlamaConfig, mesh_shape: dict[str, int], *, head: str = "lm",
                 value_head: bool = False, lora_cfg: lora_lib.LoraConfig | None = None,
                 rules=mesh_lib.DEFAULT_RULES) -> dict:
    """Parameter counts and bytes per device (base model, LoRA adapters) -- shapes only."""
    abstract, specs = abstract_llama(cfg, head, value_head)
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    out = {"params": count(abstract), "devices": math.prod(mesh_shape.values()),
           "bytes_per_device": mesh_lib.bytes_per_device(abstract, specs, mesh_shape, rules),
           "bytes_total": sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract))}
    if lora_cfg is not None:
        lora = jax.eval_shape(lambda r: lora_lib.init(cfg, lora_cfg, r, cfg.param_dtype), jax.random.key(0))
        out["lora_params"] = count(lora)
        out["lora_bytes_per_device"] = mesh_lib.bytes_per_device(lora, lora_lib.logical_specs(cfg, lora_cfg),
                                                                 mesh_shape, rules)
    return out


# ============================================================================================ run plan

HEADROOM = 0.9  # fraction of a chip's memory a plan may use (XLA's own buffers, fragmentation)
GIB = 2**30


def bert_params(vocab: int = 30522, hidden: int = 768, layers: int = 12, ffn: int = 3072, positions: int = 512,
                type_vocab: int = 2) -> int:
    """Parameter count of a BERT encoder without pooler (defaults: BERT-base, the shape of facebook/contriever)."""
    embeddings = (vocab + positions + type_vocab) * hidden + 2 * hidden
    layer = 4 * (hidden * hidden + hidden) + 2 * hidden + 2 * hidden * ffn + ffn + hidden + 2 * hidden
    return embeddings + layers * layer


def relevance_bytes(mesh_shape: dict[str, int], rules) -> int:
    """One device's share of the relevance encoder (BERT-base, float32: facebook/contriever's shape), sharded
    by the run's rules as ``rre_jax.programs.build_relevance`` places it."""
    abstract, specs = mesh_lib.abstract_params(bert.init_fn(bert.BertConfig(30522, 768, 12, 12, 3072, 512),
                                                            np.float32))
    return mesh_lib.bytes_per_device(abstract, specs, mesh_shape, rules)


def _encoder_mesh(config, mesh_shape: dict[str, int]) -> dict[str, int]:
    """The relevance encoder's mesh, as ``relevance.encoder_mesh`` places it: the run's on one host, one device of
    each host when the topology spans several (``topology.hosts``; a local plan is one host's)."""
    name = str(config.mesh.get("topology", ""))
    return mesh_shape if not name or topology.hosts(name) == 1 else dict.fromkeys(mesh_lib.MESH_AXES, 1)


def kv_cache_bytes(cfg: llama.LlamaConfig, batch: int, length: int, mesh_shape: dict[str, int], rules) -> int:
    """One device's share of the rollout's KV cache (``llama.init_cache`` shapes; rows over the batch axes,
    kv heads over ``tensor``)."""
    cache = jax.eval_shape(lambda: llama.init_cache(cfg, batch, length))
    kv = P("cache_batch", "cache_heads", "cache_length", None)
    L = cfg.num_hidden_layers
    specs = {"k": (kv,) * L, "v": (kv,) * L, "mask": P("cache_batch", "cache_length"), "index": P(),
             "pos": P("cache_batch")}
    return mesh_lib.bytes_per_device(cache, specs, mesh_shape, rules)


def _shard_config(cfg: llama.LlamaConfig, tensor: int) -> llama.LlamaConfig:
    """The slice of the model one device computes under tensor parallelism (heads, MLP and vocab split)."""
    if tensor == 1:
        return cfg
    return dataclasses.replace(cfg, num_attention_heads=-(-cfg.num_attention_heads // tensor),
                               num_key_value_heads=-(-cfg.num_key_value_heads // tensor),
                               intermediate_size=-(-cfg.intermediate_size // tensor),
                               vocab_size=-(-cfg.vocab_size // tensor), head_dim=cfg.head_dim)


@functools.lru_cache(maxsize=64)  # a trace of a 7B forward takes seconds; plans of one model share it
def update_activation_bytes(pspec: policy.PolicySpec, rows: int, prompt_len: int, new_tokens: int,
                            tensor: int = 1, embed_shards: int = 1) -> int:
    """Bytes of the activations one device keeps for the backward pass of the PPO update.

    Exact for the code as it is: the residuals of ``jax.vjp`` of the real policy forward
    (``policy.policy_outputs``, LoRA/value or full mode) with respect to the trainable parameters, for
    ``rows`` sequences of ``prompt_len + new_tokens`` tokens, from an abstract trace (``jax.make_jaxpr``;
    nothing is allocated). Parameters the backward pass reads are not counted again. Under tensor
    parallelism one device computes a ``1/tensor`` slice of heads, MLP and vocabulary (``_shard_config``).
    ``embed_shards``: the residual stream's hidden dimension is split that many ways (a micro-batch of fewer rows
    than the batch shards: XLA keeps every row on every device and splits the stream's hidden dimension over the
    axes of the weights' embed dimension instead, the update's stacked residuals in its buffer assignment). The
    stream's residuals are those of the hidden size's width, when no projection slice has that width too (else
    they are counted whole: an upper bound).
    """
    cfg = _shard_config(pspec.cfg, tensor)
    pspec = dataclasses.replace(pspec, cfg=cfg)
    frozen, _ = abstract_llama(cfg)
    trainable = jax.eval_shape(lambda base, rng: policy.init_trainable(pspec, base, rng), frozen, jax.random.key(0))
    ids = jax.ShapeDtypeStruct((rows, prompt_len + new_tokens), np.int32)

    def residuals(t, fz, ids, mask):
        def loss(tt):
            logp, values, _ = policy.policy_outputs(pspec, tt, fz, ids, mask, prompt_len)
            return logp.sum() + values.sum()
        return jax.vjp(loss, t)[1]

    jaxpr = jax.make_jaxpr(residuals)(trainable, frozen, ids, ids).jaxpr
    widths = {cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size,
              cfg.vocab_size}
    split = embed_shards if cfg.hidden_size not in widths else 1
    inputs, seen, total = set(jaxpr.invars), set(), 0
    for v in jaxpr.outvars:
        if isinstance(v, jax_core.Literal) or v in inputs or v in seen:  # constants, parameters passed through
            continue
        seen.add(v)
        stream = v.aval.ndim >= 2 and v.aval.shape[-1] == cfg.hidden_size
        total += math.prod(v.aval.shape) * np.dtype(v.aval.dtype).itemsize // (split if stream else 1)
    return total


def inference_bytes(cfg: llama.LlamaConfig, rows: int, length: int, tensor: int = 1) -> int:
    """Peak temporaries of a no-grad forward (prefill, gold scoring): one layer's live activations -- the
    residual stream and its norm, q/k/v, attention scores and probabilities in float32, and the MLP's gate, up
    and product -- plus float32 logits of the last position. An estimate, stated as such: XLA's TPU compiler
    sometimes takes the softmax in place (one score buffer: v5e-8's gold program) and sometimes keeps two and
    more of the stream (v4-32's), so the per-program totals agree within 10% on every TPU preset while this line
    alone does not (docs/tpu_compile.md)."""
    e = np.dtype(cfg.dtype).itemsize
    heads, kv_heads = -(-cfg.num_attention_heads // tensor), -(-cfg.num_key_value_heads // tensor)
    ffn = -(-cfg.intermediate_size // tensor)
    tokens = rows * length
    stream = tokens * e * (3 * cfg.hidden_size + (heads + 2 * kv_heads) * cfg.head_dim + 3 * ffn)
    return stream + 2 * 4 * rows * heads * length * length + 4 * rows * cfg.vocab_size


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of a run (``lines``), its two phases, and the verdict against the chip's memory.

    ``train`` = resident + max(rollout, update); ``eval`` = resident + max(rollout, gold scoring), with the
    gold RM's weights resident when it lives on the device, and on the device only while it scores when it
    lives on the host (``gold_rm.placement='host'``: brought in for each scoring call, freed after). ``fits`` is None when the chip's memory is unknown (CPU).
    """

    name: str
    mesh_shape: dict
    devices: int
    placement: str
    lines: dict
    train: int
    eval: int
    host_bytes: int
    chip_bytes: int

    @property
    def peak(self) -> int:
        return max(self.train, self.eval)

    @property
    def fits(self) -> bool | None:
        return None if not self.chip_bytes else self.peak <= HEADROOM * self.chip_bytes

    def table(self) -> str:
        shape = ",".join(str(self.mesh_shape[a]) for a in mesh_lib.MESH_AXES)
        out = [f"memory plan of {self.name}: mesh {shape} (data,fsdp,tensor) = {self.devices} devices, "
               f"gold RM on {self.placement}", f"{'per device':<42}{'GiB':>10}"]
        out += [f"  {k:<40}{v / GIB:>10.3f}" for k, v in self.lines.items()]
        out += [f"  {'phase train (rollout + update)':<40}{self.train / GIB:>10.3f}",
                f"  {'phase eval (dev rollouts + gold)':<40}{self.eval / GIB:>10.3f}"]
        if self.host_bytes:
            out.append(f"host memory: gold RM {self.host_bytes / GIB:.3f} GiB in all, brought in for eval only")
        if self.fits is None:
            out.append(f"peak {self.peak / GIB:.3f} GiB per device; chip memory unknown "
                       "(config.plan.chip_memory_gib=0)")
        else:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            out.append(f"peak {self.peak / GIB:.3f} GiB per device of {self.chip_bytes / GIB:.0f} GiB "
                       f"(budget {HEADROOM:.0%}): {verdict}")
        return "\n".join(out)


def llama_config(name_or_dir: str, dtype: str, field: str) -> llama.LlamaConfig:
    """A Llama architecture from a built-in name (``PRESETS``) or a checkpoint directory's ``config.json``; an
    error naming ``field`` otherwise. Shapes only: nothing but the JSON is read."""
    if name_or_dir in PRESETS:
        return llama.LlamaConfig(**PRESETS[name_or_dir], dtype=dtype, param_dtype=dtype)
    path = os.path.join(name_or_dir, "config.json")
    if not name_or_dir or not os.path.exists(path):
        raise ValueError(f"{field}={name_or_dir!r}: give a built-in architecture ({', '.join(sorted(PRESETS))}) "
                         "or a checkpoint directory holding config.json")
    with open(path) as f:
        return llama.LlamaConfig.from_hf(json.load(f), path, dtype=dtype, param_dtype=dtype)


def _resolved_mesh(config, num_devices: int | None) -> tuple[dict, int]:
    """``({axis: size}, devices)`` of ``config.mesh``; ``num_devices`` (default: local devices) fills a ``-1``."""
    mesh_cfg = mesh_lib.MeshConfig.from_config(config.mesh)
    fixed = -1 not in mesh_cfg.shape
    shape = mesh_cfg.resolved_shape(math.prod(mesh_cfg.shape) if fixed else num_devices or jax.device_count())
    return dict(zip(mesh_lib.MESH_AXES, shape)), math.prod(shape)


def _trainable_bytes(config, pspec: policy.PolicySpec, base: dict) -> tuple[str, int, int]:
    """``(plan line name, trainable bytes, optimizer-state bytes)`` per device: LoRA + value head, policy + value
    head (shared critic) or policy + critic copies, and Adam's moments in proportion (``jax.eval_shape`` of the
    run's optax init)."""
    frozen, _ = abstract_llama(pspec.cfg)
    trainable = jax.eval_shape(lambda b, r: policy.init_trainable(pspec, b, r), frozen, jax.random.key(0))
    opt = jax.eval_shape(ppo.make_optimizer(ppo.PPOConfig.from_config(config.ppo)).init, trainable)
    nbytes = lambda t: sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(t))  # noqa: E731
    if pspec.mode == "lora":
        name, per_device = "trainable (LoRA + value head)", base["lora_bytes_per_device"] + nbytes(trainable["value"])
    elif pspec.critic == "shared":  # policy copy + value head (one trunk)
        name, per_device = "trainable (policy + value head)", base["bytes_per_device"] + nbytes(trainable["value"])
    else:  # policy copy + critic copy (own trunk + value head)
        name = "trainable (policy + critic)"
        per_device = 2 * base["bytes_per_device"] + nbytes(trainable["critic"]) - nbytes(frozen)
    return name, per_device, int(nbytes(opt) * per_device / max(nbytes(trainable), 1))


def _phases(config, lines: dict, trainable: int, mesh_shape: dict, devices: int, gold_cfg) -> MemoryPlan:
    """The plan's two phases from its lines: train = resident + max(rollout, update); eval = resident +
    max(rollout, gold scoring), the gold RM resident in both when it is placed on the device."""
    resident = sum(lines[k] for k in ("policy params", "optimizer state", "relevance encoder (float32)")) + trainable
    rollout = lines["kv cache (rollout)"] + lines["prefill peak (rollout)"] + lines["decode weights (per-layer copy)"]
    update = lines["gradients (accumulator + micro-batch)"] + lines["activations (update micro-batch)"]
    on_device = config.gold_rm.placement == "device"
    gold = lines["gold RM params"]
    return MemoryPlan(
        name=str(config.name), mesh_shape=mesh_shape, devices=devices, placement=config.gold_rm.placement,
        lines=lines, train=resident + (gold if on_device else 0) + max(rollout, update),
        eval=resident + (gold if on_device else 0) + max(rollout, (0 if on_device else gold)
                                                          + lines["gold RM scoring peak"]),
        host_bytes=0 if on_device else param_report(gold_cfg, dict.fromkeys(mesh_lib.MESH_AXES, 1), head="score")[
            "bytes_total"],
        chip_bytes=int(float(config.plan.chip_memory_gib) * GIB))


def plan(config, num_devices: int | None = None) -> MemoryPlan:
    """The memory plan of a run config (``configs/*.py``), from shapes alone.

    Per device: the policy's parameters (sharded by the run's rules); the trainable tree (LoRA + value
    head, or policy + critic copies in full mode) with its gradient accumulator and one micro-batch's
    gradients (2x trainable), and the optimizer state (Adam moments in the trainable dtype); the relevance
    encoder (BERT-base, float32, sharded by the rules); the KV cache of a rollout of ``G`` rows x ``S`` =
    max_prompt_length + max_new_tokens slots, the prefill's peak (`inference_bytes`) and the decode loop's
    per-layer copy of this device's weight shards (the stacked layers split once per call; the decode is weight-
    stationary, `mesh.decode_rules`: no weight is gathered); the
    update micro-batch's activations (`update_activation_bytes`: ``M`` rows split over the batch axes, or all
    ``M`` rows on every device when ``M`` is smaller than the batch shards; ``S`` tokens); the gold RM's
    parameters and scoring peak (``gold_rm.batch_size`` rows of ``gold_rm.max_length`` tokens). Each line was
    checked against XLA's per-device memory analysis of the compiled programs (docs/tpu_compile.md).
    A sweep of ``K`` members (``config.sweep``, ``rre_jax.sweep``) holds ``K`` trainable trees and optimizer
    states and samples ``K x G`` rows (cache and prefill); its update takes ``update_members`` members at once
    (gradients and activations of that many).
    Architectures come from ``config.plan`` (a name in ``PRESETS`` or a checkpoint directory); ``num_devices``
    resolves a ``-1`` in the mesh shape (default: local devices).
    """
    rules = tuple(tuple(r) for r in config.mesh.rules)
    mesh_shape, devices = _resolved_mesh(config, num_devices)
    batch_shards, tensor = mesh_shape["data"] * mesh_shape["fsdp"], mesh_shape["tensor"]
    embed_shards = math.prod(mesh_shape[a] for a in _axes(rules, "embed"))
    pcfg = llama_config(config.plan.policy or config.model.path, config.model.param_dtype, "config.plan.policy")
    gold_cfg = llama_config(config.plan.gold_rm or config.gold_rm.path, config.model.param_dtype, "config.plan.gold_rm")
    pspec = policy.PolicySpec(pcfg, config.model.train_mode, lora_lib.LoraConfig.from_config(config.model.lora),
                              critic=str(config.model.get("critic", "separate")),
                              remat=str(config.model.get("remat", "dots")))
    base = param_report(pcfg, mesh_shape, rules=rules, lora_cfg=pspec.lora_cfg)
    trainable_name, trainable_pd, opt_pd = _trainable_bytes(config, pspec, base)
    members = sweep_lib.SweepConfig.from_config(config)
    K, chunk = (1, 1) if members is None else (members.size, members.update_chunk)
    needs_relevance = any(reward.preset(n).needs_relevance for n in (config.reward.preset,
                                                                      *config.reward.counterfactual))
    S = int(config.data.max_prompt_length) + int(config.sampling.max_new_tokens)
    rows = lambda n: -(-int(n) // batch_shards)  # noqa: E731
    # A micro-batch of fewer rows than the batch shards is not split: XLA keeps every row on every device and
    # splits the matmuls over the contracted embed axis instead (the update's buffers in its memory report).
    M = int(config.ppo.mini_batch_size)  # rows of one forward/backward (trl 0.7.4's mini-batch)
    lines = {
        "policy params": base["bytes_per_device"],
        trainable_name: K * trainable_pd,
        "optimizer state": K * opt_pd,
        "relevance encoder (float32)": relevance_bytes(_encoder_mesh(config, mesh_shape), rules) if needs_relevance
        else 0,
        "kv cache (rollout)": kv_cache_bytes(pcfg, K * int(config.ppo.batch_size), S, mesh_shape, rules),
        "prefill peak (rollout)": inference_bytes(pcfg, rows(K * int(config.ppo.batch_size)), S, tensor),
        "decode weights (per-layer copy)": base["bytes_per_device"],
        "gradients (accumulator + micro-batch)": 2 * chunk * trainable_pd,
        "activations (update micro-batch)": chunk * update_activation_bytes(
            pspec, M if M < batch_shards else rows(M), int(config.data.max_prompt_length),
            int(config.sampling.max_new_tokens), tensor, embed_shards if M < batch_shards else 1),
        "gold RM params": param_report(gold_cfg, mesh_shape, head="score", rules=rules)["bytes_per_device"],
        "gold RM scoring peak": inference_bytes(gold_cfg, rows(config.gold_rm.batch_size),
                                                int(config.gold_rm.max_length), tensor),
    }
    return _phases(config, lines, K * trainable_pd, mesh_shape, devices, gold_cfg)


# ============================================================================================ floors

def _leaf_bytes(cfg: llama.LlamaConfig, mesh_shape: dict[str, int], rules) -> dict[str, int]:
    """One device's bytes of each top-level weight of a Llama (``embedding``, ``lm_head``, ``norm``, the layers)."""
    abstract, specs = abstract_llama(cfg)
    return {k: mesh_lib.bytes_per_device(abstract[k], specs[k], mesh_shape, rules) for k in abstract}


def decode_floor(cfg: llama.LlamaConfig, lora_cfg: lora_lib.LoraConfig | None, batch: int, length: int,
                 mesh_shape: dict[str, int], rules) -> dict[str, int]:
    """The bytes one device must move through HBM in one decode step, from the shapes alone: every weight of its
    shards read once (of the embedding table only the rows of this step's tokens), its LoRA adapters, its share
    of the KV cache (``batch`` rows x ``length`` slots, all of which the step attends over) and one token's
    activations per row (hidden state in, float32 logits out) -- and, written, the step's new key and value slots.
    ``batch`` / ``length``: the rollout's rows and cache slots. The rows of one device are those of the decode rules
    (``mesh.decode_rules``)."""
    leaves = _leaf_bytes(cfg, mesh_shape, rules)
    e = np.dtype(cfg.dtype).itemsize
    rows = -(-batch // math.prod(mesh_shape[a] for a in _axes(mesh_lib.decode_rules(rules), "batch")))
    embed_shards = math.prod(mesh_shape[a] for a in _axes(rules, "embed"))
    vocab = -(-cfg.vocab_size // math.prod(mesh_shape[a] for a in _axes(rules, "vocab")))
    cache_rows = -(-batch // math.prod(mesh_shape[a] for a in _axes(rules, "cache_batch")))
    kv_heads = -(-cfg.num_key_value_heads // math.prod(mesh_shape[a] for a in _axes(rules, "cache_heads")))
    out = {"weights": sum(v for k, v in leaves.items() if k != "embedding" or cfg.tie_word_embeddings),
           "embedding rows": 0 if cfg.tie_word_embeddings else batch * cfg.hidden_size * e // embed_shards,
           "lora": 0, "kv cache": kv_cache_bytes(cfg, batch, length, mesh_shape, rules),
           "kv slots written": cfg.num_hidden_layers * 2 * cache_rows * kv_heads * cfg.head_dim * e,
           "activations (one token)": rows * (2 * cfg.hidden_size * e + 4 * vocab)}
    if lora_cfg is not None:
        lora = jax.eval_shape(lambda r: lora_lib.init(cfg, lora_cfg, r, cfg.param_dtype), jax.random.key(0))
        out["lora"] = mesh_lib.bytes_per_device(lora, lora_lib.logical_specs(cfg, lora_cfg), mesh_shape, rules)
    return out


def _axes(rules, name: str) -> tuple[str, ...]:
    axes = dict(rules).get(name)
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def update_floor(pspec: policy.PolicySpec, rows: int, prompt_len: int, new_tokens: int, mesh_shape: dict[str, int],
                 rules, trainable: int, optimizer: int, micro_per_step: int) -> dict[str, int]:
    """The bytes one device must move through HBM for one PPO micro-batch of ``rows`` sequences, from the shapes:
    the frozen weights read by the forward and by the backward pass (and once more by a 'full' rematerialisation),
    the activations the backward pass keeps (``update_activation_bytes``: written once, read once), the gradients
    (written, and added into the accumulator: read and written) and the optimizer step (parameters and Adam's
    moments read and written) spread over its ``micro_per_step`` micro-batches. ``trainable`` / ``optimizer``:
    this device's bytes of the trainable tree and of the optimizer state. ``rows``: the rows one device computes
    (all of the micro-batch's when it has fewer than the batch shards, whose residual stream is then split over
    the embed axes, as ``plan`` counts it)."""
    weights = _leaf_bytes(pspec.cfg, mesh_shape, rules)
    passes = 3 if pspec.remat == "full" else 2
    whole = rows < math.prod(mesh_shape[a] for a in _axes(rules, "batch"))  # every row on every device (``plan``)
    embed_shards = math.prod(mesh_shape[a] for a in _axes(rules, "embed")) if whole else 1
    act = update_activation_bytes(pspec, rows, prompt_len, new_tokens, mesh_shape["tensor"], embed_shards)
    return {"weights (forward + backward)": passes * sum(weights.values()), "activations (kept, written + read)":
            2 * act, "gradients (write + accumulate)": 3 * trainable,
            "optimizer step (per micro-batch)": (2 * trainable + 2 * optimizer) // max(micro_per_step, 1)}
