"""Running a compiled kernel over a grid, and comparing schedules."""

import ctypes
import dataclasses
import functools
import re
import shutil
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from . import build, context, source, strict
from .errors import DivergenceError, EmulatorError, OrderDependentWarning, RaceError
from .profile import Profile

Schedule = context.Schedule

#: Schedules by name (int seeds shuffle the thread order). "forward" and
#: "reverse" run every thread once per pass, in ascending or descending
#: order, so SIMD groups move in lockstep from one collective to the next;
#: "ahead" and "ahead-reverse" let one SIMD group at a time run to its next
#: threadgroup barrier while the others wait, first group first or last
#: group first (threads descending). Threadgroups follow the same order.
SCHEDULES = {"forward": 0, "reverse": 1, "ahead": 3, "ahead-reverse": 4}

#: The schedules ``run_checked`` and ``metal()`` compare by default.
CHECKED_SCHEDULES = ("forward", "reverse", "ahead", "ahead-reverse")

#: Math modes of ``run(math=...)``: "precise" computes every math function
#: with the CPU's float library; "fast" gives metal:: and fast:: functions
#: the accuracy Metal's fast variants are specified to (see metal_cpu.h).
#: Left as None it is "fast" for a kernel MLX builds in fast math mode (every
#: Mac then uses the fast functions), else "precise".
MATH = ("precise", "fast")

# Each fiber's stack; kernels keep their per-thread tiles there.
STACK_SIZE = 256 * 1024
_MESSAGE_SIZE = 8192
_run_lock = threading.Lock()

# Same-size unsigned storage for dtypes NumPy lacks.
_STORAGE = {mx.bfloat16: mx.uint16}

# Unit roundoff of float32.
_U = 2.0 ** -24


class _Launch(ctypes.Structure):
    """``mtl::Launch`` in metal_cpu.h, field for field."""

    _fields_ = [
        ("bufs", ctypes.POINTER(ctypes.c_void_p)),
        ("ranges", ctypes.POINTER(ctypes.c_uint64)),
        ("n_bufs", ctypes.c_int),
        ("grid", ctypes.c_uint32 * 3),
        ("group", ctypes.c_uint32 * 3),
        ("schedule", ctypes.c_int),
        ("seed", ctypes.c_uint64),
        ("stack_size", ctypes.c_uint64),
        ("msg", ctypes.c_char_p),
        ("msg_len", ctypes.c_int),
        ("detect_races", ctypes.c_int),
        ("fast_math", ctypes.c_int),
        ("counters", ctypes.POINTER(ctypes.c_uint64)),
        ("n_counters", ctypes.c_int),
        ("atomic_n", ctypes.POINTER(ctypes.POINTER(ctypes.c_uint32))),
        ("atomic_abs", ctypes.POINTER(ctypes.POINTER(ctypes.c_float))),
        ("tg_float_adds", ctypes.c_uint64),
        ("only", ctypes.POINTER(ctypes.c_uint64)),
        ("n_only", ctypes.c_uint64),
    ]


def _as_numpy(x: mx.array) -> np.ndarray:
    """A NumPy view of ``x``'s memory with ``x``'s own strides (no copy)."""
    x = x.view(_STORAGE[x.dtype]) if x.dtype in _STORAGE else x
    return np.asarray(memoryview(x))


