"""The float32 oracle of the kernel contract, the random problems it is
checked on, and the tolerances a kernel family must meet.

Shared by the test suite and by ``python -m mlx_flash.doctor``, which
checks the kernels on a user's machine the way the tests check them here.

The contract is ``mlx_flash.fused``'s, below the dispatcher: a row that
keeps no key returns zeros, no gradient and log-sum-exp ``+inf`` (what MLX's
uniform rows become is the dispatcher's business). The oracle is autodiff
through ``mlx_flash.reference`` in float32 on the same (rounded) inputs,
and the log-sum-exp in float64 NumPy.

A closeness check is ``max |actual - expected| <= atol + rtol * max
|expected|`` with ``(atol, rtol)`` per dtype, and NaN exactly where the
oracle has NaN (rows whose additive mask is all ``-inf``, and the gradients
they reach).
"""

from typing import Optional

import mlx.core as mx
import numpy as np

from . import families, masks, reference

#: ``(atol, rtol)`` per family and input dtype for the output and every
#: gradient: each family's ``tolerances`` (``mlx_flash.families``, which
#: says why each is what it is).
TOLERANCES = {family.name: dict(family.tolerances) for family in families.REGISTRY.values()}


def lse_tolerance(dtype) -> tuple:
    """``(atol, rtol)`` of the float32 log-sum-exp of a kernel whose inputs
    are ``dtype`` (half inputs round the scores before they are summed)."""
    return (1e-4, 1e-5) if dtype == mx.float32 else (2e-2, 1e-3)


def mismatch(actual, expected, tolerance) -> Optional[str]:
    """Why ``actual`` is not within ``tolerance = (atol, rtol)`` of
    ``expected`` (see the module docstring), or None when it is."""
    if tuple(actual.shape) != tuple(expected.shape):
        return f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if expected.size == 0:
        return None
    atol, rtol = tolerance
    actual = actual.astype(mx.float32)
    expected = expected.astype(mx.float32)
    if not mx.array_equal(mx.isnan(actual), mx.isnan(expected)).item():
        return "NaN pattern differs from the reference"
    finite = ~mx.isnan(expected)
    err = mx.max(mx.abs(mx.where(finite, actual - expected, 0))).item()
    size = mx.max(mx.abs(mx.where(finite, expected, 0))).item()
    if not err <= atol + rtol * size:
        return f"max error {err:.3g} at magnitude {size:.3g} (allowed {atol:g} + {rtol:g} x magnitude)"
    return None


def lse_mismatch(lse, expected, tolerance) -> Optional[str]:
    """Why a log-sum-exp is wrong, or None: finite values close, ``+inf``
    (a row that keeps no key) and ``-inf`` (a row whose kept scores are all
    ``-inf``) exactly where expected."""
    if tuple(lse.shape) != tuple(expected.shape):
        return f"shape {tuple(lse.shape)}, expected {tuple(expected.shape)}"
    if not mx.array_equal(lse == mx.inf, expected == mx.inf).item():
        return "+inf (empty row) pattern differs from the reference"
    if not mx.array_equal(lse == -mx.inf, expected == -mx.inf).item():
        return "-inf (all -inf row) pattern differs from the reference"
    finite = mx.abs(expected) != mx.inf
    return mismatch(mx.where(finite, lse, 0.0), mx.where(finite, expected, 0.0), tolerance)


# ---- random problems --------------------------------------------------------


def random_inputs(B, n_q, n_kv, q_len, k_len, dim, value_dim, dtype, seed):
    """q, k, v and an output cotangent, normal, rounded to ``dtype``."""
    keys = mx.random.split(mx.random.key(seed), 4)
    q = mx.random.normal((B, n_q, q_len, dim), key=keys[0]).astype(dtype)
    k = mx.random.normal((B, n_kv, k_len, dim), key=keys[1]).astype(dtype)
    v = mx.random.normal((B, n_kv, k_len, value_dim), key=keys[2]).astype(dtype)
    dout = mx.random.normal((B, n_q, q_len, value_dim), key=keys[3]).astype(dtype)
    return q, k, v, dout


