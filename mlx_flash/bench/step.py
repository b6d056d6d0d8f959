"""``python -m mlx_flash.bench --step``: one LoRA training step at real model shapes.

    python -m mlx_flash.bench --step --model qwen2.5-1.5b --layers 2 4 --seq 4096 8192
    python -m mlx_flash.bench --step --model tinyllama-1.1b --layers 2 --seq 1024 --modes stock all
    python -m mlx_flash.bench --step --render bench/linux-cpu-step/results.json

A cell builds an mlx-lm model from a shipped config (``mlx_flash/configs/
<name>.json``; random weights, ``--layers`` of them, 4-bit weights where the
config says ``quantization``), puts LoRA of rank 8 on every linear layer of
every layer with mlx-lm's ``linear_to_lora_layers``, and runs one step
(forward, backward, Adam update, evaluated) on one packed row of
``--documents`` equal documents. Modes:

- ``stock``: mlx-lm's ``default_loss`` (full logits), MLX's attention with the
  dense document mask (``patched("mlx")`` inside ``segments``), no
  checkpointing;
- ``stock+ckpt``: the same with mlx-lm's ``grad_checkpoint`` on every layer
  (the step runs inside ``segments`` too, so its recompute keeps the
  documents: a checkpoint's recompute runs after the loss has returned);
- ``fused``: mlx-flash's attention (``patched("auto")``: the blockwise path
  where Metal is absent) with the full-logit loss;
- ``fused+loss``: and the logit-free loss (``mlx_flash.losses.chunked_loss``);
- ``all``: and bounded activations (``mlx_flash.bound_activations``:
  ordered per-layer checkpoints and token-chunked MLPs).

Each cell runs in its own process (its peak never sees another's) under an
address-space limit of ``--max-memory-gb`` above the weights, so a cell that
does not fit fails alone instead of swapping the machine. Peak memory is
``mx.get_peak_memory()`` over the step minus the frozen weights; tokens/s is
``B * L`` over the step's wall time (one step, no warm-up: a long row takes
minutes). Every cell's loss is checked against ``stock`` at the same model,
layers, length and seed; where ``stock`` did not fit, against ``fused``, and
where that did not fit either, against ``fused+loss``; the cell says which.

From two layer counts of the same (model, L, mode) the per-layer slope
``(peak(n2) - peak(n1)) / (n2 - n1)`` gives the full-depth figure
``peak(n1) + (N - n1) * slope``, written as an extrapolation.
"""

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

MODES = ("stock", "stock+ckpt", "fused", "fused+loss", "all")

#: Loss agreement between modes: float32 sums over different attention and
#: loss implementations.
LOSS_RTOL = 1e-4

#: The default budget of one cell (GiB above the weights).
DEFAULT_BUDGET_GB = 14.0

#: Address space a process maps beyond its arrays (libraries, allocator
#: slack), added to the budget for the limit.
_SLACK_BYTES = 3 << 30

#: The targets' model, lengths and slack.
TARGET_MODEL = "qwen2.5-1.5b"
TARGET_SEQS = (4096, 8192, 16384)
FLOOR_FACTOR = 1.3
STOCK_FACTOR = 5.0
TIME_FACTOR = 1.4

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def shipped_configs() -> List[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def shipped_config(name: str) -> dict:
    """The config of a shipped model name, or of a ``config.json`` path."""
    path = Path(name) if name.endswith(".json") else CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"--model: no shipped config '{name}' (have {', '.join(shipped_configs())}, "
                         "or give a config.json path)")
    with open(path) as f:
        return json.load(f)


def build(name: str, layers: int, seed: int = 0, vocab: Optional[int] = None):
    """An mlx-lm model of the shipped config ``name`` with ``layers`` layers
    and random weights (quantized as the config says), and its bits."""
    from ..lora_step import build as build_model

    config = dict(shipped_config(name))
    quantization = config.pop("quantization", None)
    model = build_model(config, layers, seed, vocab, quantization)
    return model, quantization["bits"] if quantization else None


