"""The ``practical`` variant: portable Metal flash-attention kernels.

Forward (metal/practical_forward.metal) and FlashAttention-2 backward
(metal/practical_backward_dkdv.metal, metal/practical_backward_dq.metal),
joined into one differentiable op by ``mlx_flash.fused``. Every product is
float32 arithmetic on registers with ``simd_sum`` reductions (no
``simdgroup_matrix``), so the kernels run on every Apple GPU and every shape:
any lengths, head dims up to 256, ``Dv != D``, GQA/MQA, every mask kind.

Tile sizes (template constants, chosen by ``tile_sizes``):

* ``NSG = 4`` simdgroups, 128 threads per threadgroup: each staged tile is
  read by four simdgroups, and a threadgroup this small leaves the GPU free
  to keep several resident per core, so one waiting on device memory is
  covered by another that computes.
* Lanes split the head dimension (``ceil(D / 32)`` elements each). A
  simdgroup owns ``R`` query rows (forward, dQ) or ``KPS`` keys (dK/dV), with
  their accumulators in registers. ``R = KPS = 4`` while a lane holds at most
  4 elements of a row, 2 beyond (``D > 128``): that keeps the per-thread
  arrays to about 64 floats (dK/dV keeps K, V, dK and dV of its keys), small
  enough to stay in registers with room for the compiler. More rows per
  simdgroup would share each staged tile further but risk spilling, and the
  fewer registers a thread needs the more simdgroups a core keeps resident.
* The staged tile (``BK`` keys of K and V, or ``BQ`` rows of Q and dO) is
  float32, rows padded to a multiple of 32. Its row count is the largest of
  32, 16, 8 that keeps it within 16 KB, half of the 32 KB of threadgroup
  memory Metal allows one threadgroup: less memory per threadgroup can only
  help the GPU keep more of them resident (how many a core holds is not
  documented, and was not measured). At head dims up to 256 an 8-row tile
  always fits. The forward spreads a tile's scores one key per lane, so a
  tile has at most 32 rows.
"""

from typing import Optional

import mlx.core as mx

from . import fused, kernels

#: Largest head dim (``D`` and ``Dv``) the kernels take.
MAX_HEAD_DIM = 256

#: Simdgroups per threadgroup.
SIMDGROUPS = 4

#: Bytes of threadgroup memory a kernel's staged tile may use.
TILE_BYTES = 16 * 1024

_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
_HEADERS = ("flash_common.h",)


