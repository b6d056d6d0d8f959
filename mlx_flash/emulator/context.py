"""The settings of ``with emulator.metal(...)`` blocks.

``emulator.run`` takes an argument left as None from the innermost active
block, so code that launches kernels through ``mlx_flash.kernels.launch``
(which passes only the schedule) runs them under the block's math mode,
strict pass and profiling too.
"""

import dataclasses
from typing import Callable, List, Optional, Sequence, Union

Schedule = Union[str, int]


@dataclasses.dataclass
class Session:
    """One ``metal()`` block: its settings, and what its launches reported.

    ``profiles`` holds a ``Profile`` per launch when ``profile`` is set;
    ``strict_reports`` a ``StrictReport`` per kernel source the strict pass
    checked. ``threadgroups``: None (every threadgroup) or a function of a
    launch's threadgroup counts that says which to run (``emulator.run``).
    """

    schedule: Union[Schedule, Sequence[Schedule]]
    math: Optional[str]
    strict: bool
    profile: bool
    threadgroups: Optional[Callable] = None
    profiles: List = dataclasses.field(default_factory=list)
    strict_reports: List = dataclasses.field(default_factory=list)


_active: List[Session] = []


def current() -> Optional[Session]:
    """The innermost active session, or None outside ``metal()``."""
    return _active[-1] if _active else None


def push(session: Session) -> None:
    _active.append(session)


def pop() -> None:
    _active.pop()