def run_cell(name: str, layers: int, seq: int, mode: str, batch: int = 1, documents: int = 8, rank: int = 8,
             seed: int = 0, chunk_tokens="auto", vocab: Optional[int] = None) -> dict:
    """One step of one cell in this process; the cell's record."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint

    from .. import lora_step
    from ..documents import segments
    from ..losses import chunked_loss
    from ..patch import patched
    from ..step import bound_activations

    if mode not in MODES:
        raise ValueError(f"--modes: unknown mode '{mode}' (from {', '.join(MODES)})")
    model, bits = build(name, layers, seed, vocab)
    weights = lora_step.add_lora(model, layers, rank)
    if mode == "stock+ckpt":
        grad_checkpoint(model.layers[0])
    if mode == "all":
        bound_activations(model, checkpoint=True, chunk_tokens=chunk_tokens)

    vocab_size = model.args.vocab_size
    mx.random.seed(seed + 1)
    tokens = mx.random.randint(0, vocab_size, (batch, seq + 1))
    per_doc = -(-seq // documents)
    ids = mx.broadcast_to(mx.repeat(mx.arange(documents), per_doc)[None, :seq], (batch, seq))
    lengths = mx.array([[1, seq]] * batch)
    loss = chunked_loss if mode in ("fused+loss", "all") else default_loss

    def loss_fn(model, tokens, ids, lengths):
        with segments(ids):
            return loss(model, tokens, lengths)

    optimizer = optim.Adam(learning_rate=1e-5)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    contexts = [patched("mlx" if mode.startswith("stock") else "auto")]
    if mode == "stock+ckpt":
        # mlx-lm's checkpoint recomputes after the loss has left segments():
        # held around the whole step, the recompute sees the documents too.
        contexts.append(segments(ids))
    value, wall, peak = lora_step.timed_step(model, loss_and_grad, optimizer, (tokens, ids, lengths), contexts)
    args = model.args
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
        "hidden_size": args.hidden_size,
        "intermediate_size": getattr(args, "intermediate_size", None),
        "mode": mode,
        "chunk_tokens": chunk_tokens if mode == "all" else None,
        "seed": seed,
        "peak_above_weights_bytes": int(peak - weights),
        "weights_bytes": int(weights),
        "seconds": round(wall, 3),
        "tokens_per_s": batch * seq / wall,
        "loss": value.item(),
    }


def reference_loss(name: str, layers: int, seq: int, batch: int = 1, documents: int = 8, rank: int = 8,
                   seed: int = 0, vocab: Optional[int] = None, attention: str = "mlx") -> float:
    """The loss of a cell's step from a forward pass alone, for lengths where
    no stock step fits: the same weights, LoRA and row, MLX's attention with
    the dense document mask (stock's), and the logit-free loss (exact against
    full logits, and ``O(L)``). Nothing is differentiated, so nothing is kept
    between layers. ``attention="auto"``: mlx-flash's fused attention
    instead, where the dense mask's ``L x L`` scores would not fit."""
    import mlx.core as mx

    from ..documents import segments
    from ..losses import chunked_loss
    from ..lora_step import add_lora
    from ..patch import patched

    model, _ = build(name, layers, seed, vocab)
    add_lora(model, layers, rank)
    mx.random.seed(seed + 1)
    tokens = mx.random.randint(0, model.args.vocab_size, (batch, seq + 1))
    per_doc = -(-seq // documents)
    ids = mx.broadcast_to(mx.repeat(mx.arange(documents), per_doc)[None, :seq], (batch, seq))
    lengths = mx.array([[1, seq]] * batch)
    with patched(attention), segments(ids):
        value, _ = chunked_loss(model, tokens, lengths)
        return value.item()


def _limit(budget_bytes: int):
    def apply():
        limit = budget_bytes + _SLACK_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_isolated(spec: dict, budget_bytes: int) -> dict:
    """``run_cell(**spec)`` in a child process under the memory budget; a
    cell that fails records why (``status``: ``ok`` or ``did not fit`` or
    ``error``)."""
    weights_guess = 0
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "mlx_flash.bench.step", "--cell", json.dumps(spec)]
    load = [round(x, 1) for x in os.getloadavg()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          preexec_fn=_limit(budget_bytes + weights_guess))
    for line in proc.stdout.splitlines():
        if line.startswith("CELL "):
            cell = json.loads(line[5:])
            cell["status"] = "ok"
            cell["load_average"] = {"start": load, "end": [round(x, 1) for x in os.getloadavg()]}
            return cell
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    memory = any(s in proc.stderr for s in ("bad_alloc", "MemoryError", "Unable to allocate", "memory"))
    cell = dict(spec)
    cell["status"] = "did not fit" if memory or proc.returncode in (-9, 137) else "error"
    cell["detail"] = tail[-300:]
    return cell


