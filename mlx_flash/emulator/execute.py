"""Running a compiled kernel over a grid, and comparing schedules."""

import ctypes
import re
import threading
from typing import List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from . import build, source
from .errors import CompileError, DivergenceError, EmulatorError, RaceError

Schedule = Union[str, int]

# Each fiber's stack; kernels keep their per-thread tiles there.
STACK_SIZE = 256 * 1024
_MESSAGE_SIZE = 8192
_run_lock = threading.Lock()

# Same-size unsigned storage for dtypes NumPy lacks.
_STORAGE = {mx.bfloat16: mx.uint16}


def _as_numpy(x: mx.array) -> np.ndarray:
    """A NumPy view of ``x``'s memory with ``x``'s own strides (no copy)."""
    x = x.view(_STORAGE[x.dtype]) if x.dtype in _STORAGE else x
    return np.asarray(memoryview(x))


def _explain(name: str, message: str, text: str) -> str:
    """``message`` followed by the generated source lines it names."""
    lines = text.split("\n")
    quoted = []
    for n in sorted({int(m) for m in re.findall(r"line (\d+)", message)}):
        if 1 <= n <= len(lines):
            quoted.append(f"  {n:4d} | {lines[n - 1]}")
    return f"kernel {name}: {message}" + ("\n" + "\n".join(quoted) if quoted else "")


def _schedule_code(schedule: Schedule):
    if schedule == "forward":
        return 0, 0
    if schedule == "reverse":
        return 1, 0
    if isinstance(schedule, (int, np.integer)) and not isinstance(schedule, bool):
        return 2, int(schedule) & 0xFFFFFFFFFFFFFFFF
    raise ValueError(
        f"schedule must be 'forward', 'reverse' or an int seed, got {schedule!r}"
    )


def _check_dims(name, dims):
    dims = tuple(int(d) for d in dims)
    if len(dims) != 3 or any(d < 0 for d in dims):
        raise ValueError(f"{name} must be three non-negative ints, got {dims}")
    return dims


