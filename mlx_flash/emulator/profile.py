"""What a kernel launch cost, as the emulator counted it.

A ``Profile`` holds one row of counters per threadgroup run
(``per_threadgroup``, threadgroups in linear order, x fastest; their grid
positions in ``positions``: every threadgroup of the launch unless it ran
only some, ``emulator.run(threadgroups=...)``) under ``counter_names``, and
their totals. Counter names:

* ``device.<buffer>.loaded_bytes`` / ``.stored_bytes``: bytes the kernel read
  from / wrote to each buffer of its signature (inputs, their ``_shape``,
  ``_strides``, ``_ndim`` buffers, outputs), as the CPU build performs the
  accesses: loads the compiler keeps in registers count once.
* ``threadgroup.loaded_bytes`` / ``.stored_bytes``: the same for threadgroup
  memory, ``threadgroup.peak_bytes``: the threadgroup memory a threadgroup
  allocates (the launch's is the largest).
* ``simdgroup_matrix.multiply_accumulate`` / ``.load`` / ``.store``, and
  ``simd.<collective>``: once per execution by a SIMD group.
* ``barrier.threadgroup`` (once per threadgroup per barrier) and
  ``barrier.simdgroup`` (once per SIMD group).
* ``math.<function>``: evaluations of exp, exp2, log, sqrt, ... per thread,
  one per vector component.
* ``atomic.device`` / ``atomic.threadgroup``: atomic operations per thread.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

_PEAK = "threadgroup.peak_bytes"


class Profile:
    """Counters of one kernel launch (see the module docstring for names).

    ``profile["math.exp"]`` is a launch total; ``profile.summary()`` gives
    ``(min, mean, max)`` over threadgroups of every counter that is not zero.
    """

    def __init__(self, kernel: str, grid, threadgroup, counter_names: Sequence[str],
                 per_threadgroup: np.ndarray, indices: Optional[Sequence[int]] = None):
        self.kernel = kernel
        self.grid = tuple(grid)
        self.threadgroup = tuple(threadgroup)
        self.counter_names = tuple(counter_names)
        self.per_threadgroup = per_threadgroup
        # Linear index of each row's threadgroup (all of them when None).
        self._indices = None if indices is None else [int(i) for i in indices]
        sums = per_threadgroup.sum(axis=0, dtype=np.uint64)
        self.totals: Dict[str, int] = {n: int(v) for n, v in zip(self.counter_names, sums)}
        if _PEAK in self.totals:
            column = per_threadgroup[:, self.counter_names.index(_PEAK)]
            self.totals[_PEAK] = int(column.max()) if column.size else 0

    def __getitem__(self, name: str) -> int:
        return self.totals[name]

    @property
    def threadgroups(self) -> int:
        """Threadgroups counted (run)."""
        return int(self.per_threadgroup.shape[0])

    @property
    def group_counts(self) -> Tuple[int, int, int]:
        """Threadgroups of the launch along x, y and z."""
        return tuple(-(-g // min(t, g)) if min(t, g) else 0 for g, t in zip(self.grid, self.threadgroup))

    @property
    def positions(self) -> List[Tuple[int, int, int]]:
        """``(x, y, z)`` of the threadgroup of each row of ``per_threadgroup``."""
        nx, ny, _ = self.group_counts
        indices = self._indices if self._indices is not None else range(self.threadgroups)
        return [(i % nx, (i // nx) % ny, i // (nx * ny)) for i in indices]

    def _group(self, prefix: str) -> Dict[str, int]:
        return {
            name[len(prefix):]: value
            for name, value in self.totals.items()
            if name.startswith(prefix) and value
        }

    @property
    def device_bytes(self) -> Dict[str, Tuple[int, int]]:
        """``{buffer: (loaded, stored)}`` for every buffer the kernel touched."""
        out = {}
        for name, value in self._group("device.").items():
            buffer, kind = name.rsplit(".", 1)
            loaded, stored = out.get(buffer, (0, 0))
            out[buffer] = (loaded + value, stored) if kind == "loaded_bytes" else (loaded, stored + value)
        return out

    @property
    def collectives(self) -> Dict[str, int]:
        """SIMD collectives by kind (``simd_sum``, ``simd_shuffle_xor``, ...)."""
        return self._group("simd.")

    @property
    def math(self) -> Dict[str, int]:
        """Math function evaluations by function."""
        return self._group("math.")

    def summary(self) -> Dict[str, Tuple[int, float, int]]:
        """``{counter: (min, mean, max)}`` over threadgroups, nonzero counters."""
        out = {}
        for k, name in enumerate(self.counter_names):
            column = self.per_threadgroup[:, k]
            if column.size and column.any():
                out[name] = (int(column.min()), float(column.mean()), int(column.max()))
        return out

    def __str__(self) -> str:
        lines = [
            f"kernel {self.kernel}: grid {self.grid}, threadgroup {self.threadgroup}, "
            f"{self.threadgroups} threadgroups"
            + ("" if self._indices is None else f" counted of {_product(self.group_counts)}"),
            f"  {'counter':48s} {'total':>14s} {'min/tg':>10s} {'mean/tg':>12s} {'max/tg':>10s}",
        ]
        for name, (low, mean, high) in self.summary().items():
            lines.append(
                f"  {name:48s} {self.totals[name]:14d} {low:10d} {mean:12.1f} {high:10d}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Profile {self.kernel}: {len(self.summary())} nonzero counters>"


def _product(counts) -> int:
    n = 1
    for c in counts:
        n *= c
    return n
