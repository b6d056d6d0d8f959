"""Kernel verdicts: what was validated and timed on this machine, and the
lookups ``auto`` makes in them.

A verdict belongs to one *key*: the backend the kernels ran on (``metal``,
or ``emulator`` for the CPU emulator), the chip, the OS version (on a Mac
it fixes the Metal compiler), the MLX version (it writes the kernels'
signatures), the mlx-flash version and a hash of the kernel sources
(``metal/*.metal`` and ``*.h``; on the emulator its ``metal_cpu.h`` too).
Any change of these is another key, so a verdict never speaks for code or
software it did not see. Each key has one JSON file,
``$MLX_FLASH_CACHE/verdicts/<backend>-<hash of the key>.json`` (default
``~/.cache/mlx_flash``), holding the key itself (a file whose key differs is
ignored), and:

* ``kernels``: per *unit* ``<family>/<dtype>/<D>x<Dv>/<mask kind>`` (for
  example ``demo/bfloat16/128x128/segments``), ``passed`` or ``failed``,
  the failing kernel (``forward``, ``dkdv``, ``dq``) and why;
* ``timings``: rows of checked timings, each one attention problem (mode
  ``fwd`` or ``fwdbwd``, mask kind, dtype, head dim, length, heads) with the
  median seconds of every implementation that was measured and correct.

``python -m mlx_flash.doctor`` writes verdicts (validation and timings);
``auto``'s first use of a kernel on Metal writes the validation of just that
kernel (``MLX_FLASH_VALIDATE``; see ``validation_enabled``). Writes merge
with what the file holds and replace it atomically.

Mask kinds are what the kernels are validated on, one small problem each:
``none``, ``causal``, ``bool`` and ``additive`` arrays, ``segments``
(causal packed documents with padding), ``window`` (causal sliding window)
and ``sinks`` (causal with sinks). A call needs the kinds of its parts
(``kinds_of``): causal + segments + sinks needs ``causal``, ``segments`` and
``sinks`` to have passed.

This module reads no array and imports nothing of the kernels, so that the
dispatcher can ask it on every call.
"""

import contextlib
import hashlib
import json
import math
import os
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from . import kernels, machine
from .folders import cache_root
from .text import first_line

#: Version of the file layout; another version is ignored.
FORMAT = 1

#: What the kernels are validated on (see the module docstring).
MASK_KINDS = ("none", "causal", "bool", "additive", "segments", "window", "sinks")

#: ``MLX_FLASH_VALIDATE`` values that switch first-use validation on / off.
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")

_lock = threading.RLock()


def dtype_name(dtype) -> str:
    """``"float16"`` for ``mx.float16`` (a name is kept as it is)."""
    return dtype if isinstance(dtype, str) else str(dtype).split(".")[-1]


def unit_key(family: str, dtype, dim: int, value_dim: int, kind: str) -> str:
    """The name of one validated unit: ``practical/float16/64x64/causal``."""
    return f"{family}/{dtype_name(dtype)}/{dim}x{value_dim}/{kind}"


def kinds_of(mask, sinks) -> Tuple[str, ...]:
    """The mask kinds a call on ``mask`` (a ``StructuredMask``) and
    ``sinks`` needs validated: its base (``causal`` or ``none``) and one
    kind per further part."""
    kinds = ["causal" if mask.causal else "none"]
    if mask.window is not None:
        kinds.append("window")
    if mask.has_segments:
        kinds.append("segments")
    if mask.array_kind != "none":
        kinds.append(mask.array_kind)
    if sinks is not None:
        kinds.append("sinks")
    return tuple(kinds)


def timing_kind(mask, sinks) -> str:
    """The name timings are filed under for a call: its parts joined by
    ``+`` (``causal``, ``causal+segments``, ``causal+window+sinks``,
    ``none+bool``)."""
    parts = ["causal" if mask.causal else "none"]
    if mask.has_segments:
        parts.append("segments")
    if mask.window is not None:
        parts.append("window")
    if mask.array_kind != "none":
        parts.append(mask.array_kind)
    if sinks is not None:
        parts.append("sinks")
    return "+".join(parts)


