"""Structured masks: segment ids (packed documents), sliding windows, sinks.

The oracle for the forward is a float64 NumPy attention that applies the
rules written out again here, element by element, from the documented
contract; gradients come from MLX autodiff through ``mlx_flash.reference``
with the dense mask. ``blockwise`` runs with small tiles so that every
layout spans several query and key tiles, tails included.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_flash
from conftest import assert_close
from kernel_checks import assert_lse_close, kernel_oracle, random_inputs, segment_layout
from mlx_flash import blockwise, masks, reference
from mlx_flash.call import AttentionCall

TOLERANCES = {mx.float32: (2e-5, 2e-5), mx.float16: (3e-3, 1e-2), mx.bfloat16: (2e-2, 3e-2)}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK_Q", 16)
    monkeypatch.setattr(blockwise, "BLOCK_K", 32)


def numpy_attention(q, k, v, scale, causal=False, window=None, q_ids=None, k_ids=None, array=None, sinks=None):
    """Float64 attention from the contract, one query at a time.

    A key is kept when causal (bottom-right), window, segments and a boolean
    array all keep it; an additive array is added. A row that keeps nothing
    gets MLX's uniform weights without segment ids, zeros with them.
    """
    q, k, v = (np.array(x.astype(mx.float32), np.float64) for x in (q, k, v))
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    offset = Lk - Lq
    out = np.zeros((B, Hq, Lq, v.shape[-1]))
    arr = None if array is None else np.broadcast_to(np.array(array.astype(mx.float32) if array.dtype != mx.bool_ else array), (B, Hq, Lq, Lk))
    for b in range(B):
        for h in range(Hq):
            for i in range(Lq):
                scores = (q[b, h, i] * scale) @ k[b, h // group].T
                keep = np.ones(Lk, bool)
                j = np.arange(Lk)
                if causal:
                    keep &= j <= i + offset
                    if window is not None:
                        keep &= j > i + offset - window
                if q_ids is not None:
                    keep &= (np.array(k_ids[b]) == int(q_ids[b, i])) & (int(q_ids[b, i]) >= 0)
                if arr is not None and array.dtype == mx.bool_:
                    keep &= arr[b, h, i]
                elif arr is not None:
                    scores = scores + arr[b, h, i]
                if not keep.any():
                    out[b, h, i] = 0.0 if (q_ids is not None or sinks is not None) else v[b, h // group].mean(axis=0)
                    continue
                logits = np.where(keep, scores, -np.inf)
                if sinks is not None:
                    logits = np.concatenate([[float(sinks[h])], logits])
                top = logits.max()
                weights = np.exp(logits - top)
                weights /= weights.sum()
                if sinks is not None:
                    weights = weights[1:]
                out[b, h, i] = weights @ v[b, h // group]
    return out


def run_op(variant, q, k, v, scale, **kwargs):
    return mlx_flash.scaled_dot_product_attention(q, k, v, scale=scale, variant=variant, **kwargs)


def grads_of(fn, primals, cotangent):
    """``fn``'s output and its vjp with ``cotangent`` (all in float32)."""
    (out,), grads = mx.vjp(fn, primals, [cotangent])
    return out, grads


LAYOUTS = ["one", "many", "spanning", "padding", "unsorted"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reference_follows_the_contract(layout, causal):
    q, k, v, _ = random_inputs(2, 4, 2, 37, 37, 16, 16, mx.float32, seed=1)
    ids = segment_layout(layout, 2, 37, seed=2)
    expected = numpy_attention(q, k, v, 0.3, causal=causal, q_ids=ids, k_ids=ids)
    out = run_op("manual", q, k, v, 0.3, mask="causal" if causal else None, segment_ids=ids)
    np.testing.assert_allclose(np.array(out), expected, atol=2e-5)


@pytest.mark.parametrize("window", [1, 7, 16, 33, 200])
def test_window_matches_the_contract_and_mlx_lm(window):
    from mlx_lm.models.base import create_causal_mask

    q, k, v, _ = random_inputs(1, 2, 2, 41, 41, 16, 16, mx.float32, seed=3)
    expected = numpy_attention(q, k, v, 0.25, causal=True, window=window)
    for variant in ("manual", "mlx", "blockwise"):
        out = run_op(variant, q, k, v, 0.25, mask="causal", window=window)
        np.testing.assert_allclose(np.array(out), expected, atol=2e-5, err_msg=variant)
    dense = create_causal_mask(41, window_size=window)
    np.testing.assert_allclose(
        np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=dense)), expected, atol=2e-5
    )


