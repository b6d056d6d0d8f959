"""One LoRA fine-tuning run with one attention variant, timed per iteration.

The pieces are mlx-lm's: ``mlx_lm.utils.load`` for the model and tokenizer,
``linear_to_lora_layers`` for the adapters, ``load_local_dataset`` and
``CacheDataset`` for the data, ``iterate_batches``, ``default_loss`` and
``evaluate`` from its trainer, and the same compiled step (gradients averaged
across ranks with ``nn.average_gradients``). The loop is written out here
rather than calling ``mlx_lm.tuner.trainer.train`` so that each iteration can
be timed on its own, with its own peak memory, and so that an interrupt can
save what was done.

A run writes into its folder::

    adapters/adapters.safetensors   mlx-lm's adapter format, with
    adapters/adapter_config.json    (mlx_lm.load(..., adapter_path=...))
    metrics.jsonl                   one record per iteration, flushed as it goes
    summary.json                    totals, median and p95 iteration time, losses
"""

import json
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..attention import explain
from ..bench.harness import _percentile as percentile
from ..bench.machine import describe
from ..patch import patched
from . import builtin, files, gguf
from .config import RecipeError, recipe_dict
from .config import build_optimizer as _build_optimizer
from .packing import PackedDataset
from .progress import Progress

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class Interrupted(Exception):
    """Training stopped by Ctrl-C after saving; ``str()`` says what was saved where."""


def adapter_dir(recipe, run_dir: Path) -> Path:
    path = Path(recipe.adapter_path).expanduser()
    if path.is_absolute():
        return path / run_dir.name if len(recipe.variants) > 1 else path
    return run_dir / path


def load_base(recipe):
    """The model, tokenizer and config.json dictionary the recipe names."""
    from mlx_lm.utils import load

    path = str(builtin.ensure(recipe.model)) if builtin.is_builtin(recipe.model) else recipe.model
    try:
        if gguf.is_gguf(path):
            model, tokenizer, config = gguf.load(path)
        else:
            model, tokenizer, config = load(path, return_config=True)
    except Exception as e:  # noqa: BLE001 - every load failure is reported the same way
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RecipeError(f"model: cannot load '{recipe.model}': {first_line}") from None
    return model, tokenizer, config, path


