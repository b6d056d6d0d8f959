"""The demo Metal kernels: simdgroup_matrix tiles, forward and backward.

The oracle is autodiff through ``mlx_flash.reference`` in float32 on the same
(rounded) inputs; every kernel test runs on every backend in
``kernel_checks.BACKENDS``, under two thread schedules with race detection on
the emulator (see ``kernel_checks``).
"""

import re

import mlx.core as mx
import pytest

import kernel_checks
import mlx_flash
from kernel_checks import BACKENDS, check_kernels_match_reference, oracle, on_backend, random_inputs, random_mask, run_kernels
from mlx_flash import demo, fused, kernels

# max |actual - expected| <= ATOL + RTOL * max |expected|. The kernels round
# P and dS to the input dtype before their products (as FlashAttention does)
# and store results in it: a few units of the dtype's epsilon (float16 1e-3,
# bfloat16 8e-3) of the largest value.
TOLERANCES = {
    mx.float16: (1e-3, 5e-3),
    mx.bfloat16: (8e-3, 2e-2),
}


def assert_close(actual, expected, dtype, what):
    kernel_checks.assert_close(actual, expected, TOLERANCES[dtype], what)


def _inputs(B, n_q, n_kv, q_len, k_len, dim, dtype, seed):
    return random_inputs(B, n_q, n_kv, q_len, k_len, dim, dim, dtype, seed)


def _mask(kind, n_q, q_len, k_len, dtype, seed):
    return random_mask(kind, n_q, q_len, k_len, dtype, seed + 1000, empty_row=(1, 3))


def _run_kernels(q, k, v, dout, scale, mask):
    return run_kernels(demo, q, k, v, dout, scale, mask)



# Each axis covered on purpose rather than the full product: every head dim,
# both dtypes, every mask kind, GQA 1 and 2, odd lengths, Lq < Lk, Lq > Lk,
# more than one query and key tile (40 > 32), B = 2.
# (B, Hq, Hkv, Lq, Lk, D, dtype, mask)
KERNEL_CASES = [
    (1, 2, 2, 17, 17, 64, mx.float16, "none"),
    (1, 2, 1, 19, 40, 80, mx.bfloat16, "causal"),
    (1, 2, 1, 33, 21, 96, mx.float16, "bool"),
    (1, 2, 2, 9, 40, 128, mx.bfloat16, "additive"),
    (1, 2, 1, 40, 40, 128, mx.float16, "causal"),
    (1, 2, 1, 37, 29, 64, mx.bfloat16, "bool_empty_row"),
    (1, 2, 2, 13, 35, 80, mx.float16, "additive_nan_row"),
    (2, 2, 1, 11, 7, 96, mx.bfloat16, "none"),
]


def _case_id(case):
    B, n_q, n_kv, q_len, k_len, dim, dtype, mask = case
    return f"{mask}-{str(dtype).split('.')[-1]}-D{dim}-G{n_q // n_kv}-Lq{q_len}-Lk{k_len}-B{B}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_case_id)