def _element_strides(view: np.ndarray) -> List[int]:
    return [s // view.itemsize for s in view.strides]


def row_contiguous(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """MLX's ``row_contiguous`` flag (check_contiguity in MLX's
    backend/common/utils.h): every axis longer than 1 has the stride of a
    row-major layout."""
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _byte_range(view: np.ndarray) -> Tuple[int, int]:
    """First byte and one past the last that ``view``'s elements occupy."""
    start = view.ctypes.data
    if view.size == 0:
        return start, start
    low = sum(min(0, (n - 1) * s) for n, s in zip(view.shape, view.strides))
    high = sum(max(0, (n - 1) * s) for n, s in zip(view.shape, view.strides))
    return start + low, start + high + view.itemsize


@functools.lru_cache(maxsize=None)
def _symbolizer() -> Optional[str]:
    return shutil.which("addr2line")


def _access_lines(library: Path, message: str) -> str:
    """``{pc:HEX}`` access sites in ``message`` as kernel source lines: the
    line of the access and, for one inside a helper, the line of the kernel
    that called it (addr2line's inline chain in kernel.metal)."""
    pcs = re.findall(r"\{pc:([0-9a-f]+)\}", message)
    if not pcs:
        return message
    chains: Dict[str, List[int]] = {pc: [] for pc in pcs}
    tool = _symbolizer()
    if tool:
        # A recorded pc is a return address; the access is just before it.
        addresses = {hex(max(int(pc, 16) - 1, 0)): pc for pc in pcs}
        proc = subprocess.run(
            [tool, "-e", str(library), "-a", "-i", *addresses], capture_output=True, text=True
        )
        current = None
        for line in proc.stdout.splitlines():
            if line.startswith("0x"):
                current = addresses.get(hex(int(line, 16)))
                continue
            m = re.search(r"kernel\.metal:(\d+)", line)
            if current and m:
                chains[current].append(int(m.group(1)))

    def describe(m):
        chain = chains.get(m.group(1)) or []
        if not chain:
            return "an unknown line"
        if chain[-1] != chain[0]:
            return f"line {chain[0]} (in a function called at line {chain[-1]})"
        return f"line {chain[0]}"

    return re.sub(r"\{pc:([0-9a-f]+)\}", describe, message)


def _explain(name: str, message: str, text: str) -> str:
    """``message`` followed by the generated source lines it names."""
    lines = text.split("\n")
    quoted = []
    for n in sorted({int(m) for m in re.findall(r"line (\d+)", message)}):
        if 1 <= n <= len(lines):
            quoted.append(f"  {n:4d} | {lines[n - 1]}")
    return f"kernel {name}: {message}" + ("\n" + "\n".join(quoted) if quoted else "")


def _schedule_code(schedule: Schedule):
    if isinstance(schedule, str) and schedule in SCHEDULES:
        return SCHEDULES[schedule], 0
    if isinstance(schedule, (int, np.integer)) and not isinstance(schedule, bool):
        return 2, int(schedule) & 0xFFFFFFFFFFFFFFFF
    raise ValueError(
        f"schedule must be one of {', '.join(map(repr, SCHEDULES))} or an int seed, "
        f"got {schedule!r}"
    )


def _check_math(math: Optional[str]) -> Optional[str]:
    if math is not None and math not in MATH:
        raise ValueError(f"math must be one of {', '.join(map(repr, MATH))}, got {math!r}")
    return math


def _math_for(math: Optional[str], captured: source.Capture) -> str:
    if math is not None:
        return math
    return "fast" if captured.math_mode == "fast" else "precise"


def _group_counts(grid, threadgroup) -> Tuple[int, int, int]:
    """Threadgroups along x, y and z (Metal clips the threadgroup to the grid)."""
    return tuple(-(-g // min(t, g)) if min(t, g) else 0 for g, t in zip(grid, threadgroup))


def _threadgroups(grid, threadgroup) -> int:
    nx, ny, nz = _group_counts(grid, threadgroup)
    return nx * ny * nz


def _selected(threadgroups, grid, threadgroup) -> Optional[np.ndarray]:
    """Ascending linear indices of the threadgroups to run, or None for all.

    ``threadgroups`` is None, a sequence of ``(x, y, z)`` threadgroup
    positions, or a function of the launch's threadgroup counts
    ``(nx, ny, nz)`` that returns one.
    """
    if threadgroups is None:
        return None
    counts = _group_counts(grid, threadgroup)
    if callable(threadgroups):
        threadgroups = threadgroups(counts)
    nx, ny, nz = counts
    linear = set()
    for position in threadgroups:
        x, y, z = (tuple(int(c) for c in position) + (0, 0))[:3]
        if not (0 <= x < nx and 0 <= y < ny and 0 <= z < nz):
            raise ValueError(f"threadgroup {tuple(position)} is outside the launch's {counts} threadgroups")
        linear.add(x + nx * (y + ny * z))
    if not linear:
        raise ValueError("threadgroups selects no threadgroup")
    return np.array(sorted(linear), dtype=np.uint64)


@dataclasses.dataclass
class _Result:
    """One launch's outputs and what the runtime recorded: per output written
    with float atomic additions, the count and the magnitude sum of its
    additions per element; the float atomic additions to threadgroup memory."""

    outputs: List[mx.array]
    profile: Optional[Profile]
    atomic_stats: Dict[int, Tuple[np.ndarray, np.ndarray]]
    tg_float_adds: int
    init_value: Optional[float]


def _launch(
    compiled: build.Kernel,
    captured: source.Capture,
    call: source.KernelCall,
    schedule: Schedule,
    math: str,
    detect_races: bool,
    profile: bool,
    only: Optional[np.ndarray] = None,
) -> _Result:
    code, seed = _schedule_code(schedule)
    inputs, output_shapes, output_dtypes = call.inputs, call.output_shapes, call.output_dtypes

    # Outputs: MLX's init_value if the kernel has one, else 0xff bytes (NaN),
    # so that elements a kernel never writes show up.
    outputs = []
    for shape, dtype in zip(output_shapes, output_dtypes):
        storage = _STORAGE.get(dtype, dtype)
        if captured.init_value is not None:
            # As MLX fills it: the float init_value converted to the dtype.
            fill = mx.zeros(tuple(shape), dtype) + mx.array(captured.init_value, dtype=dtype)
            outputs.append(np.array(fill.view(storage)))
        else:
            o = np.array(mx.zeros(tuple(shape), storage))
            o.view(np.uint8).fill(0xFF)
            outputs.append(o)

    buffers: Dict[int, int] = {}
    ranges: Dict[int, Tuple[int, int]] = {}
    names: Dict[int, str] = {}
    atomic_float: Dict[int, int] = {}  # buffer index -> output index
    keep = []
    params = [p for p in compiled.params if p.index is not None]
    i_in = 0
    i_out = 0
    current = None
    for p in params:
        names[p.index] = p.name
        if current is not None and p.name in (
            f"{current[0]}_shape", f"{current[0]}_strides", f"{current[0]}_ndim",
        ):
            name, view = current
            suffix = p.name[len(name) + 1:]
            if suffix == "shape":
                data = np.array(view.shape, dtype=np.int32)
            elif suffix == "strides":
                data = np.array(_element_strides(view), dtype=np.int64)
            else:
                data = np.array([view.ndim], dtype=np.int32)
        elif i_in < len(inputs):
            data = _as_numpy(inputs[i_in])
            # MLX copies an input that is not row-contiguous when the kernel
            # was built with ensure_row_contiguous; the copy's strides are
            # what the kernel then sees.
            if captured.ensure_row_contiguous and not row_contiguous(
                data.shape, _element_strides(data)
            ):
                data = np.ascontiguousarray(data)
            current = (p.name, data)
            i_in += 1
        else:
            if i_out >= len(outputs):
                raise ValueError("the kernel has more buffers than inputs and outputs")
            data = outputs[i_out]
            if "atomic<float>" in p.type.replace(" ", ""):
                atomic_float[p.index] = i_out
            current = None
            i_out += 1
        keep.append(data)
        buffers[p.index] = data.ctypes.data
        ranges[p.index] = _byte_range(data)
    if i_in != len(inputs) or i_out != len(outputs):
        raise ValueError(
            f"kernel signature has {i_in} inputs and {i_out} outputs, the call "
            f"gives {len(inputs)} and {len(outputs)}"
        )

    n_buf = max(buffers) + 1 if buffers else 1
    launch = _Launch()
    launch.bufs = (ctypes.c_void_p * n_buf)(*[buffers.get(i) for i in range(n_buf)])
    flat = [v for i in range(n_buf) for v in ranges.get(i, (0, 0))]
    launch.ranges = (ctypes.c_uint64 * len(flat))(*flat)
    launch.n_bufs = n_buf
    launch.grid[:] = call.grid
    launch.group[:] = call.threadgroup
    launch.schedule = code
    launch.seed = seed
    launch.stack_size = STACK_SIZE
    message = ctypes.create_string_buffer(_MESSAGE_SIZE)
    launch.msg = ctypes.cast(message, ctypes.c_char_p)
    launch.msg_len = _MESSAGE_SIZE
    launch.detect_races = int(detect_races)
    launch.fast_math = int(math == "fast")
    if only is not None:
        launch.only = only.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64))
        launch.n_only = len(only)

    counter_names = None
    counters = None
    if profile:
        fixed = compiled.library.mtl_counter_names().decode().strip(",").split(",")
        per_buffer = [
            f"device.{names.get(i, f'buffer{i}')}.{kind}"
            for i in range(n_buf)
            for kind in ("loaded_bytes", "stored_bytes")
        ]
        counter_names = fixed + per_buffer
        n_groups = _threadgroups(call.grid, call.threadgroup)
        counters = np.zeros((n_groups, len(counter_names)), dtype=np.uint64)
        launch.counters = counters.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64))
        launch.n_counters = len(counter_names)

    stats = {}
    if atomic_float and compiled.instrumented:
        adds = (ctypes.POINTER(ctypes.c_uint32) * n_buf)()
        magnitudes = (ctypes.POINTER(ctypes.c_float) * n_buf)()
        for index, k in atomic_float.items():
            n = np.zeros(outputs[k].size, dtype=np.uint32)
            a = np.zeros(outputs[k].size, dtype=np.float32)
            stats[k] = (n, a)
            adds[index] = n.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))
            magnitudes[index] = a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        launch.atomic_n = adds
        launch.atomic_abs = magnitudes

    with _run_lock:
        err = compiled.library.mtl_run(ctypes.byref(launch))
    if err:
        error = {1: DivergenceError, 3: RaceError}.get(err, EmulatorError)
        text = _access_lines(compiled.path, message.value.decode(errors="replace"))
        raise error(_explain(compiled.name, text, captured.source))

    results = []
    for o, dtype in zip(outputs, output_dtypes):
        a = mx.array(o)
        results.append(a.view(dtype) if dtype in _STORAGE else a)
    prof = None
    if profile:
        rows = counters if only is None else counters[only.astype(np.int64)]
        prof = Profile(captured.name, call.grid, call.threadgroup, counter_names, rows, only)
    return _Result(results, prof, stats, int(launch.tg_float_adds), captured.init_value)


