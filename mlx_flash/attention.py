"""The public attention op: argument checks, mask normalisation, variant dispatch.

``scaled_dot_product_attention`` is a drop-in replacement for
``mx.fast.scaled_dot_product_attention`` (MLX 0.32): same arguments, same
errors, same results on the edge cases. What it adds is the choice of
implementation (``variant=``) and ``explain()``, which says which one would
run for given inputs and why.

Implementations behind the dispatch see normalised inputs: ``q``, ``k``, ``v``
rank 4 in one floating dtype; ``mask`` is ``None``, ``"causal"`` with
``Lq <= Lk``, or a rank-4 array that is boolean or of that dtype and is
broadcastable to ``(B, Hq, Lq, Lk)`` (size-1 axes kept, never materialised).
Rows that keep no key at all (bottom-right causal with ``Lq > Lk``, or a
boolean mask row of all False) are answered here with MLX's uniform weights,
so what an implementation returns for them is never used.
"""

import difflib
from dataclasses import dataclass, replace
from typing import Optional, Union

import mlx.core as mx

from . import blockwise, kernels, reference

#: Every name ``variant=`` accepts.
VARIANTS = ("auto", "manual", "mlx", "blockwise", "practical", "demo")

#: Queries at most this long are decoding steps: ``auto`` sends them to MLX's
#: own fused inference kernel, which is built for exactly that case.
DECODE_MAX_QUERIES = 8

Mask = Union[None, str, mx.array]


@dataclass(frozen=True)
class Plan:
    """What ``scaled_dot_product_attention`` would run.

    ``implementation`` is one of ``manual``, ``mlx``, ``blockwise``,
    ``practical``, ``demo``; ``backend`` says where it runs: ``"mlx ops"``
    (plain MLX operations on the default device), ``"metal"`` or
    ``"emulator"`` (Metal kernels on the CPU emulator).
    """

    variant: str
    implementation: str
    backend: str
    reason: str
    #: How mlx-lm's attention is patched (``str(mlx_flash.patch_state())``);
    #: filled in by ``explain``.
    patch: str = ""

    @property
    def summary(self) -> str:
        """One line: what runs, where, and why."""
        return f"{self.implementation} ({self.backend}): {self.reason}"

    def __str__(self) -> str:
        return f"{self.summary}\n{self.patch}" if self.patch else self.summary


