"""The other public Metal flash-attention with packed documents,
``mlx-train-perf``, counted by the same emulator on the same problems
(``python -m mlx_flash.bench --cost --peer``).

Nothing of it is copied into this package: when it is importable, its own
launchers (``mlx_train_perf.attention.kernel.launch``) run with its own
kernel sources, and while they run ``mx.fast.metal_kernel`` hands each
kernel it builds to ``mlx_flash.kernels.launch``, so the launch goes to the
emulator and its profiler exactly as ours do (one grid column, scaled:
``mlx_flash.bench.cost.scaled_totals``).

What runs is its API's kernel path (``flash_attention``'s custom function):
the forward, then ``launch_bwd_D`` (delta = rowsum(dO * O), its own
kernel), dQ and dK/dV, with the tiles its dispatch tables pick
(``select_fwd_tile``, ``select_bwd_tiles``: the ``default`` variant) or with
the MMA body's D-slab as wide as the head dim (``full-slab``). Each kernel
runs as one dispatch (``rate_macs_per_s=None``): its API splits the same
kernel into query-row ranges by a rate it times on the GPU at first use,
which only adds launches of the same kernel and cannot be timed here.

Before a count is kept, the outputs of the counted grid column (query head 0,
or KV head 0 for dK/dV) are checked against the float32 reference with
demo's tolerances for the dtype (``correct``). It runs float32 and
bfloat16, head dims 64, 96 and 128 (its own gate).
"""

import contextlib
import importlib.metadata
import importlib.util
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np

from .. import blockwise, kernels, oracle, reference
from ..call import AttentionCall
from . import bounds, cost

PACKAGE = "mlx_train_perf"
DISTRIBUTION = "mlx-train-perf"
VARIANTS = ("default", "full-slab")
KERNELS = ("forward", "delta", "dkdv", "dq")
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
HEAD_DIMS = (64, 96, 128)

#: Its buffer names by class, as ``cost.buffer_class`` sorts ours.
TENSOR_BUFFERS = ("q", "k", "v", "o", "d_o", "o_out", "l_out", "lse", "d_arr", "d_out",
                  "dq_out", "dk_in", "dv_in", "dk_out", "dv_out")
MASK_BUFFERS = ("seg_id", "seg_start")


def version() -> Optional[str]:
    """The installed mlx-train-perf's version, or None when it is not importable."""
    if importlib.util.find_spec(PACKAGE) is None:
        return None
    return importlib.metadata.version(DISTRIBUTION)


@dataclass(frozen=True)
class Problem:
    """One attention problem of the cost grid, in one of its dtypes."""

    seq: int
    head_dim: int
    mask: str
    q_heads: int
    kv_heads: int
    dtype: str
    variant: str = "default"

    def label(self) -> str:
        return (f"mlx-train-perf {self.variant} D={self.head_dim} L={self.seq} {self.mask} "
                f"H={self.q_heads}/{self.kv_heads} {self.dtype}")

    def case(self) -> cost.Case:
        """The same problem as a cost case (its mask and seeded inputs)."""
        return cost.Case("practical", self.seq, self.head_dim, self.mask, self.q_heads, self.kv_heads,
                         precision=self.dtype)


def problems(cases: List[cost.Case], variants=VARIANTS) -> List[Problem]:
    """The problems of ``cases`` it can run, once each, in float32 and
    bfloat16 (the element size of demo's float16), each variant; the
    full-slab variant only where it differs from the default."""
    out = []
    for c in cases:
        if c.head_dim not in HEAD_DIMS:
            continue
        for dtype in DTYPES:
            for variant in variants:
                if variant == "full-slab" and _tiles("default", c.seq, c.head_dim) == _tiles(variant, c.seq, c.head_dim):
                    continue
                p = Problem(c.seq, c.head_dim, c.mask, c.q_heads, c.kv_heads, dtype, variant)
                if p not in out:
                    out.append(p)
    return out


