"""Rollout store: what one checkpoint wrote and how it was scored, one directory per step.

Layout under ``root`` (usually ``<workdir>/eval``)::

    step_<N>/model_outputs.json  AlpacaEval model outputs: [{instruction, output, generator, dataset}, ...]
                                 (``alpaca_eval --model_outputs step_<N>/model_outputs.json`` judges it elsewhere)
    step_<N>/rollouts.jsonl      one JSON object per prompt: index, instruction, response, qtype, dataset,
                                 every feature (li, rp, qr, ar, ...), {"proxy": {spec name: value}}, gold, n_tokens
    step_<N>/meta.json           step, training proxy, gold RM identity (and whether it is a random RM),
                                 sampling settings, what relevance embedded, generator name, item count, versions

Shapes: ``N`` prompts of the eval set, aligned by index across checkpoints (item ``i`` of every step is the
same prompt), which is what lets the monotonicity bootstrap resample prompts.

A step directory is written whole or not at all: everything goes into a hidden temporary sibling that is
renamed into place, so a reader (``refresh_report`` running live beside training) never sees half a step and a
killed writer leaves no ``step_<N>``. Existing steps are never replaced unless ``overwrite=True``. Only one
process (process 0 in a multi-host run) should write. Non-finite scores are stored as JSON ``null``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import time
import uuid
from typing import Any, Mapping, Sequence

import numpy as np

import rre_jax

OUTPUTS_FILE = "model_outputs.json"
ROLLOUTS_FILE = "rollouts.jsonl"
META_FILE = "meta.json"
STORE_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_RESERVED = {"index", "instruction", "response", "qtype", "dataset", "proxy", "gold", "n_tokens"}
# ``StepRollouts.relevance_text`` in words, for reports ('' : a store written before rre_jax recorded it)
RELEVANCE_TEXT_NAMES = {"response": "the response as sampled (the paper's)",
                        "cut": "the response cut at its first stop string (config.reward.relevance_text='cut')",
                        "": "not recorded (a store written by an older rre_jax)"}


class StoreError(ValueError):
    """A rollout store that cannot be written or read; the message names the path or field and the fix."""


@dataclasses.dataclass(frozen=True)
class StepRollouts:
    """Everything scored at one checkpoint on the eval prompts (``N`` items, aligned by index).

    Attributes:
      step: the training step of the checkpoint.
      instruction, response, qtype: ``N`` strings each; ``instruction`` is the untemplated eval prompt,
        ``response`` the text as sampled (what every score was computed on: LI and RP clean it themselves),
        ``qtype`` OPENENDED / CONSTRAINED.
      proxies: ``{spec name: f64[N]}``, the proxy under each named reward spec (``"rer"`` is what the reference
        scores every checkpoint with; ``train_proxy`` is the one that trained this policy).
      gold: ``f64[N]`` gold reward-model scores.
      features: ``{name: f64[N]}`` white-box features (``li``, ``rp``, ``qr``, ``ar``, ...).
      n_tokens: optional ``i64[N]`` response lengths in policy tokens.
      dataset: optional ``N`` AlpacaEval dataset labels ("" when unknown).
      train_proxy: name (a key of ``proxies``) of the proxy that trained the policy.
      gold_rm: identity of the gold RM (checkpoint path or hub name); gold_rm_random: True when it is a
        randomly initialised stand-in (then the gold numbers mean nothing, and reports say so loudly).
      generator: model name written in the AlpacaEval outputs; default ``rre_jax-step_<step>``.
      sampling: sampling settings (temperature, top_p, max_new_tokens, seed, ...).
      relevance_text: what QR / AR embedded (``reward_engine.RELEVANCE_TEXTS``): ``'response'``, the response
        itself (the paper's), or ``'cut'``, the response cut at its first stop string.
      extra: any other JSON-able run facts (run name, config, ...).
    """

    step: int
    instruction: Sequence[str]
    response: Sequence[str]
    qtype: Sequence[str]
    proxies: Mapping[str, Any]
    gold: Any
    features: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    n_tokens: Any = None
    dataset: Sequence[str] | None = None
    train_proxy: str = "rer"
    gold_rm: str = ""
    gold_rm_random: bool = False
    generator: str = ""
    sampling: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    relevance_text: str = "response"
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if int(self.step) != self.step or self.step < 0:
            raise StoreError(f"StepRollouts.step={self.step!r} must be a non-negative integer")
        n = len(self.instruction)
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("step", int(self.step))
        for name in ("instruction", "response", "qtype") + (("dataset",) if self.dataset is not None else ()):
            set_(name, tuple(_strings(getattr(self, name), name, n)))
        set_("gold", _vector(self.gold, "gold", n))
        set_("proxies", {k: _vector(v, f"proxies[{k!r}]", n) for k, v in self.proxies.items()})
        set_("features", {k: _vector(v, f"features[{k!r}]", n) for k, v in self.features.items()})
        if self.n_tokens is not None:
            set_("n_tokens", _vector(self.n_tokens, "n_tokens", n).astype(np.int64))
        for name in list(self.proxies) + list(self.features):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in _RESERVED:
                raise StoreError(f"score name {name!r} must be an identifier and not one of {sorted(_RESERVED)}")
        if self.train_proxy not in self.proxies:
            raise StoreError(f"train_proxy={self.train_proxy!r} is not among proxies {sorted(self.proxies)}; "
                             "score the rollouts with the proxy that trained the policy too")
        if self.relevance_text not in RELEVANCE_TEXT_NAMES:
            raise StoreError(f"StepRollouts.relevance_text={self.relevance_text!r}; choose one of "
                             f"{sorted(k for k in RELEVANCE_TEXT_NAMES if k)}")
        set_("generator", self.generator or f"rre_jax-step_{self.step}")
        set_("sampling", dict(self.sampling))
        set_("extra", dict(self.extra))

    def __len__(self) -> int:
        return len(self.instruction)


def _strings(values, name: str, n: int) -> list[str]:
    values = list(values)
    if len(values) != n:
        raise StoreError(f"StepRollouts.{name} has {len(values)} items but instruction has {n}")
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise StoreError(f"StepRollouts.{name}[{bad[0]}] is {type(values[bad[0]]).__name__}, expected str")
    return values


def _vector(values, name: str, n: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n,):
        raise StoreError(f"StepRollouts.{name} has shape {arr.shape}, expected ({n},) (one value per prompt)")
    return arr


def step_dir(root: str | os.PathLike, step: int) -> pathlib.Path:
    return pathlib.Path(root) / f"step_{int(step)}"


def list_steps(root: str | os.PathLike) -> list[int]:
    """Steps with a complete directory under ``root``, ascending (temporary/partial directories are ignored)."""
    root = pathlib.Path(root)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(s for s in steps if (step_dir(root, s) / META_FILE).is_file())


def write_step(root: str | os.PathLike, rollouts: StepRollouts, *, overwrite: bool = False) -> pathlib.Path:
    """Writes ``root/step_<N>/`` atomically (see module docstring); returns its path.

    Raises FileExistsError if the step is already stored and ``overwrite`` is False.
    """
    root = pathlib.Path(root)
    final = step_dir(root, rollouts.step)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already holds the eval rollouts of step {rollouts.step}; "
                              "pass overwrite=True (--overwrite) to replace them")
    root.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(root, f".{final.name}.tmp-")
    try:
        _write_json(tmp / OUTPUTS_FILE, _alpaca_outputs(rollouts))
        with open(tmp / ROLLOUTS_FILE, "w", encoding="utf-8") as f:
            for row in _rows(rollouts):
                f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        _write_json(tmp / META_FILE, _meta(rollouts))
        if final.exists():  # overwrite: move the old step aside first, then drop it
            old = _fresh_dir(root, f".{final.name}.old-")
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def _fresh_dir(parent: pathlib.Path, prefix: str) -> pathlib.Path:
    """A new hidden directory (made with the caller's umask, unlike ``tempfile.mkdtemp``'s 0700)."""
    path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def temp_path(path: pathlib.Path) -> pathlib.Path:
    """A unique hidden sibling of ``path`` to write before renaming over it."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _alpaca_outputs(r: StepRollouts) -> list[dict]:
    dataset = r.dataset or ("",) * len(r)
    return [{"instruction": i, "output": o, "generator": r.generator, "dataset": d}
            for i, o, d in zip(r.instruction, r.response, dataset)]


def _rows(r: StepRollouts):
    for i in range(len(r)):
        row = {"index": i, "instruction": r.instruction[i], "response": r.response[i], "qtype": r.qtype[i],
               "dataset": r.dataset[i] if r.dataset is not None else None}
        row.update({k: _num(v[i]) for k, v in r.features.items()})
        row["proxy"] = {k: _num(v[i]) for k, v in r.proxies.items()}
        row["gold"] = _num(r.gold[i])
        row["n_tokens"] = int(r.n_tokens[i]) if r.n_tokens is not None else None
        yield row


def _num(x) -> float | None:
    return float(x) if np.isfinite(x) else None


def _meta(r: StepRollouts) -> dict:
    return {"store_version": STORE_VERSION, "step": r.step, "n_items": len(r), "train_proxy": r.train_proxy,
            "proxies": sorted(r.proxies), "features": sorted(r.features),
            "gold_rm": {"name": r.gold_rm, "random": bool(r.gold_rm_random)}, "generator": r.generator,
            "sampling": r.sampling, "relevance_text": r.relevance_text, "extra": r.extra,
            "rre_jax_version": rre_jax.__version__,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _write_json(path: pathlib.Path, obj) -> None:
    """Writes JSON to a temporary file beside ``path`` and renames it over ``path`` (atomic on POSIX)."""
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1, allow_nan=False))


