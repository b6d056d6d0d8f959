"""Context parallelism: each row split over the ranks of a group, exact.

With ``N`` ranks in a context-parallel group, rank ``r`` holds the
contiguous slice ``[r * S, (r + 1) * S)`` of every row (``S = L / N``), so
activations, the loss and the MLP's working set are ``1 / N`` of a single
process's. Attention is the one place where positions meet. Per attention
layer (Llama 3's design, chosen over ring attention because it takes any
mask, document masks included, and because with grouped-query attention
``K`` and ``V`` are much smaller than ``Q``):

* ``K`` and ``V`` (one array, concatenated on the head dimension, so that
  every rank issues the same collectives in the same order) are
  all-gathered over the group (``gather``): ``(B, Hkv, S, D + Dv)`` becomes
  ``(B, Hkv, N * S, D + Dv)``;
* the ``S`` local queries attend the gathered keys with the structured mask
  at global positions: under ``causal`` only keys ``[0, (r + 1) * S)`` can be
  seen, and with that key range the op's bottom-right alignment puts the
  diagonal exactly at the slice's offset; a window also drops the keys
  before ``r * S - W + 1``; document ids come as a (query ids, key ids) pair;
* in the backward, each rank's key and value gradients hold contributions
  to every rank's slice: ``all_gather``'s own vjp in MLX 0.32 only slices
  this rank's part (it drops what the other ranks' queries owe), so
  ``gather`` has its own vjp, an ``all_sum`` of the gradient followed by
  that slice (MLX's ring backend has no ``sum_scatter``).

The op underneath is ``mlx_flash.scaled_dot_product_attention``, so every
variant runs (blockwise here, the Metal kernels on a Mac).

Through mlx-lm with unchanged models: every layer gets a ``SliceCache`` as
its ``cache``. mlx-lm models apply RoPE at ``cache.offset`` when a cache is
given, so positions are global and cross-slice scores are exact; the
cache's ``update_and_fetch`` returns the local keys unchanged and its
``make_mask`` says "causal" or which window; the patched attention
(``mlx_flash.patch``) sees the cache and calls ``attention`` here.

Communication per attention layer and rank, for ``B`` rows of ``L``
tokens, ``Hkv`` KV heads of dims ``D + Dv`` and ``b`` bytes per element
(``traffic``): the forward all-gather sends and receives
``(N - 1) / N * B * Hkv * L * (D + Dv) * b``; the backward all-sum
(a ring all-reduce of the gathered size) twice that; with gradient
checkpointing the forward gather runs once more in the recompute.

Data parallelism composes: ``Grid`` puts ``world.size()`` ranks in a
``dp x cp`` grid (rank ``d * cp + c``). Where the backend can split groups
the collectives run on the ``cp`` ranks of a row; where it cannot (the ring
backend), on the whole world, each rank using only its row's part (exact,
``dp`` times the bytes).
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .attention import scaled_dot_product_attention


def mlx_lm_patched() -> bool:
    """Whether mlx-lm's attention comes through mlx-flash (and so to
    ``attention`` here for a ``SliceCache``). ``mlx_flash.patch``, which
    imports this module, replaces this with its own answer on import, so
    this module needs no import of it; without it nothing is patched."""
    return False


@dataclass(frozen=True, eq=False)
class Grid:
    """This rank's place in a ``dp x cp`` grid of ranks.

    ``group`` runs the collectives; its ranks ``first .. first + cp - 1``
    hold the slices of this rank's rows, in order (``first`` is 0 when the
    backend gave a group of the ``cp`` ranks alone).
    """

    cp: int
    index: int
    dp: int
    dp_index: int
    group: Optional[mx.distributed.Group] = None
    first: int = 0

    @property
    def collective_size(self) -> int:
        return 1 if self.group is None else self.group.size()


def grid(context_parallel: int, world: Optional[mx.distributed.Group] = None) -> Grid:
    """The ``Grid`` of this rank with ``context_parallel`` ranks per row.

    Raises ``ValueError`` when the world's size is not a multiple of it.
    """
    if not isinstance(context_parallel, int) or context_parallel < 1:
        raise ValueError(f"context_parallel: must be a positive integer, got {context_parallel!r}")
    world = world or mx.distributed.init()
    size, rank = world.size(), world.rank()
    if size % context_parallel:
        raise ValueError(
            f"context_parallel: {context_parallel} does not divide the {size} ranks "
            "(launch a multiple of it with mlx.launch)"
        )
    dp_index, index = divmod(rank, context_parallel)
    dp = size // context_parallel
    if context_parallel == 1:
        return Grid(1, 0, dp, dp_index)
    if dp == 1:
        return Grid(context_parallel, index, 1, 0, world, 0)
    try:
        group = world.split(dp_index, index)
        return Grid(context_parallel, index, dp, dp_index, group, 0)
    except RuntimeError:
        # The ring backend cannot split: gather over every rank and keep
        # this row's part (other rows' ranks add zeros in the backward).
        return Grid(context_parallel, index, dp, dp_index, world, dp_index * context_parallel)


def gather(x: mx.array, grid: Grid) -> mx.array:
    """All-gather ``x`` over the row's ranks along the sequence axis.

    ``x`` is this rank's ``(B, H, S, E)``; returns ``(B, H, cp * S, E)``,
    rank ``c``'s slice at ``[c * S, (c + 1) * S)``. The vjp sums the
    gradient over the group and returns this rank's slice of it.
    """
    if grid.cp == 1:
        return x
    return _gather_function(grid)(x)


def _gather_function(grid: Grid):
    group, first, cp = grid.group, grid.first, grid.cp
    own = first + grid.index

    @mx.custom_function
    def gathered(x):
        B, H, S, E = x.shape
        every = mx.distributed.all_gather(x[None], group=group, stream=mx.cpu)  # (G, B, H, S, E)
        rows = every[first : first + cp]
        return rows.transpose(1, 2, 0, 3, 4).reshape(B, H, cp * S, E)

    @gathered.vjp
    def gathered_vjp(primals, cotangent, output):
        x = primals[0] if isinstance(primals, (list, tuple)) else primals
        B, H, S, E = x.shape
        g = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
        g = g.reshape(B, H, cp, S, E).transpose(2, 0, 1, 3, 4)  # (cp, B, H, S, E)
        size = group.size()
        if size != cp:
            # The other rows' ranks owe nothing to this row's slices: zeros.
            g = mx.pad(g, [(first, size - first - cp)] + [(0, 0)] * 4)
        total = mx.distributed.all_sum(g, group=group, stream=mx.cpu)
        return (total[own].astype(x.dtype),)

    return gathered


def gather_ids(ids: mx.array, grid: Grid) -> mx.array:
    """The whole rows' ``(B, cp * S)`` document ids from this rank's
    ``(B, S)``: once per step (every layer uses the same), no gradient."""
    if grid.cp == 1:
        return ids
    every = mx.distributed.all_gather(ids[None], group=grid.group, stream=mx.cpu)[grid.first : grid.first + grid.cp]
    return every.transpose(1, 0, 2).reshape(ids.shape[0], -1)


@dataclass(frozen=True)
class Window:
    """The mask ``SliceCache.make_mask`` gives a sliding-window layer."""

    size: int


class SliceCache:
    """The ``cache`` an mlx-lm layer gets for this rank's slice of the rows.

    Args:
        grid: this rank's ``Grid``.
        length: ``S``, the tokens of each row on this rank.
        ids: optional ``(B, cp * S)`` document ids of the whole rows
            (``gather_ids`` makes them from the local ones).

    ``offset`` (``index * S``) is where mlx-lm applies RoPE, so positions
    are global; nothing is stored, and one object serves every layer.
    """

    def __init__(self, grid: Grid, length: int, ids: Optional[mx.array] = None):
        if ids is not None and ids.shape[-1] != grid.cp * length:
            raise ValueError(
                f"[mlx_flash.context] ids cover {ids.shape[-1]} tokens, not the {grid.cp} x {length} of the whole rows"
            )
        self.grid = grid
        self.length = length
        self.offset = grid.index * length
        self.ids = ids

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if not mlx_lm_patched():
            raise ValueError("[mlx_flash.context] context parallelism needs mlx-lm patched: call mlx_flash.patch()")
        if keys.shape[2] != self.length:
            raise ValueError(
                f"[mlx_flash.context] a layer got {keys.shape[2]} keys for a slice of {self.length} tokens"
            )
        return keys, values

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None, **_):
        if return_array:
            raise ValueError("[mlx_flash.context] this model asks for an array mask; context parallelism takes causal or windowed masks")
        if window_size and window_size < self.grid.cp * self.length:
            return Window(window_size)
        return "causal"

    @property
    def state(self):
        return ()


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: SliceCache,
    *,
    scale: float,
    mask,
    sinks: Optional[mx.array] = None,
    variant: str = "auto",
) -> mx.array:
    """This rank's queries against the whole rows' keys.

    ``queries`` is ``(B, Hq, S, D)``, ``keys``/``values`` this rank's
    ``(B, Hkv, S, D)``/``(B, Hkv, S, Dv)``; ``mask`` is ``"causal"``,
    a ``Window``, or None (every key). Returns ``(B, Hq, S, Dv)``, exactly
    the rows of single-process attention over the whole rows.
    """
    grid, S = cache.grid, cache.length
    if isinstance(mask, Window):
        causal, window = True, mask.size
    elif isinstance(mask, str) and mask == "causal":
        causal, window = True, None
    elif mask is None:
        causal, window = False, None
    else:
        raise ValueError("[mlx_flash.context] context parallelism takes causal, windowed or no masks, not an array mask")
    d = keys.shape[-1]
    kv = gather(mx.concatenate([keys, values.astype(keys.dtype)], axis=-1), grid)
    start, stop = 0, grid.cp * S
    if causal:
        # Keys past this slice are never seen; with keys [start, stop) the
        # bottom-right diagonal of query i is key i + index * S - start.
        stop = (grid.index + 1) * S
        if window is not None:
            start = max(0, grid.index * S - window + 1)
    kv = kv[:, :, start:stop]
    structure = {}
    if window is not None:
        structure["window"] = window
    if cache.ids is not None:
        q_ids = cache.ids[:, grid.index * S : (grid.index + 1) * S]
        structure["segment_ids"] = (q_ids, cache.ids[:, start:stop])
    return scaled_dot_product_attention(
        queries,
        kv[..., :d],
        kv[..., d:].astype(values.dtype),
        scale=scale,
        mask="causal" if causal else None,
        sinks=sinks,
        variant=variant,
        **structure,
    )


def traffic(grid_size: int, batch: int, length: int, kv_heads: int, head_dims: int, itemsize: int) -> dict:
    """Bytes one rank sends per attention layer and step (as many arrive):
    the forward all-gather and the backward all-sum (a ring all-reduce of
    the gathered ``(B, Hkv, L, D + Dv)``). ``head_dims`` is ``D + Dv``."""
    whole = batch * kv_heads * length * head_dims * itemsize
    share = (grid_size - 1) / grid_size
    return {"forward_bytes": int(share * whole), "backward_bytes": int(2 * share * whole)}


def split_row(x: mx.array, grid: Grid, fill) -> mx.array:
    """This rank's slice of ``x`` (``(B, L, ...)``), the rows first padded
    at their end with ``fill`` to a multiple of ``cp``."""
    length = x.shape[1]
    S = -(-length // grid.cp)
    if S * grid.cp != length:
        pad = [(0, 0), (0, S * grid.cp - length)] + [(0, 0)] * (x.ndim - 2)
        x = mx.pad(x, pad, constant_values=fill)
    return x[:, grid.index * S : (grid.index + 1) * S]


def _slice_terms(model, grid: Grid, tokens, ids, targets):
    """This rank's summed cross entropy and its count of targets; the
    whole rows' count. ``tokens`` ``(B, L)``, ``ids`` ``(B, L)`` or None,
    ``targets`` ``(B, L - 1)`` 0/1: which next-token targets count."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    local = split_row(inputs, grid, 0)
    S = local.shape[1]
    all_ids = None
    if ids is not None:
        all_ids = mx.pad(ids[:, :-1], [(0, 0), (0, grid.cp * S - inputs.shape[1])], constant_values=-1)
    cache = SliceCache(grid, S, all_ids)
    logits = model(local, cache=[cache] * len(model.layers))
    counted = split_row(targets, grid, 0).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, split_row(labels, grid, 0)).astype(mx.float32) * counted
    return ce.sum(), counted.sum(), targets.astype(mx.float32).sum()


