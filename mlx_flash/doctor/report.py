"""The doctor's Markdown report: what a user pastes into a bug report.

Hardware and software first (the verdict key among them), then pass/fail
per kernel unit with every failure's kernel and message (a compiler's
message with the generated source lines it quotes, in a code block), then
the timings with each implementation's time and its ratio against MLX's
own op, and what ``auto`` now picks for each timed problem.
"""

from typing import Dict, List

from .. import families, verdicts

#: Lines of a failure's message shown in the report (the verdict keeps more).
DETAIL_LINES = 40


def _mib(n) -> str:
    return f"{n / 2**20:.0f} MiB" if n else "?"


def _header(f) -> List[str]:
    m = f.machine
    where = {
        "metal": "Metal (the Apple GPU)",
        "emulator": "the CPU emulator (no Metal here): correctness only, no time below is a Metal time",
    }[f.backend]
    source = m.get("source") or {}
    commit = "installed package"
    if source:
        commit = source["commit"] + (" with uncommitted changes" if source.get("uncommitted") else "")
    lines = [
        f"- chip: {f.key['chip']}",
        f"- OS: {f.key['os']}; Python {m['python']}; memory {_mib(m.get('memory_bytes'))}",
        f"- MLX {f.key['mlx']}; mlx-flash {f.key['mlx_flash']} ({commit})",
        f"- kernels ran on {where}",
        f"- kernel sources: sha256 {f.key['kernels'][:16]}",
        f"- grid: {f.level}" + (f"; model {f.geometry.describe()}" if f.geometry else ""),
        f"- verdict cache: {f.verdict_path}" + (f" (NOT SAVED: {f.unsaved})" if f.unsaved else ""),
        f"- command: `{f.command}`" if f.command else "",
        f"- took {f.seconds:.0f} s" + ("; INTERRUPTED: the results below are what finished" if f.interrupted else ""),
    ]
    for note in f.geometry.notes if f.geometry else ():
        lines.append(f"- note: {note}")
    return ["# mlx-flash doctor report", ""] + [line for line in lines if line] + [""]


def _validation(f) -> List[str]:
    kinds = [k for k in verdicts.MASK_KINDS if any(r.unit.kind == k for r in f.results)]
    rows: Dict[tuple, Dict[str, str]] = {}
    for r in f.results:
        u = r.unit
        cell = {"passed": "pass", "failed": f"**FAIL** ({r.kernel})", "not run": "not run"}[r.status]
        rows.setdefault((u.family, u.dtype, f"{u.dim}x{u.value_dim}"), {})[u.kind] = cell
    passed = sum(r.passed for r in f.results)
    lines = [
        "## Validation",
        "",
        f"{passed} of {len(f.results)} kernel units passed: forward, dK/dV and dQ kernels (and the sinks' "
        "gradient) against the float32 reference at the test suite's tolerances, one small problem per unit "
        "(odd lengths, GQA).",
        "",
        "| family | dtype | D x Dv | " + " | ".join(kinds) + " |",
        "|---|---|---|" + "---|" * len(kinds),
    ]
    for (family, dtype, dims), cells in rows.items():
        lines.append(f"| {family} | {dtype} | {dims} | " + " | ".join(cells.get(k, "") for k in kinds) + " |")
    lines.append("")
    problems = [r for r in f.results if r.status != "passed"]
    if problems:
        lines += ["### Failures", ""]
        for r in problems:
            text = r.detail.splitlines()
            lines.append(f"- {r.unit.label}: {r.kernel + ' kernel: ' if r.kernel else ''}{text[0] if text else ''}")
            if len(text) > 1:
                shown = text[1 : 1 + DETAIL_LINES]
                more = len(text) - 1 - len(shown)
                lines += ["", "  ```"] + [f"  {line}" for line in shown]
                lines += ([f"  [{more} more lines in the verdict cache]"] if more else []) + ["  ```", ""]
        lines.append("")
    return lines


def _ratio(row: dict, name: str) -> str:
    times = row["median_s"]
    if name == "mlx" or "mlx" not in times or name not in times:
        return ""
    return f" ({times['mlx'] / times[name]:.2f}x)"


def _timings(f) -> List[str]:
    lines = ["## Timing", ""]
    if f.timing_note:
        return lines + [f"Timing {f.timing_note}.", ""]
    if not f.timings:
        return lines + ["Nothing was timed.", ""]
    measured = {n for row in f.timings for n in list(row["median_s"]) + list(row["failed"])}
    names = [n for n in ["mlx"] + families.preferred() + ["blockwise"] if n in measured]
    lines += [
        "Median of the timed runs, each checked against the float32 reference first (a wrong result has no time). "
        "In brackets: MLX's time over this one's (above 1: faster than `mx.fast.scaled_dot_product_attention`). "
        "`auto` is what `auto` now picks for the problem.",
        "",
        "| mode | mask | dtype | B | H/KV | D | L | " + " | ".join(f"{n} ms" for n in names) + " | auto |",
        "|---|---|---|---|---|---|---|" + "---|" * (len(names) + 1),
    ]
    for index, row in enumerate(f.timings):
        auto = f.auto_choices[index] if index < len(f.auto_choices) else ""
        cells = []
        for n in names:
            if n in row["median_s"]:
                cells.append(f"{row['median_s'][n] * 1e3:.3g}{_ratio(row, n)}")
            elif n in row["failed"]:
                cells.append("**FAILED**")
            else:
                cells.append("")
        lines.append(
            f"| {row['mode']} | {row['mask']} | {row['dtype']} | {row['batch']} | {row['heads']}/{row['kv_heads']} "
            f"| {row['head_dim']} | {row['seq']} | " + " | ".join(cells) + f" | {auto} |"
        )
    failures = [(row, n, d) for row in f.timings for n, d in row["failed"].items()]
    if failures:
        lines += [
            "",
            "### Timing check failures",
            "",
            "Each is recorded as a failure of that kernel for the problem's mask kinds: `auto` will not use it there.",
            "",
        ]
        for row, name, detail in failures:
            problem = f"{row['mode']} {row['mask']} {row['dtype']} D={row['head_dim']} L={row['seq']}"
            lines.append(f"- {name} {problem}: {detail}")
    return lines + [""]


def render(findings) -> str:
    """The Markdown report of ``findings`` (a ``checkup.Findings``)."""
    return "\n".join(_header(findings) + _validation(findings) + _timings(findings)).rstrip() + "\n"
