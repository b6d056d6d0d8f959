"""One LoRA fine-tuning run with one attention variant, timed per iteration.

The pieces are mlx-lm's: ``mlx_lm.utils.load`` for the model and tokenizer,
``linear_to_lora_layers`` for the adapters, ``create_dataset`` and
``CacheDataset`` for the data, its batching (batches.py), ``default_loss``
and ``evaluate`` from its trainer, and the same compiled step (gradients
averaged across ranks with ``nn.average_gradients``). The loop is written out
here rather than calling ``mlx_lm.tuner.trainer.train`` so that each
iteration can be timed on its own, with its own peak memory, and so that a
run can stop and resume exactly.

A run writes into its folder::

    adapters/adapters.safetensors   mlx-lm's adapter format, with
    adapters/adapter_config.json    (mlx_lm.load(..., adapter_path=...))
    checkpoints/                    the latest checkpoint (checkpoint.py)
    metrics.jsonl                   one record per iteration, flushed as it goes
    summary.json                    totals, median and p95 iteration time, losses

A checkpoint is written every ``save_every`` iterations, after the last one,
and when Ctrl-C or SIGTERM stops the run (after the iteration in progress);
``resume: true`` continues from it (resume.py) along the same loss
trajectory as a run that never stopped.
"""

import signal
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from .. import context
from ..explain import explain
from ..machine import describe
from ..patch import patched
from ..plan.recipe import before_loading
from ..stats import percentile
from ..step import bounded
from . import builtin, checkpoint, data, files, gguf, hub, interrupts, resume
from .batches import Batches, evaluation_batches
from .config import RecipeError, recipe_dict
from .config import build_optimizer as _build_optimizer
from . import loss_choice, packing
from .config import run_entry
from .packing import PackedDataset
from .progress import Progress

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class Interrupted(Exception):
    """Training stopped by Ctrl-C or SIGTERM; ``str()`` says what was saved where,
    ``signal`` which signal it was."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signal = signum


def adapter_dir(recipe, run_dir: Path) -> Path:
    path = Path(recipe.adapter_path).expanduser()
    if path.is_absolute():
        return path / run_dir.name if len(recipe.variants) > 1 else path
    return run_dir / path


def load_base(recipe):
    """The model, tokenizer and config.json dictionary the recipe names."""
    from mlx_lm.utils import load

    if builtin.is_builtin(recipe.model):
        path = str(builtin.ensure(recipe.model))
    elif gguf.is_gguf(recipe.model):
        path = recipe.model
    else:
        path = hub.local_path(recipe.model)
    try:
        if gguf.is_gguf(recipe.model):
            model, tokenizer, config = gguf.load(recipe.model)
        else:
            model, tokenizer, config = load(
                path,
                tokenizer_config={"trust_remote_code": recipe.trust_remote_code},
                return_config=True,
                trust_remote_code=recipe.trust_remote_code,
            )
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


def load_data(recipe, tokenizer, packed: bool = False):
    """``(train, valid, test)`` as mlx-lm ``CacheDataset`` objects, or, when
    ``packed``, whole examples packed into ``max_seq_length`` rows with
    document ids (``PackedDataset``); a missing optional split is an empty
    list."""
    from mlx_lm.tuner.datasets import CacheDataset

    sets = [CacheDataset(s) if len(s) else s for s in data.load(recipe, tokenizer)]
    for name, dataset in zip(("train", "valid", "test"), sets):
        _tokenize(name, dataset)
    if packed:
        sets = [
            PackedDataset(s, recipe.max_seq_length, recipe.batch_size, mask_prompt=recipe.mask_prompt) if len(s) else s
            for s in sets
        ]
    return tuple(sets)


def _tokenize(name: str, dataset) -> None:
    """Tokenize every example now (mlx-lm does it lazily, at the first batch),
    so that a tokenizer problem is one line naming the split, not a
    traceback mid-run: chat and completions data need a chat template."""
    for i in range(len(dataset)):
        try:
            dataset[i]
        except Exception as e:  # noqa: BLE001 - the tokenizer's own error, whatever its type
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RecipeError(f"data: cannot tokenize example {i + 1} of {name}.jsonl: {first}") from None


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


def attention_plan(shape: dict, batch_size: int, length: int, variant: str, packed: bool = False):
    """What attention implementation a training batch of this length gets
    (with document ids when the rows are packed)."""
    B = batch_size
    q = mx.zeros((B, shape["n_heads"], length, shape["head_dim"]), dtype=shape["dtype"])
    kv = mx.zeros((B, shape["n_kv_heads"], length, shape["head_dim"]), dtype=shape["dtype"])
    ids = mx.zeros((B, length), mx.int32) if packed else None
    return explain(q, kv, kv, mask="causal", segment_ids=ids, variant=variant)


def packing_summary(train_set, check: Optional[float]) -> dict:
    """How full the packed rows are, and the largest difference between a
    document's loss packed and alone (the exactness check)."""
    return {
        "fill_ratio": train_set.fill_ratio,
        "rows": len(train_set),
        "examples": train_set.examples,
        "truncated_examples": train_set.truncated,
        "max_document_loss_difference": check,
    }


