"""Memory-efficient attention, forward and backward, in pure MLX ops.

This is FlashAttention-2 written with ordinary MLX operations instead of a
fused kernel: scores are computed one ``(query block, key block)`` tile at a
time with an online softmax, only the output and the per-row log-sum-exp are
kept for the backward, and the backward recomputes each tile's probabilities
from them. Peak memory is one tile of scores per head plus ``O(L)`` per head,
instead of the ``L x L`` score matrix of the unfused path.

The mask is a ``mlx_flash.masks.StructuredMask``, never an ``L x L`` array
(unless the user passed one): tiles entirely above the causal diagonal or
outside the window are skipped, so a causal row does half the work and a
windowed one ``O(L * window)``. Segment ids are masked inside each tile
from the ``O(L)`` ids. Where the ids can be read on the host (eagerly, and
under ``mx.grad`` / ``nn.value_and_grad`` / ``mx.checkpoint``), tiles whose
id ranges cannot meet are skipped too, so a packed row costs the sum of its
documents' squared lengths; inside ``mx.compile`` the ids are not readable,
and every tile is computed and masked (exact, ``O(L)``, not faster).

Sinks (one logit per query head in the softmax denominator) start each
row's online softmax, so the log-sum-exp includes them; their gradient is
the kernels' (``mlx_flash.fused.sink_grad``), a deterministic ``O(L)``
reduction over the log-sum-exp and ``delta = rowsum(dO * O)``.

It runs wherever MLX runs, so it is what ``practical`` and ``demo`` fall back
to where Metal is absent. There is no ``mx.eval`` inside: the whole thing is
one lazy graph, so it composes with ``mx.compile``, ``mx.grad`` and
``mx.checkpoint``.

Inputs follow ``attention.py``'s normalised form: one floating dtype and a
``StructuredMask`` whose causal rule has ``Lq <= Lk``. All arithmetic is
float32; the output is cast back to the input dtype. A row that keeps no key
returns zeros with log-sum-exp ``+inf`` (``attention.py`` decides what such
rows mean).
"""

import functools
import math
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from . import fused, masks
from .call import AttentionCall

#: Tile sizes. Square tiles skip the most work under a causal mask, and on
#: the 2-core Linux CPU 128 x 128 was the fastest of 64-512 per side for
#: forward+backward at L=1024 and 2048 (B=1, H=8, D=64): big enough that
#: matmuls dominate per-op overhead, small enough that a causal row skips
#: most of the tiles above the diagonal. A float32 score tile is then
#: B * H * 64 KiB.
BLOCK_Q = 128
BLOCK_K = 128

#: Packed rows of short documents take smaller tiles: a tile is at most the
#: largest power of two within the mean document length, and at least this.
#: Tiles much wider than a document compute mostly dropped scores (with
#: documents of 30-60 tokens at L = 1024, 32 x 32 tiles ran forward+backward
#: 2.1x faster than 128 x 128 on the 2-core Linux CPU); tiles narrower than
#: this cost more in per-op overhead than they save.
MIN_PACKED_BLOCK = 32

#: What a dropped score becomes: weight exactly zero, even in a row whose
#: other scores are all dropped (that row is told apart by ``kept``).
_DROPPED = -math.inf

Span = Tuple[int, int]


def _spans(length: int, block: int) -> List[Span]:
    return [(start, min(start + block, length)) for start in range(0, length, block)]


def _packed_block(ids: np.ndarray) -> int:
    """Tile size for rows of documents ``ids`` (see ``MIN_PACKED_BLOCK``)."""
    runs = np.count_nonzero(np.diff(ids, axis=1) != 0) + ids.shape[0]
    mean_length = ids.size / max(runs, 1)
    block = MIN_PACKED_BLOCK
    while block * 2 <= mean_length:
        block *= 2
    return block


def _host_ranges(ids: np.ndarray, block: int):
    """Per-tile ``(low, high, uniform)`` of ``(B, L)`` ids on the host: the
    range of the non-negative ids (``masks.EMPTY_RANGE`` if none), and
    whether every id of the tile is one non-negative value."""
    ranges = []
    for start, stop in _spans(ids.shape[1], block):
        tile = ids[:, start:stop]
        valid = tile >= 0
        low = np.where(valid, tile, masks.EMPTY_RANGE[0]).min(axis=1)
        high = np.where(valid, tile, masks.EMPTY_RANGE[1]).max(axis=1)
        uniform = (tile.min(axis=1) == tile.max(axis=1)) & valid[:, 0]
        ranges.append((low, high, uniform))
    return ranges


