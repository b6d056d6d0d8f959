"""FlashAttention-2 lower bounds on what an attention kernel must do.

The cost report (``mlx_flash.bench.cost``) sets what the emulator counted
against these, for the same shape and mask. Everything here is exact integer
arithmetic on the mask's structure (causal, window, segment ids of
contiguous documents); nothing is measured.

**Kept pairs.** ``kept_pairs(mask)``: the (query, key) pairs of one head
and batch row that the mask keeps; causal ``L (L + 1) / 2``, packed rows
``sum_d n_d (n_d + 1) / 2`` over documents of ``n_d`` tokens.

**FLOPs.** Each of the products ``S = Q K^T``, ``O = P V`` (forward),
``dP = dO V^T``, ``dV = P^T dO``, ``dQ = dS K``, ``dK = dS^T Q``
(backward) costs ``2 D`` FLOPs per kept pair (``D``: the contracted or
produced head dim). A kernel's bound is the products its outputs need,
``PRODUCTS``: forward S and O; dK/dV S, dP, dV and dK; dQ S, dP and dQ.
S and dP appear in both backward kernels because each recomputes them
(FlashAttention-2's backward in one pass takes S, dP, dV, dQ, dK: five).

**Device bytes.** ``minimum``: every tensor the kernel reads or writes,
once: q, k, v, dO, o, dq, dk, dv at the dtype's size, lse and delta as
float32. ``tiling``: what a kernel that owns tiles must move, once per pass
its tiling requires:

* a kernel owning query tiles (forward, dQ): its own rows once (q, o and
  lse; or q, dO, lse, delta and dq) plus, for every threadgroup (a tile of
  ``positions`` query positions of ``heads`` query heads that share one KV
  head), the K and V rows of every key that some pair of the tile keeps::

      bytes = own rows + sum over query tiles T of keys_seen(T) * (D + Dv) * size

* a kernel owning key tiles (dK/dV): k, v, dk and dv once, plus, for every
  key tile of every KV head and every query head of its GQA group, the q
  and dO rows and lse and delta of every query that keeps some key of it::

      bytes = (k + v + dk + dv) + sum over key tiles T, heads h of rows_seen(T) * ((D + Dv) * size + 8)

A kernel at the tiling bound reads nothing twice within a threadgroup and
skips every key (query) no pair of its tile keeps; the ratio of counted to
tiling bytes is then 1. Rounding to the kernel's inner tile (keys past the
diagonal inside a key tile) and re-reads show as excess. Shapes, strides
and parameters (read by every thread, from the constant address space)
and the segment ids are not tensors and are reported apart.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from ..masks import StructuredMask, concrete

#: Kernels, and the products each one's outputs need.
PRODUCTS = {
    "forward": ("S", "O"),
    "dkdv": ("S", "dP", "dV", "dK"),
    "dq": ("S", "dP", "dQ"),
}

#: Bytes per row of the float32 statistics: lse (forward) and lse + delta (backward).
_STAT_BYTES = 4


@dataclass(frozen=True)
class Tiling:
    """How a kernel divides the work among threadgroups.

    ``owner`` is ``"query"`` (forward, dQ: a threadgroup owns ``own``
    query positions of ``heads`` query heads sharing one KV head, and walks
    key tiles of ``inner`` keys) or ``"key"`` (dK/dV: a threadgroup owns
    ``own`` keys of one KV head and walks query tiles of ``inner``
    positions, for each of the ``heads`` query heads of the GQA group).
    """

    owner: str
    own: int
    inner: int
    heads: int


def document_runs(ids: np.ndarray) -> Dict[int, Tuple[int, int]]:
    """``{id: (start, end)}`` of the non-negative ids of one row, which must
    each form one contiguous run (packed documents)."""
    runs: Dict[int, Tuple[int, int]] = {}
    i = 0
    while i < len(ids):
        j = i
        while j < len(ids) and ids[j] == ids[i]:
            j += 1
        if ids[i] >= 0:
            if int(ids[i]) in runs:
                raise ValueError(f"segment id {int(ids[i])} is not one contiguous run: the bounds need packed documents")
            runs[int(ids[i])] = (i, j)
        i = j
    return runs


def _segments(mask: StructuredMask) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    if not mask.has_segments:
        return None
    return concrete(mask.q_segments), concrete(mask.k_segments)


def key_intervals(mask: StructuredMask, batch: int = 0) -> np.ndarray:
    """``(Lq, 2)``: for each query row, the keys ``[lo, hi)`` it keeps
    (empty, ``lo == hi``, for a row that keeps none). No array mask."""
    if mask.array is not None:
        raise ValueError("the bounds take causal, window and segment masks, not arrays")
    rows = np.arange(mask.q_len)
    lo = np.zeros(mask.q_len, np.int64)
    hi = np.full(mask.q_len, mask.k_len, np.int64)
    if mask.causal:
        hi = np.clip(rows + mask.offset + 1, 0, mask.k_len)
        if mask.window is not None:
            lo = np.clip(rows + mask.offset - mask.window + 1, 0, mask.k_len)
    ids = _segments(mask)
    if ids is not None:
        q_ids, k_ids = ids[0][batch], ids[1][batch]
        runs = document_runs(k_ids)
        for i in rows:
            start, end = runs.get(int(q_ids[i]), (0, 0)) if q_ids[i] >= 0 else (0, 0)
            lo[i], hi[i] = max(lo[i], start), min(hi[i], end)
    hi = np.maximum(hi, lo)
    return np.stack([lo, hi], axis=1)


def _union_length(spans) -> int:
    total, end = 0, -1
    for lo, hi in sorted(s for s in spans if s[1] > s[0]):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


def kept_pairs(mask: StructuredMask, batch: int = 1) -> int:
    """Pairs one head keeps, summed over ``batch`` rows (the segment ids'
    rows where there are ids)."""
    if mask.has_segments:
        rows = concrete(mask.q_segments).shape[0]
        return int(sum(np.diff(key_intervals(mask, b), axis=1).sum() for b in range(rows)))
    return batch * int(np.diff(key_intervals(mask), axis=1).sum())


def seen_per_tile(mask: StructuredMask, tiling: Tiling, batch: int = 0) -> np.ndarray:
    """For each of the kernel's own tiles, how many keys (query owner) or
    query rows (key owner) some pair of the tile keeps."""
    keys = key_intervals(mask, batch)
    if tiling.owner == "query":
        tiles = -(-mask.q_len // tiling.own)
        return np.array(
            [_union_length(map(tuple, keys[t * tiling.own:(t + 1) * tiling.own])) for t in range(tiles)]
        )
    # A row sees the key tile [k0, k1) if its kept interval meets it.
    lo, hi = keys[:, 0], keys[:, 1]
    nonempty = hi > lo
    tiles = -(-mask.k_len // tiling.own)
    starts = np.arange(tiles) * tiling.own
    ends = np.minimum(starts + tiling.own, mask.k_len)
    meets = nonempty[None, :] & (lo[None, :] < ends[:, None]) & (hi[None, :] > starts[:, None])
    return meets.sum(axis=1)


@dataclass(frozen=True)
class Problem:
    """One attention call: batch, heads, lengths, head dims and element size."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    value_dim: int
    size: int

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads


