"""Fit the planner's coefficients to measured steps, and check them.

    python -m mlx_flash.plan.fit bench/linux-cpu-plan/results.json [more results.json ...] [--write]

Each cell of a results file (``bench --step`` or ``mlx_flash.plan.measure``
format) is one measured ``peak_above_weights_bytes``. Per family of modes
(``plain``, ``ckpt``, ``bounded``; memory.family) the coefficients are the
non-negative solution of ``sum_f c_f x feature_f = measured - fixed`` with
the smallest largest *relative* error (least squares reweighted toward the
worst cells; each cell's row divided by its measurement),
where ``fixed`` is what is known exactly or by design (LoRA state, the
fused attention's log-sum-exp, the logit-free loss). A family without
cells keeps its design coefficients. ``--write`` stores the result in
``coefficients.json`` beside this module, which the planner reads.
"""

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from . import memory
from .models import from_config, shipped_config

COEFFICIENTS_FILE = Path(__file__).resolve().parent / "coefficients.json"
_FIXED = memory.EXACT


def cell_case(cell: dict) -> Tuple:
    """``(geometry, setup, options)`` of a measured cell."""
    config = dict(shipped_config(cell["model"]))
    config.pop("quantization", None)
    config["num_hidden_layers"] = cell["layers"]
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][: cell["layers"]]
    vocab = cell.get("vocab_override") or cell.get("vocab_size")
    if vocab:
        config["vocab_size"] = vocab
    bits = cell.get("quantized_bits")
    g = from_config(config, cell["model"], "cell", dtype=cell.get("dtype", "float32"), bits=bits, group_size=64 if bits else None)
    setup = memory.Setup(seq=cell["seq_len"], batch=cell.get("batch", 1), rank=cell.get("lora_rank", 8), machines=cell.get("machines", 1))
    options = memory.MODES[cell["mode"]]
    if options.bounded and cell.get("chunk_tokens") is not None:
        options = replace(options, chunk_tokens=cell["chunk_tokens"])
    return g, setup, options


