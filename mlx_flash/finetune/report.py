"""The comparison of attention variants: Markdown and JSON tables, a PNG plot.

The variants train in turns (interleave.py), so every ratio is taken window
by window, between runs measured minutes apart at most, and reported as the
median and the range over windows. A ratio whose range takes in 1.0 is "no
measurable difference": the load on the machine moved it more than the
variants did.

Rows of different kinds do different work per iteration, so iteration time
and memory are compared only between runs on the same kind of rows: a packed
run against the packed ``mlx`` run (MLX given the dense document mask), a
padded one against ``mlx:padded`` (stock mlx-lm: the ``mlx`` variant on
mlx-lm's padded batches), and either against ``manual`` (attention in plain
MLX ops) on its kind of rows. Across kinds the fair measure is real
(non-padding) tokens per second, given against stock mlx-lm. Without a
baseline run a ratio is left out rather than guessed.

``compare.md`` leads with a short table (what ran, real tokens/s, memory,
validation loss, the packing check) and gives the rest in a detailed table;
a column no run has a value for is left out.
"""

from pathlib import Path
from statistics import median
from typing import Callable, Dict, List, Optional, Sequence

from . import files
from .generations import markdown as generations_markdown

COMPARE_MD = "compare.md"
COMPARE_JSON = "compare.json"
COMPARE_PNG = "compare.png"

#: The words for a ratio whose range over windows takes in 1.0.
NO_DIFFERENCE = "no measurable difference"


def windows(records: Sequence[dict], width: Optional[int]) -> Dict[int, dict]:
    """Per window (0-based), the real tokens, seconds and iterations of the
    steady records (warm-up left out, unless there is nothing else). Without
    ``width`` the run is one window."""
    out: Dict[int, dict] = {}
    # A run of warm-up iterations only is measured by them, as its summary is.
    steady = [r for r in records if not r.get("warmup")] or list(records)
    for r in steady:
        w = (r["iteration"] - 1) // width if width else 0
        slot = out.setdefault(w, {"tokens": 0, "seconds": 0.0, "iterations": 0})
        slot["tokens"] += r["tokens"]
        slot["seconds"] += r["wall_s"]
        slot["iterations"] += 1
    return out


def spread(values: Sequence[float]) -> Optional[dict]:
    """``{"median", "min", "max", "windows"}`` of ``values``, or None without any."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": median(values), "min": min(values), "max": max(values), "windows": len(values)}


def _per_window(mine: Dict[int, dict], theirs: Dict[int, dict], ratio: Callable[[dict, dict], float]) -> Optional[dict]:
    return spread([ratio(mine[w], theirs[w]) for w in sorted(set(mine) & set(theirs))])


def _tokens_per_s(slot: dict) -> float:
    return slot["tokens"] / slot["seconds"]


def _step_s(slot: dict) -> float:
    return slot["seconds"] / slot["iterations"]


def describe(summary: dict) -> str:
    """What a run measured, in words: the rows and the attention."""
    packed = summary.get("packed", False)
    if summary["variant"] == "mlx:padded" or (summary["variant"] == "mlx" and not packed):
        return "stock mlx-lm: padded rows, MLX attention"
    if not packed:
        return f"padded rows, {summary['implementation']} ({summary['backend']})"
    if summary["implementation"] == "mlx":
        return "packed rows, dense L x L document mask (MLX)"
    if summary["implementation"] == "manual":
        return "packed rows, document mask in plain MLX ops"
    return f"packed rows, fused document masks ({summary['implementation']}, {summary['backend']})"


def _stock(summaries: List[dict]) -> Optional[dict]:
    """Stock mlx-lm's run: ``mlx:padded``, or ``mlx`` on padded rows."""
    for s in summaries:
        if s["variant"] == "mlx:padded":
            return s
    return next((s for s in summaries if s["variant"] == "mlx" and not s.get("packed", False)), None)


