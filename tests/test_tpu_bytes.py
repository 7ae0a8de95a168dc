"""The bytes a decode step and a PPO micro-batch move through HBM, compiled by XLA's TPU compiler (libtpu) for a v5e
2x2 topology on this CPU host and accounted op by op (``rre_jax.hlo_account``), against the floors from their shapes
(``rre_jax.memory.decode_floor`` / ``update_floor``).

The model is the tiny config's (2 layers, bfloat16 as the TPU presets) with LLaMA-7B's layer widths: a tiny
model's weights and cache fit in the TensorCore's 128 MiB of VMEM and never touch HBM inside the loop, so its
bytes could not fail; at these widths a device's 200 MB of weights stream from HBM at every step, as in the paper's
setting. The update runs the paper's lengths (512 + 512 tokens), where attention's scores outgrow VMEM."""
import dataclasses
import json

import pytest

from rre_jax import aot, hlo_account, memory, mesh as mesh_lib, policy, ppo, programs, run_spec
from rre_jax.configs import tiny as tiny_config
from rre_jax.models import llama

pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is part of the test extra")

TOPOLOGY, MESH = "v5e:2x2", (1, 2, 2)
WIDE = dict(vocab_size=2048, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
            num_attention_heads=32, num_key_value_heads=32)  # LLaMA-7B's layers, two of them


def _run(tmp_path, prompt: int, new: int):
    (tmp_path / "config.json").write_text(json.dumps(llama.LlamaConfig(**WIDE).to_hf()))
    cfg = tiny_config.get_config()
    cfg.plan.policy, cfg.model.dtype, cfg.model.param_dtype = str(tmp_path), "bfloat16", "bfloat16"
    cfg.data.max_prompt_length, cfg.data.bucket, cfg.sampling.max_new_tokens = prompt, prompt, new
    cfg.mesh.shape, cfg.mesh.topology = MESH, TOPOLOGY
    mesh, devices = aot.mesh_for(mesh_lib.MeshConfig.from_config(cfg.mesh), TOPOLOGY)
    spec = run_spec.validate(cfg, num_devices=len(devices), files=False)
    lay = programs.Layout(mesh, spec.mesh.rules)
    pcfg = dataclasses.replace(llama.LlamaConfig(**WIDE), dtype=spec.dtype, param_dtype=spec.param_dtype)
    return spec, lay, pcfg, dict(mesh.shape)


def test_decode_step_moves_its_floor_and_writes_only_its_new_slots(tmp_path):
    """One step of the sampler's decode loop reads at most 1.3x the floor from HBM (its weight shards, LoRA, its
    share of the KV cache) and writes at most 1.3x its new key / value slots and one token's activations: the
    cache is updated in place. (Per-layer cache buffers made XLA bring whole buffers on chip and write them back
    at every step: 42 MB per step here, 1.8 GB on v4-8.)"""
    spec, lay, pcfg, shape = _run(tmp_path, 96, 48)
    B, T, N = spec.ppo.batch_size, 96, spec.sampling.max_new_tokens
    exe = programs.build_sampler(lay, pcfg, spec.sampling, 2, 0, spec.lora, B, T).compile()
    rows = hlo_account.account(exe.as_text())
    step = hlo_account.totals(hlo_account.iteration(rows, hlo_account.loop_of(rows, N)))
    floor = memory.decode_floor(pcfg, spec.lora, B, T + N, shape, lay.rules)
    assert floor["weights"] > 150e6, floor  # the weights stream: more than VMEM holds
    assert step["hbm"] <= 1.3 * sum(floor.values()), (step, floor)
    writes = floor["kv slots written"] + floor["activations (one token)"]
    assert step["hbm_written"] <= 1.3 * writes, (step["hbm_written"], writes)


def test_update_micro_batch_moves_its_floor(tmp_path):
    """One PPO micro-batch of 512 + 512 tokens moves at most 1.3x its floor through HBM: the weights read by the
    forward and the backward pass, the activations the backward pass keeps (written and read once), the gradients
    and the optimizer step. One row on two batch shards: as the presets' 2 rows on 4 to 16, the micro-batch is not
    split over the devices and the matmuls split their contraction instead (no weight is gathered). (Saving every
    layer's float32 attention scores, and computing them whole, sent them through HBM several times: 6.4x the
    floor on v5e-8.)"""
    spec, lay, pcfg, shape = _run(tmp_path, 512, 512)
    M = 1
    pc = dataclasses.replace(spec.ppo, mini_batch_size=M, gradient_accumulation_steps=1)
    pspec = policy.PolicySpec(pcfg, spec.mode, spec.lora, spec.critic, spec.remat, mesh=lay.mesh, rules=lay.rules)
    frozen, _ = programs.llama_params(pcfg)
    algo = ppo.PPO(pc)
    st = programs.state_layout(lay, pspec, algo, pc, frozen)
    exe = programs.build_update(lay, pspec, algo, st, pc.batch_size, 512, 512).compile()
    rows = hlo_account.account(exe.as_text())
    micro = hlo_account.iteration(rows, hlo_account.loop_of(rows, pc.ppo_epochs * pc.batch_size // M, nested=True))
    got = hlo_account.totals(micro)
    trainable, opt = (aot.device_bytes(st.target()[k]) for k in ("trainable", "opt_state"))
    floor = memory.update_floor(pspec, M, 512, 512, shape, lay.rules, trainable, opt, 1)
    assert got["hbm"] <= 1.3 * sum(floor.values()), (got, floor)