def bound_flops(kernel: str, problem: Problem, pairs: int) -> int:
    """FLOPs of ``kernel``'s products (``PRODUCTS``) over ``pairs`` kept
    pairs per query head (summed over the batch rows, ``kept_pairs``)."""
    per_pair = {"S": problem.head_dim, "dP": problem.value_dim, "O": problem.value_dim,
                "dV": problem.value_dim, "dQ": problem.head_dim, "dK": problem.head_dim}
    return 2 * pairs * problem.q_heads * sum(per_pair[p] for p in PRODUCTS[kernel])


def _tensor_bytes(p: Problem) -> Dict[str, int]:
    q_rows, k_rows = p.batch * p.q_heads * p.q_len, p.batch * p.kv_heads * p.k_len
    return {
        "q": q_rows * p.head_dim * p.size,
        "o": q_rows * p.value_dim * p.size,
        "dout": q_rows * p.value_dim * p.size,
        "dq": q_rows * p.head_dim * p.size,
        "lse": q_rows * _STAT_BYTES,
        "delta": q_rows * _STAT_BYTES,
        "k": k_rows * p.head_dim * p.size,
        "dk": k_rows * p.head_dim * p.size,
        "v": k_rows * p.value_dim * p.size,
        "dv": k_rows * p.value_dim * p.size,
    }


#: The tensors each kernel reads or writes, and those of its own tiles.
TENSORS = {
    "forward": (("q", "k", "v", "o", "lse"), ("q", "o", "lse")),
    "dq": (("q", "k", "v", "dout", "lse", "delta", "dq"), ("q", "dout", "lse", "delta", "dq")),
    "dkdv": (("q", "k", "v", "dout", "lse", "delta", "dk", "dv"), ("k", "v", "dk", "dv")),
}


def minimum_bytes(kernel: str, problem: Problem) -> int:
    """Device bytes of every tensor ``kernel`` reads or writes, once each."""
    sizes = _tensor_bytes(problem)
    return sum(sizes[t] for t in TENSORS[kernel][0])


def bound_bytes(kernel: str, problem: Problem, mask: StructuredMask, tiling: Tiling) -> Dict[str, int]:
    """``{"minimum": ..., "tiling": ...}`` device bytes of ``kernel`` (see
    the module docstring for both definitions)."""
    sizes = _tensor_bytes(problem)
    own = TENSORS[kernel][1]
    p = problem
    batches = concrete(mask.q_segments).shape[0] if mask.has_segments else 1
    seen = sum(int(seen_per_tile(mask, tiling, b).sum()) for b in range(batches))
    if mask.has_segments and batches != p.batch:
        raise ValueError(f"segment ids have {batches} rows for a batch of {p.batch}")
    if not mask.has_segments:
        seen *= p.batch
    if tiling.owner == "query":
        # Each threadgroup column of `heads` query heads stages its KV head's rows.
        inner = seen * (p.q_heads // tiling.heads) * (p.head_dim + p.value_dim) * p.size
    else:
        inner = seen * p.q_heads * ((p.head_dim + p.value_dim) * p.size + 2 * _STAT_BYTES)
    return {
        "minimum": minimum_bytes(kernel, problem),
        "tiling": sum(sizes[t] for t in own) + inner,
    }
