"""The ``manual`` variant: attention written with plain, unfused MLX ops.

This is the baseline every fused path is measured against and the oracle the
tests compare with. It materialises the full ``(B, Hq, Lq, Lk)`` score matrix
(and, for a structured mask, its dense form), so its memory grows as
``L^2``; that is the cost the other variants remove.

Its semantics are MLX's own (``mx.fast.scaled_dot_product_attention`` in MLX
0.32 when it does not fuse), extended to the structured masks of
``mlx_flash.masks``:

* boolean parts of the mask (causal, window, segments, a boolean array) fill
  dropped scores with the most negative finite value of the score dtype, so
  a row that keeps nothing gets uniform weights, the mean of ``v``, as in
  MLX; with segment ids such a row returns zeros instead and passes no
  gradient (and with sinks the sink takes all the weight, so it is zero too);
* additive masks are added as they are, so a row of ``-inf`` gives NaN;
* sinks are one extra logit per query head in the softmax denominator;
* softmax runs in float32 whatever the input dtype.
"""

from typing import Optional, Union

import mlx.core as mx

from . import masks
from .masks import StructuredMask


def causal_mask(q_len: int, k_len: int) -> mx.array:
    """Boolean ``(q_len, k_len)`` mask, True where query ``i`` may see key ``j``.

    Aligned bottom-right: the last query sees every key, as with a KV cache.
    """
    return masks.build(q_len, k_len, "causal").dense_keep()


def _grouped(mask: mx.array, n_kv_heads: int, n_repeats: int) -> mx.array:
    """A rank-4 mask laid out like the grouped scores ``(B, Hkv, G, Lq, Lk)``."""
    if mask.shape[1] == 1:
        return mx.expand_dims(mask, 2)
    return mask.reshape(mask.shape[0], n_kv_heads, n_repeats, *mask.shape[2:])


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: Union[None, str, mx.array, StructuredMask] = None,
    sinks: Optional[mx.array] = None,
) -> mx.array:
    """Unfused attention.

    Args:
        q: ``(B, Hq, Lq, D)``.
        k: ``(B, Hkv, Lk, D)`` with ``Hq % Hkv == 0``.
        v: ``(B, Hkv, Lk, Dv)``, same dtype as ``q`` and ``k``.
        scale: multiplies ``q @ k^T``.
        mask: ``None``, ``"causal"``, an array broadcastable to
            ``(B, Hq, Lq, Lk)`` (boolean, True keeps, or additive), or a
            ``StructuredMask``.
        sinks: optional ``(Hq,)`` logits of a virtual key that takes weight in
            the softmax but adds nothing to the output.

    Returns:
        ``(B, Hq, Lq, Dv)`` in ``q``'s dtype.
    """
    B, n_q_heads, q_len, _ = q.shape
    n_kv_heads, k_len = k.shape[1], k.shape[2]
    n_repeats = n_q_heads // n_kv_heads
    if not isinstance(mask, StructuredMask):
        mask = masks.build(q_len, k_len, mask)

    # Scores grouped as (B, Hkv, G, Lq, Lk): the query heads that share a KV
    # head side by side, instead of repeating K and V.
    q = q * mx.array(scale, q.dtype)
    q = q.reshape(B, n_kv_heads, n_repeats, q_len, q.shape[-1])
    k = mx.expand_dims(k, 2)
    v = mx.expand_dims(v, 2)
    scores = q @ mx.swapaxes(k, -1, -2)

    if mask.array_kind == "additive":
        scores = scores + _grouped(mask.array, n_kv_heads, n_repeats)
    keep = mask.dense_keep()
    if keep is not None:
        keep = _grouped(keep.reshape((1,) * (4 - keep.ndim) + tuple(keep.shape)), n_kv_heads, n_repeats)
    if mask.array_kind == "bool":
        array = _grouped(mask.array, n_kv_heads, n_repeats)
        keep = array if keep is None else keep & array
    if keep is not None:
        lowest = mx.array(mx.finfo(scores.dtype).min, scores.dtype)
        scores = mx.where(keep, scores, lowest)

    if sinks is not None:
        # One extra logit per query head, prepended and sliced off after softmax.
        sink_logits = sinks.astype(scores.dtype).reshape(1, n_kv_heads, n_repeats, 1, 1)
        sink_logits = mx.broadcast_to(sink_logits, (*scores.shape[:-1], 1))
        scores = mx.concatenate([sink_logits, scores], axis=-1)
    weights = mx.softmax(scores, axis=-1, precise=True)
    if sinks is not None:
        weights = weights[..., 1:]

    out = weights @ v
    if mask.has_segments:
        # A row that segments leave with no key returns zeros (no gradient).
        out = mx.where(mx.any(keep, axis=-1, keepdims=True), out, mx.zeros_like(out))
    return out.reshape(B, n_q_heads, q_len, out.shape[-1])
