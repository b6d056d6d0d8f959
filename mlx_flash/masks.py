"""The structured attention mask: which keys each query may attend, by structure.

Every implementation sees the mask as a ``StructuredMask``, never as an
``L x L`` array unless the user passed one:

* ``causal``: bottom-right aligned, query ``i`` sees key ``j`` iff
  ``j <= i + offset`` with ``offset = Lk - Lq`` (as MLX does for a KV cache);
* ``window``: with ``causal``, also ``j > i + offset - window``: the last
  ``window`` keys up to the diagonal, exactly mlx-lm's
  ``create_causal_mask(N, window_size=window)``;
* segments: per-position integer ids, ``(B, Lq)`` for queries and ``(B, Lk)``
  for keys; a query sees a key only if their ids are equal, and a negative id
  is padding (such keys are never seen, such queries see nothing);
* ``array``: an optional rank-4 boolean (True keeps) or additive mask,
  broadcastable to ``(B, Hq, Lq, Lk)``, read through its strides.

All of them compose: a score is kept where every boolean part keeps it
(causal AND window AND segments AND a boolean array), then an additive array
is added. Rows that keep no key at all are "empty"; what they return is the
dispatcher's business (``mlx_flash.attention``): MLX's uniform weights
without segments, zeros with segments or sinks.

This module owns the rules shared by every implementation: the element
predicate (``keep``), the dense form (for ``manual`` and the tests), and the
tile-skip predicate. A (query tile, key tile) pair is skipped when no pair
inside can attend: above the causal diagonal, outside the window (both
static, from Python ints), or when the tiles' segment-id ranges cannot meet
(``segment_ranges``: per-tile minimum and maximum of the non-negative ids,
and ``segment_bounds`` for the kernels, with running bounds that end a
tile loop at the last tile that can meet;
for packed rows, whose ids are non-decreasing, the ranges of two different
documents never meet).
"""

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

#: ``segment_ranges`` of a tile with no non-negative id: a range that meets
#: no other, so the tile is always skipped.
EMPTY_RANGE = (np.iinfo(np.int32).max, -1)

Span = Tuple[int, int]


