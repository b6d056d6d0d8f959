"""Writing a benchmark run: JSON and CSV with every timing, Markdown, PNG plots.

All four are rendered from the same ``results`` dict (the JSON document):
``machine`` (see ``machine.describe``), ``settings``, ``cells`` (one dict per
variant and configuration, ``Cell.to_dict``) and ``targets``.
"""

import csv
import json
import math
import os
from typing import Dict, List, Optional

SCHEMA = "mlx-flash-bench/1"

CONFIG_AXES = ("mode", "batch", "heads", "kv_heads", "head_dim", "mask", "dtype")

CSV_FIELDS = (
    "mode", "batch", "seq", "q_len", "heads", "kv_heads", "head_dim", "mask", "dtype",
    "variant", "implementation", "backend", "shared_with", "status", "detail",
    "max_error", "tolerance", "median_s", "p95_s", "min_s", "tokens_per_s",
    "peak_memory_bytes", "floor_bytes", "peak_over_floor", "resident_bytes", "estimated_bytes",
    "speedup_vs_manual", "speedup_vs_mlx", "speedup_vs_manual_range", "speedup_vs_mlx_range", "times_s",
)


def write_json(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1, allow_nan=False, default=_finite)
        f.write("\n")


def _finite(value):
    raise TypeError(f"not JSON serialisable: {value!r}")


def write_csv(results: dict, path: str) -> None:
    """One row per cell; ``times_s`` holds every timed run, space-separated."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for cell in results["cells"]:
            row = dict(cell)
            errors = [e for e in (cell.get("errors") or {}).values() if e is not None]
            row["max_error"] = max(errors) if errors else ""
            row["times_s"] = " ".join(f"{t:.6g}" for t in cell["times_s"])
            writer.writerow(row)


def _ms(seconds: Optional[float]) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.3g}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def _mib(n: Optional[int]) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def _rate(value: Optional[float]) -> str:
    return "" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _x(ratio: Optional[float]) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def _speedup(cell: dict, base: str) -> str:
    """The speedup over ``base`` (ratio of medians) with the range of the
    round-by-round ratios; "no measurable difference" when that range takes in 1.0."""
    ratio, span = cell.get(f"speedup_vs_{base}"), cell.get(f"speedup_vs_{base}_range")
    if ratio is None or cell["variant"] == base:
        return _x(ratio)
    if not span:
        return _x(ratio)
    low, high = span
    if low <= 1.0 <= high:
        return f"no measurable difference ({low:.2f}-{high:.2f}x)"
    return f"{ratio:.2f}x ({low:.2f}-{high:.2f})"


def ran_as(cell: dict) -> str:
    """``"practical → blockwise (mlx ops)"``: the variant and what ran for it."""
    if cell["implementation"] == cell["variant"]:
        return f"{cell['variant']} ({cell['backend']})"
    return f"{cell['variant']} → {cell['implementation']} ({cell['backend']})"


def _geomean(values: List[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def config_key(cell: dict) -> tuple:
    return tuple(cell[a] for a in CONFIG_AXES)


def config_title(key: tuple) -> str:
    c = dict(zip(CONFIG_AXES, key))
    mode = {"fwd": "forward", "fwdbwd": "forward + backward", "decode": "decode (1 query vs KV cache of L)"}[c["mode"]]
    return f"{mode} · B={c['batch']} · H={c['heads']} (KV {c['kv_heads']}) · D={c['head_dim']} · {c['mask']} · {c['dtype']}"


def _summary(cells: List[dict]) -> List[str]:
    lines = [
        "| mode | variant (what ran) | cells measured | max speed-up vs manual | geo-mean vs manual "
        "| max speed-up vs mlx | geo-mean vs mlx |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: Dict[tuple, List[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["mode"], cell["variant"]), []).append(cell)
    for (mode, variant), group in groups.items():
        ok = [c for c in group if c["status"] == "ok"]
        row = [mode, ", ".join(sorted({ran_as(c) for c in group})), f"{len(ok)} of {len(group)}"]
        for base in ("manual", "mlx"):
            ups = [(c[f"speedup_vs_{base}"], c) for c in ok if c[f"speedup_vs_{base}"] and c["variant"] != base]
            if ups:
                best, where = max(ups, key=lambda u: u[0])
                row.append(f"{best:.2f}x (L={where['seq']}, B={where['batch']}, D={where['head_dim']})")
                row.append(f"{_geomean([u for u, _ in ups]):.2f}x")
            else:
                row += ["", ""]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _config_table(cells: List[dict]) -> List[str]:
    lines = [
        "| L | variant (what ran) | median ms | p95 ms | min ms | tokens/s | peak MiB "
        "| vs manual | vs mlx | mlx peak ÷ this | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_seq: Dict[int, Dict[str, dict]] = {}
    for cell in cells:
        by_seq.setdefault(cell["seq"], {})[cell["variant"]] = cell
    for seq in sorted(by_seq):
        row_cells = by_seq[seq]
        mlx = row_cells.get("mlx")
        for cell in row_cells.values():
            name = ran_as(cell)
            if cell.get("shared_with"):
                lines.append(f"| {seq} | {name} | same run as {cell['shared_with']} | | | | | | | | |")
            elif cell["status"] == "ok":
                errors = max(cell["errors"].values(), default=0.0)
                checked, total = cell.get("checked_slices") or (0, 0)
                scope = f", {checked}/{total} slices" if checked < total else ""
                memory_ratio = ""
                if mlx and mlx["status"] == "ok":
                    memory_ratio = f"{mlx['peak_memory_bytes'] / cell['peak_memory_bytes']:.2f}x"
                lines.append(
                    f"| {seq} | {name} | {_ms(cell['median_s'])} | {_ms(cell['p95_s'])} | {_ms(cell['min_s'])} "
                    f"| {_rate(cell['tokens_per_s'])} | {_mib(cell['peak_memory_bytes'])} "
                    f"| {_speedup(cell, 'manual')} | {_speedup(cell, 'mlx')} | {memory_ratio} "
                    f"| ok ({errors:.1e}{scope}) |"
                )
            else:
                lines.append(f"| {seq} | {name} | {cell['status']}: {cell['detail']} | | | | | | | | |")
    return lines


def _memory_growth(cells: List[dict]) -> List[str]:
    """Peak memory per L and variant, with the growth from the previous L."""
    variants = list(dict.fromkeys(c["variant"] for c in cells if not c.get("shared_with")))
    by = {(c["seq"], c["variant"]): c for c in cells}
    seqs = sorted({c["seq"] for c in cells})
    if len(seqs) < 2:
        return []
    lines = [
        "| L | " + " | ".join(f"{v} peak MiB (× previous L)" for v in variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for i, seq in enumerate(seqs):
        row = [str(seq)]
        for v in variants:
            cell = by.get((seq, v))
            if not cell or cell["status"] != "ok":
                row.append(cell["status"] if cell else "")
                continue
            text = _mib(cell["peak_memory_bytes"])
            prev = by.get((seqs[i - 1], v)) if i else None
            if prev and prev["status"] == "ok":
                text += f" ({cell['peak_memory_bytes'] / prev['peak_memory_bytes']:.2f}x)"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    return lines


def machine_lines(m: dict) -> List[str]:
    """The report's hardware and software lines for ``machine.describe()``."""
    memory = f", {m['memory_bytes'] / 2**30:.0f} GiB RAM" if m.get("memory_bytes") else ""
    source = ""
    if m.get("source"):
        source = f" at commit {m['source']['commit']}"
        if m["source"]["uncommitted"]:
            source += " with uncommitted changes to " + ", ".join(m["source"]["uncommitted"])
    matmuls = f", CPU BLAS {m['blas']}" if m.get("blas") else ""
    return [
        f"- **Hardware:** {m['chip']} ({m['cpu_cores']} CPU cores{memory}), MLX backend **{m['backend']}**{matmuls}",
        f"- **Software:** {m['os']}, Python {m['python']}, MLX {m['mlx_version']}, mlx-flash {m['mlx_flash_version']}{source}",
    ]


