"""Compiling MLX-generated Metal source into a CPU shared library.

The source is compiled unchanged line for line against ``metal_cpu.h``; only
two rewrites are made, each within its line so compiler messages point at
MLX's own line numbers:

- ``[[attributes]]`` are blanked (the header gives them no meaning);
- kernel-scope ``threadgroup T name[N];`` declarations become references to a
  block of per-threadgroup memory, since a fiber's locals are its own.

A small entry function is appended that binds buffer pointers and thread
attributes to the kernel's parameters as the signature declares them.
``__FAST_MATH__`` is defined where MLX's math mode makes Metal define it.

The instrumented build (``instrumented=True``, for the race detector and the
profiler) is compiled with ``-fsanitize=thread``: the compiler then calls
``__tsan_readN`` / ``__tsan_writeN`` before every load and store that may
reach shared memory, and ``metal_cpu.h`` defines those functions, so every
access to threadgroup memory or a buffer is seen by address, through any
pointer or helper. No sanitizer runtime is linked. It carries line tables
(``-g1``) so that an access site found by address maps back to a line of the
kernel source. Libraries are cached on disk by the hash of everything that
goes into them ($MLX_FLASH_EMULATOR_CACHE, else ~/.cache/mlx_flash/emulator).
"""

import ctypes
import dataclasses
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import List, Optional

from .errors import CompileError, CompilerNotFoundError

HEADER = Path(__file__).with_name("metal_cpu.h")
# Included by both metal_cpu.h and the strict pass's metal_strict.h.
SHARED_HEADER = Path(__file__).with_name("metal_shared.h")
FLAGS = [
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-w",
    # Metal's unsuffixed floating literals are float, not double.
    "-fsingle-precision-constant",
]
LINK_FLAGS = ["-shared", "-lm", "-ldl"]

_ATTRIBUTE = re.compile(r"\[\[.*?\]\]")
_TG_DECL = re.compile(
    r"\bthreadgroup\s+([A-Za-z_][\w:<>,\s]*?)\s+([A-Za-z_]\w*)\s*((?:\[[^\]\n]+\]\s*)*);"
)
_KERNEL = re.compile(r"\[\[kernel\]\]\s*void\s+(\w+)\s*\((.*?)\)\s*\{", re.S)
_PARAM = re.compile(r"^\s*(.*?)\s*\b(\w+)\s*\[\[\s*(\w+)\s*(?:\(\s*(\d+)\s*\))?\s*\]\]\s*$", re.S)

_loaded = {}
_memo = {}
_lock = threading.Lock()


@dataclasses.dataclass
class Param:
    """One kernel parameter: a buffer (``index`` set) or a thread attribute."""

    type: str
    name: str
    attribute: str
    index: Optional[int]


@dataclasses.dataclass
class Kernel:
    """A compiled kernel: its host name, parameters and library."""

    name: str
    params: List[Param]
    library: ctypes.CDLL
    path: Path
    instrumented: bool


def parse_signature(source: str):
    """The kernel's host name, template arguments and parameters."""
    m = _KERNEL.search(source)
    if m is None:
        raise ValueError("no [[kernel]] function in the generated source")
    name = m.group(1)
    params = []
    for text in re.split(r",\s*\n", m.group(2).strip()):
        p = _PARAM.match(text)
        if p is None:
            raise ValueError(f"cannot read kernel parameter {text!r}")
        ptype, pname, attr, index = p.groups()
        params.append(
            Param(ptype, pname, attr, int(index) if attr == "buffer" else None)
        )
    inst = re.search(r"decltype\(\s*" + name + r"\s*(<[^()]*>)?\s*\)", source)
    template_args = inst.group(1) if inst and inst.group(1) else ""
    return name, template_args, params


def _rewrite_line(line: str) -> str:
    line = _ATTRIBUTE.sub(lambda m: " " * len(m.group(0)), line)

    def tg(m):
        ctype, name, dims = m.group(1).strip(), m.group(2), m.group(3) or ""
        dims = re.sub(r"\s+", "", dims) if dims.strip() else ""
        return f'auto& {name} = ::mtl::tg_var<{ctype}{dims}>(MTL_TG_KEY, "{name}");'

    return _TG_DECL.sub(tg, line)


def translate(source: str, math_mode: str = "safe", instrumented: bool = False) -> str:
    """C++ text for ``source``: rewritten kernel plus its entry function.

    ``math_mode`` is MLX's (``"safe"``, ``"relaxed"``, ``"fast"``): Metal
    defines ``__FAST_MATH__`` in fast mode only. ``instrumented`` compiles
    the runtime's race detector and counters in (``MTL_TRACE``).
    """
    name, template_args, params = parse_signature(source)
    body = "\n".join(_rewrite_line(l) for l in source.split("\n"))
    defines = ""
    if instrumented:
        defines += "#define MTL_TRACE 1\n"
    if math_mode == "fast":
        defines += "#define __FAST_MATH__ 1\n"
    args = []
    for p in params:
        if p.index is not None:
            args.append(f"::mtl::bind<{p.type}>(bufs[{p.index}])")
        else:
            args.append(f"a.{p.attribute}")
    entry = (
        "static void mtl_kernel_entry(void** bufs, const ::mtl::Attrs& a) {\n"
        f"  {name}{template_args}(\n    " + ",\n    ".join(args) + ");\n}\n"
    )
    return (
        f'{defines}#include "{HEADER}"\n#line 1 "kernel.metal"\n'
        + body
        + '\n#line 1 "emulator_entry.cpp"\n'
        + entry
    )