@dataclass(frozen=True, eq=False)
class StructuredMask:
    """The mask of one attention call (see the module docstring).

    ``q_segments`` / ``k_segments`` are int32 ``(B, Lq)`` / ``(B, Lk)`` or
    both None; ``array`` is None or a rank-4 boolean or additive array with
    its size-1 (broadcast) axes kept.
    """

    q_len: int
    k_len: int
    causal: bool = False
    window: Optional[int] = None
    q_segments: Optional[mx.array] = None
    k_segments: Optional[mx.array] = None
    array: Optional[mx.array] = None

    @property
    def offset(self) -> int:
        """``Lk - Lq``: the causal diagonal of query ``i`` is key ``i + offset``."""
        return self.k_len - self.q_len

    @property
    def has_segments(self) -> bool:
        return self.q_segments is not None

    @property
    def array_kind(self) -> str:
        """``"none"``, ``"bool"`` or ``"additive"``."""
        if self.array is None:
            return "none"
        return "bool" if self.array.dtype == mx.bool_ else "additive"

    @property
    def drops(self) -> bool:
        """Whether any boolean part can drop a score (so rows can be empty)."""
        return self.causal or self.has_segments or self.array_kind == "bool"

    def with_array(self, array: Optional[mx.array]) -> "StructuredMask":
        return replace(self, array=array)

    # -- static (causal and window) bounds ---------------------------------

    def key_bounds(self, rows: Span) -> Span:
        """Keys ``[begin, end)`` that query rows ``[r0, r1)`` can see by the
        causal and window rules; every other key of those rows is dropped."""
        begin, end = 0, self.k_len
        if self.causal:
            end = max(0, min(self.k_len, rows[1] + self.offset))
            if self.window is not None:
                begin = max(0, rows[0] + self.offset - self.window + 1)
        return begin, max(begin, end)

    def row_bounds(self, cols: Span) -> Span:
        """Query rows ``[begin, end)`` that can see some key of ``[c0, c1)``
        by the causal and window rules."""
        begin, end = 0, self.q_len
        if self.causal:
            begin = max(0, min(self.q_len, cols[0] - self.offset))
            if self.window is not None:
                end = max(0, min(self.q_len, cols[1] - 1 - self.offset + self.window))
        return begin, max(begin, end)

    def tile_is_live(self, rows: Span, cols: Span) -> bool:
        """Whether the causal and window rules keep some pair of the tile."""
        begin, end = self.key_bounds(rows)
        return cols[0] < end and cols[1] > begin

    def tile_is_full(self, rows: Span, cols: Span) -> bool:
        """Whether the causal and window rules keep every pair of the tile."""
        if not self.causal:
            return True
        last_needs = cols[1] - 1 <= rows[0] + self.offset
        first_needs = self.window is None or cols[0] > rows[1] - 1 + self.offset - self.window
        return last_needs and first_needs

    # -- element predicate --------------------------------------------------

    def keep(self, rows: Span, cols: Span) -> Optional[mx.array]:
        """Boolean keep-mask of causal, window and segments on a tile.

        Returns None when they keep every pair of the tile (the array mask is
        not included), else an array broadcastable to ``(B, 1, r, c)``:
        ``(r, c)`` for causal/window alone, ``(B, 1, r, c)`` with segments.
        """
        keep = None
        if self.causal and not self.tile_is_full(rows, cols):
            q_pos = mx.arange(rows[0] + self.offset, rows[1] + self.offset)[:, None]
            k_pos = mx.arange(cols[0], cols[1])[None]
            keep = k_pos <= q_pos
            if self.window is not None:
                keep = keep & (k_pos > q_pos - self.window)
        if self.has_segments:
            q_ids = self.q_segments[:, rows[0] : rows[1], None]
            k_ids = self.k_segments[:, None, cols[0] : cols[1]]
            same = ((q_ids == k_ids) & (q_ids >= 0))[:, None]
            keep = same if keep is None else keep & same
        return keep

    def dense_keep(self) -> Optional[mx.array]:
        """``keep`` of the whole ``(Lq, Lk)`` problem, array mask excluded."""
        return self.keep((0, self.q_len), (0, self.k_len))

    def dense(self) -> Optional[mx.array]:
        """The whole mask as one array for unfused attention: boolean where
        only boolean parts exist, else additive (dropped scores ``-inf``)
        in the array's dtype. None when nothing masks."""
        keep = self.dense_keep()
        array = self.array
        if array is None:
            return keep
        if keep is None:
            return array
        if array.dtype == mx.bool_:
            return keep & array
        return mx.where(keep, array, mx.array(-mx.inf, array.dtype))

    def describe(self) -> str:
        """Short text of the structure, for ``explain``."""
        parts = []
        if self.causal:
            parts.append("causal" if self.window is None else f"causal window {self.window}")
        if self.has_segments:
            parts.append("segments")
        if self.array is not None:
            parts.append(f"{self.array_kind} array {tuple(self.array.shape)}")
        return " + ".join(parts) or "no mask"


