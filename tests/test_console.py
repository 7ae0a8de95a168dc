"""What a newcomer sees: ``rre-train``'s console is its progress bar and a closing summary, INFO logs go to a file."""
import os
import pathlib
import re
import subprocess
import sys

from rre_jax.data import tiny_prompts_path

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_train_console_is_progress_and_summary(assets, tmp_path):
    """One step of the tiny run as a command: the summary names steps, proxy and gold, every output and the next
    command; no INFO line (rre_jax, absl, orbax) reaches the console, and the log file in the workdir holds them."""
    workdir = tmp_path / "run"
    prompts = str(tiny_prompts_path())
    cmd = [sys.executable, "-m", "rre_jax.cli.train", "--config", "tiny", "--workdir", str(workdir),
           f"--config.model.path={assets['policy']}", f"--config.tokenizer.path={assets['tokenizer']}",
           f"--config.gold_rm.path={assets['gold_rm']}", f"--config.data.train_file={prompts}",
           f"--config.data.dev_file={prompts}", "--config.data.bucket=96", "--config.train.steps=1",
           "--config.train.save_freq=1", "--config.train.dev_size=8",
           "--config.train.export_final=False"]  # as test_train.tiny_cfg: the programs its tests compile
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    info = [line for line in console.replace("\r", "\n").splitlines()
            if " INFO " in line or line.startswith("INFO") or re.match(r"I\d{4} ", line)]
    assert not info, f"INFO lines reached the console: {info[:5]}"
    assert "Closing _NonBlockingMetadataStore" not in console
    out = done.stdout
    assert "rre-train: 1 steps logged (last step 1)" in out, out
    for label in ("proxy (train batch)", "proxy (dev eval)", "gold (dev eval)"):
        assert label in out and "(step 1) ->" in out.split(label, 1)[1].splitlines()[0], out
    for path in ("checkpoints", "metrics.jsonl", os.path.join("dev_eval", "report.md"), "rre_train.log"):
        assert str(workdir / path) in out, (path, out)
        assert (workdir / path).exists()
    assert f"next: rre-eval --workdir {workdir} --eval-set {prompts}" in out, out
    log = (workdir / "rre_train.log").read_text()
    assert " INFO absl: " in log, "orbax's INFO lines (through absl) belong in the log file"
