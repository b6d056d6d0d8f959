"""Metal kernel sources and launches.

Kernel bodies live in ``metal/*.metal`` (shipped in the wheel as
``mlx_flash.metal``) in the form ``mx.fast.metal_kernel`` takes: a body, plus
an optional header of helpers. ``build`` makes each kernel object once and
caches it; ``launch`` runs it on real Metal, or through the CPU emulator when
``mlx_flash.emulator.metal()`` is active.

The kernels depend on IEEE semantics for infinities: ``-INFINITY`` marks keys
past the end and empty running maxima, ``exp(-inf) == 0`` drops them, and
``isinf`` / ``== -INFINITY`` tests tell an additive ``-inf`` mask from a
finite one. Metal's fast math may assume no infinities and fold those tests
away, so every kernel is built with ``math_mode="safe"`` explicitly rather
than relying on MLX's default.
"""

import functools
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx

from . import emulator


def backend() -> Optional[str]:
    """Where Metal kernels run now: ``"emulator"``, ``"metal"``, or None."""
    if emulator.is_active():
        return "emulator"
    if mx.metal.is_available():
        return "metal"
    return None


def source_folder():
    """The folder of the kernel sources: ``mlx_flash.metal`` where the
    package is installed, the repository's ``metal/`` in a bare source tree
    (``PYTHONPATH=.`` or an unpacked sdist, where only the install maps
    ``metal/`` into the package)."""
    try:
        return resources.files("mlx_flash.metal")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "metal"


@functools.lru_cache(maxsize=None)
def source(filename: str) -> str:
    """Text of ``metal/<filename>``."""
    return source_folder().joinpath(filename).read_text()


@functools.lru_cache(maxsize=None)
def build(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    body_file: str,
    header_files: Sequence[str] = (),
    atomic_outputs: bool = False,
):
    """The ``mx.fast.metal_kernel`` for ``metal/<body_file>``, built once.

    ``header_files`` are joined in order into the kernel's header (MLX
    compiles from a string, so a header cannot ``#include`` another).
    ``input_names``, ``output_names`` and ``header_files`` must be tuples
    (they are cache keys). Template constants (tile sizes, dtypes) are passed
    per launch, so one kernel object serves every dtype and shape.
    """
    return mx.fast.metal_kernel(
        name=name,
        input_names=list(input_names),
        output_names=list(output_names),
        source=source(body_file),
        header="\n".join(source(f) for f in header_files),
        ensure_row_contiguous=False,
        atomic_outputs=atomic_outputs,
        # The -inf handling above needs IEEE special values (see module docstring).
        compile_options={"math_mode": "safe"},
    )


def launch(kernel, **call) -> list:
    """Call ``kernel`` with ``mx.fast.metal_kernel``'s keyword arguments
    (``inputs``, ``template``, ``grid``, ``threadgroup``, ``output_shapes``,
    ``output_dtypes``, ``init_value``), on Metal or on the emulator."""
    if emulator.is_active():
        return emulator.run(kernel, **call, schedule=emulator.active_schedule())
    return kernel(**call)
