"""The comparison of attention variants: Markdown and JSON tables, a PNG plot.

Speedups are against ``manual`` (attention written out in MLX ops, the
scores matrix materialised: the textbook baseline): median iteration time of
``manual`` divided by the variant's, so above 1 is faster. Memory is the
variant's peak over ``manual``'s, so below 1 is smaller. Without a ``manual``
row both are left empty rather than guessed. Stock mlx-lm calls
``mx.fast.scaled_dot_product_attention``, which is the ``mlx`` variant: when
a comparison includes it, its row carries a second pair of ratios, against
``mlx``, which is what a user switching from plain mlx-lm gains. Rows of
different kinds do different work per iteration, so iteration time and
memory are compared between runs on the same kind of rows only: a packed
run against the packed ``mlx`` run (MLX given the dense document mask), a
padded one against ``mlx:padded`` (the ``mlx`` variant on mlx-lm's padded
batches, stock mlx-lm). Across kinds the fair measure is real (non-padding)
tokens per second, which the table gives against stock mlx-lm.
"""

from pathlib import Path
from typing import Dict, List, Optional

from . import files
from .generations import markdown as generations_markdown

COMPARE_MD = "compare.md"
COMPARE_JSON = "compare.json"
COMPARE_PNG = "compare.png"


def _ratios(s: dict, baseline: Optional[dict]):
    """(speedup, memory ratio) of summary ``s`` against ``baseline``, or Nones."""
    speedup = memory_ratio = None
    if baseline and baseline.get("median_iteration_s") and s.get("median_iteration_s"):
        speedup = baseline["median_iteration_s"] / s["median_iteration_s"]
    if baseline and baseline.get("peak_memory_bytes") and s.get("peak_memory_bytes"):
        memory_ratio = s["peak_memory_bytes"] / baseline["peak_memory_bytes"]
    return speedup, memory_ratio


def rows(summaries: List[dict]) -> List[dict]:
    """One row per variant, with speedup and memory ratio against manual and mlx."""
    by_name = {s["variant"]: s for s in summaries}
    stock = by_name.get("mlx:padded") or by_name.get("mlx")
    table = []
    for s in summaries:
        packed = s.get("packed", False)
        same_rows = [o for o in summaries if o.get("packed", False) == packed]
        manual = next((o for o in same_rows if o["variant"] == "manual"), None)
        mlx = next((o for o in same_rows if o["variant"] in ("mlx", "mlx:padded")), None)
        speedup, memory_ratio = _ratios(s, manual)
        speedup_mlx, memory_mlx = _ratios(s, mlx)
        tokens_mlx = None
        if stock and stock.get("tokens_per_s") and s.get("tokens_per_s"):
            tokens_mlx = s["tokens_per_s"] / stock["tokens_per_s"]
        table.append(
            {
                "variant": s["variant"],
                "implementation": s["implementation"],
                "backend": s["backend"],
                "iterations": s["iterations"],
                "median_iteration_s": s["median_iteration_s"],
                "p95_iteration_s": s["p95_iteration_s"],
                "steps_per_s": 1 / s["median_iteration_s"] if s.get("median_iteration_s") else None,
                "tokens_per_s": s["tokens_per_s"],
                "tokens_vs_mlx": tokens_mlx,
                "packed": s.get("packed", False),
                "fill_ratio": s.get("fill_ratio"),
                "peak_memory_bytes": s["peak_memory_bytes"],
                "final_train_loss": s["final_train_loss"],
                "train_loss_last10": s["train_loss_last10"],
                "initial_val_loss": s.get("initial_val_loss"),
                "final_val_loss": s["final_val_loss"],
                "speedup_vs_manual": speedup,
                "memory_vs_manual": memory_ratio,
                "speedup_vs_mlx": speedup_mlx,
                "memory_vs_mlx": memory_mlx,
            }
        )
    return table


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def hardware(environment: dict) -> str:
    """One line naming the chip, cores, memory, backend and software."""
    m = environment["machine"]
    memory = f", {m['memory_bytes'] / 2**30:.0f} GiB" if m.get("memory_bytes") else ""
    source = m.get("source") or {}
    commit = ""
    if source.get("commit"):
        commit = f" at commit {source['commit']}" + (" with uncommitted changes" if source.get("uncommitted") else "")
    return (
        f"{m['chip']} ({m['cpu_cores']} CPU cores{memory}), backend {m['backend']}, device {environment['device']}; "
        f"{m['os']}; MLX {m['mlx_version']}, mlx-lm {environment['mlx_lm']}, "
        f"mlx-flash {m['mlx_flash_version']}{commit}"
    )


