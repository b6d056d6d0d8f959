"""What the Metal kernels issue, counted by the CPU emulator, against the
FlashAttention-2 lower bounds (``mlx_flash.bench.bounds``).

``python -m mlx_flash.bench --cost`` runs every kernel of each family
(practical in float32, demo in float16: the dtypes each runs for training;
demo's bfloat16 kernels are the same source at the same element size) on
fine-tuning shapes through the emulator's profiler
(``mlx_flash.emulator.Profile``) and sets the counts beside the bounds for
the same shape: device bytes, FLOPs, threadgroup memory, SIMD collectives,
math calls, barriers. These are exact counts of what the kernels issue, not
Metal timings.

How a launch is counted. A fiber per thread is slow (a head of causal
attention at L = 4096 is minutes), so each launch runs one column of its
grid: every threadgroup along x (query tiles, or key tiles for dK/dV) of
the first y (a group of query heads, or a KV head) and z (batch row), and
the totals are multiplied by the number of columns. For every kernel but
one that is exact: a threadgroup's counted events depend on its y and z
only through addresses (no mask here depends on the head; the batch is 1),
which ``tests/test_cost.py`` checks against whole launches. The exception
is the practical forward's lazy maximum: how often a row rescales depends
on its scores, so its totals assume the other columns rescale as often as
the counted one. The inputs are seeded normal values; lse and delta come
from ``mlx_flash.blockwise``.

The kernels' loops (``visits``) follow metal/flash_common.h: a kernel owning
query tiles visits the key tiles its rows can see by the causal and window
rules (from the last down, stopping where the running id bounds say no
lower tile can meet), skipping those whose segment ranges do not meet its
own; dK/dV the same with rows and keys swapped (from the first up). Every visit
evaluates every pair of the two tiles, so ``evaluated_pairs`` and, for the
practical kernels (whose products are scalar FMAs the profiler does not
count), the FLOPs follow from the visits; for demo the visits must give
exactly the counted ``simdgroup_multiply_accumulate`` operations.
"""

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from .. import blockwise, dispatch, emulator, families, masks
from ..call import AttentionCall
from . import bounds
from . import masks as mask_names

#: Kernel families and the dtype each one is counted in.
FAMILIES = {family.name: family.cost_dtype for family in families.REGISTRY.values()}
KERNELS = ("forward", "dkdv", "dq")
MASKS = ("causal", "causal+docs512")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

#: The default grid: fine-tuning shapes, B = 1, 8 query heads.
SEQS = (1024, 4096)
HEAD_DIMS = (64, 128)
KV_HEADS = (8, 1)
QUERY_HEADS = 8


@dataclass(frozen=True)
class Case:
    """One attention problem and the family whose kernels are counted on it."""

    family: str
    seq: int
    head_dim: int
    mask: str = "causal"
    q_heads: int = QUERY_HEADS
    kv_heads: int = QUERY_HEADS
    batch: int = 1
    #: The dtype counted, when not the family's (``FAMILIES``).
    precision: str = ""

    @property
    def dtype(self) -> str:
        return self.precision or FAMILIES[self.family]

    def label(self) -> str:
        return (f"{self.family} D={self.head_dim} L={self.seq} {self.mask} "
                f"H={self.q_heads}/{self.kv_heads} {self.dtype}")


def default_cases(mask_list: Sequence[str] = MASKS) -> List[Case]:
    """The shipped grid: every family, D, L, mask and GQA 1 and 8, except
    GQA 8 at L = 4096, whose grid column is a whole KV group (eight heads of
    dK/dV work, and of practical's forward and dQ, whose query tiles hold
    all eight heads side by side): about half an hour more here. GQA 8 is
    counted at L = 1024; ``--seq 4096 --kv-heads 1`` counts it at 4096.
    Besides: head dim 256, which only practical runs, at L = 1024."""
    cases = [c for c in grid(SEQS, HEAD_DIMS, KV_HEADS, mask_list=mask_list)
             if not (c.seq == 4096 and c.kv_heads != c.q_heads)]
    return cases + grid((1024,), (256,), (QUERY_HEADS,), families=("practical",), mask_list=mask_list)


