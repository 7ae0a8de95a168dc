"""Where the bytes of one decode step and of one PPO micro-batch go, op by op, on a TPU preset -- compiled by
XLA's TPU compiler (libtpu) on this CPU host, from shapes alone -- next to the floor from the shapes.

    python benchmarks/tpu_account.py v5e-8                  # both programs, the 25 largest kinds of op
    python benchmarks/tpu_account.py v4-8 --program decode --top 40

The programs are the run's own (``rre_jax.programs.build_sampler`` / ``build_update`` with the preset's shapes,
mesh and rules, as ``rre-train --compile_only`` builds them). The decode step is one run of the sampler's decode
loop body, the micro-batch one run of the update's micro-batch loop body (its layer scans at their trip counts).
Each op's bytes are XLA's own cost analysis of that op (``rre_jax.hlo_account``); ``HBM`` is the part of them whose
buffers lie in HBM (the rest is on-chip VMEM: prefetches into it are counted by XLA at the copy's start, its end
and again by the op that reads it). Ops of one kind (same opcode, source op and shapes) are merged: ``n`` is how
many ran. The floor is ``rre_jax.memory.decode_floor`` / ``update_floor``. Output: markdown for docs/tpu_compile.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rre_jax import aot, hlo_account, memory, mesh as mesh_lib, policy, programs, run_spec, topology  # noqa: E402
from rre_jax.configs import alpacafarm_rer  # noqa: E402

GB = 1e9


@dataclasses.dataclass
class Run:
    """A preset's mesh, validated run spec and policy architecture."""

    config: object
    spec: object
    lay: programs.Layout
    pcfg: object
    mesh_shape: dict
    prompt_len: int


