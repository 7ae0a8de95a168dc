"""The paper's setting (Kim & Seo 2024): LLaMA-7B AlpacaFarm SFT10k policy with LoRA, PPO against a
white-box proxy, Starling-RM-34B as gold RM, facebook/contriever as relevance encoder.

    rre-train --config configs/alpacafarm_rer.py:rer,v4-32 --workdir gs://bucket/rer \
        --config.model.path=/ckpt/sft10k --config.gold_rm.path=/ckpt/starling-rm-34b \
        --config.relevance.path=/ckpt/contriever --config.data.train_file=/data/alpacafarm_train.json

Argument: ``<reward>[,<mesh preset>]``. Rewards (docs/design.md 4.2): ``li``, ``li_rp``, ``qr_li_rp`` (R3 without
branching), ``rer`` (default), ``rer_random_qtype``, ``rer_predicted_qtype``; or ``sweep``: the paper's five
variants (``rre_jax.sweep.PAPER_PRESETS``) trained together as LoRA adapters over one frozen trunk, each member in
``<workdir>/<preset>-s<seed>`` (``--config.sweep.seeds=0,1,2`` adds seeds; ``--compile_only`` compiles it).
Mesh presets (``MESH_PRESETS``):
``cpu`` (default: all local devices on ``data``), ``v4-8``, ``v5e-8``, ``v4-32``, ``v5e-32``, ``gpu-8``.
Each preset's memory plan (``rre-params --config configs/alpacafarm_rer.py:rer,<preset>``; checked for every
preset by tests/test_memory_plan.py, and compiled for its TPU topology by XLA in docs/tpu_compile.md) fits the
chip: the PPO mini-batch (2 rows of 1024 tokens, on every device: a micro-batch smaller than the batch shards
is not split) keeps more activations for backward on LLaMA-7B than a 16 GiB chip holds beside the weights
(even with the default ``model.remat = 'dots'``, which recomputes attention and the elementwise ops; the plan
prints the bytes), so the 16 GiB TPU presets split heads and MLP over ``tensor`` = 2, and where the gold RM does
not fit beside the policy with room to spare (``v4-8``: XLA's sampler held 26.1 GiB per device with it, the plan
28.9 of a 28.8 GiB budget; ``v5e-8``: the plan fits with it, 2.2 GiB fuller) it is kept in host memory and
brought in for each scoring call only (``gold_rm.placement = 'host'``).
"""
import ml_collections

from rre_jax import reward, sweep
from rre_jax.configs import defaults

# name: (mesh shape (data, fsdp, tensor), gold RM placement, chip memory in GiB, TPU topology for
# --compile_only (rre_jax.aot: '<generation>:<chips per axis>'; v4 chips are one megacore device each))
MESH_PRESETS = {
    "cpu": ((-1, 1, 1), "device", 0, ""),
    "v4-8": ((1, 2, 2), "host", 32, "v4:2x2x1"),
    "v5e-8": ((1, 4, 2), "host", 16, "v5e:2x4"),
    "v4-32": ((1, 16, 1), "device", 32, "v4:2x2x4"),
    "v5e-32": ((1, 16, 2), "device", 16, "v5e:4x8"),
    "gpu-8": ((1, 8, 1), "device", 80, ""),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = (arg or "rer").split(",")
    reward_name, mesh_name = parts[0], (parts[1] if len(parts) > 1 else "cpu")
    if reward_name != "sweep":
        reward.preset(reward_name)  # validates the name early, with the list of choices
    if mesh_name not in MESH_PRESETS:
        raise KeyError(f"unknown mesh preset {mesh_name!r}; choose one of {sorted(MESH_PRESETS)}")
    shape, placement, chip_gib, topology = MESH_PRESETS[mesh_name]

    config = defaults.base_config()
    config.name = f"alpacafarm_{reward_name}"
    if reward_name == "sweep":
        config.sweep.presets = sweep.PAPER_PRESETS
    config.reward.preset = "rer" if reward_name == "sweep" else reward_name
    config.model.path = ""  # AlpacaFarm SFT10k LLaMA-7B (HF layout); required
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16"
    # The nominal LoRA dropout 0.05 (and value-head dropout 0.1) were inactive in the reference: trl 0.7.4
    # runs every PPO forward pass after model.eval(). Set model.lora.dropout to train with dropout on.
    config.model.lora.dropout = 0.0
    config.relevance.path = ""  # facebook/contriever
    config.gold_rm.path = ""  # Nexusflow/Starling-RM-34B
    config.gold_rm.tokenizer = ""  # 01-ai/Yi-34B-Chat tokenizer
    config.gold_rm.layout = "starling"
    config.gold_rm.placement = placement
    config.data.train_file = ""  # AlpacaFarm unlabeled split with qtype
    config.data.dev_file = ""  # e.g. alpacafarm_val.json of the paper's data/ folder
    config.mesh.shape = shape
    config.mesh.topology = topology
    config.mesh_preset = mesh_name
    config.plan = defaults.plan_section("llama-7b", "yi-34b", chip_gib)
    config.train.steps = 5000
    config.train.save_freq = 500
    return config
