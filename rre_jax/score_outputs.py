"""Scoring a model's AlpacaEval outputs with the white-box proxy reward (and, optionally, a gold RM): the library
behind ``rre-score`` (``rre_jax/cli/score.py``).

    rre-score --eval-set alpaca_eval.json --outputs model_outputs.json --reward rer \\
        --relevance-encoder minilm [--gold-rm DIR] [--tokenizer POLICY_TOKENIZER_DIR] --out scores.json

What is scored, item by item, as the paper's ``eval_monotonicity.py`` scores a checkpoint's outputs:

* ``EVAL.json`` (AlpacaEval layout: ``instruction``, ``output`` = reference answer, ``qtype``) and
  ``OUTPUTS.json`` (AlpacaEval outputs: ``instruction``, ``output`` = the model's response) align by order;
  the instructions must match item by item (an error names the first index that differs). A row without
  ``qtype`` gets ``--missing-qtype`` (default OPENENDED, as ``rre_jax.data``), counted in the summary.
* LI and RP come from the on-device features (``reward_engine.score_texts``) on token ids of ``--tokenizer`` (the
  policy's tokenizer; its id -> bytes table). Without ``--tokenizer`` the ids are the raw UTF-8 bytes of the
  response (an identity byte table), i.e. exactly the Python definition (docs/design.md 4.2) on the text as written.
* QR = E(q) . E(response) with ``q = relevance_query(instruction)``: the reference passes the raw,
  untemplated ``instruction`` through its ``extract_raw_query`` (same result as the templated prompt on all
  805 AlpacaEval items). AR = E(reference answer) . E(response). Relevance embeds the response as given, as the
  paper's scoring code does (LI and RP clean it: strip, cut at the first stop string); ``--relevance-text cut``
  embeds the cut response instead (``reward_engine``), and the summary says which.
* ``gold``: the gold RM on ``starling_input(starling_query(instruction), response)`` (``gold_rm.GoldRM``).

What is computed: the components ``--reward`` composes, and nothing else -- under RER, QR for open-ended items
and AR for constrained ones (two encoded texts per item, as the paper's scoring). ``--counterfactual`` adds
every other preset that can be computed with what was given (the counterfactual columns; ``rer_predicted_qtype``
needs predicted labels and is skipped), and with them QR and AR for every item. A value is the same number with
or without the flag.

Output: ``--out`` is a JSON list aligned with the eval set; each item holds ``index, instruction, qtype,
n_words, li, rp, qr, ar, relevance, proxy, gold`` and ``presets`` (``--reward``'s, and with
``--counterfactual`` every other preset's). ``relevance`` is the factor the chosen reward uses: AR for
CONSTRAINED items when the reward branches, else QR. Values not computed are ``null``. Beside it, ``<out minus .json>.summary.json`` holds the run's settings and means overall and per
qtype. Both files are written atomically; an existing file is kept unless ``--overwrite``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from rre_jax import features, gold_rm, relevance, reward, reward_engine, tokenizer as tok_lib
from rre_jax.data import prompts as prompts_lib, templates
from rre_jax.errors import UserError
from rre_jax.evaluate.store import write_atomic

MEANS_OF = ("n_words", "li", "rp", "qr", "ar", "relevance", "proxy", "gold")
_SHOW = 80  # characters of a text quoted in an error


class ScoreError(UserError):
    """Bad input to rre-score; the message names the file, item or flag and the fix."""


# ================================================================================================ request

@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    """What to score and how (the fields of ``rre-score``'s command line, ``rre_jax/cli/score.py``)."""

    eval_set: str
    outputs: str
    reward: str
    out: str
    relevance_encoder: str = ""
    gold_rm: str = ""
    gold_rm_tokenizer: str = ""
    tokenizer: str = ""
    missing_qtype: str = "OPENENDED"
    seed: int = 0
    batch_size: int = 128
    relevance_max_length: int = 512
    gold_rm_max_length: int = 2048
    gold_rm_batch_size: int = 4
    relevance_text: str = "response"
    counterfactual: bool = False  # also every other preset, and QR and AR for every item
    overwrite: bool = False
    quiet: bool = False


def reward_choices() -> list[str]:
    """The presets ``--reward`` accepts: every preset whose query types come with the eval set."""
    return [n for n, s in reward.PRESETS.items() if s.qtype_source != "predicted"]


def summary_path(out: str) -> pathlib.Path:
    """``scores.json`` -> ``scores.summary.json`` (any other name: ``<name>.summary.json``)."""
    path = pathlib.Path(out)
    stem = path.name[:-len(".json")] if path.name.endswith(".json") else path.name
    return path.with_name(f"{stem}.summary.json")


def encoder_dir(value: str) -> str:
    """The relevance-encoder directory for ``--relevance-encoder`` ('minilm': the packaged weights)."""
    try:
        return relevance.encoder_path(value, "--relevance-encoder")
    except ValueError as e:
        raise ScoreError(str(e)) from None


# ================================================================================================ inputs

def _short(text: str) -> str:
    return repr(text if len(text) <= _SHOW else text[:_SHOW] + "...")


def load_eval_set(path: str, missing_qtype: str = "OPENENDED") -> tuple[list[prompts_lib.PromptRecord], int]:
    """(records, how many rows had no qtype and got ``missing_qtype``); bad files raise ``PromptFileError``."""
    rows = prompts_lib.read_rows(path)
    records = prompts_lib.records_from_rows(rows, source=path, missing_qtype=missing_qtype)
    missing = sum(isinstance(row, dict) and row.get("qtype") is None for row, _ in rows)
    return records, missing


def load_outputs(path: str) -> tuple[list[str], list[str]]:
    """(instructions, responses) of an AlpacaEval outputs file; each item needs string fields of both."""
    instructions, responses = [], []
    for index, (row, line) in enumerate(prompts_lib.read_rows(path)):
        where = f"{path}: item {index} (line {line})"
        if not isinstance(row, dict):
            raise ScoreError(f"{where}: expected a JSON object with 'instruction' and 'output', got "
                             f"{type(row).__name__}")
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                got = "missing" if row.get(key) is None else f"a {type(row[key]).__name__}"
                raise ScoreError(f"{where}: field {key!r} is {got}; AlpacaEval outputs need string "
                                 "'instruction' and 'output' (use \"\" for an empty response)")
        instructions.append(row["instruction"])
        responses.append(row["output"])
    return instructions, responses


def check_aligned(records, instructions: Sequence[str], eval_path: str, outputs_path: str) -> None:
    """Outputs must follow the eval set item by item; the error names the first index whose instructions differ."""
    first = next((i for i, (r, s) in enumerate(zip(records, instructions)) if r.instruction != s), None)
    if first is not None:
        raise ScoreError(
            f"{outputs_path} is not aligned with {eval_path}: first mismatch at index {first}: eval instruction "
            f"{_short(records[first].instruction)} vs outputs instruction {_short(instructions[first])}; "
            "write the outputs in eval-set order (one per eval item)")
    if len(records) != len(instructions):
        raise ScoreError(f"{outputs_path} has {len(instructions)} items but {eval_path} has {len(records)} "
                         f"(the first {min(len(records), len(instructions))} agree); one output per eval item")


class Utf8Bytes:
    """A stand-in policy tokenizer whose ids are the UTF-8 bytes of the text (pairs with the identity table)."""

    pad_token_id = 0

    def __call__(self, texts, add_special_tokens: bool = False):
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}


