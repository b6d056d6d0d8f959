"""The ``demo`` variant: flash attention on ``simdgroup_matrix`` tiles.

Same contract and custom-op wrapping as ``practical`` (see
``mlx_flash.fused`` and ``metal/flash_common.h``); a different engine
inside. Every product (``S = Q K^T`` and ``O += P V`` forward;
``dV += P^T dO``, ``dP = dO V^T``, ``dQ += dS K``, ``dK += dS^T Q``
backward) is an 8x8 ``simdgroup_multiply_accumulate`` with half or bfloat16
operands (float32 operands for float32 inputs) and float32 accumulators
that stay in registers. The kernels are
``metal/demo_forward.metal``, ``metal/demo_backward_dq.metal`` and
``metal/demo_backward_dkv.metal`` with ``metal/demo_common.h``.

Masks arrive as their structure (``mlx_flash.masks.StructuredMask``): causal,
sliding window, segment ids, an optional boolean or additive array and sinks
compose inside the kernels, exactly, and no ``L x L`` mask is ever built. Key
tiles outside a query tile's causal / window band are never visited (and
query tiles outside a key tile's, in the dK/dV kernel), and with segment ids
a tile pair whose id ranges cannot meet is skipped before anything is staged
and a tile loop ends where the running id bounds (``masks.segment_bounds``)
say no later tile can meet (key tiles are walked from the diagonal down,
query tiles in dK/dV up), so a packed row costs the sum of its documents'
squared lengths and a windowed layer ``O(L * window)``. The structure is read at run time from
``params`` (uniform branches, no template constant), so one compiled
pipeline per dtype, head dim and tile shape serves every mask: fewer Metal
compiles on a Mac and fewer emulator builds in CI. The lse is natural-log,
``+inf`` for a row that keeps no key (whose output is zero).

The demo kernels take the shapes that matter for fine-tuning: head dims 64,
80, 96 and 128 with ``Dv == D``, float16, bfloat16 and float32 (on
``simdgroup_matrix<float, 8, 8>``, ``FLOAT32_TILES``), every mask, GQA, any
length. ``unsupported_reason`` says why anything else goes to
``practical``; ``mlx_flash.explain`` reports it.

Head dim 256 stays on ``practical``: in these kernels a SIMD group owns 8
rows across the whole head dim, and at D = 256 that alone passes the
register budget before any tile is chosen (``TileSet.registers``, 32-bit
words per lane of fragments and accumulators, half operands; the smallest
tile, 8, in the other dimension):

=======  ==================================  =====  ================================
kernel   what D = 256 holds per lane         words  threadgroup memory
=======  ==================================  =====  ================================
forward  Q 32, O 64; S, P 3 per 8 keys       99     8,480 / 16,960 B (8 / 16 keys)
dq       q 32, dout 32, dQ 64; S, dP, dS 5   133    8,480 / 16,960 B (8 / 16 keys)
dkv      v 32, dK 64, dV 64; 4 tiles 6       166    16,992 / 25,440 B (16 / 32 keys)
=======  ==================================  =====  ================================

against a budget of 96: the forward 3 words over it, dQ 37 and dK/dV 70;
with some 20 words of addresses and loop state both backward kernels pass
128 and would spill, and the backward is two thirds of a training step's
attention work. Threadgroup memory is
not the limit (all within 32 KB); registers are. Fitting would take
another work split (two SIMD groups per 8 rows, each owning half the head
dim's accumulators, recomputing or sharing ``S`` through threadgroup
memory: a barrier per tile and ``8 x BK`` floats more per pair of SIMD
groups), a different kernel from the one tested here, so D = 256 is not
offered rather than offered spilling.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx

from . import dispatch, fused, kernels
from .call import AttentionCall
from .masks import StructuredMask

#: Head dims the demo kernels are built for (``D == Dv``).
HEAD_DIMS = (64, 80, 96, 128)

#: Metal's limits per threadgroup on Apple GPUs: threadgroup memory in bytes
#: and threads. A retuned tile may go up to them.
MAX_THREADGROUP_BYTES = 32 * 1024
MAX_THREADS = 1024

#: What the shipped tiles stay within: threadgroup memory per threadgroup
#: (half of Metal's limit, so more threadgroups fit per GPU core; MLX's own
#: attention takes 14,848 bytes at D = 128) and 32-bit registers per lane
#: for fragments and accumulators (``TileSet.registers``; addresses, indices
#: and loop state add some 20 more, which keeps the total under 128).
THREADGROUP_BYTES_BUDGET = 16 * 1024
REGISTER_BUDGET = 96

#: The budgets of the float32 tiles (``FLOAT32_TILES``). A float32 operand
#: fragment takes 2 registers per lane instead of 1 and a staged float32
#: row twice the bytes, so at D = 128 the half budgets would leave the dK/dV
#: kernel one SIMD group: float32 takes up to 28 KB of threadgroup memory
#: (within Metal's 32 KB) and 104 registers per lane (some 20 more for
#: addresses and loop state keep it under 128).
FLOAT32_THREADGROUP_BYTES_BUDGET = 28 * 1024
FLOAT32_REGISTER_BUDGET = 104

#: Elements added to every staged row (``DEMO_PAD`` in metal/demo_common.h).
ROW_PAD = 8

#: Input dtypes the demo kernels run. float32 runs the same kernels with
#: float32 operands (``simdgroup_matrix<float, 8, 8>``) on ``FLOAT32_TILES``.
DTYPES = (mx.float16, mx.bfloat16, mx.float32)


def _aligned(*blocks: int) -> int:
    """Bytes of threadgroup arrays of the given sizes: each one starts at a
    16-byte boundary, the granularity Metal allocates in."""
    return sum(-(-b // 16) * 16 for b in blocks)


@dataclass(frozen=True)
class TileSet:
    """Tile sizes of the three demo kernels for one head dim.

    Every tile size is a multiple of 8 (one ``simdgroup_matrix``). A SIMD
    group owns 8 rows (queries, or keys in the dK/dV kernel) of its
    threadgroup's tile.

    * ``forward = (BQ, BK)``: BQ query rows per head and threadgroup, BK keys
      per staged K/V tile (``BQ <= 2 BK``: Q is staged through that memory).
    * ``dq = (BQ, BK)``: the same for the dQ kernel (q and dout staged there
      one after the other).
    * ``dkdv = (BQ, BK)``: BK keys per threadgroup, BQ queries per staged
      q/dout tile.
    * ``heads``: query heads of one GQA group per forward / dQ threadgroup
      (the largest divisor of the group up to this many): their SIMD groups
      share every staged K/V tile, so each is staged once per ``heads`` query
      heads and ``heads * BQ`` rows, while causal, window and segment
      skipping keep the granularity of BQ queries.

    Budgets, for ``LD = D + 8`` elements per staged row (2 bytes each), each
    array rounded up to 16 bytes (``threadgroup_bytes``):

    * threadgroup memory: forward and dq ``2 BK LD * 2 + 4 BK`` (the K and V
      tiles and the key tile's segment ids); dkdv ``(BK + 2 BQ) LD * 2 +
      12 BQ`` (the k tile, kept for the whole kernel, the q and dout tiles,
      and lse, delta and segment ids of the query tile).
    * registers, 32-bit words per lane for fragments and accumulators (an
      8x8 fragment is 2 elements per lane: 1 word in half, 2 in float):
      forward ``3 D/8 + 3 BK/8`` (Q, O; S, P); dq ``4 D/8 + 5 BK/8`` (q,
      dout, dQ; S, dP, dS); dkdv ``5 D/8 + 6 BQ/8`` (v, dK, dV; S^T, dP^T,
      P^T, dS^T). The dK/dV kernel reads its k fragments from threadgroup
      memory at every query tile instead of holding them: D/8 more words
      would take it to 102 at D = 128.
    * 4 SIMD groups per kernel and head: each staged tile is read by at least
      4 SIMD groups, and the grid still has ``L / 32`` threadgroups per head
      to fill the GPU at fine-tuning lengths.

    The shipped ``TILES`` (bytes; registers per lane):

    ======  ==============  ==============  ==============
    D       forward         dq              dkdv
    ======  ==============  ==============  ==============
    64       9,344 B;  36    9,344 B;  52   14,208 B;  64
    80      11,392 B;  42   11,392 B;  60   11,456 B;  62
    96      13,440 B;  48   13,440 B;  68   13,504 B;  72
    128      8,768 B;  54    8,768 B;  74   13,152 B;  86
    ======  ==============  ==============  ==============

    These are starting points chosen by those budgets, not by measurement on
    a Mac. To retune, assign ``mlx_flash.demo.TILES[dim] = TileSet(...)`` (it
    is read and checked against Metal's limits at every launch) and time it
    with ``python -m mlx_flash.bench``.
    """

    forward: Tuple[int, int]
    dq: Tuple[int, int]
    dkdv: Tuple[int, int]
    heads: int = 2

    def __post_init__(self):
        for name in ("forward", "dq", "dkdv"):
            sizes = getattr(self, name)
            if len(sizes) != 2 or any(s <= 0 or s % 8 for s in sizes):
                raise ValueError(f"{name} tile sizes must be two positive multiples of 8, got {sizes}")
        for name in ("forward", "dq"):
            bq, bk = getattr(self, name)
            if bq > 2 * bk:
                raise ValueError(
                    f"{name} tile {(bq, bk)}: BQ must be at most 2 BK (queries are staged "
                    f"through the K/V tiles' memory)"
                )
        if self.heads < 1:
            raise ValueError(f"heads must be at least 1, got {self.heads}")
        for name, threads in self.threads(self.heads).items():
            if threads > MAX_THREADS:
                raise ValueError(
                    f"demo {name} tile {getattr(self, name)} needs {threads} threads per "
                    f"threadgroup; Metal allows at most {MAX_THREADS}"
                )

    def threads(self, heads: int = 1) -> dict:
        """Threads per threadgroup of each kernel: 32 per SIMD group, one SIMD
        group per 8 rows it owns (queries of each of ``heads`` heads, or keys
        in dkdv)."""
        return {
            "forward": heads * self.forward[0] // 8 * 32,
            "dq": heads * self.dq[0] // 8 * 32,
            "dkdv": self.dkdv[1] // 8 * 32,
        }

    def threadgroup_bytes(self, head_dim: int, size: int = 2) -> dict:
        """Threadgroup memory each kernel declares at ``head_dim`` for
        ``size``-byte elements (2: half and bfloat16, 4: float32), in bytes."""
        row = (head_dim + ROW_PAD) * size
        _, forward_bk = self.forward
        _, dq_bk = self.dq
        dkdv_bq, dkdv_bk = self.dkdv
        return {
            "forward": _aligned(2 * forward_bk * row, 4 * forward_bk),
            "dq": _aligned(2 * dq_bk * row, 4 * dq_bk),
            "dkdv": _aligned(dkdv_bk * row, dkdv_bq * row, dkdv_bq * row, 4 * dkdv_bq, 4 * dkdv_bq, 4 * dkdv_bq),
        }

    def registers(self, head_dim: int, size: int = 2) -> dict:
        """Estimated 32-bit registers per lane that each kernel's fragments and
        accumulators take at ``head_dim`` for ``size``-byte operands (see the
        class docstring): an operand fragment is ``w = size / 2`` words."""
        dim, w = head_dim // 8, size // 2
        return {
            "forward": (w + 2) * dim + (w + 2) * self.forward[1] // 8,
            "dq": (2 * w + 2) * dim + (w + 4) * self.dq[1] // 8,
            "dkdv": (w + 4) * dim + (2 * w + 4) * self.dkdv[0] // 8,
        }

    def check(self, head_dim: int, element_size: int = 2):
        """Raise ValueError if a kernel would need more threadgroup memory at
        ``head_dim`` than Metal allows (the pipeline would fail to build)."""
        for name, size in self.threadgroup_bytes(head_dim, element_size).items():
            if size > MAX_THREADGROUP_BYTES:
                raise ValueError(
                    f"demo {name} tile {getattr(self, name)} at head dim {head_dim} needs "
                    f"{size} bytes of threadgroup memory; Metal allows at most "
                    f"{MAX_THREADGROUP_BYTES}"
                )


#: TileSet per head dim (budgets in the ``TileSet`` docstring). At D = 128 the
#: forward and dq key tiles are 16 keys (32 would need 17,408 bytes) and the
#: dkdv query tile 8 queries (16 would cost 92 registers per lane).
TILES = {
    64: TileSet(forward=(32, 32), dq=(32, 32), dkdv=(32, 32)),
    80: TileSet(forward=(32, 32), dq=(32, 32), dkdv=(16, 32)),
    96: TileSet(forward=(32, 32), dq=(32, 32), dkdv=(16, 32)),
    128: TileSet(forward=(32, 16), dq=(32, 16), dkdv=(8, 32)),
}

#: TileSet per head dim for float32 inputs, on ``simdgroup_matrix<float, 8,
#: 8>``: operand fragments of 2 words per lane and staged rows of
#: ``(D + 8) * 4`` bytes. Within ``THREADGROUP_BYTES_BUDGET`` and
#: ``REGISTER_BUDGET`` up to D = 96; at D = 128 within the float32 budgets
#: above (bytes; registers per lane):
#:
#: ======  ==============  ==============  ==============
#: D       forward         dq              dkdv
#: ======  ==============  ==============  ==============
#: 64       9,280 B;  40    9,280 B;  60   13,920 B;  56
#: 80      11,328 B;  48   11,328 B;  72   14,176 B;  68
#: 96      13,376 B;  56   13,376 B;  84   13,408 B;  80
#: 128     17,472 B;  72    8,736 B; 102   26,208 B; 104
#: ======  ==============  ==============  ==============
#:
#: Key tiles of 16 (half: 32) keep the forward and dq within budget; dq at
#: D = 128 takes 8-key tiles (16 would be 108 registers) and so 16 queries
#: (staged through the K/V tiles' memory), dkdv 8-query tiles
#: everywhere (16 would add 16 registers) and at D = 80 and 96 24 and 16
#: keys (32 would pass 16 KB).
FLOAT32_TILES = {
    64: TileSet(forward=(32, 16), dq=(32, 16), dkdv=(8, 32)),
    80: TileSet(forward=(32, 16), dq=(32, 16), dkdv=(8, 24)),
    96: TileSet(forward=(32, 16), dq=(32, 16), dkdv=(8, 16)),
    128: TileSet(forward=(32, 16), dq=(16, 8), dkdv=(8, 32)),
}


def unsupported_reason(q, k, v, mask: StructuredMask) -> Optional[str]:
    """Why the demo kernels cannot run these (normalised) inputs, or None.

    Every ``StructuredMask`` is supported (causal with ``Lq <= Lk``, as the
    dispatcher sends it); the reasons are dtype and head dim.
    """
    if q.dtype not in DTYPES:
        return f"{_dtype_name(q.dtype)} inputs: demo runs float16, bfloat16 and float32"
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    if value_dim != head_dim:
        return f"value head dim {value_dim} differs from head dim {head_dim}"
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} is not one of {', '.join(map(str, HEAD_DIMS))}"
    if q.shape[2] == 0 or k.shape[2] == 0:
        return "empty sequence"
    return None


def _dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]


# The demo kernels use the shared helpers of flash_common.h and their own.
_HEADERS = ("flash_common.h", "demo_common.h")


def _kernel(name: str, inputs: Tuple[str, ...], outputs: Tuple[str, ...]):
    return kernels.build(name, inputs, outputs, f"{name}.metal", _HEADERS)


def tiles_for(head_dim: int, dtype) -> TileSet:
    """The tiles of ``head_dim`` for ``dtype`` inputs (``TILES``, or
    ``FLOAT32_TILES`` for float32), checked against Metal's limits."""
    if dtype == mx.float32:
        tiles = FLOAT32_TILES[head_dim]
        tiles.check(head_dim, 4)
    else:
        tiles = TILES[head_dim]
        tiles.check(head_dim)
    return tiles


def dispatch_tiles(stage: str, q, k, v) -> Tuple[int, int]:
    """``(rows, inner)`` of ``stage``'s launch for ``mlx_flash.dispatch``:
    positions per tile along the grid's x axis (queries; keys for dK/dV)
    and per tile of the loop inside."""
    tiles = tiles_for(q.shape[-1], q.dtype)
    if stage == "dkdv":
        return tiles.dkdv[1], tiles.dkdv[0]
    return getattr(tiles, stage)


# MLX passes an input of fewer than 8 elements in the constant address space
# and a larger one in device memory, and the source it generates (so the
# pipeline compiled from it) says which. Small inputs get padding the kernels
# never read, so that one source per dtype, head dim and tile shape serves
# every mask layout and size: the axis to pad for each input that can be small.
_MIN_DEVICE_SIZE = 8
_PAD_AXIS = {
    "mask_array": 3,
    "q_segments": 1,
    "k_segments": 1,
    "q_ranges": 1,
    "k_ranges": 1,
    "sinks": 0,
    "lse": 2,
    "delta": 2,
}


def _in_device_memory(name: str, x: mx.array) -> mx.array:
    """``x``, padded to at least 8 elements if it is smaller (see above)."""
    if x.size >= _MIN_DEVICE_SIZE or name not in _PAD_AXIS:
        return x
    axis = _PAD_AXIS[name]
    if name == "mask_array" and x.shape[axis] == 1:
        # A broadcast key axis stays one (zero-stride) element for every key.
        return mx.broadcast_to(x, x.shape[:3] + (_MIN_DEVICE_SIZE,))
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, _MIN_DEVICE_SIZE)
    return mx.pad(x, widths)


def _query_grid(call: AttentionCall, tile: Tuple[int, int], heads: int):
    """Grid and threadgroup of the forward and dQ kernels: one threadgroup of
    ``h * BQ / 8`` SIMD groups per (query tile, ``h`` query heads, batch),
    ``h = fused.heads_per_tile(group, heads)``; the grid counts threads."""
    B, n_q_heads, q_len, _ = call.q.shape
    h = fused.heads_per_tile(call.group, heads)
    threads = h * tile[0] // 8 * 32
    return (math.ceil(q_len / tile[0]) * threads, n_q_heads // h, B), (threads, 1, 1)


def _key_grid(k, tile: Tuple[int, int]):
    """Grid and threadgroup of the dK/dV kernel: one threadgroup of BK / 8
    SIMD groups per (key tile, KV head, batch)."""
    B, n_kv_heads, k_len, _ = k.shape
    threads = tile[1] // 8 * 32
    return (math.ceil(k_len / tile[1]) * threads, n_kv_heads, B), (threads, 1, 1)


def _run(name: str, outputs, call: AttentionCall, tile: Tuple[int, int], grid, output_shapes):
    """Launch ``metal/<name>.metal`` on ``kernel_inputs`` of ``call`` for
    ``tile``, in the pieces ``mlx_flash.dispatch`` plans; every output is in
    ``q``'s dtype except the forward's lse."""
    q = call.q
    names = fused.input_names(call)
    inputs = fused.kernel_inputs(call, q_tile=tile[0], k_tile=tile[1])
    stage = {"demo_forward": "forward", "demo_backward_dq": "dq", "demo_backward_dkv": "dkdv"}[name]
    plan = dispatch.split(stage, "demo", q, call.k, call.v, call.mask, *dispatch_tiles(stage, q, call.k, call.v))
    return dispatch.launch(
        _kernel(name, names, outputs),
        plan,
        inputs=[_in_device_memory(n, x) for n, x in zip(names, inputs)],
        template=[("T", q.dtype), ("D", q.shape[-1]), ("BQ", tile[0]), ("BK", tile[1])],
        grid=grid[0],
        threadgroup=grid[1],
        output_shapes=output_shapes,
        output_dtypes=[mx.float32 if o == "lse" else q.dtype for o in outputs],
    )


def forward(call: AttentionCall):
    """``(out, lse)``: out ``(B, Hq, Lq, D)`` in q's dtype, lse ``(B, Hq, Lq)``
    float32, natural log, ``+inf`` for rows that keep no key."""
    q = call.q
    tiles = tiles_for(q.shape[-1], q.dtype)
    grid = _query_grid(call, tiles.forward, tiles.heads)
    out, lse = _run("demo_forward", ("out", "lse"), call, tiles.forward, grid, [q.shape, q.shape[:3]])
    return out, lse


def dkdv(call: AttentionCall):
    """``(dk, dv)``, each ``(B, Hkv, Lk, D)`` in q's dtype."""
    tile = tiles_for(call.q.shape[-1], call.q.dtype).dkdv
    dk, dv = _run("demo_backward_dkv", ("dk", "dv"), call, tile, _key_grid(call.k, tile), [call.k.shape, call.v.shape])
    return dk, dv


def dq(call: AttentionCall):
    """``dq``, ``(B, Hq, Lq, D)`` in q's dtype."""
    tiles = tiles_for(call.q.shape[-1], call.q.dtype)
    grid = _query_grid(call, tiles.dq, tiles.heads)
    (grad_q,) = _run("demo_backward_dq", ("dq",), call, tiles.dq, grid, [call.q.shape])
    return grad_q