def rows(summaries: List[dict], metrics: Optional[Dict[str, List[dict]]] = None) -> List[dict]:
    """One row per variant: its summary's figures, real tokens/s over windows,
    and ratios (median and range over windows) against stock mlx-lm, ``manual``
    and ``mlx`` on the same kind of rows.

    ``metrics``: per variant, its ``metrics.jsonl`` records; without them a
    run is one window, measured by its summary (median iteration time).
    """
    def slots(s):
        if metrics is None or s["variant"] not in metrics:
            return None
        width = (s.get("interleaved") or {}).get("window_iterations")
        return windows(metrics[s["variant"]], width)

    def ratio(s, baseline, of_tokens: bool) -> Optional[dict]:
        if baseline is None:
            return None
        mine, theirs = slots(s), slots(baseline)
        if mine is not None and theirs is not None:
            if of_tokens:
                return _per_window(mine, theirs, lambda a, b: _tokens_per_s(a) / _tokens_per_s(b))
            return _per_window(mine, theirs, lambda a, b: _step_s(b) / _step_s(a))
        key = "tokens_per_s" if of_tokens else "median_iteration_s"
        if not (s.get(key) and baseline.get(key)):
            return None
        return spread([s[key] / baseline[key] if of_tokens else baseline[key] / s[key]])

    def memory(s, baseline) -> Optional[float]:
        if baseline and baseline.get("peak_memory_bytes") and s.get("peak_memory_bytes"):
            return s["peak_memory_bytes"] / baseline["peak_memory_bytes"]
        return None

    stock = _stock(summaries)
    table = []
    for s in summaries:
        packed = s.get("packed", False)
        same_rows = [o for o in summaries if o.get("packed", False) == packed]
        manual = next((o for o in same_rows if o["variant"] == "manual"), None)
        mlx = next((o for o in same_rows if o["variant"] in ("mlx", "mlx:padded")), None)
        mine = slots(s)
        throughput = spread([_tokens_per_s(w) for w in mine.values() if w["seconds"] > 0]) if mine else None
        packing = s.get("packing") or {}
        table.append(
            {
                "variant": s["variant"],
                "what_ran": describe(s),
                "implementation": s["implementation"],
                "backend": s["backend"],
                "iterations": s["iterations"],
                "median_iteration_s": s["median_iteration_s"],
                "p95_iteration_s": s["p95_iteration_s"],
                "steps_per_s": 1 / s["median_iteration_s"] if s.get("median_iteration_s") else None,
                "tokens_per_s": s["tokens_per_s"],
                "tokens_per_s_windows": throughput,
                "tokens_vs_stock": ratio(s, stock, True) if stock is not None else None,
                "stock": stock["variant"] if stock is not None else None,
                "packed": packed,
                "fill_ratio": s.get("fill_ratio"),
                "peak_memory_bytes": s["peak_memory_bytes"],
                "final_train_loss": s["final_train_loss"],
                "train_loss_last10": s["train_loss_last10"],
                "initial_val_loss": s.get("initial_val_loss"),
                "final_val_loss": s["final_val_loss"],
                "packing_max_document_loss_difference": packing.get("max_document_loss_difference"),
                "speedup_vs_manual": ratio(s, manual, False),
                "memory_vs_manual": memory(s, manual),
                "speedup_vs_mlx": ratio(s, mlx, False),
                "memory_vs_mlx": memory(s, mlx),
            }
        )
    return table


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def ratio_text(r: Optional[dict]) -> Optional[str]:
    """``1.85x (1.70-2.01x over 7 windows)``, or "no measurable difference
    (...)" when the range takes in 1.0; None without a ratio."""
    if r is None:
        return None
    if r["windows"] == 1:
        return f"{r['median']:.2f}x (1 window: no spread measured)"
    span = f"{r['min']:.2f}-{r['max']:.2f}x over {r['windows']} windows"
    if r["min"] <= 1.0 <= r["max"]:
        return f"{NO_DIFFERENCE} ({span})"
    return f"{r['median']:.2f}x ({span})"