def packing_check(model, dataset) -> Optional[float]:
    """Largest |packed - alone| summed document loss over the first row of
    ``dataset`` (validation data), or None without one."""
    if not len(dataset):
        return None
    pairs = packing.document_losses(model, *dataset[0])
    return max((abs(a - b) for a, b in pairs), default=None)


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


def _from_rank0(arrays: dict, rank: int) -> dict:
    """Rank 0's value of every array in ``arrays`` (same keys and shapes on every rank).

    Ranks on other machines may not see rank 0's run folder, so a resumed
    run would otherwise start them from different weights or iterations.
    """
    return {k: mx.distributed.all_sum(v if rank == 0 else mx.zeros_like(v), stream=mx.cpu) for k, v in arrays.items()}


def compile_step() -> bool:
    """Whether to ``mx.compile`` the training step: on a GPU backend only."""
    return mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())


def fill_of(batch) -> float:
    """The share of a batch's tokens that are real, not padding: from the
    document ids of packed rows, or from mlx-lm's ``[offset, length]`` rows."""
    tokens = batch[0]
    if len(batch) == 3:
        real = (batch[1] >= 0).sum().item()
    else:
        real = batch[1][:, 1].sum().item()
    return real / tokens.size


def summarize(records, *, variant, plan, iters, interrupted, elapsed, extra) -> dict:
    """Totals of a run from its per-iteration ``records``."""
    times = [r["wall_s"] for r in records]
    # The first iteration of a run includes tracing (and compiling) the step
    # and warming the allocator; the median and p95 describe the steady state.
    steady = [r["wall_s"] for r in records if not r.get("warmup")] or times
    tokens = sum(r["tokens"] for r in records)
    fills = [r["fill"] for r in records if "fill" in r]
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
        # tokens are the targets the loss counted: real tokens, never padding.
        "tokens_per_s": tokens / sum(times) if times and sum(times) > 0 else None,
        "fill_ratio": float(np.mean(fills)) if fills else None,
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


def validation_skipped(recipe, valid_set) -> Optional[str]:
    """Why this run validates nothing, or None when it validates."""
    if recipe.val_batches == 0:
        return "val_batches is 0"
    if not len(valid_set):
        return f"no validation data (no valid.jsonl in {recipe.data})" if data.is_local(recipe) else "no validation split"
    if len(valid_set) < recipe.batch_size:
        return f"the validation set has {len(valid_set)} examples, fewer than batch_size {recipe.batch_size}"
    return None


def _stop_notice(signum: int) -> None:
    interrupts.announce(
        signum,
        f"stopping after the iteration in progress, to save a checkpoint ({interrupts.NAMES[signum]} again "
        "stops at once, keeping only the last checkpoint)",
    )


def _any_rank_stopping(signum: Optional[int]) -> Optional[int]:
    """The stop request of any rank, on every rank: all ranks stop at the same
    iteration, or the others would wait forever for the one that stopped."""
    asked = mx.array([int(signum == signal.SIGINT), int(signum == signal.SIGTERM)])
    sigint, sigterm = mx.distributed.all_sum(asked, stream=mx.cpu).tolist()
    return signal.SIGTERM if sigterm else signal.SIGINT if sigint else None


