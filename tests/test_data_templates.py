"""Alpaca template and query recovery (docs/design.md 4.1-4.3): hand-checked cases and invariants over real prompts."""
import re

import pytest

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


@pytest.mark.parametrize("name", ["alpacafarm_val.json", "alpaca_eval.json"])
def test_query_invariants_on_every_real_prompt(shared_data, name):
    records = data.load_prompts(shared_data / name)
    quirky = []  # items the reference's cleaning changes beyond the "### Input:" join and whitespace
    for r in records:
        x, prompt = r.instruction, data.alpaca_prompt(r.instruction)
        q, sq = data.relevance_query(prompt), data.starling_query(prompt)
        assert SYSTEM not in q and "###" not in q and "\n" not in q and "  " not in q and q == q.strip()
        assert SYSTEM not in sq and "###" not in sq and sq == sq.strip("\n: ")
        if " : " in x or x.rstrip().endswith(":"):
            quirky.append(r.index)
        else:
            assert q == collapse(x.replace("\n\n### Input:\n", " ")), r.index
        if " : " not in x:  # the two cleanings differ only in " : " and in whitespace collapsing
            assert collapse(sq) == q, r.index
        if "\n " not in x and x.strip("\n: ") == x:  # nothing for the cleaning to touch but the context header
            assert sq == x.replace("\n\n### Input:\n", "\n\n"), r.index
    expected = {"alpacafarm_val.json": [234, 241, 1402, 1674, 1922],
                "alpaca_eval.json": [376, 476, 481, 482, 573, 582]}[name]
    assert quirky == expected


def test_constants_are_the_reference_roles():
    assert templates.ALPACA_SYSTEM == SYSTEM
    assert (templates.INSTRUCTION_ROLE, templates.RESPONSE_ROLE) == ("### Instruction", "### Response")
