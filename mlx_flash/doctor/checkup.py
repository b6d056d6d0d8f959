"""One doctor run: validate the kernels, time what passed, write the verdict.

On Metal the kernels run on the GPU; without Metal they run through the CPU
emulator (two thread schedules, race detection), which checks correctness
only: its times say nothing about a GPU, so nothing is timed there.

Timing goes through the benchmark's checked-timing machinery
(``mlx_flash.bench.harness``): every cell is compared with the float32
reference before its time counts. A kernel that is wrong there (at a
length validation did not reach) fails the units of that problem's mask
kinds in the verdict, so ``auto`` stops using it. Ctrl-C keeps what was
done: the verdict and the report hold every finished unit and timing.
"""

import contextlib
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from .. import emulator, machine, masks, validation, verdicts
from ..families import names as family_names
from . import grid


@dataclass
class Findings:
    """What a doctor run found (``str()`` is its Markdown report)."""

    backend: str
    level: str
    machine: dict
    key: Dict[str, str]
    verdict_path: str
    results: List[validation.Result] = field(default_factory=list)
    timings: List[dict] = field(default_factory=list)
    timing_note: str = ""
    geometry: Optional[grid.Geometry] = None
    unsaved: str = ""
    interrupted: bool = False
    seconds: float = 0.0
    command: str = ""
    #: What ``auto`` picks now for each timing row's problem.
    auto_choices: List[str] = field(default_factory=list)

    @property
    def failed(self) -> List[validation.Result]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        """Every unit passed and every timed cell was correct."""
        return not self.failed and not any(row["failed"] for row in self.timings) and not self.interrupted

    def __str__(self) -> str:
        from .report import render

        return render(self)


def where_kernels_run(emulated: bool = False) -> str:
    """``metal``, or ``emulator`` where Metal is absent or ``emulated`` asks
    for it (raises ``DoctorError`` when the emulator has no C++ compiler)."""
    if mx.metal.is_available() and not emulated:
        return "metal"
    try:
        emulator.compiler()
    except emulator.CompilerNotFoundError as e:
        raise grid.DoctorError(f"no Metal here, and the emulator cannot run: {e}") from None
    return "emulator"


def _validate(units: Sequence[validation.Unit], backend: str, shapes, progress, results: list) -> None:
    """Validate and record each unit, appending to ``results`` as it
    finishes (so Ctrl-C keeps what finished)."""
    for unit in units:
        outcome = validation.validate(unit, backend, "doctor", shapes)
        results.append(outcome)
        progress.advance(f"{unit.label}: {outcome.status}")


def _needed_kinds(config) -> Tuple[Tuple[str, ...], str]:
    """The mask kinds and the timing kind of a benchmark configuration."""
    from ..bench import harness

    args = harness.structure(config)
    mask = masks.build(config.q_len, config.seq, args.get("mask"), args.get("segment_ids"), args.get("window"))
    return verdicts.kinds_of(mask, args.get("sinks")), verdicts.timing_kind(mask, args.get("sinks"))


def _timing_row(config, kind: str, cells) -> dict:
    """A verdict timing row from the harness cells of one configuration."""
    row = {
        "mode": config.mode,
        "kind": kind,
        "mask": config.mask,
        "dtype": config.dtype,
        "head_dim": config.head_dim,
        "value_dim": config.head_dim,
        "seq": config.seq,
        "batch": config.batch,
        "heads": config.heads,
        "kv_heads": config.kv_heads,
        "median_s": {},
        "p95_s": {},
        "peak_bytes": {},
        "failed": {},
    }
    for cell in cells:
        if cell.status == "ok" and cell.implementation == cell.variant:
            row["median_s"][cell.variant] = cell.median_s
            row["p95_s"][cell.variant] = cell.p95_s
            row["peak_bytes"][cell.variant] = cell.peak_memory_bytes
        elif cell.status in ("FAILED", "error"):
            row["failed"][cell.variant] = cell.detail
    return row


