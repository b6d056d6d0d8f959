"""One LoRA training step's peak memory, measured: the data the planner is fitted to.

    python -m mlx_flash.plan.measure qwen2.5-1.5b --layers 2 --seq 1024 --mode stock
    python -m mlx_flash.plan.measure --grid small --out bench/linux-cpu-plan/results.json

A cell builds an mlx-lm model from a shipped config with random weights
(``--layers`` of them, optionally ``--vocab`` replacing the vocabulary so
the layers' share can be measured apart from the loss's), adds LoRA of rank
8 on every linear layer with mlx-lm's ``linear_to_lora_layers``, and runs
one packed row of ``--documents`` equal documents through one step
(forward, backward, Adam update). The peak is ``mx.get_peak_memory()``
during the step, and ``peak_above_weights_bytes`` is that peak minus the
frozen weights as stored (LoRA parameters, their gradients and the
optimizer's state count above the weights).

Modes measured here (the ``bench --step`` cell names):

- ``stock``: mlx-lm's ``default_loss`` (full logits), MLX's attention with
  the dense document mask (``mlx_flash.patched("mlx")`` and
  ``mlx_flash.segments``), no checkpointing.
- ``stock+ckpt``: the same with mlx-lm's ``grad_checkpoint`` on every layer
  (its recompute runs after the loss has left ``segments``, so it attends
  with mlx-lm's causal mask: the same ``L x L`` scores on MLX's unfused
  path, without the boolean document mask).
- ``fused``: mlx-flash's attention (``patched("auto")``: blockwise where
  Metal is absent) with the same full-logit loss.
- ``fused+loss``: + mlx_flash.losses' ``chunked_loss`` (no ``(L, V)`` logits).
- ``all``: + mlx_flash.step's ``bound_activations`` (ordered per-layer
  checkpointing, the MLP in chunks of tokens).

Each cell runs in its own process so that one cell's cache and peak never
touch the next's; the grid prints one line per cell as it goes.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MODES = ("stock", "stock+ckpt", "fused")
#: Modes that need mlx_flash.losses (``fused+loss``) and mlx_flash.step (``all``).
FLASH_MODES = ("fused+loss", "all")


def run_cell(name, layers, seq, mode, batch=1, documents=8, vocab=None, bits=None, rank=8) -> dict:
    """Measure one cell in this process; returns the cell's record."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint

    from .. import lora_step
    from ..documents import segments
    from ..patch import patched
    from .models import shipped_config

    config = dict(shipped_config(name))
    config.pop("quantization", None)
    model = lora_step.build(config, layers, seed=0, vocab=vocab,
                            quantization={"group_size": 64, "bits": bits} if bits else None)
    weights = lora_step.add_lora(model, layers, rank)
    if mode == "stock+ckpt":
        grad_checkpoint(model.layers[0])
    loss = default_loss
    if mode in FLASH_MODES:
        from ..losses import chunked_loss as loss
    if mode == "all":
        from ..step import bound_activations

        bound_activations(model, checkpoint=True, chunk_tokens="auto")

    vocab_size = model.args.vocab_size
    tokens = mx.random.randint(0, vocab_size, (batch, seq + 1))
    ids = mx.repeat(mx.arange(documents), -(-(seq + 1) // documents))[None, : seq + 1]
    ids = mx.broadcast_to(ids, (batch, seq + 1))
    lengths = mx.array([[1, seq]] * batch)
    variant = "mlx" if mode.startswith("stock") else "auto"

    def loss_fn(model, tokens, ids, lengths):
        with segments(ids[:, :-1]):
            return loss(model, tokens, lengths)

    optimizer = optim.Adam(learning_rate=1e-5)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    value, wall, peak = lora_step.timed_step(model, loss_and_grad, optimizer, (tokens, ids, lengths),
                                             [patched(variant)])
    return {
        "model": name,
        "layers": layers,
        "seq_len": seq,
        "batch": batch,
        "dtype": "float32",
        "quantized_bits": bits,
        "lora_rank": rank,
        "documents": documents,
        "vocab_size": vocab_size,
        "mode": mode,
        "peak_above_weights_bytes": int(peak - weights),
        "weights_bytes": int(weights),
        "tokens_per_s": batch * seq / wall,
        "loss": value.item(),
    }


#: The cells committed under bench/linux-cpu-plan: real-vocabulary cells
#: (where the loss dominates) and reduced-vocabulary cells (where the layers
#: and attention do), at two layer counts for the per-layer slope.
GRIDS = {
    "small": (
        [("qwen2.5-1.5b", 2, L, m, None, None) for m in MODES for L in (256, 512)]
        + [("qwen2.5-1.5b", n, 1024, m, 1024, None) for m in MODES for n in (2, 4)]
        + [("qwen2.5-1.5b", 2, 2048, m, 1024, None) for m in MODES]
        + [("tinyllama-1.1b", 2, 512, m, None, None) for m in MODES]
        + [("qwen3-8b", 2, 512, m, 1024, 4) for m in MODES]
        + [("llama-3.2-1b", 2, 512, m, None, None) for m in MODES]
    ),
}
#: mlx-flash's logit-free loss and bounded activations at the same shapes.
GRIDS["flash"] = (
    [("qwen2.5-1.5b", 2, L, m, None, None) for m in FLASH_MODES for L in (256, 512)]
    + [("qwen2.5-1.5b", n, 1024, m, 1024, None) for m in FLASH_MODES for n in (2, 4)]
    + [("qwen2.5-1.5b", 2, 2048, m, 1024, None) for m in FLASH_MODES]
    + [("tinyllama-1.1b", 2, 512, m, None, None) for m in FLASH_MODES]
    + [("qwen3-8b", 2, 512, "all", 1024, 4)]
)
#: The same cells from the other end, for a second process sharing the work.
for _name in list(GRIDS):
    GRIDS[f"{_name}-reversed"] = tuple(reversed([c for c in GRIDS[_name] if c[0] != "qwen3-8b"]))


def _cell_args(cell):
    name, layers, seq, mode, vocab, bits = cell
    args = [name, "--layers", str(layers), "--seq", str(seq), "--mode", mode]
    if vocab:
        args += ["--vocab", str(vocab)]
    if bits:
        args += ["--bits", str(bits)]
    return args


def run_grid(grid: str, out: Path) -> None:
    from ..machine import describe

    cells = []
    if out.exists():
        cells = json.loads(out.read_text()).get("cells", [])
    done = {(c["model"], c["layers"], c["seq_len"], c["mode"], c.get("vocab_override"), c["quantized_bits"]) for c in cells}
    todo = [c for c in GRIDS[grid] if c not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, cell in enumerate(todo, 1):
        cmd = [sys.executable, "-m", "mlx_flash.plan.measure", *_cell_args(cell), "--json"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"[{i}/{len(todo)}] {cell}: failed: {result.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        record = json.loads(result.stdout.strip().splitlines()[-1])
        record["vocab_override"] = cell[4]
        cells.append(record)
        print(
            f"[{i}/{len(todo)}] {cell[0]} layers={cell[1]} L={cell[2]} {cell[3]} vocab={record['vocab_size']} "
            f"bits={cell[5]}: {record['peak_above_weights_bytes'] / 2**20:.1f} MiB above weights",
            flush=True,
        )
        machine = describe()
        machine["load_average"] = list(os.getloadavg())
        out.write_text(json.dumps({"machine": machine, "cells": cells}, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_flash.plan.measure",
        description="Measure one LoRA step's peak memory above the weights (one cell, or a grid of cells).",
    )
    parser.add_argument("model", nargs="?", help="A shipped config name (mlx_flash/configs).")
    parser.add_argument("--layers", type=int, default=2, help="Layers to build (default 2).")
    parser.add_argument("--seq", type=int, default=1024, help="Tokens per row (default 1024).")
    parser.add_argument("--mode", choices=MODES + FLASH_MODES, default="stock", help="What runs the step.")
    parser.add_argument("--vocab", type=int, help="Replace the vocabulary size (isolates the layers).")
    parser.add_argument("--bits", type=int, help="Quantize the base weights to this many bits.")
    parser.add_argument("--json", action="store_true", help="Print the cell as one JSON line.")
    parser.add_argument("--grid", choices=sorted(GRIDS), help="Run a grid of cells, one process each.")
    parser.add_argument("--out", type=Path, help="With --grid: the results.json to extend.")
    args = parser.parse_args(argv)
    if args.grid:
        if not args.out:
            parser.error("--grid needs --out")
        run_grid(args.grid, args.out)
        return 0
    if not args.model:
        parser.error("name a model or a --grid")
    record = run_cell(args.model, args.layers, args.seq, args.mode, vocab=args.vocab, bits=args.bits)
    print(json.dumps(record) if args.json else record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
