"""The ``demo`` variant: flash attention on ``simdgroup_matrix`` tiles.

Same contract and custom-op wrapping as ``practical`` (see
``mlx_flash.fused``); a different engine inside. Every product (``S = Q K^T``
and ``O += P V`` forward; ``dV += P^T dO``, ``dP = dO V^T``, ``dQ += dS K``,
``dK += dS^T Q`` backward) is an 8x8 ``simdgroup_multiply_accumulate`` with
half or bfloat16 operands and float32 accumulators that stay in registers.
The kernels are ``metal/demo_forward.metal``, ``metal/demo_backward_dq.metal``
and ``metal/demo_backward_dkv.metal`` with ``metal/demo_common.h``.

The demo kernels take the shapes that matter for fine-tuning: head dims 64,
80, 96 and 128 with ``Dv == D``, float16 and bfloat16, every mask kind, GQA,
any length. ``unsupported_reason`` says why anything else goes to
``practical``; ``mlx_flash.explain`` reports it.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx

from . import fused, kernels

#: Head dims the demo kernels are built for (``D == Dv``).
HEAD_DIMS = (64, 80, 96, 128)

#: Metal's limits per threadgroup on Apple GPUs: threadgroup memory in bytes
#: and threads.
MAX_THREADGROUP_BYTES = 32 * 1024
MAX_THREADS = 1024

#: Input dtypes the demo kernels run. float32 goes to ``practical``: float32
#: operands double the threadgroup memory of every tile and halve what fits.
DTYPES = (mx.float16, mx.bfloat16)


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the three demo kernels for one head dim.

    Every tile size is a multiple of 8 (one ``simdgroup_matrix``). A SIMD
    group owns 8 rows (queries, or keys in the dK/dV kernel) of its
    threadgroup's tile, so the threadgroup has ``rows / 8`` SIMD groups.

    * ``forward = (BQ, BK)``: BQ query rows per threadgroup, BK keys per
      staged K/V tile.
    * ``dq = (BQ, BK)``: the same for the dQ kernel.
    * ``dkv = (BQ, BK)``: BK keys per threadgroup, BQ queries per staged
      q/dout tile.

    Budgets, for ``LD = D + 8`` elements per staged row (2 bytes each):

    * threadgroup memory, at most 32 KB: forward ``max(BQ, 2 BK) * LD * 2``;
      dq and dkv ``2 * max(BQ, BK) * LD * 2`` (dkv adds ``8 * BQ``). Less
      memory per threadgroup leaves room for more threadgroups per core.
    * registers, in 32-bit words per lane (an 8x8 fragment is 2 elements per
      lane: 1 word in half, 2 in float): forward ``3 D/8 + 3 BK/8``;
      dq ``4 D/8 + 5 BK/8``; dkv ``6 D/8 + 6 BQ/8``. Fewer live registers
      keep more SIMD groups resident to hide memory latency, so the largest
      head dim gets the shorter inner tile.
    * 4 SIMD groups (128 threads) per threadgroup: each staged tile is read
      by 4 SIMD groups, and the grid still has ``L / 32`` threadgroups per
      head to fill the GPU at fine-tuning lengths.

    These are starting points chosen by those budgets, not by measurement on
    a Mac. To retune, assign ``mlx_flash.demo.TILES[dim] = Tiles(...)`` (it
    is read and checked against Metal's limits at every launch) and time it
    with ``python -m mlx_flash.bench``.
    """

    forward: Tuple[int, int]
    dq: Tuple[int, int]
    dkv: Tuple[int, int]

    def __post_init__(self):
        for name in ("forward", "dq", "dkv"):
            sizes = getattr(self, name)
            if len(sizes) != 2 or any(s <= 0 or s % 8 for s in sizes):
                raise ValueError(f"{name} tile sizes must be two positive multiples of 8, got {sizes}")
        for name, threads in self.threads().items():
            if threads > MAX_THREADS:
                raise ValueError(
                    f"demo {name} tile {getattr(self, name)} needs {threads} threads per "
                    f"threadgroup; Metal allows at most {MAX_THREADS}"
                )

    def threads(self) -> dict:
        """Threads per threadgroup of each kernel: 32 per SIMD group, one SIMD
        group per 8 rows it owns (queries, or keys in dkv)."""
        return {
            "forward": self.forward[0] // 8 * 32,
            "dq": self.dq[0] // 8 * 32,
            "dkv": self.dkv[1] // 8 * 32,
        }

    def threadgroup_bytes(self, head_dim: int) -> dict:
        """Threadgroup memory of each kernel at ``head_dim``, in bytes (at most
        32 KB on Apple GPUs)."""
        row = (head_dim + 8) * 2
        forward_bq, forward_bk = self.forward
        dq_bq, dq_bk = self.dq
        dkv_bq, dkv_bk = self.dkv
        return {
            "forward": max(forward_bq, 2 * forward_bk) * row,
            "dq": 2 * max(dq_bq, dq_bk) * row,
            "dkv": 2 * max(dkv_bq, dkv_bk) * row + 8 * dkv_bq,
        }

    def check(self, head_dim: int):
        """Raise ValueError if a kernel would need more threadgroup memory at
        ``head_dim`` than Metal allows (the pipeline would fail to build)."""
        for name, size in self.threadgroup_bytes(head_dim).items():
            if size > MAX_THREADGROUP_BYTES:
                raise ValueError(
                    f"demo {name} tile {getattr(self, name)} at head dim {head_dim} needs "
                    f"{size} bytes of threadgroup memory; Metal allows at most "
                    f"{MAX_THREADGROUP_BYTES}"
                )