def _resolve(schedule, math, strict_pass):
    """Arguments left as None take the active ``metal()`` block's setting."""
    session = context.current()
    if schedule is None:
        schedule = session.schedule if session else "forward"
    if math is None and session is not None:
        math = session.math
    if strict_pass is None:
        strict_pass = session.strict if session else False
    return schedule, _check_math(math), strict_pass


def _resolve_threadgroups(threadgroups):
    """``threadgroups``, or the active ``metal()`` block's when None."""
    session = context.current()
    if threadgroups is None and session is not None:
        return session.threadgroups
    return threadgroups


def _profiling(profile: bool) -> bool:
    """Whether to count: asked for, or inside a ``metal(profile=True)`` block
    (which collects the profiles; the launch then returns outputs only)."""
    session = context.current()
    return profile or bool(session and session.profile)


def run(
    kernel,
    inputs: Sequence,
    output_shapes: Sequence[Sequence[int]],
    output_dtypes: Sequence,
    grid: Sequence[int],
    threadgroup: Sequence[int],
    template: Optional[Sequence] = None,
    init_value: Optional[float] = None,
    schedule: Union[Schedule, Sequence[Schedule], None] = None,
    math: Optional[str] = None,
    strict: Optional[bool] = None,
    profile: bool = False,
    verbose: bool = False,
    detect_races: bool = False,
    threadgroups=None,
):
    """Run an ``mx.fast.metal_kernel`` on the CPU.

    Takes the arguments of calling ``kernel`` and returns its outputs as a
    list of ``mx.array``; with ``profile=True``, ``(outputs, Profile)``.
    What the kernel was built with (``ensure_row_contiguous``, the math mode,
    ``init_value``) is read from MLX.

    ``schedule`` orders the threads between sync points: a name in
    ``SCHEDULES`` or an int seed (shuffled). A sequence of schedules runs
    ``run_checked``: each schedule with the race detector, ``RaceError`` if
    results differ. ``detect_races`` watches every access to threadgroup
    memory and raises ``RaceError`` naming the array, element, threads and
    source lines of two accesses that no barrier orders. ``math`` is
    ``"precise"`` or ``"fast"`` (see ``MATH``). ``strict`` first runs
    ``strict_check`` on the kernel (``StrictError`` if Apple's compiler would
    reject it). ``threadgroups`` runs only some threadgroups of the grid (a
    sequence of ``(x, y, z)`` positions, or a function of the threadgroup
    counts ``(nx, ny, nz)`` returning one): the outputs the others would
    write keep their initial fill, and a profile has rows for the ones run
    (``Profile.positions``); for counting part of a launch too large to
    run whole. Inside ``with emulator.metal(...)`` the block's settings
    apply to arguments left as None.
    """
    schedule, math, strict_pass = _resolve(schedule, math, strict)
    threadgroups = _resolve_threadgroups(threadgroups)
    if not isinstance(schedule, (str, int, np.integer)):
        schedules = _checked_schedules(schedule)
        call = source.KernelCall.of(inputs, output_shapes, output_dtypes, grid, threadgroup, template, init_value)
        return _run_checked(kernel, call, schedules, True, math, strict_pass, profile, threadgroups)
    _schedule_code(schedule)
    call = source.KernelCall.of(inputs, output_shapes, output_dtypes, grid, threadgroup, template, init_value)
    captured = source.capture(kernel, call)
    if verbose:
        print(captured.source)
    if strict_pass:
        _strict(kernel, call, captured)
    counting = _profiling(profile)
    only = _selected(threadgroups, call.grid, call.threadgroup)
    compiled = build.load(captured.source, captured.math_mode, instrumented=detect_races or counting)
    result = _launch(compiled, captured, call, schedule, _math_for(math, captured), detect_races, counting, only)
    return _finish(result, profile)


