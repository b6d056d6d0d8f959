"""Which BLAS MLX's CPU matrix products run on, and an optimized one on Linux.

MLX's Linux CPU wheel (``mlx[cpu]``) links the reference BLAS from LAPACK
(``mlx_cpu.libs/libblas-*.so.3.10.0``): a float32 ``(2048, 2048)`` product
runs there at well under 1 GFLOP/s on a laptop-class core. MLX calls
``cblas_sgemm`` through the dynamic linker's global scope, so a BLAS loaded
ahead of it with ``LD_PRELOAD`` (Debian's OpenBLAS:
``/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3``) takes those
calls with no change to MLX; results differ by rounding only. float16 and
bfloat16 products do not go through BLAS and are unaffected. On macOS MLX
uses Accelerate and nothing here applies.

``LD_PRELOAD`` is read when a process starts, so the project's commands
(``python -m mlx_flash.finetune | bench | doctor | plan``) re-execute
themselves once with the library preloaded (:func:`reexec_with_fast_blas`).
The environment variable ``MLX_FLASH_BLAS`` steers it: unset picks the first
optimized BLAS found, a path names the library to preload, and ``off`` keeps
whatever the process started with.
"""

import ctypes
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

ENV = "MLX_FLASH_BLAS"
#: Set in the re-executed process so it never re-executes again.
_REEXECUTED = "MLX_FLASH_BLAS_REEXECUTED"

#: Optimized BLAS libraries that export ``cblas_sgemm``, in order of
#: preference (Debian and Ubuntu paths; OpenBLAS's pthread build first).
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/blis-pthread/libblas.so.3",
)

#: The line a user on Debian or Ubuntu runs to get one.
INSTALL_HINT = "sudo apt-get install libopenblas0-pthread"


def _disabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("off", "0", "no", "false", "none")


def optimized_library() -> Optional[str]:
    """The optimized BLAS to preload on this machine, or None.

    ``MLX_FLASH_BLAS=/path/libblas.so`` names one; otherwise the first of
    :data:`CANDIDATES` that exists. None on macOS, or when disabled.
    """
    if sys.platform != "linux" or _disabled():
        return None
    named = os.environ.get(ENV, "").strip()
    if named:
        return named if os.path.exists(named) else None
    for path in CANDIDATES:
        if os.path.exists(path):
            return path
    return None


def _preloaded() -> List[str]:
    return [p for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if p]


def reexec_with_fast_blas() -> None:
    """Re-execute this command with an optimized BLAS preloaded, once.

    Called first thing by the project's command-line entry points (never by
    library code: it replaces the process). Does nothing on macOS, when
    ``MLX_FLASH_BLAS=off``, when no optimized BLAS is installed, when the
    library is already preloaded, or in the re-executed process itself.
    """
    library = optimized_library()
    if library is None or os.environ.get(_REEXECUTED) or library in _preloaded():
        return
    argv = list(getattr(sys, "orig_argv", []) or [])
    if len(argv) < 2:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join([library] + _preloaded())
    env[_REEXECUTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable] + argv[1:], env)
    except OSError:
        return  # run on as we are: slower, never wrong


@dataclass(frozen=True)
class Blas:
    """The library that serves MLX's ``cblas_sgemm`` in this process."""

    path: str
    kind: str  # "OpenBLAS", "BLIS", "MKL", "Accelerate", "reference", "unknown"

    @property
    def optimized(self) -> bool:
        return self.kind not in ("reference", "unknown")

    def __str__(self) -> str:
        return f"{self.kind} ({self.path})" if self.path else self.kind


def _kind(path: str) -> str:
    name = os.path.basename(path).lower()
    if "openblas" in path.lower():
        return "OpenBLAS"
    if "blis" in path.lower():
        return "BLIS"
    if "mkl" in name:
        return "MKL"
    if "accelerate" in path.lower() or "veclib" in path.lower():
        return "Accelerate"
    if name.startswith("libblas"):
        return "reference"
    return "unknown"


def _mapping_of(address: int) -> str:
    """The file mapped at ``address`` in this process (Linux ``/proc``)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi and len(fields) >= 6:
                return os.path.realpath(fields[5])
    return ""


def _mapped_blas() -> str:
    """A BLAS library file mapped into this process, or ""."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            # numpy's bundled scipy_openblas exports other symbol names,
            # so only the usual BLAS file names count.
            name = os.path.basename(fields[-1]).lower() if len(fields) >= 6 else ""
            if name.startswith(("libblas", "libopenblas", "libblis", "libmkl_rt")):
                return os.path.realpath(fields[5])
    return ""


def in_use() -> Blas:
    """Which BLAS MLX's float32 matrix products call in this process.

    Resolves ``cblas_sgemm`` the way the dynamic linker resolves MLX's call
    (global scope, preloaded libraries first) after MLX is loaded, and names
    the file that holds it. MLX's own BLAS is loaded local to its extension,
    outside the global scope: when nothing global answers, the BLAS MLX
    loaded is the one it calls.
    """
    import mlx.core  # noqa: F401  (loads MLX's own BLAS into the process)

    if sys.platform == "darwin":
        return Blas("", "Accelerate")
    try:
        address = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
        path = _mapping_of(address) if address else ""
    except (AttributeError, OSError, ValueError):
        path = ""
    path = path or _mapped_blas()
    if not path:
        return Blas("", "unknown")
    return Blas(path, _kind(path))


def sgemm_gflops(n: int = 1024, repeats: int = 3) -> float:
    """Measured float32 ``(n, n) @ (n, n)`` GFLOP/s on MLX's CPU stream:
    the best of ``repeats`` timed products after one warm-up."""
    import mlx.core as mx

    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a, b)
    best = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        mx.eval(mx.matmul(a, b, stream=mx.cpu))
        elapsed = time.perf_counter() - start
        if i:
            best = min(best, elapsed)
    return 2 * n**3 / best / 1e9


def advice(blas: Blas) -> Optional[str]:
    """What to do when MLX runs on the reference BLAS, else None."""
    if blas.optimized or sys.platform != "linux":
        return None
    if _disabled():
        return f"MLX is on the reference BLAS because {ENV}=off"
    found = optimized_library()
    if found:
        return (
            f"MLX is on the reference BLAS; {found} is installed: run with "
            f"LD_PRELOAD={found} (the mlx_flash commands do this themselves)"
        )
    return f"MLX is on the reference BLAS (float32 products 30x+ slower): {INSTALL_HINT}"


def describe(measure: bool = True) -> str:
    """One line naming the BLAS (and, if ``measure``, its GFLOP/s)."""
    blas = in_use()
    line = f"BLAS: {blas}"
    if measure:
        line += f", float32 1024^3 product at {sgemm_gflops():.1f} GFLOP/s"
    return line
