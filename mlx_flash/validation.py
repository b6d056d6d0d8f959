"""Validating the Metal kernels where they run, against the float32 oracle.

A *unit* is one kernel family (``mlx_flash.families``) at one input
dtype, head dims ``(D, Dv)`` and mask kind (``verdicts.MASK_KINDS``).
``check`` builds one small problem of the unit, runs the family's three
kernels on it in order (forward, dK/dV, dQ, each evaluated on its own so a
failure names its kernel) and compares the output, the log-sum-exp, dq, dk,
dv and the sinks' gradient with ``mlx_flash.oracle`` at the test suite's
tolerances (the family's ``tolerances``, which ``oracle.TOLERANCES`` lists). A kernel that does not compile (on the
emulator ``emulator.CompileError`` quotes the generated source lines; on
Metal MLX raises with the compiler's message), crashes, races (emulator) or
is wrong fails the unit, and the result says which kernel and why.

The problem (``problem``): ``Shape``'s batch and heads (GQA by default),
97 positions: odd, four key tiles of 32, and large enough that every input
a real fine-tuning call passes (segment ids and tile ranges, masks, sinks
of 8 or more heads) is passed in device memory as in that call (MLX passes
an input of fewer than 8 elements in the constant address space, which is
another generated source). Per kind: ``none`` has fewer queries than keys
(65 x 97); ``bool`` keeps about 60% per head with one row that keeps
nothing; ``additive`` has a whole key tile of ``-inf`` in one head;
``segments`` is causal over packed documents with padding in two rows;
``window`` causal with a window of 13; ``sinks`` causal with sinks.

``validate`` checks a unit and records the result in the verdict cache
(``mlx_flash.verdicts``) as it goes. ``first_use`` is what ``auto`` runs
before it first sends a call to a kernel nobody validated on this machine:
the units of that call's family, dtype, head dims and mask kinds, at the
call's head counts, on their own small inputs, eagerly (they are concrete
arrays, never the call's own, so this is safe inside ``mx.grad`` or
``mx.compile`` tracing).
"""

import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx

from . import families, fused, masks, oracle, verdicts
from .call import AttentionCall

#: Longest text of a failure kept in a verdict (a compiler's message can run long).
MAX_DETAIL = 8000


@dataclass(frozen=True)
class Unit:
    """One validated configuration of a kernel family (see the module docstring)."""

    family: str
    dtype: str
    dim: int
    value_dim: int
    kind: str

    @property
    def key(self) -> str:
        return verdicts.unit_key(self.family, self.dtype, self.dim, self.value_dim, self.kind)

    @property
    def label(self) -> str:
        return f"{self.family} {self.dtype} {self.dim}x{self.value_dim} {self.kind}"


@dataclass(frozen=True)
class Shape:
    """The geometry of a unit's problem: batch, query and KV heads, positions."""

    batch: int = 1
    heads: int = 8
    kv_heads: int = 2
    length: int = 97
    seed: int = 0


@dataclass
class Result:
    """The validation of one unit: ``passed``, ``failed`` (``kernel`` is
    ``forward``, ``dkdv``, ``dq`` or ``sinks``, ``detail`` says why) or
    ``not run`` (the check itself could not run here: no verdict)."""

    unit: Unit
    status: str
    kernel: str = ""
    detail: str = ""
    seconds: float = 0.0
    shape: Shape = Shape()

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def entry(self, by: str) -> dict:
        """The unit's entry in the verdict cache; ``by`` says who made it."""
        return {
            "status": self.status,
            "kernel": self.kernel,
            "detail": self.detail,
            "seconds": round(self.seconds, 4),
            "by": by,
            "shape": [self.shape.batch, self.shape.heads, self.shape.kv_heads, self.shape.length],
        }


def units(
    family_names: Optional[Sequence[str]] = None,
    dtypes: Optional[Sequence[str]] = None,
    head_dims: Optional[Sequence[Tuple[int, int]]] = None,
    kinds: Sequence[str] = verdicts.MASK_KINDS,
) -> List[Unit]:
    """Every supported unit of ``families`` x ``dtypes`` x ``head_dims`` x
    ``kinds`` (every family, and each family's own dtypes and head dims,
    where not given)."""
    found = []
    for name in family_names or families.names():
        family = families.get(name)
        for dtype in dtypes or family.dtype_names:
            for dim, value_dim in head_dims or family.head_dims:
                if family.unsupported_dims(dtype, dim, value_dim) is None:
                    found += [Unit(name, dtype, dim, value_dim, kind) for kind in kinds]
    return found


