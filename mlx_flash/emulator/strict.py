"""The strict pass: what Apple's Metal compiler would reject.

The CPU build compiles kernels as lenient C++17 (address-space qualifiers
are empty, overloads are templates, warnings are off), so it accepts code a
Mac refuses. The strict pass compiles the same MLX-generated source once
more, syntax only, with clang >= 17 in C++14 mode (MSL 3.x is C++14) against
``metal_strict.h``: ``device``, ``constant`` and ``threadgroup`` are real
address spaces, ``half`` and ``bfloat`` distinct types, each math function
has one overload per type, ``double`` and ``std::`` do not exist, and every
warning is an error except the C++17 extensions Metal accepts. Then it
checks what clang cannot: every program-scope variable must be in the
``constant`` address space. ``__FAST_MATH__`` and ``__METAL_VERSION__``
(310, MSL 3.1, the oldest MLX 0.32 compiles for) are defined as on a Mac.

MLX puts an input of fewer than 8 elements in ``constant`` memory and a
larger one in ``device`` memory, and a helper that takes one kind of pointer
does not compile with the other, so ``check_call`` checks the kernel as
called, with every input tiny, and with every input large.

Results are cached on disk like the CPU builds.
"""

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx

from . import build, source
from .errors import CompilerNotFoundError, StrictError

HEADER = Path(__file__).with_name("metal_strict.h")
MIN_CLANG = 17
# Shared by the precompiled header and the kernel: clang checks they agree.
FLAGS = [
    "-std=c++14",
    "-nostdinc",
    "-nostdinc++",
    "-ffreestanding",
    "-Werror",
    # Metal accepts C++17 extensions (if constexpr, fold expressions, ...)
    # in its C++14 dialect.
    "-Wno-c++17-extensions",
    "-Wvla",
    "-D__METAL_VERSION__=310",
]
# The kernel's AST (not the header's, which is precompiled) comes back as
# JSON for the program-scope and threadgroup-memory checks.
KERNEL_FLAGS = ["-x", "c++", "-fsyntax-only", "-Xclang", "-ast-dump=json"]

# MLX puts an input of fewer than this many elements in constant memory
# (max_constant_array_size in MLX's backend/common/metal_kernel.cpp).
CONSTANT_ELEMENTS = 8

_VECTOR = r"(?:float|half|bfloat|int|uint|short|ushort|char|uchar|long|ulong|bool)[234]"
_VECTOR_CALL = re.compile(r"(?<![\w.:>])(?:(?:metal)?::)?(" + _VECTOR + r"|vec<[^<>()]*>)\s*\(")

_SPACES = {"device": 1, "constant": 2, "threadgroup": 3}
_SPACE_NAMES = {number: name for name, number in _SPACES.items()}
_SPACE = re.compile(r"__attribute__\(\(address_space\((\d+)\)\)\)|\b(device|constant|threadgroup)\b")

# Element sizes of threadgroup arrays, as clang spells the types.
_SIZES = {
    "float": 4, "int": 4, "unsigned int": 4, "uint": 4, "half": 2, "_Float16": 2,
    "bfloat": 2, "__bf16": 2, "bfloat16_t": 2, "float16_t": 2, "short": 2,
    "unsigned short": 2, "ushort": 2, "char": 1, "signed char": 1, "unsigned char": 1,
    "uchar": 1, "bool": 1, "long": 8, "unsigned long": 8, "ulong": 8,
    "int64_t": 8, "uint64_t": 8, "int32_t": 4, "uint32_t": 4, "int16_t": 2,
    "uint16_t": 2, "int8_t": 1, "uint8_t": 1,
}


@dataclasses.dataclass(frozen=True)
class StrictReport:
    """A kernel that passed the strict pass.

    ``threadgroup_bytes``: each threadgroup array of the kernel and its size
    in bytes (None where the element type's size is not known); ``sources``:
    how many distinct generated sources (address-space variants) were
    compiled.
    """

    kernel: str
    threadgroup_bytes: Dict[str, Optional[int]]
    sources: int = 1

    @property
    def total_threadgroup_bytes(self) -> Optional[int]:
        sizes = list(self.threadgroup_bytes.values())
        return None if None in sizes else sum(sizes)

    def __str__(self) -> str:
        arrays = ", ".join(
            f"{n} {s if s is not None else '?'} B" for n, s in self.threadgroup_bytes.items()
        )
        total = self.total_threadgroup_bytes
        return (
            f"kernel {self.kernel}: strict pass ok ({self.sources} source"
            f"{'s' if self.sources != 1 else ''}); threadgroup memory "
            f"{total if total is not None else '?'} bytes" + (f" ({arrays})" if arrays else "")
        )


