"""``python -m mlx_flash.plan MODEL``: what a LoRA step needs, and the longest row that fits."""

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import budget as budgets
from .memory import Setup
from .models import PlanError, known_models, resolve
from .report import as_dict, make_plan, text

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_flash.plan",
        description=(
            "Predict a LoRA training step's peak memory per component (weights, LoRA state, saved "
            "activations, one layer's working set, attention, loss) for stock mlx-lm and for mlx-flash's "
            "options, and the longest row that fits the memory budget. Reads configs only: no weights load."
        ),
        epilog=(
            "MODEL: a known name (" + ", ".join(known_models()) + "), builtin:tiny-llama, an mlx-lm "
            "model folder, a config.json, a GGUF file, or a recipe YAML (its model, max_seq_length, "
            "batch_size, num_layers and LoRA rank). The default budget is Metal's recommended working "
            "set on a Mac (raise it with sudo sysctl iogpu.wired_limit_mb=<MB>), the available RAM "
            "elsewhere. Examples: python -m mlx_flash.plan qwen2.5-1.5b --seq 65536 --mac 16; "
            "python -m mlx_flash.plan qwen3-8b --mac 32 --json."
        ),
    )
    parser.add_argument("model", help="Known model name, builtin:NAME, model folder, config.json, GGUF file or recipe YAML.")
    parser.add_argument("--seq", type=int, help="Tokens per row (default: the recipe's max_seq_length, else 8192).")
    parser.add_argument("--batch", type=int, help="Rows per step (default: the recipe's batch_size, else 1).")
    parser.add_argument("--memory", help="Budget, e.g. 16GB, 16GiB, 16G, 16000MB (default: this machine's).")
    parser.add_argument("--mac", type=float, metavar="GB", help="Budget of a Mac with GB of unified memory: Metal's default working set.")
    parser.add_argument("--machines", type=int, default=1, help="Context-parallel ranks sharing each row (default 1).")
    parser.add_argument("--lora-layers", type=int, help="LoRA on the last N blocks, -1 for all (default: the recipe's num_layers, else all).")
    parser.add_argument("--rank", type=int, help="LoRA rank (default: the recipe's, else 8).")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="Activation dtype (default: the config's).")
    parser.add_argument("--bits", type=int, choices=(2, 3, 4, 5, 6, 8), help="Plan the weights quantized to this many bits.")
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128), help="Quantization group size with --bits (default 64).")
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    return parser


def _recipe_values(path: Path) -> dict:
    """The recipe keys the plan uses, from its YAML (paths resolved as the fine-tune does)."""
    from ..finetune.config import RecipeError, load_recipe

    try:
        recipe = load_recipe(str(path))
    except RecipeError as e:
        raise PlanError(str(e)) from None
    return {
        "model": recipe.model,
        "seq": recipe.max_seq_length,
        "batch": recipe.batch_size,
        "lora_layers": recipe.num_layers,
        "rank": recipe.lora_parameters.get("rank", 8),
    }


def plan_from_args(args):
    defaults = {"seq": 8192, "batch": 1, "lora_layers": -1, "rank": 8}
    model = args.model
    if model.endswith((".yaml", ".yml")):
        path = Path(model).expanduser()
        if not path.is_file():
            raise PlanError(f"no such recipe: {path}")
        values = _recipe_values(path)
        model = values.pop("model")
        defaults.update(values)
    seq = args.seq if args.seq is not None else defaults["seq"]
    batch = args.batch if args.batch is not None else defaults["batch"]
    for name, value in (("--seq", seq), ("--batch", batch), ("--machines", args.machines)):
        if value <= 0:
            raise PlanError(f"{name}: must be a positive integer, got {value}")
    if args.rank is not None and args.rank <= 0:
        raise PlanError(f"--rank: must be a positive integer, got {args.rank}")
    g = resolve(model, dtype=args.dtype, bits=args.bits, group_size=args.group_size)
    setup = Setup(
        seq=seq,
        batch=batch,
        lora_layers=args.lora_layers if args.lora_layers is not None else defaults["lora_layers"],
        rank=args.rank or defaults["rank"],
        machines=args.machines,
    )
    if args.memory and args.mac:
        raise PlanError("--memory and --mac both name the budget: pass one")
    if args.memory:
        size, source = budgets.parse_size(args.memory), f"--memory {args.memory}"
    elif args.mac:
        if args.mac <= 0:
            raise PlanError(f"--mac: must be a positive number of GB, got {args.mac}")
        size = budgets.mac_working_set(args.mac)
        source = f"a {args.mac:g} GB Mac: Metal's default working set, about; {budgets.RAISE_HINT}"
    else:
        size, source = budgets.this_machine()
    return make_plan(g, setup, size, source)


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Unlike the other commands, no re-execution with an optimized BLAS
    # (mlx_flash.blas): the plan multiplies no matrices, and a second start
    # would double its time.
    args = build_parser().parse_args(argv)
    try:
        plan = plan_from_args(args)
    except PlanError as e:
        print(f"mlx_flash.plan: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(as_dict(plan), indent=1) if args.json else text(plan))
    return 0