class _Tiles:
    """Score tiles of one attention problem, shared by forward and backward.

    Holds ``q`` as ``(B, Hkv, G, Lq, D)`` (the ``G`` query heads of a GQA
    group side by side) and ``k``, ``v`` as ``(B, Hkv, 1, Lk, D)``, all
    float32, so one broadcasting matmul serves every head of a group. ``q``
    is stored already multiplied by ``scale``: that is one pass over
    ``L x D`` values instead of one over every score tile, forward and
    backward.
    """

    def __init__(self, call: AttentionCall):
        q, k, v, scale, mask, sinks = call.q, call.k, call.v, call.scale, call.mask, call.sinks
        B, n_q_heads, self.q_len, d = q.shape
        n_kv_heads, self.k_len = k.shape[1], k.shape[2]
        self.groups = n_q_heads // n_kv_heads
        self.shape = (B, n_q_heads, self.q_len)
        q = q.astype(mx.float32) * scale
        self.q = q.reshape(B, n_kv_heads, self.groups, self.q_len, d)
        self.k = mx.expand_dims(k.astype(mx.float32), 2)
        self.v = mx.expand_dims(v.astype(mx.float32), 2)
        self.scale = scale
        self.mask = mask
        self.sinks = None
        if sinks is not None:
            self.sinks = sinks.astype(mx.float32).reshape(1, n_kv_heads, self.groups, 1, 1)
        self.array = None
        if mask.array is not None:
            array = mask.array
            if array.shape[1] == 1:
                array = mx.expand_dims(array, 2)
            else:
                array = array.reshape(array.shape[0], n_kv_heads, self.groups, *array.shape[2:])
            self.array = array if array.dtype == mx.bool_ else array.astype(mx.float32)
        self._plan_segments()

    def _plan_segments(self):
        """Tile sizes, and the segment ids read on the host when allowed, to
        skip tiles."""
        self.q_ranges = self.k_ranges = None
        block_q, block_k = BLOCK_Q, BLOCK_K
        q_ids = k_ids = None
        if self.mask.has_segments:
            q_ids = masks.concrete(self.mask.q_segments)
            k_ids = masks.concrete(self.mask.k_segments)
        if q_ids is not None and k_ids is not None:
            block = _packed_block(k_ids)
            block_q, block_k = min(block_q, block), min(block_k, block)
            self.q_ranges = _host_ranges(q_ids, block_q)
            self.k_ranges = _host_ranges(k_ids, block_k)
        # (Inside mx.compile the ids cannot be read: every tile is masked.)
        self.row_spans = _spans(self.q_len, block_q)
        self.col_spans = _spans(self.k_len, block_k)

    def _segments_meet(self, i: int, j: int) -> Tuple[bool, bool]:
        """(some pair of tile (i, j) can share a segment, every pair does)."""
        if not self.mask.has_segments:
            return True, True
        if self.q_ranges is None:
            return True, False
        q_low, q_high, q_uniform = self.q_ranges[i]
        k_low, k_high, k_uniform = self.k_ranges[j]
        meet = (q_low <= k_high) & (k_low <= q_high)
        same = q_uniform & k_uniform & (q_low == k_low)
        return bool(meet.any()), bool(same.all())

    @functools.cached_property
    def live(self) -> Dict[int, List[Tuple[int, bool]]]:
        """Row block -> its live key blocks, each with whether the segments
        keep the whole tile (so their mask can be left out)."""
        live = {}
        for i, rows in enumerate(self.row_spans):
            live[i] = []
            for j, cols in enumerate(self.col_spans):
                if not self.mask.tile_is_live(rows, cols):
                    continue
                meet, same = self._segments_meet(i, j)
                if meet:
                    live[i].append((j, same))
        return live

    def keep(self, rows: Span, cols: Span, segments_full: bool) -> Optional[mx.array]:
        """Boolean keep-mask of a tile, or None when the tile keeps everything."""
        mask = self.mask
        if segments_full and mask.has_segments:
            mask = masks.StructuredMask(mask.q_len, mask.k_len, mask.causal, mask.window)
        keep = mask.keep(rows, cols)
        if keep is not None:
            keep = mx.expand_dims(keep, -3) if keep.ndim == 4 else keep
        if self.array is not None and self.array.dtype == mx.bool_:
            tile = self.array_tile(rows, cols)
            keep = tile if keep is None else keep & tile
        return keep

    def array_tile(self, rows: Span, cols: Span) -> mx.array:
        """The array mask's tile; a broadcast (size-1) axis stays size 1."""
        q_len, k_len = self.array.shape[-2:]
        r = slice(*rows) if q_len > 1 else slice(None)
        c = slice(*cols) if k_len > 1 else slice(None)
        return self.array[..., r, c]

    def scores(self, rows: Span, cols: Span, keep, after=None) -> mx.array:
        """``(B, Hkv, G, rows, cols)`` masked scores of a tile.

        ``after``: an array the tile must not be computed before (see
        ``_forward``).
        """
        q = self.q[..., rows[0] : rows[1], :]
        if after is not None:
            q = mx.depends(q, after)
        k = self.k[..., cols[0] : cols[1], :]
        s = q @ mx.swapaxes(k, -1, -2)
        if self.array is not None and self.array.dtype != mx.bool_:
            s = s + self.array_tile(rows, cols)
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
    B, n_kv_heads, groups = tiles.q.shape[:3]
    value_dim = tiles.v.shape[-1]
    outs, lses = [], []
    for i, rows in enumerate(tiles.row_spans):
        n_rows = rows[1] - rows[0]
        row_max = acc = None
        if tiles.sinks is not None:
            # The sink is a key of weight exp(sink) and value 0: the row's
            # softmax starts from it.
            row_max = mx.broadcast_to(tiles.sinks, (B, n_kv_heads, groups, n_rows, 1))
            acc = mx.concatenate(
                [mx.zeros((B, n_kv_heads, groups, n_rows, value_dim)), mx.ones((B, n_kv_heads, groups, n_rows, 1))],
                axis=-1,
            )
        # Whether each row has kept a key so far; None once a tile kept all.
        kept, all_kept = None, False
        for j, segments_full in tiles.live[i]:
            cols = tiles.col_spans[j]
            keep = tiles.keep(rows, cols, segments_full)
            if keep is None:
                all_kept = True
            elif not all_kept:
                tile_kept = mx.any(keep, axis=-1, keepdims=True)
                kept = tile_kept if kept is None else kept | tile_kept
            # Each tile waits for the accumulator of the one before. Without
            # that, MLX is free to compute every tile of a row block before
            # the accumulation consumes any, and they all stay alive.
            s = tiles.scores(rows, cols, keep, after=acc)
            block_max = mx.max(s, axis=-1, keepdims=True)
            new_max = block_max if row_max is None else mx.maximum(row_max, block_max)
            # A row whose scores so far are all -inf has max -inf; subtracting
            # 0 instead keeps exp() at 0 rather than NaN, so finite scores in
            # a later block still count.
            safe_max = mx.where(new_max == -math.inf, 0.0, new_max)
            pv = mx.exp(s - safe_max) @ v_ext[..., cols[0] : cols[1], :]
            acc = pv if row_max is None else mx.exp(row_max - safe_max) * acc + pv
            row_max = new_max
        if not tiles.live[i]:
            # No key block is visible to these rows.
            outs.append(mx.zeros((B, n_kv_heads, groups, n_rows, value_dim)))
            lses.append(mx.full((B, n_kv_heads, groups, n_rows, 1), math.inf))
            continue
        running_sum = acc[..., -1:]
        # A row of nothing but -inf ends with sum 0: 0 / 0 is NaN, as in MLX.
        out = acc[..., :-1] / running_sum
        safe_max = mx.where(row_max == -math.inf, 0.0, row_max)
        lse = safe_max + mx.log(running_sum)
        if not all_kept:
            out = mx.where(kept, out, 0.0)
            lse = mx.where(kept, lse, math.inf)
        outs.append(out)
        lses.append(lse)
    return mx.concatenate(outs, axis=-2), mx.concatenate(lses, axis=-2)


