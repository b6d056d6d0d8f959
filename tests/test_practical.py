"""The practical Metal kernels, forward and backward, on structured masks.

Kernel results (output, lse, dq, dk, dv and the sinks' gradient) are compared
with the float32 oracle of ``kernel_checks`` on every backend in
``kernel_checks.BACKENDS``, under two thread schedules with race detection on
the emulator. Each case below is one mask layout; together they cover
segment layouts, windows, sinks, array masks, GQA, odd lengths, the three
dtypes and head dims 32..256 with ``Dv != D``, while keeping the number of
distinct kernel instantiations (each one a compile on the emulator) small.
"""

import math
import re
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import kernel_checks
import mlx_flash
from conftest import assert_close
from kernel_checks import BACKENDS, on_backend, random_inputs, random_mask, run_kernels, segment_layout, structured
from mlx_flash import fused, kernels, masks, oracle, practical, reference
from mlx_flash.call import AttentionCall
from mlx_flash.families import PRACTICAL
from mlx_flash.emulator.source import generated_source

# max |actual - expected| <= ATOL + RTOL * max |expected|, per dtype (see
# mlx_flash.oracle, which python -m mlx_flash.doctor checks with too).
TOLERANCES = oracle.TOLERANCES["practical"]


@dataclass(frozen=True)
class Case:
    """One kernel test: shapes, dtype and the mask's parts.

    ``array`` is a ``kernel_checks.random_mask`` kind or ``"bias"``: a
    finite additive mask (1, Hq, Lq, Lk), which composes with every
    structure (an additive -inf block would leave rows whose kept scores are
    all -inf, where the contract's NaN and the reference's dropped-score
    weights differ). ``segments`` is a ``kernel_checks.segment_layout``
    kind, or ``"docs"``: documents of the given lengths.
    """

    B: int
    hq: int
    hkv: int
    lq: int
    lk: int
    dim: int
    value_dim: int
    dtype: mx.Dtype
    causal: bool = False
    window: Optional[int] = None
    segments: Optional[str] = None
    array: Optional[str] = None
    sinks: bool = False

    def __str__(self):
        parts = ["causal"] if self.causal else []
        parts += [f"window{self.window}"] if self.window else []
        parts += [self.segments] if self.segments else []
        parts += [self.array] if self.array else []
        parts += ["sinks"] if self.sinks else []
        dtype = str(self.dtype).split(".")[-1]
        shape = f"B{self.B}-H{self.hq}x{self.hkv}-L{self.lq}x{self.lk}-D{self.dim}x{self.value_dim}"
        return "-".join(parts or ["none"]) + f"-{dtype}-{shape}"


def _array(case: Case, seed: int):
    if case.array is None:
        return None
    if case.array == "bias":
        key = mx.random.key(seed + 200)
        return mx.random.normal((1, case.hq, case.lq, case.lk), key=key).astype(case.dtype)
    return random_mask(case.array, case.hq, case.lq, case.lk, case.dtype, seed + 100, empty_row=(0, 2))


def _segments(case: Case, seed: int):
    if case.segments is None:
        return None
    return segment_layout(case.segments, case.B, case.lk, seed)


def _problem(case: Case, seed: int = 0):
    """q, k, v, dout, the StructuredMask and the sinks of a case."""
    q, k, v, dout = random_inputs(
        case.B, case.hq, case.hkv, case.lq, case.lk, case.dim, case.value_dim, case.dtype, seed
    )
    array = _array(case, seed)
    mask = array if array is not None else ("causal" if case.causal else None)
    structure = structured(case.lq, case.lk, mask, _segments(case, seed), case.window)
    if case.causal and not structure.causal:
        structure = masks.StructuredMask(
            case.lq, case.lk, True, structure.window, structure.q_segments, structure.k_segments, structure.array
        )
    sinks = None
    if case.sinks:
        sinks = (2.0 * mx.random.normal((case.hq,), key=mx.random.key(seed + 300))).astype(case.dtype)
    return q, k, v, dout, structure, sinks


def _assert_grads_close(grads, expected, dtype):
    for grad, want, name in zip(grads, expected, ("dq", "dk", "dv", "dsinks")):
        assert_close(grad, want, TOLERANCES[dtype], name)