# Budgets per kernel (threadgroup memory; registers per lane), from the
# formulas above:
#   D    forward         dq              dkv
#   64    9 KB;  36      9 KB;  52       9 KB;  72
#   80   11 KB;  42     11 KB;  60      11 KB;  84
#   96   13 KB;  48     13 KB;  68      13 KB;  96
#   128  17 KB;  60     17 KB;  74      17 KB; 108
# At D = 128 the backward kernels take a 16-wide inner tile (dq BK, dkv BQ):
# 32 would cost 84 and 120 registers per lane.
TILES = {
    64: Tiles(forward=(32, 32), dq=(32, 32), dkv=(32, 32)),
    80: Tiles(forward=(32, 32), dq=(32, 32), dkv=(32, 32)),
    96: Tiles(forward=(32, 32), dq=(32, 32), dkv=(32, 32)),
    128: Tiles(forward=(32, 32), dq=(32, 16), dkv=(16, 32)),
}


def unsupported_reason(q, k, v, mask) -> Optional[str]:
    """Why the demo kernels cannot run these (normalised) inputs, or None."""
    if q.dtype not in DTYPES:
        return f"{_dtype_name(q.dtype)} inputs: demo runs float16 and bfloat16"
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


def _common_inputs(q, k, v, scale, mask: fused.MaskSpec):
    params = mx.array([q.shape[2], k.shape[2], q.shape[1], k.shape[1]], dtype=mx.int32)
    fparams = mx.array([scale], dtype=mx.float32)
    return [q, k, v, mask.array, params, fparams]


def _template(q, rows: int, cols: int, mask: fused.MaskSpec):
    return [("T", q.dtype), ("D", q.shape[-1]), ("BQ", rows), ("BK", cols), ("MASK", mask.kind)]


def _tiles(head_dim: int) -> Tiles:
    tiles = TILES[head_dim]
    tiles.check(head_dim)
    return tiles


