"""Measuring attention variants cell by cell: check first, then time and memory.

A *configuration* is one attention problem (mode, batch, sequence length,
heads, head dim, mask, dtype); a *cell* is one variant run on one
configuration. For each configuration the harness:

1. makes seeded random inputs and computes the float32 oracle (the reference,
   ``mlx_flash.reference``) slice by slice, one batch element and one KV head
   at a time, so that the oracle fits where the unfused variants would not
   (on every slice, or on the first and last of large configurations: see
   ``check_slices``);
2. runs each variant once and compares its output (and, for ``fwdbwd``, the
   gradients of q, k and v) with the oracle; a cell outside the tolerance of
   its dtype is ``FAILED`` and gets no time at all;
3. runs the remaining warm-ups (the checked run counts as the first), then
   the timed runs, each with its own ``mx.get_peak_memory`` window, in
   rounds: one run of every variant per round (A B C A B C ...), so that a
   change in the machine's load falls on every variant alike; a speedup is
   the ratio of the medians, given with the range of the round-by-round
   ratios.

Cells whose estimated memory exceeds the limit are ``skipped`` with the reason.
Variants are looked up in ``VARIANTS``; ``register_variant`` adds one (the
tests use it to inject a deliberately wrong implementation).
"""

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np

import mlx_flash
from mlx_flash import masks as structured_masks
from mlx_flash import reference
from mlx_flash.machine import backend
from mlx_flash.stats import percentile

from . import masks

MODES = ("fwd", "fwdbwd", "decode")

#: Largest ``max|x - oracle| / max|oracle|`` a cell may show, per dtype: a few
#: units in the last place of the output dtype, after float32 accumulation.
TOLERANCE = {"float32": 2e-4, "float16": 3e-2, "bfloat16": 8e-2}

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

#: Variants the tables compare every other one against.
BASELINES = ("manual", "mlx")


@dataclass(frozen=True)
class Config:
    """One attention problem.

    ``seq`` is the key length; the queries are as many, except in ``decode``
    mode where one query attends to a KV cache of ``seq`` entries.
    """

    mode: str
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    mask: str  # "none", "causal", or a structured mask name (see bench/masks.py)
    dtype: str

    @property
    def q_len(self) -> int:
        return 1 if self.mode == "decode" else self.seq

    @property
    def tokens(self) -> int:
        """Tokens one call processes: every position, or one per sequence when decoding."""
        return self.batch * self.q_len

    def label(self) -> str:
        return (
            f"{self.mode} B={self.batch} L={self.seq} H={self.heads}/{self.kv_heads} "
            f"D={self.head_dim} {self.mask} {self.dtype}"
        )


@dataclass
class Variant:
    """Something to benchmark.

    ``fn(q, k, v, scale, mask, **structure)`` returns ``(B, Hq, Lq, D)``;
    ``describe(q, k, v, mask, **structure)`` returns ``(implementation,
    backend, reason)``: what actually runs for these inputs. ``structure``
    holds ``segment_ids``, ``window`` and ``sinks`` where the mask has them.
    """

    name: str
    fn: Callable
    describe: Callable


def _builtin(name: str) -> Variant:
    def fn(q, k, v, scale, mask, **structure):
        return mlx_flash.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, variant=name, **structure)

    def describe(q, k, v, mask, **structure):
        plan = mlx_flash.explain(q, k, v, mask=mask, variant=name, **structure)
        reason = f"{plan.reason}; {plan.mask}" if plan.mask else plan.reason
        return plan.implementation, plan.backend, reason

    return Variant(name, fn, describe)


#: The package's variants, ``auto`` last (it resolves to one of the others).
VARIANTS: Dict[str, Variant] = {
    name: _builtin(name) for name in [n for n in mlx_flash.VARIANTS if n != "auto"] + ["auto"]
}


def register_variant(
    name: str,
    fn: Callable,
    *,
    implementation: Optional[str] = None,
    backend: str = "custom",
    reason: str = "registered",
) -> Variant:
    """Add ``fn(q, k, v, scale, mask, **structure)`` to the variants ``run`` can measure."""
    implementation = implementation or name
    variant = Variant(name, fn, lambda q, k, v, mask, **structure: (implementation, backend, reason))
    VARIANTS[name] = variant
    return variant


