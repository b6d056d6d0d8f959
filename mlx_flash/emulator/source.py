"""The full Metal source MLX generates for a kernel call.

MLX writes the kernel signature (buffers, ``*_shape``/``*_strides``/``*_ndim``,
thread attributes) and the template instantiation itself. Without Metal it
still does so while tracing for ``mx.export_function``, and with
``verbose=True`` it prints the result to the C++ standard output, which is
captured here at the file-descriptor level.
"""

import ctypes
import os
import sys
import tempfile
import threading

import mlx.core as mx

_MARKER = "Generated source code for `"
_lock = threading.Lock()
_libc = ctypes.CDLL(None)


def _capture_stdout(fn) -> str:
    """Run ``fn()`` and return what it wrote to file descriptor 1."""
    sys.stdout.flush()
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(1)
        try:
            os.dup2(tmp.fileno(), 1)
            try:
                fn()
            finally:
                _libc.fflush(None)
                os.dup2(saved, 1)
        finally:
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode("utf-8", errors="replace")


def generated_source(kernel, inputs, call: dict) -> str:
    """The Metal source (header, kernel template, instantiation) that MLX
    would compile for ``kernel(inputs=inputs, **call)``."""

    def traced(*xs):
        return kernel(inputs=list(xs), verbose=True, **call)

    def export():
        with tempfile.TemporaryDirectory() as d:
            mx.export_function(os.path.join(d, "k.mlxfn"), traced, *inputs)

    with _lock:
        text = _capture_stdout(export)
    at = text.find(_MARKER)
    if at < 0:
        raise RuntimeError(
            "MLX did not print the kernel source while tracing; this MLX "
            f"version is not supported by the emulator ({mx.__version__})."
        )
    start = text.index("```\n", at) + 4
    end = text.index("\n```", start)
    return text[start:end] + "\n"
