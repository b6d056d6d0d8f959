"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is one folder, ``<run>/checkpoints/<iteration, 7 digits>/``::

    adapters.safetensors    the trainable weights
    optimizer.safetensors   the optimizer's state: moments, step count, learning rate
    gradients.safetensors   gradients summed toward the next update (only when
                            saved between updates, with grad_accumulation_steps > 1)
    state.json              the iteration, the mx.random key, what fixes the loss
                            trajectory (see ``train.trajectory``), and the size
                            and SHA-256 of each file above

The batch order needs no state of its own: batch ``k`` is a function of the
data, the seed and ``k`` (batches.py).

Writing is crash-safe: the folder is filled under a temporary name, every
file synced, and renamed into place; then ``checkpoints/latest.json`` is
replaced (atomically) to name it, and only then are older checkpoints
removed. Whenever the process dies, ``latest.json`` names a complete
checkpoint, or is absent before the first. Reading checks every file
against its recorded size and hash.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx

from . import files
from .config import RecipeError

LATEST = "latest.json"
STATE = "state.json"
ARRAYS = ("adapters", "optimizer", "gradients")
_TEMPORARY = ".incomplete-"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save(root: Path, iteration: int, arrays: Dict[str, Dict[str, mx.array]], state: dict) -> Path:
    """Write checkpoint ``iteration`` under ``root`` and make it the latest.

    Args:
        root: the run's ``checkpoints`` folder.
        arrays: name (one of ``ARRAYS``) -> flat ``{key: array}``; empty ones are not written.
        state: JSON-ready values recorded in ``state.json`` beside the iteration.

    Returns the checkpoint's folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"{iteration:07d}"
    final = root / name
    current = latest_name(root)
    if current == name:
        # Saved already (a run stopped again before its next iteration).
        return final
    tmp = root / f"{_TEMPORARY}{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        written = {}
        for kind, values in arrays.items():
            if values:
                path = tmp / f"{kind}.safetensors"
                files.write_safetensors(path, values)
                written[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        files.write_json(tmp / STATE, {"iteration": iteration, **state, "files": written})
        files.sync_dir(tmp)
        if final.exists():
            # Left by a process killed before it named this folder in latest.json.
            shutil.rmtree(final)
        os.replace(tmp, final)
        files.sync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files.write_json(root / LATEST, {"iteration": iteration, "checkpoint": name})
    for old in root.iterdir():
        # Earlier checkpoints, and folders a killed process left half-written.
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_name(root: Path) -> Optional[str]:
    """The folder name ``latest.json`` gives, or None (no checkpoint, or unreadable)."""
    try:
        return json.loads((Path(root) / LATEST).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Checkpoint:
    """A complete checkpoint read back: ``iteration``, ``state`` (state.json), ``path``."""

    def __init__(self, path: Path, state: dict):
        self.path = path
        self.state = state
        self.iteration = int(state["iteration"])

    def arrays(self, kind: str) -> Dict[str, mx.array]:
        """The flat arrays of ``kind`` (one of ``ARRAYS``); empty if none were saved."""
        path = self.path / f"{kind}.safetensors"
        return mx.load(str(path)) if path.name in self.state["files"] else {}


def latest(root: Path) -> Optional[Checkpoint]:
    """The checkpoint ``latest.json`` names, verified; None if there is none yet.

    Raises ``RecipeError`` (one line, naming the file) when it is unreadable,
    incomplete or altered.
    """
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
        path = root / name
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RecipeError(f"resume: cannot read the checkpoint named by {pointer} ({e})") from None
    for file, expected in state.get("files", {}).items():
        got = path / file
        if not got.is_file() or got.stat().st_size != expected["bytes"] or _sha256(got) != expected["sha256"]:
            raise RecipeError(f"resume: {got} does not match the checkpoint's record of it (changed or damaged)")
    return Checkpoint(path, state)