def grid(seqs: Sequence[int], head_dims: Sequence[int], kv_heads: Sequence[int],
         families: Sequence[str] = tuple(FAMILIES), mask_list: Sequence[str] = MASKS,
         q_heads: int = QUERY_HEADS) -> List[Case]:
    """Every combination, families outermost, demo in float16 and then
    float32."""
    cases = [
        Case(family, seq, dim, mask, q_heads, kv)
        for family in families
        for seq in seqs
        for dim in head_dims
        for mask in mask_list
        for kv in kv_heads
    ]
    return cases + [Case(c.family, c.seq, c.head_dim, c.mask, c.q_heads, c.kv_heads, precision="float32")
                    for c in cases if c.family == "demo"]


# ------------------------------------------------------------------ tiling --


def kernel_tiling(case: Case, kernel: str) -> Tuple[bounds.Tiling, str, int, int]:
    """``(tiling, tiles text, registers, declared threadgroup bytes)`` of one
    kernel on ``case``, from the family's own tile rules (the registers are
    the family docstring's estimate per lane, not a compiler count)."""
    family = families.get(case.family)
    t = family.tiling(kernel, case.head_dim, DTYPES[case.dtype], case.q_heads // case.kv_heads)
    return bounds.Tiling(t.owner, t.own, t.inner, t.heads), t.text, t.registers, t.threadgroup_bytes


def visits(mask: masks.StructuredMask, tiling: bounds.Tiling, batch: int = 1) -> int:
    """(own tile, inner tile) pairs the kernel's loops visit for one head
    group (or KV head), summed over ``batch`` rows (the segment ids' rows
    where there are ids)."""
    q_len, k_len = mask.q_len, mask.k_len
    own, inner = tiling.own, tiling.inner
    if tiling.owner == "query":
        own_ids, inner_ids, own_len = mask.q_segments, mask.k_segments, q_len
    else:
        own_ids, inner_ids, own_len = mask.k_segments, mask.q_segments, k_len
    if mask.has_segments:
        own_ranges = masks.concrete(masks.segment_ranges(own_ids, own)).tolist()
        inner_ranges = masks.concrete(masks.segment_ranges(inner_ids, inner)).tolist()
    else:
        own_ranges = inner_ranges = [None]
    total = 0
    for b in range(len(own_ranges)):
        for t in range(-(-own_len // own)):
            span = (t * own, min(t * own + own, own_len))
            begin, end = mask.key_bounds(span) if tiling.owner == "query" else mask.row_bounds(span)
            for start in range((begin // inner) * inner, end, inner):
                # ranges_meet is symmetric: own and inner tile in either role.
                if mask.has_segments and not masks.ranges_meet(own_ranges[b][t], inner_ranges[b][start // inner]):
                    continue
                total += 1
    rows = 1 if mask.has_segments else batch
    return total * rows * (tiling.heads if tiling.owner == "key" else 1)


def evaluated_pairs(mask: masks.StructuredMask, tiling: bounds.Tiling, q_heads: int, batch: int = 1) -> int:
    """(query, key) pairs the kernel evaluates: every pair of every visited
    tile pair, for every query head and batch row."""
    per_visit = tiling.own * tiling.inner * (tiling.heads if tiling.owner == "query" else 1)
    columns = q_heads // tiling.heads
    return visits(mask, tiling, batch) * per_visit * columns


def product_flops(kernel: str, pairs: int, head_dim: int, value_dim: int) -> int:
    """FLOPs of ``kernel``'s products (``bounds.PRODUCTS``) over ``pairs``."""
    dims = {"S": head_dim, "dP": value_dim, "O": value_dim, "dV": value_dim, "dQ": head_dim, "dK": head_dim}
    return 2 * pairs * sum(dims[p] for p in bounds.PRODUCTS[kernel])


# ---------------------------------------------------------------- counting --

#: Which buffers are tensors (the bounds' bytes), mask data, or metadata
#: (shapes, strides, params: uniform values every thread reads).
TENSOR_BUFFERS = ("q", "k", "v", "dout", "o", "out", "lse", "delta", "dq", "dk", "dv")
MASK_BUFFERS = ("mask_array", "q_segments", "k_segments", "q_ranges", "k_ranges", "sinks")


def buffer_class(name: str, tensors: Sequence[str] = TENSOR_BUFFERS, mask: Sequence[str] = MASK_BUFFERS) -> str:
    """``"tensor"``, ``"mask"`` or ``"metadata"`` for a kernel buffer name
    (another kernel's buffer names: ``tensors`` and ``mask``)."""
    if name in tensors:
        return "tensor"
    if name in mask:
        return "mask"
    return "metadata"


def device_bytes(profile: emulator.Profile, factor: int, tensors: Sequence[str] = TENSOR_BUFFERS,
                 mask: Sequence[str] = MASK_BUFFERS) -> Tuple[Dict[str, List[int]], Dict[str, int]]:
    """``({buffer: [loaded, stored]}, {class: bytes})`` of a launch from the
    profile of its first grid column, times ``factor`` (``scaled_totals``)."""
    device: Dict[str, List[int]] = {}
    classes = {"tensor": 0, "mask": 0, "metadata": 0}
    for name, (loaded, stored) in profile.device_bytes.items():
        loaded, stored = loaded * factor, stored * factor
        device[name] = [loaded, stored]
        classes[buffer_class(name, tensors, mask)] += loaded + stored
    return device, classes


def first_column(counts) -> List[Tuple[int, int, int]]:
    """Every threadgroup along x of the first y and z (see the module docstring)."""
    return [(x, 0, 0) for x in range(counts[0])]


def scaled_totals(profile: emulator.Profile) -> Tuple[Dict[str, int], int]:
    """The launch's totals from a profile of its first grid column, and the
    factor: the number of columns. Peak threadgroup memory is not scaled."""
    nx, ny, nz = profile.group_counts
    if sorted(profile.positions) != [(x, 0, 0) for x in range(nx)]:
        raise ValueError(f"{profile.kernel}: the profile is not of the first grid column")
    factor = ny * nz
    totals = {name: value * factor for name, value in profile.totals.items()}
    totals["threadgroup.peak_bytes"] = profile.totals.get("threadgroup.peak_bytes", 0)
    return totals, factor


def _problem(case: Case) -> bounds.Problem:
    size = mx.finfo(DTYPES[case.dtype]).bits // 8
    return bounds.Problem(case.batch, case.q_heads, case.kv_heads, case.seq, case.seq,
                          case.head_dim, case.head_dim, size)


def structured_mask(case: Case, seed: int = 0) -> masks.StructuredMask:
    """The ``StructuredMask`` of ``case.mask`` (a benchmark mask name)."""
    args = mask_names.arguments(case.mask, case.batch, case.seq, case.q_heads, seed)
    if args.get("window") or args.get("sinks") is not None:
        raise ValueError(f"--cost counts causal masks and packed documents, not '{case.mask}'")
    return masks.build(case.seq, case.seq, args["mask"], segment_ids=args.get("segment_ids"))


def inputs(case: Case, seed: int = 0):
    """Seeded ``(q, k, v, dout)`` of ``case``, in its dtype."""
    dtype = DTYPES[case.dtype]
    keys = mx.random.split(mx.random.key(seed), 4)
    q_shape = (case.batch, case.q_heads, case.seq, case.head_dim)
    kv_shape = (case.batch, case.kv_heads, case.seq, case.head_dim)
    return tuple(
        mx.random.normal(shape, key=key).astype(dtype)
        for shape, key in zip((q_shape, kv_shape, kv_shape, q_shape), keys)
    )


def backward_inputs(call: AttentionCall, dout):
    """``(lse, delta)`` for the backward kernels, from ``blockwise``."""
    out, lse = blockwise.attention(call)
    delta = mx.sum(dout.astype(mx.float32) * out.astype(mx.float32), axis=-1)
    mx.eval(lse, delta)
    return lse, delta


def profile_launches(run: Callable[[], None]) -> List[emulator.Profile]:
    """The profiles of the first grid column of every launch ``run`` makes
    through ``mlx_flash.kernels.launch``, on the emulator, one schedule;
    each launch whole, not cut into watchdog-safe pieces
    (``mlx_flash.dispatch``): the pieces only divide the same work."""
    with dispatch.whole_launches(), emulator.metal(schedule="forward", profile=True,
                                                   threadgroups=first_column) as session:
        run()
    return session.profiles


def count(case: Case, seed: int = 0) -> List[dict]:
    """The cells (``cell``) of the three kernels of ``case.family`` on ``case``."""
    if case.batch != 1:
        raise ValueError(f"--cost counts one batch row (a launch's first column), not {case.batch}")
    family = families.get(case.family)
    mask = structured_mask(case, seed)
    q, k, v, dout = inputs(case, seed)
    call = AttentionCall(q, k, v, case.head_dim ** -0.5, mask)
    backward = call.backward(dout, *backward_inputs(call, dout))
    launches = {
        "forward": lambda: mx.eval(family.forward(call)),
        "dkdv": lambda: mx.eval(family.dkdv(backward)),
        "dq": lambda: mx.eval(family.dq(backward)),
    }
    cells = []
    for kernel in KERNELS:
        start = time.perf_counter()
        (profile,) = profile_launches(launches[kernel])
        tiling, text, registers, declared = kernel_tiling(case, kernel)
        cells.append(cell(case, kernel, profile, tiling, mask, text, registers, declared,
                          seconds=time.perf_counter() - start))
    return cells


def cell(case: Case, kernel: str, profile: emulator.Profile, tiling: bounds.Tiling,
         mask: masks.StructuredMask, tiles: str, registers: Optional[int], declared: Optional[int],
         seconds: float) -> dict:
    """One kernel's counts beside its bounds, as the report stores them."""
    totals, factor = scaled_totals(profile)
    problem = _problem(case)
    pairs = bounds.kept_pairs(mask, case.batch) * case.q_heads
    evaluated = evaluated_pairs(mask, tiling, case.q_heads, case.batch)
    device, classes = device_bytes(profile, factor)
    counted_mma = totals.get("simdgroup_matrix.multiply_accumulate", 0)
    return {
        **asdict(case),
        "dtype": case.dtype,
        "kernel": kernel,
        "tiles": tiles,
        "tiling": asdict(tiling),
        "registers_estimate": registers,
        "threadgroup_bytes_declared": declared,
        "threadgroup_peak_bytes": totals["threadgroup.peak_bytes"],
        "threadgroups": {"counted": profile.threadgroups, "launch": profile.threadgroups * factor,
                         "factor": factor},
        "kept_pairs": pairs,
        "evaluated_pairs": evaluated,
        "flops": {
            "bound": bounds.bound_flops(kernel, problem, pairs // case.q_heads),
            "issued": product_flops(kernel, evaluated, case.head_dim, case.head_dim),
            # demo: 8x8x8 multiply-accumulates, 2 FLOPs each; practical: scalar
            # FMAs the profiler does not count (issued follows from the visits).
            "counted": 2 * 512 * counted_mma if families.get(case.family).matrix_products else None,
        },
        "bytes": {
            "tensor": classes["tensor"],
            "mask": classes["mask"],
            "metadata": classes["metadata"],
            **bounds.bound_bytes(kernel, problem, mask, tiling),
        },
        "device_bytes": device,
        "threadgroup_bytes": {"loaded": totals.get("threadgroup.loaded_bytes", 0),
                              "stored": totals.get("threadgroup.stored_bytes", 0)},
        "simdgroup_matrix": {kind: totals.get(f"simdgroup_matrix.{kind}", 0)
                             for kind in ("multiply_accumulate", "load", "store")},
        "collectives": {name[5:]: value for name, value in totals.items() if name.startswith("simd.") and value},
        "math": {name[5:]: value for name, value in totals.items() if name.startswith("math.") and value},
        "barriers": {name[8:]: value for name, value in totals.items() if name.startswith("barrier.") and value},
        "seconds": round(seconds, 2),
    }


# ------------------------------------------------- practical ALU per pair --

#: Lane operations per evaluated pair of a scalar kernel (one thread per
#: pair, float32, the same contract) for causal masks and packed documents
#: (causal + segment ids): the minimum the practical kernels are held to.
#: Mask: the causal compare and the select of -inf (packed: the id compare
#: and an and besides); scale 1; forward: the kept-any flag 1, the running
#: max 1, the exponent's argument 1 (one FMA), exp 1, the sum 1; backward:
#: the exponent's argument 1, exp 1, dS = p * (dP - delta) 2. Per-row work
#: (corrections, lse, the final divide) is not per pair; neither is O's
#: rescale, Dv multiplies per row and tile in a scalar kernel as in these.
SCALAR_MINIMUM = {
    ("forward", False): 8, ("forward", True): 10,
    ("dkdv", False): 7, ("dkdv", True): 9,
    ("dq", False): 7, ("dq", True): 9,
}

#: Lane operations per evaluated pair that the practical kernels execute
#: and the profiler does not count, read off the source (no dot-product
#: FMAs, no memory operations). practical_masked_score: key >= lo, key < hi,
#: their and, the select (4; segments: the id compare and an and, 6); the
#: scale 1. Forward: the kept flag 1, the lazy-maximum test (a compare and
#: an or) 2, the exponent's argument (subtract, multiply) 2, l += p 1.
#: Backward: the exponent's argument 2 and the select of 0 for a dropped
#: score 1, dS 2.
PRACTICAL_CODE_OPS = {
    ("forward", False): 11, ("forward", True): 13,
    ("dkdv", False): 10, ("dkdv", True): 12,
    ("dq", False): 10, ("dq", True): 12,
}

#: Forward: operations of a rescale (a row's new maximum) per lane and row,
#: besides its exp and the group max's shuffles: the max with m, the
#: correction's argument (subtract, multiply), l *= correction, the new limit.
RESCALE_OPS = 5


def practical_alu(c: dict) -> dict:
    """Lane operations per evaluated pair of a current practical kernel's
    cell: what the profiler counted (math calls; SIMD collectives, 32 lane
    operations each; the max or add that follows each butterfly shuffle),
    what the source adds (``PRACTICAL_CODE_OPS``, and ``RESCALE_OPS`` per
    correction exp: every exp2 of the forward beyond one per pair is a
    rescale's), the total, the scalar minimum and their ratio."""
    pairs = c["evaluated_pairs"]
    packed = "docs" in c["mask"]
    math_calls = sum(c["math"].values()) / pairs
    collectives = 32 * sum(c["collectives"].values()) / pairs
    butterfly = 32 * c["collectives"].get("simd_shuffle_xor", 0) / pairs
    code = PRACTICAL_CODE_OPS[(c["kernel"], packed)]
    rescales = 0.0
    if c["kernel"] == "forward":
        rescales = (c["math"].get("exp2", 0) - pairs) / pairs
        code += RESCALE_OPS * rescales
    total = math_calls + collectives + butterfly + code
    minimum = SCALAR_MINIMUM[(c["kernel"], packed)]
    return {
        "math": math_calls, "collectives": collectives, "butterfly": butterfly,
        "code": code, "rescales": rescales, "total": total, "scalar_minimum": minimum,
        "ratio": total / minimum,
    }