def test_sinks_follow_the_contract():
    q, k, v, _ = random_inputs(1, 4, 2, 23, 23, 16, 16, mx.float32, seed=4)
    sinks = mx.array([0.5, -2.0, 3.0, 0.0])
    ids = segment_layout("many", 1, 23, seed=5)
    expected = numpy_attention(q, k, v, 0.3, causal=True, window=5, q_ids=ids, k_ids=ids, sinks=sinks)
    for variant in ("manual", "blockwise"):
        out = run_op(variant, q, k, v, 0.3, mask="causal", window=5, segment_ids=ids, sinks=sinks)
        np.testing.assert_allclose(np.array(out), expected, atol=2e-5, err_msg=variant)


# (B, Hq, Hkv, Lq, Lk, D, Dv, dtype, mask, layout, window, sinks)
CASES = [
    (1, 2, 2, 45, 45, 16, 16, mx.float32, "causal", "one", None, False),
    (2, 4, 2, 70, 70, 16, 16, mx.float32, "causal", "many", None, False),
    (1, 4, 1, 50, 50, 16, 8, mx.float32, "causal", "spanning", None, True),
    (2, 2, 2, 64, 64, 16, 16, mx.float32, "causal", "padding", None, False),
    (1, 2, 1, 33, 33, 16, 16, mx.float32, None, "unsorted", None, False),
    (1, 2, 2, 40, 40, 16, 16, mx.float32, "additive", "many", None, False),
    (1, 2, 2, 40, 40, 16, 16, mx.float32, "bool", "padding", None, True),
    (1, 2, 2, 49, 49, 16, 16, mx.float32, "causal", None, 1, False),
    (1, 4, 2, 49, 49, 16, 16, mx.float32, "causal", None, 7, True),
    (2, 2, 1, 70, 70, 16, 16, mx.float32, "causal", "many", 20, True),
    (1, 2, 2, 20, 52, 16, 16, mx.float32, "causal", "pair", 9, False),
    (1, 2, 2, 30, 30, 16, 16, mx.float32, None, None, None, True),
    (1, 4, 2, 37, 37, 32, 32, mx.float16, "causal", "many", 11, True),
    (1, 4, 2, 37, 37, 32, 32, mx.bfloat16, "causal", "padding", None, False),
]


def _case_id(case):
    B, hq, hkv, lq, lk, d, dv, dtype, mask, layout, window, sinks = case
    return f"{mask}-{layout}-w{window}-{'sinks' if sinks else 'nosinks'}-{str(dtype).split('.')[-1]}-G{hq // hkv}-Lq{lq}-Lk{lk}"


def _case_inputs(case, seed):
    B, n_q, n_kv, q_len, k_len, dim, value_dim, dtype, mask_kind, layout, window, with_sinks = case
    q, k, v, dout = random_inputs(B, n_q, n_kv, q_len, k_len, dim, value_dim, dtype, seed)
    rng = mx.random.key(seed + 1)
    mask = None
    if mask_kind == "causal":
        mask = "causal"
    elif mask_kind == "bool":
        mask = mx.random.bernoulli(0.7, (1, n_q, q_len, k_len), key=rng)
    elif mask_kind == "additive":
        mask = mx.random.normal((B, 1, 1, k_len), key=rng).astype(dtype)
    if layout == "pair":
        k_ids = segment_layout("many", B, k_len, seed)
        segments = (k_ids[:, k_len - q_len :], k_ids)
    elif layout is not None:
        segments = segment_layout(layout, B, k_len, seed)
    else:
        segments = None
    sinks = mx.random.normal((n_q,), key=mx.random.key(seed + 2)) if with_sinks else None
    return q, k, v, dout, mask, segments, window, sinks


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_blockwise_matches_the_reference(case):
    """Output, log-sum-exp and the gradients of q, k, v and the sinks."""
    q, k, v, dout, mask, segments, window, sinks = _case_inputs(case, seed=len(case[8] or "x") + case[3])
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5
    structure = masks.build(q.shape[2], k.shape[2], mask, segments, window)
    expected_out, expected_grads, expected_lse = kernel_oracle(q, k, v, dout, scale, structure, sinks)

    def fn(q, k, v, *rest):
        return blockwise.attention(AttentionCall(q, k, v, scale, structure, rest[0] if rest else None))[0]

    primals = [q, k, v] + ([sinks] if sinks is not None else [])
    out, grads = grads_of(fn, primals, dout)
    _, lse = blockwise.attention(AttentionCall(q, k, v, scale, structure, sinks))
    assert_close(out, expected_out, TOLERANCES[dtype], "output")
    assert_lse_close(lse, expected_lse, (1e-4, 1e-5) if dtype == mx.float32 else (2e-2, 1e-3))
    for grad, want, name in zip(grads, expected_grads, ("dq", "dk", "dv", "dsinks")):
        assert_close(grad, want, TOLERANCES[dtype], name)


