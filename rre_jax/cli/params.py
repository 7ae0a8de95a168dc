"""``rre-params``: parameter bytes per device of a Llama-family model on a mesh, or the memory plan of a whole
run config, without allocating anything (``rre_jax.memory``).

    rre-params --model llama-7b --lora --mesh 8,4,1      # LLaMA-7B + LoRA on 32 devices
    rre-params --model yi-34b --mesh 1,32,1              # Starling-RM-34B's trunk on 32 devices
    rre-params --config-json path/to/config.json --mesh 1,8,1
    rre-params --config configs/alpacafarm_rer.py:rer,v4-32 [--config.mesh.shape=1,8,2]   # a run's plan
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Sequence

from rre_jax import errors
from rre_jax import config_loader as loader


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rre-params", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="built-in architecture (llama-7b, yi-34b, mid, tiny)")
    src.add_argument("--config-json", help="a transformers config.json (llama / mistral / qwen2)")
    src.add_argument("--config", help="a run config file[:arg] (e.g. configs/alpacafarm_rer.py:rer,v4-32): "
                     "print its memory plan; --config.a.b=v overrides its fields")
    p.add_argument("--devices", type=int, default=0, help="with --config: devices for a -1 in mesh.shape")
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor sizes (default 1,1,1)")
    p.add_argument("--dtype", default="bfloat16", help="parameter dtype (default bfloat16)")
    p.add_argument("--head", choices=("lm", "score"), default="lm")
    p.add_argument("--value-head", action="store_true", help="add the PPO value head")
    p.add_argument("--lora", action="store_true", help="add LoRA adapters")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _mesh_shape(text: str) -> dict[str, int]:
    from rre_jax import mesh as mesh_lib
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise errors.UserError(f"--mesh {text!r}: give three positive sizes for {mesh_lib.MESH_AXES}, e.g. 8,4,1")
    return dict(zip(mesh_lib.MESH_AXES, shape))


def _model_config(args):
    from rre_jax import memory
    from rre_jax.models import llama
    if args.config_json:
        try:
            with open(args.config_json) as f:
                return llama.LlamaConfig.from_hf(json.load(f), args.config_json, dtype=args.dtype,
                                                 param_dtype=args.dtype)
        except (OSError, ValueError, TypeError) as e:
            raise errors.UserError(f"--config-json {args.config_json}: {e}") from None
    if args.model not in memory.PRESETS:
        raise errors.UserError(f"--model {args.model!r}: choose one of {sorted(memory.PRESETS)}")
    return llama.LlamaConfig(**memory.PRESETS[args.model], dtype=args.dtype, param_dtype=args.dtype)


def _print_plan(args, overrides) -> None:
    from rre_jax import memory
    config = loader.load_with_overrides(args.config, overrides)
    if "JAX_PLATFORMS" not in os.environ and (args.devices or -1 not in tuple(config.mesh.shape)):
        import jax  # a plan from shapes alone needs no accelerator: none is probed (libtpu warns on a CPU host)
        jax.config.update("jax_platforms", "cpu")
    try:
        mplan = memory.plan(config, num_devices=args.devices or None)
    except (ValueError, KeyError, OSError) as e:
        raise errors.UserError(str(e.args[0] if isinstance(e, KeyError) and e.args else e)) from None
    if args.json:
        print(json.dumps({**dataclasses.asdict(mplan), "peak": mplan.peak, "fits": mplan.fits}))
    else:
        print(mplan.table())


def _print_params(args) -> None:
    from rre_jax import memory
    from rre_jax.models import lora as lora_lib
    mesh_shape = _mesh_shape(args.mesh)
    cfg = _model_config(args)
    try:
        lora_cfg = (lora_lib.LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank,
                                        targets=tuple(args.lora_targets.split(","))) if args.lora else None)
    except ValueError as e:
        raise errors.UserError(f"--lora-rank / --lora-targets: {e}") from None
    rep = memory.param_report(cfg, mesh_shape, head=args.head, value_head=args.value_head, lora_cfg=lora_cfg)
    if args.json:
        print(json.dumps(rep))
        return
    gib = lambda n: f"{n / 2**30:.3f} GiB"  # noqa: E731
    name = args.model or args.config_json
    print(f"{name}: {rep['params'] / 1e9:.3f}B params ({cfg.param_dtype.name}), {gib(rep['bytes_total'])} in all")
    print(f"mesh {args.mesh} (data,fsdp,tensor) = {rep['devices']} devices: "
          f"{gib(rep['bytes_per_device'])} of parameters per device")
    if lora_cfg is not None:
        print(f"LoRA r={lora_cfg.rank} on {','.join(lora_cfg.targets)}: {rep['lora_params'] / 1e6:.2f}M params, "
              f"{rep['lora_bytes_per_device'] / 2**20:.2f} MiB per device")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rre-params`` on ``argv``; 0 on success, 2 on a user's mistake."""
    try:
        overrides, rest = loader.split_argv(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(rest)
        if overrides and not args.config:
            raise errors.UserError("--config.a.b=v overrides need --config FILE")
        _print_plan(args, overrides) if args.config else _print_params(args)
    except errors.UserError as e:
        return errors.report("rre-params", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