@functools.lru_cache(maxsize=None)
def _clang_version(path: str) -> int:
    proc = subprocess.run([path, "--version"], capture_output=True, text=True)
    m = re.search(r"clang version (\d+)", proc.stdout)
    return int(m.group(1)) if m else 0


def clang() -> str:
    """Path of the strict pass's compiler: $MLX_FLASH_STRICT_CLANG as given
    (Apple's clang numbers its versions apart from LLVM's), else the newest
    of clang++-25 ... clang++-17 and clang++ that is clang 17 or later."""
    chosen = os.environ.get("MLX_FLASH_STRICT_CLANG")
    if chosen and shutil.which(chosen):
        return shutil.which(chosen)
    names = [f"clang++-{v}" for v in range(25, MIN_CLANG - 1, -1)] + ["clang++"]
    for name in names:
        path = shutil.which(name)
        if path and _clang_version(path) >= MIN_CLANG:
            return path
    raise CompilerNotFoundError(
        f"The strict pass needs clang++ {MIN_CLANG} or newer and found none on PATH. "
        "Install one (e.g. `apt-get install clang-19`) or set $MLX_FLASH_STRICT_CLANG."
    )


def translate(text: str, math_mode: str) -> str:
    """The strict TU for MLX-generated ``text``, line for line: attributes
    blanked, threadgroup arrays of the kernel body made static (clang allows
    an address space only on variables with static storage), and vector
    constructors rewritten to ``metal::make_vector``."""
    lines = text.split("\n")
    in_kernel = False
    out = []
    for line in lines:
        if "[[kernel]]" in line and not line.lstrip().startswith("template ["):
            in_kernel = True
        line = build._ATTRIBUTE.sub(lambda m: " " * len(m.group(0)), line)
        if in_kernel:
            line = build._TG_DECL.sub(lambda m: "static " + m.group(0), line)
        line = _VECTOR_CALL.sub(lambda m: f"::metal::make_vector<{m.group(1)}>(", line)
        out.append(line)
    defines = "#define __FAST_MATH__ 1\n" if math_mode == "fast" else ""
    return f'{defines}#line 1 "kernel.metal"\n' + "\n".join(out) + "\n"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _headers() -> str:
    return HEADER.read_text() + build.SHARED_HEADER.read_text()


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _precompiled_header(tool: str) -> Path:
    """metal_strict.h precompiled for ``tool`` (cached). A wrapper next to it
    includes the header, so that its ``#pragma clang system_header`` applies
    (clang ignores it in a main file) and the PCH finds what it was built
    from."""
    key = _digest(_headers(), tool, str(_clang_version(tool)), " ".join(FLAGS))
    path = build.cache_dir() / f"strict-header-{key}.pch"
    if not path.exists():
        wrapper = path.with_suffix(".h")
        wrapper.write_text(f'#include "{HEADER}"\n')
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "header.pch"
            proc = subprocess.run(
                [tool, "-x", "c++-header", *FLAGS, str(wrapper), "-o", str(out)],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                raise StrictError(f"metal_strict.h does not compile with {tool}:\n{proc.stderr}")
            _write_atomically(path, out.read_bytes())
    return path


def _error(name: str, text: str, message: str) -> StrictError:
    """A StrictError with clang's errors and the kernel lines they name."""
    lines = text.split("\n")
    diagnostics = [l for l in message.splitlines() if re.search(r"\b(error|warning|note):", l)]
    out = [f"kernel {name} does not pass the strict pass (what Apple's Metal compiler rejects):"]
    for diagnostic in diagnostics[:8]:
        diagnostic = diagnostic.replace(str(HEADER), "metal_strict.h")
        for number, space in _SPACE_NAMES.items():
            diagnostic = diagnostic.replace(f"address space '{number}'", f"the {space} address space")
        out.append("  " + diagnostic)
        m = re.search(r"kernel\.metal:(\d+):", diagnostic)
        if m and 1 <= int(m.group(1)) <= len(lines):
            n = int(m.group(1))
            out.append(f"  >> {n:4d} | {lines[n - 1]}")
    if len(diagnostics) > 8:
        out.append(f"  ... and {len(diagnostics) - 8} more")
    return StrictError("\n".join(out))


class _Locations:
    """Tracks the presumed file of clang's JSON AST nodes, which name a file
    only when it changes from the node printed before."""

    def __init__(self):
        self.file = None

    def file_of(self, node: dict) -> Optional[str]:
        for key in ("loc", "range"):
            where = node.get(key) or {}
            for loc in (where, where.get("begin") or {}, where.get("spellingLoc") or {},
                        where.get("expansionLoc") or {}):
                name = loc.get("presumedFile") or loc.get("file")
                if name:
                    self.file = name
        return self.file


def _size_of(type_text: str) -> Optional[int]:
    m = re.match(r"^(.*?)((?:\[\d+\])*)$", type_text.strip())
    element, dims = m.group(1).strip(), m.group(2)
    element = element.replace("const ", "").replace("volatile ", "").strip()
    count = 1
    for d in re.findall(r"\[(\d+)\]", dims):
        count *= int(d)
    element = re.sub(r"^metal::", "", element)
    # A vector: clang's spelling, or Metal's name (float4); a 3-vector has
    # the size of a 4-vector.
    vector = re.match(r"^(.*?)\s*__attribute__\(\(ext_vector_type\((\d+)\)\)\)$", element)
    vector = vector or re.match(r"^([a-z]+?)([234])$", element)
    vector = vector or re.match(r"^vec<\s*([\w ]+?)\s*,\s*(\d+)\s*>$", element)  # the vec<T, N> alias
    lanes = 1
    if vector and vector.group(1).strip() in _SIZES:
        element, lanes = vector.group(1).strip(), int(vector.group(2))
        lanes = 4 if lanes == 3 else lanes
    atomic = re.match(r"^_Atomic\((.*)\)$", element)
    if atomic:
        element = atomic.group(1).strip()
    size = _SIZES.get(element)
    return None if size is None else size * lanes * count



def _address_space(node: dict) -> Optional[int]:
    """The address space of a VarDecl's type (clang spells it with the
    macro's name where the attribute came from one)."""
    t = node.get("type", {})
    for text in (t.get("desugaredQualType"), t.get("qualType")):
        m = _SPACE.search(text or "")
        if m:
            return int(m.group(1)) if m.group(1) else _SPACES[m.group(2)]
    return None


def _threadgroup_arrays(node: dict, arrays: Dict[str, Optional[int]]) -> None:
    """The threadgroup variables declared in ``node`` (a kernel's body)."""
    t = node.get("type", {})
    pointer = re.search(r"[*&]", t.get("qualType", ""))
    if node.get("kind") == "VarDecl" and not pointer and _address_space(node) == 3:
        element = _SPACE.sub("", t.get("desugaredQualType") or t.get("qualType", "")).strip()
        size = _size_of(element)
        # A template's own declaration has dependent sizes (float[BQ]); its
        # instantiation's are numbers: keep a known size over an unknown one.
        if size is not None or node.get("name") not in arrays:
            arrays[node.get("name")] = size
    for child in node.get("inner", []) or []:
        _threadgroup_arrays(child, arrays)


def _inspect(ast: dict, kernel: str, text: str) -> Dict[str, Optional[int]]:
    """Raise StrictError for a program-scope variable outside the constant
    address space; return the kernel's threadgroup arrays and their sizes."""
    locations = _Locations()
    lines = text.split("\n")
    arrays: Dict[str, Optional[int]] = {}
    # Program scope: the translation unit, namespaces, extern "C" blocks.
    scopes = {"TranslationUnitDecl", "NamespaceDecl", "LinkageSpecDecl"}

    def visit(node, program_scope):
        file = locations.file_of(node)
        kind = node.get("kind")
        in_kernel_file = bool(file) and file.endswith("kernel.metal")
        if kind == "VarDecl" and program_scope and in_kernel_file and not node.get("isImplicit"):
            if _address_space(node) != 2:
                line = (node.get("loc") or {}).get("presumedLine") or (node.get("loc") or {}).get("line")
                quoted = f"\n  >> {line:4d} | {lines[line - 1]}" if line and line <= len(lines) else ""
                raise StrictError(
                    f"kernel {kernel}: program-scope variable `{node.get('name')}` is not in "
                    "the constant address space; Metal requires `constant` on every "
                    f"program-scope variable{quoted}"
                )
        if kind == "FunctionDecl" and node.get("name") == kernel and node.get("inner"):
            _threadgroup_arrays(node, arrays)
        inner_scope = kind in scopes
        for child in node.get("inner", []) or []:
            # Templates: a variable template's VarDecl is still program scope.
            visit(child, inner_scope or (program_scope and kind == "VarTemplateDecl"))

    visit(ast, True)
    return arrays


@functools.lru_cache(maxsize=256)
def check_source(text: str, math_mode: str = "safe") -> StrictReport:
    """Strict-check one MLX-generated source; raise ``StrictError``."""
    name, _, _ = build.parse_signature(text)
    tu = translate(text, math_mode)
    tool = clang()
    opts = FLAGS + KERNEL_FLAGS + ["-I", str(build._stub_include_dir())]
    key = _digest(tu, _headers(), tool, str(_clang_version(tool)), " ".join(opts))
    cached = build.cache_dir() / f"strict-{name[:60]}-{key}.json"
    if cached.exists():
        result = json.loads(cached.read_text())
    else:
        pch = _precompiled_header(tool)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "kernel.cpp"
            src.write_text(tu)
            proc = subprocess.run(
                [tool, *opts, "-include-pch", str(pch), str(src)], capture_output=True, text=True
            )
        # What clang said is cached; the checks on its AST run every time.
        result = {"error": proc.stderr} if proc.returncode else {"ast": json.loads(proc.stdout)}
        _write_atomically(cached, json.dumps(result).encode())
    if "error" in result:
        raise _error(name, text, result["error"])
    return StrictReport(name, _inspect(result["ast"], name, text))


def _resized(x: mx.array, elements: int) -> mx.array:
    """An array of ``x``'s dtype and rank with ``elements`` elements (a 0-d
    input stays as it is: MLX passes it by reference either way)."""
    if x.ndim == 0:
        return x
    return mx.zeros((elements,) + (1,) * (x.ndim - 1), dtype=x.dtype)


def check_call(kernel, call: source.KernelCall, captured=None) -> StrictReport:
    """Strict-check ``kernel`` called with ``call`` as called and with
    every input in constant, then in device memory."""
    captured = captured or source.capture(kernel, call)
    variants = {captured.source: "as called"}
    for elements, where in ((1, "constant"), (CONSTANT_ELEMENTS, "device")):
        resized = call.with_inputs([_resized(x, elements) for x in call.inputs])
        text = source.capture(kernel, resized).source
        variants.setdefault(
            text, f"with every input of {elements} element{'s' if elements > 1 else ''} "
            f"(which MLX passes in {where} memory)"
        )
    reports: List[StrictReport] = []
    for text, how in variants.items():
        try:
            reports.append(check_source(text, captured.math_mode))
        except StrictError as e:
            raise StrictError(f"{e}\n(the kernel generated {how})") from None
    return dataclasses.replace(reports[0], sources=len(variants))


def strict_check(
    kernel,
    inputs: Sequence,
    output_shapes: Sequence[Sequence[int]],
    output_dtypes: Sequence,
    grid: Sequence[int],
    threadgroup: Sequence[int],
    template: Optional[Sequence] = None,
    init_value: Optional[float] = None,
) -> StrictReport:
    """Check that Apple's Metal compiler would accept ``kernel`` for this
    call (the arguments of ``emulator.run``); raise ``StrictError`` with
    clang's message and the kernel source lines it names if not. Returns a
    ``StrictReport`` (threadgroup memory per array)."""
    call = source.KernelCall.of(inputs, output_shapes, output_dtypes, grid, threadgroup, template, init_value)
    return check_call(kernel, call)
