"""Ahead-of-time compilation of a run (``rre-train --compile_only``): every program, from shapes alone, for the
config's mesh on the local devices or on a TPU topology (``config.mesh.topology``) with XLA's real TPU compiler
(libtpu; no TPU needed), and one table of what XLA says each program needs per device.

Nothing is read but config files (architectures: ``config.json`` of model.path / gold_rm.path / relevance.path, or
``config.plan`` presets when a path is empty), nothing allocated, nothing written but the optional report.

Per program and device: XLA's argument / output / alias / temp / code bytes (``memory_analysis``), plus the
run's other resident arrays (weights and train state the program does not take), against the chip's memory:
fits when the sum is within ``memory.HEADROOM`` of it. Per step: FLOPs, bytes accessed and the part of them
that crosses HBM, and the roofline time they imply at the chip's peak bf16 FLOP/s and HBM bandwidth (``CHIPS``),
from the compiled programs themselves, op by op (``rre_jax.hlo_account``: XLA's cost analysis of each op, a loop
body counted once per trip; ``phases``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from rre_jax import (assemble, hlo_account, memory, mesh as mesh_lib, policy, programs, relevance, run_spec,
                     sweep_programs, tokenizer as tok_lib)
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
        out.append(f"{'phase':<22}{'GFLOP':>12}{'XLA GB':>10}{'HBM GB':>10}{'compute_s':>11}{'memory_s':>10}"
                   f"{'roofline_s':>11}  (per device, per training step; memory: the HBM bytes)")
        for name, c in phases.items():
            tc = c["flops"] / (chip.bf16_tflops * 1e12) if chip else math.nan
            tm = c["hbm"] / (chip.hbm_gbps * 1e9) if chip else math.nan
            out.append(f"{name:<22}{c['flops'] / 1e9:12.1f}{c['bytes'] / 1e9:10.2f}{c['hbm'] / 1e9:10.2f}{tc:11.3f}"
                       f"{tm:10.3f}{max(tc, tm):11.3f}")
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
    gold_cfg = dt(memory.llama_config(gold, "float32", "config.plan.gold_rm")) if gold else None
    rcfg = bert.BertConfig(30522, 768, 12, 12, 3072, 512)  # BERT-base: facebook/contriever's shape
    if config.relevance.path:
        path = os.path.join(relevance.encoder_path(config.relevance.path, "config.relevance.path"), "config.json")
        with open(path) as f:
            rcfg = bert.BertConfig.from_hf(json.load(f), path)
    return pcfg, gold_cfg, rcfg


def token_facts(config) -> tuple[int, int, int]:
    """``(eos id, pad id, longest token in bytes)`` of the run's tokenizer, read from its directory
    (``tokenizer.path`` or ``model.path``) when it exists, else from ``config.plan`` (shapes-only planning)."""
    path = config.tokenizer.path or config.model.path
    if path and os.path.isdir(path):
        tok = tok_lib.load_tokenizer(path)
        return tok.eos_token_id, tok.pad_token_id, tok_lib.byte_table(tok).bytes_VxL.shape[1]
    return int(config.plan.eos_id), int(config.plan.pad_id), int(config.plan.max_token_bytes)


def run_programs(config, spec, lay, pcfg, gold_cfg, rcfg, needs_relevance: bool):
    """The run's `programs.RunPrograms`, from shapes: the trainer's own list, built as ``train`` builds it (the
    policy, the algorithm, the features of the run's tokenizer, the relevance encoder where the run puts it,
    the gold RM on the run's mesh); a sweep's `sweep_programs.SweepPrograms` over them (``config.sweep``)."""
    pspec = policy.PolicySpec(pcfg, spec.mode, spec.lora, spec.critic, spec.remat, mesh=lay.mesh, rules=lay.rules)
    frozen, _ = programs.llama_params(pcfg)
    eos, pad, width = token_facts(config)
    feats = programs.FeaturePrograms(lay, pcfg.vocab_size, width, spec.scoring.stop_strings)
    rel = None
    if needs_relevance:
        where = relevance.encoder_mesh(lay.mesh, lay.mesh.devices.flat[0].process_index)
        rel = relevance.encoder_programs(rcfg, mesh=where, rules=lay.rules,
                                         max_length=spec.relevance.max_length)
    gold = None
    if gold_cfg is not None:
        gold = programs.GoldPrograms(lay, gold_cfg, "seq_cls" if spec.gold_rm.layout == "hf_score" else "starling")
    rows = assemble.experience_rows(spec.ppo, lay.batch_shards)
    progs = programs.RunPrograms(lay.mesh, lay.rules, pspec, spec.algorithm, spec.ppo, frozen, eos_id=eos,
                                 pad_id=pad, experience_rows=rows, features=feats, relevance=rel, gold=gold)
    if spec.sweep is None:
        return progs
    return sweep_programs.SweepPrograms(progs, spec.sweep.size, spec.sweep.update_chunk)  # a sweep's (sweep_run)


def _programs(config, spec, lay, pcfg, gold_cfg, rcfg, needs_relevance: bool):
    """``({name: Program}, state layout)``: every program of the run (``RunPrograms.catalogue``) at its largest
    prompt bucket and scoring batches."""
    progs = run_programs(config, spec, lay, pcfg, gold_cfg, rcfg, needs_relevance)
    rel_shape = gold_shape = None
    if progs.relevance is not None:
        L, tokens = spec.relevance.max_length, 2048  # the encoder's default tokens per batch
        shards = progs.relevance.layout.batch_shards
        rows = -(-max(1 << (max(1, tokens // L).bit_length() - 1), 1) // shards) * shards
        rel_shape = tokens if progs.relevance.packed else (rows, L)
    if progs.gold is not None:
        shards = lay.batch_shards
        gold_shape = (-(-spec.gold_rm.batch_size // shards) * shards, spec.gold_rm.max_length)
    dev_eval = spec.train.dev_size > 0 and bool(spec.data.dev_file or spec.tiny)
    out = progs.catalogue(spec.data.largest_bucket, spec.sampling.max_new_tokens, spec.sampling, dev_eval=dev_eval,
                          relevance_shape=rel_shape, gold_shape=gold_shape)
    return out, progs.state


def _resident(progs, st, spec) -> dict:
    """Per-device bytes of the long-lived arrays: policy weights, train state, relevance and gold weights."""
    out = {"frozen": device_bytes(progs["experience"].args[1]), "state": device_bytes(st.target())}
    if "relevance" in progs:
        out["relevance"] = device_bytes(progs["relevance"].args[0])
    if "gold" in progs and spec.gold_rm.placement == "device":
        out["gold"] = device_bytes(progs["gold"].args[0])
    return out


# which resident arrays each program takes as arguments (the others stay resident beside it)
_TAKES = {"init": ("frozen", "state"), "cache": (), "sampler": ("frozen",), "eval_sampler": ("frozen",),
          "experience": ("frozen",),
          "update": ("frozen", "state"), "features": (), "relevance": ("relevance",), "gold": ("gold",),
          "split": ("state",), "join": ("state",)}


# the training step's phases: one call of each program per step (the relevance encoder and the gold RM: per call)
PHASES = {"sampler": "rollout", "experience": "experience", "update": "update", "relevance": "relevance (per call)",
          "gold": "gold (per call)"}


def compile_run(config, report: str = "") -> int:
    """Compile every program of ``config`` from shapes; print the table; 0 when every program fits, else 1."""
    topology = str(config.mesh.get("topology", ""))
    mesh, devices = mesh_for(mesh_lib.MeshConfig.from_config(config.mesh), topology)
    spec = run_spec.validate(config, num_devices=len(devices), files=False)  # shapes only: no file is read
    lay = programs.Layout(mesh, spec.mesh.rules)
    pcfg, gold_cfg, rcfg = _architectures(config, spec)
    needs_rel = any(s.needs_relevance for s in (spec.reward, *spec.counterfactual.values()))
    progs, st = _programs(config, spec, lay, pcfg, gold_cfg, rcfg, needs_rel)
    resident = _resident(progs, st, spec)
    chip = chip_of(devices)
    rows, accounts = [], {}
    for name, prog in progs.items():
        # LoRA's init never reads the frozen policy: XLA drops that argument, and the policy stays resident beside it
        takes = ("state",) if name == "init" and spec.mode == "lora" else _TAKES[name]
        others = sum(v for k, v in resident.items() if k not in takes)
        row, exe = compile_program(prog, others)
        row.flops, row.bytes_accessed = cost(exe)
        if name == "update":
            row.stats = sorted(jax.eval_shape(prog.jitted, *prog.args)[1])
        rows.append(row)
        if chip is not None and name in PHASES:
            accounts[name] = hlo_account.totals(hlo_account.account(exe.as_text()))
        print(f"compiled {name} in {row.seconds:.1f} s", flush=True)
    where = topology or f"{len(devices)} local {devices[0].platform} devices"
    shape = ",".join(str(mesh.shape[a]) for a in mesh_lib.MESH_AXES)
    ok = fits(rows, chip)
    # per device and call: FLOPs, XLA's bytes accessed and the part of them that crosses HBM, loops at their trips
    phases = {PHASES[k]: {"flops": a["flops"], "bytes": a["bytes"], "hbm": a["hbm"]} for k, a in accounts.items()}
    payload = {"config": str(config.name), "algorithm": spec.algorithm.name, "topology": topology,
               "mesh": shape, "devices": len(devices),
               "chip": None if chip is None else dataclasses.asdict(chip), "resident": resident,
               "programs": [dataclasses.asdict(r) | {"total": r.total} for r in rows], "phases": phases, "fits": ok}
    print(table(rows, phases, chip, f"{config.name}: mesh {shape} (data,fsdp,tensor) on {where}"))
    if report:
        write_report(report, payload)
    return 0 if ok else 1


def main(config, report: str = "") -> int:
    """``rre-train --compile_only``: 0 when every program fits, 1 when one does not (config errors raise)."""
    if config.mesh.get("topology", ""):
        gen, dims = parse_topology(str(config.mesh.topology))
        quiet_libtpu(gen, math.prod(dims))  # before the first backend use
    return compile_run(config, report)