def _number(value: float) -> str:
    """Three significant figures, without an exponent: 1,680 or 4.52."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _throughput_text(t: Optional[dict]) -> Optional[str]:
    if t is None:
        return None
    if t["windows"] == 1:
        return _number(t["median"])
    return f"{_number(t['median'])} ({_number(t['min'])}-{_number(t['max'])})"


def hardware(environment: dict) -> str:
    """One line naming the chip, cores, memory, BLAS, backend and software."""
    m = environment["machine"]
    memory = f", {m['memory_bytes'] / 2**30:.0f} GiB" if m.get("memory_bytes") else ""
    blas = f", BLAS {m['blas']}" if m.get("blas") else ""
    source = m.get("source") or {}
    commit = ""
    if source.get("commit"):
        commit = f" at commit {source['commit']}" + (" with uncommitted changes" if source.get("uncommitted") else "")
    return (
        f"{m['chip']} ({m['cpu_cores']} CPU cores{memory}{blas}), backend {m['backend']}, "
        f"device {environment['device']}; {m['os']}; MLX {m['mlx_version']}, mlx-lm {environment['mlx_lm']}, "
        f"mlx-flash {m['mlx_flash_version']}{commit}"
    )


def load_line(summaries: List[dict]) -> Optional[str]:
    """The machine's load average over the windows, or None when not recorded."""
    interleaved = summaries[0].get("interleaved") or {}
    loads = [x for x in interleaved.get("load_average_1min") or [] if x is not None]
    if not loads:
        return None
    cores = (summaries[0].get("machine") or {}).get("cpu_cores")
    on = f" on {cores} cores" if cores else ""
    return (
        f"Load average (1 min) at the start of each window: {min(loads):.2f}-{max(loads):.2f}{on}; "
        f"the variants ran in turns of {interleaved['window_iterations']} iteration(s), so load fell on each alike."
    )


def _table(columns: List[tuple], table: List[dict]) -> List[str]:
    """Markdown lines of ``columns`` (label, cell function, align right?) over
    ``table``, leaving out a column no row has a value for."""
    cells = [(label, [cell(r) for r in table], right) for label, cell, right in columns]
    cells = [c for c in cells if any(v not in (None, "-") for v in c[1])]
    lines = [
        "| " + " | ".join(label for label, _, _ in cells) + " |",
        "|" + "|".join("--:" if right else "---" for _, _, right in cells) + "|",
    ]
    for i in range(len(table)):
        lines.append("| " + " | ".join("-" if values[i] is None else str(values[i]) for _, values, _ in cells) + " |")
    return lines


