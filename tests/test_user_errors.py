"""No silent fallbacks: each mistake a user can make on the paper path is one clear error that names the config
field (or the file, line and column) and the fix, raised before anything is written into the workdir; the
command prints it as one line and exits 2."""
import dataclasses
import logging
import subprocess
import sys

import pytest

from rre_jax import checkpoint, mesh as mesh_lib, reward, run_spec, train
from rre_jax.configs import alpacafarm_rer, tiny as tiny_config
from rre_jax.errors import UserError

from test_train import REPO, tiny_cfg


def _rre_train(workdir, *flags):
    proc = subprocess.run([sys.executable, "-m", "rre_jax.cli.train", f"--workdir={workdir}", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    return proc.returncode, errors, proc.stderr


def _paper(assets, **more):
    cfg = alpacafarm_rer.get_config("rer")
    cfg.model.path, cfg.tokenizer.path, cfg.relevance.path = assets["policy"], assets["tokenizer"], "minilm"
    cfg.mesh.shape = (-1, 1, 1)
    for key, value in more.items():
        section, field = key.split(".")
        cfg[section][field] = value
    return cfg


def test_paper_config_without_model_path(tmp_path):
    """Formerly: tiny assets built into the workdir, then AttributeError 'hidden_size'."""
    rc, errors, stderr = _rre_train(tmp_path / "w", f"--config={REPO / 'configs' / 'alpacafarm_rer.py'}")
    assert rc == 2 and "Traceback" not in stderr, stderr
    assert len(errors) == 1 and errors[0].startswith("rre-train: error: config.model.path is empty"), stderr
    assert "build_tiny" in errors[0]  # the explicit switch the tiny config uses
    assert not (tmp_path / "w").exists()


def test_model_path_without_train_file(assets, tmp_path):
    """Formerly: trained on the 64 bundled toy prompts, said only in an INFO line."""
    with pytest.raises(UserError, match=r"config\.data\.train_file is empty: set --config\.data\.train_file"):
        train.run(_paper(assets), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_mesh_off_the_topology_is_a_warning_with_the_reason(monkeypatch, caplog):
    """Formerly: any exception of the topology-aware layout fell back to plain device order without a word.
    (Only TPU devices have a topology that can refuse a shape; the refusal is simulated here.)"""
    from jax.experimental import mesh_utils

    def refuse(shape, devices, **kw):
        raise NotImplementedError("Failed to find assignment for mesh_shape")
    monkeypatch.setattr(mesh_utils, "create_device_mesh", refuse)
    with caplog.at_level(logging.WARNING, logger="rre_jax.mesh"):
        mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(2, 2, 2)))
    assert mesh.devices.shape == (2, 2, 2)
    text = caplog.text
    assert "config.mesh.shape=(2, 2, 2)" in text and "Failed to find assignment" in text, text


def test_dev_eval_rer_column_is_rer():
    """Formerly: the dev-eval `rer` column held the training proxy when 'rer' was not a counterfactual."""
    cfg = tiny_config.get_config("li")
    cfg.reward.counterfactual = ("li",)
    spec = run_spec.validate(cfg)
    want = dataclasses.replace(reward.preset("rer"), max_new_tokens=spec.reward.max_new_tokens)
    assert spec.counterfactual["cf/rer"] == want != spec.reward
    cfg = tiny_config.get_config("rer")
    cfg.reward.counterfactual = ("li",)
    assert "cf/rer" not in run_spec.validate(cfg).counterfactual  # the training proxy is RER itself


def test_counterfactual_needing_relevance_without_encoder(tmp_path):
    """Formerly: caught in build, after the tiny assets were written."""
    cfg = tiny_config.get_config("li")
    cfg.reward.counterfactual = ("li", "qr_li_rp")
    cfg.relevance.path = ""
    with pytest.raises(UserError, match=r"config\.relevance\.path"):
        train.run(cfg, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("content,match", [
    (b'[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', r"bad\.json:2:22: malformed"),
    (b'[{"instruction": "caf\xe9", "output": "b"}]', r"bad\.json: not UTF-8"),
    (b'[{"instruction": "a", "output": "b"},\n {"output": "d"}]', r"item 1 \(line 2\).*'instruction'"),
])
def test_bad_prompt_file_before_any_asset(tmp_path, content, match):
    """Formerly: reported after the tiny assets and the SFT warm start (15 files), under an 11-frame traceback."""
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    cfg = tiny_config.get_config()
    cfg.data.train_file = str(bad)
    with pytest.raises(UserError, match=r"config\.data\.train_file: .*" + match):
        train.run(cfg, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_bad_prompt_file_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    rc, errors, stderr = _rre_train(tmp_path / "w", f"--config.data.train_file={bad}")
    assert rc == 2 and "Traceback" not in stderr, stderr
    assert errors == [f"rre-train: error: config.data.train_file: {bad}:2:17: malformed JSON record on line 2, "
                      "column 17: Expecting value"], stderr
    assert not (tmp_path / "w").exists()


def test_resume_checks_the_saved_data_position(assets, tmp_path):
    """Formerly: the saved position was assigned without PromptIterator's range check."""
    import jax.numpy as jnp
    ckpt = checkpoint.CheckpointManager(str(tmp_path))
    ckpt.save(3, {"step": jnp.int32(3)}, {"step": 3, "data": {"epoch": 0, "step": 999, "seed": 0}})
    ckpt.close()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=r"checkpoints/3: its data position .*'step': 999.* does not fit this run "
                                        r"\(64 prompts, config\.ppo\.batch_size=16\)"):
        train.run(tiny_cfg(assets), str(tmp_path))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def _nonutf8(tmp_path):
    bad = tmp_path / "prompts.json"
    bad.write_bytes(b'[{"instruction": "caf\xe9", "output": "b"}]')
    return bad


@pytest.mark.parametrize("command", ["rre-params", "rre-score", "rre-eval", "rre-alignment-tax", "rre-label-qtype"])
def test_every_command_reports_a_mistake_in_one_line_with_exit_2(command, tmp_path, capsys):
    """A user's mistake (here a path or a file that is not UTF-8) is one ``<command>: error:`` line and status 2."""
    from rre_jax.cli import alignment_tax, eval as eval_cmd, label_qtype, params, score
    bad = _nonutf8(tmp_path)
    main, argv, names = {
        "rre-params": (params.main, ["--config", str(tmp_path / "missing.py")], "missing.py"),
        "rre-score": (score.main, ["--eval-set", str(bad), "--outputs", str(bad), "--reward", "li", "--out",
                                   str(tmp_path / "s.json")], "not UTF-8"),
        "rre-eval": (eval_cmd.main, ["--workdir", str(tmp_path / "nowhere"), "--eval-set", str(bad)], "nowhere"),
        "rre-alignment-tax": (alignment_tax.main, ["--workdir", str(tmp_path / "nowhere"), "--step", "1",
                                                            "--tasks-dir", str(tmp_path)], "nowhere"),
        "rre-label-qtype": (label_qtype.main, ["--prompts", str(bad), "--out", str(tmp_path / "l.json"), "--random"],
                            "not UTF-8"),
    }[command]
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2, err
    assert len(err) == 1 and err[0].startswith(f"{command}: error: ") and names in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.json"]  # nothing written
