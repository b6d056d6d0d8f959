"""Fused attention kernels wrapped as one differentiable MLX op.

A set of fused kernels (the ``practical`` ones, the ``demo`` ones) is three
launchers; ``attention`` turns them into an ``mx.custom_function`` whose
forward runs the forward kernel and whose ``vjp`` runs the FlashAttention-2
backward: ``delta = rowsum(dO * O)``, then the dK/dV kernel and the dQ
kernel. The log-sum-exp the forward writes is an output of the custom
function, so the backward reads it instead of recomputing the softmax, and
``mx.grad``, ``nn.value_and_grad``, ``mx.checkpoint`` and ``mx.compile`` all
see one op with a fused gradient.

Launchers receive normalised inputs (see ``mlx_flash.attention``) and a
``MaskSpec``; they build their kernels with ``mlx_flash.kernels.build`` and
run them with ``mlx_flash.kernels.launch``:

* ``forward(q, k, v, scale, mask) -> (o, lse)``: ``o`` is ``(B, Hq, Lq, Dv)``
  in ``q``'s dtype, ``lse`` the ``(B, Hq, Lq)`` float32 log-sum-exp of the
  masked, scaled scores.
* ``dkdv(q, k, v, scale, mask, dout, lse, delta) -> (dk, dv)``.
* ``dq(q, k, v, scale, mask, dout, lse, delta) -> dq``.

``delta`` is ``(B, Hq, Lq)`` float32, computed here with MLX ops.
"""

import functools
from dataclasses import dataclass
from typing import Callable, Union

import mlx.core as mx

#: Mask kinds, with the integer the kernels receive (``params[4]``); the
#: values match ``FlashMaskKind`` in metal/flash_common.h.
MASK_NONE, MASK_CAUSAL, MASK_BOOL, MASK_ADD = 0, 1, 2, 3


@dataclass(frozen=True)
class MaskSpec:
    """The mask as the kernels see it.

    ``kind`` is one of ``MASK_NONE``, ``MASK_CAUSAL``, ``MASK_BOOL``,
    ``MASK_ADD``. ``array`` is the rank-4 mask view, boolean or in ``q``'s
    dtype, broadcastable to ``(B, Hq, Lq, Lk)`` with its size-1 axes kept
    (kernels read it through its shape and strides, so a broadcast mask is
    never materialised); for ``MASK_NONE`` and ``MASK_CAUSAL`` it is a
    ``(1, 1, 1, 1)`` boolean placeholder that kernels never read.
    """

    kind: int
    array: mx.array


@dataclass(frozen=True)
class Launchers:
    """The three kernel launchers of one family of fused kernels."""

    forward: Callable
    dkdv: Callable
    dq: Callable


def _placeholder_mask() -> mx.array:
    return mx.zeros((1, 1, 1, 1), dtype=mx.bool_)


def mask_spec(mask: Union[None, str, mx.array]) -> MaskSpec:
    """``MaskSpec`` of a normalised mask (None, ``"causal"`` or a rank-4 array)."""
    if mask is None:
        return MaskSpec(MASK_NONE, _placeholder_mask())
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"Unknown mask '{mask}'.")
        return MaskSpec(MASK_CAUSAL, _placeholder_mask())
    if mask.ndim != 4:
        raise ValueError(f"Expected a rank-4 mask, got shape {tuple(mask.shape)}.")
    kind = MASK_BOOL if mask.dtype == mx.bool_ else MASK_ADD
    return MaskSpec(kind, mask)


@functools.lru_cache(maxsize=None)
def _custom_op(launchers: Launchers, scale: float, kind: int):
    """The differentiable op for one kernel family, scale and mask kind.

    Its primals are ``(q, k, v, mask_array)``; it returns ``(o, lse)``.
    Built once per key, so repeated calls (every layer, every step) reuse it.
    """

    @mx.custom_function
    def op(q, k, v, mask_array):
        return launchers.forward(q, k, v, scale, MaskSpec(kind, mask_array))

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        q, k, v, mask_array = primals
        dout = cotangents[0]
        o, lse = outputs
        mask = MaskSpec(kind, mask_array)
        # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij: the row term of the
        # softmax gradient, computed once instead of per key tile.
        delta = mx.sum(dout.astype(mx.float32) * o.astype(mx.float32), axis=-1)
        dk, dv = launchers.dkdv(q, k, v, scale, mask, dout, lse, delta)
        dq = launchers.dq(q, k, v, scale, mask, dout, lse, delta)
        # The mask is an input only so that it is traced, not captured; it
        # gets no gradient (MLX's fused attention gives it none either).
        return dq, dk, dv, mx.zeros_like(mask_array)

    return op


def attention(
    launchers: Launchers,
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: Union[None, str, mx.array],
) -> mx.array:
    """``softmax(scale * q @ k^T + mask) @ v`` through ``launchers``.

    Args:
        launchers: the kernel family to run.
        q: ``(B, Hq, Lq, D)``; ``k``: ``(B, Hkv, Lk, D)``; ``v``:
            ``(B, Hkv, Lk, Dv)``, one floating dtype.
        scale: multiplies ``q @ k^T``.
        mask: ``None``, ``"causal"`` (``Lq <= Lk``, bottom-right) or a rank-4
            boolean / additive array broadcastable to ``(B, Hq, Lq, Lk)``.

    Returns:
        ``(B, Hq, Lq, Dv)`` in ``q``'s dtype.
    """
    spec = mask_spec(mask)
    op = _custom_op(launchers, float(scale), spec.kind)
    return op(q, k, v, spec.array)[0]
