"""Runs MLX-generated Metal kernel source on the CPU.

MLX generates the full source of an ``mx.fast.metal_kernel`` call (signature,
template instantiation) even without Metal; the emulator compiles it with the
system C++ compiler against ``metal_cpu.h`` and runs every thread as a fiber,
deterministically, in the order a schedule gives. Barriers and SIMD
collectives are rendezvous points, threadgroup memory starts poisoned (0xff
bytes: NaN in every float type), and a race is reported when results differ
between schedules or when two threads touch a threadgroup array element,
one writing, with no barrier between them. Where Metal is stricter than C++
the emulator is too: at most 1024 threads and 32 KB of threadgroup memory per
threadgroup, no ``double``, and ``simdgroup_load`` / ``simdgroup_store`` only
through a pointer to the fragment's own element type.

    outs = emulator.run(kernel, inputs=[a], output_shapes=[a.shape],
                        output_dtypes=[a.dtype], grid=(n, 1, 1),
                        threadgroup=(256, 1, 1))
    outs = emulator.run_checked(...)  # forward and reverse + race detector

    with emulator.metal():            # the project's Metal ops run here
        y = mlx_flash.scaled_dot_product_attention(q, k, v, scale=s, variant="practical")
"""

import contextlib

from .build import cache_dir, compiler
from .errors import (
    CompileError,
    CompilerNotFoundError,
    DivergenceError,
    EmulatorError,
    RaceError,
)
from .execute import run, run_checked

_active = []


@contextlib.contextmanager
def metal(schedule=("forward", "reverse")):
    """Run the project's Metal kernels through the emulator inside the block.

    ``schedule`` is ``"forward"``, ``"reverse"``, an int seed, or a sequence
    of these (each run with the race detector, ``RaceError`` if the results
    differ or threadgroup memory is accessed without a barrier). Eager mode
    only: the emulator reads its inputs, so it cannot run inside
    ``mx.compile``.
    """
    _active.append(schedule)
    try:
        yield
    finally:
        _active.pop()


def is_active() -> bool:
    """True inside ``with mlx_flash.emulator.metal(...)``."""
    return bool(_active)


def active_schedule():
    """The schedule of the innermost ``metal()`` block ("forward" outside)."""
    return _active[-1] if _active else "forward"