@pytest.mark.parametrize("case", CASES[:11], ids=_case_id)
def test_public_op_matches_manual_and_mlx(case):
    """The dispatcher's semantics (uniform rows without segments, zeros with
    them) agree between manual, mlx (dense mask) and blockwise."""
    q, k, v, dout, mask, segments, window, sinks = _case_inputs(case, seed=case[3])
    kwargs = dict(mask=mask, segment_ids=segments, window=window, sinks=sinks)
    scale = q.shape[-1] ** -0.5

    def loss(variant):
        def fn(q, k, v):
            return mx.sum(run_op(variant, q, k, v, scale, **kwargs) * dout)

        return mx.value_and_grad(fn, argnums=(0, 1, 2))(q, k, v)

    expected_value, expected_grads = loss("manual")
    mlx_out = run_op("mlx", q, k, v, scale, **kwargs)
    assert_close(mlx_out, run_op("manual", q, k, v, scale, **kwargs), TOLERANCES[mx.float32], "mlx forward")
    value, grads = loss("blockwise")
    assert abs(value.item() - expected_value.item()) < 1e-3
    for grad, want, name in zip(grads, expected_grads, ("dq", "dk", "dv")):
        assert_close(grad, want, TOLERANCES[mx.float32], name)


def test_a_query_with_no_key_returns_zeros_and_no_gradient():
    q, k, v, dout = random_inputs(1, 2, 2, 12, 12, 16, 16, mx.float32, seed=6)
    ids = mx.array([[0, 0, 0, -1, 1, 1, 1, 1, -1, -1, 2, 2]])

    def loss(q, k, v):
        return mx.sum(run_op("blockwise", q, k, v, 0.3, segment_ids=ids, mask="causal") * dout)

    out = run_op("blockwise", q, k, v, 0.3, segment_ids=ids, mask="causal")
    padded = np.array(ids[0]) < 0
    assert np.all(np.array(out)[0, :, padded] == 0.0)
    dq, dk, dv = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert np.all(np.array(dq)[0, :, padded] == 0.0)
    assert np.all(np.array(dk)[0, :, padded] == 0.0) and np.all(np.array(dv)[0, :, padded] == 0.0)


def test_documents_do_not_see_each_other():
    """Changing one document's keys and values leaves the other's output
    exactly as it was (bit for bit), and changes its own."""
    q, k, v, _ = random_inputs(1, 2, 2, 40, 40, 16, 16, mx.float32, seed=7)
    ids = mx.array([[0] * 17 + [1] * 23])
    before = run_op("blockwise", q, k, v, 0.3, mask="causal", segment_ids=ids)
    k2 = k.at[:, :, :17].add(1.0)
    v2 = v.at[:, :, :17].add(1.0)
    after = run_op("blockwise", q, k2, v2, 0.3, mask="causal", segment_ids=ids)
    assert mx.array_equal(before[:, :, 17:], after[:, :, 17:]).item()
    assert not mx.allclose(before[:, :, :17], after[:, :, :17]).item()


def test_packed_tiles_are_skipped(monkeypatch):
    """A packed row computes only the tiles where documents meet: the work
    follows the sum of squared document lengths, not L^2."""
    monkeypatch.setattr(blockwise, "BLOCK_Q", 16)
    monkeypatch.setattr(blockwise, "BLOCK_K", 16)
    q, k, v, _ = random_inputs(1, 1, 1, 128, 128, 8, 8, mx.float32, seed=8)
    ids = mx.array(np.repeat(np.arange(4), 32)[None])
    structure = masks.build(128, 128, "causal", ids)
    tiles = blockwise._Tiles(AttentionCall(q, k, v, 1.0, structure))
    live = sum(len(v) for v in tiles.live.values())
    # 4 documents of 2 x 2 tiles each, causal inside: 3 tiles per document.
    assert live == 12
    full_tiles = sum(1 for blocks in tiles.live.values() for _, full in blocks if full)
    assert full_tiles == 12  # every live tile lies inside one document
    causal_only = blockwise._Tiles(AttentionCall(q, k, v, 1.0, masks.build(128, 128, "causal")))
    assert sum(len(v) for v in causal_only.live.values()) == 36


