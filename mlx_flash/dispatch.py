"""Watchdog-safe launches: one kernel launch split into pieces that each
stay under a time budget.

macOS ends GPU work that runs too long: a command buffer past the watchdog
(seconds) fails with "Caused GPU Timeout Error"
(``kIOGPUCommandBufferCallbackErrorTimeout``), and one that keeps the GPU
from the display with "Impacting Interactivity". One attention launch over
a 64k-token row is a single dispatch that can run for seconds on a laptop
GPU. So every forward, dK/dV and dQ launch of the fused kernels goes through
``launch`` here, which cuts its grid along the tile axis (query tiles for
the forward and dQ, key tiles for dK/dV; every batch and head of a tile
stays in its piece) into contiguous pieces whose predicted time stays under
``budget_ms()``, each piece its own dispatch. Where one tile across all
heads is already over the budget (a 64k-token row of 32 heads),
``by_heads`` first runs the launch over ranges of KV heads (each with its
query heads: a problem of its own, since no head reads another's rows),
each range cut by tiles again:

* the kernels read the first tile of their launch from ``params[9]`` and
  write only that piece's rows, into outputs whose sequence axis holds just
  those rows (``flash_piece`` in metal/flash_common.h); the pieces are
  concatenated along that axis. A tile's threadgroup does exactly the same
  work in a piece as in the whole launch (no threadgroup reads another's
  results), so a split launch is bit-identical to the whole one. The price
  is one copy of the outputs (``O(L)``), and the launch overhead per piece.
* predicted time is the piece's FLOPs over a rate. The FLOPs count every
  (query, key) pair of the tile pairs the causal and window rules leave to
  the kernel's loops (``tile_pairs``), whole tiles, segment skipping not
  counted (it needs the ids' values, which would force an evaluation):
  an upper bound. ``2 (D + Dv)`` FLOPs per pair forward, ``2 (2 D + Dv)``
  for dQ (S, dP, dQ) and ``2 (2 D + 2 Dv)`` for dK/dV (S, dP, dV, dK).
  The rate (``rate``) is the slowest one the doctor measured for that
  kernel family and dtype on this Mac (``python -m mlx_flash.doctor``, no
  mask and causal rows, whose pairs are exactly known), halved; before any
  doctor run, ``DEFAULT_RATES``: a few percent of the smallest Apple GPU's
  peak (an M1's 8 cores do about 2.6 TFLOP/s in float32), chosen to
  overestimate rather than underestimate the time.
* ``MLX_FLASH_MAX_DISPATCH_MS`` sets the budget (default
  ``DEFAULT_BUDGET_MS``, well under the watchdog's seconds); a piece has at
  least one tile, so a tiny budget gives one piece per tile.

Command buffers. macOS reports both failures on a command buffer
(``kIOGPUCommandBufferCallbackError...``), and how much of one buffer's
work it charges to one kill is not documented; so every dispatch is kept
under the budget, and the pieces are put in separate command buffers
where MLX allows it. What MLX
0.32 offers (mlx/backend/metal/eval.cpp, device.cpp): the stream's command
buffer is committed (1) at the end of every ``mx.eval`` / ``mx.async_eval``,
and (2) after any primitive, once the buffer holds more than
``MLX_MAX_OPS_PER_BUFFER`` dispatches or more than
``MLX_MAX_MB_PER_BUFFER`` MiB of distinct input buffers (defaults by chip
class: 20 / 40 MB phone, 40 / 40 base and Pro, 50 / 50 Max and Ultra; both
read once, when MLX first opens the GPU, so they must be set before). Each
piece is one primitive with one dispatch whose inputs include the whole
``q``, ``k``, ``v`` (and ``dout``, ``lse``, ``delta``): where those exceed
``MLX_MAX_MB_PER_BUFFER`` (a 64k-token row of 8 heads of 64 float16 is 64 MiB
of ``q`` alone), rule (2) ends a command buffer after every piece. Below
that, up to ``MLX_MAX_OPS_PER_BUFFER + 1`` pieces may share one, and
``MLX_MAX_OPS_PER_BUFFER=0`` in the environment makes every primitive end
its own. Outside a graph transformation ``launch`` also commits after each
piece with ``mx.async_eval`` (rule 1); inside ``mx.grad``, ``mx.compile``
or ``mx.vmap`` MLX refuses that (``[async_eval] Not allowed inside a graph
transformation``), and rule (2) decides. ``describe`` (in ``explain()``)
says how many pieces each launch takes and which rule separates them.

This module reads no array values, so planning never forces an evaluation.
"""

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx

from . import kernels

