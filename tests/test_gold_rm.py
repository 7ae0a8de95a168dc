"""Gold RM scoring (``gold_rm.GoldRM``) against transformers on tiny random RMs of both layouts.

The reference (Starling-RM-34B as the paper's eval runs it): input string
``"<|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n{assistant}<|im_end|>"`` with
``query = "\\n\\nHuman: {q}\\n\\nAssistant: "``, tokenized without special tokens, truncated on the left to
``max_length``, right padded (``padding='longest'``), batches of 4, score read by the torch model. Tokenizers
are trained here (``rre_jax.tokenizer.train_tokenizer``) and saved beside each RM.
"""
import json

import jax
import numpy as np
import pytest
import torch
import transformers

import hf_fixtures
from rre_jax import gold_rm
from rre_jax.cli import score as score_cmd
from rre_jax import tokenizer as tok_lib
from rre_jax.data import templates

torch.set_num_threads(1)
MAX_LEN = 64

INSTRUCTIONS = [
    "What is the capital of France?",
    "Write a poem.\n\n### Input:\nabout cats",
    "List three colours: red, green and ...",
    "Summarise: « l'été dernier » — a story of café owners in Zürich, 日本 and 🐱 included. " * 3,
    "Explain:\n gravity",
]
RESPONSES = ["Paris.", "Cats purr,\nsoft and warm.", "", "A long answer " * 12, "Mass bends space-time."]


def reference_text(prompt: str, response: str) -> str:
    """The reference's Starling input, spelled out: its query cleaning, the Human/Assistant query, the template."""
    q = prompt.replace(templates.ALPACA_SYSTEM, "").replace("### Instruction", " ")
    q = q.replace("### Input:\n", " ").replace("\n ", "\n").replace("### Response", " ").strip("\n: ")
    query = f"\n\nHuman: {q}\n\nAssistant: "
    return "<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|>".format(
        query=query, assistant=response)