def problem(unit: Unit, shape: Shape = Shape()):
    """``q, k, v, dout, mask (a StructuredMask), sinks`` of ``unit``'s
    problem (see the module docstring)."""
    dtype = getattr(mx, unit.dtype)
    length, seed, heads = shape.length, shape.seed, shape.heads
    batch = max(shape.batch, 2) if unit.kind == "segments" else shape.batch
    q_len = length - length // 3 if unit.kind == "none" else length
    q, k, v, dout = oracle.random_inputs(
        batch, heads, shape.kv_heads, q_len, length, unit.dim, unit.value_dim, dtype, seed
    )
    array = segments = window = sinks = None
    causal = unit.kind not in ("none", "bool", "additive")
    if unit.kind == "bool":
        array = oracle.random_mask("bool_empty_row", heads, q_len, length, dtype, seed + 1, empty_row=(heads - 1, 3))
    elif unit.kind == "additive":
        array = oracle.random_mask("additive", heads, q_len, length, dtype, seed + 1)
    elif unit.kind == "segments":
        segments = oracle.segment_layout("padding", batch, length, seed + 2)
    elif unit.kind == "window":
        window = length // 8 + 1
    elif unit.kind == "sinks":
        sinks = (2.0 * mx.random.normal((heads,), key=mx.random.key(seed + 3))).astype(dtype)
    mask = masks.build(q_len, length, array if array is not None else ("causal" if causal else None), segments, window)
    return q, k, v, dout, mask, sinks


#: The kernels ``kernel_stages`` runs, in order.
STAGES = ("forward", "dkdv", "dq", "sinks")


def kernel_stages(family: families.Family, call: AttentionCall, dout: mx.array) -> Iterator[tuple]:
    """Run ``family``'s launchers on ``call`` one kernel at a time (``dout``
    for the backward), yielding ``(kernel, outputs)`` as each is evaluated:
    ``("forward", (out, lse))``, ``("dkdv", (dk, dv))``, ``("dq", (dq,))``
    and, with sinks, ``("sinks", (dsinks,))`` (``fused.sink_grad`` of the
    forward's lse)."""
    out, lse = family.forward(call)
    mx.eval(out, lse)
    yield "forward", (out, lse)
    delta = mx.sum(dout.astype(mx.float32) * out.astype(mx.float32), axis=-1)
    backward = call.backward(dout, lse, delta)
    dk, dv = family.dkdv(backward)
    mx.eval(dk, dv)
    yield "dkdv", (dk, dv)
    dq = family.dq(backward)
    mx.eval(dq)
    yield "dq", (dq,)
    if call.sinks is not None:
        dsinks = fused.sink_grad(call.sinks, lse, delta)
        mx.eval(dsinks)
        yield "sinks", (dsinks,)


