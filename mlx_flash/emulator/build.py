"""Compiling MLX-generated Metal source into a CPU shared library.

The source is compiled unchanged line for line against ``metal_cpu.h``; only
two rewrites are made, each within its line so compiler messages point at
MLX's own line numbers:

- ``[[attributes]]`` are blanked (the header gives them no meaning);
- kernel-scope ``threadgroup T name[N];`` declarations become references to a
  block of per-threadgroup memory, since a fiber's locals are its own.

A small entry function is appended that binds buffer pointers and thread
attributes to the kernel's parameters as the signature declares them. The
race-detecting build (``trace=True``) also turns each ``name[i][j]`` of a
threadgroup array into ``::mtl::tg_at(name, __LINE__, (i), (j))``, the same
element seen by the detector. Libraries are cached on disk by the hash of
everything that goes into them ($MLX_FLASH_EMULATOR_CACHE, else
~/.cache/mlx_flash/emulator).
"""

import ctypes
import dataclasses
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
FLAGS = [
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-shared",
    "-w",
    # Metal's unsuffixed floating literals are float, not double.
    "-fsingle-precision-constant",
]

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
    name: str
    params: List[Param]
    library: ctypes.CDLL


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


def _matching_bracket(text: str, at: int) -> int:
    depth = 0
    for i in range(at, len(text)):
        if text[i] == "[":
            depth += 1
        elif text[i] == "]":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _trace_accesses(text: str, names) -> str:
    """``buf[i][j]`` -> ``::mtl::tg_at(buf, __LINE__, (i), (j))`` for the
    threadgroup arrays ``names``, so the race detector sees each access.
    Newlines inside an index stay where they are."""
    pattern = re.compile(
        r"(?<![\w.>])(" + "|".join(re.escape(n) for n in names) + r")\s*\["
    )

    def rewrite(s: str) -> str:
        out, i = [], 0
        while True:
            m = pattern.search(s, i)
            if m is None:
                out.append(s[i:])
                return "".join(out)
            out.append(s[i : m.start()])
            j = m.end() - 1
            indices = []
            while j < len(s) and s[j] == "[":
                k = _matching_bracket(s, j)
                if k < 0:
                    raise ValueError("unbalanced brackets")
                indices.append("(" + rewrite(s[j + 1 : k]) + ")")
                j = k + 1
                t = j
                while t < len(s) and s[t] in " \t":
                    t += 1
                if t < len(s) and s[t] == "[":
                    j = t
            out.append(f"::mtl::tg_at({m.group(1)}, __LINE__, {', '.join(indices)})")
            i = j

    return rewrite(text)


def translate(source: str, trace: bool = False) -> str:
    """C++ text for ``source``: rewritten kernel plus its entry function.

    ``trace`` also routes threadgroup array accesses through the race
    detector (compiled with MTL_TRACE).
    """
    name, template_args, params = parse_signature(source)
    body = "\n".join(_rewrite_line(l) for l in source.split("\n"))
    defines = ""
    if trace:
        decls = list(_TG_DECL.finditer(source))
        if decls:
            names = sorted({m.group(2) for m in decls})
            first = body.index("::mtl::tg_var<")
            body = body[:first] + _trace_accesses(body[first:], names)
        defines = "#define MTL_TRACE 1\n"
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


def load(source: str, trace: bool = False) -> Kernel:
    """The compiled kernel for MLX-generated ``source`` (cached); ``trace``
    builds it with the threadgroup-memory race detector."""
    memo_key = (
        source,
        trace,
        os.environ.get("MLX_FLASH_EMULATOR_UCONTEXT"),
        os.environ.get("MLX_FLASH_EMULATOR_CACHE"),
        os.environ.get("CXX"),
        os.environ.get("PATH"),
    )
    kernel = _memo.get(memo_key)
    if kernel is None:
        kernel = _memo[memo_key] = _load(source, trace)
    return kernel


def _load(source: str, trace: bool) -> Kernel:
    name, _, params = parse_signature(source)
    cpp = translate(source, trace)
    cxx = compiler()
    opts = flags()
    key = hashlib.sha256(
        "\0".join([cpp, HEADER.read_text(), cxx, " ".join(opts)]).encode()
    ).hexdigest()[:32]
    path = cache_dir() / f"{name[:60]}-{key}.so"
    with _lock:
        if path in _loaded:
            return Kernel(name, params, _loaded[path])
        if not path.exists():
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "kernel.cpp"
                src.write_text(cpp)
                out = Path(tmp) / "kernel.so"
                proc = subprocess.run(
                    [cxx, *opts, str(src), "-o", str(out), "-lm"],
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    raise _compile_error(source, proc.stderr)
                # Rename into place so concurrent builders never see half a file.
                tmp_target = path.with_suffix(f".{os.getpid()}.tmp")
                shutil.copyfile(out, tmp_target)
                os.replace(tmp_target, path)
        lib = ctypes.CDLL(str(path))
        lib.mtl_run.restype = ctypes.c_int
        lib.mtl_run.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_uint32),
            ctypes.POINTER(ctypes.c_uint32),
            ctypes.c_int,
            ctypes.c_uint64,
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        _loaded[path] = lib
        return Kernel(name, params, lib)