@dataclass
class Cell:
    """The measurement of one variant on one configuration (see module doc)."""

    config: Config
    variant: str
    implementation: str = ""
    backend: str = ""
    reason: str = ""
    status: str = "pending"  # ok, FAILED, skipped, error
    detail: str = ""
    errors: Dict[str, float] = field(default_factory=dict)
    tolerance: Optional[float] = None
    times_s: List[float] = field(default_factory=list)
    median_s: Optional[float] = None
    p95_s: Optional[float] = None
    min_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_memory_bytes: Optional[int] = None
    #: The O(L) floor: bytes of q, k, v and the output (and, with the
    #: backward, the cotangent and dq, dk, dv), and the peak over it.
    floor_bytes: Optional[int] = None
    peak_over_floor: Optional[float] = None
    resident_bytes: Optional[int] = None
    estimated_bytes: Optional[int] = None
    speedup_vs_manual: Optional[float] = None
    speedup_vs_mlx: Optional[float] = None
    #: [min, max] of the round-by-round ratios (variants are timed in rounds).
    speedup_vs_manual_range: Optional[List[float]] = None
    speedup_vs_mlx_range: Optional[List[float]] = None
    shared_with: Optional[str] = None
    checked_slices: Optional[List[int]] = None  # [checked, of all (batch, KV head) slices]

    def to_dict(self) -> dict:
        row = asdict(self)
        row.update(row.pop("config"))
        # JSON has no infinity: an error too large to measure (NaN output,
        # wrong shape) is null, and ``detail`` says what happened.
        row["errors"] = {k: (e if math.isfinite(e) else None) for k, e in self.errors.items()}
        row["q_len"] = self.config.q_len
        return row


def _nbytes(dtype: str) -> int:
    return DTYPES[dtype].size


#: Keys per score tile assumed by ``estimate_bytes`` for the tiled variants.
TILE = 512


def estimate_bytes(config: Config, implementation: str) -> int:
    """Rough peak bytes of one run, to skip cells that cannot fit.

    The unfused paths hold a few float32 ``(B, Hq, Lq, Lk)`` score-sized
    tensors at once (scores, weights, and in the backward their gradients);
    MLX's own op is fused only for the forward on Metal. The tiled paths hold
    score tiles of at most ``TILE`` keys.
    """
    c = config
    backward = c.mode == "fwdbwd"
    io = (2 * c.batch * c.heads * c.q_len + 2 * c.batch * c.kv_heads * c.seq) * c.head_dim * _nbytes(c.dtype)
    if backward:
        io *= 2  # the cotangent and the three gradients
    # MLX fuses the forward on Metal; its backward only for no mask or
    # causal (MLX >= 0.32.4), never for segments or windows, which reach it
    # as a dense mask. Without Metal nothing of MLX's is fused.
    mlx_unfused = backend() != "metal" or (backward and masks.is_structured(c.mask))
    unfused = implementation == "manual" or (implementation == "mlx" and mlx_unfused)
    keys = c.seq if unfused else min(c.seq, TILE)
    copies = 6 if backward else 3
    return io + copies * c.batch * c.heads * c.q_len * keys * 4


def make_inputs(config: Config, seed: int = 0):
    """Seeded ``q, k, v`` and cotangent ``d_out`` in the configuration's dtype."""
    c = config
    keys = mx.random.split(mx.random.key(seed), 4)
    dtype = DTYPES[c.dtype]
    q = mx.random.normal((c.batch, c.heads, c.q_len, c.head_dim), key=keys[0]).astype(dtype)
    k = mx.random.normal((c.batch, c.kv_heads, c.seq, c.head_dim), key=keys[1]).astype(dtype)
    v = mx.random.normal((c.batch, c.kv_heads, c.seq, c.head_dim), key=keys[2]).astype(dtype)
    d_out = mx.random.normal((c.batch, c.heads, c.q_len, c.head_dim), key=keys[3]).astype(dtype)
    mx.eval(q, k, v, d_out)
    return q, k, v, d_out


def floor_bytes(config: Config) -> int:
    """Bytes of the arrays every implementation must hold: q, k, v and the
    output; with the backward also the cotangent and dq, dk, dv."""
    c = config
    queries = c.batch * c.heads * c.q_len * c.head_dim
    keys = c.batch * c.kv_heads * c.seq * c.head_dim
    count = 2 * queries + 2 * keys
    if c.mode == "fwdbwd":
        count *= 2
    return count * _nbytes(c.dtype)


def structure(config: Config, seed: int = 0) -> dict:
    """The attention op's mask keyword arguments for ``config.mask``."""
    return masks.arguments(config.mask, config.batch, config.seq, config.heads, seed)


#: A configuration with more score elements (B * Hq * Lq * Lk) than this is
#: checked on ``CHECK_SLICES`` (batch, KV head) slices, the first and the
#: last, instead of all: slices are independent, so each checked slice is
#: checked exactly, and the float32 oracle stays a fraction of a variant's
#: cost where the CPU makes every run expensive.
FULL_CHECK_SCORES = 2**25
CHECK_SLICES = 2


