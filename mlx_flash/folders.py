"""The project's folders: its cache, and whether a command can write the
folder it was told to write into, asked before it starts.

Shared by the fine-tuning, benchmark and doctor commands, so that an output
folder that is a file, or that cannot be written, is one line before any
work rather than a traceback after it.
"""

import os
import tempfile
from pathlib import Path
from typing import Optional


def cache_root() -> Path:
    """The project's cache folder: ``$MLX_FLASH_CACHE``, default
    ``~/.cache/mlx_flash`` (built-in models, kernel verdicts)."""
    return Path(os.environ.get("MLX_FLASH_CACHE", "~/.cache/mlx_flash")).expanduser()


def unwritable(path) -> Optional[str]:
    """Why no folder can be made or written at ``path``, or None if one can.

    It tries: permission bits say nothing about root, and read-only mounts
    or ACLs show only when a write is attempted.
    """
    probe = Path(path)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".mlx_flash-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return f"cannot write in {probe} ({e.strerror or e})"
    return None
