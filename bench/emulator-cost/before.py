"""Count the kernels as they were at commit 23eb8ea, before the structured-mask rewrite.

    python bench/emulator-cost/before.py --out bench/emulator-cost/before.json
    python -m mlx_flash.bench --cost --before bench/emulator-cost/before.json --out bench/emulator-cost

The kernel sources are read from git (``git show 23eb8ea:metal/...``) and
launched as that commit's launchers launched them (its ``fused.mask_spec``
interface: causal as mask kind 1, params and tile sizes as there), through
the same profiler and counting as ``mlx_flash.bench.cost`` (one grid column
per launch, totals times the number of columns). Causal masks only: packed
documents did not exist then. The old demo lse is in log2 units, so the
backward gets the natural-log lse times log2(e). Nothing of the old code is
imported or kept in the package.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import mlx.core as mx

from mlx_flash import emulator, machine
from mlx_flash.bench import bounds, cost

COMMIT = "23eb8ea"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# 23eb8ea's demo.TILES: (BQ, BK) per kernel.
DEMO_TILES = {
    64: {"forward": (32, 32), "dq": (32, 32), "dkdv": (32, 32)},
    128: {"forward": (32, 32), "dq": (32, 16), "dkdv": (16, 32)},
}
DEMO_MASK_CAUSAL = 1
PRACTICAL_MASK_CAUSAL = 1
PRACTICAL_SIMDGROUPS = 4


def old_source(path: str) -> str:
    return subprocess.run(["git", "-C", ROOT, "show", f"{COMMIT}:{path}"], capture_output=True,
                          text=True, check=True).stdout


def old_kernel(name, body, headers, inputs, outputs):
    return mx.fast.metal_kernel(
        name=name, input_names=list(inputs), output_names=list(outputs),
        source=old_source(f"metal/{body}"),
        header="\n".join(old_source(f"metal/{h}") for h in headers),
        ensure_row_contiguous=False, compile_options={"math_mode": "safe"},
    )


def practical_tiles(dim, value_dim):
    """23eb8ea's practical.tile_sizes: rows (R, KPS) and the staged tile (BK, BQ)."""
    per_lane = max(-(-dim // 32), -(-value_dim // 32))
    rows = 4 if per_lane <= 4 else 2
    padded = 32 * (-(-dim // 32) + -(-value_dim // 32))
    tile = next(t for t in (32, 16, 8) if t * padded * 4 <= 16 * 1024)
    return rows, tile


def demo_registers(kernel, dim, bq, bk):
    """23eb8ea's demo.Tiles docstring: 32-bit words per lane of fragments and accumulators."""
    return {"forward": 3 * dim // 8 + 3 * bk // 8, "dq": 4 * dim // 8 + 5 * bk // 8,
            "dkdv": 6 * dim // 8 + 6 * bq // 8}[kernel]


def launches(case, q, k, v, dout, lse, delta, scale):
    """``{kernel: (kernel object, call, tiling, tiles text, registers)}`` as 23eb8ea launched them."""
    B, n_q, L, dim = q.shape
    n_kv = k.shape[1]
    group = n_q // n_kv
    placeholder = mx.zeros((1, 1, 1, 1), mx.bool_)
    out = {}
    if case.family == "practical":
        rows, tile = practical_tiles(dim, dim)
        threads = 32 * PRACTICAL_SIMDGROUPS
        block = PRACTICAL_SIMDGROUPS * rows
        params = mx.array([L, L, n_q, n_kv, PRACTICAL_MASK_CAUSAL], dtype=mx.int32)
        fparams = mx.array([scale, float(mx.finfo(q.dtype).min)], dtype=mx.float32)
        base = ("q", "k", "v", "mask_array")
        template = [("T", q.dtype), ("D", dim), ("DV", dim), ("NSG", PRACTICAL_SIMDGROUPS)]
        for kernel, body, names, outs, extra, shapes in (
            ("forward", "practical_forward.metal", base + ("params", "fparams"), ("o", "lse"),
             [("R", rows), ("BK", tile)], [q.shape, q.shape[:3]]),
            ("dkdv", "practical_backward_dkdv.metal", base + ("dout", "lse", "delta", "params", "fparams"),
             ("dk", "dv"), [("KPS", rows), ("BQ", tile)], [k.shape, v.shape]),
            ("dq", "practical_backward_dq.metal", base + ("dout", "lse", "delta", "params", "fparams"),
             ("dq",), [("R", rows), ("BK", tile)], [q.shape]),
        ):
            arrays = [q, k, v, placeholder] + ([] if kernel == "forward" else [dout, lse, delta]) + [params, fparams]
            heads = n_kv if kernel == "dkdv" else n_q
            call = dict(
                inputs=arrays, template=template + extra,
                grid=(threads * -(-L // block), heads, B), threadgroup=(threads, 1, 1),
                output_shapes=shapes,
                output_dtypes=[q.dtype, mx.float32] if kernel == "forward" else [q.dtype] * len(outs),
            )
            kind = f"flash_practical_{'dkdv' if kernel == 'dkdv' else kernel}"
            tiling = (bounds.Tiling("key", block, tile, group) if kernel == "dkdv"
                      else bounds.Tiling("query", block, tile, 1))
            text = f"NSG/{'KPS/BQ' if kernel == 'dkdv' else 'R/BK'} {PRACTICAL_SIMDGROUPS}/{rows}/{tile}"
            out[kernel] = (old_kernel(kind, body, ("flash_common.h",), names, outs), call, tiling, text, None)
        return out
    params = mx.array([L, L, n_q, n_kv], dtype=mx.int32)
    fparams = mx.array([scale], dtype=mx.float32)
    names = ("q", "k", "v", "mask_array", "params", "fparams")
    log2_lse = lse * math.log2(math.e)
    for kernel, body, outs, shapes in (
        ("forward", "demo_forward", ("out", "lse"), [q.shape, q.shape[:3]]),
        ("dkdv", "demo_backward_dkv", ("dk", "dv"), [k.shape, v.shape]),
        ("dq", "demo_backward_dq", ("dq",), [q.shape]),
    ):
        bq, bk = DEMO_TILES[dim][kernel]
        rows = bk if kernel == "dkdv" else bq
        threads = rows // 8 * 32
        arrays = [q, k, v, placeholder, params, fparams]
        if kernel != "forward":
            arrays += [dout, log2_lse, delta]
        call = dict(
            inputs=arrays, template=[("T", q.dtype), ("D", dim), ("BQ", bq), ("BK", bk), ("MASK", DEMO_MASK_CAUSAL)],
            grid=(threads * -(-L // rows), n_kv if kernel == "dkdv" else n_q, B), threadgroup=(threads, 1, 1),
            output_shapes=shapes,
            output_dtypes=[q.dtype, mx.float32] if kernel == "forward" else [q.dtype] * len(outs),
        )
        tiling = bounds.Tiling("key", bk, bq, group) if kernel == "dkdv" else bounds.Tiling("query", bq, bk, 1)
        kern = old_kernel(body, f"{body}.metal", ("flash_common.h", "demo_common.h"),
                          names + (() if kernel == "forward" else ("dout", "lse", "delta")), outs)
        out[kernel] = (kern, call, tiling, f"BQ/BK {bq}/{bk}", demo_registers(kernel, dim, bq, bk))
    return out


def count(case, seed=0):
    mask = cost.structured_mask(case, seed)
    q, k, v, dout = cost.inputs(case, seed)
    scale = case.head_dim ** -0.5
    lse, delta = cost.backward_inputs(q, k, v, dout, scale, mask)
    cells = []
    for kernel, (kern, call, tiling, text, registers) in launches(case, q, k, v, dout, lse, delta, scale).items():
        start = time.perf_counter()
        _, profile = emulator.run(kern, **call, schedule="forward", profile=True, threadgroups=cost.first_column)
        cells.append(cost.cell(case, kernel, profile, tiling, mask, text, registers, None,
                               seconds=time.perf_counter() - start))
    return cells


def main(argv=None):
    parser = argparse.ArgumentParser(description=f"Count the attention kernels of commit {COMMIT} (causal) "
                                                 "with the emulator's profiler, as mlx_flash.bench --cost does.")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--seq", type=int, nargs="+", help="lengths (default: those of mlx_flash.bench --cost)")
    parser.add_argument("--head-dim", type=int, nargs="+", help="head dims (64 and 128 by default)")
    parser.add_argument("--kv-heads", type=int, nargs="+", help="KV heads of 8 query heads (8 and 1 by default)")
    args = parser.parse_args(argv)
    if all(a is None for a in (args.seq, args.head_dim, args.kv_heads)):
        cases = cost.default_cases(mask_list=("causal",))
    else:
        cases = cost.grid(args.seq or cost.SEQS, args.head_dim or cost.HEAD_DIMS, args.kv_heads or cost.KV_HEADS,
                          mask_list=("causal",))
    start = time.perf_counter()
    cells = []
    for i, case in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] {case.label()}", file=sys.stderr, flush=True)
        cells += count(case)
    with open(args.out, "w") as f:
        json.dump({"source": {"commit": COMMIT, "what": "kernels and launch geometry of that commit"},
                   "machine": machine.describe(), "seconds": round(time.perf_counter() - start, 1),
                   "cells": cells}, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