def tile_sizes(head_dim: int, value_dim: int) -> dict:
    """Template constants for head dims ``head_dim`` (D) and ``value_dim`` (Dv).

    Returns ``rows`` (R: query rows per simdgroup in the forward and dQ
    kernels, and KPS: keys per simdgroup in the dK/dV kernel) and ``tile``
    (BK: keys per staged K/V tile, and BQ: rows per staged Q/dO tile).
    """
    per_lane = max(-(-head_dim // 32), -(-value_dim // 32))
    rows = 4 if per_lane <= 4 else 2
    padded = 32 * (-(-head_dim // 32) + -(-value_dim // 32))
    for tile in (32, 16, 8):
        if tile * padded * 4 <= TILE_BYTES:
            return {"rows": rows, "tile": tile}
    raise ValueError(
        f"head dims {head_dim} and {value_dim}: even an 8-row tile needs "
        f"{8 * padded * 4} bytes of threadgroup memory, over the {TILE_BYTES} "
        f"practical allows (head dims up to {MAX_HEAD_DIM})"
    )


def unsupported_reason(q, k, v, mask) -> Optional[str]:
    """Why these (normalised) inputs cannot run on the practical kernels, or None."""
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} is not float32, float16 or bfloat16"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if v.shape[-1] > MAX_HEAD_DIM:
        return f"value head dim {v.shape[-1]} > {MAX_HEAD_DIM}"
    if k.shape[2] == 0:
        return "no keys"
    return None


def _params(q, k, scale: float, mask: fused.MaskSpec):
    B, n_q_heads, q_len, _ = q.shape
    n_kv_heads, k_len = k.shape[1], k.shape[2]
    params = mx.array([q_len, k_len, n_q_heads, n_kv_heads, mask.kind], dtype=mx.int32)
    lowest = float(mx.finfo(q.dtype).min)
    fparams = mx.array([scale, lowest], dtype=mx.float32)
    return params, fparams


def _template(q, v, extra: dict):
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    return [("T", q.dtype), ("D", head_dim), ("DV", value_dim), ("NSG", SIMDGROUPS)] + list(
        extra.items()
    )


def forward(q, k, v, scale: float, mask: fused.MaskSpec):
    """``(o, lse)``: ``(B, Hq, Lq, Dv)`` in ``q``'s dtype and ``(B, Hq, Lq)`` float32."""
    B, n_q_heads, q_len, _ = q.shape
    value_dim = v.shape[-1]
    sizes = tile_sizes(q.shape[-1], value_dim)
    block_rows = SIMDGROUPS * sizes["rows"]
    kernel = kernels.build(
        "flash_practical_forward",
        ("q", "k", "v", "mask_array", "params", "fparams"),
        ("o", "lse"),
        "practical_forward.metal",
        _HEADERS,
    )
    params, fparams = _params(q, k, scale, mask)
    n_tiles = -(-q_len // block_rows)
    return kernels.launch(
        kernel,
        inputs=[q, k, v, mask.array, params, fparams],
        template=_template(q, v, {"R": sizes["rows"], "BK": sizes["tile"]}),
        grid=(32 * SIMDGROUPS * n_tiles, n_q_heads, B),
        threadgroup=(32 * SIMDGROUPS, 1, 1),
        output_shapes=[(B, n_q_heads, q_len, value_dim), (B, n_q_heads, q_len)],
        output_dtypes=[q.dtype, mx.float32],
    )


def dkdv(q, k, v, scale: float, mask: fused.MaskSpec, dout, lse, delta):
    """``(dk, dv)`` with the shapes and dtype of ``k`` and ``v``."""
    B, n_kv_heads, k_len, head_dim = k.shape
    value_dim = v.shape[-1]
    sizes = tile_sizes(head_dim, value_dim)
    block_keys = SIMDGROUPS * sizes["rows"]
    kernel = kernels.build(
        "flash_practical_dkdv",
        ("q", "k", "v", "mask_array", "dout", "lse", "delta", "params", "fparams"),
        ("dk", "dv"),
        "practical_backward_dkdv.metal",
        _HEADERS,
    )
    params, fparams = _params(q, k, scale, mask)
    n_tiles = -(-k_len // block_keys)
    return kernels.launch(
        kernel,
        inputs=[q, k, v, mask.array, dout, lse, delta, params, fparams],
        template=_template(q, v, {"KPS": sizes["rows"], "BQ": sizes["tile"]}),
        grid=(32 * SIMDGROUPS * n_tiles, n_kv_heads, B),
        threadgroup=(32 * SIMDGROUPS, 1, 1),
        output_shapes=[tuple(k.shape), tuple(v.shape)],
        output_dtypes=[q.dtype, q.dtype],
    )


def dq(q, k, v, scale: float, mask: fused.MaskSpec, dout, lse, delta):
    """``dq`` with the shape and dtype of ``q``."""
    B, n_q_heads, q_len, head_dim = q.shape
    sizes = tile_sizes(head_dim, v.shape[-1])
    block_rows = SIMDGROUPS * sizes["rows"]
    kernel = kernels.build(
        "flash_practical_dq",
        ("q", "k", "v", "mask_array", "dout", "lse", "delta", "params", "fparams"),
        ("dq",),
        "practical_backward_dq.metal",
        _HEADERS,
    )
    params, fparams = _params(q, k, scale, mask)
    n_tiles = -(-q_len // block_rows)
    return kernels.launch(
        kernel,
        inputs=[q, k, v, mask.array, dout, lse, delta, params, fparams],
        template=_template(q, v, {"R": sizes["rows"], "BK": sizes["tile"]}),
        grid=(32 * SIMDGROUPS * n_tiles, n_q_heads, B),
        threadgroup=(32 * SIMDGROUPS, 1, 1),
        output_shapes=[tuple(q.shape)],
        output_dtypes=[q.dtype],
    )[0]


#: The practical kernel family, as ``mlx_flash.fused`` takes it.
LAUNCHERS = fused.Launchers(forward=forward, dkdv=dkdv, dq=dq)


def attention(q, k, v, scale: float, mask) -> mx.array:
    """Practical fused attention on normalised inputs (see ``mlx_flash.attention``).

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``,
            one dtype among float32, float16, bfloat16, head dims <= 256.
        scale: multiplies ``q @ k^T``.
        mask: ``None``, ``"causal"`` (``Lq <= Lk``) or a rank-4 boolean or
            additive array broadcastable to ``(B, Hq, Lq, Lk)``.

    Returns:
        ``(B, Hq, Lq, Dv)`` in ``q``'s dtype.
    """
    if q.shape[2] == 0:
        return mx.zeros((*q.shape[:3], v.shape[-1]), dtype=q.dtype)
    return fused.attention(LAUNCHERS, q, k, v, scale, mask)
