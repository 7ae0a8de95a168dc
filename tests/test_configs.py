"""Every shipped config builds, validates, plans its memory, and its tiny variant trains one step.

The tiny variant of the paper config keeps everything that defines the run (reward preset, PPO settings and
batch sizes, LoRA, bf16, cut-at-stop, KL control) and swaps only what cannot run on a CPU in seconds: the
checkpoints (a tiny Llama policy and gold RM built here, the packaged MiniLM as relevance encoder), the prompt
files (the bundled tiny set), prompt/response lengths, the mesh (all local devices) and the step count.
"""
import dataclasses

import numpy as np
import pytest

from rre_jax import configs, memory, metrics, reward, run_spec, train
from rre_jax import config_loader as loader
from rre_jax.configs import alpacafarm_rer, tiny as tiny_config
from rre_jax.data import tiny_prompts_path

SHIPPED = configs.names()
ARGS = {"tiny": [None, *sorted(reward.PRESETS), "grpo", "li,rloo", "rloo,rer"],
        "alpacafarm_rer": [f"{r},{m}" for r in sorted(reward.PRESETS) for m in alpacafarm_rer.MESH_PRESETS]}


def test_every_shipped_config_is_covered():
    assert SHIPPED == sorted(ARGS), f"add the new config's variants to ARGS: {SHIPPED}"


def _get(name, arg):
    return loader.load(name + (f":{arg}" if arg else ""))


@pytest.mark.parametrize("name,arg", [(n, a) for n in ARGS for a in ARGS[n]])
def test_config_builds_validates_and_plans(name, arg):
    cfg = _get(name, arg)
    shape = tuple(cfg.mesh.shape)
    if -1 not in shape and np.prod(shape) > 8:  # a pod preset: validate all else here, its mesh by arithmetic
        assert int(cfg.ppo.batch_size) % (shape[0] * shape[1]) == 0
        cfg.mesh.shape = (-1, 1, 1)
    elif -1 not in shape:
        cfg.mesh.num_devices = int(np.prod(shape))  # its first n of the 8 CPU devices
    spec = run_spec.validate(cfg, files=False)  # the inputs a run reads are checked in test_user_errors.py
    assert spec.ppo.batch_size == int(cfg.ppo.batch_size) and spec.reward == dataclasses.replace(
        reward.preset(cfg.reward.preset), max_new_tokens=int(cfg.sampling.max_new_tokens))
    plan = memory.plan(_get(name, arg), num_devices=8)
    assert plan.peak > 0 and set(plan.lines) >= {"policy params", "optimizer state", "kv cache (rollout)",
                                                "activations (update micro-batch)"}
    if name == "alpacafarm_rer" and plan.chip_bytes:
        assert plan.fits, plan.table()


def test_paper_config_accepts_a_group_algorithm():
    """--config.algo=grpo on the paper config: 16 responses = 4 prompts x 4, the paper's update layout."""
    cfg = _get("alpacafarm_rer", "rer,cpu")
    cfg.algo = "grpo"
    spec = run_spec.validate(cfg, files=False)  # the config alone: the paper run's checkpoints are not here
    algo = spec.algorithm
    assert (algo.name, algo.prompts_per_step, algo.cfg.steps_per_iteration) == ("grpo", 4, 2)
    assert algo.cfg.max_completion_length == cfg.sampling.max_new_tokens


def test_wrong_config_arguments_name_the_choices():
    with pytest.raises(KeyError, match=r"at most one reward preset and one algorithm"):
        tiny_config.get_config("grpo,rloo")
    with pytest.raises(KeyError, match="unknown mesh preset 'v9-1'"):
        alpacafarm_rer.get_config("rer,v9-1")
    with pytest.raises(KeyError, match="unknown reward preset 'lirp'"):
        alpacafarm_rer.get_config("lirp")


def tiny_variant(cfg, assets):
    """The paper config on CPU: same run definition, tiny checkpoints and lengths (see module docstring)."""
    prompts = str(tiny_prompts_path())
    cfg.model.path, cfg.tokenizer.path = assets["policy"], assets["tokenizer"]
    cfg.gold_rm.path, cfg.gold_rm.tokenizer, cfg.gold_rm.layout = assets["gold_rm"], "", "auto"
    cfg.gold_rm.max_length = 256
    cfg.relevance.path = "minilm"
    cfg.data.train_file = cfg.data.dev_file = prompts
    cfg.data.max_prompt_length = cfg.data.bucket = 96
    cfg.sampling.max_new_tokens = 16
    cfg.mesh.shape = (-1, 1, 1)
    cfg.train.steps = cfg.train.save_freq = 1
    cfg.train.dev_size = 4
    cfg.train.export_final = False
    return cfg


def _one_step(cfg, workdir):
    last = train.run(cfg, str(workdir))
    rows = metrics.read_metrics(str(workdir))
    assert [r["step"] for r in rows] == [1, 1]  # the step, then its dev eval
    for key in ("reward/proxy", "reward/qr", "reward/ar", "ppo/loss/total", "objective/kl"):
        assert np.isfinite(last[key]), key
    assert np.isfinite(rows[1]["eval/gold"])
    assert (workdir / "checkpoints" / "1").is_dir()
    return {k: v for k, v in rows[0].items() if not k.startswith(("time/", "compile/"))}


def _tiny(assets):
    cfg = _get("tiny", None)
    cfg.model.path, cfg.tokenizer.path, cfg.gold_rm.path = assets["policy"], assets["tokenizer"], assets["gold_rm"]
    cfg.data.train_file = cfg.data.dev_file = str(tiny_prompts_path())
    cfg.train.steps = cfg.train.save_freq = 1
    cfg.train.dev_size, cfg.train.export_final = 4, False
    return cfg


@pytest.fixture(scope="module")
def tiny_step(assets, tmp_path_factory):
    return _one_step(_tiny(assets), tmp_path_factory.mktemp("tiny_step"))


def test_tiny_config_runs_one_step(tiny_step):
    assert tiny_step["step"] == 1


def test_paper_config_tiny_variant_runs_one_step(assets, tmp_path):
    cfg = tiny_variant(_get("alpacafarm_rer", "rer,cpu"), assets)
    assert (cfg.ppo.batch_size, cfg.ppo.mini_batch_size, cfg.ppo.gradient_accumulation_steps, cfg.ppo.ppo_epochs,
            cfg.model.dtype, cfg.model.train_mode) == (16, 2, 4, 4, "bfloat16", "lora")
    _one_step(cfg, tmp_path)


def test_tfds_prompt_source_end_to_end(assets, tiny_step, tmp_path):
    """config.data.source='tfds': the bundled prompts prepared as an array_record TFDS split train the same
    step as the JSON file they came from."""
    import shutil
    from rre_jax.data import tfds_builders
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(tiny_prompts_path(), manual / "alpaca_eval_tiny.json")
    tfds_builders.build(tfds_builders.AlpacaEvalPrompts, manual_dir=manual, data_dir=tmp_path / "tfds")
    cfg = _tiny(assets)
    cfg.data.source, cfg.data.tfds_dir = "tfds", str(tmp_path / "tfds")
    cfg.data.train_file = cfg.data.dev_file = "alpaca_eval_prompts:alpaca_eval_tiny"
    assert _one_step(cfg, tmp_path / "run") == tiny_step


def test_tfds_source_without_split_is_a_clear_error(assets):
    cfg = _tiny(assets)
    cfg.data.source = "tfds"
    with pytest.raises(ValueError, match=r"config.data.train_file='<builder>:<split>'.*tfds_dir"):
        run_spec.validate(cfg)
