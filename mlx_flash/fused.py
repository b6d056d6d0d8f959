"""Fused attention kernels wrapped as one differentiable MLX op.

A set of fused kernels (the ``practical`` ones, the ``demo`` ones) is three
launchers; ``attention`` turns them into an ``mx.custom_function`` whose
forward runs the forward kernel and whose ``vjp`` runs the FlashAttention-2
backward: ``delta = rowsum(dO * O)``, then the dK/dV kernel and the dQ
kernel, and the sinks' gradient. The log-sum-exp the forward writes is an
output of the custom function, so the backward reads it instead of
recomputing the softmax, and ``mx.grad``, ``nn.value_and_grad``,
``mx.checkpoint`` and ``mx.compile`` all see one op with a fused gradient.

Launchers receive normalised inputs (see ``mlx_flash.attention``): a
``StructuredMask`` whose causal rule has ``Lq <= Lk``, and the sinks (or
None). They build their kernels with ``mlx_flash.kernels.build``, pass
``kernel_inputs(...)`` (the same inputs for every kernel of every family)
and run them with ``mlx_flash.kernels.launch``:

* ``forward(q, k, v, scale, mask, sinks) -> (o, lse)``: ``o`` is
  ``(B, Hq, Lq, Dv)`` in ``q``'s dtype, ``lse`` the ``(B, Hq, Lq)`` float32
  natural log-sum-exp of the masked, scaled scores (sink included);
  ``+inf`` where a row keeps no key, whose ``o`` is zero.
* ``dkdv(q, k, v, scale, mask, sinks, dout, lse, delta) -> (dk, dv)``.
* ``dq(q, k, v, scale, mask, sinks, dout, lse, delta) -> dq``.

``delta`` is ``(B, Hq, Lq)`` float32, computed here with MLX ops, as is the
sinks' gradient: the sink is a key of logit ``sink_h`` and value zero, so
``dS_sink = P_sink * (0 - delta)`` and
``d sink_h = -sum_{b, i} exp(sink_h - lse_bhi) * delta_bhi``, an ``O(L)``
reduction with no atomics, in a fixed order.

The kernels' inputs (``KERNEL_INPUTS``, then ``dout``, ``lse``, ``delta`` for
the backward) and ``params`` are described in ``metal/flash_common.h``.
"""

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

from . import masks
from .masks import StructuredMask

#: Array-mask kinds, with the integer the kernels receive (``params[4]``);
#: the values match ``FlashArrayKind`` in metal/flash_common.h.
ARRAY_NONE, ARRAY_BOOL, ARRAY_ADD = 0, 1, 2

#: Input names of every kernel, in the order ``kernel_inputs`` returns them.
#: The mask is ``mask_array``, not ``mask``: MLX gives an input a shape
#: buffer whenever ``<name>_shape`` occurs in the body, and ``mask_shape``
#: contains ``k_shape``.
KERNEL_INPUTS = (
    "q",
    "k",
    "v",
    "mask_array",
    "q_segments",
    "k_segments",
    "q_ranges",
    "k_ranges",
    "sinks",
    "params",
    "fparams",
)
BACKWARD_INPUTS = KERNEL_INPUTS + ("dout", "lse", "delta")


@dataclass(frozen=True)
class Launchers:
    """The three kernel launchers of one family of fused kernels."""

    forward: Callable
    dkdv: Callable
    dq: Callable


