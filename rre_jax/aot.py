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
import re
import time

import jax
import numpy as np

from rre_jax import hlo_account, mesh as mesh_lib

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation, per JAX device: HBM bytes, peak bf16 FLOP/s, HBM bytes/s; the libtpu device kind,
    the ``TPU_ACCELERATOR_TYPE`` stem and ``chip_config_name`` its topology is described with."""

    hbm_gib: float
    bf16_tflops: float
    hbm_gbps: float
    kind: str
    accelerator: str
    chip_config: str = "default"


# Public per-chip figures (Google Cloud TPU documentation, "TPU v4", "TPU v5e", "TPU v5p", "TPU v6e" pages:
# cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e). v4 and v5p chips hold two TensorCores; JAX drives them as
# one device ("megacore"), so a v4 topology is described with chip_config_name='megacore': one device per chip,
# and the per-device figures are the chip's. v5e and v6e chips have one TensorCore.
CHIPS = {
    "v4": Chip(32, 275, 1228, "TPU v4", "v4", "megacore"),
    "v5e": Chip(16, 197, 819, "TPU v5 lite", "v5litepod"),
    "v5p": Chip(95, 459, 2765, "TPU v5", "v5p", "megacore"),
    "v6e": Chip(32, 918, 1640, "TPU v6 lite", "v6e"),
}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?$")


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """``'v5e:2x4'`` -> ``('v5e', (2, 4))``; a clear error naming ``config.mesh.topology`` otherwise."""
    m = _TOPOLOGY.match(name)
    if not m:
        raise ValueError(f"config.mesh.topology={name!r}: give '<generation>:<chips per axis>' with generation "
                         f"one of {sorted(CHIPS)}, e.g. 'v5e:2x4' (v5e-8), 'v5e:4x8' (v5e-32), 'v4:2x2x1' "
                         "(v4-8), 'v4:2x2x4' (v4-32); empty: the local devices")
    return m.group(1), tuple(int(g) for g in m.groups()[1:] if g)


def _quiet_libtpu(gen: str, chips: int) -> None:
    """libtpu reads the TPU VM's metadata at start-up and warns when there is none (a CPU host): name the
    accelerator and a single local worker, unless the environment already does (a real TPU VM). Compiling
    for a described topology needs no chip, so the lock libtpu takes against a second process is lifted (a
    compile-only run beside a training run, or two of them, on one host)."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{CHIPS[gen].accelerator}-{chips}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(name: str) -> list:
    """The devices of TPU topology ``name`` (descriptions only: compile for them, never run)."""
    from jax.experimental import topologies
    gen, dims = parse_topology(name)
    _quiet_libtpu(gen, math.prod(dims))
    topo = topologies.get_topology_desc(topology_name=f"{gen}:{'x'.join(map(str, dims))}", platform="tpu",
                                        chip_config_name=CHIPS[gen].chip_config)
    return list(topo.devices)


def chip_of(devices) -> Chip | None:
    kind = devices[0].device_kind
    return next((c for c in CHIPS.values() if c.kind == kind), None)


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
    from rre_jax.memory import HEADROOM
    budget = None if chip is None else HEADROOM * chip.hbm_gib * GIB
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
    from rre_jax.memory import HEADROOM
    return chip is None or all(r.total <= HEADROOM * chip.hbm_gib * GIB for r in rows)


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
    from rre_jax import memory, relevance
    from rre_jax.models import bert
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