def _strict(kernel, call: source.KernelCall, captured):
    report = strict.check_call(kernel, call, captured)
    session = context.current()
    if session is not None:
        session.strict_reports.append(report)


def _finish(result: _Result, profile: bool):
    session = context.current()
    if result.profile is not None and session is not None and session.profile:
        session.profiles.append(result.profile)
    return (result.outputs, result.profile) if profile else result.outputs


def _bits(a: mx.array) -> np.ndarray:
    return np.array(a.view(_STORAGE.get(a.dtype, a.dtype))).view(np.uint8)


def _compare(k, first, other, names, stats) -> Optional[str]:
    """Raise RaceError if output ``k`` differs beyond what its float atomic
    additions explain; if it differs within that, say how."""
    a, b = first.outputs[k], other.outputs[k]
    ba, bb = _bits(a), _bits(b)
    if np.array_equal(ba, bb):
        return None
    size = a.dtype.size
    differs = (ba.reshape(-1, size) != bb.reshape(-1, size)).any(axis=1)
    if k in stats:
        adds, magnitudes = stats[k]
        x = np.array(a).reshape(-1).astype(np.float64)
        y = np.array(b).reshape(-1).astype(np.float64)
        n = adds.astype(np.float64)
        # Two orders of n additions differ by at most twice gamma_n * sum |terms|
        # (Higham, Accuracy and Stability of Numerical Algorithms, 4.2);
        # the initial value is one more term.
        init = abs(first.init_value) if first.init_value is not None else 0.0
        gamma = n * _U / np.maximum(1.0 - n * _U, 1e-12)
        bound = 2.0 * gamma * (magnitudes.astype(np.float64) + init)
        within = (np.abs(x - y) <= bound) | (np.isnan(x) & np.isnan(y))
        if within[differs].all():
            worst = float(np.max(np.abs(x - y)[differs]))
            return (
                f"output {k} depends on the order of its float atomic additions: "
                f"{int(differs.sum())} of {a.size} elements differ between schedules "
                f"{names[0]!r} and {names[1]!r}, by up to {worst:.3g}, within the "
                "rounding bound of their additions (not a race)"
            )
    diff = np.flatnonzero(differs)
    hint = (
        " (the kernel adds floats atomically in threadgroup memory: the order of "
        "those additions changes their rounding too)" if first.tg_float_adds else ""
    )
    extra = " beyond the rounding of its float atomic additions" if k in stats else ""
    raise RaceError(
        f"output {k} differs between schedules {names[0]!r} and {names[1]!r} at "
        f"{diff.size} of {a.size} elements (first at flat index {int(diff[0])}){extra}: "
        "a data race, e.g. threadgroup memory read without the threadgroup_barrier "
        f"that orders it after the write{hint}"
    )


