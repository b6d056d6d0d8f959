"""The demo Metal kernels: simdgroup_matrix tiles, forward and backward.

The oracle is autodiff through ``mlx_flash.reference`` in float32 on the same
(rounded) inputs, with the mask in its dense form; every kernel test runs on
every backend in ``kernel_checks.BACKENDS``, under two thread schedules with
race detection on the emulator (see ``kernel_checks``).

The kernels have no mask template constant, and ``demo`` pads small inputs
so that each dtype, head dim and tile shape is one generated source: the
cases below spread over few (dtype, head dim) pairs, so the emulator builds
few kernels.
"""

import re

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash
from conftest import assert_close
from kernel_checks import (
    BACKENDS,
    check_kernels_match_reference,
    kernel_oracle,
    on_backend,
    random_inputs,
    random_mask,
    run_kernels,
    segment_layout,
    structured,
)
from mlx_flash import demo, emulator, fused, kernels, oracle
from mlx_flash.call import AttentionCall
from mlx_flash.families import DEMO

# max |actual - expected| <= ATOL + RTOL * max |expected|, per dtype (see
# mlx_flash.oracle, which python -m mlx_flash.doctor checks with too).
TOLERANCES = oracle.TOLERANCES["demo"]


def _inputs(B, n_q, n_kv, q_len, k_len, dim, dtype, seed):
    return random_inputs(B, n_q, n_kv, q_len, k_len, dim, dim, dtype, seed)


def _check(backend, q, k, v, dout, mask, sinks=None):
    check_kernels_match_reference(DEMO, backend, q, k, v, dout, mask, TOLERANCES, sinks=sinks)


# ---- the array masks: every kind, shapes and tails ---------------------------

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
    mask = random_mask(mask_kind, n_q, q_len, k_len, dtype, q_len + 1000, empty_row=(1, 3))
    _check(backend, q, k, v, dout, mask)


# ---- structured masks: segments, windows, sinks and how they compose ---------


def _bias(kind, n_q, q_len, k_len, dtype, seed):
    """An additive mask to combine with structure: ``finite`` (per head and
    key), or ``sparse_inf``: -inf on every key j with j % 3 == 1 and finite
    elsewhere, so that a window of 2 or more keys always keeps a finite one
    (a row of only -inf is NaN by the contract; the oracle gives such a row
    MLX's uniform weights over the dropped keys instead, a different
    convention, so it is left out here)."""
    bias = mx.random.normal((1, n_q, 1, k_len), key=mx.random.key(seed)).astype(dtype)
    if kind == "sparse_inf":
        bias = mx.where(mx.arange(k_len) % 3 == 1, -mx.inf, bias).astype(dtype)
    return bias


# (B, Hq, Hkv, Lq, Lk, D, dtype, mask, segments, window, sinks): mask is
# None, "causal", "bool", "bool_empty_row" or an additive kind of _bias;
# segments a segment_layout kind (queries take the last Lq ids) or "pair"
# (query ids capped at document 3, so later key documents meet no query).
STRUCTURED_CASES = [
    (1, 2, 2, 37, 37, 64, mx.float16, None, "one", None, False),
    (2, 8, 1, 70, 70, 128, mx.bfloat16, None, "many", None, False),
    (1, 2, 1, 330, 330, 64, mx.float16, "causal", "many", None, False),
    (1, 2, 1, 45, 45, 80, mx.float16, None, "spanning", None, False),
    (1, 4, 2, 50, 50, 96, mx.bfloat16, None, "padding", None, False),
    (1, 2, 2, 41, 41, 64, mx.bfloat16, None, "unsorted", None, False),
    (1, 4, 1, 67, 67, 64, mx.float16, "causal", "many", None, False),
    (1, 2, 1, 40, 40, 128, mx.float16, "finite", "many", None, False),
    (1, 2, 1, 44, 44, 96, mx.bfloat16, "bool", "many", None, False),
    (1, 2, 1, 24, 56, 80, mx.bfloat16, None, "pair", None, False),
    (1, 2, 1, 33, 33, 64, mx.float16, "causal", None, 1, False),
    (1, 4, 2, 21, 50, 96, mx.float16, "causal", "many", 7, False),
    (1, 2, 2, 150, 150, 64, mx.bfloat16, "causal", None, 128, False),
    (1, 2, 1, 150, 150, 128, mx.float16, "causal", None, 129, False),
    (1, 2, 1, 40, 40, 80, mx.float16, "causal", None, 200, False),
    (1, 4, 2, 60, 60, 128, mx.bfloat16, "causal", "many", 9, False),
    (1, 2, 1, 45, 45, 64, mx.float16, "sparse_inf", None, 7, False),
    (1, 4, 2, 30, 30, 80, mx.bfloat16, None, None, None, True),
    (1, 2, 1, 35, 48, 96, mx.float16, "causal", None, 11, True),
    (2, 2, 1, 40, 40, 128, mx.bfloat16, None, "padding", None, True),
    (1, 2, 1, 37, 29, 64, mx.float16, "bool_empty_row", None, None, True),
]


