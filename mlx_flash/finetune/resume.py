"""Resuming a run: whether its latest checkpoint may continue, and restoring it.

A run continues from its latest checkpoint (checkpoint.py) only under the
recipe values that fixed its loss trajectory (``TRAJECTORY``); the rest
(``iters``, ``steps_per_eval``, ``val_batches``, ``save_every``, ``test``,
``output``, ...) may change between sessions. To train on from a
checkpoint's weights with other values, start a new run with
``resume_adapter_file`` pointing at them, as in mlx-lm.

Restored: the trainable weights, the optimizer state (moments, step count
and so the learning-rate schedule), gradients accumulated toward the next
update, and the ``mx.random`` key (LoRA dropout). The batch order follows
from the iteration (batches.py). ``metrics.jsonl`` keeps the records up to
the checkpoint's iteration; records after it are of iterations the resumed
run does again.
"""

import json
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from . import checkpoint, files
from .config import RecipeError

CHECKPOINTS = "checkpoints"

#: Recipe keys whose values a checkpoint continues under, and only under.
TRAJECTORY = (
    "model", "data", "hf_dataset", "fine_tune_type", "num_layers", "lora_parameters", "batch_size", "seed",
    "optimizer", "optimizer_config", "learning_rate", "lr_schedule", "max_seq_length", "grad_accumulation_steps",
    "mask_prompt", "pack_sequences", "text_feature", "prompt_feature", "completion_feature", "chat_feature",
)  # fmt: skip


def trajectory(recipe, variant: str) -> dict:
    """The values of ``TRAJECTORY`` (and the variant), as JSON reads them back."""
    values = {key: getattr(recipe, key) for key in TRAJECTORY}
    values["attention.variant"] = variant
    return json.loads(json.dumps(values))


class Resume:
    """A checkpoint a run may continue from, and the metrics records it keeps."""

    def __init__(self, point: checkpoint.Checkpoint, records: List[dict]):
        self.checkpoint = point
        self.records = records
        self.iteration = point.iteration


def find(recipe, variant: str, run_dir: Path, metrics_path: Path) -> Optional[Resume]:
    """The run's latest checkpoint, checked against the recipe; None if it has none.

    Raises ``RecipeError`` (one line) when the checkpoint cannot continue
    under this recipe: a trajectory key changed, ``iters`` is below its
    iteration, or ``metrics.jsonl`` lacks its records.
    """
    point = checkpoint.latest(Path(run_dir) / CHECKPOINTS)
    if point is None:
        return None
    saved, now = point.state.get("trajectory", {}), trajectory(recipe, variant)
    for key, value in now.items():
        if saved.get(key) != value:
            raise RecipeError(
                f"resume: {key} is {value!r} but the checkpoint at iteration {point.iteration} ({point.path}) "
                f"was trained with {saved.get(key)!r}; set it back, or start a new run from those weights "
                f"with --set resume_adapter_file={point.path / 'adapters.safetensors'} --overwrite"
            )
    if recipe.iters < point.iteration:
        raise RecipeError(
            f"iters: {recipe.iters} is below iteration {point.iteration} of the checkpoint in {point.path}: "
            f"resume with iters of at least {point.iteration}, or pass --overwrite to start again"
        )
    try:
        records = files.read_jsonl(metrics_path) if metrics_path.exists() else []
    except ValueError as e:
        raise RecipeError(f"resume: {e}") from None
    kept = [r for r in records if r.get("iteration", 0) <= point.iteration]
    if [r.get("iteration") for r in kept] != list(range(1, point.iteration + 1)):
        raise RecipeError(
            f"resume: {metrics_path} does not hold the records of iterations 1..{point.iteration} that the "
            f"checkpoint in {point.path} continues; pass --overwrite to start again"
        )
    return Resume(point, kept)


def random_key() -> List[int]:
    """The ``mx.random`` key as two 32-bit integers."""
    return [int(x) for x in mx.random.state[0].tolist()]


def set_random_key(key: List[int]) -> None:
    # mx.random.seed(s) makes the key (s >> 32, s & 0xffffffff): any key can be set.
    mx.random.seed((int(key[0]) << 32) | int(key[1]))


def capture(model, optimizer, gradients) -> Dict[str, Dict[str, mx.array]]:
    """The arrays of a checkpoint (see checkpoint.ARRAYS), flat."""
    return {
        "adapters": dict(tree_flatten(model.trainable_parameters())),
        "optimizer": dict(tree_flatten(optimizer.state)),
        "gradients": dict(tree_flatten(gradients)) if gradients is not None else {},
    }


def _filled(tree, flat: Dict[str, mx.array], what: str, where: Path):
    """``tree`` with every leaf replaced by ``flat[its path]``; the keys must agree."""
    have = {path for path, _ in tree_flatten(tree)}
    if have != set(flat):
        missing = sorted(have - set(flat)) or sorted(set(flat) - have)
        raise RecipeError(f"resume: the {what} in {where} do not fit this model ({missing[0]} ...)")

    def take(path, leaf):
        value = flat[path]
        if value.shape != leaf.shape:
            raise RecipeError(f"resume: {path} in {where} has shape {value.shape}, the model needs {leaf.shape}")
        return value

    return tree_map_with_path(take, tree)


def restore(point: checkpoint.Checkpoint, model, optimizer):
    """Put the checkpoint's weights, optimizer state and random key in place.

    ``optimizer`` must be initialised (``optimizer.init``) for ``model``.
    Returns the accumulated gradients (None between updates).
    """
    model.update(_filled(model.trainable_parameters(), point.arrays("adapters"), "adapters", point.path))
    optimizer.state = _filled(optimizer.state, point.arrays("optimizer"), "optimizer state", point.path)
    saved = point.arrays("gradients")
    gradients = _filled(model.trainable_parameters(), saved, "gradients", point.path) if saved else None
    set_random_key(point.state["random_key"])
    return gradients
