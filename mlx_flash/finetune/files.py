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
from typing import Dict, Iterator, List

import mlx.core as mx


def _temporary(path: Path) -> Path:
    # Keep the suffix: mx.save_safetensors appends ".safetensors" otherwise.
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_safetensors(path: Path, arrays: Dict[str, mx.array]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    mx.save_safetensors(str(tmp), arrays)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> List[dict]:
    """Complete records of a JSONL file; a torn last line is dropped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            records.append(json.loads(line))
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

    def close(self) -> None:
        self.file.close()