def describe_error(error: BaseException) -> str:
    """``Type: message`` (a compiler's message and source lines included),
    cut to ``MAX_DETAIL`` characters."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL] + "\n[...]"


def check(unit: Unit, shape: Shape = Shape()) -> Result:
    """Validate ``unit`` on its problem (see the module docstring). Runs on
    Metal, or on the emulator inside ``mlx_flash.emulator.metal()``."""
    start = time.perf_counter()

    def result(status, kernel="", detail=""):
        return Result(unit, status, kernel, detail, time.perf_counter() - start, shape)

    try:
        q, k, v, dout, mask, sinks = problem(unit, shape)
        scale = unit.dim**-0.5
        out, grads, lse = oracle.kernel_oracle(q, k, v, dout, scale, mask, sinks)
        mx.eval(out, grads, lse)
    except Exception as e:  # noqa: BLE001 - the check cannot run here: no verdict
        return result("not run", detail=describe_error(e))
    dq, dk, dv = grads[:3]
    family = families.get(unit.family)
    tolerance = family.tolerance(getattr(mx, unit.dtype))
    expected = {
        "forward": (("output", out, tolerance), ("lse", lse, oracle.lse_tolerance(getattr(mx, unit.dtype)))),
        "dkdv": (("dk", dk, tolerance), ("dv", dv, tolerance)),
        "dq": (("dq", dq, tolerance),),
        "sinks": (("dsinks", grads[3] if len(grads) > 3 else None, tolerance),),
    }
    done = 0  # kernels finished: an error belongs to the next one, in STAGES order
    try:
        for kernel, outputs in kernel_stages(family, AttentionCall(q, k, v, scale, mask, sinks), dout):
            done += 1
            for (name, want, allowed), got in zip(expected[kernel], outputs):
                compare = oracle.lse_mismatch if name == "lse" else oracle.mismatch
                wrong = compare(got, want, allowed)
                if wrong is not None:
                    return result("failed", kernel, f"wrong {name}: {wrong}")
    except Exception as e:  # noqa: BLE001 - a kernel that does not build or crashes fails its unit
        return result("failed", STAGES[done], describe_error(e))
    return result("passed")


#: What a unit's verdict says while it is being validated: a GPU fault or
#: hang that ends the process leaves it, so the kernel is not used again
#: until a later validation replaces it.
ENDED = (
    "the process ended while this unit was being validated (a GPU fault or a hang?); "
    "python -m mlx_flash.doctor validates it again"
)


def validate(unit: Unit, backend: str, by: str, shapes: Sequence[Shape] = (Shape(),)) -> Result:
    """``check`` ``unit`` on each of ``shapes`` (the first failure, else the
    last pass) and record the result in the verdict cache as ``by``.

    While it runs the unit's entry is a failure saying the process ended
    during its validation (``ENDED``), so a kernel that brings the process
    down is recorded as failed; Ctrl-C puts the previous entry back.
    """
    verdict = verdicts.current(backend)
    previous = verdict.kernels.get(unit.key) if verdict is not None else None
    ended = {"status": "failed", "kernel": "", "detail": ENDED, "seconds": 0.0, "by": by}
    verdicts.record(backend, {unit.key: ended})
    try:
        for shape in shapes:
            result = check(unit, shape)
            if not result.passed:
                break
    except BaseException:
        verdicts.record(backend, {unit.key: previous} if previous else None, forget=() if previous else (unit.key,))
        raise
    if result.status == "not run":  # no verdict: the check could not run here
        verdicts.record(backend, {unit.key: previous} if previous else None, forget=() if previous else (unit.key,))
    else:
        verdicts.record(backend, {unit.key: result.entry(by)})
    return result


_first_use_lock = threading.Lock()


def first_use(family: str, q, k, v, kinds: Sequence[str], backend: str) -> List[Result]:
    """Validate ``family`` for a call on ``q``, ``k``, ``v`` needing ``kinds``
    (those without a verdict yet), record the results and return them.

    One line on stderr says what was validated, so a pause before the first
    step has an explanation.
    """
    dtype = verdicts.dtype_name(q.dtype)
    dim, value_dim = q.shape[-1], v.shape[-1]
    shape = Shape(batch=1, heads=q.shape[1], kv_heads=k.shape[1])
    with _first_use_lock:
        verdict = verdicts.current(backend)
        todo = list(kinds) if verdict is None else verdict.missing(family, dtype, dim, value_dim, kinds)
        start = time.perf_counter()
        results = [validate(Unit(family, dtype, dim, value_dim, kind), backend, "first use", [shape]) for kind in todo]
    if results:
        failed = [r.unit.kind for r in results if not r.passed]
        outcome = f"FAILED ({', '.join(failed)})" if failed else "passed"
        saved = verdicts.current(backend)
        where = f"; {saved.unsaved}" if saved is not None and saved.unsaved else ""
        print(
            f"mlx-flash: validated the {family} kernels for {dtype} {dim}x{value_dim} "
            f"({', '.join(todo)}) on this machine in {time.perf_counter() - start:.1f} s: {outcome}{where}",
            file=sys.stderr,
        )
    return results
