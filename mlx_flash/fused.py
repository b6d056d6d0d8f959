"""Fused attention kernels wrapped as one differentiable MLX op.

A kernel family (``mlx_flash.families``) is three launchers; ``attention``
turns them into an ``mx.custom_function`` whose forward runs the forward
kernel and whose ``vjp`` runs the FlashAttention-2 backward:
``delta = rowsum(dO * O)``, then the dK/dV kernel and the dQ kernel, and the
sinks' gradient. The log-sum-exp the forward writes is an output of the
custom function, so the backward reads it instead of recomputing the
softmax, and ``mx.grad``, ``nn.value_and_grad``, ``mx.checkpoint`` and
``mx.compile`` all see one op with a fused gradient. ``custom_op`` is that
wrapping for any forward and gradients (``blockwise`` uses it too).

Launchers take one ``AttentionCall`` (``mlx_flash.call``) of normalised
inputs (see ``mlx_flash.attention``): a ``StructuredMask`` whose causal rule
has ``Lq <= Lk``, and the sinks (or None). They build their kernels with
``mlx_flash.kernels.build``, pass ``kernel_inputs(call, ...)`` (the same
inputs for every kernel of every family) and run them with
``mlx_flash.kernels.launch``:

* ``forward(call) -> (o, lse)``: ``o`` is ``(B, Hq, Lq, Dv)`` in ``q``'s
  dtype, ``lse`` the ``(B, Hq, Lq)`` float32 natural log-sum-exp of the
  masked, scaled scores (sink included); ``+inf`` where a row keeps no key,
  whose ``o`` is zero.
* ``dkdv(call) -> (dk, dv)`` and ``dq(call) -> dq``, on a backward call
  (``call.dout``, ``call.lse``, ``call.delta`` set).

``delta`` is ``(B, Hq, Lq)`` float32, computed here with MLX ops, as is the
sinks' gradient: the sink is a key of logit ``sink_h`` and value zero, so
``dS_sink = P_sink * (0 - delta)`` and
``d sink_h = -sum_{b, i} exp(sink_h - lse_bhi) * delta_bhi``, an ``O(L)``
reduction with no atomics, in a fixed order.

The kernels' inputs (``KERNEL_INPUTS``, then ``dout``, ``lse``, ``delta`` for
the backward) and ``params`` are described in ``metal/flash_common.h``.
"""

import functools
from typing import Callable

import mlx.core as mx

from . import masks
from .call import AttentionCall

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


def input_names(call: AttentionCall) -> tuple:
    """``KERNEL_INPUTS``, or ``BACKWARD_INPUTS`` for a backward call."""
    return BACKWARD_INPUTS if call.is_backward else KERNEL_INPUTS


def heads_per_tile(group: int, limit: int) -> int:
    """Query heads side by side in one query tile (or threadgroup): the
    largest divisor of the GQA group size ``group`` that is at most
    ``limit``, so the tile's heads share one KV head and each staged K/V
    tile serves all of them."""
    return max(h for h in range(1, min(group, limit) + 1) if group % h == 0)


def kernel_inputs(call: AttentionCall, q_tile: int, k_tile: int) -> list:
    """The inputs named by ``input_names(call)`` for a kernel whose query
    tiles have ``q_tile`` rows and key tiles ``k_tile`` keys.

    ``q_ranges`` / ``k_ranges`` are ``masks.segment_bounds`` of the ids at
    those tile sizes, ``(B, T, 4)`` int32: each tile's ``(min, max)``, so a
    kernel can skip a tile pair whose ranges cannot meet before it stages
    anything, and the running bounds that end its tile loop early. Absent
    parts are small placeholders the kernels never read (``params`` says
    which).
    """
    q, k, mask, sinks = call.q, call.k, call.mask, call.sinks
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
    fparams = mx.array([call.scale], dtype=mx.float32)
    array = mask.array if mask.array is not None else mx.zeros((1, 1, 1, 1), mx.bool_)
    if mask.has_segments:
        q_ids, k_ids = mask.q_segments, mask.k_segments
        q_ranges = masks.segment_bounds(q_ids, q_tile)
        k_ranges = masks.segment_bounds(k_ids, k_tile)
    else:
        q_ids = k_ids = mx.zeros((1, 1), mx.int32)
        q_ranges = k_ranges = mx.zeros((1, 1, 4), mx.int32)
    sink_logits = sinks.astype(mx.float32) if sinks is not None else mx.zeros((1,), mx.float32)
    inputs = [q, k, call.v, array, q_ids, k_ids, q_ranges, k_ranges, sink_logits, params, fparams]
    if call.is_backward:
        inputs += [call.dout, call.lse, call.delta]
    return inputs


def gradients(family, call: AttentionCall, out: mx.array):
    """``(dq, dk, dv, delta)`` of a backward ``call`` (``dout`` and ``lse``
    set) through ``family``'s dK/dV and dQ launchers; ``out`` is the
    forward's output."""
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij: the row term of the
    # softmax gradient, computed once instead of per key tile.
    delta = mx.sum(call.dout.astype(mx.float32) * out.astype(mx.float32), axis=-1)
    call = call.backward(call.dout, call.lse, delta)
    dk, dv = family.dkdv(call)
    return family.dq(call), dk, dv, delta


@functools.lru_cache(maxsize=None)
def custom_op(forward: Callable, backward: Callable, scale: float, layout: masks.Layout):
    """The differentiable op of ``forward`` and ``backward`` for one scale
    and mask layout.

    ``forward(call) -> (o, lse)`` and ``backward(call, o) -> (dq, dk, dv,
    delta)`` (``call`` with ``dout`` and ``lse`` set) take an
    ``AttentionCall``. The op's primals are ``(q, k, v, *layout arrays)``
    (the array mask, the query and key segment ids and the sinks, each
    where present, so they are traced inputs, never captured constants); it
    returns ``(o, lse)``. Built once per key, so repeated calls (every
    layer, every step) reuse it.
    """

    @mx.custom_function
    def op(q, k, v, *arrays):
        mask, sinks = layout.unpack(arrays)
        return forward(AttentionCall(q, k, v, scale, mask, sinks))

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        q, k, v, *arrays = primals
        mask, sinks = layout.unpack(arrays)
        o, lse = outputs
        call = AttentionCall(q, k, v, scale, mask, sinks, dout=cotangents[0], lse=lse)
        dq, dk, dv, delta = backward(call, o)
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


def run(forward: Callable, backward: Callable, call: AttentionCall):
    """``(o, lse)`` of ``call`` through ``custom_op(forward, backward, ...)``:
    ``(B, Hq, Lq, Dv)`` in ``q``'s dtype and the ``(B, Hq, Lq)`` float32
    log-sum-exp (``+inf`` where a row keeps no key)."""
    mask, sinks = call.mask, call.sinks
    op = custom_op(forward, backward, float(call.scale), masks.Layout.of(mask, sinks))
    return op(call.q, call.k, call.v, *masks.Layout.arrays(mask, sinks))
