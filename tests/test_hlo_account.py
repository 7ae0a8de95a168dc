"""``rre_jax.hlo_account``: a compiled program's bytes split op by op, summing to XLA's own figure."""
import jax
import jax.numpy as jnp
import pytest
from jax import lax

from rre_jax import hlo_account


def _loop_program(n: int):
    def f(w_DxD, x_BxD):
        def body(i, x):
            return jnp.tanh(x @ w_DxD) + x
        return lax.fori_loop(0, n, body, x_BxD)
    w, x = jnp.ones((256, 256)), jnp.ones((8, 256))
    return jax.jit(f).lower(w, x).compile()


def test_rows_sum_to_xla_bytes_and_flops():
    """Each op costed alone by XLA's cost analysis: the rows (every loop body once) sum to XLA's figure for the
    whole program, and a loop of 7 steps is found with its trip count."""
    exe = _loop_program(7)
    rows = hlo_account.account(exe.as_text())
    xla = exe.cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    tot = hlo_account.totals(rows)
    assert tot["bytes_once"] == pytest.approx(xla["bytes accessed"], rel=1e-6)
    assert sum(r.flops for r in rows) == pytest.approx(xla["flops"], rel=1e-6)
    assert sorted(hlo_account.loops(rows).values()) == [7]
    # the matmul runs 7 times: 2 x 8 x 256 x 256 FLOPs each
    assert tot["flops"] >= 7 * 2 * 8 * 256 * 256


def test_loop_rows_scale_with_trips():
    """Per call, a loop body's bytes count once per trip: 3 and 9 trips differ by 6 bodies exactly."""
    a, b = (hlo_account.account(_loop_program(n).as_text()) for n in (3, 9))
    body = [sum(r.bytes for r in rows if r.trips > 1 and not r.where.endswith(".cond")) for rows in (a, b)]
    assert body[0] == pytest.approx(body[1])
    assert hlo_account.totals(b)["bytes"] - hlo_account.totals(a)["bytes"] == pytest.approx(6 * body[0], rel=1e-3)


def test_shapes_and_memory_spaces():
    arrays, is_tuple = hlo_account.parse_shape("(bf16[8,128]{1,0:T(8,128)(2,1)S(1)}, f32[4]{0:T(128)}, u32[]{:S(2)})")
    assert is_tuple and [str(a) for a in arrays] == ["bf16[8,128]@S1", "f32[4]", "u32[]@S2"]
    assert [a.nbytes for a in arrays] == [8 * 128 * 2, 16, 4]
    assert [a.space for a in arrays] == [1, 0, 2]