def _nnls(a: np.ndarray, b: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Non-negative least squares (Lawson and Hanson's active-set method):
    ``argmin |a x - b|`` over ``x >= 0``."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(10 * n + 10):
        w = a.T @ (b - a @ x)
        if passive.all() or w[~passive].max(initial=-np.inf) <= tol:
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > tol).all():
                x = z
                break
            # Step back toward x until a coefficient reaches zero, and drop it.
            neg = passive & (z <= tol)
            alpha = np.min(x[neg] / np.maximum(x[neg] - z[neg], 1e-300))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


def _minimax(a: np.ndarray, b: np.ndarray, rounds: int = 200) -> np.ndarray:
    """Non-negative coefficients that make the largest relative error small:
    least squares reweighted toward the cells it misses most (Lawson's
    iteration for the minimax fit), keeping the best round."""
    w = np.ones(len(b))
    best, best_err = None, np.inf
    for _ in range(rounds):
        x = _nnls(a * w[:, None], b * w)
        r = np.abs(a @ x - b)
        if r.max() < best_err:
            best, best_err = x, r.max()
        w = w * np.sqrt(r + 1e-9)
        w /= w.max()
    return best


def fit(cells: List[dict]) -> Dict[str, Dict[str, float]]:
    """Coefficients per family from ``cells`` (families without cells keep the design values)."""
    out = {name: dict(values) for name, values in memory.DESIGN.items()}
    groups: Dict[str, list] = {}
    for cell in cells:
        g, setup, options = cell_case(cell)
        groups.setdefault(memory.family(options), []).append((cell, g, setup, options))
    for name, members in groups.items():
        names = sorted({f for _, g, s, o in members for f in memory.features(g, s, o) if f not in _FIXED})
        rows, rhs = [], []
        for cell, g, setup, options in members:
            f = memory.features(g, setup, options)
            fixed = memory.LORA_BYTES_PER_PARAMETER * memory.lora_parameters(g, setup.lora_layers, setup.rank)
            fixed += sum(f.get(k, 0) for k in _FIXED)
            measured = cell["peak_above_weights_bytes"]
            rows.append([f.get(k, 0.0) / measured for k in names])
            rhs.append((measured - fixed) / measured)
        x = _minimax(np.array(rows), np.array(rhs))
        out[name] = {k: round(float(v), 4) for k, v in zip(names, x)}
    return out


def errors(cells: List[dict], coefficients=None) -> List[Tuple[dict, int, float]]:
    """``(cell, predicted, relative error)`` for every cell."""
    out = []
    for cell in cells:
        g, setup, options = cell_case(cell)
        predicted = memory.predict(g, setup, options, coefficients).above_weights
        measured = cell["peak_above_weights_bytes"]
        out.append((cell, predicted, predicted / measured - 1))
    return out


def load_cells(paths) -> List[dict]:
    cells = []
    for path in paths:
        for cell in json.loads(Path(path).read_text())["cells"]:
            # bench --step records cells that failed or did not fit beside the measured ones.
            if cell.get("status", "ok") == "ok" and cell.get("peak_above_weights_bytes"):
                cells.append(cell)
    return cells


def markdown(paths, cells: List[dict], coefficients, check_paths=(), checks=()) -> str:
    """The fit as a report: every cell measured and predicted, the coefficients."""
    machine = json.loads(Path(paths[0]).read_text()).get("machine", {})
    lines = [
        "# A LoRA step's peak memory: measured and predicted",
        "",
        f"Measured with `python -m mlx_flash.plan.measure` on {machine.get('cpu', 'this machine')} "
        f"({machine.get('cpu_cores', '?')} cores, {machine.get('os_name', '?')}), MLX {machine.get('mlx_version', '?')} "
        "CPU backend, OpenBLAS preloaded, float32, one packed row of 8 documents, LoRA rank 8 on every "
        "linear layer, Adam; random weights from the shipped configs with fewer layers (and a 1024-token "
        "vocabulary where the layers are measured apart from the loss). Memory counts do not depend on the "
        "machine's load; the other processes sharing it do not change them.",
        "",
        "Predicted by `python -m mlx_flash.plan` with the coefficients below (`python -m mlx_flash.plan.fit "
        + " ".join(str(p) for p in paths) + " --write`).",
        "",
        "| model | layers | L | vocab | bits | mode | measured MiB | predicted MiB | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for cell, predicted, error in errors(cells, coefficients):
        worst = max(worst, abs(error))
        lines.append(
            f"| {cell['model']} | {cell['layers']} | {cell['seq_len']} | {cell.get('vocab_size')} | "
            f"{cell.get('quantized_bits') or '-'} | {cell['mode']} | {cell['peak_above_weights_bytes'] / 2**20:.1f} | "
            f"{predicted / 2**20:.1f} | {error:+.1%} |"
        )
    lines += ["", f"Largest error: {worst:.1%} over {len(cells)} cells (the test allows 10%).", ""]
    if checks:
        lines += [
            "Cells measured by `python -m mlx_flash.bench --step` (" + ", ".join(str(p) for p in check_paths)
            + "), not used in the fit, predicted with the same coefficients:",
            "",
            "| model | layers | L | vocab | mode | measured MiB | predicted MiB | error |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for cell, predicted, error in errors(checks, coefficients):
            lines.append(
                f"| {cell['model']} | {cell['layers']} | {cell['seq_len']} | {cell.get('vocab_size')} | {cell['mode']} | "
                f"{cell['peak_above_weights_bytes'] / 2**20:.1f} | {predicted / 2**20:.1f} | {error:+.1%} |"
            )
        lines.append("")
    lines += [
        "In `stock+ckpt` cells mlx-lm's checkpoint recomputes each layer after the loss has left "
        "`mlx_flash.segments`, so the recompute attends with mlx-lm's causal mask: the same `L x L` scores on "
        "MLX's unfused CPU path, without the boolean document mask.",
        "",
        "Coefficients:",
        "",
    ]
    for family, values in coefficients.items():
        lines.append(f"- `{family}`: " + ", ".join(f"{k} {v:g}" for k, v in values.items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_flash.plan.fit", description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="results.json files with measured cells")
    parser.add_argument("--write", action="store_true", help=f"store the coefficients in {COEFFICIENTS_FILE.name}")
    parser.add_argument("--report", type=Path, help="also write the cells, predictions and coefficients as Markdown")
    parser.add_argument("--check", nargs="*", default=[], help="results.json files whose cells the report predicts without fitting them")
    args = parser.parse_args(argv)
    cells = load_cells(args.results)
    coefficients = fit(cells)
    print(json.dumps(coefficients, indent=1))
    worst = 0.0
    for cell, predicted, error in errors(cells, coefficients):
        worst = max(worst, abs(error))
        print(
            f"{cell['model']:>15} n={cell['layers']} L={cell['seq_len']:>5} V={cell.get('vocab_size')!s:>6} "
            f"bits={cell.get('quantized_bits')!s:>4} {cell['mode']:>10}: measured "
            f"{cell['peak_above_weights_bytes'] / 2**20:8.1f} MiB, predicted {predicted / 2**20:8.1f} MiB ({error:+.1%})"
        )
    print(f"worst: {worst:.1%} over {len(cells)} cells")
    if args.write:
        sources = sorted({str(Path(p)) for p in args.results})
        COEFFICIENTS_FILE.write_text(json.dumps({"fitted_from": sources, "coefficients": coefficients}, indent=1) + "\n")
        print(f"wrote {COEFFICIENTS_FILE}")
    if args.report:
        checks = load_cells(args.check)
        args.report.write_text(markdown(args.results, cells, coefficients, args.check, checks))
        print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
