"""Tiny random Hugging Face checkpoints for parity tests, written with transformers' own save_pretrained.

Every parameter (norm scales and biases included) is perturbed away from its init, so a weight that a
loader maps wrongly -- or leaves at its init -- shows up in the logits.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers
from torch import nn

torch.set_num_threads(1)

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1,
            bos_token_id=None, eos_token_id=None, pad_token_id=0)

VARIANTS = {
    "llama_mha": ("llama", {}),
    "llama_gqa": ("llama", {"num_key_value_heads": 2}),
    "llama3_rope": ("llama", {"num_key_value_heads": 2, "rope_theta": 500000.0,
                              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "linear_rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "tied": ("llama", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "llama_bias": ("llama", {"attention_bias": True}),
    "mistral": ("mistral", {"num_key_value_heads": 2, "sliding_window": 4096, "head_dim": 16}),
    "qwen2": ("qwen2", {"num_key_value_heads": 2, "use_sliding_window": False}),
}

_CONFIGS = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config}


def hf_config(variant: str = "llama_gqa", **overrides):
    model_type, extra = VARIANTS[variant]
    return _CONFIGS[model_type](**{**BASE, **extra, **overrides})


def _perturb(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def causal_lm(variant: str = "llama_gqa", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(variant, **overrides))
    return _perturb(model, seed).float()


def seq_cls(num_labels: int = 1, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = hf_config("llama_gqa", num_labels=num_labels, **overrides)
    return _perturb(transformers.LlamaForSequenceClassification(cfg), seed).float()


class LlamaRewardModel(transformers.PreTrainedModel):
    """Starling-RM-34B's reward class, as on its model card: ``transformer`` = LlamaModel, ``v_head`` no
    bias, reward at ``hidden_states[-1]`` (output_hidden_states) at the position before the first PAD 0."""

    config_class = transformers.LlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.transformer = transformers.LlamaModel(config)
        self.v_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.PAD_ID = 0
        self.post_init()

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None):
        transformer_outputs = self.transformer(input_ids, attention_mask=attention_mask,
                                               position_ids=position_ids, output_hidden_states=True)
        hidden_states = transformer_outputs.hidden_states[-1]
        scores = []
        rewards = self.v_head(hidden_states).squeeze(-1)
        bs = int(input_ids.shape[0])
        for i in range(bs):
            c_inds = (input_ids[i] == self.PAD_ID).nonzero()
            c_ind = c_inds[0].item() if len(c_inds) > 0 else input_ids.shape[1]
            scores.append(rewards[i, c_ind - 1])
        scores = torch.stack(scores)
        return {"scores": scores, "last_hidden_state": transformer_outputs.last_hidden_state,
                "hidden_states": transformer_outputs.hidden_states}


def starling(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return _perturb(LlamaRewardModel(hf_config("llama_gqa", **overrides)), seed).float()


def save(model, directory, max_shard_size=None):
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(directory), safe_serialization=True, **kw)
    return str(directory)


def left_padded(seed, B, T, vocab, pads):
    """(ids, mask) int32 [B, T]: random ids in 1..vocab-1, row b left-padded (id 0, mask 0) with pads[b] slots."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (B, T))
    mask = np.ones((B, T), np.int32)
    for b, n in enumerate(pads):
        ids[b, :n], mask[b, :n] = 0, 0
    return ids.astype(np.int32), mask
