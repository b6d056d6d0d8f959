"""The ``manual`` variant: attention written with plain, unfused MLX ops.

This is the baseline every fused path is measured against and the oracle the
tests compare with. It materialises the full ``(B, Hq, Lq, Lk)`` score matrix,
so its memory grows as ``L^2``; that is the cost the other variants remove.

Its semantics are MLX's own (``mx.fast.scaled_dot_product_attention`` in MLX
0.32 when it does not fuse):

* boolean masks (and ``"causal"``) fill dropped scores with the most negative
  finite value of the score dtype, so a row that keeps nothing gets uniform
  weights, the mean of ``v``;
* additive masks are added as they are, so a row of ``-inf`` gives NaN;
* softmax runs in float32 whatever the input dtype.
"""

from typing import Optional, Union

import mlx.core as mx


def causal_mask(q_len: int, k_len: int) -> mx.array:
    """Boolean ``(q_len, k_len)`` mask, True where query ``i`` may see key ``j``.

    Aligned bottom-right: the last query sees every key, as with a KV cache.
    """
    offset = k_len - q_len
    q_idx = mx.arange(offset, offset + q_len)[:, None]
    k_idx = mx.arange(k_len)[None]
    return q_idx >= k_idx


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: Union[None, str, mx.array] = None,
    sinks: Optional[mx.array] = None,
) -> mx.array:
    """Unfused attention.

    Args:
        q: ``(B, Hq, Lq, D)``.
        k: ``(B, Hkv, Lk, D)`` with ``Hq % Hkv == 0``.
        v: ``(B, Hkv, Lk, Dv)``, same dtype as ``q`` and ``k``.
        scale: multiplies ``q @ k^T``.
        mask: ``None``, ``"causal"``, or an array broadcastable to
            ``(B, Hq, Lq, Lk)``: boolean (True keeps) or additive.
        sinks: optional ``(Hq,)`` logits of a virtual key that takes weight in
            the softmax but adds nothing to the output.

    Returns:
        ``(B, Hq, Lq, Dv)`` in ``q``'s dtype.
    """
    B, n_q_heads, q_len, _ = q.shape
    n_kv_heads, k_len = k.shape[1], k.shape[2]
    n_repeats = n_q_heads // n_kv_heads

    q = q * mx.array(scale, q.dtype)
    if n_repeats > 1:
        # Group the query heads that share a KV head instead of repeating K/V.
        q = q.reshape(B, n_kv_heads, n_repeats, q_len, q.shape[-1])
        k = mx.expand_dims(k, 2)
        v = mx.expand_dims(v, 2)
    scores = q @ mx.swapaxes(k, -1, -2)

    if isinstance(mask, str):
        mask = causal_mask(q_len, k_len)
    if mask is not None:
        if n_repeats > 1 and mask.ndim >= 3:
            if mask.shape[-3] == 1:
                mask = mx.expand_dims(mask, -3)
            else:
                mask = mask.reshape(*mask.shape[:-3], n_kv_heads, n_repeats, *mask.shape[-2:])
        if mask.dtype == mx.bool_:
            lowest = mx.array(mx.finfo(scores.dtype).min, scores.dtype)
            scores = mx.where(mask, scores, lowest)
        else:
            scores = scores + mask

    if sinks is not None:
        # One extra logit per query head, prepended and sliced off after softmax.
        sink_logits = sinks.astype(scores.dtype).reshape(n_q_heads, 1, 1)
        if n_repeats > 1:
            sink_logits = sink_logits.reshape(n_kv_heads, n_repeats, 1, 1)
        sink_logits = mx.broadcast_to(sink_logits, (*scores.shape[:-1], 1))
        scores = mx.concatenate([sink_logits, scores], axis=-1)
    weights = mx.softmax(scores, axis=-1, precise=True)
    if sinks is not None:
        weights = weights[..., 1:]

    out = weights @ v
    if n_repeats > 1:
        out = out.reshape(B, n_q_heads, q_len, out.shape[-1])
    return out