def _score_grads(tiles: _Tiles, rows, cols, keep, lse, d_out, delta, after=None):
    """Recompute one tile: ``P = exp(S - lse)`` and ``dS = P * (dO V^T - delta)``."""
    # Dropped scores are -inf and rows that keep nothing have lse +inf, so
    # both get p = 0 and no gradient.
    s = tiles.scores(rows, cols, keep, after)
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

    Returns float32 ``dq (B, Hkv, G, Lq, D)``, ``dk (B, Hkv, Lk, D)`` and
    ``dv (B, Hkv, Lk, Dv)`` (summed over each GQA group), and ``delta``.
    """
    delta = mx.sum(d_out * out, axis=-1, keepdims=True)
    # Empty rows output zeros whatever d_out is; NaN rows stay NaN.
    by_key_block = {j: [] for j in range(len(tiles.col_spans))}
    for i in range(len(tiles.row_spans)):
        for j, segments_full in tiles.live[i]:
            by_key_block[j].append((i, segments_full))
    dq = [None] * len(tiles.row_spans)
    dk, dv = [], []
    previous = None
    B, n_kv_heads = tiles.k.shape[:2]
    for j, cols in enumerate(tiles.col_spans):
        k = tiles.k[..., cols[0] : cols[1], :]
        dk_acc = dv_acc = None
        for i, segments_full in by_key_block[j]:
            rows = tiles.row_spans[i]
            keep = tiles.keep(rows, cols, segments_full)
            p, ds = _score_grads(tiles, rows, cols, keep, lse, d_out, delta, previous)
            dk_tile = mx.sum(mx.swapaxes(ds, -1, -2) @ tiles.q[..., rows[0] : rows[1], :], axis=2)
            dv_tile = mx.sum(mx.swapaxes(p, -1, -2) @ d_out[..., rows[0] : rows[1], :], axis=2)
            dq_tile = ds @ k
            dk_acc = dk_tile if dk_acc is None else dk_acc + dk_tile
            dv_acc = dv_tile if dv_acc is None else dv_acc + dv_tile
            dq[i] = dq_tile if dq[i] is None else dq[i] + dq_tile
            previous = [dk_acc, dv_acc, dq[i]]
        if dk_acc is None:
            # No query sees these keys (causal with Lq < Lk, windows, segments).
            width = cols[1] - cols[0]
            dk_acc = mx.zeros((B, n_kv_heads, width, tiles.k.shape[-1]))
            dv_acc = mx.zeros((B, n_kv_heads, width, tiles.v.shape[-1]))
        dk.append(dk_acc)
        dv.append(dv_acc)
    for i, rows in enumerate(tiles.row_spans):
        if dq[i] is None:
            dq[i] = mx.zeros((*tiles.q.shape[:3], rows[1] - rows[0], tiles.q.shape[-1]))
    dq = mx.concatenate(dq, axis=-2) * tiles.scale
    return dq, mx.concatenate(dk, axis=-2), mx.concatenate(dv, axis=-2), delta


def _forward_call(call: AttentionCall):
    """``(out, lse)`` of ``call``: the custom op's forward."""
    tiles = _Tiles(call)
    out, lse = _forward(tiles)
    return out.reshape(*tiles.shape, -1).astype(call.q.dtype), lse.reshape(tiles.shape)


def _gradients(call: AttentionCall, out: mx.array):
    """``(dq, dk, dv, delta)`` of a backward ``call``: the custom op's vjp."""
    q, k, v = call.q, call.k, call.v
    tiles = _Tiles(call)
    grouped = tiles.q.shape[:-1] + (out.shape[-1],)
    d_out = call.dout.astype(mx.float32).reshape(grouped)
    lse = call.lse.reshape(tiles.q.shape[:-1] + (1,))
    dq, dk, dv, delta = _backward(tiles, out.astype(mx.float32).reshape(grouped), lse, d_out)
    return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), delta.reshape(call.lse.shape)


def attention(call: AttentionCall):
    """Blockwise attention with a memory-efficient backward.

    Args:
        call: ``q (B, Hq, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk,
            Dv)``, the scale, the ``StructuredMask`` (causal only with
            ``Lq <= Lk``) and optional ``(Hq,)`` sink logits.

    Returns:
        ``(out, lse)``: ``(B, Hq, Lq, Dv)`` in ``q``'s dtype and the
        ``(B, Hq, Lq)`` float32 log-sum-exp (``+inf`` for a row that keeps
        no key, whose output is zero).
    """
    return fused.run(_forward_call, _gradients, call)
