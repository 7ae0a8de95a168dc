"""Weights & Biases (`rre_jax.tracking`), for real in W&B's offline mode: the run files it writes are read back
(W&B's record log: LevelDB-style 32 KiB blocks of protobuf ``Record`` messages) and compared with metrics.jsonl."""
import json
import pathlib
import struct
import subprocess
import sys

import pytest

from rre_jax import errors, tracking
from rre_jax.configs import tiny as tiny_config
from rre_jax.data import tiny_prompts_path
from test_train import train_command

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
REPO = pathlib.Path(__file__).resolve().parents[1]
W_AND_B_KEYS = ("_timestamp", "_runtime", "_step", tracking.STEP_KEY)


def wandb_records(path) -> list:
    """Every ``Record`` of a ``run-<id>.wandb`` file: a 7-byte header (``:W&B``, magic, version), then records in
    32 KiB blocks, each chunk with a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = pathlib.Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, payloads, partial = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            payloads.append(partial + chunk)
    return [wandb_pb.Record.FromString(p) for p in payloads]


def offline_runs(workdir) -> list[list]:
    """The records of every offline run under ``workdir/wandb``, oldest first."""
    files = sorted((pathlib.Path(workdir) / "wandb").glob("offline-run-*/run-*.wandb"))
    return [wandb_records(f) for f in files]


def history(records) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def test_logging_fields_are_validated():
    cfg = tiny_config.get_config()
    cfg.logging.wandb_mode = "sometimes"
    with pytest.raises(errors.UserError, match="config.logging.wandb_mode='sometimes'; choose one of"):
        tracking.WandbConfig.from_config(cfg)
    cfg.logging.wandb_mode, cfg.logging.wandb_tags = "offline", ("rer", "")
    with pytest.raises(errors.UserError, match="config.logging.wandb_tags=.*non-empty strings"):
        tracking.WandbConfig.from_config(cfg)
    cfg.logging.wandb_tags, cfg.logging.wandb, cfg.logging.wandb_project = ("rer",), True, ""
    with pytest.raises(errors.UserError, match="config.logging.wandb_project is empty"):
        tracking.WandbConfig.from_config(cfg)


def test_offline_run_holds_the_metrics_config_and_reports_and_resumes(assets, tmp_path):
    workdir = tmp_path / "run"
    args, env = train_command(workdir, assets, 2, 2)
    wandb_args = ["--config.logging.wandb=True", "--config.logging.wandb_project=rre-test",
                  "--config.logging.wandb_tags=tiny,ci", "--config.logging.wandb_name=tiny-wandb"]
    env = {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    subprocess.run(args + wandb_args, env=env, cwd=REPO, check=True, capture_output=True)
    resume = [a for a in args if not a.startswith("--config.train.steps=")] + ["--config.train.steps=4"]
    subprocess.run(resume + wandb_args, env=env, cwd=REPO, check=True, capture_output=True)  # resumes at step 2
    run_id = json.loads((workdir / tracking.RUN_FILE).read_text())["id"]
    runs = offline_runs(workdir)
    assert len(runs) == 2
    for records in runs:  # one W&B run, continued: same id, name, tags, project
        run, = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run.run_id, run.display_name, list(run.tags), run.project) == (run_id, "tiny-wandb", ["tiny", "ci"],
                                                                                "rre-test")
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert config["ppo"]["learning_rate"] == tiny_config.get_config().ppo.learning_rate  # the full config
        assert config["train"]["steps"] in (2, 4) and config["logging"]["wandb"] is True

    logged: dict[int, dict] = {}
    reports: dict[int, set] = {}
    for records in runs:
        for row in history(records):
            step = int(row[tracking.STEP_KEY])
            scalars = {k: v for k, v in row.items() if k not in W_AND_B_KEYS and not k.startswith("dev_eval/")}
            logged.setdefault(step, {}).update(scalars)
            reports.setdefault(step, set()).update(k.split("/")[1] for k in row if k.startswith("dev_eval/"))
    written: dict[int, dict] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        written.setdefault(row.pop("step"), {}).update({k: v for k, v in row.items() if v is not None})
    assert sorted(written) == [1, 2, 3, 4] and sorted(logged) == sorted(written)
    for step in written:
        assert logged[step] == written[step], f"step {step}: W&B and metrics.jsonl differ"
    assert {"monotonicity", "means_per_step", "proxy_vs_gold", "series", "length_hist"} <= reports[4]

    evaluation = subprocess.run(
        [sys.executable, "-m", "rre_jax.cli.eval", f"--workdir={workdir}", f"--eval-set={tiny_prompts_path()}",
         "--steps=2,4", "--max-new-tokens=8", "--n-boot=10", "--batch-size=8"],
        env=env, cwd=REPO, capture_output=True, text=True)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert f"rre-eval: report logged to the W&B run of {workdir}" in evaluation.stderr
    runs = offline_runs(workdir)
    assert len(runs) == 3
    eval_run, = [r.run for r in runs[-1] if r.WhichOneof("record_type") == "run"]
    assert eval_run.run_id == run_id
    keys = {k for row in history(runs[-1]) for k in row}
    assert {"eval/monotonicity", "eval/means_per_step", "eval/proxy_vs_gold"} <= {k.rsplit("/", 1)[0] if
                                                                                  k.count("/") > 1 else k for k in keys}
