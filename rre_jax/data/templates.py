"""Chat templates: the Alpaca policy prompt, and the query recovered from it for relevance and the gold RM.

The reward needs the user's query ``q`` back from the templated prompt the policy saw. The paper's reference
recovers it with string surgery whose exact order matters (docs/design.md 4.2, 4.3); the functions here reproduce
it step by step, so QR and the Starling-RM input see the same text the reference scored.
"""
from __future__ import annotations

import re

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
INSTRUCTION_ROLE = "### Instruction"
RESPONSE_ROLE = "### Response"
INPUT_HEADER = "### Input:\n"

STARLING_TEMPLATE = (
    "<|im_start|>user\n\n\nHuman: {q}\n\nAssistant: <|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>")


def alpaca_prompt(instruction: str) -> str:
    """The Alpaca policy prompt (docs/design.md 4.1), ending in ``"### Response:"`` with no trailing space/newline."""
    return f"{ALPACA_SYSTEM}\n\n{INSTRUCTION_ROLE}:\n{instruction}\n\n{RESPONSE_ROLE}:"


def relevance_query(prompt_text: str) -> str:
    """The query ``q`` for QR, recovered from a templated prompt exactly as the reference does (docs/design.md 4.2).

    Remove the system sentence; split on ``"### Instruction"``; for each non-blank part keep what precedes
    ``"### Response"``, turn ``"### Input:\\n"`` into a space, delete ``"</s>"``, turn ``"\\n "`` into ``"\\n"``
    and ``" : "`` into ``" "`` (in that order), strip ``"\\n: "`` characters from both ends; join the parts with
    spaces and collapse whitespace runs. ``"Write a poem.\\n\\n### Input:\\nabout cats"`` -> ``"Write a poem. about
    cats"``.
    """
    parts = []
    for part in prompt_text.replace(ALPACA_SYSTEM, "").split(INSTRUCTION_ROLE):
        if not part.strip():
            continue
        part = part.split(RESPONSE_ROLE)[0]
        part = part.replace(INPUT_HEADER, " ").replace("</s>", "").replace("\n ", "\n")
        parts.append(part.replace(" : ", " ").strip("\n: "))
    return re.sub(r"\s+", " ", " ".join(parts)).strip()


def starling_query(prompt_text: str) -> str:
    """The simpler query cleaning in front of the Starling gold RM (docs/design.md 4.3), in the reference's order.

    Remove the system sentence; ``"### Instruction"`` -> space; ``"### Input:\\n"`` -> space; ``"\\n "`` -> ``"\\n"``;
    ``"### Response"`` -> space; strip ``"\\n: "`` characters from both ends. Inner newlines are kept.
    """
    q = prompt_text.replace(ALPACA_SYSTEM, "").replace(INSTRUCTION_ROLE, " ")
    q = q.replace(INPUT_HEADER, " ").replace("\n ", "\n")
    return q.replace(RESPONSE_ROLE, " ").strip("\n: ")


def starling_input(q: str, response: str) -> str:
    """The Starling-RM input string for query ``q`` (from `starling_query`) and a response; no special tokens."""
    return STARLING_TEMPLATE.format(q=q, response=response)
