"""Context parallelism against one process: per-rank memory, speed, traffic.

    python -m mlx_flash.bench.context                       # 2 ranks, L = 16384, Qwen2.5-1.5B shape, 2 layers
    python -m mlx_flash.bench.context --ranks 2 --length 8192 --layers 1 --out cp.json

One LoRA training step (forward and backward, gradient checkpointing per
layer, float32) on one packed row of ``--length`` tokens, first in one
process on the whole row, then under ``mlx.launch -n RANKS --backend ring``
on localhost with every rank holding a slice of the row
(``mlx_flash.context``). The two runs are separate processes, one after the
other, so their memory never overlaps. Reported per rank: peak MLX memory
above the weights (``mx.get_peak_memory()`` during the step minus the
active memory before it), tokens per second, the loss against the single
process's, and the bytes one rank sends per attention layer
(``context.traffic``). Targets (PASS/FAIL): per-rank peak above weights at
most 0.6x the single process's, loss equal within 1e-5 relative.

The model is Qwen2.5-1.5B's shape (hidden 1536, MLP 8960, 12 query heads,
2 KV heads of 128, q/k/v bias) with fewer layers and a small vocabulary
(``--vocab``; the real 151,936 would make the loss's logits the story).
Weights are random; no download. On a shared machine the times carry the
load; the memory does not.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

#: The attention and MLP geometry of Qwen2.5-1.5B.
QWEN2_5_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2)
#: A tiny geometry for checking the script itself.
TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
SHAPES = {"qwen2.5-1.5b": QWEN2_5_1_5B, "tiny": TINY}

MEMORY_TARGET = 0.6
LOSS_TARGET = 1e-5


def build(shape: str, layers: int, vocab: int):
    """A random Qwen2 model of ``shape`` with LoRA on q and v (mlx-lm's
    defaults), float32, every rank the same."""
    from mlx_lm.models import qwen2
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    args = qwen2.ModelArgs(
        model_type="qwen2", num_hidden_layers=layers, vocab_size=vocab, rms_norm_eps=1e-6,
        rope_theta=1e6, tie_word_embeddings=True, **SHAPES[shape],
    )  # fmt: skip
    model = qwen2.Model(args)
    model.freeze()
    linear_to_lora_layers(model, layers, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    mx.eval(model.parameters())
    return model


def packed_row(length: int, vocab: int, doc_length: int):
    """One packed row ``(tokens, ids, targets)`` of ``length + 1`` tokens:
    documents of 0.5x to 1.5x ``doc_length`` tokens end to end."""
    rng = np.random.RandomState(1)
    ids = np.empty(length + 1, np.int32)
    start, doc = 0, 0
    while start < ids.size:
        n = int(rng.randint(doc_length // 2, doc_length * 3 // 2 + 1))
        ids[start : start + n] = doc
        start, doc = start + n, doc + 1
    tokens = rng.randint(1, vocab, size=ids.size).astype(np.int32)
    targets = (ids[1:] == ids[:-1]).astype(np.int32)
    return mx.array(tokens[None]), mx.array(ids[None]), mx.array(targets[None])


def _whole_row_loss(model, tokens, ids, targets):
    from ..documents import segments

    with segments(ids[:, :-1]):
        logits = model(tokens[:, :-1])
    counted = targets.astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:]).astype(mx.float32) * counted
    return ce.sum() / counted.sum(), targets.sum()


def measure(args, ranks: int) -> dict:
    """One step in this process (``ranks == 1``: the whole row; else this
    rank's slice): loss, tokens/s, weights and peak memory in bytes."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    from .. import context
    from ..patch import patched

    model = build(args.shape, args.layers, args.vocab)
    batch = packed_row(args.length, args.vocab, args.doc_length)
    if args.checkpoint:
        grad_checkpoint(model.layers[0])
    if ranks == 1:
        loss_fn = _whole_row_loss
    else:
        grid = context.grid(ranks)
        loss_fn = context.training_loss(grid)
    mx.eval(batch)
    weights = mx.get_active_memory()
    mx.reset_peak_memory()
    with patched(args.variant):
        tic = time.perf_counter()
        (loss, _), grads = nn.value_and_grad(model, loss_fn)(model, *batch)
        if ranks > 1:
            grads = nn.average_gradients(grads)
        mx.eval(loss, grads)
        wall = time.perf_counter() - tic
    peak = mx.get_peak_memory()
    if ranks > 1:
        loss = mx.distributed.all_sum(loss, stream=mx.cpu) / ranks
    return {
        "loss": loss.item(),
        "wall_s": wall,
        "tokens_per_s": args.length / wall,
        "weights_bytes": int(weights),
        "peak_bytes": int(peak),
        "above_weights_bytes": int(peak - weights),
    }


def _role_main(args) -> int:
    if args.role == "single":
        result = measure(args, 1)
        Path(args.json).write_text(json.dumps(result))
    else:
        world = mx.distributed.init()
        result = measure(args, world.size())
        Path(args.json, f"rank{world.rank()}.json").write_text(json.dumps(result))
    return 0


def _passthrough(args) -> list:
    flags = ["--shape", args.shape, "--length", str(args.length), "--layers", str(args.layers),
             "--vocab", str(args.vocab), "--doc-length", str(args.doc_length), "--variant", args.variant]  # fmt: skip
    return flags + ([] if args.checkpoint else ["--no-checkpoint"])


def run(args) -> dict:
    """Both measurements, in separate processes, and the comparison."""
    work = Path(tempfile.mkdtemp(prefix="mlx_flash_cp_"))
    me = [sys.executable, "-m", "mlx_flash.bench.context", *_passthrough(args)]
    print(f"single process: one step on {args.length} tokens ...", file=sys.stderr, flush=True)
    single_json = work / "single.json"
    subprocess.run([*me, "--role", "single", "--json", str(single_json)], check=True)
    single = json.loads(single_json.read_text())
    print(f"{args.ranks} ranks (mlx.launch, ring, localhost): one step ...", file=sys.stderr, flush=True)
    launcher = Path(sys.executable).parent / "mlx.launch"
    done = subprocess.run(
        [str(launcher), "-n", str(args.ranks), "--backend", "ring", "--", *me, "--role", "rank", "--json", str(work)],
        capture_output=True, text=True,
    )  # fmt: skip
    ranks = []
    for r in range(args.ranks):
        path = work / f"rank{r}.json"
        if not path.exists():
            raise SystemExit(f"mlx_flash.bench.context: rank {r} wrote no result:\n{done.stderr[-2000:]}")
        ranks.append(json.loads(path.read_text()))
    from ..context import traffic

    shape = SHAPES[args.shape]
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    moved = traffic(args.ranks, 1, args.length, shape["num_key_value_heads"], 2 * head_dim, 4)
    worst = max(r["above_weights_bytes"] for r in ranks)
    ratio = worst / single["above_weights_bytes"]
    loss_gap = abs(ranks[0]["loss"] - single["loss"]) / abs(single["loss"])
    return {
        "shape": args.shape, "layers": args.layers, "vocab": args.vocab, "length": args.length,
        "doc_length": args.doc_length, "variant": args.variant, "checkpoint": args.checkpoint,
        "ranks": args.ranks, "single": single, "per_rank": ranks,
        "memory_ratio": ratio, "loss_relative_difference": loss_gap,
        "step_time_ratio": max(r["wall_s"] for r in ranks) / single["wall_s"],
        "bytes_per_layer_per_rank": moved,
        "targets": {
            "memory": {"value": ratio, "target": MEMORY_TARGET, "pass": ratio <= MEMORY_TARGET},
            "loss": {"value": loss_gap, "target": LOSS_TARGET, "pass": loss_gap <= LOSS_TARGET},
        },
    }  # fmt: skip


def render(result: dict) -> str:
    mib = 2**20
    s = result["single"]
    lines = [
        f"{result['shape']} x {result['layers']} layers, vocab {result['vocab']}, one packed row of "
        f"{result['length']} tokens (documents of ~{result['doc_length']}), float32, {result['variant']}, "
        f"checkpointing {'on' if result['checkpoint'] else 'off'}",
        "",
        "| run | loss | step s | tokens/s | weights MiB | peak above weights MiB |",
        "|---|---|---|---|---|---|",
        f"| 1 process | {s['loss']:.6f} | {s['wall_s']:.1f} | {s['tokens_per_s']:.0f} | "
        f"{s['weights_bytes'] / mib:.0f} | {s['above_weights_bytes'] / mib:.0f} |",
    ]
    for r, x in enumerate(result["per_rank"]):
        lines.append(
            f"| rank {r} of {result['ranks']} | {x['loss']:.6f} | {x['wall_s']:.1f} | "
            f"{result['length'] / x['wall_s']:.0f} (row) | {x['weights_bytes'] / mib:.0f} | {x['above_weights_bytes'] / mib:.0f} |"
        )
    moved = result["bytes_per_layer_per_rank"]
    lines += [
        "",
        f"sent per attention layer per rank: forward all-gather {moved['forward_bytes'] / mib:.1f} MiB, "
        f"backward all-sum {moved['backward_bytes'] / mib:.1f} MiB (as many received; checkpointing repeats the gather)",
        f"step time {result['step_time_ratio']:.2f}x the single process's (ranks share this machine's cores)",
    ]
    for name, t in result["targets"].items():
        verdict = "PASS" if t["pass"] else "FAIL"
        lines.append(f"{verdict} {name}: {t['value']:.3g} (target at most {t['target']})")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.bench.context",
        description="One LoRA step on a packed row: one process against context-parallel ranks "
        "(mlx.launch, ring backend, localhost): per-rank memory, tokens/s, loss, bytes moved.",
    )
    p.add_argument("--ranks", type=int, default=2, help="context-parallel ranks (default 2)")
    p.add_argument("--length", type=int, default=16384, help="tokens in the row (default 16384)")
    p.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default 4096)")
    p.add_argument("--doc-length", type=int, default=1024, help="mean document length in the packed row (default 1024)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b", help="model geometry")
    p.add_argument("--variant", default="blockwise", help="attention variant (default blockwise)")
    p.add_argument("--no-checkpoint", dest="checkpoint", action="store_false", help="no gradient checkpointing")
    p.add_argument("--out", help="also write the result as JSON here")
    p.add_argument("--role", choices=("single", "rank"), help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key in ("ranks", "length", "layers", "vocab", "doc_length"):
        if getattr(args, key) < (2 if key == "ranks" else 1):
            p.error(f"--{key.replace('_', '-')}: must be at least {2 if key == 'ranks' else 1}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.role:
        return _role_main(args)
    result = run(args)
    print(render(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