def _grid(n_rows: int, tile_rows: int, heads: int, batch: int):
    """Grid and threadgroup for one threadgroup of ``tile_rows / 8`` SIMD
    groups per (tile of ``n_rows``, head, batch); the grid counts threads."""
    threads = (tile_rows // 8) * 32
    tiles = -(-n_rows // tile_rows)
    return (tiles * threads, heads, batch), (threads, 1, 1)


# Kernel input names, in the order of ``_common_inputs``. The mask is
# ``mask_array`` so that ``k_shape`` never occurs inside ``mask_shape`` (MLX
# would give k an unused shape buffer; see metal/flash_common.h).
_FORWARD_INPUTS = ("q", "k", "v", "mask_array", "params", "fparams")


def forward(q, k, v, scale: float, mask: fused.MaskSpec):
    """``(out, lse)``: out ``(B, Hq, Lq, D)`` in q's dtype, lse ``(B, Hq, Lq)``
    float32 in log2 units (read only by the demo backward kernels)."""
    B, n_q_heads, q_len, head_dim = q.shape
    bq, bk = _tiles(head_dim).forward
    grid, threadgroup = _grid(q_len, bq, n_q_heads, B)
    kernel = _kernel("demo_forward", _FORWARD_INPUTS, ("out", "lse"))
    out, lse = kernels.launch(
        kernel,
        inputs=_common_inputs(q, k, v, scale, mask),
        template=_template(q, bq, bk, mask),
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[q.shape, (B, n_q_heads, q_len)],
        output_dtypes=[q.dtype, mx.float32],
    )
    return out, lse


_BACKWARD_INPUTS = _FORWARD_INPUTS + ("dout", "lse", "delta")


def dkdv(q, k, v, scale: float, mask: fused.MaskSpec, dout, lse, delta):
    """``(dk, dv)``, each ``(B, Hkv, Lk, D)`` in q's dtype."""
    B, n_kv_heads, k_len, head_dim = k.shape
    bq, bk = _tiles(head_dim).dkv
    grid, threadgroup = _grid(k_len, bk, n_kv_heads, B)
    kernel = _kernel("demo_backward_dkv", _BACKWARD_INPUTS, ("dk", "dv"))
    dk, dv = kernels.launch(
        kernel,
        inputs=_common_inputs(q, k, v, scale, mask) + [dout, lse, delta],
        template=_template(q, bq, bk, mask),
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[k.shape, v.shape],
        output_dtypes=[q.dtype, q.dtype],
    )
    return dk, dv


def dq(q, k, v, scale: float, mask: fused.MaskSpec, dout, lse, delta):
    """``dq``, ``(B, Hq, Lq, D)`` in q's dtype."""
    B, n_q_heads, q_len, head_dim = q.shape
    bq, bk = _tiles(head_dim).dq
    grid, threadgroup = _grid(q_len, bq, n_q_heads, B)
    kernel = _kernel("demo_backward_dq", _BACKWARD_INPUTS, ("dq",))
    (grad_q,) = kernels.launch(
        kernel,
        inputs=_common_inputs(q, k, v, scale, mask) + [dout, lse, delta],
        template=_template(q, bq, bk, mask),
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[q.shape],
        output_dtypes=[q.dtype],
    )
    return grad_q


LAUNCHERS = fused.Launchers(forward=forward, dkdv=dkdv, dq=dq)


def attention(q, k, v, scale: float, mask) -> mx.array:
    """``softmax(scale * q @ k^T + mask) @ v`` on the demo kernels, with the
    fused backward under ``mx.grad``.

    Args:
        q: ``(B, Hq, Lq, D)``; ``k``: ``(B, Hkv, Lk, D)``; ``v``:
            ``(B, Hkv, Lk, D)``, one dtype, float16 or bfloat16, ``D`` one of
            ``HEAD_DIMS``.
        scale: multiplies ``q @ k^T``.
        mask: ``None``, ``"causal"`` (``Lq <= Lk``, bottom-right) or a rank-4
            boolean / additive array broadcastable to ``(B, Hq, Lq, Lk)``.

    Returns:
        ``(B, Hq, Lq, D)`` in q's dtype.
    """
    return fused.attention(LAUNCHERS, q, k, v, scale, mask)