def _key(cell) -> tuple:
    return cell["model"], cell["layers"], cell["seq_len"], cell["batch"], cell.get("seed", 0)


def check_losses(cells: List[dict]) -> None:
    """Set ``loss_matches_stock`` and ``checked_against`` on every measured
    cell (see the module docstring)."""
    measured = [c for c in cells if c.get("status") == "ok"]
    by_key: Dict[tuple, Dict[str, dict]] = {}
    for c in measured:
        by_key.setdefault(_key(c), {})[c["mode"]] = c
    for c in measured:
        ref = None
        for mode in ("stock", "fused", "fused+loss"):
            ref = by_key[_key(c)].get(mode)
            if ref is not None:
                break
        if ref is None or ref is c and c["mode"] != "stock":
            forward = c.get("reference_forward_loss")
            how = "dense document mask" if c.get("reference_forward_attention", "mlx") == "mlx" else "fused attention"
            c["checked_against"] = f"forward only ({how}, logit-free loss)" if forward is not None else None
            c["loss_matches_stock"] = None
            if forward is not None:
                c["loss_matches_reference"] = bool(abs(c["loss"] - forward) <= LOSS_RTOL * abs(forward))
            continue
        c["checked_against"] = ref["mode"]
        ok = abs(c["loss"] - ref["loss"]) <= LOSS_RTOL * abs(ref["loss"])
        c["loss_matches_stock"] = bool(ok) if ref["mode"] == "stock" else None
        c["loss_matches_reference"] = bool(ok)


def hidden_bytes(cell: dict) -> int:
    """``B x L x hidden x 4``: one layer's saved input."""
    return cell["batch"] * cell["seq_len"] * cell["hidden_size"] * 4