def reference_scores(model, tok_dir, texts, layout, batch_size=4):
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir, padding_side="right")
    tok.truncation_side = "left"
    out, ids_all = [], []
    for s in range(0, len(texts), batch_size):
        x = tok(texts[s:s + batch_size], truncation=True, max_length=MAX_LEN, padding="longest",
                add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            if layout == "starling":
                got = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"])["scores"]
            else:
                got = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits[:, 0]
        out.extend(got.numpy().tolist())
        ids_all += [r[m.bool()].tolist() for r, m in zip(x["input_ids"], x["attention_mask"])]
    return np.array(out, np.float64), ids_all


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A trained SentencePiece-style tokenizer and a tiny random RM of each layout (tokenizer saved beside it)."""
    root = tmp_path_factory.mktemp("gold_rm")
    corpus = INSTRUCTIONS + RESPONSES + [reference_text(p, r) for p, r in zip(INSTRUCTIONS, RESPONSES)]
    tok = tok_lib.train_tokenizer(corpus * 4, "sentencepiece", 400, root / "tok")
    models = {}
    for seed, (layout, build) in enumerate((("seq_cls", hf_fixtures.seq_cls), ("starling", hf_fixtures.starling))):
        model = build(seed=3 + seed, vocab_size=len(tok))
        d = root / layout
        hf_fixtures.save(model, d)
        tok.save_pretrained(str(d))
        models[layout] = (model, str(d))
    return tok, models, root


def test_starling_input_string_is_the_reference_construction():
    prompts = INSTRUCTIONS + [templates.alpaca_prompt(i) for i in INSTRUCTIONS]
    responses = RESPONSES * 2
    gold = gold_rm.GoldRM.__new__(gold_rm.GoldRM)  # inputs() needs no weights
    assert gold.inputs(prompts, responses) == [reference_text(p, r) for p, r in zip(prompts, responses)]
    # eval (raw instruction, as eval_monotonicity.py) and training (templated prompt) give the same string
    assert gold.inputs(INSTRUCTIONS, RESPONSES) == gold.inputs(prompts[len(INSTRUCTIONS):], RESPONSES)


@pytest.mark.parametrize("layout", ["seq_cls", "starling"])
def test_scores_match_transformers(assets, layout):
    tok, models, _ = assets
    model, path = models[layout]
    gold = gold_rm.GoldRM(path, max_length=MAX_LEN, batch_size=4)
    assert gold.layout == layout
    texts = [reference_text(p, r) for p, r in zip(INSTRUCTIONS, RESPONSES)]
    want, want_ids = reference_scores(model, path, texts, layout)
    # the same token ids: no special tokens, left truncation keeps the end of the string
    got_ids = gold.tokenizer(gold.inputs(INSTRUCTIONS, RESPONSES), add_special_tokens=False, truncation=True,
                             max_length=MAX_LEN)["input_ids"]
    assert got_ids == want_ids
    full = tok(texts, add_special_tokens=False)["input_ids"]
    assert any(len(f) > MAX_LEN for f in full) and any(len(f) < MAX_LEN for f in full)
    assert all(g == f[-MAX_LEN:] for g, f in zip(got_ids, full))
    got = gold.score(INSTRUCTIONS, RESPONSES)
    err = np.abs(got - want).max()
    print(f"gold RM {layout}: max |jax - torch| = {err:.2e} over scores of magnitude {np.abs(want).max():.2f}")
    assert err <= 1e-4, f"{layout}: max |jax - torch| = {err:.2e}"
    # batch padding is invisible: one row at a time gives the same scores
    alone = np.concatenate([gold.score([p], [r]) for p, r in zip(INSTRUCTIONS, RESPONSES)])
    np.testing.assert_allclose(alone, got, rtol=0, atol=1e-5)


def test_missing_tokenizer_is_a_clear_error(assets, tmp_path):
    _, models, _ = assets
    bare = tmp_path / "rm_without_tokenizer"
    hf_fixtures.save(models["starling"][0], bare)
    with pytest.raises(FileNotFoundError, match="gold RM tokenizer not found in .*rm_without_tokenizer"):
        gold_rm.GoldRM(str(bare))
    eval_path, out_path = tmp_path / "eval.json", tmp_path / "out.json"
    eval_path.write_text(json.dumps([{"instruction": "q", "output": "a", "qtype": "OPENENDED"}]))
    out_path.write_text(json.dumps([{"instruction": "q", "output": "r"}]))
    with pytest.raises(FileNotFoundError, match="gold RM tokenizer not found"):
        score_cmd.run(["--eval-set", str(eval_path), "--outputs", str(out_path), "--reward", "li",
                   "--gold-rm", str(bare), "--out", str(tmp_path / "s.json")])
    assert not (tmp_path / "s.json").exists()
    # a separate tokenizer dir fixes it
    gold = gold_rm.GoldRM(str(bare), tokenizer_path=models["starling"][1], max_length=MAX_LEN)
    assert gold.layout == "starling"


def test_rre_score_gold_column_is_the_reference_eval(assets, tmp_path):
    """rre-score feeds the raw eval instruction to the gold RM, as eval_monotonicity.py does."""
    _, models, _ = assets
    model, path = models["starling"]
    eval_path, out_path = tmp_path / "eval.json", tmp_path / "out.json"
    eval_path.write_text(json.dumps([{"instruction": i, "output": "ref", "qtype": "OPENENDED"} for i in INSTRUCTIONS]))
    out_path.write_text(json.dumps([{"instruction": i, "output": r} for i, r in zip(INSTRUCTIONS, RESPONSES)]))
    summary = score_cmd.run(["--eval-set", str(eval_path), "--outputs", str(out_path), "--reward", "li_rp",
                         "--gold-rm", path, "--gold-rm-max-length", str(MAX_LEN), "--out", str(tmp_path / "s.json"),
                         "--quiet"])
    rows = json.loads((tmp_path / "s.json").read_text())
    want, _ = reference_scores(model, path, [reference_text(i, r) for i, r in zip(INSTRUCTIONS, RESPONSES)],
                               "starling")
    np.testing.assert_allclose([r["gold"] for r in rows], want, rtol=0, atol=1e-4)
    assert summary["means"]["all"]["gold"] == pytest.approx(float(np.mean([r["gold"] for r in rows])))


def test_host_placement_scores_like_device_placement(assets):
    """gold_rm.placement='host': weights stay in host memory and are brought onto the mesh per score() call."""
    from rre_jax import mesh as mesh_lib
    _, models, _ = assets
    _, path = models["starling"]
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(2, 2, 2)))
    on_device = gold_rm.GoldRM(path, max_length=MAX_LEN, batch_size=4, mesh=mesh)
    on_host = gold_rm.GoldRM(path, max_length=MAX_LEN, batch_size=4, mesh=mesh, placement="host")
    host = jax.devices("cpu")[0]
    assert all(x.sharding == jax.sharding.SingleDeviceSharding(host) for x in jax.tree.leaves(on_host.model.params))
    np.testing.assert_allclose(on_host.score(INSTRUCTIONS, RESPONSES), on_device.score(INSTRUCTIONS, RESPONSES),
                               rtol=1e-6, atol=1e-6)
    for exe in on_host.programs.executables().values():  # the program took the weights sharded over the mesh
        for compiled in exe._executables.values():
            assert any(len(s.device_set) > 1 for s in jax.tree.leaves(compiled.input_shardings[0][0]))
    assert all(x.sharding == jax.sharding.SingleDeviceSharding(host) for x in jax.tree.leaves(on_host.model.params))
    with pytest.raises(ValueError, match="placement"):
        gold_rm.GoldRM(path, placement="disk")
