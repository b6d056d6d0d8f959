"""``python -m mlx_flash.bench --blas``: MLX's float32 products on the BLAS its
Linux wheel ships against the optimized BLAS preloaded, side by side.

Each measurement is a fresh process (``LD_PRELOAD`` is read at start), the
two run in turn (reference, optimized, reference, ...) so that load drift
touches both alike, and each pair gives one ratio; the report is the median
and range of those ratios.
"""

import json
import os
import statistics
import subprocess
import sys
from typing import List

from .. import blas

#: The yardstick: a ``(2048, 2048) @ (2048, 2048)`` float32 product.
SIZE = 2048
TARGET_RATIO = 20.0

_CHILD = (
    "import json, sys\n"
    "from mlx_flash import blas\n"
    "used = blas.in_use()\n"
    "print(json.dumps({'blas': str(used), 'optimized': used.optimized,"
    " 'gflops': blas.sgemm_gflops(int(sys.argv[1]), repeats=2)}))\n"
)


def _measure(size: int, optimized: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_FLASH_BLAS_REEXECUTED")}
    if optimized:
        env["LD_PRELOAD"] = blas.optimized_library()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(size)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(pairs: int = 3, size: int = SIZE) -> int:
    """Print both BLAS's GFLOP/s and their ratio, median and range over
    ``pairs`` interleaved pairs; returns the exit status (2 without an
    optimized BLAS to compare)."""
    if blas.optimized_library() is None:
        print(f"mlx_flash.bench: error: --blas: no optimized BLAS installed ({blas.INSTALL_HINT})", file=sys.stderr)
        return 2
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    print(f"float32 ({size} x {size}) @ ({size} x {size}) on MLX's CPU stream, {pairs} interleaved pairs; load {load}")
    ratios: List[float] = []
    for i in range(pairs):
        slow, fast = _measure(size, optimized=False), _measure(size, optimized=True)
        ratios.append(fast["gflops"] / slow["gflops"])
        print(
            f"  pair {i + 1}: {slow['blas']}: {slow['gflops']:.2f} GFLOP/s | "
            f"{fast['blas']}: {fast['gflops']:.1f} GFLOP/s | {ratios[-1]:.1f}x",
            flush=True,
        )
    median = statistics.median(ratios)
    verdict = "PASS" if median >= TARGET_RATIO else "FAIL"
    print(
        f"optimized / shipped: median {median:.1f}x (range {min(ratios):.1f}-{max(ratios):.1f}x); "
        f"target >= {TARGET_RATIO:.0f}x: {verdict}"
    )
    return 0