def _targets(batch):
    """``(tokens, ids, targets)`` of a packed batch or of mlx-lm's
    ``(tokens, [offset, length] rows)``, whose targets are mlx-lm's
    ``default_loss`` mask."""
    if len(batch) == 3:
        return batch
    tokens, lengths = batch
    steps = mx.arange(1, tokens.shape[1])[None]
    targets = (steps >= lengths[:, 0:1]) & (steps <= lengths[:, 1:2])
    return tokens, None, targets


def training_loss(grid: Grid):
    """The loss a context-parallel rank differentiates, ``fn(model, *batch)``.

    Returns ``(cp * local_sum / count, local_count)`` where ``count`` is the
    targets of the whole rows: summed over the row's ranks, the gradients
    are ``cp`` times those of the rows' mean loss, so averaging over all
    ranks (``nn.average_gradients``, as in data parallelism) gives exactly
    the mean over data-parallel shards of each shard's mean-loss gradient;
    so is the average of the returned losses, and the counts add up to the
    targets.
    """

    def loss(model, *batch):
        local_sum, local_count, count = _slice_terms(model, grid, *_targets(batch))
        return grid.cp * local_sum / mx.maximum(count, 1), local_count

    return loss


def evaluation_loss(grid: Grid):
    """``fn(model, *batch)`` for mlx-lm's ``evaluate``: ``(local mean,
    local count)``, whose product summed over ranks is the summed loss."""

    def loss(model, *batch):
        local_sum, local_count, _ = _slice_terms(model, grid, *_targets(batch))
        return local_sum / mx.maximum(local_count, 1), local_count

    return loss


class _RowGroup:
    """What mlx-lm's batch iterators read from a group: the data-parallel
    shard, so that the ranks of one row get the same rows."""

    def __init__(self, grid: Grid):
        self._rank, self._size = grid.dp_index, grid.dp

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def evaluation_batches(iterate, grid: Grid):
    """``iterate`` (an mlx-lm ``iterate_batches``) handing every rank of a
    row the same rows: split over the data-parallel shards only."""

    def by_shard(dataset, batch_size, max_seq_length, comm_group=None, **kwargs):
        return iterate(dataset, batch_size, max_seq_length, comm_group=_RowGroup(grid), **kwargs)

    return by_shard
