"""The attention contract: results, gradients, edge cases and errors.

The oracle is ``mlx_flash.reference`` run in float32 (its gradients come from
MLX autodiff through plain ops), and ``mx.fast.scaled_dot_product_attention``
for the forward. ``blockwise`` runs with small tiles here so that every shape
spans several query and key blocks, tails included.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_flash
from conftest import assert_close
from mlx_flash import blockwise, reference

#: ``(atol, rtol)`` of ``conftest.assert_close`` per dtype: errors relative
#: to the largest expected value, for every variant behind the dispatcher.
TOLERANCE = {mx.float32: (0.0, 2e-5), mx.float16: (0.0, 4e-3), mx.bfloat16: (0.0, 3e-2)}
GRAD_TOLERANCE = {mx.float32: (0.0, 5e-5), mx.float16: (0.0, 1e-2), mx.bfloat16: (0.0, 6e-2)}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK_Q", 8)
    monkeypatch.setattr(blockwise, "BLOCK_K", 16)


def to_numpy(x):
    return np.array(x.astype(mx.float32))


def inputs(B, Hq, Hkv, Lq, Lk, D, Dv=None, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    q = mx.random.normal((B, Hq, Lq, D)).astype(dtype)
    k = mx.random.normal((B, Hkv, Lk, D)).astype(dtype)
    v = mx.random.normal((B, Hkv, Lk, Dv or D)).astype(dtype)
    return q, k, v


def float32_mask(mask):
    if isinstance(mask, mx.array) and mask.dtype != mx.bool_:
        return mask.astype(mx.float32)
    return mask


def oracle(q, k, v, scale, mask):
    """Reference output and q/k/v gradients of ``sum(out * weight)``, in float32."""
    q, k, v = (x.astype(mx.float32) for x in (q, k, v))
    mask = float32_mask(mask)
    weight = mx.random.normal((*q.shape[:3], v.shape[-1]), key=mx.random.key(7))

    def loss(q, k, v):
        return mx.sum(reference.attention(q, k, v, scale, mask) * weight)

    out = reference.attention(q, k, v, scale, mask)
    grads = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return out, grads, weight


def run(q, k, v, scale, mask, variant, weight):
    def loss(q, k, v):
        out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, variant=variant)
        return mx.sum(out.astype(mx.float32) * weight)

    out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, variant=variant)
    grads = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return out, grads


def check_variant(variant, q, k, v, mask, scale=None):
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    expected, expected_grads, weight = oracle(q, k, v, scale, mask)
    out, grads = run(q, k, v, scale, mask, variant, weight)
    assert out.dtype == q.dtype
    tol, grad_tol = TOLERANCE[q.dtype], GRAD_TOLERANCE[q.dtype]
    assert_close(out, expected, tol, f"{variant} output")
    for name, g, e in zip("qkv", grads, expected_grads):
        assert g.dtype == q.dtype
        assert_close(g, e, grad_tol, f"{variant} d{name}")


# Shapes: (B, Hq, Hkv, Lq, Lk, D, Dv). Lengths are odd or off the tile
# sizes (8 queries, 16 keys), include Lq != Lk both ways and one tile only.
SHAPES = [
    (1, 2, 2, 17, 17, 32, 32),
    (2, 4, 2, 23, 41, 64, 64),
    (1, 4, 1, 33, 19, 80, 80),
    (2, 8, 8, 9, 9, 96, 96),
    (1, 8, 1, 5, 37, 128, 128),
    (1, 8, 2, 40, 40, 64, 32),
    (1, 1, 1, 1, 1, 32, 32),
]

MASKS = ["none", "causal", "bool", "bool_broadcast", "additive", "additive_broadcast"]


def make_mask(kind, B, Hq, Lq, Lk, dtype, seed=1):
    mx.random.seed(seed)
    if kind == "none":
        return None
    if kind == "causal":
        return "causal"
    if kind == "bool":
        return mx.random.uniform(shape=(B, Hq, Lq, Lk)) > 0.3
    if kind == "bool_broadcast":
        return mx.random.uniform(shape=(Lq, Lk)) > 0.3
    if kind == "additive":
        return (mx.random.normal((B, Hq, Lq, Lk)) * 2).astype(dtype)
    if kind == "additive_broadcast":
        return (mx.random.normal((1, Hq, 1, Lk)) * 2).astype(dtype)
    raise ValueError(kind)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_H{}-{}_L{}-{}_D{}-{}".format(*s))
@pytest.mark.parametrize("mask_kind", MASKS)
def test_blockwise_matches_reference_float32(shape, mask_kind):
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    q, k, v = inputs(B, Hq, Hkv, Lq, Lk, D, Dv)
    mask = make_mask(mask_kind, B, Hq, Lq, Lk, mx.float32)
    check_variant("blockwise", q, k, v, mask)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_blockwise_half_types(dtype, mask_kind):
    q, k, v = inputs(2, 4, 2, 19, 27, 64, dtype=dtype)
    mask = make_mask(mask_kind, 2, 4, 19, 27, dtype)
    check_variant("blockwise", q, k, v, mask)


@pytest.mark.parametrize("variant", ["manual", "blockwise", "practical", "demo", "auto"])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool_broadcast", "additive"])
def test_forward_matches_mx_fast(variant, mask_kind):
    q, k, v = inputs(2, 8, 2, 21, 30, 64)
    mask = make_mask(mask_kind, 2, 8, 21, 30, mx.float32)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask, variant=variant)
    assert_close(out, expected, TOLERANCE[mx.float32], variant)


def test_reference_matches_numpy_float64():
    """The oracle itself, against a float64 NumPy softmax with GQA and a causal mask."""
    q, k, v = inputs(1, 4, 2, 6, 9, 16)
    out = reference.attention(q, k, v, 0.3, "causal")
    qn, kn, vn = (np.array(x, dtype=np.float64) for x in (q, k, v))
    kn, vn = np.repeat(kn, 2, axis=1), np.repeat(vn, 2, axis=1)
    scores = 0.3 * qn @ kn.swapaxes(-1, -2)
    offset = 9 - 6
    keep = np.arange(6)[:, None] + offset >= np.arange(9)[None]
    scores = np.where(keep, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.array(out), weights @ vn, atol=1e-5)


# ---- edge cases: the same answers as MLX, including NaN --------------------

EDGE_VARIANTS = ["manual", "blockwise", "practical", "demo", "auto"]


@pytest.mark.parametrize("variant", EDGE_VARIANTS)
def test_fully_masked_boolean_row(variant):
    q, k, v = inputs(1, 2, 2, 12, 20, 32)
    mask = mx.random.uniform(shape=(1, 1, 12, 20)) > 0.5
    mask = mx.concatenate([mask[:, :, :3], mx.zeros((1, 1, 1, 20), mx.bool_), mask[:, :, 4:]], axis=2)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask)
    # MLX gives a row that keeps nothing uniform weights: the mean of v.
    np.testing.assert_allclose(np.array(expected[0, :, 3]), np.array(v[0].mean(axis=1)), atol=1e-5)
    out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask, variant=variant)
    assert_close(out, expected, TOLERANCE[mx.float32], variant)
    check_variant(variant, q, k, v, mask, scale=0.2)


@pytest.mark.parametrize("variant", EDGE_VARIANTS)
def test_causal_with_more_queries_than_keys(variant):
    q, k, v = inputs(1, 4, 2, 25, 11, 32)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal")
    out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal", variant=variant)
    assert_close(out, expected, TOLERANCE[mx.float32], variant)
    check_variant(variant, q, k, v, "causal", scale=0.2)


@pytest.mark.parametrize("variant", EDGE_VARIANTS)
def test_minus_infinity_in_additive_mask(variant):
    q, k, v = inputs(1, 2, 2, 10, 40, 32)
    mask = mx.zeros((10, 40))
    mask = mask.at[2, :].add(-math.inf)  # a whole row: NaN, as in MLX
    mask = mask.at[5, :20].add(-math.inf)  # whole key blocks of one row
    mask = mask.at[7, 31].add(-math.inf)  # a single score
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask)
    assert np.isnan(np.array(expected[0, 0, 2])).all()
    out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask, variant=variant)
    assert_close(out, expected, TOLERANCE[mx.float32], variant)


@pytest.mark.parametrize("variant", EDGE_VARIANTS)
def test_nan_input_spreads_like_mlx(variant):
    q, k, v = inputs(1, 2, 2, 9, 18, 32)
    q = q.at[0, 0, 4, 3].add(math.nan)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2)
    out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.2, variant=variant)
    np.testing.assert_array_equal(np.isnan(np.array(out)), np.isnan(np.array(expected)))
    assert np.isnan(np.array(out)).sum() == q.shape[-1]


@pytest.mark.parametrize("variant", ["manual", "blockwise", "auto"])
def test_sinks_give_mlx_answer(variant):
    q, k, v = inputs(1, 4, 2, 12, 12, 32)
    sinks = mx.array([0.5, -1.0, 2.0, 0.0])
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal", sinks=sinks)
    out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal", sinks=sinks, variant=variant)
    assert_close(out, expected, TOLERANCE[mx.float32], variant)
    without = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal")
    assert float(mx.abs(out - without).max()) > 1e-3  # the sinks really count


@pytest.mark.parametrize("variant", EDGE_VARIANTS)
@pytest.mark.parametrize("q_len, k_len", [(0, 8), (8, 0), (0, 0)])
def test_empty_sequences_like_mlx(variant, q_len, k_len):
    q, k, v = inputs(1, 2, 2, q_len, k_len, 32)
    for mask in (None, "causal"):
        expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask)
        out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask, variant=variant)
        assert out.shape == expected.shape
        np.testing.assert_array_equal(np.isnan(np.array(out)), np.isnan(np.array(expected)))


def test_unknown_variant_suggests_the_closest():
    q, k, v = inputs(1, 2, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="did you mean 'practical'"):
        mlx_flash.scaled_dot_product_attention(q, k, v, scale=1.0, variant="practicle")


def test_mixed_dtypes_promote_like_mlx():
    q, k, v = inputs(1, 2, 2, 9, 9, 32)
    out = mlx_flash.scaled_dot_product_attention(q.astype(mx.float16), k, v, scale=0.2, variant="blockwise")
    expected = mx.fast.scaled_dot_product_attention(q.astype(mx.float16), k, v, scale=0.2)
    assert out.dtype == expected.dtype == mx.float32
    assert_close(out, expected, TOLERANCE[mx.float16], "mixed")


# ---- bad input: MLX's ValueErrors, never a crash in a kernel ---------------


def bad_calls():
    q, k, v = inputs(1, 4, 2, 6, 8, 16)
    sdpa = mlx_flash.scaled_dot_product_attention
    return {
        "rank": (lambda: sdpa(q[0], k[0], v[0], scale=1.0), "expected to be rank 4"),
        "head_dim": (lambda: sdpa(q, k[..., :8], v, scale=1.0), "matching last dimension"),
        "heads": (lambda: sdpa(q, inputs(1, 3, 3, 6, 8, 16)[1], inputs(1, 3, 3, 6, 8, 16)[2], scale=1.0), "multiple of n_kv_heads"),
        "kv_heads": (lambda: sdpa(q, k, v[:, :1], scale=1.0), "matching n_kv_heads"),
        "kv_length": (lambda: sdpa(q, k, v[:, :, :5], scale=1.0), "same sequence length"),
        "batch": (lambda: sdpa(q, mx.concatenate([k, k]), mx.concatenate([v, v]), scale=1.0), "mismatching batch"),
        "dtype": (lambda: sdpa(q.astype(mx.int32), k.astype(mx.int32), v.astype(mx.int32), scale=1.0), "unsupported type"),
        "mask_string": (lambda: sdpa(q, k, v, scale=1.0, mask="upper"), "invalid mask option"),
        "mask_rank": (lambda: sdpa(q, k, v, scale=1.0, mask=mx.zeros((1, 1, 1, 6, 8))), "at most rank 4"),
        "mask_shape": (lambda: sdpa(q, k, v, scale=1.0, mask=mx.zeros((6, 7))), "cannot be broadcast"),
        "mask_dtype": (lambda: sdpa(q.astype(mx.float16), k.astype(mx.float16), v.astype(mx.float16), scale=1.0, mask=mx.zeros((6, 8))), "must promote"),
        "sinks_shape": (lambda: sdpa(q, k, v, scale=1.0, sinks=mx.zeros((3,))), "invalid shape for sinks"),
        "variant": (lambda: sdpa(q, k, v, scale=1.0, variant="fastest"), "unknown variant"),
    }


@pytest.mark.parametrize("case", list(bad_calls()))
def test_bad_input_raises_clear_value_error(case):
    call, message = bad_calls()[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_mlx_rejects_the_same_inputs():
    """The cases MLX checks itself are ValueErrors in MLX too: the contract
    is MLX's, not a stricter one of ours."""
    q, k, v = inputs(1, 4, 2, 6, 8, 16)
    _, k3, v3 = inputs(1, 3, 3, 6, 8, 16)
    half = [x.astype(mx.float16) for x in (q, k, v)]
    sdpa = mx.fast.scaled_dot_product_attention
    calls = [
        lambda: sdpa(q[0], k[0], v[0], scale=1.0),
        lambda: sdpa(q, k[..., :8], v, scale=1.0),
        lambda: sdpa(q, k3, v3, scale=1.0),
        lambda: sdpa(q, k, v, scale=1.0, mask="upper"),
        lambda: sdpa(q, k, v, scale=1.0, mask=mx.zeros((1, 1, 1, 6, 8))),
        lambda: sdpa(q, k, v, scale=1.0, mask=mx.zeros((6, 7))),
        lambda: sdpa(*half, scale=1.0, mask=mx.zeros((6, 8))),
        lambda: sdpa(q, k, v, scale=1.0, sinks=mx.zeros((3,))),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            mx.eval(call())


# ---- dispatch and explain ---------------------------------------------------


def test_explain_names_the_fallback_without_metal():
    q, k, v = inputs(1, 2, 2, 64, 64, 64)
    for variant in ("practical", "demo"):
        plan = mlx_flash.explain(q, k, v, mask="causal", variant=variant)
        assert plan.implementation == "blockwise"
        assert "Metal is not available" in plan.reason
    assert mlx_flash.explain(q, k, v, variant="manual").implementation == "manual"
    assert mlx_flash.explain(q, k, v, variant="mlx").implementation == "mlx"
    decode = mlx_flash.explain(q[:, :, :1], k, v, variant="auto")
    assert decode.implementation == "mlx" and "decoding" in decode.reason
    # Sinks are fused (with their gradient) by blockwise, not sent to MLX.
    with_sinks = mlx_flash.explain(q, k, v, sinks=mx.zeros((2,)), variant="blockwise")
    assert with_sinks.implementation == "blockwise"
    assert "sinks: start each row's online softmax" in with_sinks.mask
    assert "does not take them" in mlx_flash.explain(q, k, v, sinks=mx.zeros((2,)), variant="mlx").mask
    assert "sinks" not in mlx_flash.explain(q, k, v, variant="blockwise").mask


def test_explain_reports_the_mlx_lm_patch():
    q, k, v = inputs(1, 2, 2, 64, 64, 64)
    assert "not patched" in str(mlx_flash.explain(q, k, v))
    with mlx_flash.patched(variant="blockwise"):
        assert "patched with variant 'blockwise'" in str(mlx_flash.explain(q, k, v))
    plan = mlx_flash.explain(q, k, v)
    assert "not patched" in plan.patch
    # summary is the one-line what-runs part, without the patch state.
    assert str(plan) == f"{plan.summary}\n{plan.patch}" and "patched" not in plan.summary


def test_explain_checks_its_arguments():
    q, k, v = inputs(1, 2, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="unknown variant"):
        mlx_flash.explain(q, k, v, variant="nope")
    with pytest.raises(ValueError, match="rank 4"):
        mlx_flash.explain(q[0], k, v)


# ---- transformations: compile, grad, value_and_grad, checkpoint ------------


def test_blockwise_under_compile_and_checkpoint():
    q, k, v = inputs(1, 4, 2, 24, 24, 32)
    weight = mx.random.normal((1, 4, 24, 32))

    def loss(q, k, v):
        out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal", variant="blockwise")
        return mx.sum(out * weight)

    def reference_loss(q, k, v):
        return mx.sum(reference.attention(q, k, v, 0.2, "causal") * weight)

    expected_value, expected_grads = mx.value_and_grad(reference_loss, argnums=(0, 1, 2))(q, k, v)
    for fn in (
        mx.compile(mx.value_and_grad(loss, argnums=(0, 1, 2))),
        mx.value_and_grad(mx.checkpoint(loss), argnums=(0, 1, 2)),
        mx.compile(mx.value_and_grad(mx.checkpoint(loss), argnums=(0, 1, 2))),
    ):
        value, grads = fn(q, k, v)
        assert abs(value.item() - expected_value.item()) < 1e-3
        for g, e in zip(grads, expected_grads):
            assert_close(g, e, GRAD_TOLERANCE[mx.float32], "compiled grad")


def test_compiled_training_step_of_an_mlx_lm_model():
    """A compiled nn.value_and_grad step of a tiny llama whose attention runs
    blockwise gives the same loss and gradients as with MLX's attention."""
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=97,
        head_dim=16,
    )
    mx.random.seed(3)
    model = llama.Model(args)
    mx.eval(model.parameters())
    tokens = mx.random.randint(0, 97, (2, 33))

    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    # As in mlx-lm's trainer: the model's state is an implicit input.
    step = mx.compile(lambda tokens: loss_and_grad(model, tokens), inputs=model.state)
    expected_loss, expected_grads = loss_and_grad(model, tokens)

    original = llama.scaled_dot_product_attention
    calls = []

    def flash(queries, keys, values, cache, scale, mask, sinks=None):
        calls.append(queries.shape)
        return mlx_flash.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask, variant="blockwise")

    llama.scaled_dot_product_attention = flash
    try:
        loss, grads = step(tokens)
        mx.eval(loss, grads)
    finally:
        llama.scaled_dot_product_attention = original
    assert calls, "the model did not call the patched attention"
    assert abs(loss.item() - expected_loss.item()) < 1e-4
    flat, expected_flat = dict(tree_flatten(grads)), dict(tree_flatten(expected_grads))
    assert flat.keys() == expected_flat.keys()
    for name, g in flat.items():
        assert_close(g, expected_flat[name], (0.0, 1e-4), name)


