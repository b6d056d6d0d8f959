"""``python -m mlx_flash.bench``: argument parsing, presets, and the run itself.

Presets fill the axes; any axis flag given on the command line wins::

    python -m mlx_flash.bench --matrix                 # the full default matrix
    python -m mlx_flash.bench --quick                  # a small matrix, well under a minute
    python -m mlx_flash.bench --memory                 # fwd+bwd peak memory and time, L 512..4096
    python -m mlx_flash.bench --decode --seq 1024 4096 # one query against a KV cache of each length
    python -m mlx_flash.bench --packed                 # packed documents of 512 tokens, L 2048..8192
    python -m mlx_flash.bench --window 1024            # a causal sliding window, L 2048..8192
    python -m mlx_flash.bench --sinks --seq 4096       # attention sinks (gpt-oss)
    python -m mlx_flash.bench --quick --targets --out runs/bench   # with the shipped targets
    python -m mlx_flash.bench --render runs/bench/results.json     # re-draw an earlier run
    python -m mlx_flash.bench --cost                   # what the Metal kernels issue, counted by the emulator
    python -m mlx_flash.bench --step --help            # one LoRA training step at real model shapes

``--cost`` counts instead of timing (``mlx_flash.bench.cost``): every kernel
of the practical and demo families on the emulator's profiler, against
FlashAttention-2 lower bounds, with its own targets; ``--seq``,
``--head-dim``, ``--heads``, ``--kv-heads``, ``--mask`` and ``--variants``
(practical, demo) narrow it, ``--before JSON`` adds an earlier commit's
counts (``bench/emulator-cost/before.py``).

Exit status 1 when a declared target FAILs (``--cost``: one of its own) or a
cell fails its correctness check (or crashes); 130 when ``--cost`` is
interrupted (the report then holds the cases counted); 2 for bad arguments (one line, no traceback), an output
folder that cannot be written or already holds a report (``--overwrite``), or
a run estimated to take hours that was not confirmed (``--yes``).
"""

import argparse
import itertools
import json
import os
import shlex
import sys
import time
from typing import List, Optional, Sequence

from .. import machine
from ..folders import unwritable
from . import harness, masks, report, targets

DEFAULT_OUT = os.path.join("runs", "bench")
DEFAULT_COST_OUT = os.path.join("runs", "bench-cost")

#: Runs estimated to take longer than this ask before they start.
CONFIRM_ABOVE_S = 3600

