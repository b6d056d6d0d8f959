"""``python -m mlx_flash.bench``: argument parsing, presets, and the run itself.

Presets fill the axes; any axis flag given on the command line wins::

    python -m mlx_flash.bench --matrix                 # the full default matrix
    python -m mlx_flash.bench --quick                  # a small matrix, well under a minute
    python -m mlx_flash.bench --memory                 # fwd+bwd peak memory and time, L 512..4096
    python -m mlx_flash.bench --decode --seq 1024 4096 # one query against a KV cache of each length
    python -m mlx_flash.bench --packed                 # packed documents of 512 tokens, L 2048..8192
    python -m mlx_flash.bench --window 1024            # a causal sliding window, L 2048..8192
    python -m mlx_flash.bench --sinks --seq 4096       # attention sinks (gpt-oss)
    python -m mlx_flash.bench --quick --targets bench/targets.yaml --out runs/bench
    python -m mlx_flash.bench --render runs/bench/results.json  # re-draw an earlier run

Exit status 1 when a declared target FAILs or a cell fails its correctness
check (or crashes).
"""

import argparse
import itertools
import json
import os
import shlex
import sys
from typing import List, Optional, Sequence

from .. import machine
from . import harness, masks, report, targets

ALL_VARIANTS = ["manual", "mlx", "blockwise", "practical", "demo"]

PRESETS = {
    "matrix": dict(
        batch=[1, 2, 4],
        seq=[64, 128, 256, 512, 1024, 2048, 4096],
        head_dim=[32, 64, 128],
        heads=[8],
        mask=["causal"],
        mode="both",
        variants=ALL_VARIANTS,
        warmup=1,
        repeats=5,
    ),
    "quick": dict(
        batch=[1],
        seq=[64, 128, 256],
        head_dim=[64],
        heads=[8],
        mask=["causal"],
        mode="both",
        variants=ALL_VARIANTS,
        warmup=1,
        repeats=3,
    ),
    # Issue 2's measurement: peak memory and time of forward + backward.
    "memory": dict(
        batch=[1],
        seq=[512, 1024, 2048, 4096],
        head_dim=[64],
        heads=[8],
        mask=["causal"],
        mode="fwdbwd",
        variants=["manual", "mlx", "blockwise"],
        dtype=["float32"],
        warmup=1,
        repeats=3,
    ),
    # Structured masks in training: packed documents, sliding windows, sinks
    # (the mask axis is filled from --documents / --window / --sinks), each
    # against full-causal blockwise at the same length.
    "structured": dict(
        batch=[1],
        seq=[2048, 4096, 8192],
        head_dim=[64],
        heads=[8],
        mask=[],
        mode="fwdbwd",
        variants=ALL_VARIANTS,
        dtype=["float32"],
        warmup=1,
        repeats=2,
    ),
}

#: What the structured runs are compared with: full causal, run by blockwise only.
BASELINE_MASK = "causal"
BASELINE_VARIANTS = ["blockwise"]