def markdown(results: dict, plots: List[str] = ()) -> str:
    m, s, cells = results["machine"], results["settings"], results["cells"]
    title = s.get("title") or "mlx-flash benchmark"
    lines = [f"# {title}", ""] + machine_lines(m)
    lines += [
        f"- **Run:** {m['started']} · dtype {', '.join(s['dtypes'])} · mask {', '.join(s['masks'])} · "
        f"{s['warmup']} warm-up (the first is the correctness check) + {s['repeats']} timed runs per cell · "
        f"load average at start {m.get('load_average')}, at end {s.get('load_average_end')}",
        f"- **Command:** `{s['command']}`",
    ]
    if s.get("note"):
        lines.append(f"- **Conditions:** {s['note']}")
    lines += [
        "",
        "Times are wall-clock per call (median, 95th percentile, minimum of the timed runs); tokens/s is "
        "batch × query length ÷ median. Peak memory is `mx.get_peak_memory()` over one call, with that cell's "
        "inputs (and for forward + backward, the cotangent) already resident. Every cell was first compared with "
        "the float32 reference (`mlx_flash.reference`), output and, for forward + backward, the gradients of "
        "q, k and v; the check column gives max |error| ÷ max |reference| (over every (batch, KV head) slice, "
        "or over the first and last where it says so: slices are independent). A cell that fails has no speed. "
        "Speed-ups are the baseline's median over the variant's, on the same configuration in the same run.",
        "",
        "## What ran",
        "",
        "| variant | implementation | backend | why |",
        "|---|---|---|---|",
    ]
    seen = set()
    for cell in cells:
        key = (cell["variant"], cell["implementation"], cell["backend"], cell["reason"])
        if key not in seen:
            seen.add(key)
            lines.append(f"| {cell['variant']} | {cell['implementation']} | {cell['backend']} | {cell['reason']} |")
    shared = sorted({(c["variant"], c["shared_with"]) for c in cells if c.get("shared_with")})
    if shared:
        lines += [
            "",
            "Where two variants run the same implementation on the same backend, the second reuses the "
            "first one's measurement instead of running it again: "
            + ", ".join(f"{a} = {b}" for a, b in shared) + " (`--no-share` measures each separately).",
        ]

    lines += ["", "## Executive summary", ""] + _summary(cells)
    counts = {status: sum(c["status"] == status for c in cells) for status in ("ok", "FAILED", "error", "skipped")}
    lines += ["", f"{len(cells)} cells: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + "."]
    bad = [c for c in cells if c["status"] in ("FAILED", "error")]
    for c in bad:
        lines.append(f"- **{c['status']}** {c['variant']} at {c['mode']} L={c['seq']} B={c['batch']} "
                     f"D={c['head_dim']}: {c['detail']}")

    if results.get("targets"):
        # A source column only where some target names where its bound comes from.
        sourced = any(t.get("source") for t in results["targets"])
        lines += ["", "## Targets", ""]
        lines += ["| target | source | result | measured |", "|---|---|---|---|"] if sourced else [
            "| target | result | measured |", "|---|---|---|"]  # fmt: skip
        for t in results["targets"]:
            source = f" {t.get('source', '')} |" if sourced else ""
            lines.append(f"| {t['name']} |{source} **{t['status']}** | {t['detail']} |")

    groups: Dict[tuple, List[dict]] = {}
    for cell in cells:
        groups.setdefault(config_key(cell), []).append(cell)
    for key, group in groups.items():
        lines += ["", f"## {config_title(key)}", ""] + _config_table(group)
        growth = _memory_growth(group)
        if growth:
            lines += ["", "Peak memory against L:", ""] + growth
    if plots:
        lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    lines += ["", f"Raw timings of every run: `{s.get('json_name', 'results.json')}`, "
              f"`{s.get('csv_name', 'results.csv')}`.", ""]
    return "\n".join(lines)


def plot(results: dict, out_dir: str) -> List[str]:
    """Speed-up over manual and peak memory against L, a panel per mode and a
    line per variant and shape; returns the PNG paths, none without matplotlib.
    Variants that reused another's measurement get no line of their own."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    cells = [c for c in results["cells"] if c["status"] == "ok" and not c.get("shared_with")]
    # Name only the axes that vary, so labels stay short.
    axes = [a for a in ("batch", "heads", "kv_heads", "head_dim", "mask", "dtype") if len({c[a] for c in cells}) > 1]
    short = {"batch": "B", "heads": "H", "kv_heads": "KV", "head_dim": "D", "mask": "", "dtype": ""}
    modes = sorted({c["mode"] for c in cells})
    paths = []
    for name, field, ylabel, log in (
        ("speedup.png", "speedup_vs_manual", "speed-up over manual (x)", False),
        ("memory.png", "peak_memory_bytes", "peak memory (MiB)", True),
    ):
        chosen = [c for c in cells if c.get(field) is not None and not (field == "speedup_vs_manual" and c["variant"] == "manual")]
        if not chosen:
            continue
        fig, panels = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
        for panel, mode in zip(panels[0], modes):
            lines: Dict[tuple, List[tuple]] = {}
            for c in chosen:
                if c["mode"] == mode:
                    label = " ".join([ran_as(c)] + [f"{short[a]}={c[a]}" if short[a] else str(c[a]) for a in axes])
                    value = c[field] / 2**20 if field == "peak_memory_bytes" else c[field]
                    lines.setdefault(label, []).append((c["seq"], value))
            for label, points in sorted(lines.items()):
                points.sort()
                panel.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            panel.set_xscale("log", base=2)
            if log:
                panel.set_yscale("log")
            panel.set_xlabel("KV cache length L" if mode == "decode" else "sequence length L")
            panel.set_ylabel(ylabel)
            panel.set_title(mode)
            panel.grid(True, alpha=0.3)
            panel.legend(fontsize=6)
        m = results["machine"]
        fig.suptitle(f"{m['chip']} · MLX {m['mlx_version']} ({m['backend']}) · {', '.join(results['settings']['dtypes'])}",
                     fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_all(results: dict, out_dir: str) -> Dict[str, str]:
    """Write ``report.md``, ``results.json``, ``results.csv`` and plots under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, "results.json"),
        "csv": os.path.join(out_dir, "results.csv"),
        "markdown": os.path.join(out_dir, "report.md"),
    }
    results["settings"]["json_name"] = os.path.basename(paths["json"])
    results["settings"]["csv_name"] = os.path.basename(paths["csv"])
    write_json(results, paths["json"])
    write_csv(results, paths["csv"])
    pngs = plot(results, out_dir)
    with open(paths["markdown"], "w") as f:
        f.write(markdown(results, pngs))
    for i, png in enumerate(pngs):
        paths[f"plot{i}"] = png
    return paths