ALL_VARIANTS = [name for name in harness.VARIANTS if name != "auto"]

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
    # Peak memory and time of forward + backward: what the O(L) backward saves.
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
    preset.add_argument(
        "--matrix",
        action="store_true",
        help="the full default matrix (the default): hours on a CPU, where it asks first",
    )
    preset.add_argument("--quick", action="store_true", help="a small matrix that runs in well under a minute")
    preset.add_argument(
        "--blas",
        action="store_true",
        help="time a float32 2048^3 product on the BLAS MLX's Linux wheel ships against the optimized BLAS "
        "preloaded, in interleaved fresh processes (minutes: the shipped BLAS is slow)",
    )
    parser.add_argument(
        "--cost",
        action="store_true",
        help="count what the practical and demo kernels issue (bytes, FLOPs, collectives, threadgroup memory) "
        "on the emulator against FlashAttention-2 lower bounds, instead of timing (minutes on a CPU)",
    )
    preset.add_argument(
        "--step",
        action="store_true",
        help="one LoRA training step at real model shapes, stock mlx-lm against each mlx-flash option "
        "(its own flags: python -m mlx_flash.bench --step --help; mlx_flash.bench.step); with "
        "--context-parallel N, the step split over N ranks against one process (mlx_flash.bench.context)",
    )
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
    parser.add_argument(
        "--targets",
        nargs="?",
        const=targets.SHIPPED,
        metavar="YAML",
        help="check declared targets: with no file, the targets shipped with mlx-flash "
        "(mlx_flash/bench/targets.yaml)",
    )
    parser.add_argument("--out", help=f"folder for report.md, results.json/.csv, plots (default {DEFAULT_OUT})")
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in the --out folder")
    parser.add_argument("--yes", action="store_true", help="run a benchmark estimated to take hours without asking")
    parser.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        help="measure nothing: rewrite the report, CSV and plots of an earlier run from its JSON "
        "(with --targets, evaluate those targets on it)",
    )
    parser.add_argument(
        "--before",
        metavar="JSON",
        help="with --cost: counts of an earlier commit's kernels to set beside these "
        "(written by bench/emulator-cost/before.py)",
    )
    parser.add_argument(
        "--no-peer",
        action="store_true",
        help="with --cost: do not count mlx-train-perf's kernels beside ours (counted when it is importable)",
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


def _check(chosen: dict) -> None:
    """Raise ``ValueError`` (one line naming the flag) for values no cell can take."""
    for axis in ("batch", "seq", "head_dim", "heads", "kv_heads"):
        for value in chosen.get(axis) or []:
            if value < 1:
                raise ValueError(f"--{axis.replace('_', '-')}: must be at least 1, got {value}")
    if chosen["warmup"] < 1:
        raise ValueError(f"--warmup: must be at least 1 (the first run is the correctness check), got {chosen['warmup']}")
    if chosen["repeats"] < 1:
        raise ValueError(f"--repeats: must be at least 1, got {chosen['repeats']}")
    for dtype in chosen["dtype"]:
        if dtype not in harness.DTYPES:
            raise ValueError(f"--dtype: unknown dtype '{dtype}'; choose from {', '.join(harness.DTYPES)}")
    for name in chosen["variants"]:
        if name not in harness.VARIANTS:
            raise ValueError(f"--variants: unknown variant '{name}'; choose from {', '.join(harness.VARIANTS)}")


def configs(chosen: dict) -> List[harness.Config]:
    _check(chosen)
    modes = {"both": ["fwd", "fwdbwd"]}.get(chosen["mode"], [chosen["mode"]])
    for mask in chosen["mask"]:
        try:
            masks.check(mask)
        except ValueError as e:
            raise ValueError(f"--mask: {e}") from None
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


def attention_flops(config: harness.Config) -> float:
    """Floating-point operations of one call's attention products: ``Q K^T`` and
    ``P V`` forward (two per multiply-add); the backward adds about 2.5 times that."""
    c = config
    forward = 4 * c.batch * c.heads * c.q_len * c.seq * c.head_dim
    return forward * (3.5 if c.mode == "fwdbwd" else 1.0)


def matmul_rate() -> float:
    """FLOP/s of a 512 x 512 float32 matmul on the default device, measured here."""
    import mlx.core as mx

    a = mx.random.normal((512, 512))
    mx.eval(a @ a)  # warm-up: allocation, kernel build
    runs, start = 4, time.perf_counter()
    for _ in range(runs):
        mx.eval(a @ a)
    return runs * 2 * 512**3 / max(time.perf_counter() - start, 1e-9)


def estimated_seconds(cells: List[harness.Config], chosen: dict, rate: float) -> float:
    """A rough lower bound on the run's time: its attention arithmetic at ``rate``
    (attention runs slower than a plain matmul) for every variant and run."""
    runs = chosen["warmup"] + chosen["repeats"]
    variants_for = _variants_for(chosen)
    return sum(attention_flops(c) * len(variants_for(c)) for c in cells) * runs / rate


def _confirm_long_run(cells: List[harness.Config], chosen: dict, yes: bool) -> Optional[str]:
    """None to go on; else why the run does not start (asked on a terminal)."""
    if yes:
        return None
    rate = matmul_rate()
    seconds = estimated_seconds(cells, chosen, rate)
    if seconds <= CONFIRM_ABOVE_S:
        return None
    about = (
        f"this benchmark is {sum(len(_variants_for(chosen)(c)) for c in cells)} cells, at least about {seconds / 3600:.1f} hours "
        f"here ({machine.backend()} backend; estimated from a float32 matmul measured at {rate / 1e9:.1f} GFLOP/s, "
        "and attention runs slower); --quick takes under a minute, --batch/--seq/--head-dim narrow the matrix"
    )
    if sys.stdin is not None and sys.stdin.isatty():
        print(f"mlx_flash.bench: warning: {about}", file=sys.stderr)
        try:
            answer = input("run it anyway? [y/N] ")
        except EOFError:
            answer = ""
        return None if answer.strip().lower() in ("y", "yes") else "not started"
    return f"{about}; pass --yes to run it anyway"


def _fail(message: str) -> int:
    print(f"mlx_flash.bench: error: {message}", file=sys.stderr)
    return 2


def _out_problem(out: str, overwrite: bool, source: Optional[str] = None) -> Optional[str]:
    """Why the report cannot go to ``out``: unwritable, or holding another run's
    report (``source``: the results being re-rendered, which may be replaced)."""
    problem = unwritable(out)
    if problem:
        return f"--out: {problem}"
    existing = os.path.join(out, "results.json")
    if os.path.exists(existing) and not overwrite:
        if source is None or not os.path.samefile(existing, source):
            return f"--out: {out} already holds a benchmark report: pass --overwrite to replace it, or another --out"
    return None


def render(args: argparse.Namespace) -> int:
    """``--render``: the reports of an earlier run, from its JSON alone (a
    ``--cost`` run's too, with its own targets)."""
    from . import cost_report

    out = args.out or os.path.dirname(os.path.abspath(args.render))
    try:
        with open(args.render) as f:
            results = json.load(f)
        counted = isinstance(results, dict) and results.get("schema") == cost_report.SCHEMA
        if counted and args.targets:
            raise ValueError("a --cost report has its own targets; --targets is for timed runs")
        if args.targets:
            results["targets"] = targets.evaluate(targets.load(args.targets), results["cells"], results["machine"])
    except OSError as e:
        return _fail(f"--render: cannot read {args.render} ({e.strerror or e})")
    except (ValueError, KeyError, TypeError) as e:
        return _fail(f"--render: {args.render}: {e}")
    problem = _out_problem(out, args.overwrite, source=args.render)
    if problem:
        return _fail(problem)
    if counted:
        # Its own targets, evaluated again on its cells.
        results["targets"] = cost_report.evaluate(results["cells"], results.get("peer"))
        _print_cost_outcome(results, cost_report.write_all(results, out))
        return 1 if targets.any_failed(results["targets"]) else 0
    return _finish(results, report.write_all(results, out))


def _print_cost_outcome(results: dict, paths: dict) -> None:
    """A cost report's targets and the files written."""
    for t in results["targets"]:
        print(f"{t['status']:>12}  {t['name']}: {t['detail']}")
    print("wrote " + ", ".join(paths.values()))


def _finish(results: dict, paths: dict) -> int:
    """Print targets, failures and paths; the exit status (see module doc)."""
    for t in results["targets"]:
        print(f"{t['status']:>12}  {t['name']}: {t['detail']}")
    bad = [c for c in results["cells"] if c["status"] in ("FAILED", "error")]
    for c in bad:
        print(f"{c['status']:>12}  {c['variant']} {c['mode']} L={c['seq']} B={c['batch']} D={c['head_dim']}: {c['detail']}")
    print("wrote " + ", ".join(paths.values()))
    if not any(name.startswith("plot") for name in paths):
        print("mlx_flash.bench: no plots: they need matplotlib (pip install 'mlx-flash-attention[plot]')", file=sys.stderr)
    return 1 if bad or targets.any_failed(results["targets"]) else 0


#: Flags that mean nothing to a --cost run.
_NOT_WITH_COST = ("decode", "documents", "window", "sinks", "batch", "dtype", "mode", "warmup", "repeats",
                  "max_memory_gb", "targets", "render")


def cost_cases(args: argparse.Namespace) -> List:
    """The cases of a --cost run: the shipped grid, or the product of the given axes."""
    from . import cost

    for name in _NOT_WITH_COST:
        value = getattr(args, name)
        if value not in (None, False):
            raise ValueError(f"--{name.replace('_', '-')}: not with --cost (it counts practical in float32 and "
                             "demo in float16, causal and packed, B=1)")
    families = _flat(args.variants) or list(cost.FAMILIES)
    for name in families:
        if name not in cost.FAMILIES:
            raise ValueError(f"--variants: --cost counts {', '.join(cost.FAMILIES)}, not '{name}'")
    axes = (args.seq, args.head_dim, args.heads, args.kv_heads, args.mask)
    if all(a is None for a in axes):
        return [c for c in cost.default_cases() if c.family in families]
    heads = _flat(args.heads) or [cost.QUERY_HEADS]
    cases = []
    for q_heads in heads:
        kv = _flat(args.kv_heads) or [q_heads]
        for value in kv:
            if value < 1 or q_heads % value:
                raise ValueError(f"--kv-heads: {value} does not divide --heads {q_heads}")
        cases += cost.grid(_flat(args.seq) or list(cost.SEQS), _flat(args.head_dim) or list(cost.HEAD_DIMS), kv,
                           families, _flat(args.mask) or list(cost.MASKS), q_heads)
    for case in cases:
        if case.seq < 1:
            raise ValueError(f"--seq: must be at least 1, got {case.seq}")
        why = cost.families.get(case.family).unsupported_dims(case.dtype, case.head_dim, case.head_dim)
        if why is not None:
            raise ValueError(f"--head-dim: {case.family} takes no head dim {case.head_dim} ({why})")
        cost.structured_mask(case)  # ValueError for masks --cost does not count
    return cases


def run_cost(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    """``--cost``: count every case, write the report; status 1 if a target FAILs."""
    from . import cost, cost_report, peer

    out = args.out or DEFAULT_COST_OUT
    try:
        for mask in _flat(args.mask) or []:
            masks.check(mask)
        cases = cost_cases(args)
        before = None
        if args.before:
            with open(args.before) as f:
                before = json.load(f)
            if not isinstance(before, dict) or "cells" not in before or "source" not in before:
                raise ValueError(f"--before: {args.before} is not the output of bench/emulator-cost/before.py")
    except OSError as e:
        return _fail(f"--before: cannot read {args.before} ({e.strerror or e})")
    except ValueError as e:
        return _fail(str(e))
    problem = _out_problem(out, args.overwrite)
    if problem:
        return _fail(problem)
    about = machine.describe()
    theirs = None if args.no_peer else peer.version()
    problems = peer.problems(cases) if theirs else []
    start = time.perf_counter()
    cells, peer_cells, peer_failed, interrupted = [], [], [], False
    try:
        for i, case in enumerate(cases):
            print(f"[{i + 1}/{len(cases) + len(problems)}] {case.label()} ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)
            cells += cost.count(case, seed=args.seed)
        for i, problem in enumerate(problems):
            print(f"[{len(cases) + i + 1}/{len(cases) + len(problems)}] {problem.label()} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
            try:
                peer_cells += peer.count(problem, seed=args.seed)
            except AssertionError as e:
                # Counts of wrong results are not kept; the report says which.
                print(f"mlx_flash.bench: not counted: {e}", file=sys.stderr)
                peer_failed.append(str(e))
    except KeyboardInterrupt:
        interrupted = True
    omitted = None
    if all(a is None for a in (args.seq, args.head_dim, args.heads, args.kv_heads, args.mask)):
        omitted = ("GQA 8 (8 query heads, 1 KV head) at L=4096: a launch's grid column is then a whole KV group, "
                   "eight heads of dK/dV work (and of practical's forward and dQ, whose query tiles hold all "
                   "eight heads), about half an hour more on this CPU; GQA 8 is counted at L=1024, and "
                   "`--seq 4096 --kv-heads 1` counts it at 4096.")
    results = {
        "schema": cost_report.SCHEMA,
        "machine": about,
        "settings": {
            "command": "python -m mlx_flash.bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
            "title": args.title,
            "note": args.note,
            "seed": args.seed,
            "cases": len(cases),
            "omitted": omitted,
            "interrupted": f"after {len(cells) // 3} of {len(cases)} cases" if interrupted else None,
            "seconds": round(time.perf_counter() - start, 1),
        },
        "cells": cells,
        "before": before,
        "peer": {"version": theirs, "cells": peer_cells, "failed": peer_failed} if theirs else None,
    }
    results["targets"] = cost_report.evaluate(cells, results["peer"])
    _print_cost_outcome(results, cost_report.write_all(results, out))
    if interrupted:
        print(f"mlx_flash.bench: interrupted: the report holds the {len(cells) // 3} cases counted", file=sys.stderr)
        return 130
    return 1 if targets.any_failed(results["targets"]) else 0


def _context_parallel_step(given: List[str]) -> int:
    """``--step --context-parallel N``: the step split over N ranks against one
    process (``mlx_flash.bench.context``, whose flags follow; ``--seq`` is its
    ``--length``)."""
    from . import context

    renamed = {"--context-parallel": "--ranks", "--seq": "--length"}
    translated = []
    for arg in given:
        name, sep, value = arg.partition("=")
        translated.append(renamed.get(name, name) + sep + value)
    return context.main(translated)


def main(argv: Optional[Sequence[str]] = None) -> int:
    if argv is None:
        from ..blas import reexec_with_fast_blas

        reexec_with_fast_blas()
    given = list(sys.argv[1:] if argv is None else argv)
    if "--step" in given and any(a.startswith("--context-parallel") for a in given):
        return _context_parallel_step([a for a in given if a != "--step"])
    if "--step" in given:
        from . import step

        return step.main([a for a in given if a != "--step"])
    args = build_parser().parse_args(argv)
    if args.blas:
        from .blas import compare

        return compare()
    if args.cost:
        return run_cost(args, argv)
    if args.before:
        return _fail("--before: only with --cost")
    if args.no_peer:
        return _fail("--no-peer: only with --cost")
    if args.render:
        return render(args)
    chosen = settings(args)
    out = args.out or DEFAULT_OUT
    try:
        cells_to_run = configs(chosen)
        declared = targets.load(args.targets) if args.targets else []
        if args.max_memory_gb is not None and not args.max_memory_gb > 0:
            raise ValueError(f"--max-memory-gb: must be above 0, got {args.max_memory_gb}")
    except ValueError as e:
        return _fail(str(e))
    problem = _out_problem(out, args.overwrite) or _confirm_long_run(cells_to_run, chosen, args.yes)
    if problem:
        return _fail(problem)
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
        return _fail(str(e))
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
    return _finish(results, report.write_all(results, out))