def test_window_tiles_are_skipped():
    structure = masks.build(256, 256, "causal", None, 32)
    q = mx.zeros((1, 1, 256, 8))
    tiles = blockwise._Tiles(AttentionCall(q, q, q, 1.0, structure))
    # 16-row query tiles see at most 32 + 15 keys: 2 or 3 key tiles of 32.
    assert max(len(v) for v in tiles.live.values()) <= 3
    assert sum(len(v) for v in tiles.live.values()) < 3 * 16


def test_segments_under_compile_are_exact_without_skipping():
    """Inside mx.compile the ids cannot be read on the host: every tile is
    computed and masked. A compiled step called with two different layouts
    answers each correctly (the ids are an input, never a stale constant)."""
    q, k, v, dout = random_inputs(1, 2, 2, 48, 48, 16, 16, mx.float32, seed=9)

    def loss(q, k, v, ids):
        out = run_op("blockwise", q, k, v, 0.25, mask="causal", segment_ids=ids)
        return mx.sum(out * dout)

    compiled = mx.compile(mx.value_and_grad(loss, argnums=(0, 1, 2)))
    for layout, seed in (("many", 1), ("spanning", 2), ("padding", 3)):
        ids = segment_layout(layout, 1, 48, seed)

        def ref_loss(q, k, v):
            out = run_op("manual", q, k, v, 0.25, mask="causal", segment_ids=ids)
            return mx.sum(out * dout)

        value, grads = compiled(q, k, v, ids)
        expected_value, expected_grads = mx.value_and_grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
        assert abs(value.item() - expected_value.item()) < 1e-4, layout
        for grad, want in zip(grads, expected_grads):
            assert_close(grad, want, TOLERANCES[mx.float32], layout)


def test_sinks_gradient_under_value_and_grad():
    """nn.value_and_grad of a module whose sinks are a parameter (as in
    gpt-oss) gives the reference's sink gradient."""

    class Sinky(nn.Module):
        def __init__(self):
            super().__init__()
            self.sinks = mx.array([0.3, -1.0, 1.5, 0.0])

        def __call__(self, q, k, v, variant):
            return run_op(variant, q, k, v, 0.25, mask="causal", window=6, sinks=self.sinks)

    q, k, v, dout = random_inputs(1, 4, 2, 30, 30, 16, 16, mx.float32, seed=10)
    model = Sinky()
    results = {}
    for variant in ("manual", "blockwise"):
        loss = lambda m: mx.sum(m(q, k, v, variant) * dout)  # noqa: E731
        results[variant] = nn.value_and_grad(model, loss)(model)
    (ref_value, ref_grads), (value, grads) = results["manual"], results["blockwise"]
    assert abs(value.item() - ref_value.item()) < 1e-4
    assert_close(grads["sinks"], ref_grads["sinks"], TOLERANCES[mx.float32], "dsinks")
    assert float(mx.abs(ref_grads["sinks"]).max()) > 1e-3


# ---- masks.py rules against brute force --------------------------------------


@pytest.mark.parametrize("q_len, k_len, window", [(20, 20, None), (13, 40, None), (20, 20, 5), (9, 30, 4), (30, 30, 1)])
def test_tile_bounds_agree_with_the_element_rule(q_len, k_len, window):
    mask = masks.build(q_len, k_len, "causal", None, window)
    dense = np.array(mask.dense_keep())
    for r0 in range(0, q_len, 4):
        rows = (r0, min(r0 + 4, q_len))
        begin, end = mask.key_bounds(rows)
        visible = np.flatnonzero(dense[rows[0] : rows[1]].any(axis=0))
        if visible.size:
            assert begin <= visible.min() and visible.max() < end
            assert begin == visible.min() or window is None and begin == 0
        for c0 in range(0, k_len, 8):
            cols = (c0, min(c0 + 8, k_len))
            block = dense[rows[0] : rows[1], cols[0] : cols[1]]
            assert mask.tile_is_live(rows, cols) == bool(block.any())
            assert mask.tile_is_full(rows, cols) == bool(block.all())
    for c0 in range(0, k_len, 8):
        cols = (c0, min(c0 + 8, k_len))
        begin, end = mask.row_bounds(cols)
        seeing = np.flatnonzero(dense[:, cols[0] : cols[1]].any(axis=1))
        if seeing.size:
            assert begin <= seeing.min() and seeing.max() < end