def tree_flatten(tree):
    from mlx.utils import tree_flatten as flatten

    return flatten(tree)


def test_blockwise_memory_grows_linearly(monkeypatch):
    """Peak memory of forward+backward at twice the length stays well under
    the 4x an L x L score matrix would need."""
    monkeypatch.setattr(blockwise, "BLOCK_Q", 64)
    monkeypatch.setattr(blockwise, "BLOCK_K", 64)

    def peak(L):
        q, k, v = inputs(1, 2, 2, L, L, 32)
        mx.eval(q, k, v)

        def loss(q, k, v):
            return mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal", variant="blockwise").sum()

        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(mx.grad(loss, argnums=(0, 1, 2))(q, k, v))
        return mx.get_peak_memory() - base

    def peak_unfused(L):
        q, k, v = inputs(1, 2, 2, L, L, 32)
        mx.eval(q, k, v)

        def loss(q, k, v):
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal").sum()

        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(mx.grad(loss, argnums=(0, 1, 2))(q, k, v))
        return mx.get_peak_memory() - base

    small, large = peak(512), peak(1024)
    assert large < 2.5 * small, (small, large)
    assert large * 4 < peak_unfused(1024)


# ---- a drop-in for mx.fast.scaled_dot_product_attention ---------------------


def _mlx_parameters():
    """MLX's parameters, from the signature nanobind writes in the docstring:
    ``[(name, keyword_only, default)]``."""
    import re

    line = mx.fast.scaled_dot_product_attention.__doc__.splitlines()[0]
    inside = line[line.index("(") + 1 : line.rindex(")")]
    params, keyword_only = [], False
    for part in (p.strip() for p in inside.split(",")):
        if part == "*":
            keyword_only = True
            continue
        name = re.match(r"(\w+)", part).group(1)
        default = part.split("=", 1)[1].strip() if "=" in part else None
        params.append((name, keyword_only, default))
    return params