#: Environment variable with the budget per piece, in milliseconds.
BUDGET_ENV = "MLX_FLASH_MAX_DISPATCH_MS"

#: Budget per piece without ``MLX_FLASH_MAX_DISPATCH_MS``.
DEFAULT_BUDGET_MS = 200.0

#: FLOP/s assumed per kernel family before the doctor measured one.
DEFAULT_RATES = {"practical": 5e10, "demo": 1e11}

#: The doctor's slowest measured rate is divided by this: laptop GPUs
#: throttle, and other work shares the GPU.
SAFETY = 2.0

#: MLX 0.32's largest default ``MLX_MAX_MB_PER_BUFFER`` (Max and Ultra chips).
_MLX_DEFAULT_MAX_MB = 50

#: Index of ``params`` in ``fused.KERNEL_INPUTS`` and of the first tile in it.
_PARAMS_INPUT = 9
_FIRST_TILE = 9

_STAGES = ("forward", "dq", "dkdv")


#: Set inside ``whole_launches()``: no launch is split.
_whole = False


@contextlib.contextmanager
def whole_launches():
    """Inside the block every launch runs as one dispatch, whatever the
    budget: ``bench --cost`` counts what a whole launch issues."""
    global _whole
    before, _whole = _whole, True
    try:
        yield
    finally:
        _whole = before


def budget_ms() -> float:
    """The budget per piece: ``MLX_FLASH_MAX_DISPATCH_MS`` or the default
    (infinite inside ``whole_launches()``)."""
    if _whole:
        return math.inf
    text = os.environ.get(BUDGET_ENV, "").strip()
    if not text:
        return DEFAULT_BUDGET_MS
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{BUDGET_ENV}='{text}' is not a positive number of milliseconds")
    return value


def flops_per_pair(stage: str, head_dim: int, value_dim: int) -> int:
    """FLOPs of one (query, key) pair in ``stage``'s products."""
    if stage == "forward":
        return 2 * (head_dim + value_dim)
    if stage == "dq":
        return 2 * (2 * head_dim + value_dim)
    if stage == "dkdv":
        return 2 * (2 * head_dim + 2 * value_dim)
    raise ValueError(f"unknown stage '{stage}': one of {', '.join(_STAGES)}")


