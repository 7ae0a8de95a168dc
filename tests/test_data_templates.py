"""Alpaca template and query recovery (docs/design.md 4.1-4.3): hand-checked cases, and the written definitions
and invariants over every prompt of generated AlpacaFarm / AlpacaEval files."""
import json
import re

import pytest

import generated_prompts as gen
from rre_jax import data
from rre_jax.data import templates

SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.")


def collapse(s):
    return re.sub(r"\s+", " ", s).strip()


def test_alpaca_template_exact():
    assert data.alpaca_prompt("Write a poem.\n\n### Input:\nabout cats") == (
        SYSTEM + "\n\n### Instruction:\nWrite a poem.\n\n### Input:\nabout cats\n\n### Response:")
    assert data.alpaca_prompt("{x} {}").endswith("\n{x} {}\n\n### Response:")  # braces are not format fields


@pytest.mark.parametrize("instruction, expected", [
    ("Write a poem.\n\n### Input:\nabout cats", "Write a poem. about cats"),  # docs/design.md 4.2's example
    # real AlpacaFarm items: " : " becomes a space, a trailing ":" is stripped, code indentation collapses
    ('Write an if-else statement to print "Hello world" if a variable is set to true.\n\n### Input:\n'
     "Boolean variable : x",
     'Write an if-else statement to print "Hello world" if a variable is set to true. Boolean variable x'),
    ("Compose the opening sentence of a story that is set in a dark, spooky forest:",
     "Compose the opening sentence of a story that is set in a dark, spooky forest"),
    ("Generate the missing code for the following program.\n\n### Input:\ndef double(int x):\n  # missing code here",
     "Generate the missing code for the following program. def double(int x): # missing code here"),
    # order matters: "\n " -> "\n" runs before " : " -> " ", so "\n : " keeps its colon
    ("Label\n : value", "Label : value"),
    (": leading colons and spaces go\n", "leading colons and spaces go"),
])
def test_relevance_query_hand_checked(instruction, expected):
    assert data.relevance_query(data.alpaca_prompt(instruction)) == expected


def test_relevance_query_multi_turn_and_eos():
    prompt = data.alpaca_prompt("Hi") + " Hello!</s>### Instruction:\nAnd you?</s>\n\n### Response:"
    assert data.relevance_query(prompt) == "Hi And you?"


def test_starling_query_and_input_exact():
    prompt = data.alpaca_prompt("Write a poem.\n\n### Input:\nabout cats")
    q = data.starling_query(prompt)
    assert q == "Write a poem.\n\nabout cats"
    assert data.starling_query(data.alpaca_prompt("Name it : now:")) == "Name it : now"
    assert data.starling_input(q, "Cats nap.\n") == (
        "<|im_start|>user\n\n\nHuman: Write a poem.\n\nabout cats\n\nAssistant: <|im_end|>\n"
        "<|im_start|>assistant\nCats nap.\n<|im_end|>")
    # the same string composed the way the reference builds it: a chat wrapper around a "Human/Assistant" query
    wrapper = "<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|>"
    assert data.starling_input("{q}", "{r}") == wrapper.format(query="\n\nHuman: {q}\n\nAssistant: ", assistant="{r}")


def spec_relevance_query(prompt: str) -> str:
    """docs/design.md 4.2's recovery of the instruction, step by step as written there."""
    parts = []
    for part in prompt.replace(SYSTEM, "").split("### Instruction"):
        if part.strip():
            part = part.split("### Response")[0].replace("### Input:\n", " ").replace("</s>", "")
            parts.append(part.replace("\n ", "\n").replace(" : ", " ").strip("\n: "))
    return collapse(" ".join(parts))


def spec_starling_query(prompt: str) -> str:
    """docs/design.md 4.3's simpler cleaning for the gold RM, step by step as written there."""
    q = prompt.replace(SYSTEM, "").replace("### Instruction", " ").replace("### Response", " ")
    return q.replace("### Input:\n", " ").replace("\n ", "\n").strip("\n: ")


@pytest.mark.parametrize("layout", ["alpacafarm", "alpaca_eval"])
def test_query_invariants_on_every_generated_prompt(tmp_path, layout):
    """Every prompt of a generated file (inline contexts, Unicode, code with ``"\\n "`` indentation, over-long
    contexts, ``" : "`` labels, trailing colons): both cleanings equal the written definitions, and the
    invariants a reader relies on hold."""
    rows = gen.alpacafarm_records() if layout == "alpacafarm" else gen.alpaca_eval_records()
    path = tmp_path / f"{layout}.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    records = data.load_prompts(path)
    quirky = []  # items the reference's cleaning changes beyond the "### Input:" join and whitespace
    for r in records:
        x, prompt = r.instruction, data.alpaca_prompt(r.instruction)
        q, sq = data.relevance_query(prompt), data.starling_query(prompt)
        assert (q, sq) == (spec_relevance_query(prompt), spec_starling_query(prompt)), r.index
        assert SYSTEM not in q and "###" not in q and "\n" not in q and "  " not in q and q == q.strip()
        assert SYSTEM not in sq and "###" not in sq and sq == sq.strip("\n: ")
        if " : " in x or x.rstrip().endswith(":"):
            quirky.append(r.index)
            assert q != collapse(x.replace("\n\n### Input:\n", " ")), r.index  # the quirk shows
        else:
            assert q == collapse(x.replace("\n\n### Input:\n", " ")), r.index
        if " : " not in x:  # the two cleanings differ only in " : " and in whitespace collapsing
            assert collapse(sq) == q, r.index
        if "\n " not in x and x.strip("\n: ") == x:  # nothing for the cleaning to touch but the context header
            assert sq == x.replace("\n\n### Input:\n", "\n\n"), r.index
    # the data reaches each branch: quirks of both kinds, indented code, contexts, and plain prompts
    assert 0 < len(quirky) < len(records) // 2
    assert any(" : " in r.instruction for r in records) and any(r.instruction.endswith(":") for r in records)
    assert any("\n " in r.instruction for r in records)
    assert any("\n\n### Input:\n" in r.instruction for r in records) == (layout == "alpacafarm")


def test_constants_are_the_reference_roles():
    assert templates.ALPACA_SYSTEM == SYSTEM
    assert (templates.INSTRUCTION_ROLE, templates.RESPONSE_ROLE) == ("### Instruction", "### Response")