def validation_enabled(backend: str) -> bool:
    """Whether ``auto`` validates a kernel on its first use: on Metal unless
    ``MLX_FLASH_VALIDATE=0``; on the emulator only with
    ``MLX_FLASH_VALIDATE=1`` (the test suite runs many emulator calls)."""
    value = os.environ.get("MLX_FLASH_VALIDATE", "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    return backend == "metal"


# ---- the key ------------------------------------------------------------------


@lru_cache(maxsize=None)
def kernel_source_hash(backend: str) -> str:
    """sha256 of the kernel sources (and the emulator's header on the emulator)."""
    digest = hashlib.sha256()
    metal = kernels.source_folder()
    names = sorted(p.name for p in metal.iterdir() if p.name.endswith((".metal", ".h")))
    files = [(name, metal.joinpath(name)) for name in names]
    if backend == "emulator":
        files.append(("metal_cpu.h", resources.files("mlx_flash.emulator").joinpath("metal_cpu.h")))
    for name, path in files:
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@lru_cache(maxsize=None)
def machine_key(backend: str) -> Dict[str, str]:
    """The key of verdicts made here on ``backend`` (see the module docstring)."""
    from .version import __version__

    chip = machine.chip()
    architecture = machine.gpu_architecture() if backend == "metal" else None
    return {
        "backend": backend,
        "chip": f"{chip} ({architecture})" if architecture else chip,
        "os": machine.os_version(),
        "mlx": mx.__version__,
        "mlx_flash": __version__,
        "kernels": kernel_source_hash(backend),
    }


def path_for(key: Dict[str, str]) -> Path:
    """The verdict file of ``key``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "verdicts" / f"{key['backend']}-{digest}.json"


# ---- a verdict ----------------------------------------------------------------


@dataclass
class Ranking:
    """Measured implementations of the timing row closest to a call,
    fastest first: ``times`` is ``[(implementation, median seconds)]``."""

    row: dict
    times: List[Tuple[str, float]]

    def describe(self) -> str:
        row = self.row
        mode = "fwd+bwd" if row["mode"] == "fwdbwd" else "fwd"
        times = ", ".join(f"{name} {seconds * 1e3:.3g} ms" for name, seconds in self.times)
        return f"{mode} {row['kind']} {row['dtype']} D={row['head_dim']} L={row['seq']}: {times}"


@dataclass
class Verdict:
    """The verdict file of one key (see the module docstring)."""

    key: Dict[str, str]
    kernels: Dict[str, dict] = field(default_factory=dict)
    timings: List[dict] = field(default_factory=list)
    written: str = ""
    #: Why the last write failed, if it did (the verdict then lives in this
    #: process only).
    unsaved: str = ""

    def status(self, family: str, dtype, dim: int, value_dim: int, kinds: Sequence[str]) -> Tuple[str, str]:
        """``("failed", why)`` if a kind failed, ``("passed", "")`` if all
        passed, else ``("unknown", "<kinds without a verdict>")``."""
        for kind in kinds:
            entry = self.kernels.get(unit_key(family, dtype, dim, value_dim, kind))
            if entry is not None and entry["status"] != "passed":
                where = f"{entry['kernel']} kernel: " if entry.get("kernel") else ""
                unit = f"{dtype_name(dtype)} {dim}x{value_dim} {kind}"
                return "failed", f"{unit}: {where}{first_line(entry.get('detail', ''))}"
        missing = self.missing(family, dtype, dim, value_dim, kinds)
        return ("unknown", ", ".join(missing)) if missing else ("passed", "")

    def missing(self, family: str, dtype, dim: int, value_dim: int, kinds: Sequence[str]) -> List[str]:
        """The ``kinds`` that have no verdict for this family, dtype and head dims."""
        return [k for k in kinds if unit_key(family, dtype, dim, value_dim, k) not in self.kernels]

    def ranking(self, kind: str, dtype, dim: int, value_dim: int, length: int) -> Optional[Ranking]:
        """The implementations timed on the problem closest to a call, or None.

        Rows must match the mask kind, dtype and head dims exactly; among
        them forward+backward rows are preferred (``auto`` takes every call
        it ranks, more queries than a decoding step, for training), and the
        length closest to ``length`` on a log scale (the longer on a tie).
        """
        rows = [
            row
            for row in self.timings
            if row["kind"] == kind
            and row["dtype"] == dtype_name(dtype)
            and row["head_dim"] == dim
            and row.get("value_dim", row["head_dim"]) == value_dim
            and row["median_s"]
        ]
        if not rows:
            return None
        mode = "fwdbwd" if any(row["mode"] == "fwdbwd" for row in rows) else "fwd"
        rows = [row for row in rows if row["mode"] == mode]
        row = min(rows, key=lambda row: (abs(math.log2(row["seq"] / max(length, 1))), -row["seq"]))
        times = sorted(row["median_s"].items(), key=lambda item: item[1])
        return Ranking(row, times)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "key": self.key,
            "written": self.written,
            "kernels": self.kernels,
            "timings": self.timings,
        }


def _read(path: Path, key: Dict[str, str]) -> Optional[Verdict]:
    """The verdict in ``path`` if it is readable, of this format and of ``key``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
        return None
    kernels, timings = data.get("kernels"), data.get("timings")
    if not isinstance(kernels, dict) or not isinstance(timings, list):
        return None
    return Verdict(key, kernels, timings, str(data.get("written", "")))


# path -> (file stamp, verdict): re-read only when the file changes.
_memo: Dict[Path, tuple] = {}


def _stamp(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def current(backend: str) -> Optional[Verdict]:
    """The verdict of this machine's key on ``backend``, or None."""
    key = machine_key(backend)
    path = path_for(key)
    with _lock:
        memo = _memo.get(path)
        if memo is not None and memo[1].unsaved:
            return memo[1]
        stamp = _stamp(path)
        if stamp is None:
            return None
        if memo is not None and memo[0] == stamp:
            return memo[1]
        verdict = _read(path, key)
        if verdict is not None:
            _memo[path] = (stamp, verdict)
        return verdict


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path``'s lock file where the OS has one, so two
    processes merging verdicts do not lose each other's entries (without
    one, or where it cannot be made, the merge goes on unlocked)."""
    handle = None
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_suffix(".lock"), "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
    except (ImportError, OSError):
        pass
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


#: What makes two timing rows the same problem.
_PROBLEM = ("mode", "kind", "mask", "dtype", "head_dim", "value_dim", "seq", "batch", "heads", "kv_heads")


def _merge_timings(old: List[dict], new: List[dict]) -> List[dict]:
    """``old`` rows not measured again in ``new``, then ``new``."""
    fresh = {tuple(row.get(k) for k in _PROBLEM) for row in new}
    return [row for row in old if tuple(row.get(k) for k in _PROBLEM) not in fresh] + list(new)


def record(
    backend: str,
    kernels: Optional[Dict[str, dict]] = None,
    timings: Optional[List[dict]] = None,
    key=None,
    forget: Sequence[str] = (),
) -> Verdict:
    """Merge ``kernels`` entries and ``timings`` rows into the verdict of
    ``key`` (this machine's on ``backend`` by default), drop the units in
    ``forget``, and write it atomically. A write that fails keeps the
    verdict in this process (``unsaved`` says why) instead of raising."""
    key = machine_key(backend) if key is None else key
    path = path_for(key)
    with _lock, _file_lock(path):
        memo = _memo.get(path)
        verdict = _read(path, key) or (memo[1] if memo is not None else None) or Verdict(key)
        verdict.kernels.update(kernels or {})
        for unit in forget:
            verdict.kernels.pop(unit, None)
        verdict.timings = _merge_timings(verdict.timings, timings or [])
        verdict.written = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            _write_atomically(path, json.dumps(verdict.to_json(), indent=1, sort_keys=True) + "\n")
            verdict.unsaved = ""
            _memo[path] = (_stamp(path), verdict)
        except OSError as e:
            verdict.unsaved = f"cannot write {path} ({e.strerror or e})"
            _memo[path] = (None, verdict)
    return verdict