def segment_ranges(ids: mx.array, tile: int) -> mx.array:
    """Per-tile ``(min, max)`` of the non-negative ids, int32 ``(B, T, 2)``
    with ``T = ceil(L / tile)``; a tile with none gets ``EMPTY_RANGE``.

    Two tiles can hold an attending pair only if their ranges meet
    (``ranges_meet``). Lazy MLX ops, ``O(L)``: usable under ``mx.compile``.
    """
    B, length = ids.shape
    n_tiles = -(-length // tile)
    pad = n_tiles * tile - length
    ids = ids.astype(mx.int32)
    if pad:
        ids = mx.concatenate([ids, mx.full((B, pad), -1, mx.int32)], axis=1)
    ids = ids.reshape(B, n_tiles, tile)
    valid = ids >= 0
    low = mx.min(mx.where(valid, ids, EMPTY_RANGE[0]), axis=-1)
    high = mx.max(mx.where(valid, ids, EMPTY_RANGE[1]), axis=-1)
    return mx.stack([low, high], axis=-1)


def segment_bounds(ids: mx.array, tile: int) -> mx.array:
    """``segment_ranges`` with two running bounds per tile, int32
    ``(B, T, 4)``: ``(min, max, max_through, min_from)``, where
    ``max_through[t]`` is the largest id of tiles ``0..t`` (-1 for none)
    and ``min_from[t]`` the smallest id of tiles ``t..T-1``. A loop over
    tiles can stop early with them whatever the layout: walking down, no
    tile at or before ``t`` meets a range whose minimum exceeds
    ``max_through[t]``; walking up, none from ``t`` on meets one whose
    maximum is below ``min_from[t]``. Lazy MLX ops, ``O(L)``.
    """
    ranges = segment_ranges(ids, tile)
    through = mx.cummax(ranges[..., 1], axis=1)
    since = mx.cummin(ranges[..., 0], axis=1, reverse=True)
    return mx.concatenate([ranges, through[..., None], since[..., None]], axis=-1)


def ranges_meet(q_range, k_range) -> bool:
    """Whether two ``segment_ranges`` entries can hold an equal id."""
    return q_range[0] <= k_range[1] and k_range[0] <= q_range[1]


def concrete(x: Optional[mx.array]) -> Optional[np.ndarray]:
    """``x`` as a NumPy array, or None when it cannot be read on the host
    (inside ``mx.compile`` or ``mx.vmap``, where evaluating is refused)."""
    if x is None:
        return None
    try:
        return np.array(x)
    except ValueError:
        return None


def build(
    q_len: int,
    k_len: int,
    mask=None,
    segment_ids=None,
    window: Optional[int] = None,
) -> StructuredMask:
    """The ``StructuredMask`` of already-checked public arguments.

    ``mask`` is None, ``"causal"`` or an array of rank at most 4 (made rank
    4, size-1 axes kept); ``segment_ids`` is None, a ``(B, Lk)`` array (the
    queries take its last ``Lq`` columns) or a ``(q_ids, k_ids)`` pair;
    ``window`` is None or a positive int (it implies the causal band). A
    window that reaches every key is no window.
    """
    array = None
    if isinstance(mask, mx.array):
        array = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    causal = isinstance(mask, str) or window is not None
    if window is not None and window >= k_len:
        window = None
    q_segments = k_segments = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            q_segments, k_segments = segment_ids
        else:
            k_segments = segment_ids
            q_segments = segment_ids[:, segment_ids.shape[1] - q_len :]
        q_segments = q_segments.astype(mx.int32)
        k_segments = k_segments.astype(mx.int32)
    return StructuredMask(q_len, k_len, causal, window, q_segments, k_segments, array)


@dataclass(frozen=True)
class Layout:
    """The static part of a mask and sinks: what a custom op is built for.

    A custom function takes its arrays as primals (so that they are traced
    inputs, never constants captured from the first call) and the rest as
    this hashable key; ``arrays`` and ``unpack`` go between the two.
    """

    q_len: int
    k_len: int
    causal: bool
    window: Optional[int]
    has_array: bool
    has_segments: bool
    has_sinks: bool

    @staticmethod
    def of(mask: StructuredMask, sinks) -> "Layout":
        return Layout(
            mask.q_len,
            mask.k_len,
            mask.causal,
            mask.window,
            mask.array is not None,
            mask.has_segments,
            sinks is not None,
        )

    @staticmethod
    def arrays(mask: StructuredMask, sinks) -> list:
        """The array mask, query ids, key ids and sinks, those present."""
        return [x for x in (mask.array, mask.q_segments, mask.k_segments, sinks) if x is not None]

    def unpack(self, arrays) -> Tuple[StructuredMask, Optional[mx.array]]:
        """``(mask, sinks)`` from the arrays ``arrays()`` gave."""
        arrays = list(arrays)
        array = arrays.pop(0) if self.has_array else None
        q_ids = arrays.pop(0) if self.has_segments else None
        k_ids = arrays.pop(0) if self.has_segments else None
        sinks = arrays.pop(0) if self.has_sinks else None
        mask = StructuredMask(self.q_len, self.k_len, self.causal, self.window, q_ids, k_ids, array)
        return mask, sinks
