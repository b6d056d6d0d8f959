"""What machine a measurement ran on: chip, OS, MLX version, backend, memory.

Every benchmark report and fine-tuning summary carries this, so that no
number is read without its hardware.
"""

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from typing import Optional

import mlx.core as mx

from . import blas


def backend() -> str:
    """MLX's backend for the default device: ``"metal"``, ``"cuda"`` or ``"cpu"``."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def _cpu_model() -> str:
    system = platform.system()
    if system == "Darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    if system == "Linux":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.lower().startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _device_info() -> dict:
    try:
        return dict(mx.device_info())
    except Exception:  # older MLX or no device info on this backend
        return {}


def physical_memory() -> Optional[int]:
    """Bytes of RAM (or the GPU's recommended working set on Metal), or None."""
    info = _device_info()
    for key in ("max_recommended_working_set_size", "memory_size"):
        if backend() != "cpu" and info.get(key):
            return int(info[key])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def chip() -> str:
    """The chip the default device computes on: the GPU's name on Metal (on
    Apple silicon that is the chip, "Apple M2 Max"), else the CPU model."""
    info = _device_info()
    if backend() != "cpu" and info.get("device_name"):
        return str(info["device_name"])
    return _cpu_model()


def gpu_architecture() -> Optional[str]:
    """The GPU's architecture name on Metal ("applegpu_g14s"), else None."""
    info = _device_info()
    if backend() != "metal":
        return None
    return str(info["architecture"]) if info.get("architecture") else None


def os_version() -> str:
    """The operating system and its version: "macOS 14.5" on a Mac, else
    Python's platform string."""
    release = platform.mac_ver()[0]
    if platform.system() == "Darwin" and release:
        return f"macOS {release}"
    return platform.platform()


def source_state() -> Optional[dict]:
    """The git commit of the mlx_flash source that is running, and which of
    its files differ from it; None outside a git checkout (an installed wheel)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args) -> str:
        return subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.rstrip("\n")

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = sorted(line[3:] for line in git("status", "--porcelain", "--", "mlx_flash", "metal").splitlines())
        # Blob hashes of the changed files: a later commit whose files have
        # these hashes is the code that ran.
        blobs = {path: git("hash-object", path) for path in changed if os.path.isfile(os.path.join(root, path))}
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "uncommitted": changed, "uncommitted_blobs": blobs}


def describe() -> dict:
    """A JSON-ready description of this machine and software."""
    from .version import __version__

    where = backend()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        load = None
    return {
        "chip": chip(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_bytes": physical_memory(),
        "os": platform.platform(),
        "os_name": platform.system().lower(),
        "python": sys.version.split()[0],
        "mlx_version": mx.__version__,
        "mlx_flash_version": __version__,
        "source": source_state(),
        "backend": where,
        "blas": str(blas.in_use()),
        "load_average": load,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