@dataclass
class Truth:
    """The oracle on some (batch, KV head) slices: ``arrays[name][i]`` is
    output ``name`` (``out``, ``dq``, ``dk``, ``dv``) on ``slices[i]``."""

    slices: List[tuple]
    total: int
    shapes: Dict[str, tuple]
    arrays: Dict[str, List[np.ndarray]]


def check_slices(config: Config) -> List[tuple]:
    """The (batch, KV head) slices the correctness check compares."""
    c = config
    every = [(b, h) for b in range(c.batch) for h in range(c.kv_heads)]
    if c.batch * c.heads * c.q_len * c.seq <= FULL_CHECK_SCORES or len(every) <= CHECK_SLICES:
        return every
    return [every[0], every[-1]]


def _part(name: str, x, b: int, h: int, group: int):
    """Slice ``(b, KV head h)`` of output ``name``: its query heads for
    ``out``/``dq``, the KV head itself for ``dk``/``dv``."""
    if name in ("out", "dq"):
        return x[b, h * group : (h + 1) * group]
    return x[b, h]


def _slice_structure(args: dict, b: int, heads: slice, q_len: int, k_len: int):
    """The ``StructuredMask`` and sinks of batch element ``b`` and ``heads``."""
    ids = args.get("segment_ids")
    ids = ids[b : b + 1] if ids is not None else None
    sinks = args.get("sinks")
    mask = structured_masks.build(q_len, k_len, args.get("mask"), ids, args.get("window"))
    return mask, (sinks[heads] if sinks is not None else None)


def oracle(config: Config, q, k, v, d_out, slices: Optional[List[tuple]] = None, args: Optional[dict] = None) -> Truth:
    """float32 reference output (and gradients for ``fwdbwd``) on ``slices``.

    Each slice is one batch element and one KV head with the query heads that
    share it; slices are independent, so computing them one at a time gives
    the full answer with one slice's memory. Results are NumPy arrays, which
    keeps them out of MLX's peak-memory counter.
    """
    c = config
    scale = c.head_dim**-0.5
    args = structure(c) if args is None else args
    group = c.heads // c.kv_heads
    slices = check_slices(c) if slices is None else slices
    names = ("out", "dq", "dk", "dv") if c.mode == "fwdbwd" else ("out",)
    shapes = {"out": tuple(q.shape), "dq": tuple(q.shape), "dk": tuple(k.shape), "dv": tuple(v.shape)}
    truth = Truth(slices, c.batch * c.kv_heads, {n: shapes[n] for n in names}, {n: [] for n in names})

    for b, h in slices:
        mask, sinks = _slice_structure(args, b, slice(h * group, (h + 1) * group), c.q_len, c.seq)

        def attend(q_, k_, v_, mask=mask, sinks=sinks):
            return reference.attention(q_, k_, v_, scale, mask, sinks)

        qs = q[b : b + 1, h * group : (h + 1) * group].astype(mx.float32)
        ks = k[b : b + 1, h : h + 1].astype(mx.float32)
        vs = v[b : b + 1, h : h + 1].astype(mx.float32)
        if c.mode == "fwdbwd":
            dos = d_out[b : b + 1, h * group : (h + 1) * group].astype(mx.float32)
            (o,), (dq, dk, dv) = mx.vjp(attend, [qs, ks, vs], [dos])
            mx.eval(o, dq, dk, dv)
            results = {"out": o, "dq": dq, "dk": dk, "dv": dv}
        else:
            o = attend(qs, ks, vs)
            mx.eval(o)
            results = {"out": o}
        for name, x in results.items():
            truth.arrays[name].append(np.array(_part(name, x, 0, 0, group)))
    return truth


def compare(outputs: Dict[str, mx.array], truth: Truth, group: int) -> Dict[str, float]:
    """``max|x - oracle| / max|oracle|`` per output over the checked slices;
    infinite for a wrong shape or a non-finite value."""
    errors = {}
    for name, refs in truth.arrays.items():
        x = outputs[name]
        if tuple(x.shape) != truth.shapes[name]:
            errors[name] = math.inf
            continue
        worst_diff, largest = 0.0, 0.0
        for (b, h), ref in zip(truth.slices, refs):
            got = np.array(_part(name, x, b, h, group).astype(mx.float32))
            diff = np.abs(got - ref)
            if not np.all(np.isfinite(diff)):
                worst_diff = math.inf
                break
            worst_diff = max(worst_diff, float(diff.max(initial=0.0)))
            largest = max(largest, float(np.abs(ref).max(initial=0.0)))
        errors[name] = worst_diff / max(largest, 1e-30)
    return errors


