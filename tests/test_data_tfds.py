"""TFDS builders: prepare array_record splits offline from manual_dir and read them back without TensorFlow."""
import json
import sys

import pytest

import generated_prompts as gen
from rre_jax import data
from rre_jax.data import tfds_builders

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    """A generated file of each layout (Unicode, inline contexts, stop strings, empty and over-long texts), plus
    a JSONL AlpacaFarm file with one unlabeled row."""
    d = tmp_path_factory.mktemp("manual")
    farm, evals = gen.alpacafarm_records(40), gen.alpaca_eval_records(40)
    (d / "alpacafarm_val.json").write_text(json.dumps(farm, ensure_ascii=False), encoding="utf-8")
    (d / "alpaca_eval.json").write_text(json.dumps(evals), encoding="utf-8")
    extra = [farm[0], {k: v for k, v in farm[1].items() if k != "qtype"}]
    (d / "alpacafarm_extra.jsonl").write_text("\n".join(json.dumps(r) for r in extra))
    return d


@pytest.fixture(scope="module")
def data_dir(manual_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    for cls in (tfds_builders.AlpacaFarmPrompts, tfds_builders.AlpacaEvalPrompts):
        tfds_builders.build(cls, manual_dir=manual_dir, data_dir=d)
    return d


def test_splits_are_array_record_files(data_dir):
    files = sorted(p.name for p in (data_dir / "alpaca_farm_prompts" / "1.0.0").iterdir())
    assert "alpaca_farm_prompts-alpacafarm_val.array_record-00000-of-00001" in files
    builder = tfds.builder("alpaca_farm_prompts", data_dir=data_dir)
    assert set(builder.info.splits) == {"alpacafarm_val", "alpacafarm_extra"}
    assert builder.info.splits["alpacafarm_val"].num_examples == 40


def test_data_source_round_trip_equals_json_loader(manual_dir, data_dir):
    source = tfds.data_source("alpaca_eval_prompts", split="alpaca_eval", data_dir=data_dir, download=False)
    assert len(source) == 40 and set(source[0]) == {"instruction", "output", "qtype", "dataset", "generator", "index"}
    assert tfds_builders.records_from_data_source(source) == data.load_prompts(manual_dir / "alpaca_eval.json")
    farm = tfds_builders.load_tfds_prompts("alpaca_farm_prompts", "alpacafarm_val", data_dir=data_dir)
    assert farm == data.load_prompts(manual_dir / "alpacafarm_val.json")
    assert "\n\n### Input:\n" in "".join(r.instruction for r in farm)  # inline context survives the round trip
    assert any(r.reference == "" for r in farm) and any(ord(c) > 0xFFFF for r in farm for c in r.reference)
    assert "tensorflow" not in sys.modules  # array_record + data_source needs no TensorFlow


def test_missing_qtype_policy_applies_when_read_back(manual_dir, data_dir):
    recs = tfds_builders.load_tfds_prompts("alpaca_farm_prompts", "alpacafarm_extra", data_dir=data_dir)
    given = json.loads((manual_dir / "alpacafarm_val.json").read_text(encoding="utf-8"))[0]["qtype"]
    assert [r.qtype for r in recs] == [given, "OPENENDED"] and recs[0].instruction != recs[1].instruction
    with pytest.raises(data.PromptFileError, match=r"alpacafarm_extra.*item 1: missing field 'qtype'"):
        tfds_builders.load_tfds_prompts("alpaca_farm_prompts", "alpacafarm_extra", data_dir=data_dir,
                                        missing_qtype="error")


def test_build_errors_name_the_problem(tmp_path):
    empty = tmp_path / "other"
    empty.mkdir()
    (empty / "alpaca_eval.json").write_text("[]")  # the other layout's file only
    with pytest.raises(FileNotFoundError, match=r"no alpacafarm\*\.json or \*\.jsonl file in manual_dir"):
        tfds_builders.build(tfds_builders.AlpacaFarmPrompts, manual_dir=empty, data_dir=tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "alpaca_eval.json").write_text('[{"instruction": "x", "output": "y", "qtype": "MAYBE"}]')
    with pytest.raises(data.PromptFileError, match=r"alpaca_eval\.json: item 0 \(line 1\): unknown qtype 'MAYBE'"):
        tfds_builders.build(tfds_builders.AlpacaEvalPrompts, manual_dir=bad, data_dir=tmp_path / "out2")
