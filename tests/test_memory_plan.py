"""Memory plans (``rre_jax.memory.plan``, ``rre-params --config``): every shipped preset fits its chip, and the
figures agree with closed forms computed here by hand from the architectures' published shapes."""
import math
import os
import subprocess
import sys

import pytest

from rre_jax import memory, topology
from rre_jax.configs import alpacafarm_rer, tiny

GIB = 2**30
TPU_PRESETS = [name for name, (_, _, chip, _) in alpacafarm_rer.MESH_PRESETS.items() if chip]
LLAMA_7B_PARAMS = 6_738_415_616  # LLaMA-7B with an untied lm_head (the HF checkpoint's parameter count)
YI_34B_PARAMS = 34_388_917_248 - 64000 * 7168 + 7168  # Yi-34B minus its lm_head, plus a 1-output score head


@pytest.fixture(scope="module")
def plans():
    return {name: memory.plan(alpacafarm_rer.get_config(f"rer,{name}")) for name in TPU_PRESETS}


@pytest.mark.parametrize("name", TPU_PRESETS)
def test_every_tpu_and_gpu_preset_fits(plans, name):
    p = plans[name]
    assert p.fits, p.table()
    assert p.devices == math.prod(alpacafarm_rer.MESH_PRESETS[name][0])
    assert p.peak <= memory.HEADROOM * p.chip_bytes and "fits" in p.table().splitlines()[-1]