@functools.lru_cache(maxsize=256)
def tile_pairs(
    stage: str, rows: int, inner: int, q_len: int, k_len: int, causal: bool, window: int
) -> Tuple[int, ...]:
    """Pairs each tile of a launch visits, per batch and query head.

    ``rows``: positions per tile along the split axis (queries for the
    forward and dQ, keys for dK/dV); ``inner``: the tile the kernel loops
    over (keys, or queries for dK/dV). Whole inner tiles between the bounds
    the causal and window rules give (``flash_key_begin`` / ``_end``,
    ``flash_row_begin`` / ``_end`` in metal/flash_common.h), times ``rows``.
    """
    offset = k_len - q_len
    window = window if causal else 0
    pairs = []
    if stage in ("forward", "dq"):
        for start in range(0, q_len, rows):
            begin = max(0, start + offset - window + 1) if window else 0
            end = min(max(start + rows + offset, 0), k_len) if causal else k_len
            first = begin // inner * inner
            pairs.append(rows * inner * max(0, -(-(end - first) // inner)))
    else:
        for start in range(0, k_len, rows):
            stop = min(start + rows, k_len)
            begin = min(max(start - offset, 0), q_len) if causal else 0
            end = min(max(stop - 1 - offset + window, 0), q_len) if window else q_len
            first = begin // inner * inner
            pairs.append(rows * inner * max(0, -(-(end - first) // inner)))
    return tuple(pairs)


def _problem_pairs(row: dict) -> Optional[float]:
    """(query, key) pairs of a doctor timing row with no mask or causal."""
    length, heads, batch = row.get("seq"), row.get("heads"), row.get("batch")
    if not (length and heads and batch) or row.get("kind") not in ("none", "causal"):
        return None
    per_head = length * length if row["kind"] == "none" else length * (length + 1) / 2
    return batch * heads * per_head


def rate(family: str, dtype) -> Tuple[float, str]:
    """``(FLOP/s, where it comes from)`` for predicting ``family``'s launches."""
    default = DEFAULT_RATES.get(family, min(DEFAULT_RATES.values()))
    if kernels.backend() != "metal":
        return default, "default rate"
    from . import verdicts

    verdict = verdicts.current("metal")
    if verdict is None:
        return default, "default rate: no doctor verdict"
    name = verdicts.dtype_name(dtype)
    measured = {}
    for row in verdict.timings:
        seconds = row.get("median_s", {}).get(family)
        pairs = _problem_pairs(row)
        if not seconds or pairs is None:
            continue
        dim, value_dim = row["head_dim"], row.get("value_dim", row["head_dim"])
        stages = ("forward",) if row.get("mode") == "fwd" else _STAGES
        flops = pairs * sum(flops_per_pair(s, dim, value_dim) for s in stages)
        measured.setdefault(row.get("dtype"), []).append(flops / seconds)
    rates = measured.get(name) or [r for rs in measured.values() for r in rs]
    if not rates:
        return default, "default rate: no doctor timing of this family"
    return min(rates) / SAFETY, "the doctor's slowest measured rate, halved"


@dataclass(frozen=True)
class Split:
    """How one launch is cut: ``pieces`` are ``(first tile, stop tile)``,
    ``seconds`` the predicted time of each."""

    stage: str
    pieces: Tuple[Tuple[int, int], ...]
    seconds: Tuple[float, ...]
    tiles: int
    rows: int


def pieces_of(costs: Sequence[float], budget: float) -> Tuple[Tuple[int, int], ...]:
    """Contiguous ``(start, stop)`` runs of ``costs`` whose sums stay within
    ``budget``, greedily; a run has at least one item, whatever its cost."""
    runs, start, total = [], 0, 0.0
    for i, cost in enumerate(costs):
        if i > start and total + cost > budget:
            runs.append((start, i))
            start, total = i, 0.0
        total += cost
    runs.append((start, len(costs)))
    return tuple(runs)


def _tile_seconds(stage: str, family: str, q, k, v, mask, rows: int, inner: int) -> List[float]:
    """Predicted seconds of each tile of a launch over all of ``q``'s heads
    and batch rows."""
    B, n_q_heads, q_len, head_dim = q.shape
    pairs = tile_pairs(stage, rows, inner, q_len, k.shape[2], bool(mask.causal), int(mask.window or 0))
    flops, _ = rate(family, q.dtype)
    per_pair = flops_per_pair(stage, head_dim, v.shape[-1]) * B * n_q_heads / flops
    return [p * per_pair for p in pairs]


def split(stage: str, family: str, q, k, v, mask, rows: int, inner: int) -> Split:
    """The pieces of ``stage``'s launch for tiles of ``rows`` positions
    (against ``inner``-position inner tiles) under this budget and rate."""
    seconds = _tile_seconds(stage, family, q, k, v, mask, rows, inner)
    pieces = pieces_of(seconds, budget_ms() / 1e3)
    return Split(stage, pieces, tuple(sum(seconds[a:b]) for a, b in pieces), len(seconds), rows)


def head_pieces(stage: str, family: str, q, k, v, mask, rows: int, inner: int) -> Tuple[Tuple[int, int], ...]:
    """KV-head ranges ``(start, stop)`` to launch one after the other so
    that one tile of a range's heads stays within the budget.

    A launch cuts no finer than one tile across all its heads: at 64k
    tokens one tile column of 32 heads is predicted well past the budget.
    Heads do not read each other's rows, so a launch over fewer heads (whole
    GQA groups: a KV head and its query heads) is a problem of its own,
    cut again by tiles. One range when one tile of all heads fits."""
    n_kv_heads = k.shape[1]
    worst = max(_tile_seconds(stage, family, q, k, v, mask, rows, inner), default=0.0)
    per_head = worst / n_kv_heads
    budget = budget_ms() / 1e3
    if worst <= budget:
        return ((0, n_kv_heads),)
    width = max(1, int(budget // per_head)) if per_head > 0 else n_kv_heads
    return tuple((h, min(h + width, n_kv_heads)) for h in range(0, n_kv_heads, width))


def by_heads(stage: str, family: str, launcher: Callable, tiles: Callable) -> Callable:
    """``launcher`` (an ``AttentionCall`` to its outputs, axis 1 the heads)
    run over the ranges ``head_pieces`` plans, outputs joined along the
    heads; ``tiles(stage, q, k, v)`` gives the launch's ``(rows, inner)``.
    Each range ends its command buffer where MLX allows it."""

    @functools.wraps(launcher)
    def run(call):
        q, k, v, mask = call.q, call.k, call.v, call.mask
        ranges = head_pieces(stage, family, q, k, v, mask, *tiles(stage, q, k, v))
        if len(ranges) == 1:
            return launcher(call)
        commit = kernels.backend() == "metal"
        results = []
        for start, stop in ranges:
            outputs = launcher(call.kv_heads(start, stop))
            if commit:
                commit = _end_command_buffer(outputs)
            results.append(outputs)
        if isinstance(results[0], mx.array):
            return mx.concatenate(results, axis=1)
        return tuple(mx.concatenate(parts, axis=1) for parts in zip(*results))

    return run


def _with_first_tile(params: mx.array, first: int) -> mx.array:
    return mx.concatenate([params[:_FIRST_TILE], mx.array([first], dtype=params.dtype)])


def _end_command_buffer(outputs) -> bool:
    """Commit the GPU's command buffer after a piece where MLX allows it
    (outside graph transformations); whether it could."""
    try:
        mx.async_eval(outputs)
    except ValueError:
        return False
    return True


def launch(kernel, plan: Split, **call) -> list:
    """``kernels.launch(kernel, **call)``, as the pieces of ``plan``.

    ``call`` is the whole launch: ``inputs`` (``params`` at its place in
    ``fused.KERNEL_INPUTS``), a ``grid`` whose x axis counts ``plan.tiles``
    threadgroups, and ``output_shapes`` whose axis 2 is the sequence the
    tiles cut. Outputs are the whole launch's.
    """
    if len(plan.pieces) == 1:
        return kernels.launch(kernel, **call)
    threads = call["threadgroup"][0]
    grid, shapes = call["grid"], call["output_shapes"]
    length = shapes[0][2]
    commit = kernels.backend() == "metal"
    results = []
    for start, stop in plan.pieces:
        inputs = list(call["inputs"])
        inputs[_PARAMS_INPUT] = _with_first_tile(inputs[_PARAMS_INPUT], start)
        rows = min(stop * plan.rows, length) - start * plan.rows
        piece = dict(
            call,
            inputs=inputs,
            grid=((stop - start) * threads, grid[1], grid[2]),
            output_shapes=[tuple(s[:2]) + (rows,) + tuple(s[3:]) for s in shapes],
        )
        outputs = kernels.launch(kernel, **piece)
        if commit:
            commit = _end_command_buffer(outputs)
        results.append(outputs)
    return [mx.concatenate([r[i] for r in results], axis=2) for i in range(len(shapes))]


def _input_mib(arrays) -> float:
    return sum(x.nbytes for x in arrays) / 2**20


def describe(family: str, tiles, q, k, v, mask) -> str:
    """How many pieces each launch of ``family`` takes for these inputs,
    the budget and rate, and what separates the pieces' command buffers.
    ``tiles(stage)`` gives a stage's ``(rows, inner)``."""
    names = {"forward": "forward", "dq": "dQ", "dkdv": "dK/dV"}
    group = q.shape[1] // k.shape[1]
    counts, longest, pieces = [], 0.0, 0
    for stage in _STAGES:
        ranges = head_pieces(stage, family, q, k, v, mask, *tiles(stage))
        # The widest range: the others are as wide, or the narrower last.
        a, b = ranges[0]
        s = split(stage, family, q[:, a * group:b * group], k[:, a:b], v[:, a:b], mask, *tiles(stage))
        total = sum(len(split(stage, family, q[:, x * group:y * group], k[:, x:y], v[:, x:y], mask,
                              *tiles(stage)).pieces) for x, y in ranges)
        text = f"{names[stage]} {total} piece{'s' if total > 1 else ''}"
        if len(ranges) > 1:
            heads = f"{b - a} KV head{'s' if b - a > 1 else ''}"
            text += f" ({len(ranges)} ranges of up to {heads}, each in pieces of its {s.tiles} tiles)"
        else:
            text += f" of {s.tiles} tiles"
        counts.append(text)
        longest, pieces = max(longest, max(s.seconds)), max(pieces, total)
    flops, source = rate(family, q.dtype)
    text = f"launches: {', '.join(counts)} (budget {budget_ms():g} ms at {flops:.3g} FLOP/s, {source})"
    if longest * 1e3 > budget_ms():
        text += f"; one tile of one KV head is predicted at {longest * 1e3:.3g} ms, over the budget"
    if pieces > 1:
        inputs = _input_mib([q, k, v])
        limit = os.environ.get("MLX_MAX_MB_PER_BUFFER")
        ops = os.environ.get("MLX_MAX_OPS_PER_BUFFER")
        if ops is not None and ops.strip() == "0":
            text += f"; each piece ends its command buffer (MLX_MAX_OPS_PER_BUFFER={ops.strip()})"
        elif inputs > (int(limit) if limit and limit.strip().isdigit() else _MLX_DEFAULT_MAX_MB) + 1:
            text += f"; each piece ends its command buffer (its inputs, {inputs:.0f} MiB, pass MLX_MAX_MB_PER_BUFFER)"
        else:
            text += (
                "; under mx.grad or mx.compile pieces may share a command buffer: "
                "set MLX_MAX_OPS_PER_BUFFER=0 before MLX starts to end one per piece"
            )
    return text
