"""The practical Metal kernels, forward and backward.

Kernel results are compared with autodiff through ``mlx_flash.reference``
computed in float32, on every backend in ``kernel_checks.BACKENDS``, under two
thread schedules with race detection on the emulator (see ``kernel_checks``).
"""

import math
import re

import mlx.core as mx
import mlx.nn as nn
import pytest

import kernel_checks
import mlx_flash
from kernel_checks import BACKENDS, check_kernels_match_reference, oracle, on_backend, random_inputs, random_mask, run_kernels
from mlx_flash import demo, fused, kernels, practical, reference
from mlx_flash.emulator.source import generated_source

# max |actual - expected| <= ATOL + RTOL * max |expected|, per dtype: float32
# kernels only reorder float32 sums; float16 / bfloat16 add the rounding of
# the inputs' products and of the stored results (eps 1e-3 and 8e-3).
TOLERANCES = {
    mx.float32: (1e-5, 1e-4),
    mx.float16: (2e-3, 1e-2),
    mx.bfloat16: (1e-2, 3e-2),
}


def assert_close(actual, expected, dtype, what=""):
    kernel_checks.assert_close(actual, expected, TOLERANCES[dtype], what)


def _inputs(B, n_q, n_kv, q_len, k_len, dim, value_dim, dtype, seed):
    return random_inputs(B, n_q, n_kv, q_len, k_len, dim, value_dim, dtype, seed)


def _mask(kind, B, n_q, q_len, k_len, dtype, seed):
    return random_mask(kind, n_q, q_len, k_len, dtype, seed + 100, empty_row=(0, 2))


def _run_kernels(q, k, v, dout, scale, mask):
    return run_kernels(practical, q, k, v, dout, scale, mask)



# Each axis covered deliberately rather than the full product:
# (B, Hq, Hkv, Lq, Lk, D, Dv, dtype, mask). With Lk = 40 and D = 64 the
# additive mask's -inf covers a whole key tile of rows that have finite keys
# later; with Lk = 15 it covers whole rows of head 0, whose output and
# gradients must then be NaN exactly where the reference's are.
KERNEL_CASES = [
    (2, 2, 2, 17, 17, 64, 64, mx.float32, "none"),
    (1, 2, 2, 23, 40, 32, 32, mx.float32, "causal"),
    (1, 4, 1, 19, 33, 64, 64, mx.float16, "bool"),
    (1, 4, 1, 9, 40, 64, 64, mx.bfloat16, "additive"),
    (1, 2, 2, 13, 21, 128, 128, mx.float32, "bool_empty_row"),
    (1, 4, 1, 37, 37, 80, 80, mx.float16, "causal"),
    (2, 4, 1, 11, 7, 32, 48, mx.bfloat16, "bool_empty_row"),
    (1, 2, 2, 5, 29, 80, 80, mx.bfloat16, "bool_empty_row"),
    (1, 4, 2, 12, 15, 96, 64, mx.float32, "additive"),
    (1, 2, 2, 9, 20, 256, 256, mx.float16, "causal"),
]


def _case_id(case):
    B, hq, hkv, lq, lk, d, dv, dtype, mask = case
    return f"{mask}-{str(dtype).split('.')[-1]}-D{d}-Dv{dv}-G{hq // hkv}-Lq{lq}-Lk{lk}-B{B}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_case_id)