def _times(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{value:.2f}x"


def _against(row: dict, baseline: str, text: Optional[str]) -> Optional[str]:
    """``text``, or "baseline" in the baseline's own row (a ratio to itself says nothing)."""
    if text is not None and row["variant"] in ((baseline,) if baseline == "manual" else ("mlx", "mlx:padded")):
        return "baseline"
    return text


def _packing_text(r: dict) -> Optional[str]:
    diff = r["packing_max_document_loss_difference"]
    if diff is None:
        return None
    return f"max doc. loss gap {diff:.1e}"


def markdown(recipe_name: str, table: List[dict], environment: dict, summaries: Optional[List[dict]] = None) -> str:
    stock = next((r["stock"] for r in table if r["stock"]), None)
    iterations = max(r["iterations"] for r in table)
    last = min(10, iterations)
    short = [
        ("variant", lambda r: r["variant"], False),
        ("what ran", lambda r: r["what_ran"], False),
        ("real tokens/s, median (range) over windows", lambda r: _throughput_text(r["tokens_per_s_windows"]), True),
        (
            f"real tokens/s vs {stock} (stock mlx-lm)",
            lambda r: "baseline" if r["variant"] == stock else ratio_text(r["tokens_vs_stock"]),
            True,
        ),
        ("peak memory (MB)", lambda r: _fmt(r["peak_memory_bytes"], ".1f", 1e-6), True),
        ("val loss, last eval", lambda r: _fmt(r["final_val_loss"], ".3f"), True),
        ("packing check (exact if ~0)", _packing_text, True),
    ]
    detail = [
        ("variant", lambda r: r["variant"], False),
        ("ran as", lambda r: f"{r['implementation']} ({r['backend']})", False),
        ("rows (real-token share)", lambda r: f"{'packed' if r['packed'] else 'padded'} ({_fmt(r['fill_ratio'], '.0%')})", False),
        ("iterations", lambda r: r["iterations"], True),
        ("median iteration (ms), warm-up left out", lambda r: _fmt(r["median_iteration_s"], ".1f", 1e3), True),
        ("p95 iteration (ms)", lambda r: _fmt(r["p95_iteration_s"], ".1f", 1e3), True),
        ("real tokens/s, whole run", lambda r: None if r["tokens_per_s"] is None else _number(r["tokens_per_s"]), True),
        ("train loss, last iteration", lambda r: _fmt(r["final_train_loss"], ".3f"), True),
        (f"train loss, mean of last {last} iterations", lambda r: _fmt(r["train_loss_last10"], ".3f"), True),
        ("val loss, before training", lambda r: _fmt(r["initial_val_loss"], ".3f"), True),
        ("iteration speedup vs manual, same rows", lambda r: _against(r, "manual", ratio_text(r["speedup_vs_manual"])), True),
        ("memory vs manual, same rows", lambda r: _against(r, "manual", _times(r["memory_vs_manual"])), True),
        ("iteration speedup vs mlx, same rows", lambda r: _against(r, "mlx", ratio_text(r["speedup_vs_mlx"])), True),
        ("memory vs mlx, same rows", lambda r: _against(r, "mlx", _times(r["memory_vs_mlx"])), True),
    ]
    lines = [f"# {recipe_name}: attention variants compared", "", f"Hardware: {hardware(environment)}.", ""]
    load = load_line(summaries) if summaries else None
    if load:
        lines += [load, ""]
    lines += [
        "Real tokens are the targets the loss counts (never padding); each ratio is taken window by window and "
        f"given as the median and range over windows; a range that takes in 1.0 is \"{NO_DIFFERENCE}\".",
        "",
        *_table(short, table),
        "",
        "## Details",
        "",
        "Iteration time and memory are compared only with runs on the same kind of rows (packed or padded).",
        "",
        *_table(detail, table),
    ]
    return "\n".join(lines) + "\n"


def plot(path: Path, metrics: Dict[str, List[dict]]) -> Optional[Path]:
    """Train loss and real tokens/s per iteration, one line per variant; None
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    fig, (ax_loss, ax_tokens) = plt.subplots(1, 2, figsize=(10, 4))
    for variant, records in metrics.items():
        steady = [r for r in records if not r.get("warmup")]
        ax_loss.plot([r["iteration"] for r in records], [r["loss"] for r in records], label=variant)
        ax_tokens.plot([r["iteration"] for r in steady], [r["tokens_per_s"] for r in steady], label=variant)
    ax_loss.set(xlabel="iteration", ylabel="train loss", title="Loss")
    ax_tokens.set(xlabel="iteration", ylabel="real tokens/s", title="Real (non-padding) tokens per second")
    for ax in (ax_loss, ax_tokens):
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    files.write_bytes(path, buffer.getvalue())
    return path


def write(
    out_dir: Path,
    recipe_name: str,
    summaries: List[dict],
    metrics: Dict[str, List[dict]],
    draw: bool = True,
    answers: Optional[Dict[str, List[dict]]] = None,
):
    """Write compare.md, compare.json and (if possible) compare.png; return their paths.

    ``answers``: per variant, the before/after generations (generations.py),
    shown below the tables.
    """
    out_dir = Path(out_dir)
    table = rows(summaries, metrics)
    environment = {k: summaries[0][k] for k in ("machine", "device", "mlx_lm")}
    text = markdown(recipe_name, table, environment, summaries)
    if answers:
        text += "\n" + generations_markdown(answers)
    files.write_text(out_dir / COMPARE_MD, text)
    interleaved = summaries[0].get("interleaved")
    files.write_json(
        out_dir / COMPARE_JSON,
        {"recipe": recipe_name, **environment, "interleaved": interleaved, "rows": table, "generations": answers or {}},
    )
    written = [out_dir / COMPARE_MD, out_dir / COMPARE_JSON]
    if draw and plot(out_dir / COMPARE_PNG, metrics) is not None:
        written.append(out_dir / COMPARE_PNG)
    return written
