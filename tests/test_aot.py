"""The tiny config's programs compiled by XLA's TPU compiler (libtpu) for a v5e 2x2 topology, on this CPU host:
the shardings the executables were compiled with, and the per-device bytes XLA reports."""
import json
import math
import re
import subprocess
import sys

import jax
import pytest
from jax.sharding import NamedSharding

from rre_jax import aot, mesh as mesh_lib, policy, programs, relevance, run_spec, topology
from rre_jax.configs import tiny as tiny_config
from rre_jax.models import bert, llama

pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is part of the test extra")

TOPOLOGY = "v5e:2x2"
MESH = (1, 2, 2)  # every mesh axis but data splits something: fsdp the embed dims, tensor heads / MLP / vocab


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(config, layout, {program: Program}, {program: executable}) for the tiny config on the topology.

    The policy is the tiny one widened so that every weight shard fills whole TPU tiles (XLA lays out the two
    minor dimensions in tiles of 8 x 128 for 32-bit types): per-device bytes then measure the sharding, not
    the padding of 64-wide shards."""
    arch = tmp_path_factory.mktemp("arch")
    wide = llama.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4)
    (arch / "config.json").write_text(json.dumps(wide.to_hf()))
    cfg = tiny_config.get_config()
    cfg.plan.policy, cfg.model.lora.rank = str(arch), 128
    cfg.mesh.shape, cfg.mesh.topology = MESH, TOPOLOGY
    mesh, devices = aot.mesh_for(mesh_lib.MeshConfig.from_config(cfg.mesh), TOPOLOGY)
    assert len(devices) == 4 and devices[0].platform == "tpu"
    spec = run_spec.validate(cfg, num_devices=len(devices))
    lay = programs.Layout(mesh, spec.mesh.rules)
    pcfg, _, rcfg = aot._architectures(cfg, spec)
    progs, _ = aot._programs(cfg, spec, lay, pcfg, None, rcfg, needs_relevance=False)
    return cfg, lay, progs, {name: p.compile() for name, p in progs.items()}


def _paths(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    return {jax.tree_util.keystr(k): v for k, v in leaves}


def _expect(lay, compiled_tree, logical_specs, ndims):
    """Every compiled sharding equals the one the logical rules give (as a layout of an array of that rank)."""
    want = _paths(lay.tree(logical_specs))
    got = _paths(compiled_tree)
    assert set(got) == set(want)
    for k in want:
        assert got[k].is_equivalent_to(want[k], ndims[k]), f"{k}: compiled {got[k].spec}, rule {want[k].spec}"
    return got


def _split(shardings, abstract, key):
    """How many ways each dimension of leaf ``key`` is split by its compiled sharding."""
    shape = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}[key]
    return tuple(n // s for n, s in zip(shape, shardings[key].shard_shape(shape)))


def _ndims(tree):
    return {jax.tree_util.keystr(k): len(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_tiny_programs_compile_for_tpu(compiled):
    _, _, progs, exes = compiled
    assert set(exes) == {"init", "cache", "sampler", "experience", "update", "features"}
    for name, exe in exes.items():
        m = exe.memory_analysis()
        assert m.argument_size_in_bytes + m.output_size_in_bytes > 0, name
        flops, _ = aot.cost(exe)
        assert name in ("init", "cache") or flops > 0, name


def test_parameter_lora_moment_and_cache_shardings_follow_the_rules(compiled):
    """Read from the executables' input / output shardings: base weights, LoRA adapters, both Adam moments and
    the KV cache are laid out as their logical names and the rules say -- and really split (not replicated)."""
    cfg, lay, progs, exes = compiled
    pspec = _pspec(cfg)
    _, base_specs = programs.llama_params(pspec.cfg)
    base = _expect(lay, exes["experience"].input_shardings[0][1], base_specs, _ndims(progs["experience"].args[1]))
    assert _split(base, progs["experience"].args[1], "['layers']['q_proj']['kernel']") == (1, 2, 2)
    assert _split(base, progs["experience"].args[1], "['embedding']") == (2, 2)  # (vocab, embed)

    state_in, state_out = exes["update"].input_shardings[0][0], exes["update"].output_shardings[0]
    st = progs["update"].args[0]
    lora_specs = programs.trainable_specs(pspec, base_specs)["lora"]
    for tree in (state_in, state_out):
        lora = _expect(lay, tree["trainable"]["lora"], lora_specs, _ndims(st["trainable"]["lora"]))
        assert _split(lora, st["trainable"]["lora"], "['layers']['q_proj']['a']") == (1, 2, 1)
        adam = tree["opt_state"][1][0]  # chain(clip_by_global_norm, adam): ScaleByAdamState(count, mu, nu)
        for moment in (adam.mu, adam.nu):
            _expect(lay, moment["lora"], lora_specs, _ndims(st["trainable"]["lora"]))
        assert adam.count.is_fully_replicated

    cache_specs = programs.cache_specs(pspec.cfg)
    cache_nd = _ndims(progs["sampler"].args[5])
    for tree in (exes["sampler"].input_shardings[0][5], exes["sampler"].output_shardings[1]):
        cache = _expect(lay, tree, cache_specs, cache_nd)
        # rows over data x fsdp, kv heads over tensor
        assert _split(cache, progs["sampler"].args[5], "['k'][0]") == (2, 2, 1, 1)
    assert progs["sampler"].donate == (5,) and progs["update"].donate == (0,)


def _pspec(cfg):
    spec = run_spec.validate(cfg, num_devices=4)
    return policy.PolicySpec(aot._architectures(cfg, spec)[0], spec.mode, spec.lora)


def test_update_argument_bytes_are_the_sharded_share(compiled):
    """XLA's per-device argument bytes of the update are each leaf's total over the devices it is split on
    (within 10%: XLA pads the few small leaves -- norms, value head, scalars -- to whole tiles); a replicated
    weight would show up as up to 4x."""
    _, _, progs, exes = compiled
    args = progs["update"].args
    share = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(args))
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(args))
    xla = exes["update"].memory_analysis().argument_size_in_bytes
    assert abs(xla - share) <= 0.1 * share, (xla, share)
    assert xla < 0.6 * total, "most argument bytes are split over the 4 devices"


def _rre_train(*args, cwd):
    return subprocess.run([sys.executable, "-m", "rre_jax.cli.train", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=900)


def test_compile_only_cli_writes_nothing_but_the_report(tmp_path):
    """``rre-train --compile_only`` on the tiny config (li, with RER and the other presets as counterfactuals, so
    the relevance encoder too) for v5e 2x2: exit 0, one table row per program that fits, the roofline phases, and
    the workdir holds the report alone."""
    work = tmp_path / "W"
    out = _rre_train("--config", "tiny:li", "--workdir", str(work), "--compile_only", "--config.mesh.shape=1,2,2",
                     "--config.mesh.topology=v5e:2x2", f"--compile_report={work / 'report.json'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in work.iterdir()) == ["report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["W"]
    rep = json.loads((work / "report.json").read_text())
    assert rep["fits"] and rep["devices"] == 4 and rep["chip"]["kind"] == "TPU v5 lite"
    assert [r["name"] for r in rep["programs"]] == ["init", "cache", "sampler", "experience", "update", "features",
                                                    "relevance", "gold"]
    for phase in ("rollout", "experience", "update"):
        assert rep["phases"][phase]["flops"] > 0, phase
        assert re.search(rf"^{phase} .* \d+\.\d+$", out.stdout, re.M), out.stdout


def test_compile_only_names_a_bad_topology(tmp_path):
    out = _rre_train("--config", "tiny", "--workdir", str(tmp_path / "W"), "--compile_only",
                     "--config.mesh.topology=v5x:2x2", cwd=tmp_path)
    assert out.returncode == 2
    assert "config.mesh.topology='v5x:2x2'" in out.stderr and "v5e:2x4" in out.stderr, out.stderr
    assert not (tmp_path / "W").exists()


def test_decode_loop_gathers_no_weights(compiled):
    """The decode step is weight-stationary (``mesh.decode_rules``): every all-gather XLA placed in it moves one
    token's activations, none a weight (here each gathered weight would be at least 512 x 256 values: the
    smallest matrix, 512 x 512, split over tensor = 2). Gathering weights at every step is what XLA does when the
    activations' batch is sharded over fsdp too."""
    exe = compiled[3]["sampler"]
    shape = re.compile(r"= (?:bf16|f32|s32|u32)\[([0-9,]*)\]")
    sizes = [math.prod(int(d) for d in shape.search(line).group(1).split(",") if d)
             for line in exe.as_text().splitlines() if " all-gather(" in line and "decode_step" in line]
    assert sizes, "the decode step moves activations over fsdp: some all-gather is expected"
    assert max(sizes) < 512 * 256, sorted(sizes)[-5:]


def test_relevance_encoder_of_a_multi_host_v5e_run_compiles():
    """In a run over several hosts each host encodes its own responses, on one of its own devices: XLA's TPU
    compiler takes a program over a whole v5e slice or over one chip, but not over one host's four chips of a
    v5e 4x8, v5e-32's topology (limited ICI routing: the RET_CHECK that stopped v5e-32's --compile_only when the
    encoder ran on a host's part of the mesh)."""
    devices = topology.topology_devices("v5e:4x8")
    assert len({d.process_index for d in devices}) > 1  # a multi-host slice
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(1, -1, 1)), devices)
    where = relevance.encoder_mesh(mesh, process=0)
    cfg = bert.BertConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=256, max_position_embeddings=128)
    progs = relevance.encoder_programs(cfg, mesh=where, rules=mesh_lib.DEFAULT_RULES, max_length=64)
    programs.build_relevance(progs.layout, progs.cfg, 4, 64).compile()  # the program `progs.padded` runs
    assert where.size == 1 and where.devices.flat[0].process_index == 0
