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
    """Every field a run reads, section by section, with the paper's settings as defaults."""
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.seed = 0
    # Policy: an HF checkpoint directory (Llama / Mistral / Qwen2 layout).
    c.model = _model()
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # default: model.path
    c.data = _data()  # prompts (docs/design.md 4.1)
    c.reward = _reward()  # white-box proxy reward (docs/design.md 4.2)
    c.relevance = _relevance()
    c.gold_rm = _gold_rm()  # gold reward model (docs/design.md 4.3): scores dev / eval rollouts only
    c.sampling = _sampling()  # training rollouts
    c.ppo = _ppo()  # docs/design.md 4.4; trl 0.7.4 semantics
    # Critic-free group methods (rre_jax.grpo; trl 1.16.0's GRPOTrainer / RLOOTrainer). algo: ppo | grpo | rloo.
    # ppo.batch_size then counts responses (batch_size / num_generations prompts per step); ppo.mini_batch_size,
    # gradient_accumulation_steps, learning_rate and max_grad_norm set the update; the other ppo fields are unused.
    c.algo = "ppo"
    c.group = _group()
    c.sweep = _sweep()  # rre_jax.sweep: reward presets x seeds as LoRA runs over one frozen trunk
    c.train = _train()  # the run
    c.mesh = _mesh()
    c.distributed = _distributed()
    c.logging = _logging()
    return c


def _model() -> ml_collections.ConfigDict:
    """The policy checkpoint, its dtypes, what the update trains and remats, LoRA."""
    s = ml_collections.ConfigDict()
    s.path = ""
    s.dtype = "float32"  # compute dtype: float32 | bfloat16
    s.param_dtype = "float32"
    s.tiny = ml_collections.ConfigDict()  # used only when path is empty (configs/tiny.py)
    # True (configs/tiny.py only): with path empty, build a tiny policy, tokenizer and random gold RM in
    # <workdir>/assets and train on the bundled toy prompts. False: an empty path or train_file is an error.
    s.build_tiny = False
    s.sft_steps = 0  # tiny policy warm start
    # lora: train LoRA adapters + value head on the shared trunk; the reference is the same network with
    # adapters off.  full: train every weight; the reference is a frozen copy of the initial policy.
    s.train_mode = "lora"
    # full mode's value head: 'separate' (a critic with its own trunk copy) or 'shared' (on the policy trunk,
    # as trl 0.7.4's AutoModelForCausalLMWithValueHead; half the weights). LoRA always shares the trunk.
    s.critic = "separate"
    # What the PPO update's backward pass keeps of each layer: 'dots' (the projections' outputs; attention,
    # norms, RoPE, softmax and SiLU are recomputed: less memory at about the same speed), 'none' (everything) or
    # 'full' (layer inputs only; recomputes each layer, a third more update work, least memory).
    s.remat = "dots"
    s.lora = ml_collections.ConfigDict()
    s.lora.rank = 8
    s.lora.alpha = 16.0
    s.lora.dropout = 0.0  # paper config: 0.05, inactive in trl's eval-mode forward passes
    s.lora.targets = ("q_proj", "v_proj")
    return s


def _data() -> ml_collections.ConfigDict:
    """Prompt files, their format and the prompt-length limit and bucketing."""
    s = ml_collections.ConfigDict()
    s.source = "json"  # json (JSON / JSONL files) | tfds (array_record builders)
    s.train_file = ""
    s.dev_file = ""
    s.tfds_dir = ""
    s.max_prompt_length = 512
    s.bucket = 64
    s.missing_qtype = "OPENENDED"  # OPENENDED | CONSTRAINED (filled in, counted, logged) | error
    s.shuffle_seed = 0
    return s


def _reward() -> ml_collections.ConfigDict:
    """The training proxy, the counterfactual proxies scored beside it, the stop-string cut."""
    s = ml_collections.ConfigDict()
    s.preset = "rer"  # li | li_rp | qr_li_rp | rer | rer_random_qtype | rer_predicted_qtype
    s.counterfactual = ("li", "li_rp", "qr_li_rp", "rer")
    s.stop_strings = ("### Instruction:", "### Response:", "\n\n\n\n", "\n\n--", "\n\n____")
    s.cut_at_stop = True  # False reproduces the reference's no-op post-processing
    # what QR / AR embed: 'response' (the response as sampled, the paper's) or 'cut' (cut at its first stop string)
    s.relevance_text = "response"
    s.baseline = 0.0
    return s


def _relevance() -> ml_collections.ConfigDict:
    """The relevance encoder of the QR and AR features."""
    s = ml_collections.ConfigDict()
    s.path = ""  # BERT checkpoint dir (facebook/contriever), or "minilm" for the packaged MiniLM
    s.max_length = 512
    return s


def _gold_rm() -> ml_collections.ConfigDict:
    """The gold reward model, its tokenizer, layout, batching and placement."""
    s = ml_collections.ConfigDict()
    s.path = ""
    s.tokenizer = ""  # default: gold_rm.path
    s.layout = "auto"  # auto | starling | hf_score
    s.max_length = 2048
    s.batch_size = 4
    s.placement = "device"  # device | host (brought in for eval only)
    return s


