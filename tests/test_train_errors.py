"""Bad configs fail before anything compiles; non-finite rewards skip the batch and the run goes on."""
import math
import subprocess
import sys

import pytest

from rre_jax import metrics, run_spec, train
from rre_jax.configs import tiny as tiny_config

from test_train import REPO, rows_by_step, tiny_cfg


@pytest.mark.parametrize("override,match", [
    ({"mesh.shape": (3, 2, 2)}, "needs 12 devices"),
    ({"ppo.batch_size": 12}, "batch_size=12"),
    ({"ppo.batch_size": 7}, "multiple"),
    ({"reward.preset": "rr"}, "unknown reward preset 'rr'"),
    ({"model.train_mode": "half"}, "train_mode"),
    ({"model.critic": "twin"}, r"model.critic='twin'.*'separate', 'shared'"),
    ({"model.remat": "all"}, r"model.remat='all'.*'none', 'dots', 'full'"),
    ({"sampling.top_p": 0.0}, "top_p"),
    ({"data.train_file": "/nonexistent/prompts.json"}, "does not exist"),
])
def test_validate_names_the_field(override, match):
    cfg = tiny_config.get_config()
    (key, value), = override.items()
    section, field = key.split(".")
    cfg[section][field] = value
    with pytest.raises((ValueError, KeyError, FileNotFoundError), match=match):
        run_spec.validate(cfg)


def test_cli_rejects_unknown_config_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rre_jax.cli.train", f"--workdir={tmp_path}", "--config.ppo.lrr=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "lrr" in proc.stderr and "learning_rate" in proc.stderr  # names the key and lists the valid ones
    assert not (tmp_path / "checkpoints").exists()


def test_non_finite_reward_skips_the_batch(assets, tmp_path):
    cfg = tiny_cfg(assets, "li", **{"train.steps": 2, "train.save_freq": 100, "train.dev_size": 4})
    cfg.reward.baseline = math.nan  # every score becomes NaN
    train.run(cfg, str(tmp_path))
    rows = rows_by_step(tmp_path)
    assert [rows[s]["train/skipped_batch"] for s in (1, 2)] == [1.0, 1.0]
    assert "ppo/loss/total" not in rows[1]
    assert metrics.read_metrics(str(tmp_path))[-1]["step"] == 2  # the run went on to the end
