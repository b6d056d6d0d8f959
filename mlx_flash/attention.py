"""The public attention op: argument checks, mask normalisation, variant dispatch.

``scaled_dot_product_attention`` is a drop-in replacement for
``mx.fast.scaled_dot_product_attention`` (MLX 0.32.4): same arguments
(``stream=`` and ``force_fused=`` included), same errors (``TypeError`` for an
argument of the wrong Python type, ``ValueError`` for bad shapes and dtypes),
same results on the edge cases. What it adds is structured masks MLX does
not have (``segment_ids``, ``window``; see ``mlx_flash.masks``), gradients of
sinks, the choice of implementation (``variant=``) and ``plan()``, which says
which one would run for given inputs and why.

It keeps its own reference to MLX's function, taken at import, so assigning
it over ``mx.fast.scaled_dot_product_attention`` works for every variant.

``auto`` decides from this machine's verdicts (``mlx_flash.verdicts``, written
by ``python -m mlx_flash.doctor``): MLX 0.32.4 fuses the backward on Metal
only for no mask or causal without sinks, and falls back to unfused ops for
array masks, segments, windows and sinks, so without timings ``auto`` takes
MLX's op for the former and the Metal kernels for the latter; with timings,
the fastest correct implementation measured here; never a kernel that failed
validation here (see ``_choose_auto``). Requested variants run as requested.

Implementations behind the dispatch see normalised inputs: ``q``, ``k``, ``v``
rank 4 in one floating dtype and a ``StructuredMask`` whose causal rule has
``Lq <= Lk``. They return the output and the row log-sum-exp, ``+inf`` where
a row keeps no key (their output is zero there). What such rows mean is
decided here: zeros with segment ids or sinks (with sinks the sink takes all
the weight, as in MLX), MLX's uniform weights (the mean of ``v``) otherwise.
"""

import contextlib
import difflib
from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import mlx.core as mx

from . import blockwise, families, kernels, masks, reference, verdicts
from .call import AttentionCall
from .masks import StructuredMask
from .text import first_line

#: Every name ``variant=`` accepts: the kernel families follow the MLX-op ones.
VARIANTS = ("auto", "manual", "mlx", "blockwise") + families.names()

#: Queries at most this long are decoding steps: ``auto`` sends them to MLX's
#: own fused inference kernel, which is built for exactly that case.
DECODE_MAX_QUERIES = 8

#: MLX's own op, kept so that this module still reaches it after someone
#: assigns ``mx.fast.scaled_dot_product_attention = <this op>``.
MLX_ATTENTION = mx.fast.scaled_dot_product_attention

Mask = Union[None, str, mx.array]
SegmentIds = Union[None, mx.array, Tuple[mx.array, mx.array]]


@dataclass(frozen=True)
class Plan:
    """What ``scaled_dot_product_attention`` would run.

    ``implementation`` is one of ``manual``, ``mlx``, ``blockwise``,
    ``practical``, ``demo`` (or ``empty``: no query or no key, zeros); ``backend`` says where it runs: ``"mlx ops"``
    (plain MLX operations on the default device), ``"metal"`` or
    ``"emulator"`` (Metal kernels on the CPU emulator). ``mask`` says how the
    mask's structure is handled (empty when there is none).
    """

    variant: str
    implementation: str
    backend: str
    reason: str
    mask: str = ""
    #: How mlx-lm's attention is patched (``str(mlx_flash.patch_state())``);
    #: filled in by ``mlx_flash.explain``.
    patch: str = ""
    #: For the fused kernels, the pieces each launch is split into
    #: (``mlx_flash.dispatch.describe``).
    launches: str = ""

    @property
    def summary(self) -> str:
        """One line: what runs, where, and why (and how the mask is handled)."""
        text = f"{self.implementation} ({self.backend}): {self.reason}"
        text = f"{text}; {self.mask}" if self.mask else text
        return f"{text}; {self.launches}" if self.launches else text

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


def _type_error(name: str, expected: str, value):
    raise TypeError(
        f"[scaled_dot_product_attention] {name} must be {expected}, not {type(value).__name__}."
    )


