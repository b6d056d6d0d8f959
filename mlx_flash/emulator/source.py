"""What MLX would compile and launch for a kernel call, read from MLX itself.

MLX writes the kernel signature (buffers, ``*_shape``/``*_strides``/``*_ndim``,
thread attributes) and the template instantiation itself, and keeps what
the kernel was built with (``ensure_row_contiguous``, the math mode,
``init_value``) in its ``CustomKernel`` primitive. Without Metal it still
records that primitive while tracing for ``mx.export_function``, and the
exported file holds the primitive's state as MLX serialises it: the kernel
name, the full source, grid, threadgroup, shape flags, then the options.
``capture`` traces the call once and reads them back from that file, so the
emulator follows what MLX does rather than what the caller says.
"""

import dataclasses
import os
import struct
import tempfile
import threading
from typing import Optional, Sequence, Tuple

import mlx.core as mx

from .errors import EmulatorError

# MLX's CompileOptions::MathMode.
MATH_MODES = ("safe", "relaxed", "fast")

# A serialised std::string is its uint64 length, then its bytes.
_TAG = struct.pack("<Q", len("CustomKernel")) + b"CustomKernel"
_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Capture:
    """One kernel call as MLX would run it.

    ``source`` is the generated Metal source (header, signature, body,
    template instantiation); MLX compiles it after its own ``utils.h``
    prelude. ``ensure_row_contiguous``: inputs that are not row-contiguous
    are copied before the launch. ``math_mode``: one of ``MATH_MODES``.
    """

    name: str
    source: str
    grid: Tuple[int, int, int]
    threadgroup: Tuple[int, int, int]
    ensure_row_contiguous: bool
    init_value: Optional[float]
    math_mode: str


class _Reader:
    """Reads MLX's little-endian serialisation."""

    def __init__(self, data: bytes, at: int):
        self.data = data
        self.at = at

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        size = self.take("Q")
        if size > len(self.data) - self.at:
            raise ValueError("string past the end")
        text = self.data[self.at : self.at + size].decode("utf-8")
        self.at += size
        return text

    def boolean(self) -> bool:
        value = self.take("B")
        if value not in (0, 1):
            raise ValueError(f"bool byte {value}")
        return bool(value)


def _parse(data: bytes) -> Capture:
    """The ``CustomKernel`` state in an exported function: ``(name, source,
    grid, threadgroup, shape_infos, ensure_row_contiguous, init_value,
    scalar_arguments, is_precompiled, shared_memory, compile_options)``."""
    at = data.find(_TAG)
    if at < 0 or data.find(_TAG, at + 1) >= 0:
        raise ValueError("expected exactly one CustomKernel primitive")
    r = _Reader(data, at + len(_TAG))
    name = r.string()
    source = r.string()
    grid = r.take("3i")
    threadgroup = r.take("3i")
    for _ in range(r.take("Q")):  # shape_infos: (shape, strides, ndim) flags
        r.boolean(), r.boolean(), r.boolean()
    ensure_row_contiguous = r.boolean()
    init_value = r.take("f") if r.boolean() else None
    for _ in range(r.take("Q")):  # scalar_arguments: variant tag, value
        tag = r.take("i")
        r.take({0: "i", 1: "f", 2: "B"}[tag])
    r.boolean()  # is_precompiled
    r.take("i")  # shared_memory
    math = r.take("i")
    if math not in range(len(MATH_MODES)) or "[[kernel]]" not in source:
        raise ValueError(f"math mode {math}")
    return Capture(
        name=name,
        source=source + ("" if source.endswith("\n") else "\n"),
        grid=tuple(grid),
        threadgroup=tuple(threadgroup),
        ensure_row_contiguous=ensure_row_contiguous,
        init_value=init_value,
        math_mode=MATH_MODES[math],
    )


def _check_dims(name, dims):
    dims = tuple(int(d) for d in dims)
    if len(dims) != 3 or any(d < 0 for d in dims):
        raise ValueError(f"{name} must be three non-negative ints, got {dims}")
    return dims


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """The arguments of one call of an ``mx.fast.metal_kernel``, validated,
    with its inputs evaluated: what ``emulator.run``, ``run_checked`` and
    ``strict_check`` take, as one value (``of`` builds it from their
    arguments)."""

    inputs: Tuple[mx.array, ...]
    output_shapes: Tuple[Tuple[int, ...], ...]
    output_dtypes: Tuple
    grid: Tuple[int, int, int]
    threadgroup: Tuple[int, int, int]
    template: Optional[Tuple] = None
    init_value: Optional[float] = None

    @staticmethod
    def of(inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, init_value=None) -> "KernelCall":
        """A ``KernelCall`` from the keyword arguments of calling a kernel;
        ``ValueError`` for a grid, threadgroup or outputs Metal would refuse."""
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
        return KernelCall(
            tuple(inputs),
            tuple(tuple(s) for s in output_shapes),
            tuple(output_dtypes),
            grid,
            threadgroup,
            tuple(template) if template else None,
            init_value,
        )

    def with_inputs(self, inputs: Sequence[mx.array]) -> "KernelCall":
        """The same call on other (evaluated) inputs."""
        return dataclasses.replace(self, inputs=tuple(inputs))

    def keywords(self) -> dict:
        """The keyword arguments of calling the kernel, but ``inputs``."""
        call = dict(
            grid=self.grid,
            threadgroup=self.threadgroup,
            output_shapes=list(self.output_shapes),
            output_dtypes=list(self.output_dtypes),
        )
        if self.template:
            call["template"] = list(self.template)
        if self.init_value is not None:
            call["init_value"] = self.init_value
        return call


def capture(kernel, call: KernelCall) -> Capture:
    """What MLX would compile and launch for ``kernel`` called with ``call``."""
    keywords = call.keywords()

    def traced(*xs):
        return kernel(inputs=list(xs), **keywords)

    with _lock, tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.mlxfn")
        mx.export_function(path, traced, *call.inputs)
        with open(path, "rb") as f:
            data = f.read()
    try:
        result = _parse(data)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise EmulatorError(
            "cannot read the kernel MLX recorded while tracing; this MLX version "
            f"is not supported by the emulator ({mx.__version__}): {e}"
        ) from None
    if result.grid != call.grid or result.threadgroup != call.threadgroup:
        raise EmulatorError(
            f"MLX recorded grid {result.grid} and threadgroup {result.threadgroup} for a "
            f"call with {call.grid} and {call.threadgroup}; this MLX "
            f"version is not supported by the emulator ({mx.__version__})"
        )
    return result


def generated_source(kernel, inputs, call: dict) -> str:
    """The Metal source (header, kernel template, instantiation) that MLX
    would compile for ``kernel(inputs=inputs, **call)``."""
    return capture(kernel, KernelCall.of(inputs, **call)).source