def time_kernels(
    plan: grid.TimingPlan, results: List[validation.Result], progress, rows: List[dict], wrong: Dict[str, dict]
) -> None:
    """Time every configuration of ``plan`` with the kernel families whose
    units passed in ``results``, appending a row per configuration to
    ``rows`` and, to ``wrong``, verdict entries failing the units of a
    kernel the timing check found wrong (as each finishes: Ctrl-C keeps them)."""
    from ..bench import harness

    passed = {r.unit.key for r in results if r.passed}

    def variants_for(config) -> List[str]:
        kinds, _ = _needed_kinds(config)
        chosen = []
        for name in plan.variants:
            if name in family_names():
                units = [verdicts.unit_key(name, config.dtype, config.head_dim, config.head_dim, k) for k in kinds]
                if not all(u in passed for u in units):
                    continue
            chosen.append(name)
        return chosen

    progress.total += sum(len(variants_for(c)) for c in plan.configs)
    ram = machine.physical_memory()
    for config in plan.configs:
        kinds, kind = _needed_kinds(config)
        cells = harness.run(
            [config], variants_for(config), warmup=1, repeats=plan.repeats,
            max_memory_bytes=int(ram * 0.75) if ram else None, progress=progress,
        )  # fmt: skip
        row = _timing_row(config, kind, cells)
        rows.append(row)
        for name, detail in row["failed"].items():
            if name in family_names():
                c = config
                where = f"B={c.batch} H={c.heads}/{c.kv_heads} L={c.seq} {c.mask} {c.mode}"
                for k in kinds:
                    unit = verdicts.unit_key(name, config.dtype, config.head_dim, config.head_dim, k)
                    wrong[unit] = {
                        "status": "failed",
                        "kernel": "timing check",
                        "detail": f"wrong at {where}: {detail}",
                        "seconds": 0.0,
                        "by": "doctor timing",
                        "shape": [config.batch, config.heads, config.kv_heads, config.seq],
                    }


def auto_choice(row: dict) -> str:
    """What ``auto`` picks now for the problem of timing ``row`` (planned on
    unevaluated inputs of its shape: nothing is computed)."""
    from ..attention import plan
    from ..bench import masks as bench_masks

    dtype = getattr(mx, row["dtype"])
    q = mx.zeros((row["batch"], row["heads"], row["seq"], row["head_dim"]), dtype)
    k = mx.zeros((row["batch"], row["kv_heads"], row["seq"], row["head_dim"]), dtype)
    args = bench_masks.arguments(row["mask"], row["batch"], row["seq"], row["heads"])
    return plan(q, k, k, variant="auto", **args).implementation


def run(
    level: str = "default",
    geometry: Optional[grid.Geometry] = None,
    families: Sequence[str] = family_names(),
    dtypes: Optional[Sequence[str]] = None,
    head_dims: Optional[Sequence[Tuple[int, int]]] = None,
    kinds: Sequence[str] = verdicts.MASK_KINDS,
    timing: bool = True,
    emulated: bool = False,
    progress=None,
    command: str = "",
) -> Findings:
    """Validate, time and record (see the module docstring); ``progress`` is
    a ``harness.Progress`` (one is made on stderr when None); ``emulated``
    runs the kernels on the CPU emulator even where Metal is."""
    from ..bench import harness

    start = time.perf_counter()
    backend = where_kernels_run(emulated)
    units = grid.validation_units(level, geometry, families, dtypes, head_dims, kinds)
    if not units:
        raise grid.DoctorError("nothing to validate: no kernel family supports the chosen dtypes and head dims")
    key = verdicts.machine_key(backend)
    findings = Findings(
        backend, level, machine.describe(), key, str(verdicts.path_for(key)), geometry=geometry, command=command
    )
    progress = progress or harness.Progress(len(units))
    if backend != "metal":
        progress.stream.write(
            f"mlx_flash.doctor: no Metal here: validating {len(units)} kernel units through the CPU emulator "
            "(correctness only; --quick validates fewer)\n"
        )
    place = contextlib.nullcontext() if backend == "metal" else emulator.metal(schedule=("forward", "reverse"))
    wrong: Dict[str, dict] = {}
    try:
        with place:
            _validate(units, backend, grid.validation_shapes(level), progress, findings.results)
        if backend != "metal":
            findings.timing_note = (
                "skipped: without Metal the kernels ran on the CPU emulator, which checks correctness; "
                "its times say nothing about an Apple GPU"
            )
        elif not timing:
            findings.timing_note = "skipped (--no-timing)"
        else:
            plan = grid.timing_plan(level, geometry, dtypes, head_dims)
            if not plan.configs:
                findings.timing_note = "skipped: the benchmark times head dims with Dv = D only"
            else:
                time_kernels(plan, findings.results, progress, findings.timings, wrong)
    except KeyboardInterrupt:
        findings.interrupted = True
    finally:
        progress.close()
        # Validation recorded each unit as it finished; timings go in now.
        if wrong or findings.timings:
            saved = verdicts.record(backend, wrong, findings.timings)
        else:
            saved = verdicts.current(backend)
        findings.unsaved = saved.unsaved if saved is not None else ""
        if not findings.interrupted:
            findings.auto_choices = [auto_choice(row) for row in findings.timings]
        findings.seconds = time.perf_counter() - start
    return findings