def _check_op_against_manual(backend, q, k, v, dout, sinks=None, **op_args):
    """The public op with ``variant="practical"`` on ``backend`` under
    ``mx.value_and_grad`` (dispatch, custom function, vjp, kernels, the
    sinks' gradient) against ``variant="manual"``."""
    primals = [q, k, v] + ([sinks] if sinks is not None else [])

    def value_and_grads(variant):
        def loss(q, k, v, *sinks):
            out = mlx_flash.scaled_dot_product_attention(
                q, k, v, sinks=sinks[0] if sinks else None, variant=variant, **op_args
            )
            return mx.sum(out.astype(mx.float32) * dout.astype(mx.float32))

        return mx.value_and_grad(loss, argnums=tuple(range(len(primals))))(*primals)

    with on_backend(backend):
        value, grads = value_and_grads("practical")
        mx.eval(value, grads)
    want_value, want_grads = value_and_grads("manual")
    assert_close(value, want_value, TOLERANCES[q.dtype], "loss")
    _assert_grads_close(grads, want_grads, q.dtype)


F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16

# Structure cases share float32 at D = Dv = 32 (one set of instantiations);
# the dtype and head-dim cases after them each add one.
KERNEL_CASES = [
    # Segment layouts.
    Case(1, 2, 1, 45, 45, 32, 32, F32, causal=True, segments="one"),
    Case(1, 1, 1, 320, 320, 32, 32, F32, causal=True, segments="many"),
    Case(2, 2, 2, 96, 96, 32, 32, F32, segments="many"),
    Case(1, 4, 2, 70, 70, 32, 32, F32, causal=True, segments="spanning"),
    Case(2, 2, 2, 50, 50, 32, 32, F32, segments="padding"),
    Case(1, 2, 1, 37, 37, 32, 32, F32, causal=True, segments="unsorted"),
    Case(1, 3, 1, 41, 41, 32, 32, F32, causal=True, segments="many", array="bias"),
    Case(1, 2, 2, 29, 53, 32, 32, F32, causal=True, segments="padding"),
    # Windows: 1, 7 (Lq < Lk, bottom-right), 128 and 129 (over several tiles),
    # one that reaches every key, with segments and with an additive mask.
    Case(1, 2, 1, 40, 40, 32, 32, F32, window=1),
    Case(1, 2, 2, 23, 50, 32, 32, F32, window=7),
    Case(1, 1, 1, 160, 160, 32, 32, F32, window=128),
    Case(1, 1, 1, 150, 170, 32, 32, F32, window=129),
    Case(1, 2, 1, 60, 60, 32, 32, F32, window=200),
    Case(1, 2, 1, 100, 100, 32, 32, F32, window=13, segments="many"),
    Case(1, 2, 1, 40, 40, 32, 32, F32, window=6, array="bias"),
    # Sinks: alone, with a window, with segments that leave rows empty.
    Case(1, 4, 2, 21, 21, 32, 32, F32, sinks=True),
    Case(1, 2, 1, 50, 50, 32, 32, F32, window=9, sinks=True),
    Case(2, 2, 2, 50, 50, 32, 32, F32, causal=True, segments="padding", sinks=True),
    # Array masks alone: empty rows, a -inf key tile, NaN rows, MQA.
    Case(1, 2, 2, 13, 21, 32, 32, F32, array="bool_empty_row"),
    Case(1, 4, 1, 9, 40, 32, 32, F32, array="additive"),
    Case(1, 2, 1, 6, 15, 32, 32, F32, array="additive_nan_row"),
    Case(1, 4, 1, 19, 33, 32, 32, F32, causal=True),
    # A GQA group wider than a query tile: its heads split over tiles.
    Case(1, 40, 1, 9, 12, 32, 32, F32, causal=True, segments="many", sinks=True),
    # Dtypes and head dims (Dv != D included), each with some structure.
    Case(1, 4, 2, 70, 70, 64, 64, F16, causal=True, segments="many"),
    Case(1, 2, 2, 33, 45, 64, 48, BF16, window=9, sinks=True),
    Case(1, 4, 1, 37, 37, 80, 80, F16, causal=True, array="bool"),
    Case(1, 2, 1, 40, 40, 96, 64, BF16, segments="spanning", array="bias"),
    Case(1, 2, 2, 29, 29, 128, 80, F32, causal=True, segments="unsorted"),
    Case(1, 2, 2, 50, 50, 128, 128, BF16, causal=True, segments="many", sinks=True),
    Case(2, 4, 1, 11, 7, 48, 32, F16, array="bool_empty_row"),
    Case(1, 2, 1, 40, 40, 256, 256, F16, window=17),
    Case(1, 2, 2, 20, 29, 256, 256, F32, causal=True, sinks=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_kernels_match_reference(backend, case):
    q, k, v, dout, mask, sinks = _problem(case, seed=case.lq)
    kernel_checks.check_kernels_match_reference(PRACTICAL, backend, q, k, v, dout, mask, TOLERANCES, sinks=sinks)


# -- tiles outside the mask are never visited --------------------------------


def _live_tiles(mask: masks.StructuredMask, q_tile: int, k_tile: int) -> set:
    """(query tile, key tile) pairs of batch row 0 that the mask's static
    bounds and segment ranges leave to visit (masks.py's skip rule)."""
    n_q, n_k = -(-mask.q_len // q_tile), -(-mask.k_len // k_tile)
    q_ranges = k_ranges = None
    if mask.has_segments:
        q_ranges = np.array(masks.segment_ranges(mask.q_segments, q_tile))[0]
        k_ranges = np.array(masks.segment_ranges(mask.k_segments, k_tile))[0]
    live = set()
    for i in range(n_q):
        rows = (i * q_tile, min((i + 1) * q_tile, mask.q_len))
        for j in range(n_k):
            cols = (j * k_tile, min((j + 1) * k_tile, mask.k_len))
            if not mask.tile_is_live(rows, cols):
                continue
            if q_ranges is not None and not masks.ranges_meet(q_ranges[i], k_ranges[j]):
                continue
            live.add((i, j))
    return live


def _nan_rows(x) -> np.ndarray:
    """Indices of the ``(1, 1, L, d)`` rows of ``x`` that hold a NaN."""
    return np.flatnonzero(np.isnan(np.array(x.astype(mx.float32))[0, 0]).any(axis=-1))


def _poisoned(x, start: int, stop: int):
    """``x`` with positions ``[start, stop)`` of axis 2 set to NaN."""
    position = mx.arange(x.shape[2])[None, None, :, None]
    return mx.where((position >= start) & (position < stop), mx.array(math.nan, x.dtype), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_lazy_maximum_rescales_exactly(backend):
    # The forward moves a row's maximum only when a score passes it by more
    # than PRACTICAL_SLACK. Scores along the keys rise by up to ~18 per key
    # tile in some rows (a rescale at every tile, corrections far below 1),
    # by less than the slack in others (weights above 1 between rescales),
    # and fall in others (no rescale after the first tile); with and without
    # causal masking and sinks.
    L, dim = 96, 32
    slope = mx.linspace(-3.0, 3.0, L)[None, None, :, None]  # per query row
    q, k, v, dout = random_inputs(1, 2, 1, L, L, dim, dim, mx.float32, 5)
    q = q * 0.1 + mx.concatenate([mx.broadcast_to(slope * 400.0, (1, 2, L, 1)), mx.zeros((1, 2, L, dim - 1))], axis=-1)
    ramp = mx.arange(L, dtype=mx.float32)[None, None, :, None] / L
    k = k * 0.1 + mx.concatenate([ramp, mx.zeros((1, 1, L, dim - 1))], axis=-1)
    for mask, sinks in ((structured(L, L), None), (structured(L, L, "causal"), mx.array([1.0, -30.0]))):
        kernel_checks.check_kernels_match_reference(
            PRACTICAL, backend, q, k, v, dout, mask, TOLERANCES, sinks=sinks
        )


def test_tiles_outside_the_mask_are_never_read():
    # Each kernel reads a staged tile into its accumulation whether or not the
    # mask keeps a pair (0 * NaN = NaN), so poisoning one tile with NaN shows
    # exactly which tiles of the other axis visited it. The visited pairs must
    # be masks.py's live pairs: no more (skipping is real) and no fewer.
    lengths = [3, 20, 9, 40, 11, 12, 65]
    length, dim = sum(lengths), 32
    ids = mx.array(np.repeat(np.arange(len(lengths)), lengths)[None].astype(np.int32))
    mask = structured(length, length, "causal", ids, window=17)
    q, k, v, dout = random_inputs(1, 1, 1, length, length, dim, dim, mx.float32, seed=1)
    scale = dim**-0.5
    keeps_any = np.array(mx.any(mask.dense_keep(), axis=-1))[0, 0]

    forward = practical.tile_sizes("forward", dim, dim, mx.float32)
    dq_tiles = practical.tile_sizes("dq", dim, dim, mx.float32)
    dkdv_tiles = practical.tile_sizes("dkdv", dim, dim, mx.float32)
    rows_fwd = forward.simdgroups * forward.rows
    rows_dq = dq_tiles.simdgroups * dq_tiles.rows
    keys_dkdv = dkdv_tiles.simdgroups * dkdv_tiles.rows
    live_fwd = _live_tiles(mask, rows_fwd, forward.tile)
    live_dq = _live_tiles(mask, rows_dq, dq_tiles.tile)
    live_dkdv = _live_tiles(mask, dkdv_tiles.tile, keys_dkdv)
    # A layout where skipping matters: about a quarter of the pairs are live.
    n_pairs = -(-length // rows_fwd) * -(-length // forward.tile)
    assert 0 < len(live_fwd) < n_pairs / 3

    with on_backend("emulator"):
        out, lse = practical.forward(AttentionCall(q, k, v, scale, mask, None))
        delta = mx.sum(dout * out, axis=-1)
        for j in range(-(-length // forward.tile)):
            bad_v = _poisoned(v, j * forward.tile, (j + 1) * forward.tile)
            rows = _nan_rows(practical.forward(AttentionCall(q, k, bad_v, scale, mask, None))[0])
            # A row that keeps no key returns zeros whatever its tiles read.
            expected = [r for r in range(length) if (r // rows_fwd, j) in live_fwd and keeps_any[r]]
            assert rows.tolist() == expected, f"forward, key tile {j}"
        for j in range(-(-length // dq_tiles.tile)):
            bad_k = _poisoned(k, j * dq_tiles.tile, (j + 1) * dq_tiles.tile)
            rows = _nan_rows(practical.dq(AttentionCall(q, bad_k, v, scale, mask, None, dout, lse, delta)))
            expected = [r for r in range(length) if (r // rows_dq, j) in live_dq]
            assert rows.tolist() == expected, f"dq, key tile {j}"
        for i in range(-(-length // dkdv_tiles.tile)):
            bad_do = _poisoned(dout, i * dkdv_tiles.tile, (i + 1) * dkdv_tiles.tile)
            _, dv = practical.dkdv(AttentionCall(q, k, v, scale, mask, None, bad_do, lse, delta))
            expected = [key for key in range(length) if (i, key // keys_dkdv) in live_dkdv]
            assert _nan_rows(dv).tolist() == expected, f"dkdv, query tile {i}"


# -- the end-to-end op -----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_end_to_end_with_structured_masks(backend):
    B, hq, hkv, length, dim = 2, 4, 2, 40, 32
    q, k, v, dout = random_inputs(B, hq, hkv, length, length, dim, dim, mx.float32, seed=7)
    ids = segment_layout("padding", B, length, seed=7)
    sinks = mx.random.normal((hq,), key=mx.random.key(7))
    structure = dict(mask="causal", segment_ids=ids, window=11)
    with on_backend(backend):
        plan = mlx_flash.explain(q, k, v, sinks=sinks, variant="practical", **structure)
    assert plan.implementation == "practical"
    _check_op_against_manual(backend, q, k, v, dout, sinks, scale=dim**-0.5, **structure)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_end_to_end_causal_more_queries_than_keys(backend):
    # Lq > Lk under causal: the dispatcher gives the first Lq - Lk queries
    # MLX's uniform weights and sends the rest to the kernels.
    q, k, v, dout = random_inputs(1, 4, 2, 21, 13, 32, 32, mx.float32, seed=7)
    _check_op_against_manual(backend, q, k, v, dout, scale=32**-0.5, mask="causal")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlx_edge_cases_end_to_end(backend):
    # What MLX answers, through the dispatcher: a boolean row that keeps
    # nothing gets uniform weights (the kernels return zeros and lse +inf,
    # the dispatcher the mean of v); an additive row of -inf is NaN; -inf
    # over whole key tiles of a row leaves the rest of it alone.
    q, k, v, _ = random_inputs(1, 2, 2, 12, 40, 32, 32, mx.float32, seed=12)
    keep = mx.random.bernoulli(0.5, (1, 1, 12, 40), key=mx.random.key(12))
    keep = mx.where(mx.arange(12)[:, None] == 3, False, keep)
    additive = mx.zeros((12, 40))
    additive = additive.at[2, :].add(-math.inf)
    additive = additive.at[5, :32].add(-math.inf)
    for mask in (keep, additive, "causal"):
        expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask)
        with on_backend(backend):
            out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask, variant="practical")
            mx.eval(out)
        assert_close(out, expected, TOLERANCES[mx.float32], str(mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sink_of_minus_infinity_adds_nothing(backend):
    # A sink of -inf contributes exp(-inf) = 0 to its row's denominator.
    # The forward walks key tiles from the last down, and here the keys of
    # the last tile are -inf in an additive mask: a row that started its
    # running maximum at the sink (-inf) would take exp(-inf - -inf) = NaN.
    L, dim = 40, 32
    q, k, v, dout = random_inputs(1, 2, 1, L, L, dim, dim, mx.float32, 21)
    additive = mx.concatenate([mx.zeros((L, L - 8)), mx.full((L, 8), -math.inf)], axis=1)
    mask = structured(L, L, additive)
    sinks = mx.array([-math.inf, 0.5])
    kernel_checks.check_kernels_match_reference(PRACTICAL, backend, q, k, v, dout, mask, TOLERANCES, sinks=sinks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_and_grad_and_checkpoint(backend):
    dtype = mx.float16
    q, k, v, dout = random_inputs(1, 2, 2, 9, 9, 32, 32, dtype, seed=8)
    # Weights from a fixed key, not the global generator (whose state
    # depends on the tests that ran before).
    proj = nn.Linear(32, 32)
    proj.weight = mx.random.uniform(-32 ** -0.5, 32 ** -0.5, (32, 32), key=mx.random.key(9))
    proj.bias = mx.random.uniform(-32 ** -0.5, 32 ** -0.5, (32,), key=mx.random.key(10))
    proj.set_dtype(dtype)

    def attend(x, k, v):
        return mlx_flash.scaled_dot_product_attention(x, k, v, scale=0.2, variant="practical")

    def loss(model, q, k, v):
        out = mx.checkpoint(attend)(model(q), k, v)
        return mx.sum(out.astype(mx.float32) * dout.astype(mx.float32))

    with on_backend(backend):
        value, grads = nn.value_and_grad(proj, loss)(proj, q, k, v)
        mx.eval(value, grads)

    def ref_loss(model, q, k, v):
        out = reference.attention(model(q), k, v, 0.2, None)
        return mx.sum(out.astype(mx.float32) * dout.astype(mx.float32))

    ref_value, ref_grads = nn.value_and_grad(proj, ref_loss)(proj, q, k, v)
    # The loss is a sum of terms of both signs: its float16 rounding scales
    # with the sum of their sizes, not with the (possibly cancelling) total.
    terms = reference.attention(proj(q), k, v, 0.2, None).astype(mx.float32) * dout.astype(mx.float32)
    atol, rtol = TOLERANCES[dtype]
    assert abs(value.item() - ref_value.item()) <= atol + rtol * mx.sum(mx.abs(terms)).item()
    assert_close(grads["weight"], ref_grads["weight"], TOLERANCES[dtype], "weight grad")


# -- inputs, schedules, caching ------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    # Transposed views, as models produce them, a mask broadcast with zero
    # strides and segment ids that are views: all read in place.
    dtype = mx.float16
    B, heads, length, dim = 2, 3, 24, 32
    q, k, v, dout = random_inputs(B, heads, heads, length, length, dim, dim, dtype, seed=5)
    q_t, k_t, v_t, do_t = (mx.swapaxes(mx.swapaxes(x, 1, 2) + 0, 1, 2) for x in (q, k, v, dout))
    keep = mx.random.bernoulli(0.8, (1, 1, 1, length), key=mx.random.key(5))
    array = mx.broadcast_to(keep, (1, heads, length, length))
    wide = mx.array(np.repeat(np.arange(6), 8)[None].repeat(B, 0).astype(np.int32))  # (B, 48)
    ids = wide[:, ::2]  # a strided view: documents of 4 positions
    q_ids = mx.swapaxes(mx.swapaxes(ids, 0, 1) + 0, 0, 1)  # column-major
    mask = structured(length, length, array, (q_ids, ids), window=10)
    assert mask.causal
    expected_out, expected_grads, _ = kernel_checks.kernel_oracle(q, k, v, dout, 0.25, mask)
    with on_backend(backend):
        out, _, grads = run_kernels(PRACTICAL, q_t, k_t, v_t, do_t, 0.25, mask)
    assert_close(out, expected_out, TOLERANCES[dtype], "output")
    _assert_grads_close(grads, expected_grads, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_do_not_depend_on_the_schedule(backend):
    # No atomics and a fixed reduction order: a shuffled thread order (or a
    # second run on the GPU) reproduces every bit, empty and NaN rows included.
    case = Case(1, 4, 2, 40, 40, 32, 32, F32, causal=True, window=15, segments="padding", sinks=True)
    q, k, v, dout, mask, sinks = _problem(case, seed=11)
    with on_backend(backend, schedule="forward"):
        out, lse, grads = run_kernels(PRACTICAL, q, k, v, dout, 0.3, mask, sinks)
    with on_backend(backend, schedule=20261122):
        out2, lse2, grads2 = run_kernels(PRACTICAL, q, k, v, dout, 0.3, mask, sinks)
    assert mx.any(lse == mx.inf).item()  # some rows keep nothing
    for a, b in zip((out, lse, *grads), (out2, lse2, *grads2)):
        assert mx.array_equal(a, b, equal_nan=True).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_explain_reports_practical(backend):
    q, k, v, _ = random_inputs(1, 4, 2, 16, 16, 64, 64, mx.float16, seed=6)
    ids = segment_layout("many", 1, 16, seed=6)
    with on_backend(backend):
        plan = mlx_flash.explain(q, k, v, mask="causal", segment_ids=ids, window=4, variant="practical")
        assert plan.implementation == "practical"
        assert plan.backend == backend
        assert "segment-id ranges that cannot meet (ids read by the kernels)" in str(plan)
        big = mx.zeros((1, 1, 16, 512), dtype=mx.float16)
        plan = mlx_flash.explain(big, big, big, variant="practical")
        assert plan.implementation == "blockwise"
        assert "head dim 512 > 256" in plan.reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_and_ops_are_cached(backend):
    q, k, v, _ = random_inputs(1, 2, 2, 8, 8, 32, 32, mx.float32, seed=9)
    mask = structured(8, 8)
    with on_backend(backend):
        PRACTICAL.attention(AttentionCall(q, k, v, 0.5, mask))
        built = kernels.build.cache_info().currsize
        ops = fused.custom_op.cache_info().currsize
        out, _ = PRACTICAL.attention(AttentionCall(q, k, v, 0.5, mask))
        again, _ = PRACTICAL.attention(AttentionCall(q, k, v, 0.5, structured(8, 8)))
        mx.eval(out, again)
        assert kernels.build.cache_info().currsize == built
        assert fused.custom_op.cache_info().currsize == ops
        assert mx.array_equal(out, again).item()


# -- the generated source ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_exp_keeps_exps_special_values(backend):
    # The kernels' exponentials are flash_exp(x) = exp2(x * log2(e)); the
    # softmax relies on exp(-inf) = 0, exp(0) = 1, NaN staying NaN, and
    # lowest - m giving 0 although x * log2(e) overflows.
    lowest = float(mx.finfo(mx.float32).min)
    x = mx.array([-math.inf, 0.0, math.nan, lowest, lowest - 5.0, -80.0, -1.5, 0.25, 3.0, 80.0])
    kernel = mx.fast.metal_kernel(
        name="flash_exp_probe",
        input_names=["x"],
        output_names=["out"],
        source="out[thread_position_in_grid.x] = flash_exp(x[thread_position_in_grid.x]);",
        header=kernels.source("flash_common.h"),
    )
    with on_backend(backend):
        (got,) = kernels.launch(
            kernel, inputs=[x], grid=(x.size, 1, 1), threadgroup=(x.size, 1, 1),
            output_shapes=[x.shape], output_dtypes=[mx.float32],
        )
    got = got.tolist()
    assert got[:2] == [0.0, 1.0]
    assert math.isnan(got[2])
    assert got[3:5] == [0.0, 0.0]
    for value, want in zip(got[5:], x[5:].tolist()):
        assert math.isclose(value, math.exp(want), rel_tol=2e-6), (want, value)


_BOUNDS_PROBE = """
const FlashMask mask = flash_read_mask(params, thread_index_in_simdgroup);
const int i = thread_position_in_grid.x;
if (i < mask.q_len) {
  bounds[4 * i + 0] = flash_key_begin(mask, i);
  bounds[4 * i + 1] = flash_key_end(mask, i + 1);
  for (int j = 0; j < mask.k_len; ++j) {
    keeps[i * mask.k_len + j] = flash_position_keeps(mask, i, j) ? 1 : 0;
  }
}
if (i < mask.k_len) {
  bounds[4 * i + 2] = flash_row_begin(mask, i);
  bounds[4 * i + 3] = flash_row_end(mask, i + 1);
}
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_common_bounds_match_masks(backend):
    # The shared header's position rule and loop bounds are masks.py's, for
    # causal with and without a window and Lq <= Lk (bottom-right).
    kernel = mx.fast.metal_kernel(
        name="flash_bounds_probe",
        input_names=["params"],
        output_names=["bounds", "keeps"],
        source=_BOUNDS_PROBE,
        header=kernels.source("flash_common.h"),
    )
    layouts = [(9, 9, False, None), (9, 9, True, None), (7, 12, True, None), (9, 9, True, 1), (7, 12, True, 4)]
    for q_len, k_len, causal, window in layouts:
        mask = masks.StructuredMask(q_len, k_len, causal, window)
        params = mx.array([q_len, k_len, 1, 1, 0, int(causal), window or 0, 0, 0, 0], mx.int32)
        size = max(q_len, k_len)
        with on_backend(backend):
            bounds, keeps = kernels.launch(
                kernel, inputs=[params], grid=(size, 1, 1), threadgroup=(size, 1, 1),
                output_shapes=[(size, 4), (q_len, k_len)], output_dtypes=[mx.int32, mx.int32],
                init_value=-7,
            )
        bounds = np.array(bounds)
        dense = mask.dense_keep()
        expected = np.ones((q_len, k_len), bool) if dense is None else np.array(dense)
        assert (np.array(keeps) == 1).tolist() == expected.tolist(), (q_len, k_len, causal, window)
        for i in range(q_len):
            assert tuple(bounds[i, :2]) == mask.key_bounds((i, i + 1)), ("keys of row", i)
        for j in range(k_len):
            assert tuple(bounds[j, 2:]) == mask.row_bounds((j, j + 1)), ("rows of key", j)


def test_signatures_have_no_unused_shape_buffers(monkeypatch):
    # MLX adds an `x_shape` (`_strides`, `_ndim`) buffer for input x whenever
    # that text occurs anywhere in the body, even inside a longer name (a
    # mask input called `mask` gave `k` a `k_shape` through `mask_shape`).
    launches = []
    real_launch = kernels.launch

    def spy(kernel, **call):
        launches.append((kernel, call))
        return real_launch(kernel, **call)

    monkeypatch.setattr(kernels, "launch", spy)
    q, k, v, dout = random_inputs(1, 2, 1, 8, 8, 32, 32, mx.float32, seed=0)
    ids = segment_layout("many", 1, 8, seed=0)
    mask = structured(8, 8, mx.ones((1, 1, 8, 8), dtype=mx.bool_), ids, window=3)
    with on_backend("emulator", schedule="forward"):
        run_kernels(PRACTICAL, q, k, v, dout, 0.125, mask, mx.zeros((2,)))
    assert len(launches) == 3
    for kernel, call in launches:
        rest = {key: value for key, value in call.items() if key != "inputs"}
        text = generated_source(kernel, call["inputs"], rest)
        buffers = re.findall(r"\b(\w+_(?:shape|strides|ndim)) \[\[buffer", text)
        assert "mask_array_shape" in buffers and "k_segments_strides" in buffers
        unused = [name for name in buffers if len(re.findall(rf"\b{name}\b", text)) < 2]
        assert unused == [], unused


def test_kernels_are_built_in_safe_math_mode(monkeypatch):
    # The kernels test for -inf (dropped scores, empty running maxima,
    # additive -inf masks); Metal's fast math may assume there are none.
    options = []
    real = mx.fast.metal_kernel

    def spy(**kwargs):
        options.append(kwargs.get("compile_options"))
        return real(**kwargs)

    monkeypatch.setattr(mx.fast, "metal_kernel", spy)
    kernels.build.__wrapped__(
        "flash_practical_forward",
        fused.KERNEL_INPUTS,
        ("o", "lse"),
        "practical_forward.metal",
        ("flash_common.h", "practical_common.h"),
    )
    assert options == [{"math_mode": "safe"}]


# -- tiles ---------------------------------------------------------------------------


def test_tile_sizes_fit_threadgroup_memory():
    # Every supported head dim pair fits Metal's 32 KB; the emulator also
    # refuses a launch over it, so the kernel cases above check the counts.
    for dim in list(range(1, 257, 7)) + [256]:
        for value_dim in (1, 32, 64, 100, 128, 256, dim):
            for dtype in (mx.float32, mx.float16, mx.bfloat16):
                for kernel in ("forward", "dq", "dkdv"):
                    tiles = practical.tile_sizes(kernel, dim, value_dim, dtype)
                    assert tiles.threadgroup_bytes <= practical.LIMIT_BYTES
                    assert 32 <= tiles.rows * tiles.tile <= 128
    # Half-precision tiles are staged as half: at D = 128 they fit the
    # preferred 16 KB with 16 or more rows sharing each tile.
    for kernel in ("forward", "dq", "dkdv"):
        tiles = practical.tile_sizes(kernel, 128, 128, mx.float16)
        assert tiles.threadgroup_bytes <= practical.PREFERRED_BYTES
        assert tiles.simdgroups * tiles.rows >= 16
    with pytest.raises(ValueError, match="at most 256"):
        practical.tile_sizes("forward", 320, 320, mx.float16)


def test_docstring_tile_table_is_current():
    # The module docstring's table of configurations is tile_table()'s.
    rows = re.findall(r"^(\d+) +(\d+) +(f32|f16|bf16) +(\w+) +(\d+)/(\d+)/(\d+) +(\d+) +(\d+)$", practical.__doc__, re.M)
    assert len(rows) >= 12
    dtypes = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}
    for dim, value_dim, dtype, kernel, nsg, rows_, tile, nbytes, registers in rows:
        tiles = practical.tile_sizes(kernel, int(dim), int(value_dim), dtypes[dtype])
        assert (tiles.simdgroups, tiles.rows, tiles.tile) == (int(nsg), int(rows_), int(tile)), (dim, kernel)
        assert (tiles.threadgroup_bytes, tiles.registers) == (int(nbytes), int(registers)), (dim, kernel)


def test_heads_per_tile_divides_the_group():
    assert fused.heads_per_tile(1, 32) == 1
    assert fused.heads_per_tile(8, 32) == 8
    assert fused.heads_per_tile(6, 16) == 6
    assert fused.heads_per_tile(64, 32) == 32
    assert fused.heads_per_tile(7, 4) == 1


def test_unsupported_reason():
    small = mx.zeros((1, 1, 4, 64))
    ids = mx.zeros((1, 4), mx.int32)
    mask = structured(4, 4, "causal", ids, window=2)
    assert practical.unsupported_reason(small, small, small, mask) is None
    wide = mx.zeros((1, 1, 4, 320))
    assert practical.unsupported_reason(wide, wide, small, mask) == "head dim 320 > 256"
    assert "value head dim" in practical.unsupported_reason(small, small, wide, mask)
    empty = mx.zeros((1, 1, 0, 64))
    assert practical.unsupported_reason(small, empty, empty, structured(4, 0)) == "no keys"
    assert "dtype" in practical.unsupported_reason(small.astype(mx.int32), small, small, mask)


if mx.metal.is_available():

    def test_compile_on_metal():
        q, k, v, dout = random_inputs(1, 2, 1, 24, 24, 64, 64, mx.float16, seed=10)
        ids = segment_layout("many", 1, 24, seed=10)

        def loss_of(variant):
            def loss(q, k, v, ids):
                out = mlx_flash.scaled_dot_product_attention(
                    q, k, v, scale=0.125, mask="causal", segment_ids=ids, window=9, variant=variant
                )
                return mx.sum(out.astype(mx.float32) * dout.astype(mx.float32))

            return mx.grad(loss, argnums=(0, 1, 2))

        grads = mx.compile(loss_of("practical"))(q, k, v, ids)
        expected = loss_of("manual")(q, k, v, ids)
        for grad, want in zip(grads, expected):
            assert_close(grad, want, TOLERANCES[mx.float16], "compiled")