def run(recipe, variant: str, run_dir: Path) -> dict:
    """Fine-tune with attention ``variant``, writing into ``run_dir``.

    ``variant`` is an ``attention.compare`` entry: a variant name, or
    ``<name>:padded`` for that variant on mlx-lm's padded batches even when
    the recipe packs (the baseline a packed run is compared with).

    Every variant of a comparison starts from the same base weights, the same
    adapter initialisation (``mx.random.seed(recipe.seed)``) and the same
    batch order, so their losses differ only by the attention's arithmetic.
    With ``recipe.resume`` the run continues from its latest checkpoint.

    Returns the summary dictionary (also written to ``summary.json``).
    Raises ``Interrupted`` if Ctrl-C or SIGTERM stops training, after saving.
    """
    from mlx_lm.tuner.trainer import default_loss, evaluate

    started = time.perf_counter()
    world = mx.distributed.init()
    rank, world_size = world.rank(), world.size()
    writer = rank == 0
    try:
        grid = context.grid(recipe.context_parallel, world)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    if recipe.batch_size % grid.dp != 0:
        raise RecipeError(f"batch_size: {recipe.batch_size} is not divisible by the {grid.dp} data-parallel ranks")

    entry = variant
    variant, padded = run_entry(entry)
    packed = recipe.pack_sequences and not padded
    adapters = adapter_dir(recipe, run_dir)
    metrics_path = run_dir / METRICS_FILE
    checkpoints = run_dir / resume.CHECKPOINTS
    resumed = resume.find(recipe, entry, run_dir, metrics_path) if recipe.resume and writer else None

    # The predicted peak, printed (and a run that would not fit refused) before any weight loads.
    planned = before_loading(recipe, entry, writer)
    mx.random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    model, tokenizer, config, model_path = load_base(recipe)
    if packed:
        try:
            packing.check_model(model, config.get("model_type", type(model).__module__))
        except ValueError as e:
            raise RecipeError(str(e)) from None
    train_set, valid_set, test_set = load_data(recipe, tokenizer, packed)
    if len(train_set) < recipe.batch_size:
        raise RecipeError(f"batch_size: {recipe.batch_size} is more than the {len(train_set)} training examples")
    mx.random.seed(recipe.seed)
    attach_adapters(model, recipe)
    if recipe.resume_adapter_file:
        model.load_weights(recipe.resume_adapter_file, strict=False)
    optimizer = build_optimizer(recipe)
    # Initialised now, not at the first update, so that a checkpoint's state
    # can be put in place (and shared across ranks) before training.
    optimizer.init(model.trainable_parameters())
    grad = resume.restore(resumed.checkpoint, model, optimizer) if resumed else None
    start = resumed.iteration + 1 if resumed else 1
    if world_size > 1:
        start, grad = _share_start(model, optimizer, grad, start, rank)

    batches = Batches(train_set, recipe.batch_size, recipe.max_seq_length, recipe.seed, grid.dp_index, grid.dp)
    if writer and batches.truncated() and start == 1:
        print(
            f"mlx_flash.finetune: warning: {batches.truncated()} of {len(train_set)} training examples are longer "
            f"than max_seq_length ({recipe.max_seq_length} tokens) and are truncated",
            file=sys.stderr,
        )
    # Batches are padded to one more than a multiple of 32; inputs drop one.
    length = min(recipe.max_seq_length, 1 + 32 * ((max(batches.lengths) + 31) // 32)) - 1
    plan = attention_plan(geometry(model, config), recipe.batch_size // grid.dp, length, variant, packed)

    if writer:
        adapter_config = recipe_dict(recipe)
        adapter_config.update(model=model_path, adapter_path=str(adapters))
        adapter_config["attention"] = {"variant": variant, "implementation": plan.implementation}
        adapter_config["pack_sequences"] = packed
        files.write_json(adapters / ADAPTER_CONFIG, adapter_config)
        metrics = files.JsonlWriter(metrics_path, resumed.records if resumed else ())

    # Packed rows keep attention and targets inside each example.
    try:
        loss_name, loss_fn, loss_reason = (
            ("full", None, "context_parallel: full logits of each rank's slice")
            if grid.cp > 1
            else loss_choice.choose(
                recipe.loss, model, recipe.batch_size // grid.dp, length, packed, default_loss, packing.packed_loss
            )
        )
    except ValueError as e:
        raise RecipeError(str(e)) from None
    eval_loss, validation_batches = loss_fn, evaluation_batches(recipe.seed)
    if grid.cp > 1:  # every rank of a row holds a slice of it
        loss_fn, eval_loss = context.training_loss(grid), context.evaluation_loss(grid)
        validation_batches = context.evaluation_batches(validation_batches, grid)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    accumulate = recipe.grad_accumulation_steps
    state = [model.state, optimizer.state, mx.random.state]

    def step(batch, previous, update):
        (loss, tokens), grad = loss_and_grad(model, *batch)
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

    skipped = validation_skipped(recipe, valid_set)

    def validate(dataset, batches_to_run) -> Optional[float]:
        if len(dataset) < recipe.batch_size or batches_to_run == 0:
            return None
        loss = evaluate(
            model=model,
            dataset=dataset,
            batch_size=recipe.batch_size,
            num_batches=batches_to_run,
            max_seq_length=recipe.max_seq_length,
            loss=eval_loss,
            iterate_batches=validation_batches,
        )
        model.train()
        return loss

    info = {
        "trajectory": resume.trajectory(recipe, entry),
        "initial_val_loss": resumed.checkpoint.state.get("initial_val_loss") if resumed else None,
        "batches_per_epoch": len(batches),
    }
    saved = {"iteration": resumed.iteration if resumed else 0, "path": resumed.checkpoint.path if resumed else None}

    def save(iteration: int) -> None:
        if not writer or saved["iteration"] == iteration:
            return
        metrics.sync()  # the checkpoint never runs ahead of the metrics on disk
        arrays = resume.capture(model, optimizer, grad)
        saved["path"] = checkpoint.save(
            checkpoints, iteration, arrays, {**info, "random_key": resume.random_key()}
        )
        saved["iteration"] = iteration
        files.write_safetensors(adapters / ADAPTER_FILE, arrays["adapters"])
        if iteration % recipe.save_every == 0:
            files.write_safetensors(adapters / f"{iteration:07d}_{ADAPTER_FILE}", arrays["adapters"])

    progress = None
    records = list(resumed.records) if resumed else []
    extra = {
        "rank_count": world_size,
        "context_parallel": grid.cp,
        "compiled_step": compiled,
        "attention_plan": plan.summary,
        "attention_variant": variant,
        "packed": packed,
        "planned_peak_bytes": planned,
        "loss": loss_name,
        "loss_reason": loss_reason,
        **environment(),
    }
    stopped = None  # the signal that stopped the run
    at_once = False  # stopped mid-iteration: only the last checkpoint is kept
    done = start - 1  # the last iteration completed
    with patched(variant), bounded(model, checkpoint=recipe.grad_checkpoint, chunk_tokens=recipe.chunk_tokens):
        try:
            if start == 1:
                info["initial_val_loss"] = validate(valid_set, recipe.val_batches)
            model.train()
            # Made here so that its clock (it/s) leaves out the initial validation.
            progress = Progress(recipe.iters, entry, every=recipe.steps_per_report, enabled=writer, first=start)
            with interrupts.deferred(_stop_notice if writer else None) as stop:
                for iteration in range(start, recipe.iters + 1):
                    batch = batches.batch(iteration - 1)
                    mx.reset_peak_memory()
                    tic = time.perf_counter()
                    loss, tokens, grad = step(batch, grad, iteration % accumulate == 0)
                    mx.eval(state, loss, tokens, grad)
                    wall = time.perf_counter() - tic
                    peak = mx.get_peak_memory()
                    if recipe.clear_cache_threshold and mx.get_cache_memory() > recipe.clear_cache_threshold:
                        mx.clear_cache()
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
                        "fill": fill_of(batch),
                        "variant": entry,
                    }
                    if iteration == start:
                        record["warmup"] = True
                    if iteration % recipe.steps_per_eval == 0 or iteration == recipe.iters:
                        record["val_loss"] = validate(valid_set, recipe.val_batches)
                    records.append(record)
                    if writer:
                        metrics.write(record)
                    if iteration % recipe.save_every == 0 or iteration == recipe.iters:
                        save(iteration)
                    progress.update(iteration, record["loss"], record.get("val_loss"))
                    done = iteration
                    if world_size > 1:
                        stop.signal = _any_rank_stopping(stop.signal)
                    if stop:
                        save(iteration)
                        stopped = stop.signal
                        break
            if stopped is None and recipe.test:
                extra["test_loss"] = validate(test_set, recipe.test_batches)
            if stopped is None and packed and writer:
                # A whole row on one rank is what context parallelism avoids.
                check = packing_check(model, valid_set) if grid.cp == 1 else None
                extra["packing"] = packing_summary(train_set, check)
        except KeyboardInterrupt as e:
            stopped, at_once = interrupts.signal_of(e), True
        finally:
            if progress is not None:
                progress.close()
            if writer:
                if at_once:
                    # What the last checkpoint holds, and nothing newer: the
                    # iteration in progress was cut off.
                    records = [r for r in records if r["iteration"] <= saved["iteration"]]
                    metrics.close()
                    metrics = files.JsonlWriter(metrics_path, records)
                metrics.close()
                summary = summarize(
                    records,
                    variant=entry,
                    plan=plan,
                    iters=recipe.iters,
                    interrupted=stopped is not None,
                    elapsed=time.perf_counter() - started,
                    extra={
                        "adapter_path": str(adapters),
                        "metrics": str(metrics_path),
                        "model": model_path,
                        "initial_val_loss": info["initial_val_loss"],
                        "validation": f"skipped: {skipped}" if skipped else "ran",
                        "resumed": resumed is not None,
                        "resumed_from_iteration": resumed.iteration if resumed else None,
                        "checkpoint": str(saved["path"]) if saved["path"] else None,
                        "checkpoint_iteration": saved["iteration"] or None,
                        "stopped_by": interrupts.NAMES[stopped] if stopped else None,
                        **extra,
                    },
                )
                files.write_json(run_dir / SUMMARY_FILE, summary)
    if stopped is not None:
        raise Interrupted(_stopped_message(stopped, at_once, done, recipe.iters, saved, adapters, metrics_path, run_dir), stopped)
    return summary if writer else {}


def _stopped_message(signum, at_once, done, iters, saved, adapters, metrics_path, run_dir) -> str:
    name = interrupts.NAMES[signum]
    if at_once:
        kept = (
            f"the last checkpoint is iteration {saved['iteration']} ({saved['path']}) and metrics were cut back to it"
            if saved["iteration"]
            else "no checkpoint was written yet"
        )
        during = f"during iteration {done + 1}" if done < iters else "after the last iteration"
        return f"{name}: stopped at once {during}; {kept}; summary in {run_dir / SUMMARY_FILE}"
    return (
        f"{name}: stopped after iteration {done}: checkpoint {saved['path']}, adapters in {adapters}, "
        f"metrics in {metrics_path}, summary in {run_dir / SUMMARY_FILE}; --set resume=true continues"
    )


def _share_start(model, optimizer, grad, start: int, rank: int):
    """Rank 0's weights, optimizer state, accumulated gradients, random key and
    start iteration, on every rank."""
    weights = _from_rank0(dict(tree_flatten(model.trainable_parameters())), rank)
    model.load_weights(list(weights.items()), strict=False)
    shared = _from_rank0(dict(tree_flatten(optimizer.state)), rank)
    optimizer.state = tree_map_with_path(lambda path, _: shared[path], optimizer.state)
    scalars = mx.array([start if rank == 0 else 0, int(grad is not None) if rank == 0 else 0], mx.int64)
    key = mx.random.state[0]
    key = mx.distributed.all_sum(key if rank == 0 else mx.zeros_like(key), stream=mx.cpu).tolist()
    start, has_grad = (int(x) for x in mx.distributed.all_sum(scalars, stream=mx.cpu).tolist())
    if has_grad:
        zeros = tree_map(mx.zeros_like, model.trainable_parameters())
        summed = _from_rank0(dict(tree_flatten(grad if rank == 0 else zeros)), rank)
        grad = tree_map_with_path(lambda path, _: summed[path], zeros)
    resume.set_random_key(key)
    return start, grad
