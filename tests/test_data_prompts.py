"""Prompt files: both layouts, JSON and JSONL, the missing-qtype policy, and errors that locate the bad row."""
import json
import logging

import pytest

import generated_prompts as gen
from rre_jax import data
from rre_jax.data import prompts

ROW = {"input": "Say hi.", "output": "Hi!", "qtype": "OPENENDED"}


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_generated_files_load_field_for_field(tmp_path, ensure_ascii):
    """Both layouts as written (``\\u`` escapes or raw UTF-8): every field of every row comes back unchanged
    (Unicode, inline contexts, empty and whitespace-only answers), in file order, with the file's qtype counts."""
    farm_rows, eval_rows = gen.alpacafarm_records(), gen.alpaca_eval_records()
    farm = data.load_prompts(_write(tmp_path, "farm.json", json.dumps(farm_rows, ensure_ascii=ensure_ascii)))
    evals = data.load_prompts(_write(tmp_path, "eval.json", json.dumps(eval_rows, ensure_ascii=ensure_ascii)))
    for recs, rows in ((farm, farm_rows), (evals, eval_rows)):
        counts = prompts.qtype_counts(recs)
        assert counts == {q: sum(r["qtype"] == q for r in rows) for q in ("OPENENDED", "CONSTRAINED")}
        assert min(counts.values()) > 0 and sum(counts.values()) == len(rows)
        assert [r.index for r in recs] == list(range(len(rows)))
        assert [r.qtype_id for r in recs] == [int(r["qtype"] == "CONSTRAINED") for r in rows]  # as the reward reads it
    assert [(r.instruction, r.reference, r.qtype, r.dataset, r.generator) for r in farm] == [
        (row["input"], row["output"], row["qtype"], "", "") for row in farm_rows]
    assert [(r.instruction, r.reference, r.qtype, r.dataset, r.generator) for r in evals] == [
        (row["instruction"], row["output"], row["qtype"], row["dataset"], row["generator"]) for row in eval_rows]
    # what the rows hold survives: inline contexts, non-ASCII text, empty and whitespace-only answers
    assert sum("\n\n### Input:\n" in r.instruction for r in farm) > len(farm) // 2
    assert any(ord(c) > 0xFFFF for r in evals for c in r.reference)  # astral-plane emoji (surrogates in JSON)
    assert any(r.reference == "" for r in evals) and any(r.reference and not r.reference.strip() for r in farm)


def test_jsonl_equals_json(tmp_path):
    rows = gen.alpaca_eval_records(50)
    json_file = _write(tmp_path, "p.json", json.dumps(rows, ensure_ascii=False, indent=2))
    jsonl = _write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert data.load_prompts(jsonl) == data.load_prompts(json_file)
    assert [r.reference for r in data.load_prompts(jsonl)] == [r["output"] for r in rows]


def test_malformed_json_names_file_line_and_column(tmp_path):
    text = '[\n  {"input": "a", "output": "b", "qtype": "OPENENDED"},\n  {"input": "c" "output": "d"}\n]'
    path = _write(tmp_path, "bad.json", text)
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    assert ref.value.lineno == 3
    with pytest.raises(data.PromptFileError, match=f"{path}:3:{ref.value.colno}: .*line 3, column {ref.value.colno}"):
        data.load_prompts(path)


def test_missing_comma_between_items_and_trailing_data(tmp_path):
    item = json.dumps(ROW)
    with pytest.raises(data.PromptFileError, match=r"bad\.json:3:1: .*expected ',' or '\]'"):
        data.load_prompts(_write(tmp_path, "bad.json", f"[\n{item}\n{item}]"))
    with pytest.raises(data.PromptFileError, match=r"tail\.json:2:1: .*extra data"):
        data.load_prompts(_write(tmp_path, "tail.json", f"[{item}]\n]"))
    with pytest.raises(data.PromptFileError, match=r"obj\.json:1:1: .*use \.jsonl"):
        data.load_prompts(_write(tmp_path, "obj.json", item))


def test_malformed_jsonl_names_line_of_bad_record(tmp_path):
    good = json.dumps(ROW)
    path = _write(tmp_path, "bad.jsonl", f"{good}\n\n{good}\n{{\"input\": \"x\",}}\n")
    with pytest.raises(data.PromptFileError, match=r"bad\.jsonl:4:\d+: malformed JSON record on line 4"):
        data.load_prompts(path)


def test_missing_field_names_file_item_line_and_field(tmp_path):
    rows = [ROW, ROW, {"input": "x", "qtype": "CONSTRAINED"}]
    path = _write(tmp_path, "p.json", json.dumps(rows, indent=1))
    with pytest.raises(data.PromptFileError, match=rf"{path}: item 2 \(line 12\): missing field 'output'"):
        data.load_prompts(path)
    with pytest.raises(data.PromptFileError, match="item 0 .*exactly one of the fields 'input'.* or 'instruction'"):
        data.load_prompts(_write(tmp_path, "q.jsonl", json.dumps({"prompt": "x", "output": "y"})))
    with pytest.raises(data.PromptFileError, match="item 0 .*field 'output' must be a string, got int"):
        data.load_prompts(_write(tmp_path, "r.jsonl", json.dumps({**ROW, "output": 3})))
    mixed = [ROW, {"instruction": "x", "output": "y", "qtype": "OPENENDED"}]
    with pytest.raises(data.PromptFileError, match="item 1 .*uses field 'instruction' but earlier items use 'input'"):
        data.load_prompts(_write(tmp_path, "m.json", json.dumps(mixed)))


def test_unknown_qtype_is_an_error_naming_value_and_index(tmp_path):
    path = _write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in [ROW, {**ROW, "qtype": "openended"}]))
    with pytest.raises(data.PromptFileError, match=r"item 1 \(line 2\): unknown qtype 'openended'.*OPENENDED"):
        data.load_prompts(path)


def test_missing_qtype_policy(tmp_path, caplog):
    bare = {k: v for k, v in ROW.items() if k != "qtype"}
    path = _write(tmp_path, "p.json", json.dumps([bare, {**ROW, "qtype": "CONSTRAINED"}, bare]))
    with caplog.at_level(logging.WARNING, logger="rre_jax.data.prompts"):
        recs = data.load_prompts(path)
    assert [r.qtype for r in recs] == ["OPENENDED", "CONSTRAINED", "OPENENDED"]
    assert "2 of 3 items have no 'qtype'; set to OPENENDED" in caplog.text and "[0, 2]" in caplog.text
    assert [r.qtype for r in data.load_prompts(path, missing_qtype="CONSTRAINED")] == ["CONSTRAINED"] * 3
    with pytest.raises(data.PromptFileError, match=r"item 0 \(line 1\): missing field 'qtype'"):
        data.load_prompts(path, missing_qtype="error")
    with pytest.raises(ValueError, match="missing_qtype='skip'"):
        data.load_prompts(path, missing_qtype="skip")


def test_empty_list_and_missing_file(tmp_path):
    assert data.load_prompts(_write(tmp_path, "e.json", " [ ] \n")) == []
    with pytest.raises(data.PromptFileError, match="does not exist"):
        data.load_prompts(tmp_path / "nope.json")


def test_tiny_prompt_set_loads_and_is_balanced():
    recs = data.load_prompts(data.tiny_prompts_path())
    counts = prompts.qtype_counts(recs)
    assert len(recs) == 64 and counts["OPENENDED"] >= 24 and counts["CONSTRAINED"] >= 24
    assert len({r.instruction for r in recs}) == 64
    assert all(r.reference.strip() and r.dataset and r.generator for r in recs)
    assert max(len(r.instruction) for r in recs) < 200