def features_tokenizer(path: str):
    """(tokenizer, byte table, description) for the features: the policy's, or raw UTF-8 bytes."""
    if not path:
        return Utf8Bytes(), tok_lib.identity_byte_table(), "utf-8 bytes (identity table)"
    tok = tok_lib.load_tokenizer(path)
    return tok, tok_lib.byte_table(tok), path


# ================================================================================================ scoring

@dataclasses.dataclass
class Job:
    """Everything checked and loaded before any scoring compute starts."""

    args: ScoreRequest
    spec: reward.RewardSpec
    records: list
    responses: list
    n_missing_qtype: int
    tokenizer: object
    table: object
    tokenizer_desc: str
    encoder_path: str = ""
    encoder: object = None
    gold: object = None


def prepare(args: ScoreRequest) -> Job:
    """Validate flags and files (cheap errors first), then load the tokenizer, gold RM and relevance encoder."""
    out, summary = pathlib.Path(args.out), summary_path(args.out)
    for path in (out, summary):
        if path.exists() and not args.overwrite:
            raise ScoreError(f"{path} exists; pass --overwrite to replace it (or choose another --out)")
    if not out.parent.is_dir():
        raise ScoreError(f"--out {args.out!r}: directory {str(out.parent)!r} does not exist")
    if args.reward not in reward_choices():
        raise ScoreError(f"--reward {args.reward!r}: choose one of {reward_choices()}")
    spec = reward.preset(args.reward)
    if spec.needs_relevance and not args.relevance_encoder:
        raise ScoreError(f"--reward {args.reward} uses relevance (QR/AR) but no --relevance-encoder was given; "
                         "pass a BERT encoder dir or 'minilm', or choose --reward li / li_rp")
    enc = encoder_dir(args.relevance_encoder) if args.relevance_encoder else ""
    if args.relevance_text not in reward_engine.RELEVANCE_TEXTS:
        raise ScoreError(f"--relevance-text {args.relevance_text!r}: choose one of {reward_engine.RELEVANCE_TEXTS}")
    if args.batch_size < 1 or args.gold_rm_batch_size < 1:
        raise ScoreError("--batch-size and --gold-rm-batch-size must be positive")
    records, n_missing = load_eval_set(args.eval_set, args.missing_qtype)
    if not records:
        raise ScoreError(f"{args.eval_set} holds no items; nothing to score")
    instructions, responses = load_outputs(args.outputs)
    check_aligned(records, instructions, args.eval_set, args.outputs)
    tok, table, desc = features_tokenizer(args.tokenizer)
    gold = None
    if args.gold_rm:
        if not os.path.isdir(args.gold_rm):
            raise ScoreError(f"--gold-rm {args.gold_rm!r} is not a directory")
        gold = gold_rm.GoldRM(args.gold_rm, tokenizer_path=args.gold_rm_tokenizer,
                              max_length=args.gold_rm_max_length, batch_size=args.gold_rm_batch_size)
    encoder = None
    if enc:
        try:
            encoder = relevance.RelevanceEncoder.from_pretrained(enc, max_length=args.relevance_max_length,
                                                                 progress=not args.quiet, one_stream_size=True)
        except (OSError, KeyError, ValueError) as e:
            raise ScoreError(f"--relevance-encoder {enc!r}: cannot load a BERT encoder there ({e})") from e
    return Job(args, spec, records, responses, n_missing, tok, table, desc, enc, encoder, gold)


