"""What the practical and demo kernel tests share: where kernels run, random
inputs and masks, the float32 oracle and the closeness check.

Every kernel test runs on each backend that can run Metal kernels here: the
CPU emulator always, real Metal too where ``mx.metal.is_available()``. On the
emulator every launch runs under two thread schedules (threads forward and
reversed) with threadgroup-memory race detection: an access pair no barrier
orders, or results that differ between the schedules, raise ``RaceError``; a
barrier or SIMD collective that not every thread reaches raises
``DivergenceError``.
"""

import contextlib

import mlx.core as mx

from mlx_flash import emulator, fused, reference

BACKENDS = ["emulator"] + (["metal"] if mx.metal.is_available() else [])
SCHEDULES = ("forward", "reverse")


def on_backend(backend, schedule=SCHEDULES):
    """Where Metal kernels run inside the block."""
    if backend == "metal":
        return contextlib.nullcontext()
    return emulator.metal(schedule=schedule)


def assert_close(actual, expected, tolerance, what=""):
    """``max |actual - expected| <= atol + rtol * max |expected|`` with
    ``tolerance = (atol, rtol)``, and NaN exactly where ``expected`` has NaN
    (rows whose additive mask is all -inf, and the gradients they reach)."""
    assert actual.shape == expected.shape, what
    atol, rtol = tolerance
    actual = actual.astype(mx.float32)
    expected = expected.astype(mx.float32)
    assert mx.array_equal(mx.isnan(actual), mx.isnan(expected)).item(), f"{what}: NaN pattern"
    finite = ~mx.isnan(expected)
    err = mx.max(mx.abs(mx.where(finite, actual - expected, 0))).item()
    size = mx.max(mx.abs(mx.where(finite, expected, 0))).item()
    assert err <= atol + rtol * size, f"{what}: max error {err:.3g} at magnitude {size:.3g}"


def random_inputs(B, n_q, n_kv, q_len, k_len, dim, value_dim, dtype, seed):
    """q, k, v and an output cotangent, normal, rounded to ``dtype``."""
    keys = mx.random.split(mx.random.key(seed), 4)
    q = mx.random.normal((B, n_q, q_len, dim), key=keys[0]).astype(dtype)
    k = mx.random.normal((B, n_kv, k_len, dim), key=keys[1]).astype(dtype)
    v = mx.random.normal((B, n_kv, k_len, value_dim), key=keys[2]).astype(dtype)
    dout = mx.random.normal((B, n_q, q_len, value_dim), key=keys[3]).astype(dtype)
    return q, k, v, dout


def random_mask(kind, n_q, q_len, k_len, dtype, seed, empty_row=(0, 2)):
    """A normalised (rank-4) mask of ``kind``; broadcast masks keep size-1 axes.

    ``bool_empty_row``: per head, and row ``empty_row = (head, query)`` keeps
    nothing (uniform weights). ``additive``: broadcast over batch and queries;
    head 0 has -inf on its first 32 keys, a whole key tile, and finite scores
    after it. ``additive_nan_row``: full shape, query row 2 is -inf
    everywhere, which is NaN in MLX too.
    """
    key = mx.random.key(seed)
    if kind == "none":
        return None
    if kind == "causal":
        return "causal"
    if kind == "bool":
        return mx.random.bernoulli(0.7, (1, 1, q_len, k_len), key=key)
    if kind == "bool_empty_row":
        keep = mx.random.bernoulli(0.6, (1, n_q, q_len, k_len), key=key)
        head, row = empty_row
        empty = (mx.arange(n_q)[:, None, None] == head) & (mx.arange(q_len)[None, :, None] == row)
        return keep & ~empty[None]
    if kind == "additive":
        bias = mx.random.normal((1, n_q, 1, k_len), key=key)
        first_tile = (mx.arange(n_q)[:, None] == 0) & (mx.arange(k_len)[None, :] < 32)
        return mx.where(first_tile[None, :, None, :], -mx.inf, bias).astype(dtype)
    if kind == "additive_nan_row":
        bias = mx.random.normal((1, n_q, q_len, k_len), key=key)
        row = mx.arange(q_len)[None, None, :, None] == 2
        return mx.where(row, -mx.inf, bias).astype(dtype)
    raise ValueError(kind)


def oracle(q, k, v, dout, scale, mask):
    """Reference output and (dq, dk, dv) by autodiff, all in float32."""
    f32 = [x.astype(mx.float32) for x in (q, k, v, dout)]
    if isinstance(mask, mx.array) and mask.dtype != mx.bool_:
        mask = mask.astype(mx.float32)

    def fn(q, k, v):
        return reference.attention(q, k, v, scale, mask)

    (out,), grads = mx.vjp(fn, f32[:3], [f32[3]])
    return out, grads


def run_kernels(module, q, k, v, dout, scale, mask):
    """Output, lse and (dq, dk, dv) from ``module``'s three launchers."""
    spec = fused.mask_spec(mask)
    out, lse = module.forward(q, k, v, scale, spec)
    delta = mx.sum(dout.astype(mx.float32) * out.astype(mx.float32), axis=-1)
    dk, dv = module.dkdv(q, k, v, scale, spec, dout, lse, delta)
    dq = module.dq(q, k, v, scale, spec, dout, lse, delta)
    mx.eval(out, lse, dq, dk, dv)
    return out, lse, (dq, dk, dv)


def check_kernels_match_reference(module, backend, q, k, v, dout, mask, tolerances):
    """``module``'s forward and backward kernels against the oracle: output
    and (dq, dk, dv) in ``q``'s dtype within ``tolerances[dtype]``, and a
    float32 log-sum-exp."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5
    expected_out, expected_grads = oracle(q, k, v, dout, scale, mask)

    with on_backend(backend):
        out, lse, grads = run_kernels(module, q, k, v, dout, scale, mask)

    assert out.dtype == dtype and lse.dtype == mx.float32
    assert_close(out, expected_out, tolerances[dtype], "output")
    for grad, expected, name in zip(grads, expected_grads, ("dq", "dk", "dv")):
        assert grad.dtype == dtype
        assert_close(grad, expected, tolerances[dtype], name)