def test_kernels_match_reference(backend, case):
    B, n_q, n_kv, q_len, k_len, dim, dtype, mask_kind = case
    q, k, v, dout = _inputs(B, n_q, n_kv, q_len, k_len, dim, dtype, seed=q_len + dim)
    mask = _mask(mask_kind, n_q, q_len, k_len, dtype, seed=q_len)
    check_kernels_match_reference(demo, backend, q, k, v, dout, mask, TOLERANCES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retuned_tiles(backend, monkeypatch):
    # Tile sizes are template constants read at every launch: other shapes
    # (2 and 1 SIMD groups per threadgroup, key tiles of 8 and 64) give the
    # same results, causal tile skipping included.
    monkeypatch.setitem(demo.TILES, 64, demo.Tiles(forward=(16, 64), dq=(16, 8), dkv=(8, 16)))
    dtype = mx.float16
    q, k, v, dout = _inputs(1, 2, 1, 29, 45, 64, dtype, seed=12)
    expected_out, expected_grads = oracle(q, k, v, dout, 0.125, "causal")
    with on_backend(backend):
        out, _, grads = _run_kernels(q, k, v, dout, 0.125, "causal")
    assert_close(out, expected_out, dtype, "output")
    for grad, expected, name in zip(grads, expected_grads, ("dq", "dk", "dv")):
        assert_close(grad, expected, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_schedule_reproduces_every_bit(backend):
    # No atomics and a fixed summation order: a shuffled thread order gives
    # the same bits as the forward one, NaN and uniform rows included.
    q, k, v, dout = _inputs(1, 2, 1, 14, 26, 64, mx.float16, seed=11)
    mask = _mask("bool_empty_row", 2, 14, 26, mx.float16, seed=11)
    with on_backend(backend, schedule="forward"):
        first = _run_kernels(q, k, v, dout, 0.3, mask)
    with on_backend(backend, schedule=20261122):
        second = _run_kernels(q, k, v, dout, 0.3, mask)
    for a, b in zip((first[0], first[1], *first[2]), (second[0], second[1], *second[2])):
        assert mx.array_equal(a, b, equal_nan=True).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_sum_exp_is_in_log2_units(backend):
    # The forward keeps the row log-sum-exp of the scaled scores in log2
    # units (the backward works with exp2): lse * ln 2 is the natural one.
    q, k, v, _ = _inputs(1, 2, 1, 10, 35, 64, mx.float16, seed=3)
    scale = 0.2
    f32 = [x.astype(mx.float32) for x in (q, k)]
    scores = (f32[0] * scale) @ mx.swapaxes(mx.repeat(f32[1], 2, axis=1), -1, -2)
    expected = mx.logsumexp(scores, axis=-1)
    with on_backend(backend):
        _, lse = demo.forward(q, k, v, scale, fused.mask_spec(None))
    assert mx.allclose(lse * 0.6931471805599453, expected, atol=2e-3, rtol=1e-3).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_broadcast_mask(backend):
    # Transposed views, as models produce them, and a key-padding mask
    # broadcast with zero strides: read in place through their strides. q and
    # v keep unit column stride (demo_stage's fast path); k is stored
    # column-major, so its rows are strided (the general path).
    dtype = mx.bfloat16
    q, k, v, dout = _inputs(1, 2, 2, 12, 18, 64, dtype, seed=5)
    q_t, v_t = (mx.swapaxes(mx.swapaxes(x, 1, 2) + 0, 1, 2) for x in (q, v))
    k_t = mx.swapaxes(mx.swapaxes(k, 2, 3) + 0, 2, 3)
    keep = mx.random.bernoulli(0.6, (1, 1, 1, 18), key=mx.random.key(5))
    mask = mx.broadcast_to(keep, (1, 2, 12, 18))
    expected_out, expected_grads = oracle(q, k, v, dout, 0.25, mask)
    with on_backend(backend):
        out, _, grads = _run_kernels(q_t, k_t, v_t, dout, 0.25, mask)
    assert_close(out, expected_out, dtype, "output")
    for grad, expected, name in zip(grads, expected_grads, ("dq", "dk", "dv")):
        assert_close(grad, expected, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_end_to_end(backend):
    # The public op under mx.grad with variant="demo": argument checks,
    # dispatch, the custom function and its vjp, all three kernels. Causal
    # with Lq > Lk: the first queries see no key (uniform weights, split off
    # by the dispatcher); the rest run on the demo kernels.
    dtype = mx.float16
    q, k, v, dout = _inputs(1, 4, 2, 27, 19, 128, dtype, seed=7)
    scale = 128**-0.5

    def attend(q, k, v):
        return mlx_flash.scaled_dot_product_attention(
            q, k, v, scale=scale, mask="causal", variant="demo"
        )

    def loss(q, k, v):
        return mx.sum(attend(q, k, v).astype(mx.float32) * dout.astype(mx.float32))

    with on_backend(backend):
        plan = mlx_flash.explain(q, k, v, mask="causal", variant="demo")
        out = attend(q, k, v)
        grads = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
        mx.eval(out, grads)
    assert (plan.implementation, plan.backend) == ("demo", backend)
    expected_out, expected = oracle(q, k, v, dout, scale, "causal")
    assert_close(out, expected_out, dtype, "output")
    for grad, want, name in zip(grads, expected, ("dq", "dk", "dv")):
        assert grad.dtype == dtype
        assert_close(grad, want, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fragment_layout(backend):
    # The softmax reads accumulator elements through thread_elements(), so
    # the kernels rely on demo_frag_coord naming where each lane's two
    # elements of an 8x8 simdgroup_matrix sit, and on demo_row_max /
    # demo_row_sum combining exactly the lanes that share a row.
    body = """
    const ushort lane = thread_index_in_simdgroup;
    threadgroup float tile[64];
    for (int i = lane; i < 64; i += 32) {
      tile[i] = float(i) * float(i % 7 + 1);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_matrix<float, 8, 8> m;
    simdgroup_load(m, tile, 8);
    const short2 at = demo_frag_coord(lane);
    const float a = m.thread_elements()[0];
    const float b = m.thread_elements()[1];
    out[lane * 5 + 0] = float(at.y);
    out[lane * 5 + 1] = float(at.x);
    out[lane * 5 + 2] = a;
    out[lane * 5 + 3] = demo_row_max(max(a, b));
    out[lane * 5 + 4] = demo_row_sum(a + b);
    """
    kernel = mx.fast.metal_kernel(
        name="demo_layout_probe",
        input_names=["unused"],
        output_names=["out"],
        source=body,
        header=kernels.source("demo_common.h"),
    )
    call = dict(
        inputs=[mx.zeros((1,))],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(32, 5)],
        output_dtypes=[mx.float32],
    )
    with on_backend(backend):
        (got,) = kernels.launch(kernel, **call)
    got = got.tolist()
    tile = [[float(8 * r + c) * ((8 * r + c) % 7 + 1) for c in range(8)] for r in range(8)]
    seen = set()
    for lane, (row, col, first, row_max, row_sum) in enumerate(got):
        row, col = int(row), int(col)
        assert first == tile[row][col], f"lane {lane}"
        assert row_max == max(tile[row]) and row_sum == sum(tile[row]), f"lane {lane}"
        seen.update({(row, col), (row, col + 1)})
    assert len(seen) == 64


STAGE_PROBE = """
    threadgroup T tile[ROWS * LD];
    const uint tid = thread_index_in_threadgroup;
    demo_stage<T, ROWS, D, LD, NT>(
        tile, x + params[0], params[1], params[2], params[3], params[4], tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = tid; i < ROWS * D; i += NT) {
      out[i] = tile[(i / D) * LD + i % D];
    }
"""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize(
    "offset, row_stride, col_stride",
    [
        (3, 67, 1),  # unit column stride, odd offset and row stride: fast path
        (3, 1, 17),  # column-major rows: general path
    ],
)
def test_stage_copies_rows_through_their_strides(backend, dtype, offset, row_stride, col_stride):
    # demo_stage copies ROWS rows starting at `first` into a padded tile,
    # zeroing rows at or past `limit`, whichever path the strides select.
    rows, dim, first, limit = 16, 64, 2, 13
    x = (mx.arange(2048) % 200 - 100).astype(dtype)
    params = mx.array([offset, row_stride, col_stride, first, limit], dtype=mx.int32)
    kernel = mx.fast.metal_kernel(
        name="demo_stage_probe",
        input_names=["x", "params"],
        output_names=["out"],
        source=STAGE_PROBE,
        header=kernels.source("demo_common.h"),
    )
    with on_backend(backend):
        (got,) = kernels.launch(
            kernel,
            inputs=[x, params],
            template=[("T", dtype), ("ROWS", rows), ("D", dim), ("LD", dim + 8), ("NT", 64)],
            grid=(64, 1, 1),
            threadgroup=(64, 1, 1),
            output_shapes=[(rows, dim)],
            output_dtypes=[dtype],
        )
    flat = x.tolist()
    expected = [
        [
            flat[offset + (first + r) * row_stride + c * col_stride] if first + r < limit else 0
            for c in range(dim)
        ]
        for r in range(rows)
    ]
    assert got.tolist() == expected


def _products(name):
    """``(accumulator, a, b)`` of every simdgroup_multiply_accumulate in a
    demo kernel, with the accumulator also its own ``c``."""
    text = kernels.source(name)
    calls = re.findall(r"simdgroup_multiply_accumulate\(([^;]*)\);", text)
    products = []
    for call in calls:
        d, a, b, c = (re.sub(r"\[\w+\]", "", part).strip() for part in call.split(","))
        assert d == c, call
        products.append((d, a, b))
    return products, text


def test_products_are_simdgroup_matrix_operations():
    # Every product of the algorithm is a simdgroup_multiply_accumulate on
    # 8x8 fragments: forward S = Q K^T, O += P V; backward S, dP = dO V^T,
    # dQ += dS K (dQ kernel) and S^T, dP^T, dV += P^T dO, dK += dS^T Q.
    expected = {
        "demo_forward.metal": {("s", "q_frag", "k_t"), ("o_acc", "p", "v_frag")},
        "demo_backward_dq.metal": {
            ("s", "q_frag", "k_t"),
            ("dp", "do_frag", "v_t"),
            ("dq_acc", "ds", "k_frag"),
        },
        "demo_backward_dkv.metal": {
            ("s_t", "k_frag", "q_t"),
            ("dp_t", "v_frag", "do_t"),
            ("dv_acc", "p_t", "do_f"),
            ("dk_acc", "ds_t", "q_f"),
        },
    }
    for name, want in expected.items():
        products, text = _products(name)
        assert set(products) == want, name
        # Operands are simdgroup matrices of the input dtype, accumulators
        # float; no lane-wise dot products hide next to them.
        for d, a, b in products:
            assert re.search(rf"simdgroup_matrix<float, 8, 8> {d}\[", text), (name, d)
            for operand in (a, b):
                assert re.search(rf"simdgroup_matrix<T, 8, 8> {operand}[;\[]", text), (name, operand)
        assert "simd_sum" not in text and "simd_shuffle" not in text, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_explain_names_demo_fallbacks(backend):
    def tensor(dim, dtype=mx.float16, length=16):
        return mx.zeros((1, 2, length, dim), dtype=dtype)

    with on_backend(backend):
        for dim in demo.HEAD_DIMS:
            for dtype in demo.DTYPES:
                x = tensor(dim, dtype)
                plan = mlx_flash.explain(x, x, x, mask="causal", variant="demo")
                assert (plan.implementation, plan.backend) == ("demo", backend)
        x = tensor(64)
        assert mlx_flash.explain(x, x, x, variant="auto").implementation == "demo"

        fallbacks = [
            ((tensor(32), tensor(32), tensor(32)), "head dim 32 is not one of 64, 80, 96, 128"),
            ((tensor(256), tensor(256), tensor(256)), "head dim 256 is not one of 64, 80, 96, 128"),
            (
                (tensor(64, mx.float32), tensor(64, mx.float32), tensor(64, mx.float32)),
                "float32 inputs: demo runs float16 and bfloat16",
            ),
            ((tensor(128), tensor(128), tensor(64)), "value head dim 64 differs from head dim 128"),
        ]
        for (q, k, v), reason in fallbacks:
            plan = mlx_flash.explain(q, k, v, variant="demo")
            assert plan.implementation == "practical", reason
            assert reason in plan.reason
            assert reason in str(mlx_flash.explain(q, k, v, variant="auto"))


def test_unsupported_reason():
    x = mx.zeros((1, 1, 4, 80), dtype=mx.bfloat16)
    assert demo.unsupported_reason(x, x, x, "causal") is None
    assert demo.unsupported_reason(x, x, x, mx.zeros((1, 1, 4, 4), dtype=mx.bool_)) is None
    empty = mx.zeros((1, 1, 0, 80), dtype=mx.bfloat16)
    assert demo.unsupported_reason(x, empty, empty, None) == "empty sequence"
    odd = mx.zeros((1, 1, 4, 72), dtype=mx.float16)
    assert demo.unsupported_reason(odd, odd, odd, None) == "head dim 72 is not one of 64, 80, 96, 128"


def test_tiles_fit_threadgroup_memory():
    # The budgets written down in demo.Tiles, checked for every head dim.
    for dim in demo.HEAD_DIMS:
        used = demo.TILES[dim].threadgroup_bytes(dim)
        assert set(used) == {"forward", "dq", "dkv"}
        assert all(0 < size <= 32 * 1024 for size in used.values()), (dim, used)
    # D = 128, forward (32, 32): max(32, 64) rows of (128 + 8) halves.
    assert demo.TILES[128].threadgroup_bytes(128)["forward"] == 64 * 136 * 2
    with pytest.raises(ValueError, match="multiples of 8"):
        demo.Tiles(forward=(32, 12), dq=(32, 32), dkv=(32, 32))


def test_tiles_over_metal_limits_are_refused(monkeypatch):
    # 33 SIMD groups of 32 threads: more than a threadgroup may have.
    with pytest.raises(ValueError, match=r"dkv tile \(32, 264\) needs 1056 threads.*1024"):
        demo.Tiles(forward=(32, 32), dq=(32, 32), dkv=(32, 264))
    # Retuning is checked at launch, where the head dim is known: a forward K/V
    # tile of 64 keys stages 2 * 64 rows of D + 8 halves, which fits at D = 64
    # (18432 bytes) but not at D = 128.
    big = demo.Tiles(forward=(32, 64), dq=(32, 16), dkv=(16, 32))
    big.check(64)
    monkeypatch.setitem(demo.TILES, 128, big)
    q, k, v, _ = _inputs(1, 1, 1, 8, 8, 128, mx.float16, seed=0)
    too_big = r"forward tile \(32, 64\) at head dim 128 needs 34816 bytes.*32768"
    with pytest.raises(ValueError, match=too_big):
        with on_backend("emulator"):
            demo.attention(q, k, v, 0.1, None)


if mx.metal.is_available():

    def test_compile_on_metal():
        q, k, v, dout = _inputs(1, 2, 1, 24, 24, 64, mx.bfloat16, seed=10)

        def loss(q, k, v):
            out = mlx_flash.scaled_dot_product_attention(
                q, k, v, scale=0.125, mask="causal", variant="demo"
            )
            return mx.sum(out.astype(mx.float32) * dout.astype(mx.float32))

        grads = mx.compile(mx.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        _, expected = oracle(q, k, v, dout, 0.125, "causal")
        for grad, want in zip(grads, expected):
            assert_close(grad, want, mx.bfloat16, "compiled")
