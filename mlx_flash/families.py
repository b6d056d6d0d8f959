"""The kernel families: one frozen description each, in one registry.

A *family* is a set of three Metal kernels (forward, dK/dV, dQ) with their
launchers (``mlx_flash.fused`` has the launchers' contract). ``Family``
says everything the rest of the package needs to know about one: its name
(a ``variant=``), the dtypes and head dims it runs, the tolerances it is
held to against the float32 oracle, why a shape is unsupported, its
launchers, the family that runs what it does not, and how ``bench --cost``
describes its tiles. ``attention`` (dispatch and ``explain``),
``validation``, ``oracle``, ``doctor`` and ``bench`` read ``REGISTRY``
through ``get`` / ``names`` / ``preferred`` and never name a family.

How to add a kernel family
--------------------------

1. Write its kernels in ``metal/<name>_*.metal`` against
   ``metal/flash_common.h`` (the inputs ``fused.KERNEL_INPUTS`` and, for the
   backward, ``fused.BACKWARD_INPUTS``; the contract in ``mlx_flash.fused``).
2. Write ``mlx_flash/<name>.py`` with three launchers taking one
   ``AttentionCall`` (``forward(call) -> (o, lse)``, ``dkdv(call) -> (dk,
   dv)``, ``dq(call) -> dq``; build with ``kernels.build``, pass
   ``fused.kernel_inputs(call, q_tile, k_tile)``, run with
   ``kernels.launch``, or ``dispatch.launch`` to cut long launches into
   pieces under the GPU watchdog: its kernels then start at the tile
   ``params[9]`` names and write that piece's rows, see
   ``mlx_flash.dispatch``), its ``DTYPES`` and an ``unsupported_reason(q,
   k, v, mask)``.
3. Describe it here with a ``Family(...)`` and add it to ``REGISTRY``; its
   ``fallback`` names the family that takes what it does not (``None``:
   ``blockwise``), which also places it in ``auto``'s default order (a
   family is tried before the one it falls back to).

Nothing else changes: ``variant="<name>"``, ``explain``, first-use
validation, ``python -m mlx_flash.doctor`` and ``python -m mlx_flash.bench``
(including ``--cost``) pick it up from the registry. The kernel tests take
a family and run it through the emulator (``tests/kernel_checks.py``).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx

from . import demo, dispatch, fused, masks, practical, verdicts
from .call import AttentionCall

#: ``(atol, rtol)`` per input dtype.
Tolerances = Tuple[Tuple[mx.Dtype, Tuple[float, float]], ...]


@dataclass(frozen=True)
class KernelTiling:
    """How one kernel of a family tiles a problem, for ``bench --cost``.

    ``owner`` is ``"query"`` (a threadgroup owns ``own`` query positions of
    ``heads`` query heads and walks key tiles of ``inner``) or ``"key"``
    (it owns ``own`` keys and walks query tiles of ``inner``; ``heads`` is
    the GQA group it sums over). ``text`` names the tile constants,
    ``registers`` is the family's estimate per lane (not a compiler count)
    and ``threadgroup_bytes`` what the kernel declares.
    """

    owner: str
    own: int
    inner: int
    heads: int
    text: str
    registers: int
    threadgroup_bytes: int


@dataclass(frozen=True)
class Family:
    """One kernel family (see the module docstring).

    ``dtypes`` are the input dtypes it runs; ``head_dims`` the ``(D, Dv)``
    pairs ``python -m mlx_flash.doctor`` validates by default;
    ``tolerances`` the ``(atol, rtol)`` per dtype of its output and every
    gradient against the float32 oracle; ``unsupported(q, k, v, mask)`` why
    it cannot run normalised inputs (or None); ``forward``, ``dkdv`` and
    ``dq`` its launchers, each taking an ``AttentionCall`` (through
    ``dispatch.by_heads``, which runs a long launch over ranges of heads);
    ``fallback`` the family that runs what it does not (None: ``blockwise``);
    ``cost_dtype`` the dtype ``bench --cost`` counts it in (the one it runs
    for training); ``matrix_products`` whether its products are
    ``simdgroup_matrix`` operations (which the emulator's profiler counts);
    ``tiling(kernel, head_dim, dtype, group) -> KernelTiling``; ``inputs``
    and ``backward_inputs`` the names of its kernels' inputs, in the order
    ``fused.kernel_inputs`` gives them; ``dispatch_tiles(stage, q, k, v) ->
    (rows, inner)`` the tiles ``mlx_flash.dispatch`` splits a launch by
    (None: no split is planned, and ``explain`` names none).
    """

    name: str
    dtypes: Tuple[mx.Dtype, ...]
    head_dims: Tuple[Tuple[int, int], ...]
    tolerances: Tolerances
    unsupported: Callable
    forward: Callable
    dkdv: Callable
    dq: Callable
    tiling: Callable
    cost_dtype: str
    fallback: Optional[str] = None
    matrix_products: bool = False
    dispatch_tiles: Optional[Callable] = None
    inputs: Tuple[str, ...] = fused.KERNEL_INPUTS
    backward_inputs: Tuple[str, ...] = fused.BACKWARD_INPUTS

    @property
    def dtype_names(self) -> Tuple[str, ...]:
        return tuple(verdicts.dtype_name(d) for d in self.dtypes)

    def tolerance(self, dtype) -> Tuple[float, float]:
        """``(atol, rtol)`` for inputs of ``dtype``."""
        return dict(self.tolerances)[dtype]

    def unsupported_dims(self, dtype: str, dim: int, value_dim: int) -> Optional[str]:
        """Why this family has no kernel for ``dtype`` (a name) and head dims
        ``(dim, value_dim)``, or None."""
        x = mx.zeros((1, 1, 1, dim), getattr(mx, dtype))
        v = mx.zeros((1, 1, 1, value_dim), getattr(mx, dtype))
        return self.unsupported(x, x, v, masks.build(1, 1))

    def gradients(self, call: AttentionCall, out: mx.array):
        """``(dq, dk, dv, delta)`` of a backward call (``fused.gradients``)."""
        return fused.gradients(self, call, out)

    def attention(self, call: AttentionCall):
        """``(out, lse)`` of ``call`` as one differentiable op: ``(B, Hq, Lq,
        Dv)`` in ``q``'s dtype and the ``(B, Hq, Lq)`` float32 log-sum-exp
        (``+inf`` where a row keeps no key, whose output is zero)."""
        return fused.run(self.forward, self.gradients, call)


def _practical_tiling(kernel: str, dim: int, dtype, group: int) -> KernelTiling:
    tiles = practical.tile_sizes(kernel, dim, dim, dtype)
    rows = tiles.simdgroups * tiles.rows
    if kernel == "dkdv":
        text = f"NSG/KPS/BQ {tiles.simdgroups}/{tiles.rows}/{tiles.tile}"
        return KernelTiling("key", rows, tiles.tile, group, text, tiles.registers, tiles.threadgroup_bytes)
    heads = fused.heads_per_tile(group, rows)
    text = f"NSG/R/BK {tiles.simdgroups}/{tiles.rows}/{tiles.tile}, {heads} head(s) x {rows // heads}"
    return KernelTiling("query", rows // heads, tiles.tile, heads, text, tiles.registers, tiles.threadgroup_bytes)


def _demo_tiling(kernel: str, dim: int, dtype, group: int) -> KernelTiling:
    tiles = demo.tiles_for(dim, dtype)
    size = mx.finfo(dtype).bits // 8
    bq, bk = getattr(tiles, kernel)
    registers, declared = tiles.registers(dim, size)[kernel], tiles.threadgroup_bytes(dim, size)[kernel]
    if kernel == "dkdv":
        return KernelTiling("key", bk, bq, group, f"BQ/BK {bq}/{bk}", registers, declared)
    heads = fused.heads_per_tile(group, tiles.heads)
    return KernelTiling("query", bq, bk, heads, f"BQ/BK {bq}/{bk}, {heads} head(s)", registers, declared)


#: float32 kernels only reorder float32 sums; float16 / bfloat16 add the
#: rounding of the inputs and of the stored results (eps 1e-3 and 8e-3).
PRACTICAL = Family(
    name="practical",
    dtypes=practical.DTYPES,
    head_dims=((64, 64), (80, 80), (96, 96), (128, 128), (256, 256), (128, 64)),
    tolerances=(
        (mx.float32, (1e-5, 1e-4)),
        (mx.float16, (2e-3, 1e-2)),
        (mx.bfloat16, (1e-2, 3e-2)),
    ),
    unsupported=practical.unsupported_reason,
    forward=dispatch.by_heads("forward", "practical", practical.forward, practical.dispatch_tiles),
    dkdv=dispatch.by_heads("dkdv", "practical", practical.dkdv, practical.dispatch_tiles),
    dq=dispatch.by_heads("dq", "practical", practical.dq, practical.dispatch_tiles),
    tiling=_practical_tiling,
    cost_dtype="float32",
    dispatch_tiles=practical.dispatch_tiles,
)

#: The kernels round P and dS to the input dtype before their products (as
#: FlashAttention does) and store results in it: a few units of the dtype's
#: epsilon of the largest value. float32 operands round nothing to a
#: narrower type; the weights' exp2 is Metal's fast one (a few ulps).
DEMO = Family(
    name="demo",
    dtypes=demo.DTYPES,
    head_dims=tuple((d, d) for d in demo.HEAD_DIMS),
    tolerances=(
        (mx.float16, (1e-3, 5e-3)),
        (mx.bfloat16, (8e-3, 2e-2)),
        (mx.float32, (2e-5, 2e-4)),
    ),
    unsupported=demo.unsupported_reason,
    forward=dispatch.by_heads("forward", "demo", demo.forward, demo.dispatch_tiles),
    dkdv=dispatch.by_heads("dkdv", "demo", demo.dkdv, demo.dispatch_tiles),
    dq=dispatch.by_heads("dq", "demo", demo.dq, demo.dispatch_tiles),
    tiling=_demo_tiling,
    cost_dtype="float16",
    fallback="practical",
    matrix_products=True,
    dispatch_tiles=demo.dispatch_tiles,
)

#: Every family, by name, in the order they are validated and reported.
REGISTRY: Dict[str, Family] = {f.name: f for f in (PRACTICAL, DEMO)}


def names() -> Tuple[str, ...]:
    """The families' names, in registry order."""
    return tuple(REGISTRY)


def get(name: str) -> Family:
    """The family called ``name``; ``ValueError`` if there is none."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown kernel family '{name}'; choose one of {', '.join(REGISTRY)}") from None


def chain(name: str) -> List[str]:
    """``name`` and the families it falls back to, in order (``demo`` ->
    ``["demo", "practical"]``); ``blockwise`` comes after the last."""
    found = []
    while name is not None and name not in found:
        found.append(name)
        name = get(name).fallback
    return found


def preferred() -> List[str]:
    """Every family, each before the one it falls back to (fastest first):
    ``auto``'s default order among the kernels."""
    return sorted(REGISTRY, key=lambda name: -len(chain(name)))
