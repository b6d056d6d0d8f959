"""Mask-and-metadata bytes beside tensor bytes, on two small cells.

    python bench/emulator-cost/metadata.py --out bench/emulator-cost/metadata-after.json

Counts the three kernels of each family on one packed-documents cell
(L=512, D=64, 8 heads, documents of 128) through ``mlx_flash.bench.cost``
(the emulator's profiler, one grid column per launch scaled to the launch)
and writes, per kernel, the device bytes of the tensors, of the mask data
(ids, id ranges) and of the metadata (params, shapes, strides), per buffer.
Run at two commits, it shows what reading metadata once changed.
"""

import argparse
import json
import time

from mlx_flash import machine
from mlx_flash.bench import cost

CASES = (cost.Case("demo", 512, 64, "causal+docs128"), cost.Case("practical", 512, 64, "causal+docs128"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    rows = []
    for case in CASES:
        start = time.perf_counter()
        for c in cost.count(case):
            b = c["bytes"]
            rows.append({
                "cell": f"{case.family} {c['kernel']} D={case.head_dim} L={case.seq} {case.mask} H=8/8 {case.dtype}",
                "tensor": b["tensor"], "mask": b["mask"], "metadata": b["metadata"],
                "mask_metadata_over_tensor": round((b["mask"] + b["metadata"]) / b["tensor"], 4),
                "buffers": {n: sum(v) for n, v in c["device_bytes"].items() if cost.buffer_class(n) != "tensor"},
            })
        print(f"{case.label()}: {time.perf_counter() - start:.1f} s", flush=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine.describe(), "cells": rows}, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