def test_segment_ranges():
    ids = mx.array([[0, 0, 1, 1, 1, -1, 2], [-1, -1, -1, 3, 3, 3, 3]])
    ranges = masks.segment_ranges(ids, 3).tolist()
    empty = list(masks.EMPTY_RANGE)
    assert ranges == [[[0, 1], [1, 1], [2, 2]], [empty, [3, 3], [3, 3]]]
    assert not masks.ranges_meet(empty, [0, 5])
    # Running bounds: the largest id of tiles 0..t, the smallest of t..T-1.
    bounds = masks.segment_bounds(ids, 3).tolist()
    assert bounds == [[[0, 1, 1, 0], [1, 1, 1, 1], [2, 2, 2, 2]],
                      [empty + [-1, 3], [3, 3, 3, 3], [3, 3, 3, 3]]]
    unsorted = masks.segment_bounds(mx.array([[2, 2, 0, 0, 1, 1]]), 2).tolist()
    assert unsorted == [[[2, 2, 2, 0], [0, 0, 2, 0], [1, 1, 2, 1]]]


# ---- errors -----------------------------------------------------------------


def bad_structure_calls():
    q, k, v, _ = random_inputs(2, 2, 2, 6, 8, 16, 16, mx.float32, seed=0)
    ids = mx.zeros((2, 8), mx.int32)
    sdpa = mlx_flash.scaled_dot_product_attention
    return {
        "float ids": (lambda: sdpa(q, k, v, scale=1.0, segment_ids=ids.astype(mx.float32)), "integer ids"),
        "ids rank": (lambda: sdpa(q, k, v, scale=1.0, segment_ids=ids[0]), r"\(batch, Lk\)"),
        "ids length": (lambda: sdpa(q, k, v, scale=1.0, segment_ids=ids[:, :6]), r"\(batch, Lk\)"),
        "ids batch": (lambda: sdpa(q, k, v, scale=1.0, segment_ids=ids[:1]), "batch 1 but the inputs have batch 2"),
        "ids list": (lambda: sdpa(q, k, v, scale=1.0, segment_ids=[[0] * 8] * 2), "mx.array of integer ids"),
        "pair length": (lambda: sdpa(q, k, v, scale=1.0, segment_ids=(ids, ids)), r"query ids.*\(batch, Lq\)"),
        "window no causal": (lambda: sdpa(q, k, v, scale=1.0, window=4), "needs mask='causal'"),
        "window zero": (lambda: sdpa(q, k, v, scale=1.0, mask="causal", window=0), "at least 1"),
        "window float": (lambda: sdpa(q, k, v, scale=1.0, mask="causal", window=2.5), "positive int"),
        "manual fused": (lambda: sdpa(q, k, v, scale=1.0, variant="manual", force_fused=True), "unfused reference"),
    }


@pytest.mark.parametrize("case", list(bad_structure_calls()))
def test_bad_structure_raises_one_line_value_error(case):
    call, message = bad_structure_calls()[case]
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_more_queries_than_keys_need_a_pair_of_ids():
    q, k, v, _ = random_inputs(1, 2, 2, 9, 6, 16, 16, mx.float32, seed=0)
    with pytest.raises(ValueError, match="pass a \\(q_ids, k_ids\\) pair"):
        mlx_flash.scaled_dot_product_attention(q, k, v, scale=1.0, segment_ids=mx.zeros((1, 6), mx.int32))


def test_explain_says_how_segments_and_windows_are_handled():
    q = mx.zeros((1, 2, 64, 16))
    ids = mx.zeros((1, 64), mx.int32)
    plan = mlx_flash.explain(q, q, q, mask="causal", segment_ids=ids, window=16, variant="blockwise")
    assert plan.implementation == "blockwise"
    assert "outside the window" in plan.mask and "segment-id ranges" in plan.mask
    assert "no Lq x Lk mask is built" in plan.summary
    dense = mlx_flash.explain(q, q, q, mask="causal", segment_ids=ids, variant="mlx")
    assert "dense Lq x Lk boolean mask" in dense.mask


def test_memory_of_packed_training_is_linear():
    """Forward+backward of a packed row keeps O(L) memory: doubling L far
    less than quadruples the peak, and no L x L array is built."""

    def peak(L):
        q, k, v, _ = random_inputs(1, 2, 2, L, L, 16, 16, mx.float32, seed=11)
        ids = mx.array(np.repeat(np.arange(L // 64), 64)[None])
        mx.eval(q, k, v, ids)

        def loss(q, k, v):
            return run_op("blockwise", q, k, v, 0.25, mask="causal", segment_ids=ids).sum()

        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(mx.grad(loss, argnums=(0, 1, 2))(q, k, v))
        return mx.get_peak_memory() - base

    small, large = peak(1024), peak(2048)
    assert large < 2.5 * small, (small, large)
    # One float32 L x L score matrix per head would be 2 * 2048^2 * 4 bytes.
    assert large < 2 * 2048 * 2048 * 4 / 4, large