def test_signature_is_mlx_s_plus_the_structure_arguments():
    import inspect

    ours = inspect.signature(mlx_flash.scaled_dot_product_attention).parameters
    for name, keyword_only, default in _mlx_parameters():
        assert name in ours, name
        p = ours[name]
        assert (p.kind == inspect.Parameter.KEYWORD_ONLY) == keyword_only, name
        if default is not None:
            assert repr(p.default) == default, (name, p.default, default)
    assert list(ours)[:3] == ["q", "k", "v"]
    extra = set(ours) - {name for name, _, _ in _mlx_parameters()}
    assert extra == {"segment_ids", "window", "variant"}


@pytest.mark.parametrize("variant", ["mlx", "manual", "blockwise", "practical", "demo", "auto"])
def test_assigning_it_over_mx_fast_works_for_every_variant_and_shape(variant, monkeypatch):
    """The most direct drop-in: mx.fast's own name bound to our op. mlx-lm's
    attention then reaches it for prefill and decoding, with sinks and with
    empty inputs, and nothing recurses into itself."""
    import functools

    from mlx_lm.models import llama

    original = mx.fast.scaled_dot_product_attention
    q, k, v = inputs(1, 4, 2, 9, 9, 16)
    expected = {
        "prefill": original(q, k, v, scale=0.25, mask="causal"),
        "decode": original(q[:, :, -1:], k, v, scale=0.25),
        "sinks": original(q, k, v, scale=0.25, mask="causal", sinks=mx.array([0.1, -0.2, 0.3, 0.0])),
        "empty": original(q[:0], k[:0], v[:0], scale=0.25),
    }
    args = llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, vocab_size=50,
    )
    mx.random.seed(5)
    model = llama.Model(args)
    tokens = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    logits = model(tokens)
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention",
                        functools.partial(mlx_flash.scaled_dot_product_attention, variant=variant))
    sdpa = mx.fast.scaled_dot_product_attention
    got = {
        "prefill": sdpa(q, k, v, scale=0.25, mask="causal"),
        "decode": sdpa(q[:, :, -1:], k, v, scale=0.25),
        "sinks": sdpa(q, k, v, scale=0.25, mask="causal", sinks=mx.array([0.1, -0.2, 0.3, 0.0])),
        "empty": sdpa(q[:0], k[:0], v[:0], scale=0.25),
    }
    for name in expected:
        assert_close(got[name], expected[name], TOLERANCE[mx.float32], name)
    # An mlx-lm model whose attention calls mx.fast by name runs through it.
    assert_close(model(tokens), logits, (0.0, 1e-4), "model logits")