def test_closed_forms_on_v4_32(plans):
    """v4-32: mesh (1, 16, 1), bf16; every line against arithmetic on the architecture."""
    p, fsdp = plans["v4-32"], 16
    assert p.lines["policy params"] == pytest.approx(LLAMA_7B_PARAMS * 2 / fsdp, rel=1e-3)
    assert p.lines["gold RM params"] == pytest.approx(YI_34B_PARAMS * 2 / fsdp, rel=1e-3)
    lora_params = 32 * 2 * (4096 * 8 + 8 * 4096)  # r=8 on q_proj, v_proj of 32 layers
    assert lora_params == 4_194_304
    # LoRA A (embed x r) splits over fsdp, B (r x out) does not; value head (4096 + 1) replicated
    lora_bytes = 32 * 2 * (4096 * 8 // fsdp + 8 * 4096) * 2
    assert p.lines["trainable (LoRA + value head)"] == lora_bytes + 4097 * 2
    # Adam: two moments per trainable value, in the trainable dtype (plus step counters)
    assert p.lines["optimizer state"] == pytest.approx(2 * p.lines["trainable (LoRA + value head)"], rel=1e-3)
    # 16 rollout rows over 16 batch shards: 1 row x (512 + 512) slots x 32 kv heads x 128 x (k, v) x 32 layers
    assert p.lines["kv cache (rollout)"] == pytest.approx(1 * 1024 * 32 * 128 * 2 * 32 * 2, rel=1e-3)
    # BERT-base without pooler, float32, whole on one device of each of v4-32's 4 hosts (relevance.encoder_mesh:
    # a multi-host run's encoder runs on one of its host's devices; XLA's relevance program on v4 2x2x4 takes
    # 0.41 GiB of arguments, docs/tpu_compile.md)
    assert p.lines["relevance encoder (float32)"] == 4 * 108_891_648
    # the decode loop's per-layer copy of this device's weight shards (the stacked layers split once per call;
    # weight-stationary: nothing is gathered)
    assert p.lines["decode weights (per-layer copy)"] == p.lines["policy params"]
    assert p.host_bytes == 0


def test_activations_are_the_backward_residuals(plans):
    """The update's saved activations scale with rows and shrink under tensor parallelism, and for LLaMA-7B
    at 1 x 1024 tokens exceed the residual stream alone (32 layers x 1024 x 4096 bf16)."""
    cfg = alpacafarm_rer.get_config("rer,v4-32")
    spec = memory.policy.PolicySpec(memory.llama.LlamaConfig(**memory.PRESETS["mid"]), "lora",
                                    memory.lora_lib.LoraConfig(rank=8, alpha=16.0, dropout=0.0))
    one, two = (memory.update_activation_bytes(spec, rows, 64, 64) for rows in (1, 2))
    assert two == pytest.approx(2 * one, rel=1e-3)  # all but a few row-independent tables (rope, masks)
    assert memory.update_activation_bytes(spec, 1, 64, 64, tensor=2) < one
    act = plans["v4-32"].lines["activations (update micro-batch)"]
    assert act > 2 * 32 * 1024 * 4096 * 2 and act < 28 * GIB
    # 2 rows over 16 batch shards are not split: XLA keeps both rows on every device (its memory report of the
    # compiled update, docs/tpu_compile.md), and the plan counts both
    assert int(cfg.ppo.mini_batch_size) == 2
    spec7 = memory.policy.PolicySpec(memory.llama.LlamaConfig(**memory.PRESETS["llama-7b"], dtype="bfloat16",
                                                              param_dtype="bfloat16"),
                                     "lora", memory.lora_lib.LoraConfig.from_config(cfg.model.lora), remat="dots")
    assert act == memory.update_activation_bytes(spec7, 2, 512, 512)


def test_gold_rm_on_host_keeps_v5e_8_its_margin():
    """v5e-8 keeps the gold RM (7.9 GiB per device) in host memory. Since the update keeps no attention scores for
    its backward pass (``model.remat = 'dots'``), the plan would fit with the gold RM on the device too, but with
    more than 2 GiB less room than on the host (it did not fit at all while the scores were kept)."""
    cfg = alpacafarm_rer.get_config("rer,v5e-8")
    on_host = memory.plan(cfg)
    assert cfg.gold_rm.placement == "host" and on_host.fits
    cfg.gold_rm.placement = "device"
    on_device = memory.plan(cfg)
    assert on_device.fits and on_device.peak > on_host.peak + 2 * GIB, (on_host.table(), on_device.table())


def test_remat_dots_cuts_the_update_activations_in_the_plan():
    """The plan traces the update's backward with the configured remat policy (LLaMA-7B, 2 rows: 23 -> 14 GiB)."""
    act = {}
    for remat in ("none", "dots", "full"):
        cfg = alpacafarm_rer.get_config("rer,v4-32")
        cfg.model.remat = remat
        act[remat] = memory.plan(cfg).lines["activations (update micro-batch)"]
    assert act["full"] < act["dots"] < 0.7 * act["none"], act


def test_cpu_and_tiny_plans_say_the_chip_is_unknown():
    for cfg in (alpacafarm_rer.get_config("li,cpu"), tiny.get_config()):
        p = memory.plan(cfg, num_devices=8)
        assert p.fits is None and p.devices == 8 and "chip memory unknown" in p.table()


def test_unknown_architecture_is_a_clear_error():
    cfg = alpacafarm_rer.get_config("rer,v4-8")
    cfg.plan.policy = "llama-70b"
    with pytest.raises(ValueError, match=r"config.plan.policy='llama-70b'.*llama-7b"):
        memory.plan(cfg)


def test_cli_prints_the_plan():
    """``rre-params --config`` of a TPU preset prints the plan, and nothing else: no accelerator is probed (with
    the test extra's libtpu installed, a probe on this CPU host prints libtpu's start-up warnings)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # as a user's shell has it
    done = subprocess.run([sys.executable, "-m", "rre_jax.cli.params", "--config",
                           "configs/alpacafarm_rer.py:rer,v5e-8"], capture_output=True, text=True, check=True,
                          cwd=memory.__file__.rsplit("/rre_jax/", 1)[0], env=env)
    for line in ("policy params", "optimizer state", "kv cache (rollout)", "activations (update micro-batch)",
                 "host memory: gold RM", "fits"):
        assert line in done.stdout, done.stdout
    assert done.stderr == "", done.stderr


def test_full_mode_shared_critic_holds_one_trunk_copy_less():
    """config.model.critic='shared' (trl 0.7.4's layout) trains one policy copy + value head; 'separate' adds a
    second trunk copy, and its Adam moments: the plan differs by those bytes."""
    plans = {}
    for critic in ("separate", "shared"):
        cfg = alpacafarm_rer.get_config("rer,v4-32")
        cfg.model.train_mode, cfg.model.critic = "full", critic
        plans[critic] = memory.plan(cfg)
    sep, shared = plans["separate"], plans["shared"]
    params = sep.lines["policy params"]
    assert "trainable (policy + value head)" in shared.lines and "trainable (policy + critic)" in sep.lines
    extra = sep.lines["trainable (policy + critic)"] - shared.lines["trainable (policy + value head)"]
    assert extra == params  # the critic's trunk copy (the value head is in both)
    assert sep.lines["optimizer state"] - shared.lines["optimizer state"] == 2 * params  # Adam mu + nu


def test_the_relevance_encoder_is_planned_where_the_run_places_it():
    """One host (v4-8: 4 devices) shards the encoder over the run's mesh; several hosts (v5e-8 as the compiler
    describes it: 2 hosts of 4 chips; v5e-32: 8) hold it whole on one device of each, as relevance.encoder_mesh
    places it, so the plan's sampler follows XLA's within 12% (it was 17-20% low on the v5e presets)."""
    whole = 4 * 108_891_648
    assert [topology.hosts(t) for t in ("v4:2x2x1", "v4:2x2x4", "v5e:2x2", "v5e:2x4", "v5e:4x8")] == [1, 4, 1, 2, 8]
    lines = {n: memory.plan(alpacafarm_rer.get_config(f"rer,{n}")).lines["relevance encoder (float32)"]
             for n in ("v4-8", "v5e-8", "v5e-32")}
    assert lines["v5e-8"] == lines["v5e-32"] == whole
    assert lines["v4-8"] == pytest.approx(whole / 4, rel=2e-2)  # matrices over fsdp 2 x tensor 2; biases whole
