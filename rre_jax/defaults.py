"""The base ml-collections config: every field a run reads, with the paper's settings as defaults.

``configs/*.py`` start from ``base_config()`` and change what differs, so a field that is not here does not
exist: ``--config.ppo.lrr=1`` fails at parse time with the list of valid keys (the config is locked).
Each section is turned into a frozen, validated dataclass by the module that owns it before anything is
compiled (``ppo`` -> ``rre_jax.ppo.PPOConfig``, ``reward`` -> ``rre_jax.reward.RewardSpec``, ...).
"""
from __future__ import annotations

import ml_collections

from rre_jax import mesh as mesh_lib


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.seed = 0

    # Policy: an HF checkpoint directory (Llama / Mistral / Qwen2 layout).
    c.model = ml_collections.ConfigDict()
    c.model.path = ""
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.param_dtype = "float32"
    c.model.tiny = ml_collections.ConfigDict()  # used only when path is empty (configs/tiny.py)
    # True (configs/tiny.py only): with path empty, build a tiny policy, tokenizer and random gold RM in
    # <workdir>/assets and train on the bundled toy prompts. False: an empty path or train_file is an error.
    c.model.build_tiny = False
    c.model.sft_steps = 0  # tiny policy warm start
    # lora: train LoRA adapters + value head on the shared trunk; the reference is the same network with
    # adapters off.  full: train every weight; the reference is a frozen copy of the initial policy.
    c.model.train_mode = "lora"
    # full mode's value head: 'separate' (a critic with its own trunk copy) or 'shared' (on the policy trunk,
    # as trl 0.7.4's AutoModelForCausalLMWithValueHead; half the weights). LoRA always shares the trunk.
    c.model.critic = "separate"
    # What the PPO update's backward pass keeps of each layer: 'dots' (matmul outputs; norms, RoPE, softmax
    # and SiLU are recomputed: less memory at about the same speed), 'none' (everything) or 'full' (layer
    # inputs only; recomputes each layer, a third more update work, least memory).
    c.model.remat = "dots"
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 8
    c.model.lora.alpha = 16.0
    c.model.lora.dropout = 0.0  # paper config: 0.05, inactive in trl's eval-mode forward passes
    c.model.lora.targets = ("q_proj", "v_proj")
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # default: model.path

    # Prompts (docs/design.md 4.1).
    c.data = ml_collections.ConfigDict()
    c.data.source = "json"  # json (JSON / JSONL files) | tfds (array_record builders)
    c.data.train_file = ""
    c.data.dev_file = ""
    c.data.tfds_dir = ""
    c.data.max_prompt_length = 512
    c.data.bucket = 64
    c.data.missing_qtype = "OPENENDED"  # OPENENDED | CONSTRAINED (filled in, counted, logged) | error
    c.data.shuffle_seed = 0

    # White-box proxy reward (docs/design.md 4.2).
    c.reward = ml_collections.ConfigDict()
    c.reward.preset = "rer"  # li | li_rp | qr_li_rp | rer | rer_random_qtype | rer_predicted_qtype
    c.reward.counterfactual = ("li", "li_rp", "qr_li_rp", "rer")
    c.reward.stop_strings = ("### Instruction:", "### Response:", "\n\n\n\n", "\n\n--", "\n\n____")
    c.reward.cut_at_stop = True  # False reproduces the reference's no-op post-processing
    c.reward.baseline = 0.0
    c.relevance = ml_collections.ConfigDict()
    c.relevance.path = ""  # BERT checkpoint dir (facebook/contriever), or "minilm" for the packaged MiniLM
    c.relevance.max_length = 512

    # Gold reward model (docs/design.md 4.3): scores dev / eval rollouts only.
    c.gold_rm = ml_collections.ConfigDict()
    c.gold_rm.path = ""
    c.gold_rm.tokenizer = ""  # default: gold_rm.path
    c.gold_rm.layout = "auto"  # auto | starling | hf_score
    c.gold_rm.max_length = 2048
    c.gold_rm.batch_size = 4
    c.gold_rm.placement = "device"  # device | host (brought in for eval only)

    # Sampling (training rollouts).
    c.sampling = ml_collections.ConfigDict()
    c.sampling.temperature = 1.0
    c.sampling.top_k = 0
    c.sampling.top_p = 1.0
    c.sampling.max_new_tokens = 512

    # PPO (docs/design.md 4.4; trl 0.7.4 semantics).
    c.ppo = ml_collections.ConfigDict()
    c.ppo.batch_size = 16
    c.ppo.mini_batch_size = 2
    c.ppo.gradient_accumulation_steps = 4
    c.ppo.ppo_epochs = 4
    c.ppo.learning_rate = 1e-5
    c.ppo.max_grad_norm = 1.0
    c.ppo.gamma = 1.0
    c.ppo.lam = 0.95
    c.ppo.cliprange = 0.2
    c.ppo.cliprange_value = 0.2
    c.ppo.vf_coef = 1.0
    c.ppo.ratio_threshold = 10.0
    c.ppo.adaptive_kl = True
    c.ppo.init_kl_coef = 0.2
    c.ppo.kl_target = 6.0
    c.ppo.kl_horizon = 10000.0
    c.ppo.kl_penalty = "kl"
    c.ppo.use_score_scaling = True
    c.ppo.use_score_norm = True
    c.ppo.score_clip = 10.0
    c.ppo.whiten_rewards = False

    # Critic-free group methods (rre_jax.grpo; trl 1.16.0's GRPOTrainer / RLOOTrainer). algo: ppo | grpo | rloo.
    # ppo.batch_size then counts responses (batch_size / num_generations prompts per step); ppo.mini_batch_size,
    # gradient_accumulation_steps, learning_rate and max_grad_norm set the update; the other ppo fields are unused.
    c.algo = "ppo"
    c.group = ml_collections.ConfigDict()
    c.group.num_generations = 4  # G responses per prompt
    c.group.beta = 0.0  # KL coefficient (trl GRPO's default; trl RLOO's is 0.05); 0: no reference pass
    c.group.epsilon_low = 0.2
    c.group.epsilon_high = 0.2  # DAPO recommends 0.28
    c.group.scale_rewards = "group"  # grpo: group | batch | none
    c.group.loss_type = "dapo"  # grpo: grpo | bnpo | dr_grpo | dapo
    c.group.num_iterations = 1  # passes over each batch with frozen old log-probs
    c.group.normalize_advantages = False  # rloo

    # The run.
    c.train = ml_collections.ConfigDict()
    c.train.steps = 5000
    c.train.save_freq = 500
    c.train.max_to_keep = 0  # 0: keep every checkpoint (monotonicity needs them)
    c.train.dev_size = 64
    c.train.export_final = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)
    c.mesh.rules = tuple(mesh_lib.DEFAULT_RULES)
    c.mesh.num_devices = 0  # 0: every device; n: the first n (e.g. a 1-device run on an 8-device host)
    c.mesh.topology = ""  # TPU slice for --compile_only, e.g. 'v5e:2x4'; empty: the local devices
    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = False  # jax.distributed.initialize() (TPU pods, multi-node GPU)
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c


def tiny_model_config() -> ml_collections.ConfigDict:
    """Shape of the tiny Llama built by configs/tiny.py."""
    t = ml_collections.ConfigDict()
    t.vocab_size = 768  # the tiny tokenizer is trained to this size; the embedding follows the tokenizer
    t.hidden_size = 64
    t.intermediate_size = 176
    t.num_hidden_layers = 2
    t.num_attention_heads = 4
    t.num_key_value_heads = 2
    return t
