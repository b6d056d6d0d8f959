"""Memory-efficient attention, forward and backward, in pure MLX ops.

This is FlashAttention-2 written with ordinary MLX operations instead of a
fused kernel: scores are computed one ``(query block, key block)`` tile at a
time with an online softmax, only the output and the per-row log-sum-exp are
kept for the backward, and the backward recomputes each tile's probabilities
from them. Peak memory is one tile of scores per head plus ``O(L)`` per head,
instead of the ``L x L`` score matrix of the unfused path. Under a causal mask
the tiles entirely above the diagonal are skipped, which halves the work.

It runs wherever MLX runs, so it is what ``practical`` and ``demo`` fall back
to where Metal is absent. There is no ``mx.eval`` inside: the whole thing is
one lazy graph, so it composes with ``mx.compile``, ``mx.grad`` and
``mx.checkpoint``.

Inputs follow ``attention.py``'s normalised form: one floating dtype, mask
``None``, ``"causal"`` (with ``Lq <= Lk``) or a rank-4 boolean/additive view.
All arithmetic is float32; the output is cast back to the input dtype.
"""

import functools
import math
from typing import List, Optional, Tuple

import mlx.core as mx

#: Tile sizes. Square tiles skip the most work under a causal mask, and on
#: the 2-core Linux CPU 128 x 128 was the fastest of 64-512 per side for
#: forward+backward at L=1024 and 2048 (B=1, H=8, D=64): big enough that
#: matmuls dominate per-op overhead, small enough that a causal row skips
#: most of the tiles above the diagonal. A float32 score tile is then
#: B * H * 64 KiB.
BLOCK_Q = 128
BLOCK_K = 128

#: What a dropped boolean-mask score becomes. MLX fills with the dtype's most
#: negative finite value, so a row that keeps nothing gets uniform weights;
#: any other row gives dropped scores exactly zero weight, as here.
_DROPPED = float(mx.finfo(mx.float32).min)


def _spans(length: int, block: int) -> List[Tuple[int, int]]:
    return [(start, min(start + block, length)) for start in range(0, length, block)]


class _Tiles:
    """Score tiles of one attention problem, shared by forward and backward.

    Holds ``q`` as ``(B, Hkv, G, Lq, D)`` (the ``G`` query heads of a GQA
    group side by side) and ``k``, ``v`` as ``(B, Hkv, 1, Lk, D)``, all
    float32, so one broadcasting matmul serves every head of a group. ``q``
    is stored already multiplied by ``scale``: that is one pass over
    ``L x D`` values instead of one over every score tile, forward and
    backward.
    """

    def __init__(self, q, k, v, scale: float, mask, causal: bool):
        B, n_q_heads, self.q_len, d = q.shape
        n_kv_heads, self.k_len = k.shape[1], k.shape[2]
        self.groups = n_q_heads // n_kv_heads
        self.shape = (B, n_q_heads, self.q_len)
        q = q.astype(mx.float32) * scale
        self.q = q.reshape(B, n_kv_heads, self.groups, self.q_len, d)
        self.k = mx.expand_dims(k.astype(mx.float32), 2)
        self.v = mx.expand_dims(v.astype(mx.float32), 2)
        self.scale = scale
        self.causal = causal
        # Causal is bottom-right aligned: query i sees keys j <= i + offset.
        self.offset = self.k_len - self.q_len
        self.mask = None
        if mask is not None:
            mb, mh = mask.shape[0], mask.shape[1]
            if mh == 1:
                mask = mx.expand_dims(mask, 2)
            else:
                mask = mask.reshape(mb, n_kv_heads, self.groups, *mask.shape[2:])
            self.mask = mask if mask.dtype == mx.bool_ else mask.astype(mx.float32)

    def key_spans(self, rows: Tuple[int, int]) -> List[Tuple[int, int]]:
        """Key blocks that query rows ``[r0, r1)`` can see (causal skips the rest)."""
        spans = _spans(self.k_len, BLOCK_K)
        if self.causal:
            last_visible = rows[1] - 1 + self.offset
            spans = [span for span in spans if span[0] <= last_visible]
        return spans

    def keep(self, rows, cols) -> Optional[mx.array]:
        """Boolean keep-mask of a tile, or None when the tile keeps everything."""
        keep = None
        if self.causal and cols[1] - 1 > rows[0] + self.offset:
            q_idx = mx.arange(rows[0] + self.offset, rows[1] + self.offset)[:, None]
            keep = q_idx >= mx.arange(cols[0], cols[1])[None]
        if self.mask is not None and self.mask.dtype == mx.bool_:
            tile = self.mask_tile(rows, cols)
            keep = tile if keep is None else keep & tile
        return keep

    def mask_tile(self, rows, cols) -> mx.array:
        """The mask's tile; a broadcast (size-1) query or key axis stays size 1."""
        q_len, k_len = self.mask.shape[-2:]
        r = slice(*rows) if q_len > 1 else slice(None)
        c = slice(*cols) if k_len > 1 else slice(None)
        return self.mask[..., r, c]

    def scores(self, rows, cols, after=None) -> mx.array:
        """``(B, Hkv, G, rows, cols)`` masked scores of a tile.

        ``after``: an array the tile must not be computed before (see
        ``_forward``).
        """
        q = self.q[..., rows[0] : rows[1], :]
        if after is not None:
            q = mx.depends(q, after)
        k = self.k[..., cols[0] : cols[1], :]
        s = q @ mx.swapaxes(k, -1, -2)
        if self.mask is not None and self.mask.dtype != mx.bool_:
            s = s + self.mask_tile(rows, cols)
        keep = self.keep(rows, cols)
        if keep is not None:
            s = mx.where(keep, s, _DROPPED)
        return s