def _sampling() -> ml_collections.ConfigDict:
    """The sampler of the training rollouts."""
    s = ml_collections.ConfigDict()
    s.temperature = 1.0
    s.top_k = 0
    s.top_p = 1.0
    s.max_new_tokens = 512
    return s


def _ppo() -> ml_collections.ConfigDict:
    """PPO's batch, epochs, optimiser, clipping, KL controller and score scaling."""
    s = ml_collections.ConfigDict()
    s.batch_size = 16
    s.mini_batch_size = 2
    s.gradient_accumulation_steps = 4
    s.ppo_epochs = 4
    s.learning_rate = 1e-5
    s.max_grad_norm = 1.0
    s.gamma = 1.0
    s.lam = 0.95
    s.cliprange = 0.2
    s.cliprange_value = 0.2
    s.vf_coef = 1.0
    s.ratio_threshold = 10.0
    s.adaptive_kl = True
    s.init_kl_coef = 0.2
    s.kl_target = 6.0
    s.kl_horizon = 10000.0
    s.kl_penalty = "kl"
    s.use_score_scaling = True
    s.use_score_norm = True
    s.score_clip = 10.0
    s.whiten_rewards = False
    return s


def _group() -> ml_collections.ConfigDict:
    """GRPO / RLOO: responses per prompt, KL, clipping, scaling, loss."""
    s = ml_collections.ConfigDict()
    s.num_generations = 4  # G responses per prompt
    s.beta = 0.0  # KL coefficient (trl GRPO's default; trl RLOO's is 0.05); 0: no reference pass
    s.epsilon_low = 0.2
    s.epsilon_high = 0.2  # DAPO recommends 0.28
    s.scale_rewards = "group"  # grpo: group | batch | none
    s.loss_type = "dapo"  # grpo: grpo | bnpo | dr_grpo | dapo
    s.num_iterations = 1  # passes over each batch with frozen old log-probs
    s.normalize_advantages = False  # rloo
    return s


def _sweep() -> ml_collections.ConfigDict:
    """A sweep (``rre_jax.sweep``): one member per reward preset and seed, trained together over one frozen trunk."""
    s = ml_collections.ConfigDict()
    s.presets = ()  # empty: a single run; e.g. ('li', 'li_rp', 'qr_li_rp', 'rer', 'rer_random_qtype')
    s.seeds = ()  # empty: (config.seed,)
    # Members per pass of the update: 1 (one after another: one member's activations at a time), n (n at a time),
    # 0 (all together): more members per pass, fewer passes and more activations alive at once.
    s.update_members = 1
    return s


def _train() -> ml_collections.ConfigDict:
    """Steps, checkpoint cadence, dev-set size, the final export."""
    s = ml_collections.ConfigDict()
    s.steps = 5000
    s.save_freq = 500
    s.max_to_keep = 0  # 0: keep every checkpoint (monotonicity needs them)
    s.dev_size = 64
    s.export_final = True
    return s


def _mesh() -> ml_collections.ConfigDict:
    """The device mesh's shape, logical rules, devices and TPU topology."""
    s = ml_collections.ConfigDict()
    s.shape = (-1, 1, 1)
    s.rules = tuple(mesh_lib.DEFAULT_RULES)
    s.num_devices = 0  # 0: every device; n: the first n (e.g. a 1-device run on an 8-device host)
    s.topology = ""  # TPU slice for --compile_only, e.g. 'v5e:2x4'; empty: the local devices
    return s


def _distributed() -> ml_collections.ConfigDict:
    """jax.distributed set-up of a multi-process run."""
    s = ml_collections.ConfigDict()
    s.initialize = False  # jax.distributed.initialize() (TPU pods, multi-node GPU)
    s.coordinator_address = ""
    s.num_processes = 0
    s.process_id = -1
    return s


def _logging() -> ml_collections.ConfigDict:
    """Experiment tracking beside metrics.jsonl and TensorBoard (rre_jax.tracking)."""
    s = ml_collections.ConfigDict()
    s.wandb = False  # True: log to Weights & Biases too (pip install 'rre_jax[wandb]')
    s.wandb_project = "rre_jax"
    s.wandb_entity = ""  # '': the API key's default entity
    s.wandb_name = ""  # '': <config.name>-<workdir base name>
    s.wandb_tags = ()
    s.wandb_mode = ""  # '' (WANDB_MODE, else online) | online | offline | disabled
    return s


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


def plan_section(policy: str, gold_rm: str, chip_memory_gib: float) -> ml_collections.ConfigDict:
    """What ``rre-params --config`` and ``--compile_only`` need beyond the run's fields when the checkpoint
    directories are not on the machine: the architectures (names in ``rre_jax.memory.PRESETS``, or checkpoint
    directories; empty: model.path / gold_rm.path), the chip's memory (0: unknown, e.g. CPU), and the policy
    tokenizer's facts the programs are built with (``eos_id``, ``pad_id`` and its longest token in UTF-8 bytes:
    the LLaMA tokenizer's eos 2 and pad 0; read from the tokenizer itself whenever its directory exists)."""
    return ml_collections.ConfigDict({"policy": policy, "gold_rm": gold_rm, "chip_memory_gib": chip_memory_gib,
                                      "eos_id": 2, "pad_id": 0, "max_token_bytes": 16})