def compiler() -> str:
    """Path of the C++ compiler: $CXX, else g++, clang++ or c++."""
    for candidate in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise CompilerNotFoundError(
        "The Metal emulator needs a C++17 compiler (g++ or clang++) and found "
        "none on PATH. Install one (e.g. `apt-get install g++`) or set $CXX."
    )


def cache_dir() -> Path:
    d = os.environ.get("MLX_FLASH_EMULATOR_CACHE")
    path = Path(d) if d else Path.home() / ".cache" / "mlx_flash" / "emulator"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compile_error(source: str, message: str) -> CompileError:
    """A CompileError quoting the compiler and the kernel lines it names."""
    lines = source.split("\n")
    first = re.search(r"kernel\.metal:(\d+):(?:(\d+):)?\s*(?:fatal )?error:", message)
    errors = [l for l in message.splitlines() if "error" in l]
    text = ["Metal kernel failed to compile for the CPU emulator:"]
    text += ["  " + l for l in errors[:8]]
    if first:
        n = int(first.group(1))
        text.append("Generated source around line %d:" % n)
        for i in range(max(1, n - 3), min(len(lines), n + 3) + 1):
            mark = ">>" if i == n else "  "
            text.append(f"{mark} {i:4d} | {lines[i - 1]}")
    return CompileError("\n".join(text))


# Headers a kernel's own header may include; metal_cpu.h already defines
# what they declare, so they are empty here.
METAL_HEADERS = [
    "metal_stdlib",
    "metal_atomic",
    "metal_compute",
    "metal_math",
    "metal_simdgroup",
    "metal_simdgroup_matrix",
    "simd/simd.h",
]


def _stub_include_dir() -> Path:
    d = cache_dir() / "include"
    for name in METAL_HEADERS:
        path = d / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("#pragma once\n")
    return d


def flags() -> List[str]:
    """Compiler flags; MLX_FLASH_EMULATOR_UCONTEXT=1 switches fibers with
    ucontext instead of the x86-64 register switch (slower, portable)."""
    extra = ["-DMTL_USE_UCONTEXT"] if os.environ.get("MLX_FLASH_EMULATOR_UCONTEXT") == "1" else []
    return FLAGS + extra + ["-I", str(_stub_include_dir())]


@functools.lru_cache(maxsize=None)
def is_clang(cxx: str) -> bool:
    """Whether ``cxx`` is Clang (its flags for the instrumentation differ)."""
    proc = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return "clang" in proc.stdout.lower()


def instrument_flags(cxx: str) -> List[str]:
    """Flags of the instrumented build: memory accesses call the header's
    __tsan_* functions (function entry and exit do not), with line tables."""
    if is_clang(cxx):
        param = ["-mllvm", "-tsan-instrument-func-entry-exit=0"]
    else:
        param = ["--param=tsan-instrument-func-entry-exit=0"]
    return ["-fsanitize=thread", "-g1", *param]


def load(source: str, math_mode: str = "safe", instrumented: bool = False) -> Kernel:
    """The compiled kernel for MLX-generated ``source`` (cached), built for
    MLX's ``math_mode``; ``instrumented`` builds it with the race detector
    and the counters."""
    memo_key = (
        source,
        math_mode,
        instrumented,
        os.environ.get("MLX_FLASH_EMULATOR_UCONTEXT"),
        os.environ.get("MLX_FLASH_EMULATOR_CACHE"),
        os.environ.get("CXX"),
        os.environ.get("PATH"),
    )
    kernel = _memo.get(memo_key)
    if kernel is None:
        kernel = _memo[memo_key] = _load(source, math_mode, instrumented)
    return kernel


def _run_compiler(args: List[str], source: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise _compile_error(source, proc.stderr)


def _load(source: str, math_mode: str, instrumented: bool) -> Kernel:
    name, _, params = parse_signature(source)
    cpp = translate(source, math_mode, instrumented)
    cxx = compiler()
    opts = flags() + (instrument_flags(cxx) if instrumented else [])
    key = hashlib.sha256(
        "\0".join(
            [cpp, HEADER.read_text(), SHARED_HEADER.read_text(), cxx, " ".join(opts + LINK_FLAGS)]
        ).encode()
    ).hexdigest()[:32]
    path = cache_dir() / f"{name[:60]}-{key}.so"
    with _lock:
        if path in _loaded:
            return Kernel(name, params, _loaded[path], path, instrumented)
        if not path.exists():
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "kernel.cpp"
                src.write_text(cpp)
                obj = Path(tmp) / "kernel.o"
                out = Path(tmp) / "kernel.so"
                # Compiling and linking apart keeps GCC from linking its
                # sanitizer runtime into the instrumented build.
                _run_compiler([cxx, *opts, "-c", str(src), "-o", str(obj)], source)
                _run_compiler([cxx, str(obj), "-o", str(out), *LINK_FLAGS], source)
                # Rename into place so concurrent builders never see half a file.
                tmp_target = path.with_suffix(f".{os.getpid()}.tmp")
                shutil.copyfile(out, tmp_target)
                os.replace(tmp_target, path)
        lib = ctypes.CDLL(str(path))
        lib.mtl_run.restype = ctypes.c_int
        lib.mtl_run.argtypes = [ctypes.c_void_p]
        lib.mtl_counter_names.restype = ctypes.c_char_p
        _loaded[path] = lib
        return Kernel(name, params, lib, path, instrumented)