def attach_adapters(model: nn.Module, recipe) -> None:
    """Freeze the model and add trainable layers, as ``mlx_lm lora`` does."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_layers = len(model.layers)
    if recipe.num_layers > n_layers:
        raise RecipeError(f"num_layers: {recipe.num_layers} but the model has only {n_layers} layers")
    model.freeze()
    if recipe.fine_tune_type == "full":
        for layer in model.layers[-max(recipe.num_layers, 0) :]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(
            model,
            recipe.num_layers,
            recipe.lora_parameters,
            use_dora=recipe.fine_tune_type == "dora",
        )
    if not tree_flatten(model.trainable_parameters()):
        # mlx-lm would only fail later, inside value_and_grad, with nothing to
        # differentiate.
        layers = n_layers if recipe.num_layers == -1 else recipe.num_layers
        linear_types = (nn.Linear, nn.QuantizedLinear)
        linear = sorted(name for name, m in model.layers[-1].named_modules() if isinstance(m, linear_types))
        raise RecipeError(
            f"lora_parameters.keys: no layer matches {recipe.lora_parameters['keys']} in the last {layers} "
            f"layer(s); the linear layers there are {', '.join(linear)}"
        )


def load_data(recipe, tokenizer):
    """``(train, valid, test)`` as mlx-lm ``CacheDataset`` objects, or packed
    into ``max_seq_length`` rows (``PackedDataset``) with ``pack_sequences``."""
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset

    for name in ("train", "valid", "test"):
        # mlx-lm reads the first record to tell the format, and fails on an
        # empty file with an IndexError that names nothing.
        path = Path(recipe.data) / f"{name}.jsonl"
        if path.exists() and not _has_a_record(path):
            raise RecipeError(f"data: {path} is empty")
    try:
        sets = load_local_dataset(Path(recipe.data), tokenizer, recipe)
    except json.JSONDecodeError as e:
        raise RecipeError(f"data: {recipe.data}: cannot read ({type(e).__name__}: {e})") from None
    except ValueError as e:
        # mlx-lm's format message puts its link on a second line.
        raise RecipeError(f"data: {recipe.data}: {' '.join(str(e).split())}") from None
    except Exception as e:  # noqa: BLE001 - a malformed JSONL line, for example
        raise RecipeError(f"data: {recipe.data}: cannot read ({type(e).__name__}: {e})") from None
    sets = [CacheDataset(s) for s in sets]
    if recipe.pack_sequences:
        sets = [PackedDataset(s, recipe.max_seq_length, recipe.batch_size) if len(s) else s for s in sets]
    return tuple(sets)


def _has_a_record(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        return any(line.strip() for line in f)


def build_optimizer(recipe):
    return _build_optimizer(recipe.optimizer, recipe.optimizer_config, recipe.learning_rate, recipe.lr_schedule)


def geometry(model: nn.Module, config: dict) -> dict:
    """Attention shape of the model: query heads, KV heads, head dim, dtype."""
    args = getattr(model, "args", None)
    get = lambda key, default=None: getattr(args, key, None) or config.get(key, default)  # noqa: E731
    n_heads = get("num_attention_heads")
    n_kv_heads = get("num_key_value_heads") or n_heads
    head_dim = get("head_dim") or get("hidden_size") // n_heads
    dtype = next(
        (v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)),
        mx.float32,
    )
    return {"n_heads": n_heads, "n_kv_heads": n_kv_heads, "head_dim": head_dim, "dtype": dtype}


def attention_plan(shape: dict, batch_size: int, length: int, variant: str):
    """What attention implementation a training batch of this length gets."""
    B = batch_size
    q = mx.zeros((B, shape["n_heads"], length, shape["head_dim"]), dtype=shape["dtype"])
    kv = mx.zeros((B, shape["n_kv_heads"], length, shape["head_dim"]), dtype=shape["dtype"])
    return explain(q, kv, kv, mask="causal", variant=variant)


@contextmanager
def grad_checkpointing(layer: nn.Module, enabled: bool = True):
    """Checkpoint every layer of ``layer``'s class while the block runs.

    mlx-lm's ``grad_checkpoint`` replaces the class's ``__call__`` for the
    rest of the process; putting it back afterwards keeps a later run in the
    same process (the next variant of a comparison, or a run with
    ``grad_checkpoint: false``) from inheriting or nesting it.
    """
    if not enabled:
        yield
        return
    from mlx_lm.tuner.trainer import grad_checkpoint

    cls = type(layer)
    own = "__call__" in vars(cls)
    original = vars(cls).get("__call__")
    grad_checkpoint(layer)
    try:
        yield
    finally:
        if own:
            cls.__call__ = original
        else:
            del cls.__call__


def _from_rank0(model: nn.Module, start: int, rank: int) -> int:
    """Give every rank rank 0's trainable weights and start iteration.

    Ranks on other machines may not see rank 0's run folder, so a resumed
    run would otherwise start them from different weights or iterations.
    """
    weights = tree_flatten(model.trainable_parameters())
    summed = [(k, mx.distributed.all_sum(v if rank == 0 else mx.zeros_like(v), stream=mx.cpu)) for k, v in weights]
    model.load_weights(summed, strict=False)
    start = mx.distributed.all_sum(mx.array(start if rank == 0 else 0), stream=mx.cpu)
    return int(start.item())


def compile_step() -> bool:
    """Whether to ``mx.compile`` the training step: on a GPU backend only."""
    return mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())


def summarize(records, *, variant, plan, iters, interrupted, elapsed, extra) -> dict:
    """Totals of a run from its per-iteration ``records``."""
    times = [r["wall_s"] for r in records]
    # The first iteration of a run includes tracing (and compiling) the step
    # and warming the allocator; the median and p95 describe the steady state.
    steady = [r["wall_s"] for r in records if not r.get("warmup")] or times
    tokens = sum(r["tokens"] for r in records)
    val = [r for r in records if r.get("val_loss") is not None]
    last10 = [r["loss"] for r in records[-10:]]
    return {
        "variant": variant,
        "implementation": plan.implementation,
        "backend": plan.backend,
        "reason": plan.reason,
        "iterations": len(records),
        "iters": iters,
        "interrupted": interrupted,
        "total_time_s": elapsed,
        "train_time_s": float(sum(times)),
        "median_iteration_s": percentile(steady, 50) if steady else None,
        "p95_iteration_s": percentile(steady, 95) if steady else None,
        "steps_per_s": 1 / percentile(steady, 50) if steady and percentile(steady, 50) > 0 else None,
        "first_iteration_s": times[0] if times else None,
        "tokens": tokens,
        "tokens_per_s": tokens / sum(times) if times and sum(times) > 0 else None,
        "peak_memory_bytes": max((r["peak_memory_bytes"] for r in records), default=None),
        "first_train_loss": records[0]["loss"] if records else None,
        "final_train_loss": records[-1]["loss"] if records else None,
        # The last iteration's loss is one batch's; this is steadier.
        "train_loss_last10": float(np.mean(last10)) if last10 else None,
        "final_val_loss": val[-1]["val_loss"] if val else None,
        **extra,
    }


def environment() -> dict:
    """The machine (as the benchmarks describe it) and the software versions."""
    import mlx_lm

    return {"machine": describe(), "device": str(mx.default_device()), "mlx_lm": mlx_lm.__version__}


def run(recipe, variant: str, run_dir: Path) -> dict:
    """Fine-tune with attention ``variant``, writing into ``run_dir``.

    Every variant of a comparison starts from the same base weights, the same
    adapter initialisation (``mx.random.seed(recipe.seed)``) and the same
    batch order, so their losses differ only by the attention's arithmetic.

    Returns the summary dictionary (also written to ``summary.json``).
    Raises ``Interrupted`` after saving if Ctrl-C stops training.
    """
    from mlx_lm.tuner.trainer import default_loss, evaluate, iterate_batches

    started = time.perf_counter()
    world = mx.distributed.init()
    rank, world_size = world.rank(), world.size()
    writer = rank == 0
    if recipe.batch_size % world_size != 0:
        raise RecipeError(f"batch_size: {recipe.batch_size} is not divisible by the {world_size} ranks")

    mx.random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    model, tokenizer, config, model_path = load_base(recipe)
    train_set, valid_set, test_set = load_data(recipe, tokenizer)
    if len(train_set) < recipe.batch_size:
        raise RecipeError(f"batch_size: {recipe.batch_size} is more than the {len(train_set)} training examples")
    mx.random.seed(recipe.seed)
    attach_adapters(model, recipe)

    adapters = adapter_dir(recipe, run_dir)
    metrics_path = run_dir / METRICS_FILE
    kept = []
    if recipe.resume and (adapters / ADAPTER_FILE).exists():
        model.load_weights(str(adapters / ADAPTER_FILE), strict=False)
        if metrics_path.exists():
            kept = [r for r in files.read_jsonl(metrics_path) if r["iteration"] <= recipe.iters]
    start = kept[-1]["iteration"] + 1 if kept else 1
    if world_size > 1:
        start = _from_rank0(model, start, rank)

    longest = max(train_set.itemlen(i) for i in range(len(train_set)))
    # iterate_batches pads to one more than a multiple of 32; inputs drop one.
    length = min(recipe.max_seq_length, 1 + 32 * ((longest + 31) // 32)) - 1
    plan = attention_plan(geometry(model, config), recipe.batch_size // world_size, length, variant)

    if writer:
        adapter_config = recipe_dict(recipe)
        adapter_config.update(model=model_path, adapter_path=str(adapters))
        adapter_config["attention"] = {"variant": variant, "implementation": plan.implementation}
        files.write_json(adapters / ADAPTER_CONFIG, adapter_config)
        metrics = files.JsonlWriter(metrics_path, kept)

    def save(iteration: Optional[int] = None) -> None:
        if not writer:
            return
        weights = dict(tree_flatten(model.trainable_parameters()))
        files.write_safetensors(adapters / ADAPTER_FILE, weights)
        if iteration is not None:
            files.write_safetensors(adapters / f"{iteration:07d}_{ADAPTER_FILE}", weights)

    optimizer = build_optimizer(recipe)
    loss_and_grad = nn.value_and_grad(model, default_loss)
    accumulate = recipe.grad_accumulation_steps
    state = [model.state, optimizer.state, mx.random.state]

    def step(batch, lengths, previous, update):
        (loss, tokens), grad = loss_and_grad(model, batch, lengths)
        if previous is not None:
            grad = tree_map(lambda a, b: a + b, grad, previous)
        if update:
            grad = nn.average_gradients(grad)
            if accumulate > 1:
                grad = tree_map(lambda g: g / accumulate, grad)
            optimizer.update(model, grad)
            grad = None
        return loss, tokens, grad

    # mlx-lm compiles the step. On a GPU that is what makes it fast; on the
    # CPU backend compiling means building C++ kernels with the system
    # compiler, which costs more than a short run saves, so the step runs
    # eagerly there. Every variant of a comparison gets the same choice.
    compiled = compile_step()
    if compiled:
        step = partial(mx.compile, inputs=state, outputs=state)(step)

    def validate(dataset, batches) -> Optional[float]:
        if len(dataset) < recipe.batch_size or batches == 0:
            return None
        loss = evaluate(
            model=model,
            dataset=dataset,
            batch_size=recipe.batch_size,
            num_batches=batches,
            max_seq_length=recipe.max_seq_length,
            loss=default_loss,
        )
        model.train()
        return loss

    progress = None
    batches = iterate_batches(
        dataset=train_set,
        batch_size=recipe.batch_size,
        max_seq_length=recipe.max_seq_length,
        loop=True,
        seed=recipe.seed,
        comm_group=world,
    )
    records = list(kept)
    extra = {"rank_count": world_size, "compiled_step": compiled, "attention_plan": plan.summary, **environment()}
    interrupted = False
    iteration = start - 1
    with patched(variant), grad_checkpointing(model.layers[0], recipe.grad_checkpoint):
        try:
            # Skip what a resumed run already trained on, to keep the batch order.
            for _ in range(start - 1):
                next(batches)
            extra["initial_val_loss"] = validate(valid_set, recipe.val_batches) if start == 1 else None
            model.train()
            # Made here so that its clock (it/s) leaves out the initial validation.
            progress = Progress(recipe.iters, variant, every=recipe.steps_per_report, enabled=writer, first=start)
            grad = None
            for iteration in range(start, recipe.iters + 1):
                batch, lengths = next(batches)
                mx.reset_peak_memory()
                tic = time.perf_counter()
                loss, tokens, grad = step(batch, lengths, grad, iteration % accumulate == 0)
                mx.eval(state, loss, tokens, grad)
                wall = time.perf_counter() - tic
                peak = mx.get_peak_memory()
                if world_size > 1:
                    loss = mx.distributed.all_sum(loss, stream=mx.cpu) / world_size
                    tokens = mx.distributed.all_sum(tokens, stream=mx.cpu)
                record = {
                    "iteration": iteration,
                    "loss": loss.item(),
                    "tokens": int(tokens.item()),
                    "wall_s": wall,
                    "tokens_per_s": tokens.item() / wall,
                    "peak_memory_bytes": int(peak),
                    "learning_rate": float(optimizer.learning_rate.item()),
                    "variant": variant,
                }
                if iteration == start:
                    record["warmup"] = True
                if iteration % recipe.steps_per_eval == 0 or iteration == recipe.iters:
                    record["val_loss"] = validate(valid_set, recipe.val_batches)
                records.append(record)
                if writer:
                    metrics.write(record)
                if iteration % recipe.save_every == 0:
                    save(iteration)
                progress.update(iteration, record["loss"], record.get("val_loss"))
            if recipe.test:
                extra["test_loss"] = validate(test_set, recipe.test_batches)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if progress is not None:
                progress.close()
            save()
            if writer:
                metrics.close()
                summary = summarize(
                    records,
                    variant=variant,
                    plan=plan,
                    iters=recipe.iters,
                    interrupted=interrupted,
                    elapsed=time.perf_counter() - started,
                    extra={
                        "adapter_path": str(adapters),
                        "metrics": str(metrics_path),
                        "model": model_path,
                        **extra,
                    },
                )
                files.write_json(run_dir / SUMMARY_FILE, summary)
    if interrupted:
        done = records[-1]["iteration"] if records else 0
        raise Interrupted(
            f"interrupted after iteration {done}: adapters saved to {adapters}, "
            f"metrics to {metrics_path}, summary to {run_dir / SUMMARY_FILE}"
        )
    return summary if writer else {}