def scored_presets(reward_name: str, have_encoder: bool, counterfactual: bool = True) -> tuple[dict, dict]:
    """(counterfactual specs to compute, {skipped preset: why}); none without ``counterfactual``."""
    todo, skipped = {}, {}
    for name, spec in reward.PRESETS.items():
        if name != reward_name and not counterfactual:
            skipped[name] = "not requested (--counterfactual scores every preset)"
        elif spec.qtype_source == "predicted":
            skipped[name] = "needs predicted query types (label the eval set, then score with 'rer')"
        elif spec.needs_relevance and not have_encoder:
            skipped[name] = "needs --relevance-encoder"
        elif name != reward_name:
            todo[name] = spec
    return todo, skipped


def compute(job: Job) -> dict:
    """``{component: f32[N]}`` (li, rp, n_words, qr, ar, proxy, one per preset) plus ``gold`` when given."""
    args, encoder = job.args, job.encoder
    counterfactual, _ = scored_presets(args.reward, encoder is not None, args.counterfactual)
    qtype_P = np.array([r.qtype_id for r in job.records])
    engine = reward_engine.RewardEngine(
        job.spec, counterfactual, features.feature_tables(job.table), stop_strings=features.DEFAULT_STOPS,
        queries=[templates.relevance_query(r.instruction) for r in job.records],
        references=[r.reference for r in job.records], qtype_P=qtype_P, encoder=encoder, seed=args.seed,
        relevance_text=args.relevance_text, only_composed=not args.counterfactual)
    out = reward_engine.score_texts(engine, job.tokenizer, np.arange(len(job.responses)), job.responses,
                                   batch_size=args.batch_size, progress=not args.quiet)
    out["constrained"] = engine.constrained["proxy"]
    if job.gold is not None:
        out["gold"] = gold_scores(job.gold, [r.instruction for r in job.records], job.responses, args.quiet)
    return out


