"""Weights & Biases, optional: a run's metrics, config and reports where most labs' dashboards live.

``--config.logging.wandb=True`` (the ``wandb`` extra: ``pip install 'rre_jax[wandb]'``) opens a W&B run named by
``config.logging`` (project, entity, run name, tags, mode) with the full config; `metrics.MetricWriter` then sends
it every scalar it writes to TensorBoard, at the same step (W&B's x axis is ``train/step``), and
`WandbRun.log_report` the dev-eval monotonicity tables (correlations of every proxy with gold, means per step)
and figures. The run's id is kept in ``<workdir>/wandb_run.json``, so a resumed run continues the same W&B run
(steps after the restored checkpoint are logged again, as in ``metrics.jsonl``), and ``rre-eval`` / ``rre-bon``
add their reports to it (`log_report_to_run`). Only process 0 logs. W&B's own settings apply as usual
(``WANDB_MODE=offline`` writes the run under ``<workdir>/wandb/`` for a later ``wandb sync``; ``WANDB_API_KEY``).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import tempfile
import uuid
from typing import Any

import jax

from rre_jax.errors import UserError

log = logging.getLogger(__name__)

RUN_FILE = "wandb_run.json"  # <workdir>/wandb_run.json: the W&B run this workdir logs to
STEP_KEY = "train/step"
MODES = ("", "online", "offline", "disabled")


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """``config.logging``, validated."""

    enabled: bool = False
    project: str = "rre_jax"
    entity: str = ""
    name: str = ""  # default: config.name and the workdir's base name
    tags: tuple[str, ...] = ()
    mode: str = ""  # '': W&B's own choice (WANDB_MODE, else online)

    @classmethod
    def from_config(cls, config) -> "WandbConfig":
        """``config.logging`` as a `WandbConfig`; a `UserError` naming the field for a bad value, or for
        ``wandb=True`` without the package installed."""
        s = config.get("logging")
        if s is None:  # a config saved before config.logging existed
            return cls()
        tags = (s.wandb_tags,) if isinstance(s.wandb_tags, str) else tuple(s.wandb_tags)
        if not all(isinstance(t, str) and t for t in tags):
            raise UserError(f"config.logging.wandb_tags={s.wandb_tags!r}: give non-empty strings, e.g. "
                            "--config.logging.wandb_tags=rer,v4-32")
        if s.wandb_mode not in MODES:
            raise UserError(f"config.logging.wandb_mode={s.wandb_mode!r}; choose one of {MODES} ('' leaves it to "
                            "WANDB_MODE)")
        cfg = cls(bool(s.wandb), str(s.wandb_project), str(s.wandb_entity), str(s.wandb_name), tags,
                  str(s.wandb_mode))
        if cfg.enabled and not cfg.project:
            raise UserError("config.logging.wandb_project is empty: name the W&B project, e.g. "
                            "--config.logging.wandb_project=rre")
        if cfg.enabled and not _installed():
            raise UserError("config.logging.wandb=True but the wandb package is not installed: "
                            "pip install 'rre_jax[wandb]' (or --config.logging.wandb=False)")
        return cfg


def _installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("wandb") is not None


class WandbRun:
    """An open W&B run (process 0 only)."""

    def __init__(self, run):
        self.run = run
        run.define_metric(STEP_KEY)
        run.define_metric("*", step_metric=STEP_KEY)

    def log(self, step: int, scalars: dict) -> None:
        """Finite scalars at ``step`` (what TensorBoard gets)."""
        row = {k: v for k, v in scalars.items() if isinstance(v, float) and math.isfinite(v)}
        if row:
            self.run.log({STEP_KEY: int(step), **row})

    def log_report(self, report_dir: str, step: int, prefix: str) -> None:
        """The report in ``report_dir`` (``summary.json`` of a monotonicity report, ``curves.json`` of best-of-n,
        and every figure) as W&B tables and images under ``prefix/``."""
        import wandb  # optional (the wandb extra)
        row: dict[str, Any] = {STEP_KEY: int(step)}
        summary = _read_json(os.path.join(report_dir, "summary.json"))
        if summary and summary.get("steps"):
            row[f"{prefix}/monotonicity"] = _table(wandb, correlation_rows(summary))
            row[f"{prefix}/means_per_step"] = _table(wandb, means_rows(summary))
        curves = _read_json(os.path.join(report_dir, "curves.json"))
        if curves and curves.get("kind") == "best_of_n":
            row[f"{prefix}/best_of_n"] = _table(wandb, best_of_n_rows(curves))
        for png in sorted(glob.glob(os.path.join(report_dir, "*.png")) +
                          glob.glob(os.path.join(report_dir, "plots", "*.png"))):
            row[f"{prefix}/{os.path.splitext(os.path.basename(png))[0]}"] = wandb.Image(png)
        self.run.log(row)

    def finish(self) -> None:
        self.run.finish()


def open_run(config, workdir: str, *, job_type: str = "train") -> WandbRun | None:
    """The W&B run of ``workdir`` (resumed when ``wandb_run.json`` names one) when ``config.logging.wandb`` is set,
    on process 0; None otherwise."""
    cfg = WandbConfig.from_config(config)
    if not cfg.enabled or jax.process_index() != 0:
        return None
    import wandb  # optional (the wandb extra)
    run_id = (_read_json(os.path.join(workdir, RUN_FILE)) or {}).get("id") or uuid.uuid4().hex[:12]
    local = "://" not in str(workdir)
    run = wandb.init(project=cfg.project, entity=cfg.entity or None, name=cfg.name or _default_name(config, workdir),
                     tags=list(cfg.tags) or None, config=json.loads(config.to_json_best_effort()), id=run_id,
                     resume="allow", job_type=job_type, mode=cfg.mode or None,
                     dir=workdir if local else tempfile.gettempdir())
    if local:
        with open(os.path.join(workdir, RUN_FILE), "w") as f:
            json.dump({"id": run.id, "project": cfg.project, "entity": cfg.entity, "name": run.name}, f)
    return WandbRun(run)


def log_report_to_run(config, workdir: str, report_dir: str, step: int, prefix: str) -> bool:
    """Add the report in ``report_dir`` to the W&B run of ``workdir`` (``rre-eval``, ``rre-bon``) when
    ``config.logging.wandb`` is set; True when it was logged."""
    run = open_run(config, workdir, job_type=prefix)
    if run is None:
        return False
    run.log_report(report_dir, step, prefix)
    run.finish()
    return True


# ----------------------------------------------------------------------------------------------- tables

def correlation_rows(summary: dict) -> list[dict]:
    """One row per query-type group and series: its rank correlations with gold across checkpoints."""
    return [{"group": group, "series": name, **{k: v for k, v in corr.items() if _scalar(v)}}
            for group, by_name in summary.get("correlations", {}).items() for name, corr in by_name.items()]


def means_rows(summary: dict) -> list[dict]:
    """One row per checkpoint: the mean of every series over all prompts."""
    means = summary.get("means", {}).get("all", {})
    return [{"step": step, **{name: values[i] for name, values in means.items()}}
            for i, step in enumerate(summary.get("steps", []))]


def best_of_n_rows(curves: dict) -> list[dict]:
    """One row per preset and k: the expected proxy and gold of the proxy-selected best of k."""
    return [{"preset": name, "k": k, "d": curves["d"][j], "proxy": v["proxy"]["mean"][j], "gold": v["gold"]["mean"][j]}
            for name, v in curves.get("variants", {}).items() for j, k in enumerate(curves["ks"])]


def _table(wandb, rows: list[dict]):
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])


def _scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _default_name(config, workdir: str) -> str:
    return f"{config.name}-{os.path.basename(os.path.normpath(str(workdir)))}"