def _tiles(variant: str, seq: int, head_dim: int):
    """``(forward, dq, dkdv)`` as ``(body, d_slab)`` of ``variant``."""
    from mlx_train_perf.attention.kernel.dispatch import select_bwd_tiles, select_fwd_tile

    if variant == "default":
        chosen = (select_fwd_tile(seq, head_dim), *select_bwd_tiles(seq, head_dim))
        return tuple((t.variant, t.d_slab) for t in chosen)
    if variant == "full-slab":
        return (("mma", head_dim),) * 3
    raise ValueError(f"unknown mlx-train-perf variant '{variant}' (one of {', '.join(VARIANTS)})")


class _OnEmulator:
    """A kernel of theirs that launches through ``mlx_flash.kernels.launch``."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __call__(self, **call):
        return kernels.launch(self.kernel, **call)


@contextlib.contextmanager
def _kernels_on_emulator():
    """Inside the block, every kernel their launchers build runs through
    ``kernels.launch``; their kernel caches are emptied on the way in and
    out so no kernel built either way outlives the block."""
    from mlx_train_perf.attention.kernel import launch

    builders = (launch._fwd_kernel, launch._bwd_d_kernel, launch._bwd_dq_kernel, launch._bwd_dkv_kernel)
    build = mx.fast.metal_kernel
    for b in builders:
        b.cache_clear()
    mx.fast.metal_kernel = lambda **kw: _OnEmulator(build(**kw))
    try:
        yield
    finally:
        mx.fast.metal_kernel = build
        for b in builders:
            b.cache_clear()


def segments(ids: mx.array):
    """``(seg_id, seg_start)`` int32 ``(B, L)`` of contiguous document ids
    ``(B, L)``: its document's index in the row, and the position where the
    document begins."""
    ids = np.array(ids)
    seg_id = np.zeros(ids.shape, np.int32)
    seg_start = np.zeros(ids.shape, np.int32)
    for b, row in enumerate(ids):
        new = np.concatenate([[True], row[1:] != row[:-1]])
        seg_id[b] = np.cumsum(new) - 1
        seg_start[b] = np.maximum.accumulate(np.where(new, np.arange(len(row)), 0))
    return mx.array(seg_id), mx.array(seg_start)


def _reference(q, k, v, dout, scale, mask):
    """float32 output and (dq, dk, dv) of the first KV group: query heads
    ``0 .. group - 1`` and KV head 0."""
    group = q.shape[1] // k.shape[1]
    q, dout = q[:, :group], dout[:, :group]
    k, v = k[:, :1], v[:, :1]
    f32 = [x.astype(mx.float32) for x in (q, k, v, dout)]
    (out,), grads = mx.vjp(lambda q, k, v: reference.attention(q, k, v, scale, mask), f32[:3], [f32[3]])
    return out, grads


def correct(outputs: Dict[str, mx.array], expected, delta: mx.array, dtype) -> Optional[str]:
    """Why the counted column's outputs (head 0, the first row of delta, KV
    head 0) are wrong, or None."""
    out, (dq, dk, dv) = expected
    tolerance = oracle.TOLERANCES["demo"][dtype]
    checks = (("output", outputs["forward"][:, :1], out[:, :1]),
              ("delta", outputs["delta"][:, :1, :1], delta[:, :1, :1]),
              ("dq", outputs["dq"][:, :1], dq[:, :1]),
              ("dk", outputs["dk"][:, :1], dk),
              ("dv", outputs["dv"][:, :1], dv))
    for name, actual, want in checks:
        problem = oracle.mismatch(actual, want, tolerance)
        if problem:
            return f"{name}: {problem}"
    return None


def count(problem: Problem, seed: int = 0) -> List[dict]:
    """The cells of its four kernels on ``problem``, checked first."""
    from mlx_train_perf.attention.kernel import launch

    case = problem.case()
    mask = cost.structured_mask(case, seed)
    q, k, v, dout = cost.inputs(case, seed)
    scale = problem.head_dim ** -0.5
    packed = {}
    if mask.has_segments:
        packed = dict(zip(("seg_id", "seg_start"), segments(mask.q_segments)))
    fwd, dq_tile, dkv_tile = _tiles(problem.variant, problem.seq, problem.head_dim)
    # A launch runs one grid column (head 0's forward, one row of delta), so
    # the backward kernels read every head's output, lse and delta from
    # blockwise, as ours do in ``cost.count``: its lse is natural-log too.
    call = AttentionCall(q, k, v, scale, mask)
    out, lse = blockwise.attention(call)
    delta_all = mx.sum(dout.astype(mx.float32) * out.astype(mx.float32), axis=-1)
    mx.eval(out, lse, delta_all)
    results: Dict[str, mx.array] = {}

    def forward():
        tile = launch.TileShape(variant=fwd[0], d_slab=fwd[1])
        results["forward"], results["lse"] = launch.launch_flash_fwd(
            q, k, v, scale=scale, causal=True, tile=tile, **packed)
        return results["forward"], results["lse"]

    def delta():
        results["delta"] = launch.launch_bwd_D(dout, out)
        return results["delta"]

    def dq():
        results["dq"] = launch.launch_bwd_dq(
            q, k, v, dout, lse, delta_all, scale=scale, causal=True,
            variant=dq_tile[0], d_slab=dq_tile[1], **packed)
        return results["dq"]

    def dkdv():
        results["dk"], results["dv"] = launch.launch_bwd_dkv(
            q, k, v, dout, lse, delta_all, scale=scale, causal=True,
            variant=dkv_tile[0], d_slab=dkv_tile[1], **packed)
        return results["dk"], results["dv"]

    # In the order its API launches them.
    launches = {"forward": forward, "delta": delta, "dq": dq, "dkdv": dkdv}
    profiles, seconds = {}, {}
    with _kernels_on_emulator():
        for name, run in launches.items():
            start = time.perf_counter()
            (profiles[name],) = cost.profile_launches(lambda: mx.eval(run()))
            seconds[name] = time.perf_counter() - start
    problem_text = correct(results, _reference(q, k, v, dout, scale, mask), delta_all, DTYPES[problem.dtype])
    if problem_text:
        raise AssertionError(f"{problem.label()}: {problem_text}")
    bodies = {"forward": fwd, "dq": dq_tile, "dkdv": dkv_tile, "delta": ("rowsum", None)}
    full_slab = (fwd, dq_tile, dkv_tile) == _tiles("full-slab", problem.seq, problem.head_dim)
    return [{**cell(problem, name, profiles[name], mask, bodies[name], seconds[name]), "full_slab": full_slab}
            for name in KERNELS]


def cell(problem: Problem, kernel: str, profile, mask, body, seconds: float) -> dict:
    """One of its kernels' counts, in the fields the cost report compares."""
    totals, factor = cost.scaled_totals(profile)
    device, classes = cost.device_bytes(profile, factor, TENSOR_BUFFERS, MASK_BUFFERS)
    size = mx.finfo(DTYPES[problem.dtype]).bits // 8
    shape = bounds.Problem(1, problem.q_heads, problem.kv_heads, problem.seq, problem.seq,
                           problem.head_dim, problem.head_dim, size)
    pairs = bounds.kept_pairs(mask) * problem.q_heads
    return {
        **asdict(problem),
        "kernel": kernel,
        "body": body[0] if body[1] is None else f"{body[0]}, D-slab {body[1]}",
        "threadgroup_peak_bytes": totals["threadgroup.peak_bytes"],
        "threadgroups": {"counted": profile.threadgroups, "launch": profile.threadgroups * factor, "factor": factor},
        "kept_pairs": pairs,
        "flops": {
            "bound": bounds.bound_flops(kernel, shape, pairs // problem.q_heads) if kernel != "delta" else None,
            "counted": 2 * 512 * totals.get("simdgroup_matrix.multiply_accumulate", 0),
        },
        "bytes": {**classes,
                  "minimum": bounds.minimum_bytes(kernel, shape) if kernel != "delta" else None},
        "device_bytes": device,
        "exp": sum(totals.get(f"math.{f}", 0) for f in ("exp", "exp2")),
        "seconds": round(seconds, 2),
    }