def _check_inputs(q, k, v, mask, sinks) -> mx.Dtype:
    """Raise the error MLX raises for bad input; return the output dtype."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, mx.array):
            _type_error(name, "an mx.array", x)
    if mask is not None and not isinstance(mask, (str, mx.array)):
        _type_error("mask", "None, 'causal' or an mx.array", mask)
    if sinks is not None and not isinstance(sinks, mx.array):
        _type_error("sinks", "None or an mx.array", sinks)
    for x in (q, k, v):
        if x.ndim != 4:
            _fail(f"input with shape {tuple(x.shape)} expected to be rank 4")
    if isinstance(mask, str) and mask != "causal":
        _fail(f"invalid mask option '{mask}'. Must be 'causal', or an array.")
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
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
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


def _check_ids(name: str, ids, batch: int, length: int, what: str):
    if not isinstance(ids, mx.array):
        _fail(f"{name} must be an mx.array of integer ids, not {type(ids).__name__}.")
    if not mx.issubdtype(ids.dtype, mx.integer):
        _fail(f"{name} must hold integer ids, not {ids.dtype}.")
    if ids.ndim != 2:
        _fail(f"{name} must be (batch, {what}) = {(batch, length)}, got shape {tuple(ids.shape)}.")
    if ids.shape[0] != batch:
        _fail(f"{name} has batch {ids.shape[0]} but the inputs have batch {batch}.")
    if ids.shape[1] != length:
        _fail(f"{name} must be (batch, {what}) = {(batch, length)}, got shape {tuple(ids.shape)}.")


def _check_structure(q, k, mask, segment_ids, window, force_fused, variant):
    """The checks of what MLX does not have: segment ids, window, force_fused."""
    batch, q_len, k_len = q.shape[0], q.shape[2], k.shape[2]
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                _fail(f"segment_ids must be one (B, Lk) array or a (q_ids, k_ids) pair, got {len(segment_ids)} items.")
            _check_ids("segment_ids[0] (query ids)", segment_ids[0], batch, q_len, "Lq")
            _check_ids("segment_ids[1] (key ids)", segment_ids[1], batch, k_len, "Lk")
        else:
            _check_ids("segment_ids", segment_ids, batch, k_len, "Lk")
            if q_len > k_len:
                _fail(
                    f"one segment_ids array covers the keys ({k_len}); with more queries "
                    f"({q_len}) pass a (q_ids, k_ids) pair."
                )
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            _fail(f"window must be a positive int, not {window!r}.")
        if window < 1:
            _fail(f"window must be at least 1, got {window}.")
        if mask is None:
            _fail("window needs mask='causal' (or an array mask): a sliding window is a causal band.")
    if force_fused and variant == "manual":
        _fail("force_fused=True asks for a fused kernel, but variant 'manual' is the unfused reference.")


def _mlx_has_fused_vjp() -> bool:
    """Whether MLX's own fused attention has a backward (MLX >= 0.32.4 on
    Metal, for no mask or a causal one, without sinks)."""
    version = tuple(int(p) for p in mx.__version__.split(".")[:3] if p.isdigit())
    return version >= (0, 32, 4)


def _fused_unsupported(implementation: str, call: AttentionCall) -> Optional[str]:
    """Why the kernel family ``implementation`` cannot run ``call``, or None."""
    return families.get(implementation).unsupported(call.q, call.k, call.v, call.mask)


def _mask_note(mask: StructuredMask, implementation: str, sinks: bool = False) -> str:
    """How ``implementation`` handles what MLX does not have in training
    (segments, windows, the sinks' gradient), for ``explain``."""
    notes = [note for note in (_structure_note(mask, implementation), _sinks_note(implementation, sinks)) if note]
    return "; ".join(notes)


def _structure_note(mask: StructuredMask, implementation: str) -> str:
    if not (mask.has_segments or mask.window is not None):
        return ""
    text = mask.describe()
    if implementation == "manual":
        return f"{text}: dense Lq x Lk mask (the reference)"
    if implementation == "mlx":
        return f"{text}: passed to MLX as a dense Lq x Lk boolean mask"
    if implementation == "empty":
        return ""
    skipped = []
    if mask.causal:
        skipped.append("above the causal diagonal")
    if mask.window is not None:
        skipped.append("outside the window")
    if mask.has_segments and implementation == "blockwise":
        skipped.append(
            "with segment-id ranges that cannot meet (ids read on the host; "
            "inside mx.compile every tile is masked instead)"
        )
    elif mask.has_segments:
        skipped.append("with segment-id ranges that cannot meet (ids read by the kernels)")
    return f"{text}: tiles {' or '.join(skipped)} are skipped; no Lq x Lk mask is built"


def _sinks_note(implementation: str, sinks: bool) -> str:
    if not sinks or implementation == "empty":
        return ""
    if implementation == "manual":
        return "sinks: a column of the reference softmax"
    if implementation == "mlx":
        return "sinks: passed to MLX, whose fused backward does not take them (training runs unfused)"
    return "sinks: start each row's online softmax; their gradient comes from the lse (fused.sink_grad)"


def plan(
    q,
    k,
    v,
    *,
    mask: Mask = None,
    sinks=None,
    segment_ids: SegmentIds = None,
    window: Optional[int] = None,
    variant: str = "auto",
    force_fused: bool = False,
) -> Plan:
    """Choose the implementation for already-checked inputs (see ``explain``)."""
    check_variant(variant)
    structure = masks.build(q.shape[2], k.shape[2], mask, segment_ids, window)
    chosen = _choose(AttentionCall(q, k, v, None, structure, sinks), variant, force_fused)
    note = _mask_note(structure, chosen.implementation, sinks is not None)
    launches = ""
    family = families.REGISTRY.get(chosen.implementation)
    if family is not None and family.dispatch_tiles is not None and q.ndim == 4:
        from . import dispatch

        tiles = lambda stage: family.dispatch_tiles(stage, q, k, v)  # noqa: E731
        launches = dispatch.describe(family.name, tiles, q, k, v, structure)
    return Plan(chosen.variant, chosen.implementation, chosen.backend, chosen.reason, note, launches=launches)


def _choose(call: AttentionCall, variant: str, force_fused: bool = False) -> Plan:
    q, k = call.q, call.k
    if variant == "manual":
        return Plan(variant, "manual", "mlx ops", "requested")
    if variant == "mlx":
        return Plan(variant, "mlx", "mlx ops", "requested: mx.fast.scaled_dot_product_attention")
    if q.shape[0] == 0 or q.shape[2] == 0 or k.shape[2] == 0:
        return Plan(variant, "empty", "mlx ops", "empty input: zeros, as MLX returns")
    if variant == "blockwise":
        return Plan(variant, "blockwise", "mlx ops", "requested")

    backend = kernels.backend()
    # Without Metal, MLX has no fused kernel at all: force_fused rules it out.
    mlx_can_fuse = backend == "metal" or not force_fused
    if variant == "auto" and q.shape[2] <= DECODE_MAX_QUERIES and mlx_can_fuse:
        return Plan(
            variant,
            "mlx",
            "mlx ops",
            f"{q.shape[2]} queries (at most {DECODE_MAX_QUERIES}, as in decoding): "
            "MLX's fused kernel is the fastest there and its memory is already O(L)",
        )

    if backend is None:
        return Plan(variant, "blockwise", "mlx ops", "Metal is not available on this machine: using blockwise")
    if variant == "auto":
        return _choose_auto(call, backend)
    reasons = []
    for name in families.chain(variant):
        why_not = _fused_unsupported(name, call)
        if why_not is None:
            reason = "requested" if name == variant else f"fastest supported ({'; '.join(reasons)})"
            return Plan(variant, name, backend, reason)
        reasons.append(f"{name}: {why_not}")
    return Plan(variant, "blockwise", "mlx ops", "; ".join(reasons) + ": using blockwise")


def _kernel_verdict(name: str, call: AttentionCall, backend: str, verdict) -> Tuple[str, str]:
    """Whether kernel family ``name`` may run this call here: ``("passed",
    "")``, ``("failed", why)``, ``("not run", why)`` (its validation could
    not run here) or ``("unvalidated", why)`` (first-use validation is off).
    A family nobody validated for the call's dtype, head dims and mask kinds
    is validated now, once per verdict key, where first-use validation is on."""
    q, k, v = call.q, call.k, call.v
    kinds = verdicts.kinds_of(call.mask, call.sinks)
    dtype = verdicts.dtype_name(q.dtype)
    state, detail = ("unknown", "") if verdict is None else verdict.status(name, dtype, q.shape[-1], v.shape[-1], kinds)
    if state == "failed":
        return state, f"{name} failed validation on this machine ({detail})"
    if state == "passed":
        return state, ""
    if not verdicts.validation_enabled(backend):
        switch = "MLX_FLASH_VALIDATE=1 turns it on" if backend == "emulator" else "MLX_FLASH_VALIDATE=0"
        return "unvalidated", f"{name}: not validated on this machine (first-use validation off; {switch})"
    from . import validation

    results = validation.first_use(name, q, k, v, kinds, backend)
    for r in results:
        if r.status == "failed":
            unit = f"{dtype} {r.unit.dim}x{r.unit.value_dim} {r.unit.kind}: {r.kernel} kernel"
            return "failed", f"{name} failed validation on this machine ({unit}: {first_line(r.detail)})"
    for r in results:
        if r.status == "not run":
            return "not run", f"{name} could not be validated here ({first_line(r.detail)})"
    return "passed", ""


def _auto_reason(name: str, verdict, ranking, notes) -> str:
    """Why ``auto`` chose ``name``: measured, or the default and what may
    change it; then the candidates it skipped or could not validate."""
    if ranking is not None:
        reason = f"fastest validated on this machine (doctor: {ranking.describe()})"
    else:
        reason = "MLX fuses this mask in training too (its own tiled backward)" if name == "mlx" else "the default here"
        missing = "no doctor verdict on this machine" if verdict is None else "no doctor timing for this case"
        reason += f"; {missing}: running `python -m mlx_flash.doctor` may change the choice"
    return "; ".join([reason] + list(notes))


def _choose_auto(call: AttentionCall, backend: str) -> Plan:
    """``auto`` with Metal kernels available: the fastest validated
    implementation measured on this machine, else the default order.

    The default order is MLX's own op where MLX fuses the backward too (no
    mask or causal, no sinks, Metal, MLX >= 0.32.4), then ``demo``,
    ``practical``, ``blockwise``. Where ``python -m mlx_flash.doctor`` timed
    this mask kind, dtype and head dims (at the length closest to this
    call's), the measured implementations come first, fastest first (MLX's
    op only where it fuses the backward: elsewhere it is O(L^2) memory).
    The op cannot know whether gradients will flow: every call with more
    queries than a decoding step is ranked by forward+backward time, as in
    training. A kernel family that failed validation here is skipped, and
    one nobody validated is validated first (``_kernel_verdict``); a skip
    is named in the reason.
    """
    q, k, v, mask, sinks = call.q, call.k, call.v, call.mask, call.sinks
    mlx_fuses = (
        backend == "metal"
        and mask.array is None
        and not mask.has_segments
        and mask.window is None
        and sinks is None
        and _mlx_has_fused_vjp()
    )
    order = (["mlx"] if mlx_fuses else []) + families.preferred() + ["blockwise"]
    verdict = verdicts.current(backend)
    ranking = None if verdict is None else verdict.ranking(
        verdicts.timing_kind(mask, sinks), q.dtype, q.shape[-1], v.shape[-1], k.shape[2]
    )
    skipped = []
    if ranking is not None:
        if "mlx" in dict(ranking.times) and "mlx" not in order:
            skipped.append("mlx: not a candidate for this mask (MLX's training path is unfused here, O(L^2) memory)")
        ranking = verdicts.Ranking(ranking.row, [(n, t) for n, t in ranking.times if n in order])
        measured = [name for name, _ in ranking.times]
        order = measured + [name for name in order if name not in measured]
        ranking = ranking if measured else None
    for name in order:
        note = ""
        if name in families.REGISTRY:
            why_not = _fused_unsupported(name, call)
            if why_not is not None:
                skipped.append(f"{name}: {why_not}")
                continue
            state, note = _kernel_verdict(name, call, backend, verdict)
            if state in ("failed", "not run"):
                skipped.append(note)
                continue
        backend_of = "mlx ops" if name == "blockwise" else backend
        return Plan("auto", name, backend_of, _auto_reason(name, verdict, ranking, skipped + [note] * bool(note)))
    raise AssertionError("blockwise is always a candidate")


def _normalise(mask: Mask, dtype: mx.Dtype) -> Mask:
    """An array mask boolean or in ``dtype``; strings and None pass through."""
    if isinstance(mask, mx.array) and mask.dtype != mx.bool_:
        return mask.astype(dtype)
    return mask


def _run(implementation: str, call: AttentionCall):
    """``(out, lse)`` of a tiled implementation."""
    if implementation == "blockwise":
        return blockwise.attention(call)
    return families.get(implementation).attention(call)


def _uniform_rows(v: mx.array, n_q_heads: int, n_rows: int) -> mx.array:
    """``(B, Hq, n_rows, Dv)`` mean of ``v`` over keys: the output of a row
    whose mask keeps nothing (MLX gives such rows uniform weights)."""
    B, n_kv_heads, _, dv = v.shape
    mean = mx.mean(v.astype(mx.float32), axis=2, keepdims=True).astype(v.dtype)
    mean = mx.expand_dims(mean, 2)  # (B, Hkv, 1, 1, Dv)
    groups = n_q_heads // n_kv_heads
    mean = mx.broadcast_to(mean, (B, n_kv_heads, groups, n_rows, dv))
    return mean.reshape(B, n_q_heads, n_rows, dv)


def _empty_rows(call: AttentionCall, n_rows: int) -> mx.array:
    """What ``n_rows`` rows that keep no key return: zeros with segment ids
    (a padded or isolated query) or sinks (the sink takes all the weight),
    else MLX's uniform weights."""
    v, n_q_heads = call.v, call.q.shape[1]
    if call.mask.has_segments or call.sinks is not None:
        return mx.zeros((v.shape[0], n_q_heads, n_rows, v.shape[-1]), v.dtype)
    return _uniform_rows(v, n_q_heads, n_rows)


def _run_tiled(implementation: str, call: AttentionCall):
    q, k, v, mask = call.q, call.k, call.v, call.mask
    n_q_heads, q_len, k_len = q.shape[1], q.shape[2], k.shape[2]
    if mask.causal and q_len > k_len:
        # Bottom-right causal leaves the first Lq - Lk queries with no key at
        # all. Split them off so the tiled implementations only ever see
        # causal with Lq <= Lk.
        n_empty = q_len - k_len
        empty = _empty_rows(call, n_empty)
        q_ids = mask.q_segments[:, n_empty:] if mask.has_segments else None
        rest = StructuredMask(k_len, k_len, True, mask.window, q_ids, mask.k_segments, mask.array)
        if rest.array is not None and rest.array.shape[2] > 1:
            rest = rest.with_array(rest.array[:, :, n_empty:])
        out = _run_tiled(implementation, replace(call, q=q[:, :, n_empty:], mask=rest))
        return mx.concatenate([empty, out], axis=2)
    out, lse = _run(implementation, call)
    if mask.drops and not (mask.has_segments or call.sinks is not None):
        # Rows that keep no key come back as zeros with lse = +inf; MLX gives
        # them uniform weights. The where() also keeps their gradient out of
        # the implementation, as MLX's constant scores do.
        empty = mx.expand_dims(lse == mx.inf, -1)
        out = mx.where(empty, _uniform_rows(v, n_q_heads, q_len), out)
    return out


def _run_mlx(call: AttentionCall, mask: Mask, force_fused: bool, stream):
    """MLX's own op on the call's inputs and its user-given ``mask``;
    segments and windows become their dense boolean mask."""
    structure = call.mask
    if structure.has_segments or structure.window is not None:
        mask = structure.dense()
    out = MLX_ATTENTION(
        call.q, call.k, call.v, scale=call.scale, mask=mask, sinks=call.sinks, force_fused=force_fused, stream=stream
    )
    if structure.has_segments:
        keep = structure.dense_keep()
        out = mx.where(mx.any(keep, axis=-1, keepdims=True), out, mx.zeros_like(out))
    return out


def scaled_dot_product_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    mask: Mask = None,
    sinks: Optional[mx.array] = None,
    segment_ids: SegmentIds = None,
    window: Optional[int] = None,
    variant: str = "auto",
    force_fused: bool = False,
    stream=None,
) -> mx.array:
    """``softmax(scale * q @ k^T + mask) @ v``, exactly as MLX computes it,
    plus document (segment) masks and sliding windows.

    Args:
        q: ``(B, Hq, Lq, D)``.
        k: ``(B, Hkv, Lk, D)``, ``Hq % Hkv == 0`` (GQA and MQA share KV heads).
        v: ``(B, Hkv, Lk, Dv)``.
        scale: multiplies the scores, usually ``D ** -0.5``.
        mask: ``None``, ``"causal"`` (bottom-right aligned when ``Lq != Lk``)
            or an array broadcastable to ``(B, Hq, Lq, Lk)``, boolean
            (True keeps) or additive.
        sinks: optional ``(Hq,)`` attention-sink logits: one extra logit per
            query head in the softmax denominator, contributing no value.
            Differentiable.
        segment_ids: optional document ids: a ``(B, Lk)`` integer array (the
            queries take its last ``Lq`` columns, bottom-right like causal),
            or a pair ``(q_ids (B, Lq), k_ids (B, Lk))``. A query attends a
            key only if their ids are equal, and whatever ``mask`` allows.
            A negative id is padding: such keys are never attended, and a
            query with a negative id, or one the segments leave with no key,
            returns zeros and passes no gradient (on purpose unlike MLX's
            uniform rows, which apply to ``mask`` alone). Ids need not be
            sorted; packed rows (non-decreasing ids) are the fast case.
        window: optional sliding window: query ``i`` (bottom-right aligned)
            sees keys ``i - window < j <= i``, exactly mlx-lm's
            ``create_causal_mask(N, window_size=window)``. Needs
            ``mask="causal"`` (or an array mask, which it then restricts).
        variant: one of ``VARIANTS``; ``explain()`` says what it resolves to.
        force_fused: as in MLX: never fall back to unfused ``L x L`` work.
            With ``"mlx"`` it is passed to MLX (which raises where it has no
            fused kernel); ``"auto"`` then never picks MLX's unfused
            fallback; ``"manual"`` raises ``ValueError``. ``blockwise``,
            ``practical`` and ``demo`` are always fused (O(L) memory).
        stream: the stream or device to run on, as in MLX.

    Returns:
        ``(B, Hq, Lq, Dv)`` in the promoted dtype of ``q``, ``k``, ``v``.
    """
    dtype = _check_inputs(q, k, v, mask, sinks)
    check_variant(variant)
    _check_structure(q, k, mask, segment_ids, window, force_fused, variant)
    structure = masks.build(q.shape[2], k.shape[2], _normalise(mask, dtype), segment_ids, window)
    call = AttentionCall(q, k, v, scale, structure, sinks)
    chosen = _choose(call, variant, force_fused)
    if chosen.implementation == "mlx":
        return _run_mlx(call, mask, force_fused, stream)

    with mx.stream(stream) if stream is not None else contextlib.nullcontext():
        if chosen.implementation == "empty":
            return mx.zeros((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]), dtype)
        call = replace(call, q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype))
        if chosen.implementation == "manual":
            return reference.attention(call.q, call.k, call.v, scale, structure, sinks)
        return _run_tiled(chosen.implementation, call)