@pytest.mark.parametrize("variant", EDGE_VARIANTS + ["mlx"])
@pytest.mark.parametrize("mask", [None, "causal"])
def test_empty_batch_like_mlx(variant, mask):
    q, k, v = inputs(0, 2, 2, 6, 6, 16)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask)
    out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask, variant=variant)
    assert out.shape == expected.shape == (0, 2, 6, 16) and out.dtype == expected.dtype


@pytest.mark.parametrize("bad", [np.ones((6, 6), bool), True, [[True] * 6] * 6, 3])
def test_a_mask_of_the_wrong_python_type_is_a_type_error_as_in_mlx(bad):
    q, k, v = inputs(1, 2, 2, 6, 6, 16)
    with pytest.raises(TypeError):
        mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bad)
    with pytest.raises(TypeError, match="mask must be None, 'causal' or an mx.array"):
        mlx_flash.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bad)


def test_stream_and_force_fused_are_accepted_as_mlx_accepts_them():
    q, k, v = inputs(1, 2, 2, 12, 12, 16)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal")
    for variant in ("mlx", "manual", "blockwise", "auto"):
        out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal", variant=variant, stream=mx.cpu)
        assert_close(out, expected, TOLERANCE[mx.float32], variant)
    # Without Metal, MLX has no fused kernel: "mlx" raises what MLX raises,
    # "auto" runs the fused blockwise path, "manual" is refused.
    with pytest.raises(ValueError, match="no fused kernel"):
        mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal", variant="mlx", force_fused=True)
    plan = mlx_flash.explain(q[:, :, :1], k, v, variant="auto", force_fused=True)
    assert plan.implementation == "blockwise"
    out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal", force_fused=True)
    assert_close(out, expected, TOLERANCE[mx.float32], "auto fused")
    with pytest.raises(ValueError, match="unfused reference"):
        mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.2, variant="manual", force_fused=True)