def _forward(tiles: _Tiles) -> Tuple[mx.array, mx.array]:
    """Online softmax over key blocks. Returns float32 ``(B, Hkv, G, Lq, Dv)``
    output and ``(B, Hkv, G, Lq, 1)`` log-sum-exp."""
    # A column of ones after v makes p @ v also return the row sums of p, so
    # each probability tile has a single consumer and is freed as soon as it
    # is used (MLX keeps an array alive while any consumer is pending).
    ones = mx.ones((*tiles.v.shape[:-1], 1), mx.float32)
    v_ext = mx.concatenate([tiles.v, ones], axis=-1)
    outs, lses = [], []
    for rows in _spans(tiles.q_len, BLOCK_Q):
        row_max = acc = None
        for cols in tiles.key_spans(rows):
            # Each tile waits for the accumulator of the one before. Without
            # that, MLX is free to compute every tile of a row block before
            # the accumulation consumes any, and they all stay alive.
            s = tiles.scores(rows, cols, after=acc)
            block_max = mx.max(s, axis=-1, keepdims=True)
            new_max = block_max if row_max is None else mx.maximum(row_max, block_max)
            # A row whose scores so far are all -inf (additive mask) has max
            # -inf; subtracting 0 instead keeps exp() at 0 rather than NaN, so
            # finite scores in a later block still count.
            safe_max = mx.where(new_max == -math.inf, 0.0, new_max)
            pv = mx.exp(s - safe_max) @ v_ext[..., cols[0] : cols[1], :]
            acc = pv if row_max is None else mx.exp(row_max - safe_max) * acc + pv
            row_max = new_max
        running_sum = acc[..., -1:]
        # A row of nothing but -inf ends with sum 0: 0 / 0 is NaN, as in MLX.
        outs.append(acc[..., :-1] / running_sum)
        safe_max = mx.where(row_max == -math.inf, 0.0, row_max)
        lses.append(safe_max + mx.log(running_sum))
    return mx.concatenate(outs, axis=-2), mx.concatenate(lses, axis=-2)


def _score_grads(tiles: _Tiles, rows, cols, lse, d_out, delta, after=None):
    """Recompute one tile: ``P = exp(S - lse)`` and ``dS = P * (dO V^T - delta)``."""
    # Dropped scores get p = 0 and so no gradient: every row here keeps at
    # least one key (attention.py answers the rows that keep none).
    s = tiles.scores(rows, cols, after)
    p = mx.exp(s - lse[..., rows[0] : rows[1], :])
    dp = d_out[..., rows[0] : rows[1], :] @ mx.swapaxes(tiles.v[..., cols[0] : cols[1], :], -1, -2)
    ds = p * (dp - delta[..., rows[0] : rows[1], :])
    return p, ds