def _structured_id(case):
    B, n_q, n_kv, q_len, k_len, dim, dtype, mask, segments, window, sinks = case
    parts = [mask or "nomask", segments or "noseg", f"w{window}", "sinks" if sinks else "nosinks"]
    return "-".join(parts + [str(dtype).split(".")[-1], f"D{dim}", f"G{n_q // n_kv}", f"Lq{q_len}", f"Lk{k_len}"])


def _structured_inputs(case, seed):
    B, n_q, n_kv, q_len, k_len, dim, dtype, mask_kind, layout, window, with_sinks = case
    q, k, v, dout = _inputs(B, n_q, n_kv, q_len, k_len, dim, dtype, seed)
    if mask_kind in ("finite", "sparse_inf"):
        array = _bias(mask_kind, n_q, q_len, k_len, dtype, seed + 1)
    elif mask_kind in ("bool", "bool_empty_row"):
        array = random_mask(mask_kind, n_q, q_len, k_len, dtype, seed + 1, empty_row=(1, 3))
    else:
        array = mask_kind
    if window is not None:
        array = "causal" if array is None else array
    if layout == "pair":
        k_ids = segment_layout("many", B, k_len, seed + 2)
        q_ids = mx.minimum(segment_layout("many", B, q_len, seed + 3), 3)
        segments = (q_ids, k_ids)
    elif layout is not None:
        segments = segment_layout(layout, B, k_len, seed + 2)
    else:
        segments = None
    sinks = 2 * mx.random.normal((n_q,), key=mx.random.key(seed + 4)) if with_sinks else None
    return q, k, v, dout, structured(q_len, k_len, array, segments, window), sinks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", STRUCTURED_CASES, ids=_structured_id)
def test_structured_masks_match_reference(backend, case):
    """Output, lse, dq, dk, dv (and dsinks) against the dense-mask oracle."""
    q, k, v, dout, mask, sinks = _structured_inputs(case, seed=case[3] + case[5])
    _check(backend, q, k, v, dout, mask, sinks)


def _poisoned(x, rows):
    """``x`` with NaN in sequence positions ``[rows[0], rows[1])`` (axis 2)."""
    index = mx.arange(x.shape[2])[:, None]
    return mx.where((index >= rows[0]) & (index < rows[1]), mx.nan, x).astype(x.dtype)


