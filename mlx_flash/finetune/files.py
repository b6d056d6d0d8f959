"""Atomic writes and the metrics stream.

Every file a run writes whole (adapters, configs, summaries, reports) is
written to a temporary file beside it and renamed over the target, so a
reader or an interrupted run never sees half a file. The per-iteration
metrics are the exception by design: a JSONL stream, one record per line,
flushed after every iteration so an interrupted run keeps what it did.
"""

import json
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import mlx.core as mx


def _temporary(path: Path) -> Path:
    # Keep the suffix: mx.save_safetensors appends ".safetensors" otherwise.
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` a temporary file beside ``path``, sync it, rename it over ``path``.

    The sync comes before the rename so that a crash cannot leave ``path``
    naming a file whose contents never reached the disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sync_dir(path: Path) -> None:
    """Make the names in folder ``path`` (files created, renamed) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda tmp: tmp.write_bytes(data))


def write_safetensors(path: Path, arrays: Dict[str, mx.array]) -> None:
    _atomic(path, lambda tmp: mx.save_safetensors(str(tmp), arrays))


def read_jsonl(path: Path) -> List[dict]:
    """Complete records of a JSONL file; a torn last line is dropped.

    Raises ``ValueError`` naming the file and line for a line that is not JSON.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number}: not a JSON record ({e.msg})") from None
    return records


class JsonlWriter:
    """Appends one JSON record per line and flushes it to disk at once."""

    def __init__(self, path: Path, records: Iterator[dict] = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Start from the records being kept (none, or those of a resumed run).
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        # One write() of the whole line: an interrupt lands before or after it.
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def sync(self) -> None:
        """Flush and sync: the records written so far survive a crash."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()
