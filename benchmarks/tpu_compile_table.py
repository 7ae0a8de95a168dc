"""XLA's per-device bytes of every program (``rre-train --compile_only`` reports) beside ``rre-params``' plan.

    for p in v4-8 v5e-8 v4-32 v5e-32; do
      rre-train --config configs/alpacafarm_rer.py:rer,$p --workdir /tmp/unused --compile_only \\
          --compile_report=/tmp/tpu/$p.json
    done
    python benchmarks/tpu_compile_table.py /tmp/tpu/*.json     # markdown for docs/tpu_compile.md

Plan figure per program: resident (policy, trainable, optimizer state, relevance encoder, gold RM when kept on
the device) plus the program's own phase lines -- sampler: KV cache + prefill peak + the decode loop's per-layer
weight copy (an eval sampler likewise); cache: the KV cache; update: gradients + activations; gold: gold RM (when
it lives on the host) + scoring peak; relevance / init / experience / features: resident only (no line of their
own). "plan vs XLA" is (plan - XLA) / XLA; beyond 15% it is marked for an explanation in docs/tpu_compile.md.
Phases: per device and training step, XLA's bytes and the part of them that crosses HBM (``rre_jax.hlo_account``);
the roofline is the larger of the compute time and the HBM time (a report without ``hbm``, from before it was
measured, uses XLA's bytes).
"""
from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rre_jax import memory  # noqa: E402
from rre_jax.configs import alpacafarm_rer  # noqa: E402

GIB = 2**30


def plan_bytes(p: memory.MemoryPlan, program: str) -> int:
    ln = p.lines
    on_device = p.placement == "device"
    resident = (ln["policy params"] + ln["optimizer state"] + ln["relevance encoder (float32)"]
                + next(v for k, v in ln.items() if k.startswith("trainable"))
                + (ln["gold RM params"] if on_device else 0))
    sampler = ln["kv cache (rollout)"] + ln["prefill peak (rollout)"] + ln["decode weights (per-layer copy)"]
    own = {"sampler": sampler, "eval_sampler": sampler, "cache": ln["kv cache (rollout)"],
           "update": ln["gradients (accumulator + micro-batch)"] + ln["activations (update micro-batch)"],
           "gold": (0 if on_device else ln["gold RM params"]) + ln["gold RM scoring peak"]}
    return resident + own.get(program, 0)


def diff(planned: int, xla: int, program: str) -> str:
    if program in ("init", "experience", "relevance", "features"):
        return "(no plan line)"
    d = (planned - xla) / xla
    return f"{d:+.1%}" + (" **>15%**" if abs(d) > 0.15 else "")


def main(paths) -> None:
    for path in paths:
        rep = json.loads(pathlib.Path(path).read_text())
        preset = pathlib.Path(path).stem
        p = memory.plan(alpacafarm_rer.get_config(f"rer,{preset}"))
        chip = rep["chip"]
        print(f"\n### {preset}: mesh {rep['mesh']} (data,fsdp,tensor) on {rep['topology']}, "
              f"{chip['hbm_gib']:.0f} GiB per device, gold RM on {p.placement}\n")
        print("| program | args | out | alias | temp | code | others resident | XLA total | plan | plan vs XLA "
              "| fits (90%) | compile s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        for r in rep["programs"]:
            planned = plan_bytes(p, r["name"])
            fits = "yes" if r["total"] <= memory.HEADROOM * chip["hbm_gib"] * GIB else "**NO**"
            g = lambda n: f"{n / GIB:.2f}"  # noqa: E731
            print(f"| {r['name']} | {g(r['argument'])} | {g(r['output'])} | {g(r['alias'])} | {g(r['temp'])} "
                  f"| {g(r['code'])} | {g(r['resident_others'])} | {g(r['total'])} | {g(planned)} "
                  f"| {diff(planned, r['total'], r['name'])} | {fits} | {r['seconds']:.0f} |")
        print("\n| phase (per device) | GFLOP | XLA GB | HBM GB | compute s | memory s (XLA's bytes) | memory s (HBM) "
              "| roofline s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, c in rep["phases"].items():
            bw = chip["hbm_gbps"] * 1e9
            tc, tx, th = c["flops"] / (chip["bf16_tflops"] * 1e12), c["bytes"] / bw, c.get("hbm", c["bytes"]) / bw
            print(f"| {name} | {c['flops'] / 1e9:.0f} | {c['bytes'] / 1e9:.1f} | {c.get('hbm', c['bytes']) / 1e9:.1f} "
                  f"| {tc:.3f} | {tx:.3f} | {th:.3f} | {max(tc, th):.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