def _backward(tiles: _Tiles, out, lse, d_out):
    """FlashAttention-2 backward from the saved output and log-sum-exp.

    ``delta = rowsum(dO * O)``; per tile ``P = exp(S - lse)`` and
    ``dS = P * (dO V^T - delta)``, then ``dV += P^T dO``, ``dK += dS^T Q``
    and ``dQ += dS K``. The kernels split this into a dK/dV pass and a dQ pass
    to avoid atomics; plain MLX ops have no such race, so one pass recomputes
    each tile once. Each tile is ordered after the previous tile's
    accumulators, so MLX frees it as soon as it is used and memory stays O(L).

    With ``S = (scale Q) K^T``: ``dK = dS^T (scale Q)`` uses the stored
    scaled ``q`` as it is, and ``dQ = scale dS K`` is scaled once at the end.

    Returns float32 ``dq (B, Hkv, G, Lq, D)`` and ``dk (B, Hkv, Lk, D)``,
    ``dv (B, Hkv, Lk, Dv)``, summed over each GQA group.
    """
    delta = mx.sum(d_out * out, axis=-1, keepdims=True)
    row_spans = _spans(tiles.q_len, BLOCK_Q)
    dq = [None] * len(row_spans)
    dk, dv = [], []
    previous = None
    for cols in _spans(tiles.k_len, BLOCK_K):
        k = tiles.k[..., cols[0] : cols[1], :]
        dk_acc = dv_acc = None
        for i, rows in enumerate(row_spans):
            if cols not in tiles.key_spans(rows):
                continue
            p, ds = _score_grads(tiles, rows, cols, lse, d_out, delta, previous)
            dk_tile = mx.sum(mx.swapaxes(ds, -1, -2) @ tiles.q[..., rows[0] : rows[1], :], axis=2)
            dv_tile = mx.sum(mx.swapaxes(p, -1, -2) @ d_out[..., rows[0] : rows[1], :], axis=2)
            dq_tile = ds @ k
            dk_acc = dk_tile if dk_acc is None else dk_acc + dk_tile
            dv_acc = dv_tile if dv_acc is None else dv_acc + dv_tile
            dq[i] = dq_tile if dq[i] is None else dq[i] + dq_tile
            previous = [dk_acc, dv_acc, dq[i]]
        if dk_acc is None:
            # Causal with Lq < Lk: no query sees these keys.
            B, n_kv_heads, width = tiles.k.shape[0], tiles.k.shape[1], cols[1] - cols[0]
            dk_acc = mx.zeros((B, n_kv_heads, width, tiles.k.shape[-1]))
            dv_acc = mx.zeros((B, n_kv_heads, width, tiles.v.shape[-1]))
        dk.append(dk_acc)
        dv.append(dv_acc)
    dq = mx.concatenate(dq, axis=-2) * tiles.scale
    return dq, mx.concatenate(dk, axis=-2), mx.concatenate(dv, axis=-2)


@functools.lru_cache(maxsize=None)
def _op(scale: float, causal: bool, has_mask: bool):
    """The custom function for one (scale, mask kind).

    ``op(q, k, v[, mask])`` returns the output in ``q``'s dtype and the
    float32 log-sum-exp, which the vjp receives back instead of recomputing.
    """

    @mx.custom_function
    def op(q, k, v, *mask):
        tiles = _Tiles(q, k, v, scale, mask[0] if has_mask else None, causal)
        out, lse = _forward(tiles)
        return out.reshape(*tiles.shape, -1).astype(q.dtype), lse

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        q, k, v, *mask = primals
        tiles = _Tiles(q, k, v, scale, mask[0] if has_mask else None, causal)
        out, lse = outputs
        grouped = tiles.q.shape[:-1] + (out.shape[-1],)
        out = out.astype(mx.float32).reshape(grouped)
        d_out = cotangents[0].astype(mx.float32).reshape(grouped)
        dq, dk, dv = _backward(tiles, out, lse, d_out)
        grads = [
            dq.reshape(q.shape).astype(q.dtype),
            dk.astype(k.dtype),
            dv.astype(v.dtype),
        ]
        return tuple(grads + [mx.zeros_like(m) for m in mask])

    return op


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
    """Blockwise attention with a memory-efficient backward.

    Args:
        q: ``(B, Hq, Lq, D)``; ``k``: ``(B, Hkv, Lk, D)``; ``v``: ``(B, Hkv, Lk, Dv)``.
        scale: score scale.
        mask: ``None``, ``"causal"`` (``Lq <= Lk``) or a rank-4 boolean or
            additive array broadcastable to ``(B, Hq, Lq, Lk)``.

    Returns:
        ``(B, Hq, Lq, Dv)`` in ``q``'s dtype.
    """
    if isinstance(mask, mx.array):
        out, _ = _op(float(scale), False, True)(q, k, v, mask)
    else:
        out, _ = _op(float(scale), isinstance(mask, str), False)(q, k, v)
    return out