def markdown(recipe_name: str, table: List[dict], environment: dict) -> str:
    with_mlx = any(r["variant"] in ("mlx", "mlx:padded") for r in table)
    stock = "mlx:padded" if any(r["variant"] == "mlx:padded" for r in table) else "mlx"
    baselines = (
        "Speedup and memory are against `manual` (attention in plain MLX ops) and against `mlx` "
        "(`mx.fast.scaled_dot_product_attention`, what stock mlx-lm runs), each on the same kind of "
        f"rows (packed or padded); real tokens/s is against `{stock}`, stock mlx-lm."
        if with_mlx
        else "Speedup and memory are against `manual` (attention in plain MLX ops)."
    )
    header = (
        "| variant | ran as | rows | iters | median it (ms) | p95 it (ms) | steps/s | real tokens/s | peak mem (MB) "
        "| train loss, last it | train loss, mean of last 10 its | val loss, before training | val loss, last eval "
        "| speedup vs manual | memory vs manual |"
    )
    if with_mlx:
        header += f" speedup vs mlx | memory vs mlx | real tokens/s vs {stock} |"
    lines = [
        f"# {recipe_name}: attention variants compared",
        "",
        f"Hardware: {hardware(environment)}.",
        "",
        f"Median and p95 leave out each run's first (warm-up) iteration. {baselines} "
        "Real tokens are the targets the loss counts (never padding); rows are packed (whole examples "
        "with document masks, the share of real tokens in brackets) or padded (one example per row, "
        "as mlx-lm batches).",
        "",
        header,
        "|---|---|" + "--:|" * (header.count("|") - 3),
    ]
    for r in table:
        line = (
            f"| {r['variant']} | {r['implementation']} ({r['backend']}) "
            f"| {'packed' if r['packed'] else 'padded'} ({_fmt(r['fill_ratio'], '.0%')}) | {r['iterations']} "
            f"| {_fmt(r['median_iteration_s'], '.1f', 1e3)} | {_fmt(r['p95_iteration_s'], '.1f', 1e3)} "
            f"| {_fmt(r['steps_per_s'], '.3g')} | {_fmt(r['tokens_per_s'], '.0f')} "
            f"| {_fmt(r['peak_memory_bytes'], '.1f', 1e-6)} "
            f"| {_fmt(r['final_train_loss'], '.3f')} | {_fmt(r['train_loss_last10'], '.3f')} "
            f"| {_fmt(r['initial_val_loss'], '.3f')} | {_fmt(r['final_val_loss'], '.3f')} "
            f"| {_fmt(r['speedup_vs_manual'], '.2f')}x | {_fmt(r['memory_vs_manual'], '.2f')}x |"
        )
        if with_mlx:
            line += (
                f" {_fmt(r['speedup_vs_mlx'], '.2f')}x | {_fmt(r['memory_vs_mlx'], '.2f')}x "
                f"| {_fmt(r['tokens_vs_mlx'], '.2f')}x |"
            )
        lines.append(line)
    return "\n".join(lines).replace("| -x |", "| - |").replace("| -x |", "| - |") + "\n"


def plot(path: Path, metrics: Dict[str, List[dict]]) -> Optional[Path]:
    """Loss and iteration time per variant, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for variant, records in metrics.items():
        its = [r["iteration"] for r in records]
        ax_loss.plot(its, [r["loss"] for r in records], label=variant)
        ax_time.plot(its, [r["wall_s"] * 1e3 for r in records], label=variant)
    ax_loss.set(xlabel="iteration", ylabel="train loss", title="Loss")
    ax_time.set(xlabel="iteration", ylabel="ms", title="Iteration time")
    ax_time.set_yscale("log")
    for ax in (ax_loss, ax_time):
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
    shown below the table.
    """
    out_dir = Path(out_dir)
    table = rows(summaries)
    environment = {k: summaries[0][k] for k in ("machine", "device", "mlx_lm")}
    text = markdown(recipe_name, table, environment)
    if answers:
        text += "\n" + generations_markdown(answers)
    files.write_text(out_dir / COMPARE_MD, text)
    files.write_json(
        out_dir / COMPARE_JSON, {"recipe": recipe_name, **environment, "rows": table, "generations": answers or {}}
    )
    written = [out_dir / COMPARE_MD, out_dir / COMPARE_JSON]
    if draw and plot(out_dir / COMPARE_PNG, metrics) is not None:
        written.append(out_dir / COMPARE_PNG)
    return written