# (id, D, Lq, Lk, structure, poisoned rows of q/k/v/dout, checked rows of
# out/dq/dk/dv). NaN in a visited tile spreads to every row of it (0 * NaN =
# NaN in the products, even where the mask drops the pair), so the checked
# rows are those whose tiles a kernel that skips correctly never pairs with a
# poisoned one. Tiles at D = 64: 32 x 32 everywhere; at D = 128: forward and
# dq 32 queries x 16 keys, dK/dV 32 keys x 8 queries.
_PACKED_IDS = (mx.array([[0] * 40 + [1] * 24 + [-1] * 32]), mx.array([[0] * 16 + [1] * 16 + [2] * 64]))
ALL = (0, 96)
SKIP_CASES = [
    # Keys 32..95 are a document no query belongs to, queries 64..95 padding.
    (
        "segments", 64, 96, 96, dict(segments=_PACKED_IDS),
        dict(q=(64, 96), k=(32, 96), v=(32, 96), dout=(64, 96)),
        dict(out=ALL, dq=ALL, dk=ALL, dv=ALL),
    ),
    # Lk > Lq: no query sees a key below Lk - Lq - window + 1 = 65.
    (
        "window-unseen-keys", 128, 20, 100, dict(mask="causal", window=16),
        dict(k=(0, 64), v=(0, 64)),
        dict(out=(0, 20), dq=(0, 20), dk=(0, 100), dv=(0, 100)),
    ),
    # Causal: query tiles below 64 never visit the key tile [64, 96) ...
    (
        "causal-keys", 64, 96, 96, dict(mask="causal"),
        dict(k=(64, 96), v=(64, 96)),
        dict(out=(0, 64), dq=(0, 64)),
    ),
    # ... and key tiles from 32 on never visit the query tile [0, 32).
    (
        "causal-queries", 64, 96, 96, dict(mask="causal"),
        dict(q=(0, 32), dout=(0, 32)),
        dict(dk=(32, 96), dv=(32, 96)),
    ),
    # Window 16: the query tile [64, 96) starts at key 49, past [0, 32) ...
    (
        "window-keys", 128, 96, 96, dict(mask="causal", window=16),
        dict(k=(0, 32), v=(0, 32)),
        dict(out=(64, 96), dq=(64, 96)),
    ),
    # ... and the key tile [0, 32) ends at query 47.
    (
        "window-queries", 128, 96, 96, dict(mask="causal", window=16),
        dict(q=(64, 96), dout=(64, 96)),
        dict(dk=(0, 32), dv=(0, 32)),
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SKIP_CASES, ids=lambda case: case[0])
def test_skipped_tiles_are_never_read(backend, case):
    """Tiles that can hold no kept score are skipped, before staging:
    outside the causal / window band and where segment ranges cannot meet.
    NaN in them reaches none of the checked rows, which match the oracle on
    clean inputs."""
    _, dim, q_len, k_len, structure_args, poison, checked = case
    dtype = mx.float16
    clean = _inputs(1, 2, 1, q_len, k_len, dim, dtype, seed=21)
    names = ("q", "k", "v", "dout")
    dirty = [_poisoned(x, poison[n]) if n in poison else x for n, x in zip(names, clean)]
    structure = structured(q_len, k_len, **structure_args)
    scale = dim**-0.5
    expected_out, expected_grads, _ = kernel_oracle(*clean, scale, structure)
    with on_backend(backend):
        out, _, grads = run_kernels(DEMO, *dirty, scale, structure)
    results = dict(zip(("out", "dq", "dk", "dv"), zip((out, *grads), (expected_out, *expected_grads))))
    for name, (first, last) in checked.items():
        actual, expected = results[name]
        assert_close(actual[:, :, first:last], expected[:, :, first:last], TOLERANCES[dtype], name)


# ---- schedules, tiles, strides ----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_schedule_reproduces_every_bit(backend):
    # No atomics and a fixed summation order: a shuffled thread order gives
    # the same bits as the forward one, empty rows, windows, segments and
    # sinks included.
    case = (1, 2, 1, 14, 26, 64, mx.float16, "bool_empty_row", "unsorted", None, True)
    q, k, v, dout, mask, sinks = _structured_inputs(case, seed=11)
    with on_backend(backend, schedule="forward"):
        first = run_kernels(DEMO, q, k, v, dout, 0.3, mask, sinks)
    with on_backend(backend, schedule=20261122):
        second = run_kernels(DEMO, q, k, v, dout, 0.3, mask, sinks)
    for a, b in zip((first[0], first[1], *first[2]), (second[0], second[1], *second[2])):
        assert mx.array_equal(a, b, equal_nan=True).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_retuned_tiles_and_head_groups(backend, monkeypatch):
    # Tile sizes are template constants read at every launch: other shapes
    # (2 and 1 SIMD groups per head, key tiles of 8 and 64, four query heads
    # per threadgroup) give the reference results, window and segment
    # skipping included; and how many heads share a threadgroup changes
    # which threads compute a row, not a bit of the result.
    dtype = mx.float16
    q, k, v, dout = _inputs(1, 4, 1, 29, 45, 64, dtype, seed=12)
    ids = segment_layout("many", 1, 45, seed=12)
    mask = structured(29, 45, "causal", ids, 13)
    results = []
    for heads in (4, 1):
        tiles = demo.TileSet(forward=(16, 64), dq=(16, 8), dkdv=(8, 16), heads=heads)
        monkeypatch.setitem(demo.TILES, 64, tiles)
        _check(backend, q, k, v, dout, mask)
        with on_backend(backend, schedule="forward"):
            results.append(run_kernels(DEMO, q, k, v, dout, 0.125, mask))
    for a, b in zip((results[0][0], *results[0][2]), (results[1][0], *results[1][2])):
        assert mx.array_equal(a, b).item()


def test_heads_per_threadgroup_divide_the_group():
    assert [fused.heads_per_tile(group, 2) for group in (1, 2, 3, 4, 8)] == [1, 2, 1, 2, 2]
    assert [fused.heads_per_tile(group, 4) for group in (1, 2, 6, 8)] == [1, 2, 3, 4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_broadcast_mask(backend):
    # Transposed views, as models produce them, column-major segment ids and
    # a key-padding mask broadcast with zero strides: read in place through
    # their strides. q and v keep unit column stride; k is stored
    # column-major, so its rows are strided (demo_stage's strided loads).
    dtype = mx.bfloat16
    q, k, v, dout = _inputs(2, 2, 2, 12, 18, 64, dtype, seed=5)
    q_t, v_t = (mx.swapaxes(mx.swapaxes(x, 1, 2) + 0, 1, 2) for x in (q, v))
    k_t = mx.swapaxes(mx.swapaxes(k, 2, 3) + 0, 2, 3)
    keep = mx.random.bernoulli(0.6, (1, 1, 1, 18), key=mx.random.key(5))
    array = mx.broadcast_to(keep, (2, 2, 12, 18))
    ids = segment_layout("many", 2, 18, seed=5)
    ids_t = mx.swapaxes(mx.swapaxes(ids, 0, 1) + 0, 0, 1)
    expected_out, expected_grads, _ = kernel_oracle(q, k, v, dout, 0.25, structured(12, 18, array, ids))
    with on_backend(backend):
        out, _, grads = run_kernels(DEMO, q_t, k_t, v_t, dout, 0.25, structured(12, 18, array, ids_t))
    assert_close(out, expected_out, TOLERANCES[dtype], "output")
    for grad, expected, name in zip(grads, expected_grads, ("dq", "dk", "dv")):
        assert_close(grad, expected, TOLERANCES[dtype], name)


# ---- the public op ----------------------------------------------------------


def _public_loss(variant, dout, **kwargs):
    """``value_and_grad`` of ``sum(attention * dout)`` through the public op
    with ``variant``, over q, k, v (and sinks when given)."""
    sinks = kwargs.pop("sinks", None)

    def fn(q, k, v, *rest):
        out = mlx_flash.scaled_dot_product_attention(
            q, k, v, sinks=rest[0] if rest else None, variant=variant, **kwargs
        )
        return mx.sum(out.astype(mx.float32) * dout.astype(mx.float32))

    def run(q, k, v):
        primals = (q, k, v) + ((sinks,) if sinks is not None else ())
        return mx.value_and_grad(fn, argnums=tuple(range(len(primals))))(*primals)

    return run


def _check_against_manual(backend, q, k, v, dout, **kwargs):
    """The public op with variant="demo" against variant="manual": the plan,
    the loss and every gradient (in the input dtype)."""
    dtype = q.dtype
    explain_args = {key: kwargs[key] for key in ("mask", "sinks", "segment_ids", "window") if key in kwargs}
    with on_backend(backend):
        plan = mlx_flash.explain(q, k, v, variant="demo", **explain_args)
        value, grads = _public_loss("demo", dout, **kwargs)(q, k, v)
        mx.eval(value, grads)
    assert (plan.implementation, plan.backend) == ("demo", backend)
    expected_value, expected_grads = _public_loss("manual", dout, **kwargs)(q, k, v)
    assert abs(value.item() - expected_value.item()) <= 2e-2 * max(1.0, abs(expected_value.item()))
    for grad, want, name in zip(grads, expected_grads, ("dq", "dk", "dv", "dsinks")):
        assert grad.dtype == dtype, name
        assert_close(grad, want, TOLERANCES[dtype], name)
    return plan, expected_grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_end_to_end(backend):
    # The public op under mx.grad with variant="demo": argument checks,
    # dispatch, the custom function and its vjp, all three kernels. Causal
    # with Lq > Lk: the first queries see no key (uniform weights, split off
    # by the dispatcher); the rest run on the demo kernels.
    q, k, v, dout = _inputs(1, 4, 2, 27, 19, 128, mx.float16, seed=7)
    _check_against_manual(backend, q, k, v, dout, scale=128**-0.5, mask="causal")


@pytest.mark.parametrize("backend", BACKENDS)
def test_structured_grad_end_to_end_matches_manual(backend):
    # segment_ids, window and sinks through the public op, under mx.grad
    # (sinks included), against variant="manual" on the same inputs.
    dtype = mx.bfloat16
    q, k, v, dout = _inputs(2, 4, 2, 45, 45, 80, dtype, seed=8)
    ids = segment_layout("padding", 2, 45, seed=8)
    sinks = mx.array([0.5, -1.0, 2.0, 0.0], dtype)
    plan, expected_grads = _check_against_manual(
        backend, q, k, v, dout, scale=80**-0.5, mask="causal", window=12, segment_ids=ids, sinks=sinks
    )
    assert "ids read by the kernels" in plan.mask and "no Lq x Lk mask" in plan.mask
    assert float(mx.abs(expected_grads[3].astype(mx.float32)).max()) > 1e-2


# ---- building blocks: fragment layout, staging, products --------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_fragment_layout(backend):
    # The softmax reads accumulator elements through thread_elements(), so
    # the kernels rely on demo_frag_coord naming where each lane's two
    # elements of an 8x8 simdgroup_matrix sit, and on demo_row_max /
    # demo_row_sum / demo_row_any combining exactly the lanes that share a row.
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
    out[lane * 6 + 0] = float(at.y);
    out[lane * 6 + 1] = float(at.x);
    out[lane * 6 + 2] = a;
    out[lane * 6 + 3] = demo_row_max(max(a, b));
    out[lane * 6 + 4] = demo_row_sum(a + b);
    out[lane * 6 + 5] = demo_row_any(at.y == 5 && at.x == 4) ? 1.0f : 0.0f;
    """
    kernel = mx.fast.metal_kernel(
        name="demo_layout_probe",
        input_names=["unused"],
        output_names=["out"],
        source=body,
        header=kernels.source("flash_common.h") + kernels.source("demo_common.h"),
    )
    call = dict(
        inputs=[mx.zeros((1,))],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(32, 6)],
        output_dtypes=[mx.float32],
    )
    with on_backend(backend):
        (got,) = kernels.launch(kernel, **call)
    got = got.tolist()
    tile = [[float(8 * r + c) * ((8 * r + c) % 7 + 1) for c in range(8)] for r in range(8)]
    seen = set()
    for lane, (row, col, first, row_max, row_sum, row_any) in enumerate(got):
        row, col = int(row), int(col)
        assert first == tile[row][col], f"lane {lane}"
        assert row_max == max(tile[row]) and row_sum == sum(tile[row]), f"lane {lane}"
        assert row_any == (1.0 if row == 5 else 0.0), f"lane {lane}"
        seen.update({(row, col), (row, col + 1)})
    assert len(seen) == 64


STAGE_PROBE = """
    threadgroup vec<T, 4> storage[ROWS * LD / 4];
    threadgroup T* tile = demo_elements<T>(storage);
    const uint tid = thread_index_in_threadgroup;
    demo_stage<T, ROWS, D, LD>(
        tile, x + params[0], params[1], params[2], params[3], params[4], tid, threads_per_threadgroup.x);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = tid; i < ROWS * D; i += threads_per_threadgroup.x) {
      out[i] = tile[(i / D) * LD + i % D];
    }
"""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize(
    "offset, row_stride, col_stride",
    [
        (3, 67, 1),  # unit column stride from an odd element: no device alignment
        (3, 1, 17),  # column-major rows: strided loads
    ],
)
def test_stage_copies_rows_through_their_strides(backend, dtype, offset, row_stride, col_stride):
    # demo_stage copies ROWS rows starting at `first` into a padded tile with
    # 8-byte vector stores, zeroing rows at or past `limit`, whatever the
    # device-side alignment and strides.
    rows, dim, first, limit = 16, 64, 2, 13
    x = (mx.arange(2048) % 200 - 100).astype(dtype)
    params = mx.array([offset, row_stride, col_stride, first, limit], dtype=mx.int32)
    kernel = mx.fast.metal_kernel(
        name="demo_stage_probe",
        input_names=["x", "params"],
        output_names=["out"],
        source=STAGE_PROBE,
        header=kernels.source("flash_common.h") + kernels.source("demo_common.h"),
    )
    with on_backend(backend):
        (got,) = kernels.launch(
            kernel,
            inputs=[x, params],
            template=[("T", dtype), ("ROWS", rows), ("D", dim), ("LD", dim + 8)],
            grid=(48, 1, 1),
            threadgroup=(48, 1, 1),
            output_shapes=[(rows, dim)],
            output_dtypes=[dtype],
        )
    flat = x.tolist()
    expected = [
        [flat[offset + (first + r) * row_stride + c * col_stride] if first + r < limit else 0 for c in range(dim)]
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
            ("s_t", "k_f", "q_t"),
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
        # The structure is read at run time: no mask template constant.
        assert "MASK" not in text, name


# ---- dispatch and explain ---------------------------------------------------


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
        ids = mx.zeros((1, 16), mx.int32)
        plan = mlx_flash.explain(x, x, x, mask="causal", window=4, segment_ids=ids, variant="auto")
        assert plan.implementation == "demo" and "outside the window" in plan.mask

        fallbacks = [
            ((tensor(32), tensor(32), tensor(32)), "head dim 32 is not one of 64, 80, 96, 128"),
            ((tensor(256), tensor(256), tensor(256)), "head dim 256 is not one of 64, 80, 96, 128"),
            ((tensor(128), tensor(128), tensor(64)), "value head dim 64 differs from head dim 128"),
        ]
        for (q, k, v), reason in fallbacks:
            plan = mlx_flash.explain(q, k, v, variant="demo")
            assert plan.implementation == "practical", reason
            assert reason in plan.reason
            assert reason in str(mlx_flash.explain(q, k, v, variant="auto"))


def test_unsupported_reason():
    x = mx.zeros((1, 1, 4, 80), dtype=mx.bfloat16)
    ids = mx.zeros((1, 4), mx.int32)
    assert demo.unsupported_reason(x, x, x, structured(4, 4, "causal")) is None
    assert demo.unsupported_reason(x, x, x, structured(4, 4, "causal", ids, 2)) is None
    assert demo.unsupported_reason(x, x, x, structured(4, 4, mx.zeros((1, 1, 4, 4), dtype=mx.bool_))) is None
    empty = mx.zeros((1, 1, 0, 80), dtype=mx.bfloat16)
    assert demo.unsupported_reason(x, empty, empty, structured(4, 0)) == "empty sequence"
    odd = mx.zeros((1, 1, 4, 72), dtype=mx.float16)
    assert demo.unsupported_reason(odd, odd, odd, structured(4, 4)) == "head dim 72 is not one of 64, 80, 96, 128"


# ---- tiles: budgets and Metal's limits --------------------------------------


def test_tiles_stay_within_their_budgets():
    # The budgets written down in demo.TileSet, for every head dim.
    for dim in demo.HEAD_DIMS:
        tiles = demo.TILES[dim]
        used = tiles.threadgroup_bytes(dim)
        assert set(used) == {"forward", "dq", "dkdv"}
        assert all(0 < size <= demo.THREADGROUP_BYTES_BUDGET for size in used.values()), (dim, used)
        registers = tiles.registers(dim)
        assert all(0 < r <= demo.REGISTER_BUDGET for r in registers.values()), (dim, registers)
        assert all(t <= demo.MAX_THREADS for t in tiles.threads(tiles.heads).values())
    # D = 128: K and V tiles of 16 keys of (128 + 8) halves and 16 ids; the
    # dK/dV kernel keeps 32 keys of k, 8 queries of q and dout, and 3 x 8
    # floats for lse, delta and ids.
    assert demo.TILES[128].threadgroup_bytes(128) == {"forward": 8768, "dq": 8768, "dkdv": 13152}
    assert demo.TILES[128].registers(128) == {"forward": 54, "dq": 74, "dkdv": 86}
    with pytest.raises(ValueError, match="multiples of 8"):
        demo.TileSet(forward=(32, 12), dq=(32, 32), dkdv=(32, 32))
    with pytest.raises(ValueError, match="at most 2 BK"):
        demo.TileSet(forward=(32, 8), dq=(32, 32), dkdv=(32, 32))


_PROBE = "\nthreadgroup uchar demo_probe[32768];\n"


@pytest.mark.parametrize(
    "dtype, tiles, size, dims",
    [(mx.float16, demo.TILES, 2, demo.HEAD_DIMS), (mx.float32, demo.FLOAT32_TILES, 4, (64, 128))],
    ids=["half", "float32"],
)
def test_threadgroup_bytes_match_what_the_kernels_declare(monkeypatch, dtype, tiles, size, dims):
    # The emulator allocates every threadgroup array of a kernel as Metal
    # does (16-byte aligned) and refuses more than 32 KB in all. A 32 KB
    # array declared after the kernel's own is refused, and the message
    # names where it would have ended: the kernel's own bytes + 32768.
    def probe_kernel(name, inputs, outputs):
        return mx.fast.metal_kernel(
            name=name + "_probe",
            input_names=list(inputs),
            output_names=list(outputs),
            source=kernels.source(f"{name}.metal") + _PROBE,
            header="\n".join(kernels.source(f) for f in demo._HEADERS),
            ensure_row_contiguous=False,
        )

    monkeypatch.setattr(demo, "_kernel", probe_kernel)
    for dim in dims:
        q, k, v, dout = _inputs(1, 1, 1, 8, 8, dim, dtype, seed=0)
        lse = delta = mx.zeros((1, 1, 8))
        mask = structured(8, 8)
        launches = {
            "forward": lambda: demo.forward(AttentionCall(q, k, v, 0.1, mask)),
            "dq": lambda: demo.dq(AttentionCall(q, k, v, 0.1, mask, None, dout, lse, delta)),
            "dkdv": lambda: demo.dkdv(AttentionCall(q, k, v, 0.1, mask, None, dout, lse, delta)),
        }
        expected = tiles[dim].threadgroup_bytes(dim, size)
        for name, launch in launches.items():
            with pytest.raises(emulator.EmulatorError, match="demo_probe") as error:
                with on_backend("emulator", schedule="forward"):
                    launch()
            total = int(re.search(r"threadgroup memory of (\d+) bytes", str(error.value)).group(1))
            assert total - 32768 == expected[name], (dim, name)


def test_tiles_over_metal_limits_are_refused(monkeypatch):
    # 33 SIMD groups of 32 threads: more than a threadgroup may have.
    with pytest.raises(ValueError, match=r"dkdv tile \(32, 264\) needs 1056 threads.*1024"):
        demo.TileSet(forward=(32, 32), dq=(32, 32), dkdv=(32, 264))
    # Four query heads of 128 rows: 64 SIMD groups.
    with pytest.raises(ValueError, match=r"forward tile \(128, 64\) needs 2048 threads"):
        demo.TileSet(forward=(128, 64), dq=(32, 32), dkdv=(32, 32), heads=4)
    # Retuning is checked at launch, where the head dim is known: a forward K/V
    # tile of 64 keys stages 2 * 64 rows of D + 8 halves, which fits Metal's
    # 32 KB at D = 64 (18,688 bytes with the ids) but not at D = 128.
    big = demo.TileSet(forward=(32, 64), dq=(32, 16), dkdv=(8, 32))
    big.check(64)
    monkeypatch.setitem(demo.TILES, 128, big)
    q, k, v, _ = _inputs(1, 1, 1, 8, 8, 128, mx.float16, seed=0)
    too_big = r"forward tile \(32, 64\) at head dim 128 needs 35072 bytes.*32768"
    with pytest.raises(ValueError, match=too_big):
        with on_backend("emulator"):
            DEMO.attention(AttentionCall(q, k, v, 0.1, structured(8, 8)))


def test_small_inputs_are_padded_into_device_memory():
    # MLX passes inputs of fewer than 8 elements in constant memory and the
    # rest in device memory, which would make one source per size; demo pads
    # them with elements the kernels never read.
    sinks = mx.array([1.0, 2.0])
    assert demo._in_device_memory("sinks", sinks).tolist()[:2] == [1.0, 2.0]
    assert demo._in_device_memory("sinks", sinks).size >= 8
    ranges = mx.array([[[0, 1], [1, 2]]])
    padded = demo._in_device_memory("q_ranges", ranges)
    assert padded.shape[0] == 1 and padded.shape[2] == 2 and padded[:, :2].tolist() == ranges.tolist()
    key_mask = mx.array([[[[True]]]])
    broadcast = demo._in_device_memory("mask_array", key_mask)
    assert broadcast.size >= 8 and broadcast.shape[:3] == (1, 1, 1) and bool(mx.all(broadcast).item())
    big = mx.zeros((1, 1, 4, 4))
    assert demo._in_device_memory("mask_array", big) is big


if mx.metal.is_available():

    def test_compile_on_metal():
        q, k, v, dout = _inputs(1, 2, 1, 24, 24, 64, mx.bfloat16, seed=10)
        ids = segment_layout("many", 1, 24, seed=10)

        def loss(q, k, v):
            out = mlx_flash.scaled_dot_product_attention(
                q, k, v, scale=0.125, mask="causal", window=9, segment_ids=ids, variant="demo"
            )
            return mx.sum(out.astype(mx.float32) * dout.astype(mx.float32))

        grads = mx.compile(mx.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        _, expected, _ = kernel_oracle(q, k, v, dout, 0.125, structured(24, 24, "causal", ids, 9))
        for grad, want in zip(grads, expected):
            assert_close(grad, want, TOLERANCES[mx.bfloat16], "compiled")
