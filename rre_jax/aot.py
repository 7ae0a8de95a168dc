"""Ahead-of-time compilation of a run (``rre-train --compile_only``): every program, from shapes alone, for the
config's mesh on the local devices or on a TPU topology (``config.mesh.topology``) with XLA's real TPU compiler
(libtpu; no TPU needed), and one table of what XLA says each program needs per device.

Nothing is read but config files (architectures: ``config.json`` of model.path / gold_rm.path / relevance.path, or
``config.plan`` presets when a path is empty), nothing allocated, nothing written but the optional report.

Per program and device: XLA's argument / output / alias / temp / code bytes (``memory_analysis``), plus the
run's other resident arrays (weights and train state the program does not take), against the chip's memory:
fits when the sum is within ``memory.HEADROOM`` of it. Per step: FLOPs and bytes accessed (``cost_analysis``)
and the roofline time they imply at the chip's peak bf16 FLOP/s and HBM bandwidth (``CHIPS``). XLA's cost
analysis counts a loop body once, so the roofline comes from loop-free variants (``roofline``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from rre_jax import assemble, memory, mesh as mesh_lib, policy, programs, relevance, run_spec, sweep_programs
from rre_jax import tokenizer as tok_lib
from rre_jax.models import bert
from rre_jax.topology import Chip, chip_of, parse_topology, quiet_libtpu, topology_devices

GIB = 2**30


# =================================================================================== one compiled program

@dataclasses.dataclass
class Compiled:
    """What XLA says about one program (bytes per device; FLOPs and bytes accessed per call)."""

    name: str
    seconds: float
    argument: int
    output: int
    alias: int
    temp: int
    code: int
    resident_others: int
    flops: float = math.nan
    bytes_accessed: float = math.nan
    stats: list = dataclasses.field(default_factory=list)  # the update's statistics (the algorithm's names)

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.code + self.resident_others


def compile_program(prog, resident_others: int = 0) -> tuple[Compiled, object]:
    t = time.perf_counter()
    exe = prog.compile()
    seconds = time.perf_counter() - t
    m = exe.memory_analysis()
    return Compiled(prog.name, seconds, m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                    m.temp_size_in_bytes, m.generated_code_size_in_bytes, resident_others), exe


def cost(exe) -> tuple[float, float]:
    """``(flops, bytes accessed)`` per device of one call, as XLA's cost analysis counts them."""
    c = exe.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return float(c.get("flops", math.nan)), float(c.get("bytes accessed", math.nan))


def device_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree with shardings (uneven shards padded, as XLA does)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


# =================================================================================== report

def table(rows: list[Compiled], phases: dict, chip: Chip | None, header: str) -> str:
    budget = None if chip is None else memory.HEADROOM * chip.hbm_gib * GIB
    g = lambda n: f"{n / GIB:9.3f}"  # noqa: E731
    out = [header, f"{'program':<12}{'args':>9}{'out':>9}{'alias':>9}{'temp':>9}{'code':>9}{'others':>9}"
                   f"{'total':>9}{'chip':>8}  fits  compile_s  (GiB per device)"]
    for r in rows:
        fits = "?" if budget is None else ("yes" if r.total <= budget else "NO")
        chip_s = "   ?" if chip is None else f"{chip.hbm_gib:8.0f}"
        out.append(f"{r.name:<12}{g(r.argument)}{g(r.output)}{g(r.alias)}{g(r.temp)}{g(r.code)}"
                   f"{g(r.resident_others)}{g(r.total)}{chip_s}  {fits:<4}{r.seconds:9.1f}")
    if phases:
        out.append(f"{'phase':<22}{'GFLOP':>12}{'GB accessed':>13}{'compute_s':>11}{'memory_s':>10}{'roofline_s':>11}"
                   "  (per device, per training step)")
        for name, (flops, nbytes) in phases.items():
            tc = flops / (chip.bf16_tflops * 1e12) if chip else math.nan
            tm = nbytes / (chip.hbm_gbps * 1e9) if chip else math.nan
            out.append(f"{name:<22}{flops / 1e9:12.1f}{nbytes / 1e9:13.2f}{tc:11.3f}{tm:10.3f}{max(tc, tm):11.3f}")
    return "\n".join(out)


def fits(rows: list[Compiled], chip: Chip | None) -> bool:
    return chip is None or all(r.total <= memory.HEADROOM * chip.hbm_gib * GIB for r in rows)