def _list(kind):
    """argparse type for ``1,2,4`` (also usable as ``1 2 4`` with nargs)."""

    def parse(text: str):
        return [kind(part) for part in text.split(",") if part]

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_flash.bench",
        description="Benchmark mlx-flash attention variants: correctness-checked time and peak memory.",
    )
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--matrix", action="store_true", help="the full default matrix (the default)")
    preset.add_argument("--quick", action="store_true", help="a small matrix that runs in well under a minute")
    preset.add_argument(
        "--memory",
        action="store_true",
        help="forward+backward peak memory and time of manual, mlx and blockwise at B=1, H=8, D=64, "
        "causal, float32, L 512..4096",
    )
    preset.add_argument(
        "--packed",
        action="store_true",
        help="forward+backward of packed rows (documents of --documents tokens, default 512) at L 2048..8192, "
        "every variant, and full-causal blockwise at the same L",
    )
    parser.add_argument("--decode", action="store_true", help="single-query decoding against a KV cache of each --seq")
    parser.add_argument(
        "--documents",
        metavar="N|A-B",
        help="document lengths of packed rows: N tokens each, or random lengths A..B (implies --packed's masks)",
    )
    parser.add_argument("--window", type=int, metavar="W", help="a causal sliding window of W keys")
    parser.add_argument("--sinks", action="store_true", help="one attention-sink logit per query head")
    parser.add_argument("--batch", type=_list(int), nargs="+", help="batch sizes")
    parser.add_argument("--seq", type=_list(int), nargs="+", help="sequence lengths (KV cache lengths with --decode)")
    parser.add_argument("--head-dim", type=_list(int), nargs="+", help="head dimensions")
    parser.add_argument("--heads", type=_list(int), nargs="+", help="query heads")
    parser.add_argument("--kv-heads", type=_list(int), nargs="+", help="KV heads (default: as many as query heads)")
    parser.add_argument("--dtype", type=_list(str), nargs="+", help="float16 on a GPU, float32 on CPU by default")
    parser.add_argument(
        "--mask",
        type=_list(str),
        nargs="+",
        help="none, causal, or structured names such as causal+docs512, causal+window1024, causal+sinks",
    )
    parser.add_argument("--mode", choices=["fwd", "fwdbwd", "both"], help="forward, forward+backward, or both")
    parser.add_argument("--variants", type=_list(str), nargs="+", help=f"from {', '.join(harness.VARIANTS)}")
    parser.add_argument("--warmup", type=int, help="warm-up runs per cell; the first is the correctness check")
    parser.add_argument("--repeats", type=int, help="timed runs per cell")
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        help="skip cells estimated to need more (default: 3/4 of RAM, or Metal's recommended working set)",
    )
    parser.add_argument("--no-share", action="store_true",
                        help="measure variants that run the same implementation separately")
    parser.add_argument("--targets", help="YAML file of targets to check (e.g. bench/targets.yaml)")
    parser.add_argument("--out", help="directory for report.md, results.json/.csv, plots (default runs/bench)")
    parser.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        help="measure nothing: rewrite the report, CSV and plots of an earlier run from its JSON "
        "(with --targets, evaluate those targets on it)",
    )
    parser.add_argument("--title", help="title of the Markdown report")
    parser.add_argument("--note", help="conditions of the run, printed in the report")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _flat(values: Optional[List[list]]) -> Optional[list]:
    return None if values is None else [x for group in values for x in group]