def write_atomic(path: pathlib.Path, data: str | bytes) -> None:
    """Writes ``data`` to a unique temporary sibling, then renames it over ``path``: readers see old or new."""
    tmp = temp_path(path)
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_step(root: str | os.PathLike, step: int) -> StepRollouts:
    """Reads ``root/step_<N>/`` back into a `StepRollouts` (JSON nulls become NaN)."""
    path = step_dir(root, step)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"no stored eval rollouts for step {step}: {path / META_FILE} is missing "
                                f"(stored steps: {list_steps(root)})")
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    rows = []
    with open(path / ROLLOUTS_FILE, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise StoreError(f"{path / ROLLOUTS_FILE}:{line_no}: not valid JSON ({e.msg})") from None
    if len(rows) != meta["n_items"]:
        raise StoreError(f"{path / ROLLOUTS_FILE} has {len(rows)} rows but {path / META_FILE} says "
                         f"n_items={meta['n_items']}; the step directory is damaged, rewrite it with --overwrite")
    col = lambda key: [r[key] for r in rows]  # noqa: E731
    nums = lambda vals: np.array([np.nan if v is None else v for v in vals], dtype=np.float64)  # noqa: E731
    return StepRollouts(
        step=meta["step"], instruction=col("instruction"), response=col("response"), qtype=col("qtype"),
        proxies={k: nums(r["proxy"][k] for r in rows) for k in meta["proxies"]}, gold=nums(col("gold")),
        features={k: nums(col(k)) for k in meta["features"]},
        n_tokens=None if rows and rows[0]["n_tokens"] is None else np.array(col("n_tokens"), dtype=np.int64),
        dataset=None if rows and rows[0]["dataset"] is None else col("dataset"),
        train_proxy=meta["train_proxy"], gold_rm=meta["gold_rm"]["name"], gold_rm_random=meta["gold_rm"]["random"],
        generator=meta["generator"], sampling=meta["sampling"], relevance_text=meta.get("relevance_text", ""),
        extra=meta["extra"])


def load_steps(root: str | os.PathLike) -> list[StepRollouts]:
    """Every stored step under ``root``, ascending."""
    return [load_step(root, s) for s in list_steps(root)]