def setup(preset: str) -> Run:
    config = alpacafarm_rer.get_config(f"rer,{preset}")
    gen, dims = topology.parse_topology(str(config.mesh.topology))
    topology.quiet_libtpu(gen, math.prod(dims))
    mesh, devices = aot.mesh_for(mesh_lib.MeshConfig.from_config(config.mesh), str(config.mesh.topology))
    spec = run_spec.validate(config, num_devices=len(devices), files=False)
    pcfg = dataclasses.replace(memory.llama_config(config.model.path or config.plan.policy, "float32",
                                                   "config.plan.policy"),
                               dtype=spec.dtype, param_dtype=spec.param_dtype)
    T = -(-int(config.data.max_prompt_length) // int(config.data.bucket)) * int(config.data.bucket)
    return Run(config, spec, programs.Layout(mesh, spec.mesh.rules), pcfg, dict(mesh.shape), T)


def _pspec(run: Run) -> policy.PolicySpec:
    s = run.spec
    return policy.PolicySpec(run.pcfg, s.mode, s.lora, s.critic, s.remat, mesh=run.lay.mesh, rules=run.lay.rules)


def _lora(run: Run):
    return run.spec.lora if run.spec.mode == "lora" else None


def decode(run: Run):
    """``(rows of one decode step, floor parts, XLA's total of the sampler)``."""
    B, N = run.spec.ppo.batch_size, run.spec.sampling.max_new_tokens
    prog = programs.build_sampler(run.lay, run.pcfg, run.spec.sampling, 2, 0, _lora(run), B, run.prompt_len)
    exe = prog.compile()
    rows = hlo_account.account(exe.as_text())
    loop = hlo_account.loop_of(rows, N)
    floor = memory.decode_floor(run.pcfg, _lora(run), B, run.prompt_len + N, run.mesh_shape, run.lay.rules)
    return hlo_account.iteration(rows, loop), floor, aot.cost(exe)[1]


def update(run: Run):
    """``(rows of one PPO micro-batch, floor parts, XLA's total of the update program)``."""
    pc, pspec = run.spec.ppo, _pspec(run)
    frozen, _ = programs.llama_params(run.pcfg)
    algo = run.spec.algorithm
    st = programs.state_layout(run.lay, pspec, algo, pc, frozen)
    prog = programs.build_update(run.lay, pspec, algo, st, pc.batch_size, run.prompt_len,
                                 run.spec.sampling.max_new_tokens)
    exe = prog.compile()
    rows = hlo_account.account(exe.as_text())
    loop = hlo_account.loop_of(rows, algo.micro_steps, nested=True)
    shards = run.mesh_shape["data"] * run.mesh_shape["fsdp"]
    M = pc.mini_batch_size if pc.mini_batch_size < shards else -(-pc.mini_batch_size // shards)
    trainable = aot.device_bytes(st.target()["trainable"])
    opt = aot.device_bytes(st.target()["opt_state"])
    floor = memory.update_floor(pspec, M, run.prompt_len, run.spec.sampling.max_new_tokens, run.mesh_shape,
                                run.lay.rules, trainable, opt, pc.gradient_accumulation_steps)
    return hlo_account.iteration(rows, loop), floor, aot.cost(exe)[1]


def table(title: str, rows, floor: dict, program_total: float, chip, top: int) -> str:
    """Markdown: the ``top`` largest kinds of op, the rest in one line, the sum, and the floor beside it."""
    groups = hlo_account.grouped(rows)
    tot = hlo_account.totals(rows)
    out = [f"#### {title}", "", "| n | op | source | shapes (largest operands -> output) | XLA GB | HBM GB | GFLOP |",
           "|---:|---|---|---|---:|---:|---:|"]
    cell = lambda g: (f"| {g.trips} | {g.opcode} | {g.what[-48:]} | `{g.shapes[:110]}` | {g.bytes / GB:.3f} "  # noqa
                      f"| {g.hbm / GB:.3f} | {g.flops / 1e9:.1f} |")
    out += [cell(g) for g in groups[:top]]
    rest = groups[top:]
    out.append(f"| {sum(g.trips for g in rest)} | (the other {len(rest)} kinds) | | | "
               f"{sum(g.bytes for g in rest) / GB:.3f} | {sum(g.hbm for g in rest) / GB:.3f} "
               f"| {sum(g.flops for g in rest) / 1e9:.1f} |")
    out.append(f"| | **sum** | | | **{tot['bytes'] / GB:.3f}** | **{tot['hbm'] / GB:.3f}** "
               f"| **{tot['flops'] / 1e9:.1f}** |")
    fl = sum(floor.values())
    parts = ", ".join(f"{k} {v / GB:.3f}" for k, v in floor.items())
    t_mem, t_hbm = tot["bytes"] / (chip.hbm_gbps * 1e9), tot["hbm"] / (chip.hbm_gbps * 1e9)
    t_flop = tot["flops"] / (chip.bf16_tflops * 1e12)
    out += ["", f"Floor from the shapes: **{fl / GB:.3f} GB** ({parts}). XLA's bytes {tot['bytes'] / GB:.3f} GB = "
                f"{tot['bytes'] / fl:.2f}x the floor; HBM traffic {tot['hbm'] / GB:.3f} GB = {tot['hbm'] / fl:.2f}x. "
                f"At {chip.hbm_gbps:.0f} GB/s and {chip.bf16_tflops:.0f} TFLOP/s: {t_hbm * 1e3:.2f} ms of HBM "
                f"traffic ({t_mem * 1e3:.2f} ms by XLA's bytes), {t_flop * 1e3:.2f} ms of compute. XLA's "
                f"`cost_analysis()` of the whole program (every loop body once): {program_total / GB:.3f} GB.", ""]
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", choices=[n for n, v in alpacafarm_rer.MESH_PRESETS.items() if v[3]])
    p.add_argument("--program", choices=("decode", "update", "both"), default="both")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    run = setup(args.preset)
    chip = topology.chip_of(run.lay.mesh.devices.flat)
    for name, fn in (("decode", decode), ("update", update)):
        if args.program in (name, "both"):
            t = time.perf_counter()
            rows, floor, total = fn(run)
            title = {"decode": "one decode step", "update": "one PPO micro-batch"}[name]
            print(table(f"{args.preset}: {title} (per device)", rows, floor, total, chip, args.top))
            print(f"<!-- compiled and accounted in {time.perf_counter() - t:.0f} s -->\n", flush=True)


if __name__ == "__main__":
    main()
