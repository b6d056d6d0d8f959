"""Fit the planner's coefficients to measured steps, and check them.

    python -m mlx_flash.plan.fit bench/linux-cpu-plan/results.json [more results.json ...] [--write]

Each cell of a results file (``bench --step`` or ``mlx_flash.plan.measure``
format) is one measured ``peak_above_weights_bytes``. Per family of modes
(``plain``, ``ckpt``, ``bounded``; memory.family) the coefficients are the
non-negative least-squares solution of ``sum_f c_f x feature_f = measured -
fixed`` in *relative* error (each cell's row divided by its measurement),
where ``fixed`` is what is known exactly or by design (LoRA state, the
fused attention's log-sum-exp, the logit-free loss). A family without
cells keeps its design coefficients. ``--write`` stores the result in
``coefficients.json`` beside this module, which the planner reads.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from . import memory
from .models import from_config, shipped_config

COEFFICIENTS_FILE = Path(__file__).resolve().parent / "coefficients.json"
_FIXED = ("lse", "loss_chunks")


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
    return g, setup, memory.MODES[cell["mode"]]


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares by active sets: drop the most negative
    coefficient and solve again until none is negative."""
    keep = [j for j in range(a.shape[1]) if np.any(a[:, j])]
    x = np.zeros(a.shape[1])
    while keep:
        sol, *_ = np.linalg.lstsq(a[:, keep], b, rcond=None)
        if (sol >= 0).all():
            x[keep] = sol
            break
        keep.pop(int(np.argmin(sol)))
    return x


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
        x = _nnls(np.array(rows), np.array(rhs))
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
        cells += json.loads(Path(path).read_text())["cells"]
    return cells


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_flash.plan.fit", description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="results.json files with measured cells")
    parser.add_argument("--write", action="store_true", help=f"store the coefficients in {COEFFICIENTS_FILE.name}")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
