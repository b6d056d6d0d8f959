"""Runs MLX-generated Metal kernel source on the CPU.

MLX generates the full source of an ``mx.fast.metal_kernel`` call (signature,
template instantiation) even without Metal, and records what the kernel was
built with (``ensure_row_contiguous``, the math mode, ``init_value``); the
emulator reads both from MLX (``source``), compiles the source with the
system C++ compiler against ``metal_cpu.h`` (``build``) and runs every thread
as a fiber, deterministically, in the order a schedule gives (``execute``).
Barriers and SIMD collectives are rendezvous points, threadgroup memory
starts poisoned (0xff bytes: NaN in every float type), and a race is reported
when results differ between schedules or when two threads access a byte of
threadgroup memory, one writing, with no barrier that orders threadgroup
memory between them. Where Metal is stricter than C++ the emulator is too: at
most 1024 threads and 32 KB of threadgroup memory per threadgroup, no
``double``, and ``strict_check`` (``strict``) compiles the source as Apple's
compiler would judge it. ``profile=True`` counts what a launch did
(``profile``).

    outs = emulator.run(kernel, inputs=[a], output_shapes=[a.shape],
                        output_dtypes=[a.dtype], grid=(n, 1, 1),
                        threadgroup=(256, 1, 1))
    outs = emulator.run_checked(...)        # every schedule + race detector
    outs = emulator.run(..., math="fast")   # Metal's fast-math accuracy
    outs, profile = emulator.run(..., profile=True)
    report = emulator.strict_check(...)     # StrictError if a Mac would refuse it

    with emulator.metal(math="fast", strict=True):  # the project's Metal ops run here
        y = mlx_flash.scaled_dot_product_attention(q, k, v, scale=s, variant="practical")
"""


import contextlib

from . import context
from .build import cache_dir, compiler
from .errors import (
    CompileError,
    CompilerNotFoundError,
    DivergenceError,
    EmulatorError,
    OrderDependentWarning,
    RaceError,
    StrictError,
)
from .execute import CHECKED_SCHEDULES, MATH, SCHEDULES, run, run_checked
from .profile import Profile
from .source import KernelCall
from .strict import StrictReport, strict_check


@contextlib.contextmanager
def metal(schedule=CHECKED_SCHEDULES, math=None, strict=False, profile=False, threadgroups=None):
    """Run the project's Metal kernels through the emulator inside the block.

    ``schedule`` is a name in ``SCHEDULES``, an int seed, or a sequence of
    these (each run with the race detector, ``RaceError`` if the results
    differ or threadgroup memory is accessed without a barrier). ``math``:
    ``"precise"`` or ``"fast"`` (Metal's fast math accuracy), or None for
    each kernel's own (see ``MATH``).
    ``strict``: run ``strict_check`` on every kernel launched. ``profile``:
    count what every launch does. ``threadgroups``: a function of a launch's
    threadgroup counts ``(nx, ny, nz)`` returning the ``(x, y, z)``
    positions to run (see ``run``), to count part of large launches. Yields a ``context.Session`` whose
    ``profiles`` and ``strict_reports`` collect what the launches report.
    Eager mode only: the emulator reads its inputs, so it cannot run inside
    ``mx.compile``.
    """
    session = context.Session(
        schedule=schedule, math=math, strict=strict, profile=profile, threadgroups=threadgroups
    )
    context.push(session)
    try:
        yield session
    finally:
        context.pop()


def is_active() -> bool:
    """True inside ``with mlx_flash.emulator.metal(...)``."""
    return context.current() is not None


def active_schedule():
    """The schedule of the innermost ``metal()`` block ("forward" outside)."""
    session = context.current()
    return session.schedule if session else "forward"
