"""``python -m mlx_flash.doctor``: validate and time the Metal kernels on this machine.

    python -m mlx_flash.doctor                       # every kernel, then timing
    python -m mlx_flash.doctor --quick               # less: float16, head dims 64 and 128
    python -m mlx_flash.doctor --model path/to/model --out doctor.md
    python -m mlx_flash.doctor --recipe recipes/tinyllama-1.1b-lora.yaml

Prints a Markdown report (stdout; progress on stderr) and writes the verdict
cache that ``auto`` reads. Exit status: 0 every kernel unit passed and
every timed cell was correct; 1 something failed (the report says what);
2 bad input (one line on stderr, no traceback); 130 interrupted by Ctrl-C
(what finished is recorded and reported).
"""

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .. import verdicts
from ..families import names as family_names
from ..folders import unwritable
from . import checkup, grid


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_flash.doctor",
        description=(
            "Validate every mlx-flash Metal kernel on this machine against the float32 reference, "
            "time those that pass against MLX's own attention at fine-tuning shapes, and record the "
            "verdicts that variant 'auto' decides from. Prints a Markdown report to paste into a bug report."
        ),
        epilog=(
            "Verdicts are kept per chip, OS version, MLX version, mlx-flash version and kernel source hash in "
            "$MLX_FLASH_CACHE/verdicts (default ~/.cache/mlx_flash). Without Metal the kernels run through the "
            "CPU emulator: correctness only, nothing is timed. auto never runs a kernel that failed here; on "
            "Metal it validates a kernel nobody validated before its first use (MLX_FLASH_VALIDATE=0 turns "
            "that off)."
        ),
    )
    level = parser.add_mutually_exclusive_group()
    level.add_argument(
        "--quick", action="store_true",
        help="less: float16 at head dims 64 and 128 (or the model's), forward+backward timing at L 2048",
    )  # fmt: skip
    level.add_argument(
        "--full", action="store_true",
        help="more: a second, longer problem per unit; timing up to L 8192 with windows and sinks",
    )  # fmt: skip
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--model", metavar="PATH",
        help="validate and time at this model's attention shapes (heads, KV heads, head dim, dtype from its "
        "config.json; weights are not loaded): a model folder, builtin:<name>, or a Hugging Face repo id "
        "already in the Hugging Face cache",
    )  # fmt: skip
    model.add_argument(
        "--recipe", metavar="FILE",
        help="as --model, for a fine-tuning recipe's model, with its max_seq_length, batch_size and packing",
    )  # fmt: skip
    parser.add_argument(
        "--family", action="append", choices=family_names(),
        help="validate only this kernel family (repeatable; default every family)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", action="append", choices=("float32", "float16", "bfloat16"),
        help="only this input dtype (repeatable; default every dtype a family runs, or the model's)",
    )  # fmt: skip
    parser.add_argument(
        "--head-dim", action="append", metavar="D[xDv]",
        help="only these head dims, e.g. 64 or 128x64 (repeatable; default 64, 80, 96, 128, 256 and 128x64, "
        "those a family supports, or the model's)",
    )  # fmt: skip
    parser.add_argument(
        "--mask", action="append", choices=verdicts.MASK_KINDS,
        help="only this mask kind (repeatable; default all)",
    )  # fmt: skip
    parser.add_argument("--no-timing", action="store_true", help="validate only; time nothing")
    parser.add_argument(
        "--emulator", action="store_true",
        help="run the kernels on the CPU emulator even where Metal is (correctness only, nothing timed)",
    )  # fmt: skip
    parser.add_argument("--out", metavar="FILE", help="also write the report to FILE (Markdown)")
    parser.add_argument(
        "--plan", action="store_true",
        help="print only the memory plan: the longest trainable row for --recipe (or --model; default the "
        "quickstart recipe) on this machine, stock mlx-lm beside mlx-flash (python -m mlx_flash.plan); "
        "validates and times nothing",
    )  # fmt: skip
    parser.add_argument(
        "--blas", action="store_true",
        help="only name the BLAS MLX's CPU matrix products run on, with its measured float32 GFLOP/s, and "
        "what to install if it is the slow reference BLAS (Linux)",
    )  # fmt: skip
    return parser


def blas_lines() -> List[str]:
    """The BLAS MLX's CPU products use here, its measured speed, and advice."""
    from .. import blas

    lines = [blas.describe(measure=True)]
    advice = blas.advice(blas.in_use())
    if advice:
        lines.append(f"warning: {advice}")
    return lines


def _fail(message: str) -> int:
    print(f"mlx_flash.doctor: error: {message}", file=sys.stderr)
    return 2


def _out_problem(out: str) -> Optional[str]:
    path = Path(out).expanduser()
    if path.is_dir():
        return f"--out: {out} is a folder; give a file name, e.g. {Path(out) / 'doctor.md'}"
    problem = unwritable(path.parent)
    return f"--out: {problem}" if problem else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    if argv is None:
        from ..blas import reexec_with_fast_blas

        reexec_with_fast_blas()
    args = build_parser().parse_args(argv)
    if args.plan:
        from ..finetune.config import find_recipe
        from ..plan.cli import main as plan_main

        return plan_main([args.recipe or args.model or str(find_recipe("quickstart"))])
    if args.blas:
        print("\n".join(blas_lines()))
        return 0
    level = "quick" if args.quick else "full" if args.full else "default"
    try:
        head_dims = [grid.parse_head_dims(text) for text in args.head_dim or []] or None
        problem = _out_problem(args.out) if args.out else None
        if problem:
            return _fail(problem)
        geometry = grid.from_model(args.model) if args.model else grid.from_recipe(args.recipe) if args.recipe else None
        given = sys.argv[1:] if argv is None else argv
        command = "python -m mlx_flash.doctor " + " ".join(shlex.quote(a) for a in given)
        findings = checkup.run(
            level,
            geometry,
            families=args.family or family_names(),
            dtypes=args.dtype,
            head_dims=head_dims,
            kinds=args.mask or verdicts.MASK_KINDS,
            timing=not args.no_timing,
            emulated=args.emulator,
            command=command.strip(),
        )
    except grid.DoctorError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("mlx_flash.doctor: interrupted", file=sys.stderr)
        return 130
    text = str(findings)
    if sys.platform == "linux":
        text += "\n## CPU BLAS\n\n" + "\n".join(f"- {line}" for line in blas_lines()) + "\n"
    sys.stdout.write(text)
    sys.stdout.flush()
    if args.out:
        try:
            path = Path(args.out).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as e:
            return _fail(f"--out: cannot write {args.out} ({e.strerror or e})")
        print(f"wrote {args.out}", file=sys.stderr)
    if findings.interrupted:
        return 130
    return 0 if findings.ok else 1