def run_checked(
    kernel,
    inputs: Sequence,
    output_shapes: Sequence[Sequence[int]],
    output_dtypes: Sequence,
    grid: Sequence[int],
    threadgroup: Sequence[int],
    template: Optional[Sequence] = None,
    init_value: Optional[float] = None,
    schedules: Sequence[Schedule] = CHECKED_SCHEDULES,
    detect_races: bool = True,
    math: Optional[str] = None,
    strict: Optional[bool] = None,
    profile: bool = False,
    threadgroups=None,
):
    """``run`` under each of ``schedules``; returns the first run's outputs
    (and its ``Profile`` with ``profile=True``).

    Raises ``RaceError`` if an output differs bit for bit between two
    schedules (the result depends on the order threads run in), or, with
    ``detect_races``, at the first unordered pair of threadgroup-memory
    accesses, naming their source lines. Outputs written with float atomic
    additions (``atomic_outputs`` with float dtype) may differ by the
    rounding their order explains: ``OrderDependentWarning``, not a race.
    """
    _, math, strict_pass = _resolve("forward", math, strict)
    schedules = _checked_schedules(schedules)
    call = source.KernelCall.of(inputs, output_shapes, output_dtypes, grid, threadgroup, template, init_value)
    return _run_checked(kernel, call, schedules, detect_races, math, strict_pass, profile, threadgroups)