def _programs(config, spec, lay, pcfg, gcfg, rcfg, needs_relevance: bool, layout: str = "stacked"):
    """Every program of the run, built for the shapes of its largest prompt bucket."""
    from rre_jax import policy, programs, train
    B, N = spec.ppo.batch_size, spec.sampling.max_new_tokens
    T = -(-int(config.data.max_prompt_length) // int(config.data.bucket)) * int(config.data.bucket)
    pspec = policy.PolicySpec(pcfg, spec.mode, spec.lora, spec.critic, spec.remat, mesh=lay.mesh, rules=lay.rules)
    frozen, _ = programs.llama_params(pcfg, layout=layout)
    st = programs.state_layout(lay, pspec, spec.ppo, frozen, layout)
    shards = lay.mesh.shape["data"] * lay.mesh.shape["fsdp"]
    lora_cfg = spec.lora if spec.mode == "lora" else None
    group = spec.group.num_generations if spec.group else 1  # as train_step samples a group method's batches
    out = {"sampler": programs.build_sampler(lay, pcfg, spec.sampling, 2, 0, lora_cfg, B, T, layout, group),
           "experience": programs.build_experience(lay, pspec, st, B, T, N, train.experience_rows(spec.ppo, shards),
                                                   layout),
           "update": programs.build_update(lay, pspec, spec.ppo, st, T, N, layout)}
    if layout == "stacked":
        out = {"init": programs.build_init(lay, pspec, spec.ppo, frozen), **out}
    if needs_relevance:
        L = int(config.relevance.max_length)
        rows = -(-max(1 << (max(1, 2048 // L).bit_length() - 1), 1) // shards) * shards
        out["relevance"] = programs.build_relevance(lay, rcfg, rows, L)
    if gcfg is not None:
        G = -(-int(config.gold_rm.batch_size) // shards) * shards
        pooling = "seq_cls" if config.gold_rm.layout == "hf_score" else "starling"
        out["gold"] = programs.build_gold(lay, gcfg, pooling, G, int(config.gold_rm.max_length), layout)
    return out, st


def _resident(progs, st, config) -> dict:
    """Per-device bytes of the long-lived arrays: policy weights, train state, relevance and gold weights."""
    out = {"frozen": device_bytes(progs["experience"].args[1]), "state": device_bytes(st.target())}
    if "relevance" in progs:
        out["relevance"] = device_bytes(progs["relevance"].args[0])
    if "gold" in progs and config.gold_rm.placement == "device":
        out["gold"] = device_bytes(progs["gold"].args[0])
    return out


# which resident arrays each program takes as arguments (the others stay resident beside it)
_TAKES = {"init": ("frozen", "state"), "sampler": ("frozen",), "experience": ("frozen",),
          "update": ("frozen", "state"), "relevance": ("relevance",), "gold": ("gold",)}


# the training step's phases: one call of each program per step (the relevance encoder and the gold RM: per call)
PHASES = {"sampler": "rollout", "experience": "experience", "update": "update", "relevance": "relevance (per call)",
          "gold": "gold (per call)"}


def compile_run(config, report: str = "") -> int:
    """Compile every program of ``config`` from shapes; print the table; 0 when every program fits, else 1."""
    from rre_jax import programs, reward, run_spec
    topology = str(config.mesh.get("topology", ""))
    mesh, devices = mesh_for(mesh_lib.MeshConfig.from_config(config.mesh), topology)
    spec = run_spec.validate(config, num_devices=len(devices), files=False)  # shapes only: no file is read
    lay = programs.Layout(mesh, spec.mesh.rules)
    pcfg, gcfg, rcfg = _architectures(config, spec)
    needs_rel = any(reward.preset(n).needs_relevance for n in (config.reward.preset, *config.reward.counterfactual))
    progs, st = _programs(config, spec, lay, pcfg, gcfg, rcfg, needs_rel)
    resident = _resident(progs, st, config)
    chip = chip_of(devices)
    rows, accounts = [], {}
    for name, prog in progs.items():
        # LoRA's init never reads the frozen policy: XLA drops that argument, and the policy stays resident beside it
        takes = ("state",) if name == "init" and spec.mode == "lora" else _TAKES[name]
        others = sum(v for k, v in resident.items() if k not in takes)
        row, exe = compile_program(prog, others)
        row.flops, row.bytes_accessed = cost(exe)
        rows.append(row)
        if chip is not None and name in PHASES:
            accounts[name] = hlo_account.totals(hlo_account.account(exe.as_text()))
        print(f"compiled {name} in {row.seconds:.1f} s", flush=True)
    where = topology or f"{len(devices)} local {devices[0].platform} devices"
    shape = ",".join(str(mesh.shape[a]) for a in mesh_lib.MESH_AXES)
    ok = fits(rows, chip)
    # per device and call: FLOPs, XLA's bytes accessed and the part of them that crosses HBM, loops at their trips
    phases = {PHASES[k]: {"flops": a["flops"], "bytes": a["bytes"], "hbm": a["hbm"]} for k, a in accounts.items()}
    payload = {"config": str(config.name), "topology": topology, "mesh": shape, "devices": len(devices),
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
        _quiet_libtpu(gen, math.prod(dims))  # before the first backend use
    return compile_run(config, report)
