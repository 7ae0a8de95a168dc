"""Tests stand alone: a plain clone runs the whole suite, so no test reads the paper's prompt files
beside the checkout (``../shared/data``, CC BY-NC; benchmarks may). Tests generate inputs of the same kinds
instead (tests/generated_prompts.py)."""
import pathlib
import re

import generated_prompts as gen

TESTS = pathlib.Path(__file__).resolve().parent
# '../shared', 'shared/data' (either slash), a path built as  ... "shared" / "data", the old fixture's names
OUTSIDE = re.compile(r"\.\.[/\\]shared\b|\bshared[/\\]+data\b|[\"']shared[\"']\s*/|\bshared_data\b|\bSHARED_DATA\b")


def test_the_pattern_catches_every_spelling():
    for line in ('json.loads(open("../shared/data/alpaca_eval.json").read())', "REPO.parent / 'shared' / 'data'",
                 'def test_x(shared_data):', 'SHARED_DATA = ROOT', r'p = "..\\shared\\data"', "see shared/data/README"):
        assert OUTSIDE.search(line), line
    for line in ('"--workdir", "/shared/runs/rer"', "a shared critic", "shared_fixtures", "data/eval_prompts.json"):
        assert not OUTSIDE.search(line), line


def test_no_test_reads_files_beside_the_checkout():
    me = pathlib.Path(__file__).resolve()
    files = [p for p in sorted(TESTS.rglob("*.py")) if p.resolve() != me]
    assert len(files) > 50 and TESTS / "conftest.py" in files
    hits = [f"{p.relative_to(TESTS)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "tests must not read ../shared (generate inputs: tests/generated_prompts.py):\n" + "\n".join(hits)


def test_generated_files_are_deterministic_and_hold_every_kind():
    """The generator is the tests' data: the same rows on every call, and the kinds the tests rely on."""
    farm, evals = gen.alpacafarm_records(), gen.alpaca_eval_records()
    assert farm == gen.alpacafarm_records() and evals == gen.alpaca_eval_records()
    assert gen.alpaca_eval_records(50) == evals[:50] and farm != gen.alpacafarm_records(seed=5)
    assert all(set(r) == {"input", "output", "qtype"} for r in farm)
    assert all(set(r) == {"instruction", "output", "qtype", "dataset", "generator"} for r in evals)
    answers = [r["output"] for r in farm + evals]
    for stop in gen.STOP_STRINGS:  # each stop string first (after any leading space) and inside a text
        assert any(a.lstrip(" ").startswith(stop) for a in answers), repr(stop)
        assert any(stop in a.strip() and not a.strip().startswith(stop) for a in answers), repr(stop)
    assert any("\n" * 6 in a for a in answers)  # runs of newlines longer than the stop string
    assert "" in answers and any(a and not a.strip() for a in answers)
    assert max(len(a.encode()) for a in answers) > 3000 and max(len(a.encode()) for a in answers) < 5000
    assert sum("\n\n### Input:\n" in r["input"] for r in farm) > len(farm) // 2
    assert max(len(r["input"]) for r in farm) > 2500  # far past 512 tokens for any tokenizer here
    text = "".join(answers) + "".join(r["input"] for r in farm) + "".join(r["instruction"] for r in evals)
    for chars in ("é", "\u0301", "日", "😀", "\u200d", "\u200b", "—", "“", "\u05e9", "\u0645", "\u200f", "```", "1. "):
        assert chars in text, repr(chars)
    for rows in (farm, evals):
        assert {r["qtype"] for r in rows} == {"OPENENDED", "CONSTRAINED"}
    assert {r["dataset"] for r in evals} == set(gen.DATASETS)