def check_variant(variant: str, where: str = "scaled_dot_product_attention") -> str:
    """Return ``variant`` if it is one of ``VARIANTS``, else raise a
    ``ValueError`` that names ``where`` it came from and suggests the closest."""
    if variant in VARIANTS:
        return variant
    close = difflib.get_close_matches(str(variant), VARIANTS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(
        f"[{where}] unknown variant '{variant}'{hint}. Choose one of {', '.join(VARIANTS)}."
    )


def _fail(message: str):
    raise ValueError(f"[scaled_dot_product_attention] {message}")


def _check_inputs(q, k, v, mask, sinks) -> mx.Dtype:
    """Raise the ``ValueError`` MLX raises for bad input; return the output dtype."""
    for x in (q, k, v):
        if x.ndim != 4:
            _fail(f"input with shape {tuple(x.shape)} expected to be rank 4")
    if isinstance(mask, str) and mask != "causal":
        _fail(f"invalid mask option '{mask}'. Must be 'causal', or an array.")
    if mask is not None and not isinstance(mask, (str, mx.array)):
        _fail(f"mask must be None, 'causal' or an array, not {type(mask).__name__}.")
    if isinstance(mask, mx.array) and mask.ndim > 4:
        _fail(f"the mask with shape {tuple(mask.shape)} expected to have at most rank 4.")
    for x in (k, v):
        if x.shape[0] != q.shape[0]:
            _fail(f"mismatching batch dimension for input with shape {tuple(x.shape)}.")
    if q.shape[-1] != k.shape[-1]:
        _fail(
            "query, keys expected to have matching last dimension; found query "
            f"shape {tuple(q.shape)} for keys shape {tuple(k.shape)}."
        )
    if k.shape[1] != v.shape[1]:
        _fail(
            "keys, values expected to have matching n_kv_heads; found keys with "
            f"n_heads {k.shape[1]} for values with n_heads {v.shape[1]}."
        )
    if k.shape[2] != v.shape[2]:
        _fail(
            "keys, values expected to have the same sequence length; found keys "
            f"shape {tuple(k.shape)} for values shape {tuple(v.shape)}."
        )
    if q.shape[1] % k.shape[1] != 0:
        _fail(
            f"n_heads must be a multiple of n_kv_heads, found n_heads {q.shape[1]} "
            f"for n_kv_heads {k.shape[1]}."
        )
    dtype = mx.result_type(q, k, v)
    if not mx.issubdtype(dtype, mx.floating):
        _fail(f"Received unsupported type {dtype}.")
    if isinstance(mask, mx.array):
        if mx.result_type(mask.dtype, dtype) != dtype:
            _fail(f"Mask type must promote to output type {dtype}.")
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            shape = mx.broadcast_shapes(tuple(mask.shape), target)
        except ValueError:
            shape = None
        if shape != target:
            _fail(
                f"mask with shape {tuple(mask.shape)} cannot be broadcast to the "
                f"scores shape {target}."
            )
    if sinks is not None:
        if mx.result_type(sinks.dtype, dtype) != dtype:
            _fail(f"Type of sinks must promote to output type {dtype}.")
        if sinks.ndim != 1 or sinks.shape[0] != q.shape[1]:
            _fail(f"Received invalid shape for sinks {tuple(sinks.shape)}.")
    return dtype


def _normalise_mask(mask: Mask, dtype: mx.Dtype) -> Mask:
    """Rank-4 mask view, boolean or in ``dtype``; strings and None pass through."""
    if not isinstance(mask, mx.array):
        return mask
    if mask.dtype != mx.bool_:
        mask = mask.astype(dtype)
    while mask.ndim < 4:
        mask = mx.expand_dims(mask, 0)
    return mask


def _fused_unsupported(implementation: str, q, k, v, mask) -> Optional[str]:
    """Why the Metal ``implementation`` cannot run these inputs, or None."""
    if implementation == "practical":
        from . import practical as module
    else:
        from . import demo as module
    return module.unsupported_reason(q, k, v, mask)


def plan(q, k, v, *, mask: Mask = None, sinks=None, variant: str = "auto") -> Plan:
    """Choose the implementation for already-checked inputs (see ``explain``)."""
    check_variant(variant)
    if variant == "manual":
        return Plan(variant, "manual", "mlx ops", "requested")
    if variant == "mlx":
        return Plan(variant, "mlx", "mlx ops", "requested: mx.fast.scaled_dot_product_attention")
    if sinks is not None:
        return Plan(
            variant,
            "mlx",
            "mlx ops",
            f"{variant} does not support attention sinks: using mx.fast.scaled_dot_product_attention",
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        return Plan(variant, "mlx", "mlx ops", "empty sequence: nothing to tile")
    if variant == "blockwise":
        return Plan(variant, "blockwise", "mlx ops", "requested")

    if variant == "auto" and q.shape[2] <= DECODE_MAX_QUERIES:
        return Plan(
            variant,
            "mlx",
            "mlx ops",
            f"{q.shape[2]} queries (at most {DECODE_MAX_QUERIES}, as in decoding): "
            "MLX's fused kernel is the fastest there and its memory is already O(L)",
        )

    if kernels.backend() is None:
        return Plan(variant, "blockwise", "mlx ops", "Metal is not available on this machine: using blockwise")
    candidates = ("demo", "practical") if variant in ("auto", "demo") else ("practical",)
    reasons = []
    for name in candidates:
        why_not = _fused_unsupported(name, q, k, v, mask)
        if why_not is None:
            reason = "requested" if name == variant else f"fastest supported ({'; '.join(reasons) or 'auto'})"
            return Plan(variant, name, kernels.backend(), reason)
        reasons.append(f"{name}: {why_not}")
    return Plan(variant, "blockwise", "mlx ops", "; ".join(reasons) + ": using blockwise")


def explain(q, k, v, *, mask: Mask = None, sinks=None, variant: str = "auto") -> Plan:
    """Which implementation ``scaled_dot_product_attention`` would run, and why.

    Takes the same arguments (``scale`` is not needed) and raises the same
    errors. ``str()`` of the result reads like::

        blockwise (mlx ops): Metal is not available on this machine: using blockwise
        mlx-lm attention is not patched
    """
    from .patch import patch_state

    _check_inputs(q, k, v, mask, sinks)
    chosen = plan(q, k, v, mask=mask, sinks=sinks, variant=variant)
    return replace(chosen, patch=str(patch_state()))


def _run(implementation: str, q, k, v, scale: float, mask: Mask) -> mx.array:
    if implementation == "blockwise":
        return blockwise.attention(q, k, v, scale, mask)
    if implementation == "practical":
        from . import practical

        return practical.attention(q, k, v, scale, mask)
    from . import demo

    return demo.attention(q, k, v, scale, mask)


def _uniform_rows(v: mx.array, n_q_heads: int, n_rows: int) -> mx.array:
    """``(B, Hq, n_rows, Dv)`` mean of ``v`` over keys: the output of a row
    whose mask keeps nothing (MLX gives such rows uniform weights)."""
    B, n_kv_heads, _, dv = v.shape
    mean = mx.mean(v.astype(mx.float32), axis=2, keepdims=True).astype(v.dtype)
    mean = mx.expand_dims(mean, 2)  # (B, Hkv, 1, 1, Dv)
    groups = n_q_heads // n_kv_heads
    mean = mx.broadcast_to(mean, (B, n_kv_heads, groups, n_rows, dv))
    return mean.reshape(B, n_q_heads, n_rows, dv)


def scaled_dot_product_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    mask: Mask = None,
    sinks: Optional[mx.array] = None,
    variant: str = "auto",
) -> mx.array:
    """``softmax(scale * q @ k^T + mask) @ v``, exactly as MLX computes it.

    Args:
        q: ``(B, Hq, Lq, D)``.
        k: ``(B, Hkv, Lk, D)``, ``Hq % Hkv == 0`` (GQA and MQA share KV heads).
        v: ``(B, Hkv, Lk, Dv)``.
        scale: multiplies the scores, usually ``D ** -0.5``.
        mask: ``None``, ``"causal"`` (bottom-right aligned when ``Lq != Lk``)
            or an array broadcastable to ``(B, Hq, Lq, Lk)``, boolean
            (True keeps) or additive.
        sinks: optional ``(Hq,)`` attention-sink logits.
        variant: one of ``VARIANTS``; ``explain()`` says what it resolves to.

    Returns:
        ``(B, Hq, Lq, Dv)`` in the promoted dtype of ``q``, ``k``, ``v``.
    """
    dtype = _check_inputs(q, k, v, mask, sinks)
    chosen = plan(q, k, v, mask=mask, sinks=sinks, variant=variant)
    if chosen.implementation == "mlx":
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)

    q, k, v = (x.astype(dtype) for x in (q, k, v))
    if chosen.implementation == "manual":
        return reference.attention(q, k, v, scale, mask, sinks)

    mask = _normalise_mask(mask, dtype)
    q_len, k_len = q.shape[2], k.shape[2]
    if isinstance(mask, str) and q_len > k_len:
        # Bottom-right causal leaves the first Lq - Lk queries with no key at
        # all; MLX gives those rows uniform weights. Split them off so the
        # fused kernels only ever see causal with Lq <= Lk.
        n_empty = q_len - k_len
        empty = _uniform_rows(v, q.shape[1], n_empty)
        if k_len == 0:
            return empty
        rest = _run(chosen.implementation, q[:, :, n_empty:], k, v, scale, mask)
        return mx.concatenate([empty, rest], axis=2)
    out = _run(chosen.implementation, q, k, v, scale, mask)
    if isinstance(mask, mx.array) and mask.dtype == mx.bool_:
        # A row whose boolean mask keeps nothing gets uniform weights in MLX.
        # Tiled implementations keep only a float32 log-sum-exp per row, which
        # cannot carry that case exactly through the backward, so such rows
        # are answered here; the where() also stops their gradient from
        # reaching the implementation.
        keeps_any = mx.any(mask, axis=-1, keepdims=True)
        out = mx.where(keeps_any, out, _uniform_rows(v, q.shape[1], q_len))
    return out