def _checked_schedules(schedules) -> list:
    """``schedules`` as a list of at least two valid schedules."""
    schedules = list(schedules)
    if len(schedules) < 2:
        raise ValueError("run_checked needs at least two schedules")
    for s in schedules:
        _schedule_code(s)
    return schedules


def _run_checked(kernel, call: source.KernelCall, schedules, detect_races, math, strict_pass, profile, threadgroups):
    """``run_checked`` on a ``KernelCall``, its settings resolved."""
    threadgroups = _resolve_threadgroups(threadgroups)
    counting = _profiling(profile)
    captured = source.capture(kernel, call)
    if strict_pass:
        _strict(kernel, call, captured)
    only = _selected(threadgroups, call.grid, call.threadgroup)
    has_atomic_floats = "atomic<float>" in captured.source.replace(" ", "")
    compiled = build.load(
        captured.source, captured.math_mode,
        instrumented=detect_races or counting or has_atomic_floats,
    )
    first = None
    order_dependent = {}
    for i, schedule in enumerate(schedules):
        result = _launch(
            compiled, captured, call, schedule, _math_for(math, captured), detect_races, counting and i == 0, only
        )
        if first is None:
            first = result
            continue
        stats = {
            k: (np.maximum(n, result.atomic_stats[k][0]), np.maximum(a, result.atomic_stats[k][1]))
            for k, (n, a) in first.atomic_stats.items()
        }
        for k in range(len(first.outputs)):
            note = _compare(k, first, result, (schedules[0], schedule), stats)
            if note:
                order_dependent.setdefault(k, note)
    for note in order_dependent.values():
        warnings.warn(OrderDependentWarning(note), stacklevel=2)
    return _finish(first, profile)
