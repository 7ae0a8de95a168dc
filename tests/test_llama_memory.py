"""``rre-params``: parameter counts and per-device bytes of the presets, checked against hand counts."""
import json

from rre_jax import memory
from rre_jax.cli import params
from rre_jax.models import llama


def _hand_count(V, D, F, L, H, K, E, lm_head=True):
    per_layer = D * H * E + 2 * D * K * E + H * E * D + 3 * D * F + 2 * D
    return V * D * (2 if lm_head else 1) + L * per_layer + D


def test_llama7b_and_yi34b_counts_and_bytes(capsys):
    cfg = llama.LlamaConfig(**memory.PRESETS["llama-7b"], param_dtype="bfloat16")
    rep = memory.param_report(cfg, {"data": 8, "fsdp": 4, "tensor": 1})
    assert rep["params"] == _hand_count(32000, 4096, 11008, 32, 32, 32, 128) == 6_738_415_616
    norms = (2 * 32 + 1) * 4096
    assert rep["bytes_per_device"] == 2 * ((rep["params"] - norms) // 4 + norms)

    yi = llama.LlamaConfig(**memory.PRESETS["yi-34b"], param_dtype="bfloat16")
    rep = memory.param_report(yi, {"data": 1, "fsdp": 32, "tensor": 1}, head="score")
    n = _hand_count(64000, 7168, 20480, 60, 56, 8, 128, lm_head=False) + 7168  # + score head (D, 1)
    assert rep["params"] == n
    norms, score = (2 * 60 + 1) * 7168, 7168
    assert rep["bytes_per_device"] == 2 * ((n - norms - score) // 32 + norms + score // 32)

    assert params.main(["--model", "llama-7b", "--lora", "--mesh", "8,4,1"]) == 0
    out = capsys.readouterr().out
    assert "6.738B params" in out and "32 devices" in out and "LoRA r=8 on q_proj,v_proj: 4.19M params" in out


def test_config_json_and_bad_mesh(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", **memory.PRESETS["mid"]}))
    assert params.main(["--config-json", str(path), "--mesh", "1,1,1", "--dtype", "float32", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["params"] == _hand_count(32000, 512, 1408, 8, 8, 8, 64) and rep["bytes_per_device"] == 4 * rep["params"]
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert params.main(["--config-json", str(path)]) == 2
    assert "required field 'vocab_size' is missing" in capsys.readouterr().err
    assert params.main(["--model", "mid", "--mesh", "8,4"]) == 2  # a 2-entry mesh is rejected
    assert "three positive sizes" in capsys.readouterr().err