def write_report(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def mesh_for(spec_mesh: mesh_lib.MeshConfig, topology: str):
    """The run's mesh over the topology's devices (``topology``) or the local ones."""
    devices = topology_devices(topology) if topology else jax.devices()[:spec_mesh.num_devices or None]
    return mesh_lib.make_mesh(spec_mesh, devices), devices


# =================================================================================== the run, from shapes

def _architectures(config, spec):
    """Policy, gold-RM and relevance-encoder configs from their ``config.json`` or ``config.plan`` presets."""
    dt = lambda c: dataclasses.replace(c, dtype=spec.dtype, param_dtype=spec.param_dtype)  # noqa: E731
    pcfg = dt(memory.llama_config(config.model.path or config.plan.policy, "float32", "config.plan.policy"))
    gold = config.gold_rm.path or config.plan.gold_rm
    gcfg = dt(memory.llama_config(gold, "float32", "config.plan.gold_rm")) if gold else None
    rcfg = bert.BertConfig(30522, 768, 12, 12, 3072, 512)  # BERT-base: facebook/contriever's shape
    if config.relevance.path:
        path = os.path.join(relevance.encoder_path(config.relevance.path, "config.relevance.path"), "config.json")
        with open(path) as f:
            rcfg = bert.BertConfig.from_hf(json.load(f), path)
    return pcfg, gcfg, rcfg


def token_facts(config) -> tuple[int, int, int]:
    """``(eos id, pad id, longest token in bytes)`` of the run's tokenizer, read from its directory
    (``tokenizer.path`` or ``model.path``) when it exists, else from ``config.plan`` (shapes-only planning)."""
    path = config.tokenizer.path or config.model.path
    if path and os.path.isdir(path):
        tok = tok_lib.load_tokenizer(path)
        return tok.eos_token_id, tok.pad_token_id, tok_lib.byte_table(tok).bytes_VxL.shape[1]
    return int(config.plan.eos_id), int(config.plan.pad_id), int(config.plan.max_token_bytes)


def prompt_bucket(config) -> int:
    """The largest prompt bucket of the run (``data.max_prompt_length`` rounded up to ``data.bucket``)."""
    return -(-int(config.data.max_prompt_length) // int(config.data.bucket)) * int(config.data.bucket)


def run_programs(config, spec, lay, pcfg, gcfg, rcfg, needs_relevance: bool):
    """The run's `programs.RunPrograms`, from shapes: the trainer's own list, built as ``train`` builds it (the
    policy, the algorithm, the features of the run's tokenizer, the relevance encoder where the run puts it,
    the gold RM on the run's mesh); a sweep's `sweep_programs.SweepPrograms` over them (``config.sweep``)."""
    pspec = policy.PolicySpec(pcfg, spec.mode, spec.lora, spec.critic, spec.remat, mesh=lay.mesh, rules=lay.rules)
    frozen, _ = programs.llama_params(pcfg)
    eos, pad, width = token_facts(config)
    feats = programs.FeaturePrograms(lay, pcfg.vocab_size, width, tuple(config.reward.stop_strings))
    rel = None
    if needs_relevance:
        where = relevance.encoder_mesh(lay.mesh, lay.mesh.devices.flat[0].process_index)
        rel = relevance.encoder_programs(rcfg, mesh=where, rules=lay.rules,
                                         max_length=int(config.relevance.max_length))
    gold = None
    if gcfg is not None:
        gold = programs.GoldPrograms(lay, gcfg, "seq_cls" if config.gold_rm.layout == "hf_score" else "starling")
    rows = assemble.experience_rows(spec.ppo, lay.batch_shards)
    progs = programs.RunPrograms(lay.mesh, lay.rules, pspec, spec.algorithm, spec.ppo, frozen, eos_id=eos,
                                 pad_id=pad, experience_rows=rows, features=feats, relevance=rel, gold=gold)
    if spec.sweep is None:
        return progs
    return sweep_programs.SweepPrograms(progs, spec.sweep.size, spec.sweep.update_chunk)  # a sweep's (sweep_run)


def _programs(config, spec, lay, pcfg, gcfg, rcfg, needs_relevance: bool):
    """``({name: Program}, state layout)``: every program of the run (``RunPrograms.catalogue``) at its largest
    prompt bucket and scoring batches."""
    progs = run_programs(config, spec, lay, pcfg, gcfg, rcfg, needs_relevance)
    rel_shape = gold_shape = None
    if progs.relevance is not None:
        L, tokens = int(config.relevance.max_length), 2048  # the encoder's default tokens per batch
        shards = progs.relevance.layout.batch_shards
        rows = -(-max(1 << (max(1, tokens // L).bit_length() - 1), 1) // shards) * shards
        rel_shape = tokens if progs.relevance.packed else (rows, L)
    if progs.gold is not None:
        shards = lay.batch_shards
        gold_shape = (-(-int(config.gold_rm.batch_size) // shards) * shards, int(config.gold_rm.max_length))
    dev_eval = int(config.train.dev_size) > 0 and bool(config.data.dev_file or run_spec.uses_tiny(config))
    out = progs.catalogue(prompt_bucket(config), spec.sampling.max_new_tokens, spec.sampling, dev_eval=dev_eval,
                          relevance_shape=rel_shape, gold_shape=gold_shape)
    return out, progs.state


def _resident(progs, st, config) -> dict:
    """Per-device bytes of the long-lived arrays: policy weights, train state, relevance and gold weights."""
    out = {"frozen": device_bytes(progs["experience"].args[1]), "state": device_bytes(st.target())}
    if "relevance" in progs:
        out["relevance"] = device_bytes(progs["relevance"].args[0])
    if "gold" in progs and config.gold_rm.placement == "device":
        out["gold"] = device_bytes(progs["gold"].args[0])
    return out


# which resident arrays each program takes as arguments (the others stay resident beside it)
_TAKES = {"init": ("frozen", "state"), "cache": (), "sampler": ("frozen",), "eval_sampler": ("frozen",),
          "experience": ("frozen",),
          "update": ("frozen", "state"), "features": (), "relevance": ("relevance",), "gold": ("gold",),
          "split": ("state",), "join": ("state",)}


def compile_run(config, report: str = "") -> int:
    """Compile every program of ``config`` from shapes; print the table; 0 when every program fits, else 1."""
    topology = str(config.mesh.get("topology", ""))
    mesh, devices = mesh_for(mesh_lib.MeshConfig.from_config(config.mesh), topology)
    spec = run_spec.validate(config, num_devices=len(devices), files=False)  # shapes only: no file is read
    lay = programs.Layout(mesh, spec.mesh.rules)
    pcfg, gcfg, rcfg = _architectures(config, spec)
    needs_rel = any(s.needs_relevance for s in (spec.reward, *spec.counterfactual.values()))
    progs, st = _programs(config, spec, lay, pcfg, gcfg, rcfg, needs_rel)
    resident = _resident(progs, st, config)
    chip = chip_of(devices)
    rows = []
    for name, prog in progs.items():
        # LoRA's init never reads the frozen policy: XLA drops that argument, and the policy stays resident beside it
        takes = ("state",) if name == "init" and spec.mode == "lora" else _TAKES[name]
        others = sum(v for k, v in resident.items() if k not in takes)
        row, exe = compile_program(prog, others)
        row.flops, row.bytes_accessed = cost(exe)
        if name == "update":
            row.stats = sorted(jax.eval_shape(prog.jitted, *prog.args)[1])
        rows.append(row)
        print(f"compiled {name} in {row.seconds:.1f} s", flush=True)
    where = topology or f"{len(devices)} local {devices[0].platform} devices"
    shape = ",".join(str(mesh.shape[a]) for a in mesh_lib.MESH_AXES)
    ok = fits(rows, chip)
    payload = {"config": str(config.name), "algorithm": spec.algorithm.name, "topology": topology, "mesh": shape,
               "devices": len(devices),
               "chip": None if chip is None else dataclasses.asdict(chip), "resident": resident,
               "programs": [dataclasses.asdict(r) | {"total": r.total} for r in rows], "phases": {}, "fits": ok}
    if report:  # the memory verdict first: the roofline's extra compiles come after
        write_report(report, payload)
    phases = roofline(config, spec, lay, pcfg, gcfg, rcfg, needs_rel, rows) if chip is not None else {}
    print(table(rows, phases, chip, f"{config.name}: mesh {shape} (data,fsdp,tensor) on {where}"))
    if report:
        payload["phases"] = {k: {"flops": f, "bytes": b} for k, (f, b) in phases.items()}
        write_report(report, payload)
    return 0 if ok else 1


def roofline(config, spec, lay, pcfg, gcfg, rcfg, needs_rel, rows) -> dict:
    """``{phase: (FLOPs, bytes accessed)}`` per device and training step, from loop-free variants.

    XLA counts a loop body once. So each Llama program is compiled with its layers unrolled (per-layer
    layout) at 1 and 2 layers, ``cost(L) = cost(1) + (L - 1) (cost(2) - cost(1))`` exactly; loops over data
    are multiplied by their trip counts: the sampler is its prefill plus ``N`` decode steps (sampler minus
    prefill: one body; a group method's prompts are costed as prefilled on every row, an upper bound), the
    experience pass one group times the groups, the update one micro-batch step of the run's algorithm
    (``Algorithm.micro``) times its ``micro_steps`` (the optimizer step and once-per-batch maths, a few percent,
    are counted that many times too: an upper bound; a micro-batch of fewer rows than the batch shards is
    costed as one row per shard, as each device then computes at least one). The relevance encoder has no loop.
    A sweep (``config.sweep``): the sampler and the experience pass are the sweep's (every member's rows), the
    update unit is one chunk of members' micro-batch step, times the chunks.
    """
    B, N, pc, algo = spec.ppo.batch_size, spec.sampling.max_new_tokens, spec.ppo, spec.algorithm
    T = prompt_bucket(config)
    shards = lay.batch_shards
    group = assemble.experience_rows(pc, shards)
    m_rows = -(-pc.mini_batch_size // shards) * shards  # a micro-batch smaller than the shards: one row each
    micro = dataclasses.replace(pc, batch_size=m_rows, mini_batch_size=m_rows, gradient_accumulation_steps=1,
                                ppo_epochs=1)
    micro_algo = algo.micro(m_rows)
    eos, pad, _ = token_facts(config)
    lora_cfg = spec.lora if spec.mode == "lora" else None
    at = {}
    for L in (1, 2):
        p1 = dataclasses.replace(pcfg, num_hidden_layers=L)
        pspec = policy.PolicySpec(p1, spec.mode, spec.lora, spec.critic, spec.remat, mesh=lay.mesh, rules=lay.rules)
        frozen, _ = programs.llama_params(p1, layout="per_layer")
        st = programs.state_layout(lay, pspec, micro_algo, micro, frozen, "per_layer")
        progs = _loop_free(spec, lay, p1, pspec, st, micro_algo, micro_algo_rows(micro_algo, m_rows), B, T, N, group,
                           eos, pad, lora_cfg)
        if gcfg is not None:
            g1 = dataclasses.replace(gcfg, num_hidden_layers=L)
            G = -(-int(config.gold_rm.batch_size) // shards) * shards
            progs["gold"] = programs.build_gold(lay, g1, "starling", G, int(config.gold_rm.max_length), "per_layer")
        at[L] = {k: cost(v.compile()) for k, v in progs.items()}
    full = lambda k, L: tuple(a + (L - 1) * (b - a) for a, b in zip(at[1][k], at[2][k]))  # noqa: E731
    mul = lambda c, n: (c[0] * n, c[1] * n)  # noqa: E731
    add = lambda a, b: (a[0] + b[0], a[1] + b[1])  # noqa: E731
    Lp = pcfg.num_hidden_layers
    prefill, sampler = full("prefill", Lp), full("sampler", Lp)
    out = {"rollout": add(prefill, mul((sampler[0] - prefill[0], sampler[1] - prefill[1]), N)),
           "experience": mul(full("experience", Lp), B // group),
           "update": mul(full("update", Lp), algo.micro_steps * (  # a sweep: chunks of members one after another
               1 if spec.sweep is None else -(-spec.sweep.size // spec.sweep.update_chunk)))}
    if needs_rel:
        out["relevance (per call)"] = next((r.flops, r.bytes_accessed) for r in rows if r.name == "relevance")
    if gcfg is not None:
        out["gold (per call)"] = full("gold", gcfg.num_hidden_layers)
    return out


def _loop_free(spec, lay, p1, pspec, st, micro_algo, rows: int, B: int, T: int, N: int, group: int, eos: int,
               pad: int, lora_cfg) -> dict:
    """The loop-free Llama programs of `roofline` (layers unrolled): a run's; or a sweep's, whose sampler and
    experience pass hold every member's rows and whose update unit is one chunk of members (``update_chunk``)."""
    if spec.sweep is None:
        return {"sampler": programs.build_sampler(lay, p1, spec.sampling, eos, pad, lora_cfg, B, T, "per_layer"),
                "prefill": programs.build_prefill(lay, p1, lora_cfg, B, T, N, "per_layer"),
                "experience": programs.build_experience(lay, pspec, spec.algorithm, st, group, T, N, None,
                                                        "per_layer"),
                "update": programs.build_update(lay, pspec, micro_algo, st, rows, T, N, "per_layer")}
    K, chunk, sp = spec.sweep.size, spec.sweep.update_chunk, sweep_programs
    return {"sampler": sp.build_sampler(lay, p1, spec.sampling, eos, pad, lora_cfg, K, B, T, "per_layer"),
            "prefill": sp.build_prefill(lay, p1, lora_cfg, K, B, T, N, "per_layer"),
            "experience": sp.build_experience(lay, pspec, spec.algorithm, st, K, group, T, N, None, "per_layer"),
            "update": sp.build_update(lay, pspec, micro_algo, st, chunk, rows, T, N, chunk, "per_layer")}


def micro_algo_rows(micro_algo, rows: int) -> int:
    """Rows of the micro-batch unit ``micro_algo`` was built for (a group method rounds them to whole groups)."""
    cfg = getattr(micro_algo, "cfg", None)
    return int(getattr(cfg, "batch_size", rows))


def main(config, report: str = "") -> int:
    """``rre-train --compile_only``: 0 when every program fits, 1 when one does not (config errors raise)."""
    if config.mesh.get("topology", ""):
        gen, dims = parse_topology(str(config.mesh.topology))
        quiet_libtpu(gen, math.prod(dims))  # before the first backend use
    return compile_run(config, report)