def kernel_inputs(q, k, v, scale: float, mask: StructuredMask, sinks, q_tile: int, k_tile: int) -> list:
    """The inputs of ``KERNEL_INPUTS`` for a kernel whose query tiles have
    ``q_tile`` rows and key tiles ``k_tile`` keys.

    ``q_ranges`` / ``k_ranges`` are ``masks.segment_bounds`` of the ids at
    those tile sizes, ``(B, T, 4)`` int32: each tile's ``(min, max)``, so a
    kernel can skip a tile pair whose ranges cannot meet before it stages
    anything, and the running bounds that end its tile loop early. Absent parts are
    small placeholders the kernels never read (``params`` says which).
    """
    B, n_q_heads, q_len, _ = q.shape
    n_kv_heads, k_len = k.shape[1], k.shape[2]
    kind = {"none": ARRAY_NONE, "bool": ARRAY_BOOL, "additive": ARRAY_ADD}[mask.array_kind]
    params = mx.array(
        [
            q_len,
            k_len,
            n_q_heads,
            n_kv_heads,
            kind,
            int(mask.causal),
            mask.window or 0,
            int(mask.has_segments),
            int(sinks is not None),
            0,  # first tile: mlx_flash.dispatch sets it for each piece of a split launch
        ],
        dtype=mx.int32,
    )
    fparams = mx.array([scale], dtype=mx.float32)
    array = mask.array if mask.array is not None else mx.zeros((1, 1, 1, 1), mx.bool_)
    if mask.has_segments:
        q_ids, k_ids = mask.q_segments, mask.k_segments
        q_ranges = masks.segment_bounds(q_ids, q_tile)
        k_ranges = masks.segment_bounds(k_ids, k_tile)
    else:
        q_ids = k_ids = mx.zeros((1, 1), mx.int32)
        q_ranges = k_ranges = mx.zeros((1, 1, 4), mx.int32)
    sink_logits = sinks.astype(mx.float32) if sinks is not None else mx.zeros((1,), mx.float32)
    return [q, k, v, array, q_ids, k_ids, q_ranges, k_ranges, sink_logits, params, fparams]


@functools.lru_cache(maxsize=None)
def _custom_op(launchers: Launchers, scale: float, layout: masks.Layout):
    """The differentiable op for one kernel family, scale and mask layout.

    Its primals are ``(q, k, v, *layout arrays)`` (the array mask, the query
    and key segment ids and the sinks, each where present, so they are
    traced inputs, never captured constants); it returns ``(o, lse)``.
    Built once per key, so repeated calls (every layer, every step) reuse it.
    """

    @mx.custom_function
    def op(q, k, v, *arrays):
        mask, sinks = layout.unpack(arrays)
        return launchers.forward(q, k, v, scale, mask, sinks)

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        q, k, v, *arrays = primals
        mask, sinks = layout.unpack(arrays)
        dout = cotangents[0]
        o, lse = outputs
        # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij: the row term of the
        # softmax gradient, computed once instead of per key tile.
        delta = mx.sum(dout.astype(mx.float32) * o.astype(mx.float32), axis=-1)
        dk, dv = launchers.dkdv(q, k, v, scale, mask, sinks, dout, lse, delta)
        dq = launchers.dq(q, k, v, scale, mask, sinks, dout, lse, delta)
        # The mask and the ids get no gradient (MLX's fused attention gives
        # the mask none either); the sinks do.
        grads = [dq, dk, dv] + [mx.zeros_like(x) for x in arrays[: len(arrays) - layout.has_sinks]]
        if layout.has_sinks:
            grads.append(sink_grad(sinks, lse, delta))
        return tuple(grads)

    return op


def sink_grad(sinks: mx.array, lse: mx.array, delta: mx.array) -> mx.array:
    """``(Hq,)`` gradient of the sinks from the ``(B, Hq, Lq)`` float32
    log-sum-exp and ``delta``: each row adds ``-exp(sink - lse) * delta``
    (rows that keep no key have lse +inf and add 0)."""
    p_sink = mx.exp(sinks.astype(mx.float32)[None, :, None] - lse)
    return (-mx.sum(p_sink * delta, axis=(0, 2))).astype(sinks.dtype)


def attention(
    launchers: Launchers,
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: StructuredMask,
    sinks: Optional[mx.array] = None,
):
    """``softmax(scale * q @ k^T + mask) @ v`` through ``launchers``.

    Args:
        launchers: the kernel family to run.
        q: ``(B, Hq, Lq, D)``; ``k``: ``(B, Hkv, Lk, D)``; ``v``:
            ``(B, Hkv, Lk, Dv)``, one floating dtype.
        scale: multiplies ``q @ k^T``.
        mask: the ``StructuredMask`` (causal only with ``Lq <= Lk``).
        sinks: optional ``(Hq,)`` sink logits.

    Returns:
        ``(o, lse)``: ``(B, Hq, Lq, Dv)`` in ``q``'s dtype and the
        ``(B, Hq, Lq)`` float32 log-sum-exp (``+inf`` where a row keeps no key).
    """
    op = _custom_op(launchers, float(scale), masks.Layout.of(mask, sinks))
    return op(q, k, v, *masks.Layout.arrays(mask, sinks))