def run(
    kernel,
    inputs: Sequence,
    output_shapes: Sequence[Sequence[int]],
    output_dtypes: Sequence,
    grid: Sequence[int],
    threadgroup: Sequence[int],
    template: Optional[Sequence] = None,
    init_value: Optional[float] = None,
    schedule: Union[Schedule, Sequence[Schedule]] = "forward",
    verbose: bool = False,
    detect_races: bool = False,
) -> List[mx.array]:
    """Run an ``mx.fast.metal_kernel`` on the CPU.

    Takes the arguments of calling ``kernel`` and returns its outputs as a
    list of ``mx.array``. ``schedule`` orders the threads between sync points:
    ``"forward"`` (ascending), ``"reverse"`` or an int seed (shuffled). A
    sequence of schedules runs each and raises ``RaceError`` if the results
    differ. ``detect_races`` also watches every access to kernel-scope
    threadgroup arrays and raises ``RaceError`` naming the array, element,
    threads and source lines of two accesses that no barrier orders.
    """
    if not isinstance(schedule, (str, int, np.integer)):
        return run_checked(
            kernel, inputs, output_shapes, output_dtypes, grid, threadgroup,
            template=template, init_value=init_value, schedules=schedule,
        )
    code, seed = _schedule_code(schedule)
    grid = _check_dims("grid", grid)
    threadgroup = _check_dims("threadgroup", threadgroup)
    if threadgroup[0] * threadgroup[1] * threadgroup[2] > 1024:
        raise ValueError(
            f"threadgroup {threadgroup} has more than 1024 threads, the most "
            "a Metal threadgroup can have"
        )
    if len(output_shapes) != len(output_dtypes):
        raise ValueError("output_shapes and output_dtypes differ in length")
    inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
    mx.eval(inputs)
    call = dict(
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[tuple(s) for s in output_shapes],
        output_dtypes=list(output_dtypes),
    )
    if template:
        call["template"] = list(template)
    if init_value is not None:
        call["init_value"] = init_value
    text = source.generated_source(kernel, inputs, call)
    if verbose:
        print(text)
    compiled = None
    if detect_races:
        try:
            compiled = build.load(text, trace=True)
        except CompileError:
            compiled = None  # the plain build reports any real error below
    if compiled is None:
        compiled = build.load(text)

    # Outputs: init_value if given, else 0xff bytes (NaN), so that elements a
    # kernel never writes show up.
    outputs = []
    for shape, dtype in zip(output_shapes, output_dtypes):
        storage = _STORAGE.get(dtype, dtype)
        if init_value is not None:
            o = mx.full(tuple(shape), init_value, dtype).view(storage)
            outputs.append(np.array(o))
        else:
            o = np.array(mx.zeros(tuple(shape), storage))
            o.view(np.uint8).fill(0xFF)
            outputs.append(o)

    buffers = {}
    keep = []
    params = [p for p in compiled.params if p.index is not None]
    i_in = 0
    i_out = 0
    current = None
    for p in params:
        if current is not None and p.name in (
            f"{current[0]}_shape", f"{current[0]}_strides", f"{current[0]}_ndim",
        ):
            name, x, view = current
            suffix = p.name[len(name) + 1:]
            if suffix == "shape":
                data = np.array(x.shape, dtype=np.int32)
            elif suffix == "strides":
                data = np.array(
                    [s // view.itemsize for s in view.strides], dtype=np.int64
                )
            else:
                data = np.array([x.ndim], dtype=np.int32)
            keep.append(data)
            buffers[p.index] = data.ctypes.data
        elif i_in < len(inputs):
            x = inputs[i_in]
            view = _as_numpy(x)
            keep.append(view)
            buffers[p.index] = view.ctypes.data
            current = (p.name, x, view)
            i_in += 1
        else:
            if i_out >= len(outputs):
                raise ValueError("the kernel has more buffers than inputs and outputs")
            buffers[p.index] = outputs[i_out].ctypes.data
            current = None
            i_out += 1
    if i_in != len(inputs) or i_out != len(outputs):
        raise ValueError(
            f"kernel signature has {i_in} inputs and {i_out} outputs, the call "
            f"gives {len(inputs)} and {len(outputs)}"
        )

    n_buf = max(buffers) + 1 if buffers else 1
    bufs = (ctypes.c_void_p * n_buf)(*[buffers.get(i) for i in range(n_buf)])
    g = (ctypes.c_uint32 * 3)(*grid)
    tg = (ctypes.c_uint32 * 3)(*threadgroup)
    message = ctypes.create_string_buffer(_MESSAGE_SIZE)
    with _run_lock:
        err = compiled.library.mtl_run(
            bufs, g, tg, code, seed, STACK_SIZE, message, _MESSAGE_SIZE
        )
    if err:
        error = {1: DivergenceError, 3: RaceError}.get(err, EmulatorError)
        raise error(_explain(compiled.name, message.value.decode(errors="replace"), text))

    results = []
    for o, dtype in zip(outputs, output_dtypes):
        a = mx.array(o)
        results.append(a.view(dtype) if dtype in _STORAGE else a)
    return results


def run_checked(
    kernel,
    inputs: Sequence,
    output_shapes: Sequence[Sequence[int]],
    output_dtypes: Sequence,
    grid: Sequence[int],
    threadgroup: Sequence[int],
    template: Optional[Sequence] = None,
    init_value: Optional[float] = None,
    schedules: Sequence[Schedule] = ("forward", "reverse"),
    detect_races: bool = True,
) -> List[mx.array]:
    """``run`` under each of ``schedules``; returns the first run's outputs.

    Raises ``RaceError`` if any output differs bit for bit between two
    schedules (the result depends on the order threads run in), or, with
    ``detect_races``, at the first unordered pair of threadgroup-memory
    accesses, naming their source lines.
    """
    schedules = list(schedules)
    if len(schedules) < 2:
        raise ValueError("run_checked needs at least two schedules")
    first = None
    for schedule in schedules:
        outs = run(
            kernel, inputs, output_shapes, output_dtypes, grid, threadgroup,
            template=template, init_value=init_value, schedule=schedule,
            detect_races=detect_races,
        )
        if first is None:
            first = outs
            continue
        for k, (a, b) in enumerate(zip(first, outs)):
            ba = np.array(a.view(_STORAGE.get(a.dtype, a.dtype))).view(np.uint8)
            bb = np.array(b.view(_STORAGE.get(b.dtype, b.dtype))).view(np.uint8)
            if not np.array_equal(ba, bb):
                size = a.dtype.size
                diff = np.flatnonzero(
                    (ba.reshape(-1, size) != bb.reshape(-1, size)).any(axis=1)
                )
                raise RaceError(
                    f"output {k} differs between schedules {schedules[0]!r} and "
                    f"{schedule!r} at {diff.size} of {a.size} elements (first at "
                    f"flat index {int(diff[0])}): a data race, e.g. threadgroup "
                    "memory read without the threadgroup_barrier that orders it "
                    "after the write"
                )
    return first
