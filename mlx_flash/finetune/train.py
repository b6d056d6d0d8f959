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

``run`` reads top to bottom as its steps, each a function of one ``Run``
(what was set up, and how far the run got)::

    set_up -> resume_from -> begin -> one_iteration ... -> stop or finish -> write_summary

``interleave.compare`` drives the same steps for several variants in turns.
"""

import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from .. import context
from ..explain import explain
from ..machine import describe
from ..patch import patched
from ..plan.recipe import before_loading
from ..text import first_line
from ..stats import percentile
from ..step import bounded
from . import builtin, checkpoint, data, files, gguf, hub, interrupts, resume
from .batches import Batches, evaluation_batches
from .config import RecipeError, recipe_dict
from .config import build_optimizer as _build_optimizer
from . import loss_choice, packing
from .config import run_entry
from .packing import PackedDataset
from .progress import Every, Progress, note

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
        raise RecipeError(f"model: cannot load '{recipe.model}': {first_line(e)}") from None
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


def load_data(recipe, tokenizer, packed: bool = False, label: Optional[str] = None):
    """``(train, valid, test)`` as mlx-lm ``CacheDataset`` objects, or, when
    ``packed``, whole examples packed into ``max_seq_length`` rows with
    document ids (``PackedDataset``); a missing optional split is an empty
    list. With ``label``, progress lines say what is being done."""
    from mlx_lm.tuner.datasets import CacheDataset

    sets = [CacheDataset(s) if len(s) else s for s in data.load(recipe, tokenizer)]
    for name, dataset in zip(("train", "valid", "test"), sets):
        _tokenize(name, dataset, label)
    if packed:
        if label:
            note(label, f"packing {len(sets[0])} training examples into rows of {recipe.max_seq_length} tokens")
        sets = [
            PackedDataset(s, recipe.max_seq_length, recipe.batch_size, mask_prompt=recipe.mask_prompt) if len(s) else s
            for s in sets
        ]
    return tuple(sets)


def _tokenize(name: str, dataset, label: Optional[str] = None) -> None:
    """Tokenize every example now (mlx-lm does it lazily, at the first batch),
    so that a tokenizer problem is one line naming the split, not a
    traceback mid-run: chat and completions data need a chat template."""
    if label and len(dataset):
        note(label, f"tokenizing {len(dataset)} {name} examples")
    every = Every()
    for i in range(len(dataset)):
        try:
            dataset[i]
        except Exception as e:  # noqa: BLE001 - the tokenizer's own error, whatever its type
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RecipeError(f"data: cannot tokenize example {i + 1} of {name}.jsonl: {first}") from None
        if label and every.due():
            note(label, f"tokenized {i + 1} of {len(dataset)} {name} examples")


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


def in_progress(runs: List["Run"]) -> "Run":
    """The run whose phase started last: the one the process is in."""
    return max(runs, key=lambda r: r.phase_since)


def stop_notices(runs: List["Run"]):
    """``(notice, at_once)`` for ``interrupts.deferred``: what the first signal
    does now, truthfully timed, and the line for a second one that ends the
    process in the middle of a step."""

    def notice(signum: int) -> None:
        run = in_progress(runs)
        name = interrupts.NAMES[signum]
        running = time.perf_counter() - run.phase_since
        steady = [r["wall_s"] for r in run.records if not r.get("warmup")]
        if not run.phase.startswith("iteration"):
            expect = ""
        elif steady:
            typical = percentile(steady, 50)
            left = f"about {typical - running:.0f} s more" if typical > running else "it should end soon"
            expect = f"; its iterations take about {typical:.1f} s, so {left}"
        else:
            expect = "; it is the first of this session (warm-up included), with no earlier one to time it by"
        kept = f"iteration {run.saved_iteration}" if run.saved_iteration else "none yet"
        interrupts.announce(
            signum,
            f"stopping after the {run.phase} of {run.entry} (running {running:.0f} s{expect}), then saving a "
            f"checkpoint; {name} again stops at once, keeping the last checkpoint ({kept})",
        )

    def at_once(signum: int) -> str:
        run = in_progress(runs)
        kept = ", ".join(
            f"{r.entry} iteration {r.saved_iteration}" if r.saved_iteration else f"{r.entry} none" for r in runs
        )
        return (
            f"{interrupts.NAMES[signum]}: stopped at once during the {run.phase} of {run.entry}; last checkpoints: "
            f"{kept}; metrics.jsonl may list iterations after them, which --set resume=true trains again"
        )

    return notice, at_once


def _any_rank_stopping(signum: Optional[int]) -> Optional[int]:
    """The stop request of any rank, on every rank: all ranks stop at the same
    iteration, or the others would wait forever for the one that stopped."""
    asked = mx.array([int(signum == signal.SIGINT), int(signum == signal.SIGTERM)])
    sigint, sigterm = mx.distributed.all_sum(asked, stream=mx.cpu).tolist()
    return signal.SIGTERM if sigterm else signal.SIGINT if sigint else None


@dataclass
class Run:
    """One run between its steps: what ``set_up`` made, and how far it got.

    The fields above the line do not change once the run is set up; those
    below it are where the run stands, changed by ``one_iteration``,
    ``save`` and ``stop`` (and put in place by ``resume_from``).
    """

    recipe: Any
    entry: str  # the attention.compare entry: "mlx:padded"
    variant: str  # the attention variant it runs: "mlx"
    packed: bool
    run_dir: Path
    adapters: Path
    rank: int
    world_size: int
    grid: Any  # data-parallel shards x context-parallel ranks (mlx_flash.context)
    model: nn.Module
    model_path: str
    optimizer: Any
    train_set: Any
    valid_set: Any
    test_set: Any
    batches: Batches
    plan: Any  # the attention plan of a training batch (explain)
    loss_fn: Callable
    eval_loss: Callable  # the loss validation reports
    loss_name: str  # what the recipe's loss key chose (loss_choice), and why
    loss_reason: str
    planned_peak_bytes: Any  # the memory plan's prediction (mlx_flash.plan)
    evaluation: Callable  # the iterate_batches validation uses
    resumed: Optional[resume.Resume]
    started: float
    # Made by resume_from, after the state is in place: a compiled step holds
    # on to the optimizer's state dictionary, which restoring replaces.
    step: Optional[Callable] = None  # (batch, gradients so far, update?) -> (loss, tokens, gradients)
    compiled: bool = False
    state: list = field(default_factory=list)  # what the step reads and writes
    # ---- where the run stands
    start: int = 1  # the first iteration this session trains
    grad: Any = None  # gradients summed toward the next update (accumulation)
    records: List[dict] = field(default_factory=list)
    initial_val_loss: Optional[float] = None
    saved_iteration: int = 0  # of the latest checkpoint (0: none)
    saved_path: Optional[Path] = None
    done: int = 0  # the last iteration completed
    stopped: Optional[int] = None  # the signal that stopped the run
    at_once: bool = False  # stopped mid-iteration: only the last checkpoint is kept
    metrics: Optional[files.JsonlWriter] = None  # rank 0 only
    progress: Optional[Progress] = None
    # Bytes of other runs' arrays held in this process (a comparison trains
    # its variants side by side), left out of this run's peak memory.
    others_bytes: int = 0
    # What the run is doing ("iteration 7") and since when (perf_counter), for
    # the line a stop request prints.
    phase: str = "set-up"
    phase_since: float = 0.0

    def enter(self, phase: str) -> None:
        self.phase, self.phase_since = phase, time.perf_counter()
    extra: dict = field(default_factory=dict)  # summary entries of this run

    @property
    def writer(self) -> bool:
        """Whether this rank writes the run's files (rank 0)."""
        return self.rank == 0

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE


def loss_function(recipe, model: nn.Module, rows: int, length: int, packed: bool, grid):
    """``(name, loss, why)``: the training loss the recipe's ``loss`` key picks
    (loss_choice) for ``rows`` rows of ``length`` tokens, around mlx-lm's
    ``default_loss`` or, on packed rows, one that keeps targets inside each
    example; with context parallelism, the full logits of each rank's slice
    (``loss`` None: ``set_up`` takes the context-parallel loss)."""
    from mlx_lm.tuner.trainer import default_loss

    if grid.cp > 1:
        return "full", None, "context_parallel: full logits of each rank's slice"
    try:
        return loss_choice.choose(recipe.loss, model, rows, length, packed, default_loss, packing.packed_loss)
    except ValueError as e:
        raise RecipeError(str(e)) from None


def make_step(model: nn.Module, optimizer, loss_fn: Callable, accumulate: int, state: list):
    """The training step and whether it is compiled.

    ``step(batch, previous, update)`` adds the batch's gradients to
    ``previous`` and, when ``update``, averages them across ranks and updates
    the model; it returns ``(loss, tokens, gradients still to apply)``.
    """
    loss_and_grad = nn.value_and_grad(model, loss_fn)

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
    return step, compiled


def set_up(recipe, entry: str, run_dir: Path) -> Run:
    """Load the model and data, add the adapters, build the optimizer and step.

    Seeds ``mx.random`` and NumPy with ``recipe.seed`` first, and again before
    the adapters are made, so every variant starts from the same weights.
    """
    started = time.perf_counter()
    world = mx.distributed.init()
    rank, world_size = world.rank(), world.size()
    try:
        grid = context.grid(recipe.context_parallel, world)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    if recipe.batch_size % grid.dp != 0:
        raise RecipeError(f"batch_size: {recipe.batch_size} is not divisible by the {grid.dp} data-parallel ranks")
    variant, padded = run_entry(entry)
    packed = recipe.pack_sequences and not padded
    resumed = resume.find(recipe, entry, run_dir, run_dir / METRICS_FILE) if recipe.resume and rank == 0 else None

    # The predicted peak, printed (and a run that would not fit refused) before any weight loads.
    planned = before_loading(recipe, entry, rank == 0)
    mx.random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    label = entry if rank == 0 else None
    tic = time.perf_counter()
    note(entry, f"loading model {recipe.model}", enabled=rank == 0)
    model, tokenizer, config, model_path = load_base(recipe)
    note(entry, f"model loaded in {time.perf_counter() - tic:.1f} s", enabled=rank == 0)
    if packed:
        try:
            packing.check_model(model, config.get("model_type", type(model).__module__))
        except ValueError as e:
            raise RecipeError(str(e)) from None
    train_set, valid_set, test_set = load_data(recipe, tokenizer, packed, label)
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

    batches = Batches(train_set, recipe.batch_size, recipe.max_seq_length, recipe.seed, grid.dp_index, grid.dp)
    # Batches are padded to one more than a multiple of 32; inputs drop one.
    length = min(recipe.max_seq_length, 1 + 32 * ((max(batches.lengths) + 31) // 32)) - 1
    plan = attention_plan(geometry(model, config), recipe.batch_size // grid.dp, length, variant, packed)
    loss_name, loss_fn, loss_reason = loss_function(recipe, model, recipe.batch_size // grid.dp, length, packed, grid)
    eval_loss = loss_fn
    evaluation = evaluation_batches(recipe.seed)
    if grid.cp > 1:  # every rank of a row holds a slice of it
        loss_fn, eval_loss = context.training_loss(grid), context.evaluation_loss(grid)
        evaluation = context.evaluation_batches(evaluation, grid)
    return Run(
        recipe=recipe, entry=entry, variant=variant, packed=packed, run_dir=run_dir,
        adapters=adapter_dir(recipe, run_dir), rank=rank, world_size=world_size, grid=grid, model=model,
        model_path=model_path, optimizer=optimizer, train_set=train_set, valid_set=valid_set,
        test_set=test_set, batches=batches, plan=plan, loss_fn=loss_fn, eval_loss=eval_loss,
        loss_name=loss_name, loss_reason=loss_reason, planned_peak_bytes=planned,
        evaluation=evaluation, resumed=resumed, started=started,
    )  # fmt: skip


def resume_from(run: Run) -> None:
    """Put the run where it starts: its checkpoint's weights, optimizer state,
    gradients, random key and records (``recipe.resume``), the same on every
    rank; make the step; write the adapter config and open the metrics."""
    resumed, recipe = run.resumed, run.recipe
    if resumed:
        run.grad = resume.restore(resumed.checkpoint, run.model, run.optimizer)
        run.start = resumed.iteration + 1
        run.records = list(resumed.records)
        run.initial_val_loss = resumed.checkpoint.state.get("initial_val_loss")
        run.saved_iteration, run.saved_path = resumed.iteration, resumed.checkpoint.path
    if run.world_size > 1:
        run.start, run.grad = _share_start(run.model, run.optimizer, run.grad, run.start, run.rank)
    run.done = run.start - 1
    run.state = [run.model.state, run.optimizer.state, mx.random.state]
    run.step, run.compiled = make_step(run.model, run.optimizer, run.loss_fn, recipe.grad_accumulation_steps, run.state)
    if not run.writer:
        return
    if run.batches.truncated() and run.start == 1:
        print(
            f"mlx_flash.finetune: warning: {run.batches.truncated()} of {len(run.train_set)} training examples are "
            f"longer than max_seq_length ({recipe.max_seq_length} tokens) and are truncated",
            file=sys.stderr,
        )
    repeated = getattr(run.train_set, "unique_rows", len(run.train_set)) < len(run.train_set)
    if repeated and run.start == 1:
        print(
            f"[{run.entry}] the {run.train_set.examples} training examples pack into {run.train_set.unique_rows} "
            f"row(s) of {recipe.max_seq_length} tokens, fewer than batch_size {recipe.batch_size}: rows are repeated "
            f"to fill each step, so an epoch is {len(run.batches)} step(s) over the same "
            f"{run.train_set.unique_rows} unique row(s)",
            file=sys.stderr,
        )
    adapter_config = recipe_dict(recipe)
    adapter_config.update(model=run.model_path, adapter_path=str(run.adapters))
    adapter_config["attention"] = {"variant": run.variant, "implementation": run.plan.implementation}
    adapter_config["pack_sequences"] = run.packed
    files.write_json(run.adapters / ADAPTER_CONFIG, adapter_config)
    run.metrics = files.JsonlWriter(run.metrics_path, run.records)
    run.extra = {
        "rank_count": run.world_size,
        "context_parallel": run.grid.cp,
        "compiled_step": run.compiled,
        "attention_plan": run.plan.summary,
        "attention_variant": run.variant,
        "packed": run.packed,
        "planned_peak_bytes": run.planned_peak_bytes,
        "loss": run.loss_name,
        "loss_reason": run.loss_reason,
        **environment(),
    }


def validate(run: Run, dataset, batches_to_run: int) -> Optional[float]:
    """mlx-lm's ``evaluate`` of the model on ``dataset`` (None when there is
    not a batch of it, or no batch to run)."""
    from mlx_lm.tuner.trainer import evaluate

    recipe = run.recipe
    if len(dataset) < recipe.batch_size or batches_to_run == 0:
        return None
    loss = evaluate(
        model=run.model,
        dataset=dataset,
        batch_size=recipe.batch_size,
        num_batches=batches_to_run,
        max_seq_length=recipe.max_seq_length,
        loss=run.eval_loss,
        iterate_batches=run.evaluation,
    )
    run.model.train()
    return loss


def one_iteration(run: Run, iteration: int) -> dict:
    """Train ``iteration`` (1-based): step, time, validate when due, record,
    save when due. Returns its metrics record."""
    recipe = run.recipe
    run.enter(f"iteration {iteration}")
    batch = run.batches.batch(iteration - 1)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    loss, tokens, run.grad = run.step(batch, run.grad, iteration % recipe.grad_accumulation_steps == 0)
    mx.eval(run.state, loss, tokens, run.grad)
    wall = time.perf_counter() - tic
    peak = mx.get_peak_memory() - run.others_bytes
    if recipe.clear_cache_threshold and mx.get_cache_memory() > recipe.clear_cache_threshold:
        mx.clear_cache()
    if run.world_size > 1:
        loss = mx.distributed.all_sum(loss, stream=mx.cpu) / run.world_size
        tokens = mx.distributed.all_sum(tokens, stream=mx.cpu)
    record = {
        "iteration": iteration,
        "loss": loss.item(),
        "tokens": int(tokens.item()),
        "wall_s": wall,
        "tokens_per_s": tokens.item() / wall,
        "peak_memory_bytes": int(peak),
        "learning_rate": float(run.optimizer.learning_rate.item()),
        "fill": fill_of(batch),
        "variant": run.entry,
    }
    if iteration == run.start:
        record["warmup"] = True
    if iteration % recipe.steps_per_eval == 0 or iteration == recipe.iters:
        run.enter(f"validation after iteration {iteration}")
        record["val_loss"] = validate(run, run.valid_set, recipe.val_batches)
    run.records.append(record)
    if run.writer:
        run.metrics.write(record)
    if iteration % recipe.save_every == 0 or iteration == recipe.iters:
        save(run, iteration)
    run.progress.update(iteration, record["loss"], record.get("val_loss"))
    run.done = iteration
    return record


def save(run: Run, iteration: int) -> None:
    """Write checkpoint ``iteration`` and the adapters (rank 0; once per iteration)."""
    if not run.writer or run.saved_iteration == iteration:
        return
    run.metrics.sync()  # the checkpoint never runs ahead of the metrics on disk
    arrays = resume.capture(run.model, run.optimizer, run.grad)
    state = {
        "trajectory": resume.trajectory(run.recipe, run.entry),
        "initial_val_loss": run.initial_val_loss,
        "batches_per_epoch": len(run.batches),
        "random_key": resume.random_key(),
    }
    run.saved_path = checkpoint.save(run.run_dir / resume.CHECKPOINTS, iteration, arrays, state)
    run.saved_iteration = iteration
    files.write_safetensors(run.adapters / ADAPTER_FILE, arrays["adapters"])
    if iteration % run.recipe.save_every == 0:
        files.write_safetensors(run.adapters / f"{iteration:07d}_{ADAPTER_FILE}", arrays["adapters"])


def _batch_count(batches: int) -> str:
    return "every batch" if batches == -1 else f"{batches} batch(es)"


def begin(run: Run) -> None:
    """Validate before training (a fresh run) and start the progress bar."""
    recipe = run.recipe
    if run.start == 1:
        run.enter("validation before training")
        if not validation_skipped(recipe, run.valid_set):
            note(run.entry, f"validating before training ({_batch_count(recipe.val_batches)})", enabled=run.writer)
        run.initial_val_loss = validate(run, run.valid_set, recipe.val_batches)
    run.model.train()
    # Made here so that its clock (it/s) leaves out the initial validation.
    run.progress = Progress(recipe.iters, run.entry, every=recipe.steps_per_report, enabled=run.writer, first=run.start)


def train(run: Run) -> None:
    """``begin``, then train to ``recipe.iters``; the first Ctrl-C or SIGTERM
    stops after the iteration in progress, with a checkpoint (``stop``)."""
    notice, at_once = stop_notices([run])
    with interrupts.deferred(notice if run.writer else None, at_once) as request:
        begin(run)
        if stop_requested(run, request):
            stop(run, request.signal)
            return
        for iteration in range(run.start, run.recipe.iters + 1):
            one_iteration(run, iteration)
            if stop_requested(run, request):
                stop(run, request.signal)
                return


def stop_requested(run: Run, request) -> bool:
    """Whether a stop was asked for, on any rank (all ranks stop together)."""
    if run.world_size > 1:
        request.signal = _any_rank_stopping(request.signal)
    return bool(request)


def stop(run: Run, signum: int) -> None:
    """Stop after the iteration just done, saving a checkpoint of it."""
    save(run, run.done)
    run.stopped = signum


def finish(run: Run) -> None:
    """After the last iteration: the test loss and the packing check, when asked for."""
    if run.progress is not None:
        run.progress.close()  # lines below start on a line of their own
    if run.recipe.test:
        note(run.entry, f"testing ({_batch_count(run.recipe.test_batches)})", enabled=run.writer)
        run.extra["test_loss"] = validate(run, run.test_set, run.recipe.test_batches)
    if run.packed and run.writer:
        # A whole row on one rank is what context parallelism avoids.
        check = None
        if run.grid.cp == 1 and len(run.valid_set):
            note(run.entry, "checking that packing changed no validation document's loss")
            check = packing_check(run.model, run.valid_set)
        run.extra["packing"] = packing_summary(run.train_set, check)


def write_summary(run: Run) -> dict:
    """Close the metrics (cut back to the last checkpoint after a stop at once)
    and write ``summary.json``; returns the summary."""
    if run.at_once:
        # What the last checkpoint holds, and nothing newer: the iteration in
        # progress was cut off.
        run.records = [r for r in run.records if r["iteration"] <= run.saved_iteration]
        run.metrics.close()
        run.metrics = files.JsonlWriter(run.metrics_path, run.records)
    run.metrics.close()
    recipe, resumed = run.recipe, run.resumed
    summary = summarize(
        run.records,
        variant=run.entry,
        plan=run.plan,
        iters=recipe.iters,
        interrupted=run.stopped is not None,
        elapsed=time.perf_counter() - run.started,
        extra={
            "adapter_path": str(run.adapters),
            "metrics": str(run.metrics_path),
            "model": run.model_path,
            "initial_val_loss": run.initial_val_loss,
            "validation": (f"skipped: {skipped}" if (skipped := validation_skipped(recipe, run.valid_set)) else "ran"),
            "resumed": resumed is not None,
            "resumed_from_iteration": resumed.iteration if resumed else None,
            "checkpoint": str(run.saved_path) if run.saved_path else None,
            "checkpoint_iteration": run.saved_iteration or None,
            "stopped_by": interrupts.NAMES[run.stopped] if run.stopped else None,
            **run.extra,
        },
    )
    files.write_json(run.run_dir / SUMMARY_FILE, summary)
    return summary


def stopped_message(run: Run) -> str:
    """What a stopped run kept, and how to continue it: one line."""
    name = interrupts.NAMES[run.stopped]
    summary = run.run_dir / SUMMARY_FILE
    if run.at_once:
        kept = (
            f"the last checkpoint is iteration {run.saved_iteration} ({run.saved_path}) and metrics were cut back to it"
            if run.saved_iteration
            else "no checkpoint was written yet"
        )
        during = f"during iteration {run.done + 1}" if run.done < run.recipe.iters else "after the last iteration"
        return f"{name}: stopped at once {during}; {kept}; summary in {summary}"
    if run.done == 0:
        return f"{name}: stopped before iteration 1, during the {run.phase}: nothing was trained or saved"
    return (
        f"{name}: stopped after iteration {run.done}: checkpoint {run.saved_path}, adapters in {run.adapters}, "
        f"metrics in {run.metrics_path}, summary in {summary}; --set resume=true continues"
    )


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
    job = set_up(recipe, variant, run_dir)
    resume_from(job)
    summary = {}
    with patched(job.variant), bounded(job.model, checkpoint=recipe.grad_checkpoint, chunk_tokens=recipe.chunk_tokens):
        try:
            train(job)
            if job.stopped is None:
                finish(job)
        except KeyboardInterrupt as e:
            job.stopped, job.at_once = interrupts.signal_of(e), True
        finally:
            if job.progress is not None:
                job.progress.close()
            if job.writer:
                summary = write_summary(job)
    if job.stopped is not None:
        raise Interrupted(stopped_message(job), job.stopped)
    return summary


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