def settings(args: argparse.Namespace) -> dict:
    """The preset chosen by ``args`` with every given flag applied."""
    parts = []
    if args.packed or args.documents:
        parts.append(f"docs{args.documents or 512}")
    if args.window is not None:
        parts.append(f"window{args.window}")
    if args.sinks:
        parts.append("sinks")
    name = "quick" if args.quick else "memory" if args.memory else "structured" if parts else "matrix"
    chosen = dict(PRESETS[name], preset=name)
    if parts:
        suffix = "+" + "+".join(parts)
        given = _flat(args.mask)
        if given is None:
            chosen["mask"] = ["causal" + suffix, BASELINE_MASK]
            chosen["baseline"] = {BASELINE_MASK: BASELINE_VARIANTS}
        else:
            chosen["mask"] = [m + suffix for m in given]
            args.mask = None
    for axis in ("batch", "seq", "head_dim", "heads", "kv_heads", "dtype", "mask", "variants"):
        value = _flat(getattr(args, axis))
        if value is not None:
            chosen[axis] = value
    for key in ("mode", "warmup", "repeats"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    if "dtype" not in chosen:
        chosen["dtype"] = ["float32" if machine.backend() == "cpu" else "float16"]
    if args.decode:
        chosen["mode"] = "decode"
        # A decoding step takes milliseconds: more runs make its median steady.
        chosen["warmup"] = args.warmup if args.warmup is not None else 3
        chosen["repeats"] = args.repeats if args.repeats is not None else 20
    return chosen


def configs(chosen: dict) -> List[harness.Config]:
    modes = {"both": ["fwd", "fwdbwd"]}.get(chosen["mode"], [chosen["mode"]])
    for mask in chosen["mask"]:
        masks.check(mask)
    result = []
    for mode, dtype, mask, heads, dim, batch in itertools.product(
        modes, chosen["dtype"], chosen["mask"], chosen["heads"], chosen["head_dim"], chosen["batch"]
    ):
        for kv_heads in chosen.get("kv_heads") or [heads]:
            if heads % kv_heads:
                continue
            for seq in chosen["seq"]:
                result.append(harness.Config(mode, batch, seq, heads, kv_heads, dim, mask, dtype))
    if not result:
        raise ValueError("no configuration: every --heads must be a multiple of some --kv-heads")
    return result


def _variants_for(chosen: dict):
    """Per-configuration variants: a baseline mask runs only its variants."""
    baseline = chosen.get("baseline") or {}
    return lambda config: baseline.get(config.mask, chosen["variants"])


def render(args: argparse.Namespace) -> int:
    """``--render``: the reports of an earlier run, from its JSON alone."""
    try:
        with open(args.render) as f:
            results = json.load(f)
        if args.targets:
            results["targets"] = targets.evaluate(targets.load(args.targets), results["cells"], results["machine"])
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = report.write_all(results, args.out or os.path.dirname(os.path.abspath(args.render)))
    return _finish(results, paths)


def _finish(results: dict, paths: dict) -> int:
    """Print targets, failures and paths; the exit status (see module doc)."""
    for t in results["targets"]:
        print(f"{t['status']:>12}  {t['name']}: {t['detail']}")
    bad = [c for c in results["cells"] if c["status"] in ("FAILED", "error")]
    for c in bad:
        print(f"{c['status']:>12}  {c['variant']} {c['mode']} L={c['seq']} B={c['batch']} D={c['head_dim']}: {c['detail']}")
    print("wrote " + ", ".join(paths.values()))
    return 1 if bad or targets.any_failed(results["targets"]) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        return render(args)
    chosen = settings(args)
    try:
        cells_to_run = configs(chosen)
        declared = targets.load(args.targets) if args.targets else []
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_memory_gb is not None:
        limit = int(args.max_memory_gb * 2**30)
    else:
        ram = machine.physical_memory()
        limit = int(ram * 0.75) if ram else None

    about = machine.describe()
    variants_for = _variants_for(chosen)
    progress = harness.Progress(sum(len(variants_for(c)) for c in cells_to_run))
    try:
        cells = harness.run(
            cells_to_run,
            chosen["variants"],
            warmup=chosen["warmup"],
            repeats=chosen["repeats"],
            max_memory_bytes=limit,
            share=not args.no_share,
            seed=args.seed,
            progress=progress,
            variants_for=variants_for,
        )
    except ValueError as e:
        progress.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    progress.close()
    rows = [cell.to_dict() for cell in cells]
    try:
        load_end = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        load_end = None
    results = {
        "schema": report.SCHEMA,
        "machine": about,
        "settings": {
            "preset": chosen["preset"],
            "command": "python -m mlx_flash.bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
            "title": args.title,
            "note": args.note,
            "modes": sorted({c.mode for c in cells_to_run}),
            "dtypes": list(chosen["dtype"]),
            "masks": list(chosen["mask"]),
            "variants": list(chosen["variants"]),
            "warmup": chosen["warmup"],
            "repeats": chosen["repeats"],
            "max_memory_bytes": limit,
            "share": not args.no_share,
            "seed": args.seed,
            "tolerance": dict(harness.TOLERANCE),
            "load_average_end": load_end,
        },
        "cells": rows,
        "targets": targets.evaluate(declared, rows, about),
    }
    return _finish(results, report.write_all(results, args.out or "runs/bench"))