def _step(variant: Variant, config: Config, q, k, v, d_out, args: dict) -> Callable:
    """A function running the cell once and returning its evaluated arrays."""
    scale = config.head_dim**-0.5

    def attend(q_, k_, v_):
        return variant.fn(q_, k_, v_, scale, **args)

    if config.mode == "fwdbwd":

        def step():
            (o,), grads = mx.vjp(attend, [q, k, v], [d_out])
            mx.eval(o, grads)
            return {"out": o, "dq": grads[0], "dk": grads[1], "dv": grads[2]}

    else:

        def step():
            o = attend(q, k, v)
            mx.eval(o)
            return {"out": o}

    return step


def check(cell: Cell, variant: Variant, q, k, v, d_out, truth: Truth, args: Optional[dict] = None) -> Optional[Callable]:
    """Run ``cell`` once and compare it with ``truth``; returns the step to time,
    or None when the cell is ``FAILED`` or raised (``error``)."""
    config = cell.config
    step = _step(variant, config, q, k, v, d_out, structure(config) if args is None else args)
    try:
        outputs = step()
        cell.tolerance = TOLERANCE[config.dtype]
        cell.errors = compare(outputs, truth, config.heads // config.kv_heads)
        cell.checked_slices = [len(truth.slices), truth.total]
        del outputs
    except Exception as e:  # a crash is a result too: report it, keep going
        cell.status, cell.detail = "error", f"{type(e).__name__}: {e}"
        return None
    worst = max(cell.errors.values())
    if not worst <= cell.tolerance:
        cell.status = "FAILED"
        bad = ", ".join(f"{n} {e:.2e}" for n, e in cell.errors.items() if not e <= cell.tolerance)
        cell.detail = f"wrong result: relative error {bad} > tolerance {cell.tolerance:.0e}"
        return None
    return step


def time_interleaved(steps: List[tuple], warmup: int, repeats: int) -> None:
    """Warm up, then time the checked ``(cell, step)`` pairs in rounds: one
    run of each per round (A B C A B C ...), so that a change in the machine's
    load falls on every variant alike; round ``r`` of each cell is
    ``times_s[r]``, and ratios are taken round by round (``speedups``)."""
    peaks = {id(cell): [] for cell, _ in steps}
    live = list(steps)
    for round_ in range(max(warmup - 1, 0) + repeats):
        for cell, step in list(live):
            try:
                resident = mx.get_active_memory()
                mx.reset_peak_memory()
                start = time.perf_counter()
                step()
                took = time.perf_counter() - start
            except Exception as e:  # a crash is a result too: report it, keep going
                cell.status, cell.detail, cell.times_s = "error", f"{type(e).__name__}: {e}", []
                live.remove((cell, step))
                continue
            if round_ >= warmup - 1:
                cell.times_s.append(took)
                peaks[id(cell)].append(max(mx.get_peak_memory(), resident))
                cell.resident_bytes = resident
    for cell, _ in live:
        cell.status = "ok"
        cell.median_s = percentile(cell.times_s, 50)
        cell.p95_s = percentile(cell.times_s, 95)
        cell.min_s = min(cell.times_s)
        cell.tokens_per_s = cell.config.tokens / cell.median_s
        cell.peak_memory_bytes = max(peaks[id(cell)])
        cell.floor_bytes = floor_bytes(cell.config)
        cell.peak_over_floor = cell.peak_memory_bytes / cell.floor_bytes


def measure(
    cell: Cell, variant: Variant, q, k, v, d_out, truth: Truth, warmup: int, repeats: int, args: Optional[dict] = None
) -> Cell:
    """Check ``cell`` against ``truth``, then time it on its own (see module doc)."""
    step = check(cell, variant, q, k, v, d_out, truth, args)
    if step is not None:
        time_interleaved([(cell, step)], warmup, repeats)
    return cell


def speedups(cells: List[Cell]) -> None:
    """Fill ``speedup_vs_<baseline>`` for measured cells of the same configuration."""
    by_config: Dict[Config, Dict[str, Cell]] = {}
    for cell in cells:
        by_config.setdefault(cell.config, {})[cell.variant] = cell
    for group in by_config.values():
        for cell in group.values():
            if cell.status != "ok":
                continue
            for base in BASELINES:
                other = group.get(base)
                if other is not None and other.status == "ok":
                    setattr(cell, f"speedup_vs_{base}", other.median_s / cell.median_s)
                    # The rounds were timed side by side: their ratios show the spread.
                    rounds = [b / a for a, b in zip(cell.times_s, other.times_s)] or [other.median_s / cell.median_s]
                    setattr(cell, f"speedup_vs_{base}_range", [min(rounds), max(rounds)])


class Progress:
    """A one-line progress bar on stderr (a line per cell when not a terminal)."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, text: str) -> None:
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        line = f"[{bar}] {self.done}/{self.total} {elapsed:6.0f}s  {text}"
        self.stream.write("\r" + line[:120].ljust(120))
        self.stream.flush()

    def advance(self, text: str = "") -> None:
        self.done += 1
        if self.tty:
            self.update(text)
        else:  # a log file gets one line per finished cell
            self.stream.write(f"[{self.done}/{self.total}] {text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def run(
    configs: Sequence[Config],
    variants: Sequence[str],
    *,
    warmup: int = 1,
    repeats: int = 5,
    max_memory_bytes: Optional[int] = None,
    share: bool = True,
    seed: int = 0,
    progress: Optional[Progress] = None,
    variants_for: Optional[Callable[[Config], Sequence[str]]] = None,
) -> List[Cell]:
    """Measure every variant on every configuration; returns one ``Cell`` each.

    ``variants_for(config)``, when given, narrows ``variants`` per
    configuration (a baseline measured for one variant only).

    With ``share``, a variant that resolves to the same implementation and
    backend as one already measured on the configuration (``practical`` ->
    ``blockwise`` where Metal is absent) reuses that measurement and says so
    in ``shared_with``: the code that runs is the same.
    """
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    for c in configs:
        if c.mode not in MODES:
            raise ValueError(f"unknown mode '{c.mode}'; choose from {', '.join(MODES)}")
        if c.dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{c.dtype}'; choose from {', '.join(DTYPES)}")
        if c.heads % c.kv_heads:
            raise ValueError(f"heads ({c.heads}) must be a multiple of kv heads ({c.kv_heads})")
    cells: List[Cell] = []
    for config in configs:
        q, k, v, d_out = make_inputs(config, seed)
        args = structure(config, seed)
        planned = []
        for name in [n for n in variants if variants_for is None or n in variants_for(config)]:
            cell = Cell(config, name)
            cell.implementation, cell.backend, cell.reason = VARIANTS[name].describe(q, k, v, **args)
            cell.estimated_bytes = estimate_bytes(config, cell.implementation)
            planned.append(cell)
        oracle_bytes = estimate_bytes(
            Config(config.mode, 1, config.seq, config.heads // config.kv_heads, 1, config.head_dim, config.mask, "float32"),
            "manual",
        )
        truth = None
        measured: Dict[tuple, Cell] = {}
        steps, shared = [], []
        for cell in planned:
            if progress and progress.tty:
                progress.update(f"{config.label()} {cell.variant}")
            key = (cell.implementation, cell.backend)
            if max_memory_bytes is not None and cell.estimated_bytes > max_memory_bytes:
                cell.status = "skipped"
                cell.detail = (
                    f"needs about {cell.estimated_bytes / 2**30:.1f} GiB "
                    f"(limit {max_memory_bytes / 2**30:.1f} GiB)"
                )
            elif max_memory_bytes is not None and oracle_bytes > max_memory_bytes:
                cell.status = "skipped"
                cell.detail = f"the float32 oracle needs about {oracle_bytes / 2**30:.1f} GiB"
            elif share and key in measured and cell.variant not in BASELINES:
                shared.append((cell, measured[key]))
            else:
                if truth is None:
                    truth = oracle(config, q, k, v, d_out, args=args)
                step = check(cell, VARIANTS[cell.variant], q, k, v, d_out, truth, args)
                if step is not None:
                    steps.append((cell, step))
                if cell.status != "error":
                    measured.setdefault(key, cell)
            cells.append(cell)
        time_interleaved(steps, warmup, repeats)
        for cell, source in shared:
            for name in (
                "status", "detail", "errors", "tolerance", "times_s", "median_s", "p95_s",
                "min_s", "tokens_per_s", "peak_memory_bytes", "floor_bytes", "peak_over_floor",
                "resident_bytes", "checked_slices",
            ):
                setattr(cell, name, getattr(source, name))
            cell.shared_with = source.variant
        if progress:
            for cell in planned:
                progress.advance(f"{config.label()} {cell.variant}: {cell.status}")
        del q, k, v, d_out, truth, args, steps
        mx.clear_cache()
    speedups(cells)
    return cells