def test_kernels_match_reference(backend, case):
    B, n_q, n_kv, q_len, k_len, dim, value_dim, dtype, mask_kind = case
    q, k, v, dout = _inputs(B, n_q, n_kv, q_len, k_len, dim, value_dim, dtype, seed=q_len)
    mask = _mask(mask_kind, B, n_q, q_len, k_len, dtype, seed=q_len)
    check_kernels_match_reference(practical, backend, q, k, v, dout, mask, TOLERANCES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_do_not_depend_on_the_schedule(backend):
    # No atomics and a fixed reduction order: a shuffled thread order (or a
    # second run on the GPU) reproduces every bit, NaN rows included.
    q, k, v, dout = _inputs(1, 4, 2, 14, 26, 32, 32, mx.float16, seed=11)
    mask = _mask("bool_empty_row", 1, 4, 14, 26, mx.float16, seed=11)
    with on_backend(backend, schedule="forward"):
        out, lse, grads = _run_kernels(q, k, v, dout, 0.3, mask)
    with on_backend(backend, schedule=20261122):
        out2, lse2, grads2 = _run_kernels(q, k, v, dout, 0.3, mask)
    for a, b in zip((out, lse, *grads), (out2, lse2, *grads2)):
        assert mx.array_equal(a, b, equal_nan=True).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_sum_exp(backend):
    q, k, v, dout = _inputs(1, 2, 1, 10, 35, 32, 32, mx.float32, seed=3)
    scale = 0.2
    scores = (q * scale) @ mx.swapaxes(mx.repeat(k, 2, axis=1), -1, -2)
    expected = mx.logsumexp(scores, axis=-1)
    with on_backend(backend):
        _, lse = practical.forward(q, k, v, scale, fused.mask_spec(None))
    assert_close(lse, expected, mx.float32, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_inf_additive_row_is_nan(backend):
    # MLX gives NaN for a row whose additive mask is -inf everywhere; the
    # other rows must not be touched by it.
    q, k, v, _ = _inputs(1, 1, 1, 4, 6, 32, 32, mx.float32, seed=4)
    mask = mx.zeros((1, 1, 4, 6))
    mask[:, :, 1, :] = -mx.inf
    expected = reference.attention(q, k, v, 0.3, mask)
    with on_backend(backend):
        out, _ = practical.forward(q, k, v, 0.3, fused.mask_spec(mask))
    assert mx.all(mx.isnan(out[0, 0, 1])).item()
    assert_close(out, expected, mx.float32, "output")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    # Transposed views, as models produce them, and a mask broadcast with
    # zero strides: all read in place through their strides.
    dtype = mx.float16
    q, k, v, dout = _inputs(1, 3, 3, 12, 12, 32, 32, dtype, seed=5)
    q_t, k_t, v_t = (mx.swapaxes(mx.swapaxes(x, 1, 2) + 0, 1, 2) for x in (q, k, v))
    keep = mx.random.bernoulli(0.6, (1, 1, 1, 12), key=mx.random.key(5))
    mask = mx.broadcast_to(keep, (1, 3, 12, 12))
    expected_out, expected_grads = oracle(q, k, v, dout, 0.25, mask)
    with on_backend(backend):
        out, _, grads = _run_kernels(q_t, k_t, v_t, dout, 0.25, mask)
    assert_close(out, expected_out, dtype, "output")
    for grad, expected, label in zip(grads, expected_grads, ("dq", "dk", "dv")):
        assert_close(grad, expected, dtype, label)


@pytest.mark.parametrize("backend", BACKENDS)
def test_explain_reports_practical(backend):
    q, k, v, _ = _inputs(1, 4, 2, 16, 16, 64, 64, mx.float16, seed=6)
    with on_backend(backend):
        plan = mlx_flash.explain(q, k, v, mask="causal", variant="practical")
        assert plan.implementation == "practical"
        assert plan.backend == backend
        big = mx.zeros((1, 1, 16, 512), dtype=mx.float16)
        plan = mlx_flash.explain(big, big, big, variant="practical")
        assert plan.implementation == "blockwise"
        assert "head dim 512 > 256" in plan.reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_end_to_end(backend):
    # The public op under mx.grad: dispatch, custom function, vjp, kernels.
    dtype = mx.float32
    q, k, v, dout = _inputs(1, 4, 2, 21, 13, 32, 32, dtype, seed=7)
    scale = 32**-0.5

    def loss(q, k, v):
        out = mlx_flash.scaled_dot_product_attention(
            q, k, v, scale=scale, mask="causal", variant="practical"
        )
        return mx.sum(out * dout)

    with on_backend(backend):
        out = mlx_flash.scaled_dot_product_attention(
            q, k, v, scale=scale, mask="causal", variant="practical"
        )
        grads = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
        mx.eval(out, grads)
    # Lq > Lk under causal: the first 8 queries see no key (uniform weights).
    expected_out, expected = oracle(q, k, v, dout, scale, "causal")
    assert_close(out, expected_out, dtype, "output")
    for grad, want, label in zip(grads, expected, ("dq", "dk", "dv")):
        assert_close(grad, want, dtype, label)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_and_grad_and_checkpoint(backend):
    dtype = mx.float16
    q, k, v, dout = _inputs(1, 2, 2, 9, 9, 32, 32, dtype, seed=8)
    proj = nn.Linear(32, 32)
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
    assert_close(value, ref_value, dtype, "loss")
    assert_close(grads["weight"], ref_grads["weight"], dtype, "weight grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_and_ops_are_cached(backend):
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 32, 32, mx.float32, seed=9)
    with on_backend(backend):
        practical.attention(q, k, v, 0.5, None)
        built = kernels.build.cache_info().currsize
        ops = fused._custom_op.cache_info().currsize
        out = practical.attention(q, k, v, 0.5, None)
        again = practical.attention(q, k, v, 0.5, None)
        mx.eval(out, again)
        assert kernels.build.cache_info().currsize == built
        assert fused._custom_op.cache_info().currsize == ops
        assert mx.array_equal(out, again).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_exp_keeps_exps_special_values(backend):
    # The kernels' exponentials are flash_exp(x) = exp2(x * log2(e)); the
    # softmax relies on exp(-inf) = 0, exp(0) = 1, NaN staying NaN, and
    # lowest - m (a dropped score) giving 0 although x * log2(e) overflows.
    lowest = float(mx.finfo(mx.float32).min)
    x = mx.array(
        [-math.inf, 0.0, math.nan, lowest, lowest - 5.0, -80.0, -1.5, 0.25, 3.0, 80.0]
    )
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


@pytest.mark.parametrize("family", [practical, demo], ids=["practical", "demo"])
def test_signatures_have_no_unused_shape_buffers(family, monkeypatch):
    # MLX adds an `x_shape` (`_strides`, `_ndim`) buffer for input x whenever
    # that text occurs anywhere in the body, even inside a longer name (a
    # mask input called `mask` gave `k` a `k_shape` through `mask_shape`).
    launches = []
    real_launch = kernels.launch

    def spy(kernel, **call):
        launches.append((kernel, call))
        return real_launch(kernel, **call)

    monkeypatch.setattr(kernels, "launch", spy)
    q, k, v, dout = _inputs(1, 1, 1, 8, 8, 64, 64, mx.float16, seed=0)
    keep = mx.ones((1, 1, 8, 8), dtype=mx.bool_)
    spec = fused.mask_spec(keep)
    with on_backend("emulator", schedule="forward"):
        out, lse = family.forward(q, k, v, 0.125, spec)
        delta = mx.sum(dout.astype(mx.float32) * out.astype(mx.float32), axis=-1)
        family.dkdv(q, k, v, 0.125, spec, dout, lse, delta)
        family.dq(q, k, v, 0.125, spec, dout, lse, delta)
    assert len(launches) == 3
    for kernel, call in launches:
        rest = {key: value for key, value in call.items() if key != "inputs"}
        text = generated_source(kernel, call["inputs"], rest)
        buffers = re.findall(r"\b(\w+_(?:shape|strides|ndim)) \[\[buffer", text)
        assert "mask_array_shape" in buffers
        unused = [name for name in buffers if len(re.findall(rf"\b{name}\b", text)) < 2]
        assert unused == [], unused


def test_kernels_are_built_in_safe_math_mode(monkeypatch):
    # The kernels test for -inf (keys past the end, additive -inf masks);
    # Metal's fast math may assume there are no infinities.
    options = []
    real = mx.fast.metal_kernel

    def spy(**kwargs):
        options.append(kwargs.get("compile_options"))
        return real(**kwargs)

    monkeypatch.setattr(mx.fast, "metal_kernel", spy)
    kernels.build.__wrapped__(
        "flash_practical_forward",
        ("q", "k", "v", "mask_array", "params", "fparams"),
        ("o", "lse"),
        "practical_forward.metal",
        ("flash_common.h",),
    )
    assert options == [{"math_mode": "safe"}]


def test_tile_sizes_fit_threadgroup_memory():
    for dim in (32, 64, 80, 96, 128, 256):
        for value_dim in (dim, 64):
            sizes = practical.tile_sizes(dim, value_dim)
            padded = 32 * (math.ceil(dim / 32) + math.ceil(value_dim / 32))
            assert sizes["tile"] * padded * 4 <= practical.TILE_BYTES <= 32 * 1024
            assert 1 <= sizes["tile"] <= 32
    # Past MAX_HEAD_DIM no tile fits: refused, never launched over Metal's limit.
    with pytest.raises(ValueError, match="20480 bytes of threadgroup memory, over the 16384"):
        practical.tile_sizes(320, 320)


def test_unsupported_reason():
    small = mx.zeros((1, 1, 4, 64))
    assert practical.unsupported_reason(small, small, small, None) is None
    wide = mx.zeros((1, 1, 4, 320))
    assert practical.unsupported_reason(wide, wide, small, None) == "head dim 320 > 256"
    assert "value head dim" in practical.unsupported_reason(small, small, wide, None)
    empty = mx.zeros((1, 1, 0, 64))
    assert practical.unsupported_reason(small, empty, empty, None) == "no keys"


if mx.metal.is_available():

    def test_compile_on_metal():
        q, k, v, dout = _inputs(1, 2, 1, 24, 24, 64, 64, mx.float16, seed=10)

        def loss(q, k, v):
            out = mlx_flash.scaled_dot_product_attention(
                q, k, v, scale=0.125, mask="causal", variant="practical"
            )
            return mx.sum(out.astype(mx.float32) * dout.astype(mx.float32))

        grads = mx.compile(mx.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        _, expected = oracle(q, k, v, dout, 0.125, "causal")
        for grad, want in zip(grads, expected):
            assert_close(grad, want, mx.float16, "compiled")
