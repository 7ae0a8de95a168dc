"""A run that meets a full disk, then a damaged checkpoint: one line each, nothing lost, the run goes on.

The real ``rre-train`` on the tiny config, its workdir on a 1 MiB tmpfs: steps 5 and 10 are saved, the final
export does not fit and the run stops with one line naming the file and the newest intact checkpoint (exit 2).
Then one data file of step 10 is cut to half its length (a failing disk, a bad copy), the disk is given room, and
the same command resumes from step 5 with one warning line, moves step 10 aside and finishes."""
import json
import os
import pathlib
import subprocess

from test_checkpoint import cut_largest_data_file, small_disk
from test_train import train_command

REPO = pathlib.Path(__file__).resolve().parents[1]


def error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.replace("\r", "\n").splitlines() if x.startswith("rre-train: error:")]


def test_full_disk_then_damaged_checkpoint(assets, tmp_path):
    disk = small_disk(tmp_path / "disk", "1m")
    workdir = disk / "run"
    args, env = train_command(workdir, assets, 10, 5)
    args += ["--config.train.export_final=True"]

    full = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    line, = error_lines(full.stderr)
    assert line.startswith(f"rre-train: error: could not write {workdir}/export/") and "No space left on device" in line
    assert line.endswith(f"the newest intact checkpoint is step 10 ({workdir}/checkpoints/10): make room (or fix the "
                         "permission), then rerun the same command to resume from it")

    cut = cut_largest_data_file(workdir / "checkpoints" / "10")
    subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
    resumed = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    warned = [x for x in resumed.stderr.replace("\r", "\n").splitlines() if "damaged" in x]
    assert len(warned) == 1, warned
    assert f"checkpoint step 10 is damaged: {cut}: " in warned[0]
    assert warned[0].endswith(f"moved to {workdir}/checkpoints/damaged/10, resuming from step 5")
    assert warned[0] in (workdir / "rre_train.log").read_text()  # in the log too
    assert os.path.exists(cut.replace("/checkpoints/10/", "/checkpoints/damaged/10/"))  # kept, not deleted
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "5", "damaged"]
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/proxy" in r] == list(range(1, 11))  # 6-10 logged again, once
    assert (workdir / "export" / "model.safetensors").exists()