def working_set_bytes(cell: dict) -> int:
    """One layer's working set with everything on, from the shapes alone.

    The full-length arrays a layer's backward must hold at once (float32,
    per token): ``q``, ``k``, ``v`` and their gradients, the attention
    output and its gradient, the normed input the projections' LoRA
    gradients need, and the incoming cotangent: ``2 (q + 2 kv) + 4 hidden``
    values; one MLP chunk: gate and up projections and their gradients,
    ``4 chunk x intermediate``; the loss: its saved ``hidden``-wide gradient
    direction per token and four ``512 x 8192`` logit tiles.
    """
    from ..step import chunk_size

    config = shipped_config(cell["model"])
    hidden = cell["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    tokens = cell["batch"] * cell["seq_len"]
    layer = tokens * (2 * (heads * head_dim + 2 * kv) + 4 * hidden) * 4
    chunk = chunk_size(cell.get("chunk_tokens") or "auto", cell["seq_len"], hidden, cell["intermediate_size"],
                       cell["batch"])
    mlp = cell["batch"] * chunk * 4 * cell["intermediate_size"] * 4
    loss = tokens * hidden * 4 + 4 * 512 * 8192 * 4
    return layer + mlp + loss


def lora_bytes_per_layer(cell: dict) -> int:
    """Float32 bytes of one layer's LoRA parameters (rank ``r`` on q, k, v,
    o, gate, up and down: ``r x (in + out)`` each)."""
    config = shipped_config(cell["model"])
    hidden, inter = cell["hidden_size"], cell["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, config.get("num_key_value_heads", heads) * head_dim
    widths = (hidden + q) * 2 + (hidden + kv) * 2 + (hidden + inter) * 3
    return cell.get("lora_rank", 8) * widths * 4


def extrapolate(cells: List[dict]) -> List[dict]:
    """Full-depth figures of each (model, L, batch, mode).

    From two layer counts: the slope ``(peak(n2) - peak(n1)) / (n2 - n1)``
    and the linear extrapolation ``peak(n1) + (N - n1) x slope``. A bounded
    step's peak can come from a point where the upper layers' inputs are
    already freed, so its slope can be below what a layer must keep (its
    saved input, its LoRA parameters and their gradient); the upper figure
    takes, per layer, the larger of the slope and that. From one layer
    count only the upper figure is given.
    """
    groups: Dict[tuple, List[dict]] = {}
    for c in cells:
        if c.get("status") == "ok":
            groups.setdefault((c["model"], c["seq_len"], c["batch"], c["mode"]), []).append(c)
    out = []
    for (model, seq, batch, mode), group in sorted(groups.items()):
        group = sorted(group, key=lambda c: c["layers"])
        low, high = group[0], group[-1]
        depth = shipped_config(model)["num_hidden_layers"]
        kept = hidden_bytes(low) + 2 * lora_bytes_per_layer(low)
        slope = None
        if high["layers"] != low["layers"]:
            slope = (high["peak_above_weights_bytes"] - low["peak_above_weights_bytes"]) / (high["layers"] - low["layers"])
        record = {
            "model": model, "seq_len": seq, "batch": batch, "mode": mode,
            "from_layers": sorted({c["layers"] for c in group}),
            "per_layer_bytes": None if slope is None else int(slope),
            "saved_input_bytes": hidden_bytes(low),
            "kept_per_layer_bytes": kept,
            "full_depth_layers": depth,
            "full_depth_peak_bytes_extrapolated": None if slope is None
            else int(low["peak_above_weights_bytes"] + (depth - low["layers"]) * slope),
            "full_depth_peak_bytes_upper": int(low["peak_above_weights_bytes"]
                                               + (depth - low["layers"]) * max(slope or 0, kept)),
            "working_set_bytes": working_set_bytes(low) if mode == "all" else None,
        }
        out.append(record)
    return out


def evaluate_targets(cells: List[dict], extrapolations: List[dict]) -> List[dict]:
    """The declared targets, PASS / FAIL / NOT MEASURED, with their numbers."""
    gib = 2**30
    results = []
    ext = {(e["seq_len"], e["mode"]): e for e in extrapolations if e["model"] == TARGET_MODEL and e["batch"] == 1}
    for seq in TARGET_SEQS:
        name = f"{TARGET_MODEL} all, L={seq}: full-depth peak <= {FLOOR_FACTOR}x (floor + one working set)"
        e = ext.get((seq, "all"))
        if e is None:
            results.append({"name": name, "status": "NOT MEASURED", "detail": "`all` not measured at this length"})
            continue
        floor = e["full_depth_layers"] * e["saved_input_bytes"]
        bound = FLOOR_FACTOR * (floor + e["working_set_bytes"])
        peak = e["full_depth_peak_bytes_upper"]
        linear = e["full_depth_peak_bytes_extrapolated"]
        slope = "one layer count, no slope" if e["per_layer_bytes"] is None else (
            f"linear extrapolation {linear / gib:.2f} GiB, slope {e['per_layer_bytes'] / 2**20:.0f} MiB per layer")
        results.append({
            "name": name,
            "status": "PASS" if peak <= bound else "FAIL",
            "detail": f"upper extrapolation to {e['full_depth_layers']} layers {peak / gib:.2f} GiB from layers "
            f"{e['from_layers']} ({slope}; a layer keeps {e['kept_per_layer_bytes'] / 2**20:.0f} MiB); "
            f"bound {bound / gib:.2f} GiB = {FLOOR_FACTOR} x ({floor / gib:.2f} floor + "
            f"{e['working_set_bytes'] / gib:.2f} working set)",
        })
    for seq in TARGET_SEQS:
        name = f"{TARGET_MODEL} stock at L={seq} needs >= {STOCK_FACTOR}x `all` (full depth)"
        a, s = ext.get((seq, "all")), ext.get((seq, "stock"))
        if a is None:
            results.append({"name": name, "status": "NOT MEASURED", "detail": "`all` not measured at this length"})
            continue
        if s is not None:
            # stock keeps every layer's activations: its slope is what a
            # layer costs; the lower of its two figures against the upper
            # of all's is the cautious ratio.
            stock = min(x for x in (s["full_depth_peak_bytes_extrapolated"], s["full_depth_peak_bytes_upper"])
                        if x is not None)
            ratio = stock / a["full_depth_peak_bytes_upper"]
            results.append({"name": name, "status": "PASS" if ratio >= STOCK_FACTOR else "FAIL",
                            "detail": f"stock {stock / gib:.2f} GiB vs all {a['full_depth_peak_bytes_upper'] / gib:.2f} "
                            f"GiB at {a['full_depth_layers']} layers (both extrapolated): {ratio:.1f}x"})
            continue
        unfit = [c for c in cells if c["model"] == TARGET_MODEL and c["seq_len"] == seq and c["mode"] == "stock"
                 and c.get("status") == "did not fit"]
        if unfit:
            budget = min(c.get("budget_bytes", 0) for c in unfit)
            ratio = budget / a["full_depth_peak_bytes_upper"]
            results.append({"name": name, "status": "PASS" if ratio >= STOCK_FACTOR else "NOT MEASURED",
                            "detail": f"stock did not fit {budget / gib:.0f} GiB at {min(c['layers'] for c in unfit)} "
                            f"layers; all at full depth {a['full_depth_peak_bytes_upper'] / gib:.2f} GiB "
                            f"(extrapolated): at least {ratio:.1f}x"})
        else:
            # A stock step holds more at a longer row (its logits, scores and
            # activations all grow with L), so stock measured at a shorter
            # row is a lower bound of stock at this one.
            shorter = [c for c in cells if c["model"] == TARGET_MODEL and c["mode"] == "stock"
                       and c.get("status") == "ok" and c["seq_len"] < seq and c["batch"] == 1]
            if shorter:
                best = max(shorter, key=lambda c: c["peak_above_weights_bytes"])
                ratio = best["peak_above_weights_bytes"] / a["full_depth_peak_bytes_upper"]
                results.append({"name": name, "status": "PASS" if ratio >= STOCK_FACTOR else "NOT MEASURED",
                                "detail": f"stock not run at L={seq}; at L={best['seq_len']} with {best['layers']} "
                                f"layers it already holds {best['peak_above_weights_bytes'] / gib:.2f} GiB, against "
                                f"all at L={seq} and full depth {a['full_depth_peak_bytes_upper'] / gib:.2f} GiB "
                                f"(extrapolated): at least {ratio:.1f}x"})
            else:
                results.append({"name": name, "status": "NOT MEASURED", "detail": "stock not run at this length"})
    pairs = {}
    for c in cells:
        if c.get("status") == "ok" and c["model"] == TARGET_MODEL and c["mode"] in ("stock", "all"):
            pairs.setdefault((c["layers"], c["seq_len"]), {})[c["mode"]] = c
    for (layers, seq), pair in sorted(pairs.items()):
        if len(pair) < 2:
            continue
        ratio = pair["all"]["seconds"] / pair["stock"]["seconds"]
        results.append({
            "name": f"{TARGET_MODEL} {layers} layers L={seq}: step time of `all` <= {TIME_FACTOR}x stock",
            "status": "PASS" if ratio <= TIME_FACTOR else "FAIL",
            "detail": f"{pair['all']['seconds']:.1f} s vs {pair['stock']['seconds']:.1f} s: {ratio:.2f}x "
            "(one step each, loaded machine)",
        })
    return results


def write_report(results: dict, out: Path) -> List[Path]:
    """results.json and README.md in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    (out / "README.md").write_text(render_markdown(results))
    return [out / "results.json", out / "README.md"]


def render_markdown(results: dict) -> str:
    gib = 2**30
    m = results["machine"]
    s = results["settings"]
    lines = [f"# {s.get('title') or 'One LoRA training step at real model shapes'}", ""]
    lines += [
        f"Hardware: {m.get('cpu', '?')}, {m.get('cpu_cores', '?')} cores, {m.get('memory_bytes', 0) / gib:.0f} GiB, "
        f"{m.get('os_name', '?')}; MLX {m.get('mlx_version', '?')} ({m.get('backend', '?')} backend), "
        f"mlx-lm {s.get('mlx_lm', '?')}; BLAS: {s.get('blas', '?')}; load average at the start "
        f"{m.get('load_average')}.",
        "",
        f"Command: `{s['command']}`",
        "",
        "Random weights from `mlx_flash/configs/<model>.json`, float32 activations, LoRA rank 8 on every linear "
        "layer, one packed row of equal documents, one step (forward, backward, Adam update). Peak is "
        "`mx.get_peak_memory()` over the step minus the frozen weights. Each cell ran in its own process.",
    ]
    if s.get("note"):
        lines += ["", s["note"]]
    lines += ["", "| model | layers | L | mode | peak above weights | tokens/s | loss | checked against | status |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(results["cells"], key=lambda c: (c["model"], c["seq_len"], c["layers"], MODES.index(c["mode"]))):
        if c.get("status") == "ok":
            against = c.get("checked_against")
            verdict = "-" if against is None else f"{against}: {'match' if c.get('loss_matches_reference') else 'MISMATCH'}"
            lines.append(f"| {c['model']} | {c['layers']} | {c['seq_len']} | {c['mode']} | "
                         f"{c['peak_above_weights_bytes'] / gib:.2f} GiB | {c['tokens_per_s']:.0f} | {c['loss']:.4f} | "
                         f"{verdict} | ok |")
        else:
            lines.append(f"| {c['model']} | {c['layers']} | {c['seq_len']} | {c['mode']} | - | - | - | - | "
                         f"{c.get('status')}: {c.get('detail', '')[:80]} |")
    if results.get("extrapolations"):
        lines += ["", "Full-depth figures, **extrapolated**, not measured: linear from two layer counts, "
                  "peak(n1) + (N - n1) x slope; upper, peak(n1) + (N - n1) x max(slope, what a layer keeps: its "
                  "saved input, LoRA parameters and their gradient). A bounded step's peak can fall where the upper "
                  "layers' inputs are already freed, so its slope can be below what a layer keeps; the upper "
                  "figure is the one the targets use. Stock keeps every layer's activations, far more than that, so "
                  "its figure from one layer count is a lower bound.", "",
                  "| model | L | mode | layers | slope per layer | kept per layer | full depth | linear | upper |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for e in results["extrapolations"]:
            slope = "-" if e["per_layer_bytes"] is None else f"{e['per_layer_bytes'] / 2**20:.0f} MiB"
            linear = "-" if e["full_depth_peak_bytes_extrapolated"] is None else (
                f"{e['full_depth_peak_bytes_extrapolated'] / gib:.2f} GiB")
            lines.append(f"| {e['model']} | {e['seq_len']} | {e['mode']} | {', '.join(map(str, e['from_layers']))} | "
                         f"{slope} | {e['kept_per_layer_bytes'] / 2**20:.0f} MiB | {e['full_depth_layers']} | {linear} | "
                         f"{e['full_depth_peak_bytes_upper'] / gib:.2f} GiB |")
    if results.get("targets"):
        lines += ["", "Targets:", ""]
        lines += [f"- **{t['status']}** {t['name']}: {t['detail']}" for t in results["targets"]]
    return "\n".join(lines) + "\n"


def _blas() -> str:
    preload = os.environ.get("LD_PRELOAD", "")
    return f"OpenBLAS ({preload})" if "openblas" in preload.lower() else "the BLAS MLX links"


def _mlx_lm() -> str:
    try:
        from importlib.metadata import version

        return version("mlx-lm")
    except Exception:
        return "?"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_flash.bench --step",
        description="One LoRA training step (forward, backward, update) at real model shapes: peak memory above "
        "the weights and tokens/s for stock mlx-lm and each mlx-flash option.",
    )
    parser.add_argument("--model", nargs="+", default=["qwen2.5-1.5b"],
                        help=f"shipped configs ({', '.join(shipped_configs())}) or config.json paths")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="layer counts (two give the slope)")
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 4096], help="packed row lengths, 1024..32768")
    parser.add_argument("--modes", nargs="+", default=list(MODES), help=f"from {', '.join(MODES)}")
    parser.add_argument("--batch", type=int, default=1, help="rows per step")
    parser.add_argument("--documents", type=int, default=8, help="equal documents per packed row")
    parser.add_argument("--chunk-tokens", default="auto", help="MLP chunk of `all`: auto, 0 or a token count")
    parser.add_argument("--vocab", type=int, help="replace the config's vocabulary (to measure the layers apart)")
    parser.add_argument("--max-memory-gb", type=float, default=DEFAULT_BUDGET_GB,
                        help=f"a cell's budget above the weights (default {DEFAULT_BUDGET_GB:g})")
    parser.add_argument("--out", default=os.path.join("runs", "bench-step"), help="folder for results.json and README.md")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    parser.add_argument("--append", action="store_true", help="add cells to the results in --out (same settings)")
    parser.add_argument("--render", metavar="RESULTS_JSON", help="measure nothing: rewrite README.md from a results.json")
    parser.add_argument("--title", help="title of the report")
    parser.add_argument("--note", help="conditions of the run, printed in the report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    return parser


def _fail(message: str) -> int:
    print(f"mlx_flash.bench --step: {message}", file=sys.stderr)
    return 2


def _chunk_arg(text: str):
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--chunk-tokens: auto, 0 or a token count, got '{text}'")
    if value < 0:
        raise ValueError(f"--chunk-tokens: must be at least 0, got {value}")
    return value


def finish(results: dict, out: Path) -> int:
    results["extrapolations"] = extrapolate(results["cells"])
    check_losses(results["cells"])
    results["targets"] = evaluate_targets(results["cells"], results["extrapolations"])
    paths = write_report(results, out)
    for t in results["targets"]:
        print(f"{t['status']:>12}  {t['name']}: {t['detail']}")
    bad = [c for c in results["cells"] if c.get("status") == "error" or c.get("loss_matches_reference") is False]
    for c in bad:
        print(f"{'FAILED':>12}  {c['model']} {c['layers']} layers L={c['seq_len']} {c['mode']}: "
              f"{c.get('detail') or 'loss does not match ' + str(c.get('checked_against'))}")
    print("wrote " + ", ".join(map(str, paths)))
    return 1 if bad or any(t["status"] == "FAIL" for t in results["targets"]) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cell:
        import mlx.core as mx

        spec = json.loads(args.cell)
        cell = run_cell(**spec)
        print("CELL " + json.dumps(cell), flush=True)
        return 0
    if args.render:
        try:
            with open(args.render) as f:
                results = json.load(f)
        except (OSError, ValueError) as e:
            return _fail(f"--render: cannot read {args.render} ({e})")
        return finish(results, Path(args.render).parent)
    try:
        chunk = _chunk_arg(args.chunk_tokens)
        for name in args.model:
            shipped_config(name)
        for mode in args.modes:
            if mode not in MODES:
                raise ValueError(f"--modes: unknown mode '{mode}' (from {', '.join(MODES)})")
        for n in args.layers:
            if n < 1:
                raise ValueError(f"--layers: must be at least 1, got {n}")
        for seq in args.seq:
            if seq < 16:
                raise ValueError(f"--seq: must be at least 16, got {seq}")
        if args.batch < 1 or args.documents < 1:
            raise ValueError("--batch and --documents: must be at least 1")
        if not args.max_memory_gb > 0:
            raise ValueError(f"--max-memory-gb: must be above 0, got {args.max_memory_gb}")
    except ValueError as e:
        return _fail(str(e))
    out = Path(args.out)
    results = None
    if (out / "results.json").exists():
        if args.append:
            with open(out / "results.json") as f:
                results = json.load(f)
        elif not args.overwrite:
            return _fail(f"{out / 'results.json'} exists: --overwrite replaces it, --append adds to it")
    from .. import machine

    if results is None:
        results = {
            "machine": machine.describe(),
            "settings": {"command": "python -m mlx_flash.bench --step " + " ".join(
                shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv) if a != "--step"),
                "title": args.title, "note": args.note, "blas": _blas(), "mlx_lm": _mlx_lm()},
            "cells": [],
        }
    elif args.note:
        results["settings"]["note"] = args.note
    budget = int(args.max_memory_gb * 2**30)
    specs = []
    for name in args.model:
        for seq in args.seq:
            for layers in args.layers:
                for mode in args.modes:
                    spec = dict(name=name, layers=layers, seq=seq, mode=mode, batch=args.batch,
                                documents=args.documents, seed=args.seed)
                    if mode == "all":
                        spec["chunk_tokens"] = chunk
                    if args.vocab:
                        spec["vocab"] = args.vocab
                    specs.append(spec)
    start = time.perf_counter()
    for i, spec in enumerate(specs):
        print(f"[{i + 1}/{len(specs)}] {spec['name']} {spec['layers']} layers L={spec['seq']} {spec['mode']} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        cell = run_isolated(spec, budget)
        if cell["status"] != "ok":
            cell = {"model": spec["name"], "layers": spec["layers"], "seq_len": spec["seq"], "batch": spec["batch"],
                    "mode": spec["mode"], "documents": spec["documents"], "seed": spec["seed"],
                    "status": cell["status"], "detail": cell.get("detail", ""), "budget_bytes": budget}
        else:
            print(f"    peak above weights {cell['peak_above_weights_bytes'] / 2**30:.2f} GiB, "
                  f"{cell['tokens_per_s']:.0f} tokens/s, loss {cell['loss']:.5f}", file=sys.stderr, flush=True)
        results["cells"] = [c for c in results["cells"] if not (_key(c) == _key(cell) and c["mode"] == cell["mode"])]
        results["cells"].append(cell)
        # Written after every cell, so a long run that stops keeps what it measured.
        results["extrapolations"] = extrapolate(results["cells"])
        check_losses(results["cells"])
        write_report(results, out)
    return finish(results, out)


if __name__ == "__main__":
    sys.exit(main())
