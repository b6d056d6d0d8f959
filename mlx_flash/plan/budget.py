"""How many bytes a step may use: this machine's, a named Mac's, or a given size."""

import os
import re
from typing import Optional, Tuple

from .models import PlanError

GiB = 1 << 30

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt])(i?)b?\s*$", re.IGNORECASE)

RAISE_HINT = "raise it with: sudo sysctl iogpu.wired_limit_mb=<MB> (until reboot)"


def parse_size(text: str) -> int:
    """Bytes from ``16GB``, ``16G`` (powers of 1000), ``16GiB`` (powers of
    1024), ``16000MB``; raises ``PlanError`` in one line otherwise."""
    match = _SIZE.match(str(text))
    if not match:
        raise PlanError(f"--memory: expected a size like 16GB, 16GiB, 16G or 16000MB, got {text!r}")
    number, unit, binary = match.groups()
    value = int(float(number) * (1024 if binary else 1000) ** ("kmgt".index(unit.lower()) + 1))
    if value <= 0:
        raise PlanError(f"--memory: the size must be positive, got {text!r}")
    return value


def mac_working_set(ram_gb: float) -> int:
    """Metal's default recommended working set on a Mac with ``ram_gb`` GB of
    unified memory: about two thirds of it up to 32 GB, three quarters
    above. An approximation of ``max_recommended_working_set_size``, which
    the Mac itself reports."""
    ram = ram_gb * GiB
    return int(ram * (2 / 3 if ram_gb <= 32 else 3 / 4))


def _available_ram() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def this_machine() -> Tuple[int, str]:
    """``(bytes, where the figure comes from)`` for this machine: Metal's
    recommended working set on a Mac, the available RAM elsewhere, or
    ``$MLX_FLASH_MEMORY`` (a size) where it is set."""
    import mlx.core as mx

    given = os.environ.get("MLX_FLASH_MEMORY")
    if given:
        return parse_size(given), f"MLX_FLASH_MEMORY={given}"
    try:
        if mx.metal.is_available():
            size = int(mx.metal.device_info()["max_recommended_working_set_size"])
            return size, f"Metal's recommended working set; {RAISE_HINT}"
    except Exception:  # noqa: BLE001 - no Metal device info: fall through to RAM
        pass
    available = _available_ram()
    if available is None:
        raise PlanError("cannot tell this machine's memory: pass --memory (e.g. --memory 16GB)")
    return available, "available RAM on this machine"