def random_mask(kind, n_q, q_len, k_len, dtype, seed, empty_row=(0, 2)):
    """A rank-4 array mask of ``kind`` (or None / "causal"); broadcast masks
    keep size-1 axes.

    ``bool_empty_row``: per head, and row ``empty_row = (head, query)`` keeps
    nothing. ``additive``: broadcast over batch and queries; head 0 has -inf
    on its first 32 keys, a whole key tile, and finite scores after it.
    ``additive_nan_row``: full shape, query row 2 is -inf everywhere, which
    is NaN in MLX too.
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


def segment_layout(kind, B, length, seed):
    """``(B, length)`` int32 document ids of a named layout.

    ``one``: a single document. ``many``: packed documents of random lengths
    1..300 (ids non-decreasing). ``spanning``: two documents meeting off
    every tile boundary. ``padding``: packed documents, then padding (-1)
    at the end of each row and one padded position inside. ``unsorted``:
    random ids 0..3 in any order.
    """
    rng = np.random.default_rng(seed)
    ids = np.zeros((B, length), np.int32)
    for b in range(B):
        if kind == "one":
            row = np.zeros(length, np.int32)
        elif kind in ("many", "padding"):
            lengths = []
            while sum(lengths) < length:
                lengths.append(int(rng.integers(1, min(300, length) + 1)))
            row = np.repeat(np.arange(len(lengths)), lengths)[:length].astype(np.int32)
            if kind == "padding":
                row[length - max(1, length // 5) :] = -1
                row[length // 3] = -1
        elif kind == "spanning":
            row = (np.arange(length) >= length // 2 + 3).astype(np.int32)
        elif kind == "unsorted":
            row = rng.integers(0, 4, length).astype(np.int32)
        else:
            raise ValueError(kind)
        ids[b] = row
    return mx.array(ids)


# ---- the oracle -------------------------------------------------------------


def _keep(mask: masks.StructuredMask):
    """The boolean keep-mask of every boolean part (an array included), or None."""
    keep = mask.dense_keep()
    if mask.array_kind == "bool":
        keep = mask.array if keep is None else keep & mask.array
    return keep


def kernel_oracle(q, k, v, dout, scale, mask, sinks=None):
    """Reference output, (dq, dk, dv[, dsinks]) by autodiff and log-sum-exp,
    in float32, under the kernels' contract: rows that keep no key give
    zeros, no gradient and lse ``+inf``.

    ``mask`` is None, ``"causal"``, an array, or a ``StructuredMask``.
    """
    q_len, k_len = q.shape[2], k.shape[2]
    if not isinstance(mask, masks.StructuredMask):
        mask = masks.build(q_len, k_len, mask)
    if mask.array is not None and mask.array.dtype != mx.bool_:
        mask = mask.with_array(mask.array.astype(mx.float32))
    f32 = [x.astype(mx.float32) for x in (q, k, v, dout)]
    keep = _keep(mask)
    keeps_any = None if keep is None else mx.any(keep, axis=-1, keepdims=True)

    def fn(q, k, v, *rest):
        out = reference.attention(q, k, v, scale, mask, rest[0] if rest else None)
        return out if keeps_any is None else mx.where(keeps_any, out, 0.0)

    primals = f32[:3] + ([sinks.astype(mx.float32)] if sinks is not None else [])
    (out,), grads = mx.vjp(fn, primals, [f32[3]])
    return out, grads, oracle_lse(f32[0], f32[1], scale, mask, sinks)


def oracle_lse(q, k, scale, mask, sinks=None):
    """``(B, Hq, Lq)`` float32 log-sum-exp of the kept scores (sink
    included), ``+inf`` for a row that keeps none, in float64 NumPy."""
    B, n_q, q_len, _ = q.shape
    group = n_q // k.shape[1]
    k_rep = np.repeat(np.array(k, np.float64), group, axis=1)
    scores = np.einsum("bhid,bhjd->bhij", np.array(q, np.float64) * scale, k_rep)
    keep = _keep(mask)
    keep = np.ones(scores.shape, bool) if keep is None else np.broadcast_to(np.array(keep), scores.shape)
    if mask.array_kind == "additive":
        scores = scores + np.broadcast_to(np.array(mask.array.astype(mx.float32), np.float64), scores.shape)
    scores = np.where(keep, scores, -np.inf)
    if sinks is not None:
        sink = np.broadcast_to(np.array(sinks.astype(mx.float32), np.float64)[None, :, None, None], (B, n_q, q_len, 1))
        scores = np.concatenate([sink, scores], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        peak = np.max(scores, axis=-1, keepdims=True)
        safe = np.where(np.isfinite(peak), peak, 0.0)
        lse = (safe + np.log(np.sum(np.exp(scores - safe), axis=-1, keepdims=True)))[..., 0]
    lse = np.where(keep.any(axis=-1), lse, np.inf)
    return mx.array(lse.astype(np.float32))
