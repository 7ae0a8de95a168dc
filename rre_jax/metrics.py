"""Run metrics: one JSON line per logged step (``metrics.jsonl``), TensorBoard event files, and W&B when asked.

Every number the trainer logs goes through ``MetricWriter.write`` so a test (or a notebook) can read it
back with ``read_metrics``. Only process 0 writes. TensorBoard files are written with ``tensorboardX``
(no TensorFlow needed); a `tracking.WandbRun` (``--config.logging.wandb=True``) gets the same finite scalars at
the same steps, and the reports handed to ``MetricWriter.report``.
"""
from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool | None = None, tracker=None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._tracker = tracker if self.enabled else None  # a tracking.WandbRun, or None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in scalars.items():
            v = float(np.asarray(v))
            row[k] = v if math.isfinite(v) else None
            if math.isfinite(v):
                self._tb.add_scalar(k, v, int(step))
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._tb.flush()
        if self._tracker is not None:
            self._tracker.log(step, {k: v for k, v in row.items() if k != "step" and v is not None})

    def report(self, report_dir: str, step: int, prefix: str) -> None:
        """Hand the report in ``report_dir`` (tables, figures) to the tracker, if any."""
        if self._tracker is not None and os.path.isdir(report_dir):
            self._tracker.log_report(report_dir, step, prefix)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run rewrites them)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        rows = [r for r in read_metrics(os.path.dirname(self.path)) if r["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._tracker is not None:
            self._tracker.finish()


def read_metrics(workdir: str) -> list[dict]:
    """All rows of ``<workdir>/metrics.jsonl``, in order."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = [json.loads(line) for line in lines[:-1]]
    try:
        rows += [json.loads(line) for line in lines[-1:]]
    except ValueError:  # a last line cut short (the disk filled up mid-write): that step is logged again on resume
        pass
    return rows