def gold_scores(gold, instructions, responses, quiet: bool) -> np.ndarray:
    """Gold RM scores in chunks (for the progress bar); raw instructions, as the reference's eval does."""
    step = 16 * gold.batch_size
    chunks = [gold.score(instructions[s:s + step], responses[s:s + step])
              for s in tqdm(range(0, len(responses), step), desc="gold RM", unit="chunk", disable=quiet)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def _num(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def rows_of(job: Job, out: dict) -> list[dict]:
    """One JSON item per eval item (module docstring)."""
    branches = job.spec.needs_answer_relevance
    scored, _ = scored_presets(job.args.reward, job.encoder is not None, job.args.counterfactual)
    preset_names = [n for n in reward.PRESETS if n == job.args.reward or n in scored]
    rows = []
    for i, rec in enumerate(job.records):
        get = lambda k: _num(out[k][i]) if k in out else None  # noqa: E731
        rel = get("ar") if branches and out["constrained"][i] else get("qr")
        rows.append({"index": i, "instruction": rec.instruction, "qtype": rec.qtype, "n_words": int(out["n_words"][i]),
                     "li": get("li"), "rp": get("rp"), "qr": get("qr"), "ar": get("ar"), "relevance": rel,
                     "proxy": get("proxy"), "gold": get("gold"),
                     "presets": {n: get("proxy" if n == job.args.reward else n) for n in preset_names}})
    return rows


def _means(rows: list[dict]) -> dict:
    out = {"n": len(rows)}
    for key in MEANS_OF:
        vals = [r[key] for r in rows if r[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
    for name in (rows[0]["presets"] if rows else {}):
        vals = [r["presets"][name] for r in rows if r["presets"][name] is not None]
        out[f"presets/{name}"] = float(np.mean(vals)) if vals else None
    return out


def summarize(job: Job, rows: list[dict], seconds: float) -> dict:
    """Run settings and means overall and per qtype."""
    _, skipped = scored_presets(job.args.reward, bool(job.encoder_path), job.args.counterfactual)
    a = job.args
    return {
        "n_items": len(rows), "reward": a.reward, "spec": dataclasses.asdict(job.spec),
        "eval_set": a.eval_set, "outputs": a.outputs, "features_tokenizer": job.tokenizer_desc,
        "relevance_encoder": job.encoder_path or None, "relevance_query": "relevance_query(raw instruction)",
        "relevance_text": a.relevance_text, "counterfactual": a.counterfactual,
        "gold_rm": a.gold_rm or None, "gold_rm_random": bool(job.gold is not None and job.gold.is_random),
        "qtype_counts": prompts_lib.qtype_counts(job.records),
        "missing_qtype": {"count": job.n_missing_qtype, "filled_as": a.missing_qtype},
        "empty_responses": sum(not r.strip() for r in job.responses),
        "presets": sorted(rows[0]["presets"]) if rows else [], "skipped_presets": skipped,
        "means": {"all": _means(rows), **{q: _means([r for r in rows if r["qtype"] == q])
                                          for q in prompts_lib.QTYPES}},
        "seconds": round(seconds, 3), "out": os.path.abspath(a.out),
    }


def write_json(path: pathlib.Path, obj) -> None:
    """Atomic: a temporary sibling renamed over ``path``, so a crash never leaves half a file."""
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1, allow_nan=False) + "\n")


def run(request: ScoreRequest) -> dict:
    """Check, score and write; returns the summary. Bad input raises before any scoring compute."""
    job = prepare(request)
    if job.n_missing_qtype:
        print(f"rre-score: {job.n_missing_qtype} of {len(job.records)} eval items have no qtype; scored as "
              f"{request.missing_qtype}", file=sys.stderr)
    t0 = time.perf_counter()
    rows = rows_of(job, compute(job))
    summary = summarize(job, rows, time.perf_counter() - t0)
    write_json(pathlib.Path(request.out), rows)
    write_json(summary_path(request.out), summary)
    return summary
