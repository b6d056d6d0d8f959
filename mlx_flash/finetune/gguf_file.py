"""The header of a GGUF file: its scalar metadata and its table of tensors.

``mx.load(path, return_metadata=True)`` reads a GGUF's tensors and metadata,
but it hides how each tensor was stored: Q4_0, Q4_1 and Q8_0 come back as
MLX-quantized ``weight``/``scales``/``biases`` triples, F32/F16/BF16 as they
are, and every other type (the K-quants, the I-quants) silently dequantized
to float16, four times the memory, or not at all. This reader walks the
header itself, so a loader can name a tensor type it does not take before it
loads anything.

The layout (GGUF versions 2 and 3, little-endian)::

    "GGUF"  u32 version  u64 tensor_count  u64 metadata_count
    metadata_count x (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, n_dims x u64 dim, u32 ggml_type, u64 offset)

where a string is a u64 byte length and UTF-8 bytes, and an array value is
``u32 item_type, u64 count, items``. Arrays are skipped here (the token list
and the merges are read by ``mx.load``); scalars and strings are kept.
"""

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple, Union

MAGIC = b"GGUF"
VERSIONS = (2, 3)

#: ggml tensor type ids (ggml.h), by name.
TENSOR_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip

# Metadata value types: the fixed-size ones by struct format; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

Scalar = Union[int, float, bool, str]


class GGUFError(ValueError):
    """A GGUF file this project cannot read; ``str()`` is one line naming the problem."""


@dataclass(frozen=True)
class Tensor:
    """One entry of the tensor table. ``shape`` is in ggml order (innermost first)."""

    name: str
    type: str
    shape: Tuple[int, ...]


@dataclass(frozen=True)
class Header:
    """``metadata``: every scalar and string value by key (arrays left out);
    ``tensors``: the tensor table by name, in file order."""

    version: int
    metadata: Dict[str, Scalar]
    tensors: Dict[str, Tensor]


class _EndOfData(GGUFError):
    """The bytes read so far end inside the header."""


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.at, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise _EndOfData(f"{self.path}: the header ends early (truncated or not a GGUF file)")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("<Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: a header string is not UTF-8 (corrupt file?)") from None

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALARS:
                self.take(count * struct.calcsize(_SCALARS[item]))
            else:
                for _ in range(count):
                    self.value(item)
            return None
        raise GGUFError(f"{self.path}: unknown metadata value type {kind} (corrupt file?)")


def read_header(path: Union[str, Path]) -> Header:
    """Read the header of the GGUF file at ``path``; raise ``GGUFError`` if it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # The header of a model with a 150k-token vocabulary is a few MB;
            # reading more than it needs is harmless, too little is retried.
            size = 1 << 22
            while True:
                f.seek(0)
                data = f.read(size)
                try:
                    return _parse(data, path)
                except _EndOfData:
                    if len(data) < size:
                        raise
                    size *= 4
    except OSError as e:
        raise GGUFError(f"{path}: cannot read ({e.strerror or e})") from None


def _parse(data: bytes, path: Path) -> Header:
    r = _Reader(data, path)
    if r.take(4) != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    version = r.unpack("<I")
    if version not in VERSIONS:
        raise GGUFError(f"{path}: GGUF version {version} is not supported (versions {VERSIONS[0]} and {VERSIONS[1]} are)")
    n_tensors, n_metadata = r.unpack("<Q"), r.unpack("<Q")
    metadata = {}
    for _ in range(n_metadata):
        key = r.string()
        value = r.value(r.unpack("<I"))
        if value is not None:
            metadata[key] = value
    tensors = {}
    for _ in range(n_tensors):
        name = r.string()
        shape = tuple(r.unpack("<Q") for _ in range(r.unpack("<I")))
        kind = r.unpack("<I")
        r.unpack("<Q")  # offset into the data section: mx.load follows it
        tensors[name] = Tensor(name, TENSOR_TYPES.get(kind, f"type {kind}"), shape)
    return Header(version, metadata, tensors)
