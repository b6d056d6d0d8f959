"""The ``practical`` variant: portable Metal flash-attention kernels.

Forward (metal/practical_forward.metal) and FlashAttention-2 backward
(metal/practical_backward_dkdv.metal, metal/practical_backward_dq.metal; no
atomics, deterministic), joined into one differentiable op by
``mlx_flash.fused``. No ``simdgroup_matrix``: float32 arithmetic on tiles
staged in threadgroup memory, so the kernels run on every Apple GPU and
every shape: any lengths, head dims up to 256, ``Dv != D``, GQA/MQA,
float32, float16 and bfloat16.

Masks are structured (``mlx_flash.masks``; the kernels' contract is
metal/flash_common.h): causal (bottom-right), sliding window, segment ids
and a boolean or additive array compose, and no ``L x L`` mask is ever
built. Tile pairs that the causal and window rules exclude lie outside the
loops' bounds (``flash_key_begin/end``, ``flash_row_begin/end``), pairs
whose segment-id ranges cannot meet are skipped before anything is staged,
and a tile loop ends where the running id bounds (``masks.segment_bounds``)
say no later tile can meet (the forward and dQ walk key tiles from the
diagonal down, dK/dV query tiles up), so a packed row costs the sum of its
documents' squared lengths (with causal, other documents' tiles are not
even tested one by one; without it, those on the far side of the diagonal
are each tested and skipped), and a windowed layer ``O(L * window)``. Sinks start the forward's online softmax;
their gradient is ``fused.sink_grad``.

Work layout. A threadgroup has ``NSG`` simdgroups; a forward or dQ query
tile is ``BQ = NSG * R`` rows, ``heads x positions``: the ``heads`` query
heads of one KV head (``fused.heads_per_tile``: the largest divisor of the GQA
group that fits) side by side, so each K/V tile is staged once for all of
them. Each tile product has two phases:

* scores: a simdgroup's 32 lanes are ``32 / BK`` lane-rows of ``BK`` lanes;
  lane ``(r, j)`` computes the whole dot product of key ``j`` with rows
  ``r, r + 32 / BK, ...`` from the staged tiles, masks and exponentiates
  it: every (query, key) pair once, by one lane. dK/dV swaps the roles:
  lanes own the ``BQ`` query positions of the staged tile and iterate over
  the simdgroup's keys;
* accumulation: lane ``l`` owns output columns ``l, l + 32, ...`` and adds
  ``P V`` (``dS K``; ``P^T dO`` and ``dS^T Q``), the weights read from
  threadgroup memory (the same address in every lane).

Non-matrix work per (query, key) pair, beyond the dot products' FMAs, in
lane operations (one lane executing one instruction; a SIMD instruction is
32 of them) and lane-collectives (one lane taking part in one simd_sum,
simd_max, simd_any or shuffle), for a causal window with segments and no
array (an array adds a load and a compare or an add); the ``python -m
mlx_flash.bench --cost`` report counts the exps and collectives on the
emulator (``mlx_flash.bench.cost.practical_alu``):

================  ===============================  ===============================
                  one lane per pair, a group max   these kernels: a lazy maximum
                  and correction every tile
================  ===============================  ===============================
forward ALU       ~20: mask 7 (2 position          ~13: mask 7, scale 1, the lazy-
                  compares, 1 id compare, 2 ands,  maximum test 2 (a compare and
                  1 select, 1 kept flag), scale    an or), exp argument 2, exp 1,
                  1, the group max's maxes 3 (8    sum 1; the group max and the
                  keys per tile), max 1, exp       correction (~9 and an exp per
                  argument 2, exp 1, correction    lane and row) only on the tiles
                  3, sum 1                         where a score passes its row's
                                                   maximum by more than the slack
forward           3-4: the group max's shuffles    1 / RL: one simd_any per lane
collectives       (8 or 16 keys per tile)          and tile (RL rows per lane);
                                                   the shuffles on rescales only
backward ALU      12 per kernel: mask 5, select    the same
                  1, scale 1, exp argument 2, exp
                  1, dS 2
backward          0                                0
collectives
================  ===============================  ===============================

Counted at L = 1024, D = 128, causal, float32: the lazy maximum's forward
issues 1.02 exp2 and 0.14 shuffles per pair (plus one simd_any), a group
max every tile 2.0 and 3.1; in the cost report's terms 1.7x the scalar
minimum (one thread per pair, 8 lane operations) against 2.5x. The lazy maximum: every score the row has seen
is at most ``m + PRACTICAL_SLACK`` (8, natural units), so ``p = exp(s - m)
<= e^8`` cannot overflow, and ``lse = m + log(l)`` is exact whatever ``m``
is; only a score past that bound moves ``m`` (a branch that is uniform per
simdgroup, ``simd_any``), which after a row's first tiles almost never
happens. The output's rescale (``Dv / BK`` multiplies per pair in a scalar
kernel too) runs only after a new maximum, and only for rows whose
correction is not exactly 1. Memory operations per pair: one threadgroup
store of P (or dS) and a quarter of a broadcast load in the accumulation.
The key tile's document ids (forward, dQ) and the query tile's lse, delta
and ids (dK/dV) are staged with their tiles, read once from device memory
instead of by every lane that pairs them.

Tile sizes (``tile_sizes``; template constants) keep threadgroup memory
within 16 KB where possible and always within Metal's 32 KB, with about 32
float32 accumulators per lane (64 where nothing else fits: float32 dK/dV at
head dim 256). Tiles are staged in the input dtype (a half or bfloat16 tile
takes half the bytes of a float32 one) and converted on read; the forward
and dQ also stage their query rows, which the lane-per-key scores read as
broadcasts. Staged in their own dtype, half and bfloat16 tiles let the
forward share each staged K/V tile among twice the query rows a float32
staging would fit (32 instead of 16 at D = 64 and 128, 16 instead of 8 at
D = 256), half the K/V traffic from device memory; dQ and dK/dV share
theirs among 32 rows (keys) at D = 64, 16 at D = 128 and 16 / 8 at D = 256.
``registers`` is an estimate of a lane's float32
registers (accumulators, per-row state, temporaries), not a compiler count.
bfloat16 is as float16. ``NSG/R/BK`` reads ``NSG/KPS/BQ`` for dK/dV.

====  ====  =====  =======  ==========  =====  =========
D     Dv    dtype  kernel   NSG/R/BK    bytes  registers
====  ====  =====  =======  ==========  =====  =========
32    32    f16    forward  4/8/16      6720   77
32    32    f16    dq       4/8/16      9024   73
32    32    f16    dkdv     4/8/16      11200  69
32    32    f32    forward  4/8/16      11200  77
32    32    f32    dq       4/8/16      15936  73
32    32    f32    dkdv     4/8/8       13664  61
64    64    f16    forward  4/8/16      10816  90
64    64    f16    dq       4/8/16      15168  86
64    64    f16    dkdv     4/8/8       13024  82
64    64    f32    forward  4/8/8       14112  70
64    64    f32    dq       4/4/8       13600  51
64    64    f32    dkdv     4/4/8       14176  62
80    80    f16    forward  4/8/16      12864  103
80    80    f16    dq       4/8/8       14496  81
80    80    f16    dkdv     4/4/16      12992  79
80    80    f32    forward  4/4/8       11232  61
80    80    f32    dq       4/4/8       16672  60
80    80    f32    dkdv     4/4/8       17248  75
96    64    f16    forward  4/8/16      13888  90
96    64    f16    dq       4/8/8       14496  81
96    64    f16    dkdv     4/4/16      12992  75
96    64    f32    forward  4/4/8       12256  52
96    64    f32    dq       4/4/8       16672  60
96    64    f32    dkdv     4/4/8       17248  71
128   64    f16    forward  4/8/8       12768  70
128   64    f16    dq       4/4/16      13888  78
128   64    f16    dkdv     4/4/16      15040  84
128   64    f32    forward  4/4/8       15328  52
128   64    f32    dq       4/4/8       19744  69
128   64    f32    dkdv     4/4/8       20320  80
128   128   f16    forward  4/8/8       13792  96
128   128   f16    dq       4/4/8       13216  69
128   128   f16    dkdv     4/4/8       13792  88
128   128   f32    forward  4/4/8       17376  70
128   128   f32    dq       4/4/8       25888  69
128   128   f32    dkdv     4/4/8       26464  88
256   64    f16    forward  4/4/8       14112  52
256   64    f16    dq       4/4/8       16288  105
256   64    f16    dkdv     4/2/16      16960  96
256   64    f32    forward  4/4/8       27616  52
256   64    f32    dq       4/4/8       32032  105
256   64    f32    dkdv     4/2/16      32704  96
256   256   f16    forward  4/4/8       17184  106
256   256   f16    dq       4/4/8       25504  105
256   256   f16    dkdv     4/2/16      26176  108
256   256   f32    forward  2/4/8       25152  106
256   256   f32    dq       1/4/8       25120  105
256   256   f32    dkdv     1/4/8       25312  140
====  ====  =====  =======  ==========  =====  =========

None of this was tuned on a GPU (no Mac was available): the rule is a
reasoned default, to be retuned with the benchmark.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from . import dispatch, fused, kernels
from .call import AttentionCall
from .masks import StructuredMask

#: Largest head dim (``D`` and ``Dv``) the kernels take.
MAX_HEAD_DIM = 256

#: Threadgroup memory a configuration should stay within, and Metal's limit.
PREFERRED_BYTES = 16 * 1024
LIMIT_BYTES = 32 * 1024

#: float32 accumulators per lane a configuration aims for, and the most it
#: may take where nothing smaller fits.
ACCUMULATORS = 32
MAX_ACCUMULATORS = 64

#: Input dtypes the practical kernels run.
DTYPES = (mx.float32, mx.float16, mx.bfloat16)
_HEADERS = ("flash_common.h", "practical_common.h")


@dataclass(frozen=True)
class TileConfig:
    """One kernel's tile configuration.

    ``rows``: query rows per simdgroup (R, forward and dQ) or keys per
    simdgroup (KPS, dK/dV); ``tile``: keys per staged tile (BK) or query
    positions per staged tile (BQ). ``threadgroup_bytes`` is what the kernel
    declares; ``registers`` an estimate of a lane's float32 registers
    (accumulators, per-row state and temporaries), not a compiler count;
    ``accumulators`` the float32 accumulators among them.
    """

    simdgroups: int
    rows: int
    tile: int
    threadgroup_bytes: int
    registers: int
    accumulators: int


def _vectors(n: int, padded: bool) -> int:
    """4-vectors of a staged row of ``n`` elements (one more if padded)."""
    return -(-n // 4) + int(padded)


def _per_lane(n: int) -> int:
    return -(-n // 32)


def _configuration(kernel: str, dim: int, value_dim: int, size: int, simdgroups: int, rows: int, tile: int) -> TileConfig:
    """The threadgroup memory and register estimate of one candidate, as the
    kernel declares them: staged tiles of 4-vectors (``size``-byte
    elements; rows read by different lanes padded) and float32 weights."""
    shared = simdgroups * rows  # query rows (keys for dK/dV) sharing each staged tile
    d4, dv4 = _vectors(dim, True), _vectors(value_dim, True)
    dt, dvt = _per_lane(dim), _per_lane(value_dim)
    slots = rows * tile // 32  # pairs per lane in the score phase
    if kernel == "forward":  # Q; K, V (V read along columns only); P, corrections; key ids
        vectors = shared * d4 + tile * (d4 + _vectors(value_dim, False))
        floats = shared * tile + shared + tile
        accumulators, columns, state, fixed = rows * dvt, dvt, 10, 24
    elif kernel == "dq":  # Q, dO; K, V; dS; key ids
        vectors = (shared + tile) * (d4 + dv4)
        floats = shared * tile + tile
        accumulators, columns, state, fixed = rows * dt, dt, 9, 24
    else:  # K, V; Q, dO; P, dS; the query tile's lse, delta and ids
        vectors = (shared + tile) * (d4 + dv4)
        floats = 2 * shared * tile + 3 * tile
        accumulators, columns, state, fixed = rows * (dt + dvt), max(dt, dvt), 4, 32
    # Per score slot: its row's (or key's) bounds, id and statistics; per
    # output column: the accumulation's four staged values and its index.
    registers = accumulators + state * slots + 5 * columns + fixed
    return TileConfig(simdgroups, rows, tile, size * 4 * vectors + 4 * floats, registers, accumulators)


_KERNELS = ("forward", "dq", "dkdv")


def tile_sizes(kernel: str, head_dim: int, value_dim: int, dtype) -> TileConfig:
    """The tile configuration of ``kernel`` ("forward", "dq" or "dkdv").

    Candidates are 4, 2 or 1 simdgroups, 8, 4, 2 or 1 rows (keys, for
    dK/dV) per simdgroup and tiles of 32, 16 or 8 keys (query positions),
    such that every lane owns 1 to 4 pairs in the score phase
    (``32 <= rows * tile <= 128``). The first of these tiers that has a
    candidate decides: ``ACCUMULATORS`` per lane and ``PREFERRED_BYTES``
    with at least 16 rows sharing each staged tile; ``LIMIT_BYTES`` with
    exactly 16 (more sharing is not worth the memory there); any sharing;
    ``MAX_ACCUMULATORS``. Within a tier the most sharing
    (``simdgroups * rows``: what staging is amortised over) wins, then the
    longest tile in the first tier and the least memory in the others, then
    more simdgroups.
    """
    if max(head_dim, value_dim) > MAX_HEAD_DIM:
        raise ValueError(f"head dims {head_dim} and {value_dim}: the practical kernels take at most {MAX_HEAD_DIM}")
    size = mx.finfo(dtype).bits // 8
    candidates = [
        _configuration(kernel, head_dim, value_dim, size, simdgroups, rows, tile)
        for simdgroups in (4, 2, 1)
        for rows in (8, 4, 2, 1)
        for tile in (32, 16, 8)
        if 32 <= rows * tile <= 128
    ]
    tiers = (
        (ACCUMULATORS, PREFERRED_BYTES, 16, 32),
        (ACCUMULATORS, LIMIT_BYTES, 16, 16),
        (ACCUMULATORS, LIMIT_BYTES, 1, 32),
        (MAX_ACCUMULATORS, LIMIT_BYTES, 1, 32),
    )
    for tier, (accumulators, limit, least, most) in enumerate(tiers):
        fitting = [
            t
            for t in candidates
            if t.threadgroup_bytes <= limit
            and least <= t.simdgroups * t.rows <= most
            and t.accumulators <= accumulators
        ]
        if fitting:
            # Within the preferred budget the longest tile; past it the least memory.
            return min(
                fitting,
                key=lambda t: (-t.simdgroups * t.rows, -t.tile if tier == 0 else t.threadgroup_bytes, -t.simdgroups),
            )
    raise ValueError(f"no practical tile fits head dims {head_dim} and {value_dim} in {LIMIT_BYTES} bytes")


def tile_table(dims=(32, 64, 80, 96, 128, 256)) -> list:
    """``(D, Dv, dtype, kernel, TileConfig)`` for head dims ``dims`` (``Dv = D``
    and ``Dv = 64``) in every dtype."""
    table = []
    for dim in dims:
        for value_dim in sorted({dim, 64}):
            for dtype in DTYPES:
                for kernel in _KERNELS:
                    table.append((dim, value_dim, dtype, kernel, tile_sizes(kernel, dim, value_dim, dtype)))
    return table


def unsupported_reason(q, k, v, mask: StructuredMask) -> Optional[str]:
    """Why these (normalised) inputs cannot run on the practical kernels, or
    None. Every ``StructuredMask`` is supported."""
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not float32, float16 or bfloat16"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if v.shape[-1] > MAX_HEAD_DIM:
        return f"value head dim {v.shape[-1]} > {MAX_HEAD_DIM}"
    if k.shape[2] == 0:
        return "no keys"
    return None


def _template(call: AttentionCall, tiles: TileConfig, rows_name: str, tile_name: str) -> list:
    return [
        ("T", call.q.dtype),
        ("D", call.q.shape[-1]),
        ("DV", call.v.shape[-1]),
        ("NSG", tiles.simdgroups),
        (rows_name, tiles.rows),
        (tile_name, tiles.tile),
    ]


def _query_tiling(call: AttentionCall, tiles: TileConfig):
    """``(heads, positions)`` of a forward / dQ query tile."""
    heads = fused.heads_per_tile(call.group, tiles.simdgroups * tiles.rows)
    return heads, tiles.simdgroups * tiles.rows // heads


def _query_launch(call: AttentionCall, tiles: TileConfig) -> dict:
    """Grid and threadgroup of a forward / dQ launch."""
    B, n_q_heads, q_len, _ = call.q.shape
    heads, positions = _query_tiling(call, tiles)
    threads = 32 * tiles.simdgroups
    return {
        "grid": (threads * -(-q_len // positions), n_q_heads // heads, B),
        "threadgroup": (threads, 1, 1),
    }


def dispatch_tiles(stage: str, q, k, v) -> tuple:
    """``(rows, inner)`` of ``stage``'s launch for ``mlx_flash.dispatch``:
    positions per tile along the grid's x axis (query positions; keys for
    dK/dV) and per tile of the loop inside."""
    tiles = tile_sizes(stage, q.shape[-1], v.shape[-1], q.dtype)
    rows = tiles.simdgroups * tiles.rows
    if stage == "dkdv":
        return rows, tiles.tile
    return rows // fused.heads_per_tile(q.shape[1] // k.shape[1], rows), tiles.tile


def _split(stage: str, call: AttentionCall) -> dispatch.Split:
    tiles = dispatch_tiles(stage, call.q, call.k, call.v)
    return dispatch.split(stage, "practical", call.q, call.k, call.v, call.mask, *tiles)


def forward(call: AttentionCall):
    """``(o, lse)``: ``(B, Hq, Lq, Dv)`` in ``q``'s dtype and ``(B, Hq, Lq)``
    float32 (natural log, ``+inf`` for a row that keeps no key)."""
    q, v = call.q, call.v
    B, n_q_heads, q_len, _ = q.shape
    value_dim = v.shape[-1]
    tiles = tile_sizes("forward", q.shape[-1], value_dim, q.dtype)
    _, positions = _query_tiling(call, tiles)
    kernel = kernels.build(
        "flash_practical_forward", fused.KERNEL_INPUTS, ("o", "lse"), "practical_forward.metal", _HEADERS
    )
    return dispatch.launch(
        kernel,
        _split("forward", call),
        inputs=fused.kernel_inputs(call, q_tile=positions, k_tile=tiles.tile),
        template=_template(call, tiles, "R", "BK"),
        output_shapes=[(B, n_q_heads, q_len, value_dim), (B, n_q_heads, q_len)],
        output_dtypes=[q.dtype, mx.float32],
        **_query_launch(call, tiles),
    )


def dkdv(call: AttentionCall):
    """``(dk, dv)`` with the shapes and dtype of ``k`` and ``v``."""
    k, v = call.k, call.v
    B, n_kv_heads, k_len, head_dim = k.shape
    tiles = tile_sizes("dkdv", head_dim, v.shape[-1], call.q.dtype)
    block_keys = tiles.simdgroups * tiles.rows
    kernel = kernels.build(
        "flash_practical_dkdv", fused.BACKWARD_INPUTS, ("dk", "dv"), "practical_backward_dkdv.metal", _HEADERS
    )
    return dispatch.launch(
        kernel,
        _split("dkdv", call),
        inputs=fused.kernel_inputs(call, q_tile=tiles.tile, k_tile=block_keys),
        template=_template(call, tiles, "KPS", "BQ"),
        grid=(32 * tiles.simdgroups * -(-k_len // block_keys), n_kv_heads, B),
        threadgroup=(32 * tiles.simdgroups, 1, 1),
        output_shapes=[tuple(k.shape), tuple(v.shape)],
        output_dtypes=[call.q.dtype, call.q.dtype],
    )


def dq(call: AttentionCall):
    """``dq`` with the shape and dtype of ``q``."""
    q = call.q
    tiles = tile_sizes("dq", q.shape[-1], call.v.shape[-1], q.dtype)
    _, positions = _query_tiling(call, tiles)
    kernel = kernels.build(
        "flash_practical_dq", fused.BACKWARD_INPUTS, ("dq",), "practical_backward_dq.metal", _HEADERS
    )
    return dispatch.launch(
        kernel,
        _split("dq", call),
        inputs=fused.kernel_inputs(call, q_tile=positions, k_tile=tiles.tile),
        template=_template(call, tiles, "R", "BK"),
        output_shapes=[tuple(q.shape)],
        output_dtypes=[q.dtype],
        **_query_launch(call, tiles),
    )[0]
