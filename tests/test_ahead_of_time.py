"""AheadOfTime: the compile-ahead wrapper the trainer's jitted programs run through."""
import jax
import jax.numpy as jnp
import numpy as np

from rre_jax import backend, programs


def test_one_executable_per_signature_and_same_results_as_jit():
    calls = []

    def f(x, y):
        calls.append(1)  # counts traces
        return {"s": x * 2 + y.sum(), "n": y.shape[0]}

    prog = programs.AheadOfTime(jax.jit(f))
    x, y = jnp.arange(4.0), jnp.ones(3)
    a = prog(x, y)
    b = prog(x + 1, y * 2)  # same signature: no new executable, no retrace
    assert prog._cache_size() == 1 and len(calls) == 1
    np.testing.assert_array_equal(a["s"], jax.jit(f)(x, y)["s"])
    np.testing.assert_array_equal(b["s"], (x + 1) * 2 + 6.0)
    prog(x, jnp.ones(5))  # a new shape (e.g. another prompt bucket) compiles a second executable
    prog(x.astype(jnp.int32), y)  # and so does a new dtype
    assert prog._cache_size() == 3


def test_donation_survives_ahead_of_time_compilation():
    prog = programs.AheadOfTime(jax.jit(lambda s, d: jax.tree.map(lambda v: v + d, s), donate_argnums=0))
    state = {"w": jnp.ones((64, 64))}
    out = prog(state, 1.0)
    assert state["w"].is_deleted()  # the donated buffer was handed to the program, as with jax.jit
    np.testing.assert_array_equal(out["w"], 2.0)


def test_sharded_inputs_get_their_own_executable():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    prog = programs.AheadOfTime(jax.jit(lambda x: x * 3))
    x = jnp.arange(8.0)
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    np.testing.assert_array_equal(prog(x), prog(xs))
    assert prog._cache_size() == 2


def test_release_host_memory_runs_malloc_trim_on_linux():
    assert backend.release_host_memory() is True  # CI and the TPU VMs run glibc
