"""One rank of a context-parallel check, run by tests/test_context.py under
``mlx.launch``: for each case, a tiny mlx-lm model's loss and LoRA gradients
from a context-parallel step, and the same from one process on the whole
row (the ``manual`` variant, dense masks), written to ``OUT/rank<r>.npz``.

    mlx.launch -n 2 --backend ring -- python tests/context_worker.py OUT [CP [CASE ...]]

``CP`` (default: every rank) ranks per row; with fewer, the ranks form a
data-parallel x context-parallel grid, each shard with its own rows; one
process's answer is then the mean over shards, as data parallelism averages.
"""

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama, qwen2
from mlx_lm.tuner.utils import linear_to_lora_layers

import mlx_flash
from mlx_flash import context

ROW = 61  # tokens per row: 60 inputs, not a multiple of 3 slices of 16 or 2 of 32 (padding)


def tiny(kind: str, window=None):
    mx.random.seed(3)
    common = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64, rope_theta=1000.0)  # fmt: skip
    if kind == "qwen2":
        model = qwen2.Model(qwen2.ModelArgs(model_type="qwen2", **common, tie_word_embeddings=True))
    else:
        layer_types = ["sliding_attention", "full_attention"] if window else None
        model = llama.Model(llama.ModelArgs(model_type="llama", **common, head_dim=8, sliding_window=window,
                                            layer_types=layer_types, tie_word_embeddings=False))  # fmt: skip
    model.freeze()
    keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"]
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 4.0, "dropout": 0.0, "keys": keys})
    # LoRA's B starts at zero, which would leave A without a gradient.
    model.update(tree_map(lambda p: 0.1 * mx.random.normal(p.shape), model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


def row(packed: bool):
    rng = np.random.RandomState(7)
    tokens = rng.randint(1, 64, size=(2, ROW)).astype(np.int32)
    if not packed:
        return mx.array(tokens), None, mx.ones((2, ROW - 1), mx.int32)
    # Documents that straddle the slice boundaries (16/32 and 20/40 inputs), then padding.
    ids = np.full((2, ROW), -1, np.int32)
    for b, lengths in enumerate([(13, 9, 21, 12), (30, 5, 19)]):
        start = 0
        for doc, n in enumerate(lengths):
            ids[b, start : start + n] = doc
            start += n
    targets = ((ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)).astype(np.int32)
    tokens[ids < 0] = 0
    return mx.array(tokens), mx.array(ids), mx.array(targets)


def whole_row_loss(model, tokens, ids, targets):
    if ids is None:
        logits = model(tokens[:, :-1])
    else:
        with mlx_flash.segments(ids[:, :-1]):
            logits = model(tokens[:, :-1])
    counted = targets.astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:]) * counted
    return ce.sum() / counted.sum(), counted.sum()


CASES = {
    "llama_packed": dict(kind="llama", packed=True),
    "llama_window_packed": dict(kind="llama", packed=True, window=7),
    "llama_window": dict(kind="llama", packed=False, window=11),
    "qwen2_causal_checkpointed": dict(kind="qwen2", packed=False, checkpoint=True),
}


def main(out: Path, cp: int = 0, names=()):
    world = mx.distributed.init()
    grid = context.grid(cp or world.size(), world)
    results = {}
    for name, case in CASES.items():
        if names and name not in names:
            continue
        model = tiny(case["kind"], case.get("window"))
        batch = row(case["packed"])
        # Each data-parallel shard takes its own rows; one process's answer
        # is then the mean over shards of each shard's loss and gradients.
        shards = [tuple(None if x is None else x[d :: grid.dp] for x in batch) for d in range(grid.dp)]
        with mlx_flash.patched("manual"):
            parts = [nn.value_and_grad(model, whole_row_loss)(model, *shard) for shard in shards]
        loss = sum(p[0][0] for p in parts) / grid.dp
        grads = tree_map(lambda *g: sum(g) / grid.dp, *[p[1] for p in parts])
        batch = shards[grid.dp_index]
        results[f"{name}/single/loss"] = np.array(loss)
        results.update({f"{name}/single/{k}": np.array(v) for k, v in tree_flatten(grads)})

        if case.get("checkpoint"):
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(model.layers[0])
        with mlx_flash.patched("blockwise"):
            (loss, count), grads = nn.value_and_grad(model, context.training_loss(grid))(model, *batch)
            grads = nn.average_gradients(grads)
            loss = mx.distributed.all_sum(loss, stream=mx.cpu) / world.size()
            count = mx.distributed.all_sum(count, stream=mx.cpu)
            val_loss, val_count = context.evaluation_loss(grid)(model, *batch)
            val = mx.distributed.all_sum(val_loss * val_count, stream=mx.cpu) / mx.distributed.all_sum(val_count, stream=mx.cpu)
        results[f"{name}/cp/loss"] = np.array(loss)
        results[f"{name}/cp/count"] = np.array(count)
        results[f"{name}/cp/val_loss"] = np.array(val)
        results.update({f"{name}/cp/{k}": np.array(v) for k, v in tree_flatten(grads)})
        print(f"rank {world.rank()}: {name} done", flush=True)
    np.savez(out / f"rank{world.rank()}.npz", **results)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0, sys.argv[3:])
